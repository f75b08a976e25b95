"""For every pipeline family: a guidance term at scale 1e-6 gives the unguided output (the processors and
the guided forward do not change the model), and two threads calling one pipeline give the results of
the same calls made one after the other."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import gen, quiet
from diffusers import DDIMScheduler
from test_families import _dit
from test_sdxl import tiny_sdxl_components

from attnguide import (
    DDPMSAGPipeline,
    DiTSAGPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionSAGPipeline,
    StableDiffusionXLSAGPipeline,
)
from attnguide.tiny_models import tiny_sd_components, tiny_unet_2d

TINY = 1e-6
TEXT = dict(height=32, width=32, num_inference_steps=3, output_type="latent")


def _sd():
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    return pipe, lambda seed, prompt, **kw: pipe(prompt, generator=gen(seed), **TEXT, **kw).images


def _sd_pag():
    pipe = quiet(StableDiffusionPAGPipeline(**tiny_sd_components(0)))
    return pipe, lambda seed, prompt, **kw: pipe(prompt, generator=gen(seed), **TEXT, **kw).images


def _sdxl():
    pipe = quiet(StableDiffusionXLSAGPipeline(**tiny_sdxl_components("ddim")))
    return pipe, lambda seed, prompt, **kw: pipe(prompt, generator=gen(seed), **TEXT, **kw).images


def _ddpm():
    pipe = quiet(DDPMSAGPipeline(tiny_unet_2d(0, class_conditional=True).eval(), DDIMScheduler()))

    def call(seed, prompt, **kw):
        label = len(prompt) % 10
        return pipe(2, gen(seed), 3, "pt", class_labels=[label, label], guidance_scale=2.0, **kw).images

    return pipe, call


def _dit_pipe():
    tr, vae = _dit()
    pipe = quiet(DiTSAGPipeline(tr, vae, DDIMScheduler()))
    return pipe, lambda seed, prompt, **kw: pipe([len(prompt)], 4.0, gen(seed), 3, "pt", **kw).images


FAMILIES = {"sd": _sd, "sd-pag": _sd_pag, "sdxl": _sdxl, "ddpm": _ddpm, "dit": _dit_pipe}
TERMS = {"sag": dict(sag_scale=TINY, pag_scale=0.0), "pag": dict(sag_scale=0.0, pag_scale=TINY)}


@pytest.mark.parametrize("term", sorted(TERMS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_term_at_scale_1e6_gives_the_unguided_output(family, term):
    _, call = FAMILIES[family]()
    unguided = call(0, "a cat", sag_scale=0.0, pag_scale=0.0)
    guided = call(0, "a cat", **TERMS[term])
    assert torch.isfinite(guided).all()
    torch.testing.assert_close(guided, unguided, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_threads_on_one_pipeline_give_the_sequential_results(family):
    _, call = FAMILIES[family]()
    jobs = [(0, "a cat", dict(sag_scale=0.75)), (1, "a red dog", dict(sag_scale=0.5, pag_scale=1.0))]
    sequential = [call(seed, prompt, **kw) for seed, prompt, kw in jobs]
    results: list = [None, None]
    errors: list = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        seed, prompt, kw = jobs[i]
        try:
            start.wait()
            results[i] = call(seed, prompt, **kw)
        except BaseException as err:  # reported below, in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, sequential, strict=True):
        assert torch.equal(got, want)
