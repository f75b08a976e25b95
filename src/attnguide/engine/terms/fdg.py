"""FDG: Frequency-Decoupled Guidance (Sadat et al. 2025, arXiv:2506.19713), a CFG rule (:mod:`.rule`).

Both predictions are split into the levels of a Laplacian pyramid, CFG runs on each level with its own
weight (strong on the low frequencies, which decide structure; mild on the high ones, which oversaturate),
optionally with the level's update split into its parts parallel and orthogonal to c's level, and the
pyramid is put back together (Eq. 5-6):

    c_l, u_l = levels of c, u             (l = 0 the finest, L - 1 the low-pass residual)
    D_l      = c_l - u_l,  D_l <- p_l D_l,par + D_l,perp   (parallel weight p_l; 1: D_l unchanged)
    R_l      = u_l + w_l D_l,   R = reconstruct(R_0, ..., R_{L-1})

The pyramid is kornia's (``build_laplacian_pyramid`` / ``pyrup``: the 5 x 5 binomial kernel, reflected
borders, bilinear resizing), which diffusers' ``FrequencyDecoupledGuidance`` uses; this module computes
it itself, so FDG needs no kornia and equals diffusers' given the same predictions. A side that the
pyramid cannot halve is padded (reflect) as kornia does, and the result is cropped back to the input's
size (diffusers returns the padded size). Video latents (B, C, F, H, W) are split frame by frame. The
weights w_l replace CFG's w.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_number
from .base import AppSpec
from .rule import CFGRule, RuleState, rule_app

__all__ = ["FDG", "build_laplacian_pyramid", "reconstruct"]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def _blur(x: Tensor) -> Tensor:
    """The 5 x 5 binomial blur of every channel, reflected borders (kornia's ``filter2d``)."""
    kernel = torch.outer(_BINOMIAL, _BINOMIAL).to(device=x.device, dtype=x.dtype) / 256.0
    c = x.shape[1]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, kernel.expand(c, 1, 5, 5), groups=c)


def _down(x: Tensor) -> Tensor:
    return F.interpolate(
        _blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False
    )


def _up(x: Tensor) -> Tensor:
    up = F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear", align_corners=False)
    return _blur(up)


def _padded_size(h: int, w: int, levels: int) -> tuple[int, int]:
    """The size kornia pads an image to before building ``levels`` levels (its rule, kept exactly)."""

    def power(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    stride = 1 << (levels - 1)
    if (power(h) or power(w)) and h % stride == 0 and w % stride == 0:
        return h, w
    return 1 << math.ceil(math.log2(h)), 1 << math.ceil(math.log2(w))


def build_laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """The Laplacian pyramid of (B, C, H, W) ``x``: ``levels`` tensors, the finest first and the low-pass
    residual last (kornia's ``build_laplacian_pyramid``, padding included)."""
    h, w = x.shape[-2:]
    ph, pw = _padded_size(h, w, levels)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="reflect")
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(_down(gaussian[-1]))
    return [g - _up(nxt) for g, nxt in itertools.pairwise(gaussian)] + [gaussian[-1]]


def reconstruct(pyramid: list[Tensor]) -> Tensor:
    """The image of a Laplacian pyramid (the inverse of :func:`build_laplacian_pyramid`, before cropping)."""
    image = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        image = _up(image) + level
    return image


def _split(update: Tensor, along: Tensor) -> tuple[Tensor, Tensor]:
    """``update``'s parts parallel and orthogonal to ``along`` (per sample, in float64)."""
    dims = list(range(1, update.ndim))
    v0, v1 = update.double(), F.normalize(along.double(), dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    return parallel.to(update.dtype), (v0 - parallel).to(update.dtype)


@dataclass(frozen=True)
class FDG(CFGRule):
    """Frequency-decoupled guidance: ``guidance_scales`` the CFG weight of each pyramid level, the finest
    first (their number is the number of levels), ``parallel_weights`` the weight of each level's update
    part parallel to c (None: 1 everywhere); ``scale``: the rule's weight over plain CFG (1: FDG)."""

    guidance_scales: tuple[float, ...] = (10.0, 5.0)
    parallel_weights: tuple[float, ...] | None = None

    name: ClassVar[str] = "fdg"
    title: ClassVar[str] = "FDG"
    paper: ClassVar[str] = "arXiv:2506.19713"
    app: ClassVar[AppSpec] = rule_app(
        "fdg", "FDG", "CFG per Laplacian-pyramid level: weight 10 on the fine level, 5 on the coarse one"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        scales = _numbers("fdg_guidance_scales", self.guidance_scales)
        object.__setattr__(self, "guidance_scales", scales)
        if self.parallel_weights is not None:
            weights = _numbers("fdg_parallel_weights", self.parallel_weights)
            if len(weights) != len(scales):
                raise ValueError(
                    f"`fdg_parallel_weights` needs one weight per level ({len(scales)}), got {len(weights)}"
                )
            object.__setattr__(self, "parallel_weights", weights)

    def combine(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        video = c.ndim == 5
        if video:  # (B, C, F, H, W): every frame its own image
            b, ch, f, h, wd = c.shape
            c, u = (x.transpose(1, 2).reshape(b * f, ch, h, wd) for x in (c, u))
        h, wd = c.shape[-2:]
        levels = len(self.guidance_scales)
        weights = self.parallel_weights or (1.0,) * levels
        guided = []
        for c_l, u_l, w_l, p_l in zip(
            build_laplacian_pyramid(c, levels),
            build_laplacian_pyramid(u, levels),
            self.guidance_scales,
            weights,
            strict=True,
        ):
            update = c_l - u_l
            if not math.isclose(p_l, 1.0):
                parallel, orthogonal = _split(update, c_l)
                update = p_l * parallel + orthogonal
            guided.append(u_l + w_l * update)
        out = reconstruct(guided)[..., :h, :wd]
        if video:
            out = out.reshape(b, f, ch, h, wd).transpose(1, 2)
        return out


def _numbers(name: str, values: object) -> tuple[float, ...]:
    """A non-empty tuple of finite numbers, else ValueError naming ``name``."""
    if isinstance(values, (int, float)):
        values = (values,)
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"`{name}` must be a non-empty sequence of numbers, got {values!r}")
    return tuple(check_number(f"{name}[{i}]", v) for i, v in enumerate(values))
