"""What the step loops share: ``bdia.sampling``'s drivers and ``bdia.adjoint``'s two passes.

Kept apart from both because ``bdia.sampling`` imports ``bdia.adjoint``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["FiniteCheck", "progress_bar"]


def _non_finite(k: int, t: float, t_next: float) -> FloatingPointError:
    return FloatingPointError(
        f"non-finite values at step {k} (t = {t:.6g} -> {t_next:.6g}): the model returned "
        "NaN or Inf, or the step size is too large for the problem"
    )


class FiniteCheck:
    """Raises ``FloatingPointError`` for a state with NaN or Inf in a loop of steps, each
    step's answer read once the next step has been launched.

    Reading whether a state is finite makes the host wait until the device has computed it.
    Read at once, that wait empties a GPU's queue every step, and the device idles while the
    host launches the next step's first kernels (the network's small embedding and
    preconditioner ones come first). On an H200, sampling runs that read it at once took 6
    to 28 ms longer than EDM's loop, which checks nothing (benchmarks/gpu_check.py, 18 steps
    a run). Here each step's flag is computed on the device and, on CUDA, copied to pinned
    host memory without blocking; it is read after the next step is launched, so that the
    device always has work queued. A non-finite state therefore stops the loop one step
    after the step that made it, with that step's index and times in the error, as before.

    The loop calls ``finish`` before handing out its result, and runs each step inside
    ``guard``, so that the unread flag's error comes before any other error the step raises
    (a step on a NaN state may fail in its own way). ``now=True`` reads the flag at once:
    a callback is about to see the state, and never sees a non-finite one.
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, torch.cuda.Event | None, int, float, float] | None = None

    def __call__(self, x: Tensor, k: int, t: float, t_next: float, *, now: bool = False) -> None:
        flag = torch.isfinite(x).all()
        done = None
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flag.device))
            flag = host
        earlier, self._pending = self._pending, (flag, done, k, t, t_next)
        if earlier is not None:
            self._read(earlier)
        if now:
            self.finish()

    def finish(self) -> None:
        """Read the flag still unread, if any: raise if its state was not finite."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._read(pending)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a step: an error it raises while a flag is unread gives way to that flag's
        ``FloatingPointError`` (the step's error as its cause) if that state was not finite."""
        try:
            yield
        except Exception as error:
            try:
                self.finish()
            except FloatingPointError as non_finite:
                raise non_finite from error
            raise

    @staticmethod
    def _read(pending: tuple[Tensor, torch.cuda.Event | None, int, float, float]) -> None:
        flag, done, k, t, t_next = pending
        if done is not None:
            done.synchronize()
        if not bool(flag):
            raise _non_finite(k, t, t_next)


def progress_bar(steps: range, progress: bool | None, desc: str) -> Iterable[int]:
    """``steps`` under a tqdm bar: shown if ``progress``, hidden if False, and with None
    shown only on a terminal. The bar goes when the loop ends."""
    return tqdm(steps, desc=desc, disable=None if progress is None else not progress, leave=False)
