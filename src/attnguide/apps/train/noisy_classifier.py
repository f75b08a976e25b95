"""The noise-aware digit classifier of classifier guidance (ADM, Dhariwal & Nichol 2021, arXiv:2105.05233,
Sec. 4: a classifier p(y | x_t, t) trained on noised images): a small timestep-conditioned CNN trained on
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at random t of the bundled model's scheduler, its loader,
and :func:`cond_fn`, ADM's gradient of log p(y | x_t) for
:class:`attnguide.engine.guidance.ClassifierGuidance`.

Trained on the train part of the data set only (:func:`.datasets.load_split`, the split the diffusion
model and the feature classifiers use); its accuracy at each noise level on the held-out part is recorded in
``noisy_classifier/config.json`` beside the weights. ``attnguide train --noisy-classifier`` trains it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine.guidance import GradFn, classifier_grad_fn
from ..files import write_atomic, write_json_atomic
from ..loading import BUNDLED_MODEL
from .data import random_shift
from .datasets import dataset_description, load_split
from .environment import command_line, library_versions, pick_device
from .models import make_mnist_scheduler

__all__ = [
    "BUNDLED_NOISY_CLASSIFIER",
    "EVAL_TIMESTEPS",
    "NOISY_CLASSIFIER_DIR",
    "NoisyDigitClassifier",
    "cond_fn",
    "load_noisy_classifier",
    "noised",
    "noisy_classifier_of",
    "train_noisy_classifier",
]

#: The sub-folder of a model folder that holds the noise-aware classifier.
NOISY_CLASSIFIER_DIR = "noisy_classifier"
#: The one shipped with the bundled MNIST model.
BUNDLED_NOISY_CLASSIFIER = BUNDLED_MODEL / NOISY_CLASSIFIER_DIR
#: The noise levels (training timesteps) at which the held-out accuracy is recorded.
EVAL_TIMESTEPS = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
#: Seed of the fixed noise of the held-out scores.
EVAL_SEED = 12345


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N, dim) of timesteps ``t`` (N,), integer or float (cos first, as
    ``diffusers``' ``flip_sin_to_cos``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _Block(nn.Module):
    """GroupNorm-SiLU-conv twice with the timestep added per channel in between; residual."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class NoisyDigitClassifier(nn.Module):
    """p(y | x_t, t) for noised 28x28 digits: ``forward(x_t, t) -> logits (N, num_classes)``.

    ``x_t`` in the diffusion model's input space (digits in [-1, 1], noised as x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps); ``t`` the training timestep (N,) or a scalar, integer or float. Residual blocks at
    28, 14 and 7 pixels (``channels``), each given a sinusoidal timestep embedding through an MLP;
    GroupNorm only, so every row is classified on its own (gradients per sample).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), time_dim: int = 64, num_classes: int = 10):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.config = {"channels": list(channels), "time_dim": time_dim, "num_classes": num_classes}
        self.num_classes = num_classes
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, 2 * time_dim), nn.SiLU(), nn.Linear(2 * time_dim, time_dim)
        )
        self.stem = nn.Conv2d(1, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            _Block(cin, cout, time_dim)
            for cin, cout in zip((channels[0], *channels[:-1]), channels, strict=True)
        )
        self.norm = nn.GroupNorm(min(8, channels[-1]), channels[-1])
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Class logits (N, num_classes) of noised digits ``x`` (N, 1, 28, 28) at timesteps ``t``."""
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))


def noised(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, generator: torch.Generator) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (as the scheduler's ``add_noise``), eps drawn from
    ``generator``."""
    abar = alphas_cumprod[t.long()].to(x0.dtype).view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=generator)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def cond_fn(classifier: nn.Module, labels: Tensor) -> GradFn:
    """ADM's ``cond_fn`` for this classifier: ``grad_fn(x, t) = grad_x log softmax(classifier(x, t))[y]``
    with y = ``labels`` (one per image), without ADM's scale (the term's ``scale`` is s)."""
    return classifier_grad_fn(classifier, labels)


def _scheduler_alphas(out: Path) -> tuple[Tensor, str]:
    """``alphas_cumprod`` of the model folder's scheduler (``out/scheduler``) and where it came from; the
    training schedule of :func:`make_mnist_scheduler` where the folder has none yet."""
    folder = out / "scheduler"
    if (folder / "scheduler_config.json").exists():
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(folder).alphas_cumprod, "scheduler/ of the model folder"
    return make_mnist_scheduler().alphas_cumprod, "make_mnist_scheduler()"


@torch.no_grad()
def accuracy_by_timestep(
    model: nn.Module, images: Tensor, labels: Tensor, alphas_cumprod: Tensor, timesteps: tuple[int, ...]
) -> dict[str, float]:
    """Accuracy of ``model`` on ``images`` noised at each of ``timesteps`` (noise seeded with
    :data:`EVAL_SEED`, the same for every model), by timestep."""
    model.eval()
    gen = torch.Generator().manual_seed(EVAL_SEED)
    out = {}
    for t in timesteps:
        tt = torch.full((len(images),), t, dtype=torch.long)
        x = noised(images, tt, alphas_cumprod, gen)
        pred = torch.cat([model(x[i : i + 500], tt[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
        out[str(t)] = float((pred == labels).float().mean())
    return out


def _fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    alphas_cumprod: Tensor,
    gen: torch.Generator,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    log_every: int,
    device: torch.device,
) -> float:
    """AdamW with a one-cycle learning rate for ``steps`` batches of randomly shifted digits, each noised
    at uniform random t; returns the mean loss of the last 100 steps."""
    images, labels = train
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    num_t = len(alphas_cumprod)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        b = torch.randint(0, len(images), (batch_size,), generator=gen)
        t = torch.randint(0, num_t, (batch_size,), generator=gen)
        x = noised(random_shift(images[b], 2, gen), t, alphas_cumprod, gen)
        loss = F.cross_entropy(model(x.to(device), t.to(device)), labels[b].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            tail = losses[-log_every:]
            print(f"noisy classifier step {step + 1}/{steps}  loss {sum(tail) / len(tail):.4f}", flush=True)
    tail = losses[-100:]
    return sum(tail) / len(tail)


def train_noisy_classifier(
    out_dir: str | os.PathLike[str],
    *,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | None = None,
    log_every: int = 100,
    command: str | None = None,
    dataset: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train :class:`NoisyDigitClassifier` on the training images of ``dataset`` (:mod:`.datasets`)
    noised by ``out_dir``'s scheduler and
    write ``out_dir/noisy_classifier/`` (``model.safetensors``, ``config.json`` with the held-out accuracy
    at each of :data:`EVAL_TIMESTEPS`).

    Each step draws ``batch_size`` training digits (shifted by up to 2 pixels), a uniform timestep and
    Gaussian noise per digit, and minimises the cross-entropy of the label at x_t (ADM's classifier
    training). Only the train part of the data set's split is trained on; the held-out part (never seen)
    gives the scores. Returns the ``config.json`` record.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer, got {steps!r}")
    out = Path(out_dir)
    dev = pick_device(device)
    alphas_cumprod, schedule_source = _scheduler_alphas(out)
    split = load_split(dataset, data_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 3)
    model = NoisyDigitClassifier().to(dev)
    t0 = time.time()
    final_loss = _fit(
        model,
        (split.train_images, split.train_labels),
        alphas_cumprod,
        gen,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        log_every=log_every,
        device=dev,
    )
    wall_s = time.time() - t0
    model.to("cpu")
    test_x, test_y = split.held_out_images, split.held_out_labels
    held_out = accuracy_by_timestep(model, test_x, test_y, alphas_cumprod, EVAL_TIMESTEPS)
    sizes = len(split.train_images), len(test_x)
    record = _record(model, held_out, final_loss, wall_s, schedule_source, *sizes, dev, dataset)
    record.update(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        split=split.record,
        command=command if command is not None else command_line(None),
    )
    folder = out / NOISY_CLASSIFIER_DIR
    _save(model, folder, record)
    shown = ", ".join(f"t={t}: {a:.3f}" for t, a in held_out.items())
    print(f"noisy classifier: held-out accuracy {shown} ({wall_s:.0f} s); saved to {folder}", flush=True)
    return record


def _record(
    model: NoisyDigitClassifier,
    held_out: dict[str, float],
    final_loss: float,
    wall_s: float,
    schedule_source: str,
    train_size: int,
    held_out_size: int,
    device: torch.device,
    dataset: str,
) -> dict[str, Any]:
    """The ``config.json`` record of a trained classifier (its architecture is what the loader reads)."""
    return {
        "class_name": "attnguide.apps.train.noisy_classifier.NoisyDigitClassifier",
        "architecture": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": "x_t (N, 1, 28, 28) = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, x0 in [-1, 1]; t (N,)",
        "noise_schedule": schedule_source,
        "training": "cross-entropy at uniform t in [0, 1000), random shift up to 2 px, AdamW one-cycle",
        "final_loss": final_loss,
        "final_loss_definition": "mean cross-entropy of the last 100 training steps (noised digits)",
        "held_out_accuracy_by_timestep": held_out,
        "held_out_noise_seed": EVAL_SEED,
        "train_size": train_size,
        "held_out_size": held_out_size,
        "wall_time_s": round(wall_s, 1),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dataset": dataset_description(dataset),
        "dataset_name": dataset,
        "versions": library_versions(),
    }


def _save(model: nn.Module, folder: Path, record: dict[str, Any]) -> None:
    """``folder/model.safetensors`` and ``folder/config.json``, each written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json_atomic(folder / "config.json", record)


def noisy_classifier_of(model: str | os.PathLike[str]) -> Path:
    """The noise-aware classifier that belongs to the model folder ``model``: its own
    ``noisy_classifier/`` where it has one, else the bundled model's."""
    own = Path(model) / NOISY_CLASSIFIER_DIR
    return own if (own / "model.safetensors").exists() else BUNDLED_NOISY_CLASSIFIER


def load_noisy_classifier(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> NoisyDigitClassifier:
    """The trained :class:`NoisyDigitClassifier` in eval mode, on ``device``.

    path: the ``noisy_classifier/`` folder, or a model folder that holds one; None: the bundled one
    (:data:`BUNDLED_NOISY_CLASSIFIER`). FileNotFoundError naming the folder where there is none.
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else BUNDLED_NOISY_CLASSIFIER
    if not (folder / "model.safetensors").exists() and (folder / NOISY_CLASSIFIER_DIR).is_dir():
        folder = folder / NOISY_CLASSIFIER_DIR
    if not (folder / "model.safetensors").exists() or not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no noisy classifier in {folder} (model.safetensors + config.json); train one with "
            "`attnguide train --noisy-classifier --skip-classifier --skip-diffusion`"
        )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = dict(config.get("architecture", {}))
    if "channels" in arch:
        arch["channels"] = tuple(arch["channels"])
    model = NoisyDigitClassifier(**arch)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()
