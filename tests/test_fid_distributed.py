"""FID statistics over several processes: ``FeatureStatistics.all_reduce`` in a two-process
gloo group, and ``bdia fid-ref`` under torchrun against one process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, child_env, run_torchrun
from PIL import Image

from bdia.cli import main
from bdia.metrics.fid import FeatureStatistics, StandInDetector, load_reference

# Each rank accumulates its share, sums over the group three ways, and saves what it ends
# with: (a) both ranks hold vectors, (b) rank 1 holds none, (c) the dimensions disagree.
RANK_SCRIPT = """
import datetime, sys
import numpy as np
import torch.distributed as dist
from bdia.metrics.fid import FeatureStatistics

rank, store, features, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group(
    "gloo", init_method=f"file://{store}", rank=rank, world_size=2,
    timeout=datetime.timedelta(seconds=60),
)
x = np.load(features)
shared = FeatureStatistics().add(x[rank::2])
shared.seconds = 1.0 + rank
shared.all_reduce("cpu")
one_sided = FeatureStatistics().add(x) if rank == 0 else FeatureStatistics()
one_sided.all_reduce()
try:
    FeatureStatistics().add(x[:, : 5 - rank]).all_reduce()
    error = ""
except ValueError as err:
    error = str(err)
dist.destroy_process_group()
np.savez(
    out, n=[shared.n, one_sided.n], seconds=shared.seconds, sum=shared.sum,
    sum_outer=shared.sum_outer, one_sum=one_sided.sum, one_sum_outer=one_sided.sum_outer,
    error=error,
)
"""


@pytest.mark.slow
def test_all_reduce_sums_two_gloo_processes(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 5)) + 3.0
    np.save(tmp_path / "x.npy", x)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path / "store")]
            + [str(tmp_path / "x.npy"), str(tmp_path / f"rank{rank}.npz")],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    part0, part1 = FeatureStatistics().add(x[0::2]), FeatureStatistics().add(x[1::2])
    whole = FeatureStatistics().add(x)
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as saved:
            got = dict(saved)
        # Two ranks: each total is one float64 addition of the two parts, which is
        # commutative, so whichever rank gloo adds first the result is exactly the merge.
        assert list(got["n"]) == [7, 7]
        np.testing.assert_array_equal(got["sum"], part0.sum + part1.sum)
        np.testing.assert_array_equal(got["sum_outer"], part0.sum_outer + part1.sum_outer)
        assert got["sum"].dtype == got["sum_outer"].dtype == np.float64
        assert float(got["seconds"]) == 2.0  # the slower rank's, not the sum
        # A rank without vectors adds zeros: both end with rank 0's totals, bit for bit.
        np.testing.assert_array_equal(got["one_sum"], whole.sum)
        np.testing.assert_array_equal(got["one_sum_outer"], whole.sum_outer)
        # Both ranks refuse a mismatch, rather than one raising while the other waits.
        assert str(got["error"]) == (
            "ranks accumulated features of different dimensions (4 to 5); "
            "every rank must use the same detector"
        )


@pytest.fixture
def detector(tmp_path):
    # 4 features: 7 images then give a full-rank covariance (no small-sample warning), and
    # the sums are what is tested, not the dimension.
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(StandInDetector(features=4)), str(path))
    return path


@pytest.mark.slow
def test_torchrun_two_processes_give_the_statistics_of_one(tmp_path, detector):
    folder = tmp_path / "images"
    folder.mkdir()
    g = np.random.default_rng(1)
    # 7 images, batch 2: rank 0 gets 4 (two full batches), rank 1 gets 3 (a full and a half).
    for i in range(7):
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = ["fid-ref", "--images", str(folder), "--detector", str(detector), "--batch", "2"]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one.npz"), "--no-progress"])
    assert one.exit_code == 0, one.output
    launch = ["--standalone", "--nproc_per_node=2", "-m", "bdia.cli", *args]
    launch += ["--out", str(tmp_path / "two.npz"), "--workers", "1", "--no-progress"]
    two = run_torchrun(launch, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    # Rank 0 alone writes and reports: one line, with all 7 images and the rate.
    lines = [line for line in two.stderr.splitlines() if "two.npz" in line]
    assert len(lines) == 1 and "from 7 images; features at " in lines[0], two.stderr
    assert lines[0].endswith(" images/s")
    assert "from 7 images; features at " in one.stderr
    a, b = (
        dict(zip(("mu", "sigma"), load_reference(tmp_path / f))) for f in ("one.npz", "two.npz")
    )
    # The same float64 sums in another order (rank by rank, then across ranks): rounding of
    # ~1e-16 relative, grown about tenfold where sigma subtracts n mu mu^T from the sum of
    # outer products (the features' mean is ~3 times their spread). 1e-12 relative (of the
    # largest entry, for near-zero covariances) allows that with margin, while one image
    # lost or counted twice moves mu and sigma by ~10% of their size. (Here the difference
    # came out 0: products of float32 features are exact in float64, and sums of seven of
    # them mostly are too; the tolerance does not rely on that.)
    np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-12, atol=0)
    scale = np.abs(a["sigma"]).max()
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-12, atol=1e-12 * scale)
    assert not np.array_equal(a["mu"], np.zeros(4))


def test_each_torchrun_process_selects_its_own_gpu_before_joining(monkeypatch):
    """Under torchrun on a CUDA machine every process must make cuda:LOCAL_RANK its current
    device before NCCL starts: otherwise all of them work on cuda:0. Checked by its calls,
    since no test may need a GPU."""
    import torch.distributed as dist

    from bdia.cli import _ranks

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert _ranks.rank_and_world() == (1, 2)
    assert calls == [("set", 1), ("init", "cpu:gloo,cuda:nccl")]
