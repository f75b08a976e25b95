"""APG: Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv:2410.02416), a CFG rule
(:mod:`.rule`).

The CFG update D = c - u is averaged with negative momentum over the steps (Sec. 4.3), its norm capped,
and its part parallel to the conditional prediction damped (Sec. 4.1-4.2), which is what oversaturates
at high weights:

    D_t  = (c - u) + beta D_{t-1}                       (momentum beta; none: D_t = c - u)
    D   <- D min(1, r / ||D||)                         (norm threshold r; 0: no cap)
    D_par = <D, c^> c^,  D_perp = D - D_par             (c^ = c / ||c||; norms over all but the batch axis)
    R    = u + w (D_perp + eta D_par)

This is diffusers' ``AdaptiveProjectedGuidance`` form (u + w update; the projection in float64), and
equals it given the same predictions. With eta = 1, no momentum and no cap, R is plain CFG. Defaults are
the paper's recommendation (eta 0, beta -0.5) with diffusers' threshold 15.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..checks import check_number
from .base import AppSpec
from .rule import CFGRule, RuleState, rule_app

__all__ = ["APG"]


@dataclass(frozen=True)
class APG(CFGRule):
    """Adaptive Projected Guidance: ``eta`` the weight of the update's part parallel to c (0: removed),
    ``momentum`` beta of the running average of c - u over the steps (None: none), ``norm_threshold`` r
    the cap on the update's norm (0: none); ``scale``: the rule's weight over plain CFG (1: APG)."""

    eta: float = 0.0
    momentum: float | None = -0.5
    norm_threshold: float = 15.0

    name: ClassVar[str] = "apg"
    title: ClassVar[str] = "APG"
    paper: ClassVar[str] = "arXiv:2410.02416"
    app: ClassVar[AppSpec] = rule_app(
        "apg",
        "APG",
        "CFG's update with its part parallel to c damped (eta 0), its norm capped at 15, with "
        "momentum -0.5 over the steps",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("apg_eta", self.eta)
        if self.momentum is not None:
            check_number("apg_momentum", self.momentum, minimum=-1.0, maximum=1.0)
        check_number("apg_norm_threshold", self.norm_threshold, minimum=0.0)

    def combine(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        diff = c - u
        dims = list(range(1, diff.ndim))
        if self.momentum is not None:
            previous = state.memory.get(self.name)
            diff = diff if previous is None else diff + self.momentum * previous
            state.memory[self.name] = diff
        if self.norm_threshold > 0:
            norm = torch.linalg.vector_norm(diff, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        v0 = diff.double()
        v1 = torch.nn.functional.normalize(c.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        orthogonal = (v0 - parallel).to(diff.dtype)
        return u + w * (orthogonal + self.eta * parallel.to(diff.dtype))
