"""BDIA: the bi-directional integration approximation (Zhang, Lewis & Kleijn, ECCV 2024).

Any single-step solver Phi becomes a time-reversible two-step scheme. With the grid
``t_0, t_1, ...`` (``t_0`` noisiest), states ``x_{k-1}``, ``x_k`` and ONE evaluation
``E = ode.evaluate(t_k, x_k)`` shared by both integrations:

    x_{k+1} = gamma_k * (x_{k-1} - Phi(x_k; t_k -> t_{k-1})) + Phi(x_k; t_k -> t_{k+1})

and, since the update is linear in ``x_{k-1}``, exactly:

    x_{k-1} = (x_{k+1} - Phi(x_k; t_k -> t_{k+1})) / gamma_k + Phi(x_k; t_k -> t_{k-1})

gamma = 0 is the base solver; gamma = 1 with Euler or DDIM is the leapfrog scheme.

Rounding: near the data end of a diffusion ODE the two-step recursion's parasitic mode grows
by up to about 2 per step when it runs toward the data, so the rounding of a round trip data
-> noise -> data is magnified many orders of magnitude over 35 Karras steps (single-word
states lose up to 2.4e-6 of a float64 state on the digits model). The
solver's ``step`` and ``unstep`` therefore carry each state as an unevaluated sum
``x + x_low`` of two words of the state dtype and do the update in double-word arithmetic
(``bdia.twoword``). The model
only ever sees ``x``, so forward and backward passes evaluate it on bitwise identical inputs
and the round trip is exact to about twice the state's precision. This is
the official code's convention (early versions of the paper's README swapped gamma and
1 - gamma). The first step has no ``x_{k-1}`` and is a plain base step.

The named schedule ``"obelm"`` sets, with ``h_k = sigma_bar(t_k) - sigma_bar(t_{k+1})``,
``gamma_k = (h_k / h_{k-1})^2 * alpha(t_{k+1}) / alpha(t_{k-1})``, which makes BDIA over
DDIM coincide with O-BELM (Wang et al., NeurIPS 2024). On a plain ODE, sigma_bar is t and
alpha is 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import twoword
from ..ode import ODE, Evaluation, wide_dtype
from ..pairs import StatePair
from ..twoword import TwoWord
from .base import (
    Neighbour,
    SingleStepSolver,
    Solver,
    SolverState,
    check_divisor,
    is_flag,
    ordered_pair,
)

__all__ = ["BidirectionalWrapper", "GammaSpec"]

GammaSpec = float | Sequence[float] | str
NAMED_GAMMAS = ("obelm",)


def _check_user_gamma(value: Any, where: str) -> float:
    if is_flag(value):
        # float(True) is 1.0: a flag passed by mistake would become the leapfrog scheme.
        raise TypeError(f"gamma{where} must be a number in [0, 1], got the bool {value!r}")
    if isinstance(value, (str, bytes)):
        # float("0.9") would pass, while a lone string is read as a schedule's name.
        raise TypeError(f"gamma{where} must be a number, got the string {value!r}")
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"gamma{where} must be a number, got {value!r}") from None
    if not 0.0 <= g <= 1.0:
        raise ValueError(
            f"gamma{where} = {g} lies outside [0, 1]; 0 is the base solver and 1 the "
            "leapfrog scheme (only a named schedule such as 'obelm' may exceed 1)"
        )
    return g + 0.0  # -0.0 is 0.0: one solver, one identity


@dataclass(frozen=True)
class _Memory:
    """What BDIA carries besides x: x's low word, the neighbouring grid state, the gammas."""

    gammas: tuple[float, ...]
    low: Tensor | None = None
    neighbour: Neighbour | None = None


def _relative_rms(part: Tensor, state: Tensor) -> Tensor:
    """rms(part) / rms(state) as a 0-dim float32 tensor (0 for a zero state), computed in
    float64 (float32 on a device without it)."""
    # part and state have one shape, so the ratio of their 2-norms is that of their rms
    wide = wide_dtype(state.device)
    num = torch.linalg.vector_norm(part, dtype=wide)
    den = torch.linalg.vector_norm(state, dtype=wide)
    return torch.where(den > 0, num / den, 0.0).float()


def forward_update(
    x_prev: Tensor, x_prev_low: Tensor | None, backward: Tensor, forward: Tensor, gamma: float
) -> tuple[Tensor, Tensor | None]:
    """``gamma (x_prev + x_prev_low - backward) + forward`` as two words (high, low)."""
    out = twoword.scaled_difference_plus(TwoWord(x_prev, x_prev_low), backward, gamma, forward)
    return out.high, out.low


def inverse_update(
    x_next: Tensor, x_next_low: Tensor | None, forward: Tensor, backward: Tensor, gamma: float
) -> tuple[Tensor, Tensor | None]:
    """``(x_next + x_next_low - forward) / gamma + backward`` as two words (high, low): the
    inverse of ``forward_update`` to a few u^2 of the state."""
    out = twoword.difference_over_plus(TwoWord(x_next, x_next_low), forward, gamma, backward)
    return out.high, out.low


@dataclass(frozen=True, repr=False)
class BidirectionalWrapper(Solver):
    """BDIA around a base single-step solver; build it with ``bdia(solver, gamma)``.

    A reversible solver: ``unstep`` is the exact inverse of ``step`` (up to rounding of the
    two-word states). Its ``SolverState.memory`` holds x's low word, the neighbouring grid
    state with its low word, and the gammas of the grid.

    Attributes:
        solver: the base single-step solver Phi.
        gamma: a number in [0, 1], a tuple of one value per two-step update (``len(ts) - 2``
            values for a grid ``ts``), or a named schedule (``"obelm"``).
    """

    solver: SingleStepSolver
    gamma: float | tuple[float, ...] | str = 1.0

    reversible = True
    mixing_parameter: ClassVar[str] = "gamma"

    @property
    def base(self) -> SingleStepSolver:
        return self.solver

    def __post_init__(self) -> None:
        if isinstance(self.solver, Solver) and not isinstance(self.solver, SingleStepSolver):
            raise TypeError(
                f"bdia() wraps a single-step solver, not {type(self.solver).__name__} "
                f"{self.solver.name!r}"
            )
        if not isinstance(self.solver, SingleStepSolver):
            raise TypeError(f"bdia() needs a Solver, got {type(self.solver).__name__}")
        g = self.gamma
        if isinstance(g, str):
            if g not in NAMED_GAMMAS:
                raise ValueError(f"unknown gamma schedule {g!r}; named schedules: {NAMED_GAMMAS}")
        # float is a Number too; naming it tells the type checker what the branches leave.
        elif isinstance(g, (float, numbers.Number)) or getattr(g, "ndim", None) == 0:
            object.__setattr__(self, "gamma", _check_user_gamma(g, ""))
        elif isinstance(g, (Set, Mapping)):
            raise TypeError(
                f"gamma must be a number, a sequence of numbers (one per two-step update, in "
                f"grid order) or a name, got a {type(g).__name__}, which has no order"
            )
        else:
            try:
                items = list(g)
            except TypeError:
                raise TypeError(
                    f"gamma must be a number, a sequence of numbers or a name, got {g!r}"
                ) from None
            values = tuple(_check_user_gamma(v, f"[{i}]") for i, v in enumerate(items))
            if not values:
                raise ValueError("a gamma sequence needs at least one value")
            object.__setattr__(self, "gamma", values)

    # ------------------------------------------------------------------ data
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"bdia-{self.solver.name}"

    @property
    def identity(self) -> str:
        """``"bdia(<base identity>, gamma=<gamma>)"``, gamma as kept: a float, a tuple of
        floats or a schedule's name (``bdia(heun, gamma=0.96)``, ``bdia(ddim,
        gamma='obelm')``). A tuple of one value repeated is named by that value: it steps
        as that value does on every grid it fits."""
        gamma = self.gamma
        if isinstance(gamma, tuple) and len(set(gamma)) == 1:
            gamma = gamma[0]
        return f"bdia({self.solver.identity}, gamma={gamma!r})"

    @property
    def needs_diffusion(self) -> bool:  # type: ignore[override]
        return self.solver.needs_diffusion

    @property
    def stages(self) -> int:  # type: ignore[override]
        """Model evaluations of the first (plain) step."""
        return self.solver.stages

    def _every_gamma_is(self, value: float) -> bool:
        """True if gamma is ``value``, or a sequence of nothing else."""
        g = self.gamma
        return g == value or (isinstance(g, tuple) and all(v == value for v in g))

    @property
    def nfe_per_step(self) -> int:
        """Model evaluations of each two-step update: 2 s - 1 for a base with s stages, and s
        when every gamma is 0 (each update is then a plain base step; in a sequence that
        mixes zeros with other values, the updates with gamma_k = 0 cost s)."""
        if self._every_gamma_is(0.0):
            return self.solver.stages
        return 2 * self.solver.stages - 1

    @property
    def order(self) -> int:  # type: ignore[override]
        """Global order on smooth grids.

        The update's local error is ``C h^(p+1) (1 - gamma (-1)^(p+1))`` for a base of order
        p, so gamma = 1 (a number, or a sequence of ones), and "obelm", its variable-step
        form, cancel it for odd p.
        """
        p = self.solver.order
        symmetric = self._every_gamma_is(1.0) or self.gamma == "obelm"
        return p + 1 if symmetric and p % 2 == 1 else p

    # ---------------------------------------------------------------- gammas
    def gammas(self, ode: ODE, ts: Sequence[float]) -> list[float]:
        """gamma_k for the two-step updates k = 1 .. len(ts) - 2 of grid ``ts``."""
        ts = [float(t) for t in ts]
        n = max(len(ts) - 2, 0)
        g = self.gamma
        if isinstance(g, float):
            return [g] * n
        if isinstance(g, tuple):
            if len(g) != n:
                raise ValueError(
                    f"gamma has {len(g)} values but a grid of {len(ts)} points has {n} two-step "
                    "updates (the first step is a plain base step); give one value per update"
                )
            return list(g)
        if ode.is_diffusion:
            sched = ode.schedule  # type: ignore[attr-defined]
            sigma_bar, alpha = sched.sigma_bar, sched.alpha
        else:
            sigma_bar, alpha = float, lambda t: 1.0
        if ode.is_diffusion and len(ts) > 2 and alpha(ts[0]) == 0.0:
            # sigma_bar is infinite there, and the O-BELM gamma of the first update tends to 0,
            # the base solver, which no inversion can undo.
            raise ValueError(
                f"gamma='obelm' needs a finite noise level at every grid point, but ts[0] = "
                f"{ts[0]} is pure noise (alpha = 0, sigma_bar = inf); start the grid below it "
                "or give gamma as a number"
            )
        out = []
        for k in range(1, len(ts) - 1):
            h_prev = sigma_bar(ts[k - 1]) - sigma_bar(ts[k])
            h = sigma_bar(ts[k]) - sigma_bar(ts[k + 1])
            out.append((h / h_prev) ** 2 * alpha(ts[k + 1]) / alpha(ts[k - 1]))
        return out

    def amplification(self, ode: ODE, ts: Sequence[float]) -> float:
        """prod_k 1 / gamma_k over grid ``ts``: the factor by which inversion magnifies a
        perturbation of the parasitic mode through the gammas alone (the problem's own
        growth of that mode comes on top); ``inf`` when a gamma is 0 (not invertible)."""
        out = 1.0
        for g in self.gammas(ode, ts):
            if g == 0.0:
                return math.inf
            out /= g
        return out

    # -------------------------------------------------------------- protocol
    def check(self, ode: ODE, ts: Sequence[float]) -> None:
        super().check(ode, ts)
        self.gammas(ode, ts)  # a gamma sequence of the wrong length fails here

    def check_invertible(
        self, ode: ODE, ts: Sequence[float], dtype: torch.dtype | None = None
    ) -> None:
        gammas = self.gammas(ode, ts)
        if any(g == 0.0 for g in gammas):
            raise ValueError(
                "gamma = 0 is the base solver, whose steps cannot be undone exactly; "
                "inversion and adjoint='reversible' need every gamma in (0, 1] "
                "(adjoint='autograd' differentiates any gamma)"
            )
        if isinstance(self.gamma, float):  # one value: name it as the user gave it
            named = [("gamma", g) for g in gammas[:1]]
        else:
            named = [(f"gamma_{k}", g) for k, g in enumerate(gammas, start=1)]
        for name, g in named:
            check_divisor(name, g, dtype)

    def init(self, ode: ODE, ts: Sequence[float], start: Any, *, at: int) -> SolverState:
        if not isinstance(start, (Tensor, StatePair)):
            raise TypeError(
                f"{self.name} continues from a tensor or the StatePair that bdia solvers return, "
                f"got a {type(start).__name__} (made by another kind of reversible solver)"
            )
        if at != 0:
            dtype = start.dtype if isinstance(start, Tensor) else start.earlier.dtype
            self.check_invertible(ode, ts, dtype)
        gammas = tuple(self.gammas(ode, ts))
        if isinstance(start, Tensor):
            return SolverState(at, start, memory=_Memory(gammas))
        if at == 0:
            neighbour = Neighbour(0, start.earlier, start.earlier_low)
            return SolverState(1, start.later, memory=_Memory(gammas, start.later_low, neighbour))
        neighbour = Neighbour(at, start.later, start.later_low)
        return SolverState(
            at - 1, start.earlier, memory=_Memory(gammas, start.earlier_low, neighbour)
        )

    def _integrations(
        self, ode: ODE, ts: Sequence[float], k: int, x: Tensor, towards: tuple[int, ...]
    ) -> tuple[Evaluation, list[Tensor]]:
        """One evaluation at ``(ts[k], x)`` and the base flow from it to each ``ts[j]``."""
        first = ode.evaluate(ts[k], x)
        return first, [self.solver.flow(ode, ts[k], ts[j], x, first=first) for j in towards]

    def step(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        k, x, memory = state.k, state.x, state.memory
        here = Neighbour(k, x, memory.low)
        previous = memory.neighbour
        gamma = memory.gammas[k - 1] if k > 0 else 0.0
        if previous is None or previous.k != k - 1 or gamma == 0.0:
            # The first step (or gamma = 0) is a plain base step.
            first, (x_next,) = self._integrations(ode, ts, k, x, (k + 1,))
            return SolverState(k + 1, x_next, first, _Memory(memory.gammas, None, here))
        first, (forward, backward) = self._integrations(ode, ts, k, x, (k + 1, k - 1))
        x_next, low = forward_update(previous.x, previous.low, backward, forward, gamma)
        parasitic = _relative_rms(previous.x - backward, x)
        return SolverState(k + 1, x_next, first, _Memory(memory.gammas, low, here), parasitic)

    def unstep(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        k, x, memory = state.k, state.x, state.memory
        here = Neighbour(k, x, memory.low)
        following = memory.neighbour
        if following is None or following.k != k + 1:
            # From a single state: one base step back makes the pair (approximate).
            first, (x_prev,) = self._integrations(ode, ts, k, x, (k - 1,))
            return SolverState(k - 1, x_prev, first, _Memory(memory.gammas, None, here))
        first, (forward, backward) = self._integrations(ode, ts, k, x, (k + 1, k - 1))
        gamma = memory.gammas[k - 1]
        x_prev, low = inverse_update(following.x, following.low, forward, backward, gamma)
        parasitic = _relative_rms(x_prev - backward, x)
        return SolverState(k - 1, x_prev, first, _Memory(memory.gammas, low, here), parasitic)

    def rewind(self, ode: ODE, ts: Sequence[float], state: SolverState) -> SolverState:
        """The state ``step`` moved from, rebuilt with ``unstep``: the two grid states are
        turned to travel backward, ``unstep`` makes the one before them, and the result is
        turned forward again. Rewinding the first step (k = 1, a plain base step from a
        single state) needs no model call: its state is the neighbour held in memory."""
        k, memory = state.k, state.memory
        previous = memory.neighbour
        if previous is None or previous.k != k - 1:
            raise ValueError(f"the state at grid index {k} holds no earlier state to rewind to")
        if k == 1:
            return SolverState(0, previous.x, memory=_Memory(memory.gammas, previous.low))
        if memory.gammas[k - 2] == 0.0:
            raise ValueError(
                f"gamma_{k - 1} = 0 makes step {k - 1} a plain base step, which cannot be "
                "undone exactly; rewinding (adjoint='reversible') needs every gamma in (0, 1]"
            )
        turned = SolverState(
            k - 1,
            previous.x,
            memory=_Memory(memory.gammas, previous.low, Neighbour(k, state.x, memory.low)),
        )
        before = self.unstep(ode, ts, turned)
        neighbour = Neighbour(k - 2, before.x, before.memory.low)
        return SolverState(
            k - 1, previous.x, memory=_Memory(memory.gammas, previous.low, neighbour)
        )

    def pair(self, state: SolverState, fingerprint: str | None = None) -> StatePair:
        return ordered_pair(state.k, state.x, state.memory.low, state.memory.neighbour, fingerprint)

    def __repr__(self) -> str:
        return f"bdia({self.solver!r}, gamma={self.gamma!r})"
