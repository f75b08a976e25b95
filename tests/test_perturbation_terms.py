"""SEG, TPG and SLG (engine/guidance.py, engine/attention.py, engine/blocks.py): each formula against a
hand computation, diffusers' parities (SEG's query blur and its guider's infinite-sigma case, SLG against
the SD3 pipeline's ``skip_guidance_layers``), SEG at sigma -> 0 equal to the unguided run, and bad input.
(Scale 1e-6 on every family: tests/test_guide_families.py.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny_families import FAMILIES, instantiate

import attnguide
from attnguide.engine.blocks import BlockHooks
from attnguide.engine.guidance import PAG, SEG, SLG, TPG
from attnguide.engine.layers import resolve_blocks, transformer_blocks
from attnguide.engine.step import Guider
from attnguide.engine.terms import StepContext, StepOutputs
from attnguide.engine.terms.seg import blur_queries, seg_kernel_size


@functools.cache
def _family(name: str):
    spec = FAMILIES[name]()
    return spec, instantiate(spec)


def test_combine_adds_each_perturbation_term_once():
    g = torch.Generator().manual_seed(0)
    c, u, p, w1, w2 = (torch.randn(2, 3, generator=g) for _ in range(5))
    outputs = StepOutputs(c, u, weak={"pag": p, "seg": w1, "slg": w2})
    ctx = StepContext(
        x_in=c, t=torch.tensor(500), outputs=outputs, cfg=True, layout=None, prediction_type="epsilon",
        level=None, call=None, maps={}, capture_layers=lambda name: [], generator=None,
        record_mask=lambda mask: None,
    )  # fmt: skip
    outputs.deltas = {t.name: t.delta(ctx) for t in (PAG(scale=2.0), SEG(scale=3.0), SLG(scale=-1.5))}
    got = outputs.combined(4.0)
    want = u + 4.0 * (c - u) + 2.0 * (c - p) + 3.0 * (c - w1) - 1.5 * (c - w2)
    torch.testing.assert_close(got, want)


def test_seg_blur_equals_diffusers_gaussian_and_its_limits():
    """blur_queries is diffusers' SEG blur (its _gaussian_blur_2d, whose blur branch runs when sigma is
    above its threshold: threshold 0 here) on a square grid; sigma = inf is the mean query (what
    diffusers' guider computes for any finite sigma: its branches are swapped); a sigma whose kernel is
    one token leaves the queries unchanged."""
    from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

    q = torch.randn(2, 3, 64, 4, generator=torch.Generator().manual_seed(1))  # (B, heads, 8 x 8, d)
    flat = q.permute(0, 2, 1, 3).reshape(2, 64, 12)  # diffusers blurs the (B, N, heads * d) projection
    for sigma in (0.5, 1.0):
        k = seg_kernel_size(sigma)
        want = _gaussian_blur_2d(flat.clone(), k, sigma, sigma_threshold_inf=0.0)
        got = blur_queries(q, (8, 8), sigma).permute(0, 2, 1, 3).reshape(2, 64, 12)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mean = _gaussian_blur_2d(flat.clone(), 7, 1.0, sigma_threshold_inf=9999.9)
    inf = blur_queries(q, (8, 8), math.inf).permute(0, 2, 1, 3).reshape(2, 64, 12)
    torch.testing.assert_close(inf, mean, rtol=1e-5, atol=1e-6)
    assert seg_kernel_size(0.1) == 1 and torch.equal(blur_queries(q, (8, 8), 0.1), q)
    # a non-square grid: each row and column blurred, no token crossing from one row to the next
    rect = torch.randn(1, 1, 12, 2, generator=torch.Generator().manual_seed(2))
    blurred = blur_queries(rect, (3, 4), 1.0)
    img = rect[0, 0].T.reshape(2, 3, 4)[:, None]
    k1 = torch.exp(-0.5 * torch.linspace(-2, 2, 5) ** 2)
    k1 = k1 / k1.sum()
    # kernel 7 capped at 5 (reflect padding needs k // 2 < 3)
    ker = (k1[:, None] * k1[None, :])[None, None]
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(img, (2, 2, 2, 2), mode="reflect"), ker)
    torch.testing.assert_close(blurred[0, 0], want[:, 0].reshape(2, 12).T, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_seg_infinite_sigma_equals_diffusers_seg_hook_on_a_unet():
    """The weak (SEG) prediction of a tiny SD UNet equals the same UNet run with diffusers' own SEG hook
    on the mid block, at a finite blur_sigma, which diffusers' swapped branches turn into the mean query:
    the infinite-sigma SEG, which is what attnguide computes there."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.smoothed_energy_guidance_utils import (
        SmoothedEnergyGuidanceConfig,
        _apply_smoothed_energy_guidance_hook,
    )

    _, pipe = _family("sd_img2img")
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    t = torch.tensor(500)

    def model_fn(xx, tt, branches):
        return unet(xx, tt, encoder_hidden_states=text.expand(xx.shape[0], -1, -1)).sample

    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    with Guider(unet, pipe.scheduler, seg=SEG(scale=1.0, layers=layer)) as guider:
        weak = guider.passes(model_fn, x, t).weak["seg"]
    config = SmoothedEnergyGuidanceConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks")
    _apply_smoothed_energy_guidance_hook(unet, config, blur_sigma=1.0, name="seg_test")
    try:
        want = model_fn(x, t, ["cond"])
    finally:
        for m in unet.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                registry.remove_hook("seg_test", recurse=False)
    torch.testing.assert_close(weak, want, rtol=0, atol=1e-5)
    assert (weak - model_fn(x, t, ["cond"])).abs().max() > 1e-4


def test_seg_at_sigma_to_zero_equals_the_unguided_run():
    spec, pipe = _family("sd_img2img")

    def run(**terms):
        with attnguide.guide(pipe, **terms):
            return pipe(generator=torch.Generator().manual_seed(0), guidance_scale=1.0, **spec["call"]).images

    # equal up to the batch's float rounding (the weak branch is the conditional one, unblurred)
    torch.testing.assert_close(run(seg=SEG(scale=3.0, sigma=1e-3)), run(), rtol=0, atol=1e-5)


@torch.no_grad()
def test_block_hooks_shuffle_and_skip_only_their_rows():
    """TPG: the rows of its branch enter the block with their tokens permuted (the same permutation for
    each of them), the other rows untouched; SLG: the block's output rows of its branch are its input."""
    from diffusers.models.attention import BasicTransformerBlock

    from attnguide.engine.attention import GuidanceState

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([BasicTransformerBlock(8, 2, 4) for _ in range(2)]).eval()
    assert list(transformer_blocks(model)) == ["blocks.0", "blocks.1"]
    x = torch.randn(3, 5, 8)
    seen = []
    model.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    state = GuidanceState(groups={"tpg": (1, 2), "slg": (2, 3)}, batch_rows=3)
    gen = torch.Generator().manual_seed(7)
    with BlockHooks(model, state, gen) as hooks:
        hooks.install({"tpg": (TPG(), ["blocks.0"]), "slg": (SLG(), ["blocks.1"])})
        out0 = model.blocks[0](hidden_states=x)
        out1 = model.blocks[1](out0)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(7))
    # the pre-hook registered first sees the unshuffled input; the block computes on the shuffled one
    assert torch.equal(seen[0], x)
    plain0 = model.blocks[0](hidden_states=torch.stack([x[0], x[1][perm], x[2]]))
    torch.testing.assert_close(out0, plain0)
    torch.testing.assert_close(out1[2], out0[2])  # skipped
    torch.testing.assert_close(out1[:2], model.blocks[1](out0)[:2])
    assert not model.blocks[0]._forward_pre_hooks or len(model.blocks[0]._forward_pre_hooks) == 1  # ours gone
    assert not model.blocks[1]._forward_hooks


def _diffusers_sd3_slg(pipe, call: dict) -> torch.Tensor:
    """diffusers' own SD3 skip-layer guidance: block 1 skipped, scale 2.8, window (0.01, 0.6), seed 0."""
    return pipe(
        generator=torch.Generator().manual_seed(0),
        skip_guidance_layers=[1],
        skip_layer_guidance_scale=2.8,
        skip_layer_guidance_start=0.01,
        skip_layer_guidance_stop=0.6,
        **call,
    ).images


def test_slg_equals_diffusers_sd3_skip_guidance_layers():
    """guide(StableDiffusion3Pipeline, slg=SLG(...)) equals diffusers' own skip_guidance_layers (CFG on,
    4 steps, window (0.01, 0.6): steps 1 and 2 in both conventions)."""
    spec, pipe = _family("sd3")
    call = dict(spec["call"], num_inference_steps=4, guidance_scale=5.0)
    want = _diffusers_sd3_slg(pipe, call)
    with attnguide.guide(pipe, slg=SLG(scale=2.8, layers=[1], window=(0.01, 0.6))):
        got = pipe(generator=torch.Generator().manual_seed(0), **call).images
    plain = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_terms_combine_in_one_call_and_cost_one_branch_each():
    """PAG, SEG, TPG and SLG together: one model call per step with [uncond, cond] + one row block per
    term, and the result equals the sum of the terms measured one by one (each is linear in its weak
    prediction, and every weak prediction is the same whether batched alone or together)."""
    spec, pipe = _family("sd3")
    calls: list = []
    pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    call = dict(spec["call"], num_inference_steps=1, guidance_scale=5.0)

    def run(**terms):
        with attnguide.guide(pipe, **terms):
            return pipe(generator=torch.Generator().manual_seed(0), **call).images

    terms = {
        "pag": PAG(scale=1.0),
        "seg": SEG(scale=1.0),
        "tpg": TPG(scale=1.0),
        "slg": SLG(scale=1.0, window=(0, 1)),
    }
    base = run()
    calls.clear()
    together = run(**terms)
    assert calls == [2 + 4]
    one_by_one = base + sum(run(**{k: v}) - base for k, v in terms.items())
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: SEG(sigma=0), "seg_sigma"),
        (lambda: SEG(sigma=-1.0), "seg_sigma"),
        (lambda: SEG(scale=math.nan), "seg_scale"),
        (lambda: SEG(layers=3), "seg_layers"),
        (lambda: TPG(layers=[True]), "tpg_layers"),
        (lambda: TPG(window=(0.5, 0.2)), "tpg_window"),
        (lambda: SLG(scale=math.inf), "slg_scale"),
        (lambda: SLG(layers=[1.5]), "slg_layers"),
    ],
)
def test_term_validation(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_bad_layers_and_seg_on_linear_attention_raise_before_any_model_call():
    _, sana = _family("sana")
    calls: list = []
    sana.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="linear attention"), attnguide.guide(sana, seg=SEG()):
        pass
    _, sd3 = _family("sd3")
    with (
        pytest.raises(ValueError, match=r"slg_layers.*Available blocks"),
        attnguide.guide(sd3, slg=SLG(layers=[9])),
    ):
        pass
    with pytest.raises(ValueError, match="tpg_layers"), attnguide.guide(sd3, tpg=TPG(layers="nothing")):
        pass
    with pytest.raises(TypeError, match="`seg`"), attnguide.guide(sd3, seg=PAG()):
        pass
    assert resolve_blocks(sd3.transformer, [0, "transformer_blocks.2"], argument="x") == [
        "transformer_blocks.0",
        "transformer_blocks.2",
    ]
    assert calls == []


def test_drop_in_pipelines_take_the_new_terms_by_keyword():
    """attnguide's pipelines take seg_* / tpg_* / slg_* keywords: StableDiffusion3SAGPipeline with
    sag_scale=0 and slg_* equals diffusers' skip_guidance_layers; a bad value names its keyword."""
    from attnguide import StableDiffusion3SAGPipeline

    spec, plain = _family("sd3")
    ours = StableDiffusion3SAGPipeline(**spec["components"])
    ours.set_progress_bar_config(disable=True)
    call = dict(spec["call"], num_inference_steps=4, guidance_scale=5.0)
    want = _diffusers_sd3_slg(plain, call)
    got = ours(
        generator=torch.Generator().manual_seed(0),
        sag_scale=0.0,
        slg_scale=2.8,
        slg_layers=[1],
        slg_window=(0.01, 0.6),
        **call,
    ).images
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="seg_sigma"):
        ours(generator=torch.Generator().manual_seed(0), seg_scale=1.0, seg_sigma=-2.0, **call)


@pytest.mark.parametrize("name", ["seg", "tpg", "slg"])
def test_own_loop_pipelines_take_the_new_terms(name):
    """DDPMSAGPipeline and DiTSAGPipeline (attnguide's own loops) honour seg_* / tpg_* / slg_*: the output
    changes at scale 5 and is the unguided one at scale 1e-6."""
    from attnguide import DDPMSAGPipeline, DiTSAGPipeline

    for family, cls in (("ddpm", DDPMSAGPipeline), ("dit", DiTSAGPipeline)):
        spec = FAMILIES[family]()
        pipe = cls(**spec["components"])
        pipe.set_progress_bar_config(disable=True)
        window = {"slg_window": (0.0, 1.0)} if name == "slg" else {}

        def run(scale, pipe=pipe, spec=spec, window=window):
            kw = dict(spec["call"], generator=torch.Generator().manual_seed(0), sag_scale=0.0)
            return pipe(**kw, **{f"{name}_scale": scale}, **window).images

        base = run(0.0)
        assert (run(5.0) - base).abs().max() > 1e-3, family
        torch.testing.assert_close(run(1e-6), base, rtol=0, atol=1e-4)
