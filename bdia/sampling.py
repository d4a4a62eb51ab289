"""Drivers: ``sample``, ``invert`` and the torchdiffeq-shaped ``odeint``.

One loop per driver, the same keyword arguments everywhere: ``progress`` (a tqdm bar; None
shows it only on a terminal), ``callback`` (called after every step with a small dict) and
``state_dtype`` (the precision policy: the state may be float64 while the network runs in the
ODE's ``model_dtype``).

The reversible state of a BDIA sampler is the pair of consecutive grid states; ``StatePair``
holds it in grid order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from ._steps import FiniteCheck, progress_bar
from ._warnings import warn_at_caller
from .ode import DTYPE_NAMES, ODE
from .pairs import (
    CoupledPair,
    PairMismatchWarning,
    StatePair,
    check_fingerprint,
    check_solver,
    check_times,
    stamped,
)
from .solvers.base import Solver, SolverState, move_report
from .solvers.registry import get_solver
from .twoword import TwoWord

if TYPE_CHECKING:
    from .solvers.coupled import EDICTWrapper, ReversibleWrapper

    CoupledSolver = EDICTWrapper | ReversibleWrapper

__all__ = [
    "StatePair",
    "PairMismatchWarning",
    "ParasiticWarning",
    "sample",
    "invert",
    "odeint",
    "Callback",
]

Callback = Callable[[dict[str, Any]], None]

#: ``SolverState.parasitic`` at or above this (the non-physical part of a reversible solver's
#: state as large as the state itself) makes ``sample`` and ``invert`` warn. Measured on the
#: digits model with bdia(euler, 0.96): at most 0.0055 (35 steps) and 0.073 (10 steps) when
#: inverting the held-out digits or reconstructing them, 0.1 when sampling 35 steps from
#: noise; about 1.3 when sampling 10 steps from noise (whose results overshoot [-1, 1] to
#: about 4), 2.0 to 2.6 for a pair continued under another label, 5.0 for bdia-heun (gamma 1)
#: on y' = -5 y over 201 points on [0, 10].
PARASITIC_LIMIT = 1.0

#: The values of ``sample``'s ``adjoint``.
ADJOINTS = (None, "autograd", "reversible")


class ParasiticWarning(RuntimeWarning):
    """A reversible solver's parasitic component grew as large as the state."""


class _ParasiticWatch:
    """The largest ``parasitic`` of a run, kept on the device until the end (one sync)."""

    def __init__(self) -> None:
        self.worst: Tensor | None = None

    def update(self, state: SolverState) -> None:
        if state.parasitic is not None:
            p = state.parasitic.detach()
            self.worst = p if self.worst is None else torch.maximum(self.worst, p)

    def warn(self, solver: Solver, what: str, *, editing: bool) -> None:
        """Warn if the worst ``parasitic`` reached the limit; ``editing``: the run inverted,
        or continued a pair, so that how to edit is worth saying."""
        if self.worst is None:
            return
        worst = float(self.worst)
        if worst >= PARASITIC_LIMIT or math.isnan(worst):
            edit = (
                ", and regenerate under new conditioning from the inverted noise "
                "(bdia.Inversion.regenerate) rather than from a pair"
                if editing
                else ""
            )
            warn_at_caller(
                f"{what} with {solver.name}: the parasitic component of the reversible state "
                f"reached {worst:.3g} times the state's size (rms), so the result is "
                "dominated by it, not by the ODE's solution. The scheme is unstable here: use "
                f"more steps or another {solver.mixing_parameter or 'solver'}{edit}",
                ParasiticWarning,
            )


# ------------------------------------------------------------------ validation


def _grid(ts: Tensor | Sequence[float], ode: ODE) -> list[float]:
    """The grid as Python floats, checked to be finite, strictly monotone and in the domain
    of ``ode`` (which is checked to be an ODE: the drivers' first check)."""
    if not isinstance(ode, ODE):
        fix = (
            "wrap f(t, x) as bdia.ODE(f), or call bdia.odeint(f, y0, t)"
            if callable(ode)
            else "build one with bdia.ODE(f) or bdia.DiffusionODE(denoiser, schedule)"
        )
        raise TypeError(f"ode must be an ODE or DiffusionODE, got {type(ode).__name__}; {fix}")
    kind = "the time grid ts must be a 1-D tensor, array or sequence of numbers"
    if isinstance(ts, (Tensor, np.ndarray)):
        if ts.ndim != 1:
            raise ValueError(f"the time grid must be 1-D, got shape {tuple(ts.shape)}")
        items = ts.detach().cpu().tolist() if isinstance(ts, Tensor) else ts.tolist()
    elif isinstance(ts, (str, bytes)) or not isinstance(ts, Iterable):
        raise TypeError(f"{kind}, got {type(ts).__name__} {ts!r:.60}")
    elif isinstance(ts, (Set, Mapping)):
        # A set iterates in hash order: {1.0, 0.5} would run from 0.5 to 1.0.
        raise TypeError(
            f"{kind}, got a {type(ts).__name__}, which has no order; give the times in the "
            "order to step through them, as a list or a tensor"
        )
    else:
        items = list(ts)
    values = []
    for i, v in enumerate(items):
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            values.append(float(v))
        except (TypeError, ValueError):
            raise TypeError(f"{kind}; ts[{i}] = {v!r:.60} is not a real number") from None
    if len(values) < 2:
        raise ValueError(f"the time grid needs at least 2 points (one step), got {len(values)}")
    if any(math.isnan(v) for v in values):
        raise ValueError("the time grid contains NaN")
    diffs = [b - a for a, b in zip(values, values[1:])]
    if not (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)):
        i = next(i for i, d in enumerate(diffs) if d == 0 or (d > 0) != (diffs[0] > 0))
        raise ValueError(
            f"the time grid must be strictly monotonic; it turns or repeats at ts[{i}] = "
            f"{values[i]}, ts[{i + 1}] = {values[i + 1]}"
        )
    ode.check_times(values)
    return values


def _state_dtype(value: Any) -> torch.dtype | None:
    """``state_dtype`` as a torch dtype: None, a torch dtype, or a name such as ``"float64"``."""
    if value is None:
        return None
    if isinstance(value, str):
        # Half-precision names resolve too, so that they meet the refusal in _state.
        dtype = DTYPE_NAMES.get(value.removeprefix("torch."))
        if dtype is None:
            raise ValueError(
                f"state_dtype {value!r} is not a state dtype; use torch.float32 or "
                "torch.float64, or the names 'float32' or 'float64'"
            )
        return dtype
    if not isinstance(value, torch.dtype):
        raise TypeError(
            f"state_dtype must be torch.float32 or torch.float64 (or the name 'float32' or "
            f"'float64'), got {type(value).__name__} {value!r}"
        )
    if not value.is_floating_point or value.is_complex:
        raise TypeError(
            f"state_dtype must be a real floating dtype (torch.float32 or torch.float64), "
            f"got {value}"
        )
    return value


def _count_non_finite(x: Tensor) -> int:
    return int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0


def _check_input_finite(x: Tensor, cast: Tensor, what: str) -> None:
    """Refuse NaN/Inf in a state the caller gave (before any model call), or made by the cast."""
    role = what.split("[")[0].split(".")[0]
    label = f"the {role} state" + ("" if what == role else f" ({what})")
    bad = _count_non_finite(x)
    if bad:
        raise ValueError(
            f"{label} contains {bad} NaN/Inf values (of {x.numel()} entries): bad input, not a "
            "model failure, and no model call was made; give a finite state"
        )
    bad = 0 if cast is x else _count_non_finite(cast)
    if bad:
        raise ValueError(
            f"{label} has {bad} values beyond the range of {cast.dtype}, which the cast to "
            "state_dtype turns into Inf; keep the state in a wider dtype"
        )


def _state(x: Any, state_dtype: torch.dtype | None, what: str) -> Tensor:
    """The state in the dtype the policy asks for (a new tensor when it casts; never in place)."""
    if not isinstance(x, Tensor):
        # A pair's fields are tensors; the start or end itself may also be a pair.
        kinds = (
            "a torch.Tensor or a StatePair (bdia, single-step solvers) or a CoupledPair "
            "(edict, reversible)"
            if what.isidentifier()
            else "a torch.Tensor"
        )
        raise TypeError(f"{what} must be {kinds}, got {type(x).__name__}")
    dtype = state_dtype or x.dtype
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{what} must be a real floating tensor, got {dtype}")
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"a {dtype} state is refused: half precision cannot carry an ODE trajectory "
            "(rounding of ~1e-3 per step, and BDIA's inversion would not be exact). Keep the "
            "state in float32 or float64 with state_dtype=..., and run the network in half "
            "precision through the ODE's model_dtype"
        )
    if x.ndim == 0:
        raise ValueError(f"{what} needs a batch dimension, got a 0-dim tensor")
    if x.is_meta:
        # The checks of finiteness and the steps read values, which a meta tensor lacks.
        raise ValueError(
            f"{what} is on the meta device, which holds no values (only shape and dtype); "
            "give a state on a device with data, such as 'cpu' or 'cuda'"
        )
    out = x.to(dtype)
    _check_input_finite(x, out, what)
    return out


def _low_word(high: Tensor, low: Any, original: Tensor, what: str) -> Tensor | None:
    """The low word of ``original + low`` once its high word has been cast to ``high``."""
    if low is None:
        return None
    if not isinstance(low, Tensor) or low.shape != original.shape:
        raise ValueError(f"{what} must be a tensor of the state's shape {tuple(original.shape)}")
    if low.dtype != original.dtype:
        raise ValueError(
            f"{what} is {low.dtype}, but its state is {original.dtype}; a low word holds the "
            "part of the state below its dtype's precision, so give it the state's dtype "
            "(the low words a driver returned, unchanged)"
        )
    if high.dtype == original.dtype:
        out = low.to(device=high.device)
    else:
        # Re-split the exact value into the new dtype's two words.
        wide = torch.float64
        out = ((original.to(wide) - high.to(wide)) + low.to(wide)).to(high.dtype)
    _check_input_finite(low, out, what)
    return out


def _words(high: Tensor, low: Any, original: Tensor, what: str) -> tuple[Tensor, Tensor | None]:
    """The two words of ``original + low`` in the dtype of ``high`` (``original`` cast).

    A cast re-splits the value, normalised: a float32 low word kept beside the float64 high
    word would leave the word the model sees off the value by up to half a float32 ulp, while
    every word a run makes is the value rounded, so a round trip would not be exact."""
    checked = _low_word(high, low, original, what)
    if checked is None or high.dtype == original.dtype:
        return high, checked
    words = TwoWord(original, low.to(original.device)).to(high.dtype)
    _check_input_finite(low, words.low_or_zero(), what)
    return words.high, words.low


def _check_alike(a: Tensor, b: Tensor, what: str) -> None:
    """Raise unless the two tensors of a pair share shape, dtype and device."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{what} must match in shape, dtype and device; got "
            f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}"
        )


def _pair(value: Any, state_dtype: torch.dtype | None, what: str) -> Any:
    """A start or end as the drivers take it: a tensor, a ``StatePair`` or a ``CoupledPair``,
    checked to be finite and cast to the state dtype (low words re-split on a cast)."""

    if isinstance(value, CoupledPair):
        x = _state(value.x, state_dtype, f"{what}.x")
        y = _state(value.y, state_dtype, f"{what}.y")
        _check_alike(x, y, f"the two chains of {what}")
        x, x_low = _words(x, value.x_low, value.x, f"{what}.x_low")
        y, y_low = _words(y, value.y_low, value.y, f"{what}.y_low")
        return CoupledPair(x, y, x_low, y_low, value.fingerprint, value.time, value.solver)
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"{what} as a tuple needs exactly 2 tensors (earlier, later), got {len(value)}; "
                "pass a StatePair to include low words"
            )
        value = StatePair(value[0], value[1])
    if isinstance(value, StatePair):
        a = _state(value.earlier, state_dtype, f"{what}[0]")
        b = _state(value.later, state_dtype, f"{what}[1]")
        _check_alike(a, b, f"the two states of {what}")
        a, a_low = _words(a, value.earlier_low, value.earlier, f"{what}.earlier_low")
        b, b_low = _words(b, value.later_low, value.later, f"{what}.later_low")
        return StatePair(a, b, a_low, b_low, value.fingerprint, value.times, value.solver)
    return _state(value, state_dtype, what)


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a state: itself, or a pair's tensor fields."""
    if isinstance(value, Tensor):
        return [value]
    return [v for f in dataclasses.fields(value) if isinstance(v := getattr(value, f.name), Tensor)]


def _unaliased(result: Any, given: Any) -> Any:
    """``result`` (a tensor or a pair) with a copy of each tensor that is one of ``given``'s.

    A run with no step to take, or one step from a single state, hands a start tensor back
    (a pair's neighbour, the pair's own state); a result must not change with the caller's
    data, nor the caller's data with the result. Call it in the run's grad mode: the copy is
    differentiable where the run is, and carries no graph under no_grad."""
    ids = {id(t) for t in _tensors(given)}
    if isinstance(result, Tensor):
        return result.clone() if id(result) in ids else result
    copies = {
        f.name: getattr(result, f.name).clone()
        for f in dataclasses.fields(result)
        if id(getattr(result, f.name)) in ids
    }
    return dataclasses.replace(result, **copies) if copies else result


def _check_solver(solver: Solver, ode: ODE, grid: list[float]) -> None:
    if not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be a Solver, got {type(solver).__name__}; build one with "
            "get_solver(name) or bdia(...)"
        )
    solver.check(ode, grid)


def _report(
    callback: Callback | None, state: SolverState, new: SolverState, grid: list[float]
) -> None:
    if callback is not None:
        callback(move_report(state, new, grid))


# --------------------------------------------------------------------- drivers


# The result's type follows ``return_pair`` and the solver, for type checkers (the package
# ships ``py.typed``): a plain call returns a tensor, a pair call the solver's kind of pair.
@overload
def sample(
    ode: ODE,
    solver: Solver,
    start: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    trajectory: bool = ...,
    return_pair: Literal[False] = ...,
    progress: bool | None = ...,
    callback: Callback | None = ...,
    state_dtype: torch.dtype | str | None = ...,
    adjoint: str | None = ...,
) -> Tensor: ...
@overload  # before the Solver one, which mypy would otherwise match first
def sample(  # type: ignore[overload-overlap]
    ode: ODE,
    solver: CoupledSolver,
    start: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    trajectory: Literal[False] = ...,
    return_pair: Literal[True],
    progress: bool | None = ...,
    callback: Callback | None = ...,
    state_dtype: torch.dtype | str | None = ...,
    adjoint: str | None = ...,
) -> CoupledPair: ...
@overload
def sample(
    ode: ODE,
    solver: Solver,
    start: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    trajectory: Literal[False] = ...,
    return_pair: Literal[True],
    progress: bool | None = ...,
    callback: Callback | None = ...,
    state_dtype: torch.dtype | str | None = ...,
    adjoint: str | None = ...,
) -> StatePair: ...
@overload
def sample(
    ode: ODE,
    solver: Solver,
    start: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    trajectory: bool = ...,
    return_pair: bool = ...,
    progress: bool | None = ...,
    callback: Callback | None = ...,
    state_dtype: torch.dtype | str | None = ...,
    adjoint: str | None = ...,
) -> Tensor | StatePair | CoupledPair: ...


def sample(
    ode: ODE,
    solver: Solver,
    start: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    trajectory: bool = False,
    return_pair: bool = False,
    progress: bool | None = None,
    callback: Callback | None = None,
    state_dtype: torch.dtype | str | None = None,
    adjoint: str | None = None,
) -> Tensor | StatePair | CoupledPair:
    """Integrate from ``ts[0]`` to ``ts[-1]``.

    Args:
        ode: the problem (``ODE`` or ``DiffusionODE``).
        solver: a registered solver, or a reversible one (``bdia(...)``, ``edict(...)``,
            ``reversible(...)``).
        start: x at ``ts[0]`` of shape ``(batch, ...)``, or the pair ``invert`` returns: a
            ``StatePair`` (x at ``ts[0]``, x at ``ts[1]``) for BDIA and single-step solvers, a
            ``CoupledPair`` (both chains at ``ts[0]``) for ``edict`` and ``reversible``. From a
            pair, a reversible solver reproduces the forward trajectory exactly; a single-step
            solver continues from the pair's later state.
        ts: strictly monotonic grid (1-D tensor or sequence), either direction.
        trajectory: return every state on the grid, shape ``(len(ts), batch, ...)``.
        return_pair: return the pair at the end of the grid, the exact input of ``invert``:
            ``StatePair(x at ts[-2], x at ts[-1])``, or for ``edict`` and ``reversible`` the
            ``CoupledPair`` of both chains at ``ts[-1]``.
        progress: tqdm bar; None shows it only on a terminal.
        callback: called after every step with ``{"i", "t", "t_next", "x", "x_next",
            "denoised", "parasitic"}`` (``denoised``: of the step's first model evaluation,
            at ``(t, x)`` except for ``edict`` and ``reversible``, which evaluate at their
            companion chain; ``parasitic``: a reversible solver's 0-dim tensor, None for a
            single-step solver and for BDIA's plain first step).
        state_dtype: dtype of the solver state: ``torch.float32`` or ``torch.float64``, or
            the name ``"float32"`` or ``"float64"``; defaults to ``start``'s.
        adjoint: how the result can be differentiated. None (the default): not at all; the
            loop runs under ``torch.no_grad()``, as k-diffusion's samplers do, and the result
            does not require grad even when ``start`` does.
            ``"autograd"``: autograd through the unrolled loop (memory grows with the number
            of steps; the reference). ``"reversible"``: with a reversible solver, exact
            gradients with respect to ``start``, the conditioning tensors and the network's
            parameters in memory independent of the number of steps: only the final state
            is kept, and the backward pass rebuilds each earlier state with the solver's
            exact inverse and recomputes that one step's graph. Both record in the caller's
            grad mode: under ``torch.no_grad()`` the result has no graph.

    Returns:
        x at ``ts[-1]`` in the state dtype (or the trajectory, or the final pair).

    Raises:
        ValueError: if ``start`` holds NaN or Inf (bad input; no model call is made), or is
            a pair made at other grid times or, for a reversible ``solver``, by another
            reversible solver (``StatePair.solver``; no model call either).
        FloatingPointError: if a step produces NaN or Inf (the message names the step).
    """
    if trajectory and return_pair:
        raise ValueError("choose trajectory=True or return_pair=True, not both")
    if adjoint not in ADJOINTS:
        raise ValueError(
            f"adjoint must be one of {', '.join(map(repr, ADJOINTS))}, got {adjoint!r}"
        )
    state_dtype = _state_dtype(state_dtype)
    grid = _grid(ts, ode)
    _check_solver(solver, ode, grid)
    start = _pair(start, state_dtype, "start")
    from_pair = isinstance(start, (StatePair, CoupledPair))
    if isinstance(start, (StatePair, CoupledPair)):
        check_times(start, grid, 0, "start")
        check_solver(start, solver, "start")
        if solver.reversible:
            check_fingerprint(start, ode, "start")
    if adjoint == "reversible":
        if not solver.reversible:
            raise ValueError(
                "adjoint='reversible' needs a reversible solver (bdia(...), edict(...) or "
                f"reversible(...)), got {solver.name!r}; use adjoint='autograd' to "
                "differentiate through its loop"
            )
        if trajectory:
            raise ValueError("adjoint='reversible' keeps only the final state: no trajectory")
        # The backward pass undoes every step; refuse now what it could not, not after the
        # whole forward pass.
        solver.check_invertible(ode, grid, _tensors(start)[0].dtype)
        from .adjoint import reversible_sample

        watch = _ParasiticWatch()
        out = reversible_sample(
            ode,
            solver,
            start,
            grid,
            return_pair=return_pair,
            progress=progress,
            callback=callback,
            on_state=watch.update,
        )
        watch.warn(solver, "sampling", editing=from_pair)
        if return_pair:
            out = stamped(out, grid, len(grid) - 1, solver)
        return _unaliased(out, start)

    watch = _ParasiticWatch()
    # "autograd" keeps the caller's grad mode: under torch.no_grad() it records nothing, as
    # "reversible" (a torch.autograd.Function) and every torch operation do.
    with contextlib.nullcontext() if adjoint == "autograd" else torch.no_grad():
        state = solver.init(ode, grid, start, at=0)
        states = [start.earlier, start.later] if isinstance(start, StatePair) else [state.x]
        finite = FiniteCheck()
        for _ in progress_bar(range(state.k, len(grid) - 1), progress, f"sampling {solver.name}"):
            with finite.guard():
                new = solver.step(ode, grid, state)
            finite(new.x, state.k, grid[state.k], grid[new.k], now=callback is not None)
            _report(callback, state, new, grid)
            watch.update(new)
            state = new
            if trajectory:
                states.append(state.x)
        finite.finish()
        # Made inside the loop's grad mode: under no_grad the start, which may require grad,
        # would otherwise give the result a graph that reaches nothing but the start.
        if trajectory:
            out = torch.stack(states)
        elif return_pair:
            out = stamped(solver.pair(state, ode.fingerprint()), grid, len(grid) - 1, solver)
        else:
            out = state.x
        out = _unaliased(out, start)
    watch.warn(solver, "sampling", editing=from_pair)
    return out


@overload  # before the Solver one, which mypy would otherwise match first
def invert(  # type: ignore[overload-overlap]
    ode: ODE,
    solver: CoupledSolver,
    end: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    progress: bool | None = ...,
    callback: Callback | None = ...,
    state_dtype: torch.dtype | str | None = ...,
) -> CoupledPair: ...
@overload
def invert(
    ode: ODE,
    solver: Solver,
    end: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    progress: bool | None = ...,
    callback: Callback | None = ...,
    state_dtype: torch.dtype | str | None = ...,
) -> StatePair: ...


def invert(
    ode: ODE,
    solver: Solver,
    end: Tensor | StatePair | CoupledPair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    progress: bool | None = None,
    callback: Callback | None = None,
    state_dtype: torch.dtype | str | None = None,
) -> StatePair | CoupledPair:
    """Run the sampler backward, from ``ts[-1]`` to ``ts[0]``.

    ``ts`` is the sampling grid (noisiest first), as given to ``sample``. With a
    ``BidirectionalWrapper`` and a pair ``end`` the result is exact up to rounding; with a
    single state, the state at ``ts[-2]`` is first made by one base step backward in time
    (approximate) and everything after that is exact. ``edict`` and ``reversible`` start
    both chains at a single state and are exact from there. With a single-step solver this
    is the usual approximate inversion: the solver run backward in time. The loop runs under
    ``torch.no_grad()``: the result does not require grad (for gradients through sampling,
    see ``sample``'s ``adjoint``).

    Args:
        ode: the problem.
        solver: a registered solver, or a reversible one: ``bdia(...)`` (every gamma_k > 0),
            ``edict(...)``, ``reversible(...)``.
        end: x at ``ts[-1]``, shape ``(batch, ...)``, or the pair ``sample(...,
            return_pair=True)`` gave: ``StatePair(x at ts[-2], x at ts[-1])``, or a
            ``CoupledPair`` at ``ts[-1]`` for ``edict`` and ``reversible``.
        ts: the sampling grid, strictly monotonic.
        progress: tqdm bar, as in ``sample``.
        callback: called after every step, as in ``sample`` (``x_next`` is the earlier state).
        state_dtype: dtype of the solver state, as in ``sample`` (a dtype or its name).

    Returns:
        ``StatePair(x at ts[0], x at ts[1])``, or for ``edict`` and ``reversible`` the
        ``CoupledPair`` of both chains at ``ts[0]``, in the state dtype.

    Raises:
        ValueError: if ``end`` holds NaN or Inf (bad input; no model call is made), is a
            pair made at other grid times or, for a reversible ``solver``, by another
            reversible solver (``StatePair.solver``), or if the steps cannot be undone (a
            gamma of 0, or a gamma, ``p`` or coupling that underflows in the state dtype);
            no model call is made.
        FloatingPointError: if a step produces NaN or Inf (the message names the step).

    Warns:
        ParasiticWarning: when a reversible solver's parasitic component reaches the size of
            the state (``PARASITIC_LIMIT``), so that it dominates the result.
        PairMismatchWarning: when a reversible solver continues a pair made under another
            ODE.
    """
    state_dtype = _state_dtype(state_dtype)
    grid = _grid(ts, ode)
    _check_solver(solver, ode, grid)
    end = _pair(end, state_dtype, "end")
    n = len(grid) - 1  # index of the last grid point
    if isinstance(end, (StatePair, CoupledPair)):
        check_times(end, grid, n, "end")
        check_solver(end, solver, "end")
        if solver.reversible:
            check_fingerprint(end, ode, "end")
    elif ode.is_terminal(grid[n]):
        raise ValueError(
            f"cannot start an inversion at ts[-1] = {grid[n]}, where sigma = 0 and the model "
            "cannot be evaluated; pass the pair that sample(..., return_pair=True) gives, "
            "or end the grid at sigma > 0"
        )

    watch = _ParasiticWatch()
    with torch.no_grad():
        state = solver.init(ode, grid, end, at=n)
        finite = FiniteCheck()
        for _ in progress_bar(range(state.k, 0, -1), progress, f"inverting {solver.name}"):
            with finite.guard():
                new = solver.unstep(ode, grid, state)
            finite(new.x, state.k, grid[state.k], grid[new.k], now=callback is not None)
            _report(callback, state, new, grid)
            watch.update(new)
            state = new
        finite.finish()
        made = stamped(solver.pair(state, ode.fingerprint()), grid, 0, solver)
        pair = _unaliased(made, end)
    watch.warn(solver, "inverting", editing=True)
    return pair


def odeint(
    func: Callable[[Tensor, Tensor], Tensor] | ODE,
    y0: Tensor,
    t: Tensor | Sequence[float],
    method: str = "rk4",
    options: dict[str, Any] | None = None,
) -> Tensor:
    """torchdiffeq-shaped front door: the solution at every time in ``t``.

    The default method is classical RK4, stable on dissipative problems at ordinary step
    sizes. The BDIA methods stay available by name (``"bdia-heun"``, ``"bdia-euler"``, ...)
    but are two-step schemes whose default ``gamma = 1`` is only weakly stable: the
    parasitic mode, which flips sign every step, is not damped, and on a dissipative problem
    it grows. On ``y' = -5 y``, ``y(0) = 1`` with 201 points on [0, 10], ``"bdia-heun"``
    ends at about -7e17 where the solution is ``exp(-50) ~ 2e-22``; ``"rk4"`` gives 1.93e-22.
    Use a bdia method where its exact inversion is the point.

    Args:
        func: ``func(t, y) -> dy/dt`` (``t`` a 0-dim tensor), or an ``ODE``/``DiffusionODE``.
        y0: initial state at ``t[0]``, a real floating tensor (float32 or float64) of any
            shape with a leading dimension; one tensor, not a tuple.
        t: strictly monotonic 1-D grid; the solver steps exactly on it.
        method: a registered solver name or ``"bdia-<name>"``; defaults to ``"rk4"``.
        options: solver options, e.g. ``{"gamma": 0.96}`` for a bdia method.

    Gradients flow as through torchdiffeq's ``odeint`` (not its ``odeint_adjoint``): where
    grad mode is on, autograd records the steps, so the result backpropagates to ``y0`` and
    to the tensors ``func`` uses (memory grows with the number of steps; for constant memory
    use ``sample(..., adjoint="reversible")`` with a reversible solver). Under
    ``torch.no_grad()`` nothing is recorded. Unlike torchdiffeq, the times get no gradient:
    a ``t`` that requires grad is refused where grad mode is on.

    Returns:
        Tensor of shape ``(len(t), *y0.shape)``, ``y0``'s dtype.
    """
    if not isinstance(y0, Tensor):
        # sample would take a tuple of two tensors as a pair (the states at t[0] and t[1]).
        raise TypeError(
            f"y0 must be a torch.Tensor, got {type(y0).__name__}; odeint integrates one tensor "
            "(for torchdiffeq's tuple of tensors, join the parts with torch.cat and split them "
            "in func)"
        )
    if y0.dtype in (torch.float16, torch.bfloat16):
        # sample's refusal would point to its state_dtype, which odeint does not have.
        raise ValueError(
            f"a {y0.dtype} y0 is refused: half precision cannot carry an ODE trajectory "
            "(rounding of ~1e-3 per step). odeint integrates in y0's dtype: give y0 in "
            "float32 or float64, and to run func in half precision pass "
            f"bdia.ODE(func, model_dtype={y0.dtype}) as func"
        )
    _state(y0, None, "y0")  # refusals that name odeint's argument, not sample's
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        # torchdiffeq differentiates with respect to t; the grid here is read as numbers, so
        # t.grad would stay None and an optimizer of the times would skip it in silence.
        raise ValueError(
            "t requires grad, but odeint reads the grid as numbers and gives t no gradient "
            "(torchdiffeq's odeint does); pass t.detach(). To learn an end time T, integrate "
            "over s in [0, 1] the field T * func(s * T, y), with T a tensor that requires grad"
        )
    ode = func if isinstance(func, ODE) else ODE(func)
    solver = get_solver(method, **dict(options or {}))
    adjoint = "autograd" if torch.is_grad_enabled() else None
    return sample(ode, solver, y0, t, trajectory=True, progress=False, adjoint=adjoint)
