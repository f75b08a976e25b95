"""NAG: Normalized Attention Guidance (Chen et al. 2025, arXiv:2505.21179).

In the layers where the image attends to the text, the attention output for the prompt (z+) is pushed
away from the output for a negative prompt (z-), for the same image queries; the push is L1-normalised
per token and blended back (the authors' code, ``nag/attention_nag.py``):

    z~  = z+ + phi (z+ - z-)                       (the authors' nag_scale = 1 + phi)
    r   = ||z~||_1 / ||z+||_1                      (per token, over every head's channels)
    z~ <- z~ min(r, tau) / r                       (no more than tau times the norm of z+)
    z   = alpha z~ + (1 - alpha) z+

It works inside the model, so it needs no CFG and adds no model pass of its own: its rows are the
conditional rows again with the negative prompt as their text (``encoder_hidden_states``), one more row
block of the batched call. Wherever the image attends to the text (cross-attention layers; every layer of
a joint text + image transformer: SD3, Flux), the conditional rows and NAG's rows both take z, so their
image streams stay equal and NAG's rows supply z- in every layer, as the authors' processors compute it
from the shared image queries. Its effect is in the conditional prediction (no share of its own).

The negative prompt: ``negative`` (prompt embeddings, (1 or B, tokens, dim), the pipeline's text encoder
output for it), else the unconditional rows' text where the call has CFG (the authors' fallback to the
CFG negative prompt). The pooled embedding and time ids of NAG's rows are the prompt's (the authors' SD3
and SDXL pipelines; their Flux pipeline gives the negative prompt's pooled embedding to its text stream).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_layers, check_number
from ..layers import cross_attention_layers, resolve_layers, self_attention_layers
from .base import AppSpec, AttentionCall, StepContext, Term, scale_param

__all__ = ["NAG", "nag_mix"]

#: The text input of diffusers' denoisers, which NAG's rows get the negative prompt in.
TEXT_INPUT = "encoder_hidden_states"


def nag_mix(z_pos: Tensor, z_neg: Tensor, phi: float, tau: float, alpha: float, norm: int = 1) -> Tensor:
    """NAG's output from the attention outputs for the prompt and for the negative prompt, (B, heads, N,
    d) tensors: the extrapolation, its per-token norm capped at ``tau`` times z+'s (L1 as the paper;
    ``norm=2`` as the authors' diffusers Flux processor), blended by ``alpha``."""
    guided = z_pos + phi * (z_pos - z_neg)
    dims = (1, 3)  # every head's channels of one token: the authors' norm after the heads are merged
    n_pos = torch.linalg.vector_norm(z_pos, ord=norm, dim=dims, keepdim=True)
    n_guided = torch.linalg.vector_norm(guided, ord=norm, dim=dims, keepdim=True)
    ratio = n_guided / n_pos
    guided = guided * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guided * alpha + z_pos * (1 - alpha)


@dataclass(frozen=True)
class NAG(Term):
    """Normalized Attention Guidance: ``scale`` phi (the authors' nag_scale - 1; 0: off), ``tau`` the cap
    on the norm, ``alpha`` the blend, ``norm`` 1 (L1) or 2, ``negative`` the negative prompt's embeddings
    (None: the CFG negative prompt's), ``layers`` (None: every cross-attention layer, or every layer of a
    joint transformer), ``window``."""

    scale: float = 4.0
    tau: float = 2.5
    alpha: float = 0.25
    norm: int = 1
    negative: Tensor | None = field(default=None, compare=False, repr=False)
    layers: str | tuple[str, ...] | None = None
    window: tuple[float, float] = (0.0, 1.0)

    name: ClassVar[str] = "nag"
    title: ClassVar[str] = "NAG"
    paper: ClassVar[str] = "arXiv:2505.21179"
    branch: ClassVar[str] = "nag"
    mixes_with_cond: ClassVar[bool] = True
    app: ClassVar[AppSpec] = AppSpec(
        params=(scale_param("nag", "NAG", 4.0),),
        needs_cfg=True,  # the applications give it CFG's negative prompt
        passes="+1 row block (the negative prompt's text)",
        weak="the image's attention to the negative prompt's text, pushed away from (normalised, blended)",
    )

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        check_number("nag_tau", self.tau, minimum=1.0)
        check_number("nag_alpha", self.alpha, minimum=0.0, maximum=1.0)
        if self.norm not in (1, 2):
            raise ValueError(f"`nag_norm` must be 1 (L1) or 2 (L2), got {self.norm!r}")
        if self.negative is not None and (not isinstance(self.negative, Tensor) or self.negative.ndim != 3):
            raise ValueError(
                "`nag_negative` must be the negative prompt's embeddings, a (1 or B, tokens, dim) tensor, "
                f"got {self.negative!r}"
            )
        if self.layers is not None:
            check_layers("nag_layers", self.layers)

    # ------------------------------------------------------------------ where
    def attention_layers(self, model: nn.Module) -> list[str]:
        if self.layers is not None:
            kind = "cross" if cross_attention_layers(model) else "self"
            return resolve_layers(model, self.layers, argument="nag_layers", kind=kind)
        if cross_attention_layers(model):
            return list(cross_attention_layers(model))
        return list(self_attention_layers(model))  # a joint transformer: checked in check_model

    def check_model(self, model: nn.Module, processors: Mapping[str, Any]) -> None:
        params = inspect.signature(type(model).forward).parameters
        joint = any(getattr(m, "add_k_proj", None) is not None for m in self_attention_layers(model).values())
        if TEXT_INPUT not in params or not (cross_attention_layers(model) or joint):
            raise ValueError(
                f"`nag`: NAG needs a text-conditioned model whose image attends to the text (cross-attention "
                f"or joint attention); {type(model).__name__} has none"
            )

    # ------------------------------------------------------------------ its rows
    def branch_inputs(
        self, kwargs: dict[str, Any], chunk: int, chunks: int, uncond: int | None
    ) -> dict[str, Any]:
        """The model inputs with NAG's rows (chunk ``chunk`` of ``chunks`` of the batched inputs ``kwargs``,
        a copy of the conditional rows) given the negative prompt's text: ``negative``, else the chunk
        ``uncond`` of the call's own text (CFG's negative prompt); ValueError where there is neither."""
        text = kwargs.get(TEXT_INPUT)
        if not isinstance(text, Tensor) or text.shape[0] % chunks:
            raise ValueError(f"`nag`: the model call has no `{TEXT_INPUT}` to give the negative prompt in")
        rows = text.shape[0] // chunks
        own = slice(chunk * rows, (chunk + 1) * rows)
        if self.negative is not None:
            negative = self.negative.to(device=text.device, dtype=text.dtype)
            negative = negative.expand(rows, -1, -1) if negative.shape[0] == 1 else negative
        elif uncond is not None:
            negative = text[uncond * rows : (uncond + 1) * rows]
        else:
            raise ValueError(
                "`nag`: NAG needs a negative prompt: give its embeddings as NAG(negative=...) "
                "(nag_negative), or run with CFG and a negative prompt"
            )
        if negative.shape[0] != rows or negative.shape[1:] != text.shape[1:]:
            raise ValueError(
                f"`nag_negative`: the negative prompt's embeddings must be shaped like the prompt's "
                f"({rows} or 1, {tuple(text.shape[1:])}), got {tuple(negative.shape)}"
            )
        text = text.clone()
        text[own] = negative
        return {**kwargs, TEXT_INPUT: text}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=call.mask, **call.options)

    def mix(self, out: Tensor, cond: slice, own: slice, call: AttentionCall) -> Tensor:
        """The layer's attention output with the conditional rows' and NAG's rows' image tokens both set
        to NAG's output (:func:`nag_mix` of the two)."""
        image = call.image
        z_pos, z_neg = out[cond][:, :, image], out[own][:, :, image]
        z = nag_mix(z_pos, z_neg, self.scale, self.tau, self.alpha, self.norm)
        out = out.clone()
        out[cond, :, image] = z
        out[own, :, image] = z
        return out

    def delta(self, ctx: StepContext) -> None:
        return None  # its effect is inside the conditional prediction
