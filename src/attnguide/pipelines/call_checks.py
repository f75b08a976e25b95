"""The checks of a pipeline call's arguments that diffusers' pipelines share (sizes, prompts and their
embeddings, generators, latents, class labels, output types): each raises ValueError / TypeError naming
the argument, before any model runs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..engine.checks import (
    check_eta,
    check_generators,
    check_latents,
    check_scale,
    check_schedule,
    check_steps,
    positive_int,
)

__all__ = [
    "OUTPUT_TYPES",
    "check_call_arguments",
    "check_class_labels",
    "check_fraction",
    "check_output_type",
    "check_prompts",
    "divisible_size",
    "image_size",
    "images_per_prompt",
    "latent_shape",
    "prompt_batch",
    "text_width",
]


def divisible_size(name: str, value: Any, factor: int, what: str = "") -> int:
    """``value`` if it is a positive int divisible by ``factor``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
        raise ValueError(f"`{name}` must be a positive integer divisible by {factor}{what}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> None:
    """None or a number in (0, 1], else ValueError naming ``name``."""
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 < value <= 1.0
    ):
        raise ValueError(f"`{name}` must be a fraction in (0, 1] or None, got {value!r}")


#: The ``output_type`` values of diffusers' image and video pipelines.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(value: Any, allowed: Sequence[str] = OUTPUT_TYPES) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming ``output_type``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`output_type` must be one of {tuple(allowed)}, got {value!r}")
    return value


def image_size(
    call: dict[str, Any], default: int | tuple[int, int], factor: int, what: str = ""
) -> tuple[int, int]:
    """The call's (height, width): ``default`` (one size or a pair) where None, else a positive int
    divisible by ``factor`` (0 is an error, not the default)."""
    defaults = (default, default) if isinstance(default, int) else default
    sizes = (d if call[k] is None else call[k] for k, d in zip(("height", "width"), defaults, strict=True))
    height, width = (
        divisible_size(k, v, factor, what) for k, v in zip(("height", "width"), sizes, strict=True)
    )
    return height, width


def prompt_batch(call: dict[str, Any]) -> int | None:
    """The number of prompts of a call (from ``prompt``, else the rows of ``prompt_embeds``), None where
    neither says."""
    prompt = call.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    embeds = call.get("prompt_embeds")
    return embeds.shape[0] if isinstance(embeds, Tensor) and embeds.ndim > 0 else None


def images_per_prompt(call: dict[str, Any]) -> int:
    """``num_images_per_prompt`` (or ``num_videos_per_prompt``) of a call, checked; 1 where it has none."""
    for name in ("num_images_per_prompt", "num_videos_per_prompt"):
        if name in call:
            return positive_int(name, call[name])
    return 1


def latent_shape(call: dict[str, Any], channels: int, height: int, width: int) -> tuple[int, ...] | None:
    """The shape a text-to-image call's ``latents`` must have (None where the batch is unknown)."""
    batch = prompt_batch(call)
    return None if batch is None else (batch * images_per_prompt(call), channels, height, width)


_PER_PROMPT = ("prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")
_EMBEDS = {
    "prompt_embeds": 3,
    "negative_prompt_embeds": 3,
    "pooled_prompt_embeds": 2,
    "negative_pooled_prompt_embeds": 2,
}


def text_width(denoiser: Any) -> int | None:
    """The width of the text embeddings a UNet takes (its ``cross_attention_dim``, or ``encoder_hid_dim``
    where it projects the text first); None for other denoisers."""
    config = getattr(denoiser, "config", None)
    if "UNet" not in type(getattr(denoiser, "_orig_mod", denoiser)).__name__ or config is None:
        return None
    if getattr(config, "encoder_hid_dim_type", None) in ("text_proj", "text_image_proj"):
        width = getattr(config, "encoder_hid_dim", None)
    else:
        width = getattr(config, "cross_attention_dim", None)
    return width if isinstance(width, int) else None


def check_prompts(call: dict[str, Any], width: int | None) -> None:
    """Per-prompt lists with one entry per prompt; prompt embeddings: tensors of the right rank (and of
    the denoiser's text ``width``), pooled ones with as many rows as theirs."""
    batch = prompt_batch(call)
    for name in _PER_PROMPT:
        value = call.get(name)
        if isinstance(value, list) and batch is not None and len(value) != batch:
            raise ValueError(f"`{name}` must have one entry per prompt ({batch}), got a list of {len(value)}")
    for name, ndim in _EMBEDS.items():
        emb = call.get(name)
        if emb is None:
            continue
        if not isinstance(emb, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(emb).__name__}")
        if emb.ndim != ndim:
            raise ValueError(
                f"`{name}` must be a {ndim}-d tensor (batch first), got shape {tuple(emb.shape)}"
            )
        if ndim == 3 and width is not None and emb.shape[-1] != width:
            raise ValueError(
                f"`{name}` must be {width} wide (the denoiser's text embedding width), got shape "
                f"{tuple(emb.shape)}"
            )
    for neg in ("", "negative_"):
        emb, pooled = call.get(f"{neg}prompt_embeds"), call.get(f"{neg}pooled_prompt_embeds")
        if emb is not None and pooled is not None and pooled.shape[0] != emb.shape[0]:
            raise ValueError(f"`{neg}pooled_prompt_embeds` must have as many rows as `{neg}prompt_embeds`")


def _check_clip_skip(pipe: Any, clip_skip: Any) -> None:
    """None, or a number of text-encoder layers to skip that leaves at least one (each text encoder's)."""
    if clip_skip is None:
        return
    depths = [
        getattr(getattr(getattr(pipe, name, None), "config", None), "num_hidden_layers", None)
        for name in ("text_encoder", "text_encoder_2")
    ]
    depths = [d for d in depths if isinstance(d, int)]
    top = min(depths) - 1 if depths else None
    if (
        isinstance(clip_skip, bool)
        or not isinstance(clip_skip, int)
        or clip_skip < 0
        or (top is not None and clip_skip > top)
    ):
        allowed = (
            f"an integer in [0, {top}] (the text encoder has {top + 1} layers)"
            if top is not None
            else "an integer >= 0"
        )
        raise ValueError(f"`clip_skip` must be {allowed}, got {clip_skip!r}")


def check_call_arguments(
    pipe: Any, call: dict[str, Any], latents_shape: tuple[int, ...] | None = None
) -> None:
    """The checks of the call arguments that diffusers' pipelines share, each where the call has it:
    scales, ``eta``, steps or a custom schedule, images per prompt, ``output_type``, prompts and their
    embeddings, generators (one per image) and ``latents`` (the denoiser's dtype, finite, and
    ``latents_shape`` where given). ValueError / TypeError naming the argument, before any model runs."""
    denoiser = getattr(pipe, "unet", None)
    if denoiser is None:
        denoiser = getattr(pipe, "transformer", None)
    for name in ("guidance_scale", "true_cfg_scale", "guidance_rescale"):
        if name in call:
            check_scale(name, call[name])
    if "eta" in call:
        check_eta(call["eta"])
    scheduler = pipe.scheduler
    if call.get("timesteps") is not None and call.get("sigmas") is not None:
        raise ValueError("only one of `timesteps` or `sigmas` can be passed")
    for name in ("timesteps", "sigmas"):
        check_schedule(scheduler, name, call.get(name))
    if "num_inference_steps" in call and call.get("timesteps") is None and call.get("sigmas") is None:
        check_steps(scheduler, call["num_inference_steps"])
    per_prompt = images_per_prompt(call)
    if "output_type" in call:
        check_output_type(call["output_type"])
    check_prompts(call, text_width(denoiser))
    _check_clip_skip(pipe, call.get("clip_skip"))
    if call.get("cross_attention_kwargs") is not None and not isinstance(
        call["cross_attention_kwargs"], dict
    ):
        raise TypeError(
            f"`cross_attention_kwargs` must be a dict or None, got {call['cross_attention_kwargs']!r}"
        )
    for name in ("callback_on_step_end", "callback"):
        if call.get(name) is not None and not callable(call[name]):
            raise TypeError(f"`{name}` must be callable or None, got {call[name]!r}")
    batch = prompt_batch(call)
    if "generator" in call:
        check_generators(call["generator"], None if batch is None else batch * per_prompt)
    if call.get("latents") is not None:
        check_latents("latents", call["latents"], shape=latents_shape, dtype=getattr(denoiser, "dtype", None))


def check_class_labels(name: str, labels: Any, num_classes: int) -> list[int]:
    """Class labels: an int, a sequence of ints or an integer tensor, each in [0, num_classes)."""
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim > 1:
            raise ValueError(
                f"`{name}` must be an integer tensor of at most 1 dim, got {labels.dtype} {labels}"
            )
        labels = labels.reshape(-1).tolist()
    items = [labels] if not isinstance(labels, Sequence) or isinstance(labels, (str, bytes)) else list(labels)
    bad = [
        c
        for c in items
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c < num_classes
    ]
    if bad or not items:
        raise ValueError(
            f"`{name}` must be an integer or a list of integers in [0, {num_classes - 1}], got {labels!r}"
        )
    return [int(c) for c in items]
