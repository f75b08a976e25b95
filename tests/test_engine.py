"""The engine beyond diffusers: every scheduler, SAG + PAG together, processor restoration, bad input,
cross_attention_kwargs in every pass, memory-flat maps, ablation masks and step windows."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, quiet
from diffusers import StableDiffusionPipeline
from diffusers import StableDiffusionSAGPipeline as RefSAG

from attnguide import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline
from attnguide.engine.attention import MapLimits
from attnguide.tiny_models import tiny_sd_components

SMALL = dict(prompt=["a cat", "a dog"], height=32, width=40, num_inference_steps=3, output_type="latent")


def _processor_types(unet):
    return {k: type(v) for k, v in unet.attn_processors.items()}


def _count_calls(module):
    """Count the module's evaluations. A UNet is counted at ``conv_in``, the first layer of every
    evaluation: inside attnguide.guide the pipeline calls the UNet once per step and the guidance passes
    run its original forward directly, so a hook on the UNet module itself sees steps, not evaluations."""
    calls = []
    target = getattr(module, "conv_in", module)
    handle = target.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "sched", ["euler", "euler_a", "heun", "lms", "dpm_karras", "euler_karras", "unipc", "ddpm"]
)
def test_sag_on_every_scheduler(sched):
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0, scheduler=sched)))
    a = pipe(generator=gen(0), **SMALL).images
    b = pipe(generator=gen(0), **SMALL).images
    plain = pipe(generator=gen(0), sag_scale=0.0, **SMALL).images
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - plain).abs().max() > 1e-3


def test_float_timestep_scheduler_where_diffusers_refuses():
    comps = tiny_sd_components(0, scheduler="euler")
    comps["scheduler"].set_timesteps(3)
    assert torch.is_floating_point(comps["scheduler"].timesteps)
    with pytest.raises(ValueError, match="does not support"):
        quiet(RefSAG(**comps))(generator=gen(0), **SMALL)
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    for gs in (1.0, 5.0):
        a = pipe(generator=gen(0), guidance_scale=gs, **SMALL).images
        assert torch.isfinite(a).all()
        assert torch.equal(a, pipe(generator=gen(0), guidance_scale=gs, **SMALL).images)
        assert (
            a - pipe(generator=gen(0), guidance_scale=gs, sag_scale=0.0, **SMALL).images
        ).abs().max() > 1e-3


@pytest.mark.parametrize("sched", ["ddim", "euler"])
def test_unguided_equals_diffusers_stable_diffusion(sched):
    comps = tiny_sd_components(0, scheduler=sched)
    ref = quiet(StableDiffusionPipeline(**comps, requires_safety_checker=False))
    ours = quiet(StableDiffusionSAGPipeline(**comps))
    want = ref(generator=gen(0), **SMALL).images
    got = ours(generator=gen(0), sag_scale=0.0, **SMALL).images
    assert (want - got).abs().max() <= 1e-5


def test_sag_and_pag_together():
    comps = tiny_sd_components(0)
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    both = pipe(generator=gen(0), sag_scale=0.75, pag_scale=2.0, **SMALL).images
    sag = pipe(generator=gen(0), sag_scale=0.75, **SMALL).images
    pag = pipe(generator=gen(0), sag_scale=0.0, pag_scale=2.0, **SMALL).images
    assert torch.isfinite(both).all()
    assert (both - sag).abs().max() > 1e-3 and (both - pag).abs().max() > 1e-3
    assert torch.equal(both, pipe(generator=gen(0), sag_scale=0.75, pag_scale=2.0, **SMALL).images)
    # the PAG pipeline gives the same numbers for the same terms
    other = quiet(StableDiffusionPAGPipeline(**comps, pag_applied_layers="mid"))
    same = other(
        generator=gen(0), sag_scale=0.75, pag_scale=2.0, num_inference_steps=3, **_no_steps(SMALL)
    ).images
    assert (same - both).abs().max() <= 1e-5
    # without CFG too
    nocfg = pipe(generator=gen(0), guidance_scale=1.0, sag_scale=0.75, pag_scale=2.0, **SMALL).images
    assert torch.isfinite(nocfg).all()


def _no_steps(kw):
    return {k: v for k, v in kw.items() if k != "num_inference_steps"}


def test_unet_calls_per_step():
    comps = tiny_sd_components(0)
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    calls, h = _count_calls(comps["unet"])
    try:
        pipe(generator=gen(0), **SMALL)  # CFG + SAG: one batched call, one degraded call per step
        assert len(calls) == 2 * 3
        calls.clear()
        pipe(generator=gen(0), pag_scale=1.0, **SMALL)  # + PAG: still 2 calls, the batched one is 3B
        assert len(calls) == 2 * 3
        calls.clear()
        pipe(generator=gen(0), sag_window=(0.0, 0.5), **SMALL)  # SAG only in the first half: steps 0, 1
        assert len(calls) == 3 + 2
    finally:
        h.remove()


def test_processors_restored_after_success_and_error():
    comps = tiny_sd_components(0)
    unet = comps["unet"]
    before = _processor_types(unet)
    ids = {k: id(v) for k, v in unet.attn_processors.items()}
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    pipe(generator=gen(0), pag_scale=1.0, **SMALL)
    assert _processor_types(unet) == before
    assert {k: id(v) for k, v in unet.attn_processors.items()} == ids

    def boom(*_):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        pipe(generator=gen(0), pag_scale=1.0, callback=boom, **SMALL)
    assert {k: id(v) for k, v in unet.attn_processors.items()} == ids

    pag = quiet(StableDiffusionPAGPipeline(**comps))
    with pytest.raises(RuntimeError, match="interrupted"):
        pag(generator=gen(0), sag_scale=0.5, callback_on_step_end=boom, **SMALL)
    assert {k: id(v) for k, v in unet.attn_processors.items()} == ids


BAD_INPUTS = [
    ({"sag_scale": -0.1}, "sag_scale"),
    ({"sag_scale": math.nan}, "sag_scale"),
    ({"sag_scale": math.inf}, "sag_scale"),
    ({"pag_scale": -1.0}, "pag_scale"),
    ({"pag_scale": math.inf}, "pag_scale"),
    ({"guidance_scale": -2.0}, "guidance_scale"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"height": 33}, "height"),
    ({"width": 30}, "width"),
    ({"sag_layers": "no_such_block"}, "sag_layers"),
    ({"pag_scale": 1.0, "pag_applied_layers": "nowhere"}, "pag_applied_layers"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"sag_blur_kernel_size": 4}, "sag_blur_kernel_size"),
    ({"sag_blur_sigma": 0.0}, "sag_blur_sigma"),
    ({"sag_mask": "stripes"}, "sag_mask"),
    ({"sag_window": (0.8, 0.2)}, "sag_window"),
    (
        {
            "prompt": None,
            "prompt_embeds": torch.zeros(1, 77, 32),
            "negative_prompt_embeds": torch.zeros(1, 70, 32),
        },
        "negative_prompt_embeds",
    ),
]


@pytest.mark.parametrize(("kwargs", "argument"), BAD_INPUTS)
def test_bad_input_raises_before_any_model_call(kwargs, argument):
    comps = tiny_sd_components(0)
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    unet_calls, h1 = _count_calls(comps["unet"])
    text_calls, h2 = _count_calls(comps["text_encoder"])
    before = _processor_types(comps["unet"])
    args = dict(SMALL, prompt="a cat")
    args.update(kwargs)
    try:
        with pytest.raises(ValueError, match=argument):
            pipe(generator=gen(0), **args)
    finally:
        h1.remove()
        h2.remove()
    assert unet_calls == [] and text_calls == []
    assert _processor_types(comps["unet"]) == before


def test_unknown_layer_error_lists_available_layers():
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1") as err:
        pipe(generator=gen(0), sag_layers="blocks.99", **SMALL)
    assert "blocks.99" in str(err.value)


def test_model_without_self_attention_is_refused():
    from diffusers import UNet2DConditionModel

    comps = tiny_sd_components(0)
    torch.manual_seed(0)
    comps["unet"] = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=32,
    )
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    with pytest.raises(ValueError, match="no self-attention layer"):
        pipe(generator=gen(0), **SMALL)
    # without guidance it still samples
    assert torch.isfinite(pipe(generator=gen(0), sag_scale=0.0, **SMALL).images).all()


class _ProbeProcessor:
    """Default attention plus a record of the ``probe`` keyword (a cross_attention_kwargs entry)."""

    def __init__(self, seen):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()
        self.seen = seen

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, probe=None
    ):
        self.seen.append(probe)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_the_degraded_pass():
    comps = tiny_sd_components(0)
    unet = comps["unet"]
    seen: list = []
    cross = [n for n, m in unet.attn_processors.items() if "attn2" in n]
    unet.set_attn_processor(
        {n: (_ProbeProcessor(seen) if n in cross else p) for n, p in unet.attn_processors.items()}
    )
    calls, h = _count_calls(unet)
    try:
        pipe = quiet(StableDiffusionSAGPipeline(**comps))
        pipe(generator=gen(0), cross_attention_kwargs={"probe": "here"}, **SMALL)
    finally:
        h.remove()
    assert len(calls) == 6  # 3 steps x (batched + degraded)
    assert len(seen) == len(cross) * len(calls)
    assert set(seen) == {"here"}


def test_memory_flat_map_gives_the_same_result():
    comps = tiny_sd_components(0)
    pipe = quiet(StableDiffusionSAGPipeline(**comps))
    exact = pipe(generator=gen(0), sag_layers="down_blocks.1.attentions.0", **SMALL).images
    pipe.map_limits = MapLimits(exact_max_elements=0, chunk_elements=64)
    flat = pipe(generator=gen(0), sag_layers="down_blocks.1.attentions.0", **SMALL).images
    assert (exact - flat).abs().max() <= 1e-4


@pytest.mark.parametrize("mask", ["global", "random", "square", "highfreq"])
def test_blur_guidance_and_ablation_masks(mask):
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    out = pipe(generator=gen(0), sag_mask=mask, record_masks=True, **SMALL).images
    guider = pipe.last_guider
    sag = pipe(generator=gen(0), **SMALL).images
    assert torch.isfinite(out).all() and (out - sag).abs().max() > 1e-4
    m = guider.mask_sum
    assert m.shape == (2, 1, 16, 20) and m.max() <= 3
    if mask == "global":
        assert torch.equal(m, torch.full_like(m, 3.0))
    else:
        frac = (guider.last_mask > 0).float().mean().item()
        assert 0.2 < frac < 0.6  # about the paper's 40 %


def test_recorded_attention_masks_and_multi_layer_sag():
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    pipe(generator=gen(0), record_masks=True, **SMALL)
    m = pipe.last_guider.last_mask
    assert m.shape == (2, 1, 16, 20) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert pipe.last_guider.capture["sag"] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    out = pipe(generator=gen(0), sag_layers=["mid", "up_blocks.0"], **SMALL).images
    assert len(pipe.last_guider.capture["sag"]) == 3
    assert torch.isfinite(out).all()


def test_compiled_unet_is_not_recompiled_across_calls():
    """unet.compile(): the guidance processors compile into the UNet's graphs (no graph break), one graph
    per pass kind, and later calls reuse them (no recompilation)."""
    from torch._dynamo.utils import counters

    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    kw = dict(SMALL, prompt=["a cat"], guidance_scale=7.5, sag_scale=0.75, pag_scale=1.0)
    eager = pipe(generator=gen(0), **kw).images
    pipe.unet.compile(backend="eager")
    breaks = sum(counters["graph_break"].values())
    first = pipe(generator=gen(0), **kw).images
    assert sum(counters["graph_break"].values()) == breaks
    graphs = counters["stats"]["unique_graphs"]
    second = pipe(generator=gen(0), **kw).images
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(first, second)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)


def test_torch_compile_wrapper_is_looked_through():
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    eager = pipe(generator=gen(0), **SMALL).images
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    out = pipe(generator=gen(0), **SMALL).images
    assert pipe.last_guider.capture["sag"] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_step_end_callback_can_replace_prompt_embeddings():
    """callback_on_step_end may return new (conditional) prompt embeddings: later steps use them."""
    pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    kw = dict(SMALL, prompt=["a cat"], guidance_scale=7.5, sag_scale=0.75, num_inference_steps=4)
    base = pipe(generator=gen(0), **kw).images
    seen = []

    def keep(p, i, t, tensors):
        seen.append((i, p.num_timesteps, tuple(tensors)))
        return {}

    same = pipe(
        generator=gen(0), callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"], **kw
    ).images
    assert torch.equal(same, base)
    assert seen == [(i, 4, ("latents",)) for i in range(4)]

    def swap(p, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"] * 0.5} if i == 1 else {}

    swapped = pipe(
        generator=gen(0),
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        **kw,
    ).images
    assert torch.isfinite(swapped).all() and not torch.allclose(swapped, base)
