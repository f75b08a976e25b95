"""attnguide: attention guidance for diffusion models, every term in one engine: Self-Attention Guidance
(SAG) and blur guidance, PAG, SEG, TPG, SLG and classifier guidance, combinable in one batched call.

Three layers, dependencies pointing one way (docs/architecture.md):

* :mod:`attnguide.engine`: the guidance terms (``engine/terms/``, one file each, and their registry), the
  CFG combine rule, degradations, attention interception, model-output conversions and the guided step
  (:class:`attnguide.Guider`). Imports nothing of the layers above.
* :mod:`attnguide.pipelines`: diffusers integration: :func:`attnguide.guide` for any pipeline, the
  drop-in pipelines (diffusers' own loops run inside ``guide``), and :class:`attnguide.AttnGuidance`,
  the terms as the guider of diffusers' modular pipelines.
* :mod:`attnguide.apps`: the ``attnguide`` command (sample, demo, eval, bench, train) and the bundled
  model (:func:`attnguide.bundled_pipeline`, :func:`attnguide.bundled_classifier`).

The package is lazy (PEP 562): ``import attnguide`` imports none of torch, diffusers or the pipelines;
each name below is imported when first used, and so is every term class of the registry
(``attnguide.engine.terms.REGISTRY``: ``from attnguide import SAG``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Where each public name lives (imported on first use).
_LAZY = {
    **dict.fromkeys(("PAG", "SAG", "SEG", "SLG", "TPG", "ClassifierGuidance"), "attnguide.engine.terms"),
    "MapLimits": "attnguide.engine.attention",
    "Guider": "attnguide.engine.step",
    "sample_loop": "attnguide.engine.step",
    "guide": "attnguide.pipelines.guide",
    "AttnGuidance": "attnguide.pipelines.modular",
    **dict.fromkeys(
        ("bundled_classifier", "bundled_model_path", "bundled_pipeline"), "attnguide.apps.bundled"
    ),
    **dict.fromkeys(
        (
            "AnimateDiffPAGPipeline",
            "DDPMSAGPipeline",
            "DiTSAGPipeline",
            "FluxSAGPipeline",
            "HunyuanDiTPAGPipeline",
            "KolorsPAGPipeline",
            "PixArtSigmaPAGPipeline",
            "SanaPAGPipeline",
            "SanaSAGPipeline",
            "StableDiffusion3PAGImg2ImgPipeline",
            "StableDiffusion3PAGPipeline",
            "StableDiffusion3SAGPipeline",
            "StableDiffusionControlNetPAGInpaintPipeline",
            "StableDiffusionControlNetPAGPipeline",
            "StableDiffusionPAGImg2ImgPipeline",
            "StableDiffusionPAGInpaintPipeline",
            "StableDiffusionPAGPipeline",
            "StableDiffusionSAGPipeline",
            "StableDiffusionXLControlNetPAGImg2ImgPipeline",
            "StableDiffusionXLControlNetPAGPipeline",
            "StableDiffusionXLPAGImg2ImgPipeline",
            "StableDiffusionXLPAGInpaintPipeline",
            "StableDiffusionXLPAGPipeline",
            "StableDiffusionXLSAGPipeline",
        ),
        "attnguide.pipelines",
    ),
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None and name[:1].isupper():  # every registered term class (the registry says which)
        terms = importlib.import_module("attnguide.engine.terms")
        if any(cls.__name__ == name for cls in terms.REGISTRY):
            module = "attnguide.engine.terms"
    if module is None:
        raise AttributeError(f"module 'attnguide' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from .engine.attention import MapLimits  # noqa: F401
    from .engine.step import Guider, sample_loop  # noqa: F401
    from .engine.terms import PAG, SAG, SEG, SLG, TPG, ClassifierGuidance  # noqa: F401
    from .pipelines import *  # noqa: F403  (every drop-in class)
    from .pipelines.guide import guide  # noqa: F401
