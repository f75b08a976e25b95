"""Smoothed Energy Guidance (Hong, NeurIPS 2024, arXiv:2408.00760).

The weak prediction runs the conditional branch with the self-attention queries of the chosen layers
blurred over the token grid by a Gaussian of sigma tokens (Sec. 3: blurring the queries smooths the
attention's energy landscape; sigma -> infinity makes every query the mean query, a uniform map):

    out += s (c - model_{q -> G_sigma * q}(x_t))

Keys and values stay; in joint text + image attention only the image queries are blurred.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from torch import Tensor, nn

from ..checks import check_layers
from ..layers import default_pag_layers, resolve_layers
from .base import AppParam, AppSpec, AttentionCall, Term, scale_param

__all__ = ["SEG", "blur_queries", "seg_attention", "seg_kernel_size"]


def seg_kernel_size(sigma: float) -> int:
    """The Gaussian kernel of SEG's official implementation (SEG-SDXL): the odd size ceil(6 sigma) + 1
    rounded down to odd, covering +-3 sigma."""
    k = math.ceil(6 * sigma)
    return k + 1 - k % 2


def blur_queries(q: Tensor, grid: tuple[int, int], sigma: float) -> Tensor:
    """SEG's smoothed queries (arXiv:2408.00760, Sec. 3): each query channel, laid out on the (h, w) token
    grid, blurred by a 2-D Gaussian of ``sigma`` tokens (reflect padding, kernel of
    :func:`seg_kernel_size`, capped to the grid); ``sigma`` = infinity makes every query the mean query.
    q: (B, heads, h * w, d), or (B, heads, F * h * w, d) for the F frames of a video in one sequence
    (frame-major): each frame blurred over its own grid."""
    b, heads, n, d = q.shape
    h, w = grid
    if n != h * w and n % (h * w) == 0:
        f = n // (h * w)
        frames = q.reshape(b, heads, f, h * w, d).transpose(1, 2).reshape(b * f, heads, h * w, d)
        blurred = blur_queries(frames, grid, sigma)
        return blurred.reshape(b, f, heads, h * w, d).transpose(1, 2).reshape(b, heads, n, d)
    if h * w != n:
        raise ValueError(f"SEG: {n} query tokens are not a {h}x{w} grid")
    if math.isinf(sigma):
        return q.mean(dim=2, keepdim=True).expand_as(q)
    x = q.permute(0, 1, 3, 2).reshape(b, heads * d, h, w)
    k = min(seg_kernel_size(sigma), 2 * min(h, w) - 1)  # reflect padding needs k // 2 < each side
    if k <= 1:
        return q
    half = (k - 1) / 2
    x_k = torch.linspace(-half, half, k, device=q.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x_k / sigma) ** 2)
    k1 = (pdf / pdf.sum()).to(q.dtype)
    kernel = (k1[:, None] * k1[None, :]).expand(heads * d, 1, k, k)
    pad = k // 2
    x = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=heads * d)
    return x.reshape(b, heads, d, n).permute(0, 1, 3, 2)


def seg_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    image: slice,
    grid: tuple[int, int],
    sigma: float,
    options: dict | None = None,
) -> Tensor:
    """SEG's weak attention on (B, heads, N, d) tensors: the image queries (the tokens ``image`` of N)
    blurred by :func:`blur_queries`, keys and values as they are; in joint attention the text queries
    are kept. The attention is then softmax(q_blur k^T / sqrt(d)) v, whose energy landscape is the
    smoothed one of the paper."""
    q = q.clone()
    q[:, :, image] = blur_queries(q[:, :, image], grid, sigma)
    options = {key: val for key, val in (options or {}).items() if key != "attn_mask"}
    return F.scaled_dot_product_attention(q, k, v, **options)


@dataclass(frozen=True)
class SEG(Term):
    """Smoothed Energy Guidance (Hong, arXiv:2408.00760): the weak pass blurs the self-attention queries
    of ``layers`` over the token grid with a Gaussian of ``sigma`` tokens (infinity: every query is the
    mean query, a uniform attention map), which smooths the attention's energy landscape; one extra
    conditional pass, out += s (c - c_seg).

    scale: s (SEG-SDXL's seg_scale, default 3.0). sigma: the blur (> 0; ``math.inf`` the limit;
    default ``math.inf``, the setting diffusers' guider means). layers: attention layers as for PAG
    (None: PAG's default, the mid block in UNets). window: as for :class:`SAG`. Not defined for linear
    attention (Sana): there it raises ValueError.
    """

    name: ClassVar[str] = "seg"
    title: ClassVar[str] = "SEG"
    paper: ClassVar[str] = "arXiv:2408.00760"
    app: ClassVar[AppSpec] = AppSpec(
        params=(
            scale_param("seg", "SEG", 3.0),
            AppParam(
                "sigma",
                None,
                "sigma",
                "--seg-sigma",
                math.inf,
                "SEG sigma",
                low=0.0,
                low_open=True,
                inf_allowed=True,
                inf_means="every query is the mean query",
                caption="sigma",
                help="SEG's query blur sigma in tokens",
            ),
        ),
        eval_scale=1.0,
        weak="the queries of the chosen layers (UNets: the mid block) blurred over the token grid with a "
        "Gaussian of SEG sigma tokens (inf: every query is the mean query)",
    )

    scale: float = 3.0
    sigma: float = math.inf
    layers: str | list[str] | None = None
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        if not isinstance(self.sigma, (int, float)) or isinstance(self.sigma, bool) or not self.sigma > 0:
            raise ValueError(f"`seg_sigma` must be a number > 0 (math.inf allowed), got {self.sigma!r}")
        check_layers("seg_layers", self.layers)

    def attention_layers(self, model: nn.Module) -> list[str]:
        names = self.layers if self.layers is not None else default_pag_layers(model)
        return resolve_layers(model, names, argument="seg_layers")

    def check_model(self, model: nn.Module, processors: Mapping[str, Any]) -> None:
        linear = [n for n, p in processors.items() if isinstance(p, SanaLinearAttnProcessor2_0)]
        if linear:
            raise ValueError(
                f"`seg`: SEG blurs softmax-attention queries; {', '.join(linear)} use linear attention "
                "(Sana), which has no such energy: use PAG, TPG or SLG there"
            )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        return seg_attention(q, k, v, call.image, call.grid(), self.sigma, call.options)
