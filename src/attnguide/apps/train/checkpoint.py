"""Resumable diffusion training: the state a run carries from step to step, and the checkpoint file
that holds it, so that an interrupted run goes on where it stopped with the same random stream."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import write_atomic

__all__ = ["CHECKPOINT_NAME", "TrainingState", "resume_from_checkpoint", "save_checkpoint"]

#: File name of the checkpoint in the output folder.
CHECKPOINT_NAME = "checkpoint.pt"


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
    path: str | os.PathLike[str], state: TrainingState, *, unet_kwargs: dict[str, Any], seed: int
) -> None:
    """Write ``state`` to ``path`` atomically (an interruption mid-write leaves the old checkpoint)."""
    payload = {
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "step": state.step,
        "losses": state.losses,
        "elapsed_s": state.elapsed_s(),
        "unet_kwargs": unet_kwargs,
        "seed": seed,
    }
    write_atomic(path, lambda p: torch.save(payload, p))


def resume_from_checkpoint(path: str | os.PathLike[str], state: TrainingState, device: torch.device) -> bool:
    """Load the checkpoint at ``path`` into ``state`` if there is one; returns whether there was."""
    path = Path(path)
    if not path.exists():
        return False
    ckpt = torch.load(path, map_location=device, weights_only=False)
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.generator.set_state(ckpt["generator"])
    state.step = int(ckpt["step"])
    state.losses = list(ckpt["losses"])
    state.elapsed_before_s = float(ckpt["elapsed_s"])
    return True
