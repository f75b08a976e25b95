"""Drop-in diffusers pipelines with attention guidance."""

from .ddpm import DDPMSAGPipeline
from .dit import DiTSAGPipeline
from .stable_diffusion import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline
from .stable_diffusion_xl import StableDiffusionXLPAGPipeline, StableDiffusionXLSAGPipeline

__all__ = [
    "DDPMSAGPipeline",
    "DiTSAGPipeline",
    "StableDiffusionPAGPipeline",
    "StableDiffusionSAGPipeline",
    "StableDiffusionXLPAGPipeline",
    "StableDiffusionXLSAGPipeline",
]
