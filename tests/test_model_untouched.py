"""For every pipeline family: a guidance term at scale 1e-6 gives the unguided output (the processors and
the guided forward do not change the model), and two threads calling one pipeline give the results of
the same calls made one after the other."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import gen, in_threads, quiet
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


# ------------------------------------------------------------------ one guide() block, several threads


def _plain_sd():
    from diffusers import StableDiffusionPipeline

    return quiet(StableDiffusionPipeline(**tiny_sd_components(0)))


JOBS = [(seed, prompt) for seed in (0, 1, 2) for prompt in ("a cat", "a red dog")]


def test_encode_prompt_calls_take_turns_inside_a_guide_block():
    """Inside a guide() block the pipeline's encode_prompt calls of two threads never overlap:
    transformers' tokenizers hold their padding settings while a call runs, and overlapping calls of one
    pipeline returned unpadded prompts (6 tokens instead of 77) about one run in three under load."""
    from attnguide import SAG, guide

    pipe = _plain_sd()
    original, inside, overlaps = pipe.encode_prompt, [0], []
    entered = threading.Barrier(2, timeout=5)

    def encode_prompt(*args, **kwargs):  # an instance attribute of this test's own pipeline
        inside[0] += 1
        overlaps.append(inside[0] > 1)
        try:
            entered.wait(timeout=0.3)  # a second thread would arrive here while the first is inside
        except threading.BrokenBarrierError:
            entered.reset()
        inside[0] -= 1
        return original(*args, **kwargs)

    pipe.encode_prompt = encode_prompt
    with guide(pipe, sag=SAG(scale=0.75)):
        in_threads(lambda p: pipe.encode_prompt(p, "cpu", 1, True), [[("a cat",)], [("a red dog",)]])
    assert len(overlaps) == 2 and not any(overlaps)
    assert pipe.__dict__["encode_prompt"] is encode_prompt  # the block put the test's own one back


@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_two_threads_three_calls_in_one_guide_block(cfg):
    """Inside one guide() block, two threads each make three calls of one plain diffusers pipeline: every
    result equals the same call made alone, and nothing stays installed."""
    from attnguide import APG, PAG, SAG, guide

    pipe = _plain_sd()
    procs = {k: id(v) for k, v in pipe.unet.attn_processors.items()}

    def call(seed, prompt):
        return pipe(prompt, generator=gen(seed), guidance_scale=cfg, **TEXT).images

    terms = dict(sag=SAG(scale=0.75, window=(0.0, 0.5)), pag=PAG(scale=1.0))
    if cfg > 1:  # a CFG rule whose state (APG's momentum) is each thread's and each call's own
        terms["apg"] = APG()
    with guide(pipe, **terms):
        sequential = [call(*job) for job in JOBS]
    with guide(pipe, **terms):
        results = in_threads(call, [JOBS[0::2], JOBS[1::2]])
    for i, got in enumerate(results[0] + results[1]):
        want = sequential[0::2][i] if i < 3 else sequential[1::2][i - 3]
        assert torch.equal(got, want)
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == procs
    assert "forward" not in pipe.unet.__dict__ and "encode_prompt" not in pipe.__dict__
    # the window (and APG's momentum) restarts at each pipeline call: two calls of one block equal two blocks
    with guide(pipe, **terms):
        again = call(*JOBS[0])
    assert torch.equal(again, sequential[0])


def test_two_threads_three_calls_on_one_guided_pipeline():
    pipe, call = _sd()
    kws = [dict(sag_scale=0.75), dict(sag_scale=0.5, pag_scale=1.0, sag_window=(0.0, 0.5))]
    jobs = [[(seed, prompt, kws[i]) for seed, prompt in JOBS[i::2]] for i in range(2)]
    sequential = [[call(s, p, **kw) for s, p, kw in thread_jobs] for thread_jobs in jobs]
    results = in_threads(lambda s, p, kw: call(s, p, **kw), jobs)
    for got_list, want_list in zip(results, sequential, strict=True):
        for got, want in zip(got_list, want_list, strict=True):
            assert torch.equal(got, want)
    assert not any("Guided" in type(p).__name__ for p in pipe.unet.attn_processors.values())


def test_an_unguided_call_during_a_guided_run_stays_unguided():
    """A plain diffusers pipeline sharing the UNet of an attnguide pipeline, called from another thread
    while the attnguide pipeline runs guided: its result is the unguided one."""
    guided_pipe, call = _sd()
    from diffusers import StableDiffusionPipeline

    # The UNet is shared; the tokenizer is not: transformers' tokenizers keep their padding settings on
    # the object during a call, so two threads tokenizing with one tokenizer can get each other's
    # (a transformers race, outside the guidance; the guided pipeline's own calls take turns).
    tokenizer = copy.deepcopy(guided_pipe.tokenizer)
    plain = quiet(StableDiffusionPipeline(**{**guided_pipe.components, "tokenizer": tokenizer}))
    want_plain = plain("a red dog", generator=gen(1), **TEXT).images
    want_guided = call(0, "a cat", sag_scale=0.75, pag_scale=1.0)
    results = in_threads(
        lambda which: (
            call(0, "a cat", sag_scale=0.75, pag_scale=1.0)
            if which == "guided"
            else plain("a red dog", generator=gen(1), **TEXT).images
        ),
        [[("guided",)] * 2, [("plain",)] * 2],
    )
    assert all(torch.equal(r, want_guided) for r in results[0])
    assert all(torch.equal(r, want_plain) for r in results[1])


def test_nested_guide_blocks_raise_at_entry_and_restore():
    from attnguide import PAG, SAG, guide

    pipe = _plain_sd()
    procs = {k: id(v) for k, v in pipe.unet.attn_processors.items()}
    with guide(pipe, sag=SAG(scale=0.5)):
        with pytest.raises(ValueError, match="already guided"), guide(pipe, pag=PAG(scale=1.0)):
            pass
        assert isinstance(pipe.unet.__dict__["forward"], object)
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == procs
    assert "forward" not in pipe.unet.__dict__ and "encode_prompt" not in pipe.__dict__
    # an attnguide pipeline call inside a guide() block on the same UNet: refused the same way
    sag_pipe, call = _sd()
    with guide(sag_pipe, sag=SAG(scale=0.5)), pytest.raises(ValueError, match="already guided"):
        call(0, "a cat", sag_scale=0.75)
    assert not any("Guided" in type(p).__name__ for p in sag_pipe.unet.attn_processors.values())
