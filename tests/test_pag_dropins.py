"""The PAG drop-ins of every family diffusers has a PAG pipeline for (img2img, inpainting, ControlNet,
SDXL variants, AnimateDiff, PixArt-Sigma, HunyuanDiT, Kolors), on the tiny components of
tests/tiny_families.py: diffusers' PAG numbers with CFG off and on, SAG beside PAG, the attention
processors restored; diffusers' constructors, call signatures and scheduler fix-ups; and diffusers'
``PAGMixin`` hooks (``_set_pag_attn_processor``, ``pag_attn_processors``).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from conftest import gen, quiet
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers import StableDiffusionPAGPipeline as RefPAG
from diffusers import StableDiffusionSAGPipeline as RefSAG
from tiny_families import FAMILIES
from transformers import CLIPTextConfig, CLIPTextModel

import attnguide
from attnguide import (
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionSAGPipeline,
)
from attnguide.engine.layers import resolve_layers
from attnguide.pipelines.options import GuidanceOptions
from attnguide.tiny_models import offline_clip_tokenizer, tiny_sd_components

TOL = 1e-4
PAG_SCALE = 2.0

#: family of tests/tiny_families.py -> attnguide's drop-in for its diffusers PAG pipeline
DROPINS: dict[str, type] = {
    "sd_img2img": attnguide.StableDiffusionPAGImg2ImgPipeline,
    "sd_inpaint": attnguide.StableDiffusionPAGInpaintPipeline,  # 9-channel inpainting UNet
    "sd_inpaint4": attnguide.StableDiffusionPAGInpaintPipeline,  # 4-channel UNet
    "sd_controlnet": attnguide.StableDiffusionControlNetPAGPipeline,
    "sd_controlnet_inpaint": attnguide.StableDiffusionControlNetPAGInpaintPipeline,
    "sdxl_img2img": attnguide.StableDiffusionXLPAGImg2ImgPipeline,
    "sdxl_inpaint": attnguide.StableDiffusionXLPAGInpaintPipeline,
    "sdxl_controlnet": attnguide.StableDiffusionXLControlNetPAGPipeline,
    "sdxl_controlnet_img2img": attnguide.StableDiffusionXLControlNetPAGImg2ImgPipeline,
    "animatediff": attnguide.AnimateDiffPAGPipeline,
    "pixart_sigma": attnguide.PixArtSigmaPAGPipeline,
    "hunyuandit": attnguide.HunyuanDiTPAGPipeline,
    "kolors": attnguide.KolorsPAGPipeline,
    "sd3": attnguide.StableDiffusion3PAGPipeline,
    "sd3_img2img": attnguide.StableDiffusion3PAGImg2ImgPipeline,
    "sana": attnguide.SanaPAGPipeline,
}


def _case(family: str, cfg: bool):
    return pytest.param(family, cfg, id=f"{family}-cfg_{'on' if cfg else 'off'}")


@functools.cache
def _spec(family: str) -> dict:
    """The family's spec, built once (its models are shared by every test of the family)."""
    return FAMILIES[family]()


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _processor_ids(pipe) -> dict[str, int]:
    return {k: id(v) for k, v in _denoiser(pipe).attn_processors.items()}


def _run(pipe, kw: dict, seed: int = 0, **extra) -> torch.Tensor:
    out = pipe(generator=gen(seed), return_dict=False, **kw, **extra)[0]
    return torch.as_tensor(out)


def _run_reference(pipe, kw: dict) -> torch.Tensor:
    """diffusers' PAG pipeline; its processors restored after (its SDXL inpainting and ControlNet img2img
    PAG pipelines return early for output_type="latent" and leave their PAG processors installed)."""
    procs = dict(_denoiser(pipe).attn_processors)
    try:
        return _run(pipe, kw)
    finally:
        _denoiser(pipe).set_attn_processor(procs)


def _call(family: str, cfg: bool, **extra) -> dict:
    spec = _spec(family)
    return dict(spec["call"], guidance_scale=spec["cfg_scale" if cfg else "cfg_off"], **extra)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


#: diffusers' PAG pipeline fails with CFG off (see the HunyuanDiT test below): no reference to compare with
NO_REFERENCE_WITHOUT_CFG = {"hunyuandit"}
PARITY = [_case(f, cfg) for f in DROPINS for cfg in (False, True) if cfg or f not in NO_REFERENCE_WITHOUT_CFG]


@pytest.mark.parametrize(("family", "cfg"), PARITY)
def test_matches_diffusers_pag_pipeline(family, cfg):
    spec = _spec(family)
    ref = quiet(spec["pag_pipeline"](**spec["components"]))
    ours = quiet(DROPINS[family](**spec["components"]))
    kw = _call(family, cfg, pag_scale=PAG_SCALE)
    want = _run_reference(ref, kw)
    before = _processor_ids(ours)
    got = _run(ours, kw)
    assert _processor_ids(ours) == before
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _max_diff(got, want) <= TOL


@pytest.mark.parametrize(("family", "cfg"), [_case(f, True) for f in DROPINS])
def test_sag_beside_pag(family, cfg):
    ours = quiet(DROPINS[family](**_spec(family)["components"]))
    kw = _call(family, cfg, pag_scale=PAG_SCALE)
    before = _processor_ids(ours)
    guided = _run(ours, kw, sag_scale=2.0 if family.startswith("sd3") else 0.5)  # 2 steps of a tiny SD3
    assert _processor_ids(ours) == before
    assert torch.isfinite(guided).all()
    assert _max_diff(guided, _run(ours, kw, sag_scale=0.0)) > 100 * TOL


def test_hunyuandit_pag_without_cfg_runs_where_diffusers_fails():
    spec = _spec("hunyuandit")
    assert spec.get("pag_without_cfg") is False
    kw = _call("hunyuandit", False, pag_scale=PAG_SCALE)
    # diffusers 0.42 repeats HunyuanDiT's size/style conditioning 3 times under PAG, also without CFG
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        _run_reference(quiet(spec["pag_pipeline"](**spec["components"])), kw)
    ours = quiet(attnguide.HunyuanDiTPAGPipeline(**spec["components"]))
    guided = _run(ours, kw)
    assert torch.isfinite(guided).all()
    assert _max_diff(guided, _run(ours, dict(kw, pag_scale=0.0))) > 100 * TOL


# ------------------------------------------------------------------------------------ drop-in interface


@pytest.mark.parametrize("family", [f for f in DROPINS if f != "sd_inpaint4"])
def test_constructor_and_call_are_diffusers(family):
    spec = _spec(family)
    cls, ref = DROPINS[family], spec["pag_pipeline"]
    assert cls.__name__ == ref.__name__
    params = lambda f: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    ours_init = params(cls.__init__)
    # SD3: the image encoder diffusers' PAG class does not name stays, keyword-only, after its arguments
    extra = ours_init[len(params(ref.__init__)) :]
    assert ours_init[: len(ours_init) - len(extra)] == params(ref.__init__)
    assert all(kind is inspect.Parameter.KEYWORD_ONLY and default is None for _, kind, default in extra)
    ours_call = inspect.signature(cls.__call__).parameters
    for name, p in inspect.signature(ref.__call__).parameters.items():
        assert repr(ours_call[name].default) == repr(p.default), name
    assert set(GuidanceOptions.names()) <= set(ours_call) and ours_call["sag_scale"].default == 0.0
    # diffusers' from_pipe from the plain pipeline keeps the models and gets the default layers
    plain = spec["pipeline"](**spec["components"])
    pipe = cls.from_pipe(plain)
    assert type(pipe) is cls and _denoiser(pipe) is _denoiser(plain)
    default = inspect.signature(ref.__init__).parameters["pag_applied_layers"].default
    assert pipe.pag_applied_layers == [default]


@pytest.mark.parametrize("family", ["sd_pag", "sd_sag", *(f for f in DROPINS if f != "sd_inpaint4")])
@pytest.mark.parametrize("scheduler", [DDIMScheduler, PNDMScheduler])
def test_scheduler_config_fixups_are_those_of_the_replaced_pipeline(family, scheduler):
    # default configs: DDIM steps_offset=0, clip_sample=True; PNDM steps_offset=0, skip_prk_steps=False
    if family in ("sd_pag", "sd_sag"):
        cls, ref = (
            (StableDiffusionPAGPipeline, RefPAG)
            if family == "sd_pag"
            else (StableDiffusionSAGPipeline, RefSAG)
        )
        comps = tiny_sd_components(0)
    else:
        cls, ref, comps = DROPINS[family], _spec(family)["pag_pipeline"], _spec(family)["components"]
    want = ref(**{**comps, "scheduler": scheduler()}).scheduler.config
    got = cls(**{**comps, "scheduler": scheduler()}).scheduler.config
    assert dict(got) == dict(want)


@pytest.mark.parametrize(
    ("cls", "ref", "family", "kw"),
    [
        (StableDiffusionPAGPipeline, RefPAG, None, dict(prompt="a cat", height=32, width=48, pag_scale=2.0)),
        (StableDiffusionSAGPipeline, RefSAG, None, dict(prompt="a cat", height=32, width=48, sag_scale=0.75)),
        (StableDiffusionPAGInpaintPipeline, None, "sd_inpaint4", dict(pag_scale=2.0)),
    ],
    ids=["sd_pag", "sd_sag", "sd_pag_inpaint"],
)
@pytest.mark.parametrize("gs", [1.0, 5.0])
def test_default_ddim_scheduler_matches_diffusers(cls, ref, family, kw, gs):
    # each pipeline gets its own DDIMScheduler() (steps_offset=0, clip_sample=True), which its __init__
    # corrects (or not) as diffusers' pipeline does
    comps = tiny_sd_components(0) if family is None else _spec(family)["components"]
    ref = ref or _spec(family)["pag_pipeline"]
    kw = dict(_spec(family)["call"] if family else dict(num_inference_steps=3, output_type="latent"), **kw)
    want = _run_reference(quiet(ref(**{**comps, "scheduler": DDIMScheduler()})), dict(kw, guidance_scale=gs))
    got = _run(quiet(cls(**{**comps, "scheduler": DDIMScheduler()})), dict(kw, guidance_scale=gs))
    assert _max_diff(got, want) <= TOL


def test_inpaint_guidance_rescale_is_refused():
    pipe = quiet(StableDiffusionPAGInpaintPipeline(**_spec("sd_inpaint4")["components"]))
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe(**_spec("sd_inpaint4")["call"], pag_scale=1.0, guidance_rescale=0.5)


# ------------------------------------------------------------------------- diffusers' PAGMixin hooks


def _diffusers_test_components() -> dict:
    """diffusers' tests/pipelines/pag/test_pag_sd.py components (its tokenizer is from the hub; the
    offline one does here: the test never tokenizes)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    tokenizer = offline_clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            hidden_size=8,
            intermediate_size=16,
            layer_norm_eps=1e-05,
            num_attention_heads=2,
            num_hidden_layers=2,
            pad_token_id=tokenizer.pad_token_id,
            vocab_size=len(tokenizer),
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return dict(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def test_pag_applied_layers_as_diffusers_test():
    """diffusers' ``StableDiffusionPAGPipelineFastTests.test_pag_applied_layers``, with our pipeline."""
    pipe = quiet(StableDiffusionPAGPipeline(**_diffusers_test_components()))
    all_self_attn_layers = [k for k in pipe.unet.attn_processors if "attn1" in k]
    original_attn_procs = pipe.unet.attn_processors
    pipe._set_pag_attn_processor(pag_applied_layers=["down", "mid", "up"], do_classifier_free_guidance=False)
    assert set(pipe.pag_attn_processors) == set(all_self_attn_layers)

    mid = ["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    for layers, want in [
        (["mid"], mid),
        (["mid_block"], mid),
        (["mid_block.attentions.0"], mid),
        (["down"], 2),
        (["down_blocks.1"], 2),
        (["down_blocks.1.attentions.1"], 1),
    ]:
        pipe.unet.set_attn_processor(original_attn_procs.copy())
        pipe._set_pag_attn_processor(pag_applied_layers=layers, do_classifier_free_guidance=False)
        if isinstance(want, int):
            assert len(pipe.pag_attn_processors) == want, layers
        else:
            assert set(pipe.pag_attn_processors) == set(want), layers
    for missing in (["mid_block.attentions.1"], ["down_blocks.0"]):
        pipe.unet.set_attn_processor(original_attn_procs.copy())
        with pytest.raises(ValueError):
            pipe._set_pag_attn_processor(pag_applied_layers=missing, do_classifier_free_guidance=False)


@pytest.mark.parametrize("cfg", [False, True])
def test_call_after_set_pag_attn_processor_is_unaffected(cfg):
    comps = tiny_sd_components(0)
    pipe = quiet(StableDiffusionPAGPipeline(**comps, pag_applied_layers=["mid", "up"]))
    kw = dict(prompt="a cat", height=32, width=48, num_inference_steps=2, output_type="latent")
    kw.update(guidance_scale=5.0 if cfg else 1.0, pag_scale=2.0)
    want = _run(pipe, kw)
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=not cfg)
    installed = _processor_ids(pipe)
    assert len(pipe.pag_attn_processors) == 3
    assert _max_diff(_run(pipe, kw), want) <= TOL
    assert _processor_ids(pipe) == installed  # left as found
    assert pipe.pag_attn_processors.keys() == {
        f"{layer}.processor" for layer in resolve_layers(pipe.unet, ["mid", "up"])
    }


@pytest.mark.parametrize("family", sorted(DROPINS))
def test_components_are_diffusers(family):
    """A drop-in made from diffusers' PAG pipeline's components has its ``components`` (diffusers'
    ``test_components_function``): the same names, none added."""
    spec = _spec(family)
    ref = spec["pag_pipeline"](**spec["components"])
    ours = DROPINS[family](**spec["components"])
    assert sorted(ours.components) == sorted(ref.components)
    assert ours._optional_components == ref._optional_components


def test_encode_prompt_keeps_diffusers_signature():
    """diffusers' pipeline tests read encode_prompt's parameter names: ours are diffusers' (also while a
    guide() block has put its recorder there)."""
    from diffusers import StableDiffusionPipeline

    def names(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    pipe = quiet(StableDiffusionPAGPipeline(**tiny_sd_components(0)))
    want = names(StableDiffusionPipeline(**tiny_sd_components(0)).encode_prompt)
    assert names(pipe.encode_prompt) == want
    with attnguide.guide(pipe, pag=attnguide.PAG(scale=1.0)):
        assert names(pipe.encode_prompt) == want


@pytest.mark.parametrize("slicing", ["auto", 1, "max"])
def test_attention_slicing_gives_the_default_processors_output(slicing):
    """With diffusers' attention slicing on (SlicedAttnProcessor, which computes attention without
    scaled_dot_product_attention), SAG and PAG give the default processors' output within 1e-4."""
    kw = dict(prompt=["a cat", "a dog"], height=32, width=32, num_inference_steps=3, output_type="pt")
    pipe = quiet(StableDiffusionPAGPipeline(**tiny_sd_components(0)))
    want = _run(pipe, kw, guidance_scale=3.0, pag_scale=2.0, sag_scale=0.5)
    pipe.enable_attention_slicing(slicing)
    assert any("Sliced" in type(p).__name__ for p in pipe.unet.attn_processors.values())
    got = _run(pipe, kw, guidance_scale=3.0, pag_scale=2.0, sag_scale=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
