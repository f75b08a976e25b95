"""The guidance terms, one class per file (the protocol: :mod:`.base`), and the registry that the
pipelines' keywords, ``guide()``, the CLI, the demo, the evaluation and the benchmark are generated from.

A new term is one file here with its class, and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from .apg import APG
from .base import AppParam, AppSpec, AttentionCall, Method, StepContext, StepOutputs, Term, in_window
from .cfg_zero import CFGZeroStar
from .classifier import ClassifierGuidance, GradFn, classifier_grad_fn, classifier_shift
from .fdg import FDG
from .interval import GuidanceInterval
from .nag import NAG, nag_mix
from .pag import PAG, identity_attention
from .pladis import PLADIS
from .rule import CFGRule
from .sag import SAG, sag_degraded_input, sag_update
from .seg import SEG, blur_queries, seg_attention, seg_kernel_size
from .slg import SLG
from .tcfg import TCFG
from .tpg import TPG

#: Every term, in the order their shares are added and their settings listed (Arm keys, flags, fields).
REGISTRY: tuple[type[Term], ...] = (
    SAG,
    PAG,
    SEG,
    TPG,
    SLG,
    ClassifierGuidance,
    PLADIS,
    NAG,
    APG,
    CFGZeroStar,
    TCFG,
    FDG,
    GuidanceInterval,
)
#: The terms by name (``guide(sag=...)``, ``Guider(pag=...)``).
TERMS: dict[str, type[Term]] = {cls.name: cls for cls in REGISTRY}


def term_class(name: str) -> type[Term]:
    """The term class registered as ``name``; ValueError listing the names otherwise."""
    if name not in TERMS:
        raise ValueError(f"unknown guidance term {name!r}; the terms are {', '.join(TERMS)}")
    return TERMS[name]


def check_terms(terms: dict[str, object | None]) -> dict[str, Term]:
    """The terms that act (given, scale not 0), by name; TypeError for one of the wrong class, ValueError
    for two CFG rules (each replaces CFG's combination: a run takes one)."""
    out = {}
    for name, term in terms.items():
        cls = term_class(name)
        if term is None:
            continue
        if not isinstance(term, cls):
            raise TypeError(f"`{name}` must be an attnguide.{cls.__name__} (or None), got {term!r}")
        if term.scale != 0:
            out[name] = term
    rules = [name for name, term in out.items() if term.rule]
    if len(rules) > 1:
        raise ValueError(f"{' and '.join(f'`{r}`' for r in rules)} are both CFG rules: a run takes one")
    return out


__all__ = [
    "APG",
    "FDG",
    "NAG",
    "PAG",
    "PLADIS",
    "REGISTRY",
    "SAG",
    "SEG",
    "SLG",
    "TCFG",
    "TERMS",
    "TPG",
    "AppParam",
    "AppSpec",
    "AttentionCall",
    "CFGRule",
    "CFGZeroStar",
    "ClassifierGuidance",
    "GradFn",
    "GuidanceInterval",
    "Method",
    "StepContext",
    "StepOutputs",
    "Term",
    "blur_queries",
    "check_terms",
    "classifier_grad_fn",
    "classifier_shift",
    "identity_attention",
    "in_window",
    "nag_mix",
    "sag_degraded_input",
    "sag_update",
    "seg_attention",
    "seg_kernel_size",
    "term_class",
]
