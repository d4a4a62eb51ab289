"""The reversible states a sampler hands back, and the check of their origin.

``StatePair`` is BDIA's (two consecutive grid states); ``CoupledPair`` is that of the
coupled-chain solvers ``edict`` and ``reversible`` (two chains at one grid point).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .ode import ODE

__all__ = ["StatePair", "CoupledPair", "PairMismatchWarning", "check_fingerprint"]


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


@dataclass(frozen=True)
class CoupledPair:
    """Two coupled chains at one grid point: the reversible state of ``edict`` and
    ``reversible`` (McCallum-Foster).

    ``sample(..., return_pair=True)`` returns the chains at ``ts[-1]``; ``invert`` returns them
    at ``ts[0]``, and each takes the other's result back as its start. Both tensors have shape
    ``(batch, ...)``.

    Attributes:
        x: the chain the solver returns as its result: EDICT's ``x``, McCallum-Foster's ``y``.
        y: the companion chain: EDICT's ``y``, McCallum-Foster's ``z`` (same shape, dtype and
            device as ``x``).
        x_low, y_low: the chains' low words (the state is the unevaluated sum ``x + x_low``),
            or None for zero. Keep them with the pair; without them the inversion is exact only
            to the state dtype's rounding, magnified along the run.
        fingerprint: ``ode.fingerprint()`` of the ODE that made the pair, or None; a pair
            continued under another ODE warns with ``PairMismatchWarning``.

    A pair is not a sequence: use the field names (``pair.x``), not unpacking.
    """

    x: Tensor
    y: Tensor
    x_low: Tensor | None = None
    y_low: Tensor | None = None
    fingerprint: str | None = None

    def __iter__(self) -> Any:
        raise TypeError(
            "a CoupledPair is not a sequence; use its fields: pair.x, pair.y "
            "(and pair.x_low, pair.y_low)"
        )


class PairMismatchWarning(UserWarning):
    """A reversible solver's pair is continued under a different ODE than the one that made it."""


def check_fingerprint(pair: StatePair | CoupledPair, ode: ODE, what: str) -> None:
    """Warn when ``pair`` (a ``StatePair`` or a ``CoupledPair``) was made by another ODE than
    ``ode`` (a reversible solver continues its history)."""
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
