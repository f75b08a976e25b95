"""Sample-quality metrics of the SAG paper's tables: FID, sFID, Inception Score, improved precision/recall.

The definitions follow the evaluator of guided-diffusion (Dhariwal & Nichol 2021,
``evaluations/evaluator.py``), which the SAG paper used:

- FID (Heusel et al. 2017): the Frechet distance between Gaussian fits of two sets of pooled features,
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
- sFID (Nash et al. 2021): the same distance on flattened *spatial* features (guided-diffusion: the first
  7 channels of Inception's ``mixed_6/conv`` map).
- Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))``, averaged over consecutive
  splits of 5000 samples (guided-diffusion's ``compute_inception_score(split_size=5000)``: up to 5000
  samples are ONE split).
- Improved precision and recall (Kynkaanniemi et al. 2019): each sample's k-NN ball (k = 3) in its own
  set approximates that set's manifold; precision is the fraction of generated samples inside some real
  sample's ball, recall the fraction of real samples inside some generated sample's ball. Squared
  distances are compared with squared radii, ``<=`` (a point on a radius is inside), as the reference.

For the paired statistics of :mod:`attnguide.apps.eval.scoring` the same metrics are evaluated on many
index sets of one sample set at once (:meth:`FrechetToReference.resampled`,
:func:`inception_score_resampled`, :func:`ball_membership`), and :func:`kendall_tau`,
:func:`normal_p_value` and :func:`bonferroni_z` compare and correct them.

Every function takes NumPy arrays or torch tensors of features and returns plain Python floats, so the
metrics do not depend on which feature extractor produced the features (see
:mod:`attnguide.apps.eval.features`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IS_SPLIT_SIZE",
    "FrechetToReference",
    "GaussianStats",
    "ball_membership",
    "bonferroni_z",
    "fid_from_features",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "inception_score_resampled",
    "kendall_tau",
    "knn_radii",
    "normal_p_value",
    "precision_recall",
    "probabilities",
    "single_blas_thread",
]

#: Samples per Inception Score split, as guided-diffusion's evaluator (``split_size=5000``).
IS_SPLIT_SIZE = 5000

ArrayLike = np.ndarray | Tensor


def single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """One BLAS / LAPACK thread (``threadpoolctl``, when installed; else no change) for the small dense
    problems of the metrics (343 x 343 square roots and eigenvalues). On a CPU that other processes
    share, multi-threaded LAPACK waits for its threads: measured on 2 shared cores (load average 5),
    ``eigvalsh`` of a 343 x 343 matrix took 1.2 s with 2 threads and 5 ms with 1, ``sqrtm`` 4.8 s and
    0.12 s."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


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
    with warnings.catch_warnings(), single_blas_thread():
        warnings.simplefilter("ignore")  # sqrtm's "matrix is singular" notice; handled below
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = float(np.max(np.abs(covmean.imag)))
            if not strict:
                with single_blas_thread():
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
        with single_blas_thread():
            tr_covmean = float(np.sqrt(np.linalg.eigvalsh(gram).clip(min=0.0)).sum())
        tr_gen = float(((f - mu) ** 2).sum() / (n - 1))
        diff = mu - self.mu
        return float(diff.dot(diff) + tr_gen + self.trace - 2.0 * tr_covmean)

    def resampled(
        self,
        features: ArrayLike,
        indices: np.ndarray,
        *,
        device: str | torch.device | None = None,
        batched: bool | None = None,
        max_elements: int = 1 << 22,
    ) -> np.ndarray:
        """The distance of ``features[idx]`` to the reference for every row ``idx`` of ``indices`` (R, m):
        (R,) float64, equal to ``[self(features[idx]) for idx in indices]`` up to round-off.

        The features are projected by ``S_r^(1/2)`` once, not once per row. ``batched`` (default: on a
        GPU ``device`` only) computes the rows in torch batches of ``max_elements`` gathered features,
        float64; on the CPU a loop over the rows (NumPy) is as fast and needs less memory."""
        idx = np.asarray(indices)
        if idx.ndim != 2 or idx.shape[1] < 2:
            raise ValueError(f"indices must be (R, m) with m >= 2, got shape {idx.shape}")
        if batched is None:
            batched = torch.device(device or "cpu").type != "cpu"
        if not batched:
            return self._resampled_loop(_np64(features), idx)
        f = _as_tensor(features, device)
        sqrt_sigma = torch.from_numpy(self.sqrt_sigma).to(f.device)
        g = f @ sqrt_sigma
        ref_mu = torch.from_numpy(self.mu).to(f.device)
        m, d = idx.shape[1], f.shape[1]
        chunk = max(1, max_elements // (m * d))
        out = np.empty(idx.shape[0], dtype=np.float64)
        for i in range(0, idx.shape[0], chunk):
            sel = torch.from_numpy(idx[i : i + chunk].astype(np.int64)).to(f.device)
            fs, gs = f[sel], g[sel]  # (c, m, d)
            mu = fs.mean(dim=1)
            fc = fs - mu[:, None]
            gc = gs - gs.mean(dim=1, keepdim=True)
            gram = gc @ gc.transpose(1, 2) if m < d else gc.transpose(1, 2) @ gc
            eig = torch.linalg.eigvalsh(gram / (m - 1)).clamp_min(0.0)
            tr_covmean = eig.sqrt().sum(dim=1)
            tr_gen = (fc * fc).sum(dim=(1, 2)) / (m - 1)
            diff = mu - ref_mu
            val = (diff * diff).sum(dim=1) + tr_gen + self.trace - 2.0 * tr_covmean
            out[i : i + chunk] = val.cpu().numpy()
        return out

    def _resampled_loop(self, features: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """:meth:`resampled` one row at a time in NumPy (float64)."""
        f = features.reshape(features.shape[0], -1)
        g = f @ self.sqrt_sigma
        m, d = idx.shape[1], f.shape[1]
        out = np.empty(idx.shape[0], dtype=np.float64)
        with single_blas_thread():
            for r, row in enumerate(idx):
                fs, gs = f[row], g[row]
                mu = fs.mean(axis=0)
                gc = gs - gs.mean(axis=0)
                gram = gc @ gc.T if m < d else gc.T @ gc
                tr_covmean = float(np.sqrt(np.linalg.eigvalsh(gram / (m - 1)).clip(min=0.0)).sum())
                tr_gen = float(((fs - mu) ** 2).sum() / (m - 1))
                diff = mu - self.mu
                out[r] = diff.dot(diff) + tr_gen + self.trace - 2.0 * tr_covmean
        return out


def probabilities(predictions: ArrayLike, *, from_logits: bool = False) -> np.ndarray:
    """Class probabilities (N, K) float64: a softmax of logits (``from_logits=True``), else
    ``predictions`` checked to be probabilities (ValueError naming ``predictions`` if not)."""
    p = _np64(predictions)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"predictions must be (N, K) with N >= 1, got shape {p.shape}")
    if from_logits:
        p = p - p.max(axis=1, keepdims=True)
        p = np.exp(p)
        p /= p.sum(axis=1, keepdims=True)
    elif (p < -1e-6).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("predictions must be probabilities (rows >= 0 summing to 1); pass from_logits=True")
    return np.clip(p, 0.0, None)


def _split_score(part: np.ndarray) -> float:
    """``exp(mean_x KL(p(y|x) || p(y)))`` of one split, p(y) its mean prediction; 0 log 0 = 0."""
    py = part.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
    return math.exp(float(kl.sum(axis=1).mean()))


def inception_score(
    predictions: ArrayLike,
    splits: int | None = None,
    *,
    split_size: int = IS_SPLIT_SIZE,
    from_logits: bool = False,
) -> tuple[float, float]:
    """Inception Score ``exp(mean_x KL(p(y|x) || p(y)))``: (mean, std) over splits.

    ``predictions`` (N, K) are class probabilities p(y|x), or logits with ``from_logits=True``. p(y) is
    the mean prediction within each split. The splits are guided-diffusion's: consecutive parts of
    ``split_size`` samples (the last one shorter), so N <= 5000 is ONE split and its std is NaN (one
    value has no spread). ``splits`` instead cuts N into that many near-equal parts (Salimans et al.'s
    10; capped at N). 0 log 0 counts as 0, so one-hot predictions are allowed. Uniform predictions give
    1; confident predictions spread evenly over K classes give K.
    """
    p = probabilities(predictions, from_logits=from_logits)
    n = p.shape[0]
    if splits is not None:
        parts = np.array_split(p, max(1, min(int(splits), n)))
    else:
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        parts = [p[i : i + split_size] for i in range(0, n, split_size)]
    scores = [_split_score(part) for part in parts]
    return float(np.mean(scores)), (float(np.std(scores)) if len(scores) > 1 else math.nan)


def inception_score_resampled(
    probs: np.ndarray, indices: np.ndarray, *, split_size: int = IS_SPLIT_SIZE
) -> np.ndarray:
    """The Inception Score (mean over splits of ``split_size``) of ``probs[idx]`` for every row ``idx``
    of ``indices`` (R, m): (R,), the same as :func:`inception_score` on each resample."""
    p = np.asarray(probs, dtype=np.float64)
    idx = np.asarray(indices)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)  # per sample: sum_y p log p
    out = np.empty(idx.shape[0], dtype=np.float64)
    for r, row in enumerate(idx):
        scores = []
        for i in range(0, len(row), split_size):
            part = row[i : i + split_size]
            py = p[part].mean(axis=0)
            with np.errstate(divide="ignore"):
                log_py = np.where(py > 0, np.log(py), 0.0)
            scores.append(math.exp(float(plogp[part].mean() - py @ log_py)))  # mean KL, p(y) = py
        out[r] = np.mean(scores)
    return out


def _pairwise_sq(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (len(a), len(b)), float64, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _as_tensor(x: ArrayLike, device: str | torch.device | None) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    return t.reshape(t.shape[0], -1).to(device=device or "cpu", dtype=torch.float64)


def knn_radii(
    features: ArrayLike,
    k: int = 3,
    *,
    squared: bool = False,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded), (N,);
    the squared distance with ``squared=True`` (what precision / recall compare, without a square root
    and a square that could move a point on a radius outside it).

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
    return radii if squared else radii.sqrt()


def _coverage(queries: Tensor, refs: Tensor, ref_sq_radii: Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` whose squared distance to some ``refs[j]`` is <= ``ref_sq_radii[j]``."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    r2 = ref_sq_radii[None, :]
    for i in range(0, queries.shape[0], batch_size):
        d = _pairwise_sq(queries[i : i + batch_size], refs)
        inside[i : i + batch_size] = (d <= r2).any(dim=1)
    return float(inside.double().mean())


def ball_membership(
    queries: ArrayLike,
    centres: ArrayLike,
    centre_sq_radii: ArrayLike,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> Tensor:
    """(len(queries), len(centres)) bool: query i lies in the k-NN ball of centre j (squared distance <=
    squared radius ``centre_sq_radii[j]``). Precision and recall of any subset of the sets are means of
    its rows' or columns' ``any`` (the resampled precision / recall of the paired statistics)."""
    q, c = _as_tensor(queries, device), _as_tensor(centres, device)
    r2 = _as_tensor(centre_sq_radii, device).reshape(1, -1)
    if r2.shape[1] != c.shape[0]:
        raise ValueError(f"centre_sq_radii has {r2.shape[1]} values for {c.shape[0]} centres")
    out = torch.empty(q.shape[0], c.shape[0], dtype=torch.bool, device=q.device)
    for i in range(0, q.shape[0], batch_size):
        out[i : i + batch_size] = _pairwise_sq(q[i : i + batch_size], c) <= r2
    return out


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
    of real samples inside the k-NN ball of at least one fake sample. Squared Euclidean distances, in
    float64 in batches of ``batch_size`` rows, are compared with the squared radii (``<=``: a point on a
    radius is inside, as Kynkaanniemi et al. and guided-diffusion).
    """
    r, f = _as_tensor(real, device), _as_tensor(fake, device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]}, fake {f.shape[1]}")
    r_radii = knn_radii(r, k, squared=True, batch_size=batch_size, device=device)
    f_radii = knn_radii(f, k, squared=True, batch_size=batch_size, device=device)
    precision = _coverage(f, r, r_radii, batch_size)
    recall = _coverage(r, f, f_radii, batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------- comparing
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two rankings (e.g. the per-arm FIDs of two feature extractors): 1 = the same
    order, -1 = reversed; NaN with fewer than 2 finite pairs or a constant side. Pairs with a NaN are
    left out."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return math.nan
    i, j = np.triu_indices(len(a), k=1)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n0 = len(i)
    ties_a, ties_b = float((sa == 0).sum()), float((sb == 0).sum())
    denom = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return float((sa * sb).sum() / denom) if denom > 0 else math.nan


def normal_p_value(delta: float, se: float) -> float:
    """Two-sided p-value of ``delta`` against 0 for a normal estimate with standard error ``se`` (the
    bootstrap's): ``erfc(|delta| / (se sqrt 2))``; 1 when both are 0, NaN when either is not finite."""
    if not (math.isfinite(delta) and math.isfinite(se)):
        return math.nan
    if se <= 0:
        return 1.0 if delta == 0 else 0.0
    return math.erfc(abs(delta) / (se * math.sqrt(2.0)))


def bonferroni_z(alpha: float, comparisons: int) -> float:
    """The normal quantile ``z_(1 - alpha / (2 m))``: ``delta +- z se`` are Bonferroni-widened intervals
    that hold together, at level ``1 - alpha``, over ``m = comparisons`` comparisons."""
    from statistics import NormalDist

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * comparisons))
