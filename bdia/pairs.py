"""The reversible state a sampler hands back: ``StatePair``, and the check of its origin."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .ode import ODE

__all__ = ["StatePair", "PairMismatchWarning", "check_fingerprint"]


@dataclass(frozen=True)
class StatePair:
    """Two consecutive states on a grid, in grid order: the reversible state of BDIA.

    ``invert`` returns ``StatePair(x at ts[0], x at ts[1])``; ``sample(..., return_pair=True)``
    returns ``StatePair(x at ts[-2], x at ts[-1])``. Both tensors have shape ``(batch, ...)``.

    Attributes:
        earlier: the state at the earlier grid point.
        later: the state at the next grid point (same shape, dtype and device).
        earlier_low, later_low: the parts of the states below their dtype's precision that
            BDIA carries (same shape and dtype), or None for zero: the state is the
            unevaluated sum ``earlier + earlier_low``. Keep them with the pair; a pair
            stripped of them still inverts, but only to the state dtype's rounding magnified
            by the scheme's parasitic mode.
        fingerprint: ``ode.fingerprint()`` of the ODE that made the pair, or None. BDIA
            continued from the pair under another ODE (another label or prompt) warns with
            ``PairMismatchWarning``.

    A pair is not a sequence: use the field names (``pair.earlier``), not unpacking.
    """

    earlier: Tensor
    later: Tensor
    earlier_low: Tensor | None = None
    later_low: Tensor | None = None
    fingerprint: str | None = None

    def __iter__(self) -> Any:
        raise TypeError(
            "a StatePair is not a sequence; use its fields: pair.earlier, pair.later "
            "(and pair.earlier_low, pair.later_low)"
        )


class PairMismatchWarning(UserWarning):
    """A BDIA pair is continued under a different ODE than the one that made it."""


def check_fingerprint(pair: StatePair, ode: ODE, what: str) -> None:
    """Warn when ``pair`` was made by another ODE than ``ode`` (BDIA continues its history)."""
    now = None if pair.fingerprint is None else ode.fingerprint()
    if now == pair.fingerprint:
        return
    warnings.warn(
        f"the {what} pair was made under a different ODE (another model, schedule or "
        f"conditioning: fingerprint {pair.fingerprint}, now {now}). BDIA carries "
        "the pair's parasitic mode, which only the ODE that made it cancels, so the result "
        "will be noise rather than an edit. To regenerate under new conditioning use "
        "bdia.edit or Inversion.regenerate (the base solver from the inverted noise); to "
        "reproduce the original, use the ODE that made the pair",
        PairMismatchWarning,
        stacklevel=4,
    )
