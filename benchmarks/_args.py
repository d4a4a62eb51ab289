"""Argument types shared by the benchmark scripts (each imports this file as its neighbour:
``python benchmarks/NAME.py`` puts benchmarks/ first on sys.path)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1. A count of 0 would run a study for minutes
    and fail at its end, or write a table of NaN."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
