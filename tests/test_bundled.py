"""The shipped Fashion-MNIST model: it loads offline, samples quickly, and is really trained (its
conditional samples are recognised as their labels by the shipped classifier far above chance)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file

from attnguide import DDPMSAGPipeline
from attnguide.apps.loading import BUNDLED_MODEL, load_pipeline

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL / "unet" / "diffusion_pytorch_model.safetensors").exists(),
    reason="bundled model missing",
)


def test_bundled_files_layout_and_size():
    index = json.loads((BUNDLED_MODEL / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    total = sum(p.stat().st_size for p in BUNDLED_MODEL.rglob("*") if p.is_file())
    assert total <= 25 * 2**20
    info = json.loads((BUNDLED_MODEL / "training.json").read_text())
    assert info["steps"] > 0 and math.isfinite(info["final_loss"])
    assert not (BUNDLED_MODEL / "checkpoint.pt").exists()
    weights = load_file(str(BUNDLED_MODEL / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_bundled_model_loads_with_from_pretrained_and_samples_fast():
    unet = UNet2DModel.from_pretrained(BUNDLED_MODEL, subfolder="unet")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 28
    pipe = load_pipeline(str(BUNDLED_MODEL), "cpu")
    assert isinstance(pipe, DDPMSAGPipeline)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(4, torch.Generator().manual_seed(0), 5, "pt", sag_scale=0.75).images
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(images).all()


def test_bundled_model_is_really_trained():
    from attnguide.apps.train import load_digit_classifier

    pipe = load_pipeline(str(BUNDLED_MODEL), "cpu")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = [k for k in range(10) for _ in range(3)]
    images = pipe(
        len(labels),
        torch.Generator().manual_seed(0),
        20,
        "pt",
        class_labels=labels,
        guidance_scale=1.0,  # conditional without CFG: the labels alone must steer
        sag_scale=0.0,
    ).images
    classifier = load_digit_classifier(BUNDLED_MODEL)
    with torch.no_grad():
        pred = classifier(images * 2 - 1).argmax(1)
    hits = int((pred == torch.tensor(labels)).sum())
    # chance is 1/10: P(>= 15 of 30 right by chance) < 1e-6
    assert hits >= 15, f"only {hits}/30 conditional samples recognised as their label"
