"""Parity with diffusers' own pipelines: same components, seed and arguments give the same latents.

The reference is the diffusers installation itself (StableDiffusionSAGPipeline, deprecated upstream,
and StableDiffusionPAGPipeline), run in the same process on the same tiny random-weight components.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen, quiet
from diffusers import StableDiffusionPAGPipeline as RefPAG
from diffusers import StableDiffusionSAGPipeline as RefSAG

from attnguide import StableDiffusionPAGPipeline, StableDiffusionSAGPipeline
from attnguide.tiny_models import tiny_sd_components

TOL = 1e-4
CASES = [
    (sched, pred, gs)
    for sched in ("ddim", "pndm", "dpm")
    for pred in ("epsilon", "v_prediction")
    for gs in (1.0, 7.5)
]
# batch of 2 prompts x 2 images per prompt, non-square (32 x 48 pixels = 16 x 24 latents)
COMMON = dict(
    prompt=["a cat", "a red dog"],
    num_images_per_prompt=2,
    height=32,
    width=48,
    num_inference_steps=3,
    output_type="latent",
)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(("sched", "pred", "gs"), CASES)
def test_sag_matches_diffusers(sched, pred, gs):
    comps = tiny_sd_components(0, scheduler=sched, prediction_type=pred)
    ref = quiet(RefSAG(**comps))
    ours = quiet(StableDiffusionSAGPipeline(**comps))
    want = ref(guidance_scale=gs, sag_scale=0.75, generator=gen(0), **COMMON).images
    got = ours(guidance_scale=gs, sag_scale=0.75, generator=gen(0), **COMMON).images
    assert got.shape == want.shape == (4, 4, 16, 24)
    assert _max_diff(got, want) <= TOL
    # and SAG did something: the unguided run is far from it
    plain = ours(guidance_scale=gs, sag_scale=0.0, generator=gen(0), **COMMON).images
    assert _max_diff(plain, want) > 100 * TOL


@pytest.mark.parametrize(("sched", "pred", "gs"), CASES)
def test_pag_matches_diffusers(sched, pred, gs):
    comps = tiny_sd_components(0, scheduler=sched, prediction_type=pred)
    ref = quiet(RefPAG(**comps, pag_applied_layers=["mid"]))
    ours = quiet(StableDiffusionPAGPipeline(**comps, pag_applied_layers=["mid"]))
    want = ref(guidance_scale=gs, pag_scale=3.0, generator=gen(1), **COMMON).images
    got = ours(guidance_scale=gs, pag_scale=3.0, generator=gen(1), **COMMON).images
    assert _max_diff(got, want) <= TOL
    plain = ours(guidance_scale=gs, pag_scale=0.0, generator=gen(1), **COMMON).images
    assert _max_diff(plain, want) > 100 * TOL


@pytest.mark.parametrize(
    "layers",
    [
        "mid",
        "down",
        "up",
        "mid_block.attentions.0",
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        r"up_blocks\.0\.attentions\.(0|1)",
        ["down", "mid"],
    ],
)
def test_pag_layer_strings_keep_diffusers_meaning(layers):
    comps = tiny_sd_components(0)
    ref = quiet(RefPAG(**comps, pag_applied_layers=layers))
    ours = quiet(StableDiffusionPAGPipeline(**comps, pag_applied_layers=layers))
    kw = dict(COMMON, prompt="a cat", num_images_per_prompt=1, num_inference_steps=2)
    want = ref(pag_scale=2.0, generator=gen(2), **kw).images
    got = ours(pag_scale=2.0, generator=gen(2), **kw).images
    assert _max_diff(got, want) <= TOL


def test_pag_adaptive_scale_and_rescale_match_diffusers():
    comps = tiny_sd_components(0)
    ref = quiet(RefPAG(**comps))
    ours = quiet(StableDiffusionPAGPipeline(**comps))
    kw = dict(COMMON, pag_scale=3.0, pag_adaptive_scale=0.002, guidance_rescale=0.7)
    want = ref(generator=gen(3), **kw).images
    got = ours(generator=gen(3), **kw).images
    assert _max_diff(got, want) <= TOL


def test_sag_with_prompt_embeds_and_negative_prompt_matches_diffusers():
    comps = tiny_sd_components(0)
    ref = quiet(RefSAG(**comps))
    ours = quiet(StableDiffusionSAGPipeline(**comps))
    pe = torch.randn(2, 77, 32, generator=gen(5))
    ne = torch.randn(2, 77, 32, generator=gen(6))
    kw = dict(COMMON, prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, eta=0.5)
    want = ref(generator=gen(4), **kw).images
    got = ours(generator=gen(4), **kw).images
    assert _max_diff(got, want) <= TOL
    kw = dict(COMMON, negative_prompt=["blurry", "ugly"])
    assert _max_diff(ours(generator=gen(4), **kw).images, ref(generator=gen(4), **kw).images) <= TOL


def test_clip_skip_uses_the_earlier_hidden_layer():
    # diffusers' clip-skip path reads text_encoder.text_model, gone in transformers 5; ours works on both.
    comps = tiny_sd_components(0)
    ours = StableDiffusionSAGPipeline(**comps)
    te, tok = comps["text_encoder"], comps["tokenizer"]
    ids = tok("a cat", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    hidden = te(ids, output_hidden_states=True).hidden_states[-2]
    norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
    pe, _ = ours.encode_prompt("a cat", "cpu", 1, False, clip_skip=1)
    assert torch.allclose(pe, norm(hidden), atol=1e-6)
    assert not hasattr(te, "text_model") or hasattr(type(te), "text_model") or "text_model" in te._modules
    plain, _ = ours.encode_prompt("a cat", "cpu", 1, False)
    assert not torch.allclose(pe, plain)


def test_sag_pil_output_and_nsfw_flags_like_diffusers():
    comps = tiny_sd_components(0)
    ref = quiet(RefSAG(**comps))
    ours = quiet(StableDiffusionSAGPipeline(**comps))
    kw = dict(prompt="a cat", num_inference_steps=2, height=32, width=32)
    want = ref(generator=gen(0), **kw)
    got = ours(generator=gen(0), **kw)
    assert type(got).__name__ == "StableDiffusionPipelineOutput"
    assert got.nsfw_content_detected == want.nsfw_content_detected
    assert got.images[0].size == want.images[0].size == (32, 32)
    a = torch.tensor(list(got.images[0].getdata()), dtype=torch.float32)
    b = torch.tensor(list(want.images[0].getdata()), dtype=torch.float32)
    assert (a - b).abs().max() <= 1  # uint8 rounding
    images, nsfw = ours(generator=gen(0), return_dict=False, output_type="np", **kw)
    assert images.shape == (1, 32, 32, 3) and nsfw is None


def test_from_pipe_and_vae_slicing():
    comps = tiny_sd_components(0)
    sag = quiet(StableDiffusionSAGPipeline(**comps))
    pag = quiet(StableDiffusionPAGPipeline.from_pipe(sag))
    assert pag.unet is sag.unet
    back = quiet(StableDiffusionSAGPipeline.from_pipe(pag))
    assert isinstance(back, StableDiffusionSAGPipeline)
    sag.enable_vae_slicing()
    img = sag(
        "a cat", num_inference_steps=2, output_type="np", num_images_per_prompt=2, generator=gen(0)
    ).images
    sag.disable_vae_slicing()
    img2 = sag(
        "a cat", num_inference_steps=2, output_type="np", num_images_per_prompt=2, generator=gen(0)
    ).images
    assert abs(img - img2).max() < 1e-4


def test_encode_prompt_is_diffusers():
    comps = tiny_sd_components(0)
    ours = StableDiffusionSAGPipeline(**comps)
    ref = RefSAG(**comps)
    a = ours.encode_prompt("a cat", "cpu", 2, True, "ugly")
    b = ref.encode_prompt("a cat", "cpu", 2, True, "ugly")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_legacy_callback_is_called_like_diffusers():
    comps = tiny_sd_components(0)
    calls_ref, calls_ours = [], []
    kw = dict(prompt="a cat", num_inference_steps=4, output_type="latent", callback_steps=2)
    quiet(RefSAG(**comps))(callback=lambda i, t, x: calls_ref.append((i, int(t))), generator=gen(0), **kw)
    quiet(StableDiffusionSAGPipeline(**comps))(
        callback=lambda i, t, x: calls_ours.append((i, int(t))), generator=gen(0), **kw
    )
    assert calls_ours == calls_ref and len(calls_ours) == 2
