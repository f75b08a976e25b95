"""One validation layer for the public API: every bad argument of the pipelines, Guider, guide, SAG, PAG
and sample_loop raises a ValueError / TypeError naming it before any model runs (text encoders included),
and leaves the attention processors as they were; a finite scale that makes the output non-finite raises
a ValueError naming the scale instead of returning NaN images."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import gen, quiet
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from tiny_families import sdxl_components

from attnguide import (
    PAG,
    SAG,
    DDPMSAGPipeline,
    DiTSAGPipeline,
    Guider,
    StableDiffusionPAGPipeline,
    StableDiffusionSAGPipeline,
    StableDiffusionXLSAGPipeline,
    guide,
    sample_loop,
)
from attnguide.tiny_models import make_scheduler, tiny_sd_components, tiny_unet_2d

NAN = math.nan


# ------------------------------------------------------------------------------------------- helpers
class _Calls:
    """Counts the evaluations of some modules (forward pre-hooks; a UNet at ``conv_in``, its first layer
    in every evaluation) and the ids of a denoiser's attention processors, for one ``with`` block."""

    def __init__(self, denoiser, *others):
        self.denoiser = denoiser
        self.modules = [getattr(denoiser, "conv_in", denoiser), *others]
        self.count = 0

    def _hook(self, *_):
        self.count += 1

    def __enter__(self):
        self.processors = self._processors()
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _processors(self):
        return {k: id(m.processor) for k, m in self.denoiser.named_modules() if hasattr(m, "processor")}

    def assert_untouched(self, ran: bool = False):
        assert (self.count > 0) if ran else (self.count == 0), f"{self.count} model calls"
        assert self._processors() == self.processors
        assert "forward" not in self.denoiser.__dict__


def _expect(fn, error, argument, *modules, denoiser, ran=False):
    """``fn()`` raises ``error`` whose message names ``argument``; no model ran (unless ``ran``)."""
    with _Calls(denoiser, *modules) as calls, pytest.raises(error) as info:
        fn()
    assert f"`{argument}`" in str(info.value), str(info.value)
    calls.assert_untouched(ran)
    return info.value


@functools.cache
def _sd(kind: str = "sag", scheduler: str = "ddim"):
    comps = tiny_sd_components(0, scheduler=scheduler)
    cls = StableDiffusionSAGPipeline if kind == "sag" else StableDiffusionPAGPipeline
    return quiet(cls(**comps))


@functools.cache
def _ddpm(scheduler: str = "ddpm"):
    sched = {"ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}[scheduler]()
    return quiet(DDPMSAGPipeline(tiny_unet_2d(0, class_conditional=True), sched))


@functools.cache
def _dit():
    from test_families import _dit as build

    tr, vae = build()
    return quiet(DiTSAGPipeline(tr, vae, DDIMScheduler()))


@functools.cache
def _sdxl():
    return quiet(StableDiffusionXLSAGPipeline(**sdxl_components()))


# ------------------------------------------------------------------------------- Stable Diffusion
SD = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, output_type="latent")
LAT = (1, 4, 16, 16)  # the latents of one 32 x 32 image (VAE factor 2)
G3 = [gen(0), gen(1), gen(2)]

SD_BAD = [
    ({"eta": NAN}, ValueError, "eta"),
    ({"eta": -1.0}, ValueError, "eta"),
    ({"eta": 1.5}, ValueError, "eta"),
    ({"latents": torch.full(LAT, NAN)}, ValueError, "latents"),
    ({"latents": torch.zeros(LAT, dtype=torch.int64)}, ValueError, "latents"),
    ({"latents": torch.zeros(LAT, dtype=torch.float64)}, ValueError, "latents"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents"),
    ({"latents": torch.zeros(2, 4, 16, 16)}, ValueError, "latents"),
    ({"latents": np.zeros(LAT, dtype=np.float32)}, TypeError, "latents"),
    ({"height": 0}, ValueError, "height"),
    ({"width": 0}, ValueError, "width"),
    ({"output_type": "bogus"}, ValueError, "output_type"),
    ({"output_type": None}, ValueError, "output_type"),
    ({"sag_threshold": -1.0}, ValueError, "sag_threshold"),
    ({"sag_threshold": 0.0}, ValueError, "sag_threshold"),
    ({"sag_scale": 0.0, "sag_threshold": -1.0}, ValueError, "sag_threshold"),  # checked with SAG off too
    ({"prompt": ["a", "b"], "generator": G3}, ValueError, "generator"),
    ({"generator": [gen(0), gen(1)]}, ValueError, "generator"),
    ({"generator": 0}, TypeError, "generator"),
    ({"num_inference_steps": 5000}, ValueError, "num_inference_steps"),
    ({"timesteps": []}, ValueError, "timesteps"),
    ({"timesteps": [999, 500]}, ValueError, "timesteps"),  # DDIM takes no custom timesteps
    ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, ValueError, "negative_prompt"),
    ({"prompt": "a", "negative_prompt": ["x", "y"]}, ValueError, "negative_prompt"),
    ({"prompt": ["a", "b"], "negative_prompt": "x"}, TypeError, "negative_prompt"),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 16)}, ValueError, "prompt_embeds"),
    ({"prompt": None, "prompt_embeds": np.zeros((1, 77, 32))}, TypeError, "prompt_embeds"),
    ({"sag_layers": 5}, ValueError, "sag_layers"),
    ({"sag_window": (0.0, 0.5, 1.0)}, ValueError, "sag_window"),
    ({"sag_window": None}, ValueError, "sag_window"),
    ({"sag_window": 0.5}, ValueError, "sag_window"),
    ({"sag_window": (0.0, 2.0)}, ValueError, "sag_window"),
    ({"pag_scale": 1.0, "pag_window": None}, ValueError, "pag_window"),
    ({"pag_scale": 1.0, "pag_applied_layers": 5}, ValueError, "pag_applied_layers"),
    ({"guidance_scale": 7.5, "guidance_rescale": NAN}, ValueError, "guidance_rescale"),
    ({"guidance_scale": "3"}, ValueError, "guidance_scale"),
    ({"record_masks": "yes"}, ValueError, "record_masks"),
    ({"clip_skip": 5}, ValueError, "clip_skip"),  # the tiny text encoder has 5 layers
    ({"clip_skip": -1}, ValueError, "clip_skip"),
    ({"cross_attention_kwargs": 0.5}, TypeError, "cross_attention_kwargs"),
    ({"callback_on_step_end": "print"}, TypeError, "callback_on_step_end"),
]


@pytest.mark.parametrize(("kwargs", "error", "argument"), SD_BAD, ids=lambda v: repr(v)[:40])
def test_sd_bad_input_raises_before_any_model_call(kwargs, error, argument):
    pipe = _sd()
    args = {**SD, "generator": gen(0), **kwargs}
    _expect(lambda: pipe(**args), error, argument, pipe.text_encoder, pipe.vae, denoiser=pipe.unet)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"eta": -1.0}, "eta"),
        ({"height": 0}, "height"),
        ({"pag_window": None}, "pag_window"),
        ({"pag_applied_layers": 5}, "pag_applied_layers"),
        ({"num_inference_steps": 5000}, "num_inference_steps"),
    ],
)
def test_sd_pag_pipeline_bad_input_raises_before_any_model_call(kwargs, argument):
    pipe = _sd("pag")
    args = {**SD, "generator": gen(0), "pag_scale": 2.0, **kwargs}
    _expect(lambda: pipe(**args), ValueError, argument, pipe.text_encoder, denoiser=pipe.unet)


NAN_CAST = "ignore:invalid value encountered in cast"  # diffusers' PIL conversion of the NaN images


@pytest.mark.filterwarnings(NAN_CAST)
@pytest.mark.parametrize("output_type", ["pil", "latent"])
@pytest.mark.parametrize(
    ("kwargs", "argument"), [({"sag_scale": 1e30}, "sag_scale"), ({"guidance_scale": 1e30}, "guidance_scale")]
)
def test_sd_non_finite_output_names_the_scale(kwargs, argument, output_type):
    pipe = _sd()
    args = {**SD, "generator": gen(0), "output_type": output_type, **kwargs}
    err = _expect(lambda: pipe(**args), ValueError, argument, denoiser=pipe.unet, ran=True)
    assert "not finite" in str(err) and "too large" in str(err)


def test_sd_valid_edge_values_still_run():
    pipe = _sd()
    base = pipe(**SD, generator=gen(0)).images
    given = pipe(**SD, latents=torch.randn(LAT, generator=gen(5)), eta=1.0, sag_threshold=0.5).images
    assert base.shape == given.shape == LAT and torch.isfinite(given).all()
    assert pipe(**{**SD, "height": None, "width": None}, generator=gen(0)).images.shape == LAT


# --------------------------------------------------------------------------------------------- SDXL
XL = dict(prompt="a cat", height=32, width=48, num_inference_steps=2, output_type="latent")

XL_BAD = [
    ({"eta": -1.0}, ValueError, "eta"),
    ({"height": 0}, ValueError, "height"),
    ({"output_type": "bogus"}, ValueError, "output_type"),
    ({"latents": torch.zeros(1, 4, 16, 24, dtype=torch.float64)}, ValueError, "latents"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents"),
    ({"latents": torch.full((1, 4, 16, 24), NAN)}, ValueError, "latents"),
    ({"num_inference_steps": 5000}, ValueError, "num_inference_steps"),
    ({"timesteps": []}, ValueError, "timesteps"),
    ({"prompt": ["a", "b"], "generator": G3}, ValueError, "generator"),
    (
        {"prompt": None, "prompt_embeds": torch.zeros(1, 77, 32), "pooled_prompt_embeds": torch.zeros(1, 32)},
        ValueError,
        "prompt_embeds",
    ),
    ({"sag_window": None}, ValueError, "sag_window"),
    ({"sag_threshold": -1.0}, ValueError, "sag_threshold"),
]


@pytest.mark.parametrize(("kwargs", "error", "argument"), XL_BAD, ids=lambda v: repr(v)[:40])
def test_sdxl_bad_input_raises_before_any_model_call(kwargs, error, argument):
    pipe = _sdxl()
    args = {**XL, "generator": gen(0), **kwargs}
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    _expect(lambda: pipe(**args), error, argument, *encoders, denoiser=pipe.unet)


@pytest.mark.filterwarnings(NAN_CAST)
def test_sdxl_non_finite_output_names_the_scale():
    pipe = _sdxl()
    args = {**XL, "generator": gen(0), "output_type": "pil", "sag_scale": 1e30}
    _expect(lambda: pipe(**args), ValueError, "sag_scale", denoiser=pipe.unet, ran=True)


# -------------------------------------------------------------------------------------------- DDPM
DD = dict(batch_size=2, num_inference_steps=2, output_type="pt")
PIX = (2, 3, 16, 16)

DDPM_BAD = [
    ({"eta": NAN}, ValueError, "eta"),
    ({"eta": -1.0}, ValueError, "eta"),
    ({"latents": torch.full(PIX, NAN)}, ValueError, "latents"),
    ({"latents": torch.zeros(PIX, dtype=torch.int64)}, ValueError, "latents"),
    ({"latents": torch.zeros(PIX, dtype=torch.float64)}, ValueError, "latents"),
    ({"latents": torch.zeros(PIX, dtype=torch.float16)}, ValueError, "latents"),
    ({"latents": torch.zeros(2, 3, 8, 8)}, ValueError, "latents"),
    ({"latents": np.zeros(PIX, dtype=np.float32)}, TypeError, "latents"),
    ({"height": 0}, ValueError, "height"),
    ({"output_type": "bogus"}, ValueError, "output_type"),
    ({"output_type": "latent"}, ValueError, "output_type"),
    ({"class_labels": [1.7, 2.2]}, ValueError, "class_labels"),
    ({"class_labels": ["a", "b"]}, ValueError, "class_labels"),
    ({"class_labels": torch.tensor([1.0, 2.0])}, ValueError, "class_labels"),
    ({"class_labels": [True, False]}, ValueError, "class_labels"),
    ({"generator": G3}, ValueError, "generator"),
    ({"num_inference_steps": 5000}, ValueError, "num_inference_steps"),
    ({"class_labels": [1, 2], "guidance_scale": 2.0, "null_class_label": 50}, ValueError, "null_class_label"),
    ({"class_labels": [1, 2], "guidance_scale": 2.0, "null_class_label": -1}, ValueError, "null_class_label"),
    ({"callback": "print"}, TypeError, "callback"),
    ({"guidance_scale": "3"}, ValueError, "guidance_scale"),
    ({"sag_layers": 5}, ValueError, "sag_layers"),
    ({"sag_threshold": -1.0}, ValueError, "sag_threshold"),
    ({"pag_scale": 1.0, "pag_window": (0, 1, 2)}, ValueError, "pag_window"),
]


@pytest.mark.parametrize(("kwargs", "error", "argument"), DDPM_BAD, ids=lambda v: repr(v)[:40])
def test_ddpm_bad_input_raises_before_any_model_call(kwargs, error, argument):
    pipe = _ddpm()
    args = {**DD, "generator": [gen(0), gen(1)], **kwargs}
    _expect(lambda: pipe(**args), error, argument, denoiser=pipe.unet)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"sag_scale": 1e30}, "sag_scale"),
        ({"sag_scale": 0.0, "pag_scale": 1e30}, "pag_scale"),
        ({"class_labels": [1, 2], "guidance_scale": 1e30}, "guidance_scale"),
    ],
)
def test_ddpm_non_finite_output_names_the_scale(kwargs, argument):
    pipe = _ddpm("euler")  # no x0 clipping, so the overflow reaches the output
    args = {**DD, "generator": [gen(0), gen(1)], **kwargs}
    _expect(lambda: pipe(**args), ValueError, argument, denoiser=pipe.unet, ran=True)


# --------------------------------------------------------------------------------------------- DiT
@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"class_labels": [1.5]}, ValueError, "class_labels"),
        ({"class_labels": [1000]}, ValueError, "class_labels"),
        ({"generator": G3}, ValueError, "generator"),
        ({"latents": torch.zeros(2, 4, 4, 4)}, ValueError, "latents"),
        ({"eta": -1.0}, ValueError, "eta"),
        ({"output_type": "latent"}, ValueError, "output_type"),
        ({"num_inference_steps": 5000}, ValueError, "num_inference_steps"),
        ({"sag_window": 0.5}, ValueError, "sag_window"),
    ],
)
def test_dit_bad_input_raises_before_any_model_call(kwargs, error, argument):
    pipe = _dit()
    args = {"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt", **kwargs}
    _expect(lambda: pipe(**args), error, argument, pipe.vae, denoiser=pipe.transformer)


# ------------------------------------------------------------------------------ engine and guide()
@functools.cache
def _unet():
    return tiny_unet_2d(0)


def _scheduler():
    s = DDIMScheduler()
    s.set_timesteps(2)
    return s


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"guidance_scale": NAN}, ValueError, "guidance_scale"),
        ({"guidance_scale": "3"}, ValueError, "guidance_scale"),
        ({"guidance_scale": 2.0, "guidance_rescale": NAN}, ValueError, "guidance_rescale"),
        ({"sag": 0.5}, TypeError, "sag"),
        ({"pag": "mid"}, TypeError, "pag"),
        ({"generator": 0}, TypeError, "generator"),
        ({"sag": SAG(layers="nowhere")}, ValueError, "sag_layers"),
    ],
)
def test_guider_bad_input(kwargs, error, argument):
    unet = _unet()
    _expect(lambda: Guider(unet, _scheduler(), **kwargs), error, argument, denoiser=unet)


def test_guider_bad_scheduler_and_model():
    unet = _unet()
    _expect(lambda: Guider(unet, object()), TypeError, "scheduler", denoiser=unet)
    _expect(lambda: Guider("unet", _scheduler()), TypeError, "model", denoiser=unet)


@pytest.mark.parametrize(
    ("term", "kwargs", "argument"),
    [
        (SAG, {"layers": 5}, "sag_layers"),
        (SAG, {"layers": ["mid", 3]}, "sag_layers"),
        (SAG, {"mask_fraction": "0.4"}, "sag_mask_fraction"),
        (SAG, {"threshold": -1.0}, "sag_threshold"),
        (SAG, {"threshold": 0}, "sag_threshold"),
        (SAG, {"window": (0, 0.5, 1)}, "sag_window"),
        (SAG, {"window": None}, "sag_window"),
        (SAG, {"window": 0.5}, "sag_window"),
        (SAG, {"window": (0, 1, 2)}, "sag_window"),
        (SAG, {"blur_sigma": "1"}, "sag_blur_sigma"),
        (SAG, {"mask": ["attention"]}, "sag_mask"),
        (PAG, {"layers": 5}, "pag_applied_layers"),
        (PAG, {"window": None}, "pag_window"),
        (PAG, {"scale": "3"}, "pag_scale"),
    ],
)
def test_term_bad_input(term, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        term(**kwargs)


def test_terms_accept_valid_edges():
    assert SAG(threshold=1e-3, window=[0, 1]).window == (0.0, 1.0)
    assert SAG(layers=("mid",), mask_fraction=1).layers == ("mid",)
    assert PAG(window=(0.25, 0.5)).window == (0.25, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"sag": 0.5}, TypeError, "sag"),
        ({"pag": "mid"}, TypeError, "pag"),
        ({"cfg_layout": "sideways"}, ValueError, "cfg_layout"),
        ({"record_masks": "yes"}, ValueError, "record_masks"),
    ],
)
def test_guide_bad_input(kwargs, error, argument):
    pipe = _sd()

    def enter():
        with guide(pipe, **kwargs):
            pass

    _expect(enter, error, argument, pipe.text_encoder, denoiser=pipe.unet)


def _model_fn(unet):
    return lambda x, t, branches: unet(x, t).sample


@pytest.mark.parametrize(
    ("latents", "error"),
    [
        (np.zeros((1, 3, 16, 16), dtype=np.float32), TypeError),
        (torch.full((1, 3, 16, 16), NAN), ValueError),
        (torch.zeros((1, 3, 16, 16), dtype=torch.int64), ValueError),
        (torch.zeros((3, 16, 16)), ValueError),
    ],
)
def test_sample_loop_bad_latents(latents, error):
    unet = _unet()
    guider = Guider(unet, _scheduler(), sag=SAG(scale=0.5))
    _expect(lambda: sample_loop(guider, _model_fn(unet), latents), error, "latents", denoiser=unet)


def test_sample_loop_non_finite_output_names_the_scale():
    unet = _unet()
    sched = make_scheduler("euler")
    sched.set_timesteps(2)
    guider = Guider(unet, sched, sag=SAG(scale=1e30))
    x = torch.randn(1, 3, 16, 16, generator=gen(0)) * sched.init_noise_sigma
    run = lambda: sample_loop(guider, _model_fn(unet), x)  # noqa: E731
    _expect(run, ValueError, "sag_scale", denoiser=unet, ran=True)
