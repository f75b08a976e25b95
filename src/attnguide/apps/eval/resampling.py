"""Paired bootstrap statistics that resample the reference too.

A metric such as FID compares the samples of an arm with a finite reference set; its sampling variance
comes from both. Each bootstrap replicate r therefore draws the sample indices (one draw for every arm,
so the arms stay paired: same seeds) AND the reference indices (one draw for every arm), and evaluates
every arm on its resample against that reference resample:

    FID_r(arm)       = Frechet(features_arm[s_r], reference[q_r])
    precision_r(arm) = mean over i in s_r of [sample i lies in the k-NN ball of some j in q_r]
    recall_r(arm)    = mean over j in q_r of [reference j lies in the k-NN ball of some i in s_r]
    IS_r(arm)        = the Inception Score of features_arm[s_r] (no reference)

The k-NN radii are those of the full sets (a resample repeats images, and a repeated image's radius
would shrink to 0), so a resample only selects which balls and which points count, by multiplicity:
the memberships are computed once and every replicate is a matrix product with its counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from .metrics import (
    FrechetToReference,
    ball_membership,
    gaussian_stats,
    inception_score_resampled,
    knn_radii,
    probabilities,
    single_blas_thread,
)

__all__ = ["Draws", "bootstrap_draws", "resampled_metrics"]

Draws = tuple[np.ndarray, np.ndarray]


def bootstrap_draws(n_samples: int, n_reference: int, reps: int, seed: int) -> Draws:
    """(sample indices (reps, n_samples), reference indices (reps, n_reference)), int32, drawn with
    replacement by ``numpy.random.default_rng(seed)``: the samples first, then the reference."""
    if n_samples < 2 or n_reference < 2 or reps < 0:
        raise ValueError(
            f"need >= 2 samples and reference images and reps >= 0, got {n_samples}, {n_reference}, {reps}"
        )
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, n_samples, (reps, n_samples), dtype=np.int32)
    reference = rng.integers(0, n_reference, (reps, n_reference), dtype=np.int32)
    return samples, reference


def _counts(indices: np.ndarray, n: int) -> torch.Tensor:
    """(n, R) float32: how often each of the n items occurs in each row of ``indices`` (R, m)."""
    reps = indices.shape[0]
    out = torch.zeros(n, reps, dtype=torch.float32)
    cols = torch.arange(reps).repeat_interleave(indices.shape[1])
    out.index_put_(
        (torch.from_numpy(indices.reshape(-1).astype(np.int64)), cols),
        torch.ones(cols.numel()),
        accumulate=True,
    )
    return out


def _frechet(
    features: Mapping[str, np.ndarray], ref: np.ndarray, draws: Draws, log: Callable[[str], None]
) -> dict[str, np.ndarray]:
    """Each arm's Frechet distance on every replicate, against that replicate's reference resample."""
    samples, reference = draws
    out = {arm: np.empty(len(samples)) for arm in features}
    flat = {arm: f.reshape(f.shape[0], -1) for arm, f in features.items()}
    refs = ref.reshape(ref.shape[0], -1)
    with single_blas_thread():
        for r in range(len(samples)):
            to_ref = FrechetToReference(gaussian_stats(refs[reference[r]]))
            for arm, f in flat.items():
                out[arm][r] = to_ref(f[samples[r]])
            if r and r % 100 == 0:
                log(f"  resample {r}/{len(samples)}")
    return out


def _precision_recall(
    features: Mapping[str, np.ndarray], ref: np.ndarray, draws: Draws, k: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each arm's precision and recall on every replicate (see the module text)."""
    samples, reference = draws
    n_ref = ref.shape[0]
    ref_radii = knn_radii(ref, k, squared=True)
    ref_counts = _counts(reference, n_ref)  # (n_ref, R)
    out = {}
    for arm, fake in features.items():
        fake_counts = _counts(samples, fake.shape[0])  # (n, R)
        inside = ball_membership(fake, ref, ref_radii).float()  # (n, n_ref): sample i in ref ball j
        in_some = (inside @ ref_counts) > 0  # (n, R): in some ball of the replicate's reference
        precision = (in_some.float() * fake_counts).sum(0) / samples.shape[1]
        covered = ball_membership(ref, fake, knn_radii(fake, k, squared=True)).float()  # (n_ref, n)
        hit = (covered @ fake_counts) > 0  # (n_ref, R): reference j covered by the replicate's samples
        recall = (hit.float() * ref_counts).sum(0) / reference.shape[1]
        out[arm] = (precision.double().numpy(), recall.double().numpy())
    return out


def resampled_metrics(
    features: Mapping[str, Mapping[str, np.ndarray]],
    ref: Mapping[str, np.ndarray],
    draws: Draws,
    *,
    k: int = 3,
    spatial_reps: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict[str, np.ndarray]]:
    """arm -> metric -> (R,): FID, sFID (its first ``spatial_reps`` replicates, None: all; NaN beyond),
    IS, precision and recall of every arm on every replicate of ``draws`` (:func:`bootstrap_draws`),
    against the replicate's reference resample."""
    arms = list(features)
    reps = len(draws[0])
    out: dict[str, dict[str, np.ndarray]] = {arm: {} for arm in arms}
    log(f"bootstrap with resampled reference: FID ({reps} resamples, {len(arms)} arms)")
    for arm, v in _frechet({a: features[a]["pool"] for a in arms}, ref["pool"], draws, log).items():
        out[arm]["fid"] = v
    if "spatial" in ref and all("spatial" in features[a] for a in arms):
        m = reps if spatial_reps is None else min(reps, spatial_reps)
        log(f"bootstrap with resampled reference: sFID ({m} resamples)")
        part = (draws[0][:m], draws[1][:m])
        for arm, v in _frechet({a: features[a]["spatial"] for a in arms}, ref["spatial"], part, log).items():
            out[arm]["sfid"] = np.concatenate([v, np.full(reps - m, np.nan)])
    log("bootstrap with resampled reference: precision / recall, IS")
    for arm, (precision, recall) in _precision_recall(
        {a: features[a]["pool"] for a in arms}, ref["pool"], draws, k
    ).items():
        out[arm]["precision"], out[arm]["recall"] = precision, recall
    for arm in arms:
        logits = features[arm].get("logits")
        out[arm]["is"] = (
            inception_score_resampled(probabilities(logits, from_logits=True), draws[0])
            if logits is not None
            else np.full(reps, np.nan)
        )
        out[arm].setdefault("sfid", np.full(reps, np.nan))
    return out
