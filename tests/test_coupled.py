"""EDICT and McCallum-Foster (bdia.edict, bdia.reversible): exact round trips, cost, the
CoupledPair, convergence, parameter checks and the parasitic diagnostic.

Round-trip bounds. Every line of both schemes is inverted in double-word arithmetic to a few
u^2 of the chains (u = 2^-53 for float64, 2^-24 for float32 states), and the model sees only
the high words. A float64 round trip must therefore be exact to far below 1e-12 (measured: 0
on the toy mixture, at most 1e-16 on the digits, where a chain value that lies within u^2 of a
rounding midpoint is split into neighbouring high words by the two passes: the values agree,
their words differ by one ulp). In float32 the same midpoint effect changes a model input by
one float32 ulp (6e-8 relative) somewhere along the run, and the rest of the inverse carries
that change (EDICT's magnifies it by (1/p)^2 = 1.16 per step): measured at most 6e-10 on the
toy mixture and 7e-8 on the digits for EDICT, 1e-12 for McCallum-Foster. The float32 bound
FLOAT32_BOUND = 1e-6 is 16 float32 ulps.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import untouched

import bdia
from bdia.models import digits, toy
from bdia.models.checkpoints import load_network

BASES = ("euler", "heun", "ddim")
WRAPPERS = (bdia.edict, bdia.reversible)
FLOAT64_BOUND = 1e-12
FLOAT32_BOUND = 1e-6

MIXTURE = toy.GaussianMixture.random(
    dim=2, components=8, std_range=(0.1, 0.3), spread=1.5, seed=2024
)


def wide(x: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    return x.double() if low is None else x.double() + low.double()


def rel(x: torch.Tensor, low: torch.Tensor | None, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((wide(x, low) - ref).norm() / ref.norm())


def noise(batch: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (80.0 * torch.randn(batch, 2, generator=gen, dtype=torch.float64)).to(dtype)


# Sampling the mixture from sigma 80 in a few Karras steps is outside both schemes' stable
# range (see docs/benchmarks/reversible.md); the round trips are exact regardless, and the
# warning is checked on its own at the end.
pytestmark = pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")


# ------------------------------------------------------------------ round trips (toy)
@pytest.mark.parametrize(
    "dtype, bound", [(torch.float64, FLOAT64_BOUND), (torch.float32, FLOAT32_BOUND)]
)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("wrap", WRAPPERS, ids=["edict", "reversible"])
def test_round_trips_on_the_mixture_are_exact(wrap, base, dtype, bound):
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(12, final_zero=False)
    solver = wrap(base)
    x0 = noise(32, dtype)
    # noise -> data -> noise, through the pair
    pair = bdia.sample(ode, solver, x0, ts, return_pair=True, progress=False)
    back = bdia.invert(ode, solver, pair, ts, progress=False)
    assert isinstance(back, bdia.CoupledPair) and back.x.dtype == dtype
    assert rel(back.x, back.x_low, x0) < bound and rel(back.y, back.y_low, x0) < bound
    # data -> noise -> data, from a single state (both chains start at the data)
    data = pair.x.clone()
    inverted = bdia.invert(ode, solver, data, ts, progress=False)
    again = bdia.sample(ode, solver, inverted, ts, return_pair=True, progress=False)
    assert rel(again.x, again.x_low, data) < bound and rel(again.y, again.y_low, data) < bound


# --------------------------------------------------------------- round trips (digits)
@pytest.fixture(scope="module")
def digit_problem():
    net = load_network("digits")
    split = digits.load_digits_split()
    images, labels = split.held_out_images[:6].double(), split.held_out_labels[:6].tolist()
    ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": torch.eye(10)[labels]})
    return ode, images


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("wrap", WRAPPERS, ids=["edict", "reversible"])
def test_digits_round_trip_is_exact_in_both_state_dtypes(digit_problem, wrap, base):
    ode, images = digit_problem
    ts = bdia.karras_grid(8, final_zero=False)
    solver = wrap(base)
    for dtype, bound in ((torch.float64, FLOAT64_BOUND), (torch.float32, FLOAT32_BOUND)):
        x = images.to(dtype)
        with untouched(x):
            pair = bdia.invert(ode, solver, x, ts, progress=False)
        assert pair.fingerprint == ode.fingerprint()
        back = bdia.sample(ode, solver, pair, ts, return_pair=True, progress=False)
        assert rel(back.x, back.x_low, x) < bound, (dtype, rel(back.x, back.x_low, x))
        assert rel(back.y, back.y_low, x) < bound


# ---------------------------------------------------------------------------- cost
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("wrap", WRAPPERS, ids=["edict", "reversible"])
def test_nfe_is_two_base_steps_per_step(wrap, base):
    ode = MIXTURE.ode(bdia.EDM())
    solver = wrap(base)
    stages = bdia.get_solver(base).stages
    assert solver.stages == solver.nfe_per_step == 2 * stages
    steps = 7
    ts = bdia.karras_grid(steps, final_zero=False)
    pair = bdia.sample(ode, solver, noise(4, torch.float64), ts, return_pair=True, progress=False)
    assert ode.nfe == 2 * stages * steps
    ode.reset_nfe()
    bdia.invert(ode, solver, pair, ts, progress=False)
    assert ode.nfe == 2 * stages * steps


def test_attributes_follow_the_base():
    e, r = bdia.edict("heun", 0.9), bdia.reversible(bdia.get_solver("ddim"), coupling=0.5)
    assert (e.name, e.order, e.stages, e.needs_diffusion, e.reversible) == (
        "edict-heun",
        1,
        4,
        False,
        True,
    )
    assert (r.name, r.order, r.stages, r.needs_diffusion, r.reversible) == (
        "reversible-ddim",
        1,
        2,
        True,
        True,
    )
    assert bdia.reversible("heun").order == 2
    assert isinstance(e, bdia.EDICTWrapper) and isinstance(r, bdia.ReversibleWrapper)
    assert "p=0.9" in repr(e) and "coupling=0.5" in repr(r)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.p = 0.5  # type: ignore[misc]


# ---------------------------------------------------------------------- the pair
def test_the_coupled_pair_round_trips_and_continues():
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(9, final_zero=False)
    solver = bdia.edict("euler")
    x0 = noise(8, torch.float64)
    full = bdia.sample(ode, solver, x0, ts, trajectory=True, progress=False)
    assert full.shape == (len(ts), 8, 2) and torch.equal(full[0], x0)
    pair = bdia.sample(ode, solver, x0, ts, return_pair=True, progress=False)
    assert torch.equal(pair.x, full[-1])
    assert pair.fingerprint == ode.fingerprint()
    with pytest.raises(TypeError, match="not a sequence"):
        _x, _y = pair
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.x = x0  # type: ignore[misc]
    start = bdia.invert(ode, solver, pair, ts, progress=False)
    # sample from the inverted pair reproduces the run bitwise in its high words
    again = bdia.sample(ode, solver, start, ts, return_pair=True, progress=False)
    assert torch.equal(again.x, pair.x) and torch.equal(again.y, pair.y)
    # a float64 pair handed over as float32 keeps its value in two float32 words
    narrow = bdia.sample(
        ode, solver, start, ts, state_dtype="float32", return_pair=True, progress=False
    )
    assert narrow.x.dtype == narrow.x_low.dtype == torch.float32
    assert rel(narrow.x, narrow.x_low, pair.x) < 1e-5


def test_a_bad_pair_is_refused_before_any_model_call():
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(5, final_zero=False)
    x = noise(3, torch.float64)
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        bdia.invert(ode, bdia.edict("euler"), bdia.CoupledPair(x, bad), ts)
    with pytest.raises(ValueError, match="match in shape"):
        bdia.sample(ode, bdia.edict("euler"), bdia.CoupledPair(x, x[:2]), ts)
    with pytest.raises(TypeError, match="StatePair"):
        bdia.sample(ode, bdia.reversible("euler"), bdia.StatePair(x, x), ts)
    # A plain solver knows one state or BDIA's pair, not two chains.
    for run in (bdia.sample, bdia.invert):
        with pytest.raises(TypeError, match="euler continues from a tensor or a StatePair"):
            run(ode, bdia.get_solver("euler"), bdia.CoupledPair(x, x.clone()), ts)
    assert ode.nfe == 0


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_pair_of_the_other_kind_that_records_its_solver_is_refused_naming_it():
    """A pair from sample or invert records its solver: a reversible solver of the other
    kind refuses it with a ValueError that names that solver (the kind alone is a
    TypeError, as above, for a pair that records none); a plain solver, which takes up a
    state of any pair it knows, still refuses two chains with a TypeError."""
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(5, final_zero=False)
    x = noise(3, torch.float64)
    chains = bdia.sample(ode, bdia.edict("euler"), x, ts, return_pair=True)
    pair = bdia.sample(ode, bdia.bdia("euler", 0.9), x, ts, return_pair=True)
    for given, solver, maker in (
        (chains, bdia.bdia("euler", 0.9), "edict(euler, p=0.93)"),
        (pair, bdia.reversible("euler"), "bdia(euler, gamma=0.9)"),
    ):
        with pytest.raises(ValueError, match=rf"the end pair was made by {re.escape(maker)}"):
            bdia.invert(ode, solver, given, ts)
    with pytest.raises(TypeError, match="euler continues from a tensor or a StatePair"):
        bdia.invert(ode, bdia.get_solver("euler"), chains, ts)


def test_a_start_of_the_wrong_kind_is_named_with_the_pair_that_fits():
    """A list where a state belongs names the coupled solvers' CoupledPair beside BDIA's
    StatePair; a pair field that is not a tensor is told to be a tensor (it used to be told
    it might be a StatePair too)."""
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(3, final_zero=False)
    with pytest.raises(TypeError, match=r"start must be .*CoupledPair \(edict, reversible\)"):
        bdia.sample(ode, bdia.edict("euler"), [[1.0, 2.0]], ts)
    bad = bdia.CoupledPair([[1.0, 2.0]], noise(1, torch.float64))
    with pytest.raises(TypeError, match=r"^end\.x must be a torch\.Tensor, got list$"):
        bdia.invert(ode, bdia.edict("euler"), bad, ts)
    assert ode.nfe == 0


def test_a_pair_continued_under_another_ode_warns():
    ts = bdia.karras_grid(4, final_zero=False)
    made = MIXTURE.ode(bdia.EDM())
    pair = bdia.sample(
        made, bdia.reversible("euler"), noise(2, torch.float64), ts, return_pair=True
    )
    other = MIXTURE.ode(bdia.EDM(), model_dtype=torch.float32)  # another fingerprint
    with pytest.warns(bdia.PairMismatchWarning, match="different ODE") as caught:
        bdia.invert(other, bdia.reversible("euler"), pair, ts, progress=False)
    # The reason given is the coupled chains', not BDIA's parasitic mode.
    message = str(caught[0].message)
    assert "coupled scheme's two chains" in message and "parasitic" not in message


def test_edict_samples_to_sigma_zero_and_reversible_refuses_it():
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(6)  # ends at sigma = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bdia.ParasiticWarning)
        out = bdia.sample(ode, bdia.edict("heun"), noise(4, torch.float64), ts, progress=False)
    assert bool(torch.isfinite(out).all())
    # heun's last step falls back to Euler at sigma = 0: 2 evaluations instead of 4
    assert ode.nfe == 4 * 5 + 2
    with pytest.raises(ValueError, match="final_zero=False"):
        bdia.sample(ode, bdia.reversible("heun"), noise(4, torch.float64), ts)


def test_an_edict_pair_at_sigma_zero_inverts_and_round_trips():
    """EDICT's inverse evaluates the model at the earlier point of each step only, so the
    pair it returns at sigma = 0 inverts (2 x 6 calls for euler over 6 steps), and sampling
    from the inverted pair gives the chains back bit for bit; one state at sigma = 0 is
    refused."""
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(6)  # ends at sigma = 0
    solver = bdia.edict("euler", 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bdia.ParasiticWarning)
        pair = bdia.sample(ode, solver, noise(3, torch.float64), ts, return_pair=True)
        ode.reset_nfe()
        start = bdia.invert(ode, solver, pair, ts, progress=False)
        assert ode.nfe == 12
        again = bdia.sample(ode, solver, start, ts, return_pair=True, progress=False)
    # The chains come back to the last bit; with their low words, to within 1e-28 of the
    # state (the two words hold 106 bits, 1e-32; measured 1e-31), far from the 1e-16 a lost
    # low word would leave.
    for chain in ("x", "y"):
        assert torch.equal(getattr(again, chain), getattr(pair, chain)), chain
        low, low_then = getattr(again, f"{chain}_low"), getattr(pair, f"{chain}_low")
        assert float((low - low_then).norm() / getattr(pair, chain).norm()) < 1e-28, chain
    with pytest.raises(ValueError, match="sigma = 0"):
        bdia.invert(ode, solver, pair.x, ts)


# ------------------------------------------------------------------- convergence
# Order on the 3-D mixture under the VP linear schedule, grid uniform in log-SNR from t = 1 to
# 0.01, slope of log(error) over 80, 160 and 320 steps. Measured: edict 0.98 (euler),
# 0.96 (heun), 0.99 (ddim); reversible 1.12 (euler), 1.99 (heun), 1.11 (ddim). EDICT is first
# order whatever the base: its chain y takes the increment over [t_k, t_{k+1}] from x_i, a
# point already at t_{k+1}.
@pytest.mark.parametrize(
    "solver, order",
    [
        (bdia.edict("euler"), 1),
        (bdia.edict("heun"), 1),
        (bdia.edict("ddim"), 1),
        (bdia.reversible("euler"), 1),
        (bdia.reversible("heun"), 2),
        (bdia.reversible("ddim"), 1),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else str(v),
)
def test_convergence_order(solver, order):
    from test_convergence import MIXTURE as MIX3
    from test_convergence import reference, relative_error, slope

    assert solver.order == order
    schedule = bdia.VPLinear()
    x0, ref = reference(schedule, 1.0, 0.01)
    ode = MIX3.ode(schedule)
    steps = [80, 160, 320]
    errors = [
        relative_error(
            bdia.sample(
                ode, solver, x0, bdia.uniform_logsnr_grid(n, 1.0, 0.01, schedule), progress=False
            ),
            ref,
        )
        for n in steps
    ]
    assert abs(slope(steps, errors) - order) < 0.25, errors


_FLOW: dict = {}
_FLOW_ENDS: dict = {}


def flow_problem() -> tuple:
    """The flow problem of ``bdia compare`` (SD3's shifted grid from pure noise, t = 1 with
    alpha = 0, to 1e-3), its 256 start states and their reference end states, built once."""
    from bdia.compare import PROBLEMS

    if not _FLOW:
        problem = PROBLEMS["flow-mixture"]
        x0 = problem.start(256, torch.Generator().manual_seed(0))
        _FLOW.update(
            problem=problem,
            x0=x0,
            ref=problem.reference(x0),
            ode=problem.make_ode(torch.float64),
        )
    return _FLOW["problem"], _FLOW["ode"], _FLOW["x0"], _FLOW["ref"]


def flow_end(solver, steps: int) -> torch.Tensor:
    """The end state of ``solver`` over ``steps`` steps of the flow problem (kept: the tests
    below share some runs)."""
    key = (solver.identity, steps)
    if key not in _FLOW_ENDS:
        problem, ode, x0, _ = flow_problem()
        _FLOW_ENDS[key] = bdia.sample(ode, solver, x0, problem.grid(steps), progress=False)
    return _FLOW_ENDS[key]


def median_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The median over the states (rows) of ``|a - b|``: a few states that end in another
    mode of the mixture than ``b`` (some lie near a boundary between modes) do not move it."""
    return float((a - b).norm(dim=1).median())


# EDICT from pure noise on the flow problem: first order for either base, the order measured
# on the median state (the relative error of the whole batch is dominated, up to 200 steps,
# by two states that end in another mode). Measured slopes over 320, 640 and 1280 steps: 0.99
# (euler), 0.98 (heun); 1280 steps give 1.40e-3 and 6.0e-4 with p = 0.93 against 1.14e-3 and
# 3.9e-4 with p = 1. Bounds: the slope within 0.15 of 1, and the error with the mixing less
# than twice the error without it, where a floor left by the mixing (about 0.3 (1 - p) = 0.02,
# the next test) would make it 15 to 50 times as large.
# 3 to 4 s each; EDICT's order (test_convergence_order) runs by default.
@pytest.mark.slow
@pytest.mark.parametrize("base", ["euler", "heun"])
def test_edict_is_first_order_from_pure_noise_on_the_flow_problem(base):
    *_, ref = flow_problem()
    steps = [320, 640, 1280]
    errors = [median_distance(flow_end(bdia.edict(base, 0.93), n), ref) for n in steps]
    from test_convergence import slope

    assert abs(slope(steps, errors) - 1.0) < 0.15, errors
    unmixed = median_distance(flow_end(bdia.edict(base, 1.0), steps[-1]), ref)
    assert errors[-1] < 2 * unmixed, (errors[-1], unmixed)


# The mixing's own error, edict(euler, p) - edict(euler, 1) at the end: proportional to 1 - p
# and nearly independent of the steps while n (1 - p) is small, first order once n (1 - p) is
# large. Measured (median state, divided by 1 - p): p = 0.999: 0.33 at 20 steps, 0.27 at 160;
# p = 0.99: 0.31 at 20 steps; p = 0.93: 0.049, 0.025, 0.012 at 320, 640, 1280 steps. Bounds:
# the ratio of the p = 0.99 and p = 0.999 figures within 20% of 1 (it would be 10 for an
# error of order (1 - p)^2 and 0.1 for one that did not depend on p), eight times the steps
# shrinking the p = 0.999 figure by less than 1.5 (a first-order one would shrink 8 times),
# and the p = 0.93 figure falling at a slope within 0.15 of 1 over 320 to 1280 steps. About
# 4.5 s; EDICT's order (test_convergence_order) and exact round trips run by default.
@pytest.mark.slow
def test_edicts_mixing_error_is_of_order_one_minus_p_until_about_one_over_one_minus_p_steps():
    def mixing(p: float, steps: int) -> float:
        unmixed = flow_end(bdia.edict("euler", 1.0), steps)
        return median_distance(flow_end(bdia.edict("euler", p), steps), unmixed) / (1 - p)

    few = mixing(0.999, 20)
    assert abs(mixing(0.99, 20) / few - 1) < 0.2
    assert few / mixing(0.999, 160) < 1.5
    from test_convergence import slope

    steps = [320, 640, 1280]
    assert abs(slope(steps, [mixing(0.93, n) for n in steps]) - 1.0) < 0.15


def test_edict_over_ddim_is_the_papers_update_in_the_edm_schedule():
    """EDICT writes DDIM as x_i = a x + b eps(y), a = alpha_{k+1} / alpha_k; with alpha = 1
    this is the increment form x + D(y) exactly (to float64 rounding)."""
    ode = MIXTURE.ode(bdia.EDM())
    ts = [float(t) for t in bdia.karras_grid(10, final_zero=False)]
    x = y = noise(16, torch.float64)
    p = 0.93
    for t, t_next in zip(ts, ts[1:]):
        x_i = x + (t_next - t) * ode.evaluate(t, y).eps
        y_i = y + (t_next - t) * ode.evaluate(t, x_i).eps
        x = p * x_i + (1 - p) * y_i
        y = p * y_i + (1 - p) * x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bdia.ParasiticWarning)
        pair = bdia.sample(
            ode, bdia.edict("ddim", p), noise(16, torch.float64), ts, return_pair=True
        )
    assert rel(pair.x, None, x) < 1e-13 and rel(pair.y, None, y) < 1e-13


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: bdia.edict("euler", 0.0), ValueError, r"p = 0.0 lies outside \(0, 1\]"),
        (lambda: bdia.edict("euler", 1.5), ValueError, "outside"),
        (lambda: bdia.edict("euler", math.nan), ValueError, "outside"),
        (lambda: bdia.edict("euler", "0.9"), TypeError, "must be a number"),
        (lambda: bdia.edict("euler", True), TypeError, "must be a number"),
        (lambda: bdia.edict("euler", np.True_), TypeError, "must be a number"),
        (lambda: bdia.reversible("euler", torch.tensor(True)), TypeError, "must be a number"),
        (lambda: bdia.reversible("heun", 0.0), ValueError, "coupling = 0.0 .* not invertible"),
        (lambda: bdia.reversible("heun", coupling=-1), ValueError, "outside"),
        (lambda: bdia.reversible("heun", None), TypeError, "must be a number"),
        (lambda: bdia.edict(bdia.bdia("euler")), TypeError, "single-step"),
        (lambda: bdia.reversible(3), TypeError, "needs a Solver"),
        (lambda: bdia.edict("eulr"), KeyError, "did you mean"),
    ],
)
def test_bad_parameters_raise_one_line_errors(make, error, match):
    with pytest.raises(error, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_an_exponential_base_refuses_a_plain_ode():
    ode = bdia.ODE(lambda t, x: -x)
    with pytest.raises(TypeError, match="DiffusionODE"):
        bdia.sample(ode, bdia.edict("ddim"), torch.ones(2, 1), [0.0, 1.0])


# ---------------------------------------------------------------------- parasitic
@pytest.mark.parametrize("wrap", WRAPPERS, ids=["edict", "reversible"])
def test_parasitic_is_reported_in_the_callback(wrap):
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(30, sigma_min=0.1, sigma_max=10.0, final_zero=False)
    seen = []
    pair = bdia.sample(
        ode, wrap("heun"), noise(8, torch.float64) / 8, ts, return_pair=True, callback=seen.append
    )
    assert len(seen) == len(ts) - 1
    values = [float(info["parasitic"]) for info in seen]
    # 30 steps from sigma 10 to 0.1 stay stable: measured at most 0.38 (edict), 0.005 (reversible)
    assert all(v >= 0 for v in values) and max(values) < 1.0
    last = seen[-1]["parasitic"]
    assert last.ndim == 0
    expected = (pair.x - pair.y).square().mean().sqrt() / pair.x.square().mean().sqrt()
    assert float(last) == pytest.approx(float(expected), rel=1e-5)
    assert seen[-1]["denoised"] is not None


def test_an_unstable_run_warns():
    ode = MIXTURE.ode(bdia.EDM())
    ts = bdia.karras_grid(8, final_zero=False)
    with pytest.warns(bdia.ParasiticWarning, match=r"edict-euler: .* another p$"):
        bdia.sample(ode, bdia.edict("euler"), noise(16, torch.float64), ts, progress=False)


@pytest.mark.parametrize("wrap", WRAPPERS, ids=["edict", "reversible"])
def test_rewind_rebuilds_the_state_a_step_moved_from(wrap):
    """``rewind`` (what adjoint='reversible' rebuilds earlier states with) is ``unstep``:
    the chains sit at one grid point and carry no direction."""
    ode = MIXTURE.ode(bdia.EDM())
    ts = [float(t) for t in bdia.karras_grid(6, final_zero=False)]
    solver = wrap("heun")
    state = solver.init(ode, ts, noise(4, torch.float64), at=0)
    for _ in range(3):
        state = solver.step(ode, ts, state)
    moved = solver.step(ode, ts, state)
    back = solver.rewind(ode, ts, moved)
    assert back.k == state.k and back.evaluation is None and back.parasitic is None
    assert torch.equal(back.x, state.x) and torch.equal(back.memory.y, state.memory.y)


# ------------------------------------------------------------------ the pairs as values


def _pairs_of(x: torch.Tensor) -> list[bdia.StatePair | bdia.CoupledPair]:
    low = torch.full_like(x, 2.0**-60)
    return [
        bdia.StatePair(x, x + 1, low, None, "f" * 16, (1.0, 0.5), "bdia(euler, gamma=0.9)"),
        bdia.CoupledPair(x, x + 1, low, None, "f" * 16, 1.0, "edict(euler, p=0.93)"),
    ]


def test_pairs_compare_by_value_and_are_not_hashed():
    """``==`` between two pairs compared tuples of tensors, whose truth value is an error."""
    import io
    import pickle

    x = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    pairs = zip(_pairs_of(x), _pairs_of(x.clone()), _pairs_of(x.float()))
    for k, (pair, same, single) in enumerate(pairs):
        buffer = io.BytesIO()
        torch.save(pair, buffer)
        buffer.seek(0)
        for copy in (same, pickle.loads(pickle.dumps(pair)), torch.load(buffer)):
            assert copy == pair and not copy != pair
        # Every field counts: each state, a low word (None is not a zero tensor), the dtype,
        # the fingerprint, the time(s) and the solver; and a pair equals no other kind of
        # object.
        names = [f.name for f in dataclasses.fields(pair)]
        changed = [dataclasses.replace(pair, **{names[i]: x + 2.0**-40}) for i in (0, 1)]
        changed += [
            dataclasses.replace(pair, **{names[2]: None}),
            dataclasses.replace(pair, **{names[2]: torch.zeros_like(x)}),
            dataclasses.replace(pair, fingerprint=None),
            dataclasses.replace(pair, **{names[5]: None}),
            dataclasses.replace(pair, solver=None),
            dataclasses.replace(pair, solver=pair.solver.replace("euler", "heun")),
            single,
            _pairs_of(x)[1 - k],  # the other kind of pair
        ]
        for other in changed:
            assert other != pair and not other == pair
        assert pair != x
        with pytest.raises(TypeError, match="unhashable"):
            hash(pair)


@pytest.mark.parametrize(
    "wrap", [None, bdia.edict, bdia.reversible], ids=["bdia", "edict", "reversible"]
)
def test_a_float32_pair_continued_in_a_float64_state_round_trips_exactly(wrap):
    # A float32 inversion of data leaves low words of up to half a float32 ulp. Sampling from
    # that pair in a float64 state and inverting the float64 result must give the pair's value
    # back to float64's two-word rounding (FLOAT64_BOUND, see the module docstring); with the
    # low word kept unfolded the model's inputs differ between the passes, by about 1e-6 here.
    solver = bdia.bdia("euler", 0.96) if wrap is None else wrap(bdia.get_solver("euler"))
    ode = MIXTURE.ode()
    ts = bdia.karras_grid(8, final_zero=False)
    data = MIXTURE.sample_data(16, generator=torch.Generator().manual_seed(1)).float()
    pair = bdia.invert(ode, solver, data, ts, progress=False)
    names = [f.name for f in dataclasses.fields(pair)]
    assert float(getattr(pair, names[2]).abs().max()) > 1e-7  # the low words are not zero
    with untouched(*[getattr(pair, n) for n in names[:4]]):
        forward = bdia.sample(
            ode, solver, pair, ts, state_dtype=torch.float64, return_pair=True, progress=False
        )
    back = bdia.invert(ode, solver, forward, ts, progress=False)
    for high, low in ((names[0], names[2]), (names[1], names[3])):
        want = wide(getattr(pair, high), getattr(pair, low))
        got = wide(getattr(back, high), getattr(back, low))
        assert float((got - want).abs().max() / want.abs().max()) < FLOAT64_BOUND


@pytest.mark.parametrize("wrap", [bdia.edict, bdia.reversible], ids=["edict", "reversible"])
@pytest.mark.parametrize("direction", ["sample", "invert"])
def test_the_callbacks_denoised_is_the_steps_first_evaluation(wrap, direction):
    """The coupled solvers evaluate the model at the companion chain (and edict's inversion
    at t_next), not at (t, x): the callback reports that first evaluation of the move, as
    docs/quickstart.md says, and it differs from the denoiser at (t, x) by order one."""
    mixture = toy.GaussianMixture.random(2, 4, seed=0)
    calls = []

    def recording(x, sigma):
        out = mixture.denoiser(x, sigma)
        calls.append(out.clone())
        return out

    ode = bdia.DiffusionODE(recording, bdia.EDM())
    ts = bdia.karras_grid(8, final_zero=False)
    x = 80 * torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = wrap("euler")
    end = bdia.sample(ode, solver, x, ts, return_pair=True) if direction == "invert" else x
    calls.clear()
    seen, firsts = [], []

    def callback(info):
        seen.append(info)
        firsts.append(calls[0])
        calls.clear()

    run = bdia.sample if direction == "sample" else bdia.invert
    run(ode, solver, end, ts, callback=callback)
    assert len(seen) == len(ts) - 1
    off = []
    for info, out in zip(seen, firsts):
        assert torch.equal(info["denoised"], out)
        at_x = mixture.denoiser(info["x"], torch.full((16,), info["t"], dtype=torch.float64))
        off.append(float((info["denoised"] - at_x).norm() / at_x.norm()))
    # Measured: 2.7 and 4.4 (sample), 0.85 (edict's inversion); reversible's inversion
    # evaluates at x and reports 0.
    if (wrap, direction) == (bdia.reversible, "invert"):
        assert max(off) == 0.0
    else:
        assert max(off) > 0.1


def test_every_reversible_wrapper_refuses_what_its_base_refuses():
    """A base solver's check (a grid it cannot step) holds for bdia, edict and reversible
    built on it, before any model call. The wrappers checked only themselves, so a user's
    base that refused a grid alone ran under any of them."""
    euler = bdia.get_solver("euler")

    @dataclasses.dataclass(frozen=True)
    class ShortGridsOnly(type(euler)):
        def check(self, ode, ts):
            super().check(ode, ts)
            if len(ts) > 5:
                raise ValueError("short-grids-only: at most 4 steps")

    base = ShortGridsOnly(**{f.name: getattr(euler, f.name) for f in dataclasses.fields(euler)})
    mixture = toy.GaussianMixture.random(dim=2, components=2, seed=0)
    ode = mixture.ode()
    ts = bdia.karras_grid(8, final_zero=False)
    for solver in (base, bdia.bdia(base, 0.96), bdia.edict(base), bdia.reversible(base)):
        ode.reset_nfe()
        with pytest.raises(ValueError, match="short-grids-only"):
            bdia.sample(ode, solver, 80.0 * torch.randn(4, 2, dtype=torch.float64), ts)
        assert ode.nfe == 0, solver
    short = bdia.karras_grid(4, final_zero=False)
    bdia.sample(ode, bdia.bdia(base, 0.96), 80.0 * torch.randn(4, 2, dtype=torch.float64), short)
