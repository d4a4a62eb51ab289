"""Analytic test problems with exact or tightly computed reference solutions.

Diffusion problems (data distributions with an exact denoiser):

- ``Gaussian``: isotropic Gaussian data; the probability-flow ODE has a closed form.
- ``GaussianMixture``: any dimension and number of isotropic components; the denoiser is
  exact and reference solutions come from torchdiffeq (dopri5, float64, tolerance 1e-12).

In the scaled space ``x_bar = x / alpha`` the probability-flow ODE does not depend on the
schedule: ``dx_bar/dsigma_bar = eps(x_bar, sigma_bar)``. References are computed there and
mapped back with ``x = alpha(t) x_bar``. Under ``RectifiedFlow`` the mixture also gives the
exact flow-matching velocity (``flow_velocity``, ``flow_ode``), finite at the pure-noise end
``t = 1`` where ``x_bar`` is not, and ``flow_solution`` integrates it in ``t``.

Generic problems (``dx/dt = f(t, x)`` with a closed form):

- ``LinearODE``: ``x' = A x``, solved with the matrix exponential (``oscillator`` builds a
  damped rotation).
- ``Logistic``: ``x' = r x (1 - x)``, elementwise.
- ``TimeDependentRiccati``: ``x' = -2 t x^2``, elementwise and non-autonomous.

All states have shape ``(batch, dim)``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..ode import ODE, DiffusionODE
from ..schedules import EDM, RectifiedFlow, Schedule

__all__ = [
    "GaussianMixture",
    "Gaussian",
    "LinearODE",
    "oscillator",
    "Logistic",
    "TimeDependentRiccati",
]


def _dopri(*args: object, **kwargs: object) -> Tensor:
    """torchdiffeq's ``odeint``, imported when a reference is first integrated: it imports
    scipy.integrate (half a second), which every ``bdia`` command would pay otherwise, since
    the command line loads this module for ``bdia compare``."""
    from torchdiffeq import odeint

    return odeint(*args, **kwargs)


def _grid_floats(ts: Tensor | Sequence[float]) -> list[float]:
    return [float(t) for t in (ts.tolist() if isinstance(ts, Tensor) else ts)]


def _scaled_start(times: list[float], schedule: Schedule) -> float:
    """``alpha(ts[0])``, by which the scaled-space references divide the start state."""
    alpha = schedule.alpha(times[0])
    if alpha == 0.0:
        raise ValueError(
            f"ts[0] = {times[0]} is pure noise under {schedule!r} (alpha = 0), where x_bar = "
            "x / alpha is infinite; the reference from there is flow_solution (RectifiedFlow)"
        )
    return alpha


class _MixtureParams(NamedTuple):
    """A mixture's parameters cast to one dtype and device, with the ones vectors that sum
    over its component and feature axes."""

    log_weights: Tensor  # (K,)
    means: Tensor  # (K, dim)
    stds: Tensor  # (K,)
    variances: Tensor  # (K,), std_j^2
    ones_dim: Tensor  # (dim,)
    ones_components: Tensor  # (K, 1)


# Beside each mixture rather than in it: an ODE's fingerprint reads a plain object's
# attributes, and a cache filled by the first evaluation would change it.
_CAST: weakref.WeakKeyDictionary[
    GaussianMixture, dict[tuple[torch.device, torch.dtype], _MixtureParams]
] = weakref.WeakKeyDictionary()


class GaussianMixture:
    """Data distributed as ``sum_j w_j N(mean_j, std_j^2 I)`` in ``dim`` dimensions.

    Args:
        weights: shape ``(K,)``, positive (normalised here).
        means: shape ``(K, dim)``.
        stds: shape ``(K,)``, positive.

    The parameters are fixed once the mixture is made: its evaluations keep them cast to
    each dtype and device they meet.
    """

    def __init__(
        self,
        weights: Tensor | Sequence[float],
        means: Tensor | Sequence,
        stds: Tensor | Sequence[float],
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        m = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64)
        if m.ndim != 2 or w.shape != (m.shape[0],) or s.shape != (m.shape[0],):
            raise ValueError("need weights (K,), means (K, dim) and stds (K,)")
        if not (bool((w > 0).all()) and bool((s > 0).all())):
            raise ValueError("weights and stds must be positive")
        self.weights = w / w.sum()
        self.means = m
        self.stds = s

    @classmethod
    def random(
        cls,
        dim: int,
        components: int,
        *,
        std_range: tuple[float, float] = (0.2, 0.6),
        spread: float = 1.0,
        seed: int = 0,
    ) -> GaussianMixture:
        """A random mixture: means ~ N(0, spread^2 I), stds uniform in ``std_range``."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(components, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(weights, means, stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _params(self, x: Tensor) -> _MixtureParams:
        """The parameters in ``x``'s dtype on its device, made once for each dtype and
        device: the toy benchmarks evaluate a mixture tens of thousands of times, and
        casting, squaring and taking logs again would be eight of an evaluation's two dozen
        small torch calls.

        Parameters that require grad are cast at every call, so that gradients reach them.
        The kept ones are made outside inference mode: made in ``compare``'s
        ``torch.inference_mode()``, they could not enter a later run that autograd records.
        """
        if any(p.requires_grad for p in (self.weights, self.means, self.stds)):
            return self._cast_params(x)
        cast = _CAST.setdefault(self, {})
        key = (x.device, x.dtype)
        params = cast.get(key)
        if params is None:
            with torch.inference_mode(False):
                params = cast[key] = self._cast_params(x)
        return params

    def _cast_params(self, x: Tensor) -> _MixtureParams:
        w = self.weights.to(x.device, x.dtype)
        stds = self.stds.to(x.device, x.dtype)
        return _MixtureParams(
            log_weights=torch.log(w),
            means=self.means.to(x.device, x.dtype),
            stds=stds,
            variances=stds**2,
            ones_dim=torch.ones(self.dim, dtype=x.dtype, device=x.device),
            ones_components=torch.ones(len(w), 1, dtype=x.dtype, device=x.device),
        )

    # Every evaluation reduces over the tiny component (K) and feature (dim) axes. torch's
    # reduction kernels take tens of microseconds on such axes while a matrix product with a
    # ones vector sums the same terms in a few, and the toy benchmarks make tens of thousands
    # of evaluations; hence the products below instead of sum() and softmax().

    def _responsibilities(self, p: _MixtureParams, diff: Tensor, var: Tensor) -> Tensor:
        """Posterior component probabilities, shape ``(batch, K)``.

        ``diff`` is ``x_bar - mean_j``, shape ``(batch, K, dim)``; ``var`` is ``(batch, K)``.
        """
        sq = (diff * diff) @ p.ones_dim
        # log w_j - dim/2 log var_j - sq_j / (2 var_j), in two fused calls rather than six
        logits = torch.addcdiv(
            torch.add(p.log_weights, torch.log(var), alpha=-0.5 * self.dim), sq, var, value=-0.5
        )
        weights = torch.exp(logits - logits.amax(-1, keepdim=True))
        return weights / (weights @ p.ones_components)

    def denoiser(self, x_bar: Tensor, sigma_bar: Tensor) -> Tensor:
        """The exact ``E[x_0 | x_0 + sigma_bar eps = x_bar]``.

        Args:
            x_bar: shape ``(batch, dim)``.
            sigma_bar: shape ``(batch,)``, >= 0.

        Returns:
            shape ``(batch, dim)``, ``x_bar``'s dtype.
        """
        p = self._params(x_bar)
        sb = sigma_bar.to(x_bar.dtype).unsqueeze(1)
        var = torch.addcmul(p.variances, sb, sb)  # (batch, K)
        diff = x_bar.unsqueeze(1) - p.means  # (batch, K, dim)
        r = self._responsibilities(p, diff, var)
        shrink = (p.variances / var).unsqueeze(2)  # (batch, K, 1)
        per_component = p.means + shrink * diff
        return (r.unsqueeze(1) @ per_component).squeeze(1)

    def eps(self, x_bar: Tensor, sigma_bar: Tensor) -> Tensor:
        """``dx_bar / dsigma_bar = sum_j r_j (x_bar - mean_j) sigma_bar / (std_j^2 + sigma_bar^2)``.

        Equal to ``(x_bar - D) / sigma_bar`` and finite at sigma_bar = 0.
        """
        p = self._params(x_bar)
        sb = sigma_bar.to(x_bar.dtype)[:, None]
        var = torch.addcmul(p.variances, sb, sb)
        diff = x_bar[:, None, :] - p.means
        r = self._responsibilities(p, diff, var)
        return ((r * sb / var)[:, None, :] @ diff).squeeze(1)

    def ode(self, schedule: Schedule | None = None, **kwargs: object) -> DiffusionODE:
        """The probability-flow ODE of this data under ``schedule`` (default EDM)."""
        return DiffusionODE(self.denoiser, schedule or EDM(), **kwargs)  # type: ignore[arg-type]

    def flow_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact ``E[eps - x_0 | (1 - t) x_0 + t eps = x]`` of ``RectifiedFlow``.

        Given component j, ``x`` has mean ``(1 - t) mean_j`` and variance
        ``var_j = (1 - t)^2 std_j^2 + t^2``, and the velocity is
        ``sum_j r_j ((t - (1 - t) std_j^2) / var_j (x - (1 - t) mean_j) - mean_j)``:
        finite at ``t = 1``, where it is ``x`` minus the data mean.

        Args:
            x: shape ``(batch, dim)``.
            t: shape ``(batch,)``, in [0, 1].

        Returns:
            shape ``(batch, dim)``, ``x``'s dtype.
        """
        p = self._params(x)
        t = t.to(x.dtype)[:, None]  # (batch, 1)
        alpha = 1.0 - t
        var = (alpha * p.stds[None]) ** 2 + t**2  # (batch, K)
        diff = x[:, None, :] - alpha[..., None] * p.means[None]  # (batch, K, dim)
        r = self._responsibilities(p, diff, var)
        gain = (t - alpha * p.variances[None]) / var  # (batch, K)
        return ((r * gain)[:, None, :] @ diff).squeeze(1) - r @ p.means

    def flow_ode(self, **kwargs: object) -> DiffusionODE:
        """The flow-matching ODE ``dx/dt = flow_velocity(x, t)`` under ``RectifiedFlow``."""
        return DiffusionODE.from_flow(self.flow_velocity, RectifiedFlow(), **kwargs)  # type: ignore[arg-type]

    def flow_solution(
        self,
        x_start: Tensor,
        ts: Tensor | Sequence[float],
        *,
        rtol: float = 1e-12,
        atol: float = 1e-12,
    ) -> Tensor:
        """Reference trajectory of ``flow_ode`` from ``x_start`` at ``ts[0]`` (1 allowed).

        Integrates ``dx/dt = flow_velocity`` in float64 with dopri5 at the given tolerances.

        Returns:
            float64 tensor of shape ``(len(ts), batch, dim)``.
        """
        times = torch.tensor(_grid_floats(ts), dtype=torch.float64)
        x0 = x_start.to(torch.float64)

        def f(t: Tensor, x: Tensor) -> Tensor:
            return self.flow_velocity(x, t.expand(x.shape[0]))

        return _dopri(f, x0, times, rtol=rtol, atol=atol, method="dopri5")

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the data, float64, shape ``(n, dim)``."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * noise

    def solution(
        self,
        x_start: Tensor,
        ts: Tensor | Sequence[float],
        schedule: Schedule | None = None,
        *,
        rtol: float = 1e-12,
        atol: float = 1e-12,
    ) -> Tensor:
        """Reference trajectory from ``x_start`` at ``ts[0]`` through every time in ``ts``.

        Integrates ``dx_bar/dsigma_bar = eps`` in float64 with dopri5 at the given tolerances.

        Returns:
            float64 tensor of shape ``(len(ts), batch, dim)``.
        """
        schedule = schedule or EDM()
        times = _grid_floats(ts)
        x_bar0 = x_start.to(torch.float64) / _scaled_start(times, schedule)
        sigma_bars = torch.tensor([schedule.sigma_bar(t) for t in times], dtype=torch.float64)
        alphas = torch.tensor([schedule.alpha(t) for t in times], dtype=torch.float64)

        def f(sb: Tensor, xb: Tensor) -> Tensor:
            return self.eps(xb, sb.expand(xb.shape[0]))

        x_bars = _dopri(f, x_bar0, sigma_bars, rtol=rtol, atol=atol, method="dopri5")
        return alphas[:, None, None] * x_bars


class Gaussian(GaussianMixture):
    """Isotropic Gaussian data ``N(mean, std^2 I)``, with the closed-form flow.

    Along the probability-flow ODE ``(x_bar - mean) / sqrt(std^2 + sigma_bar^2)`` is constant.
    """

    def __init__(self, mean: Tensor | Sequence[float], std: float) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        super().__init__([1.0], mean, [float(std)])

    def solution(
        self,
        x_start: Tensor,
        ts: Tensor | Sequence[float],
        schedule: Schedule | None = None,
        **_: float,
    ) -> Tensor:
        """Exact trajectory, float64, shape ``(len(ts), batch, dim)``."""
        schedule = schedule or EDM()
        times = _grid_floats(ts)
        mean, std = self.means[0], float(self.stds[0])
        x_bar0 = x_start.to(torch.float64) / _scaled_start(times, schedule)
        scale0 = math.sqrt(std**2 + schedule.sigma_bar(times[0]) ** 2)
        out = []
        for t in times:
            ratio = math.sqrt(std**2 + schedule.sigma_bar(t) ** 2) / scale0
            out.append(schedule.alpha(t) * (mean + ratio * (x_bar0 - mean)))
        return torch.stack(out)


class LinearODE:
    """``x' = A x`` for a constant ``(dim, dim)`` matrix A, states ``(batch, dim)``."""

    def __init__(self, A: Tensor | Sequence) -> None:
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be square, got shape {tuple(A.shape)}")
        self.A = A

    def f(self, t: Tensor, x: Tensor) -> Tensor:
        return x @ self.A.to(x.device, x.dtype).T

    def ode(self) -> ODE:
        return ODE(self.f)

    def solution(self, x_start: Tensor, ts: Tensor | Sequence[float]) -> Tensor:
        """``x(t) = expm(A (t - t0)) x0`` at every time, float64, ``(len(ts), batch, dim)``."""
        times = _grid_floats(ts)
        x0 = x_start.to(torch.float64)
        return torch.stack([x0 @ torch.linalg.matrix_exp(self.A * (t - times[0])).T for t in times])


def oscillator(omega: float = 2.0, damping: float = 0.1) -> LinearODE:
    """A damped harmonic oscillator ``q'' = -omega^2 q - 2 damping q'`` as a 2-D linear ODE."""
    return LinearODE([[0.0, 1.0], [-(omega**2), -2.0 * damping]])


class Logistic:
    """``x' = r x (1 - x)``, elementwise; ``x(t) = 1 / (1 + (1/x0 - 1) e^(-r (t - t0)))``."""

    def __init__(self, rate: float = 1.0) -> None:
        self.rate = float(rate)

    def f(self, t: Tensor, x: Tensor) -> Tensor:
        return self.rate * x * (1.0 - x)

    def ode(self) -> ODE:
        return ODE(self.f)

    def solution(self, x_start: Tensor, ts: Tensor | Sequence[float]) -> Tensor:
        times = _grid_floats(ts)
        x0 = x_start.to(torch.float64)
        return torch.stack(
            [1.0 / (1.0 + (1.0 / x0 - 1.0) * math.exp(-self.rate * (t - times[0]))) for t in times]
        )


class TimeDependentRiccati:
    """``x' = -2 t x^2``, elementwise; ``x(t) = 1 / (t^2 - t0^2 + 1/x0)`` (for x0 > 0)."""

    def f(self, t: Tensor, x: Tensor) -> Tensor:
        return -2.0 * t * x * x

    def ode(self) -> ODE:
        return ODE(self.f)

    def solution(self, x_start: Tensor, ts: Tensor | Sequence[float]) -> Tensor:
        times = _grid_floats(ts)
        x0 = x_start.to(torch.float64)
        return torch.stack([1.0 / (t * t - times[0] ** 2 + 1.0 / x0) for t in times])
