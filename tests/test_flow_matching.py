"""Flow matching: the RectifiedFlow schedule, flow-velocity networks and the pure-noise end.

The reference is the toy mixture's exact velocity integrated by dopri5 at 1e-12 in float64
(``flow_solution``), so a solver's error against it is its own truncation error down to about
1e-11.
"""

from __future__ import annotations

import math

import pytest
import torch

import bdia
from bdia.models import toy

RF = bdia.RectifiedFlow()
MIXTURE = toy.GaussianMixture.random(dim=2, components=4, seed=0)


def _noise(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- schedule


def test_rectified_flow_is_the_straight_path():
    for t in (0.0, 0.125, 0.5, 0.9, 1.0):
        assert RF.alpha(t) == 1.0 - t
        assert RF.sigma(t) == t
        assert RF.alpha_dot(t) == -1.0 and RF.sigma_dot(t) == 1.0
    # The pure-noise end: alpha = 0, and the scaled noise level and log-SNR are infinite.
    assert RF.sigma_bar(1.0) == math.inf
    assert RF.log_snr(1.0) == -math.inf
    assert RF.log_snr(0.0) == math.inf


@pytest.mark.parametrize("t", [1e-9, 1e-3, 0.25, 0.5, 0.75, 0.999, 1.0 - 1e-9, 1.0])
def test_time_from_log_snr_inverts_log_snr(t):
    # t = 1 / (1 + e^lambda) costs a few roundings of exp and log: 1e-14 relative (5e-14 near
    # t = 0, where lambda = log1p(-t) - log t carries log t's rounding into exp).
    back = RF.t_from_log_snr(RF.log_snr(t))
    assert back == pytest.approx(t, rel=5e-14, abs=0)


def test_time_from_sigma_bar_reaches_both_ends():
    assert RF.t_from_sigma_bar(math.inf) == 1.0
    assert RF.t_from_sigma_bar(0.0) == 0.0
    assert RF.t_from_sigma_bar(1.0) == pytest.approx(0.5, rel=1e-15)


def test_times_outside_zero_one_are_refused():
    with pytest.raises(ValueError, match=r"ts\[0\] = 1\.5 lies outside RectifiedFlow"):
        bdia.uniform_t_grid(4, 1.5, 0.0, RF)


# ---------------------------------------------------------------------------- velocity


@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_mixture_velocity_is_eps_minus_x0_of_the_exact_denoiser(t):
    """u = eps - x0 with both from the EDM-form denoiser at x_bar = x / (1 - t),
    sigma_bar = t / (1 - t): two formulas for one posterior, equal to rounding (3e-14 seen at
    t = 0.01, where eps = (x_bar - D) / sigma_bar divides by 0.0101)."""
    x = _noise(8, seed=1)
    u = MIXTURE.flow_velocity(x, torch.full((8,), t, dtype=torch.float64))
    x_bar = x / (1.0 - t)
    sigma_bar = torch.full((8,), t / (1.0 - t), dtype=torch.float64)
    d = MIXTURE.denoiser(x_bar, sigma_bar)
    eps = (x_bar - d) / sigma_bar[:, None]
    assert _max_error(u, eps - d) < 1e-12


def test_mixture_velocity_at_pure_noise_is_the_state_minus_the_data_mean():
    x = _noise(8, seed=2)
    u = MIXTURE.flow_velocity(x, torch.ones(8, dtype=torch.float64))
    mean = MIXTURE.weights @ MIXTURE.means
    assert _max_error(u, x - mean) < 1e-15


# ---------------------------------------------------------------------------- evaluation


def test_flow_prediction_gives_the_velocity_as_the_derivative_and_consistent_estimates():
    ode = MIXTURE.flow_ode()
    x = _noise(8, seed=3)
    for t in (1.0, 0.6, 0.05):
        e = ode.evaluate(t, x)
        u = MIXTURE.flow_velocity(x, torch.full((8,), t, dtype=torch.float64))
        assert torch.equal(e.derivative, u)
        # x = alpha x0 + sigma eps and u = eps - x0, to rounding.
        assert _max_error((1 - t) * e.denoised + t * e.eps, x) < 1e-14
        assert _max_error(e.eps - e.denoised, u) < 1e-14


def test_flow_network_is_evaluated_at_sigma_zero():
    """At t = 0 the velocity is finite and alpha sigma' - sigma alpha' = 1, so the estimates are
    x0 = x and eps = x + u exactly: no division rounds."""
    ode = MIXTURE.flow_ode()
    x = _noise(8, seed=7)
    assert not ode.is_terminal(0.0)
    e = ode.evaluate(0.0, x)
    u = MIXTURE.flow_velocity(x, torch.zeros(8, dtype=torch.float64))
    assert torch.isfinite(u).all()
    assert torch.equal(e.derivative, u)
    assert torch.equal(e.denoised, x)
    assert torch.equal(e.eps, x + u)
    assert ode.nfe == 1


def _counted(pred: str) -> tuple[bdia.DiffusionODE, list[int]]:
    """An ODE of a ``pred`` network that records its calls, and the record."""
    calls: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x

    return bdia.DiffusionODE(net, RF, prediction=pred), calls


@pytest.mark.parametrize("pred", ["denoised", "eps", "x0", "v"])
def test_other_networks_are_refused_at_sigma_zero_before_the_call(pred):
    """Their estimates divide by sigma (or by sigma_bar) at t = 0."""
    ode, calls = _counted(pred)
    assert ode.is_terminal(0.0)
    with pytest.raises(ValueError, match=r"cannot be evaluated at t = 0\.0, where sigma = 0"):
        ode.evaluate(0.0, _noise(4))
    assert calls == [] and ode.nfe == 0


def _other_predictions(pred: str):
    """A network of the mixture that predicts ``pred`` from the exact velocity."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = MIXTURE.flow_velocity(x, t)
        tt = t[:, None]
        x0, eps = x - tt * u, x + (1 - tt) * u
        return x0 if pred == "x0" else (1 - tt) * eps - tt * x0  # v = alpha eps - sigma x0

    return net


@pytest.mark.parametrize("pred", ["x0", "v"])
def test_x0_and_v_networks_are_evaluated_at_pure_noise(pred):
    """At alpha = 0 the derivative is written as alpha' x0 + sigma' eps; it equals the
    flow network's to rounding (1e-15 on states of size 3)."""
    ode = bdia.DiffusionODE(_other_predictions(pred), RF, prediction=pred)
    x = _noise(8, seed=4)
    for t in (1.0, 0.4):
        got = ode.evaluate(t, x).derivative
        want = MIXTURE.flow_ode().evaluate(t, x).derivative
        assert _max_error(got, want) < 1e-14


@pytest.mark.parametrize("pred", ["denoised", "eps"])
def test_denoiser_and_eps_networks_are_refused_at_pure_noise_before_the_call(pred):
    ode, calls = _counted(pred)
    with pytest.raises(ValueError, match=r"cannot be evaluated at t = 1\.0, where alpha = 0"):
        bdia.sample(ode, bdia.get_solver("euler"), _noise(4), bdia.uniform_t_grid(4, 1.0, 0.0, RF))
    assert calls == [] and ode.nfe == 0


def test_denoiser_form_below_pure_noise_equals_the_flow_form():
    """One ODE written two ways (x_bar, sigma_bar and the denoiser; x, t and the velocity):
    Heun on 10 steps agrees to rounding (2.4e-15 seen). The grid ends above t = 0, where the
    denoiser's last step would fall back to Euler and the flow network's would not."""
    ts = bdia.uniform_t_grid(10, 0.99, 0.01, RF)
    a = bdia.sample(MIXTURE.ode(RF), bdia.get_solver("heun"), _noise(), ts)
    b = bdia.sample(MIXTURE.flow_ode(), bdia.get_solver("heun"), _noise(), ts)
    assert _max_error(a, b) < 1e-13


# ---------------------------------------------------------------------------- solvers


def test_euler_in_flow_time_is_ddim():
    """Under RectifiedFlow, x + (t' - t) u = (1 - t') x0 + t' eps: Euler and DDIM take the
    same step, one written with the velocity and one with the two estimates (20 steps from
    pure noise agree to 1.6e-15)."""
    ts = bdia.uniform_t_grid(20, 1.0, 0.0, RF)
    ode = MIXTURE.flow_ode()
    e = bdia.sample(ode, bdia.get_solver("euler"), _noise(), ts)
    d = bdia.sample(ode, bdia.get_solver("ddim"), _noise(), ts)
    assert _max_error(e, d) < 1e-13


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(("name", "order"), [("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_runge_kutta_solvers_keep_their_order_from_pure_noise(name, order):
    """From t = 1 to 0.05 (away from the end at t = 0, whose last step is measured below), the
    error shrinks by 2^order per halving of the step: measured slopes 1.9 (heun), 1.9
    (midpoint), 3.9 (rk4) between 40 and 80 steps; asserted above order - 0.25."""
    ode = MIXTURE.flow_ode()
    x = _noise()
    ref = MIXTURE.flow_solution(x, [1.0, 0.05])[-1]
    errors = [
        _max_error(
            bdia.sample(ode, bdia.get_solver(name), x, bdia.uniform_t_grid(n, 1.0, 0.05, RF)), ref
        )
        for n in (40, 80)
    ]
    assert math.log2(errors[0] / errors[1]) > order - 0.25, errors


def test_heuns_last_step_to_sigma_zero_is_second_order():
    """A flow network is evaluated at t = 0, so heun's last step keeps its corrector: its local
    error from the exact state at t = h falls by 2^3 per halving of h (measured slopes 2.96,
    2.99, 2.99 from h = 0.04 to 0.005; the Euler step a denoiser's last step falls back to
    gives 2.05, 2.03, 2.01). Asserted above 2.75."""
    ode = MIXTURE.flow_ode()
    x = _noise()
    errors = []
    for h in (0.02, 0.01, 0.005):
        exact = MIXTURE.flow_solution(x, [1.0, h, 0.0])
        errors.append(_max_error(bdia.get_solver("heun").flow(ode, h, 0.0, exact[1]), exact[2]))
    assert all(math.log2(a / b) > 2.75 for a, b in zip(errors, errors[1:])), errors


def test_heun_to_sigma_zero_costs_two_evaluations_per_step_for_a_flow_network():
    """On n steps ending at t = 0, heun evaluates a flow network 2n times (the last corrector
    at t = 0 included) and the same mixture written as a denoiser 2n - 1 times (its last step
    is Euler's); the two results then differ by that last step."""
    ts = bdia.uniform_t_grid(10, 0.99, 0.0, RF)
    flow, denoiser = MIXTURE.flow_ode(), MIXTURE.ode(RF)
    a = bdia.sample(flow, bdia.get_solver("heun"), _noise(), ts)
    b = bdia.sample(denoiser, bdia.get_solver("heun"), _noise(), ts)
    assert (flow.nfe, denoiser.nfe) == (20, 19)
    assert _max_error(a, b) > 1e-6


@pytest.mark.parametrize(
    "name", ["dpm_solver_1", "dpm_solver_3", "dpm_solver_pp_1", "dpm_solver_pp_3s"]
)
@pytest.mark.parametrize(("t", "t_next"), [(1.0, 0.9), (0.1, 0.0)], ids=["pure-noise", "clean"])
def test_exponential_solvers_step_at_either_end_as_ddim(name, t, t_next):
    """The log-SNR step from or to alpha = 0 (t = 1) or sigma = 0 (t = 0) is infinite, also
    where the flow network can be evaluated (t = 0), so the step is DDIM's, whose first stage
    is the only evaluation; forward from t and backward to it."""
    ode = MIXTURE.flow_ode()
    x = _noise()
    solver, ddim = bdia.get_solver(name), bdia.get_solver("ddim")
    ode.reset_nfe()
    forward = solver.flow(ode, t, t_next, x)
    assert ode.nfe == 1
    assert torch.equal(forward, ddim.flow(ode, t, t_next, x))
    ode.reset_nfe()
    backward = solver.flow(ode, t_next, t, forward)
    assert ode.nfe == 1
    assert torch.isfinite(backward).all()
    assert torch.equal(backward, ddim.flow(ode, t_next, t, forward))


@pytest.mark.parametrize("base", ["euler", "heun", "ddim", "dpm_solver_pp_2s", "rk4"])
def test_bdia_from_pure_noise_inverts_exactly(base):
    """Sampled from t = 1 and inverted back to it: the inverse is algebraically exact, so the
    float64 round trip is rounding, amplified by at most 0.96^-23 ~ 2.6 (0 to 4e-16 seen)."""
    ode = MIXTURE.flow_ode()
    ts = bdia.uniform_t_grid(24, 1.0, 0.0, RF)
    solver = bdia.bdia(bdia.get_solver(base), 0.96)
    x = _noise()
    pair = bdia.sample(ode, solver, x, ts, return_pair=True)
    back = bdia.invert(ode, solver, pair, ts)
    assert _max_error(back.earlier, x) < 1e-14


def test_bdia_from_pure_noise_follows_the_flow():
    """bdia(heun, 0.96) on 24 uniform steps from t = 1 is as close to the exact flow as
    heun (9.4e-3 against 9.2e-3 at 20 steps); asserted within 1.5x of heun."""
    ode = MIXTURE.flow_ode()
    ts = bdia.uniform_t_grid(24, 1.0, 0.0, RF)
    x = _noise()
    ref = MIXTURE.flow_solution(x, ts[[0, -1]])[-1]
    heun = _max_error(bdia.sample(ode, bdia.get_solver("heun"), x, ts), ref)
    both = _max_error(bdia.sample(ode, bdia.bdia(bdia.get_solver("heun"), 0.96), x, ts), ref)
    assert both < 1.5 * heun


def test_obelm_refuses_a_grid_from_pure_noise():
    solver = bdia.bdia(bdia.get_solver("euler"), "obelm")
    with pytest.raises(ValueError, match=r"gamma='obelm' needs a finite noise level"):
        bdia.sample(MIXTURE.flow_ode(), solver, _noise(4), bdia.uniform_t_grid(4, 1.0, 0.0, RF))


def test_data_inverted_to_pure_noise_and_reconstructed():
    """Editing's inversion runs the grid from the data (taken at t = 0.01, where the model can
    be evaluated) to t = 1 and back: exact to rounding."""
    ode = MIXTURE.flow_ode()
    ts = bdia.uniform_t_grid(30, 1.0, 0.01, RF)
    data = MIXTURE.sample_data(16, torch.Generator().manual_seed(5))
    inversion = bdia.Inversion.of(ode, bdia.bdia(bdia.get_solver("euler"), 0.96), data, ts)
    assert torch.isfinite(inversion.noise).all()
    assert _max_error(inversion.reconstruct(), data) < 1e-13


@pytest.mark.parametrize(
    "solver",
    [
        bdia.bdia(bdia.get_solver("euler"), 0.96),
        bdia.bdia(bdia.get_solver("heun"), 0.96),
        bdia.bdia(bdia.get_solver("ddim"), 0.96),
        bdia.edict(bdia.get_solver("euler")),
        bdia.reversible(bdia.get_solver("heun")),
    ],
    ids=lambda s: s.name,
)
def test_data_at_sigma_zero_inverted_and_reconstructed(solver):
    """A flow network is evaluated at t = 0, so the data can be the state there, as in
    flow-inversion practice; BDIA's first backward step is a base step from t = 0, and the
    coupled solvers accept the grid. The round trip is exact to rounding in float64 (1e-13
    asserted on data of size 3)."""
    ode = MIXTURE.flow_ode()
    ts = bdia.uniform_t_grid(30, 1.0, 0.0, RF)
    data = MIXTURE.sample_data(16, torch.Generator().manual_seed(5))
    inversion = bdia.Inversion.of(ode, solver, data, ts)
    assert torch.isfinite(inversion.noise).all()
    assert _max_error(inversion.reconstruct(), data) < 1e-13


# ---------------------------------------------------------------------------- shifted grid


def test_shifted_grid_is_sd3s_shift_of_a_uniform_grid():
    """From 1 to 0 the preimages are 1 and 0, so t_k = 3 u_k / (1 + 2 u_k) with u uniform;
    one rounding of the formula apart at most (asserted 1e-15 absolute)."""
    ts = bdia.shifted_t_grid(8, 1.0, 0.0, shift=3.0, schedule=RF)
    u = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    assert ts.dtype == torch.float64 and ts.shape == (9,)
    assert _max_error(ts, 3.0 * u / (1.0 + 2.0 * u)) < 1e-15
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0


def test_shifted_grid_keeps_its_ends_and_shift_one_is_uniform():
    ts = bdia.shifted_t_grid(10, 0.9, 0.01, shift=5.0)
    assert ts[0].item() == 0.9 and ts[-1].item() == 0.01
    assert bool((ts[1:] < ts[:-1]).all())
    # More of the steps at high noise than the uniform grid: the midpoint lies above it.
    assert ts[5].item() > bdia.uniform_t_grid(10, 0.9, 0.01)[5].item()
    uniform = bdia.uniform_t_grid(10, 0.9, 0.01)
    assert _max_error(bdia.shifted_t_grid(10, 0.9, 0.01, shift=1.0), uniform) < 1e-16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_start": 1.2}, r"times in \[0, 1\]; t_start = 1\.2"),
        ({"t_end": -0.1}, r"times in \[0, 1\]; t_end = -0\.1"),
        ({"shift": 0.0}, r"shift must be a finite number > 0"),
        ({"shift": math.inf}, r"shift must be a finite number > 0"),
        ({"shift": "3"}, r"shift must be a finite number > 0"),
    ],
)
def test_shifted_grid_refuses_bad_ends_and_shifts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bdia.shifted_t_grid(4, **kwargs)


@pytest.mark.parametrize("data", [MIXTURE, toy.Gaussian([0.5, -0.5], 0.3)])
def test_scaled_space_references_refuse_pure_noise(data):
    with pytest.raises(ValueError, match=r"pure noise .* flow_solution"):
        data.solution(_noise(4), [1.0, 0.5], RF)


@pytest.mark.parametrize("base", ["euler", "heun", "ddim"])
def test_reversible_adjoint_from_pure_noise_is_autograds_gradient(base):
    """The reversible adjoint recomputes the states backward by the exact inverse, so its
    gradient is autograd's to rounding (equal bit for bit in the runs seen; 1e-12 asserted
    against gradients of size 4)."""
    ode = MIXTURE.flow_ode()
    ts = bdia.uniform_t_grid(12, 1.0, 0.05, RF)
    solver = bdia.bdia(bdia.get_solver(base), 0.96)
    grads = []
    for adjoint in ("reversible", "autograd"):
        x = _noise(8, seed=6).requires_grad_(True)
        out = bdia.sample(ode, solver, x, ts, adjoint=adjoint)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        grads.append(grad)
    assert _max_error(grads[0], grads[1]) < 1e-12


def test_fluxs_exponential_shift_is_the_shift_exp_mu():
    """Flux shifts u to e^mu / (e^mu + 1/u - 1); the docstring's claim that this is SD3's map
    with shift = e^mu, to rounding (1e-15 absolute)."""
    mu = 1.15
    ts = bdia.shifted_t_grid(10, 1.0, 0.05, shift=math.exp(mu))
    a = 0.05 / (math.exp(mu) - (math.exp(mu) - 1.0) * 0.05)
    u = torch.linspace(1.0, a, 11, dtype=torch.float64)
    flux = math.exp(mu) / (math.exp(mu) + 1.0 / u - 1.0)
    assert _max_error(ts, flux) < 1e-15
