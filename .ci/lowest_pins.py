"""Print pyproject.toml's lower bounds as pins, for .ci/lowest: each ``NAME>=VERSION`` of the
dependencies and of the test and plot extras becomes ``NAME==VERSION``, one per line.

A requirement without a plain lower bound is an error: a bound the suite has not passed at
is not one (docs/decisions.md, "Supported versions").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

EXTRAS = ("test", "plot")  # what the suite imports; docs and dev are not under test
REQUIREMENT = re.compile(
    r"(?P<name>[A-Za-z0-9_.-]+)(?P<extras>\[[A-Za-z0-9_,-]+\])?>=(?P<low>[0-9.]+)"
)


def lowest_pins(pyproject: Path) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        match = REQUIREMENT.fullmatch(requirement)
        if match is None:
            raise ValueError(
                f"{requirement!r} in {pyproject} is not NAME>=VERSION: give it the lowest "
                "version the suite passes at (bash .ci/lowest checks it)"
            )
        pins.append(f"{match['name']}{match['extras'] or ''}=={match['low']}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "pyproject.toml"
    try:
        print("\n".join(lowest_pins(path)))
    except ValueError as exc:
        sys.exit(f".ci/lowest_pins.py: {exc}")
