"""The ``bdia`` command: solver listing, the toy comparison and what it writes."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import bdia
from bdia import compare as cmp
from bdia.cli import main


def test_solvers_lists_every_solver_with_order_and_cost():
    result = CliRunner().invoke(main, ["solvers"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert sorted(rows) == bdia.available_solvers()
    assert rows["heun"][1:3] == ["2", "2"] and "then 3" in " ".join(rows["heun"])
    assert rows["rk4"][1:3] == ["4", "4"] and "then 7" in " ".join(rows["rk4"])
    assert rows["ddim"] == ["ddim", "1", "1", "1", "yes"]
    assert rows["euler"][-1] == "no"


@pytest.mark.parametrize(
    "name,budget,steps",
    [
        ("euler", 10, 10),
        ("heun", 10, 5),
        ("rk4", 10, 2),
        ("bdia-euler", 10, 10),
        ("bdia-heun", 10, 3),  # 2 + 3 + 3 = 8 <= 10 < 11
        ("bdia-rk4", 10, 1),
        ("bdia-rk4", 11, 2),
        ("rk4", 3, 0),
    ],
)
def test_steps_for_budget(name, budget, steps):
    assert cmp.steps_for_budget(bdia.get_solver(name), budget) == steps


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| solver"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_compare_writes_report_and_plot(tmp_path):
    out, plot = tmp_path / "toy.md", tmp_path / "toy.png"
    args = [
        "compare",
        "--solvers",
        "euler,heun",
        "--gammas",
        "1.0,0.96",
        "--budgets",
        "10,20,40",
        "--batch",
        "32",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert result.stdout == text  # what was printed is what was written
    assert "![Relative error against NFE, one panel per base solver](toy.png)" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.md", "toy.png"]  # no temp files
    rows = _rows(text)
    assert set(rows) == {
        "euler",
        "bdia(euler, 1.0)",
        "bdia(euler, 0.96)",
        "heun",
        "bdia(heun, 1.0)",
        "bdia(heun, 0.96)",
    }
    # columns: solver, nominal, 3 errors, NFE used, order, rt32, rt64, amplification
    assert rows["euler"][5] == "10/20/40"
    assert rows["bdia(heun, 1.0)"][5] == "8/20/38"
    # Exact inversion in float64 state versus the approximate one of the plain solver.
    assert float(rows["bdia(euler, 0.96)"][8]) < 1e-12
    assert float(rows["euler"][8]) > 1e-4
    # Errors fall with the budget for the plain solvers.
    errors = [float(v) for v in rows["heun"][2:5]]
    assert errors[0] > errors[1] > errors[2]


def test_compare_on_a_generic_problem_skips_exponential_solvers(tmp_path):
    out = tmp_path / "osc.md"
    result = CliRunner().invoke(
        main,
        [
            "compare",
            "--problem",
            "oscillator",
            "--solvers",
            "ddim,rk4",
            "--gammas",
            "",
            "--budgets",
            "128,256,512",
            "--batch",
            "4",
            "--out",
            str(out),
            "--no-plot",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["osc.md"]
    rows = _rows(out.read_text())
    assert set(rows) == {"rk4"}
    assert abs(float(rows["rk4"][6]) - 4.0) < 0.3  # smooth problem: the nominal order shows


@pytest.mark.parametrize(
    "args,message",
    [
        (["--solvers", "heunn"], "did you mean 'heun'"),
        (["--budgets", "ten"], "comma-separated list of integers"),
        (["--gammas", "1.5"], "outside \\(0, 1\\]"),
        (["--gammas", "0.5,0"], "Invalid value for '--gammas': 0 .*0 is the base solver"),
        (["--solvers", "euler,bdia-heun"], "'bdia-heun' names a bdia variant.*--gammas"),
        (["--problem", "nope"], "Invalid value for '--problem'"),
    ],
)
def test_compare_rejects_bad_options(args, message, tmp_path):
    out = tmp_path / "never.md"
    result = CliRunner().invoke(main, ["compare", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert re.search(message, result.output)
    assert len(result.stderr.splitlines()) == 1, result.stderr  # refused before any run
    assert not out.exists()
