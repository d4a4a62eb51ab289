"""Schedules (values, derivatives, inverse maps), grids, model adapters and driver outputs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import bdia
from bdia.models import toy

VP_BETAS = np.linspace(1e-4, 0.02, 1000)
SCHEDULES = {
    "edm": (bdia.EDM(), [0.01, 0.5, 3.0, 70.0]),
    "vp_linear": (bdia.VPLinear(), [0.001, 0.2, 0.6, 0.99]),
    "vp_cosine": (bdia.VPCosine(), [0.001, 0.3, 0.7, 0.99]),
    "vp_discrete": (bdia.VPDiscrete(betas=VP_BETAS), [0.0015, 0.2537, 0.6012, 0.9981]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_derivatives_match_central_differences(name):
    """alpha_dot and sigma_dot against central differences with step 1e-6.

    The difference quotient has truncation error ~h^2 |f'''| and rounding ~1e-16 / h, together
    below 1e-7 relative here; VPDiscrete's points avoid its knots, where log alpha has kinks.
    """
    sched, times = SCHEDULES[name]
    h = 1e-6
    for t in times:
        da = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
        ds = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
        assert sched.alpha_dot(t) == pytest.approx(da, rel=1e-6, abs=1e-9)
        assert sched.sigma_dot(t) == pytest.approx(ds, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_log_snr_inverse_round_trips(name):
    """t_from_log_snr(log_snr(t)) == t to 1e-10 relative: both maps are closed forms in float64
    (VPDiscrete: exact inverse of a piecewise-linear interpolation)."""
    sched, times = SCHEDULES[name]
    for t in times:
        assert sched.t_from_log_snr(sched.log_snr(t)) == pytest.approx(t, rel=1e-10)
        assert sched.t_from_sigma_bar(sched.sigma_bar(t)) == pytest.approx(t, rel=1e-10)


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "vp_discrete"])
def test_variance_preserving(name):
    sched, times = SCHEDULES[name]
    for t in times:
        assert sched.alpha(t) ** 2 + sched.sigma(t) ** 2 == pytest.approx(1.0, abs=1e-14)


def test_vp_linear_matches_its_beta_integral():
    """log alpha(t) = -1/2 int_0^t beta(s) ds with beta linear from 0.1 to 20 (exact quadrature)."""
    sched = bdia.VPLinear(0.1, 20.0)
    t = 0.37
    integral = 0.1 * t + 0.5 * (20.0 - 0.1) * t * t
    assert sched.log_alpha(t) == pytest.approx(-0.5 * integral, rel=1e-14)


def test_vp_linear_with_beta_min_zero_maps_sigma_zero_to_t_zero():
    """beta_min = 0 is accepted, and its clean end t = 0 is where sigma = 0: the inverse maps
    and a grid ending at sigma = 0 reach it (exactly: t = 0 is the root of the quadratic)."""
    sched = bdia.VPLinear(beta_min=0.0, beta_max=20.0)
    assert sched.t_from_sigma_bar(0.0) == 0.0
    assert sched.t_from_log_snr(math.inf) == 0.0
    ts = bdia.karras_grid(5, sigma_min=0.01, sigma_max=10.0, schedule=sched)
    assert ts[-1].item() == 0.0 and sched.sigma(ts[-1].item()) == 0.0
    assert sched.sigma_bar(ts[0].item()) == pytest.approx(10.0, rel=1e-12)


@pytest.mark.parametrize(
    "sched",
    [bdia.VPCosine(s=0.001), bdia.VPCosine(s=0.025), bdia.VPCosine(s=0.0), bdia.VPLinear()],
    ids=repr,
)
def test_a_grid_ending_at_sigma_zero_ends_exactly_at_the_clean_end(sched):
    """sigma_bar = 0 maps to t_min itself, not to the rounding of an inverse cosine near 1
    (VPCosine with s = 0.001 gave 7.2e-15)."""
    assert sched.t_from_sigma_bar(0.0) == sched.t_min == 0.0
    ts = bdia.karras_grid(5, sigma_min=0.01, sigma_max=10.0, schedule=sched)
    assert ts[-1].item() == 0.0


def test_vp_discrete_hits_its_knots():
    sched = bdia.VPDiscrete(betas=VP_BETAS)
    alphas_cumprod = np.cumprod(1 - VP_BETAS)
    for n in [0, 10, 500, 999]:
        t = (n + 1) / 1000
        assert sched.alpha(t) ** 2 == pytest.approx(alphas_cumprod[n], rel=1e-12)
    same = bdia.VPDiscrete(alphas_cumprod=alphas_cumprod)
    assert same.alpha(0.4321) == pytest.approx(sched.alpha(0.4321), rel=1e-12)


def test_karras_grid_matches_edm_formula():
    ts = bdia.karras_grid(18)
    i = torch.arange(18, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(ts[:-1], expected, rtol=1e-14, atol=0)
    assert ts[-1] == 0 and ts.dtype == torch.float64
    no_zero = bdia.karras_grid(18, final_zero=False)
    assert len(no_zero) == 19 and float(no_zero[-1]) == pytest.approx(0.002, rel=1e-14)


@pytest.mark.parametrize("rho", [0, -0.0, math.inf, math.nan, "7"])
def test_karras_grid_refuses_a_rho_that_is_not_positive_and_finite(rho) -> None:
    with pytest.raises(ValueError, match=r"rho must be a finite number > 0 .*EDM uses 7"):
        bdia.karras_grid(10, rho=rho)


def test_karras_grid_in_vp_time_has_the_requested_noise_levels():
    sched = bdia.VPLinear()
    ts = bdia.karras_grid(10, sigma_min=0.01, sigma_max=50.0, schedule=sched, final_zero=False)
    sigma_bars = [sched.sigma_bar(float(t)) for t in ts]
    assert sigma_bars[0] == pytest.approx(50.0, rel=1e-10)
    assert sigma_bars[-1] == pytest.approx(0.01, rel=1e-10)


def test_karras_grid_refuses_sigmas_outside_vp_discrete():
    sched = bdia.VPDiscrete(betas=VP_BETAS)
    lo, hi = sched.sigma_bar_range()
    assert lo == pytest.approx(0.0100005, rel=1e-5) and hi == pytest.approx(157.407, rel=1e-5)
    noise_range = r"noise range: sigma_bar from 0.0100005 \(at t_min = 0.001\) to 157.407"
    # the defaults: sigma_min = 0.002 lies below the schedule's smallest noise level (this used
    # to clamp to t_min and return a grid with repeated times)
    with pytest.raises(
        ValueError, match=r"sigma_min = 0.002 lies outside VPDiscrete\(N=1000\)'s " + noise_range
    ):
        bdia.karras_grid(10, schedule=sched, final_zero=False)
    with pytest.raises(ValueError, match=r"sigma_max = 200 lies outside .*" + noise_range):
        bdia.karras_grid(10, sigma_min=0.02, sigma_max=200.0, schedule=sched, final_zero=False)
    with pytest.raises(ValueError, match=r"never reaches .*0.0100005.*use final_zero=False"):
        bdia.karras_grid(10, sigma_min=0.02, schedule=sched)


def test_karras_grid_refuses_sigma_max_beyond_vp_cosine_t_max():
    with pytest.raises(
        ValueError,
        match=r"sigma_max = 200 lies outside VPCosine.*to 118.824 "
        r"\(at t_max = 0.9946\)",
    ):
        bdia.karras_grid(10, sigma_max=200.0, schedule=bdia.VPCosine(), final_zero=False)


def test_karras_grid_on_the_ends_of_a_schedule_range():
    """sigma_min and sigma_max equal to the range's ends map to t_min and t_max: the inverse
    map may round a last bit outside the domain, which must be absorbed, not refused."""
    for sched in (bdia.VPDiscrete(betas=VP_BETAS), bdia.VPCosine()):
        lo, hi = sched.sigma_bar_range()
        lo = max(lo, 1e-3)
        ts = bdia.karras_grid(6, sigma_min=lo, sigma_max=hi, schedule=sched, final_zero=False)
        # 1e-9 relative: the range checks' slack; the round trip itself is good to ~1e-15
        assert float(ts[0]) == pytest.approx(sched.t_max, rel=1e-9)
        assert sched.sigma_bar(float(ts[-1])) == pytest.approx(lo, rel=1e-9)
        assert all(a > b for a, b in zip(ts.tolist(), ts.tolist()[1:]))


@pytest.mark.parametrize(
    "sched, log_snr, shown",
    [
        (bdia.VPDiscrete(betas=VP_BETAS), 8.0, "0.000335463"),
        (bdia.VPDiscrete(betas=VP_BETAS), -6.0, "403.429"),
        (bdia.VPDiscrete(betas=VP_BETAS), math.inf, "0"),
        (bdia.VPCosine(), -5.0, "148.413"),
        (bdia.VPLinear(), -800.0, "inf"),
    ],
)
def test_inverse_maps_refuse_values_outside_the_noise_range(sched, log_snr, shown):
    pattern = rf"sigma_bar = {shown} lies outside {re.escape(repr(sched))}'s noise range"
    with pytest.raises(ValueError, match=pattern):
        sched.t_from_log_snr(log_snr)
    if abs(log_snr) < 700 or log_snr == math.inf:  # exp(800) overflows a float
        with pytest.raises(ValueError, match=pattern):
            sched.t_from_sigma_bar(math.exp(-log_snr))


def test_inverse_maps_refuse_nan():
    with pytest.raises(ValueError, match="log-SNR is NaN"):
        bdia.VPLinear().t_from_log_snr(float("nan"))
    with pytest.raises(ValueError, match="sigma_bar must be >= 0, got nan"):
        bdia.EDM().t_from_sigma_bar(float("nan"))


def test_uniform_logsnr_grid_names_the_end_with_sigma_zero():
    with pytest.raises(ValueError, match=r"sigma > 0 at both ends; t_end = 0.0 has sigma = 0"):
        bdia.uniform_logsnr_grid(4, 0.9, 0.0, bdia.VPLinear())
    with pytest.raises(ValueError, match=r"ts\[0\] = 1.5 lies outside VPCosine"):
        bdia.uniform_logsnr_grid(4, 1.5, 0.1, bdia.VPCosine())


def test_logsnr_and_quadratic_grids():
    sched = bdia.VPCosine()
    ts = bdia.uniform_logsnr_grid(8, 0.9, 0.05, sched)
    lam = np.array([sched.log_snr(float(t)) for t in ts])
    assert np.allclose(np.diff(lam), (lam[-1] - lam[0]) / 8, rtol=1e-9)
    q = bdia.quadratic_t_grid(4, 1.0, 0.0)
    assert q.tolist() == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0], abs=1e-15)


@pytest.mark.parametrize("steps", [np.int64(6), torch.tensor(6), 6])
def test_grids_take_steps_of_any_integer_type(steps) -> None:
    """A count computed with numpy or torch is a count; the grid is that of the int."""
    vp = bdia.VPLinear()
    for grid, reference in (
        (bdia.karras_grid(steps), bdia.karras_grid(6)),
        (bdia.uniform_t_grid(steps, 1.0, 0.1), bdia.uniform_t_grid(6, 1.0, 0.1)),
        (bdia.quadratic_t_grid(steps, 1.0, 0.1), bdia.quadratic_t_grid(6, 1.0, 0.1)),
        (
            bdia.uniform_logsnr_grid(steps, 1.0, 1e-3, vp),
            bdia.uniform_logsnr_grid(6, 1.0, 1e-3, vp),
        ),
    ):
        assert torch.equal(grid, reference)


@pytest.mark.parametrize("steps", [True, 6.0, "6", torch.tensor(6.0)])
def test_grids_refuse_steps_that_are_not_an_integer(steps) -> None:
    with pytest.raises(TypeError, match="steps must be an integer .*, got "):
        bdia.karras_grid(steps)


@pytest.mark.parametrize("steps", [0, -2])
def test_grids_refuse_steps_below_one(steps) -> None:
    with pytest.raises(ValueError, match=f"steps must be 1 or more, got {steps}"):
        bdia.karras_grid(steps)


def test_grid_ends_given_as_tensors_are_their_values() -> None:
    """Ends read off another grid (0-dim tensors, float32 or float64, or numpy scalars) give
    the grid of their values as Python floats, bit for bit."""
    vp = bdia.VPLinear()
    t0, t1 = torch.tensor(1.0), torch.tensor(1e-3, dtype=torch.float64)
    expected = bdia.uniform_logsnr_grid(5, 1.0, float(t1), vp)
    assert torch.equal(bdia.uniform_logsnr_grid(5, t0, t1, vp), expected)
    assert torch.equal(bdia.uniform_logsnr_grid(5, np.float64(1.0), t1, vp), expected)
    karras = bdia.karras_grid(5, sigma_max=torch.tensor(80.0), rho=torch.tensor(7.0))
    assert torch.equal(karras, bdia.karras_grid(5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: bdia.uniform_t_grid(4, 0.5, 0.5),
        lambda: bdia.quadratic_t_grid(4, 0.5, 0.5),
        lambda: bdia.uniform_logsnr_grid(4, 0.5, 0.5, bdia.VPLinear()),
    ],
)
def test_grids_refuse_equal_ends(make) -> None:
    with pytest.raises(ValueError, match="t_start and t_end are both 0.5; a grid needs two"):
        make()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: bdia.uniform_t_grid(4, math.nan, 0.5), "t_start"),
        (lambda: bdia.quadratic_t_grid(4, 1.0, math.inf), "t_end"),
        (lambda: bdia.karras_grid(4, sigma_max=math.inf), "sigma_max"),
        (lambda: bdia.karras_grid(4, sigma_min=math.nan), "sigma_min"),
    ],
)
def test_grids_refuse_ends_that_are_not_finite(make, name) -> None:
    with pytest.raises(ValueError, match=rf"{name} = (nan|inf) is not a finite number"):
        make()


@pytest.mark.parametrize("value", ["1.0", None, torch.ones(2)])
def test_grid_ends_must_be_numbers(value) -> None:
    with pytest.raises(TypeError, match="t_start must be a real number"):
        bdia.uniform_t_grid(4, value, 0.1)


def test_uniform_logsnr_grid_needs_a_schedule() -> None:
    with pytest.raises(TypeError, match=r"needs a Schedule instance .*got NoneType"):
        bdia.uniform_logsnr_grid(4, 1.0, 0.1, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: bdia.VPCosine(s=-1.0), r"s = -1.0 must be a finite number >= 0"),
        (lambda: bdia.VPCosine(s=math.nan), r"s = nan must be a finite number >= 0"),
        (lambda: bdia.VPLinear(beta_max=math.inf), r"beta_max = inf .*finite"),
        (lambda: bdia.VPLinear(beta_min=math.nan), r"need 0 <= beta_min < beta_max"),
    ],
)
def test_schedules_refuse_parameters_without_a_schedule(make, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


# ---------------------------------------------------------------- model adapters


@pytest.mark.parametrize("schedule", [bdia.VPLinear(), bdia.VPCosine(), bdia.EDM()])
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_adapters_describe_the_same_ode_as_the_denoiser(schedule, kind):
    """An eps-, x0- or v-prediction wrapper of the exact denoiser gives the same derivative.

    Tolerance 1e-12 relative: the conversions are a few float64 operations on O(1) values.
    """
    mixture = toy.GaussianMixture.random(3, 3, seed=4)

    def model(x, t):
        t0 = float(t[0])
        alpha, sigma = schedule.alpha(t0), schedule.sigma(t0)
        x0 = mixture.denoiser(x / alpha, torch.full_like(t, sigma / alpha))
        eps = (x - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[kind]

    wrapped = {
        "eps": bdia.DiffusionODE.from_eps,
        "x0": bdia.DiffusionODE.from_x0,
        "v": bdia.DiffusionODE.from_v,
    }[kind](model, schedule)
    direct = mixture.ode(schedule)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in [0.3, 0.8] if not isinstance(schedule, bdia.EDM) else [0.3, 5.0]:
        a, b = wrapped.evaluate(t, x), direct.evaluate(t, x)
        for field in ("derivative", "denoised", "eps"):
            ours, ref = getattr(a, field), getattr(b, field)
            assert float((ours - ref).norm() / ref.norm()) < 1e-12, field


def test_cond_is_passed_to_every_model_call():
    seen = []

    def denoiser(x, sigma, class_labels):
        seen.append(class_labels)
        return torch.zeros_like(x)

    labels = torch.tensor([3, 1])
    ode = bdia.DiffusionODE(denoiser, cond={"class_labels": labels})
    bdia.sample(ode, bdia.get_solver("heun"), torch.ones(2, 4), bdia.karras_grid(3, sigma_max=5.0))
    assert len(seen) == ode.nfe == 5 and all(s is labels for s in seen)


def test_network_dtype_is_inferred_from_module_and_output_cast_up():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))
            self.dtypes = []

        def forward(self, x, sigma):
            self.dtypes.append((x.dtype, sigma.dtype))
            return self.scale * x

    net = Net()
    ode = bdia.DiffusionODE(net)
    assert ode.model_dtype == torch.float32
    out = bdia.sample(
        ode, bdia.get_solver("euler"), torch.ones(2, 3, dtype=torch.float64), [2.0, 1.0]
    )
    assert out.dtype == torch.float64
    assert net.dtypes == [(torch.float32, torch.float32)]


# ---------------------------------------------------------------------- drivers


def test_trajectory_callback_and_odeint():
    mixture = toy.GaussianMixture.random(2, 2, seed=0)
    ode = mixture.ode()
    ts = bdia.karras_grid(6, sigma_max=10.0, final_zero=False)
    x = 10 * torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    calls = []
    traj = bdia.sample(ode, bdia.bdia("heun", 0.9), x, ts, trajectory=True, callback=calls.append)
    assert traj.shape == (7, 5, 2) and torch.equal(traj[0], x)
    assert [c["i"] for c in calls] == list(range(6))
    assert set(calls[0]) == {"i", "t", "t_next", "x", "x_next", "denoised", "parasitic"}
    # BDIA's first step is a plain base step; from the second on it reports its parasitic part.
    assert calls[0]["parasitic"] is None
    assert calls[1]["parasitic"].ndim == 0 and 0 <= float(calls[1]["parasitic"]) < 1
    for c, k in zip(calls, range(6)):
        assert c["t"] == float(ts[k]) and c["t_next"] == float(ts[k + 1])
        assert torch.equal(c["x_next"], traj[k + 1])
        assert torch.allclose(c["denoised"], mixture.denoiser(traj[k], torch.full((5,), c["t"])))
    assert torch.equal(bdia.sample(ode, bdia.bdia("heun", 0.9), x, ts), traj[-1])
    via_odeint = bdia.odeint(ode, x, ts, method="bdia-heun", options={"gamma": 0.9})
    assert torch.equal(via_odeint, traj)


def test_odeint_on_a_plain_function_matches_the_closed_form():
    """bdia-heun on y' = -y over [0, 1] with 100 steps: error O(h^2) ~ 1e-5, bound 1e-4."""
    y0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    ys = bdia.odeint(lambda t, y: -y, y0, t, method="bdia-heun", options={"gamma": 0.96})
    assert ys.shape == (101, 1, 2)
    assert torch.allclose(ys[-1], y0 * math.exp(-1.0), rtol=1e-4)


def _decay(t, y):
    return -5.0 * y


def test_odeint_default_is_stable_on_a_dissipative_problem():
    """The default method on y' = -5 y, y(0) = 1, 201 points on [0, 10] (h = 0.05).

    The default is RK4: its amplification per step, 1 + z + z^2/2 + z^3/6 + z^4/24 at
    z = -0.25, exceeds e^z by 1.0e-5 relative, which compounds to 2.0e-3 over 200 steps, so
    the result is exp(-50) to 2e-3 relative; rel = 5e-3 leaves room for that and nothing
    else. (BDIA-Heun with gamma = 1, the former default, ends at about -7e17.)
    """
    y0 = torch.ones(1, 1, dtype=torch.float64)
    t = torch.linspace(0.0, 10.0, 201, dtype=torch.float64)
    with_default = bdia.odeint(_decay, y0, t)
    assert torch.equal(with_default, bdia.odeint(_decay, y0, t, method="rk4"))
    assert float(with_default[-1, 0, 0]) == pytest.approx(math.exp(-50.0), rel=5e-3)


def test_odeint_bdia_heun_with_gamma_one_is_still_available():
    """method="bdia-heun" is BDIA over Heun with gamma = 1, and shows the weak stability that
    its docstring states: the parasitic mode grows by about 1 + mu = 1.25 per step on this
    problem, so |y(10)| exceeds 1 (it is about 7e17) where the solution is 2e-22."""
    y0 = torch.ones(1, 1, dtype=torch.float64)
    t = torch.linspace(0.0, 10.0, 201, dtype=torch.float64)
    ys = bdia.odeint(_decay, y0, t, method="bdia-heun")
    expected = bdia.sample(
        bdia.ODE(_decay), bdia.bdia("heun", 1.0), y0, t, trajectory=True, progress=False
    )
    assert torch.equal(ys, expected)
    assert abs(float(ys[-1, 0, 0])) > 1.0


def test_progress_bar_can_be_forced_on(capsys):
    ode = bdia.ODE(lambda t, y: -y)
    bdia.sample(ode, bdia.get_solver("euler"), torch.ones(1, 1), [0.0, 0.5, 1.0], progress=True)
    assert "sampling euler" in capsys.readouterr().err


def test_vp_discrete_clean_end_adds_alpha_one_at_t_zero():
    """clean_end=True: a knot at t = 0 with alpha = 1 (diffusers' set_alpha_to_one=True /
    final_sigmas_type="zero"), log alpha linear in t up to the first knot at 1/N; nothing else
    changes. Values are float64 closed forms, hence rel = 1e-12."""
    alphas_cumprod = np.cumprod(1 - VP_BETAS)
    plain = bdia.VPDiscrete(alphas_cumprod=alphas_cumprod)
    clean = bdia.VPDiscrete(alphas_cumprod=alphas_cumprod, clean_end=True)
    assert repr(clean) == "VPDiscrete(N=1000, clean_end=True)"
    assert repr(plain) == "VPDiscrete(N=1000)"
    assert (clean.t_min, plain.t_min) == (0.0, 1e-3)
    assert clean.sigma(0.0) == 0.0 and clean.alpha(0.0) == 1.0
    assert clean.sigma_bar_range() == (0.0, plain.sigma_bar_range()[1])
    assert clean.t_from_sigma_bar(0.0) == 0.0
    # Between 0 and 1/N: log alpha = (t N) log(alphas_cumprod[0]) / 2.
    for frac in (0.25, 0.5, 0.9):
        t = frac / 1000
        expected = frac * 0.5 * math.log(alphas_cumprod[0])
        assert clean.log_alpha(t) == pytest.approx(expected, rel=1e-12)
        assert clean.t_from_log_snr(clean.log_snr(t)) == pytest.approx(t, rel=1e-10)
    # From the first knot on, the two schedules are the same.
    for t in (1e-3, 0.0015, 0.5, 1.0):
        assert clean.log_alpha(t) == plain.log_alpha(t)
        assert clean.log_alpha_dot(t) == plain.log_alpha_dot(t)
    # karras_grid may now end at sigma = 0 (t = 0); without clean_end it may not.
    ts = bdia.karras_grid(5, sigma_min=0.002, sigma_max=80.0, schedule=clean)
    assert ts[-1] == 0.0 and 0.0 < ts[-2] < 1e-3
    with pytest.raises(ValueError, match="final_zero=True"):
        bdia.karras_grid(5, sigma_min=0.02, sigma_max=80.0, schedule=plain)
    with pytest.raises(ValueError, match="domain"):
        plain.check_times([0.0])
    clean.check_times([0.0])


def _zero_snr_alphas_cumprod(betas=VP_BETAS):
    """Lin et al.'s rescaling to zero terminal SNR (diffusers' rescale_betas_zero_snr): sqrt
    of alphas_cumprod shifted to end at 0 and scaled to keep its first value, in float64."""
    root = np.sqrt(np.cumprod(1 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2


def test_vp_discrete_with_a_zero_last_value_ends_in_pure_noise():
    """A table ending at 0 (zero terminal SNR): the knots keep the table's values, alpha = 0
    and sigma = 1 at t = 1 (log-SNR -inf, sigma_bar inf), and between the last two knots
    alpha is the straight line to 0, with a finite derivative up to t = 1 and an exact
    inverse. rel = 1e-12: float64 closed forms of a few operations each."""
    ac = _zero_snr_alphas_cumprod()
    assert ac[-1] == 0.0 and ac[-2] > 0
    sched = bdia.VPDiscrete(alphas_cumprod=ac)
    assert repr(sched) == "VPDiscrete(N=1000, zero_snr_end=True)" and sched.zero_snr_end
    for k in (0, 1, 500, 998):
        assert sched.alpha((k + 1) / 1000) ** 2 == pytest.approx(ac[k], rel=1e-12)
    assert (sched.alpha(1.0), sched.sigma(1.0), sched.log_snr(1.0)) == (0.0, 1.0, -math.inf)
    assert sched.sigma_bar_range()[1] == math.inf
    last = math.sqrt(ac[-2])
    for frac in (0.25, 0.5, 0.75, 1.0):
        t = 0.999 + frac * 1e-3
        assert sched.alpha(t) == pytest.approx(last * (1 - frac), rel=1e-12, abs=1e-300)
        assert sched.alpha_dot(t) == pytest.approx(-last / 1e-3, rel=1e-9)
        assert math.isfinite(sched.sigma_dot(t))
        if frac < 1.0:
            assert sched.t_from_log_snr(sched.log_snr(t)) == pytest.approx(t, rel=1e-12)
    assert sched.sigma_dot(1.0) == 0.0  # sigma^2 = 1 - alpha^2 is flat where alpha = 0
    assert sched.t_from_log_snr(-math.inf) == 1.0
    assert sched.t_from_sigma_bar(math.inf) == 1.0
    # Continuous at the last positive knot; before it, the ordinary interpolation.
    assert sched.alpha(0.999 + 1e-12) == pytest.approx(last, rel=1e-8)
    knots_t, knots_log_alpha = np.arange(1, 1000) / 1000, 0.5 * np.log(ac[:-1])
    for t in (0.0015, 0.5, 0.9985, 0.999):
        assert sched.log_alpha(t) == float(np.interp(t, knots_t, knots_log_alpha))
    for t in (0.0015, 0.5, 0.9985):  # a knot's derivative is its next interval's
        i = int(t * 1000) - 1
        slope = (knots_log_alpha[i + 1] - knots_log_alpha[i]) / (knots_t[i + 1] - knots_t[i])
        assert sched.log_alpha_dot(t) == pytest.approx(slope, rel=1e-12)
    assert sched.alpha_dot(0.999) == sched.alpha_dot(0.9995)  # the last interval's line
    # The same schedule from betas whose last is 1 (1 - beta = alpha_n^2 / alpha_{n-1}^2).
    betas = 1 - ac / np.concatenate([[1.0], ac[:-1]])
    assert betas[-1] == 1.0
    from_betas = bdia.VPDiscrete(betas=betas)
    assert from_betas.zero_snr_end
    for t in (0.0015, 0.5, 0.9995, 1.0):
        assert from_betas.alpha(t) == pytest.approx(sched.alpha(t), rel=1e-12, abs=1e-300)


def test_an_ordinary_vp_discrete_table_keeps_its_attributes():
    """The zero-SNR end's attributes are set only for such a table: a schedule's fingerprint
    (DiffusionODE.time_fingerprint) reads its attributes, and an ordinary table's must not
    change with a feature it does not use."""
    sched = bdia.VPDiscrete(betas=VP_BETAS)
    assert set(vars(sched)) == {"clean_end", "knots_t", "knots_log_alpha", "t_min", "t_max"}
    assert not sched.zero_snr_end


@pytest.mark.parametrize(
    "table, words",
    [
        (np.array([0.9, 0.0, 0.5]), r"the last one in \[0, 1\)"),
        (np.array([0.9, 0.5, 1.0]), r"must lie in \[0, 1\) .* got 1"),
        (np.array([0.9, 0.5, -0.1]), r"must lie in \[0, 1\) .* got -0.1"),
    ],
    ids=["zero-inside", "one-last", "negative-last"],
)
def test_vp_discrete_takes_a_zero_only_as_its_last_value(table, words):
    with pytest.raises(ValueError, match=words):
        bdia.VPDiscrete(alphas_cumprod=table)


@pytest.mark.parametrize("solver, order", [("heun", 2), ("rk4", 4), ("dpm_solver_3", 2)])
def test_solvers_keep_their_order_from_the_zero_snr_end(solver, order):
    """Gaussian data N(0, s^2) and an x0-prediction model of its exact denoiser keep
    x / sqrt(alpha^2 s^2 + sigma^2) constant along the flow, so from pure noise at t = 1 the
    exact state at t is sqrt(alpha^2 s^2 + sigma^2) x_start. Over the last interval of the
    zero-SNR table (alpha a straight line to 0, the solution smooth) halving the step cuts
    the error by 2^order: Runge-Kutta solvers at their full order (measured: heun 4.4 and
    4.2, rk4 16.0 twice), exponential integrators at 2, the limit of a first step from
    pure noise (docs/solvers.md; dpm_solver_3 4.00 twice); a test ratio of 0.9 times 2^order.
    A wide s (1000) makes the state move by 2e-3 there. A derivative at the last positive
    knot was once the interval before's, which left heun and rk4 at order 1. bdia over the
    solver inverts exactly."""
    s = 1000.0
    sched = bdia.VPDiscrete(alphas_cumprod=_zero_snr_alphas_cumprod())

    def x0(x, t):
        alpha, sigma = sched.alpha(float(t[0])), sched.sigma(float(t[0]))
        return alpha * s**2 * x / (alpha**2 * s**2 + sigma**2)

    ode = bdia.DiffusionODE.from_x0(x0, sched)
    start = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    end = 0.999  # the last positive knot
    exact = math.sqrt(sched.alpha(end) ** 2 * s**2 + sched.sigma(end) ** 2) * start
    errors = []
    for steps in (2, 4, 8):
        ts = torch.linspace(1.0, end, steps + 1, dtype=torch.float64)
        out = bdia.sample(ode, bdia.get_solver(solver), start, ts)
        errors.append(float((out - exact).abs().max() / exact.abs().max()))
        wrapped = bdia.bdia(solver, 0.9)
        pair = bdia.sample(ode, wrapped, start, ts, return_pair=True)
        assert torch.equal(bdia.invert(ode, wrapped, pair, ts).earlier, start)
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine > 0.9 * 2**order, errors
