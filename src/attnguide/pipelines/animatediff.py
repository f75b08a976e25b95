"""Drop-in AnimateDiff PAG pipeline: diffusers' ``AnimateDiffPipeline`` (video latents, batch x channels x
frames x height x width) whose loop runs inside :func:`attnguide.guide`, with the constructor and
``__call__`` arguments of diffusers' ``AnimateDiffPAGPipeline`` plus every :class:`GuidanceOptions` keyword.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import AnimateDiffPAGPipeline as _DiffusersAnimateDiffPAG
from diffusers import AnimateDiffPipeline

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import PAG_PIPELINE_DEFAULTS, PAGLayersMixin, init_with_pag_layers, with_guidance_options
from .stable_diffusion import ClipSkipMixin

_CALL = inspect.signature(_DiffusersAnimateDiffPAG.__call__)


class AnimateDiffPAGPipeline(PAGLayersMixin, ClipSkipMixin, GuidedPipelineMixin, AnimateDiffPipeline):
    """Drop-in successor of diffusers' ``AnimateDiffPAGPipeline``, with SAG beside PAG. The default PAG
    layers are diffusers' "mid_block.*attn1": the mid block's spatial and motion self-attention."""

    _callback_tensor_inputs = _DiffusersAnimateDiffPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(AnimateDiffPipeline.__init__, _DiffusersAnimateDiffPAG.__init__)

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersAnimateDiffPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``AnimateDiffPAGPipeline.__call__`` arguments (same defaults and meaning), then the
        keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = ["AnimateDiffPAGPipeline"]
