"""Drop-in Kolors PAG pipeline: diffusers' ``KolorsPipeline`` (an SDXL-style UNet with a ChatGLM text
encoder) whose loop runs inside :func:`attnguide.guide`, with the constructor and ``__call__`` arguments
of diffusers' ``KolorsPAGPipeline`` plus every :class:`GuidanceOptions` keyword.

The classes come from their diffusers modules: diffusers' top-level names are placeholders unless
sentencepiece (which only the ChatGLM tokenizer needs) is installed.
"""

from __future__ import annotations

from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from diffusers.pipelines.pag.pipeline_pag_kolors import KolorsPAGPipeline as _DiffusersKolorsPAG

from .pag_compat import pag_dropin


class KolorsPAGPipeline(pag_dropin(KolorsPipeline, _DiffusersKolorsPAG)):
    """Drop-in successor of diffusers' ``KolorsPAGPipeline``, with SAG beside PAG."""


__all__ = ["KolorsPAGPipeline"]
