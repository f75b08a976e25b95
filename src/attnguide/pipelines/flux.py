"""A drop-in Flux pipeline with SAG and PAG (flow matching, packed 2x2 latents, text-first joint attention).

:class:`FluxSAGPipeline` is diffusers' own ``FluxPipeline`` whose loop runs inside :func:`attnguide.guide`
(diffusers has no SAG or PAG for Flux). It takes ``FluxPipeline``'s arguments and every
:class:`GuidanceOptions` keyword. How the guidance reaches Flux:

* The transformer's latents are packed 2x2 tokens placed by ``img_ids``; they are unpacked to the
  (B, 16, H, W) latent for the blur and the masks, and packed again (engine/layout.py).
* SAG's map comes from the image-to-image block of a double-stream block's joint attention, or from the
  image part of a single-stream block's sequence (text tokens come first in both), each row renormalised
  over the image keys; PAG's identity attention follows diffusers' SD3 rule there (engine/attention.py).
* Flux dev is guidance-distilled: ``guidance_scale`` is an embedding, not CFG, and there is no CFG
  batch. With ``true_cfg_scale > 1`` and a negative prompt, the two transformer calls of a step combine
  to u + w (c - u) + the guidance terms, each computed once (pipelines/guide.py, "separate").
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import FluxPipeline

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import GuidanceOptions, with_guidance_options

_FLUX_CALL = inspect.signature(FluxPipeline.__call__)


class FluxSAGPipeline(GuidedPipelineMixin, FluxPipeline):
    """diffusers' ``FluxPipeline`` with SAG (``sag_scale``, default 0.75), blur guidance and PAG; with
    ``sag_scale=0`` it is that pipeline. SAG's reference is the unconditional prediction where true CFG
    runs, else the (distilled) conditional one."""

    cfg_weight_argument = "true_cfg_scale"

    @torch.no_grad()
    @with_guidance_options(base=FluxPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any):
        """``FluxPipeline.__call__``'s arguments, then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_FLUX_CALL, args, kwargs)
        return self.run_guided(GuidanceOptions.take(kwargs), call, kwargs)


__all__ = ["FluxSAGPipeline"]
