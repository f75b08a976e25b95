"""Drop-in Stable Diffusion 1.x/2.x image-to-image, inpainting and ControlNet PAG pipelines.

Each class is diffusers' own non-PAG pipeline (``StableDiffusionImg2ImgPipeline``, ...) whose loop runs
inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments of the diffusers PAG
pipeline it replaces (same numbers), plus every :class:`GuidanceOptions` keyword (SAG beside PAG).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
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

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import PAG_PIPELINE_DEFAULTS, PAGLayersMixin, init_with_pag_layers, with_guidance_options
from .stable_diffusion import ClipSkipMixin

_IMG2IMG_CALL = inspect.signature(_DiffusersImg2ImgPAG.__call__)
_INPAINT_CALL = inspect.signature(_DiffusersInpaintPAG.__call__)
_CONTROLNET_CALL = inspect.signature(_DiffusersControlNetPAG.__call__)
_CONTROLNET_INPAINT_CALL = inspect.signature(_DiffusersControlNetInpaintPAG.__call__)


class StableDiffusionPAGImg2ImgPipeline(
    PAGLayersMixin, ClipSkipMixin, GuidedPipelineMixin, StableDiffusionImg2ImgPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionPAGImg2ImgPipeline``, with SAG beside PAG."""

    _callback_tensor_inputs = _DiffusersImg2ImgPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(StableDiffusionImg2ImgPipeline.__init__, _DiffusersImg2ImgPAG.__init__)

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersImg2ImgPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionPAGImg2ImgPipeline.__call__`` arguments (same defaults and
        meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_IMG2IMG_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


class StableDiffusionPAGInpaintPipeline(
    PAGLayersMixin, ClipSkipMixin, GuidedPipelineMixin, StableDiffusionInpaintPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionPAGInpaintPipeline`` (4- and 9-channel UNets),
    with SAG beside PAG. ``guidance_rescale`` must be 0: ``StableDiffusionInpaintPipeline``'s loop has
    no CFG rescale (diffusers' PAG inpainting fails on it with PAG and CFG too)."""

    _callback_tensor_inputs = _DiffusersInpaintPAG._callback_tensor_inputs

    # diffusers' PAG inpainting corrects clip_sample where StableDiffusionInpaintPipeline corrects
    # skip_prk_steps
    __init__ = init_with_pag_layers(
        StableDiffusionInpaintPipeline.__init__,
        _DiffusersInpaintPAG.__init__,
        scheduler_fixups=("steps_offset", "clip_sample"),
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersInpaintPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionPAGInpaintPipeline.__call__`` arguments (same defaults and
        meaning, ``strength=0.9999`` included), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_INPAINT_CALL, args, kwargs)
        rescale = call.pop("guidance_rescale")
        if rescale != 0:
            raise ValueError(
                f"`guidance_rescale` must be 0 here, got {rescale!r}: StableDiffusionInpaintPipeline, "
                "whose loop this pipeline runs, has no CFG rescale"
            )
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


class StableDiffusionControlNetPAGPipeline(
    PAGLayersMixin, ClipSkipMixin, GuidedPipelineMixin, StableDiffusionControlNetPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionControlNetPAGPipeline``, with SAG beside PAG.
    The ControlNet runs once per step, as in diffusers; the guidance passes reuse its residuals (the
    degraded SAG pass too)."""

    _callback_tensor_inputs = _DiffusersControlNetPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(
        StableDiffusionControlNetPipeline.__init__, _DiffusersControlNetPAG.__init__
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersControlNetPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionControlNetPAGPipeline.__call__`` arguments (same defaults and
        meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CONTROLNET_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


class StableDiffusionControlNetPAGInpaintPipeline(
    PAGLayersMixin, ClipSkipMixin, GuidedPipelineMixin, StableDiffusionControlNetInpaintPipeline
):
    """Drop-in successor of diffusers' ``StableDiffusionControlNetPAGInpaintPipeline``, with SAG beside
    PAG."""

    _callback_tensor_inputs = _DiffusersControlNetInpaintPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(
        StableDiffusionControlNetInpaintPipeline.__init__, _DiffusersControlNetInpaintPAG.__init__
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersControlNetInpaintPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``StableDiffusionControlNetPAGInpaintPipeline.__call__`` arguments (same defaults
        and meaning), then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CONTROLNET_INPAINT_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = [
    "StableDiffusionControlNetPAGInpaintPipeline",
    "StableDiffusionControlNetPAGPipeline",
    "StableDiffusionPAGImg2ImgPipeline",
    "StableDiffusionPAGInpaintPipeline",
]
