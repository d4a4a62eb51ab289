"""Argument types and checks shared by the benchmark scripts (each imports this file as its
neighbour: ``python benchmarks/NAME.py`` puts benchmarks/ first on sys.path)."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1. A count of 0 would run a study for minutes
    and fail at its end, or write a table of NaN."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def out_or_default(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    default: Path,
    name: str | None = None,
) -> Path:
    """``args.out``, or ``default`` where it was not given. A ``--smoke`` run (``args.smoke``)
    must be given its own ``--out``: its seconds-long numbers would otherwise replace what the
    default holds, a published page or the networks the package ships. The refusal (exit 2,
    through ``parser.error``) names the default: ``name``, or its path from the repository
    root."""
    if args.out is not None:
        return args.out
    if args.smoke:
        if name is None:
            root = Path(__file__).resolve().parent.parent
            name = (
                default.relative_to(root).as_posix()
                if default.is_relative_to(root)
                else str(default)
            )
        parser.error(f"--smoke needs --out: the default is {name}")
    return default
