"""Classifier guidance (Dhariwal & Nichol, NeurIPS 2021, arXiv:2105.05233, Sec. 4 and Alg. 2; the SAG
paper's Eq. 3 and Table 3).

Not "a prediction minus a weaker one" but a shift of the implied eps along a noise-aware classifier's
gradient at the model input x_t (ADM's ``condition_score``):

    eps_hat = eps - b s grad_{x_t} log p(y | x_t),     x_t = a x0 + b eps

written for every prediction type by :func:`classifier_shift`; it adds no model pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..parameterization import PREDICTION_TYPES, NoiseLevel
from .base import AppParam, AppSpec, StepContext, Term

__all__ = ["ClassifierGuidance", "GradFn", "classifier_grad_fn", "classifier_shift"]

#: A classifier-guidance gradient: ``grad_fn(x, t) -> grad_x log p(y | x_t)``, shaped like ``x``.
GradFn = Callable[[Tensor, Tensor], Tensor]


def classifier_grad_fn(classifier: nn.Module, labels: Tensor) -> GradFn:
    """ADM's ``cond_fn`` (guided-diffusion ``scripts/classifier_sample.py``) for a noise-aware
    ``classifier(x, t) -> logits``: grad_x of log softmax(logits)[y], y = ``labels`` (one per row), per
    sample (the rows' log-probabilities are summed, so each row's gradient is its own as long as the
    classifier treats rows independently: eval mode for batch norm). No gradient reaches the
    classifier's weights."""
    if not isinstance(classifier, nn.Module):
        raise ValueError(
            f"`classifier` must be a torch.nn.Module classifier(x, t) -> logits, got {classifier!r}"
        )
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"`labels` must be a 1-D integer tensor (one label per image), got {labels!r}")

    def grad_fn(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"`labels`: {labels.shape[0]} labels for a batch of {x.shape[0]} images")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t).float(), dim=-1)
            rows = torch.arange(len(labels), device=log_probs.device)
            picked = log_probs[rows, labels.to(log_probs.device)]
            (grad,) = torch.autograd.grad(picked.sum(), x_in)
        return grad

    return grad_fn


def classifier_shift(grad: Tensor, level: NoiseLevel, prediction_type: str, scale: float) -> Tensor:
    """What classifier guidance adds to the model output: ADM's score form (guided-diffusion
    ``condition_score``) eps_hat = eps - b s g, g = ``grad`` = grad_{x_t} log p(y | x_t) at the model
    input x_t = a x0 + b eps (``level``; b = sqrt(1 - abar_t), so it works with any scheduler, DDIM
    included), written for each prediction type.

    Why the score form: grad log p(x_t) = -eps / b, so adding s g to the score is eps -> eps - b s g.
    Shift eps by delta = -b s g with x_t fixed; then x0 = (x_t - b eps) / a moves by -(b / a) delta, and
    (engine/parameterization.py) the outputs move by:

        epsilon:       eps_hat = eps + delta                            = eps - b s g
        v_prediction:  v = a eps - b x0  ->  a delta + (b^2 / a) delta  = v - (b / a) s g   (a^2 + b^2 = 1)
        sample:        x0_hat = x0 - (b / a) delta                      = x0 + (b^2 / a) s g
        flow:          v = eps - x0      ->  delta + (b / a) delta      = v - (b / a) s g   (a + b = 1)

    so ``predict_eps`` of the shifted output is eps - b s g and its ``predict_x0`` is x0 + (b^2 / a) s g
    in every type. Where a = 0 (pure noise: x_t says nothing of x0, so an ideal classifier's gradient
    is 0, and the eps shift has no finite v / x0 form) the v, x0 and flow shifts are 0: the term skips
    that step. In a DDPM step (fixed small variance Sigma) this moves the posterior mean by
    (beta_t / sqrt(alpha_t)) s g, ADM's ``condition_mean`` (mean + s Sigma g) times
    (1 - abar_t) / ((1 - abar_{t-1}) sqrt(alpha_t)): near 1 for fine steps away from t = 0.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    a, b = level.on(grad, cast=True)
    if prediction_type == "epsilon":
        return (scale * -b) * grad
    informative = a > 0  # a = 0: pure noise (flow matching's first step, zero terminal SNR)
    safe_a = torch.where(informative, a, torch.ones_like(a))
    factor = b * b / safe_a if prediction_type == "sample" else -b / safe_a  # v_prediction, flow: -b / a
    return (scale * torch.where(informative, factor, torch.zeros_like(factor))) * grad


@dataclass(frozen=True)
class ClassifierGuidance(Term):
    """Classifier guidance (Dhariwal & Nichol, arXiv:2105.05233, Sec. 4 and Alg. 2; the SAG paper's
    Eq. 3 and Table 3): the implied eps is shifted along a noise-aware classifier's gradient,
    eps_hat = eps - sqrt(1 - abar_t) s grad_{x_t} log p(y | x_t) (:func:`classifier_shift`, which writes
    the same shift for every prediction type).

    scale: s, ADM's ``classifier_scale`` (0 disables; negative steers away from y). grad_fn: the
    gradient, as guided-diffusion's ``cond_fn(x, t)`` without its scale: ``x`` is the step's model input
    (latent channels; a leaf tensor the engine detached, so the function may call
    ``x.requires_grad_()``), ``t`` the timestep once per row (a 1-D tensor); it returns
    grad_x log p(y | x_t), shaped like ``x``. The labels y are the function's own (close over them:
    :func:`classifier_grad_fn` builds one from a classifier module). It runs under
    ``torch.enable_grad()`` and never sees the denoiser's graph. window: as for :class:`SAG`.
    """

    name: ClassVar[str] = "classifier"
    title: ClassVar[str] = "classifier guidance"
    paper: ClassVar[str] = "arXiv:2105.05233"
    rows: ClassVar[int] = 0
    separate_call: ClassVar[str | None] = None  # once per step: not where CFG comes in two calls
    reads_prediction: ClassVar[bool] = True
    guide_window: ClassVar[bool] = False
    app: ClassVar[AppSpec] = AppSpec(
        params=(AppParam("scale", 0.0),), method=False, bench=False, passes="no model pass (a gradient)"
    )

    scale: float
    grad_fn: GradFn = field(metadata={"keyword": None})
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.check_scale_and_window()
        if not callable(self.grad_fn):
            raise ValueError(
                "`classifier` must be a function grad_fn(x, t) -> grad_x log p(y | x_t) (or a classifier "
                f"module where a pipeline takes one), got {self.grad_fn!r}"
            )

    def delta(self, ctx: StepContext) -> Tensor:
        """The shift of the prediction (:func:`classifier_shift`): the user's gradient at the model
        input's latent channels, taken on a detached copy under ``torch.enable_grad()`` (also inside
        ``torch.inference_mode``), so no gradient flows through or into the denoiser."""
        latent, _ = ctx.layout.split_input(ctx.x_in)
        with torch.inference_mode(False), torch.enable_grad():
            x = latent.detach().clone()
            tt = torch.as_tensor(ctx.t, device=x.device).reshape(-1)
            tt = (tt if tt.numel() == x.shape[0] else tt[:1]).expand(x.shape[0])
            grad = self.grad_fn(x, tt)
        if not isinstance(grad, Tensor) or tuple(grad.shape) != tuple(latent.shape):
            got = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(
                f"`classifier`: grad_fn(x, t) must return grad_x log p(y | x_t) shaped like x "
                f"{tuple(latent.shape)}, got {got}"
            )
        shift = classifier_shift(grad.detach(), ctx.level(), ctx.prediction_type, self.scale)
        return shift.to(dtype=latent.dtype)

    @classmethod
    def from_app(cls, values: dict) -> None:
        """The applications build it with the model's own noise-aware classifier (the eval's sampler)."""
        return None

    @classmethod
    def key_prefix(cls) -> str:
        return "cg"
