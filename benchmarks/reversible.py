"""Three exactly invertible schemes side by side: BDIA, EDICT and McCallum-Foster.

For each base solver (euler, heun, ddim) it runs the base alone, ``bdia(base, 0.96)``,
``edict(base)`` (p = 0.93) and ``reversible(base)`` (coupling 0.999 and 0.5):

- on the toy problems of ``bdia compare`` (``bdia.compare.PROBLEMS``, their reference
  solutions and start states): the error at equal budgets of model evaluations, the measured
  order, the largest parasitic component, and the round trip noise -> data -> noise in a
  float32 and a float64 state with a float32 network;
- on the shipped digits model: FDD and classifier accuracy of class-conditional samples at
  10, 20 and 35 NFE (``bdia.models.digits.frechet_digit_distance`` and ``predict``, as in
  ``benchmarks/digits_study.py``), the same for ``edict(euler)`` and euler at 100 and 250
  steps, and the round trip of held-out digits data -> noise -> data in both state dtypes.

The notes under the tables quote only this run's rows.

Run from the repository root (five to fifteen minutes on one busy CPU core)::

    python benchmarks/reversible.py                  # writes docs/benchmarks/reversible.md
    python benchmarks/reversible.py --smoke --out /tmp/reversible.md   # a quick check
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

import bdia
from bdia import generate
from bdia._files import write_atomic
from bdia.compare import PROBLEMS, order_slope, per_state_error, steps_for_budget
from bdia.models import digits
from bdia.models.checkpoints import load_network

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_study  # noqa: E402  (the digits study's seed and inversion grid, by import)
from _args import out_or_default, positive_int

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
#: (scheme, parameter): the base alone, bdia's gamma, EDICT's p, McCallum-Foster's coupling.
SCHEMES = (
    ("base", None),
    ("bdia", 0.96),
    ("edict", 0.93),
    ("reversible", 0.999),
    ("reversible", 0.5),
)
TOY_BUDGETS = (10, 20, 50, 100, 200)
#: The toy problems whose start states end in the modes of a mixture, as the notes name them.
MIXTURES = {"mixture": "EDM mixture", "vp-mixture": "vp-mixture", "flow-mixture": "flow-mixture"}
DIGIT_BUDGETS = (10, 20, 35)
#: Step counts at which EDICT's first-order error on the digits is measured beside its base's.
LONG_STEPS = (100, 250)
#: The notes count a scheme's digit samples as close to its base's where their FDD is at most
#: this many times the base's; the sentences that use it give the ratio.
CLOSE = 1.5


def make(scheme: str, parameter: float | None, base: str):
    if scheme == "base":
        return bdia.get_solver(base)
    if scheme == "bdia":
        return bdia.bdia(base, parameter)
    if scheme == "edict":
        return bdia.edict(base, parameter)
    return bdia.reversible(base, parameter)


def label(scheme: str, parameter: float | None, base: str) -> str:
    return base if scheme == "base" else f"{scheme}({base}, {parameter})"


def per_step(solver) -> str:
    """Model evaluations per step, as the solver states them."""
    if isinstance(solver, bdia.BidirectionalWrapper):
        s = solver.solver.stages
        return str(s) if s == 1 else f"{s} first, then {solver.nfe_per_step}"
    return str(solver.stages)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def wide(pair) -> torch.Tensor:
    """The state a pair returns as its result at its grid point, both words (float64)."""
    if isinstance(pair, bdia.CoupledPair):
        high, low = pair.x, pair.x_low
    elif isinstance(pair, bdia.StatePair):
        high, low = pair.earlier, pair.earlier_low
    else:
        return pair.double()
    return high.double() + (0.0 if low is None else low.double())


class Worst:
    """The largest ``parasitic`` a callback saw."""

    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self, info: dict) -> None:
        if info.get("parasitic") is not None:
            self.value = max(self.value, float(info["parasitic"]))


def min_steps(solver) -> int:
    return 2 if isinstance(solver, bdia.BidirectionalWrapper) else 1


# ------------------------------------------------------------------------- toy problems
def toy_study(args, log) -> list[dict]:
    rows = []
    for name in args.problems:
        problem = PROBLEMS[name]
        bases = args.bases if problem.diffusion else [b for b in args.bases if b != "ddim"]
        x0 = problem.start(args.batch, torch.Generator().manual_seed(0))
        reference = problem.reference(x0)
        ode = problem.make_ode(torch.float64)
        ode32 = problem.make_ode(torch.float32)
        for base in bases:
            for scheme, parameter in SCHEMES:
                solver = make(scheme, parameter, base)
                row = {
                    "problem": name,
                    "label": label(scheme, parameter, base),
                    "scheme": scheme,
                    "per_step": per_step(solver),
                    "formal": solver.order,
                }
                row["errors"], row["nfe"], row["parasitic"] = {}, {}, {}
                row["median"], row["worst"] = {}, {}
                largest = None
                for budget in args.toy_budgets:
                    steps = steps_for_budget(solver, budget)
                    if steps < min_steps(solver):
                        continue
                    ts = problem.grid(steps)
                    ode.reset_nfe()
                    worst = Worst()
                    try:
                        end = bdia.sample(ode, solver, x0, ts, progress=False, callback=worst)
                        row["errors"][budget] = relative(end, reference)
                        each = per_state_error(end, reference)
                        row["median"][budget], row["worst"][budget] = each
                    except FloatingPointError:
                        row["errors"][budget] = math.inf
                        row["median"][budget] = row["worst"][budget] = math.inf
                    row["nfe"][budget] = ode.nfe
                    row["parasitic"][budget] = worst.value
                    largest = ts
                fitted = list(row["errors"])[-3:]
                row["order"] = order_slope([(row["nfe"][b], row["errors"][b]) for b in fitted])
                row["median_order"] = order_slope(
                    [(row["nfe"][b], row["median"][b]) for b in fitted]
                )
                for dtype in (torch.float32, torch.float64):
                    row[str(dtype)] = math.nan
                    if largest is None or scheme == "base":
                        continue
                    start = x0.to(dtype)
                    try:
                        pair = bdia.sample(ode32, solver, start, largest, return_pair=True)
                        back = bdia.invert(ode32, solver, pair, largest, progress=False)
                        row[str(dtype)] = relative(wide(back), start)
                    except FloatingPointError:
                        row[str(dtype)] = math.inf
                log(
                    f"{name:>10} {row['label']:>26}: "
                    + " ".join(f"{e:.2e}" for e in row["errors"].values())
                    + f" order {row['order']:.2f} median {row['median_order']:.2f}"
                )
                rows.append(row)
    return rows


# ------------------------------------------------------------------------ digits model
def digits_noise(args) -> tuple[torch.Tensor, list[int]]:
    """The sampling study's noise (float64, ``(samples, 1, 8, 8)``) and class labels."""
    gen = torch.Generator().manual_seed(digits_study.NOISE_SEED)
    noise = torch.randn(args.samples, 1, 8, 8, generator=gen, dtype=torch.float64)
    return noise, [i % 10 for i in range(args.samples)]


def sample_cell(net, classifier, split, solver, steps: int, noise, labels, log, what) -> dict:
    """FDD, accuracy and largest pixel of the digits sampled with ``steps`` steps, logged
    after ``what``."""
    start = time.perf_counter()
    ts = bdia.karras_grid(steps, final_zero=False)
    counter = bdia.DiffusionODE(lambda x, sigma: torch.zeros_like(x), bdia.EDM())
    bdia.sample(counter, solver, torch.ones(1, 1), ts, progress=False)
    images = generate.sample_images(
        net, solver, ts, noise, labels, state_dtype=torch.float64
    ).float()
    correct = digits.predict(classifier, images) == torch.tensor(labels)
    cell = {
        "steps": steps,
        "nfe": counter.nfe,
        "fdd": digits.frechet_digit_distance(classifier, images, split.held_out_images),
        "accuracy": float(correct.double().mean()),
        "overshoot": float(images.abs().max()),
    }
    log(
        f"{what}: steps {steps:3d} NFE {cell['nfe']:3d} FDD {cell['fdd']:8.3f} "
        f"acc {cell['accuracy']:.4f} ({time.perf_counter() - start:.1f} s)"
    )
    return cell


def digits_sampling(args, net, classifier, split, log) -> list[dict]:
    noise, labels = digits_noise(args)
    rows = []
    for base in args.digit_bases:
        for scheme, parameter in SCHEMES:
            solver = make(scheme, parameter, base)
            row = {"label": label(scheme, parameter, base), "scheme": scheme, "cells": {}}
            for budget in args.digit_budgets:
                steps = steps_for_budget(solver, budget)
                if steps < min_steps(solver):
                    row["cells"][budget] = None
                    continue
                what = f"{row['label']:>26} NFE {budget:3d}"
                row["cells"][budget] = sample_cell(
                    net, classifier, split, solver, steps, noise, labels, log, what
                )
            rows.append(row)
    return rows


def digits_long(args, net, classifier, split, log) -> list[dict]:
    """edict(euler, p) and euler with ``args.long_steps`` steps, on the sampling study's noise:
    whether EDICT's first-order error fades with many steps."""
    noise, labels = digits_noise(args)
    p = next(parameter for scheme, parameter in SCHEMES if scheme == "edict")
    rows = []
    for scheme, parameter in (("edict", p), ("base", None)):
        solver = make(scheme, parameter, "euler")
        row = {"label": label(scheme, parameter, "euler"), "cells": {}}
        for steps in args.long_steps:
            row["cells"][steps] = sample_cell(
                net, classifier, split, solver, steps, noise, labels, log, f"{row['label']:>26}"
            )
        rows.append(row)
    return rows


def digits_round_trips(args, net, split, log) -> list[dict]:
    images = split.held_out_images[: args.count]
    labels = split.held_out_labels[: args.count].tolist()
    ts = bdia.karras_grid(digits_study.INVERSION_STEPS, final_zero=False)
    sigma_max = float(ts[0])
    rows = []
    for base in args.digit_bases:
        for scheme, parameter in SCHEMES:
            solver = make(scheme, parameter, base)
            row = {
                "label": f"{base} backward" if scheme == "base" else label(scheme, parameter, base),
                "scheme": scheme,
                "base": base,
            }
            for dtype in (torch.float32, torch.float64):
                worst = Worst()
                pair, back = generate.reconstruct(
                    net, solver, ts, images, labels, state_dtype=dtype, callback=worst
                )
                error = (back.double() - images.double()).flatten(1)
                noise = wide(pair)
                row[str(dtype)] = {
                    "max": float(error.abs().max()),
                    "rms": float(error.square().mean().sqrt()),
                    "noise": float(noise.std()) / sigma_max,
                    "parasitic": worst.value,
                }
            log(
                f"{row['label']:>26}: max {row['torch.float32']['max']:.2e} (float32) "
                f"{row['torch.float64']['max']:.2e} (float64), noise std / sigma "
                f"{row['torch.float64']['noise']:.3f}"
            )
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ report
def _e(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "diverged"
    return "0" if value == 0 else f"{value:.1e}"


def _g(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.2f}"


def _cell(c: dict) -> str:
    """A sampling cell: ``FDD / accuracy % (steps, NFE) max |x|``."""
    return (
        f"{c['fdd']:.3g} / {100 * c['accuracy']:.1f} ({c['steps']}, {c['nfe']}) "
        f"{c['overshoot']:.1f}"
    )


def report(args, toy, sampling, long, trips, baseline, seconds: float) -> str:
    command = f"python benchmarks/{Path(__file__).name}" + (
        " " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    )
    lines = [
        "# Reversible schemes: BDIA, EDICT and McCallum-Foster",
        "",
        f"Written by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {seconds / 60:.1f} min.",
        "",
        "Each base solver alone, `bdia(base, 0.96)`, `edict(base, 0.93)` (EDICT's default p) and "
        "McCallum-Foster's `reversible(base, coupling)` at its default coupling 0.999 and at "
        "0.5. The schemes are described on the "
        "[theory page](../theory.md#other-reversible-schemes-edict-and-mccallum-foster).",
        "",
        "## Evaluations per step",
        "",
        "| scheme | model evaluations per step (base of s stages) | euler, ddim | heun |",
        "|---|---|---|---|",
        "| base | s | 1 | 2 |",
        "| bdia | s on the first step, then 2 s - 1 | 1 | 2, then 3 |",
        "| edict | 2 s | 2 | 4 |",
        "| reversible | 2 s | 2 | 4 |",
        "",
        "## Toy problems",
        "",
        f"The problems of `bdia compare` (`bdia.compare.PROBLEMS`), {args.batch} start states "
        "each, float64 state and network. Each cell is the relative error at the grid's end "
        "against the problem's reference solution, with as many steps as fit the budget of "
        "model evaluations heading the column (— where not even one step, or for bdia two, "
        "fits). Order: least-squares slope of -log(error) against log(NFE) over the three "
        "largest budgets. Median order: the same slope for the median over the start states "
        "of each state's own relative error |x - x_ref| / |x_ref|, which a few states that "
        "end far from their reference (in another mode of a mixture) do not move. "
        "Parasitic: the largest `parasitic` component (rms of the non-physical part relative "
        "to the state: x_{k-1} - Phi(x_k) for bdia, the difference of the chains for edict "
        "and reversible) at the smallest and the largest budget run; above 1 the drivers "
        "warn. Round trip: noise -> data -> noise through the final pair at the largest "
        "budget, with a float32 network, relative to the start.",
        "",
    ]
    by_problem: dict[str, list[dict]] = {}
    for row in toy:
        by_problem.setdefault(row["problem"], []).append(row)
    budgets = args.toy_budgets
    for name, rows in by_problem.items():
        lines += [
            f"### {name}",
            "",
            PROBLEMS[name].description + ".",
            "",
            "| solver | "
            + " | ".join(f"NFE ≤ {b}" for b in budgets)
            + " | order | median order | parasitic | round trip float32 | round trip float64 |",
            "|---|" + "---|" * (len(budgets) + 5),
        ]
        for r in rows:
            errors = [_e(r["errors"].get(b)) for b in budgets]
            parasitic = list(r["parasitic"].values())
            par = (
                "—"
                if r["label"] in args.bases or not parasitic
                else f"{_g(parasitic[0])}, {_g(parasitic[-1])}"
            )
            lines.append(
                f"| {r['label']} | "
                + " | ".join(errors)
                + f" | {_g(r['order'])} | {_g(r['median_order'])} | {par} | "
                f"{_e(r['torch.float32'])} | "
                f"{_e(r['torch.float64'])} |"
            )
        lines.append("")
    lines += [
        "## Digits model",
        "",
        f'The shipped `load_network("digits")` (EDM schedule, where ddim is euler step for '
        f"step, so only euler and heun are run), float32 network. {args.samples} "
        f"class-conditional samples ({args.samples // 10} per class, the same noise for every "
        "solver), float64 state, on EDM's rho = 7 grid from sigma 80 to 0.002 "
        "(`karras_grid(steps, final_zero=False)`: McCallum-Foster evaluates the model at every "
        "grid point, so no grid here ends at sigma 0), with as many steps as fit the budget. "
        "FDD: Frechet distance to the "
        f"{len(split_labels(baseline))} held-out digits in the shipped classifier's features; "
        "accuracy: the share the classifier assigns to the class sampled under (both as in "
        f"[the digits study](digits.md), whose {digits_study.SAMPLES} samples give somewhat "
        "lower FDDs). "
        f"Yardsticks: FDD(training, held-out) = **{baseline['fdd']:.3f}**, classifier "
        f"accuracy on the held-out digits = **{baseline['accuracy']:.4f}**.",
        "",
        "Each cell is `FDD / accuracy % (steps, NFE) max |x|`; max |x| is the largest pixel "
        "magnitude of the samples (the data lie in [-1, 1]).",
        "",
        "| solver | " + " | ".join(f"NFE ≤ {b}" for b in args.digit_budgets) + " |",
        "|---|" + "---|" * len(args.digit_budgets),
    ]
    for r in sampling:
        cells = []
        for b in args.digit_budgets:
            c = r["cells"][b]
            cells.append("—" if c is None else _cell(c))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Many steps",
        "",
        f"{long[0]['label']} and its base with "
        + " and ".join(str(n) for n in args.long_steps)
        + " steps, from the same noise on the same rho = 7 grid to sigma 0.002; cells as above.",
        "",
        "| solver | " + " | ".join(f"{n} steps" for n in args.long_steps) + " |",
        "|---|" + "---|" * len(args.long_steps),
    ]
    for r in long:
        lines.append(
            f"| {r['label']} | " + " | ".join(_cell(r["cells"][n]) for n in args.long_steps) + " |"
        )
    lines += [
        "",
        "### Round trips of held-out digits",
        "",
        f"{args.count} held-out digits, each taken as the state at sigma 0.002 of a "
        f"{digits_study.INVERSION_STEPS}-step rho = 7 grid to sigma 80, inverted under its "
        "label and sampled back (`bdia.generate.reconstruct`). Error in pixel units of "
        "[-1, 1]. The backward base solver is the usual approximate inversion; bdia forms its "
        "pair at the data end by one approximate base step; edict and reversible start both "
        "chains at the data. Noise std / sigma: the standard deviation of the inverted state "
        "at sigma 80 over 80 (about 1 for a state that looks like the noise the sampler "
        "starts from; float64 state). Parasitic: the largest over the round trip, float64 "
        "state.",
        "",
        "| inversion | max abs, float32 state | max abs, float64 state | rms, float32 "
        "| rms, float64 | noise std / sigma | parasitic |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in trips:
        f32, f64 = r["torch.float32"], r["torch.float64"]
        lines.append(
            f"| {r['label']} | {_e(f32['max'])} | {_e(f64['max'])} | {_e(f32['rms'])} | "
            f"{_e(f64['rms'])} | {f64['noise']:.3f} | "
            + ("—" if "backward" in r["label"] else _g(f64["parasitic"]))
            + " |"
        )
    lines += ["", *notes(args, toy, sampling, long, trips), ""]
    return "\n".join(lines)


def split_labels(baseline: dict) -> list:
    return list(baseline["held_out"])


def _range(values: list[float], fmt: str = ".3g") -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if low == high else f"{low:{fmt}} to {high:{fmt}}"


def _spread(values: list[float]) -> str:
    """The range of relative errors, and whether any run diverged (an infinite one)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "inf (all diverge)"
    low, high = min(finite), max(finite)
    text = _e(low) if low == high else f"{_e(low)} to {_e(high)}"
    return text + (" (or diverge)" if len(finite) < len(values) else "")


def _n(value: float) -> str:
    """Three significant digits, without an exponent up to 999,999."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def notes(args, toy, sampling, long, trips) -> list[str]:
    """The notes under the tables; every figure they quote is taken from this run's rows."""
    # 2^-24: the float32 ulp of a pixel in [0.5, 1).
    u32 = bdia.twoword.unit_roundoff(torch.float32)
    p = next(parameter for scheme, parameter in SCHEMES if scheme == "edict")
    couplings = [parameter for scheme, parameter in SCHEMES if scheme == "reversible"]
    coupling, damped = couplings[0], min(couplings)
    sampled = {r["label"]: r for r in sampling}
    top = args.digit_budgets[-1]
    out = ["## Reading the tables", ""]

    # Float64 round trips an ulp of a pixel off (|x| <= 1: 1.1e-16 to 2.2e-16 near 1) rather
    # than a few u^2: the passes' high words differed somewhere.
    ulp_off = [
        f"{r['label']} {_e(r['torch.float64']['max'])}"
        for r in trips
        if r["scheme"] != "base" and 1e-18 <= r["torch.float64"]["max"] < 1e-14
    ]
    text = (
        "- All three reversible schemes invert exactly up to the rounding of their two-word "
        "states, times the growth of errors along the run."
    )
    if ulp_off:
        text += (
            " Where a float64 round trip of the digits is about 1e-16 rather than 0 or about "
            f"1e-30 ({', '.join(ulp_off)}), a chain value that lies within u^2 of a rounding "
            "midpoint was split into neighbouring high words by the two passes, and the model "
            f"saw inputs one ulp apart; in float32 that one-ulp change ({u32:.1e}) is what the "
            "round trip carries."
        )
    out.append(text)

    mixtures = [r for r in toy if r["problem"] in MIXTURES]
    if mixtures:
        out.append(order_note(args, mixtures))

    out.append(stability(args, toy, sampled, trips, p, coupling, damped, top))

    edict, base = long
    steps = args.long_steps
    most = edict["cells"][steps[-1]]["fdd"] / base["cells"][steps[-1]]["fdd"]
    falls = all(
        edict["cells"][a]["fdd"] > edict["cells"][b]["fdd"] for a, b in zip(steps, steps[1:])
    )
    verdict = (
        "With many steps it converges"
        if falls and most <= CLOSE
        else f"With {steps[-1]} steps its FDD is still {most:.3g} times its base's"
    )
    out.append(
        "- EDICT's own error is large at large steps: its chain y takes the increment over "
        f"[t_k, t_{{k+1}}] from a point already at t_{{k+1}}. {verdict} (Many steps: "
        + "; ".join(
            f"{n} steps of {edict['label']} give FDD {edict['cells'][n]['fdd']:.3g} and "
            f"{100 * edict['cells'][n]['accuracy']:.1f}% accuracy, {base['label']} "
            f"{base['cells'][n]['fdd']:.3g} and {100 * base['cells'][n]['accuracy']:.1f}%"
            for n in steps
        )
        + f", on the same {args.samples} samples)."
    )
    return out


def order_note(args, mixtures: list[dict]) -> str:
    """The note on the order column, from the mixture problems' rows."""
    # A slope half an order or more off the scheme's order is what the note is about.
    steep = [
        f"{r['label']} {r['order']:.2f}"
        for r in mixtures
        if r["problem"] == "mixture"
        and r["scheme"] in ("edict", "reversible")
        and r["order"] >= r["formal"] + 0.5
    ]
    flat = [r for r in mixtures if r["order"] <= r["formal"] - 0.5]

    def fitted(r: dict) -> list[int]:
        return list(r["errors"])[-3:]

    # Unstable at a budget of the fit: the largest parasitic component above 1, where the
    # drivers warn; the slope of such a run says nothing of the scheme's order.
    unstable = [r for r in flat if max(r["parasitic"].get(b, 0.0) for b in fitted(r)) > 1.0]
    # A few states in another mode: the median state's slope is clearly steeper.
    strays = [r for r in flat if r not in unstable and r["median_order"] >= r["order"] + 0.3]
    text = "- The order column is a slope, not a verdict"
    parts = []
    if steep:
        parts.append(
            "where the errors are still falling out of an unstable regime it is steeper "
            f"than the scheme's order (EDM mixture: {', '.join(steep)})"
        )
    if strays:
        by_name: dict[str, list[str]] = {}
        for r in strays:
            by_name.setdefault(MIXTURES[r["problem"]], []).append(
                f"{r['label']} {r['order']:.2f} / {r['median_order']:.2f}"
            )
        worst = [r["worst"][fitted(r)[-1]] for r in strays]
        parts.append(
            f"where a few of the {args.batch} start states of a mixture end in another "
            "mode at the budgets of the fit it is flatter, and the median order leaves "
            "them out (order / median order: "
            + "; ".join(f"{name} {', '.join(rows)}" for name, rows in by_name.items())
            + f"; the largest relative error of one state in these rows at the largest "
            f"budget: {_range(worst, '.2g')})"
        )
    if unstable:
        parts.append(
            "where a run is unstable at the budgets of the fit (parasitic above 1) it is "
            "flat or worse ("
            + ", ".join(f"{MIXTURES[r['problem']]} {r['label']} {r['order']:.2f}" for r in unstable)
            + ")"
        )
    text += (": " + ", and ".join(parts)) if parts else ""
    # EDICT's median state slow as well, on a stable run: its mixing's error, on its plateau.
    slow = [
        f"{MIXTURES[r['problem']]} {r['label']} {r['median_order']:.2f}"
        for r in mixtures
        if r["scheme"] == "edict" and r not in unstable and r["median_order"] <= r["formal"] - 0.3
    ]
    if slow:
        text += (
            ". Where EDICT's median order is low too (" + ", ".join(slow) + "), the "
            "mixing's own error, proportional to 1 - p and hardly shrinking with the steps "
            "until about 3 / (1 - p) of them (first order after), is as large as the rest "
            "of its error at these budgets (see the [theory page](../theory.md#edict))"
        )
    return (
        text + ". Measured in the asymptotic range (tests/test_coupled.py), EDICT is first "
        "order for every base, on the flow problem from pure noise too, and "
        "McCallum-Foster has the base's order."
    )


def stability(args, toy, sampled, trips, p, coupling, damped, top) -> str:
    """The note on the coupled schemes' parasitic mode, from the digits' and toys' rows."""
    bases = args.digit_bases
    last = [c["steps"] for r in sampled.values() if (c := r["cells"][top]) is not None]
    ratios = {}
    for n in sorted(set(last)):
        ts = [float(t) for t in bdia.karras_grid(n, final_zero=False)]
        ratios[n] = ts[-1] / ts[-2]
    few, many = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
    text = (
        "- Stability. On a linear mode that the exact flow multiplies by R per step, one step "
        "of EDICT has determinant p^2 and one of McCallum-Foster lambda, so their parasitic "
        "mode (the chains' difference) is multiplied by about p^2 / R and lambda / R when "
        "sampling, and by R / p^2 and R / lambda when inverting. Toward the data of a "
        "diffusion ODE, R is about sigma_{k+1} / sigma_k off the data (over the last step of "
        f"the grids at NFE ≤ {top} here, {ratios[few]:.2g} with {few} steps to "
        f"{ratios[many]:.2g} with {many}). "
    )

    def ratio_to_base(name: str, base: str) -> list[float]:
        cells = sampled[name]["cells"]
        return [
            cells[b]["fdd"] / sampled[base]["cells"][b]["fdd"]
            for b in args.digit_budgets
            if cells[b] is not None and sampled[base]["cells"][b] is not None
        ]

    defaults = [(label("edict", p, b), b) for b in bases] + [
        (label("reversible", coupling, b), b) for b in bases
    ]
    # Swamped: an FDD at least ten times its base's at every budget run.
    swamped = [(lb, b) for lb, b in defaults if min(ratio_to_base(lb, b), default=0) >= 10]
    if swamped:
        cells = [c for lb, _ in swamped for c in sampled[lb]["cells"].values() if c is not None]
        text += (
            f"With p = {p} and lambda = {coupling} the mode grows while sampling and swamps "
            f"the digits' samples of {_names([lb for lb, _ in swamped])} at every budget here "
            f"(FDD {_range([c['fdd'] for c in cells])}, at least ten times the base's, and a "
            f"max |x| of {_range([c['overshoot'] for c in cells], '.1f')})"
        )
    rest = [(lb, b) for lb, b in defaults if (lb, b) not in swamped and sampled[lb]["cells"][top]]
    if rest:
        text += ("; " if swamped else "") + ", ".join(
            f"{lb} reaches FDD {sampled[lb]['cells'][top]['fdd']:.3g} at "
            f"{sampled[lb]['cells'][top]['nfe']} NFE ({b}: "
            f"{sampled[b]['cells'][top]['fdd']:.3g})"
            for lb, b in rest
        )
    text += ". "
    weak = [
        (label("reversible", damped, b), b)
        for b in bases
        if sampled[label("reversible", damped, b)]["cells"][top]
    ]
    ok = [
        lb
        for lb, b in weak
        if sampled[lb]["cells"][top]["fdd"] <= CLOSE * sampled[b]["cells"][top]["fdd"]
    ]
    fails = [lb for lb, _ in weak if lb not in ok]
    within = f"to sample the digits within {CLOSE:g} times the base's FDD"
    if ok:
        damps = f"lambda = {damped} damps it enough for {_names(ok)} {within}"
        damps += f", though not for {_names(fails)}" if fails else ""
    else:
        damps = f"lambda = {damped} does not damp it enough for {_names(fails)} {within}"
    text += (
        f"{damps}: at NFE ≤ {top} "
        + ", ".join(
            f"{lb} samples the digits at FDD {sampled[lb]['cells'][top]['fdd']:.3g} and "
            f"{100 * sampled[lb]['cells'][top]['accuracy']:.1f}% in "
            f"{sampled[lb]['cells'][top]['nfe']} NFE ({b}: "
            f"{sampled[b]['cells'][top]['fdd']:.3g} and "
            f"{100 * sampled[b]['cells'][top]['accuracy']:.1f}%)"
            for lb, b in weak
        )
        + ". "
    )
    inverted = {r["label"]: r for r in trips}
    weak_trips = [inverted[lb] for lb, _ in weak]
    weak_toys = [
        r for r in toy if r["label"] in {label("reversible", damped, b) for b in args.bases}
    ]
    text += (
        f"Its price is the inversion, whose factor R / lambda is up to {1 / damped:.3g} per "
        "step where the steps are small: the digits inverted with coupling "
        f"{damped} end with a standard deviation of "
        + ", ".join(f"{_n(r['torch.float64']['noise'])} ({r['base']})" for r in weak_trips)
        + " times sigma_max instead of about 1 (the round trip is still exact: largest error "
        f"{_e(max(r['torch.float64']['max'] for r in weak_trips))} in float64)"
    )
    if weak_toys:
        text += (
            ", and the toy round trips with that coupling have relative errors of "
            f"{_spread([r[str(torch.float32)] for r in weak_toys])} in float32 and "
            f"{_spread([r[str(torch.float64)] for r in weak_toys])} in float64"
        )
    edict_toys = [r for r in toy if r["scheme"] == "edict"]
    edict_trips = [r for r in trips if r["scheme"] == "edict"]
    text += (
        f". EDICT's inversion likewise grows errors by up to 1 / p^2 = {1 / p**2:.2f} per step"
        + (
            " (its float32 toy round trips: "
            f"{_spread([r[str(torch.float32)] for r in edict_toys])})"
            if edict_toys
            else ""
        )
        + ", and its inverted digits are not noise-like either (std "
        f"{_range([r['torch.float64']['noise'] for r in edict_trips], '.2f')} of sigma_max). "
    )
    # As well as its base (an FDD no higher) at the two largest budgets, and noise-like
    # inverted states (noise std / sigma within 0.1 of 1).
    both = args.digit_budgets[-2:]
    good = [
        r["label"]
        for r in trips
        if r["scheme"] != "base"
        and abs(r["torch.float64"]["noise"] - 1) <= 0.1
        and all(
            (c := sampled[r["label"]]["cells"][b]) is not None
            and c["fdd"] <= sampled[r["base"]]["cells"][b]["fdd"]
            for b in both
        )
    ]
    when = " and ".join(str(b) for b in both)
    if good:
        text += (
            f"{_names(good)} {'is the only variant' if len(good) == 1 else 'are the variants'} "
            f"here that sample{'s' if len(good) == 1 else ''} the digits at an FDD no higher "
            f"than the base's at {when} NFE and also invert{'s' if len(good) == 1 else ''} them "
            "to noise-like states (noise std / sigma within 0.1 of 1)."
        )
    else:
        text += (
            f"No variant here samples the digits at an FDD no higher than its base's at {when} "
            "NFE and also inverts them to noise-like states (noise std / sigma within 0.1 of 1)."
        )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the page (default docs/benchmarks/reversible.md; needed with --smoke)",
    )
    parser.add_argument("--samples", type=positive_int, default=500)
    parser.add_argument("--count", type=positive_int, default=50, help="held-out digits to invert")
    parser.add_argument("--batch", type=positive_int, default=256, help="toy start states")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check")
    args = parser.parse_args(argv)
    args.out = out_or_default(parser, args, DOCS / "reversible.md")
    args.problems = list(PROBLEMS)
    args.bases = ["euler", "heun", "ddim"]
    args.digit_bases = ["euler", "heun"]
    args.toy_budgets, args.digit_budgets, args.long_steps = TOY_BUDGETS, DIGIT_BUDGETS, LONG_STEPS
    if args.smoke:
        args.problems, args.bases, args.digit_bases = ["mixture"], ["euler"], ["euler"]
        args.toy_budgets, args.digit_budgets, args.long_steps = (10, 20), (10,), (4,)
        args.samples, args.count, args.batch = 50, 4, 16
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    with warnings.catch_warnings():
        # The parasitic component is a column of the tables; the warnings would repeat it.
        warnings.simplefilter("ignore", bdia.ParasiticWarning)
        toy = toy_study(args, log)
        split = digits.load_digits_split()
        net = load_network("digits")
        classifier = load_network("digits-classifier")
        baseline = {
            "held_out": split.held_out_labels.tolist(),
            "fdd": digits.frechet_digit_distance(
                classifier, split.train_images, split.held_out_images
            ),
            "accuracy": float(
                (digits.predict(classifier, split.held_out_images) == split.held_out_labels)
                .double()
                .mean()
            ),
        }
        sampling = digits_sampling(args, net, classifier, split, log)
        long = digits_long(args, net, classifier, split, log)
        trips = digits_round_trips(args, net, split, log)
    text = report(args, toy, sampling, long, trips, baseline, time.perf_counter() - start)
    print(text)
    write_atomic(args.out, text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
