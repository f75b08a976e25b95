"""NAG (Normalized Attention Guidance): its formula against the authors' code, and tiny SDXL and SD3
pipelines guided by ``guide(pipe, nag=NAG(...))`` against the authors' processors (``nag/attention_nag.py``,
``nag/attention_joint_nag.py`` of ChenDarYen/Normalized-Attention-Guidance, transcribed here as the
reference, with their pipelines' batch layout: the NAG negative prompt appended to the text batch, the
latents not), CFG off (an explicit negative prompt) and on (CFG's negative prompt), within 1e-5; scale
1e-6 reproduces the unguided run; refusals without text or without a negative prompt."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from tiny_families import FAMILIES, instantiate, sdxl_components

import attnguide
from attnguide import NAG
from attnguide.engine.terms import nag_mix

PHI, TAU, ALPHA = 2.0, 1.5, 0.5  # tau low enough that the cap acts on tiny models


def _authors_mix(pos, neg, nag_scale, tau, alpha, eps=0.0):
    """The authors' NAG on merged-head outputs (B, N, H*d), as in their processors."""
    guidance = pos * nag_scale - neg * (nag_scale - 1)
    norm_pos = torch.norm(pos, p=1, dim=-1, keepdim=True).expand(*pos.shape)
    norm_guid = torch.norm(guidance, p=1, dim=-1, keepdim=True).expand(*guidance.shape)
    scale = norm_guid / (norm_pos + eps)
    guidance = guidance * torch.minimum(scale, scale.new_ones(1) * tau) / (scale + eps)
    return guidance * alpha + pos * (1 - alpha)


def test_nag_mix_is_the_authors_formula():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g)
    merged = lambda x: x.transpose(1, 2).reshape(2, 7, 32)  # noqa: E731
    for tau in (1.2, 100.0):
        want = _authors_mix(merged(pos), merged(neg), 1 + PHI, tau, ALPHA)
        assert (merged(nag_mix(pos, neg, PHI, tau, ALPHA)) - want).abs().max() < 1e-6
    assert torch.equal(nag_mix(pos, neg, 0.0, TAU, ALPHA), pos)


# ----------------------------------------------------------------------------------- the references
class _CrossReference:
    """The authors' ``NAGAttnProcessor2_0`` (UNet cross-attention) on diffusers' ``Attention``."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch = encoder_hidden_states.shape[0]
        origin = batch - len(hidden_states)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head = key.shape[-1] // attn.heads
        query = query.tile(2, 1, 1) if batch == 2 * origin else torch.cat((query, query[origin : 2 * origin]))
        q, k, v = (x.view(batch, -1, attn.heads, head).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, attn.heads * head)
        pos = out[:origin] if batch == 2 * origin else out[origin : 2 * origin]
        guided = _authors_mix(pos, out[-origin:], self.scale, TAU, ALPHA)
        out = guided if batch == 2 * origin else torch.cat((out[:origin], guided))
        return attn.to_out[1](attn.to_out[0](out))


class _JointReference:
    """The authors' ``NAGJointAttnProcessor2_0`` (SD3 joint attention, image tokens first)."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None:
            return attnguide_default(attn, hidden_states)
        origin = len(encoder_hidden_states) - batch
        head = attn.to_k.out_features // attn.heads
        qkv = [
            f(hidden_states).view(batch, -1, attn.heads, head).transpose(1, 2)
            for f in (attn.to_q, attn.to_k, attn.to_v)
        ]
        if attn.norm_q is not None:
            qkv[0], qkv[1] = attn.norm_q(qkv[0]), attn.norm_k(qkv[1])
        total = batch + origin
        qkv = [
            x.tile(2, 1, 1, 1) if total == 2 * origin else torch.cat([x, x[origin : 2 * origin]]) for x in qkv
        ]
        ctx = [
            f(encoder_hidden_states).view(total, -1, attn.heads, head).transpose(1, 2)
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        if attn.norm_added_q is not None:
            ctx[0], ctx[1] = attn.norm_added_q(ctx[0]), attn.norm_added_k(ctx[1])
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(qkv, ctx, strict=True))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(total, -1, attn.heads * head)
        n = hidden_states.shape[1]
        img, txt = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        pos = img[:origin] if total == 2 * origin else img[origin : 2 * origin]
        guided = _authors_mix(pos, img[-origin:], self.scale, TAU, ALPHA, eps=1e-7)
        img = guided if total == 2 * origin else torch.cat((img[:origin], guided))
        return attn.to_out[1](attn.to_out[0](img)), txt


def attnguide_default(attn, hidden_states):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()(attn, hidden_states)


def _truncate_adaln(module):
    """The authors' Trunc AdaLN: an AdaLN on the image stream takes the first len(x) rows of its emb."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

    handles = []
    for m in module.modules():
        if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous)):

            def hook(mod, args, kwargs):
                x = args[0]
                if "emb" in kwargs and kwargs["emb"] is not None:
                    kwargs["emb"] = kwargs["emb"][: len(x)]
                elif len(args) > 1:
                    args = (x, args[1][: len(x)], *args[2:])
                return args, kwargs

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _reference_run(pipe, call, negative, joint: bool):
    """The pipeline call with the authors' processors: their text batch [.., NAG negative], latents as
    they are (the pooled embedding and timestep of the NAG rows are the prompt's, as their SD3 pipeline)."""
    den = pipe.transformer if joint else pipe.unet
    originals = dict(den.attn_processors)
    scale = 1 + PHI
    den.set_attn_processor(
        {
            n: (_JointReference(scale) if joint else _CrossReference(scale)) if (joint or "attn2" in n) else p
            for n, p in originals.items()
        }
    )
    forward = den.forward
    handles = _truncate_adaln(den) if joint else []

    def wrapped(*args, **kwargs):
        x = kwargs["hidden_states"] if joint else (args[0] if args else kwargs["sample"])
        ehs, b = kwargs["encoder_hidden_states"], x.shape[0]
        # CFG on: the batch is [uncond, cond] and CFG's negative prompt is NAG's (the authors' fallback)
        neg = ehs[: b // 2] if negative is None else negative.expand(b, -1, -1)
        kwargs["encoder_hidden_states"] = torch.cat([ehs, neg])
        if joint:  # the NAG rows' pooled embedding and timestep: the conditional rows'
            cond = slice(b - neg.shape[0], b)
            kwargs["pooled_projections"] = torch.cat(
                [kwargs["pooled_projections"], kwargs["pooled_projections"][cond]]
            )
            kwargs["timestep"] = torch.cat([kwargs["timestep"], kwargs["timestep"][cond]])
        return forward(*args, **kwargs)

    den.forward = wrapped
    try:
        return pipe(**call).images
    finally:
        del den.forward
        den.set_attn_processor(originals)
        for h in handles:
            h.remove()


@functools.cache
def _pipe(name):
    if name == "sdxl":  # text-to-image SDXL (tiny_families has its other pipelines)
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**sdxl_components())
        pipe.set_progress_bar_config(disable=True)
        call = dict(prompt="a photo", height=32, width=32, num_inference_steps=2, output_type="latent")
        return {"call": call}, pipe
    spec = FAMILIES[name]()
    return spec, instantiate(spec)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
@pytest.mark.parametrize("cfg", [False, True])
def test_nag_equals_the_authors_processors(name, cfg):
    spec, pipe = _pipe(name)
    joint = name == "sd3"
    call = dict(spec["call"], generator=torch.Generator().manual_seed(0), guidance_scale=4.0 if cfg else 1.0)
    negative = None
    if not cfg:  # an explicit negative prompt: the pipeline's own text encoding of it
        enc = pipe.encode_prompt(
            prompt="blurry",
            prompt_2="blurry",
            **({"prompt_3": "blurry", "max_sequence_length": 32} if joint else {}),
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        negative = enc[0]
    unguided = pipe(**dict(call, generator=torch.Generator().manual_seed(0))).images
    with attnguide.guide(pipe, nag=NAG(scale=PHI, tau=TAU, alpha=ALPHA, negative=negative)):
        ours = pipe(**dict(call, generator=torch.Generator().manual_seed(0))).images
    theirs = _reference_run(pipe, dict(call, generator=torch.Generator().manual_seed(0)), negative, joint)
    assert (ours - unguided).abs().max() > 1e-3
    assert (ours - theirs).abs().max() < 1e-5
    with attnguide.guide(pipe, nag=NAG(scale=1e-6, negative=negative)):
        tiny = pipe(**dict(call, generator=torch.Generator().manual_seed(0))).images
    assert (tiny - unguided).abs().max() < 1e-4


def test_nag_on_flux_with_an_explicit_negative_prompt():
    """Flux (packed latents, text-first joint attention in double- and single-stream blocks, no CFG batch):
    NAG with the negative prompt's embeddings changes the sample, and at scale 1e-6 reproduces it."""
    spec, pipe = _pipe("flux")
    call = dict(spec["call"], generator=torch.Generator().manual_seed(0))
    negative = pipe.encode_prompt(prompt="blurry", prompt_2="blurry", device="cpu", max_sequence_length=16)[0]
    unguided = pipe(**dict(call, generator=torch.Generator().manual_seed(0))).images
    outs = {}
    for scale in (PHI, 1e-6):
        with attnguide.guide(pipe, nag=NAG(scale=scale, tau=TAU, alpha=ALPHA, negative=negative)):
            outs[scale] = pipe(**dict(call, generator=torch.Generator().manual_seed(0))).images
    assert (outs[PHI] - unguided).abs().max() > 1e-3 and (outs[1e-6] - unguided).abs().max() < 1e-4


def test_nag_refusals():
    spec, pipe = _pipe("sdxl")
    call = dict(spec["call"], guidance_scale=1.0)
    with pytest.raises(ValueError, match="NAG needs a negative prompt"), attnguide.guide(pipe, nag=NAG()):
        pipe(**call)
    _, ddpm = _pipe("ddpm")
    with (
        pytest.raises(ValueError, match="NAG needs a text-conditioned model"),
        attnguide.guide(ddpm, nag=NAG()),
    ):
        pass
    with pytest.raises(ValueError, match="nag_alpha"):
        NAG(alpha=2.0)
