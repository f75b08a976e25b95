"""Resumable diffusion training: the state a run carries from step to step, and the checkpoint file
that holds it, so that an interrupted run goes on where it stopped with the same random stream.

The checkpoint is read with ``torch.load(weights_only=True)``: only tensors, numbers, strings and plain
containers are accepted, so a crafted file cannot run code; a file that cannot be read that way, or
that belongs to another run, stops the run with a message saying what to do."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "TrainingState",
    "check_checkpoint",
    "read_checkpoint",
    "resume_from_checkpoint",
    "save_checkpoint",
]

#: File name of the checkpoint in the output folder.
CHECKPOINT_NAME = "checkpoint.pt"
#: The ``format`` entry of the checkpoints this version writes (older ones have none).
CHECKPOINT_FORMAT = "attnguide-train-checkpoint/1"
#: The entries a checkpoint must have, and their types.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "ema": dict,
    "optimizer": dict,
    "generator": torch.Tensor,
    "step": int,
    "losses": list,
    "elapsed_s": (int, float),
    "unet_kwargs": dict,
    "seed": int,
}
_ADVICE = "Move or delete it to train from scratch."


@dataclass
class TrainingState:
    """Everything a diffusion run changes as it trains (the checkpoint holds all of it)."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)
    #: wall time of the earlier sessions of this run (before the last resume)
    elapsed_before_s: float = 0.0
    #: when this session started training (``time.time()``)
    started_at: float = field(default_factory=time.time)

    def elapsed_s(self) -> float:
        """Wall time of the whole run so far, over all its sessions (drives the time budget)."""
        return self.elapsed_before_s + (time.time() - self.started_at)


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainingState,
    *,
    unet_kwargs: dict[str, Any],
    seed: int,
    dataset: str = "mnist",
) -> None:
    """Write ``state`` to ``path`` atomically (an interruption mid-write leaves the old checkpoint)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "step": state.step,
        "losses": state.losses,
        "elapsed_s": state.elapsed_s(),
        "unet_kwargs": unet_kwargs,
        "seed": seed,
        "dataset": dataset,
    }
    write_atomic(path, lambda p: torch.save(payload, p))


def _unusable(path: Path, why: str) -> SystemExit:
    return SystemExit(f"error: cannot resume from {path}: {why}. {_ADVICE}")


def _reason(err: BaseException) -> str:
    """``err`` in one short line: for the weights-only unpickler, what it refused (not torch's advice
    to load the file without ``weights_only``)."""
    text = str(err).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    line = " ".join(m.group(1).split()) if m else re.split(r"\.\s", (text.splitlines() or [""])[0])[0]
    return f"{type(err).__name__}: {line[:200]}"


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` on the CPU and checked for the
    entries :func:`save_checkpoint` writes; SystemExit with a clear message otherwise."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: the error below says more
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a crafted pickle, a truncated file, not a torch file at all
        why = f"it is not a checkpoint that loads safely ({_reason(err)}); nothing in it ran"
        raise _unusable(path, why) from None
    if not isinstance(ckpt, dict):
        raise _unusable(path, f"it holds a {type(ckpt).__name__}, not a training checkpoint")
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise _unusable(path, f"its format is {ckpt['format']!r}, not {CHECKPOINT_FORMAT!r}")
    bad = [k for k, kind in _FIELDS.items() if not isinstance(ckpt.get(k), kind)]
    if bad:
        raise _unusable(path, f"it lacks (or has the wrong type of) {', '.join(bad)}")
    if ckpt["generator"].dtype != torch.uint8:
        raise _unusable(path, "its generator state is not a byte tensor")
    return ckpt


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_checkpoint(
    path: str | os.PathLike[str],
    *,
    seed: int | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if there is none), checked by :func:`read_checkpoint` and, when
    given, against this run's ``seed``, ``unet_kwargs`` and ``dataset`` (checkpoints without one are
    MNIST's); SystemExit if it cannot be resumed."""
    path = Path(path)
    if not path.exists():
        return None
    ckpt = read_checkpoint(path)
    if seed is not None and ckpt["seed"] != seed:
        raise _unusable(path, f"it was written by a run with --seed {ckpt['seed']}, not {seed}")
    if unet_kwargs is not None and not _same(ckpt["unet_kwargs"], unet_kwargs):
        raise _unusable(path, f"its model options {ckpt['unet_kwargs']} differ from this run's {unet_kwargs}")
    if dataset is not None and ckpt.get("dataset", "mnist") != dataset:
        raise _unusable(path, f"it was trained on --dataset {ckpt.get('dataset', 'mnist')}, not {dataset}")
    return ckpt


def resume_from_checkpoint(
    path: str | os.PathLike[str],
    state: TrainingState,
    device: torch.device | None = None,
    *,
    seed: int | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    dataset: str | None = None,
) -> bool:
    """Load the checkpoint at ``path`` into ``state`` if there is one (checked as in
    :func:`check_checkpoint`); returns whether there was. Tensors are read on the CPU and moved to the
    model's device by ``load_state_dict`` (``device`` is accepted for compatibility)."""
    ckpt = check_checkpoint(path, seed=seed, unet_kwargs=unet_kwargs, dataset=dataset)
    if ckpt is None:
        return False
    try:
        state.model.load_state_dict(ckpt["model"])
        state.ema.load_state_dict(ckpt["ema"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.generator.set_state(ckpt["generator"])
        state.losses = [float(v) for v in ckpt["losses"]]
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise _unusable(Path(path), f"it does not fit this model ({_reason(err)})") from None
    state.step = int(ckpt["step"])
    state.elapsed_before_s = float(ckpt["elapsed_s"])
    return True
