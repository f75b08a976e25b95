"""The CFG rules (APG, CFG-Zero*, TCFG, FDG, the guidance interval): each equals diffusers' own guider
``forward`` given the same predictions (within 1e-5), outside its window it gives the conditional
prediction as diffusers' guiders do, at scale 1e-6 it is plain CFG, and the engine refuses a rule without
CFG and two rules at once, before any model call."""

from __future__ import annotations

import pytest
import torch

from attnguide.engine.combine import cfg
from attnguide.engine.parameterization import NoiseLevel
from attnguide.engine.terms import APG, FDG, TCFG, CFGZeroStar, GuidanceInterval, StepContext, StepOutputs

G = pytest.importorskip("diffusers.guiders")


def _ctx(c, u, w, step=0, num_steps=10, memory=None, sigma=1.0) -> StepContext:
    level = NoiseLevel(torch.tensor(1.0), torch.tensor(sigma))
    return StepContext(
        x_in=c,
        t=torch.tensor(500),
        outputs=StepOutputs(out_cond=c, out_uncond=u),
        cfg=True,
        layout=None,
        prediction_type="epsilon",
        level=lambda: level,
        call=None,
        maps={},
        capture_layers=lambda n: [],
        generator=None,
        record_mask=lambda m: None,
        step=step,
        num_steps=num_steps,
        guidance_scale=w,
        memory={} if memory is None else memory,
    )


def ours(term, c, u, w, **kw) -> torch.Tensor:
    delta = term.delta(_ctx(c, u, w, **kw))
    return cfg(c, u, w) + (0 if delta is None else delta)


def theirs(guider, c, u, step=0, num_steps=10) -> torch.Tensor:
    guider.set_state(step=step, num_inference_steps=num_steps, timestep=torch.tensor(500))
    batches = guider.prepare_inputs({"x": (c, u)})  # resets APG's momentum at step 0
    for batch, pred in zip(batches, (c, u), strict=False):
        batch.noise_pred = pred
    return guider(batches).pred


def _pair(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_apg_equals_diffusers_over_steps_with_momentum():
    term = APG(eta=0.3, momentum=-0.5, norm_threshold=15.0)
    ref = G.AdaptiveProjectedGuidance(
        guidance_scale=7.5,
        adaptive_projected_guidance_momentum=-0.5,
        adaptive_projected_guidance_rescale=15.0,
        eta=0.3,
    )
    memory: dict = {}
    for step in range(3):
        c, u = _pair(2, 4, 16, 16, seed=step)
        got = ours(term, c, u, 7.5, step=step, num_steps=3, memory=memory)
        assert (got - theirs(ref, c, u, step, 3)).abs().max() < 1e-5


def test_apg_without_momentum_or_cap_and_eta_one_is_cfg():
    c, u = _pair(2, 4, 8, 8)
    got = ours(APG(eta=1.0, momentum=None, norm_threshold=0.0), c, u, 5.0)
    assert (got - cfg(c, u, 5.0)).abs().max() < 1e-5


def test_cfg_zero_star_equals_diffusers_and_zero_inits():
    c, u = _pair(2, 4, 16, 16)
    ref = G.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1)
    assert (ours(CFGZeroStar(), c, u, 5.0, step=0) == 0).all()
    for step in (0, 1, 4):
        assert (ours(CFGZeroStar(), c, u, 5.0, step=step) - theirs(ref, c, u, step)).abs().max() < 1e-5


def test_tcfg_equals_diffusers():
    c, u = _pair(2, 4, 16, 16)
    got = ours(TCFG(), c, u, 5.0)
    assert (got - theirs(G.TangentialClassifierFreeGuidance(guidance_scale=5.0), c, u)).abs().max() < 1e-5


@pytest.mark.parametrize("weights", [None, (0.5, 1.0)])
@pytest.mark.parametrize("scales", [(10.0, 5.0), (3.0, 2.0, 1.5)])
def test_fdg_equals_diffusers(scales, weights):
    pytest.importorskip("kornia")
    if weights is not None and len(weights) != len(scales):
        weights = (*weights, 1.0)
    c, u = _pair(2, 4, 32, 32)
    term = FDG(guidance_scales=scales, parallel_weights=weights)
    ref = G.FrequencyDecoupledGuidance(
        guidance_scales=list(scales), parallel_weights=None if weights is None else list(weights)
    )
    assert (ours(term, c, u, 7.5) - theirs(ref, c, u)).abs().max() < 1e-5


def test_fdg_keeps_the_size_of_sides_the_pyramid_pads():
    c, u = _pair(1, 4, 24, 40)
    out = ours(FDG(guidance_scales=(2.0, 2.0, 2.0)), c, u, 7.5)
    assert out.shape == c.shape
    # equal weights on every level: the pyramid's levels sum back to the image, so this is CFG at 2
    assert (out - cfg(c, u, 2.0)).abs().max() < 1e-4


def test_fdg_on_video_latents_runs_frame_by_frame():
    c, u = _pair(1, 4, 3, 16, 16)
    out = ours(FDG(), c, u, 7.5)
    frame = ours(FDG(), c[:, :, 1], u[:, :, 1], 7.5)
    assert out.shape == c.shape and (out[:, :, 1] - frame).abs().max() < 1e-5


def test_guidance_interval_is_cfg_inside_and_the_conditional_prediction_outside():
    c, u = _pair(2, 4, 8, 8)
    term = GuidanceInterval(sigmas=(0.28, 5.42))
    assert (ours(term, c, u, 5.0, sigma=1.0) - cfg(c, u, 5.0)).abs().max() < 1e-6
    for sigma in (0.1, 0.2, 10.0):
        assert (ours(term, c, u, 5.0, sigma=sigma) - c).abs().max() < 1e-6


@pytest.mark.parametrize("term", [APG(), CFGZeroStar(zero_steps=0), TCFG(), FDG(), GuidanceInterval()])
def test_a_rule_outside_its_window_gives_c_and_at_scale_1e6_is_cfg(term):
    import dataclasses

    c, u = _pair(2, 4, 16, 16)
    late = dataclasses.replace(term, window=(0.5, 1.0))
    assert (ours(late, c, u, 5.0, step=2, num_steps=10) - c).abs().max() < 1e-6
    tiny = dataclasses.replace(term, scale=1e-6)
    assert (ours(tiny, c, u, 5.0, step=3) - cfg(c, u, 5.0)).abs().max() < 1e-4


def _tiny_class_model():
    from attnguide.apps.train import make_mnist_scheduler, make_mnist_unet

    torch.manual_seed(0)
    unet = make_mnist_unet(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=4).eval()
    sched = make_mnist_scheduler()
    sched.set_timesteps(4)
    return unet, sched


def _model_fn(unet, calls):
    def model_fn(x, t, branches):
        calls.append(tuple(branches))
        labels = torch.tensor([3 if b == "cond" else 10 for b in branches]).repeat_interleave(
            x.shape[0] // len(branches)
        )
        return unet(x, t, class_labels=labels).sample

    return model_fn


def test_the_engine_refuses_a_rule_without_cfg_and_two_rules_before_any_call():
    from attnguide import Guider, sample_loop

    unet, sched = _tiny_class_model()
    calls: list = []
    with pytest.raises(ValueError, match="`apg`: APG is a CFG rule: it needs classifier-free guidance"):
        sample_loop(Guider(unet, sched, apg=APG()), _model_fn(unet, calls), torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="`apg` and `tcfg` are both CFG rules"):
        Guider(unet, sched, guidance_scale=3.0, apg=APG(), tcfg=TCFG())
    assert calls == []


def test_a_rule_off_at_a_step_skips_the_unconditional_rows_and_combines_with_pag():
    from attnguide import PAG, Guider, sample_loop

    unet, sched = _tiny_class_model()
    calls: list = []
    guider = Guider(
        unet,
        sched,
        guidance_scale=3.0,
        interval=GuidanceInterval(sigmas=(0.0, 1e9), window=(0.5, 1.0)),
        pag=PAG(1.0),
    )
    x = sample_loop(
        guider, _model_fn(unet, calls), torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    )
    assert calls[:2] == [("cond", "cond"), ("cond", "cond")]  # steps 0-1: no CFG rows, PAG's rows
    assert calls[2:] == [("uncond", "cond", "cond")] * 2 and torch.isfinite(x).all()


def test_pipeline_keywords_of_a_rule_equal_guide_and_a_ddpm_pipeline_runs_one():
    """A drop-in's generated keywords (``apg_scale``, ``fdg_guidance_scales``, ...) give the same images as
    the same term in ``guide()`` on diffusers' own pipeline; the DDPM pipeline (the engine's own loop)
    takes a rule with its CFG."""
    from conftest import gen, quiet
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from attnguide import DDPMSAGPipeline, StableDiffusionSAGPipeline, guide
    from attnguide.tiny_models import tiny_sd_components, tiny_unet_2d

    text = dict(num_inference_steps=3, height=32, width=32, output_type="np", guidance_scale=5.0)
    ours_pipe = quiet(StableDiffusionSAGPipeline(**tiny_sd_components(0)))
    plain = quiet(StableDiffusionPipeline(**tiny_sd_components(0)))
    got = ours_pipe(
        "a cat", generator=gen(0), sag_scale=0.0, fdg_scale=1.0, fdg_guidance_scales=(6.0, 3.0), **text
    )
    with guide(plain, fdg=FDG(guidance_scales=(6.0, 3.0))):
        want = plain("a cat", generator=gen(0), **text)
    assert abs(got.images - want.images).max() < 1e-5
    unguided = plain("a cat", generator=gen(0), **text).images
    assert abs(got.images - unguided).max() > 1e-3
    ddpm = quiet(DDPMSAGPipeline(tiny_unet_2d(0, class_conditional=True).eval(), DDIMScheduler()))
    kw = dict(class_labels=[1, 2], num_inference_steps=3, output_type="np", guidance_scale=3.0, sag_scale=0.0)
    a = ddpm(2, generator=gen(0), apg_scale=1.0, **kw).images
    b = ddpm(2, generator=gen(0), **kw).images
    assert abs(a - b).max() > 1e-4
    with pytest.raises(ValueError, match="CFG rule"):
        ddpm(2, generator=gen(0), class_labels=[1, 2], num_inference_steps=2, sag_scale=0.0, apg_scale=1.0)
