"""Argument checks of the public API, shared by the engine (SAG, PAG, Guider, sample_loop) and the
pipelines: each raises a ValueError (a wrong value) or TypeError (a wrong kind of object) whose message
names the argument, what was given and what is allowed, in the form "`name` must be ..., got ...".

None of them runs a model; :func:`check_latents` and :func:`check_finite_output` read one value back
from the device (one host sync), the others look at Python values only.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .parameterization import is_flow_matching


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    open_minimum: bool = False,
    note: str = "",
) -> float:
    """``value`` as a float if it is a finite real number in [minimum, maximum] ((minimum, maximum] with
    ``open_minimum``), else ValueError naming ``name``; ``note`` says what the number means."""
    low = "(" if open_minimum else "["
    if minimum == -math.inf and maximum == math.inf:
        allowed = "a finite number"
    elif maximum == math.inf:
        allowed = f"a finite number {'>' if open_minimum else '>='} {minimum:g}"
    else:
        allowed = f"a number in {low}{minimum:g}, {maximum:g}]"
    ok = _is_real(value) and math.isfinite(value)
    ok = ok and (value > minimum if open_minimum else value >= minimum) and value <= maximum
    if not ok:
        raise ValueError(f"`{name}` must be {allowed}{note}, got {value!r}")
    return float(value)


def check_scale(name: str, value: float, *, minimum: float = 0.0) -> float:
    """Validate a scale: a finite real number >= ``minimum``; ValueError naming ``name`` otherwise."""
    if not _is_real(value) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"`{name}` must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def check_window(name: str, window: Any) -> tuple[float, float]:
    """A step window: a (start, stop) pair of fractions of the sampling steps, 0 <= start <= stop <= 1."""
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise ValueError(f"`{name}` must be a (start, stop) pair of fractions in [0, 1], got {window!r}")
    for which, v in zip(("start", "stop"), window, strict=True):
        if not _is_real(v) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"`{name}` {which} must be a fraction in [0, 1], got {v!r} (in {window!r})")
    start, stop = float(window[0]), float(window[1])
    if start > stop:
        raise ValueError(f"`{name}` start ({start}) must not exceed stop ({stop})")
    return start, stop


def check_blocks(name: str, blocks: Any) -> None:
    """None, a transformer-block index, path or pattern, or a sequence of them; ValueError naming ``name``
    otherwise (which blocks exist is checked against the model by ``resolve_blocks``)."""
    if blocks is None or (isinstance(blocks, (int, str)) and not isinstance(blocks, bool)):
        return
    if isinstance(blocks, Sequence) and all(
        isinstance(b, (int, str)) and not isinstance(b, bool) for b in blocks
    ):
        return
    raise ValueError(
        f"`{name}` must be a block index, a block path or pattern, or a list of them; got {blocks!r}"
    )


def check_layers(name: str, layers: Any) -> None:
    """None, a layer path or pattern, or a sequence of them; ValueError naming ``name`` otherwise (which
    names exist is checked against the model by ``resolve_layers``)."""
    if layers is None or isinstance(layers, str):
        return
    if isinstance(layers, Sequence) and all(isinstance(v, str) for v in layers):
        return
    raise ValueError(
        f"`{name}` must be None, a self-attention layer path or pattern (str) or a list of them, "
        f"got {layers!r}"
    )


def check_eta(eta: Any) -> float:
    """DDIM's eta (noise weight of DDIM-style schedulers): a number in [0, 1]."""
    return check_number(
        "eta", eta, minimum=0.0, maximum=1.0, note=" (DDIM's eta: 0 is deterministic DDIM, 1 is DDPM-like)"
    )


def num_train_timesteps(scheduler: Any) -> int | None:
    """The number of training timesteps of ``scheduler`` (its config's), None where it has none."""
    n = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def check_steps(scheduler: Any, steps: Any, name: str = "num_inference_steps") -> int:
    """A number of sampling steps: a positive int, at most the scheduler's training timesteps."""
    positive_int(name, steps)
    limit = num_train_timesteps(scheduler)
    if limit is not None and steps > limit:
        raise ValueError(
            f"`{name}` must be at most the scheduler's num_train_timesteps ({limit}), got {steps}"
        )
    return steps


def check_schedule(scheduler: Any, name: str, values: Any) -> None:
    """Custom ``timesteps`` or ``sigmas`` (None: not given): a non-empty 1-D list of finite numbers
    (timesteps in [0, num_train_timesteps), T included for flow matching; sigmas >= 0) that the
    scheduler's ``set_timesteps`` takes."""
    if values is None:
        return
    if isinstance(values, Tensor):
        items = values.tolist() if values.ndim == 1 else None
    elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        items = None
    else:
        items = list(values)
    what = "timesteps" if name == "timesteps" else "sigmas (noise levels)"
    if items is None:
        raise ValueError(f"`{name}` must be a list of {what}, got {type(values).__name__}")
    if not items:
        raise ValueError(f"`{name}` must hold at least one value, got {values!r}")
    limit = num_train_timesteps(scheduler) if name == "timesteps" else None
    upper = limit if limit is not None else math.inf
    closed = is_flow_matching(scheduler)  # flow timesteps are sigma * T, T included
    for v in items:
        if not _is_real(v) or not math.isfinite(v) or v < 0 or v > upper or (v == upper and not closed):
            allowed = (
                f"numbers in [0, {upper}{']' if closed else ')'}"
                if name == "timesteps"
                else "finite numbers >= 0"
            )
            raise ValueError(f"`{name}` must hold {allowed}, got {v!r}")
    if name not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"`{name}`: the scheduler {type(scheduler).__name__} does not support custom {name}; "
            "pass `num_inference_steps` instead"
        )


def check_generators(generator: Any, batch: int | None, name: str = "generator") -> None:
    """None, a ``torch.Generator``, or a list of them with one per image (``batch``, where known)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if batch is not None and len(generator) != batch:
            raise ValueError(
                f"`{name}` must be one torch.Generator or a list of {batch} (one per image), got a list "
                f"of {len(generator)}"
            )
        return
    raise TypeError(
        f"`{name}` must be None, a torch.Generator or a list of them (one per image), got {generator!r}"
    )


def check_latents(
    name: str,
    latents: Any,
    *,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    finite: bool = True,
) -> Tensor | None:
    """None, or a floating-point tensor of ``shape`` and ``dtype`` (where given) holding finite values
    (one host sync); TypeError for something that is not a tensor, ValueError naming ``name`` otherwise."""
    if latents is None:
        return None
    if not isinstance(latents, Tensor):
        kind = f"{type(latents).__module__}.{type(latents).__name__}"
        raise TypeError(f"`{name}` must be a torch.Tensor, got {kind}")
    if not latents.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {latents.dtype}")
    if dtype is not None and latents.dtype != dtype:
        raise ValueError(f"`{name}` must have the model's dtype {dtype}, got {latents.dtype}")
    if shape is not None and tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"`{name}` must have shape {tuple(shape)} for this call (batch, channels, height and width "
            f"asked for), got {tuple(latents.shape)}"
        )
    if finite and not bool(torch.isfinite(latents).all()):
        raise ValueError(f"`{name}` must hold finite values, got a tensor with NaN or inf")
    return latents


#: Scales beyond these are unusual; a non-finite output with one of them beyond is blamed on it.
USUAL_MAXIMA: dict[str, float] = {
    "guidance_scale": 50.0,
    "sag_scale": 10.0,
    "pag_scale": 50.0,
    "guidance_rescale": 1.0,
    "classifier_scale": 10.0,  # ADM's largest: 10 for its unconditional 256x256 model
}


def non_finite_output_error(scales: Mapping[str, float | None]) -> ValueError:
    """The ValueError for an output with NaN / inf: it names the scale furthest beyond its usual range
    (:data:`USUAL_MAXIMA`) as the likely cause, or says that the scales look usual."""
    given = {k: float(v) for k, v in scales.items() if v is not None and v != 0}
    ratios = {k: abs(v) / USUAL_MAXIMA.get(k, 1.0) for k, v in given.items()}
    worst = max(ratios, key=ratios.get, default=None)
    if worst is not None and ratios[worst] > 1.0:
        return ValueError(
            f"the output is not finite (NaN or inf): `{worst}`={given[worst]:g} is likely too large "
            f"(usual values are up to {USUAL_MAXIMA.get(worst, 1.0):g})"
        )
    listing = ", ".join(f"{k}={v:g}" for k, v in given.items()) or "no guidance"
    return ValueError(
        f"the output is not finite (NaN or inf) with {listing}, all in their usual ranges; check the "
        "inputs (latents, prompt_embeds, images) and the model's dtype (float16 can overflow)"
    )


def finite_flag(x: Tensor) -> Tensor:
    """Whether ``x`` is finite everywhere, as a 0-d bool tensor on its device (no host sync)."""
    return torch.isfinite(x).all()


def all_true(flags: Sequence[Tensor]) -> bool:
    """Whether every 0-d bool tensor in ``flags`` is True, read back with one host sync."""
    if not flags:
        return True
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def check_finite_output(output: Tensor, scales: Mapping[str, float | None]) -> Tensor:
    """``output`` if it is finite everywhere (one host sync), else :func:`non_finite_output_error`."""
    if not all_true([finite_flag(output)]):
        raise non_finite_output_error(scales)
    return output


__all__ = [
    "USUAL_MAXIMA",
    "all_true",
    "check_eta",
    "check_finite_output",
    "check_generators",
    "check_latents",
    "check_layers",
    "check_number",
    "check_scale",
    "check_schedule",
    "check_steps",
    "check_window",
    "finite_flag",
    "non_finite_output_error",
    "num_train_timesteps",
    "positive_int",
]
