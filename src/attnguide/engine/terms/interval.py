"""The guidance interval (Kynkaanniemi et al., NeurIPS 2024, arXiv:2404.07724), a CFG rule (:mod:`.rule`).

CFG is applied only at the middle noise levels: at high noise it pulls the samples towards too few
modes, at low noise it does little. Outside the interval the step takes the conditional prediction:

    R = u + w (c - u)    where sigma_lo < sigma <= sigma_hi      (sigma = b / a of x_t = a x0 + b eps)
    R = c                elsewhere

The default interval (0.28, 5.42] is the paper's setting for SD-XL; the term's step ``window`` narrows it
further. Where CFG is off at a step, the engine's own loop skips the unconditional rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..checks import check_number
from ..combine import cfg
from .base import AppSpec, in_window
from .rule import CFGRule, RuleState, rule_app

__all__ = ["GuidanceInterval"]


@dataclass(frozen=True)
class GuidanceInterval(CFGRule):
    """CFG only where the noise level sigma is in ``sigmas`` = (low, high] (and the step in ``window``);
    ``scale``: the rule's weight over plain CFG (1: CFG off outside the interval)."""

    sigmas: tuple[float, float] = (0.28, 5.42)

    name: ClassVar[str] = "interval"
    title: ClassVar[str] = "guidance interval"
    paper: ClassVar[str] = "arXiv:2404.07724"
    app: ClassVar[AppSpec] = rule_app(
        "interval",
        "Interval",
        "the conditional prediction where sigma is outside (0.28, 5.42]",
        passes="none (CFG off outside the interval)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sigmas, (tuple, list)) or len(self.sigmas) != 2:
            raise ValueError(f"`interval_sigmas` must be a pair (low, high), got {self.sigmas!r}")
        low = check_number("interval_sigmas[0]", self.sigmas[0], minimum=0.0)
        high = check_number("interval_sigmas[1]", self.sigmas[1], minimum=low, open_minimum=True)
        object.__setattr__(self, "sigmas", (low, high))

    def in_effect(self, step: int, num_steps: int, sigma: Callable[[], float]) -> bool:
        if not in_window(self.window, step, num_steps):
            return False
        low, high = self.sigmas
        return low < sigma() <= high

    def combine(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        return cfg(c, u, w)
