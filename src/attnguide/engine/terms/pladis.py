"""PLADIS: Pushing the Limits of Attention in Diffusion Models at Inference Time by Leveraging Sparsity
(Kim et al., ICCV 2025, arXiv:2503.07677).

In every cross-attention layer the softmax attention map is extrapolated towards a sparse one, with the
same scores S = q k^T / sqrt(d) (the paper's extrapolation; ComfyUI's node calls it its Eq. 15):

    A_PLADIS = lambda A_sparse + (1 - lambda) A_softmax = A_softmax + lambda (A_sparse - A_softmax)
    out      = A_PLADIS v

where A_sparse is alpha-entmax with alpha = 1.5 (the paper's default; Peters et al. 2019) or sparsemax
(alpha = 2; Martins & Astudillo 2016), and lambda the scale (the paper's default 2.0; 0: softmax, the
unguided model). Both sparse maps are exact, by sorting the scores:

    sparsemax:  p = [s - tau]_+,    tau such that sum p = 1   (support: 1 + k s_(k) > sum_{j<=k} s_(j))
    entmax-1.5: p = [s / 2 - tau]_+^2, tau from the running means of the sorted s / 2

It changes the model itself, in every row of every call (both CFG branches and every other term's rows),
and adds no model pass: its effect is inside the predictions (no share of its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..checks import check_layers
from ..layers import resolve_layers
from .base import AppSpec, AttentionCall, StepContext, Term, scale_param

__all__ = ["PLADIS", "entmax15", "pladis_attention", "sparsemax"]

#: The sparse maps PLADIS extrapolates towards.
SPARSE_MAPS = ("entmax15", "sparsemax")


def _sorted_desc(z: Tensor) -> tuple[Tensor, Tensor]:
    """The scores of the last axis sorted in descending order, and k = 1..n shaped to broadcast."""
    zs = torch.sort(z, dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    return zs, k


def sparsemax(scores: Tensor) -> Tensor:
    """Sparsemax over the last axis (Martins & Astudillo 2016, Alg. 1): the Euclidean projection of the
    scores onto the probability simplex, [s - tau]_+ with the threshold tau that makes it sum to 1."""
    z = scores - scores.amax(dim=-1, keepdim=True)
    zs, k = _sorted_desc(z)
    cumsum = zs.cumsum(dim=-1)
    support = (1 + k * zs > cumsum).sum(dim=-1, keepdim=True)  # the largest k on the support
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return (z - tau).clamp(min=0)


def entmax15(scores: Tensor) -> Tensor:
    """1.5-entmax over the last axis (Peters, Niculae & Martins 2019, exact sort-based Alg. 2):
    p = [s / 2 - tau]_+^2 with tau such that p sums to 1; for the k largest of z = s / 2, tau_k =
    mean_k - sqrt((1 - k var_k) / k), and the support is the largest k with tau_k <= z_(k)."""
    z = (scores - scores.amax(dim=-1, keepdim=True)) / 2
    zs, k = _sorted_desc(z)
    mean = zs.cumsum(dim=-1) / k
    mean_sq = (zs * zs).cumsum(dim=-1) / k
    ss = k * (mean_sq - mean * mean)
    tau = mean - ((1 - ss) / k).clamp(min=0).sqrt()
    support = (tau <= zs).sum(dim=-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0) ** 2


def pladis_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    sparse: str = "entmax15",
    mask: Tensor | None = None,
    options: dict | None = None,
) -> Tensor:
    """PLADIS' attention on (B, heads, N, d) queries and (B, heads, M, d) keys / values: the softmax map of
    the scores extrapolated towards their sparse map by ``scale`` (lambda), times v. An attention
    ``mask`` (additive or boolean, as ``scaled_dot_product_attention`` takes it) takes part in both
    maps; ``options``: the call's other options (its ``scale``)."""
    options = options or {}
    s = q.float() @ k.float().transpose(-1, -2) * (options.get("scale") or q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
    dense = s.softmax(dim=-1)
    finite = s.clamp(min=torch.finfo(s.dtype).min / 4)  # the sparse maps give masked keys 0 as well
    sparse_map = entmax15(finite) if sparse == "entmax15" else sparsemax(finite)
    probs = dense + scale * (sparse_map - dense)
    return (probs @ v.float()).to(v.dtype)


@dataclass(frozen=True)
class PLADIS(Term):
    """PLADIS (Kim et al., arXiv:2503.07677): every cross-attention map extrapolated from softmax towards
    a sparse map, A = A_softmax + scale (A_sparse - A_softmax), in every row of every call; no extra
    pass.

    scale: lambda (the paper's default 2.0; 0: off). sparse: "entmax15" (alpha-entmax with alpha = 1.5,
    the paper's default) or "sparsemax". layers: cross-attention layer paths or patterns (None: every
    cross-attention layer). window: as for :class:`SAG`. Models without cross-attention (class-embedding
    UNets; joint-attention transformers as SD3 and Flux, whose text shares the image's attention) are
    refused before any model call.
    """

    name: ClassVar[str] = "pladis"
    title: ClassVar[str] = "PLADIS"
    paper: ClassVar[str] = "arXiv:2503.07677"
    rows: ClassVar[int] = 0
    acts_on: ClassVar[str] = "all"
    separate_call: ClassVar[str] = "both"
    app: ClassVar[AppSpec] = AppSpec(
        params=(scale_param("pladis", "PLADIS", 2.0),),
        passes="none (a change of the cross-attention)",
        weak="none: every cross-attention map pushed from softmax towards 1.5-entmax (lambda = scale)",
    )

    scale: float = 2.0
    sparse: str = "entmax15"
    layers: str | Sequence[str] | None = None
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        if self.sparse not in SPARSE_MAPS:
            raise ValueError(f"`pladis_sparse` must be one of {SPARSE_MAPS}, got {self.sparse!r}")
        check_layers("pladis_layers", self.layers)

    def attention_layers(self, model: nn.Module) -> list[str]:
        names = self.layers if self.layers is not None else ".*"  # every cross-attention layer
        return resolve_layers(model, names, argument="pladis_layers", kind="cross")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        return pladis_attention(q, k, v, self.scale, self.sparse, call.mask, call.options)

    def delta(self, ctx: StepContext) -> None:
        return None
