"""benchmarks/overhead.py: a tiny run as a subprocess, and its order of runs and sampler-work
ratio in process. No timing is asserted: only the table's shape, the NFEs and the arithmetic."""

import math

import pytest
from conftest import benchmark_module, run_child


def _overhead():
    return benchmark_module("overhead")


@pytest.mark.slow
def test_tiny_run_writes_one_row_per_base_solver(tmp_path):
    out = tmp_path / "overhead.md"
    args = ["--repeats", "2", "--steps", "4", "--batch", "2", "--size", "8", "--out", str(out)]
    proc = run_child(["benchmarks/overhead.py", *args], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.strip() == proc.stdout.strip()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    assert [c[0] for c in cells] == list(_overhead().BASE_SOLVERS)
    for c in cells:
        # Same NFE with and without BDIA: one evaluation per step, reused by both directions.
        assert c[1] == c[2] == "4"
        ratio, without_network = float(c[5]), float(c[8])
        assert 0 < ratio < math.inf and 0 < without_network < math.inf
        assert float(c[6]) > 0 and float(c[7]) > 0  # time outside the network, in ms
        assert c[9] == ("PASS" if without_network <= 1.03 else "FAIL")


def test_ratio_without_the_network_adds_the_extra_time_outside_it_to_the_base_median():
    row = _overhead().Row(
        "euler",
        base_times=[2.0, 9.0, 1.0],  # median 2.0
        bdia_times=[2.5, 2.5, 2.5],
        base_nfe={3},
        bdia_nfe={3},
        base_outside=[0.1, 0.5, 0.0],  # median 0.1
        bdia_outside=[0.3, 0.2, 0.4],  # median 0.3
    )
    assert row.ratio == pytest.approx(1.25, rel=1e-15)
    assert row.outside_ratio == pytest.approx((2.0 + 0.3 - 0.1) / 2.0, rel=1e-15)
    # Judged without the network's spread: 1.1 > 1.03, whatever the measured ratio.
    assert row.passed is False
    assert row.__class__(**{**vars(row), "bdia_outside": [0.15]}).passed is True  # 1.025
    assert row.__class__(**{**vars(row), "bdia_outside": [0.1], "bdia_nfe": {4}}).passed is False


def test_runs_are_interleaved_in_swapped_order_and_clock_the_network(monkeypatch):
    import torch

    import bdia

    overhead = _overhead()
    order = []
    real_sample = bdia.sample

    def sample(ode, solver, x, ts, **kwargs):
        order.append("bdia" if "bdia" in repr(solver) else "base")
        return real_sample(ode, solver, x, ts, **kwargs)

    monkeypatch.setattr(bdia, "sample", sample)
    clock = overhead.Clocked(lambda x, sigma: 0.5 * x)
    ode = bdia.DiffusionODE(clock, bdia.EDM())
    ts = bdia.karras_grid(3, final_zero=False)
    row = overhead.compare(ode, clock, "euler", torch.ones(2, 3), ts, repeats=3)
    # One warm-up each, then base-bdia, bdia-base, base-bdia: neither always runs second.
    assert order == ["base", "bdia", "base", "bdia", "bdia", "base", "base", "bdia"]
    assert len(row.base_times) == len(row.bdia_times) == 3
    assert row.base_nfe == row.bdia_nfe == {3}
    # The clock's time is inside each run's; what is left is the sampler's own.
    for times, outside in ((row.base_times, row.base_outside), (row.bdia_times, row.bdia_outside)):
        assert all(0 < o < t for t, o in zip(times, outside))
