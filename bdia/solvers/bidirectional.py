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
-> noise -> data is magnified about 1e7 over 35 Karras steps (1e-7 in a float64 state). The
``*_compensated`` methods, which ``sample`` and ``invert`` use, therefore carry each state as
an unevaluated sum ``x + x_low`` of two words of the state dtype and do the update's one
multiplication and two additions with error-free transformations (TwoSum, TwoProd). The model
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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ode import ODE, Evaluation
from .base import Solver, get_solver

__all__ = ["BidirectionalWrapper", "bdia", "GammaSpec"]

# ------------------------------------------------------------- error-free transformations
# Each returns (s, e) with s + e equal to the exact result and s the rounded one. They rely on
# every torch op rounding once (no fused multiply-add), which holds for separate elementwise
# kernels.

_SPLITTER = 134217729.0  # 2^27 + 1: Veltkamp's split of a float64 into two 26-bit halves


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Knuth's TwoSum: ``a + b = s + e`` exactly, for any magnitudes."""
    s = a + b
    b_virtual = s - a
    e = (a - (s - b_virtual)) + (b - b_virtual)
    return s, e


def _fast_two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Dekker's FastTwoSum, for ``|a| >= |b|`` elementwise (renormalises a double word)."""
    s = a + b
    return s, b - (s - a)


def _split(a: Tensor | float) -> tuple[Tensor | float, Tensor | float]:
    c = _SPLITTER * a
    high = c - (c - a)
    return high, a - high


def _two_prod(a: Tensor, b: float) -> tuple[Tensor, Tensor]:
    """``a * b = p + e`` exactly, for a tensor ``a`` and a scalar ``b`` of ``a``'s precision."""
    if a.dtype == torch.float32:
        # A product of two 24-bit significands fits a float64 exactly.
        exact = a.double() * b
        p = exact.float()
        return p, (exact - p.double()).float()
    if a.dtype != torch.float64:
        raise TypeError(f"compensated BDIA needs a float32 or float64 state, got {a.dtype}")
    p = a * b
    a_high, a_low = _split(a)
    b_high, b_low = _split(b)
    e = ((a_high * b_high - p) + a_high * b_low + a_low * b_high) + a_low * b_low
    return p, e


def _as_state_scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as the float the update multiplies by in both directions."""
    return float(torch.tensor(value, dtype=dtype))


GammaSpec = float | Sequence[float] | str
NAMED_GAMMAS = ("obelm",)


def _check_user_gamma(value: float, where: str) -> float:
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"gamma{where} must be a number, got {value!r}") from None
    if not 0.0 <= g <= 1.0:
        raise ValueError(
            f"gamma{where} = {g} lies outside [0, 1]; 0 is the base solver and 1 the "
            "leapfrog scheme (only a named schedule such as 'obelm' may exceed 1)"
        )
    return g


@dataclass(frozen=True)
class BidirectionalWrapper:
    """BDIA around a base solver; build it with ``bdia(solver, gamma)``.

    Attributes:
        solver: the base single-step solver Phi.
        gamma: a number in [0, 1], a tuple of one value per two-step update (``len(ts) - 2``
            values for a grid ``ts``), or a named schedule (``"obelm"``).
    """

    solver: Solver
    gamma: float | tuple[float, ...] | str = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.solver, BidirectionalWrapper):
            raise TypeError("bdia() wraps a single-step solver, not another BidirectionalWrapper")
        if not isinstance(self.solver, Solver):
            raise TypeError(f"bdia() needs a Solver, got {type(self.solver).__name__}")
        g = self.gamma
        if isinstance(g, str):
            if g not in NAMED_GAMMAS:
                raise ValueError(f"unknown gamma schedule {g!r}; named schedules: {NAMED_GAMMAS}")
        elif isinstance(g, (int, float)) or getattr(g, "ndim", None) == 0:
            object.__setattr__(self, "gamma", _check_user_gamma(g, ""))
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
    def name(self) -> str:
        return f"bdia-{self.solver.name}"

    @property
    def needs_diffusion(self) -> bool:
        return self.solver.needs_diffusion

    @property
    def stages(self) -> int:
        """Model evaluations of the first (plain) step."""
        return self.solver.stages

    @property
    def nfe_per_step(self) -> int:
        """Model evaluations of each two-step update: 2 s - 1 for a base with s stages."""
        return 2 * self.solver.stages - 1 if self.gamma != 0.0 else self.solver.stages

    @property
    def order(self) -> int:
        """Global order on smooth grids.

        The update's local error is ``C h^(p+1) (1 - gamma (-1)^(p+1))`` for a base of order
        p, so gamma = 1 (and "obelm", its variable-step form) cancels it for odd p.
        """
        p = self.solver.order
        symmetric = self.gamma == 1.0 or self.gamma == "obelm"
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
        out = []
        for k in range(1, len(ts) - 1):
            h_prev = sigma_bar(ts[k - 1]) - sigma_bar(ts[k])
            h = sigma_bar(ts[k]) - sigma_bar(ts[k + 1])
            out.append((h / h_prev) ** 2 * alpha(ts[k + 1]) / alpha(ts[k - 1]))
        return out

    def amplification(self, ode: ODE, ts: Sequence[float]) -> float:
        """prod_k 1 / gamma_k over grid ``ts``: how much inversion magnifies the parasitic mode.

        Rounding errors of the state grow by up to this factor on the way back; ``inf`` when a
        gamma is 0 (not invertible).
        """
        out = 1.0
        for g in self.gammas(ode, ts):
            if g == 0.0:
                return math.inf
            out /= g
        return out

    # ----------------------------------------------------------------- steps
    def _integrations(
        self,
        ode: ODE,
        t_prev: float | None,
        t: float,
        t_next: float,
        x: Tensor,
        first: Evaluation | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(Phi(x; t -> t_next), Phi(x; t -> t_prev))`` from one shared first evaluation;
        the backward one is None when ``t_prev`` is."""
        first = self.solver.first_evaluation(ode, t, x, first)
        forward = self.solver.step(ode, t, t_next, x, first=first)
        if t_prev is None:
            return forward, None
        return forward, self.solver.step(ode, t, t_prev, x, first=first)

    def step(
        self,
        ode: ODE,
        t_prev: float | None,
        t: float,
        t_next: float,
        x_prev: Tensor | None,
        x: Tensor,
        gamma: float,
        first: Evaluation | None = None,
    ) -> Tensor:
        """One BDIA update ``(x_{k-1}, x_k) -> x_{k+1}``; a plain base step when ``x_prev`` is None.

        Args:
            ode: the problem.
            t_prev: grid time t_{k-1} (None on the first step).
            t: grid time t_k.
            t_next: grid time t_{k+1}.
            x_prev: state at t_{k-1}, shape ``(batch, ...)``, or None on the first step.
            x: state at t_k, same shape.
            gamma: gamma_k.
            first: an evaluation at ``(t, x)`` to reuse.

        Returns:
            x_{k+1}, same shape and dtype as ``x``.
        """
        plain = x_prev is None or gamma == 0.0
        forward, backward = self._integrations(ode, None if plain else t_prev, t, t_next, x, first)
        if plain:
            return forward
        return gamma * (x_prev - backward) + forward

    def unstep(
        self,
        ode: ODE,
        t_prev: float,
        t: float,
        t_next: float,
        x: Tensor,
        x_next: Tensor,
        gamma: float,
        first: Evaluation | None = None,
    ) -> Tensor:
        """The exact inverse of ``step``: ``(x_k, x_{k+1}) -> x_{k-1}``.

        Raises:
            ValueError: if gamma is 0 (the base solver cannot be inverted exactly).
        """
        if gamma == 0.0:
            raise ValueError("gamma = 0 is the base solver, whose step cannot be inverted exactly")
        forward, backward = self._integrations(ode, t_prev, t, t_next, x, first)
        return (x_next - forward) / gamma + backward

    def step_compensated(
        self,
        ode: ODE,
        t_prev: float | None,
        t: float,
        t_next: float,
        x_prev: Tensor | None,
        x_prev_low: Tensor | None,
        x: Tensor,
        gamma: float,
        first: Evaluation | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``step`` on double-word states: ``(x_{k-1} + low, x_k) -> (x_{k+1}, its low word)``.

        The same update as ``step``, with ``gamma * (x_prev + x_prev_low - backward) +
        forward`` formed without rounding error beyond the final word (the model sees only
        ``x``). ``x_prev_low`` may be None (zero); the returned low word is None after a plain
        base step. Shapes and dtypes as in ``step`` (float32 or float64).
        """
        plain = x_prev is None or gamma == 0.0
        forward, backward = self._integrations(ode, None if plain else t_prev, t, t_next, x, first)
        if plain:
            return forward, None
        g = _as_state_scalar(gamma, x.dtype)
        diff, diff_err = _two_sum(x_prev, -backward)
        if x_prev_low is not None:
            diff_err = diff_err + x_prev_low
        prod, prod_err = _two_prod(diff, g)
        total, total_err = _two_sum(prod, forward)
        return _fast_two_sum(total, total_err + prod_err + g * diff_err)

    def unstep_compensated(
        self,
        ode: ODE,
        t_prev: float,
        t: float,
        t_next: float,
        x: Tensor,
        x_next: Tensor,
        x_next_low: Tensor | None,
        gamma: float,
        first: Evaluation | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The exact inverse of ``step_compensated``: ``(x_k, x_{k+1} + low) -> (x_{k-1}, low)``.

        ``(x_next + x_next_low - forward) / gamma + backward`` with the division's remainder
        recovered exactly, so that the returned pair is the preimage to about twice the state
        dtype's precision.
        """
        if gamma == 0.0:
            raise ValueError("gamma = 0 is the base solver, whose step cannot be inverted exactly")
        forward, backward = self._integrations(ode, t_prev, t, t_next, x, first)
        g = _as_state_scalar(gamma, x.dtype)
        diff, diff_err = _two_sum(x_next, -forward)
        if x_next_low is not None:
            diff_err = diff_err + x_next_low
        quotient = diff / g
        prod, prod_err = _two_prod(quotient, g)
        # diff - prod is exact (Sterbenz: prod lies within a few ulps of diff).
        remainder = (diff - prod) - prod_err + diff_err
        total, total_err = _two_sum(quotient, backward)
        return _fast_two_sum(total, total_err + remainder / g)

    def __repr__(self) -> str:
        return f"bdia({self.solver!r}, gamma={self.gamma!r})"


def bdia(solver: Solver | str, gamma: GammaSpec = 1.0) -> BidirectionalWrapper:
    """Wrap ``solver`` (an instance or a registered name) as a time-reversible BDIA scheme.

    ``gamma = 1`` (the default; with Euler or DDIM the leapfrog scheme) keeps inversion free
    of amplification but is only weakly stable: the parasitic mode, which flips sign every
    step, is not damped, and on a dissipative problem (``y' = -5 y``, or a diffusion ODE as
    the noise level falls) it grows by about ``1 + mu`` per step where the exact flow
    contracts by ``e^-mu``. A gamma below 1 damps it only where ``gamma (1 + mu) < 1``, that
    is for steps small against the problem's rates: on ``y' = -5 y`` with ``h = 0.05``
    (``mu = 0.25``) gamma = 0.96 still grows, and only a single-step solver or a small gamma
    is stable. See the theory page, "Stability: the parasitic mode".

    Args:
        solver: the base single-step solver.
        gamma: a number in [0, 1], one value per two-step update, or ``"obelm"``.

    Returns:
        A BidirectionalWrapper, usable wherever ``sample``, ``invert`` or ``odeint`` take a solver.
    """
    if isinstance(solver, str):
        solver = get_solver(solver)
    return BidirectionalWrapper(solver, gamma)
