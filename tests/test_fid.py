"""Tests for bdia.metrics.fid (FID as EDM computes it)."""

import numpy as np
import pytest
import torch

from bdia.metrics.fid import (
    FeatureStatistics,
    extract_features,
    frechet_distance,
    load_detector,
    load_reference,
    save_reference,
)


def _features(seed, n=400, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + shift


def _psd_sqrt(s):
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_numpy(mu1, s1, mu2, s2):
    # tr sqrtm(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2): the latter is symmetric PSD, so eigh applies.
    r = _psd_sqrt(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_fid_matches_independent_eigen_computation():
    x = _features(0)
    y = _features(1, shift=0.3)
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    ref = _fid_numpy(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    # Both are float64 evaluations of the same quantity on well-conditioned 16x16 matrices
    # (Schur-based vs eigen-based square roots); rounding differences are ~1e-13, so 1e-6
    # relative is a loose but meaningful bound (FID here is O(1), far from 0).
    assert ref > 0.5
    assert got == pytest.approx(ref, rel=1e-6)


def test_fid_of_set_against_itself_is_zero():
    x = _features(2)
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    got = frechet_distance(mu, s, mu, s)
    # Exactly 0 mathematically; tr(2S - 2 sqrtm(S S)) cancels terms of size tr(S), so the
    # float64 error scales with tr(S): allow 1e-6 * tr(S).
    assert abs(got) <= 1e-6 * np.trace(s)


def test_accumulation_in_batches_and_merge_equals_whole():
    x = _features(3, n=501, d=12, shift=2.0)
    whole = FeatureStatistics().add(x)
    batched = FeatureStatistics()
    for i in range(0, len(x), 64):
        batched.add(torch.from_numpy(x[i : i + 64]))
    half_a = FeatureStatistics().add(x[:250])
    half_b = FeatureStatistics().add(torch.from_numpy(x[250:]))
    merged = FeatureStatistics().merge(half_a).merge(half_b)
    summed = half_a + half_b
    # Same float64 sums in a different order: differences are a few ulps of the O(1) sums
    # (~1e-14 absolute), so 1e-12 relative (plus 1e-12 absolute for near-zero off-diagonal
    # entries of sigma) is a strict check that nothing is lost or double counted.
    for stats in (batched, merged, summed):
        assert stats.n == 501
        np.testing.assert_allclose(stats.mu, whole.mu, rtol=1e-12, atol=0)
        np.testing.assert_allclose(stats.sigma, whole.sigma, rtol=1e-12, atol=1e-12)
    # Unbiased covariance (divide by n - 1), as numpy.cov (two-pass). The shift 2.0 makes the
    # one-pass sum-of-outer-products formula cancel ~5x in magnitude; observed error is
    # ~2e-13 relative (smallest entry ~7e-3), so 1e-12 relative still holds with margin.
    np.testing.assert_allclose(whole.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.sigma, np.cov(x, rowvar=False), rtol=1e-12, atol=0)
    assert whole.sigma.dtype == np.float64


def test_covariance_needs_two_samples():
    stats = FeatureStatistics().add(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.sigma


def test_reference_npz_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mu = rng.standard_normal(8)
    sigma = np.cov(rng.standard_normal((50, 8)), rowvar=False)
    path = tmp_path / "ref" / "stats.npz"
    save_reference(path, mu, sigma)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.npz"]  # no temp left
    mu2, sigma2 = load_reference(path)
    # Exact: npz stores float64 bit for bit.
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert mu2.dtype == np.float64 and sigma2.dtype == np.float64


def test_reference_missing_file(tmp_path):
    path = tmp_path / "cifar10-32x32.npz"
    with pytest.raises(FileNotFoundError) as info:
        load_reference(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "cifar10-32x32.npz" in msg and "EDM" in msg
    assert "bdia fid-ref" in msg


def test_reference_missing_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=np.zeros(3))
    with pytest.raises(ValueError, match="sigma") as info:
        load_reference(path)
    assert str(path) in str(info.value)


class _StandInDetector(torch.nn.Module):
    """Same call contract as NVIDIA's inception-2015-12-05.pt: uint8 NCHW -> (N, 2048)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, 2048, generator=g))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 input")
        if x.shape[1] != 3:
            raise RuntimeError("expected 3 channels")
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32), (4, 4))
        feats = pooled.flatten(1) @ self.proj
        if return_features:
            return feats
        return feats[:, :1008]


@pytest.fixture
def detector_file(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_StandInDetector()), str(path))
    return path


def test_extract_features_with_standin_detector(detector_file):
    det = load_detector(detector_file)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    feats = extract_features(det, imgs)
    assert feats.shape == (5, 2048)
    assert feats.dtype == torch.float64
    # Same scripted computation on the same input: identical up to float32 reproducibility.
    expected = _StandInDetector()(imgs, return_features=True).double()
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-3)

    gray = imgs[:, :1]
    feats_gray = extract_features(det, gray)
    expected_gray = extract_features(det, gray.repeat(1, 3, 1, 1))
    assert feats_gray.shape == (5, 2048)
    # Repeating the channel must be exactly what extract_features does: bitwise equal.
    torch.testing.assert_close(feats_gray, expected_gray, rtol=0, atol=0)

    # Features feed the accumulator directly.
    stats = FeatureStatistics().add(feats)
    assert stats.n == 5 and stats.sigma.shape == (2048, 2048)


def test_extract_features_rejects_bad_shapes(detector_file):
    det = load_detector(detector_file)
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\)"):
        extract_features(det, torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        extract_features(det, torch.zeros(8, 8, dtype=torch.uint8))


def test_load_detector_missing_file(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_detector(path)
    msg = str(info.value)
    assert str(path) in msg and "put it" in msg
