"""Drop-in HunyuanDiT PAG pipeline: diffusers' ``HunyuanDiTPipeline`` (rotary image embeddings, two text
encoders) whose loop runs inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments
of diffusers' ``HunyuanDiTPAGPipeline`` plus every :class:`GuidanceOptions` keyword.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import HunyuanDiTPAGPipeline as _DiffusersHunyuanDiTPAG
from diffusers import HunyuanDiTPipeline
from diffusers.models.attention_processor import PAGCFGHunyuanAttnProcessor2_0, PAGHunyuanAttnProcessor2_0

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import PAG_PIPELINE_DEFAULTS, PAGLayersMixin, init_with_pag_layers, with_guidance_options

_CALL = inspect.signature(_DiffusersHunyuanDiTPAG.__call__)


class HunyuanDiTPAGPipeline(PAGLayersMixin, GuidedPipelineMixin, HunyuanDiTPipeline):
    """Drop-in successor of diffusers' ``HunyuanDiTPAGPipeline``, with SAG beside PAG. The default PAG
    layer is diffusers' "blocks.1" (the second transformer block; here not blocks 10-19 as well)."""

    _callback_tensor_inputs = _DiffusersHunyuanDiTPAG._callback_tensor_inputs

    # diffusers' pair for the Hunyuan attention layout (what _set_pag_attn_processor installs)
    __init__ = init_with_pag_layers(
        HunyuanDiTPipeline.__init__,
        _DiffusersHunyuanDiTPAG.__init__,
        pag_attn_processors=(PAGCFGHunyuanAttnProcessor2_0(), PAGHunyuanAttnProcessor2_0()),
    )

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersHunyuanDiTPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``HunyuanDiTPAGPipeline.__call__`` arguments (same defaults and meaning), then the
        keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = ["HunyuanDiTPAGPipeline"]
