"""Bad input: every refusal raises the right exception type with a useful message, and leaves
the caller's tensors exactly as they were."""

from __future__ import annotations

import collections
import importlib
import math
import re
import warnings
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import device_reads, fake_mps, untouched

import bdia
from bdia import (
    EDM,
    ODE,
    ButcherTableau,
    DiffusionODE,
    StatePair,
    VPLinear,
    get_solver,
    invert,
    karras_grid,
    register_solver,
    register_tableau,
    sample,
)
from bdia import bdia as make_bdia
from bdia.models.toy import GaussianMixture

BATCH, DIM = 4, 3


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(DIM, 4, seed=1)


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 80.0 * torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)


@pytest.fixture
def ode(mixture: GaussianMixture) -> DiffusionODE:
    return mixture.ode()


def plain_ode() -> ODE:
    return ODE(lambda t, y: -y)


GRID = [80.0, 20.0, 5.0, 1.0, 0.3]  # EDM times, sigma > 0 everywhere: inversion may start at 0.3


# ----------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "name, close",
    [("heunn", r"'heun'"), ("bdia-eulr", r"'(bdia-)?euler'"), ("rk5", r"'rk4'")],
)
def test_unknown_solver_lists_close_matches(name: str, close: str) -> None:
    with pytest.raises(KeyError, match=rf"unknown solver .*did you mean .*{close}"):
        get_solver(name)


def test_unknown_solver_lists_registered_names() -> None:
    with pytest.raises(KeyError, match="Registered: .*euler.*heun"):
        get_solver("no_such_thing_at_all")


def test_register_solver_duplicate_name() -> None:
    before = get_solver("euler")
    with pytest.raises(ValueError, match="'euler' is already registered"):
        register_solver("euler")(lambda: before)
    with pytest.raises(ValueError, match="'heun' is already registered"):
        register_tableau("heun", ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=1))
    # the registry still holds the original solvers
    assert get_solver("euler") == before
    assert get_solver("heun").stages == 2


def test_register_solver_reserved_prefix() -> None:
    with pytest.raises(ValueError, match="reserved"):
        register_solver("bdia-mine")


def test_butcher_tableau_row_of_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"row a\[1\] must have 1 entries"):
        ButcherTableau(c=(0.0, 0.5), a=((), (0.25, 0.25)), b=(0.5, 0.5), order=2)
    with pytest.raises(ValueError, match=r"row a\[0\] must have 0 entries"):
        ButcherTableau(c=(0.0, 0.5), a=((0.0,), (0.5,)), b=(0.5, 0.5), order=2)


def test_butcher_tableau_weights_not_summing_to_one() -> None:
    with pytest.raises(ValueError, match="b must sum to 1"):
        ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.5, 0.6), order=2)


def test_butcher_tableau_entry_counts_disagree() -> None:
    with pytest.raises(ValueError, match="must all have 2 entries"):
        ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(1.0,), order=1)


# -------------------------------------------------------------------------- gamma


@pytest.mark.parametrize("gamma", [1.5, -0.1, 1.0 + 1e-12, float("nan"), float("inf")])
def test_gamma_number_outside_unit_interval(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"gamma = .* lies outside \[0, 1\]"):
        make_bdia("euler", gamma=gamma)


def test_gamma_zero_dim_tensor_outside_unit_interval() -> None:
    g = torch.tensor(1.5)
    with untouched(g), pytest.raises(ValueError, match="outside"):
        make_bdia("euler", gamma=g)


@pytest.mark.parametrize("bad", [1.2, -0.5, float("nan")])
def test_gamma_sequence_value_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"gamma\[1\] = .* lies outside \[0, 1\]"):
        make_bdia("euler", gamma=[0.5, bad, 0.9])


def test_gamma_sequence_empty() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        make_bdia("euler", gamma=[])


@pytest.mark.parametrize(
    "gamma, pattern",
    [
        ({0.9}, "got a set, which has no order"),
        (frozenset({0.9, 0.5}), "got a frozenset, which has no order"),
        ({0: 0.9}, "got a dict, which has no order"),
        (True, "gamma must be a number in .* got the bool True"),
        (np.bool_(False), "gamma must be a number in .* got the bool"),
        ([0.9, True], r"gamma\[1\] must be a number in .* got the bool True"),
        (["0.9", 0.8], r"gamma\[0\] must be a number, got the string '0.9'"),
    ],
)
def test_gamma_without_order_or_a_bool_is_refused(gamma, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        make_bdia("euler", gamma=gamma)


@pytest.mark.parametrize("gamma", [Fraction(24, 25), Decimal("0.96"), np.float32(0.96)])
def test_gamma_of_any_real_number_type_is_its_float(gamma) -> None:
    """A fraction or decimal is a number, as edict's p and reversible's coupling take it."""
    wrapper = make_bdia("euler", gamma=gamma)
    assert isinstance(wrapper.gamma, float) and wrapper.gamma == float(gamma)


@pytest.mark.parametrize("gamma, order", [([1.0] * 3, 2), (1.0, 2), ([1.0, 0.9, 1.0], 1)])
def test_order_of_a_gamma_sequence_follows_its_values(gamma, order: int) -> None:
    assert make_bdia("euler", gamma=gamma).order == order


@pytest.mark.parametrize("gamma, per_step", [(0.0, 2), ([0.0] * 3, 2), ([0.0, 0.5, 0.0], 3)])
def test_nfe_per_step_of_a_gamma_sequence_follows_its_values(
    ode: DiffusionODE, x: torch.Tensor, gamma, per_step: int
) -> None:
    solver = make_bdia("heun", gamma=gamma)
    assert solver.nfe_per_step == per_step
    if per_step == 2:  # every update a plain heun step: what a run counts
        sample(ode, solver, x, GRID, progress=False)
        assert ode.nfe == per_step * (len(GRID) - 1)


def test_get_solver_bdia_prefix_checks_gamma() -> None:
    with pytest.raises(ValueError, match="outside"):
        get_solver("bdia-euler", gamma=2.0)


def test_unknown_named_gamma_schedule() -> None:
    with pytest.raises(ValueError, match="unknown gamma schedule 'obelmm'"):
        make_bdia("euler", gamma="obelmm")


@pytest.mark.parametrize("n_values", [2, 4])
def test_gamma_sequence_of_wrong_length(ode: DiffusionODE, x: torch.Tensor, n_values: int) -> None:
    # a grid of 5 points has 3 two-step updates (the first step is a plain base step)
    solver = make_bdia("euler", gamma=[0.9] * n_values)
    ts = torch.tensor(GRID, dtype=torch.float64)
    with untouched(x, ts):
        with pytest.raises(ValueError, match=rf"gamma has {n_values} values .* 3 two-step"):
            sample(ode, solver, x, ts, progress=False)
        with pytest.raises(ValueError, match=rf"gamma has {n_values} values"):
            invert(ode, solver, x, ts, progress=False)
    assert ode.nfe == 0  # refused before any model call


@pytest.mark.parametrize("base", ["euler", "heun", "ddim", "dpm_solver_pp_2s"])
def test_gamma_zero_sample_is_the_base_solver(
    ode: DiffusionODE, x: torch.Tensor, base: str
) -> None:
    ts = karras_grid(6)
    with untouched(x):
        plain = sample(ode, get_solver(base), x, ts, progress=False)
        wrapped = sample(ode, make_bdia(base, gamma=0.0), x, ts, progress=False)
    # the same arithmetic in the same order: bit-identical, not merely close
    assert torch.equal(wrapped, plain)


def test_gamma_zero_sequence_sample_is_the_base_solver(ode: DiffusionODE, x: torch.Tensor) -> None:
    ts = karras_grid(6)
    plain = sample(ode, get_solver("euler"), x, ts, progress=False)
    wrapped = sample(ode, make_bdia("euler", gamma=[0.0] * 5), x, ts, progress=False)
    assert torch.equal(wrapped, plain)


@pytest.mark.parametrize("gamma", [0.0, [0.5, 0.0, 0.5]])
def test_gamma_zero_cannot_be_inverted(ode: DiffusionODE, x: torch.Tensor, gamma) -> None:
    ts = torch.tensor(GRID, dtype=torch.float64)
    with untouched(x, ts), pytest.raises(ValueError, match="gamma = 0"):
        invert(ode, make_bdia("euler", gamma=gamma), x, ts, progress=False)
    assert ode.nfe == 0


def test_invert_with_a_gamma_of_zero(ode: DiffusionODE, x: torch.Tensor) -> None:
    solver = make_bdia("euler", gamma=(0.5, 0.0))
    with untouched(x), pytest.raises(ValueError, match="gamma = 0"):
        invert(ode, solver, x, [80.0, 20.0, 5.0, 1.0], progress=False)
    assert ode.nfe == 0


# -------------------------------------------------------------------------- grids

TURN = r"strictly monotonic.*ts\[1\] = 20.0, ts\[2\] = "
BAD_GRIDS = {
    "non-monotonic": ([80.0, 20.0, 30.0, 1.0], TURN + "30.0"),
    "repeated": ([80.0, 20.0, 20.0, 1.0], TURN + "20.0"),
    "one point": ([80.0], r"at least 2 points .*got 1"),
    "empty": ([], r"at least 2 points .*got 0"),
    "2-D": (torch.tensor([[80.0, 20.0], [5.0, 1.0]]).double(), r"1-D, got shape \(2, 2\)"),
    "NaN": ([80.0, float("nan"), 5.0, 1.0], "NaN"),
}


@pytest.mark.parametrize("kind", list(BAD_GRIDS))
@pytest.mark.parametrize("driver", ["sample", "invert"])
@pytest.mark.parametrize("solver_name", ["euler", "bdia-euler"])
def test_bad_grid(
    ode: DiffusionODE, x: torch.Tensor, kind: str, driver: str, solver_name: str
) -> None:
    ts, pattern = BAD_GRIDS[kind]
    ts_arg = ts if isinstance(ts, torch.Tensor) else torch.tensor(ts, dtype=torch.float64)
    run = sample if driver == "sample" else invert
    with untouched(x, ts_arg), pytest.raises(ValueError, match=pattern):
        run(ode, get_solver(solver_name), x, ts_arg, progress=False)
    # also as a Python list
    if not isinstance(ts, torch.Tensor):
        with pytest.raises(ValueError, match=pattern):
            run(ode, get_solver(solver_name), x, list(ts), progress=False)
    assert ode.nfe == 0


def test_a_grid_array_shares_the_1d_check(ode: DiffusionODE, x: torch.Tensor) -> None:
    ts = np.array([GRID])
    with untouched(x), pytest.raises(ValueError, match=r"1-D, got shape \(1, 5\)"):
        sample(ode, get_solver("euler"), x, ts, progress=False)
    assert torch.equal(
        sample(ode, get_solver("euler"), x, np.array(GRID), progress=False),
        sample(ode, get_solver("euler"), x, GRID, progress=False),
    )


@pytest.mark.parametrize(
    "ts, shown",
    [
        (None, "got NoneType None"),
        ("abc", "got str 'abc'"),
        (80.0, "got float 80.0"),
        ([80.0, "x", 1.0], r"ts\[1\] = 'x' is not a real number"),
        ([80.0, [20.0, 5.0], 1.0], r"ts\[1\] = \[20.0, 5.0\] is not a real number"),
    ],
)
@pytest.mark.parametrize("driver", ["sample", "invert"])
def test_a_grid_that_is_no_sequence_of_numbers(
    ode: DiffusionODE, x: torch.Tensor, ts, shown: str, driver: str
) -> None:
    run = sample if driver == "sample" else invert
    pattern = r"the time grid ts must be a 1-D tensor, array or sequence of numbers.*" + shown
    with untouched(x), pytest.raises(TypeError, match=pattern):
        run(ode, get_solver("euler"), x, ts, progress=False)
    assert ode.nfe == 0


@pytest.mark.parametrize("ts", [{1.0, 0.5}, frozenset({1.0, 0.5}), {1.0: 0, 0.5: 1}])
def test_a_grid_without_order_is_refused(ts) -> None:
    """A set iterates in hash order: {1.0, 0.5} used to run from 0.5 to 1.0, and odeint on
    y' = -y with euler returned 0.5 where the grid [1.0, 0.5] gives 1.5. A mapping is refused
    with it, as gamma refuses both."""
    y0 = torch.ones(1, 1, dtype=torch.float64)
    for run in (sample, invert):
        ode = plain_ode()
        with untouched(y0), pytest.raises(TypeError, match=r"has no order.*list or a tensor"):
            run(ode, get_solver("euler"), y0, ts, progress=False)
        assert ode.nfe == 0
    with pytest.raises(TypeError, match="has no order"):
        bdia.odeint(lambda t, y: -y, y0, ts, method="euler")


def test_bad_grid_plain_ode(x: torch.Tensor) -> None:
    with untouched(x):
        with pytest.raises(ValueError, match="strictly monotonic"):
            sample(plain_ode(), get_solver("rk4"), x, [0.0, 1.0, 1.0], progress=False)
        with pytest.raises(ValueError, match=r"ts\[1\] = inf is not finite"):
            sample(plain_ode(), get_solver("rk4"), x, [0.0, math.inf], progress=False)


def test_infinite_time_on_edm_schedule_is_refused_before_any_model_call(x: torch.Tensor) -> None:
    ode = GaussianMixture.random(DIM, 2, seed=0).ode(EDM())
    with untouched(x):
        with pytest.raises(ValueError, match=r"ts\[0\] = inf lies outside"):
            sample(ode, get_solver("euler"), x, [math.inf, 1.0, 0.5], progress=False)
    assert ode.nfe == 0


@pytest.mark.parametrize(
    "ts, name",
    [([1.5, 0.5, 0.1], r"ts\[0\] = 1.5"), ([0.9, 0.5, -0.1], r"ts\[2\] = -0.1")],
)
@pytest.mark.parametrize("driver", ["sample", "invert"])
def test_time_outside_vp_linear(
    mixture: GaussianMixture, x: torch.Tensor, ts: list[float], name: str, driver: str
) -> None:
    ode = mixture.ode(VPLinear())
    run = sample if driver == "sample" else invert
    with untouched(x), pytest.raises(ValueError, match=rf"{name} lies outside VPLinear's domain"):
        run(ode, make_bdia("euler", 0.9), x, ts, progress=False)
    assert ode.nfe == 0


@pytest.mark.parametrize("driver", ["sample", "invert"])
def test_negative_time_edm(ode: DiffusionODE, x: torch.Tensor, driver: str) -> None:
    run = sample if driver == "sample" else invert
    with untouched(x), pytest.raises(ValueError, match=r"ts\[3\] = -0.5 lies outside EDM"):
        run(ode, get_solver("heun"), x, [3.0, 2.0, 1.0, -0.5], progress=False)


# -------------------------------------------------------------------------- pairs


def test_pair_of_mismatched_shapes(ode: DiffusionODE, x: torch.Tensor) -> None:
    other = x[:, :2].clone()
    ts = torch.tensor(GRID, dtype=torch.float64)
    solver = make_bdia("euler", 0.9)
    with untouched(x, other):
        with pytest.raises(ValueError, match=r"must match in shape.*\(4, 3\).*\(4, 2\)"):
            sample(ode, solver, (x, other), ts, progress=False)
        with pytest.raises(ValueError, match=r"must match in shape.*\(4, 3\).*\(4, 2\)"):
            sample(ode, solver, StatePair(x, other), ts, progress=False)
        with pytest.raises(ValueError, match=r"must match in shape.*\(4, 3\).*\(4, 2\)"):
            invert(ode, solver, (x, other), ts, progress=False)
    assert ode.nfe == 0


def test_pair_of_mismatched_dtypes(ode: DiffusionODE, x: torch.Tensor) -> None:
    other = x.to(torch.float32)
    pattern = r"float64 cpu and \(4, 3\) torch.float32"
    with untouched(x, other), pytest.raises(ValueError, match=pattern):
        sample(ode, make_bdia("euler", 0.9), (x, other), GRID, progress=False)


@pytest.mark.parametrize("driver", ["sample", "invert"])
def test_pair_with_three_elements(ode: DiffusionODE, x: torch.Tensor, driver: str) -> None:
    run = sample if driver == "sample" else invert
    with (
        untouched(x),
        pytest.raises(ValueError, match=r"exactly 2 tensors \(earlier, later\), got 3"),
    ):
        run(ode, make_bdia("euler", 0.9), (x, x, x), GRID, progress=False)


def test_non_tensor_start(ode: DiffusionODE) -> None:
    with pytest.raises(TypeError, match="torch.Tensor or a StatePair"):
        sample(ode, get_solver("euler"), [[1.0, 2.0, 3.0]], GRID, progress=False)


def test_zero_dim_start(ode: DiffusionODE) -> None:
    x0 = torch.tensor(1.0, dtype=torch.float64)
    with untouched(x0), pytest.raises(ValueError, match="batch dimension"):
        sample(ode, get_solver("euler"), x0, GRID, progress=False)


def test_integer_start(ode: DiffusionODE) -> None:
    x0 = torch.ones(BATCH, DIM, dtype=torch.int64)
    with untouched(x0), pytest.raises(TypeError, match="real floating"):
        sample(ode, get_solver("euler"), x0, GRID, progress=False)


def test_a_start_on_the_meta_device_is_refused(ode: DiffusionODE) -> None:
    """A meta tensor has a shape but no values: the finiteness check used to fail inside
    torch with "Tensor.item() cannot be called on meta tensors", which named neither the
    argument nor the device."""
    x0 = torch.ones(BATCH, DIM, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"start is on the meta device.*holds no values"):
        sample(ode, get_solver("euler"), x0, GRID, progress=False)
    with pytest.raises(ValueError, match=r"end\[0\] is on the meta device"):
        invert(ode, make_bdia("euler", 0.9), StatePair(x0, x0), GRID, progress=False)
    with pytest.raises(ValueError, match=r"y0 is on the meta device"):
        bdia.odeint(lambda t, y: -y, x0, [0.0, 1.0])
    assert ode.nfe == 0


# ------------------------------------------------- exponential solvers on plain ODE

EXPONENTIAL = ["ddim", "dpm_solver_2", "dpm_solver_pp_3s"]


def _solver(name: str):
    return make_bdia("ddim", 0.9) if name == "bdia(ddim)" else get_solver(name)


@pytest.mark.parametrize("name", EXPONENTIAL + ["bdia(ddim)"])
@pytest.mark.parametrize("driver", ["sample", "invert"])
def test_exponential_solver_refuses_plain_ode_in_driver(
    x: torch.Tensor, name: str, driver: str
) -> None:
    problem = plain_ode()
    run = sample if driver == "sample" else invert
    with untouched(x), pytest.raises(TypeError, match="needs a DiffusionODE"):
        run(problem, _solver(name), x, [0.0, 0.5, 1.0], progress=False)
    assert problem.nfe == 0


@pytest.mark.parametrize("name", EXPONENTIAL)
def test_exponential_solver_refuses_plain_ode_in_step(x: torch.Tensor, name: str) -> None:
    problem = plain_ode()
    with untouched(x):
        with pytest.raises(TypeError, match="needs a DiffusionODE"):
            get_solver(name).flow(problem, 0.0, 0.5, x)
        first = problem.evaluate(0.0, x)
        with pytest.raises(TypeError, match="needs a DiffusionODE"):
            get_solver(name).flow(problem, 0.0, 0.5, x, first=first)


def test_bdia_ddim_refuses_plain_ode_before_any_call(x: torch.Tensor) -> None:
    problem = plain_ode()
    solver = make_bdia("ddim", 0.9)
    grid = [0.0, 0.5, 1.0]
    with untouched(x):
        with pytest.raises(TypeError, match="needs a DiffusionODE"):
            solver.check(problem, grid)
        with pytest.raises(TypeError, match="needs a DiffusionODE"):
            sample(problem, solver, x, grid, progress=False)
        with pytest.raises(TypeError, match="needs a DiffusionODE"):
            invert(problem, solver, x, grid, progress=False)
    assert problem.nfe == 0


# ------------------------------------------------------------- non-finite values


def _poisoned(mixture: GaussianMixture, bad: float, below: float | None, above: float | None):
    """The exact denoiser, except one entry is ``bad`` where sigma_bar < below (or > above)."""

    def denoiser(x_bar: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        out = mixture.denoiser(x_bar, sigma_bar)
        s = float(sigma_bar[0])
        if (below is not None and s < below) or (above is not None and s > above):
            out = out.clone()
            out[1, 0] = bad  # one entry of one sample: the check must look at all of them
        return out

    return denoiser


def _step_message(k: int, t: float) -> str:
    return rf"non-finite values at step {k} \(t = {re.escape(f'{t:.6g}')} ->"


SINGLE_STAGE = ["euler", "ddim", "bdia-euler", "bdia-ddim"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("solver_name", SINGLE_STAGE)
@pytest.mark.parametrize("schedule", [EDM(), VPLinear()], ids=["edm", "vp"])
def test_non_finite_model_in_sample_names_step(
    mixture: GaussianMixture, x: torch.Tensor, bad: float, solver_name: str, schedule
) -> None:
    ts = karras_grid(10, final_zero=False, schedule=schedule)
    grid = ts.tolist()
    sigma_bars = [schedule.sigma_bar(t) for t in grid]
    threshold = math.sqrt(sigma_bars[5] * sigma_bars[6])  # strictly between points 5 and 6
    # a single-stage solver evaluates the model only at a step's start time, so the first
    # failing step is the first one that starts below the threshold
    k = next(i for i in range(len(grid) - 1) if sigma_bars[i] < threshold)
    assert k == 6
    ode = DiffusionODE(_poisoned(mixture, bad, below=threshold, above=None), schedule)
    x0 = x * schedule.alpha(grid[0])
    with untouched(x0, ts), pytest.raises(FloatingPointError, match=_step_message(k, grid[k])):
        sample(ode, get_solver(solver_name), x0, ts, progress=False)


@pytest.mark.parametrize("solver_name", ["heun", "bdia-heun", "rk4"])
def test_non_finite_model_in_sample_multistage(
    mixture: GaussianMixture, x: torch.Tensor, solver_name: str
) -> None:
    ts = karras_grid(10, final_zero=False)
    grid = ts.tolist()
    threshold = math.sqrt(grid[5] * grid[6])
    # these solvers evaluate at the step's end (or inside it): the failing step is the first
    # one whose end lies below the threshold
    k = next(i for i in range(len(grid) - 1) if grid[i + 1] < threshold)
    assert k == 5
    ode = DiffusionODE(_poisoned(mixture, float("nan"), below=threshold, above=None))
    with untouched(x, ts), pytest.raises(FloatingPointError, match=_step_message(k, grid[k])):
        sample(ode, get_solver(solver_name), x, ts, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("from_pair", [False, True])
@pytest.mark.parametrize("solver_name", ["euler", "bdia-euler", "bdia-ddim"])
def test_non_finite_model_in_invert_names_step(
    mixture: GaussianMixture, x: torch.Tensor, bad: float, from_pair: bool, solver_name: str
) -> None:
    ts = karras_grid(10, final_zero=False)
    grid = ts.tolist()
    solver = (
        get_solver(solver_name, gamma=0.9)
        if solver_name.startswith("bdia")
        else (get_solver(solver_name))
    )
    end = sample(mixture.ode(), solver, x, ts, return_pair=True, progress=False)
    if not from_pair:
        end = end.later
    threshold = math.sqrt(grid[3] * grid[4])
    # inversion walks from the clean end; its step k evaluates only at (t_k, x_k), so the first
    # failing step is the largest k whose time lies above the threshold
    first_k = len(grid) - 2 if from_pair else len(grid) - 1
    k = next(i for i in range(first_k, 0, -1) if grid[i] > threshold)
    assert k == 3
    ode = DiffusionODE(_poisoned(mixture, bad, below=None, above=threshold))
    tensors = (end.earlier, end.later) if isinstance(end, StatePair) else (end,)
    with untouched(*tensors), pytest.raises(FloatingPointError, match=_step_message(k, grid[k])):
        invert(ode, solver, end, ts, progress=False)


def test_non_finite_plain_ode_names_step(x: torch.Tensor) -> None:
    # a blow-up that is not a diffusion model's: f divides by zero at t = 0.4 only
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y / 0.0 if abs(float(t) - 0.4) < 1e-12 else -y

    ts = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    with untouched(x), pytest.raises(FloatingPointError, match=_step_message(4, 0.4)):
        sample(ODE(f), get_solver("euler"), x, ts, progress=False)


def _blows_up_at(t_bad: float, seen: list[float], fail_on_nan: bool = False):
    """f = -y, except 1/0 at t_bad; records every time it is evaluated at."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(float(t))
        if fail_on_nan and not bool(torch.isfinite(y).all()):
            raise ValueError("this model refuses a NaN input")
        return -y / 0.0 if abs(float(t) - t_bad) < 1e-12 else -y

    return f


TEN_STEPS = [i / 10 for i in range(11)]


@pytest.mark.parametrize("adjoint", [None, "reversible"])
def test_a_non_finite_step_stops_the_loop_one_step_later(x: torch.Tensor, adjoint) -> None:
    # Each step's flag is read once the next step has been launched (a GPU never waits for
    # it), so exactly one more step runs: step 4 made the NaN, step 5 evaluated once more.
    seen: list[float] = []
    solver = get_solver("euler") if adjoint is None else make_bdia("euler", 0.5)
    ode = ODE(_blows_up_at(0.4, seen))
    with untouched(x), pytest.raises(FloatingPointError, match=_step_message(4, 0.4)):
        sample(ode, solver, x, TEN_STEPS, progress=False, adjoint=adjoint)
    assert max(seen) == pytest.approx(0.5) and 0.6 not in seen


def test_a_non_finite_step_in_an_inversion_stops_one_step_later(x: torch.Tensor) -> None:
    seen: list[float] = []
    end = sample(ODE(lambda t, y: -y), get_solver("euler"), x, TEN_STEPS, progress=False)
    with untouched(end), pytest.raises(FloatingPointError, match=_step_message(6, 0.6)):
        invert(ODE(_blows_up_at(0.6, seen)), get_solver("euler"), end, TEN_STEPS, progress=False)
    # The inversion evaluates at each step's start: 1.0 down to 0.6 (the NaN), then 0.5.
    assert min(seen) == pytest.approx(0.5) and 0.4 not in seen


def test_a_callback_never_sees_a_non_finite_state(x: torch.Tensor) -> None:
    # With a callback each flag is read before the callback is called, so the loop stops at
    # the step that made the NaN, as it always did.
    seen: list[float] = []
    states: list[torch.Tensor] = []
    ode = ODE(_blows_up_at(0.4, seen))
    with pytest.raises(FloatingPointError, match=_step_message(4, 0.4)):
        sample(
            ode,
            get_solver("euler"),
            x,
            TEN_STEPS,
            progress=False,
            callback=lambda d: states.append(d["x"]),
        )
    assert len(states) == 4 and all(bool(torch.isfinite(s).all()) for s in states)
    assert max(seen) == pytest.approx(0.4)


def _reads_of_a_round_trip(make: Callable, steps: int, monkeypatch) -> collections.Counter:
    """The reads back to Python of a device's tensors (MPS, pretended on the CPU) in
    ``bdia.sample`` and ``bdia.invert`` with bdia(euler, 0.96) over ``steps`` Karras steps
    (the last, to sigma = 0, left out; in the ODE's schedule) of the ODE and start state
    ``make()`` gives there."""
    with fake_mps(monkeypatch), torch.no_grad():
        ode, x = make()
        ts = bdia.karras_grid(steps, schedule=getattr(ode, "schedule", bdia.EDM()))[:-1]
        solver = make_bdia("euler", 0.96)
        with device_reads() as reads:
            pair = sample(ode, solver, x, ts, progress=False, return_pair=True)
            invert(ode, solver, pair, ts, progress=False)
    return collections.Counter(reads)


def _edm_network_ode() -> tuple:
    from bdia.models.networks import EDMPrecond

    torch.manual_seed(0)
    small = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    net = EDMPrecond(16, 3, label_dim=0, **small).eval().to("mps")
    return DiffusionODE(net, bdia.EDM()), (80 * torch.randn(2, 3, 16, 16)).to("mps")


def _diffusers_unet_ode() -> tuple:
    from diffusers import DDIMScheduler

    from bdia.integrations.diffusers import from_diffusers
    from bdia.integrations.diffusers.tiny import tiny_unet

    ode = from_diffusers(tiny_unet().to("mps"), DDIMScheduler(clip_sample=False))
    return ode, torch.randn(2, 3, 8, 8).to("mps")


def _z_image_guided_ode() -> tuple:
    """Z-Image's transformer under CFG with ``cfg_normalization``, whose cap on the guided
    prediction's norm is chosen per sample."""
    from bdia.integrations.diffusers import from_diffusers
    from bdia.integrations.diffusers.tiny import tiny_z_image_pipeline

    pipe = tiny_z_image_pipeline()
    g = torch.Generator().manual_seed(0)

    def prompts(*lengths: int) -> list[torch.Tensor]:
        return [torch.randn(n, 16, generator=g).to("mps") for n in lengths]

    cond = dict(guidance_scale=4.0, cfg_normalization=1.0, cap_feats=prompts(5, 3))
    negative = dict(cap_feats=prompts(7, 2))
    ode = from_diffusers(pipe.transformer.to("mps"), pipe.scheduler, **cond, negative_cond=negative)
    return ode, torch.randn(2, 4, 4, 4).to("mps")


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "make",
    [
        lambda: (ODE(lambda t, y: -y / (1 + t)), torch.randn(2, 3).to("mps")),
        _edm_network_ode,
        _diffusers_unet_ode,
        pytest.param(
            _z_image_guided_ode,
            marks=pytest.mark.skipif(
                not hasattr(importlib.import_module("diffusers"), "ZImagePipeline"),
                reason="ZImagePipeline is in diffusers 0.36 and newer",
            ),
        ),
    ],
    ids=["plain-ode", "edm-network", "diffusers-unet", "z-image-cfg-normalization"],
)
def test_each_step_reads_back_from_the_device_only_its_finite_check(make, monkeypatch) -> None:
    """Four more steps each way read back exactly eight more values, each the bool of a
    state's finite check (read one step late, see bdia._steps.FiniteCheck): no model call
    and no solver step reads a device tensor back, which on a GPU would make the host wait
    for the device (the time reaches the network filled on the device, or on the host for a
    diffusers model, which maps it in Python). What a run reads once (the start state's
    checks, the parasitic warning's size) stays the same."""
    few = _reads_of_a_round_trip(make, 5, monkeypatch)
    more = _reads_of_a_round_trip(make, 9, monkeypatch)
    assert more - few == collections.Counter({"__bool__": 8}), (few, more)
    assert few - more == collections.Counter()


def test_a_step_failing_on_a_non_finite_state_reports_the_step_that_made_it(
    x: torch.Tensor,
) -> None:
    # The step after the NaN fails in its own way (here the model refuses a NaN input): the
    # unread flag's error comes first, with the model's as its cause.
    seen: list[float] = []
    ode = ODE(_blows_up_at(0.4, seen, fail_on_nan=True))
    with pytest.raises(FloatingPointError, match=_step_message(4, 0.4)) as caught:
        sample(ode, get_solver("euler"), x, TEN_STEPS, progress=False)
    assert isinstance(caught.value.__cause__, ValueError)

    # An error with every state finite is the step's own.
    def refuses(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if float(t) > 0.25:
            raise ValueError("refused at 0.3")
        return -y

    with pytest.raises(ValueError, match="refused at 0.3"):
        sample(ODE(refuses), get_solver("euler"), x, TEN_STEPS, progress=False)


# ---------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("driver", ["sample", "invert"])
def test_half_state_refused(ode: DiffusionODE, x: torch.Tensor, dtype, driver: str) -> None:
    half = x.to(dtype)
    run = sample if driver == "sample" else invert
    with untouched(half), pytest.raises(ValueError, match="state is refused.*state_dtype"):
        run(ode, make_bdia("euler", 0.9), half, GRID, progress=False)
    with untouched(half), pytest.raises(ValueError, match="state_dtype"):
        run(ode, make_bdia("euler", 0.9), (half, half), GRID, progress=False)
    assert ode.nfe == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_state_dtype_argument_refused(ode: DiffusionODE, x: torch.Tensor, dtype) -> None:
    x32 = x.to(torch.float32)
    with untouched(x32):
        with pytest.raises(ValueError, match="state_dtype"):
            sample(ode, get_solver("euler"), x32, GRID, progress=False, state_dtype=dtype)
        with pytest.raises(ValueError, match="state_dtype"):
            invert(ode, get_solver("euler"), x32, GRID, progress=False, state_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_plain_ode_gets_its_time_in_float32(dtype: torch.dtype) -> None:
    """As a DiffusionODE's network gets its noise level: bfloat16 would give 1000.0 for both."""
    seen: list[tuple[torch.dtype, torch.dtype, float]] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((t.dtype, y.dtype, float(t)))
        return -y

    y0 = torch.ones(1, 1, dtype=torch.float64)
    sample(ODE(f, model_dtype=dtype), get_solver("euler"), y0, [1000.3, 1001.7], progress=False)
    assert seen == [(torch.float32, dtype, float(torch.tensor(1000.3, dtype=torch.float32)))]


def test_a_plain_odes_time_is_rounded_to_the_state_dtype_as_a_0d_tensor() -> None:
    # The time is filled on the device (no copy from the host), rounded as torch.tensor
    # rounds it: a time past float32's range reaches f as inf rather than raising.
    seen: list[torch.Tensor] = []
    ode = ODE(lambda t, y: (seen.append(t), -y)[1])
    ode.evaluate(1e39, torch.zeros(2))
    ode.evaluate(1 / 3, torch.zeros(2, dtype=torch.float64))
    ode.evaluate(1 / 3, torch.zeros(2))
    assert [t.shape for t in seen] == [()] * 3
    assert [t.dtype for t in seen] == [torch.float32, torch.float64, torch.float32]
    assert float(seen[0]) == math.inf and float(seen[1]) == 1 / 3
    assert float(seen[2]) == float(torch.tensor(1 / 3, dtype=torch.float32)) != 1 / 3


def test_half_network_with_float32_state(mixture: GaussianMixture, x: torch.Tensor) -> None:
    seen: list[torch.dtype] = []

    def denoiser(x_bar: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        seen.append(x_bar.dtype)
        return mixture.denoiser(x_bar, sigma_bar)

    ode = DiffusionODE(denoiser, model_dtype=torch.float16)
    x32 = x.to(torch.float32)
    ts = karras_grid(8)
    with untouched(x32):
        out = sample(ode, get_solver("heun"), x32, ts, progress=False)
        out_bdia = sample(ode, make_bdia("heun", 0.9), x32, ts, progress=False)
    assert out.dtype == torch.float32 and out_bdia.dtype == torch.float32
    assert seen and set(seen) == {torch.float16}
    assert bool(torch.isfinite(out).all())
    # float16 has 11 bits of mantissa: the network's answer is good to ~1e-3 relative, so the
    # result must agree with a float64 run to a few 1e-2 in absolute terms (|x| ~ 1 at the end)
    ref = sample(mixture.ode(), get_solver("heun"), x, ts, progress=False)
    assert float((out.double() - ref).abs().max()) < 5e-2


def test_model_returns_wrong_shape(mixture: GaussianMixture, x: torch.Tensor) -> None:
    ode = DiffusionODE(lambda xb, sb: mixture.denoiser(xb, sb)[:, :2])
    with untouched(x), pytest.raises(ValueError, match=r"returned \(4, 2\), expected .*\(4, 3\)"):
        sample(ode, get_solver("euler"), x, GRID, progress=False)
    with untouched(x), pytest.raises(ValueError, match=r"returned \(4, 2\), expected .*\(4, 3\)"):
        invert(ode, make_bdia("euler", 0.9), x, GRID, progress=False)


def test_plain_ode_returns_wrong_shape(x: torch.Tensor) -> None:
    problem = ODE(lambda t, y: y.sum(-1))
    with untouched(x), pytest.raises(ValueError, match=r"returned \(4,\), expected .*\(4, 3\)"):
        sample(problem, get_solver("rk4"), x, [0.0, 1.0], progress=False)


def test_model_returns_non_tensor(x: torch.Tensor) -> None:
    ode = DiffusionODE(lambda xb, sb: xb.numpy())
    with untouched(x), pytest.raises(ValueError, match=r"returned ndarray"):
        sample(ode, get_solver("euler"), x, GRID, progress=False)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.int64])
def test_model_returns_no_real_floating_tensor(x: torch.Tensor, dtype: torch.dtype) -> None:
    problem = ODE(lambda t, y: (-y).to(dtype))
    pattern = rf"returned a {dtype} tensor; it must return a real floating tensor"
    with untouched(x), pytest.raises(ValueError, match=pattern):
        sample(problem, get_solver("euler"), x, [0.0, 1.0], progress=False)


# ------------------------------------------------------------ inversion at sigma = 0


def test_invert_single_state_at_sigma_zero(ode: DiffusionODE, x: torch.Tensor) -> None:
    ts = karras_grid(8, final_zero=True)
    assert float(ts[-1]) == 0.0
    solver = make_bdia("euler", 0.9)
    pair = sample(ode, solver, x, ts, return_pair=True, progress=False)
    ode.reset_nfe()
    with untouched(pair.later, ts), pytest.raises(ValueError, match="pass the pair"):
        invert(ode, solver, pair.later, ts, progress=False)
    assert ode.nfe == 0
    with untouched(pair.earlier, pair.later):
        back = invert(ode, solver, pair, ts, progress=False)
    assert isinstance(back, StatePair)
    # exact inversion up to rounding; the round trip amplifies rounding by prod(1/gamma) ~ 2
    # and |x| ~ 80 at the noisy end, so 1e-10 absolute is ~1e4 ulps of headroom in float64
    assert float((back.earlier - x).abs().max()) < 1e-10


# ------------------------------------------------------------- amplification warning


def test_solver_type_checked(ode: DiffusionODE, x: torch.Tensor) -> None:
    with untouched(x), pytest.raises(TypeError, match="get_solver"):
        sample(ode, "euler", x, GRID, progress=False)  # type: ignore[arg-type]


def test_bdia_refuses_nesting() -> None:
    with pytest.raises(TypeError, match="wraps a single-step solver, not BidirectionalWrapper"):
        bdia.BidirectionalWrapper(make_bdia("euler"))  # type: ignore[arg-type]


# ------------------------------------------------------------- parasitic component


def test_unstable_bdia_warns_of_its_parasitic_component() -> None:
    # bdia-heun with gamma = 1 on y' = -5 y, h = 0.05: the undamped parasitic mode grows until
    # it is several times the solution (measured up to 5.0 relative rms).
    problem = ODE(lambda t, y: -5.0 * y)
    ts = torch.linspace(0.0, 10.0, 201, dtype=torch.float64)
    y0 = torch.ones(1, 1, dtype=torch.float64)
    # The advice names bdia's own parameter, not the other reversible solvers'.
    with pytest.warns(bdia.ParasiticWarning, match=r"parasitic component .* another gamma$"):
        sample(problem, make_bdia("heun", 1.0), y0, ts, progress=False)


def test_a_healthy_round_trip_does_not_warn(mixture: GaussianMixture, x: torch.Tensor) -> None:
    # Inverting and reconstructing keep the parasitic part at truncation size (measured at most
    # 0.005 relative on the digits model over 35 steps), far below the limit of 1.
    ts = karras_grid(35, final_zero=False)
    ode = mixture.ode()
    solver = make_bdia("euler", 0.96)
    seen: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair = invert(ode, solver, x, ts, progress=False)
        sample(
            ode, solver, pair, ts, progress=False, callback=lambda d: seen.append(d["parasitic"])
        )
    assert max(float(p) for p in seen if p is not None) < 0.1


@pytest.mark.parametrize("direction", ["sample", "invert"])
def test_parasitic_is_what_no_base_step_explains(
    mixture: GaussianMixture, x: torch.Tensor, direction: str
) -> None:
    """Each two-step move reports rms(x_j - Phi(x_k, t_k -> t_j)) / rms(x_k), x_j the grid
    state beside x_k on the side the base step back from x_k reaches (toward the noise when
    sampling, the state the move makes when inverting). The part is 1e-5 to 0.3 of the state
    here, and the callback's states lack their low words (1e-16 of the state, at most 1e-11
    of the part): the reported float32 value matches to its rounding, 6e-8 relative, so 1e-6
    is tight, while a part taken against the wrong state is off by its own size."""
    ts = karras_grid(12, final_zero=False)
    ode = mixture.ode()
    solver = make_bdia("euler", 0.96)
    seen: list[dict] = []
    pair = sample(ode, solver, x, ts, return_pair=True, progress=False, callback=seen.append)
    if direction == "invert":
        seen.clear()
        invert(ode, solver, pair, ts, progress=False, callback=seen.append)
    base = get_solver("euler")
    checked = 0
    for before, c in zip([None, *seen], seen):
        if c["parasitic"] is None:  # the plain first step when sampling
            continue
        if direction == "sample":
            beside = before["x"]
            back = base.flow(ode, c["t"], before["t"], c["x"])
        else:
            beside = c["x_next"]
            back = base.flow(ode, c["t"], c["t_next"], c["x"])
        rms = (beside - back).square().mean().sqrt() / c["x"].square().mean().sqrt()
        assert float(rms) > 1e-6  # a part there to measure
        assert float(c["parasitic"]) == pytest.approx(float(rms), rel=1e-6), c["i"]
        checked += 1
    assert checked == len(ts) - 2


# ----------------------------------------------------------- where warnings point


def recorded(run: Callable[[], object]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return list(caught)


def unstable() -> tuple[ODE, torch.Tensor, torch.Tensor]:
    """bdia-heun with gamma 1 on y' = -5 y (see above): it warns of its parasitic part."""
    ts = torch.linspace(0.0, 10.0, 201, dtype=torch.float64)
    return ODE(lambda t, y: -5.0 * y), torch.ones(1, 1, dtype=torch.float64), ts


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")  # making the pairs
def test_warnings_point_at_the_users_call(mixture: GaussianMixture, x: torch.Tensor) -> None:
    """However many of the package's functions lie between, a warning names the line that
    called sample, invert, odeint or Inversion.of: here, this file."""
    ts = karras_grid(4, final_zero=False)
    made, other = mixture.ode(), mixture.ode(model_dtype=torch.float32)  # two fingerprints
    solver = make_bdia("euler", 0.9)
    end = sample(made, solver, x, ts, return_pair=True, progress=False)
    start = invert(made, solver, end, ts, progress=False)
    chains = sample(made, bdia.edict("euler"), x, ts, return_pair=True, progress=False)
    problem, y0, grid = unstable()
    runs = {
        "sample": (
            lambda: sample(other, solver, start, ts, progress=False),
            bdia.PairMismatchWarning,
        ),
        "invert": (
            lambda: invert(other, solver, end, ts, progress=False),
            bdia.PairMismatchWarning,
        ),
        "invert chains": (
            lambda: invert(other, bdia.edict("euler"), chains, ts, progress=False),
            bdia.PairMismatchWarning,
        ),
        "odeint": (
            lambda: bdia.odeint(problem, y0, grid, method="bdia-heun"),
            bdia.ParasiticWarning,
        ),
        "Inversion.of": (
            lambda: bdia.Inversion.of(problem, make_bdia("heun", 1.0), y0, grid.flip(0)),
            bdia.ParasiticWarning,
        ),
    }
    ours = (bdia.ParasiticWarning, bdia.PairMismatchWarning)
    for name, (run, category) in runs.items():
        caught = [w for w in recorded(run) if issubclass(w.category, ours)]
        assert [w.category for w in caught].count(category) == 1, (name, caught)
        # the line of the call: the lambda's (the frame above it is this file too)
        where = {(w.filename, w.lineno) for w in caught}
        assert where == {(__file__, run.__code__.co_firstlineno)}, (name, caught)


def test_only_an_inversion_or_a_pair_is_told_how_to_edit(mixture: GaussianMixture) -> None:
    problem, y0, grid = unstable()
    solver = make_bdia("heun", 1.0)
    advice = "bdia.Inversion.regenerate"
    for run in (
        lambda: bdia.odeint(problem, y0, grid, method="bdia-heun"),
        lambda: sample(problem, solver, y0, grid, progress=False),
    ):
        (caught,) = recorded(run)
        assert "parasitic component" in str(caught.message)
        assert advice not in str(caught.message)
    (caught,) = recorded(lambda: invert(problem, solver, y0, grid.flip(0), progress=False))
    assert advice in str(caught.message)


# ------------------------------------------------------------- time on the device or host


class _RecordsTime(torch.nn.Module):
    def __init__(self, on_host: bool | None) -> None:
        super().__init__()
        if on_host is not None:
            self.reads_time_on_host = on_host
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t)
        return torch.zeros_like(x)


@pytest.mark.parametrize(("on_host", "device"), [(None, "meta"), (False, "meta"), (True, "cpu")])
def test_a_network_gets_its_noise_level_where_it_reads_it(on_host, device) -> None:
    # The meta device stands in for a GPU: a network gets its (batch,) noise level on the
    # state's device, unless it says it maps times on the host (bdia's diffusers adapter),
    # where reading a device tensor back would wait for the device at every call.
    net = _RecordsTime(on_host)
    ode = DiffusionODE(net, EDM())
    ode.evaluate(2.5, torch.empty(3, 2, device="meta"))
    (t,) = net.seen
    assert t.device.type == device and t.shape == (3,) and t.dtype == torch.float32
    if device == "cpu":
        assert t.tolist() == [2.5] * 3


def test_values_on_rounds_as_a_copy_would() -> None:
    from bdia.ode import values_on

    # Equal values are filled (on the host too), others copied: either way rounded as
    # .to(dtype) rounds them, a float64 third to float32 or bfloat16 included.
    same = torch.full((4,), 1 / 3, dtype=torch.float64)
    mixed = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    huge = torch.full((2,), 1e39, dtype=torch.float64)  # inf in float32, as a copy gives
    for values in (same, mixed, huge, torch.tensor([0.1], dtype=torch.float32), same[:0]):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            out = values_on(values, dtype, torch.device("cpu"))
            assert torch.equal(out, values.to(dtype)) and out.dtype == dtype
            moved = values_on(values, dtype, torch.device("meta"))
            assert moved.device.type == "meta" and moved.shape == values.shape
            assert moved.dtype == dtype
