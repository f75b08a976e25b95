"""Drop-in diffusers pipelines with attention guidance."""

from .pixel import DDPMSAGPipeline
from .stable_diffusion import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline

__all__ = ["DDPMSAGPipeline", "StableDiffusionPAGPipeline", "StableDiffusionSAGPipeline"]
