"""The reversible states a sampler hands back, and the check of their origin.

``StatePair`` is BDIA's (two consecutive grid states); ``CoupledPair`` is that of the
coupled-chain solvers ``edict`` and ``reversible`` (two chains at one grid point).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._warnings import warn_at_caller
from .ode import ODE

__all__ = [
    "StatePair",
    "CoupledPair",
    "PairMismatchWarning",
    "check_fingerprint",
    "check_solver",
    "check_times",
    "stamped",
]


def _same(a: Any, b: Any) -> bool:
    """Field equality for the pairs: tensors by dtype, shape, device and every value (a
    tensor's ``==`` is elementwise, and the tuple a dataclass compares would raise on it)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and torch.equal(a, b)
        )
    return bool(a == b)


def _time(value: Any, what: str, fix: str) -> float:
    """``value`` (a real number, a 0-dim tensor or an array's scalar) as a Python float."""
    if not isinstance(value, (bool, str, bytes)) and getattr(value, "dtype", None) != torch.bool:
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{what} = {value!r:.60} is not a real number; {fix}")


def _times(value: Any) -> tuple[float, float] | None:
    """A ``StatePair``'s times as the tuple of two Python floats that ``check_times``
    compares with the grid's (a list read back from JSON, a tensor or an array would never
    equal it, or compare elementwise)."""
    if value is None:
        return None
    fix = "give the two grid times (earlier, later) as numbers, or None"
    if isinstance(value, (Tensor, np.ndarray)):
        items = value.tolist() if value.ndim == 1 else None
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        items = None
    if items is None or len(items) != 2:
        raise TypeError(
            f"times must be None or the two grid times (earlier, later), got {value!r:.80}"
        )
    return _time(items[0], "times[0]", fix), _time(items[1], "times[1]", fix)


def _solver(value: Any) -> str | None:
    """A pair's ``solver``: None or a string (``Solver.identity``), which ``check_solver``
    compares exactly."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(
        f"solver must be None or the identity of the solver that made the pair (a string "
        f"such as 'bdia(heun, gamma=0.96)': solver.identity), got {type(value).__name__} "
        f"{value!r:.60}"
    )


def _equal(a: Any, b: Any) -> Any:
    if type(a) is not type(b):
        return NotImplemented
    return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))


@dataclass(frozen=True, eq=False)
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
        times: the grid times of ``earlier`` and ``later`` as Python floats (``(ts[0],
            ts[1])`` from ``invert``, ``(ts[-2], ts[-1])`` from ``sample``), or None (a pair
            built by hand or loaded from a latents file). Two numbers given another way (a
            list, a tensor, an array) are stored as that tuple. ``sample`` and ``invert``
            refuse a pair whose times are not those of the grid end it is used at.
        solver: ``solver.identity`` of the reversible solver that made the pair (``"bdia(heun,
            gamma=0.96)"``), or None: a pair made by a single-step solver (two states of its
            trajectory, which any solver may take up), built by hand, or saved before pairs
            recorded it. A latents file records it as its solver and gamma. A reversible
            solver other than this one is refused by ``sample`` and ``invert`` (a
            ``ValueError``): the pair is the state of that solver's recursion, and any other
            continues or undoes it to the wrong states without a sign.

    A pair is not a sequence: use the field names (``pair.earlier``), not unpacking. Two
    pairs are equal when every field is: the tensors in dtype, shape, device and every value
    (a low word of None is not a zero tensor), the fingerprint, the times and the solver. A
    pair holds tensors, so it is not hashable.
    """

    earlier: Tensor
    later: Tensor
    earlier_low: Tensor | None = None
    later_low: Tensor | None = None
    fingerprint: str | None = None
    times: tuple[float, float] | None = None
    solver: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "times", _times(self.times))
        object.__setattr__(self, "solver", _solver(self.solver))

    def __iter__(self) -> Any:
        raise TypeError(
            "a StatePair is not a sequence; use its fields: pair.earlier, pair.later "
            "(and pair.earlier_low, pair.later_low)"
        )

    __eq__ = _equal
    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
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
        time: the grid time of the chains as a Python float (``ts[0]`` from ``invert``,
            ``ts[-1]`` from ``sample``), or None (a pair built by hand; a number given as a
            0-dim tensor or an array's scalar is stored as a float). ``sample`` and
            ``invert`` refuse a pair whose time is not that of the grid end it is used at.
        solver: ``solver.identity`` of the solver that made the pair (``"edict(ddim,
            p=0.93)"``, ``"reversible(heun, coupling=0.999)"``), or None (a pair built by
            hand, or saved before pairs recorded it). ``sample`` and ``invert`` refuse it to
            another reversible solver (another ``p`` or ``coupling``, another base, the
            other scheme), as for ``StatePair``.

    A pair is not a sequence: use the field names (``pair.x``), not unpacking. Equality is
    by value, as for ``StatePair``; a pair is not hashable.
    """

    x: Tensor
    y: Tensor
    x_low: Tensor | None = None
    y_low: Tensor | None = None
    fingerprint: str | None = None
    time: float | None = None
    solver: str | None = None

    def __post_init__(self) -> None:
        if self.time is not None:
            fix = "give the grid time of the chains as a number, or None"
            object.__setattr__(self, "time", _time(self.time, "time", fix))
        object.__setattr__(self, "solver", _solver(self.solver))

    def __iter__(self) -> Any:
        raise TypeError(
            "a CoupledPair is not a sequence; use its fields: pair.x, pair.y "
            "(and pair.x_low, pair.y_low)"
        )

    __eq__ = _equal
    __hash__ = None  # type: ignore[assignment]


# torch.load reads only allowlisted classes by default (weights_only=True), so a pair saved
# with torch.save would not load back. Both classes hold tensors, floats and strings and run
# no code when rebuilt, which is what the allowlist is for. A pair saved before a field was
# added loads with that field's default (the class attribute): None.
torch.serialization.add_safe_globals([StatePair, CoupledPair])


def _grid_times(pair: StatePair | CoupledPair, ts: Sequence[float], at: int) -> Any:
    """The times ``pair`` sits at on grid ``ts`` used from index ``at`` (0 or ``len(ts) - 1``),
    and how to name them."""
    if isinstance(pair, CoupledPair):
        return ts[at], "ts[0]" if at == 0 else "ts[-1]"
    k = 0 if at == 0 else at - 1
    return (ts[k], ts[k + 1]), "ts[:2]" if at == 0 else "ts[-2:]"


def stamped(pair: StatePair | CoupledPair, ts: Sequence[float], at: int, solver: Any) -> Any:
    """``pair`` with the grid times it sits at and the solver that made it recorded: ``at``
    is 0 for the pair at the start of grid ``ts`` (Python floats), ``len(ts) - 1`` for the
    one at its end; ``solver`` (a ``Solver``: the solvers import this module) is recorded by
    its identity if it is reversible."""
    times, _ = _grid_times(pair, ts, at)
    made_by = solver.identity if solver.reversible else None
    if isinstance(pair, CoupledPair):
        return dataclasses.replace(pair, time=times, solver=made_by)
    return dataclasses.replace(pair, times=times, solver=made_by)


def check_times(pair: StatePair | CoupledPair, ts: Sequence[float], at: int, what: str) -> None:
    """Raise ValueError unless the times ``pair`` recorded (if any) are those of grid ``ts``
    at index ``at``, exactly: the states of a pair are states at those times, and on any
    other grid every step from them is wrong without a sign."""
    recorded = pair.time if isinstance(pair, CoupledPair) else pair.times
    if recorded is None:
        return
    expected, where = _grid_times(pair, ts, at)
    if recorded != expected:
        raise ValueError(
            f"the {what} pair was made at t = {recorded}, but this grid has {where} = "
            f"{expected}; a pair holds the states at the times of the grid that made it, so "
            "pass that grid (the same values, in float64)"
        )


def check_solver(
    pair: StatePair | CoupledPair, solver: Any, what: str, fix: str | None = None
) -> None:
    """Raise ValueError if ``pair`` was made by another reversible solver than ``solver``
    (a ``Solver``, reversible itself): the pair is the state of the recursion of the solver that
    made it, and another gamma, ``p``, coupling or base continues or undoes it to the wrong
    states without a sign. ``fix`` replaces the advice at the end of the message.

    A pair that records no solver (made by a single-step solver, by hand, or before pairs
    recorded it) is taken as it is, and so is any pair given to a single-step solver, which
    takes up one of its states."""
    if pair.solver is None or not solver.reversible or pair.solver == solver.identity:
        return
    if fix is None:
        if isinstance(pair, CoupledPair):
            state = "pair.x"
        else:
            state = "pair.earlier" if what == "start" else "pair.later"
        fix = (
            f"pass {pair.solver}, or, to run {solver.identity} afresh from the pair's state "
            f"at this end of the grid, pass {state} (a tensor) instead of the pair"
        )
    raise ValueError(
        f"the {what} pair was made by {pair.solver}, not by {solver.identity}: a reversible "
        "solver's pair is the state of its own recursion, which another solver (another "
        f"gamma, p or coupling, or another base) takes to the wrong states; {fix}"
    )


class PairMismatchWarning(UserWarning):
    """A reversible solver's pair is continued under a different ODE than the one that made it."""


def check_fingerprint(pair: StatePair | CoupledPair, ode: ODE, what: str) -> None:
    """Warn when ``pair`` (a ``StatePair`` or a ``CoupledPair``) was made by another ODE than
    ``ode`` (a reversible solver continues its history)."""
    now = None if pair.fingerprint is None else ode.fingerprint()
    if now == pair.fingerprint:
        return
    if isinstance(pair, CoupledPair):
        # The companion chain holds the run's history under the ODE that made it; a new ODE
        # steps it as if that history were its own, which is neither run.
        why = (
            "A coupled scheme's two chains carry the history of the run that made them, so "
            "continuing them under another ODE is neither that run nor a fresh one"
        )
    else:
        why = (
            "BDIA carries the pair's parasitic mode, which only the ODE that made it cancels, "
            "so the result will be noise rather than an edit"
        )
    warn_at_caller(
        f"the {what} pair was made under a different ODE (another model, schedule or "
        f"conditioning: fingerprint {pair.fingerprint}, now {now}). {why}. To regenerate "
        "under new conditioning use bdia.edit or Inversion.regenerate (the base solver from "
        "the inverted noise); to reproduce the original, use the ODE that made the pair",
        PairMismatchWarning,
    )
