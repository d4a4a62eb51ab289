"""The analytic toy problems are right: exact denoisers, closed forms and reference solutions
checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torchdiffeq import odeint as dopri

from bdia import EDM, VPLinear, get_solver, karras_grid, sample
from bdia.models.toy import (
    Gaussian,
    GaussianMixture,
    LinearODE,
    Logistic,
    TimeDependentRiccati,
    oscillator,
)

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: an error relative to the size of the reference as a whole.

    Elementwise relative error is meaningless where a component of the reference passes near 0.
    """
    return float((a - b).abs().max() / b.abs().max())


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(3, 4, seed=3)


# ---------------------------------------------------------------- mixture denoiser


def reference_denoiser(gm: GaussianMixture, x_bar: np.ndarray, sigma_bar: np.ndarray) -> np.ndarray:
    """E[x0 | x0 + sigma_bar eps = x_bar], one component at a time, in numpy float64.

    Given component j, x0 ~ N(m_j, s_j^2 I) and x_bar ~ N(m_j, (s_j^2 + sigma_bar^2) I), and
    E[x0 | x_bar, j] = m_j + s_j^2 / (s_j^2 + sigma_bar^2) (x_bar - m_j). The posterior weight
    of component j is w_j N(x_bar; m_j, (s_j^2 + sigma_bar^2) I), normalised (log-sum-exp).
    """
    w, m, s = gm.weights.numpy(), gm.means.numpy(), gm.stds.numpy()
    d = m.shape[1]
    out = np.empty_like(x_bar)
    for b in range(x_bar.shape[0]):
        log_post = np.empty(len(w))
        cond_means = np.empty_like(m)
        for j in range(len(w)):
            var = s[j] ** 2 + sigma_bar[b] ** 2
            diff = x_bar[b] - m[j]
            log_post[j] = (
                math.log(w[j]) - 0.5 * diff @ diff / var - 0.5 * d * math.log(2 * math.pi * var)
            )
            cond_means[j] = m[j] + s[j] ** 2 / var * diff
        post = np.exp(log_post - logsumexp(log_post))
        out[b] = post @ cond_means
    return out


@pytest.mark.parametrize("sigma_bar", [0.0, 1e-3, 0.05, 0.3, 1.0, 5.0, 80.0])
def test_mixture_denoiser_is_posterior_mean(mixture: GaussianMixture, sigma_bar: float) -> None:
    x0 = mixture.sample_data(32, torch.Generator().manual_seed(1))
    x_bar = x0 + sigma_bar * randn(32, 3, seed=2)
    sb = torch.full((32,), sigma_bar, dtype=F64)
    got = mixture.denoiser(x_bar, sb)
    ref = reference_denoiser(mixture, x_bar.numpy(), sb.numpy())
    # the same closed form computed two ways in float64: a few dozen roundings of ~1e-16
    # each, so 1e-12 relative leaves a factor ~100 of headroom
    assert rel_err(got, torch.from_numpy(ref)) < 1e-12


def test_mixture_denoiser_per_sample_sigma(mixture: GaussianMixture) -> None:
    # a batch whose samples sit at different noise levels: each row must use its own sigma_bar
    sb = torch.logspace(-3, 2, 24, dtype=F64)
    x_bar = mixture.sample_data(24, torch.Generator().manual_seed(4)) + sb[:, None] * randn(24, 3)
    got = mixture.denoiser(x_bar, sb)
    ref = reference_denoiser(mixture, x_bar.numpy(), sb.numpy())
    for i in range(24):  # row by row: rows at large sigma_bar are much larger than the rest
        assert rel_err(got[i], torch.from_numpy(ref[i])) < 1e-12  # as above


def test_mixture_denoiser_far_from_all_components(mixture: GaussianMixture) -> None:
    # log-likelihoods of ~ -1e4: the posterior must be computed in log space, not overflow
    x_bar = 60.0 * randn(8, 3, seed=5)
    sb = torch.full((8,), 0.01, dtype=F64)
    got = mixture.denoiser(x_bar, sb)
    assert bool(torch.isfinite(got).all())
    ref = reference_denoiser(mixture, x_bar.numpy(), sb.numpy())
    assert rel_err(got, torch.from_numpy(ref)) < 1e-12  # as above


def test_a_mixture_evaluated_in_two_dtypes_uses_each_ones_own_parameters() -> None:
    # The mixture keeps its parameters cast per dtype: a float32 call between two float64
    # ones must neither see float64 parameters nor leave float32 ones for the next call.
    gm = GaussianMixture.random(3, 4, seed=8)
    x_bar, sb = randn(16, 3, seed=9), torch.full((16,), 0.4, dtype=F64)
    first = gm.denoiser(x_bar, sb)
    low = gm.denoiser(x_bar.float(), sb.float())
    again = gm.denoiser(x_bar, sb)
    assert low.dtype == torch.float32
    assert torch.equal(again, first)
    ref = torch.from_numpy(reference_denoiser(gm, x_bar.numpy(), sb.numpy()))
    assert rel_err(first, ref) < 1e-12  # as above
    # float32 parameters and arithmetic: a few dozen roundings of 6e-8 each
    assert 0 < rel_err(low.double(), ref) < 1e-5


def test_a_mixture_first_evaluated_in_inference_mode_still_serves_autograd() -> None:
    # bdia compare evaluates under torch.inference_mode(); the parameters it leaves cast must
    # be plain tensors that a later recorded run can save for its backward pass.
    gm, fresh = GaussianMixture.random(3, 4, seed=8), GaussianMixture.random(3, 4, seed=8)
    x_bar, sb = randn(16, 3, seed=9), torch.full((16,), 0.4, dtype=F64)
    with torch.inference_mode():
        gm.denoiser(randn(16, 3, seed=10), sb)
    grads = []
    for mixture in (gm, fresh):
        x = x_bar.clone().requires_grad_()
        mixture.denoiser(x, sb).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_gradients_reach_mixture_parameters_that_require_them() -> None:
    gm = GaussianMixture.random(3, 4, seed=8)
    gm.stds.requires_grad_()
    x_bar, sb = randn(16, 3, seed=9), torch.full((16,), 0.4, dtype=F64)
    for _ in range(2):  # the second call squares the stds again, not in the first's graph
        gm.denoiser(x_bar, sb).sum().backward()
    h = 1e-6
    with torch.no_grad():
        shifted = [GaussianMixture(gm.weights, gm.means, gm.stds.clone()) for _ in range(2)]
        shifted[0].stds[1] += h
        shifted[1].stds[1] -= h
        ends = [mixture.denoiser(x_bar, sb).sum() for mixture in shifted]
        slope = float(ends[0] - ends[1]) / (2 * h)
    # a central difference in float64 with h = 1e-6: truncation ~h^2 and rounding ~1e-16 / h,
    # both far below 1e-7 of a slope of order 1; two calls accumulate twice the gradient
    assert float(gm.stds.grad[1]) == pytest.approx(2 * slope, rel=1e-7)


@pytest.mark.parametrize("sigma_bar", [0.01, 0.1, 0.5, 2.0, 10.0, 80.0])
def test_mixture_eps_matches_denoiser(mixture: GaussianMixture, sigma_bar: float) -> None:
    x_bar = mixture.sample_data(32, torch.Generator().manual_seed(6)) + sigma_bar * randn(32, 3)
    sb = torch.full((32,), sigma_bar, dtype=F64)
    eps = mixture.eps(x_bar, sb)
    via_d = (x_bar - mixture.denoiser(x_bar, sb)) / sb[:, None]
    # x_bar - D cancels: near sigma_bar = 0.01 it is ~ sigma_bar^2 / std^2 |x_bar| ~ 1e-3 |x_bar|,
    # so the subtraction loses ~3 of 16 digits; 1e-10 relative keeps a wide margin above that
    assert rel_err(eps, via_d) < 1e-10


def test_mixture_eps_at_sigma_zero(mixture: GaussianMixture) -> None:
    x_bar = mixture.sample_data(16, torch.Generator().manual_seed(7))
    eps = mixture.eps(x_bar, torch.zeros(16, dtype=F64))
    # the data's own noise is zero: exactly 0 (and finite), not 0/0
    assert bool(torch.isfinite(eps).all())
    assert torch.equal(eps, torch.zeros_like(eps))


def test_gaussian_denoiser_closed_form() -> None:
    g = Gaussian([0.5, -1.0], 0.7)
    x_bar = randn(16, 2, seed=8) * 3.0
    for s in (0.0, 0.1, 1.0, 30.0):
        sb = torch.full((16,), s, dtype=F64)
        ref = g.means[0] + 0.49 / (0.49 + s * s) * (x_bar - g.means[0])
        assert rel_err(g.denoiser(x_bar, sb), ref) < 1e-14  # one component: ~3 roundings


# ------------------------------------------------------------ reference solutions


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("schedule", [EDM(), VPLinear()], ids=["edm", "vp"])
def test_gaussian_closed_form_equals_dopri(schedule) -> None:
    mean, std = [0.3, -0.8, 1.2], 0.6
    closed = Gaussian(mean, std)
    one = GaussianMixture([1.0], [mean], [std])
    ts = karras_grid(12, schedule=schedule)
    x0 = randn(8, 3, seed=9) * 80.0 * schedule.alpha(float(ts[0]))
    a = closed.solution(x0, ts, schedule)
    b = one.solution(x0, ts, schedule)
    assert a.shape == b.shape == (13, 8, 3)
    # dopri5 at rtol = atol = 1e-12 over ~15 e-folds of sigma_bar: global error ~1e-11, so
    # 1e-9 leaves two orders of magnitude; checked at every grid time, including sigma = 0
    for i in range(len(ts)):
        assert rel_err(b[i], a[i]) < 1e-9, f"ts[{i}]"


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("schedule", [EDM(), VPLinear()], ids=["edm", "vp"])
def test_mixture_solution_matches_fine_rk4(mixture: GaussianMixture, schedule) -> None:
    ts = karras_grid(800, final_zero=False, schedule=schedule)
    x0 = 80.0 * schedule.alpha(float(ts[0])) * randn(8, 3, seed=10)
    traj = sample(mixture.ode(schedule), get_solver("rk4"), x0, ts, trajectory=True, progress=False)
    idx = list(range(0, 801, 100))
    ref = mixture.solution(x0, ts[idx], schedule)
    # RK4's global error is O(h^4): with 800 Karras steps it measured 1.2e-10 (edm) and 5e-11
    # (vp) on this problem, and dopri5's is ~1e-11; 1e-8 (relative at each time) is safely
    # above both, and an error of first or second order would exceed it
    for j, i in enumerate(idx):
        assert rel_err(traj[i], ref[j]) < 1e-8, f"ts[{i}]"


def test_gaussian_flow_transports_noise_to_data() -> None:
    mean, std, sigma_max, n = torch.tensor([0.5, -0.3], dtype=F64), 0.5, 80.0, 20000
    g = Gaussian(mean, std)
    x_start = sigma_max * randn(n, 2, seed=11)
    ts = [sigma_max, 0.002, 0.0]
    sol = g.solution(x_start, ts)
    for out in (sol[1], sol[2]):
        # Mean: standard error std / sqrt(n) = 3.5e-3 per coordinate; allow 4 of them. The
        # start is N(0, sigma_max^2), not the exact marginal N(mean, std^2 + sigma_max^2), which
        # shifts the mean by a known mean * sqrt(std^2 + s^2) / sqrt(std^2 + sigma_max^2)
        # (< 4e-3 here); add that bound to the tolerance.
        se_mean = std / math.sqrt(n)
        offset = mean.abs() * math.sqrt(std**2 + 0.002**2) / math.sqrt(std**2 + sigma_max**2)
        assert bool(((out.mean(0) - mean).abs() <= 4 * se_mean + offset).all())
        # Std: the sample std of n normals has standard error ~ std / sqrt(2 n) = 2.5e-3;
        # allow 4 of them (the start's variance mismatch changes the std by < 1e-5).
        se_std = std / math.sqrt(2 * n)
        assert bool(((out.std(0) - std).abs() <= 4 * se_std).all())
    # and the coordinates stay uncorrelated: the correlation's standard error is 1 / sqrt(n)
    c = torch.corrcoef(sol[2].T)[0, 1]
    assert abs(float(c)) < 4 / math.sqrt(n)


# ---------------------------------------------------------------- generic problems


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_linear_ode_solution_satisfies_ode(damping: float) -> None:
    problem = oscillator(omega=2.0, damping=damping)
    x0 = randn(6, 2, seed=12)
    t0, h = 0.7, 1e-3
    for t in (1.0, 2.5, -0.4):
        ts = [t0, t - 2 * h, t - h, t + h, t + 2 * h, t]
        sol = problem.solution(x0, ts)
        # fourth-order central difference: truncation h^4/30 |x^(5)| ~ 1e-12 * omega^5 ~ 3e-11
        # and rounding ~1e-16 / h = 1e-13, so 1e-9 relative is a safe bound
        deriv = (-sol[4] + 8 * sol[3] - 8 * sol[2] + sol[1]) / (12 * h)
        assert rel_err(deriv, problem.f(torch.tensor(t), sol[5])) < 1e-9


def test_linear_ode_solution_starts_at_x0() -> None:
    problem = LinearODE(randn(3, 3, seed=13))
    x0 = randn(5, 3, seed=14)
    sol = problem.solution(x0, [1.5, 2.0, 0.5])
    # expm(0) = I exactly, and x0 @ I adds exact zeros: no rounding at all
    assert torch.equal(sol[0], x0)


def test_undamped_oscillator_conserves_energy() -> None:
    omega = 2.0
    problem = oscillator(omega=omega, damping=0.0)
    x0 = randn(6, 2, seed=15)
    sol = problem.solution(x0, torch.linspace(0.0, 20.0, 81, dtype=F64))
    energy = sol[..., 1] ** 2 + omega**2 * sol[..., 0] ** 2
    # each time is computed from x0 directly by matrix_exp (no error accumulates over steps);
    # its rounding is ~1e-13 relative here, so 1e-12 still catches any real drift
    assert float(((energy - energy[0]) / energy[0]).abs().max()) < 1e-12


def test_damped_oscillator_loses_energy_at_the_known_rate() -> None:
    omega, damping = 2.0, 0.1
    problem = oscillator(omega=omega, damping=damping)
    x0 = randn(6, 2, seed=16)
    h = 1e-3
    sol = problem.solution(x0, [0.0, 1.0 - h, 1.0, 1.0 + h])
    energy = sol[..., 1] ** 2 + omega**2 * sol[..., 0] ** 2
    # dE/dt = 2 q' q'' + 2 omega^2 q q' = -4 damping q'^2; central difference error ~h^2 |E'''|
    rate = (energy[3] - energy[1]) / (2 * h)
    expected = -4 * damping * sol[2, :, 1] ** 2
    assert rel_err(rate, expected) < 1e-4


TIGHT = {"rtol": 1e-12, "atol": 1e-12, "method": "dopri5"}


def test_logistic_solution_matches_dopri() -> None:
    problem = Logistic(rate=1.5)
    below = 0.05 + 0.9 * torch.rand(6, 1, generator=torch.Generator().manual_seed(17), dtype=F64)
    above = torch.tensor([[1.6], [3.0]], dtype=F64)  # decays to 1 forward, blows up backward
    spans = [
        (torch.cat([below, above]), torch.linspace(0.0, 5.0, 11, dtype=F64)),
        (below, torch.linspace(2.0, -1.0, 7, dtype=F64)),  # backward in time
    ]
    for x0, ts in spans:
        closed = problem.solution(x0, ts)
        ref = dopri(problem.f, x0, ts, **TIGHT)
        # dopri5 at rtol = atol = 1e-12: global error ~1e-11 over these spans; 1e-9 is safe
        assert rel_err(closed, ref) < 1e-9
        # at t0 the closed form is 1 / (1 + (1/x0 - 1)), which may round by an ulp
        assert rel_err(closed[0], x0) < 1e-15


def test_riccati_solution_matches_dopri() -> None:
    problem = TimeDependentRiccati()
    # x0 in (0.1, 0.9) at t0 = -1: 1/x0 - 1 > 0, so the solution exists on all of [-1, 2]
    x0 = 0.1 + 0.8 * torch.rand(8, 2, generator=torch.Generator().manual_seed(18), dtype=F64)
    for ts in (torch.linspace(-1.0, 2.0, 13, dtype=F64), torch.linspace(1.0, 0.0, 5, dtype=F64)):
        closed = problem.solution(x0, ts)
        ref = dopri(problem.f, x0, ts, **TIGHT)
        assert rel_err(closed, ref) < 1e-9  # as for the logistic problem
        assert rel_err(closed[0], x0) < 1e-15  # 1 / (1/x0) may round by an ulp
