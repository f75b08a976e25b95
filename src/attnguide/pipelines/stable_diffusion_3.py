"""Drop-in Stable Diffusion 3 pipelines with SAG and PAG (flow matching, joint text + image attention).

Each class is diffusers' own ``StableDiffusion3Pipeline`` / ``StableDiffusion3Img2ImgPipeline`` whose
loop runs inside :func:`attnguide.guide`. The PAG classes take the constructor and ``__call__``
arguments of diffusers' ``StableDiffusion3PAGPipeline`` / ``StableDiffusion3PAGImg2ImgPipeline`` (same
numbers: identity attention on the image-image block of the joint attention, as diffusers); the SAG class
takes ``StableDiffusion3Pipeline``'s arguments. All take every :class:`GuidanceOptions` keyword: SAG on
SD3 blurs x0_hat = x_t - sigma v under the mask of the joint attention's image-to-image map and re-noises
it at the same sigma (engine/parameterization.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from diffusers import StableDiffusion3PAGImg2ImgPipeline as _DiffusersSD3PAGImg2Img
from diffusers import StableDiffusion3PAGPipeline as _DiffusersSD3PAG

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import GuidanceOptions, with_guidance_options
from .pag_compat import pag_dropin

_SD3_CALL = inspect.signature(StableDiffusion3Pipeline.__call__)


class StableDiffusion3SAGPipeline(GuidedPipelineMixin, StableDiffusion3Pipeline):
    """diffusers' ``StableDiffusion3Pipeline`` with SAG (``sag_scale``, default 0.75), blur guidance and
    PAG; with ``sag_scale=0`` it is that pipeline."""

    @torch.no_grad()
    @with_guidance_options(base=StableDiffusion3Pipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any):
        """``StableDiffusion3Pipeline.__call__``'s arguments, then the keyword-only
        :class:`GuidanceOptions`."""
        call = bind_arguments(_SD3_CALL, args, kwargs)
        return self.run_guided(GuidanceOptions.take(kwargs), call, kwargs)


class StableDiffusion3PAGPipeline(pag_dropin(StableDiffusion3Pipeline, _DiffusersSD3PAG)):
    """Drop-in successor of diffusers' ``StableDiffusion3PAGPipeline``, with SAG beside PAG. Default PAG
    layer: diffusers' "blocks.1" (block 1 only, not blocks 10-19 as well)."""


class StableDiffusion3PAGImg2ImgPipeline(
    pag_dropin(StableDiffusion3Img2ImgPipeline, _DiffusersSD3PAGImg2Img)
):
    """Drop-in successor of diffusers' ``StableDiffusion3PAGImg2ImgPipeline``, with SAG beside PAG."""


__all__ = ["StableDiffusion3PAGImg2ImgPipeline", "StableDiffusion3PAGPipeline", "StableDiffusion3SAGPipeline"]
