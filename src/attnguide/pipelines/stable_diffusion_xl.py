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

from ..engine.guidance import check_scale
from ._guided import GuidedPipelineMixin, bind_arguments
from .options import (
    PAG_PIPELINE_DEFAULTS,
    GuidanceOptions,
    PAGLayersMixin,
    check_fraction,
    divisible_size,
    init_with_pag_layers,
    positive_int,
    with_guidance_options,
)

_XL_CALL = inspect.signature(StableDiffusionXLPipeline.__call__)
_XL_PAG_CALL = inspect.signature(_DiffusersXLPAG.__call__)


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


def _check_embeds(call: dict[str, Any]) -> None:
    """Prompt embeddings: tensors of the right rank, pooled ones with as many rows as their embeddings."""
    for name, ndim in (
        ("prompt_embeds", 3),
        ("negative_prompt_embeds", 3),
        ("pooled_prompt_embeds", 2),
        ("negative_pooled_prompt_embeds", 2),
    ):
        emb = call[name]
        if emb is not None and (not isinstance(emb, torch.Tensor) or emb.ndim != ndim):
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"`{name}` must be a {ndim}-d tensor (batch first), got {shape}")
    for neg in ("", "negative_"):
        emb, pooled = call[f"{neg}prompt_embeds"], call[f"{neg}pooled_prompt_embeds"]
        if emb is not None and pooled is not None and pooled.shape[0] != emb.shape[0]:
            raise ValueError(f"`{neg}pooled_prompt_embeds` must have as many rows as `{neg}prompt_embeds`")


def _check_batch(call: dict[str, Any]) -> None:
    """Per-prompt lists and generator lists of the prompt batch's length."""
    prompt = call["prompt"]
    batch = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else None
    if batch is None:
        batch = call["prompt_embeds"].shape[0]
    for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
        value = call[name]
        if isinstance(value, list) and len(value) != batch:
            raise ValueError(
                f"`{name}` has {len(value)} entries but the prompt batch has {batch}; they must match"
            )
    images = batch * call["num_images_per_prompt"]
    generator = call["generator"]
    if isinstance(generator, list) and len(generator) != images:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators, but the batch has "
            f"{images} images (prompts x num_images_per_prompt)"
        )


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

    def check_call(self, call: dict[str, Any]) -> None:
        """Every check that can fail, before any model runs: ValueError naming the argument."""
        check_scale("guidance_scale", call["guidance_scale"])
        check_scale("guidance_rescale", call["guidance_rescale"])
        f = self.vae_scale_factor
        height = divisible_size(
            "height", call["height"] or self.default_sample_size * f, f, " (the VAE factor)"
        )
        width = divisible_size("width", call["width"] or self.default_sample_size * f, f, " (the VAE factor)")
        if call["timesteps"] is not None and call["sigmas"] is not None:
            raise ValueError("only one of `timesteps` or `sigmas` can be passed")
        accepted = set(inspect.signature(self.scheduler.set_timesteps).parameters)
        for name in ("timesteps", "sigmas"):
            if call[name] is not None and name not in accepted:
                raise ValueError(
                    f"`{name}`: the scheduler {type(self.scheduler).__name__} does not support custom {name}"
                )
        if call["timesteps"] is None and call["sigmas"] is None:
            positive_int("num_inference_steps", call["num_inference_steps"])
        check_fraction("denoising_end", call["denoising_end"])
        positive_int("num_images_per_prompt", call["num_images_per_prompt"])
        for name in ("original_size", "crops_coords_top_left", "target_size"):
            _check_pair(name, call[name])
            _check_pair(f"negative_{name}", call[f"negative_{name}"])
        _check_embeds(call)
        names = inspect.signature(self.check_inputs).parameters
        self.check_inputs(
            **{k: call.get(k) for k in names if k not in ("height", "width")}, height=height, width=width
        )
        _check_batch(call)


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


class StableDiffusionXLPAGPipeline(PAGLayersMixin, _GuidedStableDiffusionXL):
    """Drop-in successor of diffusers' ``StableDiffusionXLPAGPipeline`` (same constructor with
    ``pag_applied_layers``, same arguments, same results), with SAG available beside PAG."""

    _callback_tensor_inputs = _DiffusersXLPAG._callback_tensor_inputs

    __init__ = init_with_pag_layers(_GuidedStableDiffusionXL.__init__)

    @torch.no_grad()
    @with_guidance_options(base=_DiffusersXLPAG.__call__, **PAG_PIPELINE_DEFAULTS)
    def __call__(self, *args: Any, **kwargs: Any):
        """Generate images with CFG and PAG (and SAG where ``sag_scale`` > 0).

        The arguments of diffusers' ``StableDiffusionXLPAGPipeline.__call__`` (same defaults and meaning),
        then the keyword-only :class:`GuidanceOptions`.
        """
        call = bind_arguments(_XL_PAG_CALL, args, kwargs)
        return self.run_guided(self.pag_options(call, kwargs), call, kwargs)


__all__ = ["StableDiffusionXLPAGPipeline", "StableDiffusionXLSAGPipeline", "watermark_opt_in"]
