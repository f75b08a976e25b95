"""Drop-in diffusers pipelines with attention guidance."""

from .stable_diffusion import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline

__all__ = ["StableDiffusionPAGPipeline", "StableDiffusionSAGPipeline"]
