"""Flow-matching models (SD3, Sana): SAG's pipelines equal diffusers' own at sag_scale 0 and guide at
sag_scale > 0, the flow noise level is the scheduler's sigma, and a model / scheduler mismatch is refused
before any model call. (guide() on these families, PAG parity and scale 1e-6: tests/test_guide_families.py
and tests/test_pag_dropins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from tiny_families import FAMILIES, instantiate

import attnguide
from attnguide import SAG, SanaSAGPipeline, StableDiffusion3SAGPipeline
from attnguide.engine.parameterization import noise_level

SAG_PIPELINES = {"sd3": StableDiffusion3SAGPipeline, "sana": SanaSAGPipeline}


@functools.cache
def _spec(family: str) -> dict:
    return FAMILIES[family]()


def _run(pipe, family: str, cfg: bool, **kw) -> torch.Tensor:
    spec = _spec(family)
    call = dict(spec["call"], guidance_scale=spec["cfg_scale" if cfg else "cfg_off"], **kw)
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
