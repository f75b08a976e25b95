"""The noise parameterisation of one step: x_in = a x0 + b eps, in the model's input space, for any
diffusers scheduler, and the conversions of a model output to x0 / eps and back.

* discrete variance preserving schedules (DDPM, DDIM, PNDM, DPM-Solver, ...): a = sqrt(abar_t),
  b = sqrt(1 - abar_t) (paper Eq. 2), abar from ``alphas_cumprod[t]``;
* sigma schedules (Euler, Heun, LMS, Karras sigmas: samples x = x0 + sigma eps): the model sees
  ``scale_model_input(x) = x / sqrt(1 + sigma^2)``, which is variance preserving with
  abar = 1 / (1 + sigma^2), sigma the scheduler's at the current step;
* flow matching (SD3, Flux, Sana: x = (1 - sigma) x0 + sigma eps, the model predicts the velocity
  v = eps - x0): a = 1 - sigma, b = sigma, sigma the scheduler's at the current step (shifted and
  dynamically shifted schedules included: they are in ``scheduler.sigmas``); ``prediction_type="flow"``.

Output conversions, with a, b of the step:
    epsilon:       x0 = (x - b eps) / a                       eps = eps
    v_prediction:  x0 = a x - b v                              eps = b x + a v      (a^2 + b^2 = 1)
    sample:        x0 = x0                                     eps = (x - a x0) / b
    flow:          x0 = x - b v                                eps = x + a v        (a + b = 1)

Derivation of the flow row: with x = a x0 + b eps and v = eps - x0, x - b v = a x0 + b x0 = x0 and
x + a v = a eps + b eps = eps, since a + b = 1. SAG's re-noising x~ = a x0~ + b eps then keeps the
step's sigma and the model's own eps, as in the variance preserving case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
_SIGMA_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


@dataclass(frozen=True)
class NoiseLevel:
    """x_in = a x0 + b eps at the current step (0-d tensors). ``alpha_bar`` is kept for variance
    preserving levels, where a and b are computed from it exactly as diffusers' SAG pipeline does."""

    a: Tensor
    b: Tensor
    alpha_bar: Tensor | None = None

    @classmethod
    def variance_preserving(cls, alpha_bar: Tensor | float) -> NoiseLevel:
        """a = sqrt(abar), b = sqrt(1 - abar)."""
        alpha_bar = torch.as_tensor(alpha_bar)
        return cls(alpha_bar**0.5, (1 - alpha_bar) ** 0.5, alpha_bar)

    @classmethod
    def flow(cls, sigma: Tensor | float) -> NoiseLevel:
        """a = 1 - sigma, b = sigma (rectified flow / flow matching)."""
        sigma = torch.as_tensor(sigma)
        return cls(1 - sigma, sigma)

    def on(self, x: Tensor, *, cast: bool = False) -> tuple[Tensor, Tensor]:
        """(a, b) on ``x``'s device (and in its dtype with ``cast``)."""
        opts = {"device": x.device, "dtype": x.dtype} if cast else {"device": x.device}
        return self.a.to(**opts), self.b.to(**opts)


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` samples a flow-matching model (FlowMatch* schedulers, ``use_flow_sigmas``)."""
    flow_sigmas = bool(getattr(scheduler.config, "use_flow_sigmas", False))
    return "FlowMatch" in type(scheduler).__name__ or flow_sigmas


def current_sigma(scheduler, t: Tensor) -> Tensor:
    """The scheduler's sigma at the current step: its ``step_index``, else (before the run's first
    ``step``) its ``begin_index`` or the index of ``t`` in its timesteps, else the first sigma (a pipeline
    that hands the model rescaled timesteps, as Sana's ``timestep_scale``)."""
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    if index is None:
        try:
            index = scheduler.index_for_timestep(t)
        except (IndexError, RuntimeError):
            index = 0
    return scheduler.sigmas[index].to(torch.float32)


def uses_sigma_schedule(scheduler, timesteps: Tensor) -> bool:
    """True where the step's noise level must be read from ``scheduler.sigmas`` rather than from
    ``alphas_cumprod[t]``: float timesteps, variance-exploding samples, or a resampled sigma schedule."""
    if not hasattr(scheduler, "sigmas"):
        return False
    if torch.is_floating_point(timesteps):
        return True
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        return True
    return any(bool(getattr(scheduler.config, flag, False)) for flag in _SIGMA_SCHEDULE_FLAGS)


def alpha_bar_at(scheduler, t: Tensor, *, sigma_schedule: bool, table: Tensor | None = None) -> Tensor:
    """abar_t of the current step, a 0-d tensor (float32 on the sigma path; else alphas_cumprod's dtype).

    With ``sigma_schedule`` the scheduler's current sigma gives abar = 1 / (1 + sigma^2); otherwise
    ``alphas_cumprod[t]`` (what diffusers' SAG pipeline uses, so results match it). ``table`` is
    ``alphas_cumprod`` already on ``t``'s device: indexing it with a device timestep keeps the host from
    waiting on the device (``int(t)`` of a CUDA tensor would).
    """
    if sigma_schedule:
        return 1.0 / (1.0 + current_sigma(scheduler, t) ** 2)
    if table is not None and isinstance(t, Tensor) and t.device == table.device:
        return table[t.long()]
    return scheduler.alphas_cumprod[int(t)]


def noise_level(scheduler, t: Tensor, *, sigma_schedule: bool, table: Tensor | None = None) -> NoiseLevel:
    """The :class:`NoiseLevel` of the current step in the model's input space (see the module text)."""
    if is_flow_matching(scheduler):
        return NoiseLevel.flow(current_sigma(scheduler, t))
    abar = alpha_bar_at(scheduler, t, sigma_schedule=sigma_schedule, table=table)
    return NoiseLevel.variance_preserving(abar)


def _check_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict_x0(x_in: Tensor, model_output: Tensor, level: NoiseLevel, prediction_type: str) -> Tensor:
    """x0_hat from the model output (paper Eq. 2 for epsilon); same operations as diffusers' SAG."""
    _check_type(prediction_type)
    a, b = level.on(x_in)
    if prediction_type == "epsilon":
        return (x_in - b * model_output) / a
    if prediction_type == "sample":
        return model_output
    if prediction_type == "flow":
        return x_in - b * model_output
    return a * x_in - b * model_output


def predict_eps(x_in: Tensor, model_output: Tensor, level: NoiseLevel, prediction_type: str) -> Tensor:
    """eps_hat from the model output; same operations as diffusers' SAG."""
    _check_type(prediction_type)
    a, b = level.on(x_in)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (x_in - a * model_output) / b
    if prediction_type == "flow":
        return x_in + a * model_output
    return b * x_in + a * model_output


def renoise(x0: Tensor, eps: Tensor, level: NoiseLevel) -> Tensor:
    """x = a x0 + b eps with a given eps (as ``scheduler.add_noise`` for variance preserving levels)."""
    if level.alpha_bar is not None:  # as add_noise: alphas_cumprod in the sample's dtype, then the roots
        abar = level.alpha_bar.to(device=x0.device, dtype=x0.dtype)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
    a, b = level.on(x0, cast=True)
    return a * x0 + b * eps


def scheduler_takes_variance(scheduler) -> bool:
    """Whether ``scheduler.step`` expects the learned-variance channels (DDPM with a learned variance)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def output_for_scheduler(model_output: Tensor, channels: int, scheduler) -> Tensor:
    """Drop learned-variance channels unless the scheduler uses them (as diffusers' DiT pipeline does)."""
    if model_output.shape[1] == 2 * channels and not scheduler_takes_variance(scheduler):
        return model_output[:, :channels]
    return model_output


#: Denoisers that diffusers trains by flow matching (they predict a velocity).
FLOW_MODELS = frozenset(
    {"SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel", "SanaTransformer2DModelV2"}
)
#: diffusers' denoiser classes whose checkpoints are diffusion models (eps / v / x0 predictions).
DIFFUSION_MODELS = frozenset(
    {
        "UNet2DConditionModel",
        "UNet2DModel",
        "UNetMotionModel",
        "DiTTransformer2DModel",
        "PixArtTransformer2DModel",
        "HunyuanDiT2DModel",
    }
)


def prediction_type_of(model, scheduler, prediction_type: str | None = None) -> str:
    """The prediction type a guided run of ``model`` with ``scheduler`` uses: ``prediction_type``, else
    "flow" for a flow-matching scheduler, else the scheduler's ``prediction_type``. ValueError where the
    pairing is wrong: a flow-matching model with a diffusion scheduler or the reverse, or a type that
    does not fit the scheduler."""
    flow = is_flow_matching(scheduler)
    ptype = prediction_type or ("flow" if flow else getattr(scheduler.config, "prediction_type", "epsilon"))
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {ptype!r}")
    family = type(getattr(model, "_orig_mod", model)).__name__
    sched = type(scheduler).__name__
    if family in FLOW_MODELS and not flow:
        raise ValueError(
            f"`scheduler`: {family} is a flow-matching model; {sched} is not a flow-matching scheduler (use "
            "FlowMatchEulerDiscreteScheduler or the pipeline's own)"
        )
    if family in DIFFUSION_MODELS and flow:
        raise ValueError(
            f"`scheduler`: {sched} is a flow-matching scheduler; {family} is a diffusion (eps / v / x0) "
            "model: use the scheduler it was trained with"
        )
    if flow != (ptype == "flow"):
        why = (
            "is a flow-matching scheduler, which needs a velocity (prediction_type 'flow')"
            if flow
            else "is not a flow-matching scheduler, so prediction_type 'flow' does not fit it"
        )
        raise ValueError(f"`scheduler`: {sched} {why}; got prediction_type {ptype!r}")
    return ptype
