"""Drop-in diffusers pipelines with attention guidance."""

from .animatediff import AnimateDiffPAGPipeline
from .ddpm import DDPMSAGPipeline
from .dit import DiTSAGPipeline
from .flux import FluxSAGPipeline
from .hunyuandit import HunyuanDiTPAGPipeline
from .kolors import KolorsPAGPipeline
from .pixart import PixArtSigmaPAGPipeline
from .sana import SanaPAGPipeline, SanaSAGPipeline
from .stable_diffusion import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline
from .stable_diffusion_3 import (
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3SAGPipeline,
)
from .stable_diffusion_variants import (
    StableDiffusionControlNetPAGInpaintPipeline,
    StableDiffusionControlNetPAGPipeline,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGInpaintPipeline,
)
from .stable_diffusion_xl import StableDiffusionXLPAGPipeline, StableDiffusionXLSAGPipeline
from .stable_diffusion_xl_variants import (
    StableDiffusionXLControlNetPAGImg2ImgPipeline,
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
)

__all__ = [
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
]
