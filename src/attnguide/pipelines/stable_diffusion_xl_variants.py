"""Drop-in Stable Diffusion XL image-to-image, inpainting and ControlNet PAG pipelines.

Each class is diffusers' own non-PAG SDXL pipeline (``StableDiffusionXLImg2ImgPipeline``, ...) whose loop
runs inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments of the diffusers PAG
pipeline it replaces (same numbers), plus every :class:`GuidanceOptions` keyword (SAG beside PAG). As
attnguide's other SDXL pipelines, ``add_watermarker=None`` means no watermark (:func:`watermark_opt_in`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
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

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import PAG_PIPELINE_DEFAULTS, PAGLayersMixin, init_with_pag_layers, with_guidance_options
from .stable_diffusion_xl import watermark_opt_in

_IMG2IMG_CALL = inspect.signature(_DiffusersImg2ImgPAG.__call__)
_INPAINT_CALL = inspect.signature(_DiffusersInpaintPAG.__call__)
_CONTROLNET_CALL = inspect.signature(_DiffusersControlNetPAG.__call__)
_CONTROLNET_IMG2IMG_CALL = inspect.signature(_DiffusersControlNetImg2ImgPAG.__call__)


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


class StableDiffusionXLPAGImg2ImgPipeline(
    PAGLayersMixin, GuidedPipelineMixin, StableDiffusionXLImg2ImgPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGImg2ImgPipeline``, with SAG beside PAG."""

    _callback_tensor_inputs = _DiffusersImg2ImgPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(
        _watermark_opted_in(StableDiffusionXLImg2ImgPipeline.__init__), _DiffusersImg2ImgPAG.__init__
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersImg2ImgPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionXLPAGImg2ImgPipeline.__call__`` arguments (same defaults and
        meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_IMG2IMG_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


class StableDiffusionXLPAGInpaintPipeline(
    PAGLayersMixin, GuidedPipelineMixin, StableDiffusionXLInpaintPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGInpaintPipeline`` (4- and 9-channel UNets),
    with SAG beside PAG."""

    _callback_tensor_inputs = _DiffusersInpaintPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(
        _watermark_opted_in(StableDiffusionXLInpaintPipeline.__init__), _DiffusersInpaintPAG.__init__
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersInpaintPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionXLPAGInpaintPipeline.__call__`` arguments (same defaults and
        meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_INPAINT_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


class StableDiffusionXLControlNetPAGPipeline(
    PAGLayersMixin, GuidedPipelineMixin, StableDiffusionXLControlNetPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionXLControlNetPAGPipeline``, with SAG beside PAG."""

    _callback_tensor_inputs = _DiffusersControlNetPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(
        _watermark_opted_in(StableDiffusionXLControlNetPipeline.__init__), _DiffusersControlNetPAG.__init__
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersControlNetPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionXLControlNetPAGPipeline.__call__`` arguments (same defaults and
        meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CONTROLNET_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


class StableDiffusionXLControlNetPAGImg2ImgPipeline(
    PAGLayersMixin, GuidedPipelineMixin, StableDiffusionXLControlNetImg2ImgPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionXLControlNetPAGImg2ImgPipeline``, with SAG beside
    PAG."""

    _callback_tensor_inputs = _DiffusersControlNetImg2ImgPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(
        _watermark_opted_in(StableDiffusionXLControlNetImg2ImgPipeline.__init__),
        _DiffusersControlNetImg2ImgPAG.__init__,
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersControlNetImg2ImgPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionXLControlNetPAGImg2ImgPipeline.__call__`` arguments (same defaults
        and meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CONTROLNET_IMG2IMG_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = [
    "StableDiffusionXLControlNetPAGImg2ImgPipeline",
    "StableDiffusionXLControlNetPAGPipeline",
    "StableDiffusionXLPAGImg2ImgPipeline",
    "StableDiffusionXLPAGInpaintPipeline",
]
