"""Fast tests of the tiny offline Stable Diffusion components."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionSAGPipeline,
    UNet2DModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from attnguide.tiny_models import (
    SCHEDULERS,
    make_scheduler,
    offline_clip_tokenizer,
    tiny_sd_components,
    tiny_unet_2d,
)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
COMPONENT_KEYS = {
    "vae",
    "text_encoder",
    "tokenizer",
    "unet",
    "scheduler",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_and_vocab(tmp_path):
    tok = offline_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2")
    assert len(vocab) == len(tok) == 2 * 256 + 2
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    assert "a" in vocab and "a</w>" in vocab
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_token_id == vocab["<|startoftext|>"]
    assert tok.eos_token_id == tok.pad_token_id == vocab["<|endoftext|>"]
    assert tok.model_max_length == 77


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "Hello, World! 123 ünïcode 猫 🐱", "x " * 200])
def test_tokenizer_pads_and_round_trips(prompt):
    tok = offline_clip_tokenizer()
    enc = tok(
        prompt,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = enc.input_ids[0]
    assert ids.shape == (tok.model_max_length,)
    assert int(ids.min()) >= 0 and int(ids.max()) < len(tok)
    assert int(ids[0]) == tok.bos_token_id
    assert tok.unk_token_id not in ids[1 : len(tok(prompt, truncation=True).input_ids) - 1].tolist()
    if len(prompt) < 70:
        # CLIP decoding turns every `</w>` into a space ("hello , world !"), so compare without spaces
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == prompt.lower().replace(" ", "")
        assert decoded.split() == tok.decode(ids[1:-1], skip_special_tokens=True).split()
        assert int(ids[-1]) == tok.pad_token_id


# --------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_scheduler_builds(name, prediction_type):
    if name == "lms" and not HAS_SCIPY:
        with pytest.raises(ImportError):
            make_scheduler(name, prediction_type)
        pytest.skip("LMSDiscreteScheduler needs scipy")
    sched = make_scheduler(name, prediction_type)
    assert isinstance(sched, SchedulerMixin)
    cfg = sched.config
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.beta_start == 0.00085 and cfg.beta_end == 0.012
    assert cfg.prediction_type == prediction_type
    assert cfg.get("clip_sample", False) is False
    if name.endswith("karras"):
        assert cfg.use_karras_sigmas is True
    sched.set_timesteps(2)
    assert len(sched.timesteps) >= 2


def test_unknown_scheduler_lists_names():
    with pytest.raises(ValueError, match=r"ddim.*euler_a"):
        make_scheduler("nope")


# --------------------------------------------------------------------------- SD components


def test_components_shape_and_sag_invariants():
    comps = tiny_sd_components(0)
    assert set(comps) == COMPONENT_KEYS
    assert comps["safety_checker"] is comps["feature_extractor"] is comps["image_encoder"] is None
    unet, te, tok = comps["unet"], comps["text_encoder"], comps["tokenizer"]
    attn1 = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    h = unet.config.attention_head_dim
    assert attn1.heads == (h if isinstance(h, int) else h[-1])
    assert unet.config.cross_attention_dim == te.config.hidden_size == 32
    assert te.config.vocab_size == len(tok)
    assert te.config.max_position_embeddings == tok.model_max_length
    assert te.config.eos_token_id == tok.eos_token_id
    assert te.config.pad_token_id == tok.pad_token_id
    assert te.config.bos_token_id == tok.bos_token_id
    assert 2 ** (len(comps["vae"].config.block_out_channels) - 1) == 2


def test_components_deterministic_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = tiny_sd_components(0), tiny_sd_components(0), tiny_sd_components(1)
    assert torch.equal(before, torch.get_rng_state())
    for key in ("unet", "vae", "text_encoder"):
        sa, sb = a[key].state_dict(), b[key].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a["unet"].conv_in.weight, c["unet"].conv_in.weight)


def test_components_options():
    comps = tiny_sd_components(
        3, prediction_type="v_prediction", scheduler="euler", cross_attention_dim=16, sample_size=8
    )
    assert comps["scheduler"].config.prediction_type == "v_prediction"
    assert type(comps["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert comps["unet"].config.cross_attention_dim == 16
    assert comps["text_encoder"].config.hidden_size == 16
    assert comps["unet"].config.sample_size == 8


def _run(pipe, output_type: str, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=2, output_type=output_type, generator=_gen(0), **kwargs).images


def test_sag_pipeline_runs():
    pipe = StableDiffusionSAGPipeline(**tiny_sd_components(0), requires_safety_checker=False)
    lat = _run(pipe, "latent")
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()
    img = _run(pipe, "np")
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0
    # SAG actually changes the result
    no_sag = _run(pipe, "latent", sag_scale=0.0)
    assert not torch.allclose(lat, no_sag)
    assert torch.equal(lat, _run(pipe, "latent"))


def test_pag_pipeline_runs():
    pipe = StableDiffusionPAGPipeline(
        **tiny_sd_components(0), pag_applied_layers="mid", requires_safety_checker=False
    )
    lat = _run(pipe, "latent")
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()
    img = _run(pipe, "np")
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert not torch.allclose(lat, _run(pipe, "latent", pag_scale=0.0))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_plain_pipeline_with_each_scheduler(name):
    if name == "lms" and not HAS_SCIPY:
        pytest.skip("LMSDiscreteScheduler needs scipy")
    pipe = StableDiffusionPipeline(**tiny_sd_components(0, scheduler=name), requires_safety_checker=False)
    lat = _run(pipe, "latent")
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()


# --------------------------------------------------------------------------- UNet2DModel


@pytest.mark.parametrize("class_conditional", [False, True])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_tiny_unet_2d_forward(class_conditional, learned_variance):
    unet = tiny_unet_2d(0, class_conditional=class_conditional, learned_variance=learned_variance)
    assert isinstance(unet, UNet2DModel)
    assert any(getattr(b, "attentions", None) for b in unet.down_blocks)
    x = torch.randn(2, 3, 16, 16, generator=_gen(1))
    kwargs = {"class_labels": torch.tensor([3, 10])} if class_conditional else {}
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), **kwargs).sample
    assert out.shape == (2, 6 if learned_variance else 3, 16, 16)
    assert torch.isfinite(out).all()
    again = tiny_unet_2d(0, class_conditional=class_conditional, learned_variance=learned_variance)
    assert torch.equal(unet.conv_in.weight, again.conv_in.weight)


def test_components_survive_save_and_reload(tmp_path):
    pipe = StableDiffusionSAGPipeline(**tiny_sd_components(0), requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    again = StableDiffusionSAGPipeline.from_pretrained(
        tmp_path, safety_checker=None, requires_safety_checker=False
    )
    assert again.unet.config.attention_head_dim == [2, 4]
    assert torch.equal(_run(pipe, "latent"), _run(again, "latent"))
