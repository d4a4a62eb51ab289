"""Suite-wide settings.

The default run leaves out tests marked ``slow`` (see ``pyproject.toml``); ``.ci/run`` runs
them in a second pass with ``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Run the suite's small tensors on one intra-op thread, then restore the setting.

    With states of a few hundred numbers every op is dominated by thread start-up and
    hand-off: on a loaded 2-core machine two threads made such runs about ten times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def benchmark_module(name: str) -> Any:
    """``benchmarks/NAME.py`` imported as a module (benchmarks/ is not a package), once."""
    # Run as `python benchmarks/NAME.py`, a script finds its neighbours on sys.path
    # (gradients imports overhead); imported here it must too, whichever test runs first.
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def child_env() -> dict[str, str]:
    """The environment of a process a test starts: one thread for torch, OpenMP and BLAS.

    torch takes its intra-op thread count from OMP_NUM_THREADS when it starts, so a child
    started with this environment runs as the suite does (``torch.get_num_threads() == 1``).
    No GPU is visible to it either: the suite's results must not depend on one.
    """
    one = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {**os.environ, **one, "CUDA_VISIBLE_DEVICES": ""}


def run_child(
    args: Sequence[str], timeout: float, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` with ``child_env()``, capturing its output as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def run_torchrun(
    args: Sequence[str], timeout: float, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun ARGS`` with ``child_env()``, capturing its output as text.

    The launcher is this interpreter's ``torch.distributed.run``: a ``torchrun`` found on PATH
    may belong to another environment (one not activated, say). It runs in a session of its
    own, killed whole on timeout: killing the launcher alone would leave its workers running.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"torchrun ran past {timeout} s; killed\n{out}{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextmanager
def untouched(*tensors: torch.Tensor | None) -> Iterator[None]:
    """Assert that the tensors hold exactly the same values (and dtype) after the block.

    Exact (rtol = atol = 0), dtype and device included; NaN equals NaN so that a tensor
    holding NaN can be checked too. None (a pair's missing low word) is skipped.
    """
    kept = tuple(t for t in tensors if t is not None)
    clones = [t.clone() for t in kept]
    yield
    for t, c in zip(kept, clones, strict=True):
        torch.testing.assert_close(t, c, rtol=0.0, atol=0.0, equal_nan=True)
