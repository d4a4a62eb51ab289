"""Smoke runs of benchmarks/edm_cifar10.py and benchmarks/gpu_check.py as subprocesses."""

import hashlib
import math
import re

from conftest import REPO, run_child

DOCS = REPO / "docs" / "benchmarks"


def _snapshot():
    if not DOCS.exists():
        return {}
    return {
        str(p.relative_to(DOCS)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(DOCS.rglob("*"))
        if p.is_file()
    }


def _run(*args):
    proc = run_child(args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _cells(stdout, row):
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == row:
            return cells
    raise AssertionError(f"row {row!r} missing from:\n{stdout}")


def test_edm_cifar10_smoke(tmp_path):
    before = _snapshot()
    out = _run("benchmarks/edm_cifar10.py", "--smoke", "--outdir", str(tmp_path / "out"))
    assert _snapshot() == before
    assert "| row | NFE | FID |" in out
    expected_nfe = {"heun-3": 5, "bdia-heun-g0.96-3": 7, "euler-4": 4}
    for row, nfe in expected_nfe.items():
        cells = _cells(out, row)
        assert int(cells[1]) == nfe
        value = float(cells[2])
        assert math.isfinite(value) and value >= 0
        assert len(list((tmp_path / "out" / row).rglob("*.png"))) == 8
    assert float(_cells(out, "heun-3")[2]) == 0.0  # the reference is this row's own images


def test_edm_cifar10_smoke_as_documented_needs_no_outdir():
    # docs/edm_cifar10.md gives the command without --outdir: its images go to a temporary
    # folder that is removed afterwards, and docs/ is left alone.
    before = _snapshot()
    out = _run("benchmarks/edm_cifar10.py", "--smoke")
    assert _snapshot() == before
    assert float(_cells(out, "heun-3")[2]) == 0.0


def test_gpu_check_smoke():
    before = _snapshot()
    out = _run("benchmarks/gpu_check.py", "--smoke")
    assert _snapshot() == before
    for mode in ("fp32", "tf32", "bf16"):
        for state in ("float32", "float64"):
            line = [ln for ln in out.splitlines() if re.match(rf"\| {mode} \| {state} \|", ln)]
            assert line, f"{mode}/{state} missing:\n{out}"
            cells = [c.strip() for c in line[0].strip("|").split("|")]
            assert float(cells[2]) > 0 and math.isfinite(float(cells[2]))
            assert int(cells[3]) == 5
    ratio = re.search(r"time ratio .*: ([0-9.]+)", out)
    assert ratio and 0 < float(ratio.group(1)) < 100
    err64 = float(_cells(out, "float64 state")[1])
    err32 = float(_cells(out, "float32 state")[1])
    assert 0 <= err64 < 1e-10
    assert math.isfinite(err32) and err32 < 1e-3
