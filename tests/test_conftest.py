"""The suite's own rules (see ``conftest.py``): the tests marked ``first_case_by_default``, and
how many workers ``-n auto`` starts."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CASES = """
import pytest

@pytest.mark.first_case_by_default
@pytest.mark.parametrize("n", [3, 1, 2])
def test_long(n):
    pass

@pytest.mark.first_case_by_default
def test_single():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_short(n):
    pass
"""


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("not slow", ["test_long[3]", "test_single", "test_short[1]", "test_short[2]"]),
        ("slow", ["test_long[1]", "test_long[2]"]),
    ],
)
def test_the_default_run_takes_a_marked_tests_first_case_and_the_slow_pass_the_others(
    pytester, selection, expected
):
    """Under ``-m "not slow"`` a marked test runs its first case only (a test of one case
    runs it); ``-m slow`` runs the others; an unmarked test runs every case by default."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    first_case_by_default: first case\n")
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest("-p", "no:cacheprovider", "-m", selection, "-v")
    result.assert_outcomes(passed=len(expected))
    ran = [line.split("::")[1].split()[0] for line in result.outlines if " PASSED" in line]
    assert ran == expected


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 2), (3, 3), (64, 4)])
def test_auto_starts_a_worker_per_usable_core_up_to_the_cap(monkeypatch, cores, workers):
    """``-n auto`` (the default run's ``addopts``) takes every core this process may use, at
    most ``MAX_WORKERS``, and on one core runs the tests in this process (0 workers)."""
    import conftest

    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    usable = set(range(cores))
    monkeypatch.setattr(conftest.os, "sched_getaffinity", lambda pid: usable, raising=False)
    assert conftest.MAX_WORKERS == 4
    assert conftest.pytest_xdist_auto_num_workers(None) == workers


def test_auto_leaves_an_explicit_worker_count_to_pytest_xdist(monkeypatch):
    """``PYTEST_XDIST_AUTO_NUM_WORKERS`` is pytest-xdist's own setting for ``-n auto``: the
    suite's rule then gives no answer (None), so that xdist's hook reads it."""
    import conftest

    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert conftest.pytest_xdist_auto_num_workers(None) is None
