"""attnguide: Self-Attention Guidance, blur guidance and Perturbed-Attention Guidance for diffusion models.

The guidance formulas are in :mod:`attnguide.guidance`; the per-step engine that any pipeline calls is
:class:`attnguide.Guider`; drop-in diffusers pipelines are in :mod:`attnguide.pipelines`.
"""

from .engine.guidance import PAG, SAG
from .engine.step import Guider, sample_loop
from .pipelines import (
    DDPMSAGPipeline,
    DiTSAGPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionSAGPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLSAGPipeline,
)
from .pipelines.guide import guide

__version__ = "0.1.0"

__all__ = [
    "PAG",
    "SAG",
    "DDPMSAGPipeline",
    "DiTSAGPipeline",
    "Guider",
    "StableDiffusionPAGPipeline",
    "StableDiffusionSAGPipeline",
    "StableDiffusionXLPAGPipeline",
    "StableDiffusionXLSAGPipeline",
    "__version__",
    "guide",
    "sample_loop",
]
