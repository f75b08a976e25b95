"""Drop-in Sana pipelines with SAG and PAG (flow matching, linear attention).

Each class is diffusers' own ``SanaPipeline`` whose loop runs inside :func:`attnguide.guide`.
:class:`SanaPAGPipeline` takes the constructor and ``__call__`` arguments of diffusers'
``SanaPAGPipeline`` (same numbers: V for the perturbed rows of the chosen linear-attention layers);
:class:`SanaSAGPipeline` takes ``SanaPipeline``'s. Both take every :class:`GuidanceOptions` keyword. Sana's
self-attention is linear (ReLU kernel, no softmax): the SAG map is the implicit attention matrix's
column sums, computed in O(N d) (engine/attention.py, ``linear_attention_map``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import SanaPAGPipeline as _DiffusersSanaPAG
from diffusers import SanaPipeline

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import GuidanceOptions, with_guidance_options
from .pag_compat import pag_dropin

_SANA_CALL = inspect.signature(SanaPipeline.__call__)


class SanaSAGPipeline(GuidedPipelineMixin, SanaPipeline):
    """diffusers' ``SanaPipeline`` with SAG (``sag_scale``, default 0.75), blur guidance and PAG; with
    ``sag_scale=0`` it is that pipeline."""

    @torch.no_grad()
    @with_guidance_options(base=SanaPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any):
        """``SanaPipeline.__call__``'s arguments, then the keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_SANA_CALL, args, kwargs)
        return self.run_guided(GuidanceOptions.take(kwargs), call, kwargs)


class SanaPAGPipeline(pag_dropin(SanaPipeline, _DiffusersSanaPAG)):
    """Drop-in successor of diffusers' ``SanaPAGPipeline``, with SAG beside PAG (default PAG layer:
    diffusers' "transformer_blocks.0")."""


__all__ = ["SanaPAGPipeline", "SanaSAGPipeline"]
