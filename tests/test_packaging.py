"""The declared lower bounds are what ``.ci/lowest`` pins (docs/decisions.md, "Supported
versions"): every requirement the suite imports has one, and one without is refused."""

from __future__ import annotations

import importlib.util
import re
import shutil
import zipfile

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


@pytest.mark.slow  # another process: its start costs seconds on busy cores
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_wheel_holds_the_shipped_weights_the_type_marker_and_the_command(tmp_path):
    """What a user installs from the wheel runs offline, is typed and says its license: the
    digits networks, ``py.typed`` (PEP 561, so that type checkers read the annotations), the
    ``bdia`` command, and the MIT license as an SPDX expression with its text (PEP 639). Built
    from a copy of the sources, so that no build folder lands in the repo."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "bdia", source / "bdia", ignore=shutil.ignore_patterns("__pycache__"))
    built = run_child(
        ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        timeout=300,
        cwd=source,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (source / "dist").glob("bdia-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
        metadata = archive.read(info.replace("entry_points.txt", "METADATA")).decode()
        license_text = archive.read(info.replace("entry_points.txt", "licenses/LICENSE"))
    assert "bdia/py.typed" in names
    assert {
        "bdia/models/weights/digits.safetensors",
        "bdia/models/weights/digits_classifier.safetensors",
    } <= names
    assert re.search(r"^bdia = bdia\.cli:main$", entry_points, re.MULTILINE)
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert re.search(r"^License-Expression: MIT$", metadata, re.MULTILINE)
    assert license_text == (REPO / "LICENSE").read_bytes()
