"""Drop-in Stable Diffusion 1.x/2.x image-to-image, inpainting and ControlNet PAG pipelines.

Each class is diffusers' own non-PAG pipeline (``StableDiffusionImg2ImgPipeline``, ...) whose loop runs
inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments of the diffusers PAG
pipeline it replaces (same numbers), plus every :class:`GuidanceOptions` keyword (SAG beside PAG); the
classes are built by :func:`attnguide.pipelines.pag_compat.pag_dropin`.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)
from diffusers import StableDiffusionControlNetPAGInpaintPipeline as _DiffusersControlNetInpaintPAG
from diffusers import StableDiffusionControlNetPAGPipeline as _DiffusersControlNetPAG
from diffusers import StableDiffusionPAGImg2ImgPipeline as _DiffusersImg2ImgPAG
from diffusers import StableDiffusionPAGInpaintPipeline as _DiffusersInpaintPAG

from .pag_compat import pag_dropin
from .stable_diffusion import ClipSkipMixin


class StableDiffusionPAGImg2ImgPipeline(
    pag_dropin(StableDiffusionImg2ImgPipeline, _DiffusersImg2ImgPAG, mixins=(ClipSkipMixin,))
):
    """Drop-in successor of diffusers' ``StableDiffusionPAGImg2ImgPipeline``, with SAG beside PAG."""


class StableDiffusionPAGInpaintPipeline(
    pag_dropin(
        StableDiffusionInpaintPipeline,
        _DiffusersInpaintPAG,
        mixins=(ClipSkipMixin,),
        # diffusers' PAG inpainting corrects clip_sample where StableDiffusionInpaintPipeline corrects
        # skip_prk_steps
        scheduler_fixups=("steps_offset", "clip_sample"),
    )
):
    """Drop-in successor of diffusers' ``StableDiffusionPAGInpaintPipeline`` (4- and 9-channel UNets),
    with SAG beside PAG (``strength=0.9999`` by default, as diffusers'). ``guidance_rescale`` must be 0:
    ``StableDiffusionInpaintPipeline``'s loop has no CFG rescale (diffusers' PAG inpainting fails on it
    with PAG and CFG too)."""

    def adapt_call(self, call: dict[str, Any]) -> dict[str, Any]:
        rescale = call.pop("guidance_rescale")
        if rescale != 0:
            raise ValueError(
                f"`guidance_rescale` must be 0 here, got {rescale!r}: StableDiffusionInpaintPipeline, "
                "whose loop this pipeline runs, has no CFG rescale"
            )
        return call


class StableDiffusionControlNetPAGPipeline(
    pag_dropin(StableDiffusionControlNetPipeline, _DiffusersControlNetPAG, mixins=(ClipSkipMixin,))
):
    """Drop-in successor of diffusers' ``StableDiffusionControlNetPAGPipeline``, with SAG beside PAG.
    The ControlNet runs once per step, as in diffusers; the guidance passes reuse its residuals (the
    degraded SAG pass too)."""


class StableDiffusionControlNetPAGInpaintPipeline(
    pag_dropin(
        StableDiffusionControlNetInpaintPipeline, _DiffusersControlNetInpaintPAG, mixins=(ClipSkipMixin,)
    )
):
    """Drop-in successor of diffusers' ``StableDiffusionControlNetPAGInpaintPipeline``, with SAG beside
    PAG."""


__all__ = [
    "StableDiffusionControlNetPAGInpaintPipeline",
    "StableDiffusionControlNetPAGPipeline",
    "StableDiffusionPAGImg2ImgPipeline",
    "StableDiffusionPAGInpaintPipeline",
]
