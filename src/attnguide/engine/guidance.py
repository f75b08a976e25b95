"""The public names of the guidance engine's formulas, for ``from attnguide.engine.guidance import ...``.

Each term lives in its own file of :mod:`attnguide.engine.terms` (SAG, blur guidance and SAG's ablations
in ``sag.py``, PAG in ``pag.py``, SEG, TPG, SLG, classifier guidance), with its paper's equations; CFG,
the combine rule, in :mod:`attnguide.engine.combine`. This module only names them in one place.
"""

from __future__ import annotations

from .checks import check_scale
from .combine import cfg, combine, rescale_cfg
from .terms import (
    PAG,
    REGISTRY,
    SAG,
    SEG,
    SLG,
    TPG,
    ClassifierGuidance,
    GradFn,
    Term,
    classifier_grad_fn,
    classifier_shift,
    in_window,
    sag_degraded_input,
    sag_update,
)

__all__ = [
    "PAG",
    "REGISTRY",
    "SAG",
    "SEG",
    "SLG",
    "TPG",
    "ClassifierGuidance",
    "GradFn",
    "Term",
    "cfg",
    "check_scale",
    "classifier_grad_fn",
    "classifier_shift",
    "combine",
    "in_window",
    "rescale_cfg",
    "sag_degraded_input",
    "sag_update",
]
