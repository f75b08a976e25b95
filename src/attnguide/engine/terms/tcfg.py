"""TCFG: Tangential Damping Classifier-Free Guidance (Kwon et al., CVPR 2025, arXiv:2503.18137), a CFG
rule (:mod:`.rule`).

The unconditional prediction loses its component tangential to the data manifold: per sample, the SVD
of the 2 x D matrix [c; u] gives the dominant right-singular vector v1, and u is replaced by its
projection on it (Sec. 4):

    [c; u] = U S V^T,   u' = <u, v1> v1,   R = u' + w (c - u')

in float32, as diffusers' ``TangentialClassifierFreeGuidance`` (equal given the same predictions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import AppSpec
from .rule import CFGRule, RuleState, rule_app

__all__ = ["TCFG", "tangential_uncond"]


def tangential_uncond(c: Tensor, u: Tensor) -> Tensor:
    """u projected on the dominant right-singular vector of [c; u] (per sample, float32)."""
    b = c.shape[0]
    preds = torch.stack([c, u], dim=1).float().flatten(2)  # (B, 2, D)
    vh = torch.linalg.svd(preds, full_matrices=False).Vh[:, :1]  # (B, 1, D)
    uf = u.reshape(b, 1, -1).float()
    return ((uf @ vh.transpose(-2, -1)) @ vh).reshape(u.shape).to(c.dtype)


@dataclass(frozen=True)
class TCFG(CFGRule):
    """Tangential damping CFG; ``scale``: the rule's weight over plain CFG (1: TCFG)."""

    name: ClassVar[str] = "tcfg"
    title: ClassVar[str] = "TCFG"
    paper: ClassVar[str] = "arXiv:2503.18137"
    app: ClassVar[AppSpec] = rule_app(
        "tcfg", "TCFG", "the unconditional prediction projected on the dominant singular direction of [c; u]"
    )

    def combine(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        projected = tangential_uncond(c, u)
        return projected + w * (c - projected)
