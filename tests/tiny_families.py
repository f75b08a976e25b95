"""Tiny offline diffusers pipelines of many families, for running each family with plain diffusers,
diffusers' own PAG pipeline and attnguide.

Every builder in :data:`FAMILIES` returns a fresh spec (new random-weight models, built right after
``torch.manual_seed``, so two builds are identical)::

    {
        "components": constructor kwargs shared by the plain and the PAG pipeline,
        "pipeline": the plain diffusers pipeline class,
        "pag_pipeline": diffusers' PAG pipeline class, or None where diffusers has none,
        "call": call kwargs of a tiny run (2 denoising steps, latent output where that is safe),
        "cfg_arg": the call argument of the CFG weight ("guidance_scale"; Flux: "true_cfg_scale"),
        "cfg_scale": a CFG weight > 1 that works (None: the pipeline takes no guidance_scale),
        "cfg_off": the CFG weight that turns classifier-free guidance off (None: no such argument),
        "pag_without_cfg": whether diffusers' PAG pipeline runs with CFG off (False: only with CFG on),
        "separate_cfg": whether CFG comes as two denoiser calls per step (Flux, Wan),
    }

``call`` holds neither ``generator`` nor the CFG weight nor ``pag_scale``: the caller adds them
(:func:`cfg_kwargs`). Flux's ``call`` holds its distilled ``guidance_scale`` and a negative prompt.
Its tensors (init image, mask, control image, embeddings) are made deterministically. Sizes are
non-square where the pipeline allows it, so that a transposed attention map would show. Image-to-image
and inpainting runs schedule 4 steps at strength 0.5 (2 denoising steps). ``output_type`` is "latent"
except for DiT and DDPM (no latent output) and for sdxl_inpaint and sdxl_controlnet_img2img, whose
diffusers PAG pipelines leave their PAG attention processors on the UNet after a latent run ("pt").

:func:`build` makes the pipeline itself (progress bar off; everything is on the CPU in float32).

Families whose text encoder has no tokenizer that can be built offline (Kolors' ChatGLM) get their
text embeddings in ``call`` (computed with the family's own tiny text encoder) instead of a prompt; the
T5, BERT and Gemma tokenizers of PixArt-Sigma, HunyuanDiT and Sana are built offline from a character
vocabulary.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AnimateDiffPAGPipeline,
    AnimateDiffPipeline,
    AutoencoderDC,
    AutoencoderKL,
    ControlNetModel,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPAGPipeline,
    HunyuanDiTPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    MotionAdapter,
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPAGPipeline,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPAGInpaintPipeline,
    StableDiffusionControlNetPAGPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPAGImg2ImgPipeline,
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
    UNet2DConditionModel,
)

# Kolors needs sentencepiece only for its ChatGLM tokenizer, so diffusers' top-level names are dummies
# without it; the modules themselves import fine.
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel
from diffusers.pipelines.pag.pipeline_pag_kolors import KolorsPAGPipeline
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from attnguide.tiny_models import (
    SD15_SCHEDULER_CONFIG,
    make_scheduler,
    offline_clip_tokenizer,
    tiny_sd_components,
    tiny_unet_2d,
)

__all__ = ["FAMILIES", "NO_PAG", "build", "cfg_kwargs", "instantiate", "sdxl_components", "wan"]

PROMPT = "a cat"
STEPS = 2
CFG = 5.0
TEXT_DIM = 32  # hidden size of every tiny text encoder
SDXL_TIME_EMBED_DIM = 8

# SD 1.x / SDXL / Kolors / AnimateDiff / LCM: VAE factor 2, so 32 x 48 pixels = 16 x 24 latents.
H, W = 32, 48


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build a module right after ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval() if isinstance(module, torch.nn.Module) else module


# --------------------------------------------------------------------------------------------- inputs


def _image(seed: int, height: int = H, width: int = W) -> torch.Tensor:
    """A random RGB image in [0, 1], shape (1, 3, height, width)."""
    return _seeded(seed, lambda: torch.rand(1, 3, height, width))


def _mask(height: int = H, width: int = W) -> torch.Tensor:
    """A binary inpainting mask, shape (1, 1, height, width): 1 (repaint) on a centred rectangle."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1.0
    return mask


# --------------------------------------------------------------------------------------------- models


def _vae(seed: int = 0, block_out: tuple[int, ...] = (32, 64), groups: int = 32, **extra) -> AutoencoderKL:
    """A tiny KL VAE with scale factor ``2 ** (len(block_out) - 1)``."""
    levels = len(block_out)
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=list(block_out),
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
            latent_channels=4,
            norm_num_groups=groups,
            **extra,
        ),
    )


def _sd_unet(seed: int = 0, in_channels: int = 4, out_channels: int = 4, **extra) -> UNet2DConditionModel:
    """The UNet of :func:`attnguide.tiny_models.tiny_sd_components` with other channel counts."""
    config = dict(
        sample_size=16,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=[2, 4],
        norm_num_groups=32,
    )
    config.update(extra)
    return _seeded(seed, lambda: UNet2DConditionModel(**config))


def _wake_controlnet(controlnet: ControlNetModel, seed: int) -> ControlNetModel:
    """Give the zero-initialised convolutions of a ControlNet random weights, so that its control image
    and residuals actually change the UNet's output."""
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.1)
            torch.nn.init.normal_(conv.bias, std=0.01)
    return controlnet


def _sd_controlnet(seed: int = 0) -> ControlNetModel:
    controlnet = _seeded(
        seed,
        lambda: ControlNetModel(
            in_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=[2, 4],
            norm_num_groups=32,
            conditioning_embedding_out_channels=(16, 32),  # one stride-2 conv: the VAE's factor 2
        ),
    )
    return _wake_controlnet(controlnet, seed + 100)


def _sd(unet: UNet2DConditionModel | None = None, **extra) -> dict[str, Any]:
    """SD 1.x components (:func:`tiny_sd_components`), optionally with another UNet."""
    comps = tiny_sd_components(0)
    if unet is not None:
        comps["unet"] = unet
    comps.update(extra)
    return comps


# SDXL: the models of tests/test_sdxl.py (diffusers' own SDXL test sizes), with a choice of in_channels.
_SDXL_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + TEXT_DIM,
    cross_attention_dim=2 * TEXT_DIM,
    norm_num_groups=1,
)


def _clip_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-05,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_DIM,
    )


def sdxl_components(in_channels: int = 4, controlnet: bool = False) -> dict[str, Any]:
    """Tiny SDXL components (a ControlNet too with ``controlnet``), shared by tests/test_sdxl.py."""
    tok, tok_2 = offline_clip_tokenizer(), offline_clip_tokenizer()
    config = _clip_config(tok)
    unet = _seeded(
        0,
        lambda: UNet2DConditionModel(
            **_SDXL_UNET,
            in_channels=in_channels,
            out_channels=4,
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
    )
    comps: dict[str, Any] = {
        "vae": _vae(0, sample_size=H),
        "text_encoder": _seeded(0, lambda: CLIPTextModel(config)),
        "text_encoder_2": _seeded(1, lambda: CLIPTextModelWithProjection(config)),
        "tokenizer": tok,
        "tokenizer_2": tok_2,
        "unet": unet,
        "scheduler": make_scheduler("ddim"),
        "image_encoder": None,
        "feature_extractor": None,
    }
    if controlnet:
        cn = _seeded(
            0,
            lambda: ControlNetModel(
                **{k: v for k, v in _SDXL_UNET.items() if k != "sample_size"},
                in_channels=4,
                conditioning_embedding_out_channels=(16, 32),
            ),
        )
        comps["controlnet"] = _wake_controlnet(cn, 100)
    return comps


def _spec(
    components,
    pipeline,
    pag_pipeline,
    call,
    cfg_scale=CFG,
    cfg_off=1.0,
    pag_without_cfg=True,
    cfg_arg="guidance_scale",
    separate_cfg=False,
) -> dict[str, Any]:
    return {
        "components": components,
        "pipeline": pipeline,
        "pag_pipeline": pag_pipeline,
        "call": call,
        "cfg_arg": cfg_arg,
        "cfg_scale": cfg_scale,
        "cfg_off": cfg_off,
        "pag_without_cfg": pag_without_cfg and pag_pipeline is not None,
        "separate_cfg": separate_cfg,
    }


_LATENT = dict(num_inference_steps=STEPS, output_type="latent")
# img2img-like runs: 4 scheduled steps at strength 0.5 = 2 denoising steps
_IMG2IMG = dict(num_inference_steps=2 * STEPS, strength=0.5, output_type="latent")


# ------------------------------------------------------------------------------------------ SD 1.x


def sd_controlnet() -> dict[str, Any]:
    return _spec(
        _sd(controlnet=_sd_controlnet()),
        StableDiffusionControlNetPipeline,
        StableDiffusionControlNetPAGPipeline,
        dict(prompt=PROMPT, image=_image(2), height=H, width=W, **_LATENT),
    )


def sd_img2img() -> dict[str, Any]:
    return _spec(
        _sd(),
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPAGImg2ImgPipeline,
        dict(prompt=PROMPT, image=_image(1), **_IMG2IMG),
    )


def _inpaint_call(**extra) -> dict[str, Any]:
    return dict(prompt=PROMPT, image=_image(1), mask_image=_mask(), height=H, width=W, **_IMG2IMG, **extra)


def sd_inpaint() -> dict[str, Any]:
    """The standard 9-channel inpainting UNet (4 latents + 1 mask + 4 masked-image latents)."""
    return _spec(
        _sd(_sd_unet(in_channels=9)),
        StableDiffusionInpaintPipeline,
        StableDiffusionPAGInpaintPipeline,
        _inpaint_call(),
    )


def sd_inpaint4() -> dict[str, Any]:
    """A 4-channel (text-to-image) UNet with the inpaint pipeline: the known region is re-noised and pasted
    back after every step."""
    return _spec(_sd(), StableDiffusionInpaintPipeline, StableDiffusionPAGInpaintPipeline, _inpaint_call())


def sd_controlnet_inpaint() -> dict[str, Any]:
    """ControlNet inpainting with the 9-channel UNet (the ControlNet itself sees the 4 noisy latents)."""
    return _spec(
        _sd(_sd_unet(in_channels=9), controlnet=_sd_controlnet()),
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionControlNetPAGInpaintPipeline,
        _inpaint_call(control_image=_image(2)),
    )


# --------------------------------------------------------------------------------------------- SDXL


def sdxl_img2img() -> dict[str, Any]:
    return _spec(
        sdxl_components(),
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPAGImg2ImgPipeline,
        dict(prompt=PROMPT, image=_image(1), **_IMG2IMG),
    )


# StableDiffusionXLPAGInpaintPipeline and StableDiffusionXLControlNetPAGImg2ImgPipeline (diffusers 0.42)
# return early for output_type="latent" without restoring the UNet's attention processors, so that the PAG
# processors stay on the shared UNet and perturb every later run: these two families decode ("pt").
_DECODED = dict(output_type="pt")


def sdxl_inpaint() -> dict[str, Any]:
    return _spec(
        sdxl_components(in_channels=9),
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPAGInpaintPipeline,
        _inpaint_call() | _DECODED,
    )


def sdxl_controlnet() -> dict[str, Any]:
    return _spec(
        sdxl_components(controlnet=True),
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLControlNetPAGPipeline,
        dict(prompt=PROMPT, image=_image(2), height=H, width=W, **_LATENT),
    )


def sdxl_controlnet_img2img() -> dict[str, Any]:
    return _spec(
        sdxl_components(controlnet=True),
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetPAGImg2ImgPipeline,
        dict(prompt=PROMPT, image=_image(1), control_image=_image(2), height=H, width=W, **_IMG2IMG)
        | _DECODED,
    )


# -------------------------------------------------------------------------------------- AnimateDiff


def animatediff() -> dict[str, Any]:
    """AnimateDiff: the SD 1.x UNet + a tiny MotionAdapter (the pipeline turns them into a
    UNetMotionModel); 2 frames, latents (batch, channels, frames, height, width)."""
    adapter = _seeded(
        0,
        lambda: MotionAdapter(
            block_out_channels=(32, 64),
            motion_layers_per_block=1,
            motion_norm_num_groups=32,
            motion_num_attention_heads=2,
            motion_max_seq_length=32,
        ),
    )
    comps = _sd(motion_adapter=adapter)
    del comps["safety_checker"]  # AnimateDiff takes none
    return _spec(
        comps,
        AnimateDiffPipeline,
        AnimateDiffPAGPipeline,
        dict(prompt=PROMPT, num_frames=2, height=H, width=W, **_LATENT),
    )


# ----------------------------------------------------------------------------- T5 / BERT tokenizers

_CHARS = sorted(set(string.printable) - set(string.whitespace))


def _t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """A character-level T5 (unigram) tokenizer built offline: pad 0, eos 1, unk 2."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _bert_tokenizer(model_max_length: int) -> BertTokenizer:
    """A character-level BERT (WordPiece) tokenizer built offline."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for prefix in ("", "##"):
        for c in _CHARS:
            vocab.setdefault(prefix + c.lower(), len(vocab))
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)


def _t5_encoder(tokenizer: T5Tokenizer, seed: int = 0) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))


# ------------------------------------------------------------------------------------ PixArt-Sigma


def pixart_sigma() -> dict[str, Any]:
    """PixArt-Sigma: a 2-block PixArtTransformer2DModel (learned sigma) with a tiny T5 encoder and an
    offline T5 tokenizer. 16 x 24 pixels = 8 x 12 latents = 4 x 6 patches."""
    tokenizer = _t5_tokenizer(model_max_length=300)
    transformer = _seeded(
        0,
        lambda: PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=TEXT_DIM,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
    )
    comps = {
        "tokenizer": tokenizer,
        "text_encoder": _t5_encoder(tokenizer),
        "vae": _vae(0, sample_size=16),
        "transformer": transformer,
        "scheduler": make_scheduler("ddim"),
    }
    call = dict(prompt=PROMPT, height=16, width=24, use_resolution_binning=False, max_sequence_length=16)
    return _spec(comps, PixArtSigmaPipeline, PixArtSigmaPAGPipeline, dict(call, **_LATENT))


# -------------------------------------------------------------------------------------- HunyuanDiT


_DDPM_SD_BETAS = {k: SD15_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end")}
_DDPM_SD_BETAS.update(beta_schedule="scaled_linear", steps_offset=1)


def hunyuandit() -> dict[str, Any]:
    """HunyuanDiT: a 2-block HunyuanDiT2DModel (rotary image embeddings, learned sigma) with a tiny BERT
    (77 tokens) and a tiny T5 (256 tokens), both with offline tokenizers. The pipeline sizes its rotary
    grid as ``height // 8 // patch_size`` whatever the VAE, so the VAE here has the real factor 8:
    64 x 96 pixels = 8 x 12 latents = 4 x 6 patches."""
    tokenizer = _bert_tokenizer(model_max_length=77)
    tokenizer_2 = _t5_tokenizer(model_max_length=256)
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=77,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformer = _seeded(
        0,
        lambda: HunyuanDiT2DModel(
            sample_size=16,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            in_channels=4,
            cross_attention_dim=TEXT_DIM,
            cross_attention_dim_t5=TEXT_DIM,
            pooled_projection_dim=16,
            hidden_size=24,
            activation_fn="gelu-approximate",
        ),
    )
    comps = {
        "vae": _vae(0, (16, 16, 16, 16), groups=8, sample_size=64),
        "text_encoder": _seeded(0, lambda: BertModel(bert_config, add_pooling_layer=False)),
        "tokenizer": tokenizer,
        "transformer": transformer,
        "scheduler": DDPMScheduler(**_DDPM_SD_BETAS),
        "safety_checker": None,
        "feature_extractor": None,
        "text_encoder_2": _t5_encoder(tokenizer_2, seed=1),
        "tokenizer_2": tokenizer_2,
    }
    call = dict(prompt=PROMPT, height=64, width=96, use_resolution_binning=False, **_LATENT)
    # HunyuanDiTPAGPipeline (diffusers 0.42) repeats the size/style conditioning 3 times whenever PAG is on,
    # also without CFG, where the batch is 2: PAG then fails in the transformer's embedding.
    return _spec(comps, HunyuanDiTPipeline, HunyuanDiTPAGPipeline, call, pag_without_cfg=False)


# ------------------------------------------------------------------------------------------- Kolors

_CHATGLM_VOCAB = 128
_KOLORS_MAX_LENGTH = 256  # the pipeline pads prompts to 256 tokens


def _chatglm(seed: int = 0) -> ChatGLMModel:
    """A 2-layer ChatGLM encoder. The model builds its layers with ``skip_init`` (uninitialised memory),
    so every weight is set here: embeddings N(0, 1), linear layers as torch.nn.Linear, norms to one."""
    config = ChatGLMConfig(
        num_layers=2,
        padded_vocab_size=_CHATGLM_VOCAB,
        hidden_size=TEXT_DIM,
        ffn_hidden_size=37,
        kv_channels=8,
        num_attention_heads=4,
        seq_length=_KOLORS_MAX_LENGTH,
        multi_query_attention=True,
        multi_query_group_num=2,
        original_rope=True,
        torch_dtype=torch.float32,
    )

    def make() -> ChatGLMModel:
        model = ChatGLMModel(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif "word_embeddings" in name:
                    torch.nn.init.normal_(p)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        return model

    return _seeded(seed, make)


@torch.no_grad()
def _chatglm_embeds(text_encoder: ChatGLMModel, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled_prompt_embeds)`` as KolorsPipeline.encode_prompt makes them, from a
    character-level stand-in for the ChatGLM tokenizer (left padding, as ChatGLM's)."""
    ids = [1] + [3 + ord(c) % (_CHATGLM_VOCAB - 3) for c in prompt]
    n = len(ids)
    pad = _KOLORS_MAX_LENGTH - n
    input_ids = torch.tensor([[0] * pad + ids])
    attention_mask = torch.tensor([[0] * pad + [1] * n])
    position_ids = torch.tensor([[0] * pad + list(range(n))])
    out = text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
    )
    return out.hidden_states[-2].permute(1, 0, 2).clone(), out.hidden_states[-1][-1, :, :].clone()


def kolors() -> dict[str, Any]:
    """Kolors: an SDXL-style UNet whose 32-wide ChatGLM text features go through ``encoder_hid_proj``
    (``text_proj``, as in the real model) to 64-wide cross-attention. There is no offline ChatGLM
    tokenizer (it needs sentencepiece and a model file), so ``tokenizer`` is None and ``call`` carries
    the prompt and negative-prompt embeddings, computed with the tiny ChatGLM encoder."""
    text_encoder = _chatglm()
    unet = _seeded(
        0,
        lambda: UNet2DConditionModel(
            **_SDXL_UNET,
            in_channels=4,
            out_channels=4,
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            encoder_hid_dim_type="text_proj",
            encoder_hid_dim=TEXT_DIM,
        ),
    )
    comps = {
        "vae": _vae(0, sample_size=H),
        "text_encoder": text_encoder,
        "tokenizer": None,
        "unet": unet,
        "scheduler": make_scheduler("euler"),
        "image_encoder": None,
        "feature_extractor": None,
    }
    embeds, pooled = _chatglm_embeds(text_encoder, PROMPT)
    neg_embeds, neg_pooled = _chatglm_embeds(text_encoder, "")
    call = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg_embeds,
        negative_pooled_prompt_embeds=neg_pooled,
        height=H,
        width=W,
        **_LATENT,
    )
    return _spec(comps, KolorsPipeline, KolorsPAGPipeline, call)


# ----------------------------------------------------------------------------------------- upscalers


def sd_upscale() -> dict[str, Any]:
    """The x4 upscaler: the UNet sees 4 noisy latents + the 3-channel (noised) low-res image and the
    noise level as its class label; the VAE has factor 4 and scaling factor 0.08333, as the real one.
    A 16 x 24 image gives 16 x 24 latents (64 x 96 pixels once decoded)."""
    unet = _sd_unet(in_channels=7, out_channels=4, num_class_embeds=1000)
    comps = {
        "vae": _vae(0, (32, 32, 64), sample_size=64, scaling_factor=0.08333),
        "text_encoder": tiny_sd_components(0)["text_encoder"],
        "tokenizer": offline_clip_tokenizer(),
        "unet": unet,
        "low_res_scheduler": DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        "scheduler": make_scheduler("ddim", "v_prediction"),
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": None,
    }
    call = dict(prompt=PROMPT, image=_image(1, 16, 24), noise_level=20, **_LATENT)
    return _spec(comps, StableDiffusionUpscalePipeline, None, call)


def sd_latent_upscale() -> dict[str, Any]:
    """The x2 latent upscaler: a K-diffusion style UNet (K blocks, Fourier time embedding, no mid block)
    that sees 4 noisy latents + 4 low-res latents and returns 4 + 1 channels (the pipeline drops the
    last), conditioned through ``timestep_cond`` on 128 noise-level features + the 32-wide pooled text
    embedding. K blocks only fit together when the last two widths equal the time embedding width (twice
    the first width), hence widths 32, 64, 64. A 16 x 24 image = 8 x 12 latents becomes 16 x 24 latents."""
    unet = _seeded(
        0,
        lambda: UNet2DConditionModel(
            sample_size=16,
            act_fn="gelu",
            attention_head_dim=8,
            norm_num_groups=None,
            block_out_channels=[32, 64, 64],
            time_cond_proj_dim=128 + TEXT_DIM,
            conv_in_kernel=1,
            conv_out_kernel=1,
            cross_attention_dim=TEXT_DIM,
            down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
            in_channels=8,
            mid_block_type=None,
            only_cross_attention=False,
            out_channels=5,
            resnet_time_scale_shift="scale_shift",
            time_embedding_type="fourier",
            timestep_post_act="gelu",
            up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
        ),
    )
    sd = tiny_sd_components(0)
    comps = {
        "vae": sd["vae"],
        "text_encoder": sd["text_encoder"],
        "tokenizer": sd["tokenizer"],
        "unet": unet,
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="sample"
        ),
    }
    call = dict(prompt=PROMPT, image=_image(1, 16, 24), **_LATENT)
    return _spec(comps, StableDiffusionLatentUpscalePipeline, None, call)


# ---------------------------------------------------------------------------------- flow matching


def sd3() -> dict[str, Any]:
    """Stable Diffusion 3: a 3-block SD3Transformer2DModel (joint text + image attention) with two tiny
    CLIP encoders, a tiny T5 and FlowMatchEulerDiscreteScheduler (shift 3). No SD3.5 dual-attention block:
    diffusers' SD3 PAG processor fails on its image-only second attention."""
    tok, tok_2 = offline_clip_tokenizer(), offline_clip_tokenizer()
    config = _clip_config(tok)
    t5_tok = _t5_tokenizer(32)
    transformer = _seeded(
        0,
        lambda: SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=2 * TEXT_DIM,
            out_channels=4,
            pos_embed_max_size=32,
        ),
    )
    comps = {
        "transformer": transformer,
        "vae": _vae(0, sample_size=H, shift_factor=0.0),
        "text_encoder": _seeded(0, lambda: CLIPTextModelWithProjection(config)),
        "text_encoder_2": _seeded(1, lambda: CLIPTextModelWithProjection(config)),
        "text_encoder_3": _t5_encoder(t5_tok),
        "tokenizer": tok,
        "tokenizer_2": tok_2,
        "tokenizer_3": t5_tok,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    call = dict(prompt=PROMPT, height=H, width=W, max_sequence_length=32, **_LATENT)
    return _spec(comps, StableDiffusion3Pipeline, StableDiffusion3PAGPipeline, call)


def sd3_img2img() -> dict[str, Any]:
    """SD3 image-to-image on the :func:`sd3` components."""
    spec = sd3()
    call = dict(prompt=PROMPT, image=_image(3), max_sequence_length=32, **_IMG2IMG)
    pipes = (StableDiffusion3Img2ImgPipeline, StableDiffusion3PAGImg2ImgPipeline)
    return _spec(spec["components"], *pipes, call)


def flux() -> dict[str, Any]:
    """Flux (dev-like: guidance-distilled, ``guidance_embeds``): a FluxTransformer2DModel with 2 double-
    and 2 single-stream blocks on packed 2x2 latents, a tiny CLIP and T5, FlowMatchEulerDiscreteScheduler.
    CFG is ``true_cfg_scale`` with a negative prompt (two transformer calls per step); diffusers has no
    Flux PAG pipeline. 32 x 48 pixels = 16 x 24 latents = 8 x 12 tokens."""
    tok = offline_clip_tokenizer()
    t5_tok = _t5_tokenizer(16)
    transformer = _seeded(
        0,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
    )
    comps = {
        "transformer": transformer,
        "vae": _vae(0, sample_size=H, shift_factor=0.0),
        "text_encoder": _seeded(0, lambda: CLIPTextModel(_clip_config(tok))),
        "text_encoder_2": _t5_encoder(t5_tok),
        "tokenizer": tok,
        "tokenizer_2": t5_tok,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }
    call = dict(
        prompt=PROMPT,
        negative_prompt="blurry",
        height=H,
        width=W,
        guidance_scale=3.5,
        max_sequence_length=16,
        **_LATENT,
    )
    return _spec(comps, FluxPipeline, None, call, cfg_scale=4.0, cfg_arg="true_cfg_scale", separate_cfg=True)


def flux_img2img() -> dict[str, Any]:
    """Flux image-to-image on the :func:`flux` components."""
    spec = flux()
    call = dict(spec["call"], image=_image(3), **_IMG2IMG)
    for key in ("height", "width"):
        call.pop(key)
    return _spec(
        spec["components"],
        FluxImg2ImgPipeline,
        None,
        call,
        cfg_scale=4.0,
        cfg_arg="true_cfg_scale",
        separate_cfg=True,
    )


# --------------------------------------------------------------------------------------------- Sana


def _gemma_tokenizer(model_max_length: int) -> GemmaTokenizer:
    """A character-level Gemma (BPE, no merges) tokenizer built offline: pad 0, eos 1, bos 2 (prepended,
    as the real Gemma tokenizer does, so that an empty prompt still has one attended token), unk 3."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"]
    vocab = {tok: i for i, tok in enumerate(specials + _CHARS)}
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, model_max_length=model_max_length)


def sana() -> dict[str, Any]:
    """Sana: a 2-block SanaTransformer2DModel (linear self-attention, SanaLinearAttnProcessor2_0, no
    positional embedding; patch size 2) with a tiny Gemma2 encoder, an offline Gemma tokenizer, the tiny
    AutoencoderDC of diffusers' Sana tests (factor 2, 4 latent channels) and FlowMatchEulerDiscreteScheduler
    (shift 7, as diffusers' tests). Prompts use 16 tokens and no complex human instruction. The pipeline
    wants sizes divisible by 32: 32 x 64 pixels = 16 x 32 latents = 8 x 16 patches."""
    tokenizer = _gemma_tokenizer(model_max_length=64)
    gemma_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    transformer = _seeded(
        0,
        lambda: SanaTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=TEXT_DIM,
            sample_size=16,
        ),
    )
    vae = _seeded(
        0,
        lambda: AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        ),
    )
    comps = {
        "tokenizer": tokenizer,
        "text_encoder": _seeded(0, lambda: Gemma2Model(gemma_config)),
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
    }
    call = dict(
        prompt=PROMPT,
        height=32,
        width=64,
        use_resolution_binning=False,
        max_sequence_length=16,
        complex_human_instruction=None,
        **_LATENT,
    )
    return _spec(comps, SanaPipeline, SanaPAGPipeline, call)


# ------------------------------------------------------------------------------- LCM, DiT and DDPM


def lcm() -> dict[str, Any]:
    """Latent consistency model: no classifier-free guidance batch; ``guidance_scale`` goes into the UNet
    as a guidance embedding (``time_cond_proj_dim``), so "off" here is just another conditioning."""
    unet = _sd_unet(time_cond_proj_dim=32)
    scheduler = LCMScheduler(
        **{k: SD15_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end")},
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        original_inference_steps=50,
    )
    comps = _sd(unet, scheduler=scheduler)
    call = dict(prompt=PROMPT, height=H, width=W, **_LATENT)
    return _spec(comps, LatentConsistencyModelPipeline, None, call, cfg_scale=8.5)


def dit() -> dict[str, Any]:
    """DiT: a 3-block class-conditional DiTTransformer2DModel with learned sigma (8 output channels) on
    8 x 8 latents; ``output_type`` "pt" (the pipeline has no latent output)."""
    transformer = _seeded(
        0,
        lambda: DiTTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=3,
            num_attention_heads=2,
            attention_head_dim=8,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
        ),
    )
    comps = {"transformer": transformer, "vae": _vae(0, sample_size=16), "scheduler": make_scheduler("ddim")}
    call = dict(class_labels=[1], num_inference_steps=STEPS, output_type="pt")
    return _spec(comps, DiTPipeline, None, call, cfg_scale=4.0)


def ddpm() -> dict[str, Any]:
    """DDPM in pixel space (:func:`attnguide.tiny_models.tiny_unet_2d`, 16 x 16): no guidance argument."""
    comps = {"unet": tiny_unet_2d(0), "scheduler": DDPMScheduler()}
    call = dict(batch_size=1, num_inference_steps=STEPS, output_type="pt")
    return _spec(comps, DDPMPipeline, None, call, cfg_scale=None, cfg_off=None)


# ---------------------------------------------------------------------------------------------- Wan


def _wan(prompts: int) -> dict[str, Any]:
    """Wan 2.1 text-to-video: a WanTransformer3DModel (2 blocks, patch (1, 2, 2)) on a tiny
    AutoencoderKLWan, UniPC flow scheduler. CFG comes as two transformer calls per step (conditional,
    then unconditional with the negative prompt's embeddings). The text embeddings are given (its UMT5
    prompt cleaning needs ftfy), ``prompts`` of them. 32 x 48 pixels, 9 frames = 3 x 4 x 6 latents =
    3 frames of 2 x 3 tokens in one sequence."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    vae = _seeded(
        0,
        lambda: AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
    )
    transformer = _seeded(
        0,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
    )
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    comps = dict(
        vae=vae.eval(), transformer=transformer.eval(), scheduler=sched, tokenizer=None, text_encoder=None
    )
    g = torch.Generator().manual_seed(1)
    call = dict(
        prompt_embeds=torch.randn(prompts, 16, TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(prompts, 16, TEXT_DIM, generator=g),
        height=H,
        width=W,
        num_frames=9,
        **_LATENT,
    )
    return _spec(comps, WanPipeline, None, call, separate_cfg=True)


def wan() -> dict[str, Any]:
    return _wan(1)


def wan_two_prompts() -> dict[str, Any]:
    return _wan(2)


# ------------------------------------------------------------------------------------------ CogView4


def cogview4() -> dict[str, Any]:
    """CogView4: a CogView4Transformer2DModel (2 blocks, joint attention with the text first, blocks
    returning (image, text)), the SD-style tiny VAE, a dynamic-shift flow scheduler. CFG comes as two
    transformer calls per step. Text embeddings are given (its GLM tokenizer is on the hub only), two
    prompts' worth. 32 x 48 pixels = 16 x 24 latents = 8 x 12 tokens."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel

    transformer = _seeded(
        0,
        lambda: CogView4Transformer2DModel(
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=4,
            num_attention_heads=4,
            out_channels=4,
            text_embed_dim=TEXT_DIM,
            time_embed_dim=8,
            condition_dim=4,
        ),
    )
    sched = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    comps = dict(
        transformer=transformer.eval(), vae=_vae(0), scheduler=sched, tokenizer=None, text_encoder=None
    )
    g = torch.Generator().manual_seed(1)
    call = dict(
        prompt_embeds=torch.randn(2, 16, TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(2, 16, TEXT_DIM, generator=g),
        height=H,
        width=W,
        **_LATENT,
    )
    return _spec(comps, CogView4Pipeline, None, call, separate_cfg=True)


# ------------------------------------------------------------------------------------------- Lumina2


def lumina2() -> dict[str, Any]:
    """Lumina2: a Lumina2Transformer2DModel (2 noise- and 2 caption-refiner blocks, 3 trunk blocks over
    [caption, image] in one sequence), the SD-style tiny VAE, a flow scheduler. CFG comes as two
    transformer calls per step. Text embeddings are given (its Gemma text encoder is large), two
    prompts' worth. 32 x 48 pixels = 4 x 6 latents (the pipeline divides by 8) = 2 x 3 tokens."""
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    transformer = _seeded(
        0,
        lambda: Lumina2Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            hidden_size=8,
            num_layers=3,
            num_attention_heads=1,
            num_kv_heads=1,
            multiple_of=16,
            axes_dim_rope=[4, 2, 2],
            cap_feat_dim=8,
        ),
    )
    comps = dict(
        transformer=transformer.eval(),
        vae=_vae(0),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        tokenizer=None,
        text_encoder=None,
    )
    g = torch.Generator().manual_seed(1)
    call = dict(
        prompt_embeds=torch.randn(2, 16, 8, generator=g),
        negative_prompt_embeds=torch.randn(2, 16, 8, generator=g),
        prompt_attention_mask=torch.ones(2, 16, dtype=torch.bool),
        negative_prompt_attention_mask=torch.ones(2, 16, dtype=torch.bool),
        height=H,
        width=W,
        **_LATENT,
    )
    return _spec(comps, Lumina2Pipeline, None, call, separate_cfg=True)


# ------------------------------------------------------------------------------------------ AuraFlow


def auraflow() -> dict[str, Any]:
    """AuraFlow: an AuraFlowTransformer2DModel (one joint MMDiT block returning (text, image), three
    single-stream blocks over [registers + text, image]), the SD-style tiny VAE, a flow scheduler; CFG
    batched [uncond, cond]. Text embeddings are given (its UMT5 encoder is large), one prompt.
    32 x 48 pixels = 16 x 24 latents = 8 x 12 tokens."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    transformer = _seeded(
        0,
        lambda: AuraFlowTransformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=1,
            num_single_dit_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=TEXT_DIM,
            out_channels=4,
            pos_embed_max_size=256,
        ),
    )
    with torch.no_grad():  # its random adaLN gates are tiny: wake the blocks up
        for block in [*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks]:
            for norm in (block.norm1, getattr(block, "norm1_context", None)):
                if norm is not None:
                    norm.linear.weight.mul_(30.0)
    comps = dict(
        transformer=transformer.eval(),
        vae=_vae(0),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        tokenizer=None,
        text_encoder=None,
    )
    g = torch.Generator().manual_seed(1)
    call = dict(
        prompt_embeds=torch.randn(1, 16, TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(1, 16, TEXT_DIM, generator=g),
        prompt_attention_mask=torch.ones(1, 16),
        negative_prompt_attention_mask=torch.ones(1, 16),
        height=H,
        width=W,
        **_LATENT,
    )
    return _spec(comps, AuraFlowPipeline, None, call)


#: The families diffusers has no PAG pipeline for.
NO_PAG = frozenset(
    {
        "sd_upscale",
        "sd_latent_upscale",
        "lcm",
        "dit",
        "ddpm",
        "flux",
        "flux_img2img",
        "wan",
        "wan_two_prompts",
        "cogview4",
        "lumina2",
        "auraflow",
    }
)

#: family name -> builder of its spec (see the module docstring), in priority order.
FAMILIES: dict[str, Callable[[], dict[str, Any]]] = {
    "sd_controlnet": sd_controlnet,
    "sd_img2img": sd_img2img,
    "sd_inpaint": sd_inpaint,
    "sd_inpaint4": sd_inpaint4,
    "sd_controlnet_inpaint": sd_controlnet_inpaint,
    "sdxl_img2img": sdxl_img2img,
    "sdxl_inpaint": sdxl_inpaint,
    "sdxl_controlnet": sdxl_controlnet,
    "sdxl_controlnet_img2img": sdxl_controlnet_img2img,
    "animatediff": animatediff,
    "pixart_sigma": pixart_sigma,
    "hunyuandit": hunyuandit,
    "kolors": kolors,
    "sd_upscale": sd_upscale,
    "sd_latent_upscale": sd_latent_upscale,
    "sd3": sd3,
    "sd3_img2img": sd3_img2img,
    "flux": flux,
    "flux_img2img": flux_img2img,
    "sana": sana,
    "lcm": lcm,
    "dit": dit,
    "ddpm": ddpm,
    "wan": wan,
    "wan_two_prompts": wan_two_prompts,
    "cogview4": cogview4,
    "lumina2": lumina2,
    "auraflow": auraflow,
}


def cfg_kwargs(spec: dict[str, Any], cfg: bool) -> dict[str, float]:
    """The call keyword that turns the family's classifier-free guidance on (``cfg``) or off; {} for a
    pipeline without one."""
    scale = spec["cfg_scale"] if cfg else spec["cfg_off"]
    return {} if scale is None else {spec["cfg_arg"]: scale}


def instantiate(spec: dict[str, Any], pag: bool = False, **component_overrides):
    """The pipeline of a family ``spec`` (plain, or diffusers' PAG one), progress bar off."""
    cls = spec["pag_pipeline"] if pag else spec["pipeline"]
    if cls is None:
        raise ValueError(f"diffusers has no PAG pipeline for {spec['pipeline'].__name__}")
    pipe = cls(**{**spec["components"], **component_overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(name: str, pag: bool = False, **component_overrides):
    """The pipeline of family ``name`` (a key of :data:`FAMILIES`) with freshly built models, on the CPU in
    float32; ``pag`` picks diffusers' PAG pipeline. ``component_overrides`` replace or add constructor
    kwargs (e.g. ``scheduler=...`` or, with ``pag``, ``pag_applied_layers=...``)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return instantiate(FAMILIES[name](), pag, **component_overrides)
