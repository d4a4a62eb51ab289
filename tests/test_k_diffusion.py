"""bdia.k_diffusion: BDIA called the way k-diffusion calls its samplers.

The reference is a hand-rolled k-diffusion loop (``sample_euler`` and ``sample_heun`` without
churn), written here as k-diffusion writes it, so that ``gamma = 0`` (the base solver) can be
compared with it directly.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
from torch import nn

import bdia
import bdia.k_diffusion as kd

LABELS = torch.tensor([0, 2])


class ConvDenoiser(nn.Module):
    """A small random conv net in EDM's preconditioning: ``D(x, sigma, class_labels)``.

    Its parameters require grad, as a real network's do.
    """

    def __init__(self, channels: int = 3, classes: int = 3, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.embed = nn.Embedding(classes, channels)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        var = s**2 + self.sigma_data**2
        h = x / var.sqrt()
        if class_labels is not None:
            h = h + self.embed(class_labels)[:, :, None, None]
        out = self.conv2(torch.tanh(self.conv1(h)))
        return self.sigma_data**2 / var * x + s * self.sigma_data / var.sqrt() * out


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, class_labels) -> torch.Tensor:
    """The exact denoiser of N(mean[label], 0.3^2 I): a plain callable, as ComfyUI passes."""
    mean = (class_labels.to(x.dtype) - 1.0).reshape(-1, *([1] * (x.ndim - 1)))
    s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return mean + 0.09 / (0.09 + s**2) * (x - mean)


def k_euler(model, x, sigmas, extra_args=None):
    """k-diffusion's sample_euler with s_churn = 0, as k-diffusion writes it."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        x = x + d * dt
    return x


def k_heun(model, x, sigmas, extra_args=None):
    """k-diffusion's sample_heun with s_churn = 0 (an Euler step onto sigma = 0)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def without_low_words(pair):
    """``pair`` with its low words dropped, whether StatePair is a NamedTuple or a dataclass."""
    if dataclasses.is_dataclass(pair):
        return dataclasses.replace(pair, earlier_low=None, later_low=None)
    return pair._replace(earlier_low=None, later_low=None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def start(dtype: torch.dtype = torch.float32, steps: int = 18):
    """k-diffusion's usual start: Karras sigmas ending with 0, x = noise * sigmas[0]."""
    sigmas = bdia.karras_grid(steps).to(dtype)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return noise * sigmas[0], sigmas


# ------------------------------------------------------------ the base solver at gamma = 0


def test_gamma_zero_is_k_diffusion_euler_bit_for_bit():
    # Exact equality: both evaluate the same model on the same inputs and do the same float32
    # operations, (x - D) / sigma and x + d * dt, with dt the once-rounded sigma difference.
    net = ConvDenoiser()
    x, sigmas = start()
    args = {"class_labels": LABELS}
    with torch.no_grad():
        expected = k_euler(net, x, sigmas, args)
    got = kd.sample_bdia(net, x, sigmas, args, disable=True, gamma=0.0)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_gamma_zero_heun_matches_k_diffusion_heun():
    # bdia forms Heun's update as x + (h/2) k1 + (h/2) k2, k-diffusion as x + (k1 + k2)/2 h:
    # the same method, so only float64 rounding (~1e-16 per step) separates them.
    x, sigmas = start(torch.float64)
    args = {"class_labels": LABELS}
    expected = k_heun(gaussian_denoiser, x, sigmas, args)
    got = kd.sample_bdia(gaussian_denoiser, x, sigmas, args, disable=True, gamma=0.0, base="heun")
    assert rel(got, expected) < 1e-13


def test_default_gamma_solves_the_ode_better_than_euler():
    # On Gaussian data the probability-flow ODE has a closed form. BDIA at the default gamma
    # is not the Euler result but a sample of the same ODE, closer to the exact one: measured
    # 1.9e-2 against Euler's 4.8e-2 relative error at 18 steps, 3.2e-3 against 2.5e-2 at 35;
    # the bounds leave a factor of about 1.3 to 4 of slack.
    args = {"class_labels": LABELS}
    for steps, bound in ((18, 0.025), (35, 0.005)):
        x, sigmas = start(torch.float64, steps)
        mean = (LABELS.double() - 1.0).reshape(-1, 1, 1, 1)
        exact = mean + 0.3 / (0.09 + sigmas[0] ** 2).sqrt() * (x - mean)
        euler = k_euler(gaussian_denoiser, x, sigmas, args)
        got = kd.sample_bdia(gaussian_denoiser, x, sigmas, args, disable=True)
        assert rel(got, exact) < bound < rel(euler, exact)


# ------------------------------------------------------------------------ the round trip


@pytest.mark.parametrize("base", ["euler", "heun", "dpm_solver_pp_2s"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_returns_the_starting_noise(dtype, base):
    # Measured: the noise comes back bit for bit in both dtypes. The model sees bitwise the
    # same states both ways, and the pair's low words let the inverse recover each state to
    # ~eps^2, far below half an ulp, so the high word rounds to the start itself. The bounds
    # leave room for one ulp (float32) and the 1e-12 library target (float64).
    net = ConvDenoiser().to(dtype)
    x, sigmas = start(dtype)
    args = {"class_labels": LABELS}
    pair = kd.sample_bdia(net, x, sigmas, args, disable=True, base=base, return_pair=True)
    assert pair.later.dtype == dtype and pair.later_low is not None
    back = kd.invert_bdia(net, pair, sigmas, args, disable=True, base=base)
    assert back.earlier.dtype == dtype
    if dtype == torch.float32:
        ulps = (back.earlier - x).abs() / (torch.finfo(dtype).eps * x.abs())
        assert float(ulps.max()) <= 1.0
    else:
        assert rel(back.earlier, x) < 1e-12
    # From the inverted pair, sampling retraces the trajectory (measured: bit for bit).
    again = kd.sample_bdia(net, back, sigmas, args, disable=True, base=base)
    assert rel(again, pair.later) < (1e-6 if dtype == torch.float32 else 1e-12)


def test_float64_state_around_a_float32_model():
    # state_dtype=float64 with a float32 network (the precision policy): the round trip is
    # exact to float64 (measured 0); the returned tensor comes back in x's dtype.
    net = ConvDenoiser()
    x, sigmas = start()
    args = {"class_labels": LABELS}
    out = kd.sample_bdia(net, x, sigmas, args, disable=True, state_dtype=torch.float64)
    assert out.dtype == torch.float32
    pair = kd.sample_bdia(
        net, x, sigmas, args, disable=True, state_dtype=torch.float64, return_pair=True
    )
    assert pair.later.dtype == torch.float64
    assert torch.equal(pair.later.float(), out)
    back = kd.invert_bdia(net, pair, sigmas, args, disable=True)
    assert rel(back.earlier, x) < 1e-12


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_x_runs_on_a_float32_state(dtype):
    # k-diffusion samples a half x as it is. A half state cannot carry the trajectory (and
    # is refused), so the state is float32, as in BDIAScheduler, and what comes back is in
    # x's dtype: bitwise the run with state_dtype=float32 spelled out. The float32 pair
    # inverts to x within an ulp of float32, as in test_round_trip_returns_the_starting_noise.
    net = ConvDenoiser()
    x, sigmas = start()
    x = x.to(dtype)
    args = {"class_labels": LABELS}
    seen = []
    out = kd.sample_bdia(net, x, sigmas, args, disable=True, callback=seen.append)
    explicit = kd.sample_bdia(net, x, sigmas, args, disable=True, state_dtype=torch.float32)
    assert out.dtype == dtype and torch.equal(out, explicit)
    assert (
        {info["x"].dtype for info in seen} == {info["denoised"].dtype for info in seen} == {dtype}
    )
    pair = kd.sample_bdia(net, x, sigmas, args, disable=True, return_pair=True)
    assert pair.later.dtype == torch.float32
    back = kd.invert_bdia(net, pair, sigmas, args, disable=True)
    ulps = (back.earlier - x.float()).abs() / (torch.finfo(torch.float32).eps * x.float().abs())
    assert back.earlier.dtype == torch.float32 and float(ulps.max()) <= 1.0
    # A half x on a grid that ends above 0 starts an inversion too, in float32.
    assert kd.invert_bdia(net, x, sigmas[:-1], args, disable=True).earlier.dtype == torch.float32
    with pytest.raises(ValueError, match="state is refused"):
        kd.sample_bdia(net, x, sigmas, args, disable=True, state_dtype=dtype)


class HalfNetworkWrapper(nn.Module):
    """A k-diffusion-style wrapper around a float16 network: it takes and returns x's dtype,
    casts the network's input itself and keeps the skip path ``c_skip x + c_out F`` in x's
    dtype, as ``CompVisDenoiser`` around a half-precision LDM does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 3, 3, padding=1).half()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        var = s**2 + 0.25
        f = self.net((x / var.sqrt()).half()).to(x.dtype)
        return 0.25 / var * x + s * 0.5 / var.sqrt() * f


def test_a_wrapper_around_a_half_network_gets_x_as_k_diffusion_passes_it():
    # k-diffusion hands the wrapper the float32 x; so does the default here, and gamma = 0 is
    # sample_euler bit for bit (the same operations on the same inputs). Casting x to the
    # parameters' float16 first, as DiffusionODE's default would, rounds the skip path:
    # measured 6.6e-4 relative here (model_dtype=torch.float16). The round trip stays within
    # an ulp, as in test_round_trip_returns_the_starting_noise.
    model = HalfNetworkWrapper()
    x, sigmas = start()
    with torch.no_grad():
        expected = k_euler(model, x, sigmas)
    assert torch.equal(kd.sample_bdia(model, x, sigmas, disable=True, gamma=0.0), expected)
    pair = kd.sample_bdia(model, x, sigmas, disable=True, return_pair=True)
    back = kd.invert_bdia(model, pair, sigmas, disable=True)
    ulps = (back.earlier - x).abs() / (torch.finfo(torch.float32).eps * x.abs())
    assert float(ulps.max()) <= 1.0


def test_a_pair_without_its_low_words_inverts_less_exactly():
    # Stripped of its low words the float32 pair still inverts, to single-word accuracy:
    # measured 8e-7 relative (several ulps) against 0 with them; bounded by the library's
    # single-word float32 target, 1e-4.
    net = ConvDenoiser()
    x, sigmas = start()
    args = {"class_labels": LABELS}
    pair = kd.sample_bdia(net, x, sigmas, args, disable=True, return_pair=True)
    stripped = without_low_words(pair)
    assert stripped.earlier_low is None and stripped.later_low is None
    back = kd.invert_bdia(net, stripped, sigmas, args, disable=True)
    assert 1e-9 < rel(back.earlier, x) < 1e-4


# --------------------------------------------------------------- k-diffusion's conventions


def test_extra_args_reach_the_model():
    seen = []

    def model(x, sigma, **kwargs):
        seen.append(kwargs)
        return gaussian_denoiser(x, sigma, **kwargs)

    x, sigmas = start(torch.float64, steps=5)
    a = kd.sample_bdia(model, x, sigmas, {"class_labels": LABELS}, disable=True)
    b = kd.sample_bdia(model, x, sigmas, {"class_labels": LABELS.flip(0)}, disable=True)
    assert len(seen) == 2 * 5 and all(set(k) == {"class_labels"} for k in seen)
    assert rel(a, b) > 0.1
    # Each sample ends near its class mean (label - 1), 0.3 the data's std.
    assert abs(float(a[0].mean()) + 1.0) < 0.3 and abs(float(a[1].mean()) - 1.0) < 0.3


def denoised_by_hand(net, c):
    """The model's output at the callback's ``x`` and ``sigma``: bitwise ``denoised``, as the
    float32 state is what the model was called with (EDM's alpha = 1)."""
    with torch.no_grad():
        return net(c["x"], c["sigma"].expand(c["x"].shape[0]), class_labels=LABELS)


def test_callback_gets_k_diffusion_keys():
    net = ConvDenoiser()
    x, sigmas = start(steps=6)
    calls = []
    kd.sample_bdia(net, x, sigmas, {"class_labels": LABELS}, callback=calls.append, disable=True)
    assert [c["i"] for c in calls] == list(range(6))
    for c in calls:
        assert set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert c["x"].shape == x.shape and c["denoised"].shape == x.shape
        assert c["x"].dtype == x.dtype and c["denoised"].dtype == x.dtype
        assert c["sigma"].ndim == 0 and c["sigma"] == sigmas[c["i"]] == c["sigma_hat"]
        assert c["x"].grad_fn is None and c["denoised"].grad_fn is None
        assert torch.equal(c["denoised"], denoised_by_hand(net, c))
    assert torch.equal(calls[0]["x"], x)
    # Inversion reports the grid index it evaluates, counting down.
    pair = kd.sample_bdia(net, x, sigmas, {"class_labels": LABELS}, disable=True, return_pair=True)
    back_calls = []
    kd.invert_bdia(
        net, pair, sigmas, {"class_labels": LABELS}, callback=back_calls.append, disable=True
    )
    assert [c["i"] for c in back_calls] == list(range(5, 0, -1))
    assert all(c["sigma"] == sigmas[c["i"]] for c in back_calls)
    assert all(torch.equal(c["denoised"], denoised_by_hand(net, c)) for c in back_calls)


def test_disable_hides_the_progress_bar(capsys):
    x, sigmas = start(torch.float64, steps=3)
    args = {"class_labels": LABELS}
    kd.sample_bdia(gaussian_denoiser, x, sigmas, args, disable=True)
    assert capsys.readouterr().err == ""
    kd.sample_bdia(gaussian_denoiser, x, sigmas, args, disable=False)
    assert "sampling bdia-euler" in capsys.readouterr().err


def test_no_grad_graph_even_with_parameters_requiring_grad():
    net = ConvDenoiser()
    assert all(p.requires_grad for p in net.parameters())
    x, sigmas = start(steps=4)
    x = x.requires_grad_()
    out = kd.sample_bdia(net, x, sigmas, {"class_labels": LABELS}, disable=True)
    assert not out.requires_grad and out.grad_fn is None
    pair = kd.sample_bdia(
        net, x.detach(), sigmas, {"class_labels": LABELS}, disable=True, return_pair=True
    )
    back = kd.invert_bdia(net, pair, sigmas, {"class_labels": LABELS}, disable=True)
    assert not back.earlier.requires_grad and not back.later.requires_grad


def test_sigmas_as_a_list_and_a_model_without_extra_args():
    x, sigmas = start(torch.float64, steps=4)

    def model(x, sigma):
        return gaussian_denoiser(x, sigma, torch.ones(x.shape[0], dtype=torch.long))

    a = kd.sample_bdia(model, x, sigmas, disable=True)
    b = kd.sample_bdia(model, x, sigmas.tolist(), disable=True)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- bad input


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("sigmas", "exc_type", "fragment"),
    [
        (torch.tensor([[10.0, 1.0, 0.0]]), ValueError, "1-D tensor"),
        (torch.tensor([10.0, 1.0, 1.0, 0.0]), ValueError, "sigmas[1] = 1.0, sigmas[2] = 1.0"),
        (torch.tensor([10.0, 1.0, 2.0, 0.0]), ValueError, "strictly decreasing"),
        (torch.tensor([10.0]), ValueError, "at least 2"),
        (torch.tensor([10.0, 1.0, -1.0]), ValueError, "sigmas[2] = -1.0"),
        (torch.tensor([float("nan"), 0.0]), ValueError, "finite"),
        ("karras", TypeError, "1-D tensor"),
    ],
)
def test_bad_sigmas(sigmas, exc_type, fragment):
    x = torch.zeros(1, 3)
    message = one_line_error(exc_type, kd.sample_bdia, gaussian_denoiser, x, sigmas)
    assert fragment in message


def test_bad_base_extra_args_and_gamma():
    x, sigmas = start(torch.float64, steps=3)
    args = {"class_labels": LABELS}
    call = kd.sample_bdia
    message = one_line_error(KeyError, call, gaussian_denoiser, x, sigmas, args, base="eulr")
    assert "'euler'" in message and "Registered" in message
    message = one_line_error(ValueError, call, gaussian_denoiser, x, sigmas, args, base="bdia-heun")
    assert "applies bdia itself" in message
    message = one_line_error(TypeError, call, gaussian_denoiser, x, sigmas, [LABELS])
    assert "extra_args must be a mapping" in message
    message = one_line_error(TypeError, call, gaussian_denoiser, x, sigmas, {0: LABELS})
    assert "keys must be strings" in message
    message = one_line_error(ValueError, call, gaussian_denoiser, x, sigmas, args, gamma=1.5)
    assert "gamma = 1.5 lies outside [0, 1]" in message
    # Unchecked, the string would fail only when called after the first step, as "'str'
    # object is not callable", which names neither the argument nor the fix.
    message = one_line_error(TypeError, call, gaussian_denoiser, x, sigmas, args, callback="print")
    assert "callback must be callable or None, got str" in message


def test_inversion_needs_the_pair_at_sigma_zero_and_gamma_above_zero():
    x, sigmas = start(torch.float64, steps=3)
    args = {"class_labels": LABELS}
    pair = kd.sample_bdia(gaussian_denoiser, x, sigmas, args, disable=True, return_pair=True)
    message = one_line_error(
        ValueError, kd.invert_bdia, gaussian_denoiser, pair.later, sigmas, args, disable=True
    )
    assert "sigma = 0" in message and "pair" in message
    # The pair records the gamma that made it, which the refusal names first; a pair that
    # records none meets gamma's own refusal.
    message = one_line_error(
        ValueError, kd.invert_bdia, gaussian_denoiser, pair, sigmas, args, gamma=0.0
    )
    assert "made by bdia(euler, gamma=0.96), not by bdia(euler, gamma=0.0)" in message
    bare = dataclasses.replace(pair, solver=None)
    message = one_line_error(
        ValueError, kd.invert_bdia, gaussian_denoiser, bare, sigmas, args, gamma=0.0
    )
    assert "gamma = 0" in message


def test_a_warning_names_the_users_line_through_the_no_grad_decorator():
    """sample_bdia runs under torch.no_grad() as a decorator, whose wrapper lies in torch: the
    instability warning must still name this file's line, not torch's."""
    x, sigmas = start(torch.float64, steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        kd.sample_bdia(gaussian_denoiser, x, sigmas, {"class_labels": LABELS}, disable=True)
    ours = [w for w in caught if issubclass(w.category, bdia.ParasiticWarning)]
    assert ours, "the run no longer warns: pick a run that does"
    assert {(w.filename, w.lineno) for w in ours} == {(__file__, line)}


@pytest.mark.parametrize(("base", "end"), [("euler", 0.0), ("heun", 1e-3)])
def test_a_flow_model_in_comfyuis_convention_is_the_flow_ode(base, end):
    """ComfyUI's flow-matching convention: sigma is the flow time t, x is unscaled and the
    model returns x - t u. The EDM-form ODE is then dx/dt = u, so sample_bdia equals
    bdia.sample on RectifiedFlow with the velocity network, from sigma = 1: the same steps
    written two ways, to rounding (7e-16 seen; 1e-13 asserted), and the round trip is exact
    (bit for bit seen; the float64 bound of the other round-trip tests asserted). Heun's grid
    ends above 0: the velocity network is evaluated at t = 0 and takes heun's last step in
    full, the EDM-form denoiser is not and falls back to Euler there."""
    from bdia.models import toy

    mixture = toy.GaussianMixture.random(dim=2, components=4, seed=0)

    def model(x, sigma):
        return x - sigma[:, None] * mixture.flow_velocity(x, sigma)

    sigmas = bdia.shifted_t_grid(20, 1.0, end, shift=3.0, schedule=bdia.RectifiedFlow())
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pair = kd.sample_bdia(model, x, sigmas, base=base, disable=True, return_pair=True)
    flow = bdia.sample(mixture.flow_ode(), bdia.bdia(bdia.get_solver(base), 0.96), x, sigmas)
    assert (pair.later - flow).abs().max().item() < 1e-13
    back = kd.invert_bdia(model, pair, sigmas, base=base, disable=True)
    assert (back.earlier - x).abs().max().item() < 1e-12
