"""benchmarks/fid_speed.py: a smoke run as a subprocess, and its detector wrapper in process.
No rate is asserted: only the table's rows, that every rate was measured, and that the
statistics agree bit for bit where the report says they are compared."""

import argparse
import math
import re

import pytest
import torch
from conftest import REPO, benchmark_module, run_child

from bdia.metrics import fid


def _fid_speed():
    return benchmark_module("fid_speed")


def _rows(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| source |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    return [
        dict(zip(header, [c.strip() for c in ln.strip("|").split("|")], strict=True))
        for ln in lines[start + 1 :]
    ]


@pytest.mark.slow
def test_smoke_run_measures_every_row_and_finds_the_same_statistics(tmp_path):
    page = REPO / "docs" / "benchmarks" / "fid_speed.md"
    before = page.read_bytes() if page.exists() else None
    report = tmp_path / "fid_speed.md"
    proc = run_child(["benchmarks/fid_speed.py", "--smoke", "--out", str(report)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report.read_text() == proc.stdout  # the file written is the report printed
    assert (page.read_bytes() if page.exists() else None) == before

    rows = _rows(proc.stdout)
    sources = [(r["source"], r["image size"], r["workers"]) for r in rows]
    assert sources == [
        ("detector alone", "32x32", "-"),
        ("PNG folder", "32x32", "0"),
        ("PNG folder", "32x32", "1"),
        (".npz", "32x32", "0"),
        ("PNG folder", "64x64", "0"),
        ("PNG folder", "64x64", "1"),
        ("`bdia fid-ref`", "32x32", "0 (default)"),
    ]
    for r in rows:
        assert r["note"] == "", r
        rate = float(r["features images/s"].replace(",", ""))
        assert 0 < rate < math.inf
    # Rows after the first of an image size are compared with it: workers change nothing,
    # and the .npz holds exactly the PNGs' pixels.
    assert [r["same statistics"] for r in rows[1:6]] == ["-", "yes", "yes", "-", "yes"]
    assert rows[-1]["batch"] == "64 (default)" and float(rows[-1]["whole call s"]) > 0


@pytest.mark.slow
def test_past_the_budget_the_run_stops_and_still_writes_its_page(tmp_path):
    report = tmp_path / "fid_speed.md"
    # A millisecond: the alarm fires while the images are written, before any row.
    args = ["benchmarks/fid_speed.py", "--smoke", "--budget", "0.001", "--out", str(report)]
    proc = run_child(args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert report.read_text() == proc.stdout
    assert "| stopped | at the budget (0 s); later rows were not run |" in proc.stdout
    assert _rows(proc.stdout) == []


def _small_features():
    """A network of 2048 features that runs on a 299x299 batch in milliseconds."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 7, stride=8),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2048),
    )


def test_contract_detector_has_nvidias_call_contract():
    fs = _fid_speed()
    features = _small_features()
    detector = fs.contract_detector(features, torch.device("cpu"))
    assert isinstance(detector, torch.jit.ScriptModule)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        feats = detector(images, return_features=True)
        logits = detector(images)
        resized = torch.nn.functional.interpolate(
            images.float(), size=(299, 299), mode="bilinear", align_corners=False
        )
        expected = features((resized - 128) / 128)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float32
    assert torch.equal(logits, feats[:, :1008])
    # The traced network runs the eager one's kernels on the same input: equal to the bit.
    assert torch.equal(feats, expected)
    with pytest.raises(torch.jit.Error, match="expected uint8 images"):
        detector(images.float(), return_features=True)
    # It is what bdia fid measures with: features through the library's own path.
    assert torch.equal(fid.extract_features(detector, images), feats.double())


def test_without_torchvision_the_stand_in_detector_is_used_and_named(tmp_path, monkeypatch):
    fs = _fid_speed()

    def no_torchvision():
        raise ImportError("No module named 'torchvision'")

    monkeypatch.setattr(fs, "random_inception", no_torchvision)
    args = argparse.Namespace(detector=None)
    detector, path, what, gflop = fs.build_detector(args, torch.device("cpu"), tmp_path, False)
    assert path == tmp_path / "detector.pt" and path.is_file()
    assert what.startswith("StandInDetector (torchvision cannot be imported")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = fid.StandInDetector()(images, return_features=True)
    assert torch.equal(detector(images, return_features=True), expected)
    # A pooling to 4x4 and a (48, 2048) matrix product: 2 * 48 * 2048 FLOPs per image.
    assert gflop == pytest.approx(2 * 48 * 2048 / 1e9)


def test_a_broken_torchvision_falls_back_to_the_stand_in_and_says_why(tmp_path, monkeypatch):
    fs = _fid_speed()

    def broken():  # as a torchvision built for another torch fails on import
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(fs, "random_inception", broken)
    args = argparse.Namespace(detector=None)
    detector, path, what, _ = fs.build_detector(args, torch.device("cpu"), tmp_path, False)
    assert what.startswith("StandInDetector (the random Inception-v3 could not be built")
    assert "RuntimeError: operator torchvision::nms does not exist" in what
    assert isinstance(detector, torch.jit.ScriptModule)


def test_a_failure_outside_the_rows_still_writes_the_page(tmp_path, monkeypatch):
    fs = _fid_speed()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs, "write_images", full_disk)
    out = tmp_path / "fid_speed.md"
    assert fs.main(["--smoke", "--out", str(out)]) == 0
    assert "| stopped | failed: OSError(28, 'No space left on device') |" in out.read_text()


def test_a_given_detector_file_is_loaded_as_bdia_fid_loads_it_and_its_flops_counted(tmp_path):
    fs = _fid_speed()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(fid.StandInDetector()), str(path))
    args = argparse.Namespace(detector=str(path))
    detector, used, what, gflop = fs.build_detector(args, torch.device("cpu"), tmp_path, True)
    assert used == path and what == "inception-2015-12-05.pt (given)"
    assert isinstance(detector, torch.jit.ScriptModule) and not detector.training
    # FlopCounterMode sees the ops inside the TorchScript file: the same count as eager.
    assert gflop == pytest.approx(2 * 48 * 2048 / 1e9)


def test_a_page_written_between_rows_says_the_run_is_in_progress(tmp_path, monkeypatch):
    """An outer time limit may end the run between two rows: the page then on disk must not
    read as a finished one. The last report drops the mark."""
    fs = _fid_speed()
    tiny = fs.Plan(small=4, large=2, large_size=8, batches=(4,), workers=(0,))
    monkeypatch.setattr(fs, "plan_for", lambda device, smoke: tiny)
    out = tmp_path / "fid_speed.md"
    pages = []

    def cli_row(detector_path, folder, size, ref, device, smoke):
        pages.append(out.read_text())  # the page as it stands before the last row
        return fs.Row(fs.CLI_SOURCE, size, 4, rate=1.0, call_s=1.0)

    monkeypatch.setattr(fs, "cli_row", cli_row)
    assert fs.main(["--smoke", "--out", str(out)]) == 0
    (during,) = pages
    assert re.search(r"\| elapsed \| \d+ s \(in progress: [^|]*\|", during)
    assert re.search(r"\| elapsed \| \d+ s \|", out.read_text())


@pytest.mark.parametrize("budget", ["0", "-1", "nan"])
def test_a_budget_that_is_not_positive_is_refused(budget, capsys):
    # --budget 0 once disarmed the alarm: a run with no budget at all.
    with pytest.raises(SystemExit) as exc:
        _fid_speed().main(["--smoke", "--budget", budget])
    assert exc.value.code == 2
    assert "--budget: must be a positive number of seconds" in capsys.readouterr().err


def test_the_page_names_the_arguments_given_to_main_even_none(monkeypatch, capsys):
    fs = _fid_speed()
    monkeypatch.setattr(fs.sys, "argv", ["pytest", "-q"])  # not this run's arguments
    monkeypatch.setattr(fs, "write_images", lambda *args: None)  # stops before any row
    assert fs.main([]) == 0  # no GPU here: a smoke run, the page printed only
    assert "Written by `python benchmarks/fid_speed.py`;" in capsys.readouterr().out
