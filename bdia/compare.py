"""Solver comparison on the analytic toy problems (the engine behind ``bdia compare``).

For every base solver and its BDIA variants, at equal budgets of model evaluations, this
measures the error against the problem's reference solution (of the whole batch, and the
median and largest of each start state's own), the order (slope of log error against log
NFE), and the inversion round-trip error in float32 and float64 state.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._files import replace_atomic
from .models import toy
from .ode import ODE
from .sampling import StatePair, invert, sample
from .schedules import (
    EDM,
    RectifiedFlow,
    Schedule,
    VPLinear,
    karras_grid,
    shifted_t_grid,
    uniform_logsnr_grid,
    uniform_t_grid,
)
from .solvers import BidirectionalWrapper, Solver, available_solvers, bdia, get_solver

__all__ = [
    "Problem",
    "PROBLEMS",
    "Variant",
    "Result",
    "EmptySelection",
    "variants",
    "steps_for_budget",
    "per_state_error",
    "order_slope",
    "check_selection",
    "run_comparison",
    "markdown_report",
    "plot_errors",
]

DEFAULT_GAMMAS: tuple[float | str, ...] = (1.0, 0.96, 0.5, "obelm")
DEFAULT_BUDGETS: tuple[int, ...] = (10, 20, 50, 100)


@dataclass(frozen=True)
class Problem:
    """A toy problem: an ODE, a grid family, a start state and a reference end state.

    Attributes:
        name: short name used on the command line.
        description: one line for the report.
        make_ode: builds the ODE, given the network dtype.
        grid: ``grid(steps) -> ts`` (1-D float64 tensor).
        start: ``start(batch, generator) -> x`` at ``grid(.)[0]``, float64.
        reference: ``reference(x) -> x_end`` at ``grid(.)[-1]``, float64.
        diffusion: whether the ODE is a DiffusionODE (exponential solvers need one).
    """

    name: str
    description: str
    make_ode: Callable[[torch.dtype | None], ODE]
    grid: Callable[[int], Tensor]
    start: Callable[[int, torch.Generator], Tensor]
    reference: Callable[[Tensor], Tensor]
    diffusion: bool


def _mixture_problem(
    name: str,
    schedule: Schedule,
    description: str,
    grid: Callable[[int], Tensor],
    flow: bool = False,
) -> Problem:
    """The toy mixture's problem under ``schedule``; with ``flow``, its flow-matching form
    (``schedule`` a RectifiedFlow): the exact velocity, whose reference integrates in ``t``
    and may start at pure noise, where the denoiser's scaled space has no finite state."""
    mixture = toy.GaussianMixture.random(
        dim=2, components=8, std_range=(0.1, 0.3), spread=1.5, seed=2024
    )
    t0, t1 = float(grid(1)[0]), float(grid(1)[-1])

    def start(batch: int, gen: torch.Generator) -> Tensor:
        scale = math.hypot(schedule.sigma(t0), schedule.alpha(t0))
        return scale * torch.randn(batch, 2, generator=gen, dtype=torch.float64)

    def make_ode(dtype: torch.dtype | None) -> ODE:
        if flow:
            return mixture.flow_ode(model_dtype=dtype)
        return mixture.ode(schedule, model_dtype=dtype)

    def reference(x: Tensor) -> Tensor:
        if flow:
            return mixture.flow_solution(x, [t0, t1])[-1]
        return mixture.solution(x, [t0, t1], schedule)[-1]

    return Problem(
        name=name,
        description=description,
        make_ode=make_ode,
        grid=grid,
        start=start,
        reference=reference,
        diffusion=True,
    )


def _generic_problem(
    name: str, system: Any, description: str, x0: Sequence[float], t_end: float
) -> Problem:
    x0_row = torch.tensor([list(x0)], dtype=torch.float64)

    def start(batch: int, gen: torch.Generator) -> Tensor:
        return x0_row * (1.0 + 0.1 * torch.rand(batch, 1, generator=gen, dtype=torch.float64))

    return Problem(
        name=name,
        description=description,
        make_ode=lambda dtype: ODE(system.f, model_dtype=dtype),
        grid=lambda n: uniform_t_grid(n, 0.0, t_end),
        start=start,
        reference=lambda x: system.solution(x, [0.0, t_end])[-1],
        diffusion=False,
    )


def _problems() -> dict[str, Problem]:
    vp, flow = VPLinear(), RectifiedFlow()
    return {
        p.name: p
        for p in [
            _mixture_problem(
                "mixture",
                EDM(),
                "2-D mixture of 8 Gaussians (std 0.1-0.3), EDM schedule, Karras grid "
                "sigma 80 -> 0.002 (rho 7)",
                lambda n: karras_grid(n, final_zero=False),
            ),
            _mixture_problem(
                "vp-mixture",
                vp,
                "the same mixture under the VP linear schedule, grid uniform in log-SNR, "
                "t 1 -> 1e-3",
                lambda n: uniform_logsnr_grid(n, 1.0, 1e-3, vp),
            ),
            _mixture_problem(
                "flow-mixture",
                flow,
                "the same mixture as a rectified flow with its exact velocity, SD3's shifted "
                "grid (shift 3) from pure noise, t 1 -> 1e-3",
                lambda n: shifted_t_grid(n, 1.0, 1e-3, shift=3.0, schedule=flow),
                flow=True,
            ),
            _generic_problem(
                "oscillator",
                toy.oscillator(2.0, 0.1),
                "damped oscillator q'' = -4 q - 0.2 q', t 0 -> 5",
                [1.0, 0.0],
                5.0,
            ),
            _generic_problem(
                "riccati",
                toy.TimeDependentRiccati(),
                "x' = -2 t x^2, elementwise, t 0 -> 2",
                [0.2, 0.4, 0.6],
                2.0,
            ),
        ]
    }


PROBLEMS: dict[str, Problem] = _problems()


@dataclass(frozen=True)
class Variant:
    """A solver as compared: a base alone, or bdia(base, gamma)."""

    base: str
    gamma: float | str | None = None

    @property
    def label(self) -> str:
        return self.base if self.gamma is None else f"bdia({self.base}, {self.gamma})"

    def solver(self) -> Solver | BidirectionalWrapper:
        base = get_solver(self.base)
        return base if self.gamma is None else bdia(base, self.gamma)


def variants(bases: Iterable[str], gammas: Iterable[float | str] = DEFAULT_GAMMAS) -> list[Variant]:
    """Each base alone, then under bdia with each gamma."""
    gammas = tuple(gammas)
    return [v for b in bases for v in [Variant(b)] + [Variant(b, g) for g in gammas]]


def steps_for_budget(solver: Solver | BidirectionalWrapper, budget: int) -> int:
    """The most steps whose model evaluations fit in ``budget`` (0 if not even one)."""
    s = solver.stages
    if isinstance(solver, BidirectionalWrapper):
        per = solver.nfe_per_step
        return 0 if budget < s else 1 + (budget - s) // per
    return budget // s


def _min_steps(solver: Solver | BidirectionalWrapper) -> int:
    # bdia's first step is its base solver's; a run is bdia only from the second step on.
    return 2 if isinstance(solver, BidirectionalWrapper) else 1


def _min_budget(solver: Solver | BidirectionalWrapper) -> int:
    """The smallest budget that ``run_comparison`` measures ``solver`` at."""
    if isinstance(solver, BidirectionalWrapper):
        return solver.stages + solver.nfe_per_step
    return solver.stages


def _plan(solver: Solver | BidirectionalWrapper, budgets: Iterable[int]) -> list[tuple[int, int]]:
    """``(budget, steps)`` for every budget the solver is run at, in the given order."""
    pairs = [(b, steps_for_budget(solver, b)) for b in budgets]
    return [(b, n) for b, n in pairs if n >= _min_steps(solver)]


class EmptySelection(ValueError):
    """A selection with nothing to measure on its problem.

    Attributes:
        argument: what to change, ``"bases"`` (no base solver works on the problem) or
            ``"budgets"`` (every budget is below what one run needs).
    """

    def __init__(self, message: str, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _refusal(
    problem: Problem, ode: ODE, solver: Solver | BidirectionalWrapper, budgets: Iterable[int]
) -> str | None:
    """Why ``solver`` refuses ``ode`` or a grid of ``problem`` it would run on, or None.

    The reason is what ``solver.check`` raises (TypeError or ValueError, before any model
    call) on the grid of each budget's run, or of its shortest run if no budget holds one.
    """
    steps = sorted({n for _, n in _plan(solver, budgets)}) or [_min_steps(solver)]
    for n in steps:
        ts = problem.grid(n).tolist()
        try:
            solver.check(ode, ts)
        except (TypeError, ValueError) as err:
            return str(err)
    return None


def _not_run(refused: Sequence[tuple[Variant, str]]) -> list[str]:
    """``"label, label: reason"`` for each reason, the variants in the given order."""
    by_reason: dict[str, list[str]] = {}
    for variant, reason in refused:
        by_reason.setdefault(reason, []).append(variant.label)
    return [f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items()]


def check_selection(
    problem: Problem,
    bases: Sequence[str],
    gammas: Sequence[float | str] = DEFAULT_GAMMAS,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
) -> None:
    """Raise EmptySelection, saying why and what would work, if no variant can be measured.

    A variant is measured when its solver accepts the problem's ODE and grids
    (``solver.check``) and at least one budget holds a run (one step, two under bdia).
    """
    chosen = variants(bases, gammas)
    usable = [
        n for n in available_solvers() if problem.diffusion or not get_solver(n).needs_diffusion
    ]
    if not chosen:
        raise EmptySelection(
            f"nothing to compare: no base solver given; solvers that work on problem "
            f"{problem.name!r}: {', '.join(usable)}",
            "bases",
        )
    runnable = [v for v in chosen if problem.diffusion or not v.solver().needs_diffusion]
    if not runnable:
        refused = list(dict.fromkeys(v.base for v in chosen))
        verb = "needs" if len(refused) == 1 else "need"
        raise EmptySelection(
            f"nothing to compare: {_join(refused)} {verb} a diffusion ODE and problem "
            f"{problem.name!r} is a plain ODE; solvers that work on it: {', '.join(usable)}",
            "bases",
        )
    if not budgets:
        raise EmptySelection("nothing to compare: no budget given", "budgets")
    ode = problem.make_ode(None)
    reasons = [(v, _refusal(problem, ode, v.solver(), budgets)) for v in runnable]
    refusals = [(v, reason) for v, reason in reasons if reason is not None]
    runnable = [v for v, reason in reasons if reason is None]
    if not runnable:
        accepted = [n for n in usable if _refusal(problem, ode, get_solver(n), budgets) is None]
        raise EmptySelection(
            f"nothing to compare: every variant refuses problem {problem.name!r} "
            f"({'; '.join(_not_run(refusals))}); solvers that work on it: {', '.join(accepted)}",
            "bases",
        )
    if not any(_plan(v.solver(), budgets) for v in runnable):
        need, label = min((_min_budget(v.solver()), v.label) for v in runnable)
        raise EmptySelection(
            f"nothing to compare: the budgets {', '.join(map(str, budgets))} are below what "
            f"one run needs (the cheapest, {label}, needs {need} NFE); give budgets of at "
            f"least {need}",
            "budgets",
        )


def order_slope(points: Iterable[tuple[int, float]]) -> float:
    """Least-squares slope of -log(error) against log(NFE) over ``(nfe, error)`` points.

    Points with an error that is not finite and positive are left out; NaN if fewer than two
    remain or they share one NFE.
    """
    pts = [(math.log(n), math.log(e)) for n, e in points if e > 0 and math.isfinite(e)]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return -sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else math.nan


@dataclass
class Result:
    """Measurements of one variant; dictionaries are keyed by budget.

    ``error`` is the relative error of the whole batch, ``median_error`` and ``worst_error``
    the median and the largest over the start states of each state's own (see
    ``per_state_error``): a few states that end in another mode of a mixture dominate
    ``error`` and ``worst_error`` but hardly move ``median_error``.

    ``refused`` is the reason the variant's solver gave for refusing the problem's ODE or
    grid (``solver.check``); such a variant was not run and has no measurements.
    """

    variant: Variant
    order_nominal: int
    nfe: dict[int, int] = field(default_factory=dict)
    error: dict[int, float] = field(default_factory=dict)
    median_error: dict[int, float] = field(default_factory=dict)
    worst_error: dict[int, float] = field(default_factory=dict)
    roundtrip32: float = math.nan
    roundtrip64: float = math.nan
    amplification: float = math.nan
    refused: str | None = None

    @property
    def measured_order(self) -> float:
        """Least-squares slope of -log(error) against log(NFE) over the budgets run."""
        return order_slope((self.nfe[b], e) for b, e in self.error.items())

    @property
    def median_order(self) -> float:
        """The same slope for ``median_error``, which the few stray states do not flatten."""
        return order_slope((self.nfe[b], e) for b, e in self.median_error.items())


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def per_state_error(x: Tensor, reference: Tensor) -> tuple[float, float]:
    """The median and the largest over the batch of each state's own relative error.

    State ``i``'s error is ``‖x_i − ref_i‖ / ‖ref_i‖``, its norm over all but the batch
    dimension, formed in float64. Unlike the error of the whole batch, ``‖x − ref‖ / ‖ref‖``,
    which a few states far from their reference (a start that ends in another mode of a
    mixture) dominate, the median is that of the typical state. With an even number of
    states it is the mean of the two middle ones.

    Args:
        x: the end states, shape ``(batch, ...)``, any floating dtype.
        reference: their reference solutions, the same shape.

    Returns:
        ``(median, largest)``; infinite or NaN where a state is.

    Raises:
        ValueError: if the shapes differ or the batch is empty.
    """
    if x.shape != reference.shape or x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(
            f"per_state_error needs end states and references of one shape (batch, ...) with "
            f"at least one state, got {tuple(x.shape)} and {tuple(reference.shape)}"
        )
    ref = reference.double().reshape(len(reference), -1)
    each = (x.double().reshape(len(x), -1) - ref).norm(dim=1) / ref.norm(dim=1)
    ranked = each.sort().values
    n = len(ranked)
    return float((ranked[(n - 1) // 2] + ranked[n // 2]) / 2), float(ranked[-1])


def _forward(
    ode: ODE, solver: Solver | BidirectionalWrapper, x: Tensor, ts: Tensor
) -> Tensor | StatePair:
    """Sample from ``x`` (shape ``(batch, dim)``) along the 1-D grid ``ts``.

    Returns:
        The end state (``x``'s shape and dtype), or under bdia the final ``StatePair``, which
        is what its exact inversion starts from.
    """
    if isinstance(solver, BidirectionalWrapper):
        return sample(ode, solver, x, ts, return_pair=True, progress=False)
    return sample(ode, solver, x, ts, progress=False)


def _end(forward: Tensor | StatePair) -> Tensor:
    return forward.later if isinstance(forward, StatePair) else forward


def _roundtrip(
    ode: ODE,
    solver: Solver | BidirectionalWrapper,
    x0: Tensor,
    forward: Tensor | StatePair,
    ts: Tensor,
) -> float:
    """Invert ``forward`` (what ``_forward`` gave from ``x0``) and compare with ``x0``.

    Args:
        x0: the start the forward run was given, shape ``(batch, dim)``, in its state dtype:
            against the float64 start, a float32 round trip would measure the rounding of
            the start to float32 (about 3e-8) instead of the round trip.

    Returns:
        ``|back - x0| / |x0|`` over the whole batch, ``back`` the inverted state with its low
        word (the difference is formed in float64, where both words of a float32 state are
        exact).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        back = invert(ode, solver, forward, ts, progress=False)
    # high - x0 is exact wherever the round trip is close (Sterbenz), which is where the low
    # word matters, so adding it loses nothing to rounding.
    diff = back.earlier.double() - x0.double()
    if back.earlier_low is not None:
        diff = diff + back.earlier_low.double()
    return float(diff.norm() / x0.double().norm())


def run_comparison(
    problem: Problem,
    bases: Sequence[str],
    *,
    gammas: Sequence[float | str] = DEFAULT_GAMMAS,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    batch: int = 256,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    on_variant: Callable[[Variant], None] | None = None,
) -> list[Result]:
    """Measure every variant on ``problem``.

    Errors use a ``dtype`` state and network; the round trip runs at the largest budget
    with a float32 network and a float32 or float64 state.

    Returns:
        One Result per variant that accepts the kind of the problem's ODE (a plain ODE
        leaves out the solvers that need a diffusion ODE), in ``variants(bases, gammas)``
        order; a variant no budget holds a run of has no errors, and one whose solver
        refuses the ODE or a grid has the reason in ``refused`` and nothing measured.

    Raises:
        EmptySelection: if no variant can be measured (see ``check_selection``).
    """
    check_selection(problem, bases, gammas, budgets)
    x0 = problem.start(batch, torch.Generator().manual_seed(seed))
    reference = problem.reference(x0)
    # One ODE per network dtype and one grid per step count, shared by every variant.
    ode = problem.make_ode(dtype)
    ode32 = problem.make_ode(torch.float32)
    grids: dict[int, Tensor] = {}
    results = []
    with torch.inference_mode():
        starts = {d: x0.to(d) for d in (dtype, torch.float32, torch.float64)}
        for variant in variants(bases, gammas):
            if on_variant is not None:
                on_variant(variant)
            solver = variant.solver()
            if solver.needs_diffusion and not problem.diffusion:
                continue
            result = Result(variant, solver.order)
            result.refused = _refusal(problem, ode, solver, budgets)
            if result.refused is not None:
                results.append(result)
                continue
            plan = _plan(solver, budgets)
            largest = max(plan, key=lambda p: p[1], default=None)
            # A float32 error run is also the forward half of the float32 round trip.
            reused: Tensor | StatePair | None = None
            forward: Tensor | StatePair | None
            for budget, steps in plan:
                if steps not in grids:
                    grids[steps] = problem.grid(steps)
                ts = grids[steps]
                ode.reset_nfe()
                try:
                    forward = _forward(ode, solver, starts[dtype], ts)
                    result.error[budget] = _relative(_end(forward), reference)
                    median, worst = per_state_error(_end(forward), reference)
                    result.median_error[budget], result.worst_error[budget] = median, worst
                    if dtype == torch.float32 and (budget, steps) == largest:
                        reused = forward
                except FloatingPointError:
                    result.error[budget] = math.inf
                    result.median_error[budget] = result.worst_error[budget] = math.inf
                result.nfe[budget] = ode.nfe
            if largest is not None:
                ts = grids[largest[1]]
                if isinstance(solver, BidirectionalWrapper):
                    result.amplification = solver.amplification(ode, ts.tolist())
                if math.isinf(result.amplification):
                    # A gamma of 0 is the base solver, which has no exact inverse to measure.
                    results.append(result)
                    continue
                for attr, state in (("roundtrip32", torch.float32), ("roundtrip64", torch.float64)):
                    forward = reused if state == torch.float32 else None
                    try:
                        if forward is None:
                            forward = _forward(ode32, solver, starts[state], ts)
                        value = _roundtrip(ode32, solver, starts[state], forward, ts)
                    except FloatingPointError:
                        value = math.inf
                    setattr(result, attr, value)
            results.append(result)
    return results


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def markdown_report(
    problem: Problem,
    results: Sequence[Result],
    budgets: Sequence[int],
    dtype: torch.dtype,
    command: str,
    plot: str | None = None,
) -> str:
    """The comparison as a markdown page: one row per variant run, then a line per reason
    naming the variants whose solver refused the problem (``Result.refused``)."""
    dtype_name = str(dtype).replace("torch.", "")
    lines = [
        "# Solver comparison on a toy problem",
        "",
        f"Problem `{problem.name}`: {problem.description}. Relative error "
        f"‖x − x_ref‖ / ‖x_ref‖ of the final state against the reference solution, {dtype_name} "
        "state and network, at equal budgets of model evaluations (NFE); each entry uses the "
        "most steps that fit the budget, and the NFE column shows what the ODE counted. "
        "Order: slope of −log(error) against log(NFE). Median error: the median over the "
        "start states of each state's own relative error ‖x_i − x_ref,i‖ / ‖x_ref,i‖, and "
        "median order its slope; worst state: the largest of them at the largest budget. "
        "The whole batch's error is dominated by its worst states: where a few start states "
        "end in another mode of a mixture (a worst state near 1 or above), that error and "
        "its order describe those few, and the median columns the typical state. "
        "Round trip: relative error of the "
        "start state after sampling and inverting at the largest budget, with a float32 "
        "network, against the start in that state dtype (low word included); for a plain "
        "solver the inversion is the solver run backward in time (approximate), for bdia it "
        "is the exact inverse from the final pair. "
        "Amplification: prod(1/gamma_k) over that grid.",
        "",
    ]
    head = (
        ["solver", "nominal order"]
        + [f"error @{b}" for b in budgets]
        + ["NFE used", "measured order", "round trip f32", "round trip f64", "amplification"]
        + [f"median error @{b}" for b in budgets]
        + ["median order", f"worst state @{max(budgets)}"]
    )
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in (r for r in results if r.refused is None):
        cells = [r.variant.label, str(r.order_nominal)]
        cells += [_fmt(r.error.get(b, math.nan)) for b in budgets]
        cells.append("/".join(str(r.nfe[b]) for b in budgets if b in r.nfe) or "—")
        order = r.measured_order
        cells.append("—" if math.isnan(order) else f"{order:.2f}")
        cells += [_fmt(r.roundtrip32), _fmt(r.roundtrip64), _fmt(r.amplification)]
        cells += [_fmt(r.median_error.get(b, math.nan)) for b in budgets]
        order = r.median_order
        cells.append("—" if math.isnan(order) else f"{order:.2f}")
        cells.append(_fmt(r.worst_error.get(max(budgets), math.nan)))
        lines.append("| " + " | ".join(cells) + " |")
    for line in _not_run([(r.variant, r.refused) for r in results if r.refused is not None]):
        lines += ["", f"Not run: {line.rstrip('.')}."]
    if plot:
        lines += ["", f"![Relative error against NFE, one panel per base solver]({plot})"]
    lines += ["", f"Written by `{command}`."]
    return "\n".join(lines) + "\n"


def plot_errors(problem: Problem, results: Sequence[Result], path: str | os.PathLike[str]) -> None:
    """Error against NFE, log-log, one panel per base solver (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.refused is None]
    bases = list(dict.fromkeys(r.variant.base for r in results))
    cols = min(3, len(bases))
    rows = math.ceil(len(bases) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharex=True
    )
    for ax, base in zip(axes.flat, bases):
        for r in (r for r in results if r.variant.base == base):
            pts = sorted((r.nfe[b], e) for b, e in r.error.items() if math.isfinite(e) and e > 0)
            if pts:
                label = "plain" if r.variant.gamma is None else f"gamma={r.variant.gamma}"
                style = "k-o" if r.variant.gamma is None else "-o"
                ax.loglog(*zip(*pts), style, label=label, markersize=3)
        ax.set_title(base)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(bases) :]:
        ax.axis("off")
    # The lowest panel in use in each column carries the x axis, also above an empty cell.
    for col in range(cols):
        ax = axes.flat[max(range(col, len(bases), cols))]
        ax.set_xlabel("NFE")
        ax.tick_params(axis="x", labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("relative error")
    fig.suptitle(f"{problem.name}: error against NFE")
    fig.tight_layout()
    try:
        replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
