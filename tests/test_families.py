"""Every model family with the one engine: pixel UNets (unconditional, class-conditional, learned
variance), DiT, and the generic wrapper on existing diffusers pipelines and bare denoisers."""

from __future__ import annotations

import pytest
import torch
from conftest import gen, quiet
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DModel,
)

from attnguide import (
    PAG,
    SAG,
    DDPMSAGPipeline,
    DiTSAGPipeline,
    Guider,
    StableDiffusionSAGPipeline,
    guide,
    sample_loop,
)
from attnguide.tiny_models import tiny_sd_components, tiny_unet_2d

STEPS = 3


def _pixel(class_conditional=False, learned_variance=False, scheduler=None):
    unet = tiny_unet_2d(0, class_conditional=class_conditional, learned_variance=learned_variance).eval()
    sched = scheduler or DDPMScheduler(variance_type="learned_range" if learned_variance else "fixed_small")
    return quiet(DDPMSAGPipeline(unet, sched))


def _run(pipe, batch=2, seed=0, **kw):
    g = [gen(seed + i) for i in range(batch)] if batch > 1 else gen(seed)
    return pipe(batch, g, STEPS, "pt", **kw).images


PIXEL_CASES = [
    dict(class_conditional=False, learned_variance=False),
    dict(class_conditional=False, learned_variance=True),
    dict(class_conditional=True, learned_variance=False),
    dict(class_conditional=True, learned_variance=True),
]


@pytest.mark.parametrize(
    "case", PIXEL_CASES, ids=lambda c: f"cc{int(c['class_conditional'])}-lv{int(c['learned_variance'])}"
)
@pytest.mark.parametrize("term", ["sag", "blur", "pag"])
def test_pixel_unet_family(case, term):
    pipe = _pixel(**case)
    kw = {}
    if case["class_conditional"]:
        kw.update(class_labels=[3, 5], guidance_scale=2.0)
    guided = {
        "sag": dict(sag_scale=0.75, pag_scale=0.0),
        "blur": dict(sag_scale=0.75, sag_mask="global", pag_scale=0.0),
        "pag": dict(sag_scale=0.0, pag_scale=1.5),
    }[term]
    a = _run(pipe, **kw, **guided)
    assert torch.isfinite(a).all()
    assert torch.equal(a, _run(pipe, **kw, **guided))  # deterministic
    zero = dict(guided, **({"pag_scale": 0.0} if term == "pag" else {"sag_scale": 0.0}))
    unguided = _run(pipe, **kw, sag_scale=0.0, pag_scale=0.0)
    assert torch.equal(_run(pipe, **kw, **zero), unguided)  # scale 0 is the unguided run exactly
    assert (a - unguided).abs().max() > 1e-3
    # batch of 2 equals two runs of 1 (in float64, so that only the logic is compared, not float noise)
    pipe.unet.double()
    a = _run(pipe, **kw, **guided)
    kw1 = dict(kw)
    singles = []
    for i in range(2):
        if case["class_conditional"]:
            kw1["class_labels"] = [kw["class_labels"][i]]
        singles.append(_run(pipe, batch=1, seed=i, **kw1, **guided))
    assert (torch.cat(singles) - a).abs().max() <= 1e-5


def test_pixel_unguided_equals_diffusers_ddpm_pipeline():
    unet = tiny_unet_2d(0).eval()
    ref = quiet(DDPMPipeline(unet, DDPMScheduler()))
    ours = quiet(DDPMSAGPipeline(unet, DDPMScheduler()))
    want = ref(2, gen(0), STEPS, "np").images
    got = ours(2, gen(0), STEPS, "np", sag_scale=0.0).images
    assert abs(want - got).max() <= 1e-6


def test_pixel_non_square_and_float_timesteps():
    pipe = _pixel(scheduler=EulerDiscreteScheduler())
    a = pipe(2, gen(0), STEPS, "pt", height=16, width=24, sag_scale=0.75, pag_scale=1.0).images
    assert a.shape == (2, 3, 16, 24) and torch.isfinite(a).all()
    b = pipe(2, gen(0), STEPS, "pt", height=16, width=24, sag_scale=0.0).images
    assert (a - b).abs().max() > 1e-3


def test_pixel_bad_input():
    pipe = _pixel(class_conditional=True)
    for kwargs, arg in [
        ({"class_labels": [11]}, "class_labels"),
        ({"class_labels": [1, 2, 3]}, "class_labels"),
        ({"height": 17}, "height"),
        ({"sag_scale": -1.0}, "sag_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"sag_layers": "nowhere"}, "sag_layers"),
    ]:
        with pytest.raises(ValueError, match=arg):
            _run(pipe, **kwargs)
    with pytest.raises(ValueError, match="unconditional"):
        _run(_pixel(), class_labels=[1, 2])


def test_unknown_output_layout_is_refused():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=9,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ).eval()
    pipe = quiet(DDPMSAGPipeline(unet, DDPMScheduler()))
    with pytest.raises(ValueError, match="9 channels"):
        _run(pipe)


def test_unet_without_attention_is_refused():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
        norm_num_groups=32,
    ).eval()
    pipe = quiet(DDPMSAGPipeline(unet, DDPMScheduler()))
    with pytest.raises(ValueError, match="no self-attention layer"):
        _run(pipe)
    with pytest.raises(ValueError, match="no self-attention layer"):
        _run(pipe, sag_scale=0.0, pag_scale=1.0)


# ------------------------------------------------------------------------------------------------ DiT
def _dit():
    torch.manual_seed(0)
    tr = DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    ).eval()
    return tr, vae


@pytest.mark.parametrize("gs", [1.0, 4.0])
def test_dit_family(gs):
    tr, vae = _dit()
    ref = quiet(DiTPipeline(tr, vae, DDIMScheduler()))
    pipe = quiet(DiTSAGPipeline(tr, vae, DDIMScheduler()))

    def run(labels, seed_list, **kw):
        g = [gen(s) for s in seed_list] if len(seed_list) > 1 else gen(seed_list[0])
        return pipe(labels, gs, g, STEPS, "pt", **kw).images

    want = ref(
        [1, 2], guidance_scale=gs, generator=[gen(0), gen(1)], num_inference_steps=STEPS, output_type="pt"
    ).images
    unguided = run([1, 2], [0, 1], sag_scale=0.0)
    assert (want - unguided).abs().max() <= 1e-5  # the unguided run is diffusers' DiTPipeline
    for guided in (
        dict(sag_scale=0.75),
        dict(sag_scale=0.0, pag_scale=1.0),
        dict(sag_scale=0.5, pag_scale=1.0),
    ):
        a = run([1, 2], [0, 1], **guided)
        assert torch.isfinite(a).all() and torch.equal(a, run([1, 2], [0, 1], **guided))
        assert (a - unguided).abs().max() > 1e-3
    # batch of 2 equals two runs of 1 (float64: the logic, not float noise, is compared)
    pipe.transformer.double()
    pipe.vae.double()
    for guided in (dict(sag_scale=0.75), dict(sag_scale=0.5, pag_scale=1.0)):
        a = run([1, 2], [0, 1], **guided)
        singles = torch.cat([run([1], [0], **guided), run([2], [1], **guided)])
        assert (singles - a).abs().max() <= 1e-5
    assert pipe.last_guider.capture["sag"] == ["transformer_blocks.1.attn1"]
    assert pipe.last_guider.layers["pag"] == ["transformer_blocks.1.attn1"]


def test_dit_sag_map_is_on_the_patch_grid():
    tr, vae = _dit()
    pipe = quiet(DiTSAGPipeline(tr, vae, DDIMScheduler()))
    pipe([1, 2], 4.0, gen(0), STEPS, "pt", record_masks=True)
    mask = pipe.last_guider.last_mask
    assert mask.shape == (2, 1, 8, 8)
    # nearest upsampling from the 4x4 patch grid: each 2x2 block is constant
    blocks = mask.reshape(2, 1, 4, 2, 4, 2)
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))


# ------------------------------------------------------------------------------------- generic entry
@pytest.mark.parametrize("gs", [1.0, 7.5])
def test_guide_wraps_an_existing_sd_pipeline(gs):
    comps = tiny_sd_components(0)
    sd = quiet(StableDiffusionPipeline(**comps, requires_safety_checker=False))
    ours = quiet(StableDiffusionSAGPipeline(**comps))
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=STEPS, output_type="latent", height=32, width=40)
    forward = sd.unet.forward
    with guide(sd, sag=SAG(scale=0.75), pag=PAG(scale=1.0)):
        a = sd(generator=gen(0), guidance_scale=gs, **kw).images
    b = ours(generator=gen(0), guidance_scale=gs, sag_scale=0.75, pag_scale=1.0, **kw).images
    assert (a - b).abs().max() <= 1e-4
    assert sd.unet.forward == forward and "forward" not in sd.unet.__dict__
    with guide(sd, sag=SAG(scale=0.0)):  # scale 0: the pipeline unchanged, exactly
        c = sd(generator=gen(0), guidance_scale=gs, **kw).images
    assert torch.equal(c, sd(generator=gen(0), guidance_scale=gs, **kw).images)


def test_guide_wraps_dit_and_ddpm_pipelines():
    tr, vae = _dit()
    ref = quiet(DiTPipeline(tr, vae, DDIMScheduler()))
    ours = quiet(DiTSAGPipeline(tr, vae, DDIMScheduler()))
    with guide(ref, sag=SAG(scale=0.75)):
        a = ref(
            [1, 2], guidance_scale=4.0, generator=gen(0), num_inference_steps=STEPS, output_type="pt"
        ).images
    b = ours([1, 2], 4.0, gen(0), STEPS, "pt", sag_scale=0.75).images
    assert (a - b).abs().max() <= 1e-4

    unet = tiny_unet_2d(0).eval()
    ddpm = quiet(DDPMPipeline(unet, DDPMScheduler()))
    with guide(ddpm, sag=SAG(scale=0.75, mask="global")):
        a = ddpm(2, gen(0), STEPS, "np").images
    b = quiet(DDPMSAGPipeline(unet, DDPMScheduler()))(
        2, gen(0), STEPS, "np", sag_scale=0.75, sag_mask="global"
    ).images
    assert abs(a - b).max() <= 1e-4


def test_guide_restores_on_error_and_bare_denoiser_loop():
    unet = tiny_unet_2d(0).eval()
    ddpm = quiet(DDPMPipeline(unet, DDPMScheduler()))
    procs = {k: id(m.processor) for k, m in unet.named_modules() if hasattr(m, "processor")}
    with pytest.raises(RuntimeError, match="stop"), guide(ddpm, pag=PAG(scale=1.0)):
        raise RuntimeError("stop")
    assert "forward" not in unet.__dict__
    assert {k: id(m.processor) for k, m in unet.named_modules() if hasattr(m, "processor")} == procs
    with pytest.raises(ValueError, match="scheduler"), guide(unet, sag=SAG()):
        pass

    # a bare denoiser + scheduler with the engine's own loop equals the pipeline
    sched = DDIMScheduler()
    sched.set_timesteps(STEPS)
    guider = Guider(unet, sched, sag=SAG(scale=0.75))
    x = sample_loop(guider, lambda x, t, br: unet(x, t).sample, torch.randn(2, 3, 16, 16, generator=gen(0)))
    ref = quiet(DDPMSAGPipeline(unet, DDIMScheduler()))
    want = ref(2, gen(0), STEPS, "pt", sag_scale=0.75).images
    assert ((x / 2 + 0.5).clamp(0, 1) - want).abs().max() <= 1e-5
