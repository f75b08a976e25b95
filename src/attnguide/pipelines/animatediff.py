"""Drop-in AnimateDiff PAG pipeline: diffusers' ``AnimateDiffPipeline`` (video latents, batch x channels x
frames x height x width) whose loop runs inside :func:`attnguide.guide`, with the constructor and
``__call__`` arguments of diffusers' ``AnimateDiffPAGPipeline`` plus every :class:`GuidanceOptions` keyword.
"""

from __future__ import annotations

from diffusers import AnimateDiffPAGPipeline as _DiffusersAnimateDiffPAG
from diffusers import AnimateDiffPipeline

from .pag_compat import pag_dropin
from .stable_diffusion import ClipSkipMixin


class AnimateDiffPAGPipeline(
    pag_dropin(AnimateDiffPipeline, _DiffusersAnimateDiffPAG, mixins=(ClipSkipMixin,))
):
    """Drop-in successor of diffusers' ``AnimateDiffPAGPipeline``, with SAG beside PAG. The default PAG
    layers are diffusers' "mid_block.*attn1": the mid block's spatial and motion self-attention."""


__all__ = ["AnimateDiffPAGPipeline"]
