"""Sample-quality metrics of the SAG paper's tables: FID, sFID, Inception Score, improved precision/recall.

The definitions follow the evaluator of guided-diffusion (Dhariwal & Nichol 2021,
``evaluations/evaluator.py``), which the SAG paper used:

- FID (Heusel et al. 2017): the Frechet distance between Gaussian fits of two sets of pooled features,
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
- sFID (Nash et al. 2021): the same distance on flattened *spatial* features (guided-diffusion: the first
  7 channels of Inception's ``mixed_6/conv`` map).
- Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))``, averaged over splits.
- Improved precision and recall (Kynkaanniemi et al. 2019): each sample's k-NN ball (k = 3) in its own
  set approximates that set's manifold; precision is the fraction of generated samples inside some real
  sample's ball, recall the fraction of real samples inside some generated sample's ball.

Every function takes NumPy arrays or torch tensors of features and returns plain Python floats, so the
metrics do not depend on which feature extractor produced the features (see
:mod:`attnguide.apps.eval.features`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FrechetToReference",
    "GaussianStats",
    "fid_from_features",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "knn_radii",
    "precision_recall",
]

ArrayLike = np.ndarray | Tensor


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


def gaussian_stats(features: ArrayLike) -> GaussianStats:
    """The Gaussian fit of ``features`` (N, D): sample mean and unbiased covariance (``np.cov``).

    Features of more than two dimensions are flattened per sample (N, ...) -> (N, D).
    """
    f = _np64(features)
    if f.ndim == 1:
        f = f[:, None]
    f = f.reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {f.shape[0]}")
    return GaussianStats(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False)), f.shape[0])


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    eps: float = 1e-6,
    *,
    strict: bool = True,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as guided-diffusion's evaluator.

    ``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))`` with
    :func:`scipy.linalg.sqrtm`. Where the square root is not finite (a singular product), ``eps`` is
    added to both diagonals and it is taken again. A complex result (round-off on a nearly singular
    product) keeps its real part when the imaginary parts of its diagonal are within 1e-3 of zero;
    larger imaginary parts raise ``ValueError``, as in the reference evaluator; with ``strict=False``
    the trace is then taken from the eigenvalues of ``sigma1 sigma2`` instead (real and >= 0 in exact
    arithmetic for covariance matrices: ``Tr sqrt(A) = sum sqrt(eig(A))``).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's "matrix is singular" notice; handled below
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = float(np.max(np.abs(covmean.imag)))
            if not strict:
                eig = np.linalg.eigvals(sigma1.dot(sigma2)).real.clip(min=0.0)
                tr = float(np.sqrt(eig).sum())
                return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)
            raise ValueError(f"Frechet distance: imaginary component {m} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(
    features1: ArrayLike | GaussianStats,
    features2: ArrayLike | GaussianStats,
    eps: float = 1e-6,
    *,
    strict: bool = True,
) -> float:
    """FID (or sFID, given spatial features) between two feature sets (N, D) or their :class:`GaussianStats`.

    ``strict`` as in :func:`frechet_distance`.
    """
    s1 = features1 if isinstance(features1, GaussianStats) else gaussian_stats(features1)
    s2 = features2 if isinstance(features2, GaussianStats) else gaussian_stats(features2)
    return frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, eps=eps, strict=strict)


class FrechetToReference:
    """Fast repeated Frechet distances to one fixed reference Gaussian (for bootstrap resampling).

    Uses ``Tr (S_r S_g)^(1/2) = sum sqrt(eig(S_r^(1/2) S_g S_r^(1/2)))`` with ``S_r^(1/2)`` computed once
    (symmetric eigendecomposition), and the eigenvalues taken from the smaller of the D x D and n x n
    Gram forms of the centred features, so each call costs O(min(n, D)^3) instead of a D x D ``sqrtm``.
    Equal to :func:`frechet_distance` up to round-off.
    """

    def __init__(self, reference: ArrayLike | GaussianStats):
        ref = reference if isinstance(reference, GaussianStats) else gaussian_stats(reference)
        w, v = np.linalg.eigh(ref.sigma)
        self.mu = ref.mu
        self.trace = float(np.trace(ref.sigma))
        self.sqrt_sigma = (v * np.sqrt(w.clip(min=0.0))) @ v.T

    def __call__(self, features: ArrayLike) -> float:
        f = _np64(features)
        f = f.reshape(f.shape[0], -1)
        n = f.shape[0]
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {n}")
        mu = f.mean(axis=0)
        a = (f - mu) @ self.sqrt_sigma / math.sqrt(n - 1)
        gram = a @ a.T if n < a.shape[1] else a.T @ a
        tr_covmean = float(np.sqrt(np.linalg.eigvalsh(gram).clip(min=0.0)).sum())
        tr_gen = float(((f - mu) ** 2).sum() / (n - 1))
        diff = mu - self.mu
        return float(diff.dot(diff) + tr_gen + self.trace - 2.0 * tr_covmean)


def inception_score(
    predictions: ArrayLike, splits: int = 10, *, from_logits: bool = False
) -> tuple[float, float]:
    """Inception Score ``exp(mean_x KL(p(y|x) || p(y)))``: (mean, std) over ``splits`` equal parts.

    ``predictions`` (N, K) are class probabilities p(y|x), or logits with ``from_logits=True``. p(y) is
    the mean prediction within each split (as in Salimans et al. and guided-diffusion's evaluator, which
    uses splits of 5000 samples). ``splits`` is capped at N. 0 log 0 counts as 0, so one-hot predictions
    are allowed. Uniform predictions give 1; confident predictions spread evenly over K classes give K.
    """
    p = _np64(predictions)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"predictions must be (N, K) with N >= 1, got shape {p.shape}")
    if from_logits:
        p = p - p.max(axis=1, keepdims=True)
        p = np.exp(p)
        p /= p.sum(axis=1, keepdims=True)
    elif (p < -1e-6).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("predictions must be probabilities (rows >= 0 summing to 1); pass from_logits=True")
    p = np.clip(p, 0.0, None)
    n = p.shape[0]
    splits = max(1, min(int(splits), n))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(math.exp(float(kl.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (len(a), len(b)), float64, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _as_tensor(x: ArrayLike, device: str | torch.device | None) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    return t.reshape(t.shape[0], -1).to(device=device or "cpu", dtype=torch.float64)


def knn_radii(
    features: ArrayLike, k: int = 3, *, batch_size: int = 1024, device: str | torch.device | None = None
) -> Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded), (N,).

    As guided-diffusion's ``ManifoldEstimator``: the (k+1)-th smallest distance, the first being the
    sample itself at distance 0. Computed in row batches of ``batch_size``.
    """
    f = _as_tensor(features, device)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    radii = torch.empty(n, dtype=torch.float64, device=f.device)
    for i in range(0, n, batch_size):
        d = _pairwise_sq(f[i : i + batch_size], f)
        radii[i : i + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii.sqrt()


def _coverage(queries: Tensor, refs: Tensor, ref_radii: Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` within distance ``ref_radii[j]`` of some ``refs[j]``."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    r2 = ref_radii.square()[None, :]
    for i in range(0, queries.shape[0], batch_size):
        d = _pairwise_sq(queries[i : i + batch_size], refs)
        inside[i : i + batch_size] = (d <= r2).any(dim=1)
    return float(inside.double().mean())


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real`` features.

    precision: fraction of fake samples inside the k-NN ball of at least one real sample; recall: fraction
    of real samples inside the k-NN ball of at least one fake sample. Distances are Euclidean, computed
    in float64 in batches of ``batch_size`` rows.
    """
    r, f = _as_tensor(real, device), _as_tensor(fake, device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]}, fake {f.shape[1]}")
    r_radii = knn_radii(r, k, batch_size=batch_size, device=device)
    f_radii = knn_radii(f, k, batch_size=batch_size, device=device)
    precision = _coverage(f, r, r_radii, batch_size)
    recall = _coverage(r, f, f_radii, batch_size)
    return precision, recall
