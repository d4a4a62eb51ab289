"""The suite's own rule for tests marked ``first_case_by_default`` (see ``conftest.py``)."""

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
