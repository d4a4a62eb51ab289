"""Three exactly invertible schemes side by side: BDIA, EDICT and McCallum-Foster.

For each base solver (euler, heun, ddim) it runs the base alone, ``bdia(base, 0.96)``,
``edict(base)`` (p = 0.93) and ``reversible(base)`` (coupling 0.999):

- on the toy problems of ``bdia compare`` (``bdia.compare.PROBLEMS``, their reference
  solutions and start states): the error at equal budgets of model evaluations, the measured
  order, the largest parasitic component, and the round trip noise -> data -> noise in a
  float32 and a float64 state with a float32 network;
- on the shipped digits model: FDD and classifier accuracy of class-conditional samples at
  10, 20 and 35 NFE (``bdia.models.digits.frechet_digit_distance`` and ``predict``, as in
  ``benchmarks/digits_study.py``), and the round trip of held-out digits data -> noise -> data
  in both state dtypes.

Run from the repository root (about five minutes on one busy CPU core)::

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
from bdia.compare import PROBLEMS, steps_for_budget
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
DIGIT_BUDGETS = (10, 20, 35)


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


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of -log(error) against log(NFE) over the points given."""
    pts = [(math.log(n), math.log(e)) for n, e in points if 0 < e < math.inf]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return -sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else math.nan


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
                    "per_step": per_step(solver),
                }
                row["errors"], row["nfe"], row["parasitic"] = {}, {}, {}
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
                    except FloatingPointError:
                        row["errors"][budget] = math.inf
                    row["nfe"][budget] = ode.nfe
                    row["parasitic"][budget] = worst.value
                    largest = ts
                row["order"] = slope(
                    [(row["nfe"][b], row["errors"][b]) for b in list(row["errors"])[-3:]]
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
                    + f" order {row['order']:.2f}"
                )
                rows.append(row)
    return rows


# ------------------------------------------------------------------------ digits model
def digits_sampling(args, net, classifier, split, log) -> list[dict]:
    gen = torch.Generator().manual_seed(digits_study.NOISE_SEED)
    noise = torch.randn(args.samples, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = [i % 10 for i in range(args.samples)]
    target = torch.tensor(labels)
    rows = []
    for base in args.digit_bases:
        for scheme, parameter in SCHEMES:
            solver = make(scheme, parameter, base)
            row = {"label": label(scheme, parameter, base), "cells": {}}
            for budget in args.digit_budgets:
                steps = steps_for_budget(solver, budget)
                if steps < min_steps(solver):
                    row["cells"][budget] = None
                    continue
                ts = bdia.karras_grid(steps, final_zero=False)
                counter = bdia.DiffusionODE(lambda x, sigma: torch.zeros_like(x), bdia.EDM())
                bdia.sample(counter, solver, torch.ones(1, 1), ts, progress=False)
                start = time.perf_counter()
                images = generate.sample_images(
                    net, solver, ts, noise, labels, state_dtype=torch.float64
                ).float()
                fdd = digits.frechet_digit_distance(classifier, images, split.held_out_images)
                correct = digits.predict(classifier, images) == target
                cell = {
                    "steps": steps,
                    "nfe": counter.nfe,
                    "fdd": fdd,
                    "accuracy": float(correct.double().mean()),
                    "overshoot": float(images.abs().max()),
                }
                row["cells"][budget] = cell
                log(
                    f"{row['label']:>26} NFE {budget:3d}: steps {steps:3d} NFE {cell['nfe']:3d} "
                    f"FDD {fdd:8.3f} acc {cell['accuracy']:.4f} "
                    f"({time.perf_counter() - start:.1f} s)"
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
                "label": f"{base} backward" if scheme == "base" else label(scheme, parameter, base)
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


def report(args, toy, sampling, trips, baseline, seconds: float) -> str:
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
        "largest budgets. Parasitic: the largest `parasitic` component (rms of the "
        "non-physical part relative to the state: x_{k-1} - Phi(x_k) for bdia, the difference "
        "of the chains for edict and reversible) at the smallest and the largest budget run; "
        "above 1 the drivers warn. Round trip: noise -> data -> noise through the final pair "
        "at the largest budget, with a float32 network, relative to the start.",
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
            + " | order | parasitic | round trip float32 | round trip float64 |",
            "|---|" + "---|" * (len(budgets) + 4),
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
                + f" | {_g(r['order'])} | {par} | {_e(r['torch.float32'])} | "
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
        "[the digits study](digits.md), whose 2000 samples give somewhat lower FDDs). "
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
            cells.append(
                "—"
                if c is None
                else f"{c['fdd']:.3g} / {100 * c['accuracy']:.1f} ({c['steps']}, {c['nfe']}) "
                f"{c['overshoot']:.1f}"
            )
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
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
    lines += ["", *notes(), ""]
    return "\n".join(lines)


def split_labels(baseline: dict) -> list:
    return list(baseline["held_out"])


def notes() -> list[str]:
    return [
        "## Reading the tables",
        "",
        "- All three reversible schemes invert exactly up to the rounding of their two-word "
        "states, times the growth of errors along the run. Where a float64 round trip is "
        "about 1e-16 rather than 0, a chain value that lies within u^2 of a rounding midpoint "
        "was split into neighbouring high words by the two passes, and the model saw inputs "
        "one ulp apart; in float32 that one-ulp change (6e-8) is what the round trip carries.",
        "- The order column is a slope, not a verdict: where the errors are still falling out "
        "of an unstable regime (EDICT and McCallum-Foster on the EDM mixture) it is steeper "
        "than any order, and where a few of the 256 mixture samples end in another mode it is "
        "flatter. Measured in the asymptotic range (tests/test_coupled.py), EDICT is first "
        "order for every base and McCallum-Foster has the base's order.",
        "- Stability. On a linear mode that the exact flow multiplies by R per step, one step "
        "of EDICT has determinant p^2 and one of McCallum-Foster lambda, so their parasitic "
        "mode (the chains' difference) is multiplied by about p^2 / R and lambda / R when "
        "sampling, and by R / p^2 and R / lambda when inverting. Toward the data of a "
        "diffusion ODE, R is about sigma_{k+1} / sigma_k off the data (0.3 to 0.6 on these "
        "Karras grids): with p = 0.93 and lambda = 0.999 the mode grows while sampling and "
        "swamps the digits' samples of EDICT and of reversible(euler, 0.999) at every budget "
        "here (FDD about 30 to 40, a max |x| far beyond 1); reversible(heun, 0.999) recovers "
        "to FDD 2.9 at 32 NFE (heun: 0.80). lambda = 0.5 damps it: reversible(euler, 0.5) "
        "samples the digits at FDD "
        "1.06 and 98.8% in 34 NFE (euler: 0.92 and 99.8%), though reversible(heun, 0.5) "
        "still does not. Its price is the inversion, whose factor R / lambda is up to 2 per "
        "step where the steps are small: the digits inverted with coupling 0.5 end with a "
        "standard deviation of 9 (heun) and over 1000 (euler) times sigma_max instead of at "
        "noise (the round trip is still exact), and the toy round trips fail in float32 and "
        "lose digits in float64. EDICT's inversion likewise "
        "grows errors by up to 1 / p^2 = 1.16 per step (the float32 round trips at the larger "
        "toy budgets), and its inverted digits are not noise-like either (std 0.55 to 0.6 of "
        "sigma_max). bdia(euler, 0.96) is the only variant here that samples the digits as "
        "well as its base at 20 and 35 NFE and also inverts them to noise-like states.",
        "- EDICT's own error is large at large steps: its chain y takes the increment over "
        "[t_k, t_{k+1}] from a point already at t_{k+1}. With many steps it converges (on the "
        "digits, 100 steps of edict(euler, 0.93) gave FDD 1.37 and 98% accuracy on 200 "
        "samples, 250 steps 1.21 and 99.5%, against euler's 1.26 and 100%).",
    ]


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
    args.toy_budgets, args.digit_budgets = TOY_BUDGETS, DIGIT_BUDGETS
    if args.smoke:
        args.problems, args.bases, args.digit_bases = ["mixture"], ["euler"], ["euler"]
        args.toy_budgets, args.digit_budgets = (10, 20), (10,)
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
        trips = digits_round_trips(args, net, split, log)
    text = report(args, toy, sampling, trips, baseline, time.perf_counter() - start)
    print(text)
    write_atomic(args.out, text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
