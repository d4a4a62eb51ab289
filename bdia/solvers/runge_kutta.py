"""Explicit Runge-Kutta solvers, one implementation driven by a Butcher tableau.

For a tableau (c, a, b) and step size ``h = t_next - t``:

    k_i = f(t + c_i h, x + h sum_{j<i} a_ij k_j)        x_next = x + h sum_i b_i k_i

A stage that would evaluate a diffusion model at sigma = 0 (``t_next`` at the end of a
grid with a final zero) cannot be taken; the step then falls back to Euler, as EDM does.
A flow network (``DiffusionODE.from_flow``) can be evaluated there, so its last step is
taken in full.
Registering a new method takes one tableau (``bdia.register_tableau``):

    register_tableau("ralston", ButcherTableau(c=(0, 2/3), a=((), (2/3,)), b=(1/4, 3/4), order=2))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from ..ode import ODE, Evaluation
from .base import SingleStepSolver

__all__ = [
    "ButcherTableau",
    "ExplicitRungeKutta",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "RK4",
]


@dataclass(frozen=True)
class ButcherTableau:
    """Coefficients of an explicit Runge-Kutta method.

    Attributes:
        c: stage times as fractions of the step, ``c[0] == 0``.
        a: strictly lower-triangular rows; ``a[i]`` has ``i`` entries.
        b: weights, summing to 1.
        order: the method's order of accuracy.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int

    def __post_init__(self) -> None:
        # Own tuples of floats, whatever sequences were given: a list the caller changes later
        # would change a checked (and registered) method, and could not be hashed.
        object.__setattr__(self, "c", _numbers("c", self.c))
        object.__setattr__(self, "b", _numbers("b", self.b))
        rows = _sequence("a", self.a)
        object.__setattr__(self, "a", tuple(_numbers(f"a[{i}]", r) for i, r in enumerate(rows)))
        s = len(self.c)
        if s == 0 or self.c[0] != 0:
            raise ValueError("an explicit tableau needs c[0] == 0")
        if len(self.b) != s or len(self.a) != s:
            raise ValueError(f"c, a and b must all have {s} entries")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(
                    f"row a[{i}] must have {i} entries (explicit method), got {len(row)}"
                )
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"row a[{i}] must sum to c[{i}] = {self.c[i]}")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError("the weights b must sum to 1")
        order = self.order
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        object.__setattr__(self, "order", int(order))

    @property
    def stages(self) -> int:
        return len(self.c)


def _sequence(name: str, values: object) -> list[object]:
    """``values`` as a list, or a TypeError naming the field."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(
            f"tableau field {name} must be a sequence of numbers, got {type(values).__name__}"
        )
    return list(values)


def _numbers(name: str, values: object) -> tuple[float, ...]:
    """``values`` as a tuple of floats, each checked to be a finite real number (a NaN would
    pass the sum checks of the tableau), -0.0 kept as 0.0: it steps alike, and an equal
    tableau names one solver (``ExplicitRungeKutta.identity``)."""
    out = []
    for j, v in enumerate(_sequence(name, values)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"tableau entry {name}[{j}] = {v!r} is not a finite number")
        out.append(float(v) + 0.0)
    return tuple(out)


def _combine(x: Tensor, h: float, coefficients: tuple[float, ...], slopes: list[Tensor]) -> Tensor:
    """x + h * sum(coefficients[j] * slopes[j]), skipping zero coefficients, in a fixed order."""
    out = x
    for coef, k in zip(coefficients, slopes):
        if coef != 0.0:
            out = out + (h * coef) * k
    return out


@dataclass(frozen=True, repr=False)
class ExplicitRungeKutta(SingleStepSolver):
    """An explicit Runge-Kutta solver given by ``tableau``; works on any ODE."""

    tableau: ButcherTableau
    name: str = "runge_kutta"

    needs_diffusion = False

    def __post_init__(self) -> None:
        if not isinstance(self.tableau, ButcherTableau):
            raise TypeError(
                f"ExplicitRungeKutta needs a ButcherTableau, got {type(self.tableau).__name__}"
            )

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.tableau.order

    @property
    def identity(self) -> str:
        """The name alone for the shipped methods under their own names (``"heun"``); with
        the tableau for any other (a name says nothing of a tableau the user built)."""
        if _SHIPPED.get(self.name) == self.tableau:
            return self.name
        tab = self.tableau
        return f"{self.name}(c={tab.c!r}, a={tab.a!r}, b={tab.b!r}, order={tab.order})"

    @property
    def stages(self) -> int:  # type: ignore[override]
        return self.tableau.stages

    def flow(
        self, ode: ODE, t: float, t_next: float, x: Tensor, first: Evaluation | None = None
    ) -> Tensor:
        tab = self.tableau
        h = float(t_next) - float(t)
        slopes = [self.first_evaluation(ode, t, x, first).derivative]
        # c == 1 lands exactly on t_next, so a final sigma = 0 is recognised without rounding.
        stage_times = [t_next if c == 1 else t + c * h for c in tab.c]
        if any(ode.is_terminal(s) for s in stage_times[1:]):
            return x + h * slopes[0]
        for i in range(1, tab.stages):
            x_stage = _combine(x, h, tab.a[i], slopes)
            slopes.append(ode.evaluate(stage_times[i], x_stage).derivative)
        return _combine(x, h, tab.b, slopes)


EULER = ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=1)
# EDM's deterministic sampler: Euler predictor, trapezoidal corrector.
HEUN = ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2)
MIDPOINT = ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2)
RK4 = ButcherTableau(
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    order=4,
)
_SHIPPED = {"euler": EULER, "heun": HEUN, "midpoint": MIDPOINT, "rk4": RK4}
