"""Identities between solvers, and model-evaluation counts as the ODE counts them."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from conftest import benchmark_module

import bdia
from bdia.models import toy

MIXTURE = toy.GaussianMixture.random(dim=4, components=3, seed=3)
GEN = torch.Generator().manual_seed(7)
X = torch.randn(16, 4, dtype=torch.float64, generator=GEN)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ first order


@pytest.mark.parametrize("t,t_next", [(10.0, 7.0), (0.5, 0.3), (0.3, 0.5), (2.0, 0.0)])
def test_first_order_solvers_agree_step_for_step_in_edm(t, t_next):
    """ddim, euler, DPM-Solver-1 and DPM-Solver++-1 are one update written four ways.

    Tolerance 1e-13 relative: the four formulas differ only in float64 rounding of a few
    operations on O(1) quantities.
    """
    ode = MIXTURE.ode(bdia.EDM())
    x = (t + 0.5) * X
    steps = {
        n: bdia.get_solver(n).flow(ode, t, t_next, x)
        for n in ["ddim", "euler", "dpm_solver_1", "dpm_solver_pp_1"]
    }
    for name, value in steps.items():
        assert rel(value, steps["euler"]) < 1e-13, name


EXPONENTIAL = [
    "ddim",
    "dpm_solver_1",
    "dpm_solver_2",
    "dpm_solver_3",
    "dpm_solver_pp_1",
    "dpm_solver_pp_2s",
    "dpm_solver_pp_3s",
]


@pytest.mark.parametrize("name", EXPONENTIAL)
@pytest.mark.parametrize("toward", ["data", "noise"])
def test_a_step_below_the_log_snr_rounding_is_the_ddim_step(name, toward):
    """Two grid times one float64 spacing apart (a strictly monotone grid) can have the same
    log-SNR, so h = 0: every exponential integrator then takes the step of zero length in
    log-SNR, which the DDIM step is to rounding.

    Tolerance 8 u max|x|: the step moves x by about one unit in the last place (|eps| ~ 1),
    and the formulas differ in the rounding of a few operations on x.
    """
    ode = MIXTURE.ode(bdia.EDM())
    t, t_next = 80.0, math.nextafter(80.0, 0.0)
    if toward == "noise":
        t, t_next = t_next, t
    assert ode.schedule.log_snr(t) == ode.schedule.log_snr(t_next)
    x = 80.0 * X
    step = bdia.get_solver(name).flow(ode, t, t_next, x)
    ddim = bdia.get_solver("ddim").flow(ode, t, t_next, x)
    assert float((step - ddim).abs().max()) <= 8 * 2.0**-53 * float(x.abs().max())


def test_first_order_exponential_solvers_agree_on_vp_schedule():
    """On a VP schedule Euler differs from DDIM, but the three exponential forms agree (1e-12)."""
    sched = bdia.VPLinear()
    ode = MIXTURE.ode(sched)
    ts = bdia.uniform_logsnr_grid(10, 0.9, 0.02, sched)
    outs = {
        n: bdia.sample(ode, bdia.get_solver(n), X, ts)
        for n in ["ddim", "dpm_solver_1", "dpm_solver_pp_1"]
    }
    assert rel(outs["dpm_solver_1"], outs["ddim"]) < 1e-12
    assert rel(outs["dpm_solver_pp_1"], outs["ddim"]) < 1e-12
    euler = bdia.sample(ode, bdia.get_solver("euler"), X, ts)
    assert rel(euler, outs["ddim"]) > 1e-4  # a genuinely different method there


# ------------------------------------------------------------------------- EDM


def edm_deterministic_sampler(denoiser, x, sigmas):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 with no churn), written out."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, torch.full((x.shape[0],), s, dtype=x.dtype))) / s
        x_next = x + (s_next - s) * d
        if s_next != 0:
            d_next = x_next - denoiser(x_next, torch.full((x.shape[0],), s_next, dtype=x.dtype))
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_next / s_next)
        x = x_next
    return x


def test_heun_on_edm_grid_is_edms_sampler_with_35_nfe():
    ts = bdia.karras_grid(18)  # sigma_max 80, sigma_min 0.002, rho 7, final 0
    assert len(ts) == 19 and float(ts[-1]) == 0.0
    ode = MIXTURE.ode(bdia.EDM())
    x = 80.0 * X
    out = bdia.sample(ode, bdia.get_solver("heun"), x, ts)
    assert ode.nfe == 35
    ref = edm_deterministic_sampler(MIXTURE.denoiser, x, [float(s) for s in ts])
    # Same arithmetic up to the order of a few float64 operations.
    assert rel(out, ref) < 1e-13


@pytest.mark.parametrize("sigma", [80.0, 0.5, 0.002])
def test_an_evaluation_under_edm_makes_only_edms_own_operations(sigma):
    """EDM's sampler forms d = (x - D(x, sigma)) / sigma: besides the network, a (batch,)
    sigma tensor, a subtraction and a division. The library's evaluation under EDM() makes
    those and no more: alpha = 1 and sigma'(t) = 1 there, and dividing or multiplying the
    state by them would be a pass over it per evaluation (on a GPU, a kernel each)."""
    ops = benchmark_module("sampler_ops")
    x = sigma * X
    network = ops.CountedNetwork(MIXTURE.denoiser)
    ode = bdia.DiffusionODE(network, bdia.EDM())
    made = ops.count(network, lambda: ode.evaluate(sigma, x))
    assert made == collections.Counter({"full": 1, "sub": 1, "div": 1}), made
    expected = (x - MIXTURE.denoiser(x, torch.full((16,), sigma, dtype=x.dtype))) / sigma
    # the same operations, the same bits
    assert torch.equal(ode.evaluate(sigma, x).derivative, expected)


# ---------------------------------------------------------------- gamma = 0


@pytest.mark.parametrize("name", bdia.available_solvers())
def test_bdia_with_gamma_zero_is_the_base_solver(name):
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(8, sigma_max=10.0)
    base = bdia.sample(ode, bdia.get_solver(name), 10.0 * X, ts)
    base_nfe = ode.nfe
    ode.reset_nfe()
    wrapped = bdia.sample(ode, bdia.bdia(name, gamma=0.0), 10.0 * X, ts)
    assert torch.equal(wrapped, base)
    assert ode.nfe == base_nfe


# ---------------------------------------------------------------------- O-BELM


def obelm_reference(denoiser, schedule, x, ts):
    """O-BELM (Wang et al. 2024) in its own variables, x_bar = x / alpha and sigma_bar.

    With the grid indexed so that i decreases towards the data, h_i = sigma_bar_i -
    sigma_bar_{i-1}, and eps_i the noise prediction at (x_i, sigma_bar_i)::

        x_bar_{i-1} = h_i^2 / h_{i+1}^2 x_bar_{i+1} + (h_{i+1}^2 - h_i^2) / h_{i+1}^2 x_bar_i
                      - h_i (h_i + h_{i+1}) / h_{i+1} eps_i

    The first step, which has no x_{i+1}, is DDIM: x_bar_{i-1} = x_bar_i - h_i eps_i.
    """
    times = [float(t) for t in ts]
    sb = [schedule.sigma_bar(t) for t in times]
    al = [schedule.alpha(t) for t in times]
    n = len(times) - 1
    # Paper index i runs n, n-1, ..., 0 as our grid index k runs 0, 1, ..., n: i = n - k.
    xbar = {n: x / al[0]}

    def eps(i):
        k = n - i
        s = torch.full((x.shape[0],), sb[k], dtype=x.dtype)
        return (xbar[i] - denoiser(xbar[i], s)) / sb[k]

    def h(i):  # sigma_bar_i - sigma_bar_{i-1}, positive
        return sb[n - i] - sb[n - i + 1]

    xbar[n - 1] = xbar[n] - h(n) * eps(n)
    for i in range(n - 1, 0, -1):
        hi, hi1 = h(i), h(i + 1)
        xbar[i - 1] = (
            hi**2 / hi1**2 * xbar[i + 1]
            + (hi1**2 - hi**2) / hi1**2 * xbar[i]
            - hi * (hi + hi1) / hi1 * eps(i)
        )
    return al[-1] * xbar[0]


@pytest.mark.parametrize(
    "schedule,grid",
    [
        (bdia.EDM(), lambda s: bdia.karras_grid(12, sigma_max=20.0, final_zero=False)),
        (bdia.VPLinear(), lambda s: bdia.quadratic_t_grid(15, 0.95, 0.01, s)),
        (bdia.VPCosine(), lambda s: bdia.uniform_t_grid(11, 0.9, 0.02, s)),
    ],
    ids=["edm-karras", "vp-linear-quadratic", "vp-cosine-uniform"],
)
def test_obelm_schedule_equals_obelm(schedule, grid):
    """bdia(ddim, "obelm") against O-BELM's own update on non-uniform grids.

    Tolerance 1e-12 relative: the two compute the same linear combination in different
    variables (x versus x / alpha), so they differ by float64 rounding amplified at most by
    the O(10) coefficient ratios of the grid.
    """
    ts = grid(schedule)
    ode = MIXTURE.ode(schedule)
    x = (schedule.sigma(float(ts[0])) + 0.5) * X
    ours = bdia.sample(ode, bdia.bdia("ddim", "obelm"), x, ts)
    theirs = obelm_reference(MIXTURE.denoiser, schedule, x, ts)
    assert rel(ours, theirs) < 1e-12
    gammas = bdia.bdia("ddim", "obelm").gammas(ode, ts)
    assert max(gammas) != min(gammas)  # the grid really is non-uniform


def test_obelm_gamma_on_uniform_sigma_grid_in_edm_is_one():
    ode = MIXTURE.ode(bdia.EDM())
    gammas = bdia.bdia("ddim", "obelm").gammas(ode, bdia.uniform_t_grid(10, 5.0, 0.5))
    assert gammas == pytest.approx([1.0] * 9, rel=1e-12)


# --------------------------------------------------------------------------- NFE


def count(ode, solver, ts, start=None, invert=False):
    ode.reset_nfe()
    x = (float(ts[0]) + 0.5) * X if start is None else start
    if invert:
        bdia.invert(ode, solver, x, ts)
    else:
        bdia.sample(ode, solver, x, ts)
    return ode.nfe


@pytest.mark.parametrize("base", ["euler", "ddim", "dpm_solver_1", "dpm_solver_pp_1"])
def test_bdia_over_one_stage_base_costs_what_the_base_costs(base):
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(25, sigma_max=10.0, final_zero=False)
    wrapped = bdia.bdia(base, 0.96)
    assert count(ode, wrapped, ts) == count(ode, bdia.get_solver(base), ts) == 25
    assert wrapped.nfe_per_step == 1
    pair = bdia.sample(ode, wrapped, X, ts, return_pair=True)
    assert count(ode, wrapped, ts, start=pair, invert=True) == 24  # updates k = 24 .. 1


@pytest.mark.parametrize(
    "base,stages", [("heun", 2), ("midpoint", 2), ("rk4", 4), ("dpm_solver_3", 3)]
)
def test_bdia_over_multi_stage_base_costs_2s_minus_1_per_update(base, stages):
    ode = MIXTURE.ode(bdia.EDM())
    steps = 10
    ts = bdia.karras_grid(steps, sigma_max=10.0, final_zero=False)
    wrapped = bdia.bdia(base, 0.96)
    assert wrapped.nfe_per_step == 2 * stages - 1
    # The first step is a plain base step; each later update shares one evaluation.
    assert count(ode, wrapped, ts) == stages + (steps - 1) * (2 * stages - 1)
    assert count(ode, bdia.get_solver(base), ts) == steps * stages
    # Inversion repeats each update's evaluations: from a single state it spends `stages` on
    # its approximate first step, as sampling does on its plain one; from a pair it has none.
    pair = bdia.sample(ode, wrapped, X, ts, return_pair=True)
    assert count(ode, wrapped, ts, start=pair, invert=True) == (steps - 1) * (2 * stages - 1)
    single = count(ode, wrapped, ts, start=pair.later, invert=True)
    assert single == stages + (steps - 1) * (2 * stages - 1)


def test_bdia_heun_costs_three_per_interior_step_and_drops_to_euler_at_sigma_zero():
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(18)  # final 0
    # step 0: heun (2); steps 1..16: 3 each; step 17 ends at sigma = 0: the forward heun
    # becomes Euler (shared evaluation only) and the backward heun adds one: 2.
    assert count(ode, bdia.bdia("heun", 0.96), ts) == 2 + 16 * 3 + 2


@pytest.mark.parametrize("base", ["dpm_solver_2", "dpm_solver_pp_3s"])
def test_bdia_over_an_exponential_integrator_takes_the_last_step_at_first_order(base):
    # No stage lands on sigma = 0 (they sit inside the step in log-SNR), but a step that ends
    # there is DDIM: the final update costs s, as for Heun.
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(18)  # final 0
    s = bdia.get_solver(base).stages
    assert count(ode, bdia.get_solver(base), ts) == 17 * s + 1
    assert count(ode, bdia.bdia(base, 0.96), ts) == s + 16 * (2 * s - 1) + s
