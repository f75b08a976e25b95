"""FID / sFID / IS / improved precision-recall (attnguide.apps.eval.metrics) and the feature extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnguide.apps.eval.features import (
    SFID_CHANNELS,
    DigitClassifierExtractor,
    InceptionExtractor,
    extract_features,
)
from attnguide.apps.eval.metrics import (
    FrechetToReference,
    ball_membership,
    bonferroni_z,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    inception_score,
    inception_score_resampled,
    kendall_tau,
    knn_radii,
    normal_p_value,
    precision_recall,
)


def _closed_form_commuting(mu1, d1, mu2, d2) -> float:
    """||mu1 - mu2||^2 + sum(d1 + d2 - 2 sqrt(d1 d2)): FID of covariances with the same eigenvectors."""
    return float(((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum())


def _with_moments(rng, n: int, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose sample mean and (unbiased) covariance are exactly mu and cov."""
    x = rng.standard_normal((n, len(mu)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return x @ np.linalg.cholesky(cov).T + mu


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = _closed_form_commuting(mu1, v1, mu2, v2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-3)
    # The same through samples that have exactly these moments (the features path).
    a, b = _with_moments(rng, 400, mu1, np.diag(v1)), _with_moments(rng, 300, mu2, np.diag(v2))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-3)
    assert fid_from_features(torch.from_numpy(a), gaussian_stats(b)) == pytest.approx(expected, rel=1e-3)


def test_fid_rotated_gaussians_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v1, v2 = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    mu1, mu2 = rng.normal(size=d), np.zeros(d)
    got = frechet_distance(mu1, q @ np.diag(v1) @ q.T, mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(_closed_form_commuting(mu1, v1, mu2, v2), rel=1e-3)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    s = gaussian_stats(x)
    assert abs(fid_from_features(x, x)) < 1e-6 * np.trace(s.sigma)


def test_fid_rank_deficient_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 64)), rng.normal(size=(10, 64))
    v = fid_from_features(a, b, strict=False)
    assert np.isfinite(v) and v > 0


@pytest.mark.parametrize("n", [12, 200])
def test_frechet_to_reference_equals_sqrtm_path(n):
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    gen = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 40)) + 0.5
    fast = FrechetToReference(gaussian_stats(ref))
    assert fast(gen) == pytest.approx(fid_from_features(gen, ref), rel=1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_frechet_to_reference_resampled_equals_each_resample(batched):
    rng = np.random.default_rng(10)
    ref = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    gen = rng.normal(size=(30, 12)) + 0.3
    fast = FrechetToReference(gaussian_stats(ref))
    idx = rng.integers(0, 30, (7, 30))
    got = fast.resampled(gen, idx, batched=batched, max_elements=3 * 30 * 12)  # batches of 3 rows
    np.testing.assert_allclose(got, [fid_from_features(gen[i], ref) for i in idx], rtol=1e-8)
    wide = rng.normal(size=(30, 40))  # m < D: the Gram form
    fast = FrechetToReference(gaussian_stats(rng.normal(size=(100, 40))))
    np.testing.assert_allclose(fast.resampled(wide, idx, batched=batched), [fast(wide[i]) for i in idx])
    with pytest.raises(ValueError, match="indices"):
        fast.resampled(wide, np.zeros((3, 1), dtype=int))


def test_kendall_tau_by_hand_and_against_scipy():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one discordant pair of three: (2 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert np.isnan(kendall_tau([1.0], [2.0])) and np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert kendall_tau([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)  # NaN pairs left out
    from scipy.stats import kendalltau

    rng = np.random.default_rng(11)
    x, y = rng.integers(0, 4, 15).astype(float), rng.integers(0, 4, 15).astype(float)  # with ties
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, rel=1e-12)


def test_normal_p_value_and_bonferroni_z():
    assert bonferroni_z(0.05, 1) == pytest.approx(1.959964, abs=1e-6)
    assert bonferroni_z(0.05, 10) == pytest.approx(2.807034, abs=1e-6)  # z_(1 - 0.0025)
    assert normal_p_value(1.959964, 1.0) == pytest.approx(0.05, abs=1e-6)
    assert normal_p_value(0.0, 0.0) == 1.0 and normal_p_value(1.0, 0.0) == 0.0
    assert np.isnan(normal_p_value(1.0, float("nan")))
    with pytest.raises(ValueError, match="comparisons"):
        bonferroni_z(0.05, 0)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_uniform_is_one():
    p = np.full((100, 10), 0.1)
    mean, std = inception_score(p, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10, 37])
def test_inception_score_confident_equal_use_is_k(k):
    labels = np.arange(k * 10 * 3) % k  # every split of 10 sees every class equally often
    p = np.eye(k)[labels]
    mean, std = inception_score(p, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # confident logits give (almost) the same
    mean_l, _ = inception_score(torch.from_numpy(p * 50.0), splits=10, from_logits=True)
    assert mean_l == pytest.approx(k, rel=1e-6)


def _is_by_hand(p: np.ndarray) -> float:
    py = p.mean(0)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1))))


def test_inception_score_uses_guided_diffusion_splits_of_5000():
    """n = 500 is ONE split (std NaN), not 10 splits of 50; 12000 samples are splits of 5000, 5000, 2000."""
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.full(10, 0.3), size=500)
    mean, std = inception_score(p)
    assert mean == pytest.approx(_is_by_hand(p), rel=1e-12) and np.isnan(std)
    assert mean != pytest.approx(inception_score(p, splits=10)[0], rel=1e-6)  # the old 10 x 50 differs
    big = rng.dirichlet(np.full(10, 0.3), size=12000)
    parts = [_is_by_hand(big[:5000]), _is_by_hand(big[5000:10000]), _is_by_hand(big[10000:])]
    mean, std = inception_score(big)
    assert mean == pytest.approx(np.mean(parts), rel=1e-12) and std == pytest.approx(np.std(parts), rel=1e-9)
    assert inception_score(big, split_size=4000)[0] == pytest.approx(
        np.mean([_is_by_hand(big[i : i + 4000]) for i in (0, 4000, 8000)]), rel=1e-12
    )


def test_inception_score_resampled_equals_each_resample():
    rng = np.random.default_rng(9)
    p = rng.dirichlet(np.full(6, 0.5), size=40)
    idx = rng.integers(0, 40, (5, 40))
    got = inception_score_resampled(p, idx)
    np.testing.assert_allclose(got, [inception_score(p[i])[0] for i in idx], rtol=1e-12)
    got = inception_score_resampled(p, idx, split_size=16)  # splits of 16, 16, 8 of each resample
    np.testing.assert_allclose(got, [inception_score(p[i], split_size=16)[0] for i in idx], rtol=1e-12)


def test_inception_score_rejects_non_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        inception_score(np.ones((4, 3)))


def test_knn_radii_and_batching():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_allclose(knn_radii(x, k=1).numpy(), [1, 1, 2, 3, 4])
    np.testing.assert_allclose(knn_radii(x, k=2).numpy(), [3, 2, 3, 4, 7])
    rng = np.random.default_rng(4)
    y = rng.normal(size=(50, 5))
    np.testing.assert_allclose(knn_radii(y, batch_size=7).numpy(), knn_radii(y, batch_size=1000).numpy())


def test_knn_radii_squared_are_not_rooted():
    x = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    sq = knn_radii(x, k=1, squared=True).numpy()
    np.testing.assert_array_equal(sq, [3.0, 3.0, 48.0])  # exact squared distances, no sqrt
    np.testing.assert_allclose(knn_radii(x, k=1).numpy(), np.sqrt(sq))


def test_point_exactly_on_a_radius_counts_as_inside():
    """Kynkaanniemi et al. (and guided-diffusion) count d^2 <= r^2 as inside. The real point (0,0,0) has
    squared k=1 radius 3 (its neighbour (1,1,1)); the fake point (-1,-1,-1) is at squared distance exactly
    3 from it. sqrt(3) ** 2 = 2.9999999999999996 < 3, so taking the root and squaring again would leave it
    outside: precision would be 0 instead of 0.5."""
    real = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [40.0, 40.0, 40.0]])
    fake = np.array([[-1.0, -1.0, -1.0], [100.0, 100.0, 100.0]])
    assert np.sqrt(3.0) ** 2 < 3.0  # the round-off the squared radii avoid
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == 0.5
    # recall by hand: fake radii^2 (k=1) are both 3 * 101^2; (0,0,0) and (1,1,1) lie within 3 * 101^2 of
    # (-1,-1,-1) (3 and 12), (40,40,40) too (3 * 41^2); so every real point is covered
    assert recall == 1.0
    inside = ball_membership(fake, real, knn_radii(real, k=1, squared=True)).numpy()
    np.testing.assert_array_equal(inside, [[True, False, False], [False, False, False]])


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = rng.normal(size=(150, 8)) + 1000.0
    assert precision_recall(real, far, batch_size=64) == (0.0, 0.0)


def test_precision_recall_half_outside():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(100, 4))
    fake = np.concatenate([real[:50] + 1e-3, rng.normal(size=(50, 4)) + 500.0])
    p, r = precision_recall(real, fake)
    assert p == pytest.approx(0.5)
    assert 0.0 < r < 1.0  # only part of the real manifold is covered


# ------------------------------------------------------------------------------------------ extractors
def test_digit_classifier_extractor_shapes():
    from attnguide.apps.train import make_digit_classifier

    torch.manual_seed(0)
    ext = DigitClassifierExtractor(model=make_digit_classifier())
    images = torch.rand(5, 1, 28, 28)
    out = ext(images)
    assert out["pool"].shape == (5, 128)
    assert out["spatial"].shape == (5, SFID_CHANNELS * 7 * 7)
    assert out["logits"].shape == (5, 10)
    # logits are the classifier's forward on the [-1, 1] input
    torch.testing.assert_close(out["logits"], ext.model(images * 2 - 1))
    # RGB and other sizes are converted
    assert ext(torch.rand(3, 3, 32, 32))["pool"].shape == (3, 128)
    batched = extract_features(ext, images, batch_size=2)
    torch.testing.assert_close(batched["pool"], out["pool"], rtol=1e-5, atol=1e-6)


class _FakeInception(torch.nn.Module):
    """Stand-in with the NVIDIA TorchScript Inception's calling convention (``dim`` features, 2048 in the
    real network; a smaller ``dim`` keeps end-to-end tests fast)."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        self.dim = dim
        self.proj = torch.nn.Linear(3 * 4 * 4, dim)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        assert x.dtype == torch.uint8
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        f = x.float().mean(dim=(2, 3))
        feats = f.repeat(1, self.dim // 3 + 1)[:, : self.dim]
        if return_features:
            return feats + 0.01 * self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1))
        return torch.softmax(f.repeat(1, 336) / 255.0, dim=1)


def test_inception_extractor_with_scripted_stand_in(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fake = _FakeInception()
    torch.nn.init.zeros_(fake.proj.weight)
    torch.nn.init.zeros_(fake.proj.bias)
    torch.jit.script(fake).save(str(path))
    ext = InceptionExtractor(path)
    grey = torch.full((2, 1, 28, 28), 0.5)
    grey[1] = 1.0
    out = ext(grey)
    assert set(out) == {"pool", "logits"}
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    # grey repeated to RGB, resized to 299, scaled to uint8
    torch.testing.assert_close(out["pool"][:, 0], torch.tensor([128.0, 255.0]))
    torch.testing.assert_close(out["logits"].softmax(1).sum(1), torch.ones(2))
    u8 = InceptionExtractor.to_uint8_rgb299(torch.rand(1, 3, 16, 16))
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 299, 299)
    assert ext.identity != "" and ext.name.startswith("inception")
