"""The declared lower bounds are what ``.ci/lowest`` pins (docs/decisions.md, "Supported
versions"): every requirement the suite imports has one, and one without is refused."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import REPO, run_child

tomllib = pytest.importorskip("tomllib", reason="the pin helper runs on Python 3.11 and later")
HELPER = REPO / ".ci" / "lowest_pins.py"


def _helper():
    spec = importlib.util.spec_from_file_location("lowest_pins", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_requirement_the_suite_imports_is_pinned_at_its_lower_bound():
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    declared = project["dependencies"] + extras["test"] + extras["plot"]
    pins = _helper().lowest_pins(REPO / "pyproject.toml")
    assert len(pins) == len(declared)
    for requirement, pin in zip(declared, pins, strict=True):
        assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[[a-z,]+\])?==[0-9.]+", pin), pin
        assert pin == requirement.replace(">=", "=="), (requirement, pin)
    names = [pin.split("==")[0] for pin in pins]
    assert {"torch", "numpy", "click", "diffusers"} <= set(names)


def test_a_requirement_without_a_lower_bound_is_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2.6", "numpy"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=7"]\nplot = []\n'
    )
    result = run_child([str(HELPER), str(pyproject)], timeout=60)
    assert result.returncode == 1
    assert "'numpy'" in result.stderr and "NAME>=VERSION" in result.stderr
    assert result.stdout == ""
