"""Training the classifier that the evaluator uses as a feature extractor: a small CNN fitted on the
train part of a data set's split (:mod:`.datasets`; by default it never sees the held-out images that are
the evaluation's FID reference) and scored on a validation subset of that part."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import write_atomic, write_json_atomic
from .data import corrupt_background, random_shift, stratified_split
from .datasets import dataset_description, training_images
from .environment import command_line, library_versions, pick_device
from .models import make_digit_classifier

__all__ = ["train_classifier"]

#: The fixed corruption of the held-out digits for the robustness score (seeded with 12345).
HELD_OUT_CORRUPTION = "clamp(x + 0.2 + 0.15 * N(0, 1), -1, 1)"


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> float:
    """Fraction of ``images`` that ``model`` (switched to eval mode) classifies as ``labels``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        logits = model(images[i : i + 500].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + 500]).sum())
    return correct / len(images)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[Tensor, Tensor],
    gen: torch.Generator,
    *,
    batch_size: int,
    robust_aug: float,
    device: torch.device,
) -> float:
    """One pass over ``data`` in a random order with augmentation; returns the mean training loss."""
    images, labels = data
    model.train()
    perm = torch.randperm(len(images), generator=gen)
    total = 0.0
    for i in range(0, len(perm), batch_size):
        b = perm[i : i + batch_size]
        x = random_shift(images[b], 2, gen)
        if robust_aug > 0:
            x = corrupt_background(x, gen, prob=robust_aug)
        x = x.to(device)
        loss = F.cross_entropy(model(x), labels[b].to(device), label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        total += float(loss.detach()) * len(b)
    return total / len(images)


def _fit(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    gen: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    robust_aug: float,
    device: torch.device,
) -> None:
    """AdamW with a one-cycle learning rate for ``epochs`` epochs, printing the validation accuracy."""
    steps_per_epoch = math.ceil(len(train[0]) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(epochs):
        loss = _train_epoch(
            model,
            optimizer,
            lr_schedule,
            train,
            gen,
            batch_size=batch_size,
            robust_aug=robust_aug,
            device=device,
        )
        acc = _accuracy(model, *held_out, device)
        print(f"classifier epoch {epoch + 1}/{epochs}  loss {loss:.4f}  validation acc {acc:.4f}", flush=True)


def _scores(
    model: nn.Module, train: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], device: torch.device
) -> dict[str, float]:
    """Accuracy on the held-out digits, on the same digits corrupted, and on the training digits."""
    x_test, y_test = held_out
    scores = {
        "train_accuracy": _accuracy(model, *train, device),
        "held_out_accuracy": _accuracy(model, x_test, y_test, device),
    }
    g_eval = torch.Generator().manual_seed(12345)
    x_test_corrupt = (x_test + 0.2 + 0.15 * torch.randn(x_test.shape, generator=g_eval)).clamp(-1.0, 1.0)
    scores["held_out_accuracy_corrupted"] = _accuracy(model, x_test_corrupt, y_test, device)
    return scores


def _save_weights(model: nn.Module, folder: Path) -> None:
    """``folder/model.safetensors``, written atomically from the model's (CPU) state dict."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def _augmentation(robust_aug: float) -> str:
    """How the training digits were augmented, in words."""
    text = "random shift up to 2 px"
    if robust_aug:
        text += f"; for {robust_aug:.0%} of digits clamp(x + U(0, 0.3) + U(0, 0.25) * N(0, 1))"
    return text


def train_classifier(
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 15,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    held_out_per_class: int = 50,
    robust_aug: float = 0.5,
    command: str | None = None,
    data: str = "train",
    folder: str = "classifier",
    width: int = 32,
    feature_dim: int = 128,
    dataset: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train :class:`DigitClassifier` on the images of ``data`` and report its accuracy on a validation set.

    ``dataset`` (:mod:`.datasets`: "mnist" or "fashion-mnist", ``data_dir`` the folder of its IDX files)
    and ``data``, the part of its split to use: ``"train"`` (default: the evaluation's held-out reference
    stays unseen) or ``"all"``. The validation set is ``held_out_per_class`` images per class of those,
    chosen with ``seed``; the classifier fits the rest. Training uses AdamW with a one-cycle learning
    rate, random shifts of up to 2 pixels and, for a fraction ``robust_aug`` of the images, a brightened,
    noisy background (:func:`corrupt_background`: the classifier judges a generated image's shape, not
    its residual noise). Writes ``out_dir/<folder>/model.safetensors`` and ``config.json``, whose record
    also gives the held-out accuracy on corrupted images (offset 0.2, noise sigma 0.15).

    Returns:
        The ``config.json`` record (including ``held_out_accuracy``).
    """
    if not folder or Path(folder).name != folder or folder in (".", ".."):
        raise ValueError(f"folder must be a plain folder name inside out_dir, got {folder!r}")
    dev = pick_device(device)
    images, labels, split_record = training_images(dataset, data, data_dir)
    train_idx, test_idx = stratified_split(labels, held_out_per_class, seed)
    train, held_out = (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 2)
    model = make_digit_classifier(width=width, feature_dim=feature_dim).to(dev)
    t0 = time.time()
    fit = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "robust_aug": robust_aug}
    _fit(model, train, held_out, gen, device=dev, **fit)
    wall_s = time.time() - t0
    scores = _scores(model, train, held_out, dev)

    target = Path(out_dir) / folder
    model.to("cpu")
    _save_weights(model, target)
    record: dict[str, Any] = {
        "class_name": "attnguide.apps.train.DigitClassifier",
        "architecture": model.config,
        "input": "(N, 1, 28, 28) float in [-1, 1], background -1",
        "features": f"features(x) -> (N, {feature_dim}) global-average-pooled; "
        f"spatial_features(x) -> (N, {feature_dim}, 7, 7)",
        **scores,
        "held_out_corruption": HELD_OUT_CORRUPTION,
        "augmentation": _augmentation(robust_aug),
        "held_out": f"{held_out_per_class} images per class ({len(test_idx)} total) of the {data} images, "
        f"split seed {seed} (a validation set: not the evaluation's held-out reference)",
        "train_size": len(train_idx),
        "data_split": split_record,
        **fit,
        "seed": seed,
        "wall_time_s": round(wall_s, 1),
        "device": str(dev),
        "command": command if command is not None else command_line(None),
        "dataset": dataset_description(dataset),
        "dataset_name": dataset,
        "versions": library_versions(),
    }
    write_json_atomic(target / "config.json", record)
    print(
        f"classifier: validation accuracy {scores['held_out_accuracy']:.4f} "
        f"(corrupted {scores['held_out_accuracy_corrupted']:.4f}, {wall_s:.0f} s); saved to {target}",
        flush=True,
    )
    return record
