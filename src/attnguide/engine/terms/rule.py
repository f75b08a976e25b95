"""CFG rules: terms that combine the two CFG predictions their own way instead of CFG's u + w (c - u)
(APG, CFG-Zero*, TCFG, FDG, the guidance interval; one file each).

A rule R(c, u, w) is a term like the others: its share of the guided prediction is

    delta = s (R - (u + w (c - u)))          inside its window (and, for the interval, its noise levels)
    delta = s (c - (u + w (c - u)))          outside: no guidance there, as diffusers' guiders do

so that at its default scale s = 1 the step gives R (or c), at s -> 0 plain CFG, and every other term's
share is added on top (PAG, SAG, ... combine with a rule in the same batched call). A rule needs CFG
(the unconditional prediction and the weight w) and a run takes at most one. Where a rule at s = 1 is
outside its window, the engine's own loop skips the unconditional rows of that step (the output is c).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from ..combine import cfg
from .base import AppSpec, StepContext, Term, in_window, scale_param

__all__ = ["CFGRule", "RuleState", "edm_sigma", "rule_app", "rule_of"]

RULE_PASSES = "none (a rule for CFG's two predictions)"


def rule_app(name: str, label: str, weak: str, passes: str = RULE_PASSES) -> AppSpec:
    """The applications' spec of a CFG rule: its scale (default 1, the rule itself), offered with CFG
    only ("cfg+<name>"), evaluated at scale 1; ``weak`` says what replaces CFG's combination."""
    return AppSpec(
        params=(scale_param(name, label, 1.0),), needs_cfg=True, eval_scale=1.0, passes=passes, weak=weak
    )


@dataclass
class RuleState:
    """What a rule reads of its step besides the predictions: its place (``step`` of ``num_steps``,
    0-based), the run's ``memory`` (one dict per sampling run and thread: APG's momentum) and the noise
    level ``sigma()`` = b / a of x_t = a x0 + b eps (computed when asked)."""

    step: int = 0
    num_steps: int = 1
    memory: dict[str, Any] = field(default_factory=dict)
    sigma: Callable[[], float] = lambda: 1.0


@dataclass(frozen=True)
class CFGRule(Term):
    """Base of the CFG rules (see the module text); a subclass is a frozen dataclass (its fields after
    ``scale``) and implements :meth:`combine`. ``scale``: the rule's weight over plain CFG (1: the rule
    itself, 0: plain CFG); ``window`` (keyword only): the fraction of the steps where it acts."""

    scale: float = 1.0
    window: tuple[float, float] = field(default=(0.0, 1.0), kw_only=True)

    rows: ClassVar[int] = 0
    rule: ClassVar[bool] = True
    #: the rules read both CFG predictions of one step: not where the branches come in two calls
    separate_call: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.check_scale_and_window()

    def check_scale_and_window(self) -> None:
        super().check_scale_and_window()
        if self.scale < 0:
            raise ValueError(
                f"`{self.name}_scale` must be >= 0 (1: the rule, 0: plain CFG), got {self.scale}"
            )

    def combine(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        """The rule's guided prediction R(c, u, w) for the conditional and unconditional predictions."""
        raise NotImplementedError

    def in_effect(self, step: int, num_steps: int, sigma: Callable[[], float]) -> bool:
        """Whether the rule acts at ``step`` of ``num_steps`` (its window; ``sigma()`` gives the step's
        noise level sigma = b / a, for rules defined on noise levels)."""
        return in_window(self.window, step, num_steps)

    def guided(self, c: Tensor, u: Tensor, w: float, state: RuleState) -> Tensor:
        """The step's prediction under this rule: CFG + s (R - CFG) where the rule acts, CFG + s (c - CFG)
        elsewhere (what the modular-pipeline guider returns; the engine adds the difference as a share)."""
        plain = cfg(c, u, w)
        if self.in_effect(state.step, state.num_steps, state.sigma):
            target = self.combine(c, u, w, state)
        else:
            target = c
        return target if self.scale == 1.0 else plain + self.scale * (target - plain)

    def delta(self, ctx: StepContext) -> Tensor | None:
        c, u, w = ctx.outputs.out_cond, ctx.outputs.out_uncond, ctx.guidance_scale
        if u is None or w is None:  # no unconditional rows this step: the output is c already
            return None
        state = RuleState(ctx.step, ctx.num_steps, ctx.memory, lambda: _sigma(ctx))
        return self.guided(c, u, w, state) - cfg(c, u, w)


def edm_sigma(level: Any) -> float:
    """A noise level (x_t = a x0 + b eps) as the EDM sigma b / a."""
    return float(level.b / level.a)


def _sigma(ctx: StepContext) -> float:
    """The step's noise level as the EDM sigma."""
    return edm_sigma(ctx.level())


def rule_of(terms: Mapping[str, Term]) -> Term | None:
    """The CFG rule among ``terms`` (a run takes at most one: :func:`check_terms`), or None."""
    return next((t for t in terms.values() if t.rule), None)
