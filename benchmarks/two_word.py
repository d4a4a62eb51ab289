"""Two-word BDIA states: how their rounding grows over a round trip, and where float32 high
words differ between its two passes.

For bdia(euler, 0.96) and bdia(heun, 0.96) on a 35-step Karras grid (sigma 80 -> 0.002), on
three Gaussian mixtures (component std 0.1 down to 0.001) and on the shipped digits model,
in both directions (data -> noise -> data: invert, then sample back; noise -> data ->
noise: sample, then invert the final pair):

- growth: a state pair of the first pass (float64 state) is perturbed at a grid index and
  carried to the end of the second pass. Two perturbations: the low words alone, by a tiny
  relative amount (what the two-word update's rounding does), and what the model sees, by
  a number of ulps with the two-word value kept (what a high-word flip does). The relative
  change of the result over the relative size of the perturbation is the growth, measured
  at two sizes to show whether it is linear; low-word runs in which a high word changed
  after all are counted and left out. The gammas' product
  ``BidirectionalWrapper.amplification`` is given beside it.
- round trips: the relative and largest error of the result, float64 state with a float64
  (mixtures) and a float32 network, float32 state with a float32 network.
- flips: at each grid index where both passes evaluate the model, how many elements of the
  state the model sees (the high word) differ between the passes; how far the passes'
  two-word states lie apart before the first; how many differences that distance would
  give for values spread evenly; how many of the first pass's values lie near a rounding
  midpoint; and, for the digits in float32, the same at gammas 0.95 and 0.97.

Run from the repository root (about four minutes on one busy CPU core)::

    python benchmarks/two_word.py                    # writes docs/benchmarks/two_word.md
    python benchmarks/two_word.py --smoke --out /tmp/two_word.md   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from _args import out_or_default, positive_int  # the benchmarks folder is the script's path
from torch import Tensor

import bdia
from bdia._files import write_atomic
from bdia.models import digits, toy
from bdia.models.checkpoints import load_network

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
STEPS = 35
GAMMA = 0.96
BASES = ("euler", "heun")
#: Gammas of the float32 digits round trips that compare rounding midpoints.
GAMMAS = (0.95, 0.96, 0.97)
#: The two relative sizes of a low-word change.
LOW_SIZES = (1e-28, 1e-27)
#: Grid indices at which the perturbations enter (where the second pass next evaluates).
LEVELS = (1, 5, 10, 15, 20, 25, 30, 34)
#: Component standard deviations of the 4-D mixtures of 3 Gaussians (seed 3).
MIXTURE_STDS = ((0.1, 0.3), (0.01, 0.02), (0.001, 0.002))
#: One float32 ulp in float64 ulps (2^29: float32 keeps 23 bits after the point, float64 52),
#: in the same binade: a change of a float64 value by this many of its ulps moves its float32
#: rounding by exactly one ulp, the change a high-word flip makes in a float32 state.
FLOAT32_ULP = round(torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps)
#: A two-word value whose low word lies within this many ulps of half an ulp of its high
#: word is counted as near a rounding midpoint.
NEAR_TIE = 1e-5
DIRECTIONS = ("data -> noise -> data", "noise -> data -> noise")


@dataclass
class Problem:
    """An ODE (given the network dtype and how many of the points it serves, for the
    digits' labels) with data at sigma 0.002 and noise at sigma 80.

    ``networks``: the network dtypes a float64 state is run with, the first also measuring
    the growth; ``model_ulps``: the two sizes of a change of what the model sees, in ulps of
    the float64 state (2^20 is about 2e-10 relative, ``FLOAT32_ULP`` = 2^29 is one float32 ulp).
    """

    name: str
    description: str
    ode: Callable[[torch.dtype, int], bdia.ODE]
    data: Tensor
    noise: Tensor
    networks: tuple[torch.dtype, ...]
    model_ulps: tuple[int, int]

    @property
    def configs(self) -> list[tuple[torch.dtype, torch.dtype]]:
        """(state dtype, network dtype) of the round trips."""
        return [(torch.float64, n) for n in self.networks] + [(torch.float32, torch.float32)]


def mixture_problem(std: tuple[float, float], count: int) -> Problem:
    mixture = toy.GaussianMixture.random(4, 3, std_range=std, seed=3)
    data = mixture.sample_data(count, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    noise = 80.0 * torch.randn(count, 4, generator=gen, dtype=data.dtype)
    return Problem(
        f"mixture std {std[0]}-{std[1]}",
        f"4-D mixture of 3 Gaussians of std {std[0]} to {std[1]} "
        "(`toy.GaussianMixture.random(4, 3, std_range, seed=3)`), EDM schedule",
        lambda dtype, count: mixture.ode(bdia.EDM(), model_dtype=dtype),
        data,
        noise,
        (torch.float64, torch.float32),
        (2**20, 2**24),
    )


def digits_problem(count: int) -> Problem:
    net = load_network("digits")
    split = digits.load_digits_split()
    labels = split.held_out_labels[:count].tolist()
    labels = torch.eye(net.label_dim)[labels]
    noise = torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return Problem(
        "digits",
        f'the shipped `load_network("digits")` under the labels of the first {count} held-out '
        "digits (its EDM preconditioner runs in float32 whatever the state's dtype)",
        lambda dtype, count: bdia.DiffusionODE(
            net, bdia.EDM(), cond={"class_labels": labels[:count]}
        ),
        split.held_out_images[:count].double(),
        80.0 * noise.double(),
        (torch.float32,),
        # The network rounds its input to float32: the smallest change it sees is one float32
        # ulp, which is also what a flip is; the larger size is 16 of them, as for the mixtures.
        (FLOAT32_ULP, 16 * FLOAT32_ULP),
    )


# -------------------------------------------------------------------------- two words
def value_difference(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> Tensor:
    """``(a_high + a_low) - (b_high + b_low)`` in float64: the highs' difference is exact
    (Sterbenz) and the lows' is accurate to its own rounding."""

    def low(t: Tensor | None) -> Tensor | float:
        return 0.0 if t is None else t.double()

    return (a[0].double() - b[0].double()) + (low(a[1]) - low(b[1]))


def rms(t: Tensor) -> float:
    return float(t.double().square().mean().sqrt())


def relative(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> float:
    return rms(value_difference(a, b)) / rms(b[0])


def ulp(x: Tensor) -> Tensor:
    """The spacing of ``x``'s dtype at each element (away from zero)."""
    return torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()


def signs(like: Tensor, gen: torch.Generator) -> Tensor:
    return (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like.dtype)


# ------------------------------------------------------------------------- round trips
@dataclass
class Trip:
    """Both passes of a round trip, run with the solver protocol (the loop of ``sample`` and
    ``invert``): each pass's two-word state at every grid index it reached, the second pass's
    order of indices, the pairs the first pass held and the result."""

    first: dict[int, tuple[Tensor, Tensor | None]]
    second: dict[int, tuple[Tensor, Tensor | None]]
    order: list[int]
    pairs: dict[int, bdia.StatePair]
    result: tuple[Tensor, Tensor | None]


def round_trip(ode, solver, grid: list[float], start: Tensor, direction: str) -> Trip:
    """Data -> noise -> data (``start`` at ``grid[-1]``) or noise -> data -> noise (at
    ``grid[0]``). ``pairs[j]`` is the first pass's pair whose state the model sees next is at
    index ``j``: (j - 1, j) when the second pass samples, (j, j + 1) when it inverts."""
    n = len(grid) - 1
    first: dict = {}
    second: dict = {}
    pairs: dict = {}
    order: list[int] = []
    with torch.no_grad():
        if direction == DIRECTIONS[0]:
            state = solver.init(ode, grid, start, at=n)
            first[n] = (start, None)
            while state.k > 0:
                state = solver.unstep(ode, grid, state)
                first[state.k] = (state.x, state.memory.low)
                pairs[state.k + 1] = solver.pair(state)
            state = solver.init(ode, grid, solver.pair(state), at=0)
            while state.k < n:
                order.append(state.k)  # the index the step evaluates the model at
                state = solver.step(ode, grid, state)
                second[state.k] = (state.x, state.memory.low)
        else:
            state = solver.init(ode, grid, start, at=0)
            first[0] = (start, None)
            while state.k < n:
                state = solver.step(ode, grid, state)
                first[state.k] = (state.x, state.memory.low)
                pairs[state.k - 1] = solver.pair(state)
            state = solver.init(ode, grid, solver.pair(state), at=n)
            while state.k > 0:
                order.append(state.k)
                state = solver.unstep(ode, grid, state)
                second[state.k] = (state.x, state.memory.low)
    return Trip(first, second, order, pairs, (state.x, state.memory.low))


def flips(trip: Trip, unit: float) -> dict:
    """At each grid index where the second pass evaluates the model and the first pass did
    too: the elements whose high words differ, and the passes' two-word distance there (rms,
    relative to the state's, in units of ``unit``)."""
    counts, distance, even = {}, {}, {}
    for j in trip.order:
        if j in trip.first and j in trip.second:
            a, b = trip.first[j], trip.second[j]
            counts[j] = int((a[0] != b[0]).sum())
            difference = value_difference(b, a).abs()
            distance[j] = rms(difference) / rms(a[0]) / unit
            # A midpoint lies between the two values with probability |difference| / ulp
            # for values spread evenly.
            even[j] = float((difference / ulp(a[0]).double()).sum())
    flipped = [j for j in counts if counts[j]]
    first = flipped[0] if flipped else None
    upto = list(counts).index(first) if first is not None else len(counts)
    before = list(distance.values())[:upto]
    values = []
    if first is not None:
        high = trip.first[first][0]
        values = high[high != trip.second[first][0]].tolist()
    ties = [
        float((low.abs() >= (0.5 - NEAR_TIE) * ulp(high)).double().mean())
        for j, (high, low) in trip.first.items()
        if j in counts and low is not None
    ]
    return {
        "counts": counts,
        "first": first,
        "values": values,
        "before": max(before, default=0.0),
        "elements": trip.result[0].numel(),
        "ties": max(ties, default=0.0),
        "even": sum(list(even.values())[: upto + 1]),
    }


# ------------------------------------------------------------------------------ growth
def perturbed(pair: bdia.StatePair, direction: str, kind: str, size: float, gen) -> tuple:
    """``pair`` perturbed, and the relative size of the perturbation. ``low``: both low words
    by ``size`` relative to each element; ``model``: the word the next move evaluates the
    model at, by ``size`` ulps of each element, its low word taking the change back so that
    the two-word value stays (what a high-word flip is)."""

    def low(t: Tensor | None, like: Tensor) -> Tensor:
        return torch.zeros_like(like) if t is None else t

    if kind == "low":
        de = size * pair.earlier.abs() * signs(pair.earlier, gen)
        dl = size * pair.later.abs() * signs(pair.later, gen)
        return dataclasses.replace(
            pair,
            earlier_low=low(pair.earlier_low, pair.earlier) + de,
            later_low=low(pair.later_low, pair.later) + dl,
        ), size
    word = "later" if direction == DIRECTIONS[0] else "earlier"
    high, lo = getattr(pair, word), low(getattr(pair, f"{word}_low"), getattr(pair, word))
    d = size * ulp(high) * signs(high, gen)
    changed = dataclasses.replace(pair, **{word: high + d, f"{word}_low": lo - d})
    return changed, rms(d) / rms(high)


def carry(ode, solver, grid: list[float], pair: bdia.StatePair, direction: str, j: int):
    """The rest of the second pass from the first pass's pair at index ``j``: its result (two
    words) and the high word at every index where it evaluates the model."""
    highs = []
    with torch.no_grad():
        if direction == DIRECTIONS[0]:
            sub = grid[j - 1 :]
            state = solver.init(ode, sub, pair, at=0)
            while state.k < len(sub) - 1:
                highs.append(state.x)
                state = solver.step(ode, sub, state)
        else:
            sub = grid[: j + 2]
            state = solver.init(ode, sub, pair, at=len(sub) - 1)
            while state.k > 0:
                highs.append(state.x)
                state = solver.unstep(ode, sub, state)
    return (state.x, state.memory.low), highs


def growth(ode, solver, grid, trip: Trip, direction, count, baselines, j, kind, size) -> dict:
    """Relative change of the round trip's result over the relative size of a perturbation
    of the first pass's pair at index ``j``, carried through the rest of the second pass,
    against the same pair carried unperturbed (kept in ``baselines``); and how many high
    words the model saw differ after the first evaluation (a perturbation of the low words
    alone changes none unless it carries a value across a rounding midpoint)."""
    pair = trip.pairs[j]
    pair = dataclasses.replace(
        pair,
        earlier=pair.earlier[:count],
        later=pair.later[:count],
        earlier_low=None if pair.earlier_low is None else pair.earlier_low[:count],
        later_low=None if pair.later_low is None else pair.later_low[:count],
    )
    changed, rel_in = perturbed(pair, direction, kind, size, torch.Generator().manual_seed(j))
    if j not in baselines:
        baselines[j] = carry(ode, solver, grid, pair, direction, j)
    base, base_highs = baselines[j]
    out, highs = carry(ode, solver, grid, changed, direction, j)
    flipped = sum(int((a != b).sum()) for a, b in zip(base_highs[1:], highs[1:], strict=True))
    return {"growth": relative(out, base) / rel_in, "size": rel_in, "flipped": flipped}


# ------------------------------------------------------------------------------- study
def study(problem: Problem, args, log) -> list[dict]:
    grid = [float(t) for t in bdia.karras_grid(STEPS, final_zero=False)]
    rows = []
    for base in args.bases:
        solver = bdia.bdia(base, GAMMA)
        for direction in DIRECTIONS:
            start = problem.data if direction == DIRECTIONS[0] else problem.noise
            row = {
                "problem": problem.name,
                "solver": f"bdia({base}, {GAMMA})",
                "direction": direction,
                "amplification": solver.amplification(problem.ode(torch.float64, 1), grid),
                "trips": {},
                "flips": {},
            }
            clock = time.perf_counter()
            for state_dtype, net_dtype in problem.configs:
                ode = problem.ode(net_dtype, len(start))
                x = start.to(state_dtype)
                trip = round_trip(ode, solver, grid, x, direction)
                error = value_difference(trip.result, (x, None))
                key = (state_dtype, net_dtype)
                row["trips"][key] = {
                    "relative": rms(error) / rms(x),
                    "max": float(error.abs().max()),
                }
                u = bdia.twoword.unit_roundoff(state_dtype)
                row["flips"][key] = flips(trip, u * u)
                if key == problem.configs[0]:
                    reference = trip
            ode = problem.ode(problem.networks[0], args.growth_count)
            grow = functools.partial(
                growth, ode, solver, grid, reference, direction, args.growth_count, {}
            )
            levels = [j for j in args.levels if j in reference.pairs]
            for kind, sizes in (("low", LOW_SIZES), ("model", problem.model_ulps)):
                # A low-word run in which a high word changed measures a flip, not the
                # low words' growth: it is counted, and left out of the maximum.
                measured = {j: grow(j, kind, sizes[0]) for j in levels}
                at = {
                    j: None if kind == "low" and m["flipped"] else m["growth"]
                    for j, m in measured.items()
                }
                worst = max((j for j in at if at[j] is not None), key=at.get)
                again = grow(worst, kind, sizes[1])
                row[kind] = {
                    "at": at,
                    "worst": worst,
                    "linearity": None
                    if kind == "low" and again["flipped"]
                    else again["growth"] / at[worst],
                    "sizes": (measured[worst]["size"], again["size"]),
                    "flipped_runs": sum(bool(m["flipped"]) for m in measured.values())
                    + bool(again["flipped"]),
                    "runs": len(measured) + 1,
                }
            rows.append(row)
            log(
                f"{problem.name:>24} {row['solver']:>16} {direction}: "
                f"float64 {row['trips'][problem.configs[0]]['relative']:.1e} "
                f"float32 {row['trips'][problem.configs[-1]]['relative']:.1e}, "
                f"G_low {row['low']['at'][row['low']['worst']]:.1e} "
                f"G {row['model']['at'][row['model']['worst']]:.1e} "
                f"({time.perf_counter() - clock:.0f} s)"
            )
    return rows


def gamma_study(problem: Problem, log) -> list[dict]:
    """Float32 round trips data -> noise -> data of bdia(euler, gamma) for gammas around
    0.96: differing high words, near-midpoint share and error."""
    grid = [float(t) for t in bdia.karras_grid(STEPS, final_zero=False)]
    ode = problem.ode(torch.float32, len(problem.data))
    x = problem.data.float()
    rows = []
    for gamma in GAMMAS:
        trip = round_trip(ode, bdia.bdia("euler", gamma), grid, x, DIRECTIONS[0])
        error = value_difference(trip.result, (x, None))
        f = flips(trip, bdia.twoword.unit_roundoff(torch.float32) ** 2)
        rows.append(
            {
                "gamma": gamma,
                "flips": f,
                "relative": rms(error) / rms(x),
                "max": float(error.abs().max()),
            }
        )
        log(f"{problem.name} bdia(euler, {gamma}) float32: {sum(f['counts'].values())} flips")
    return rows


# ------------------------------------------------------------------------------ report
def _e(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


#: The columns of the round-trip table: (state dtype, network dtype).
COLUMNS = (
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.float32, torch.float32),
)


def report(
    args, problems: list[Problem], rows: list[dict], by_gamma: list[dict], seconds: float
) -> str:
    command = f"python benchmarks/{Path(__file__).name}" + (
        " " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    )
    grid = [float(t) for t in bdia.karras_grid(STEPS, final_zero=False)]
    levels = sorted({j for r in rows for j in r["low"]["at"]})
    u64, u32 = (bdia.twoword.unit_roundoff(d) for d in (torch.float64, torch.float32))
    lines = [
        "# Two-word states: error growth and high-word flips",
        "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {seconds / 60:.1f} min.",
        "",
        f"`bdia(euler, {GAMMA})` and `bdia(heun, {GAMMA})` on EDM's rho = 7 grid of {STEPS} "
        f"steps from sigma 80 to 0.002 (`karras_grid({STEPS}, final_zero=False)`), whose "
        "gammas' product `BidirectionalWrapper.amplification` is "
        f"{rows[0]['amplification']:.2f}, on these problems:",
        "",
    ]
    lines += [
        f"- **{p.name}**: {p.description}; {len(p.data)} data points "
        f"({p.data[0].numel() * len(p.data)} elements) and as many noise draws (80 times a "
        "standard normal)."
        for p in problems
    ]
    lines += [
        "",
        "Each round trip runs in both directions: **data -> noise -> data** (the data "
        "inverted from a single state, as `bdia.generate.reconstruct` does, and the pair at "
        "the noise end sampled back) and **noise -> data -> noise** (sampled with the pair "
        "returned, and the pair inverted). Both passes run the solver protocol (`init`, "
        "`step`, `unstep`, `pair`), the loop of `sample` and `invert`.",
        "",
        "## Growth",
        "",
        "A pair of the first pass (float64 state) is perturbed at grid index j, where the "
        "second pass next evaluates the model, and carried to the end of the second pass. "
        "The growth is the relative change of the result (rms) over the relative size of the "
        f"perturbation, on the first {args.growth_count} points of each problem. Two "
        "perturbations:",
        "",
        f"- **low words**: both low words of the pair, by {LOW_SIZES[0]:.0e} of each element "
        "(random signs). This is what the rounding of the two-word update does: while the "
        "high words stay the same, the model sees bitwise the same inputs, and the change "
        "travels only through the linear part of the update.",
        "- **model input**: the high word the model sees next, by a number of ulps of each "
        "element (random signs), its low word taking the change back so that the two-word "
        "value stays: a high-word flip, as float32 round trips make them (below). The change "
        "travels through the model; this is the problem's growth `G` of the theory page. "
        + model_sizes(problems, rows),
        "",
        "Max: the largest growth over the indices measured, and the sigma where that "
        "perturbation entered. Linear: the growth at that index with a larger perturbation "
        f"({LOW_SIZES[1]:.0e} for the low words; the relative sizes of the model input's are "
        "given) over the growth with the smaller one; 1.00 is linear. Flips: the low-word "
        "runs in which a high word the model saw changed after all (the perturbation "
        "carried a value across a rounding midpoint, see the last section); such a run "
        "measures a flip, not the low words' growth, and is left out of the maximum "
        "(`flip` in the tables).",
        "",
        "| problem | solver | direction | amplification | low words: max | at sigma | linear "
        "| flips | model input: max | at sigma | linear (sizes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, mo = r["low"], r["model"]
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['direction']} | {r['amplification']:.2f} | "
            f"{_e(lo['at'][lo['worst']])} | {grid[lo['worst']]:.3g} | "
            f"{'flip' if lo['linearity'] is None else format(lo['linearity'], '.2f')} | "
            f"{lo['flipped_runs']} of {lo['runs']} | "
            f"{_e(mo['at'][mo['worst']])} | {grid[mo['worst']]:.3g} | "
            f"{mo['linearity']:.2f} ({_e(mo['sizes'][0])}, {_e(mo['sizes'][1])}) |"
        )
    lines += [
        "",
        "By the grid index j where the perturbation entered (`low words / model input`):",
        "",
        "| problem | solver | direction | "
        + " | ".join(f"j = {j}, sigma {grid[j]:.3g}" for j in levels)
        + " |",
        "|---|---|---|" + "---|" * len(levels),
    ]
    for r in rows:
        cells = [
            "—"
            if j not in r["low"]["at"]
            else f"{'flip' if r['low']['at'][j] is None else _e(r['low']['at'][j])} / "
            f"{_e(r['model']['at'][j])}"
            for j in levels
        ]
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['direction']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Round trips",
        "",
        "Relative error (rms of the two-word result's error over the rms of the start) and, "
        "after the slash, the largest error of an element; — where the problem has no such "
        "network. Beside them, u² times the low words' growth (u² G_low) and u² times the "
        "problem's growth (u² G), each the largest measured above, with u² = "
        f"{u64 * u64:.1e} for float64 states and {u32 * u32:.1e} for float32 (see the "
        "[theory page]"
        "(../theory.md#what-decides-failure-and-what-float32-two-word-states-guarantee)).",
        "",
        "| problem | solver | direction | "
        + " | ".join(f"{_dtype(s)} state, {_dtype(n)} network" for s, n in COLUMNS)
        + " | float64: u² G_low, u² G | float32: u² G_low, u² G |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for r in rows:
        g_low = r["low"]["at"][r["low"]["worst"]]
        g = r["model"]["at"][r["model"]["worst"]]
        cells = [
            f"{_e(r['trips'][c]['relative'])} / {_e(r['trips'][c]['max'])}"
            if c in r["trips"]
            else "—"
            for c in COLUMNS
        ]
        lines.append(
            f"| {r['problem']} | {r['solver']} | {r['direction']} | "
            + " | ".join(cells)
            + f" | {_e(u64 * u64 * g_low)}, {_e(u64 * u64 * g)} | "
            f"{_e(u32 * u32 * g_low)}, {_e(u32 * u32 * g)} |"
        )
    lines += [
        "",
        "## High-word flips",
        "",
        "At every grid index where both passes evaluate the model, the number of elements "
        "whose high word (the model's input) differs between the passes, listed as "
        "`index: count` in the order the second pass reaches them (index 34 is sigma "
        f"{grid[34]:.3g}, 30 is {grid[30]:.3g}, 20 is {grid[20]:.3g}, 1 is {grid[1]:.3g}). "
        "Distance: the largest rms distance between the passes' two-word states, relative "
        "to the state, at the indices the second pass reaches before its first flip (at "
        "all of them if it has none), in units of u² of the state dtype. First values: "
        "the high words (first pass) of up to four elements that differ at the first "
        "index with a difference. Near midpoints: the largest share, over those indices, "
        "of the first pass's elements whose low word lies within "
        f"{NEAR_TIE:.0e} ulp of half an ulp, i.e. whose two-word value lies that close to a "
        f"rounding midpoint (about {2 * NEAR_TIE:.0e} for values spread evenly; one "
        f"element of {problems[0].data.numel()} is {1 / problems[0].data.numel():.1e}). Even: the "
        "number of differing high words the passes' distance would give, up to and at the "
        "first index with a difference (at all indices if none), if the values were spread "
        "evenly between rounding midpoints (the sum over elements of |difference| / ulp).",
        "",
        "| problem | solver | direction | state, network | elements | differing high words "
        "| distance before the first (u²) | first values | near midpoints | even |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for c, f in r["flips"].items():
            cells = ", ".join(f"{j}: {n}" for j, n in f["counts"].items() if n) or "none"
            lines.append(
                f"| {r['problem']} | {r['solver']} | {r['direction']} | {_dtype(c[0])}, "
                f"{_dtype(c[1])} | {f['elements']} | {cells} | {f['before']:.1f} | "
                + (", ".join(f"{v:.3g}" for v in f["values"][:4]) or "—")
                + f" | {_e(f['ties'])} | {f['even']:.2g} |"
            )
    digits_rows = [r for r in rows if r["problem"] == problems[-1].name]
    lines += [
        "",
        "Rounding midpoints and gamma: float32 state and network, the digits, data -> noise "
        "-> data with `bdia(euler, gamma)`.",
        "",
        "| gamma | differing high words | near midpoints | round trip: relative / largest |",
        "|---|---|---|---|",
    ]
    for g in by_gamma:
        f = g["flips"]
        cells = ", ".join(f"{j}: {n}" for j, n in f["counts"].items() if n) or "none"
        lines.append(
            f"| {g['gamma']} | {cells} | {_e(f['ties'])} | {_e(g['relative'])} / {_e(g['max'])} |"
        )
    lines += ["", "## Reading the tables", ""] + reading(rows, digits_rows, by_gamma, grid)
    lines.append("")
    return "\n".join(lines)


def model_sizes(problems: list[Problem], rows: list[dict]) -> str:
    """The sizes of the model input's change (the mixtures', then the digits', the last
    problem), relative as measured, and whether the digits respond to it linearly."""

    def measured(names: set[str]) -> str:
        sizes = [r["model"]["sizes"][0] for r in rows if r["problem"] in names]
        return f"{min(sizes):.1e} to {max(sizes):.1e} relative"

    *mixtures, last = problems
    power = sorted({p.model_ulps[0].bit_length() - 1 for p in mixtures})
    in_float32 = last.model_ulps[0] / FLOAT32_ULP
    seen = (
        "one float32 ulp, the size of a flip and the smallest change it sees"
        if in_float32 == 1
        else f"{in_float32:g} float32 ulps (a flip is one)"
    )
    linear = [r["model"]["linearity"] for r in rows if r["problem"] == last.name]
    # The linear column prints two decimals: within 0.05 of 1 reads as linear there.
    response = (
        "linear"
        if all(abs(x - 1) <= 0.05 for x in linear)
        else f"not linear (linear {min(linear):.2f} to {max(linear):.2f})"
    )
    return (
        f"The mixtures: float64 network, {' or '.join(f'2^{e}' for e in power)} ulps "
        f"({measured({p.name for p in mixtures})}). The digits: the network rounds to "
        "float32 inside whatever the state's dtype, so the change is "
        f"2^{last.model_ulps[0].bit_length() - 1} float64 ulps, {seen} "
        f"({measured({last.name})}); at that size its response is {response}."
    )


def reading(rows: list[dict], digits_rows: list[dict], by_gamma: list[dict], grid) -> list[str]:
    """The notes under the tables, with the figures they quote taken from the results."""
    u64, u32 = (bdia.twoword.unit_roundoff(d) for d in (torch.float64, torch.float32))
    there, back = DIRECTIONS

    def low(r: dict) -> float:
        return r["low"]["at"][r["low"]["worst"]]

    def model(r: dict) -> float:
        return r["model"]["at"][r["model"]["worst"]]

    def trips(dtype: torch.dtype) -> list[tuple[dict, dict, dict]]:
        return [(r, t, r["flips"][c]) for r in rows for c, t in r["trips"].items() if c[0] == dtype]

    def total(f: dict) -> int:
        return sum(f["counts"].values())

    g_models = {}
    for r in rows:
        if r["direction"] == there:
            g_models[r["problem"]] = max(g_models.get(r["problem"], 0.0), model(r))
    f64, f32 = trips(torch.float64), trips(torch.float32)
    clean32 = [t for r, t, f in f32 if not total(f)]
    flipped32 = [(r, t, f) for r, t, f in f32 if total(f)]
    indices = sorted({j for _, _, f in flipped32 for j, n in f["counts"].items() if n})
    out = [
        "- A change of the low words grows through the update's linear part alone: over a "
        "round trip data -> noise "
        f"-> data by at most {max(low(r) for r in rows if r['direction'] == there):.0f}, "
        "for every problem and both solvers, and it is largest where the perturbation enters "
        "at the noise end: mostly the ratio of the state's size there to the data's, times "
        "0.96 every two steps; noise -> data -> noise by at most "
        f"{max(low(r) for r in rows if r['direction'] == back):.2f}. The gammas' product is "
        f"{rows[0]['amplification']:.2f}. The problem's growth of what the model sees is far "
        "larger data -> noise -> data ("
        + ", ".join(f"{p} {g:.1e}" for p, g in g_models.items())
        + "), but it never reaches the low words while the passes' high words agree.",
        f"- Float64 round trips are exact to {max(t['relative'] for _, t, _ in f64):.1e} "
        f"relative (largest element error {max(t['max'] for _, t, _ in f64):.1e}), with "
        + (
            "no differing high word in any of them"
            if not sum(total(f) for _, _, f in f64)
            else f"{sum(total(f) for _, _, f in f64)} differing high words in all"
        )
        + ": about u² "
        f"times the low words' growth (u² G_low up to "
        f"{max(u64 * u64 * low(r) for r in rows):.1e}), not u² times the problem's growth "
        f"(u² G up to {max(u64 * u64 * model(r) for r in rows):.1e}).",
    ]
    if clean32:
        out.append(
            "- Float32 round trips without a flip are exact to "
            f"{max(t['relative'] for t in clean32):.1e} relative, again about u² G_low "
            f"(u² = {u32 * u32:.1e})."
        )
    if flipped32:
        directions = sorted({r["direction"] for r, _, _ in flipped32})
        out.append(
            "- Float32 high words differ between the passes only "
            + " and ".join(directions)
            + f", and only at grid indices {indices[0]} to {indices[-1]} (sigma "
            f"{grid[indices[0]]:.3g} down to {grid[indices[-1]]:.3g}), the last steps "
            "toward the data; before the first the passes' two-word states lie up to "
            f"{max(f['before'] for _, _, f in flipped32):.0f} u² apart. Once an input "
            "differs, the model's outputs differ by about an ulp times its sensitivity, and "
            "more high words differ at the next indices. Those round trips lose "
            f"{min(t['relative'] for _, t, _ in flipped32):.1e} to "
            f"{max(t['relative'] for _, t, _ in flipped32):.1e} relative (largest element "
            f"{max(t['max'] for _, t, _ in flipped32):.1e}), where u² G is at most "
            f"{max(u32 * u32 * model(r) for r in rows):.1e}: what a flip costs is about an "
            "ulp times the growth from where it happens, not u² G."
        )
    ties_there = max(f["ties"] for r, _, f in f32 + f64 if r["direction"] == there)
    ties_back = max(f["ties"] for r, _, f in f32 + f64 if r["direction"] == back)
    share = {g["gamma"]: g["flips"]["ties"] for g in by_gamma}
    others = [g for g in by_gamma if g["gamma"] != GAMMA]
    still = any(sum(g["flips"]["counts"].values()) for g in others)
    lead = "- Gamma"
    if flipped32:
        lead = (
            "- High words differ more often than the passes' distance would make them for "
            "values spread evenly: "
            f"{min(f['even'] for _, _, f in flipped32):.2g} to "
            f"{max(f['even'] for _, _, f in flipped32):.2g} differing ones expected up to and "
            "at the first index with a difference (even column), "
            f"{min(f['counts'][f['first']] for _, _, f in flipped32)} to "
            f"{max(f['counts'][f['first']] for _, _, f in flipped32)} found at that index. "
            "One reason: gamma"
        )
    out.append(
        lead + " = 0.96 is 24/25 up to its rounding to the state dtype, so "
        "inverting (dividing a difference of m ulps by gamma) gives m + m/24 ulps, a "
        "rounding midpoint for m = 12, 36, ..., missed only by the rounding of 0.96. Near "
        "the data a state moves by a few ulps per step, and up to "
        f"{100 * ties_there:.2g}% of the first pass's elements lie within {NEAR_TIE:.0e} ulp of a "
        "midpoint data -> noise -> data (whose first pass inverts), where the passes' "
        "distance decides the rounding; "
        + ("none do" if ties_back == 0 else f"at most {100 * ties_back:.2g}% do")
        + " noise -> data -> noise, whose first pass multiplies by gamma (m - m/25 ulps). "
        f"With gamma {by_gamma[0]['gamma']} and {by_gamma[-1]['gamma']} the share is "
        f"{share[by_gamma[0]['gamma']]:.1e} and {share[by_gamma[-1]['gamma']]:.1e} "
        f"(0.96: {share.get(GAMMA, math.nan):.1e}), "
        + (
            "but high words still differ (last table): midpoints are one way for them to, "
            "not the only one."
            if still
            else "and no high word differs (last table)."
        )
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the page (default docs/benchmarks/two_word.md; needed with --smoke)",
    )
    parser.add_argument("--points", type=positive_int, default=2048, help="points of each mixture")
    parser.add_argument("--digits", type=positive_int, default=128, help="held-out digits")
    parser.add_argument(
        "--growth-count", type=positive_int, default=32, help="points for the growth"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check")
    args = parser.parse_args(argv)
    args.out = out_or_default(parser, args, DOCS / "two_word.md")
    args.bases, args.levels, stds = BASES, LEVELS, MIXTURE_STDS
    if args.smoke:
        args.bases, args.levels, stds = ("euler",), (1, 34), MIXTURE_STDS[1:2]
        args.points, args.digits, args.growth_count = 16, 2, 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    problems = [mixture_problem(s, args.points) for s in stds] + [digits_problem(args.digits)]
    with warnings.catch_warnings():
        # A perturbed run may warn of its parasitic component; the tables measure it.
        warnings.simplefilter("ignore", bdia.ParasiticWarning)
        rows = [row for p in problems for row in study(p, args, log)]
        by_gamma = gamma_study(problems[-1], log)
    text = report(args, problems, rows, by_gamma, time.perf_counter() - start)
    print(text)
    write_atomic(args.out, text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
