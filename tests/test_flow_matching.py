"""Flow-matching models (SD3, Flux, Sana): SAG's pipelines equal diffusers' own at sag_scale 0 and guide
at sag_scale > 0, the flow noise level is the scheduler's sigma, and a model / scheduler mismatch is
refused before any model call. Flux: packed latents, its text-first joint attention, and true CFG as two
transformer calls per step. (guide() on these families, PAG parity and scale 1e-6:
tests/test_guide_families.py and tests/test_pag_dropins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from tiny_families import FAMILIES, cfg_kwargs, instantiate

import attnguide
from attnguide import PAG, SAG, FluxSAGPipeline, SanaSAGPipeline, StableDiffusion3SAGPipeline
from attnguide.engine.parameterization import noise_level

SAG_PIPELINES = {"sd3": StableDiffusion3SAGPipeline, "sana": SanaSAGPipeline, "flux": FluxSAGPipeline}


@functools.cache
def _spec(family: str) -> dict:
    return FAMILIES[family]()


def _run(pipe, family: str, cfg: bool, **kw) -> torch.Tensor:
    spec = _spec(family)
    call = dict(spec["call"], **cfg_kwargs(spec, cfg), **kw)
    return pipe(generator=torch.Generator().manual_seed(0), **call).images


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("family", sorted(SAG_PIPELINES))
def test_sag_pipeline_is_diffusers_at_zero_and_guides_above(family, cfg):
    spec = _spec(family)
    plain = instantiate(spec)
    ours = SAG_PIPELINES[family](**spec["components"])
    ours.set_progress_bar_config(disable=True)
    want = _run(plain, family, cfg)
    torch.testing.assert_close(_run(ours, family, cfg, sag_scale=0.0), want, rtol=0, atol=1e-5)
    guided = _run(ours, family, cfg, sag_scale=2.0, record_masks=True)
    assert torch.isfinite(guided).all()
    assert (guided - want).abs().max() > 1e-3
    masks = ours.last_guider.mask_sum / ours.last_guider.mask_steps
    assert 0 < float(masks.mean()) < 1  # the map marks part of the image, not all or nothing
    assert torch.equal(guided, _run(ours, family, cfg, sag_scale=2.0))  # deterministic


def test_flow_noise_level_is_the_schedulers_sigma():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    for i, t in enumerate(sched.timesteps):
        level = noise_level(sched, t, sigma_schedule=True)
        sigma = sched.sigmas[i].float()
        torch.testing.assert_close(level.b, sigma)
        torch.testing.assert_close(level.a, 1 - sigma)
        sched.step(torch.zeros(1, 1, 2, 2), t, torch.zeros(1, 1, 2, 2))


def test_flow_model_with_another_scheduler_is_refused_before_any_model_call():
    spec = _spec("sd3")
    pipe = instantiate(spec)
    calls: list = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="flow-matching model"), attnguide.guide(pipe, sag=SAG()):
        pass
    unet_pipe = instantiate(_spec("sd_img2img"))
    unet_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="scheduler"), attnguide.guide(unet_pipe, sag=SAG()):
        pass
    assert calls == []


# ------------------------------------------------------------------------------------------------ Flux


def _passes(module: torch.nn.Module) -> list:
    """Counts the transformer passes that really run (a hook inside the forward attnguide replaces)."""
    calls: list = []
    module.x_embedder.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _flux_run(pipe, cfg: bool, steps: int = 2, **terms) -> torch.Tensor:
    spec = _spec("flux")
    kw = dict(spec["call"], num_inference_steps=steps, **cfg_kwargs(spec, cfg))
    with attnguide.guide(pipe, **terms):
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images


@functools.cache
def _flux_pipe():
    return instantiate(_spec("flux"))


@pytest.mark.parametrize("cfg", [False, True])
def test_flux_passes_per_step(cfg):
    """Without true CFG one transformer call per step, with it two (conditional, then unconditional); PAG
    adds its perturbed rows to the conditional call's batch, SAG one pass on the degraded input."""
    pipe = _flux_pipe()
    calls = _passes(pipe.transformer)
    per_step = 2 if cfg else 1
    for terms, extra in (({}, 0), ({"pag": PAG(scale=1.0)}, 0), ({"sag": SAG(scale=1.0)}, 1)):
        calls.clear()
        _flux_run(pipe, cfg, **terms)
        assert len(calls) == 2 * (per_step + extra), terms


def test_flux_true_cfg_adds_each_term_once():
    """With true CFG at weight w the pipeline combines two calls, u' + w (c' - u'); the PAG term must
    come out once, not w times: F(w, p) - F(w, 0) = p (F(1, 1) - F(1, 0)) after one Euler step
    (x_1 = x_0 + dt v, and the PAG term p (c - perturbed) does not depend on w)."""
    pipe = _flux_pipe()
    f10, f11 = _flux_run(pipe, False, 1), _flux_run(pipe, False, 1, pag=PAG(scale=1.0))
    fw0, fwp = _flux_run(pipe, True, 1), _flux_run(pipe, True, 1, pag=PAG(scale=2.0))
    assert (f11 - f10).abs().max() > 1e-2
    torch.testing.assert_close(fwp - fw0, 2.0 * (f11 - f10), rtol=0, atol=1e-5)


def _flux_inputs(pipe):
    """(latents, image ids, text ids, {"pos" | "neg": (embeddings, pooled)}) for a hand-written Flux loop."""
    spec = _spec("flux")
    enc = {k: spec["call"][k] for k in ("max_sequence_length",)}
    pos, pos_pooled, txt_ids = pipe.encode_prompt(prompt=spec["call"]["prompt"], prompt_2=None, **enc)
    neg, neg_pooled, _ = pipe.encode_prompt(prompt=spec["call"]["negative_prompt"], prompt_2=None, **enc)
    h, w = spec["call"]["height"] // 2, spec["call"]["width"] // 2  # VAE factor 2
    latents, img_ids = pipe.prepare_latents(
        1, 4, 2 * h, 2 * w, torch.float32, "cpu", torch.Generator().manual_seed(0)
    )
    texts = {"pos": (pos, pos_pooled), "neg": (neg, neg_pooled)}
    return latents, img_ids, txt_ids, texts


def _flux_loop(pipe, layout: str, terms: dict, w: float = 4.0) -> torch.Tensor:
    """Two Euler steps of the bare Flux transformer with true CFG, the branches batched ([neg, pos] in one
    call) or in two calls (conditional first), under guide(transformer, cfg_layout=layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents, img_ids, txt_ids, texts = _flux_inputs(pipe)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    tr = pipe.transformer

    def call(x, t, names):
        emb = torch.cat([texts[n][0] for n in names])
        pooled = torch.cat([texts[n][1] for n in names])
        b = x.shape[0]
        return tr(
            hidden_states=x,
            timestep=(t / 1000).expand(b),
            guidance=torch.full((b,), 3.5),
            pooled_projections=pooled,
            encoder_hidden_states=emb,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    with attnguide.guide(tr, scheduler=scheduler, cfg_layout=layout, **terms):
        for t in scheduler.timesteps:
            if layout == "separate":
                c = call(latents, t, ["pos"])
                u = call(latents, t, ["neg"])
            else:
                u, c = call(torch.cat([latents] * 2), t, ["neg", "pos"]).chunk(2)
            latents = scheduler.step(u + w * (c - u), t, latents, return_dict=False)[0]
    return latents


def test_flux_separate_cfg_calls_equal_the_batched_cfg_layout():
    """SAG (map and reference from the unconditional prediction) and PAG with CFG as two calls per step
    give what the same terms give with the branches batched in one call ([uncond, cond])."""
    pipe = _flux_pipe()
    terms = {"sag": SAG(scale=1.0), "pag": PAG(scale=1.5)}
    batched = _flux_loop(pipe, "uncond_first", terms)
    separate = _flux_loop(pipe, "separate", terms)
    assert (batched - _flux_loop(pipe, "uncond_first", {})).abs().max() > 1e-2
    torch.testing.assert_close(separate, batched, rtol=0, atol=2e-5)


def test_flux_windows_count_steps_from_the_scheduler():
    """Flux hands the transformer t / 1000, which is not in the schedule: a step window still applies
    to the right steps (the scheduler's step index), with true CFG's two calls counted as one step."""
    pipe = _flux_pipe()
    calls = _passes(pipe.transformer)
    _flux_run(pipe, True, 4, sag=SAG(scale=1.0, window=(0.0, 0.5)))
    assert len(calls) == 4 * 2 + 2  # SAG's extra pass in steps 0 and 1 only


def test_flux_kontext_is_refused_before_any_model_call():
    from diffusers import FluxKontextPipeline

    spec = _spec("flux")
    pipe = FluxKontextPipeline(**spec["components"])
    with (
        pytest.raises(ValueError, match="cannot guide FluxKontextPipeline"),
        attnguide.guide(pipe, pag=PAG()),
    ):
        pass


def test_flux_packing_equals_diffusers():
    """pack_2x2 / unpack_2x2 are diffusers' FluxPipeline._pack_latents / _unpack_latents, and the token
    grid read from img_ids is the one _prepare_latent_image_ids wrote; other ids are refused."""
    from diffusers import FluxPipeline

    from attnguide.engine.layout import pack_2x2, position_grid, unpack_2x2

    x = torch.randn(2, 5, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, 2, 5, 6, 10)
    assert torch.equal(pack_2x2(x), packed)
    assert torch.equal(unpack_2x2(packed, (3, 5)), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert position_grid(ids, 15) == (3, 5)
    with pytest.raises(ValueError, match="do not describe"):
        position_grid(ids, 16)
    with pytest.raises(ValueError, match="row-major"):
        position_grid(ids.flip(0), 15)


@torch.no_grad()
def test_flux_joint_attention_map_and_identity_by_hand():
    """A Flux double-stream attention (text tokens first): the SAG map is the image-to-image block of the
    softmax over image keys only (rows renormalised), mean over heads, summed over queries; PAG's rows get
    identity attention among the image tokens and see the text keys, the text queries attend as usual.
    A single-stream block ([text, image] in one sequence) gives the same map for the same tokens."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from attnguide.engine.attention import GuidanceState, guided_attention
    from attnguide.engine.terms.pag import identity_attention

    torch.manual_seed(0)
    attn = FluxAttention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=16, out_dim=16).eval()
    img, txt = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    state = GuidanceState(capture=True, capture_rows=2)
    proc = guided_attention(attn.processor, "a", state, capture=True)
    attn.set_processor(proc)
    attn(img, txt)
    agg, grid = state.maps["a"]
    q = attn.norm_q(attn.to_q(img).unflatten(-1, (2, 8))).transpose(1, 2)
    k = attn.norm_k(attn.to_k(img).unflatten(-1, (2, 8))).transpose(1, 2)
    want = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1).sum(2).mean(1)
    assert grid is None
    torch.testing.assert_close(agg, want, rtol=1e-5, atol=1e-5)
    # identity rule, image tokens last among n = 3 + 6
    qq, kk, vv = (torch.randn(1, 2, 9, 8) for _ in range(3))
    out = identity_attention(qq, kk, vv, slice(3, 9))
    for i in range(3, 9):
        keys = [0, 1, 2, i]
        w = (qq[0, :, i : i + 1] @ kk[0, :, keys].transpose(-1, -2) * 8**-0.5).softmax(-1)
        torch.testing.assert_close(out[0, :, i], (w @ vv[0, :, keys])[:, 0], rtol=1e-5, atol=1e-5)
    full = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
    torch.testing.assert_close(out[0, :, :3], full[0, :, :3], rtol=1e-5, atol=1e-5)
    # single-stream: the same tokens as one [text, image] sequence, image_tokens = 6
    single = FluxAttention(query_dim=16, heads=2, dim_head=8, out_dim=16, pre_only=True).eval()
    single.load_state_dict({k: v for k, v in attn.state_dict().items() if k in single.state_dict()})
    state.maps.clear()
    state.image_tokens = 6
    single.set_processor(guided_attention(single.processor, "a", state, capture=True))
    single(torch.cat([txt, img], dim=1))
    torch.testing.assert_close(state.maps["a"][0], want, rtol=1e-5, atol=1e-5)


def test_joint_attention_of_an_unknown_processor_is_refused():
    """A processor attnguide does not know the token order of, asked for a map of a sequence longer than
    its image, whose values do not tell (no value projection here): ValueError naming it (not a map of
    the wrong tokens)."""
    from attnguide.engine.attention import GuidanceState, GuidedAttention

    class MyMixedAttention:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            x = torch.cat([hidden_states, encoder_hidden_states], 1)[:, None]
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)[:, 0, : hidden_states.shape[1]]

    state = GuidanceState(capture=True)
    proc = GuidedAttention(MyMixedAttention(), "layer", state, capture=True)
    with pytest.raises(ValueError, match="where MyMixedAttention puts them cannot be read"):
        proc(None, torch.randn(1, 4, 8), torch.randn(1, 2, 8))
