"""Drivers: ``sample``, ``invert`` and the torchdiffeq-shaped ``odeint``.

One loop per driver, the same keyword arguments everywhere: ``progress`` (a tqdm bar; None
shows it only on a terminal), ``callback`` (called after every step with a small dict) and
``state_dtype`` (the precision policy: the state may be float64 while the network runs in the
ODE's ``model_dtype``).

The reversible state of a BDIA sampler is the pair of consecutive grid states; ``StatePair``
holds it in grid order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .ode import DTYPE_NAMES, ODE, Evaluation
from .solvers.base import Solver, get_solver
from .solvers.bidirectional import BidirectionalWrapper

__all__ = ["StatePair", "PairMismatchWarning", "sample", "invert", "odeint", "Callback"]

Callback = Callable[[dict[str, Any]], None]
AnySolver = Solver | BidirectionalWrapper


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


def _check_fingerprint(pair: StatePair, ode: ODE, what: str) -> None:
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
        stacklevel=3,
    )


# ------------------------------------------------------------------ validation


def _grid(ts: Tensor | Sequence[float], ode: ODE) -> list[float]:
    """The grid as Python floats, checked to be finite, strictly monotone and in the domain."""
    if isinstance(ts, Tensor):
        if ts.ndim != 1:
            raise ValueError(f"the time grid must be 1-D, got shape {tuple(ts.shape)}")
        values = [float(v) for v in ts.detach().cpu().tolist()]
    else:
        values = [float(v) for v in ts]
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
        raise TypeError(f"{what} must be a torch.Tensor or a StatePair, got {type(x).__name__}")
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
    out = x.to(dtype)
    _check_input_finite(x, out, what)
    return out


def _low_word(high: Tensor, low: Any, original: Tensor, what: str) -> Tensor | None:
    """The low word of ``original + low`` once its high word has been cast to ``high``."""
    if low is None:
        return None
    if not isinstance(low, Tensor) or low.shape != original.shape:
        raise ValueError(f"{what} must be a tensor of the state's shape {tuple(original.shape)}")
    if high.dtype == original.dtype:
        out = low.to(device=high.device)
    else:
        # Re-split the exact value into the new dtype's two words.
        wide = torch.float64
        out = ((original.to(wide) - high.to(wide)) + low.to(wide)).to(high.dtype)
    _check_input_finite(low, out, what)
    return out


def _pair(value: Any, state_dtype: torch.dtype | None, what: str) -> StatePair | Tensor:
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
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            raise ValueError(
                f"the two states of {what} must match in shape, dtype and device; got "
                f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}"
            )
        return StatePair(
            a,
            b,
            _low_word(a, value.earlier_low, value.earlier, f"{what}.earlier_low"),
            _low_word(b, value.later_low, value.later, f"{what}.later_low"),
            value.fingerprint,
        )
    return _state(value, state_dtype, what)


def _check_solver(solver: AnySolver, ode: ODE) -> None:
    if not isinstance(solver, (Solver, BidirectionalWrapper)):
        raise TypeError(
            f"solver must be a Solver or a BidirectionalWrapper, got {type(solver).__name__}; "
            "build one with get_solver(name) or bdia(...)"
        )
    if solver.needs_diffusion and not ode.is_diffusion:
        raise TypeError(
            f"solver {solver.name!r} needs a DiffusionODE (a noise schedule), got "
            f"{type(ode).__name__}; use 'euler', 'heun', 'midpoint' or 'rk4' for a plain ODE"
        )


def _check_finite(x: Tensor, k: int, t: float, t_next: float) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"non-finite values at step {k} (t = {t:.6g} -> {t_next:.6g}): the model returned "
            "NaN or Inf, or the step size is too large for the problem"
        )


def _bar(steps: range, progress: bool | None, desc: str) -> Any:
    return tqdm(steps, desc=desc, disable=None if progress is None else not progress, leave=False)


def _report(
    callback: Callback | None,
    k: int,
    t: float,
    t_next: float,
    x: Tensor,
    x_next: Tensor,
    first: Evaluation,
) -> None:
    if callback is not None:
        callback(
            {"i": k, "t": t, "t_next": t_next, "x": x, "x_next": x_next, "denoised": first.denoised}
        )


# --------------------------------------------------------------------- drivers


def sample(
    ode: ODE,
    solver: AnySolver,
    start: Tensor | StatePair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    trajectory: bool = False,
    return_pair: bool = False,
    progress: bool | None = None,
    callback: Callback | None = None,
    state_dtype: torch.dtype | str | None = None,
) -> Tensor | StatePair:
    """Integrate from ``ts[0]`` to ``ts[-1]``.

    Args:
        ode: the problem (``ODE`` or ``DiffusionODE``).
        solver: a registered solver or a ``BidirectionalWrapper``.
        start: x at ``ts[0]`` of shape ``(batch, ...)``, or a ``StatePair`` (x at ``ts[0]``,
            x at ``ts[1]``) such as ``invert`` returns. From a pair, BDIA reproduces the forward
            trajectory exactly; a single-step solver continues from the pair's later state.
        ts: strictly monotonic grid (1-D tensor or sequence), either direction.
        trajectory: return every state on the grid, shape ``(len(ts), batch, ...)``.
        return_pair: return ``StatePair(x at ts[-2], x at ts[-1])``, the exact input of ``invert``.
        progress: tqdm bar; None shows it only on a terminal.
        callback: called after every step with ``{"i", "t", "t_next", "x", "x_next", "denoised"}``.
        state_dtype: dtype of the solver state: ``torch.float32`` or ``torch.float64``, or
            the name ``"float32"`` or ``"float64"``; defaults to ``start``'s.

    Returns:
        x at ``ts[-1]`` in the state dtype (or the trajectory, or the final pair).

    Raises:
        ValueError: if ``start`` holds NaN or Inf (bad input; no model call is made).
        FloatingPointError: if a step produces NaN or Inf (the message names the step).
    """
    if trajectory and return_pair:
        raise ValueError("choose trajectory=True or return_pair=True, not both")
    state_dtype = _state_dtype(state_dtype)
    _check_solver(solver, ode)
    grid = _grid(ts, ode)
    state = _pair(start, state_dtype, "start")
    bidirectional = isinstance(solver, BidirectionalWrapper)
    gammas = solver.gammas(ode, grid) if bidirectional else []

    # BDIA carries each state as x + x_low (see solvers.bidirectional); None means zero.
    x_prev_low: Tensor | None = None
    x_low: Tensor | None = None
    if isinstance(state, StatePair):
        if bidirectional:
            _check_fingerprint(state, ode, "start")
        x_prev, x, first_step = state.earlier, state.later, 1
        x_prev_low, x_low = state.earlier_low, state.later_low
        states = [x_prev, x]
    else:
        x_prev, x, first_step = None, state, 0
        states = [x]

    for k in _bar(range(first_step, len(grid) - 1), progress, f"sampling {solver.name}"):
        t, t_next = grid[k], grid[k + 1]
        first = ode.evaluate(t, x)
        x_next_low = None
        if bidirectional:
            t_prev = grid[k - 1] if k > 0 else None
            gamma = gammas[k - 1] if k > 0 else 0.0
            x_next, x_next_low = solver.step_compensated(
                ode, t_prev, t, t_next, x_prev, x_prev_low, x, gamma, first=first
            )
        else:
            x_next = solver.step(ode, t, t_next, x, first=first)
        _check_finite(x_next, k, t, t_next)
        _report(callback, k, t, t_next, x, x_next, first)
        x_prev, x = x, x_next
        x_prev_low, x_low = x_low, x_next_low
        if trajectory:
            states.append(x)

    if trajectory:
        return torch.stack(states)
    if return_pair:
        if x_prev is None:
            raise ValueError("return_pair needs at least one step")
        return StatePair(x_prev, x, x_prev_low, x_low, ode.fingerprint())
    return x


def _warn_amplification(amplification: float, dtype: torch.dtype) -> None:
    eps = torch.finfo(dtype).eps
    # Past 1/sqrt(eps) the round trip keeps fewer than half of the state's digits.
    if amplification > 1.0 / math.sqrt(eps):
        warnings.warn(
            f"BDIA inversion amplifies rounding by prod(1/gamma) = {amplification:.3g}, more "
            f"than a {dtype} state carries (eps = {eps:.1e}); use a float64 state, fewer steps "
            "or gamma closer to 1",
            RuntimeWarning,
            stacklevel=3,
        )


def invert(
    ode: ODE,
    solver: AnySolver,
    end: Tensor | StatePair | tuple[Tensor, Tensor],
    ts: Tensor | Sequence[float],
    *,
    progress: bool | None = None,
    callback: Callback | None = None,
    state_dtype: torch.dtype | str | None = None,
) -> StatePair:
    """Run the sampler backward, from ``ts[-1]`` to ``ts[0]``.

    ``ts`` is the sampling grid (noisiest first), as given to ``sample``. With a
    ``BidirectionalWrapper`` and a pair ``end`` the result is exact up to rounding; with a
    single state, the state at ``ts[-2]`` is first made by one base step backward in time
    (approximate) and everything after that is exact. With a single-step solver this is the
    usual approximate inversion: the solver run backward in time.

    Args:
        ode: the problem.
        solver: a registered solver or a ``BidirectionalWrapper`` (every gamma_k > 0).
        end: x at ``ts[-1]``, shape ``(batch, ...)``, or ``StatePair(x at ts[-2], x at ts[-1])``.
        ts: the sampling grid, strictly monotonic.
        progress: tqdm bar, as in ``sample``.
        callback: called after every step, as in ``sample`` (``x_next`` is the earlier state).
        state_dtype: dtype of the solver state, as in ``sample`` (a dtype or its name).

    Returns:
        ``StatePair(x at ts[0], x at ts[1])``, in the state dtype.

    Raises:
        ValueError: if ``end`` holds NaN or Inf (bad input; no model call is made).
        FloatingPointError: if a step produces NaN or Inf (the message names the step).

    Warns:
        RuntimeWarning: when BDIA's amplification prod(1/gamma_k) exceeds what the state
            dtype can carry.
    """
    state_dtype = _state_dtype(state_dtype)
    _check_solver(solver, ode)
    grid = _grid(ts, ode)
    state = _pair(end, state_dtype, "end")
    n = len(grid) - 1  # index of the last grid point
    bidirectional = isinstance(solver, BidirectionalWrapper)
    base = solver.solver if bidirectional else solver
    gammas: list[float] = []
    if bidirectional:
        gammas = solver.gammas(ode, grid)
        if any(g == 0.0 for g in gammas):
            raise ValueError(
                "gamma = 0 is the base solver, which cannot be inverted exactly; "
                "inversion needs every gamma in (0, 1]"
            )
        x_dtype = state.later.dtype if isinstance(state, StatePair) else state.dtype
        _warn_amplification(solver.amplification(ode, grid), x_dtype)

    x_low: Tensor | None = None
    x_next_low: Tensor | None = None
    if isinstance(state, StatePair):
        if bidirectional:
            _check_fingerprint(state, ode, "end")
        x, x_next, k_start = state.earlier, state.later, n - 1
        x_low, x_next_low = state.earlier_low, state.later_low
    else:
        if ode.is_terminal(grid[n]):
            raise ValueError(
                f"cannot start an inversion at ts[-1] = {grid[n]}, where sigma = 0 and the model "
                "cannot be evaluated; pass the pair that sample(..., return_pair=True) gives, "
                "or end the grid at sigma > 0"
            )
        x, x_next, k_start = state, None, n

    for k in _bar(range(k_start, 0, -1), progress, f"inverting {solver.name}"):
        t, t_prev = grid[k], grid[k - 1]
        first = ode.evaluate(t, x)
        x_prev_low = None
        if bidirectional and x_next is not None:
            x_prev, x_prev_low = solver.unstep_compensated(
                ode, t_prev, t, grid[k + 1], x, x_next, x_next_low, gammas[k - 1], first=first
            )
        else:
            x_prev = base.step(ode, t, t_prev, x, first=first)
        _check_finite(x_prev, k, t, t_prev)
        _report(callback, k, t, t_prev, x, x_prev, first)
        x, x_next = x_prev, x
        x_low, x_next_low = x_prev_low, x_low
    return StatePair(x, x_next, x_low, x_next_low, ode.fingerprint())


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
        y0: initial state at ``t[0]``, any shape with a leading dimension.
        t: strictly monotonic 1-D grid; the solver steps exactly on it.
        method: a registered solver name or ``"bdia-<name>"``; defaults to ``"rk4"``.
        options: solver options, e.g. ``{"gamma": 0.96}`` for a bdia method.

    Returns:
        Tensor of shape ``(len(t), *y0.shape)``, ``y0``'s dtype.
    """
    ode = func if isinstance(func, ODE) else ODE(func)
    solver = get_solver(method, **dict(options or {}))
    return sample(ode, solver, y0, t, trajectory=True, progress=False)
