"""Loading a guided pipeline (the model shipped in the package, a local folder, or a hub id) and sampling
one arm with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .images import sample_shape, to_uint8

if TYPE_CHECKING:
    from .arms import Arm

__all__ = ["BUNDLED_MODEL", "load_pipeline", "sample_arm"]

BUNDLED_MODEL = Path(__file__).parent.parent / "assets" / "mnist-ddpm"


def load_pipeline(model: str, device: str):
    """A guided pipeline for ``model``: the bundled model, a local folder, or a hub id.

    A folder with ``model_index.json`` is loaded as a pipeline (Stable Diffusion pipelines become
    :class:`StableDiffusionSAGPipeline`; UNet2DModel pipelines :class:`DDPMSAGPipeline`); a folder with a
    bare ``UNet2DModel`` gets a default DDPM scheduler.
    """
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

    from ..pipelines import DDPMSAGPipeline, StableDiffusionSAGPipeline

    try:
        index = DiffusionPipeline.load_config(model)
    except Exception:  # not a pipeline: maybe a bare model folder
        index = None
    if index is not None and "unet" in index:
        if "text_encoder" in index:
            pipe = StableDiffusionSAGPipeline.from_pretrained(
                model, safety_checker=None, requires_safety_checker=False
            )
        else:
            unet = UNet2DModel.from_pretrained(model, subfolder="unet")
            sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
            pipe = DDPMSAGPipeline(unet, sched)
    else:
        try:
            unet = UNet2DModel.from_pretrained(model)
        except Exception as err:
            raise SystemExit(
                f"error: --model {model!r} is neither a diffusers pipeline nor a UNet2DModel folder ({err})"
            ) from None
        pipe = DDPMSAGPipeline(unet, DDPMScheduler())
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
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One run of ``arm``: the images (N, H, W, 3 uint8) and, with ``record_masks``, the mean SAG mask of
    each image over the steps (N, h, w in [0, 1]; None when no mask was recorded).

    Pixel pipelines (:class:`DDPMSAGPipeline`) start from latents drawn on the CPU from ``seed`` and take
    ``class_labels``; text pipelines take ``prompt``. ``on_step(i)`` is called after step i (from 1);
    ``kwargs`` are further pipeline arguments (e.g. ``sag_layers``).
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
    if isinstance(pipe, DDPMSAGPipeline):
        config = pipe.unet.config
        shape = (num_images, config.in_channels, *sample_shape(config.sample_size))
        latents = torch.randn(shape, generator=gen)
        images = pipe(num_images, class_labels=class_labels, latents=latents, **call).images
    else:
        images = pipe([prompt] * num_images, **call).images
    masks = None
    guider = pipe.last_guider
    if record_masks and guider is not None and guider.mask_sum is not None:
        masks = (guider.mask_sum[:, 0].float() / max(1, guider.mask_steps)).clamp(0, 1).cpu().numpy()
    return to_uint8(images), masks
