"""Drop-in PixArt-Sigma PAG pipeline: diffusers' ``PixArtSigmaPipeline`` whose loop runs inside
:func:`attnguide.guide`, with the constructor and ``__call__`` arguments of diffusers'
``PixArtSigmaPAGPipeline`` plus every :class:`GuidanceOptions` keyword.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import PixArtSigmaPAGPipeline as _DiffusersPixArtSigmaPAG
from diffusers import PixArtSigmaPipeline

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import PAG_PIPELINE_DEFAULTS, PAGLayersMixin, init_with_pag_layers, with_guidance_options

_CALL = inspect.signature(_DiffusersPixArtSigmaPAG.__call__)


class PixArtSigmaPAGPipeline(PAGLayersMixin, GuidedPipelineMixin, PixArtSigmaPipeline):
    """Drop-in successor of diffusers' ``PixArtSigmaPAGPipeline``, with SAG beside PAG. The default PAG
    layer is diffusers' "blocks.1" (the second transformer block; here not blocks 10-19 as well)."""

    __init__ = init_with_pag_layers(PixArtSigmaPipeline.__init__, _DiffusersPixArtSigmaPAG.__init__)

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersPixArtSigmaPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``PixArtSigmaPAGPipeline.__call__`` arguments (same defaults and meaning), then the
        keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = ["PixArtSigmaPAGPipeline"]
