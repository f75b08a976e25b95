"""Loading a guided pipeline (the model shipped in the package, a local folder, or a hub id) and sampling
one arm with it."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import torch

from .images import sample_shape, to_uint8

if TYPE_CHECKING:
    from .arms import Arm

__all__ = ["BUNDLED_MODEL", "check_hub_reachable", "load_pipeline", "model_kind", "sample_arm"]

BUNDLED_MODEL = Path(__file__).parent.parent / "assets" / "fashion-ddpm"


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _unet_class(entry: Any) -> str | None:
    """The class name of a ``model_index.json`` entry (["diffusers", "UNet2DModel"])."""
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def check_hub_reachable(model: str, timeout: float = 3.0) -> None:
    """For a hub id: nothing where it is in the local Hugging Face cache or the hub answers within
    ``timeout`` seconds; else SystemExit naming ``--model`` at once (huggingface_hub would retry for
    half a minute before its own error)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json") or try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return
    why = None
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as err:
            why = f"{host} cannot be reached ({_one_line(err)})"
    if why is not None:
        raise SystemExit(
            f"error: --model: {model!r} is no local folder and not in the Hugging Face cache, and {why}; "
            "download it first (huggingface-cli download) or give a folder"
        )


def model_kind(model: str | os.PathLike[str]) -> str:
    """What ``--model`` names: "text" (a Stable Diffusion 1.x / 2.x text-to-image pipeline), "pixel" (a
    ``UNet2DModel`` pipeline) or "unet" (a bare ``UNet2DModel`` folder); SystemExit naming ``--model``
    for anything else, read from the configuration files only (no weights are loaded)."""
    from diffusers import DiffusionPipeline, UNet2DModel

    model = os.fspath(model)
    local = os.path.isabs(model) or model.startswith(("./", "../")) or os.path.exists(model)
    if local and not os.path.exists(model):
        raise SystemExit(f"error: --model: {model!r}: no such folder")
    if not local:
        check_hub_reachable(model)
    try:
        index = DiffusionPipeline.load_config(model)
    except Exception:  # not a pipeline: maybe a bare model folder
        index = None
    if index is None or "unet" not in index:
        try:
            config = UNet2DModel.load_config(model)
        except Exception as err:
            raise SystemExit(
                f"error: --model: {model!r} is neither a diffusers pipeline (model_index.json) nor a "
                f"UNet2DModel folder (config.json): {_one_line(err)}"
            ) from None
        if config.get("_class_name") != "UNet2DModel":
            raise SystemExit(
                f"error: --model: {model!r} holds a {config.get('_class_name')}; give a pipeline folder or "
                "a UNet2DModel folder"
            )
        return "unet"
    try:
        unet_config = UNet2DModel.load_config(model, subfolder="unet")
    except Exception as err:
        raise SystemExit(
            f"error: --model: {model!r} is a pipeline, but its unet/config.json cannot be read "
            f"({_one_line(err)})"
        ) from None
    unet_class, pipeline = _unet_class(index["unet"]), index.get("_class_name")
    pipeline = pipeline[-1] if isinstance(pipeline, (list, tuple)) and pipeline else pipeline
    if unet_class == "UNet2DModel":
        return "pixel"
    text = "text_encoder" in index and "text_encoder_2" not in index
    same_channels = unet_config.get("in_channels") == unet_config.get("out_channels")
    if unet_class == "UNet2DConditionModel" and text and same_channels:
        return "text"
    raise SystemExit(
        f"error: --model: {model!r} is a {pipeline} (unet: {unet_class}); attnguide sample takes Stable "
        "Diffusion 1.x / 2.x text-to-image pipelines, UNet2DModel pipelines and UNet2DModel folders "
        "(guide other pipelines with attnguide.guide in Python)"
    )


def load_pipeline(model: str | os.PathLike[str], device: str):
    """A guided pipeline for ``model``: the bundled model, a local folder, or a hub id.

    A folder with ``model_index.json`` is loaded as a pipeline (Stable Diffusion pipelines become
    :class:`StableDiffusionSAGPipeline`; UNet2DModel pipelines :class:`DDPMSAGPipeline`); a folder with a
    bare ``UNet2DModel`` gets a default DDPM scheduler. SystemExit naming ``--model`` when it is none of
    these or cannot be loaded.
    """
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.utils import is_accelerate_available

    from ..pipelines import DDPMSAGPipeline, StableDiffusionSAGPipeline

    model = os.fspath(model)
    kind = model_kind(model)
    # diffusers would warn that it falls back to this without accelerate
    extra = {} if is_accelerate_available() else {"low_cpu_mem_usage": False}
    try:
        if kind == "text":
            pipe = StableDiffusionSAGPipeline.from_pretrained(
                model, safety_checker=None, requires_safety_checker=False, **extra
            )
        elif kind == "pixel":
            unet = UNet2DModel.from_pretrained(model, subfolder="unet", **extra)
            sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
            pipe = DDPMSAGPipeline(unet, sched)
        else:
            pipe = DDPMSAGPipeline(UNet2DModel.from_pretrained(model, **extra), DDPMScheduler())
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SystemExit(f"error: --model: cannot load {model!r}: {_one_line(err)}") from None
    return pipe.to(device)


def sample_arm(
    pipe,
    arm: Arm,
    *,
    num_images: int,
    steps: int,
    seed: int,
    class_labels: list[int] | None = None,
    prompt: str = "",
    record_masks: bool = False,
    on_step: Callable[[int], None] | None = None,
    check_finite: bool = False,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One run of ``arm``: the images (N, H, W, 3 uint8) and, with ``record_masks``, the mean SAG mask of
    each image over the steps (N, h, w in [0, 1]; None when no mask was recorded).

    Pixel pipelines (:class:`DDPMSAGPipeline`) start from latents drawn on the CPU from ``seed`` and take
    ``class_labels``; text pipelines take ``prompt``. ``on_step(i)`` is called after step i (from 1);
    ``kwargs`` are further pipeline arguments (e.g. ``sag_layers``). ``check_finite``: FloatingPointError
    if a sample holds NaN or infinity (which would otherwise show as black pixels).
    """
    from ..pipelines import DDPMSAGPipeline

    gen = torch.Generator(device="cpu").manual_seed(seed)
    call = dict(
        num_inference_steps=steps,
        generator=gen,
        record_masks=record_masks,
        output_type="np",
        callback=None if on_step is None else (lambda i, *_: on_step(i + 1)),
        **arm.pipeline_kwargs(),
        **kwargs,
    )
    try:
        if isinstance(pipe, DDPMSAGPipeline):
            config = pipe.unet.config
            shape = (num_images, config.in_channels, *sample_shape(config.sample_size))
            latents = torch.randn(shape, generator=gen)
            images = pipe(num_images, class_labels=class_labels, latents=latents, **call).images
        else:
            images = pipe([prompt] * num_images, **call).images
    except ValueError as err:  # the pipelines' own check of their output (engine.checks)
        if check_finite and "not finite" in str(err):
            raise FloatingPointError(str(err)) from err
        raise
    if check_finite and not np.isfinite(np.asarray(images, dtype=np.float32)).all():
        raise FloatingPointError("the output is not finite (NaN or inf)")
    masks = None
    guider = pipe.last_guider
    if record_masks and guider is not None and guider.mask_sum is not None:
        masks = (guider.mask_sum[:, 0].float() / max(1, guider.mask_steps)).clamp(0, 1).cpu().numpy()
    return to_uint8(images), masks
