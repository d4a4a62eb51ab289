"""Python API refusals that point to the fix: solver options, state and model dtypes given by
name, schedules given by name, stage fractions, non-finite input states. Every refusal leaves
the caller's tensors as they were and makes no model call."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from conftest import untouched

import bdia
from bdia import ODE, ButcherTableau, DiffusionODE, StatePair, get_solver, invert, sample
from bdia import bdia as make_bdia
from bdia.models.toy import GaussianMixture
from bdia.solvers import registry as solver_registry

BATCH, DIM = 4, 3
GRID = [80.0, 20.0, 5.0, 1.0, 0.3]  # EDM times with sigma > 0 everywhere


@pytest.fixture(autouse=True)
def registry_as_it_was():
    """Solvers a test registers leave with it: `bdia solvers` (tests/test_cli.py) lists every
    registered name, and a factory registered to fail would fail there."""
    before = dict(solver_registry._REGISTRY)
    yield
    solver_registry._REGISTRY.clear()
    solver_registry._REGISTRY.update(before)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(DIM, 4, seed=1)


@pytest.fixture
def ode(mixture: GaussianMixture) -> DiffusionODE:
    return mixture.ode()


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 80.0 * torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ solver options


@pytest.mark.parametrize("name", ["heun", "euler", "ddim", "dpm_solver_2"])
def test_gamma_on_a_plain_solver_points_to_bdia(name: str) -> None:
    with pytest.raises(TypeError) as info:
        get_solver(name, gamma=0.5)
    msg = str(info.value)
    assert f"solver '{name}' takes no option 'gamma'" in msg
    assert f'get_solver("bdia-{name}", gamma=0.5)' in msg
    assert f'bdia(get_solver("{name}"), 0.5)' in msg
    # both suggested spellings build the same solver
    assert get_solver(f"bdia-{name}", gamma=0.5) == make_bdia(get_solver(name), 0.5)


def test_gamma_with_other_options_keeps_them_in_the_suggestion() -> None:
    with pytest.raises(TypeError) as info:
        get_solver("dpm_solver_2", gamma=0.9, r1=0.25)
    msg = str(info.value)
    assert 'get_solver("bdia-dpm_solver_2", gamma=0.9, r1=0.25)' in msg
    assert 'bdia(get_solver("dpm_solver_2", r1=0.25), 0.9)' in msg


@pytest.mark.parametrize(
    "name, options, pattern",
    [
        (
            "dpm_solver_2",
            {"r3": 0.5},
            r"'dpm_solver_2' has no option 'r3'; its options are r1 "
            r"\(default 0.5\)",
        ),
        (
            "dpm_solver_pp_3s",
            {"order": 2},
            r"has no option 'order'; its options are r1 "
            r"\(default 0.333.*\), r2 \(default 0.666.*\)",
        ),
        ("rk4", {"r1": 0.5}, r"'rk4' has no option 'r1'; it takes no options"),
        ("heun", {"r1": 0.5, "gamma": 1.0}, r"no options 'r1', 'gamma'.*use \"bdia-heun\""),
        ("bdia-heun", {"gamma": 0.5, "r1": 0.5}, r"'heun' has no option 'r1'"),
    ],
)
def test_unknown_option_names_the_options_the_solver_takes(
    name: str, options: dict, pattern: str
) -> None:
    with pytest.raises(TypeError, match=pattern):
        get_solver(name, **options)


def test_odeint_option_the_method_does_not_take() -> None:
    y0 = torch.ones(1, 2, dtype=torch.float64)
    with untouched(y0), pytest.raises(TypeError, match=r"'rk4' takes no option 'gamma'.*bdia-rk4"):
        bdia.odeint(lambda t, y: -y, y0, [0.0, 0.5, 1.0], options={"gamma": 0.9})


def test_user_factory_with_kwargs_receives_every_option() -> None:
    seen: dict = {}

    @bdia.register_solver("test_api_errors_kwargs")
    def factory(**options):
        seen.update(options)
        return get_solver("euler")

    get_solver("test_api_errors_kwargs", anything=3)
    assert seen == {"anything": 3}


# ------------------------------------------------------------------ stage fractions


@pytest.mark.parametrize("name", ["dpm_solver_2", "dpm_solver_pp_2s"])
@pytest.mark.parametrize("r1", [0, 0.0, -1, 1.5, float("nan"), float("inf")])
def test_r1_outside_unit_interval_refused(name: str, r1: float) -> None:
    pattern = rf"{name}: r1 = .* lies outside \(0, 1\]; r1 is the fraction of the step"
    with pytest.raises(ValueError, match=pattern):
        get_solver(name, r1=r1)
    with pytest.raises(ValueError, match=pattern):
        get_solver(f"bdia-{name}", r1=r1, gamma=0.9)


@pytest.mark.parametrize("name", ["dpm_solver_3", "dpm_solver_pp_3s"])
@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"r1": 0.0}, r"r1 = 0.0 lies outside \(0, 1\]"),
        ({"r2": 0.0}, r"r2 = 0.0 lies outside \(0, 1\]"),
        ({"r2": 1.2}, r"r2 = 1.2 lies outside \(0, 1\]"),
        ({"r1": 0.7}, r"r1 = 0.7 must be smaller than r2 = 0.666"),
        ({"r1": 0.5, "r2": 0.5}, r"r1 = 0.5 must be smaller than r2 = 0.5"),
    ],
)
def test_third_order_stage_fractions_refused(name: str, options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        get_solver(name, **options)


@pytest.mark.parametrize("bad", ["0.5", True, np.True_, torch.tensor(True), None])
def test_stage_fraction_of_wrong_type(bad) -> None:
    with pytest.raises(TypeError, match=r"dpm_solver_2: r1 must be a number in \(0, 1\]"):
        get_solver("dpm_solver_2", r1=bad)


def test_stage_fractions_show_in_the_repr() -> None:
    """Solvers that differ only in a stage fraction are unequal, and their reprs (and those of
    the wrappers around them) say how."""
    default, moved = get_solver("dpm_solver_3"), get_solver("dpm_solver_3", r1=0.25, r2=0.5)
    assert default != moved
    assert repr(moved) == "DPMSolver3(name='dpm_solver_3', order=2, stages=3, r1=0.25, r2=0.5)"
    assert "r1=0.3" in repr(make_bdia(get_solver("dpm_solver_pp_2s", r1=0.3), 0.9))
    assert repr(get_solver("ddim")) == "DDIM(name='ddim', order=1, stages=1)"


def test_stage_fraction_at_the_step_end_is_accepted(ode: DiffusionODE, x: torch.Tensor) -> None:
    # r1 = 1 puts the stage on t_next: a legitimate (trapezoidal-like) choice
    solver = get_solver("dpm_solver_pp_2s", r1=1)
    assert solver.r1 == 1.0 and isinstance(solver.r1, float)
    out = sample(ode, solver, x, GRID, progress=False)
    assert bool(torch.isfinite(out).all())


def test_tableau_with_nan_or_fractional_order_refused() -> None:
    nan = float("nan")
    # a NaN row passes the "row sums to c" test (a comparison with NaN is False)
    with pytest.raises(ValueError, match=r"tableau entry c\[1\] = nan is not a finite number"):
        ButcherTableau(c=(0.0, nan), a=((), (nan,)), b=(0.5, 0.5), order=2)
    with pytest.raises(ValueError, match=r"a\[1\]\[0\] = inf"):
        ButcherTableau(c=(0.0, 0.5), a=((), (math.inf,)), b=(0.5, 0.5), order=2)
    with pytest.raises(ValueError, match="order must be an integer >= 1, got 1.5"):
        ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=1.5)


def test_tableau_keeps_its_own_copy_of_the_coefficients() -> None:
    """Lists and arrays are taken as tuples of floats when the tableau is built: changing the
    caller's list afterwards changes nothing (a registered solver stays what was checked), and
    the tableau, like every solver built on it, is hashable."""
    c, a, b = [0, 2 / 3], [[], [2 / 3]], np.array([1 / 4, 3 / 4])
    tableau = ButcherTableau(c=c, a=a, b=b, order=np.int64(2))  # type: ignore[arg-type]
    c[1], a[1][0], b[0] = 5.0, 5.0, 5.0
    assert tableau.c == (0.0, 2 / 3) and tableau.a == ((), (2 / 3,)) and tableau.b == (0.25, 0.75)
    assert all(type(v) is float for v in (*tableau.c, *tableau.b, *tableau.a[1]))
    assert tableau.order == 2 and type(tableau.order) is int
    assert tableau == ButcherTableau(c=(0.0, 2 / 3), a=((), (2 / 3,)), b=(0.25, 0.75), order=2)
    hash(make_bdia(bdia.ExplicitRungeKutta(tableau, "ralston_lists"), 0.9))


@pytest.mark.parametrize("bad", [True, 2.0, "2"])
def test_tableau_order_must_be_an_integer(bad) -> None:
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        ButcherTableau(c=(0.0,), a=((),), b=(1.0,), order=bad)


def test_tableau_rows_must_be_sequences() -> None:
    with pytest.raises(TypeError, match=r"a\[1\] must be a sequence of numbers, got float"):
        ButcherTableau(c=(0.0, 0.5), a=((), 0.5), b=(0.0, 1.0), order=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [3, None, ""])
def test_register_solver_needs_a_name(name) -> None:
    with pytest.raises((TypeError, ValueError), match="a solver name must be a non-empty string"):
        bdia.register_solver(name)


def test_a_factory_that_returns_no_solver_is_named() -> None:
    @bdia.register_solver("test_api_errors_not_a_solver")
    def factory():
        return 3

    with pytest.raises(TypeError, match=r"'test_api_errors_not_a_solver' .* returned int"):
        get_solver("test_api_errors_not_a_solver")


def test_register_tableau_needs_a_tableau() -> None:
    with pytest.raises(TypeError, match="register_tableau needs a ButcherTableau, got dict"):
        bdia.register_tableau("test_api_errors_dict", {"c": (0.0,)})  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        get_solver("test_api_errors_dict")  # nothing was registered
    with pytest.raises(TypeError, match="ExplicitRungeKutta needs a ButcherTableau"):
        bdia.ExplicitRungeKutta("heun")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "name, dtype",
    [("float64", torch.float64), ("float32", torch.float32), ("torch.float64", torch.float64)],
)
@pytest.mark.parametrize("solver_name", ["heun", "bdia-euler"])
def test_state_dtype_by_name_equals_the_dtype(
    ode: DiffusionODE, x: torch.Tensor, name: str, dtype: torch.dtype, solver_name: str
) -> None:
    x32 = x.to(torch.float32)
    solver = get_solver(solver_name)
    with untouched(x32):
        by_name = sample(ode, solver, x32, GRID, progress=False, state_dtype=name)
        by_dtype = sample(ode, solver, x32, GRID, progress=False, state_dtype=dtype)
        back_name = invert(ode, solver, x32, GRID, progress=False, state_dtype=name)
        back_dtype = invert(ode, solver, x32, GRID, progress=False, state_dtype=dtype)
    # the same dtype, so the same arithmetic: bit-identical
    assert by_name.dtype == dtype and torch.equal(by_name, by_dtype)
    assert back_name.earlier.dtype == dtype and torch.equal(back_name.earlier, back_dtype.earlier)


@pytest.mark.parametrize("driver", ["sample", "invert"])
@pytest.mark.parametrize("name", ["double", "float", "f64", "Float64"])
def test_state_dtype_unknown_name(ode: DiffusionODE, x: torch.Tensor, driver: str, name: str):
    run = sample if driver == "sample" else invert
    pattern = rf"state_dtype '{name}' is not a state dtype; use torch.float32 or torch.float64, "
    pattern += r"or the names 'float32' or 'float64'"
    with untouched(x), pytest.raises(ValueError, match=pattern):
        run(ode, get_solver("euler"), x, GRID, progress=False, state_dtype=name)
    assert ode.nfe == 0


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_state_dtype_half_name_meets_the_half_refusal(
    ode: DiffusionODE, x: torch.Tensor, name: str
) -> None:
    with untouched(x), pytest.raises(ValueError, match=rf"torch.{name} state is refused"):
        sample(ode, get_solver("euler"), x, GRID, progress=False, state_dtype=name)
    assert ode.nfe == 0


@pytest.mark.parametrize(
    "value, pattern",
    [
        (float, r"state_dtype must be torch.float32 or torch.float64 .*got type"),
        (64, r"state_dtype must be torch.float32 or torch.float64 .*got int 64"),
        (torch.int32, r"state_dtype must be a real floating dtype .*got torch.int32"),
        (torch.complex128, r"real floating dtype .*got torch.complex128"),
    ],
)
def test_state_dtype_of_wrong_type(ode: DiffusionODE, x: torch.Tensor, value, pattern: str):
    with untouched(x), pytest.raises(TypeError, match=pattern):
        sample(ode, get_solver("euler"), x, GRID, progress=False, state_dtype=value)
    assert ode.nfe == 0


def test_model_dtype_by_name(mixture: GaussianMixture) -> None:
    assert DiffusionODE(mixture.denoiser, model_dtype="bfloat16").model_dtype == torch.bfloat16
    assert ODE(lambda t, y: -y, model_dtype="float32").model_dtype == torch.float32
    with pytest.raises(TypeError, match=r"model_dtype must be a floating torch dtype.*'int8'"):
        ODE(lambda t, y: -y, model_dtype="int8")
    with pytest.raises(TypeError, match=r"model_dtype must be a floating.*torch.int64"):
        DiffusionODE(mixture.denoiser, model_dtype=torch.int64)


# ------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "name, fix",
    [
        ("edm", "bdia.EDM()"),
        ("EDM", "bdia.EDM()"),
        ("vp-linear", "bdia.VPLinear()"),
        ("vp_cosine", "bdia.VPCosine()"),
        ("vp-discrete", "bdia.VPDiscrete(betas=...)"),
        ("karras", "one of bdia.EDM(), bdia.VPLinear(), bdia.VPCosine()"),
    ],
)
def test_schedule_given_by_name_is_refused_at_construction(
    mixture: GaussianMixture, name: str, fix: str
) -> None:
    pattern = rf"schedule must be a Schedule instance, not the string '{name}'; pass "
    with pytest.raises(TypeError, match=pattern + re.escape(fix)):
        DiffusionODE(mixture.denoiser, name)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=pattern):
        DiffusionODE.from_eps(lambda x, t: x, name)  # type: ignore[arg-type]


def test_schedule_class_instead_of_instance(mixture: GaussianMixture) -> None:
    with pytest.raises(TypeError, match=r"got the class VPLinear; call it: VPLinear\(\)"):
        DiffusionODE(mixture.denoiser, bdia.VPLinear)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Schedule instance such as bdia.EDM\(\).*got float"):
        DiffusionODE(mixture.denoiser, 1.0)  # type: ignore[arg-type]


# ----------------------------------------------------------- non-finite input


def _nan_state(x: torch.Tensor) -> torch.Tensor:
    bad = x.clone()
    bad[1, 2] = float("nan")
    bad[3, 0] = -float("inf")
    return bad


@pytest.mark.parametrize("driver", ["sample", "invert"])
@pytest.mark.parametrize("solver_name", ["euler", "heun", "bdia-euler", "bdia-ddim"])
def test_non_finite_start_is_bad_input_not_a_model_failure(
    ode: DiffusionODE, x: torch.Tensor, driver: str, solver_name: str
) -> None:
    run = sample if driver == "sample" else invert
    role = "start" if driver == "sample" else "end"
    bad = _nan_state(x)
    pattern = rf"the {role} state contains 2 NaN/Inf values \(of 12 entries\): bad input"
    with untouched(bad), pytest.raises(ValueError, match=pattern) as info:
        run(ode, get_solver(solver_name), bad, GRID, progress=False)
    assert "no model call was made" in str(info.value)
    assert "model returned" not in str(info.value)
    assert ode.nfe == 0


@pytest.mark.parametrize("driver", ["sample", "invert"])
@pytest.mark.parametrize("position", [0, 1])
def test_non_finite_pair_names_its_element(
    ode: DiffusionODE, x: torch.Tensor, driver: str, position: int
) -> None:
    run = sample if driver == "sample" else invert
    role = "start" if driver == "sample" else "end"
    pair = [x + 1.0, x.clone()]
    pair[position] = _nan_state(x)
    pattern = rf"the {role} state \({role}\[{position}\]\) contains 2 NaN/Inf values"
    with untouched(*pair), pytest.raises(ValueError, match=pattern):
        run(ode, make_bdia("euler", 0.9), StatePair(*pair), GRID, progress=False)
    assert ode.nfe == 0


def test_non_finite_low_word_of_a_pair(ode: DiffusionODE, x: torch.Tensor) -> None:
    low = torch.zeros_like(x)
    low[0, 0] = float("nan")
    pair = StatePair(x + 1.0, x.clone(), None, low)
    with untouched(low), pytest.raises(ValueError, match=r"\(end.later_low\) contains 1 NaN"):
        invert(ode, make_bdia("euler", 0.9), pair, GRID, progress=False)
    assert ode.nfe == 0


@pytest.mark.parametrize("low_dtype", [torch.float32, torch.int64])
@pytest.mark.parametrize("kind", ["StatePair", "CoupledPair"])
def test_low_words_of_another_dtype(
    ode: DiffusionODE, x: torch.Tensor, low_dtype, kind: str
) -> None:
    low = torch.zeros_like(x, dtype=low_dtype)
    if kind == "StatePair":
        pair, solver, field = StatePair(x + 1.0, x, low), make_bdia("euler", 0.9), "earlier_low"
    else:
        pair, solver, field = bdia.CoupledPair(x + 1.0, x, low), bdia.edict("euler"), "x_low"
    pattern = rf"end.{field} is {low_dtype}, but its state is torch.float64; .*state's dtype"
    with untouched(low), pytest.raises(ValueError, match=pattern):
        invert(ode, solver, pair, GRID, progress=False)
    assert ode.nfe == 0


def test_start_overflowing_the_state_dtype(ode: DiffusionODE, x: torch.Tensor) -> None:
    big = x.clone()
    big[0] = 1e300  # finite in float64, Inf once cast to float32
    pattern = r"the start state has 3 values beyond the range of torch.float32"
    with untouched(big), pytest.raises(ValueError, match=pattern):
        sample(ode, get_solver("euler"), big, GRID, progress=False, state_dtype=torch.float32)
    assert ode.nfe == 0


def test_non_finite_start_plain_ode_via_odeint() -> None:
    y0 = torch.tensor([[1.0, float("nan")]], dtype=torch.float64)
    calls = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(float(t))
        return -y

    with untouched(y0), pytest.raises(ValueError, match="the y0 state contains 1 NaN/Inf"):
        bdia.odeint(f, y0, [0.0, 0.5, 1.0])
    assert calls == []


def test_a_function_given_as_the_ode_points_to_bdia_ode(x: torch.Tensor) -> None:
    def f(t, y):
        return -y

    fix = r"ode must be an ODE or DiffusionODE, got function; wrap f\(t, x\) as bdia.ODE\(f\)"
    with untouched(x):
        with pytest.raises(TypeError, match=fix):
            sample(f, get_solver("euler"), x, GRID)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=fix):
            invert(f, make_bdia("euler", 0.9), x, GRID)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=fix):
            bdia.Inversion.of(f, make_bdia("euler", 0.9), x, GRID)  # type: ignore[arg-type]


@pytest.mark.parametrize("func", [lambda t, s: (s[1], -s[0]), lambda t, s: -s])
def test_odeint_refuses_a_tuple_state(func) -> None:
    """torchdiffeq takes a tuple of tensors as one state; taken as a pair here it would start
    a trajectory with its second tensor as the state at t[1], silently."""
    y, v = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"y0 must be a torch.Tensor, got tuple.*torch.cat"):
        bdia.odeint(func, (y, v), [0.0, 0.5, 1.0])


def test_odeint_names_y0_in_its_refusals() -> None:
    with pytest.raises(ValueError, match="y0 needs a batch dimension, got a 0-dim tensor"):
        bdia.odeint(lambda t, y: -y, torch.tensor(1.0, dtype=torch.float64), [0.0, 1.0])
    with pytest.raises(TypeError, match="y0 must be a real floating tensor, got torch.int64"):
        bdia.odeint(lambda t, y: -y, torch.ones(1, 2, dtype=torch.long), [0.0, 1.0])


# ------------------------------------------------------------------ a pair's grid

# GRID's ends, other points in between.
OTHER_GRID = [80.0, 30.0, 10.0, 3.0, 0.3]


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_returned_pairs_record_their_grid_times(ode: DiffusionODE, x: torch.Tensor) -> None:
    bdia_pair = sample(ode, make_bdia("euler", 0.9), x, GRID, return_pair=True, progress=False)
    assert bdia_pair.times == (GRID[-2], GRID[-1])
    assert invert(ode, make_bdia("euler", 0.9), bdia_pair, GRID, progress=False).times == (
        GRID[0],
        GRID[1],
    )
    chains = sample(ode, bdia.edict("euler"), x, GRID, return_pair=True, progress=False)
    assert chains.time == GRID[-1]
    assert invert(ode, bdia.edict("euler"), chains, GRID, progress=False).time == GRID[0]


@pytest.mark.parametrize("solver_name", ["bdia-euler", "euler"])
@pytest.mark.parametrize(
    "grid, shown",
    [
        (OTHER_GRID, r"ts\[-2:\] = \(3.0, 0.3\)"),
        # GRID rounded to float32: its points are other times
        (torch.tensor(GRID, dtype=torch.float32), r"ts\[-2:\] = \(1.0, 0.30000001192092896\)"),
    ],
)
def test_a_pair_on_another_grid_is_refused(
    ode: DiffusionODE, x: torch.Tensor, solver_name: str, grid, shown: str
) -> None:
    pair = sample(ode, get_solver(solver_name), x, GRID, return_pair=True, progress=False)
    ode.reset_nfe()
    pattern = r"the end pair was made at t = \(1.0, 0.3\), but this grid has " + shown
    with untouched(pair.earlier, pair.later), pytest.raises(ValueError, match=pattern) as info:
        invert(ode, get_solver(solver_name), pair, grid, progress=False)
    assert "pass that grid" in str(info.value)
    assert ode.nfe == 0


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_start_pair_or_chains_on_another_grid_are_refused(
    ode: DiffusionODE, x: torch.Tensor
) -> None:
    back = invert(ode, make_bdia("euler", 0.9), x, GRID, progress=False)
    chains = sample(ode, bdia.edict("euler"), x, GRID, return_pair=True, progress=False)
    ode.reset_nfe()
    with pytest.raises(ValueError, match=r"start pair was made at t = \(80.0, 20.0\).*ts\[:2\]"):
        sample(ode, make_bdia("euler", 0.9), back, OTHER_GRID, progress=False)
    with pytest.raises(ValueError, match=r"end pair was made at t = 0.3, .* ts\[-1\] = 0.2"):
        invert(ode, bdia.edict("euler"), chains, [*GRID[:-1], 0.2], progress=False)
    assert ode.nfe == 0


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_pair_without_times_is_taken_as_it_is(ode: DiffusionODE, x: torch.Tensor) -> None:
    """A pair built by hand (or loaded from a latents file) records no times: it inverts on
    any grid, exactly as the same states and low words recorded at that grid's end would."""
    pair = sample(ode, make_bdia("euler", 0.9), x, GRID, return_pair=True, progress=False)
    bare = StatePair(pair.earlier, pair.later, pair.earlier_low, pair.later_low)
    back = invert(ode, make_bdia("euler", 0.9), bare, OTHER_GRID, progress=False)
    words = (pair.earlier, pair.later, pair.earlier_low, pair.later_low)
    placed = StatePair(*words, pair.fingerprint, (OTHER_GRID[-2], OTHER_GRID[-1]))
    same = invert(ode, make_bdia("euler", 0.9), placed, OTHER_GRID, progress=False)
    for name in ("earlier", "later", "earlier_low", "later_low"):
        assert torch.equal(getattr(back, name), getattr(same, name)), name


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize(
    "as_given",
    [
        list,
        lambda t: torch.tensor(t, dtype=torch.float64),
        np.array,
        lambda t: tuple(map(np.float64, t)),
    ],
    ids=["list", "tensor", "array", "numpy-floats"],
)
def test_a_pair_built_by_hand_records_its_times_as_floats(
    ode: DiffusionODE, x: torch.Tensor, as_given
) -> None:
    """Times given as a list (read back from JSON, say), a tensor or an array are the same
    times: a list or a tensor used to be refused on its own grid, with a message that showed
    the two times equal, and an array raised numpy's "truth value of an array ... is
    ambiguous"."""
    solver = make_bdia("euler", 0.9)
    pair = sample(ode, solver, x, GRID, return_pair=True, progress=False)
    fields = (pair.earlier, pair.later, pair.earlier_low, pair.later_low, pair.fingerprint)
    by_hand = StatePair(*fields, times=as_given(list(pair.times)), solver=pair.solver)
    assert by_hand.times == pair.times and type(by_hand.times) is tuple
    assert all(type(t) is float for t in by_hand.times)
    assert by_hand == pair
    back = invert(ode, solver, by_hand, GRID, progress=False)
    assert back == invert(ode, solver, pair, GRID, progress=False)
    chains = sample(ode, bdia.edict("euler"), x, GRID, return_pair=True, progress=False)
    again = bdia.CoupledPair(
        chains.x,
        chains.y,
        chains.x_low,
        chains.y_low,
        chains.fingerprint,
        as_given([chains.time])[0],
        chains.solver,
    )
    assert again == chains and type(again.time) is float


@pytest.mark.parametrize(
    "times, pattern",
    [
        ((80.0,), r"times must be None or the two grid times .*got \(80.0,\)"),
        ([80.0, 20.0, 5.0], r"times must be None or the two grid times .*got \[80.0, 20.0, 5.0\]"),
        (80.0, r"times must be None or the two grid times .*got 80.0"),
        (("80", "20"), r"times\[0\] = '80' is not a real number"),
        ((80.0, None), r"times\[1\] = None is not a real number"),
    ],
)
def test_a_pair_refuses_times_that_are_not_two_numbers(x: torch.Tensor, times, pattern) -> None:
    with pytest.raises(TypeError, match=pattern):
        StatePair(x, x, times=times)


@pytest.mark.parametrize("time", ["80", [80.0], True])
def test_chains_refuse_a_time_that_is_not_a_number(x: torch.Tensor, time) -> None:
    with pytest.raises(
        TypeError,
        match=r"time = .* is not a real number; give the grid time of the chains as a number",
    ):
        bdia.CoupledPair(x, x, time=time)


# ------------------------------------------------------------------ a pair's solver


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_returned_pairs_record_the_reversible_solver_that_made_them(
    ode: DiffusionODE, x: torch.Tensor
) -> None:
    cases = [
        (make_bdia("euler", 0.9), "bdia(euler, gamma=0.9)"),
        (make_bdia("heun", [0.9, 0.8, 0.7]), "bdia(heun, gamma=(0.9, 0.8, 0.7))"),
        (make_bdia("ddim", "obelm"), "bdia(ddim, gamma='obelm')"),
        (
            make_bdia(get_solver("dpm_solver_2", r1=0.25), 1),
            "bdia(dpm_solver_2(r1=0.25), gamma=1.0)",
        ),
        (bdia.edict("euler"), "edict(euler, p=0.93)"),
        (bdia.reversible("heun", 0.99), "reversible(heun, coupling=0.99)"),
    ]
    for solver, identity in cases:
        assert solver.identity == identity
        pair = sample(ode, solver, x, GRID, return_pair=True, progress=False)
        assert pair.solver == identity
        assert invert(ode, solver, pair, GRID, progress=False).solver == identity
    start = x.clone().requires_grad_()
    pair = sample(ode, cases[0][0], start, GRID, return_pair=True, adjoint="reversible")
    assert pair.solver == cases[0][1]
    # A single-step solver's pair is two states of its trajectory, which any solver may take
    # up: it records no solver.
    assert sample(ode, get_solver("euler"), x, GRID, return_pair=True).solver is None


def test_a_solver_identity_names_every_parameter_that_changes_its_steps() -> None:
    """Equal solvers have one identity (numbers as the floats the solvers keep); solvers
    that step differently, including a tableau of a shipped method's name, have two."""
    from fractions import Fraction

    same = [make_bdia("heun", 0.96), make_bdia("heun", Fraction(24, 25))]
    same += [make_bdia("heun", np.float64(0.96)), get_solver("bdia-heun", gamma=0.96)]
    assert {s.identity for s in same} == {"bdia(heun, gamma=0.96)"}
    assert make_bdia("euler", -0.0).identity == make_bdia("euler", 0.0).identity
    assert get_solver("dpm_solver_3", r1=1 / 3).identity == "dpm_solver_3"
    assert get_solver("dpm_solver_3", r2=0.6).identity == "dpm_solver_3(r2=0.6)"
    ralston = ButcherTableau(c=(0, 2 / 3), a=((), (2 / 3,)), b=(1 / 4, 3 / 4), order=2)
    named_heun = bdia.ExplicitRungeKutta(ralston, "heun")
    assert named_heun.identity.startswith("heun(c=(0.0, 0.6666666666666666), a=")
    assert bdia.ExplicitRungeKutta(bdia.solvers.runge_kutta.HEUN, "heun").identity == "heun"


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_one_gamma_for_every_step_is_the_solver_of_that_gamma(
    ode: DiffusionODE, x: torch.Tensor
) -> None:
    """A sequence of one value steps as that value does on every grid it fits, so the two
    are one solver: a pair sampled with bdia(euler, 0.9) was refused to bdia(euler, [0.9] *
    3) on its own grid, and the other way round, although both undo it exactly."""
    scalar, sequence = make_bdia("euler", 0.9), make_bdia("euler", [0.9] * (len(GRID) - 2))
    assert sequence.identity == scalar.identity == "bdia(euler, gamma=0.9)"
    assert make_bdia("euler", [0.9, 0.8, 0.9]).identity == "bdia(euler, gamma=(0.9, 0.8, 0.9))"
    for maker, other in ((scalar, sequence), (sequence, scalar)):
        end = sample(ode, maker, x, GRID, return_pair=True, progress=False)
        assert torch.equal(invert(ode, other, end, GRID, progress=False).earlier, x)


def test_a_subclass_that_changes_a_default_fraction_names_it_in_its_identity() -> None:
    """A subclass of a shipped exponential solver keeps its name; its identity named the
    fractions that differ from the subclass's own defaults, so one with r1 = 0.3 by default
    was "dpm_solver_2", the identity of DPMSolver2's r1 = 0.5, and each took the other's
    pairs under bdia. Fractions are named against the defaults of the shipped class."""
    from bdia.solvers.exponential import DPMSolver2

    @dataclasses.dataclass(frozen=True, repr=False)
    class EarlierStage(DPMSolver2):
        r1: float = 0.3

    assert EarlierStage().identity == "dpm_solver_2(r1=0.3)" != DPMSolver2().identity
    assert EarlierStage(r1=0.5).identity == DPMSolver2().identity == "dpm_solver_2"


def test_a_tableau_with_negative_zeros_is_one_solver_with_the_tableau_of_zeros() -> None:
    """-0.0 steps as 0.0 does (a zero weight is skipped, a stage at c = -0.0 sits at t), and
    the two tableaus compare equal; a tableau written with -0.0 (say, computed as -1 * 0.0)
    had another identity, so bdia around it refused the pairs of the same method."""
    zeros = ButcherTableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), order=2)
    negative = ButcherTableau(c=(-0.0, 0.5), a=((), (0.5,)), b=(-0.0, 1.0), order=2)
    one, other = (bdia.ExplicitRungeKutta(t, "mid") for t in (zeros, negative))
    assert one == other and make_bdia(one, 0.9).identity == make_bdia(other, 0.9).identity
    assert math.copysign(1.0, negative.c[0]) == math.copysign(1.0, negative.b[0]) == 1.0


MAKERS_AND_OTHERS = [
    (make_bdia("euler", 0.9), make_bdia("euler", 0.5)),
    (make_bdia("euler", 0.9), make_bdia("heun", 0.9)),
    (make_bdia("euler", 0.9), make_bdia("euler", [0.9, 0.9, 0.8])),
    (bdia.edict("euler", 0.93), bdia.edict("euler", 0.9)),
    (bdia.edict("euler"), bdia.edict("midpoint")),
    (bdia.reversible("euler", 0.999), bdia.reversible("euler", 0.99)),
    (bdia.edict("euler"), bdia.reversible("euler")),
]


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("maker, other", MAKERS_AND_OTHERS, ids=lambda s: s.identity)
def test_a_pair_made_by_another_reversible_solver_is_refused(
    ode: DiffusionODE, x: torch.Tensor, maker, other
) -> None:
    """Undone by another gamma, p, coupling, base or scheme, a pair goes to the wrong states
    without a sign: stripped of its record, each end pair here inverts to a start off by
    0.0094 (coupling 0.99 for 0.999) to 16 (reversible for edict) relative, where its maker
    returns the start exactly. sample and invert refuse it, naming both solvers, before any
    model call."""
    end = sample(ode, maker, x, GRID, return_pair=True, progress=False)
    start = invert(ode, maker, end, GRID, progress=False)
    wrong = invert(ode, other, dataclasses.replace(end, solver=None), GRID, progress=False)
    wrong_start = wrong.x if isinstance(wrong, bdia.CoupledPair) else wrong.earlier
    assert float((wrong_start - x).norm() / x.norm()) > 1e-3  # measured 0.0094 and more
    ode.reset_nfe()
    for run, pair, what, state in (
        (invert, end, "end", "later"),
        (sample, start, "start", "earlier"),
    ):
        if isinstance(pair, bdia.CoupledPair):
            state = "x"
        with untouched(*[v for v in vars(pair).values() if isinstance(v, torch.Tensor)]):
            with pytest.raises(ValueError) as info:
                run(ode, other, pair, GRID, progress=False)
        message = str(info.value)
        assert f"the {what} pair was made by {maker.identity}, not by {other.identity}" in message
        assert (
            f"pass {maker.identity}, or" in message and f"pass pair.{state} (a tensor)" in message
        )
    assert ode.nfe == 0


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_pair_is_taken_by_an_equal_solver_and_by_single_step_solvers(
    ode: DiffusionODE, x: torch.Tensor
) -> None:
    from fractions import Fraction

    maker = make_bdia("euler", 0.96)
    end = sample(ode, maker, x, GRID, return_pair=True, progress=False)
    # One solver, spelled another way: the same float operations, so the start exactly.
    back = invert(ode, make_bdia("euler", Fraction(24, 25)), end, GRID, progress=False)
    assert torch.equal(back.earlier, x)
    # A single-step solver takes up one state of the pair (regenerating from the inverted
    # noise is the edit), and a reversible one inverts a single-step solver's pair exactly.
    sample(ode, get_solver("heun"), back, GRID, progress=False)
    plain = sample(ode, get_solver("euler"), x, GRID, return_pair=True, progress=False)
    again = sample(ode, maker, invert(ode, maker, plain, GRID), GRID, return_pair=True)
    assert torch.equal(again.later, plain.later) and torch.equal(again.earlier, plain.earlier)
    # A pair that records no solver (built by hand, or saved before pairs recorded it) is
    # taken as it is, by any solver.
    bare = dataclasses.replace(end, solver=None)
    invert(ode, make_bdia("euler", 0.5), bare, GRID, progress=False)


@pytest.mark.parametrize("kind", [StatePair, bdia.CoupledPair])
@pytest.mark.parametrize("solver", [make_bdia("euler", 0.9), b"bdia(euler, gamma=0.9)", 0.9])
def test_a_pair_refuses_a_solver_that_is_not_a_string(x: torch.Tensor, kind, solver) -> None:
    with pytest.raises(TypeError, match=r"solver must be None or the identity of the solver"):
        kind(x, x, solver=solver)


# ------------------------------------------------------------------ a divisor that underflows


@pytest.mark.parametrize(
    "solver, shown",
    [
        (make_bdia("euler", 1e-50), "gamma = 1e-50 rounds to 0"),
        (make_bdia("euler", [0.9, 1e-50, 0.9]), "gamma_2 = 1e-50 rounds to 0"),
        (make_bdia("euler", 1e-40), "gamma = 1e-40 is subnormal"),
        (bdia.edict("euler", 1e-50), "p = 1e-50 rounds to 0"),
        (bdia.reversible("euler", 1e-50), "coupling = 1e-50 rounds to 0"),
    ],
    ids=["gamma", "gamma_k", "subnormal", "p", "coupling"],
)
def test_a_divisor_that_underflows_in_the_state_dtype_is_refused_before_any_model_call(
    ode: DiffusionODE, x: torch.Tensor, solver, shown: str
) -> None:
    """Inversion divides by gamma, p or coupling as rounded to the state dtype. One that
    underflows there passed the check of gamma = 0 and failed after the first model calls
    (adjoint='reversible': after the whole forward pass, in backward) with a message that
    named an internal 'scale', or 'p' for the coupling; or, subnormal, inverted inexactly."""
    single = x.float()
    ode.reset_nfe()
    pattern = re.escape(shown) + r" in torch.float32, the state dtype, whose smallest normal"
    with pytest.raises(ValueError, match=pattern):
        invert(ode, solver, single, GRID, progress=False)
    with pytest.raises(ValueError, match=pattern):
        sample(ode, solver, single.requires_grad_(), GRID, adjoint="reversible")
    assert ode.nfe == 0
    solver.check_invertible(ode, GRID, torch.float64)  # a normal float64 number


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_smallest_normal_divisor_of_the_state_dtype_is_taken(
    ode: DiffusionODE, dtype: torch.dtype
) -> None:
    """The refusal starts below the smallest normal number: that number itself is exact
    in the state dtype, and the inverse divides by it exactly; the largest subnormal one is
    refused. A float64 value just below float32's smallest normal number rounds up to it in
    float32, so it is taken there: the inverse divides by the rounded value."""
    finfo = torch.finfo(dtype)
    subnormal = finfo.tiny * (1.0 - finfo.eps)  # exact: a power of two less one step
    for make in (make_bdia, bdia.edict):
        make("euler", finfo.tiny).check_invertible(ode, GRID, dtype)
        if dtype == torch.float32:
            rounds_up = finfo.tiny * (1.0 - 2.0**-40)
            assert float(torch.tensor(rounds_up, dtype=dtype)) == finfo.tiny
            make("euler", rounds_up).check_invertible(ode, GRID, dtype)
        with pytest.raises(ValueError, match=f"= {subnormal!r} is subnormal in {dtype}"):
            make("euler", subnormal).check_invertible(ode, GRID, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_y0_in_odeint_points_to_what_odeint_takes(dtype: torch.dtype) -> None:
    y0 = torch.ones(1, 2, dtype=dtype)
    with untouched(y0), pytest.raises(ValueError, match=f"a {dtype} y0 is refused") as info:
        bdia.odeint(lambda t, y: -y, y0, [0.0, 0.5, 1.0])
    assert f"bdia.ODE(func, model_dtype={dtype})" in str(info.value)
    assert "state_dtype" not in str(info.value)  # a parameter of sample, not of odeint


# ------------------------------------------------------- results are the caller's own


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_results_never_alias_the_callers_tensors(
    mixture: GaussianMixture, ode: DiffusionODE, x: torch.Tensor
) -> None:
    """On a grid of one step a pair holds a start tensor, and from a pair with no step to take
    the result is one: each comes back as a copy."""
    solver = make_bdia("euler", 0.9)
    pair = sample(ode, solver, x, GRID[:2], return_pair=True, progress=False)
    assert pair.earlier is not x and torch.equal(pair.earlier, x)
    back = invert(ode, solver, x, GRID[-2:], progress=False)
    assert back.later is not x and torch.equal(back.later, x)
    start = StatePair(x + 1.0, x)
    for name in ("euler", "bdia-euler"):
        out = sample(ode, get_solver(name), start, GRID[:2], progress=False)
        assert out is not x and torch.equal(out, x)
    data = mixture.sample_data(BATCH, generator=torch.Generator().manual_seed(0)).double()
    kept = data.clone()
    inversion = bdia.Inversion.of(ode, solver, data, GRID[-2:])
    data.zero_()
    assert torch.equal(inversion.reconstruct(), kept)


def test_a_result_without_a_step_has_no_graph(ode: DiffusionODE, x: torch.Tensor) -> None:
    start = StatePair((x + 1.0).requires_grad_(), x.clone().requires_grad_())
    for state_dtype in (None, torch.float32):  # the cast makes a tensor with a graph
        out = sample(
            ode, get_solver("euler"), start, GRID[:2], progress=False, state_dtype=state_dtype
        )
        assert not out.requires_grad
    out = sample(ode, get_solver("euler"), start, GRID[:2], progress=False, adjoint="autograd")
    assert out.requires_grad and out is not start.later
