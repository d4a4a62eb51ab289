"""``bdia sample`` then ``bdia fid-ref`` / ``bdia fid`` with a stand-in detector."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_fid import _fid_numpy

from bdia.cli import main
from bdia.metrics.fid import StandInDetector, load_reference


@pytest.fixture
def detector(tmp_path):
    # 64 features instead of 2048: the pipeline does not depend on the dimension, and the
    # 2048x2048 matrix square roots would dominate the suite's time.
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(StandInDetector(features=64)), str(path))
    return path


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_sample_then_fid_matches_direct_computation(tmp_path, detector):
    out = tmp_path / "out"
    invoke(
        "sample",
        "--network",
        "random:tiny-cond",
        "--steps",
        "3",
        "--seeds",
        "0-7",
        "--outdir",
        str(out),
    )
    files = sorted(out.rglob("*.png"))
    assert len(files) == 8
    # Reference statistics from a different set: the same images flipped left-right.
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for f in files:
        Image.fromarray(np.asarray(Image.open(f))[:, ::-1].copy()).save(flipped / f.name)
    ref = tmp_path / "ref.npz"
    invoke(
        "fid-ref",
        "--images",
        str(flipped),
        "--out",
        str(ref),
        "--detector",
        str(detector),
        "--batch",
        "3",
    )
    result = invoke(
        "fid", "--images", str(out), "--ref", str(ref), "--detector", str(detector), "--batch", "5"
    )
    value = float(result.stdout.strip().splitlines()[0])

    def features(folder):
        imgs = np.stack([np.asarray(Image.open(f)) for f in sorted(folder.rglob("*.png"))])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        return StandInDetector(features=64)(x, return_features=True).double().numpy()

    a, b = features(out), features(flipped)
    expected = _fid_numpy(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    # Same features up to float32 detector rounding (1e-7 relative); FID is a smooth function
    # of them, so 1e-4 relative leaves room for that and for sqrtm's own rounding.
    assert value == pytest.approx(expected, rel=1e-4)
    assert value > 0
    # (A set against its own statistics is tested in test_fid.py with full-rank features;
    # 8 images give a rank-7 covariance in 64 dimensions, where sqrtm is ill-conditioned.)


def test_fid_missing_files_are_named(tmp_path, detector):
    result = CliRunner().invoke(
        main,
        [
            "fid",
            "--images",
            str(tmp_path),
            "--ref",
            str(tmp_path / "cifar10-32x32.npz"),
            "--detector",
            str(detector),
        ],
    )
    # A missing file is a bad value of its option: status 2, the option and the file named.
    line = result.stderr.strip()
    assert result.exit_code == 2 and "'--ref'" in line and "cifar10-32x32.npz" in line
    assert "bdia fid-ref" in line  # and how to make one
    np.savez(tmp_path / "r.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = CliRunner().invoke(
        main,
        [
            "fid",
            "--images",
            str(tmp_path / "none"),
            "--ref",
            str(tmp_path / "r.npz"),
            "--detector",
            str(tmp_path / "missing.pt"),
        ],
    )
    line = result.stderr.strip()
    assert result.exit_code == 2 and "'--detector'" in line and "missing.pt" in line
    assert "inception-2015-12-05.pt" in line  # what the file should be


def test_fid_of_an_npz_of_images_equals_the_folder(tmp_path, detector):
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    np.savez(tmp_path / "imgs.npz", images)
    invoke(
        "fid-ref",
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "a.npz"),
        "--detector",
        str(detector),
    )
    invoke(
        "fid-ref",
        "--images",
        str(tmp_path / "imgs.npz"),
        "--out",
        str(tmp_path / "b.npz"),
        "--detector",
        str(detector),
    )
    (a_mu, a_sigma), (b_mu, b_sigma) = map(load_reference, [tmp_path / "a.npz", tmp_path / "b.npz"])
    assert np.array_equal(a_mu, b_mu) and np.array_equal(a_sigma, b_sigma)


def test_workers_option_gives_the_same_statistics_and_the_rate_is_reported(tmp_path, detector):
    g = np.random.default_rng(2)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["--images", str(folder), "--detector", str(detector), "--batch", "2"]
    lines = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.npz"
        result = invoke("fid-ref", *common, "--out", str(out), "--workers", workers)
        lines.append(result.stderr.strip().splitlines()[-1])
    (a_mu, a_sigma), (b_mu, b_sigma) = map(
        load_reference, [tmp_path / "w0.npz", tmp_path / "w2.npz"]
    )
    # The batches reach the detector in the same order whoever decodes them: bit for bit.
    assert np.array_equal(a_mu, b_mu) and np.array_equal(a_sigma, b_sigma)
    for line in lines:
        assert re.fullmatch(
            r"wrote .*w\d\.npz from 5 images; features at [\d,]+\.\d images/s", line
        )
    result = invoke("fid", *common, "--ref", str(tmp_path / "w0.npz"), "--no-progress")
    last = result.stderr.strip().splitlines()[-1]  # after the small-sample warnings
    assert re.fullmatch(r"FID over 5 images; features at [\d,]+\.\d images/s", last)


def test_negative_workers_are_refused_in_one_line(tmp_path, detector):
    args = ["fid-ref", "--images", str(tmp_path), "--detector", str(detector)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r.npz"), "--workers", "-1"])
    line = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in line
    assert "'--workers'" in line and "-1 is not in the range x>=0" in line


@pytest.mark.parametrize("command", ["fid", "fid-ref"])
def test_too_few_images_are_warned_of_once(command, tmp_path, detector):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):  # 3 images, 64 features: a singular covariance
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(64), sigma=np.eye(64))
    target = ["--ref", str(ref)] if command == "fid" else ["--out", str(tmp_path / "new.npz")]
    result = invoke(command, "--images", str(folder), "--detector", str(detector), *target)
    assert result.stderr.count("Warning: FID statistics from 3 images") == 1, result.stderr
