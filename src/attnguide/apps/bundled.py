"""The model this project trains and ships, for code anywhere (not only in the repository's root): its
folder, its guided pipeline and its noise-aware classifier (classifier guidance).

``attnguide.bundled_pipeline()`` is what ``attnguide sample`` runs by default; the model's record
(training command, steps, data set, accuracies) is ``bundled_model_path() / "training.json"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .defaults import SCHEDULER
from .loading import BUNDLED_MODEL

if TYPE_CHECKING:
    from ..pipelines import DDPMSAGPipeline
    from .train.noisy_classifier import NoisyDigitClassifier

__all__ = ["bundled_classifier", "bundled_model_path", "bundled_pipeline"]


def bundled_model_path() -> Path:
    """The bundled model's folder (a diffusers pipeline folder: ``unet/``, ``scheduler/``, classifiers)."""
    return BUNDLED_MODEL


def bundled_pipeline(device: str | torch.device = "cpu", scheduler: str = SCHEDULER) -> DDPMSAGPipeline:
    """The bundled class-conditional model as a :class:`attnguide.DDPMSAGPipeline` on ``device``, with the
    sampler ``scheduler`` (a name of ``attnguide.pipelines.schedulers.SCHEDULER_NAMES``; default: the one
    ``attnguide sample`` uses) on the model's own noise schedule. Its last class label is the null label."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ..pipelines import DDPMSAGPipeline
    from ..pipelines.schedulers import SCHEDULER_NAMES, scheduler_from_name

    if scheduler not in SCHEDULER_NAMES:
        names = ", ".join(sorted(SCHEDULER_NAMES))
        raise ValueError(f"`scheduler` must be one of {names}, got {scheduler!r}")
    unet = UNet2DModel.from_pretrained(BUNDLED_MODEL, subfolder="unet", low_cpu_mem_usage=False)
    config = DDPMScheduler.load_config(BUNDLED_MODEL, subfolder="scheduler")
    return DDPMSAGPipeline(unet, scheduler_from_name(scheduler, config)).to(device)


def bundled_classifier(device: str | torch.device = "cpu") -> NoisyDigitClassifier:
    """The bundled noise-aware classifier ``classifier(x_t, t) -> logits`` (ADM's, trained on noised
    images of the model's training split), in eval mode: pass it as ``classifier=`` with ``class_labels``
    and ``classifier_scale`` to the bundled pipeline for classifier guidance."""
    from .train.noisy_classifier import load_noisy_classifier

    return load_noisy_classifier(None, device)
