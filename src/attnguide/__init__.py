"""attnguide: Self-Attention Guidance, blur guidance and Perturbed-Attention Guidance for diffusion models.

Three layers, dependencies pointing one way (docs/architecture.md):

* :mod:`attnguide.engine`: the guidance terms and formulas (``engine.guidance``), degradations, attention
  processors, model-output conversions and the guided step (:class:`attnguide.Guider`). Imports nothing
  of the layers above.
* :mod:`attnguide.pipelines`: diffusers integration: :func:`attnguide.guide` for any pipeline, and the
  drop-in pipelines (diffusers' own loops run inside ``guide``).
* :mod:`attnguide.apps`: the ``attnguide`` command (sample, demo, eval, bench, train).
"""

from .engine.guidance import PAG, SAG, SEG, SLG, TPG
from .engine.step import Guider, sample_loop
from .pipelines import (
    AnimateDiffPAGPipeline,
    DDPMSAGPipeline,
    DiTSAGPipeline,
    FluxSAGPipeline,
    HunyuanDiTPAGPipeline,
    KolorsPAGPipeline,
    PixArtSigmaPAGPipeline,
    SanaPAGPipeline,
    SanaSAGPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3SAGPipeline,
    StableDiffusionControlNetPAGInpaintPipeline,
    StableDiffusionControlNetPAGPipeline,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionSAGPipeline,
    StableDiffusionXLControlNetPAGImg2ImgPipeline,
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLSAGPipeline,
)
from .pipelines.guide import guide

__version__ = "0.1.0"

__all__ = [
    "PAG",
    "SAG",
    "SEG",
    "SLG",
    "TPG",
    "AnimateDiffPAGPipeline",
    "DDPMSAGPipeline",
    "DiTSAGPipeline",
    "FluxSAGPipeline",
    "Guider",
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
    "__version__",
    "guide",
    "sample_loop",
]
