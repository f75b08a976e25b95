"""Drop-in HunyuanDiT PAG pipeline: diffusers' ``HunyuanDiTPipeline`` (rotary image embeddings, two text
encoders) whose loop runs inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments
of diffusers' ``HunyuanDiTPAGPipeline`` plus every :class:`GuidanceOptions` keyword.
"""

from __future__ import annotations

from diffusers import HunyuanDiTPAGPipeline as _DiffusersHunyuanDiTPAG
from diffusers import HunyuanDiTPipeline
from diffusers.models.attention_processor import PAGCFGHunyuanAttnProcessor2_0, PAGHunyuanAttnProcessor2_0

from .pag_compat import pag_dropin


class HunyuanDiTPAGPipeline(
    pag_dropin(
        HunyuanDiTPipeline,
        _DiffusersHunyuanDiTPAG,
        # diffusers' pair for the Hunyuan attention layout (what _set_pag_attn_processor installs)
        pag_attn_processors=(PAGCFGHunyuanAttnProcessor2_0(), PAGHunyuanAttnProcessor2_0()),
    )
):
    """Drop-in successor of diffusers' ``HunyuanDiTPAGPipeline``, with SAG beside PAG. The default PAG
    layer is diffusers' "blocks.1" (the second transformer block; here not blocks 10-19 as well)."""


__all__ = ["HunyuanDiTPAGPipeline"]
