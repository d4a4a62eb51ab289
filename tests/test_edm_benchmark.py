"""Smoke runs of benchmarks/edm_cifar10.py and benchmarks/gpu_check.py as subprocesses,
gpu_check's reference sampler, FLOP count, timing and report functions in process, and the
gpu_check.sh wrapper with a stand-in interpreter."""

import copy
import hashlib
import math
import os
import re
import subprocess
import time

import pytest
import torch
from conftest import REPO, benchmark_module, run_child
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bdia
from bdia import generate

DOCS = REPO / "docs" / "benchmarks"


def _snapshot():
    """The published pages' hashes; dot files (a running study's cache) are not pages."""
    if not DOCS.exists():
        return {}
    return {
        str(p.relative_to(DOCS)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(DOCS.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_edm_cifar10_smoke_as_documented_needs_no_outdir():
    # docs/edm_cifar10.md gives the command without --outdir: its images go to a temporary
    # folder that is removed afterwards, and docs/ is left alone.
    before = _snapshot()
    out = _run("benchmarks/edm_cifar10.py", "--smoke")
    assert _snapshot() == before
    assert float(_cells(out, "heun-3")[2]) == 0.0


# ------------------------------------------------------------------------- gpu_check


def _gpu_check():
    return benchmark_module("gpu_check")


def _table(text, first_column):
    """The Markdown table whose header starts with ``| first_column |``, as dicts by header."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_column} |"))
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:]]
    header, table = split[0], []
    for cells in split[2:]:
        if len(cells) != len(header):
            break
        table.append(dict(zip(header, cells, strict=True)))
    return table


def _gpu_md():
    """docs/benchmarks/gpu.md's bytes, or None: the one file gpu_check writes by default.
    (Only that file is compared: other benchmarks running meanwhile may write under docs/.)"""
    path = DOCS / "gpu.md"
    return path.read_bytes() if path.exists() else None


def _targets(text):
    return {row["target"].split(" ")[0]: row[""] for row in _table(text, "target")}


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    before = _gpu_md()
    report = tmp_path / "gpu.md"
    out = _run("benchmarks/gpu_check.py", "--smoke", "--out", str(report))
    assert _gpu_md() == before
    assert report.read_text() == out  # the file written is the report printed

    rows = {r["row"]: r for r in _table(out, "row")}
    eager = ["fp32", "tf32", "bf16", "fp16"]
    compiled = ["bf16 +compile", "fp16 +compile"]
    extra = ["bf16 +compile reduce-overhead", "bf16 +compile +channels_last"]
    assert list(rows) == eager + compiled + extra
    for name, row in rows.items():
        assert row["NFE"] == "5", row  # heun on karras_grid(3), library and reference alike
        for column in ("images/s", "reference images/s", "ratio", "ratio (median)"):
            assert 0 < float(row[column]) < math.inf, (name, column, row)
        # The same sampler on the same network: only rounding tells the two apart.
        assert float(row["difference"]) < 1e-4, row
        assert row["batch"] == ("2" if name in ("fp32", "tf32") else "4")
        if name in eager:
            assert row["compile s"] == "n/a" and row["recompiles"] == "n/a"
        else:
            assert float(row["compile s"]) >= 0
            assert row["recompiles"].startswith("0 "), row  # nothing compiled after the first call
        assert row["% of dense peak"] == "n/a" and row["peak GiB"] == "n/a"  # CPU

    # A smoke run splits every row: each sampler's run into the parts around its 5 calls.
    splits = _table(out, "row | sampler")
    assert [(s["row"], s["sampler"]) for s in splits] == [
        (name, sampler) for name in rows for sampler in ("library", "reference")
    ]
    for split in splits:
        assert split["calls"] == "5", split
        parts = [float(split[f"{part} ms"]) for part in ("before", "network", "between", "after")]
        assert float(split["network ms"]) > 0 and min(parts) >= 0, split
        # The parts tile the run; each printed to 0.01 ms.
        assert sum(parts) == pytest.approx(float(split["total ms"]), abs=0.03), split

    (overhead,) = _table(out, "row | batch | NFE heun")
    assert (overhead["NFE heun"], overhead["NFE bdia"]) == ("5", "7")
    assert 0 < float(overhead["per-NFE ratio"]) < math.inf
    assert overhead["row"] in eager + compiled + extra and "fp32" not in overhead["row"]

    trips = {t["state"]: t for t in _table(out, "state")}
    assert trips["float64"]["relative error"] == "0.000e+00"
    assert trips["float64"]["bit-exact"] == "yes"
    assert float(trips["float64"]["low word"]) >= 0
    assert float(trips["float32"]["relative error"]) < 1e-3

    gflop = re.search(r"FLOPs: ([0-9.]+) GFLOP per image per evaluation", out)
    assert gflop and 0 < float(gflop.group(1)) < 1  # tiny-cond: tens of MFLOP
    targets = _targets(out)
    assert targets["bf16"] == "not measured"  # no batch-512, 35-NFE row in a smoke run
    assert targets["round"] == "met"
    assert targets["compile"] == "met"  # aot_eager on a tiny network: seconds


@pytest.mark.slow
def test_gpu_check_smoke_skips_what_does_not_fit_and_still_reports():
    before = _gpu_md()
    out = _run("benchmarks/gpu_check.py", "--smoke", "--budget", "0")
    assert _gpu_md() == before  # no --out in a smoke run: no file written
    rows = _table(out, "row")
    # The extra rows are bf16's, the precision the speed target names.
    assert [r["row"] for r in rows] == [
        "fp32",
        "tf32",
        "bf16",
        "fp16",
        "bf16 +compile",
        "fp16 +compile",
        "bf16 +compile reduce-overhead",
        "bf16 +compile +channels_last",
    ]
    assert all(r["note"].startswith("skipped:") for r in rows), rows
    assert "Not measured: no half-precision row measured." in out
    assert "No row split (none was measured above the target)." in out
    assert [t["note"].startswith("skipped:") for t in _table(out, "state")] == [True, True]
    assert set(_targets(out).values()) == {"not measured"}


@pytest.mark.parametrize(
    ("fail", "status"),
    [
        ({}, 0),
        ({"gpu_check": 3}, 3),
        ({"fid_speed": 5}, 5),
        ({"gpu_check": 3, "fid_speed": 5}, 3),
    ],
)
def test_gpu_check_sh_runs_both_scripts_from_the_checkout_and_keeps_the_first_failure(
    tmp_path, fail, status
):
    """The shell wrapper with a stand-in interpreter ($PYTHON) that logs each call and exits
    as told: both scripts run whatever the first one returns, from the repository root, with
    the checkout first on PYTHONPATH and the options given to gpu_check.py alone."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    codes = " ".join(f"{name}) exit {code};;" for name, code in fail.items())
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$PWD|${{PYTHONPATH%%:*}}|$*" >> {log}\n'
        f'case "$(basename "$1" .py)" in {codes} *) exit 0;; esac\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--budget", "9"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == status, proc.stderr
    assert log.read_text().splitlines() == [
        f"{REPO}|{REPO}|benchmarks/gpu_check.py --budget 9",
        f"{REPO}|{REPO}|benchmarks/fid_speed.py",
    ]


def test_gpu_check_sh_outdir_sends_each_page_into_the_folder(tmp_path):
    """--outdir (relative to where the wrapper is started) becomes each script's --out, the
    folder made first; the other options still go to gpu_check.py alone."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--budget", "9", "--outdir", "pages"],
        cwd=tmp_path,
        env={**os.environ, "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pages = tmp_path / "pages"
    assert pages.is_dir()
    assert log.read_text().splitlines() == [
        f"benchmarks/gpu_check.py --budget 9 --out {pages}/gpu.md",
        f"benchmarks/fid_speed.py --out {pages}/fid_speed.md",
    ]


@pytest.mark.parametrize(
    ("total", "budgets"),
    [
        (None, [None]),  # 450 s, nearly all of it left: fid_speed keeps its own 180 s
        # What is left of the limit, when less than 180 s: bash's SECONDS counts whole
        # seconds of the clock, so it reads 1 when the run crosses one, however short.
        ("100", [100, 99]),
        ("10", [60]),  # never less than 60 s
        ("0100", [100, 99]),  # decimal, whatever the leading zeros
    ],
)
def test_gpu_check_sh_gives_fid_speed_what_is_left_of_the_shared_limit(tmp_path, total, budgets):
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    env.pop("GPU_CHECK_TOTAL_S", None)
    if total is not None:
        env["GPU_CHECK_TOTAL_S"] = total
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    expected = [
        "benchmarks/fid_speed.py" + ("" if b is None else f" --budget {b}") for b in budgets
    ]
    assert log.read_text().splitlines()[1] in expected


def test_gpu_check_sh_refuses_a_limit_that_is_not_whole_seconds(tmp_path):
    env = {**os.environ, "PYTHON": "false", "GPU_CHECK_TOTAL_S": "7.5m"}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "GPU_CHECK_TOTAL_S must be whole seconds, got '7.5m'" in proc.stderr


def test_a_split_run_puts_each_wait_in_its_part():
    """measure_split on the CPU, with sleeps where a sampler's parts would be: 10 ms before the
    first call, two calls of a network that takes 20 ms, 5 ms between them, 2 ms after. A
    sleep lasts at least what it asks, so each part is at least its sleep; the parts tile
    the run whatever the machine's load adds."""
    g = _gpu_check()

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.020)
            return x

    def run(net):
        time.sleep(0.010)
        net(torch.zeros(1))
        time.sleep(0.005)
        net(torch.zeros(1))
        time.sleep(0.002)

    clocked = g.ClockedNetwork(Slow(), torch.device("cpu"))
    split = g.measure_split(run, clocked)
    assert split.calls == 2
    assert split.before >= 0.010 and split.between >= 0.005 and split.after >= 0.002
    assert split.network >= 0.040
    parts = split.before + split.network + split.between + split.after
    assert parts == pytest.approx(split.total, rel=1e-12)
    with pytest.raises(RuntimeError, match="no network call"):
        g.measure_split(lambda net: None, clocked)


def test_a_failure_before_the_first_step_still_leaves_a_report(tmp_path, monkeypatch):
    g = _gpu_check()

    def broken(name, seed=0):
        raise RuntimeError("no network today")

    monkeypatch.setattr(g.generate, "random_network", broken)
    report = tmp_path / "gpu.md"
    assert g.main(["--smoke", "--out", str(report)]) == 0
    text = report.read_text()
    assert "- stopped: failed: RuntimeError('no network today')" in text
    assert set(_targets(text).values()) == {"not measured"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "0"], "--repeats: must be at least 1, got 0"),
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--batch", "-1"], "--batch: must be at least 1, got -1"),
        (["--fp32-batch", "0"], "--fp32-batch: must be at least 1, got 0"),
        (["--round-trip-batch", "0"], "--round-trip-batch: must be at least 1, got 0"),
        (["--budget", "nan"], "--budget: must be a number of seconds, 0 or more, got nan"),
        (["--budget", "-1"], "--budget: must be a number of seconds, 0 or more, got -1"),
    ],
)
def test_arguments_out_of_range_are_refused_before_the_card_is_touched(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _gpu_check().main(["--smoke", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_report_names_the_arguments_given_to_main_even_none(monkeypatch, capsys):
    g = _gpu_check()

    def broken(name, seed=0):
        raise RuntimeError("no network today")

    monkeypatch.setattr(g.generate, "random_network", broken)
    monkeypatch.setattr(g.sys, "argv", ["pytest", "-q"])  # not this run's arguments
    assert g.main([]) == 0  # no GPU here: a smoke run, the report printed only
    assert "- command: python benchmarks/gpu_check.py\n" in capsys.readouterr().out


def test_rounds_after_the_warm_up_fit_what_is_left():
    g = _gpu_check()
    ctx = g.Context(torch.device("cpu"), steps=18, repeats=3, trip_batch=2, deadline=0.0)
    # The warm-up ran 3 NFE of each sampler in 6 s: a round of both at 35 NFE takes 70 s.
    ctx.deadline = g.elapsed() + 1000.0
    assert g.affordable_repeats(ctx, 6.0, 3, reserve=0.0) == 3
    assert g.affordable_repeats(ctx, 6.0, 3, reserve=800.0) == 2  # 200 s left: 2 rounds
    assert g.affordable_repeats(ctx, 6.0, 3, reserve=990.0) == 1  # never fewer than one


def _gaussian_denoiser(sigma_data=0.5):
    """The exact denoiser of data N(0, sigma_data^2), called as the samplers call a network."""

    def denoise(x, sigma):
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        return x * sigma_data**2 / (s**2 + sigma_data**2)

    return denoise


def test_reference_heun_is_the_library_heun():
    gpu_check = _gpu_check()
    denoise = _gaussian_denoiser()
    ts = bdia.karras_grid(18)
    x = 80 * torch.randn(
        3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    def net(x, sigma):  # the reference passes sigma as float32, as the library does
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float32
        return denoise(x, sigma.double())

    ref, nfe = gpu_check.edm_heun(net, x, ts.tolist(), {})
    ode = bdia.DiffusionODE(denoise, bdia.EDM(), model_dtype=torch.float64)
    lib, lib_nfe = gpu_check.library_sample(ode, bdia.get_solver("heun"), x, ts)
    assert nfe == lib_nfe == 35
    # float32 sigmas in the reference's network calls: agreement to their rounding.
    torch.testing.assert_close(ref, lib, rtol=1e-6, atol=1e-6)
    # The probability-flow ODE of Gaussian data scales x by sqrt(s^2 + sd^2): at sigma = 0,
    # x sd / sqrt(80^2 + sd^2). Heun is second order: twice the steps, about a quarter of the
    # error (measured 0.055 at 18 steps, 0.012 at 36); a first-order step would only halve it.
    exact = x * 0.5 / math.sqrt(80**2 + 0.25)
    errors = [
        float((gpu_check.edm_heun(net, x, bdia.karras_grid(n).tolist(), {})[0] - exact).norm())
        / float(exact.norm())
        for n in (18, 36)
    ]
    assert errors[0] < 0.1 and errors[1] < errors[0] / 3.5


def test_count_gflop_scales_to_one_image():
    gpu_check = _gpu_check()
    net = generate.random_network("tiny-cond")
    per_image, how = gpu_check.count_gflop(net, 8)
    assert "meta" in how
    x, sigma, cond = gpu_check.network_inputs(net, 1, 1.0, torch.device("cpu"), torch.float32)
    # The unfused attention kernel: FlopCounterMode has formulas for CUDA's fused kernels and
    # counts the unfused one's matrix products, but not the CPU's flash kernel.
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        copy.deepcopy(net)(x, sigma, **cond)
    assert per_image == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-12)
    assert per_image > 0


def test_interleave_takes_turns_in_alternating_order():
    gpu_check = _gpu_check()
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in "ab"}
    times, last = gpu_check.interleave(fns, 3, torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert last == {"a": "a", "b": "b"}


def _row(gpu_check, name, precision, lib, ref, batch=512, nfe=35, **kwargs):
    config = gpu_check.Config(name, precision, batch, {} if "compile" in name else None)
    return gpu_check.Row(config, lib=lib, ref=ref, nfe_lib=nfe, nfe_ref=nfe, **kwargs)


def test_targets_follow_the_measured_numbers():
    g = _gpu_check()
    fast = _row(g, "bf16 +compile", "bf16", [1.9, 2.0], [1.88, 1.95], compile_s=41.0)
    trips = [g.RoundTrip("float32", 64, 72, 1e-7, False), g.RoundTrip("float64", 64, 72, 0.0, True)]
    overhead = g.Overhead(
        "bf16 +compile", 512, heun=[2.0], bdia=[2.0 * 37 / 35], nfe_heun=35, nfe_bdia=37
    )
    verdicts = [met for _, _, met in g.targets([fast], overhead, trips)]
    assert verdicts == [True, True, True, True, True]  # 269 images/s, 1.011, 1.000, 41 s, exact

    slow = _row(g, "fp16 +compile", "fp16", [2.1], [2.0], compile_s=95.0)
    small = _row(g, "bf16", "bf16", [0.1], [0.1], batch=64)  # fast, but not batch 512
    overhead.bdia = [2.2 * 37 / 35]
    trips[1].exact, trips[1].error = False, 1e-17
    measured = g.targets([small, fast, slow], overhead, trips)
    assert [met for _, _, met in measured] == [True, False, False, False, False]
    assert "fp16 +compile" in measured[1][1] and "1.050" in measured[1][1]  # the worst row
    assert "95.0" in measured[3][1]

    skipped = g.Row(g.Config("bf16", "bf16", 512), note="skipped: budget")
    assert [met for _, _, met in g.targets([skipped], None, [])] == [None] * 5


@pytest.mark.parametrize(
    ("card", "peak", "practical"),
    [
        ("NVIDIA H200", 989.0, 790.0),
        ("NVIDIA H100 80GB HBM3", 989.0, None),
        ("NVIDIA H100 PCIe", 756.0, None),
        ("NVIDIA H200 NVL", 835.0, None),
        ("NVIDIA GH200 480GB", 989.0, None),
        ("NVIDIA A100-SXM4-80GB", 312.0, None),
        ("Some other card", None, None),
    ],
)
def test_peaks_by_card_name(card, peak, practical):
    peaks, got = _gpu_check().peaks_for(card)
    assert peaks.get("bf16") == peaks.get("fp16") == peak
    assert got == practical


def test_render_reports_tflops_and_shares_of_the_peaks():
    g = _gpu_check()
    rows = [
        _row(g, "bf16 +compile", "bf16", [2.0, 2.2], [2.0, 2.1], compile_s=40.0, recompiles=0),
        _row(g, "fp32", "fp32", [1.0], [1.0], batch=64, peak_bytes=3 * 2**30, difference=1e-7),
        g.Row(g.Config("fp16 +compile", "fp16", 512, {}), note="skipped: planned 60 s"),
    ]
    rows[0].graphs, rows[0].difference = 1, 2e-3
    text = g.render({"device": "x"}, rows, None, [], 42.0, "NVIDIA H200")
    table = {r["row"]: r for r in _table(text, "row")}
    bf16 = table["bf16 +compile"]
    # 512 images in 2.0 s, 35 evaluations of 42 GFLOP each: 376.32 TFLOP/s, 38.05% of 989.
    assert bf16["images/s"] == "256.00" and bf16["TFLOP/s"] == "376.3"
    assert bf16["% of dense peak"] == "38.1" and bf16["% of 790"] == "47.6"
    assert (bf16["ratio"], bf16["ratio (median)"]) == ("1.000", "1.024")
    assert bf16["recompiles"] == "0 (first call: 1 graph)" and bf16["runs"] == "2"
    fp32 = table["fp32"]
    assert fp32["% of dense peak"] == f"{100 * 64 * 35 * 42 / 1e3 / 67:.1f}"
    assert fp32["% of 790"] == "n/a"  # the practical figure is a half-precision one
    assert fp32["peak GiB"] == "3.00" and fp32["compile s"] == "n/a"
    assert table["fp16 +compile"]["note"] == "skipped: planned 60 s"
    assert table["fp16 +compile"]["images/s"] == "-"
    assert "Not measured: no half-precision row." in text

    unknown = {r["row"]: r for r in _table(g.render({}, rows, None, [], 42.0, "Other"), "row")}
    assert unknown["bf16 +compile"]["% of dense peak"] == "n/a"
    assert unknown["bf16 +compile"]["% of practical"] == "n/a"


# ------------------------------------------------------------------------- unet_profile


@pytest.mark.slow
def test_unet_profile_smoke(tmp_path):
    page = DOCS / "unet_profile.md"
    before = page.read_bytes() if page.exists() else None
    report = tmp_path / "profile.md"
    out = _run("benchmarks/unet_profile.py", "--smoke", "--out", str(report))
    assert (page.read_bytes() if page.exists() else None) == before
    assert report.read_text() == out
    rows = [(r["resampling"], r["mode"]) for r in _table(out, "resampling")]
    assert rows == [
        ("grouped", "eager"),
        ("blockwise", "eager"),
        ("grouped", "compiled"),
        ("blockwise", "compiled"),
    ]
    for row in _table(out, "resampling"):
        assert float(row["median s"]) > 0 and row["evaluations"] == "2"
    kernels = _table(out, "kernel")
    assert kernels and all(float(k["ms"]) > 0 for k in kernels)
    shares = [float(k["share"].rstrip("%")) for k in kernels]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 100.5


def test_unet_profile_grouped_form_is_edms_and_is_put_back():
    # The "grouped" rows run the network with EDM's convolutions, and only inside the block.
    profile = benchmark_module("unet_profile")
    from bdia.models import networks

    blockwise = networks._upsample, networks._downsample
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    f = torch.full((1, 1, 2, 2), 0.25)
    with profile.resampling("grouped"):
        assert (networks._upsample, networks._downsample) != blockwise
        grouped = networks._downsample(x, f, 0)
    assert (networks._upsample, networks._downsample) == blockwise
    expected = torch.nn.functional.conv2d(x, f.tile(3, 1, 1, 1), groups=3, stride=2)
    assert torch.equal(grouped, expected)
    with profile.resampling("blockwise"):
        assert (networks._upsample, networks._downsample) == blockwise
