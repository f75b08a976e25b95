"""Tiny, fast, deterministic Stable Diffusion components for tests and demos.

Everything here is built offline from configs with random weights: no model hub
access is needed. The models are far too small to produce meaningful images, but
they exercise exactly the same code paths (cross-attention, self-attention in the
mid block, VAE decoding, schedulers) as the real Stable Diffusion 1.x checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .pipelines.schedulers import SCHEDULER_NAMES, scheduler_from_name

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "SCHEDULERS",
    "SD15_SCHEDULER_CONFIG",
    "make_scheduler",
    "offline_clip_tokenizer",
    "tiny_sd_components",
    "tiny_unet_2d",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Same as the real CLIP tokenizer; the tiny text encoder uses it as its number of positions.
MODEL_MAX_LENGTH = 77

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character mapping (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _byte_level_vocab() -> dict[str, int]:
    """Vocabulary laid out like CLIP's: 256 bytes, 256 bytes + ``</w>``, then the special tokens."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def offline_clip_tokenizer(
    directory: str | Path | None = None, *, model_max_length: int = MODEL_MAX_LENGTH
) -> CLIPTokenizer:
    """Build a byte-level CLIP tokenizer without network access.

    The vocabulary holds the 256 byte-level characters (each also with the ``</w>``
    end-of-word suffix) plus ``<|startoftext|>`` and ``<|endoftext|>``; there are no
    merges, so every prompt is tokenized character by character. The pad and unk
    tokens are ``<|endoftext|>`` as in CLIP. Files (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``) are written to ``directory``; if it is ``None`` they go
    to a temporary directory that is removed once the tokenizer is loaded.
    """
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="attnguide-clip-tok-") as tmp:
            return offline_clip_tokenizer(tmp, model_max_length=model_max_length)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _byte_level_vocab()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(path), model_max_length=model_max_length, **special)
    if tokenizer.convert_tokens_to_ids(EOS_TOKEN) != vocab[EOS_TOKEN] or len(tokenizer) != len(vocab):
        raise RuntimeError("offline CLIP tokenizer did not load the expected vocabulary")
    return tokenizer


# ---------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------

#: Scheduler settings of Stable Diffusion 1.5 (``scheduler/scheduler_config.json``).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


#: The scheduler names (attnguide's one registry, :data:`attnguide.pipelines.schedulers.SCHEDULER_NAMES`).
SCHEDULERS = SCHEDULER_NAMES


def make_scheduler(name: str, prediction_type: str = "epsilon") -> SchedulerMixin:
    """The scheduler called ``name`` (a key of :data:`SCHEDULERS`) with Stable Diffusion 1.5's noise
    schedule and ``prediction_type``; ValueError listing the names for an unknown one."""
    return scheduler_from_name(name, {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type})


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


_M = TypeVar("_M", bound=torch.nn.Module)


def _seeded(seed: int, build: Callable[[], _M]) -> _M:
    """Build a module right after ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def tiny_sd_components(
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    scheduler: str = "ddim",
    cross_attention_dim: int = 32,
    sample_size: int = 16,
) -> dict[str, Any]:
    """Return tiny random-weight components for any Stable Diffusion 1.x-style pipeline.

    Keys: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``,
    ``safety_checker``, ``feature_extractor`` and ``image_encoder`` (the last three
    ``None``). The UNet has two resolutions and a cross-attention mid block at
    ``sample_size // 2``; the VAE has scale factor 2, so the default image size is
    ``2 * sample_size`` pixels. Weights depend only on ``seed``.
    """
    sched = make_scheduler(scheduler, prediction_type)
    tokenizer = offline_clip_tokenizer()

    # NB: diffusers' UNet2DConditionModel uses `attention_head_dim` as the number of
    # heads. Keep it a *list* so the SAG pipeline (which checks `isinstance(h, list)`)
    # reads the mid block's head count from its last element.
    heads = [2, 4]
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=heads,
            norm_num_groups=32,
        ),
    )
    vae = _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=[32, 64],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=2 * sample_size,
        ),
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cross_attention_dim,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-05,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cross_attention_dim,
    )
    text_encoder = _seeded(seed, lambda: CLIPTextModel(text_config))
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": sched,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_unet_2d(
    seed: int = 0,
    *,
    class_conditional: bool = False,
    learned_variance: bool = False,
    sample_size: int = 16,
) -> UNet2DModel:
    """Return a tiny pixel-space :class:`diffusers.UNet2DModel` with self-attention blocks.

    ``class_conditional`` adds an embedding for 11 classes (label 10 is the null
    label for classifier-free guidance); ``learned_variance`` doubles the output
    channels (3 mean + 3 variance channels, as in guided-diffusion / iDDPM).
    """
    return _seeded(
        seed,
        lambda: UNet2DModel(
            sample_size=sample_size,
            in_channels=3,
            out_channels=6 if learned_variance else 3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
            num_class_embeds=11 if class_conditional else None,
        ),
    )
