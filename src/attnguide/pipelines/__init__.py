"""Drop-in diffusers pipelines with attention guidance."""

from .dit import DiTSAGPipeline
from .pixel import DDPMSAGPipeline
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
