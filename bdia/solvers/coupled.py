"""Two exactly invertible meta-solvers that couple two chains: EDICT and McCallum-Foster.

Both wrap a single-step solver Phi and carry two states at the same grid point. With the
base increment of a state ``v`` from ``t`` to ``t'`` (one base step, its own evaluation)

    D(v; t -> t') = Phi(v; t -> t') - v

**EDICT** (Wallace, Gokul & Naik, CVPR 2023), ``edict(solver, p)``, state ``(x, y)``:

    x_i = x + D(y; t_k -> t_{k+1})            y_i = y + D(x_i; t_k -> t_{k+1})
    x'  = p x_i + (1 - p) y_i                 y'  = p y_i + (1 - p) x'

inverted line by line, with every increment evaluated where the forward pass evaluated it:

    y_i = (y' - (1 - p) x') / p               x_i = (x' - (1 - p) y_i) / p
    y   = y_i - D(x_i; t_k -> t_{k+1})        x   = x_i - D(y; t_k -> t_{k+1})

Over DDIM in the EDM schedule this is EDICT's update exactly. The paper writes the DDIM case
as ``x_i = a x + b eps(y)`` with ``a = alpha_{k+1} / alpha_k``; the increment form here is
``x_i = x + (a - 1) y + b eps(y)``, which differs by ``(a - 1)(x - y)``: nothing where
``alpha`` is constant (EDM), and a term of the size of the chains' difference times the
step's change of ``alpha`` otherwise (VP schedules).

**McCallum-Foster** (McCallum & Foster 2024, "Efficient, accurate and stable gradients for
neural ODEs"; diffrax's ``Reversible``), ``reversible(solver, coupling)``, state ``(y, z)``,
with ``lambda = coupling``:

    y' = lambda y + (1 - lambda) z + D(z; t_k -> t_{k+1})
    z' = z - D(y'; t_{k+1} -> t_k)

and exactly

    z = z' + D(y'; t_{k+1} -> t_k)
    y = (y' - (1 - lambda) z - D(z; t_k -> t_{k+1})) / lambda

Both cost two base steps per step (``2 s`` model evaluations for a base of ``s`` stages),
start from one state with both chains equal to it (in either direction), return the first
chain (EDICT's ``x``, McCallum-Foster's ``y``) and hand the pair of chains over as a
``CoupledPair``. As in BDIA, both chains are carried as two words of the state dtype and
every line is done in double-word arithmetic (``bdia.twoword``); the model sees only the
high words, so forward and backward passes evaluate it on the same inputs (but for a value
within u^2 of a rounding midpoint, split into neighbouring high words by the two passes) and
a round trip is exact to about twice the state's precision, times the growth of errors along
the run.

Stability: the chains' difference is a parasitic mode, multiplied per step by about
``p^2 / R`` (EDICT) and ``lambda / R`` (McCallum-Foster) when sampling and by the inverse when
inverting, where the exact flow multiplies the mode by ``R``; ``SolverState.parasitic``
reports it. See the theory page, "Other reversible schemes: EDICT and McCallum-Foster".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import twoword
from ..ode import ODE, Evaluation
from ..pairs import CoupledPair, StatePair
from ..twoword import TwoWord
from .base import SingleStepSolver, Solver, SolverState, check_divisor, is_flag
from .bidirectional import _relative_rms

__all__ = ["EDICTWrapper", "ReversibleWrapper"]


@dataclass(frozen=True)
class _Chains:
    """What a coupled solver carries besides ``SolverState.x`` (the first chain's high word):
    that chain's low word and the second chain's two words."""

    x_low: Tensor | None
    y: Tensor
    y_low: Tensor | None


def _fraction(value: Any, name: str, factory: str) -> float:
    """``value`` as a float in (0, 1], or a one-line TypeError/ValueError."""
    if is_flag(value) or isinstance(value, str):
        raise TypeError(f"{factory}(): {name} must be a number in (0, 1], got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{factory}(): {name} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < number <= 1.0:
        raise ValueError(
            f"{factory}(): {name} = {number} lies outside (0, 1]; the inverse divides by {name}, "
            f"so {name} = 0 is not invertible (1 mixes nothing)"
        )
    return number


class _Coupled(Solver):
    """The shared protocol of the two coupled-chain solvers (subclasses are dataclasses with
    the fields ``solver`` and one mixing parameter)."""

    solver: SingleStepSolver
    reversible = True
    _factory: ClassVar[str]
    mixing_parameter: ClassVar[str]

    def __post_init__(self) -> None:
        base = self.solver
        if isinstance(base, Solver) and not isinstance(base, SingleStepSolver):
            raise TypeError(
                f"{self._factory}() wraps a single-step solver, not {type(base).__name__} "
                f"{base.name!r}"
            )
        if not isinstance(base, SingleStepSolver):
            raise TypeError(f"{self._factory}() needs a Solver, got {type(base).__name__}")
        name = self.mixing_parameter
        object.__setattr__(self, name, _fraction(getattr(self, name), name, self._factory))

    # ------------------------------------------------------------------ data
    @property
    def base(self) -> SingleStepSolver:
        return self.solver

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self._factory}-{self.solver.name}"

    @property
    def identity(self) -> str:
        """``"edict(<base identity>, p=<p>)"`` or ``"reversible(<base identity>,
        coupling=<coupling>)"``, the parameter as the float it is kept as."""
        value = getattr(self, self.mixing_parameter)
        return f"{self._factory}({self.solver.identity}, {self.mixing_parameter}={value!r})"

    @property
    def needs_diffusion(self) -> bool:  # type: ignore[override]
        return self.solver.needs_diffusion

    @property
    def stages(self) -> int:  # type: ignore[override]
        """Model evaluations per step: two base steps, ``2 s`` for a base of ``s`` stages."""
        return 2 * self.solver.stages

    @property
    def nfe_per_step(self) -> int:
        """Model evaluations of every step (the first included): ``2 s``."""
        return 2 * self.solver.stages

    # -------------------------------------------------------------- protocol
    def check_invertible(
        self, ode: ODE, ts: Sequence[float], dtype: torch.dtype | None = None
    ) -> None:
        name = self.mixing_parameter
        check_divisor(name, getattr(self, name), dtype)

    def init(self, ode: ODE, ts: Sequence[float], start: Any, *, at: int) -> SolverState:
        if isinstance(start, StatePair):
            raise TypeError(
                f"{self.name} continues from a CoupledPair (both chains at one grid point), "
                "not from a StatePair, which is BDIA's; pass a tensor or the CoupledPair that "
                "sample(..., return_pair=True) or invert gave"
            )
        if at != 0:
            first = start.x if isinstance(start, CoupledPair) else start
            self.check_invertible(ode, ts, getattr(first, "dtype", None))
        if isinstance(start, CoupledPair):
            return SolverState(at, start.x, memory=_Chains(start.x_low, start.y, start.y_low))
        # One state: both chains start at it (noise when sampling, data when inverting).
        return SolverState(at, start, memory=_Chains(None, start, None))

    def rewind(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        """The state ``step`` moved from: the chains sit at one grid point and carry no
        direction, so this is ``unstep`` (without its evaluation and diagnostic)."""
        before = self.unstep(ode, ts, state)
        return SolverState(before.k, before.x, memory=before.memory)

    def pair(self, state: SolverState, fingerprint: str | None = None) -> CoupledPair:
        chains = state.memory
        return CoupledPair(state.x, chains.y, chains.x_low, chains.y_low, fingerprint)

    def _increment(self, ode: ODE, t: float, t_next: float, v: Tensor) -> tuple[Evaluation, Tensor]:
        """One evaluation at ``(t, v)`` and the base increment ``Phi(v; t -> t_next) - v``."""
        first = ode.evaluate(t, v)
        return first, self.solver.flow(ode, t, t_next, v, first=first) - v

    @staticmethod
    def _words(state: SolverState) -> tuple[TwoWord, TwoWord]:
        chains = state.memory
        return TwoWord(state.x, chains.x_low), TwoWord(chains.y, chains.y_low)

    @staticmethod
    def _state(k: int, a: TwoWord, b: TwoWord, evaluation: Evaluation | None) -> SolverState:
        parasitic = _relative_rms(a.high - b.high, a.high)
        return SolverState(k, a.high, evaluation, _Chains(a.low, b.high, b.low), parasitic)

    def __repr__(self) -> str:
        value = getattr(self, self.mixing_parameter)
        return f"{self._factory}({self.solver!r}, {self.mixing_parameter}={value!r})"


@dataclass(frozen=True, repr=False)
class EDICTWrapper(_Coupled):
    """EDICT around a base single-step solver; build it with ``edict(solver, p)``.

    A reversible solver: ``unstep`` is the exact inverse of ``step`` (up to the rounding of
    the two-word chains). ``SolverState.x`` is the chain ``x`` (the result);
    ``SolverState.memory`` holds its low word and the chain ``y``; ``parasitic`` is
    ``rms(x - y) / rms(x)`` after the move.

    Attributes:
        solver: the base single-step solver Phi.
        p: the mixing weight, in (0, 1] (EDICT's default 0.93).
    """

    solver: SingleStepSolver
    p: float = 0.93

    _factory: ClassVar[str] = "edict"
    mixing_parameter: ClassVar[str] = "p"

    @property
    def order(self) -> int:  # type: ignore[override]
        """1, whatever the base: the chain ``y`` takes its increment over ``[t_k, t_{k+1}]``
        from the point ``x_i``, which already lies at ``t_{k+1}``, an O(h^2) error per step
        that reaches ``x`` through its next increment, taken at ``y``, with ``p = 1`` too
        (measured: 0.9 to 1.0 for euler, heun and ddim). The mixing adds an error proportional
        to ``1 - p`` that hardly shrinks with the step until about ``3 / (1 - p)`` steps, and is
        first order after (the theory page, EDICT)."""
        return 1

    def step(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        k = state.k
        t, t_next = ts[k], ts[k + 1]
        x, y = self._words(state)
        first, d_y = self._increment(ode, t, t_next, y.high)
        x_i = twoword.add(x, d_y)
        _, d_x = self._increment(ode, t, t_next, x_i.high)
        y_i = twoword.add(y, d_x)
        x_next = twoword.mix(x_i, y_i, self.p)
        y_next = twoword.mix(y_i, x_next, self.p)
        return self._state(k + 1, x_next, y_next, first)

    def unstep(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        k = state.k
        t, t_next = ts[k - 1], ts[k]
        x_next, y_next = self._words(state)
        y_i = twoword.unmix(y_next, x_next, self.p)
        x_i = twoword.unmix(x_next, y_i, self.p)
        first, d_x = self._increment(ode, t, t_next, x_i.high)
        y = twoword.sub(y_i, d_x)
        _, d_y = self._increment(ode, t, t_next, y.high)
        x = twoword.sub(x_i, d_y)
        return self._state(k - 1, x, y, first)


@dataclass(frozen=True, repr=False)
class ReversibleWrapper(_Coupled):
    """McCallum and Foster's reversible form of a base single-step solver; build it with
    ``reversible(solver, coupling)``.

    A reversible solver: ``unstep`` is the exact inverse of ``step`` (up to the rounding of
    the two-word chains). ``SolverState.x`` is the chain ``y`` (the result);
    ``SolverState.memory`` holds its low word and the chain ``z``; ``parasitic`` is
    ``rms(y - z) / rms(y)`` after the move. Every step evaluates the model at both of its
    grid points, so the grid must not contain a point where ``sigma = 0`` (unless the
    network predicts the flow, which can be evaluated there).

    Attributes:
        solver: the base single-step solver Phi.
        coupling: lambda, in (0, 1] (diffrax's default 0.999).
    """

    solver: SingleStepSolver
    coupling: float = 0.999

    _factory: ClassVar[str] = "reversible"
    mixing_parameter: ClassVar[str] = "coupling"

    @property
    def order(self) -> int:  # type: ignore[override]
        """The base's order (McCallum & Foster's convergence result; measured 1.1, 2.0 and
        1.1 for euler, heun and ddim)."""
        return self.solver.order

    def check(self, ode: ODE, ts: Sequence[float]) -> None:
        super().check(ode, ts)
        for i, t in enumerate(ts):
            if ode.is_terminal(float(t)):
                raise ValueError(
                    f"{self.name} evaluates the model at every grid point, and ts[{i}] = {t} "
                    "has sigma = 0, where the model cannot be evaluated; end the grid at "
                    "sigma > 0 (karras_grid(..., final_zero=False))"
                )

    def step(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        k = state.k
        t, t_next = ts[k], ts[k + 1]
        y, z = self._words(state)
        first, psi_z = self._increment(ode, t, t_next, z.high)
        y_next = twoword.add(twoword.mix(y, z, self.coupling), psi_z)
        _, psi_y = self._increment(ode, t_next, t, y_next.high)
        z_next = twoword.sub(z, psi_y)
        return self._state(k + 1, y_next, z_next, first)

    def unstep(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        k = state.k
        t, t_next = ts[k - 1], ts[k]
        y_next, z_next = self._words(state)
        first, psi_y = self._increment(ode, t_next, t, y_next.high)
        z = twoword.add(z_next, psi_y)
        _, psi_z = self._increment(ode, t, t_next, z.high)
        y = twoword.unmix(twoword.sub(y_next, psi_z), z, self.coupling)
        return self._state(k - 1, y, z, first)
