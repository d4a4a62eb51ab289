"""What the step loops share: ``bdia.sampling``'s drivers and ``bdia.adjoint``'s two passes.

Kept apart from both because ``bdia.sampling`` imports ``bdia.adjoint``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["check_finite", "progress_bar"]


def check_finite(x: Tensor, k: int, t: float, t_next: float) -> None:
    """Raise ``FloatingPointError`` if the state ``x`` after step ``k`` (``t -> t_next``)
    holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"non-finite values at step {k} (t = {t:.6g} -> {t_next:.6g}): the model returned "
            "NaN or Inf, or the step size is too large for the problem"
        )


def progress_bar(steps: range, progress: bool | None, desc: str) -> Iterable[int]:
    """``steps`` under a tqdm bar: shown if ``progress``, hidden if False, and with None
    shown only on a terminal. The bar goes when the loop ends."""
    return tqdm(steps, desc=desc, disable=None if progress is None else not progress, leave=False)
