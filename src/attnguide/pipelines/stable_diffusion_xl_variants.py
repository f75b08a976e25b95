"""Drop-in Stable Diffusion XL image-to-image, inpainting and ControlNet PAG pipelines.

Each class is diffusers' own non-PAG SDXL pipeline (``StableDiffusionXLImg2ImgPipeline``, ...) whose loop
runs inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments of the diffusers PAG
pipeline it replaces (same numbers), plus every :class:`GuidanceOptions` keyword (SAG beside PAG); the
classes are built by :func:`attnguide.pipelines.pag_compat.pag_dropin`. As attnguide's other SDXL
pipelines, ``add_watermarker=None`` means no watermark (:func:`watermark_opt_in`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers import StableDiffusionXLControlNetPAGImg2ImgPipeline as _DiffusersControlNetImg2ImgPAG
from diffusers import StableDiffusionXLControlNetPAGPipeline as _DiffusersControlNetPAG
from diffusers import StableDiffusionXLPAGImg2ImgPipeline as _DiffusersImg2ImgPAG
from diffusers import StableDiffusionXLPAGInpaintPipeline as _DiffusersInpaintPAG

from .pag_compat import pag_dropin
from .stable_diffusion_xl import watermark_opt_in


def _watermark_opted_in(base_init: Callable[..., None]) -> Callable[..., None]:
    """An SDXL pipeline's ``__init__`` (same signature) whose ``add_watermarker`` is
    :func:`watermark_opt_in`'s."""
    signature = inspect.signature(base_init)

    @functools.wraps(base_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["add_watermarker"] = watermark_opt_in(bound.arguments.get("add_watermarker"))
        base_init(*bound.args, **bound.kwargs)

    return __init__


def _sdxl_dropin(base: type, theirs: type) -> type:
    """:func:`pag_dropin` of an SDXL pipeline, its watermark opted in."""
    return pag_dropin(base, theirs, init=_watermark_opted_in(base.__init__))


class StableDiffusionXLPAGImg2ImgPipeline(
    _sdxl_dropin(StableDiffusionXLImg2ImgPipeline, _DiffusersImg2ImgPAG)
):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGImg2ImgPipeline``, with SAG beside PAG."""


class StableDiffusionXLPAGInpaintPipeline(
    _sdxl_dropin(StableDiffusionXLInpaintPipeline, _DiffusersInpaintPAG)
):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGInpaintPipeline`` (4- and 9-channel UNets),
    with SAG beside PAG."""


class StableDiffusionXLControlNetPAGPipeline(
    _sdxl_dropin(StableDiffusionXLControlNetPipeline, _DiffusersControlNetPAG)
):
    """Drop-in successor of diffusers' ``StableDiffusionXLControlNetPAGPipeline``, with SAG beside PAG."""


class StableDiffusionXLControlNetPAGImg2ImgPipeline(
    _sdxl_dropin(StableDiffusionXLControlNetImg2ImgPipeline, _DiffusersControlNetImg2ImgPAG)
):
    """Drop-in successor of diffusers' ``StableDiffusionXLControlNetPAGImg2ImgPipeline``, with SAG beside
    PAG."""


__all__ = [
    "StableDiffusionXLControlNetPAGImg2ImgPipeline",
    "StableDiffusionXLControlNetPAGPipeline",
    "StableDiffusionXLPAGImg2ImgPipeline",
    "StableDiffusionXLPAGInpaintPipeline",
]
