"""``bdia compare``: what it prints, what it writes (only with --out), and what it refuses."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch
from click.testing import CliRunner

import bdia
from bdia import compare as cmp
from bdia.cli import main
from bdia.solvers import ExplicitRungeKutta, get_solver, registry

SMALL = ["--solvers", "euler,heun", "--gammas", "0.96", "--budgets", "10,20", "--batch", "16"]
SMALL_COMMAND = "bdia compare --solvers euler,heun --gammas 0.96 --budgets 10,20 --batch 16"
SHIPPED = bdia.available_solvers()


def _compare(*args: str) -> object:
    return CliRunner().invoke(main, ["compare", *args])


def _table_rows(markdown: str) -> list[str]:
    return [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")]


def test_default_prints_the_table_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _compare(*SMALL)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []
    assert _table_rows(result.stdout) == [
        "solver",
        "euler",
        "bdia(euler, 0.96)",
        "heun",
        "bdia(heun, 0.96)",
    ]
    # stdout is the report alone, so `bdia compare > table.md` keeps clean markdown.
    assert result.stdout.startswith("# Solver comparison on a toy problem\n")
    assert result.stdout.endswith(f"Written by `{SMALL_COMMAND}`.\n")
    assert "![" not in result.stdout
    assert "4 variants in " in result.stderr


def test_out_writes_the_report_and_its_plot_beside_it(tmp_path):
    out = tmp_path / "reports" / "mixture.md"
    result = _compare(*SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["mixture.md", "mixture.png"]
    assert (out.parent / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    assert "](mixture.png)" in text  # relative to the report, wherever it is read from
    assert text == result.stdout
    assert text.endswith(f"Written by `{SMALL_COMMAND} --out {out}`.\n")


def test_no_plot_writes_no_png_and_links_none(tmp_path):
    out = tmp_path / "toy.md"
    result = _compare(*SMALL, "--out", str(out), "--no-plot")
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["toy.md"]
    assert "![" not in out.read_text()
    assert out.read_text().endswith(f"Written by `{SMALL_COMMAND} --out {out} --no-plot`.\n")


def test_without_matplotlib_the_report_links_no_plot(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "toy.md"
    result = _compare(*SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["toy.md"]
    assert "![" not in out.read_text()
    assert "matplotlib is not installed" in caplog.text + result.output


@pytest.mark.parametrize(
    "args,option,words",
    [
        (
            ["--solvers", "ddim", "--problem", "oscillator"],
            "'--solvers'",
            ["ddim needs a diffusion ODE", "euler, heun, midpoint, rk4"],
        ),
        (
            ["--solvers", "ddim,dpm_solver_2", "--problem", "riccati"],
            "'--solvers'",
            ["ddim and dpm_solver_2 need", "euler, heun, midpoint, rk4"],
        ),
        (
            ["--solvers", "rk4,heun", "--budgets", "1", "--problem", "oscillator"],
            "'--budgets'",
            ["the cheapest, heun, needs 2 NFE", "at least 2"],
        ),
    ],
)
def test_an_empty_selection_says_why_in_one_line(tmp_path, monkeypatch, args, option, words):
    monkeypatch.chdir(tmp_path)
    result = _compare(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()  # refused before any computing: no progress, no timing
    assert line.startswith(f"Error: Invalid value for {option}: nothing to compare")
    for word in words:
        assert word in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["under a file", "a folder"])
def test_an_unusable_out_is_refused_before_computing(tmp_path, kind, monkeypatch):
    blocker = tmp_path / "notes"
    if kind == "under a file":
        blocker.write_text("a regular file")
        out = blocker / "toy.md"
    else:
        blocker.mkdir()
        out = blocker
    monkeypatch.setattr(cmp, "run_comparison", pytest.fail)
    result = _compare(*SMALL, "--out", str(out))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: Invalid value for '--out'")
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]
    assert blocker.is_dir() or blocker.read_text() == "a regular file"
    if blocker.is_dir():
        assert list(blocker.iterdir()) == []


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("args,inside", [([], 1), (["--threads", "2"], 2)])
def test_threads_apply_inside_the_command_and_are_restored(monkeypatch, args, inside):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # two threads even on a one-CPU runner
    seen = []
    real = cmp.run_comparison

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(cmp, "run_comparison", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = _compare(*SMALL, *args)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert seen == [inside]
    assert after == 3


def test_threads_are_restored_when_the_comparison_fails(monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(cmp, "run_comparison", fail)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # two threads even on a one-CPU runner
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = _compare(*SMALL, "--threads", "2")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 1 and "boom" in result.output
    assert after == 3


def test_run_comparison_refuses_an_empty_selection():
    with pytest.raises(cmp.EmptySelection, match="euler, heun, midpoint, rk4") as info:
        cmp.run_comparison(cmp.PROBLEMS["oscillator"], ["ddim"], gammas=[], batch=2)
    assert info.value.argument == "bases"
    with pytest.raises(cmp.EmptySelection, match="at least 4") as info:
        cmp.check_selection(cmp.PROBLEMS["mixture"], ["rk4"], [0.5], [3])
    assert info.value.argument == "budgets"


def test_a_variant_no_budget_holds_keeps_a_row_without_errors():
    results = cmp.run_comparison(
        cmp.PROBLEMS["mixture"], ["rk4"], gammas=[0.5], budgets=[8], batch=4
    )
    assert [r.variant.label for r in results] == ["rk4", "bdia(rk4, 0.5)"]
    assert results[0].nfe == {8: 8} and results[1].nfe == {}


def test_the_round_trip_does_not_depend_on_the_error_dtype():
    # A float32 run reuses its own sample for the float32 round trip; it must equal the one
    # a float64 run computes from scratch.
    kwargs = dict(gammas=[0.96], budgets=[10, 20], batch=8)
    problem = cmp.PROBLEMS["mixture"]
    r32 = cmp.run_comparison(problem, ["euler", "heun"], dtype=torch.float32, **kwargs)
    r64 = cmp.run_comparison(problem, ["euler", "heun"], dtype=torch.float64, **kwargs)
    for a, b in zip(r32, r64):
        assert a.variant == b.variant
        assert (a.roundtrip32, a.roundtrip64) == (b.roundtrip32, b.roundtrip64)
        assert a.error != b.error


def test_the_float32_round_trip_measures_the_round_trip_not_the_start_s_rounding():
    # The float32 round trip starts from the float64 start rounded to float32 (a relative
    # change of about 2e-8 here); measured against the float64 start, every exact inverse
    # would read as that rounding. BDIA's two-word round trip is exact to about u^2 = 3.6e-15
    # (float32) times the amplification (1.44 over these 9 steps), so 1e-13 leaves room for the
    # constant of the bound while staying five orders below the rounding of the start.
    problem = cmp.PROBLEMS["mixture"]
    x0 = problem.start(8, torch.Generator().manual_seed(0))
    start_rounding = float((x0.float().double() - x0).norm() / x0.norm())
    assert start_rounding > 1e-9
    (plain, exact) = cmp.run_comparison(problem, ["euler"], gammas=[0.96], budgets=[10], batch=8)
    assert exact.roundtrip32 < 1e-13 and exact.roundtrip64 < 1e-28
    # The table's amplification is that prod 1/gamma_k over the 9 two-step updates; the 9
    # divisions round to a few 1e-16, so 1e-12 is far below a missed or extra factor of 0.96.
    assert exact.amplification == pytest.approx(0.96**-9, rel=1e-12)
    assert math.isnan(plain.amplification)
    # The plain solver run backward is approximate in either state dtype, by far more.
    assert plain.roundtrip32 > 1e-3 and plain.roundtrip64 > 1e-3


# ------------------------------------------------------------------ per-state errors


def test_per_state_error_is_the_median_and_largest_of_each_state_s_own():
    reference = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    offset = torch.tensor([[0.3, 0.4], [0.0, 0.0], [0.0, 0.5], [0.2, 0.0]], dtype=torch.float64)
    original = reference.clone()
    # Each state's own error: |(0.3, 0.4)| / 5 = 0.1, 0, 0.5 / 1 = 0.5, 0.2 / 1 = 0.2. Four
    # states: the median is the mean of the middle two, (0.1 + 0.2) / 2 = 0.15 (torch's
    # median would give the lower one, 0.1). 1e-12 is far above the few roundings of the
    # norms (1e-16) and far below the gap to 0.1.
    median, largest = cmp.per_state_error((reference + offset).float(), reference)
    # The float32 end state rounds 3.3 and 4.4 by about 1e-7 of their size.
    assert median == pytest.approx(0.15, rel=1e-6)
    assert largest == pytest.approx(0.5, rel=1e-6)
    median, largest = cmp.per_state_error(reference + offset, reference)
    assert median == pytest.approx(0.15, rel=1e-12) and largest == pytest.approx(0.5, rel=1e-12)
    # An odd batch has one middle state; states of any shape count their every element.
    images = reference[:3].reshape(3, 1, 2, 1)
    median, _ = cmp.per_state_error((reference + offset)[:3].reshape(3, 1, 2, 1), images)
    assert median == pytest.approx(0.1, rel=1e-12)
    assert torch.equal(reference, original)  # the caller's tensors are left as they were


@pytest.mark.parametrize(
    "x,reference",
    [(torch.zeros(3, 2), torch.zeros(2, 3)), (torch.zeros(0, 2), torch.zeros(0, 2))],
)
def test_per_state_error_refuses_mismatched_or_empty_batches(x, reference):
    with pytest.raises(ValueError, match="one shape \\(batch, ...\\) with at least one state"):
        cmp.per_state_error(x, reference)


def test_order_slope_fits_the_finite_positive_errors():
    # 1e-1 at 10 NFE and 1e-3 at 100: two decades of error over one of NFE, order 2 (the
    # logarithms round by a few 1e-16, so 1e-12 is a generous tolerance).
    assert cmp.order_slope([(10, 1e-1), (100, 1e-3)]) == pytest.approx(2.0, rel=1e-12)
    # An infinite (diverged) or zero error is left out, not fitted.
    points = [(5, math.inf), (10, 1e-1), (50, 0.0), (100, 1e-3)]
    assert cmp.order_slope(points) == pytest.approx(2.0, rel=1e-12)
    assert math.isnan(cmp.order_slope([(10, 1e-1), (20, math.nan)]))
    assert math.isnan(cmp.order_slope([(10, 1e-1), (10, 1e-2)]))  # one NFE: no slope


def test_one_stray_state_moves_the_batch_error_and_not_the_median():
    """A start state whose end lies far from its reference, as one ending in another mode of
    a mixture does: here the reference of one state of 15 is replaced by its mirror image,
    so that state's error is about 2 while the other 14 are untouched."""
    problem = cmp.PROBLEMS["oscillator"]

    def stray(x):
        ref = problem.reference(x)
        ref[7] = -ref[7]
        return ref

    straying = dataclasses.replace(problem, reference=stray)
    kwargs = dict(gammas=[], budgets=[128, 256, 512], batch=15)
    (clean,) = cmp.run_comparison(problem, ["rk4"], **kwargs)
    (strayed,) = cmp.run_comparison(straying, ["rk4"], **kwargs)
    for b in kwargs["budgets"]:
        # One state of 15 with error 2 gives a batch error of about 2 / sqrt(15) = 0.5, some
        # 500 to 1e5 times rk4's error on the oscillator (1.0e-3 to 4e-6 at these budgets).
        assert strayed.error[b] > 0.4 and strayed.error[b] > 100 * clean.error[b]
        assert strayed.worst_error[b] == pytest.approx(2.0, rel=1e-2)
        # The oscillator is linear and its starts are multiples of one state, so every
        # clean state has the same relative error: the median, whichever state it falls
        # on, stays that error but for rounding (1e-12 is 1e4 roundings of the norms).
        assert strayed.median_error[b] == pytest.approx(clean.median_error[b], rel=1e-12)
    # rk4 is fourth order here (the clean slope is 4.1); the stray flattens the batch's slope
    # to about 0 (-0.004), not the median's.
    assert clean.measured_order == pytest.approx(4.0, abs=0.3)
    assert abs(strayed.measured_order) < 0.1
    assert strayed.median_order == pytest.approx(clean.measured_order, rel=1e-9)


def test_the_command_prints_the_median_and_worst_state_columns():
    result = _compare(*SMALL)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    head = next(line for line in lines if line.startswith("| solver"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    # The columns of before keep their places; the per-state ones follow them.
    assert columns[:9] == [
        "solver",
        "nominal order",
        "error @10",
        "error @20",
        "NFE used",
        "measured order",
        "round trip f32",
        "round trip f64",
        "amplification",
    ]
    assert columns[9:] == [
        "median error @10",
        "median error @20",
        "median order",
        "worst state @20",
    ]
    (euler,) = [line for line in lines if line.startswith("| euler |")]
    cells = dict(zip(columns, (c.strip() for c in euler.strip("|").split("|"))))
    # The whole batch's error is a root mean square of the states' own errors (weighted by
    # the squared size of their references), so never above the worst; on this mixture its
    # few strays put it above the median.
    assert 0 < float(cells["median error @20"]) < float(cells["worst state @20"])
    assert float(cells["median error @20"]) < float(cells["error @20"])
    assert float(cells["error @20"]) < float(cells["worst state @20"])
    assert float(cells["median error @10"]) > float(cells["median error @20"])
    assert 0.5 < float(cells["median order"]) < 2
    assert "Median error: the median over the start states" in result.stdout


# ------------------------------------------------------------------ flow matching from t = 1

OBELM_REFUSAL = "gamma='obelm' needs a finite noise level at every grid point"
RUN = ["euler", "bdia(euler, 0.96)", "heun", "bdia(heun, 0.96)"]


def test_the_flow_problem_converges_from_pure_noise_and_bdia_inverts_it_exactly():
    problem = cmp.PROBLEMS["flow-mixture"]
    assert problem.grid(4)[0].item() == 1.0  # the grid starts at pure noise
    heun, both = cmp.run_comparison(problem, ["heun"], gammas=[0.96], budgets=[10, 20, 50], batch=8)
    # Heun keeps its order from t = 1 (the velocity is finite there): 7.3e-2, 5.6e-3, 1.1e-3.
    errors = [heun.error[b] for b in (10, 20, 50)]
    assert all(math.isfinite(e) for e in errors)
    assert errors[0] > errors[1] > errors[2]
    assert both.refused is None and both.nfe == {10: 8, 20: 20, 50: 50}
    # The two-word inverse is exact to a few u^2 of the state times the amplification
    # (0.96^-16 = 1.92 over the 16 updates of 50 NFE): u^2 = 1.2e-32 in float64, 3.6e-15 in
    # float32; 8.3e-33 and 1.2e-15 seen. The bounds leave a factor of 40 and 15 for the
    # constant, and lie far below a one-word float64 state's rounding (1e-16) and the plain
    # solver run backward (6.3e-3).
    assert both.amplification == pytest.approx(0.96**-16, rel=1e-12)
    assert both.roundtrip64 < 1e-30 and both.roundtrip32 < 1e-13
    assert heun.roundtrip64 > 1e-3


def test_a_variant_whose_solver_refuses_the_grid_is_reported_not_run():
    problem = cmp.PROBLEMS["flow-mixture"]
    results = cmp.run_comparison(
        problem, ["euler", "heun"], gammas=[0.96, "obelm"], budgets=[10], batch=4
    )
    labels = [r.variant.label for r in results]
    assert labels == [
        "euler",
        "bdia(euler, 0.96)",
        "bdia(euler, obelm)",
        "heun",
        "bdia(heun, 0.96)",
        "bdia(heun, obelm)",
    ]
    refused = [r for r in results if r.refused is not None]
    assert [r.variant.label for r in refused] == ["bdia(euler, obelm)", "bdia(heun, obelm)"]
    for r in refused:
        assert OBELM_REFUSAL in r.refused
        assert r.nfe == {} and r.error == {}  # refused before any model call
        assert math.isnan(r.roundtrip64) and math.isnan(r.amplification)
    report = cmp.markdown_report(problem, results, [10], torch.float64, "cmd")
    assert _table_rows(report) == ["solver", *RUN]
    (line,) = [line for line in report.splitlines() if line.startswith("Not run")]
    assert line.startswith(f"Not run: bdia(euler, obelm), bdia(heun, obelm): {OBELM_REFUSAL}")
    assert line.endswith("give gamma as a number.")


class _RefusesPureNoise(ExplicitRungeKutta):
    """Euler that refuses a grid starting at pure noise, as a registered solver may."""

    def check(self, ode, ts):
        super().check(ode, ts)
        if ode.schedule.alpha(ts[0]) == 0.0:
            raise ValueError("this solver cannot start at pure noise")


@pytest.fixture
def refuses_pure_noise(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    bdia.register_solver("no_pure_noise")(lambda: _RefusesPureNoise(get_solver("euler").tableau))


def test_a_selection_every_variant_of_which_is_refused_is_empty(refuses_pure_noise):
    # Each base also runs alone, and no shipped base refuses the flow grid: a selection of
    # refused variants alone needs a base that refuses it as well.
    problem = cmp.PROBLEMS["flow-mixture"]
    for call in (cmp.check_selection, cmp.run_comparison):
        with pytest.raises(cmp.EmptySelection) as info:
            call(problem, ["no_pure_noise"], gammas=["obelm"], budgets=[10])
        assert info.value.argument == "bases"
        message = str(info.value)
        assert message.startswith(
            "nothing to compare: every variant refuses problem 'flow-mixture'"
        )
        # A meta-solver refuses what its base refuses, with the base's reason.
        refusal = "no_pure_noise, bdia(no_pure_noise, obelm): this solver cannot start at pure"
        assert refusal in message
        assert message.endswith("solvers that work on it: " + ", ".join(SHIPPED))
    # One variant that runs is enough.
    cmp.check_selection(problem, ["no_pure_noise", "euler"], gammas=["obelm"], budgets=[10])


def test_the_command_compares_on_the_flow_problem_and_names_what_it_did_not_run():
    # SMALL's solvers, budgets and batch, with obelm beside 0.96.
    result = _compare("--problem", "flow-mixture", *SMALL[:2], "--gammas", "0.96,obelm", *SMALL[4:])
    assert result.exit_code == 0, result.output
    assert _table_rows(result.stdout) == ["solver", *RUN]
    assert result.stdout.startswith(
        "# Solver comparison on a toy problem\n\nProblem `flow-mixture`"
    )
    assert f"\nNot run: bdia(euler, obelm), bdia(heun, obelm): {OBELM_REFUSAL}" in result.stdout
    assert "6 variants in " in result.stderr


def test_gamma_zero_is_compared_without_a_round_trip():
    """bdia(base, 0) is the base solver: its errors are measured, its amplification is inf and
    its round trip, which no inverse exists for, is left unmeasured. The comparison raised
    the inversion's refusal from its round trip instead."""
    plain, zero = cmp.run_comparison(
        cmp.PROBLEMS["mixture"], ["euler"], gammas=[0.0], budgets=[10], batch=4
    )
    assert zero.error == plain.error
    assert math.isinf(zero.amplification)
    assert math.isnan(zero.roundtrip32) and math.isnan(zero.roundtrip64)
