"""PLADIS (engine/terms/pladis.py): the sparse maps and the extrapolated attention against hand
computations, the term on a tiny Stable Diffusion (scale 0 is the unguided run, scale 1e-6 reproduces it,
both CFG branches changed, extra passes included, everything restored, two threads give the sequential
results) and its refusal, before any model call, on models without cross-attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import gen, in_threads, quiet

import attnguide
from attnguide import PAG, PLADIS, StableDiffusionSAGPipeline
from attnguide.engine.step import place_terms
from attnguide.engine.terms.pladis import entmax15, pladis_attention, sparsemax
from attnguide.tiny_models import tiny_sd_components, tiny_unet_2d

SMALL = dict(prompt=["a cat", "a dog"], height=32, width=32, num_inference_steps=3, output_type="latent")


def test_sparse_maps_by_hand():
    """sparsemax([1, 0.5, -1]): the support is the two largest (1 + 2 * 0.5 > 1.5, 1 + 3 * (-1) < 0.5),
    tau = (1.5 - 1) / 2 = 0.25: [0.75, 0.25, 0]. 1.5-entmax of the same scores: z = s / 2 - max = [0,
    -0.25, -1]; on the support {1, 2}, (0 - tau)^2 + (-0.25 - tau)^2 = 1, so tau = (-0.5 - sqrt(7.75)) / 4,
    and the third score lies below tau: 0."""
    s = torch.tensor([[1.0, 0.5, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(sparsemax(s), torch.tensor([[0.75, 0.25, 0.0]], dtype=torch.float64))
    tau = (-0.5 - math.sqrt(7.75)) / 4
    want = torch.tensor([[tau**2, (-0.25 - tau) ** 2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(entmax15(s), want)
    # a tie spreads evenly; one dominant score takes everything
    torch.testing.assert_close(sparsemax(torch.zeros(1, 4)), torch.full((1, 4), 0.25))
    torch.testing.assert_close(entmax15(torch.zeros(1, 4)), torch.full((1, 4), 0.25))
    assert torch.equal(sparsemax(torch.tensor([[9.0, 0.0, 0.0]])), torch.tensor([[1.0, 0.0, 0.0]]))
    # on any scores: probabilities that sum to 1, with zeros
    x = torch.randn(5, 7, 11, generator=gen(0), dtype=torch.float64) * 3
    for f in (sparsemax, entmax15):
        p = f(x)
        assert (p >= 0).all() and (p == 0).any()
        torch.testing.assert_close(p.sum(-1), torch.ones(5, 7, dtype=torch.float64))


@pytest.mark.parametrize("sparse", ["entmax15", "sparsemax"])
def test_pladis_attention_by_hand(sparse):
    """(softmax(S) + lambda (sparse(S) - softmax(S))) v with S = q k^T / sqrt(d); lambda = 0 is softmax
    attention; a boolean mask keeps the masked keys out of both maps."""
    g = gen(1)
    q, k, v = (
        torch.randn(2, 3, 5, 8, generator=g),
        torch.randn(2, 3, 4, 8, generator=g),
        torch.randn(2, 3, 4, 6, generator=g),
    )
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    sparse_map = entmax15(s) if sparse == "entmax15" else sparsemax(s)
    want = (s.softmax(-1) + 2.0 * (sparse_map - s.softmax(-1))) @ v
    torch.testing.assert_close(pladis_attention(q, k, v, 2.0, sparse), want, rtol=1e-5, atol=1e-5)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(pladis_attention(q, k, v, 0.0, sparse), plain, rtol=1e-5, atol=1e-5)
    mask = torch.tensor([True, True, False, True])[None, None, None].expand(2, 3, 5, 4)
    kept = [0, 1, 3]
    s3 = s[..., kept]
    sparse3 = entmax15(s3) if sparse == "entmax15" else sparsemax(s3)
    want3 = (s3.softmax(-1) + 2.0 * (sparse3 - s3.softmax(-1))) @ v[:, :, kept]
    torch.testing.assert_close(pladis_attention(q, k, v, 2.0, sparse, mask), want3, rtol=1e-5, atol=1e-5)


def test_pladis_checks_its_arguments():
    for kwargs, argument in (
        ({"scale": float("nan")}, "pladis_scale"),
        ({"sparse": "softmax"}, "pladis_sparse"),
        ({"layers": 3}, "pladis_layers"),
        ({"window": (0.5, 0.2)}, "pladis_window"),
    ):
        with pytest.raises(ValueError, match=argument):
            PLADIS(**kwargs)


def _pipe():
    return quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))


def _processors(unet) -> dict[str, int]:
    return {name: id(m.processor) for name, m in unet.named_modules() if hasattr(m, "processor")}


def test_pladis_on_stable_diffusion():
    """Through the pipelines' keywords: scale 0 is the unguided run, 1e-6 reproduces it within 1e-4,
    2.0 changes it, with CFG and SAG too (its degraded pass sees PLADIS' attention: same call, no extra
    pass); the processors are restored."""
    pipe = _pipe()
    before = _processors(pipe.unet)
    run = dict(generator=gen(0), guidance_scale=3.0, sag_scale=0.0, **SMALL)
    plain = pipe(**run).images
    assert torch.equal(pipe(**{**run, "generator": gen(0)}, pladis_scale=0.0).images, plain)
    tiny = pipe(**{**run, "generator": gen(0)}, pladis_scale=1e-6).images
    torch.testing.assert_close(tiny, plain, rtol=0, atol=1e-4)
    guided = pipe(**{**run, "generator": gen(0)}, pladis_scale=2.0).images
    assert (guided - plain).abs().max() > 1e-3
    sparse = pipe(**{**run, "generator": gen(0)}, pladis_scale=2.0, pladis_sparse="sparsemax").images
    assert (sparse - guided).abs().max() > 1e-4
    with_sag = pipe(**{**run, "generator": gen(0), "sag_scale": 0.5}, pladis_scale=2.0).images
    assert (with_sag - guided).abs().max() > 1e-4
    assert _processors(pipe.unet) == before
    assert len(pipe.last_guider.layers["pladis"]) == len([n for n in before if n.endswith("attn2")])


def test_pladis_in_guide_acts_on_both_cfg_branches_and_keeps_the_call_count():
    """guide() on a plain diffusers pipeline: the denoiser is called once per step as without PLADIS,
    and both branches' cross-attention is PLADIS' (each branch alone, cond and uncond, differs)."""
    from diffusers import StableDiffusionPipeline

    pipe = quiet(StableDiffusionPipeline(**tiny_sd_components(0)))
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with attnguide.guide(pipe, pladis=PLADIS(scale=2.0)):
            pipe(generator=gen(0), guidance_scale=3.0, **SMALL)
    finally:
        handle.remove()
    assert len(calls) == 3  # one call per step, as the unguided pipeline
    x = torch.randn(2, 4, 4, 4, generator=gen(2))
    text = torch.randn(2, 77, 32, generator=gen(3))
    with torch.no_grad():
        plain = pipe.unet(x, 500, encoder_hidden_states=text).sample
        with attnguide.guide(pipe.unet, scheduler=pipe.scheduler, cfg_layout="uncond_first", pladis=PLADIS()):
            both = pipe.unet(x, 500, encoder_hidden_states=text).sample
    assert (both[0] - plain[0]).abs().max() > 1e-4 and (both[1] - plain[1]).abs().max() > 1e-4


def test_pladis_two_threads_give_the_sequential_results():
    pipe = _pipe()

    def call(seed: int) -> torch.Tensor:
        return pipe(generator=gen(seed), guidance_scale=3.0, pladis_scale=2.0, **SMALL).images

    sequential = [call(0), call(1)]
    results = [r[0] for r in in_threads(call, [[(0,)], [(1,)]])]
    for got, want in zip(results, sequential, strict=True):
        assert torch.equal(got, want)


def test_pladis_refuses_models_without_cross_attention_before_any_call():
    """A class-embedding UNet has no cross-attention: ValueError naming pladis_layers, no model call."""
    from diffusers import DDPMScheduler

    unet = tiny_unet_2d(0, class_conditional=True)
    calls = []
    unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"pladis_layers.*no cross-attention layer"):
        attnguide.Guider(unet, DDPMScheduler(), pladis=PLADIS())
    with pytest.raises(ValueError, match="no cross-attention layer"):
        attnguide.DDPMSAGPipeline(unet, DDPMScheduler())(num_inference_steps=2, pladis_scale=2.0)
    assert calls == []


@dataclasses.dataclass(frozen=True)
class _CrossPAG(PAG):
    """PAG placed on the mid block's cross-attention (a stand-in for a term that acts in a layer PLADIS
    acts in)."""

    def attention_layers(self, model):
        return ["mid_block.attentions.0.transformer_blocks.0.attn2"]


def test_pladis_shares_no_layer_with_another_term():
    """A term that changes every row of a layer cannot share it with another term (the two changes of one
    attention call would not compose): refused before any call."""
    unet = _pipe().unet
    with pytest.raises(ValueError, match="`pladis` and `pag` both act in"):
        place_terms(unet, {"pladis": PLADIS(), "pag": _CrossPAG(scale=1.0)})
