"""Drop-in diffusers pipelines with attention guidance, and :func:`attnguide.guide` for any pipeline.

Lazy (PEP 562): importing this package (or one of its modules, such as ``schedulers``) imports no
pipeline; each class below is imported when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .. import notices  # noqa: F401  (first: its filters go in before diffusers' pipelines import)

#: Each drop-in class and the module that defines it.
_LAZY = {
    "AnimateDiffPAGPipeline": "animatediff",
    "DDPMSAGPipeline": "ddpm",
    "DiTSAGPipeline": "dit",
    "FluxSAGPipeline": "flux",
    "HunyuanDiTPAGPipeline": "hunyuandit",
    "KolorsPAGPipeline": "kolors",
    "PixArtSigmaPAGPipeline": "pixart",
    "SanaPAGPipeline": "sana",
    "SanaSAGPipeline": "sana",
    "StableDiffusion3PAGImg2ImgPipeline": "stable_diffusion_3",
    "StableDiffusion3PAGPipeline": "stable_diffusion_3",
    "StableDiffusion3SAGPipeline": "stable_diffusion_3",
    "StableDiffusionControlNetPAGInpaintPipeline": "stable_diffusion_variants",
    "StableDiffusionControlNetPAGPipeline": "stable_diffusion_variants",
    "StableDiffusionPAGImg2ImgPipeline": "stable_diffusion_variants",
    "StableDiffusionPAGInpaintPipeline": "stable_diffusion_variants",
    "StableDiffusionPAGPipeline": "stable_diffusion",
    "StableDiffusionSAGPipeline": "stable_diffusion",
    "StableDiffusionXLControlNetPAGImg2ImgPipeline": "stable_diffusion_xl_variants",
    "StableDiffusionXLControlNetPAGPipeline": "stable_diffusion_xl_variants",
    "StableDiffusionXLPAGImg2ImgPipeline": "stable_diffusion_xl_variants",
    "StableDiffusionXLPAGInpaintPipeline": "stable_diffusion_xl_variants",
    "StableDiffusionXLPAGPipeline": "stable_diffusion_xl",
    "StableDiffusionXLSAGPipeline": "stable_diffusion_xl",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnguide.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:
    from .animatediff import AnimateDiffPAGPipeline  # noqa: F401
    from .ddpm import DDPMSAGPipeline  # noqa: F401
    from .dit import DiTSAGPipeline  # noqa: F401
    from .flux import FluxSAGPipeline  # noqa: F401
    from .hunyuandit import HunyuanDiTPAGPipeline  # noqa: F401
    from .kolors import KolorsPAGPipeline  # noqa: F401
    from .pixart import PixArtSigmaPAGPipeline  # noqa: F401
    from .sana import SanaPAGPipeline, SanaSAGPipeline  # noqa: F401
    from .stable_diffusion import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline  # noqa: F401
    from .stable_diffusion_3 import (  # noqa: F401
        StableDiffusion3PAGImg2ImgPipeline,
        StableDiffusion3PAGPipeline,
        StableDiffusion3SAGPipeline,
    )
    from .stable_diffusion_variants import (  # noqa: F401
        StableDiffusionControlNetPAGInpaintPipeline,
        StableDiffusionControlNetPAGPipeline,
        StableDiffusionPAGImg2ImgPipeline,
        StableDiffusionPAGInpaintPipeline,
    )
    from .stable_diffusion_xl import StableDiffusionXLPAGPipeline, StableDiffusionXLSAGPipeline  # noqa: F401
    from .stable_diffusion_xl_variants import (  # noqa: F401
        StableDiffusionXLControlNetPAGImg2ImgPipeline,
        StableDiffusionXLControlNetPAGPipeline,
        StableDiffusionXLPAGImg2ImgPipeline,
        StableDiffusionXLPAGInpaintPipeline,
    )
