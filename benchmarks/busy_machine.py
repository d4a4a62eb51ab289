"""Wall time of `bdia compare` and of the test suite on a machine whose cores are kept busy.

Targets (docs/benchmarks/busy_machine.md): the default `bdia compare` in under 30 s and
`python -m pytest -q` in under 5 minutes on 2 cores with other processes keeping both busy.
The busy processes are plain Python loops, one per core by default, started before the
timed commands and stopped after them.

    python benchmarks/busy_machine.py                 # both, writes the markdown page
    python benchmarks/busy_machine.py --skip-tests    # only `bdia compare`
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bdia._files import write_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "busy_machine.md"


def timed(command: list[str], cwd: Path) -> float:
    """Seconds of wall time of ``command``.

    Raises:
        SystemExit: the command failed; the message ends with the last lines it printed, so
            that the reason shows (no page is written then).
    """
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise SystemExit(f"`{' '.join(command)}` failed (exit {proc.returncode}):\n{tail}")
    return seconds


def count(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for a non-number
    return parse


def _without_out(args: list[str]) -> list[str]:
    """The arguments but ``--out PATH``: the page names what was measured, not where it went."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=count(0), default=os.cpu_count() or 2, help="busy-loop processes")
    p.add_argument("--repeats", type=count(1), default=3, help="runs of `bdia compare`")
    p.add_argument("--skip-tests", action="store_true", help="do not time the test suite")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown page to write")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/busy_machine.py", *_without_out(given)])

    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)  # let the loops take the cores before the first measurement
        compare = [
            timed([sys.executable, "-m", "bdia.cli", "compare", "--no-progress"], REPO)
            for _ in range(args.repeats)
        ]
        suite = None if args.skip_tests else timed([sys.executable, "-m", "pytest", "-q"], REPO)
        load = os.getloadavg()[0]
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()

    rows = [
        "| command | runs (s) | median (s) | target (s) |",
        "|---|---|---:|---:|",
        f"| `bdia compare` | {', '.join(f'{t:.1f}' for t in compare)} | "
        f"{statistics.median(compare):.1f} | 30 |",
    ]
    if suite is not None:
        rows.append(f"| `python -m pytest -q` | {suite:.1f} | {suite:.1f} | 300 |")
    text = "\n".join(
        [
            "# On a busy machine",
            "",
            f"Wall time with {args.busy} busy-loop processes beside the command on "
            f"{os.cpu_count()} cores (1-minute load average at the end: {load:.2f}). "
            "`bdia compare` runs its small tensors on one torch thread by default"
            + (
                "."
                if suite is None
                else "; the test suite runs in a worker process per core (pytest-xdist's "
                "`-n auto`, at most 4), each on one torch thread, and starts its child "
                "processes with one."
            ),
            "",
            *rows,
            "",
            f"Written by `{command}`.",
            "",
        ]
    )
    print(text, end="")
    write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
