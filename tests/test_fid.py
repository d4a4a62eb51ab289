"""Tests for bdia.metrics.fid (FID as EDM computes it)."""

import os
import stat
import warnings

import numpy as np
import pytest
import torch

from bdia.metrics.fid import (
    FeatureStatistics,
    FIDSampleSizeWarning,
    StandInDetector,
    _load_batch,
    extract_features,
    frechet_distance,
    image_statistics,
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
    # Tensor batches are summed on their device and numpy ones on the host, in one object.
    mixed = FeatureStatistics()
    for i in range(0, len(x), 64):
        chunk = x[i : i + 64]
        mixed.add(chunk if i % 128 else torch.from_numpy(chunk))
    # Same float64 sums in a different order: differences are a few ulps of the O(1) sums
    # (~1e-14 absolute), so 1e-12 relative (plus 1e-12 absolute for near-zero off-diagonal
    # entries of sigma) is a strict check that nothing is lost or double counted.
    for stats in (batched, merged, summed, mixed):
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


@pytest.fixture
def detector_file(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(StandInDetector()), str(path))
    return path


def test_extract_features_with_standin_detector(detector_file):
    det = load_detector(detector_file)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    feats = extract_features(det, imgs)
    assert feats.shape == (5, 2048)
    assert feats.dtype == torch.float64
    # Same scripted computation on the same input: identical up to float32 reproducibility.
    expected = StandInDetector()(imgs, return_features=True).double()
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-3)

    gray = imgs[:, :1]
    feats_gray = extract_features(det, gray)
    expected_gray = extract_features(det, gray.repeat(1, 3, 1, 1))
    assert feats_gray.shape == (5, 2048)
    # Repeating the channel must be exactly what extract_features does: bitwise equal.
    torch.testing.assert_close(feats_gray, expected_gray, rtol=0, atol=0)

    # Features feed the accumulator directly (5 vectors in 2048 dimensions: it warns).
    stats = FeatureStatistics().add(feats)
    with pytest.warns(FIDSampleSizeWarning, match="from 5 images"):
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


# ------------------------------------------------------------ small samples, bad files


def test_statistics_from_fewer_vectors_than_dimensions_warn():
    x = _features(5, n=10, d=16)
    stats = FeatureStatistics().add(x)
    with pytest.warns(FIDSampleSizeWarning) as record:
        mu, sigma = stats.compute()
    assert len(record) == 1  # compute() warns once, not once more for sigma
    msg = str(record[0].message)
    assert "from 10 images" in msg and "dimension 16" in msg
    assert "at least 16 images" in msg and "10k-50k" in msg
    assert issubclass(FIDSampleSizeWarning, UserWarning)
    with pytest.warns(FIDSampleSizeWarning, match="singular"):
        _ = stats.sigma
    # statistics from as many vectors as dimensions do not warn
    enough = FeatureStatistics().add(_features(5, n=16, d=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough.compute()


def test_two_images_against_their_own_statistics():
    """The reported case, 2 images against their own statistics, in 64 dimensions (sqrtm of a
    2048 x 2048 product takes half a minute on one core; the effect is the same).

    The covariance has rank 1, sqrtm of the product is ill-conditioned and the result comes
    out negative, about -1e-7 of tr(S1) + tr(S2), well past the 1e-8 at which
    frechet_distance warns. It stays a real float (EDM's real part), and both the
    sample-size warning and the negative-result warning fire."""
    rng = np.random.default_rng(0)
    stats = FeatureStatistics().add(rng.standard_normal((2, 64)))
    with pytest.warns(FIDSampleSizeWarning, match="from 2 images .* dimension 64"):
        mu, sigma = stats.compute()
    with pytest.warns(FIDSampleSizeWarning, match="came out negative") as record:
        value = frechet_distance(mu, sigma, mu, sigma)
    assert isinstance(value, float) and value < 0
    # scipy adds its own "Matrix is singular" warning; ours is among the records
    ours = [str(r.message) for r in record if r.category is FIDSampleSizeWarning]
    assert len(ours) == 1 and "10k-50k" in ours[0] and "fewer than 64 images" in ours[0]


def test_well_conditioned_fid_does_not_warn():
    x = _features(2)
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # may round to a tiny negative value (about -1e-15 of the trace here): no warning
        frechet_distance(mu, s, mu, s)


def test_save_reference_gives_the_default_file_mode(tmp_path):
    # umask 022 tells the default (0o644) apart from mkstemp's private 0o600
    old = os.umask(0o022)
    try:
        path = tmp_path / "stats.npz"
        save_reference(path, np.zeros(3), np.eye(3))
        mode = stat.S_IMODE(path.stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o666 & ~0o022 == 0o644


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("text", r"not an npz file"),
        ("npy", r"a single .npy array, not an npz"),
        ("no mu", r"no array 'mu'; found \['sigma'\]"),
        ("mu 2-D", r"mu has shape \(3, 1\) and sigma \(3, 3\)"),
        ("sigma wrong size", r"mu has shape \(3,\) and sigma \(4, 4\)"),
        ("strings", r"unreadable arrays"),
        ("nan", r"mu or sigma holds NaN or Inf"),
    ],
)
def test_load_reference_refuses_files_that_are_not_statistics(tmp_path, kind, problem):
    path = tmp_path / "ref.npz"
    if kind == "text":
        path.write_text("mu sigma\n")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "no mu":
        np.savez(path, sigma=np.eye(3))
    elif kind == "mu 2-D":
        np.savez(path, mu=np.zeros((3, 1)), sigma=np.eye(3))
    elif kind == "sigma wrong size":
        np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    elif kind == "strings":
        np.savez(path, mu=np.array(["a", "b"]), sigma=np.eye(2))
    else:
        np.savez(path, mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(ValueError, match=problem) as info:
        load_reference(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: not FID reference statistics")
    assert "expected an npz with arrays mu (D,) and sigma (D, D)" in msg


@pytest.mark.parametrize("kind", ["text", "state dict"])
def test_load_detector_refuses_a_file_that_is_not_torchscript(tmp_path, kind):
    path = tmp_path / "inception-2015-12-05.pt"
    if kind == "text":
        path.write_text("not a network")
    else:
        torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError) as info:
        load_detector(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a TorchScript module")
    assert "NVIDIA's TorchScript inception-2015-12-05.pt" in msg
    assert "\n" not in msg


def _image_folder(tmp_path, n=3, size=(8, 8)):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


class _CountingDetector(StandInDetector):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, return_features=False):
        self.calls += 1
        return super().forward(x, return_features)


def test_unreadable_png_is_named_before_any_feature_is_computed(tmp_path):
    folder = _image_folder(tmp_path, n=5)
    bad = folder / "x.png"  # sorts after the good files: only an upfront check names it early
    bad.write_text("this is text, not a PNG")
    detector = _CountingDetector()
    with pytest.raises(ValueError, match=r"x.png: not a readable image") as info:
        image_statistics(detector, folder, batch=2)
    assert str(bad) in str(info.value)
    assert detector.calls == 0
    with pytest.raises(ValueError, match=r"x.png: not a readable image"):
        _load_batch([bad])


def test_truncated_png_is_named(tmp_path):
    folder = _image_folder(tmp_path, n=2, size=(32, 32))
    data = (folder / "0.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"1.png: not a readable image"):
        image_statistics(_CountingDetector(), folder)


def test_images_of_another_size_or_mode_are_named_upfront(tmp_path):
    from PIL import Image

    folder = _image_folder(tmp_path, n=2)
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(folder / "9.png")
    detector = _CountingDetector()
    with pytest.raises(ValueError, match=r"9.png: size 8x9 differs from .*0.png's 8x8"):
        image_statistics(detector, folder)
    (folder / "9.png").unlink()
    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8)).save(folder / "9.png")
    with pytest.raises(ValueError, match=r"9.png: image mode 'RGBA'; expected 8-bit grayscale"):
        image_statistics(detector, folder)
    assert detector.calls == 0


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("workers", [0, 2])
def test_checking_headers_in_several_processes_names_the_same_first_file(
    tmp_path, monkeypatch, workers
):
    """Chunks of 4 files over 2 processes: the first bad file in sorted order is named, not
    the first one a process happened to report, and a folder of good files passes."""
    from PIL import Image

    import bdia.metrics.fid as fid

    monkeypatch.setattr(fid, "_HEADER_CHUNK", 4)
    folder = _image_folder(tmp_path, n=10)  # 0.png .. 9.png, sorted 0, 1, ..., 9
    detector = _CountingDetector()
    assert image_statistics(detector, folder, batch=5, workers=workers).n == 10
    # Bad files in the second and third chunks; the earlier one (in file order) is named.
    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8)).save(folder / "5.png")
    (folder / "9.png").write_text("not a PNG")
    detector.calls = 0
    with pytest.raises(ValueError, match=r"5.png: image mode 'RGBA'"):
        image_statistics(detector, folder, workers=workers)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "5.png")
    with pytest.raises(ValueError, match=r"9.png: not a readable image"):
        fid.check_images(sorted(folder.glob("*.png")), workers)
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(folder / "6.png")
    with pytest.raises(ValueError, match=r"6.png: size 8x9 differs from .*0.png's 8x8"):
        image_statistics(detector, folder, workers=workers)
    assert detector.calls == 0


def test_a_folder_mixing_grayscale_and_rgb_gives_the_statistics_of_its_rgb_copy(tmp_path):
    """The check accepts L and RGB files in one folder, so every batch size must read them:
    a grayscale image counts as its channel repeated, as the detector sees a 1-channel batch."""
    from PIL import Image

    rng = np.random.default_rng(1)
    mixed, rgb = tmp_path / "mixed", tmp_path / "rgb"
    mixed.mkdir(), rgb.mkdir()
    for i in range(6):
        if i % 2:
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(mixed / f"{i}.png")
        else:
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(mixed / f"{i}.png")  # mode L
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        Image.fromarray(pixels).save(rgb / f"{i}.png")
    detector = StandInDetector(features=16)
    per_image = image_statistics(detector, mixed, batch=1)
    whole = image_statistics(detector, mixed, batch=6)
    expected = image_statistics(detector, rgb, batch=6)
    assert whole.n == per_image.n == 6
    # The same pixels reach the detector in the same batches: equal to the bit.
    np.testing.assert_array_equal(whole.sum_outer, expected.sum_outer)
    # One image per call changes only the float32 rounding of the detector's matrix product
    # (about 1e-7 of each feature), which the outer products carry at about 1e-6.
    np.testing.assert_allclose(per_image.sum_outer, whole.sum_outer, rtol=1e-5)


def test_readable_folder_still_gives_its_statistics(tmp_path):
    folder = _image_folder(tmp_path, n=3)
    batches = []
    with pytest.warns(FIDSampleSizeWarning):  # 3 images, 2048 features
        stats = image_statistics(StandInDetector(), folder, batch=2, on_batch=batches.append)
        assert stats.n == 3 and stats.sigma.shape == (2048, 2048)
    assert batches == [2, 1]


# ------------------------------------------------------------ decoding in worker processes


def _serial_statistics(detector, folder, batch, rank=0, world_size=1):
    """The accumulation as it was before the DataLoader: batches read in order in this
    process, each added as it comes."""
    from bdia.metrics.fid import list_images

    mine = list_images(folder)[rank::world_size]
    stats = FeatureStatistics()
    for start in range(0, len(mine), batch):
        stats.add(extract_features(detector, _load_batch(mine[start : start + batch])))
    return stats


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_workers_give_the_statistics_of_the_serial_loop_bit_for_bit(tmp_path, workers, rank):
    folder = _image_folder(tmp_path, n=7)
    detector = StandInDetector(features=16)
    expected = _serial_statistics(detector, folder, batch=2, rank=rank, world_size=2)
    batches = []
    got = image_statistics(
        detector, folder, batch=2, rank=rank, world_size=2, workers=workers, on_batch=batches.append
    )
    # Same batches in the same order through the same float64 operations: exactly equal.
    assert got.n == expected.n == (4 if rank == 0 else 3)
    np.testing.assert_array_equal(got.sum, expected.sum)
    np.testing.assert_array_equal(got.sum_outer, expected.sum_outer)
    assert batches == ([2, 2] if rank == 0 else [2, 1])
    assert got.seconds > 0 and got.images_per_second == got.n / got.seconds


def test_images_are_decoded_in_worker_processes_on_one_thread(tmp_path, monkeypatch):
    import bdia.metrics.fid as fid

    folder = _image_folder(tmp_path, n=4)
    parent = os.getpid()

    def read_where(path):
        # The pixel values say which process decoded the file and on how many threads.
        return np.full((8, 8, 3), 10 * torch.get_num_threads() + (os.getpid() != parent), np.uint8)

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, return_features=False):
            seen.append(x[:, 0, 0, 0].tolist())
            return x.flatten(1).float()

    monkeypatch.setattr(fid, "_read_image", read_where)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # workers must not take on the parent's count
    try:
        image_statistics(Recorder(), folder, batch=2, workers=2)
    finally:
        torch.set_num_threads(before)
    assert seen == [[11, 11], [11, 11]]  # another process, 1 thread


def test_an_image_that_fails_to_decode_in_a_worker_is_named_in_one_line(tmp_path, monkeypatch):
    import bdia.metrics.fid as fid

    folder = _image_folder(tmp_path, n=4, size=(32, 32))
    data = (folder / "3.png").read_bytes()
    (folder / "3.png").write_bytes(data[: len(data) // 2])
    # A file that changed after the upfront check: only the decoding can find it.
    monkeypatch.setattr(fid, "check_images", lambda files, workers=0: None)
    with pytest.raises(ValueError) as info:
        image_statistics(StandInDetector(features=16), folder, batch=2, workers=1)
    msg = str(info.value)
    assert msg.startswith(f"{folder / '3.png'}: not a readable image") and "\n" not in msg


def test_default_workers(monkeypatch):
    from bdia.metrics.fid import default_workers

    assert default_workers("cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cuda") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(torch.device("cuda", 3)) == 1  # 2 cores each, one feeds its GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers("cuda:0") == 0


def test_negative_workers_are_refused(tmp_path):
    folder = _image_folder(tmp_path, n=2)
    with pytest.raises(ValueError, match="workers must be 0 or more, got -1"):
        image_statistics(StandInDetector(features=16), folder, workers=-1)


def test_merge_adds_seconds_and_all_reduce_without_a_group_changes_nothing():
    a, b = FeatureStatistics().add(np.eye(3)), FeatureStatistics().add(np.ones((2, 3)))
    a.seconds, b.seconds = 1.5, 2.0
    merged = a + b
    assert merged.seconds == 3.5 and merged.n == 5
    assert merged.images_per_second == 5 / 3.5
    assert np.isnan(FeatureStatistics().images_per_second)
    sums = merged.sum.copy(), merged.sum_outer.copy()
    assert merged.all_reduce() is merged  # no process group: nothing to sum over
    assert merged.n == 5 and merged.seconds == 3.5
    np.testing.assert_array_equal(merged.sum, sums[0])
    np.testing.assert_array_equal(merged.sum_outer, sums[1])


def test_a_refused_merge_leaves_the_statistics_as_they_were():
    a, b = FeatureStatistics().add(np.eye(3)), FeatureStatistics().add(np.ones((2, 4)))
    a.seconds, b.seconds = 1.5, 2.0
    with pytest.raises(ValueError, match="dimension 4 does not match accumulated 3"):
        a.merge(b)
    # The rate read afterwards would otherwise count time spent on features never added.
    assert a.n == 3 and a.seconds == 1.5
    np.testing.assert_array_equal(a.sum, np.ones(3))
    np.testing.assert_array_equal(a.sum_outer, np.eye(3))


def test_a_refused_all_reduce_leaves_the_statistics_as_they_were(monkeypatch):
    import torch.distributed as dist

    # Another rank of the group holds 4-dimensional features and ran 9 s: the one MAX
    # reduction the call starts with tells both, and this rank refuses.
    def all_reduce(tensor, op=None):
        tensor.copy_(torch.maximum(tensor, torch.tensor([4.0, -4.0, 9.0], dtype=tensor.dtype)))

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stats = FeatureStatistics().add(np.eye(3))
    stats.seconds = 1.5
    with pytest.raises(ValueError, match=r"different dimensions \(3 to 4\)"):
        stats.all_reduce()
    assert stats.n == 3 and stats.seconds == 1.5
    np.testing.assert_array_equal(stats.sum_outer, np.eye(3))


def test_batches_reach_the_detector_in_contiguous_nchw(tmp_path):
    """Images are stored (N, H, W, C); a permuted view would hand the detector channels-last
    strides, and with them other convolution kernels than the contiguous NCHW it is traced
    and timed with."""
    array = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    batch = _load_batch(array)
    assert batch.shape == (3, 3, 5, 7) and batch.is_contiguous()
    assert torch.equal(batch, torch.from_numpy(array).permute(0, 3, 1, 2))
    folder = _image_folder(tmp_path, n=2, size=(32, 32))
    assert _load_batch(sorted(folder.iterdir())).is_contiguous()


def _png_folder(folder, n=5, size=8):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    return folder


@pytest.mark.parametrize(
    "kwargs,words",
    [
        # batch 0 used to fail as ZeroDivisionError, -1 as "__len__() should return >= 0".
        (dict(batch=0), "batch must be 1 or more, got 0"),
        (dict(batch=-1), "batch must be 1 or more, got -1"),
        # A rank outside the world used to take a share overlapping another rank's.
        (dict(rank=2, world_size=2), r"rank must lie in 0\.\.1 \(world_size 2\), got 2"),
        (dict(rank=-1, world_size=2), r"rank must lie in 0\.\.1 \(world_size 2\), got -1"),
        (dict(world_size=0), "world_size must be 1 or more, got 0"),
    ],
)
def test_image_statistics_refuses_a_bad_batch_or_rank(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        image_statistics(StandInDetector(8), _png_folder(tmp_path / "imgs"), **kwargs)


def test_an_npz_of_images_is_found_whatever_the_case_of_its_suffix(tmp_path):
    """Folders match image suffixes in any case; an archive named .NPZ used to be 'no image
    folder or .npz'."""
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "lower.npz", images)
    np.savez(tmp_path / "upper.npz", images)
    (tmp_path / "upper.npz").rename(tmp_path / "UPPER.NPZ")
    det = StandInDetector(8)
    lower = image_statistics(det, tmp_path / "lower.npz")
    upper = image_statistics(det, tmp_path / "UPPER.NPZ")
    assert upper.n == 3
    np.testing.assert_array_equal(upper.sum_outer, lower.sum_outer)  # the same computation


def test_files_under_hidden_folders_are_skipped_but_a_hidden_folder_given_is_read(tmp_path):
    """Notebook checkpoints and version-control folders under the folder are no samples:
    their copies of the images used to be counted (and weigh twice in the statistics)."""
    from bdia.metrics.fid import list_images

    (tmp_path / ".cache").mkdir()
    folder = _png_folder(tmp_path / ".cache" / "imgs", n=3)  # the folder itself is hidden
    (folder / "sub").mkdir()
    (folder / "000000.png").rename(folder / "sub" / "000000.png")
    for hidden in (".ipynb_checkpoints", ".git/objects", "sub/.trash"):
        (folder / hidden).mkdir(parents=True)
        (folder / hidden / "000001.png").write_bytes((folder / "000001.png").read_bytes())
    (folder / ".000002.png").write_bytes((folder / "000002.png").read_bytes())
    names = [p.relative_to(folder).as_posix() for p in list_images(folder)]
    assert names == ["000001.png", "000002.png", "sub/000000.png"]
    assert image_statistics(StandInDetector(8), folder).n == 3
    # A folder that holds images only under hidden folders holds none.
    only_hidden = tmp_path / "only_hidden"
    (only_hidden / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "000001.png").rename(only_hidden / ".ipynb_checkpoints" / "000001.png")
    with pytest.raises(
        ValueError, match=r"no images .* under .*only_hidden \(hidden files and folders"
    ):
        list_images(only_hidden)


def test_a_file_that_is_no_npz_is_named_as_such(tmp_path):
    """One PNG (or any file but an npz) exists: "no image folder or .npz at photo.png" read as
    if nothing were there."""
    from bdia.metrics.fid import list_images

    photo = _png_folder(tmp_path / "imgs", n=1) / "000000.png"
    with pytest.raises(ValueError, match=r"000000.png is a file, not a folder of images or an"):
        list_images(photo)
    with pytest.raises(FileNotFoundError, match="no image folder or .npz at"):
        list_images(tmp_path / "absent")


@pytest.mark.parametrize(
    "shapes,words",
    [
        # mu of 3 with sigma of 4 x 4 used to give a number (0.0 for equal statistics).
        (((3,), (4, 4)), r"first statistics .*mu has shape \(3,\) and sigma \(4, 4\)"),
        (((4,), (4, 3)), r"first statistics .*mu has shape \(4,\) and sigma \(4, 3\)"),
        (((2, 2), (4, 4)), r"first statistics .*mu has shape \(2, 2\) and sigma \(4, 4\)"),
    ],
)
def test_frechet_distance_refuses_a_mu_that_does_not_fit_its_sigma(shapes, words):
    mu, sigma = np.zeros(shapes[0]), np.ones(shapes[1])
    with pytest.raises(ValueError, match=words):
        frechet_distance(mu, sigma, mu, sigma)


def test_frechet_distance_refuses_statistics_holding_nan():
    mu, sigma = np.zeros(4), np.eye(4)
    bad = sigma.copy()
    bad[1, 2] = np.nan
    # It used to return NaN, which reads as a result.
    with pytest.raises(ValueError, match="the second statistics .*NaN or Inf"):
        frechet_distance(mu, sigma, mu, bad)
    assert np.isnan(bad).sum() == 1  # the caller's array is kept as it was


@pytest.mark.parametrize(
    "mu,sigma,words",
    [
        (np.zeros(3), np.eye(4), r"mu has shape \(3,\) and sigma \(4, 4\)"),
        (np.full(3, np.nan), np.eye(3), "NaN or Inf"),
    ],
    ids=["shapes", "nan"],
)
def test_save_reference_refuses_what_load_reference_would_refuse(tmp_path, mu, sigma, words):
    """It used to write the file, which only a later `bdia fid` run found unreadable."""
    path = tmp_path / "ref.npz"
    with pytest.raises(ValueError, match=words):
        save_reference(path, mu, sigma)
    assert not list(tmp_path.iterdir())


def test_extract_features_moves_images_to_a_detector_that_holds_only_buffers():
    """The stand-in has a buffer and no parameter: its device used to be missed, and images
    on another device reached it unmoved (the meta device stands in for a GPU here)."""
    det = StandInDetector(8).to("meta")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    feats = extract_features(det, images)
    assert feats.device.type == "meta" and feats.shape == (2, 8)
    assert feats.dtype == torch.float64 and images.device.type == "cpu"


def test_on_a_device_without_float64_features_are_summed_on_the_host(tmp_path, monkeypatch):
    """MPS has no float64 (pretended on the CPU, where a float64 tensor on the device is
    refused): its feature batches are summed in float64 on the host. The float32 features
    are the CPU's, and the sums run through the same float64 operations on the CPU, so the
    statistics equal the CPU's to the bit."""
    from conftest import fake_mps

    folder = _image_folder(tmp_path, n=5)
    detector = StandInDetector(features=16)
    expected = image_statistics(detector, folder, batch=2, device="cpu")
    features = torch.from_numpy(_features(0, n=5)).float()
    with fake_mps(monkeypatch) as mode:
        got = image_statistics(detector, folder, batch=2, device="mps")
        assert mode.placed > 0  # the detector ran on the pretend device
        # float32 features a caller computed on the device are summed on the host too.
        direct = FeatureStatistics().add(features.to("mps"))
    on_cpu = FeatureStatistics().add(features)
    np.testing.assert_array_equal(direct.sum_outer, on_cpu.sum_outer)
    assert got.n == expected.n == 5
    np.testing.assert_array_equal(got.sum, expected.sum)
    np.testing.assert_array_equal(got.sum_outer, expected.sum_outer)
