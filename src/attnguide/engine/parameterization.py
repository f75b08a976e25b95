"""Model-output conversions and the noise level of the current step, for any diffusers scheduler.

Everything here works in the model's input space, where x_in = sqrt(abar) x0 + sqrt(1 - abar) eps
(variance preserving; paper Eq. 2). For schedulers whose samples are variance exploding (Euler, Heun,
LMS: x = x0 + sigma eps), ``scheduler.scale_model_input`` maps the sample into that space and
abar = 1 / (1 + sigma^2), with sigma the scheduler's sigma at the current step.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SIGMA_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


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
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = scheduler.index_for_timestep(t)
        sigma = scheduler.sigmas[index].to(torch.float32)
        return 1.0 / (1.0 + sigma**2)
    if table is not None and isinstance(t, Tensor) and t.device == table.device:
        return table[t.long()]
    return scheduler.alphas_cumprod[int(t)]


def predict_x0(x_in: Tensor, model_output: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """x0_hat from the model output (paper Eq. 2 for epsilon); same operations as diffusers' SAG."""
    alpha_bar = alpha_bar.to(x_in.device)
    beta = 1 - alpha_bar
    if prediction_type == "epsilon":
        return (x_in - beta**0.5 * model_output) / alpha_bar**0.5
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return (alpha_bar**0.5) * x_in - (beta**0.5) * model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predict_eps(x_in: Tensor, model_output: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """eps_hat from the model output; same operations as diffusers' SAG."""
    alpha_bar = alpha_bar.to(x_in.device)
    beta = 1 - alpha_bar
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (x_in - (alpha_bar**0.5) * model_output) / (beta**0.5)
    if prediction_type == "v_prediction":
        return (beta**0.5) * x_in + (alpha_bar**0.5) * model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def renoise(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """q(x_t | x0) with a given eps: sqrt(abar) x0 + sqrt(1 - abar) eps (as ``scheduler.add_noise``)."""
    alpha_bar = alpha_bar.to(device=x0.device, dtype=x0.dtype)
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps


def split_learned_variance(model_output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """Split an output with learned variance (2C channels, IDDPM/ADM/DiT) into (prediction, variance).

    Outputs with C channels come back as (output, None). Any other channel count raises ValueError.
    """
    c = model_output.shape[1]
    if c == channels:
        return model_output, None
    if c == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    raise ValueError(
        f"the model returned {c} channels for an input of {channels}; attnguide understands C channels "
        "(a prediction) or 2C channels (a prediction and a learned variance)"
    )


def scheduler_takes_variance(scheduler) -> bool:
    """Whether ``scheduler.step`` expects the learned-variance channels (DDPM with a learned variance)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def output_for_scheduler(model_output: Tensor, channels: int, scheduler) -> Tensor:
    """Drop learned-variance channels unless the scheduler uses them (as diffusers' DiT pipeline does)."""
    if model_output.shape[1] == 2 * channels and not scheduler_takes_variance(scheduler):
        return model_output[:, :channels]
    return model_output
