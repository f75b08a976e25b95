"""Training the class-conditional MNIST DDPM: the optimisation loop (epsilon-MSE, AdamW, warm-up and
cosine learning rate, EMA), its resumable checkpoints, and the diffusers model folder it writes."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import save_pretrained_atomic, write_json_atomic
from .checkpoint import CHECKPOINT_NAME, TrainingState, resume_from_checkpoint, save_checkpoint
from .data import random_shift
from .datasets import dataset_description, training_images
from .environment import command_line, device_name, library_versions, pick_device
from .models import NULL_LABEL, make_mnist_scheduler, make_mnist_unet

__all__ = ["DiffusionSettings", "train_diffusion"]


@dataclass(frozen=True)
class DiffusionSettings:
    """The hyperparameters of a diffusion run (the keyword arguments of :func:`train_diffusion`)."""

    #: total number of optimisation steps
    steps: int
    #: digits per step
    batch_size: int
    #: peak learning rate
    lr: float
    #: probability of training a sample unconditionally (label replaced by :data:`NULL_LABEL`)
    label_dropout: float
    #: seed of the weight initialisation and of the data / noise stream
    seed: int
    #: maximum EMA decay
    ema_decay: float
    #: learning-rate warm-up steps
    warmup_steps: int
    #: maximum gradient norm (``0`` disables clipping)
    grad_clip: float
    #: random-shift augmentation in pixels (``0`` disables it)
    max_shift: int
    #: print progress every this many steps
    log_every: int
    #: save a resumable checkpoint every this many steps
    checkpoint_every: int
    #: optional wall-time budget in minutes, cumulative over resumes
    max_minutes: float | None

    def out_of_time(self, elapsed_s: float) -> bool:
        """Whether a run that has trained for ``elapsed_s`` seconds has used up its time budget."""
        return self.max_minutes is not None and elapsed_s > 60.0 * self.max_minutes

    def progress(self, step: int, elapsed_s: float) -> float:
        """How far along the run is: the step fraction, or the budget fraction when that is larger."""
        fraction = step / self.steps
        if self.max_minutes is not None:
            fraction = max(fraction, elapsed_s / (60.0 * self.max_minutes))
        return fraction


def _lr_at(step: int, base_lr: float, progress: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps times a cosine decay to ``min_ratio * base_lr``.

    ``progress`` in ``[0, 1]`` drives the cosine (:meth:`DiffusionSettings.progress`), so a run that is
    cut short by its time budget still ends at a low learning rate.
    """
    warm = min(1.0, (step + 1) / max(1, warmup))
    p = min(1.0, max(0.0, progress))
    return base_lr * warm * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _ema_decay_at(step: int, max_decay: float, power: float = 2.0 / 3.0) -> float:
    """EMA decay with warm-up: ``min(max_decay, 1 - (1 + step) ** -power)`` (0 at the first step).

    The warm-up keeps the average from being dominated by the random initial weights in a short run.
    """
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move the EMA weights ``1 - decay`` of the way to the model's; copy the buffers."""
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def _initial_state(
    settings: DiffusionSettings, unet_kwargs: dict[str, Any], device: torch.device
) -> tuple[TrainingState, Any]:
    """A freshly seeded model, its EMA copy, the optimiser and data stream; and the noise schedule."""
    torch.manual_seed(settings.seed)
    model = make_mnist_unet(**unet_kwargs).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = make_mnist_scheduler()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    return TrainingState(model, ema, optimizer, generator), scheduler


def _start_or_resume(
    settings: DiffusionSettings,
    unet_kwargs: dict[str, Any],
    device: torch.device,
    ckpt_path: Path,
    *,
    num_images: int,
    dataset: str,
) -> tuple[TrainingState, Any]:
    """The state to train from (fresh, or the checkpoint's when there is one) and the noise schedule."""
    state, scheduler = _initial_state(settings, unet_kwargs, device)
    resumed = resume_from_checkpoint(
        ckpt_path, state, device, seed=settings.seed, unet_kwargs=unet_kwargs, dataset=dataset
    )
    if resumed:
        print(
            f"resuming from {ckpt_path} at step {state.step} ({state.elapsed_before_s / 60:.1f} min already)",
            flush=True,
        )
    n_params = sum(p.numel() for p in state.model.parameters())
    print(
        f"training {dataset} DDPM: {n_params / 1e6:.2f} M parameters, {num_images} images, device {device}, "
        f"{torch.get_num_threads()} threads, steps {state.step}->{settings.steps}, "
        f"batch {settings.batch_size}, lr {settings.lr}",
        flush=True,
    )
    return state, scheduler


def _draw_batch(
    settings: DiffusionSettings, images: Tensor, labels: Tensor, num_timesteps: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One training batch ``(x0, labels, timesteps, noise)``: shifted digits, some labels nulled."""
    n = settings.batch_size
    idx = torch.randint(0, len(images), (n,), generator=gen)
    x0 = random_shift(images[idx], settings.max_shift, gen)
    y = labels[idx].clone()
    y[torch.rand(n, generator=gen) < settings.label_dropout] = NULL_LABEL
    t = torch.randint(0, num_timesteps, (n,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, y, t, noise


def _optimisation_step(
    settings: DiffusionSettings,
    state: TrainingState,
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    alphas_cumprod: Tensor,
    progress: float,
) -> float:
    """One AdamW step on the epsilon-MSE of ``batch``, then the EMA update; returns the loss."""
    x0, y, t, noise = (v.to(alphas_cumprod.device) for v in batch)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
    loss = F.mse_loss(state.model(xt, t, class_labels=y).sample, noise)

    for group in state.optimizer.param_groups:
        group["lr"] = _lr_at(state.step, settings.lr, progress, settings.warmup_steps)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), settings.grad_clip)
    state.optimizer.step()
    _ema_update(state.ema, state.model, _ema_decay_at(state.step, settings.ema_decay))
    return float(loss.detach())


def _log_progress(
    settings: DiffusionSettings, state: TrainingState, since: tuple[float, int], now: float
) -> None:
    """Print the step, recent loss, speed since ``since`` = ``(time, step)``, learning rate and ETA."""
    rate = (state.step - since[1]) / max(now - since[0], 1e-9)
    recent = state.losses[-settings.log_every :]
    eta = (settings.steps - state.step) / max(rate, 1e-9)
    elapsed = state.elapsed_before_s + now - state.started_at
    print(
        f"step {state.step:6d}/{settings.steps}  loss {sum(recent) / len(recent):.4f}  {rate:.3f} steps/s  "
        f"lr {state.optimizer.param_groups[0]['lr']:.2e}  elapsed {elapsed / 60:.1f} min  "
        f"eta {eta / 60:.1f} min",
        flush=True,
    )


def _train_loop(
    settings: DiffusionSettings,
    state: TrainingState,
    data: tuple[Tensor, Tensor],
    scheduler: Any,
    device: torch.device,
    checkpoint: Callable[[], None],
) -> bool:
    """Train up to ``settings.steps``; returns whether the time budget stopped the run first."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
    num_timesteps = scheduler.config.num_train_timesteps
    state.model.train()
    state.started_at = time.time()
    since = (state.started_at, state.step)
    while state.step < settings.steps:
        if settings.out_of_time(state.elapsed_s()):
            print(
                f"time budget of {settings.max_minutes} min reached at step {state.step}; stopping",
                flush=True,
            )
            return True
        progress = settings.progress(state.step, state.elapsed_s())
        batch = _draw_batch(settings, *data, num_timesteps, state.generator)
        state.losses.append(_optimisation_step(settings, state, batch, alphas_cumprod, progress))
        state.step += 1
        if state.step % settings.log_every == 0 or state.step == settings.steps:
            now = time.time()
            _log_progress(settings, state, since, now)
            since = (now, state.step)
        if state.step % settings.checkpoint_every == 0 and state.step < settings.steps:
            checkpoint()
    return False


def _save_model_folder(out: Path, ema: nn.Module, scheduler: Any) -> None:
    """Write the diffusers layout: ``unet/`` (the EMA weights), ``scheduler/`` and ``model_index.json``."""
    import diffusers

    save_pretrained_atomic(ema, out / "unet", safe_serialization=True)
    save_pretrained_atomic(scheduler, out / "scheduler")
    model_index = {
        "_class_name": ["attnguide", "DDPMSAGPipeline"],
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    write_json_atomic(out / "model_index.json", model_index)


def _loss_curve(losses: list[float], points: int = 100) -> list[list[float]]:
    """The loss history in at most ``points`` bins: ``[last step of the bin, mean loss of the bin]``."""
    width = max(1, -(-len(losses) // points))
    return [
        [min(i + width, len(losses)), round(sum(losses[i : i + width]) / len(losses[i : i + width]), 5)]
        for i in range(0, len(losses), width)
    ]


def _training_record(
    settings: DiffusionSettings,
    state: TrainingState,
    *,
    command: str,
    stopped_early: bool,
    wall_s: float,
    device: torch.device,
    unet_kwargs: dict[str, Any],
    num_images: int,
    data_split: dict[str, Any],
    dataset: str,
) -> dict[str, Any]:
    """The ``training.json`` record: the settings, the outcome and the environment of a run, and the
    digits it trained on (``data_split``: the split record, which the evaluation compares with its
    reference digits)."""
    tail = state.losses[-200:]
    budget = settings.max_minutes
    return {
        "command": command,
        "steps": state.step,
        "requested_steps": settings.steps,
        "stopped_early": stopped_early,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "lr_schedule": (
            f"linear warm-up {settings.warmup_steps} steps times cosine decay to 10% of lr; "
            "cosine progress = "
            + ("step / steps" if budget is None else f"max(step / steps, elapsed / {budget} min)")
        ),
        "max_minutes": budget,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "optimizer": "AdamW(weight_decay=0)",
        "grad_clip": settings.grad_clip,
        "label_dropout": settings.label_dropout,
        "null_label": NULL_LABEL,
        "ema_decay": settings.ema_decay,
        "ema_schedule": "min(ema_decay, 1 - (1 + step) ** -2/3)",
        "augmentation": f"random shift up to {settings.max_shift} px" if settings.max_shift > 0 else "none",
        "seed": settings.seed,
        "parameters": sum(p.numel() for p in state.model.parameters()),
        "unet_kwargs": unet_kwargs,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "final_loss_definition": "mean epsilon-MSE of the last 200 training steps",
        "loss_curve": _loss_curve(state.losses),
        "loss_curve_definition": "[step, mean epsilon-MSE of the steps since the previous point]",
        "wall_time_s": round(wall_s, 1),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "dataset": dataset_description(dataset),
        "dataset_name": dataset,
        "num_images": num_images,
        "data_split": data_split,
        "weights": "EMA",
    }


def train_diffusion(
    out_dir: str | os.PathLike[str],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    label_dropout: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    ema_decay: float = 0.999,
    warmup_steps: int = 100,
    grad_clip: float = 1.0,
    max_shift: int = 2,
    log_every: int = 25,
    checkpoint_every: int = 100,
    max_minutes: float | None = None,
    keep_checkpoint: bool = False,
    command: str | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    data: str = "train",
    dataset: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train the class-conditional DDPM (epsilon-MSE) and save its EMA weights in diffusers layout.

    Each step draws a batch of images (shifted by up to ``max_shift`` pixels), replaces each label by
    :data:`NULL_LABEL` with probability ``label_dropout``, draws uniform timesteps and Gaussian noise,
    and minimises ``MSE(unet(x_t, t, y), noise)`` with AdamW (linear warm-up, cosine decay to 10 % of
    ``lr`` over ``steps`` or ``max_minutes``, gradient clipping); the EMA of the weights is saved
    (:class:`DiffusionSettings`). It stops early, and still saves, when ``max_minutes`` is used up.

    It resumes from ``out_dir/checkpoint.pt`` (read with ``weights_only=True``; one that cannot be read
    so, or that another seed, model or data set wrote, is a SystemExit), replaced atomically every
    ``checkpoint_every`` steps and removed at the end unless ``keep_checkpoint``. It writes ``unet/``,
    ``scheduler/``, ``model_index.json`` and ``training.json``. ``device``: "cpu", "cuda", None / "auto";
    ``command``: the command line to record; ``unet_kwargs`` go to :func:`make_mnist_unet`. ``dataset``
    ("mnist" or "fashion-mnist", :mod:`.datasets`; ``data_dir`` the folder of its IDX files) and
    ``data``, the part of its split: "train" (default: the held-out part stays unseen, the evaluation's
    reference) or "all"; the split record goes into ``training.json`` as ``data_split``.

    Returns:
        The record written to ``training.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    unet_kwargs = dict(unet_kwargs or {})
    warmup = max(1, min(warmup_steps, steps // 10))
    settings = DiffusionSettings(  # in the order of its fields
        *(steps, batch_size, lr, label_dropout, seed, ema_decay, warmup, grad_clip, max_shift),
        *(log_every, checkpoint_every, max_minutes),
    )
    images, labels, data_split = training_images(dataset, data, data_dir)
    ckpt_path = out / CHECKPOINT_NAME
    state, scheduler = _start_or_resume(
        settings, unet_kwargs, dev, ckpt_path, num_images=len(images), dataset=dataset
    )

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, state, unet_kwargs=unet_kwargs, seed=seed, dataset=dataset)

    stopped_early = _train_loop(settings, state, (images, labels), scheduler, dev, checkpoint)
    checkpoint()
    record = _training_record(
        settings,
        state,
        command=command if command is not None else command_line(None),
        stopped_early=stopped_early,
        wall_s=state.elapsed_s(),
        device=dev,
        unet_kwargs=unet_kwargs,
        num_images=len(images),
        data_split=data_split,
        dataset=dataset,
    )
    _finish(out, state, scheduler, record, None if keep_checkpoint else ckpt_path)
    return record


def _finish(
    out: Path, state: TrainingState, scheduler: Any, record: dict[str, Any], drop: Path | None
) -> None:
    """Write the model folder (the EMA weights) and ``training.json``, remove the checkpoint ``drop``
    (None: keep it), and say so."""
    state.ema.to("cpu")
    _save_model_folder(out, state.ema, scheduler)
    write_json_atomic(out / "training.json", record)
    if drop is not None:
        drop.unlink(missing_ok=True)
    loss = "n/a" if record["final_loss"] is None else f"{record['final_loss']:.4f}"
    print(
        f"done: {state.step} steps, final loss {loss}, {record['wall_time_s'] / 60:.1f} min; saved to {out}",
        flush=True,
    )
