"""Drop-in PixArt-Sigma PAG pipeline: diffusers' ``PixArtSigmaPipeline`` whose loop runs inside
:func:`attnguide.guide`, with the constructor and ``__call__`` arguments of diffusers'
``PixArtSigmaPAGPipeline`` plus every :class:`GuidanceOptions` keyword.
"""

from __future__ import annotations

from diffusers import PixArtSigmaPAGPipeline as _DiffusersPixArtSigmaPAG
from diffusers import PixArtSigmaPipeline

from .pag_compat import pag_dropin


class PixArtSigmaPAGPipeline(pag_dropin(PixArtSigmaPipeline, _DiffusersPixArtSigmaPAG)):
    """Drop-in successor of diffusers' ``PixArtSigmaPAGPipeline``, with SAG beside PAG. The default PAG
    layer is diffusers' "blocks.1" (the second transformer block; here not blocks 10-19 as well)."""


__all__ = ["PixArtSigmaPAGPipeline"]
