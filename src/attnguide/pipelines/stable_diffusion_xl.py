"""Drop-in Stable Diffusion XL pipelines with SAG, blur guidance and PAG.

Each class is diffusers' own ``StableDiffusionXLPipeline`` whose loop runs inside :func:`attnguide.guide`.
:class:`StableDiffusionXLSAGPipeline` takes the arguments of ``StableDiffusionXLPipeline.__call__`` (with
``sag_scale=0`` it is that pipeline) and :class:`StableDiffusionXLPAGPipeline` those of diffusers'
``StableDiffusionXLPAGPipeline`` (same numbers), both plus every :class:`GuidanceOptions` keyword. The
SDXL micro-conditioning (pooled text embeddings and ``time_ids``) reaches every pass, the degraded SAG
pass included. diffusers has no SAG pipeline for SDXL (its SD 1.x one cannot run an SDXL UNet, which needs
``added_cond_kwargs``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers import StableDiffusionXLPAGPipeline as _DiffusersXLPAG
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import is_invisible_watermark_available
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ._guided import GuidedPipelineMixin, bind_arguments
from .call_checks import check_fraction, image_size, latent_shape
from .options import GuidanceOptions, with_guidance_options
from .pag_compat import pag_dropin

_XL_CALL = inspect.signature(StableDiffusionXLPipeline.__call__)


def _check_pair(name: str, value: Any) -> None:
    """None or an SDXL size / crop argument: two finite numbers, else ValueError naming it."""
    if value is None:
        return
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
    ):
        raise ValueError(f"`{name}` must be a pair of numbers (height, width) or (top, left), got {value!r}")


def watermark_opt_in(add_watermarker: bool | None) -> bool:
    """The ``add_watermarker`` of attnguide's SDXL pipelines: unlike diffusers (which watermarks whenever
    invisible-watermark is installed), None means no watermark, so outputs do not depend on which
    optional packages happen to be installed; True without the package raises ImportError."""
    if add_watermarker and not is_invisible_watermark_available():
        raise ImportError(
            "`add_watermarker=True` needs the invisible-watermark package (pip install invisible-watermark)"
        )
    return bool(add_watermarker)


class _GuidedStableDiffusionXL(GuidedPipelineMixin, StableDiffusionXLPipeline):
    """diffusers' SDXL pipeline, guided; plus the checks diffusers makes only after the text encoders."""

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=watermark_opt_in(add_watermarker),
        )

    def checked_size(self, call: dict[str, Any]) -> tuple[int, int]:
        """The call's (height, width), checked (None: the UNet's default size)."""
        f = self.vae_scale_factor
        return image_size(call, self.default_sample_size * f, f, " (the VAE factor)")

    def latents_shape(self, call: dict[str, Any]) -> tuple[int, ...] | None:
        f = self.vae_scale_factor
        height, width = self.checked_size(call)
        return latent_shape(call, self.unet.config.in_channels, height // f, width // f)

    def check_call(self, call: dict[str, Any]) -> None:
        """Every check that can fail, before any model runs: ValueError naming the argument."""
        super().check_call(call)
        height, width = self.checked_size(call)
        check_fraction("denoising_end", call["denoising_end"])
        for name in ("original_size", "crops_coords_top_left", "target_size"):
            _check_pair(name, call[name])
            _check_pair(f"negative_{name}", call[f"negative_{name}"])
        names = inspect.signature(self.check_inputs).parameters
        self.check_inputs(
            **{k: call.get(k) for k in names if k not in ("height", "width")}, height=height, width=width
        )


class StableDiffusionXLSAGPipeline(_GuidedStableDiffusionXL):
    """SDXL text-to-image with SAG (and blur guidance, PAG, CFG): diffusers' ``StableDiffusionXLPipeline``
    constructor and arguments, plus keyword-only guidance options (:class:`GuidanceOptions`).

    With ``sag_scale=0`` (and ``pag_scale=0``) it is diffusers' ``StableDiffusionXLPipeline``.
    ``sag_scale`` follows diffusers (s in out += s (u - degraded)); the degraded pass gets the same text,
    pooled text and ``time_ids`` as the branch it refers to (unconditional with CFG, else conditional).
    """

    @torch.no_grad()
    @with_guidance_options(base=StableDiffusionXLPipeline.__call__)
    def __call__(self, *args: Any, **kwargs: Any):
        """Generate images with CFG (``guidance_scale`` > 1), SAG (``sag_scale`` > 0) and, optionally, PAG.

        The arguments of diffusers' ``StableDiffusionXLPipeline.__call__`` (same defaults and meaning), then
        the keyword-only :class:`GuidanceOptions` (``sag_scale=0.75``, ``sag_layers``, ``pag_scale``, ...).
        """
        options = GuidanceOptions.take(kwargs)
        call = bind_arguments(_XL_CALL, args, kwargs)
        return self.run_guided(options, call, kwargs)


class StableDiffusionXLPAGPipeline(pag_dropin(_GuidedStableDiffusionXL, _DiffusersXLPAG, like=False)):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGPipeline`` (same constructor with
    ``pag_applied_layers``, same arguments, same results), with SAG available beside PAG."""


__all__ = ["StableDiffusionXLPAGPipeline", "StableDiffusionXLSAGPipeline", "watermark_opt_in"]
