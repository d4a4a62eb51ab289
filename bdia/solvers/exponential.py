"""Exponential integrators for the diffusion ODE: DDIM and the singlestep DPM-Solver family.

They integrate the linear part of the probability-flow ODE exactly and work in the
half-log-SNR ``lambda = log(alpha / sigma)``. With ``h = lambda(t_next) - lambda(t)`` (negative
when stepping towards the noise) and a stage at ``s_i = t(lambda(t) + r_i h)``:

DDIM (first order, robust at sigma = 0):

    x_next = alpha_next D + sigma_next eps

DPM-Solver (noise prediction, Lu et al. 2022):

    order 1:  x_next = (alpha_next/alpha) x - sigma_next (e^h - 1) eps
    order 2:  u = (alpha_s/alpha) x - sigma_s (e^(r1 h) - 1) eps                     r1 = 1/2
              x_next = (alpha_next/alpha) x - sigma_next (e^h - 1) eps
                       - sigma_next / (2 r1) (e^h - 1) (eps(u, s) - eps)
    order 3:  u1 = (alpha_s1/alpha) x - sigma_s1 (e^(r1 h) - 1) eps                 r1 = 1/3
              u2 = (alpha_s2/alpha) x - sigma_s2 (e^(r2 h) - 1) eps                 r2 = 2/3
                   - sigma_s2 (r2/r1) ((e^(r2 h) - 1)/(r2 h) - 1) (eps(u1, s1) - eps)
              x_next = (alpha_next/alpha) x - sigma_next (e^h - 1) eps
                       - sigma_next / r2 ((e^h - 1)/h - 1) (eps(u2, s2) - eps)

DPM-Solver++ (data prediction, Lu et al. 2022b), singlestep:

    order 1:  x_next = (sigma_next/sigma) x - alpha_next (e^-h - 1) D
    2S:       u = (sigma_s/sigma) x - alpha_s (e^(-r1 h) - 1) D                      r1 = 1/2
              x_next = (sigma_next/sigma) x - alpha_next (e^-h - 1)
                       ((1 - 1/(2 r1)) D + 1/(2 r1) D(u, s))
    3S:       u1 = (sigma_s1/sigma) x - alpha_s1 (e^(-r1 h) - 1) D                   r1 = 1/3
              u2 = (sigma_s2/sigma) x - alpha_s2 (e^(-r2 h) - 1) D                   r2 = 2/3
                   + alpha_s2 (r2/r1) ((e^(-r2 h) - 1)/(r2 h) + 1) (D(u1, s1) - D)
              x_next = (sigma_next/sigma) x - alpha_next (e^-h - 1) D
                       + alpha_next / r2 ((e^-h - 1)/h + 1) (D(u2, s2) - D)

Here ``D`` is the data prediction (the denoiser output) and ``eps`` the noise prediction at
``(t, x)``. A step from or to sigma = 0 or alpha = 0 (h infinite) is taken as DDIM.

The stage fractions are free parameters, checked when the solver is built: ``r1`` (and
``r2``) lie in (0, 1], with ``r1 < r2``. A fraction of 0 puts the stage on the step's start
and divides by zero in the update; one above 1 puts it past the step's end, outside the
interval the step's schedule values (and the grid's domain check) cover. The order-3
updates use only the second stage, which makes them third order for ``r2 = 2/3`` (whatever
``r1``) and second order otherwise; their ``order`` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..ode import ODE, Evaluation
from .base import SingleStepSolver, is_flag

__all__ = [
    "DDIM",
    "DPMSolver1",
    "DPMSolver2",
    "DPMSolver3",
    "DPMSolverPP1",
    "DPMSolverPP2S",
    "DPMSolverPP3S",
]


@dataclass(frozen=True)
class _Coefficients:
    """Schedule values at the two ends of a step, as float64 scalars."""

    alpha: float
    sigma: float
    alpha_next: float
    sigma_next: float
    log_snr: float
    h: float


def _stage_fraction(solver: str, field: str, value: object) -> float:
    """``value`` as a float in (0, 1], or a TypeError/ValueError that says what it means."""
    if is_flag(value) or isinstance(value, str):
        raise TypeError(f"{solver}: {field} must be a number in (0, 1], got {value!r}")
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{solver}: {field} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < r <= 1.0:
        raise ValueError(
            f"{solver}: {field} = {r} lies outside (0, 1]; {field} is the fraction of the step "
            "(in log-SNR) at which an intermediate stage sits: 0 puts it on the step's start "
            "(a division by zero), above 1 past the step's end"
        )
    return r


def _phi(z: float) -> float:
    """``(e^z - 1) / z``, and its limit 1 at ``z = 0``: two grid times one rounding apart can
    share a log-SNR, and a step of ``h = 0`` is then a step of zero length, not a division by
    zero."""
    return math.expm1(z) / z if z != 0.0 else 1.0


# A DiffusionODE, which first_evaluation insists on, fills in both predictions of every
# evaluation; a plain ODE leaves them None.
def _denoised(e: Evaluation) -> Tensor:
    assert e.denoised is not None
    return e.denoised


def _eps(e: Evaluation) -> Tensor:
    assert e.eps is not None
    return e.eps


class _Exponential(SingleStepSolver):
    """Shared plumbing: schedule look-ups, the DDIM fallback at sigma = 0, stage evaluations."""

    needs_diffusion = True

    def __post_init__(self) -> None:
        # Runs for the dataclass subclasses; the stage fractions are their only fields.
        values = {}
        for f in ("r1", "r2"):
            if hasattr(self, f):
                values[f] = _stage_fraction(self.name, f, getattr(self, f))
                object.__setattr__(self, f, values[f])
        if len(values) == 2 and not values["r1"] < values["r2"]:
            raise ValueError(
                f"{self.name}: r1 = {values['r1']} must be smaller than r2 = {values['r2']}: "
                "the first intermediate stage comes before the second (defaults 1/3, 2/3)"
            )

    def __repr__(self) -> str:
        # The stage fractions are what sets two solvers of one class apart.
        fractions = "".join(f", {f}={getattr(self, f)!r}" for f in ("r1", "r2") if hasattr(self, f))
        return (
            f"{type(self).__name__}(name={self.name!r}, order={self.order}, "
            f"stages={self.stages}{fractions})"
        )

    @property
    def identity(self) -> str:
        """The name, with the stage fractions that differ from the defaults of the shipped
        solver of that name (``"dpm_solver_2(r1=0.3)"``), also in a subclass that changes
        a default."""
        # The shipped class: the first of this module's in the MRO. A dataclass keeps a
        # field's default as the class attribute.
        shipped = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        changed = [
            f"{f}={getattr(self, f)!r}"
            for f in ("r1", "r2")
            if hasattr(self, f) and getattr(self, f) != getattr(shipped, f, None)
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def flow(
        self, ode: ODE, t: float, t_next: float, x: Tensor, first: Evaluation | None = None
    ) -> Tensor:
        first = self.first_evaluation(ode, t, x, first)
        sched = ode.schedule  # type: ignore[attr-defined]
        t, t_next = float(t), float(t_next)
        if 0.0 in (sched.sigma(t), sched.sigma(t_next), sched.alpha(t), sched.alpha(t_next)):
            # sigma = 0 or alpha = 0 at an end makes the log-SNR step h infinite: no stage
            # lies inside it, and every first-order update tends to DDIM's. The schedule, not
            # is_terminal, says so: a flow network is evaluated at sigma = 0, but h is infinite.
            return sched.alpha(t_next) * _denoised(first) + sched.sigma(t_next) * _eps(first)
        lam, lam_next = sched.log_snr(t), sched.log_snr(t_next)
        co = _Coefficients(
            alpha=sched.alpha(t),
            sigma=sched.sigma(t),
            alpha_next=sched.alpha(t_next),
            sigma_next=sched.sigma(t_next),
            log_snr=lam,
            h=lam_next - lam,
        )
        return self._update(ode, co, x, first)

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _stage(ode: ODE, co: _Coefficients, r: float) -> tuple[float, float, float]:
        """Time, alpha and sigma of the stage at ``lambda + r h``."""
        sched = ode.schedule  # type: ignore[attr-defined]
        s = sched.t_from_log_snr(co.log_snr + r * co.h)
        return s, sched.alpha(s), sched.sigma(s)


@dataclass(frozen=True, repr=False)
class DDIM(_Exponential):
    """DDIM (Song et al. 2021), deterministic: ``x_next = alpha_next D + sigma_next eps``."""

    name = "ddim"
    order = 1
    stages = 1

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        return co.alpha_next * _denoised(first) + co.sigma_next * _eps(first)


@dataclass(frozen=True, repr=False)
class DPMSolver1(_Exponential):
    """DPM-Solver-1 in noise-prediction form (equal to DDIM)."""

    name = "dpm_solver_1"
    order = 1
    stages = 1

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        return (co.alpha_next / co.alpha) * x - (co.sigma_next * math.expm1(co.h)) * _eps(first)


@dataclass(frozen=True, repr=False)
class DPMSolver2(_Exponential):
    """Singlestep DPM-Solver-2, noise prediction, r1 = 1/2."""

    name = "dpm_solver_2"
    order = 2
    stages = 2
    r1: float = 0.5

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        r1, h, eps = self.r1, co.h, _eps(first)
        s, alpha_s, sigma_s = self._stage(ode, co, r1)
        u = (alpha_s / co.alpha) * x - (sigma_s * math.expm1(r1 * h)) * eps
        eps_u = _eps(ode.evaluate(s, u))
        phi = co.sigma_next * math.expm1(h)
        return (co.alpha_next / co.alpha) * x - phi * eps - (phi / (2.0 * r1)) * (eps_u - eps)


class _ThirdOrder(_Exponential):
    """The two three-stage updates, whose final correction comes from the second stage alone."""

    r2: float

    @property
    def order(self) -> int:  # type: ignore[override]
        """3 for ``r2 = 2/3`` (the default), 2 for any other ``r2``: the final update reads
        the second derivative off the second stage, which matches the third-order term of the
        exact update only there."""
        return 3 if self.r2 == 2.0 / 3.0 else 2


@dataclass(frozen=True, repr=False)
class DPMSolver3(_ThirdOrder):
    """Singlestep DPM-Solver-3, noise prediction, r1 = 1/3, r2 = 2/3."""

    name = "dpm_solver_3"
    stages = 3
    r1: float = 1.0 / 3.0
    r2: float = 2.0 / 3.0

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        r1, r2, h, eps = self.r1, self.r2, co.h, _eps(first)
        s1, alpha_s1, sigma_s1 = self._stage(ode, co, r1)
        s2, alpha_s2, sigma_s2 = self._stage(ode, co, r2)
        u1 = (alpha_s1 / co.alpha) * x - (sigma_s1 * math.expm1(r1 * h)) * eps
        d1 = _eps(ode.evaluate(s1, u1)) - eps
        u2 = (
            (alpha_s2 / co.alpha) * x
            - (sigma_s2 * math.expm1(r2 * h)) * eps
            - (sigma_s2 * r2 / r1 * (_phi(r2 * h) - 1.0)) * d1
        )
        d2 = _eps(ode.evaluate(s2, u2)) - eps
        return (
            (co.alpha_next / co.alpha) * x
            - (co.sigma_next * math.expm1(h)) * eps
            - (co.sigma_next / r2 * (_phi(h) - 1.0)) * d2
        )


@dataclass(frozen=True, repr=False)
class DPMSolverPP1(_Exponential):
    """DPM-Solver++ of order 1 in data-prediction form (equal to DDIM)."""

    name = "dpm_solver_pp_1"
    order = 1
    stages = 1

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        d = _denoised(first)
        return (co.sigma_next / co.sigma) * x - (co.alpha_next * math.expm1(-co.h)) * d


@dataclass(frozen=True, repr=False)
class DPMSolverPP2S(_Exponential):
    """Singlestep DPM-Solver++(2S), data prediction, r1 = 1/2."""

    name = "dpm_solver_pp_2s"
    order = 2
    stages = 2
    r1: float = 0.5

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        r1, h, d = self.r1, co.h, _denoised(first)
        s, alpha_s, sigma_s = self._stage(ode, co, r1)
        u = (sigma_s / co.sigma) * x - (alpha_s * math.expm1(-r1 * h)) * d
        d_u = _denoised(ode.evaluate(s, u))
        w = 1.0 / (2.0 * r1)
        blended = (1.0 - w) * d + w * d_u
        return (co.sigma_next / co.sigma) * x - (co.alpha_next * math.expm1(-h)) * blended


@dataclass(frozen=True, repr=False)
class DPMSolverPP3S(_ThirdOrder):
    """Singlestep DPM-Solver++(3S), data prediction, r1 = 1/3, r2 = 2/3."""

    name = "dpm_solver_pp_3s"
    stages = 3
    r1: float = 1.0 / 3.0
    r2: float = 2.0 / 3.0

    def _update(self, ode: ODE, co: _Coefficients, x: Tensor, first: Evaluation) -> Tensor:
        r1, r2, h, d = self.r1, self.r2, co.h, _denoised(first)
        s1, alpha_s1, sigma_s1 = self._stage(ode, co, r1)
        s2, alpha_s2, sigma_s2 = self._stage(ode, co, r2)
        u1 = (sigma_s1 / co.sigma) * x - (alpha_s1 * math.expm1(-r1 * h)) * d
        d1 = _denoised(ode.evaluate(s1, u1)) - d
        u2 = (
            (sigma_s2 / co.sigma) * x
            - (alpha_s2 * math.expm1(-r2 * h)) * d
            + (alpha_s2 * r2 / r1 * (1.0 - _phi(-r2 * h))) * d1
        )
        d2 = _denoised(ode.evaluate(s2, u2)) - d
        return (
            (co.sigma_next / co.sigma) * x
            - (co.alpha_next * math.expm1(-h)) * d
            + (co.alpha_next / r2 * (1.0 - _phi(-h))) * d2
        )
