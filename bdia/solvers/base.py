"""The solver protocol that every solver follows, and the single-step solvers' base class.

One loop drives every solver (``bdia.sample`` forward, ``bdia.invert`` backward):

    state = solver.init(ode, ts, start, at=0)        # at = len(ts) - 1 to run backward
    state = solver.step(ode, ts, state)              # ts[k] -> ts[k + 1]
    state = solver.unstep(ode, ts, state)            # ts[k] -> ts[k - 1]
    state = solver.rewind(ode, ts, state)            # undo a step (adjoint='reversible')
    pair = solver.pair(state, fingerprint)           # what return_pair gives, what invert takes

A ``SolverState`` holds the grid index ``k``, the state ``x`` there, the evaluation the last
move made, and ``memory``: whatever else the solver carries (a reversible solver's
neighbouring state and low words). The driver never looks inside ``memory``, so a solver with
state is driven exactly like one without (diffrax's ``solver_state``).

``SingleStepSolver`` is the base of the single-step methods: they implement one map,
``flow(ode, t, t_next, x, first)`` (the numerical flow Phi from ``t`` to ``t_next``, on either
side of ``t``), and inherit the protocol: ``step`` and ``unstep`` are ``flow`` forward and
backward in time, and ``unstep`` is the usual approximate inversion. Reversible solvers
(``reversible = True``) implement ``unstep`` as the exact inverse of ``step``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..ode import ODE, Evaluation
from ..pairs import CoupledPair, StatePair

__all__ = [
    "Solver",
    "SingleStepSolver",
    "SolverState",
    "Neighbour",
    "ordered_pair",
    "move_report",
    "is_flag",
    "check_divisor",
]


def check_divisor(name: str, value: float, dtype: torch.dtype | None) -> None:
    """Raise ValueError if ``value``, a parameter the inverse divides by (BDIA's gamma,
    EDICT's p, McCallum-Foster's coupling), underflows in ``dtype``, the state dtype, where
    the double-word arithmetic rounds it (``bdia.twoword.state_scalar``): below the smallest
    normal number it is 0 or has lost its precision, and the inverse would divide by zero or
    stop being exact. Nothing is checked when ``dtype`` is None."""
    if dtype is None or value == 0.0:
        return
    tiny = torch.finfo(dtype).tiny
    # The rounded value is what the inverse divides by: a value just below the smallest
    # normal number may round up to it.
    rounded = float(torch.tensor(value, dtype=dtype))
    if abs(rounded) < tiny:
        what = "rounds to 0" if rounded == 0.0 else "is subnormal"
        raise ValueError(
            f"{name} = {value!r} {what} in {dtype}, the state dtype, whose smallest normal "
            f"number is {tiny:.3g}; the inverse divides by {name}, so the steps cannot be "
            f"undone exactly. Use a larger {name} (inverting magnifies errors by 1/{name} "
            "per step) or a float64 state"
        )


def is_flag(value: object) -> bool:
    """True for a bool of Python, numpy or torch: ``float`` makes one 0 or 1, so a flag passed
    by mistake as a solver's parameter would pass for a number."""
    return isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == torch.bool


@dataclass(frozen=True)
class SolverState:
    """What a solver carries from one grid point to the next.

    Attributes:
        k: the grid index of ``x``.
        x: the state at ``ts[k]``, shape ``(batch, ...)``, in the state dtype.
        evaluation: the first model evaluation of the move that reached ``k`` (made at the
            grid point it came from), or None at the start; the driver's callback reads
            ``denoised`` from it.
        memory: the solver's own: None for a single-step solver's start, its neighbouring
            grid state for a single-step solver after one move, and for a reversible solver
            whatever its exact inverse needs (BDIA: the neighbouring state, both low words,
            the gammas).
        parasitic: for a reversible solver, the size of its non-physical component after the
            move, relative to the state (a 0-dim float tensor, left on the device so that
            reading it is the caller's choice); None for single-step solvers. For BDIA it is
            ``rms(x_{k-1} - Phi(x_k; t_k -> t_{k-1})) / rms(x_k)``: the part of the two-step
            state that no single-step trajectory explains (truncation error plus the
            parasitic mode).
    """

    k: int
    x: Tensor
    evaluation: Evaluation | None = None
    memory: Any = None
    parasitic: Tensor | None = None


def move_report(state: SolverState, new: SolverState, ts: Sequence[float]) -> dict[str, Any]:
    """What the drivers' callback receives after a move from ``state`` to ``new``: ``i`` (the
    index moved from), ``t``, ``t_next``, ``x``, ``x_next``, ``denoised`` (of the move's first
    evaluation, or None) and ``parasitic`` (a reversible solver's 0-dim tensor, or None)."""
    return {
        "i": state.k,
        "t": ts[state.k],
        "t_next": ts[new.k],
        "x": state.x,
        "x_next": new.x,
        "denoised": new.evaluation.denoised if new.evaluation is not None else None,
        "parasitic": new.parasitic,
    }


@dataclass(frozen=True)
class Neighbour:
    """A grid state next to the current one: index ``k``, value ``x`` and its low word."""

    k: int
    x: Tensor
    low: Tensor | None = None


def ordered_pair(
    k: int,
    x: Tensor,
    low: Tensor | None,
    neighbour: Neighbour | None,
    fingerprint: str | None,
) -> StatePair:
    """The ``StatePair`` of the state at ``k`` and its neighbour, in grid order."""
    if neighbour is None:
        raise ValueError("a pair needs at least one step")
    if neighbour.k < k:
        return StatePair(neighbour.x, x, neighbour.low, low, fingerprint)
    return StatePair(x, neighbour.x, low, neighbour.low, fingerprint)


class Solver(ABC):
    """The protocol of every solver: ``init``, ``step``, ``unstep`` and ``pair``.

    Subclasses set ``name``, ``order``, ``stages`` (model evaluations per step when nothing
    is reused), ``needs_diffusion`` and ``reversible`` (``unstep`` is the exact inverse of
    ``step``); a reversible solver that couples two states also names the parameter that
    weighs them in ``mixing_parameter`` (``"gamma"``, ``"p"``, ``"coupling"``), which
    warnings about its parasitic mode point to. Instances are immutable and hold no state
    between calls: the state lives in the ``SolverState`` the methods pass along.
    """

    name: str
    order: int
    stages: int
    needs_diffusion: bool = False
    reversible: bool = False
    mixing_parameter: ClassVar[str | None] = None

    @abstractmethod
    def init(self, ode: ODE, ts: Sequence[float], start: Any, *, at: int) -> SolverState:
        """The state at grid index ``at`` (0 to sample, ``len(ts) - 1`` to invert).

        ``start`` is a tensor ``(batch, ...)`` at ``ts[at]``, or the pair that ``pair``
        returned (and ``invert`` returns): then the state is rebuilt from it, and ``k`` is
        the pair's grid index nearest the direction of travel.
        """

    @abstractmethod
    def step(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        """Advance ``state`` from ``ts[state.k]`` to ``ts[state.k + 1]``."""

    @abstractmethod
    def unstep(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        """Move ``state`` back from ``ts[state.k]`` to ``ts[state.k - 1]`` (exactly, up to
        rounding, when ``reversible``)."""

    @abstractmethod
    def pair(self, state: SolverState, fingerprint: str | None = None) -> StatePair | CoupledPair:
        """The two grid states around ``state.k`` in grid order (for edict and reversible, the
        two chains at ``state.k``), as ``return_pair`` gives them and ``init`` takes them
        back."""

    @property
    def base(self) -> Solver:
        """The single-step solver this one is built on: itself, or the solver a reversible
        meta-solver wraps (``bdia``, ``edict`` and ``reversible`` override this)."""
        return self

    @property
    def identity(self) -> str:
        """The solver as a string that names it and every parameter its steps depend on:
        ``"heun"``, ``"dpm_solver_2(r1=0.3)"``, ``"bdia(heun, gamma=0.96)"``,
        ``"edict(ddim, p=0.93)"``. Equal solvers have equal identities (numbers are given as
        the Python floats the solvers keep, so ``bdia("heun", 0.96)`` and ``bdia("heun",
        Fraction(24, 25))`` are one solver), and solvers that step differently have
        different ones. The pairs a reversible solver makes record it (``StatePair.solver``,
        ``CoupledPair.solver``). The default is ``name``; a solver whose steps depend on
        parameters of its own overrides it."""
        return self.name

    def rewind(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        """The state that ``step`` moved from: ``rewind(ode, ts, step(ode, ts, s))`` rebuilds
        ``s`` (its ``k``, ``x`` and ``memory``; ``evaluation`` and ``parasitic`` are None).

        ``unstep`` cannot serve here: it continues a state that travels backward (whose
        ``memory`` holds the *following* grid state), while ``step`` leaves one that travels
        forward. ``adjoint="reversible"`` rebuilds every earlier state with this method, so a
        reversible solver implements it exactly (up to rounding); the default refuses.
        """
        raise NotImplementedError(
            f"solver {self.name!r} cannot rewind a step, which adjoint='reversible' needs; "
            "use adjoint='autograd'"
        )

    def check(self, ode: ODE, ts: Sequence[float]) -> None:
        """Raise before any model call if the solver cannot run on ``ode`` over ``ts``."""
        if self.needs_diffusion and not ode.is_diffusion:
            raise TypeError(
                f"solver {self.name!r} needs a DiffusionODE (a noise schedule), got "
                f"{type(ode).__name__}; use 'euler', 'heun', 'midpoint' or 'rk4' for a plain ODE"
            )
        if self.base is not self:
            # A meta-solver steps with its base over the same grid: what the base refuses,
            # it refuses too.
            self.base.check(ode, ts)

    def check_invertible(
        self, ode: ODE, ts: Sequence[float], dtype: torch.dtype | None = None
    ) -> None:
        """Raise before any model call if the steps over ``ts`` cannot be undone exactly
        (what ``invert`` and ``adjoint="reversible"`` need of a reversible solver); the
        default accepts. BDIA refuses a gamma of 0, and the reversible solvers a divisor
        (``mixing_parameter``) that underflows in ``dtype``, the state dtype, when given."""
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, order={self.order}, stages={self.stages})"
        )


class SingleStepSolver(Solver):
    """A single-step method: one map ``flow`` from ``t`` to ``t_next``; the protocol follows.

    Subclasses implement ``flow``; ``step`` and ``unstep`` apply it forward and backward in
    time (``unstep`` is then approximate). ``memory`` keeps the state the last move came from,
    so that ``pair`` can return both.
    """

    @abstractmethod
    def flow(
        self, ode: ODE, t: float, t_next: float, x: Tensor, first: Evaluation | None = None
    ) -> Tensor:
        """Advance ``x`` from time ``t`` to ``t_next`` (either side of ``t``).

        Args:
            ode: the problem; every model call goes through ``ode.evaluate``.
            t: current time.
            t_next: target time; ``t_next < t`` and ``t_next > t`` are both ordinary steps.
            x: state at ``t``, shape ``(batch, ...)``, any floating dtype.
            first: an evaluation already made at ``(t, x)``, reused instead of calling the
                model again.

        Returns:
            The state at ``t_next``, same shape, dtype and device as ``x``.
        """

    def first_evaluation(
        self, ode: ODE, t: float, x: Tensor, first: Evaluation | None
    ) -> Evaluation:
        """``first`` if given (checked to be at ``t``), else a fresh evaluation at ``(t, x)``."""
        if self.needs_diffusion and not ode.is_diffusion:
            raise TypeError(
                f"solver {self.name!r} is an exponential integrator and needs a DiffusionODE "
                f"(a noise schedule), got {type(ode).__name__}; use a generic solver such as "
                "'euler', 'heun', 'midpoint' or 'rk4' for a plain ODE"
            )
        if first is None:
            return ode.evaluate(t, x)
        if first.t != float(t):
            raise ValueError(
                f"the evaluation passed as `first` is at t = {first.t}, not at t = {t}"
            )
        return first

    # ------------------------------------------------------------------ protocol
    def init(self, ode: ODE, ts: Sequence[float], start: Any, *, at: int) -> SolverState:
        if isinstance(start, CoupledPair):
            raise TypeError(
                f"{self.name} continues from a tensor or a StatePair, not from a CoupledPair "
                "(the two chains of edict or reversible); pass the pair to the solver that "
                "made it, or its result chain pair.x as a tensor"
            )
        if isinstance(start, StatePair):
            # Continue from the pair's state nearest the direction of travel.
            if at == 0:
                return SolverState(1, start.later, memory=Neighbour(0, start.earlier))
            return SolverState(at - 1, start.earlier, memory=Neighbour(at, start.later))
        return SolverState(at, start)

    def _move(self, ode: ODE, ts: Sequence[float], state: SolverState, k_next: int) -> SolverState:
        first = ode.evaluate(ts[state.k], state.x)
        x_next = self.flow(ode, ts[state.k], ts[k_next], state.x, first=first)
        return SolverState(k_next, x_next, first, memory=Neighbour(state.k, state.x))

    def step(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        return self._move(ode, ts, state, state.k + 1)

    def unstep(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        return self._move(ode, ts, state, state.k - 1)

    def pair(self, state: SolverState, fingerprint: str | None = None) -> StatePair:
        return ordered_pair(state.k, state.x, None, state.memory, fingerprint)
