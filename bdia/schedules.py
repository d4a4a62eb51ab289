"""Noise schedules and time grids.

A schedule gives ``alpha(t)`` and ``sigma(t)`` with ``x_t = alpha(t) x_0 + sigma(t) eps``
in the schedule's own time ``t``. Everything here works on Python floats (float64):
times are few and scalar, and keeping them off the tensors' device and dtype means a
coefficient never loses precision to a float32 state.

Derived quantities used throughout the library:

- ``sigma_bar(t) = sigma(t) / alpha(t)``, the noise level in EDM's scaled space;
- ``log_snr(t) = lambda(t) = log(alpha(t) / sigma(t)) = -log(sigma_bar(t))``.

``alpha(t) > 0`` except at a pure-noise end (``RectifiedFlow`` at ``t = 1``), where
``sigma_bar`` is ``inf`` and ``log_snr`` is ``-inf``.

Time grids run from the noisy end to the clean end (``ts[0]`` noisiest) and are
returned as 1-D float64 tensors. Their constructors take ``steps`` as any integer type
(``check_steps``: a bool or a whole float is a TypeError, a count below 1 a ValueError) and
the ends (times, noise levels) as real numbers or 0-dim tensors, which must be finite (and,
given as times, differ); anything else is refused before a grid is made.
"""

from __future__ import annotations

import math
import numbers
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "Schedule",
    "EDM",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "RectifiedFlow",
    "karras_grid",
    "uniform_logsnr_grid",
    "uniform_t_grid",
    "quadratic_t_grid",
    "shifted_t_grid",
]


# Relative slack of the noise-range checks: rounding of values derived from the domain's ends.
_RANGE_SLACK = 1e-9


def _softplus(z: float) -> float:
    """log(1 + e^z) without overflow."""
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


class Schedule(ABC):
    """A noise schedule ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t_min <= t <= t_max``.

    Subclasses give ``log_alpha``, ``sigma``, their time derivatives and the inverse
    map ``t_from_log_snr``; the rest follows.
    """

    #: Smallest and largest admissible time.
    t_min: float = 0.0
    t_max: float = math.inf

    @abstractmethod
    def log_alpha(self, t: float) -> float:
        """log alpha(t)."""

    @abstractmethod
    def sigma(self, t: float) -> float:
        """sigma(t) >= 0."""

    @abstractmethod
    def alpha_dot(self, t: float) -> float:
        """d alpha / dt."""

    @abstractmethod
    def sigma_dot(self, t: float) -> float:
        """d sigma / dt."""

    @abstractmethod
    def t_from_log_snr(self, log_snr: float) -> float:
        """The time where ``log(alpha / sigma)`` equals ``log_snr`` (``inf``: the clean end)."""

    def alpha(self, t: float) -> float:
        """alpha(t) >= 0; 0 only at a pure-noise end (``RectifiedFlow`` at t = 1)."""
        return math.exp(self.log_alpha(t))

    def sigma_bar(self, t: float) -> float:
        """sigma(t) / alpha(t), the noise level of the scaled state ``x / alpha``; ``inf``
        where alpha = 0."""
        alpha = self.alpha(t)
        return math.inf if alpha == 0.0 else self.sigma(t) / alpha

    def log_snr(self, t: float) -> float:
        """lambda(t) = log(alpha(t) / sigma(t)); ``inf`` where sigma(t) = 0."""
        s = self.sigma(t)
        return math.inf if s == 0.0 else self.log_alpha(t) - math.log(s)

    def sigma_bar_range(self) -> tuple[float, float]:
        """``(sigma_bar(t_min), sigma_bar(t_max))``: the noise levels the domain covers."""
        # + 0.0 turns the -0.0 that sqrt(-0.0) gives at a clean end into 0.0 for the messages.
        return self.sigma_bar(self.t_min) + 0.0, self.sigma_bar(self.t_max) + 0.0

    def check_log_snr(self, log_snr: float) -> None:
        """Raise ValueError if no time in ``[t_min, t_max]`` has this log-SNR.

        The message gives the value as ``sigma_bar = exp(-log_snr)`` and the schedule's
        sigma_bar range. A relative slack of 1e-9 admits the rounding of a value computed
        from the domain's own end points (a stage inside a step, a grid end).
        """
        if math.isnan(log_snr):
            raise ValueError(f"log-SNR is NaN; {self!r} needs a value in its noise range")
        sb_min, sb_max = self.sigma_bar_range()
        try:
            sigma_bar = math.exp(-log_snr)
        except OverflowError:
            sigma_bar = math.inf
        if sb_min * (1.0 - _RANGE_SLACK) <= sigma_bar <= sb_max * (1.0 + _RANGE_SLACK):
            return
        raise ValueError(
            f"sigma_bar = {sigma_bar:.6g} lies outside {self!r}'s noise range: sigma_bar "
            f"from {sb_min:.6g} (at t_min = {self.t_min:g}) to {sb_max:.6g} (at t_max = "
            f"{self.t_max:g}); the schedule has no time for it. Choose noise levels inside "
            "that range" + (" (this schedule never reaches sigma = 0)" if sb_min > 0 else "")
        )

    def t_from_sigma_bar(self, sigma_bar: float) -> float:
        """The time at which ``sigma / alpha`` equals ``sigma_bar`` (0 gives the clean end).

        Raises:
            ValueError: if ``sigma_bar`` is negative, NaN, or outside ``sigma_bar_range()``
                (the message names both).
        """
        if not sigma_bar >= 0:
            raise ValueError(f"sigma_bar must be >= 0, got {sigma_bar}")
        log_snr = math.inf if sigma_bar == 0 else -math.log(sigma_bar)
        self.check_log_snr(log_snr)
        return self.t_from_log_snr(log_snr)

    def check_times(self, ts: Sequence[float]) -> None:
        """Raise ValueError naming the first time outside ``[t_min, t_max]``."""
        for i, t in enumerate(ts):
            if not (self.t_min <= t <= self.t_max) or not math.isfinite(t):
                raise ValueError(
                    f"time ts[{i}] = {t!r} lies outside {type(self).__name__}'s domain "
                    f"[{self.t_min}, {self.t_max}]; build the grid inside it "
                    "(the grid constructors in bdia.schedules take the schedule)"
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EDM(Schedule):
    """The EDM / k-diffusion convention: alpha = 1, sigma = t, for t >= 0."""

    t_min = 0.0
    t_max = math.inf

    def log_alpha(self, t: float) -> float:
        return 0.0

    def sigma(self, t: float) -> float:
        return float(t)

    def alpha_dot(self, t: float) -> float:
        return 0.0

    def sigma_dot(self, t: float) -> float:
        return 1.0

    def t_from_log_snr(self, log_snr: float) -> float:
        return math.exp(-log_snr)


class _VariancePreserving(Schedule):
    """alpha^2 + sigma^2 = 1; subclasses give log alpha, its derivative and inverse."""

    @abstractmethod
    def log_alpha_dot(self, t: float) -> float:
        """d log alpha / dt."""

    @abstractmethod
    def t_from_log_alpha(self, log_alpha: float) -> float:
        """Inverse of ``log_alpha``."""

    def sigma(self, t: float) -> float:
        return math.sqrt(max(-math.expm1(2.0 * self.log_alpha(t)), 0.0))

    def alpha_dot(self, t: float) -> float:
        return self.alpha(t) * self.log_alpha_dot(t)

    def sigma_dot(self, t: float) -> float:
        # sigma sigma' = -alpha alpha' since alpha^2 + sigma^2 = 1.
        s = self.sigma(t)
        return math.inf if s == 0 else -self.alpha(t) * self.alpha_dot(t) / s

    def t_from_log_snr(self, log_snr: float) -> float:
        """The time with this log-SNR; a ValueError (naming the sigma_bar range) outside it."""
        # Refuse rather than extrapolate or clamp: VPDiscrete's interpolation would clamp to
        # an end and VPCosine's inverse would run past t_max.
        self.check_log_snr(log_snr)
        if log_snr == math.inf:
            # The clean end, which the check admits only where sigma(t_min) = 0; an inverse
            # would land within its rounding of t_min (VPCosine's acos near 1), not on it.
            return self.t_min
        # alpha^2 = 1 / (1 + e^(-2 lambda))
        t = self.t_from_log_alpha(-0.5 * _softplus(-2.0 * log_snr))
        # Within the check's slack the inverse may land a rounding step outside the domain;
        # + 0.0 turns a -0.0 at the clean end into 0.0.
        return min(max(t, self.t_min), self.t_max) + 0.0


class VPLinear(_VariancePreserving):
    """Variance-preserving, linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1].

    log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2 (Song et al. 2021).
    """

    t_min = 0.0
    t_max = 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if not math.isfinite(beta_max):
            raise ValueError(f"beta_max = {beta_max} is not finite; give a finite beta_max")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def log_alpha(self, t: float) -> float:
        return -0.25 * (self.beta_max - self.beta_min) * t * t - 0.5 * self.beta_min * t

    def log_alpha_dot(self, t: float) -> float:
        return -0.5 * (self.beta_max - self.beta_min) * t - 0.5 * self.beta_min

    def t_from_log_alpha(self, log_alpha: float) -> float:
        # Solve (d/2) t^2 + beta_min t - L = 0 with L = -2 log alpha, in the stable form.
        d, L = self.beta_max - self.beta_min, -2.0 * log_alpha
        if L == 0.0:
            # The clean end; with beta_min = 0 the stable form would read 0 / 0 there.
            return 0.0
        return 2.0 * L / (self.beta_min + math.sqrt(self.beta_min**2 + 2.0 * d * L))

    def __repr__(self) -> str:
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPCosine(_VariancePreserving):
    """Cosine schedule of Nichol & Dhariwal: alpha(t) = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)).

    ``t_max`` defaults to 0.9946, where DPM-Solver stops, because alpha -> 0 as t -> 1.
    """

    t_min = 0.0

    def __init__(self, s: float = 0.008, t_max: float = 0.9946) -> None:
        if not 0 < t_max < 1:
            raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
        if not 0 <= s < math.inf:
            raise ValueError(
                f"s = {s} must be a finite number >= 0: the offset that keeps alpha's slope "
                "finite at t = 0 (Nichol & Dhariwal use 0.008)"
            )
        self.s = float(s)
        self.t_max = float(t_max)
        self._log_alpha_0 = math.log(math.cos(0.5 * math.pi * self.s / (1.0 + self.s)))

    def _angle(self, t: float) -> float:
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    def log_alpha(self, t: float) -> float:
        return math.log(math.cos(self._angle(t))) - self._log_alpha_0

    def log_alpha_dot(self, t: float) -> float:
        return -math.tan(self._angle(t)) * 0.5 * math.pi / (1.0 + self.s)

    def t_from_log_alpha(self, log_alpha: float) -> float:
        cos_angle = min(math.exp(log_alpha + self._log_alpha_0), 1.0)
        return 2.0 * (1.0 + self.s) / math.pi * math.acos(cos_angle) - self.s

    def __repr__(self) -> str:
        return f"VPCosine(s={self.s}, t_max={self.t_max})"


class VPDiscrete(_VariancePreserving):
    """A trained model's discrete schedule: ``alphas_cumprod[n]`` holds at t = (n + 1) / N.

    log alpha is interpolated linearly in t between the N knots (as DPM-Solver does),
    so ``t`` lies in [1/N, 1] and d log alpha / dt is piecewise constant: exponential
    integrators are unaffected, but a generic Runge-Kutta solver sees a kink at each knot.

    With ``clean_end=True`` an extra knot at t = 0 holds alpha = 1 (sigma = 0), with log alpha
    linear in t from there to the first knot at 1/N: ``t`` then lies in [0, 1] and a grid may
    end at the clean data (``t_min = 0``, ``sigma_bar_range()`` starts at 0). This is the end
    point of diffusers' ``set_alpha_to_one=True`` and ``final_sigmas_type="zero"``.

    A table whose last value is 0 (a last beta of 1), diffusers' ``rescale_betas_zero_snr=True``
    (zero terminal SNR, Lin et al. 2024), ends in pure noise: alpha = 0 at t = 1, where
    ``sigma_bar`` and the log-SNR are infinite, as ``RectifiedFlow``'s end. log alpha cannot
    be linear up to -inf, so between the last two knots alpha itself is linear in t, from the
    last positive knot's to 0: its derivative stays finite at t = 1, which a Runge-Kutta
    solver's first step from there needs. The knots' values are the table's either way.
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        clean_end: bool = False,
    ) -> None:
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas or alphas_cumprod")
        if betas is not None:
            b = np.asarray(torch.as_tensor(betas, dtype=torch.float64).cpu(), dtype=np.float64)
            if b.ndim != 1 or b.size < 2 or not np.all((b[:-1] > 0) & (b[:-1] < 1)):
                raise ValueError(
                    "betas must be a 1-D array of at least 2 values in (0, 1), the last one "
                    "in (0, 1] (1: zero terminal SNR)"
                )
            if not 0 < b[-1] <= 1:
                raise ValueError(
                    f"the last beta must lie in (0, 1] (1: zero terminal SNR), got {b[-1]:.6g}"
                )
            with np.errstate(divide="ignore"):  # log1p(-1) is -inf: the pure-noise end
                log_ac = np.cumsum(np.log1p(-b))
        else:
            ac = np.asarray(
                torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu(), dtype=np.float64
            )
            if ac.ndim != 1 or ac.size < 2 or not np.all((ac[:-1] > 0) & (ac[:-1] < 1)):
                raise ValueError(
                    "alphas_cumprod must be a 1-D array of at least 2 values in (0, 1), the "
                    "last one in [0, 1) (0: zero terminal SNR)"
                )
            if not 0 <= ac[-1] < 1:
                raise ValueError(
                    f"the last of alphas_cumprod must lie in [0, 1) (0: zero terminal SNR), "
                    f"got {ac[-1]:.6g}"
                )
            with np.errstate(divide="ignore"):  # log(0) is -inf: the pure-noise end
                log_ac = np.log(ac)
        if not np.all(np.diff(log_ac) < 0):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        n = log_ac.size
        self.clean_end = bool(clean_end)
        self.knots_t = np.arange(1, n + 1, dtype=np.float64) / n
        self.knots_log_alpha = 0.5 * log_ac
        if self.clean_end:
            # The knot (0, log alpha = 0) makes sigma exactly 0 at t = 0.
            self.knots_t = np.concatenate([[0.0], self.knots_t])
            self.knots_log_alpha = np.concatenate([[0.0], self.knots_log_alpha])
        self.t_min = float(self.knots_t[0])
        self.t_max = 1.0
        if log_ac[-1] == -math.inf:
            # Set only here: a schedule's fingerprint reads its attributes, and an ordinary
            # table's stays what it was.
            self.zero_snr_end = True
            # Past the last positive knot, alpha(t) = last_alpha (1 - t) / last_span.
            self._last_t = float(self.knots_t[-2])
            self._last_alpha = math.exp(float(self.knots_log_alpha[-2]))
            self._last_span = 1.0 - self._last_t

    #: Whether alpha is 0 at t = 1 (the table's last value is 0).
    zero_snr_end: bool = False

    def _in_noise_end(self, t: float, knot: bool = False) -> bool:
        """Whether ``t`` lies past the last positive knot of a zero-SNR table (or on it, with
        ``knot``: a derivative at a knot is the next interval's, as at every other knot)."""
        return self.zero_snr_end and (t > self._last_t or (knot and t == self._last_t))

    def _end_alpha(self, t: float) -> float:
        return self._last_alpha * (1.0 - t) / self._last_span

    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        """The knots log alpha is interpolated between: all, or all but a zero-SNR end."""
        if self.zero_snr_end:
            return self.knots_t[:-1], self.knots_log_alpha[:-1]
        return self.knots_t, self.knots_log_alpha

    def log_alpha(self, t: float) -> float:
        if self._in_noise_end(t):
            alpha = self._end_alpha(t)
            return -math.inf if alpha <= 0.0 else math.log(alpha)
        return float(np.interp(t, *self._knots()))

    def alpha(self, t: float) -> float:
        if self._in_noise_end(t):
            return max(self._end_alpha(t), 0.0)
        return super().alpha(t)

    def alpha_dot(self, t: float) -> float:
        if self._in_noise_end(t, knot=True):
            # alpha (log alpha)' is 0 times -inf at t = 1; the line's slope is the derivative.
            return -self._last_alpha / self._last_span
        return super().alpha_dot(t)

    def log_alpha_dot(self, t: float) -> float:
        if self._in_noise_end(t, knot=True):
            alpha = self._end_alpha(t)
            return -math.inf if alpha <= 0.0 else -self._last_alpha / self._last_span / alpha
        knots_t, knots_log_alpha = self._knots()
        i = int(np.clip(np.searchsorted(knots_t, t, side="right") - 1, 0, knots_t.size - 2))
        dt = knots_t[i + 1] - knots_t[i]
        return float((knots_log_alpha[i + 1] - knots_log_alpha[i]) / dt)

    def t_from_log_alpha(self, log_alpha: float) -> float:
        knots_t, knots_log_alpha = self._knots()
        if self.zero_snr_end and log_alpha < knots_log_alpha[-1]:
            # alpha = last_alpha (1 - t) / last_span solved for t: 1 at alpha = 0.
            alpha = math.exp(log_alpha)
            return self._last_t + (1.0 - alpha / self._last_alpha) * self._last_span
        # np.interp needs increasing abscissae; log alpha decreases with t.
        return float(np.interp(log_alpha, knots_log_alpha[::-1], knots_t[::-1]))

    def __repr__(self) -> str:
        ends = (", clean_end=True" if self.clean_end else "") + (
            ", zero_snr_end=True" if self.zero_snr_end else ""
        )
        return f"VPDiscrete(N={self.knots_t.size - self.clean_end}{ends})"


class RectifiedFlow(Schedule):
    """Flow matching on the straight path: alpha(t) = 1 - t, sigma(t) = t, t in [0, 1].

    The schedule of Stable Diffusion 3 and Flux (diffusers' ``FlowMatchEulerDiscreteScheduler``,
    whose ``sigmas`` are these times). Its networks predict the path's velocity
    ``u = eps - x0``; wrap them with ``DiffusionODE.from_flow``. At ``t = 1`` the state is pure
    noise: alpha = 0, ``sigma_bar = inf``, ``log_snr = -inf``. A grid may start there; see
    docs/solvers.md, "The pure-noise end".
    """

    t_min = 0.0
    t_max = 1.0

    def log_alpha(self, t: float) -> float:
        # log1p(-1) is a domain error in Python, not -inf.
        return -math.inf if t == 1.0 else math.log1p(-t)

    def alpha(self, t: float) -> float:
        # 1 - t exactly, rather than exp(log1p(-t)), which rounds it.
        return 1.0 - float(t)

    def sigma(self, t: float) -> float:
        return float(t)

    def alpha_dot(self, t: float) -> float:
        return -1.0

    def sigma_dot(self, t: float) -> float:
        return 1.0

    def t_from_log_snr(self, log_snr: float) -> float:
        # (1 - t) / t = e^lambda, so t = 1 / (1 + e^lambda); exp overflows to the clean end.
        if log_snr == math.inf:
            return 0.0
        if log_snr > 709.0:
            return math.exp(-log_snr)
        return 1.0 / (1.0 + math.exp(log_snr))


# --------------------------------------------------------------------------- grids


def check_steps(steps: Any, name: str = "steps") -> int:
    """A step count as a Python int >= 1: the one check of the grids' ``steps`` and of the
    diffusers adapter's ``num_inference_steps``.

    An integer of Python, numpy or torch is a count (a 0-dim integer tensor or array too, as
    a sweep or ``np.arange`` gives one). A bool is not, nor a float even when whole (18.0),
    a string, or a tensor holding one integer in one or more dimensions.

    Raises:
        TypeError: ``steps`` is no integer (the message names ``name``, type and value).
        ValueError: it is below 1.
    """
    n = None
    # operator.index takes True as 1 (a 0-dim bool tensor too, and numpy's bool in older
    # numpy, 1.23 among them) and a torch tensor of one element whatever its shape; neither
    # is a count.
    if (
        not isinstance(steps, (bool, np.bool_))
        and getattr(steps, "dtype", None) != torch.bool
        and getattr(steps, "ndim", 0) == 0
    ):
        try:
            n = operator.index(steps)
        except TypeError:
            pass
    if n is None:
        raise TypeError(
            f"{name} must be an integer (an int, or an integer of numpy or torch), got "
            f"{type(steps).__name__} {steps!r}"
        )
    if n < 1:
        raise ValueError(f"{name} must be 1 or more, got {n}")
    return n


def _real(name: str, value: object) -> float:
    """``value`` as a finite Python float: a real number, or a 0-dim tensor or array holding
    one (an end read off another grid). Computing with a float32 tensor instead would put its
    rounding into every time of the grid."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r:.40}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} = {out} is not a finite number")
    return out


def _positive(name: str, value: object, meaning: str) -> float:
    """``value`` as a finite Python float > 0, or a ValueError that says what it means."""
    try:
        out = _real(name, value)
    except (TypeError, ValueError):
        out = math.nan
    if not out > 0:
        raise ValueError(f"{name} must be a finite number > 0 ({meaning}), got {value!r}")
    return out


def _ends(t_start: object, t_end: object) -> tuple[float, float]:
    """The ends of a grid given by its times, as finite floats that differ."""
    a, b = _real("t_start", t_start), _real("t_end", t_end)
    if a == b:
        raise ValueError(f"t_start and t_end are both {a}; a grid needs two different ends")
    return a, b


def _to_grid(ts: Sequence[float], schedule: Schedule | None) -> torch.Tensor:
    if schedule is not None:
        schedule.check_times(ts)
    return torch.tensor(list(ts), dtype=torch.float64)


def karras_grid(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    schedule: Schedule | None = None,
    final_zero: bool = True,
) -> torch.Tensor:
    """EDM's grid, uniform in ``sigma_bar ** (1 / rho)``, mapped to the schedule's time.

    ``steps`` is the number of intervals. With ``final_zero`` (EDM's and k-diffusion's
    convention) the grid holds ``steps`` points from sigma_max to sigma_min and then 0;
    without it, ``steps + 1`` points from sigma_max to sigma_min.

    Returns:
        float64 tensor of shape ``(steps + 1,)``, noisiest first.

    Raises:
        ValueError: if sigma_min or sigma_max lies outside ``schedule.sigma_bar_range()``,
            or ``final_zero`` asks for sigma = 0 from a schedule that never reaches it
            (``VPDiscrete`` without ``clean_end``); the message names the range. Also if
            rho is not a finite number > 0.
    """
    steps = check_steps(steps)
    sigma_min, sigma_max = _real("sigma_min", sigma_min), _real("sigma_max", sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    rho_value = _positive("rho", rho, "the grid is uniform in sigma ** (1 / rho); EDM uses 7")
    schedule = schedule or EDM()
    lo, hi = schedule.sigma_bar_range()
    for arg, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min)):
        if not lo * (1.0 - _RANGE_SLACK) <= value <= hi * (1.0 + _RANGE_SLACK):
            raise ValueError(
                f"{arg} = {value:g} lies outside {schedule!r}'s noise range: sigma_bar from "
                f"{lo:.6g} (at t_min = {schedule.t_min:g}) to {hi:.6g} (at t_max = "
                f"{schedule.t_max:g}); give sigma_min and sigma_max inside it"
            )
    if final_zero and lo > 0:
        raise ValueError(
            f"final_zero=True ends the grid at sigma = 0, which {schedule!r} never reaches (its "
            f"smallest sigma_bar is {lo:.6g}, at t_min = {schedule.t_min:g}); use "
            "final_zero=False"
        )
    n = steps if final_zero else steps + 1
    lo, hi = sigma_min ** (1.0 / rho_value), sigma_max ** (1.0 / rho_value)
    denom = max(n - 1, 1)
    sigmas = [(hi + i / denom * (lo - hi)) ** rho_value for i in range(n)]
    if final_zero:
        sigmas.append(0.0)
    return _to_grid([schedule.t_from_sigma_bar(s) for s in sigmas], schedule)


def uniform_logsnr_grid(
    steps: int, t_start: float, t_end: float, schedule: Schedule
) -> torch.Tensor:
    """Times uniformly spaced in log-SNR ``lambda = log(alpha / sigma)`` (DPM-Solver's 'logSNR').

    Returns:
        float64 tensor of shape ``(steps + 1,)`` from ``t_start`` to ``t_end``.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "uniform_logsnr_grid needs a Schedule instance (the log-SNR is a schedule's), such "
            f"as bdia.VPLinear(), got {type(schedule).__name__}"
        )
    steps = check_steps(steps)
    t_start, t_end = _ends(t_start, t_end)
    schedule.check_times([t_start, t_end])
    a, b = schedule.log_snr(t_start), schedule.log_snr(t_end)
    for name, t, lam in (("t_start", t_start, a), ("t_end", t_end, b)):
        if not math.isfinite(lam):
            raise ValueError(
                f"uniform_logsnr_grid needs sigma > 0 at both ends; {name} = {t} has sigma = 0 "
                "(infinite log-SNR)"
            )
    ts = [schedule.t_from_log_snr(a + i / steps * (b - a)) for i in range(steps + 1)]
    ts[0], ts[-1] = float(t_start), float(t_end)
    return _to_grid(ts, schedule)


def uniform_t_grid(
    steps: int, t_start: float, t_end: float, schedule: Schedule | None = None
) -> torch.Tensor:
    """Times uniformly spaced from ``t_start`` to ``t_end``.

    Returns:
        float64 tensor of shape ``(steps + 1,)``.
    """
    steps = check_steps(steps)
    t_start, t_end = _ends(t_start, t_end)
    return _to_grid([t_start + i / steps * (t_end - t_start) for i in range(steps + 1)], schedule)


def quadratic_t_grid(
    steps: int, t_start: float, t_end: float, schedule: Schedule | None = None
) -> torch.Tensor:
    """Times uniform in ``sqrt(t)`` (DDIM's 'quadratic' and DPM-Solver's 'time_quadratic').

    Returns:
        float64 tensor of shape ``(steps + 1,)``; both ends must be >= 0.
    """
    steps = check_steps(steps)
    t_start, t_end = _ends(t_start, t_end)
    if t_start < 0 or t_end < 0:
        raise ValueError("quadratic_t_grid needs t_start >= 0 and t_end >= 0")
    a, b = math.sqrt(t_start), math.sqrt(t_end)
    ts = [(a + i / steps * (b - a)) ** 2 for i in range(steps + 1)]
    ts[0], ts[-1] = float(t_start), float(t_end)
    return _to_grid(ts, schedule)


def shifted_t_grid(
    steps: int,
    t_start: float = 1.0,
    t_end: float = 0.0,
    shift: float = 3.0,
    schedule: Schedule | None = None,
) -> torch.Tensor:
    """Flow matching's shifted grid: uniform in ``u``, with ``t = shift u / (1 + (shift - 1) u)``.

    The timestep shift of Stable Diffusion 3 (``shift = 3``) for ``RectifiedFlow`` times in
    [0, 1]: a shift above 1 spends more of the steps at high noise, and ``shift = 1`` is
    ``uniform_t_grid``. Flux's resolution-dependent shift ``e^mu / (e^mu + 1 / u - 1)`` is
    this map with ``shift = exp(mu)``. The ends are ``t_start`` and ``t_end`` themselves:
    ``u`` runs between their preimages ``u = t / (shift - (shift - 1) t)``. (diffusers'
    ``FlowMatchEulerDiscreteScheduler`` shifts its smallest time as well; its own grid comes
    from ``bdia.integrations.diffusers.diffusers_grid``.)

    Returns:
        float64 tensor of shape ``(steps + 1,)`` from ``t_start`` to ``t_end``.

    Raises:
        ValueError: an end outside [0, 1], or ``shift`` not a finite number > 0.
    """
    steps = check_steps(steps)
    t_start, t_end = _ends(t_start, t_end)
    for name, t in (("t_start", t_start), ("t_end", t_end)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"shifted_t_grid needs times in [0, 1]; {name} = {t}")
    factor = _positive("shift", shift, "SD3 uses 3; 1 is no shift")
    a, b = (t / (factor - (factor - 1.0) * t) for t in (t_start, t_end))
    us = [a + i / steps * (b - a) for i in range(steps + 1)]
    ts = [factor * u / (1.0 + (factor - 1.0) * u) for u in us]
    ts[0], ts[-1] = t_start, t_end
    return _to_grid(ts, schedule)
