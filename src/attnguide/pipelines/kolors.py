"""Drop-in Kolors PAG pipeline: diffusers' ``KolorsPipeline`` (an SDXL-style UNet with a ChatGLM text
encoder) whose loop runs inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments
of diffusers' ``KolorsPAGPipeline`` plus every :class:`GuidanceOptions` keyword.

The classes come from their diffusers modules: diffusers' top-level names are placeholders unless
sentencepiece (which only the ChatGLM tokenizer needs) is installed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from diffusers.pipelines.pag.pipeline_pag_kolors import KolorsPAGPipeline as _DiffusersKolorsPAG

from ._guided import GuidedPipelineMixin, bind_arguments
from .options import PAG_PIPELINE_DEFAULTS, PAGLayersMixin, init_with_pag_layers, with_guidance_options

_CALL = inspect.signature(_DiffusersKolorsPAG.__call__)


class KolorsPAGPipeline(PAGLayersMixin, GuidedPipelineMixin, KolorsPipeline):
    """Drop-in successor of diffusers' ``KolorsPAGPipeline``, with SAG beside PAG."""

    _callback_tensor_inputs = _DiffusersKolorsPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(KolorsPipeline.__init__, _DiffusersKolorsPAG.__init__)

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersKolorsPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """diffusers' ``KolorsPAGPipeline.__call__`` arguments (same defaults and meaning), then the
        keyword-only :class:`GuidanceOptions`."""
        call = bind_arguments(_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = ["KolorsPAGPipeline"]
