"""CFG-Zero*: Improving Classifier-Free Guidance for Flow Matching Models (Fan et al. 2025,
arXiv:2503.18886), a CFG rule (:mod:`.rule`).

The unconditional prediction is scaled by the optimised scale that best matches it to the conditional
one (Eq. 7), and the first steps give a zero prediction (zero-init, Sec. 3.3):

    alpha* = <c, u> / (||u||^2 + 1e-8)                 (per sample, in float32)
    R      = alpha* u + w (c - alpha* u)                (steps >= zero_steps)
    R      = 0                                          (the first ``zero_steps`` steps)

As diffusers' ``ClassifierFreeZeroStarGuidance`` (equal given the same predictions). Outside its window
the rule gives c, like every rule; diffusers zero-inits there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..checks import positive_int
from .base import AppSpec
from .rule import CFGRule, RuleState, rule_app

__all__ = ["CFGZeroStar", "optimised_scale"]


def optimised_scale(c: Tensor, u: Tensor, eps: float = 1e-8) -> Tensor:
    """CFG-Zero*'s alpha* = <c, u> / (||u||^2 + eps) per sample (Eq. 7), in float32, shaped to broadcast."""
    cf, uf = c.flatten(1).float(), u.flatten(1).float()
    alpha = (cf * uf).sum(dim=1, keepdim=True) / ((uf**2).sum(dim=1, keepdim=True) + eps)
    return alpha.to(c.dtype).view(-1, *(1,) * (c.ndim - 1))


@dataclass(frozen=True)
class CFGZeroStar(CFGRule):
    """CFG-Zero*: the unconditional prediction scaled by alpha*, and ``zero_steps`` zero-init steps (0:
    none); ``scale``: the rule's weight over plain CFG (1: CFG-Zero*)."""

    zero_steps: int = 1

    name: ClassVar[str] = "zerostar"
    title: ClassVar[str] = "CFG-Zero*"
    paper: ClassVar[str] = "arXiv:2503.18886"
    app: ClassVar[AppSpec] = rule_app(
        "zerostar", "CFG-Zero*", "the unconditional prediction scaled by <c, u> / <u, u>; the first step zero"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_steps != 0:
            positive_int("zerostar_zero_steps", self.zero_steps)

    def combine(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        if state.step < self.zero_steps:
            return torch.zeros_like(c)
        scaled = u * optimised_scale(c, u)
        return scaled + w * (c - scaled)
