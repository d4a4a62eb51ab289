"""Every solver, plain and under bdia, on the shipped 8x8 digits model.

Sampling: 2000 class-conditional samples (200 per class, the same noise for every solver)
from each registered solver alone and under bdia at gamma 0.5, 0.9, 0.96, 1.0 and obelm, on
EDM's rho = 7 grid from sigma 80 to 0, with as many steps as fit each NFE budget (6, 10, 20,
35, 50; the NFE actually used is what the model counted). Each set is scored by its Frechet
digit distance (FDD) to the 360 held-out digits, in the features of the shipped classifier,
and by the share the classifier assigns to the class it was sampled under. The FDD between
the 1437 training digits and the held-out digits is the yardstick.

Inversion: all held-out digits, taken as the state at sigma 0.002 of a 35-step grid, inverted
to sigma 80 and sampled back under their own labels: the base solver run backward in time
(the usual approximate inversion) against bdia(base, 0.96) and bdia(base, 1.0), each in
float32 and float64 state with the network in float32; for euler and heun also the textbook
update on single-word states. Edit: every held-out digit inverted under its label with
bdia(euler, 0.96) and regenerated under label + 1, by BDIA and by the base solver, scored by
the classifier; a figure of one digit per class regenerated under every label.

Run from the repository root (about an hour on two CPU cores)::

    python benchmarks/digits_study.py            # writes docs/benchmarks/digits.md and PNGs
    python benchmarks/digits_study.py --smoke --out /tmp/digits.md   # a seconds-long check

Finished measurements are kept in a JSON file beside the report (``--cache``), so a run that
is stopped resumes where it was; every file is written through a temporary file and a rename.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from _args import out_or_default, positive_int  # the benchmarks folder is the script's path

import bdia
from bdia import generate
from bdia._files import write_atomic
from bdia.models import digits
from bdia.models.checkpoints import load_network

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
BUDGETS = (6, 10, 20, 35, 50)
GAMMAS: tuple[float | str, ...] = (0.5, 0.9, 0.96, 1.0, "obelm")
INVERSION_GAMMAS: tuple[float, ...] = (0.96, 1.0)
INVERSION_STEPS = 35
SAMPLES = 2000
NOISE_SEED = 2024


def variant_label(base: str, gamma: float | str | None) -> str:
    return base if gamma is None else f"bdia({base}, {gamma})"


def make_solver(base: str, gamma: float | str | None):
    solver = bdia.get_solver(base)
    return solver if gamma is None else bdia.bdia(solver, gamma)


def nfe_of(solver, steps: int) -> int:
    """Model evaluations of ``steps`` steps on the Karras grid ending at 0, as counted."""
    ode = bdia.DiffusionODE(lambda x, sigma: torch.zeros_like(x), bdia.EDM())
    with warnings.catch_warnings():
        # Only the count matters; the stand-in model's states are not worth a warning.
        warnings.simplefilter("ignore", bdia.ParasiticWarning)
        bdia.sample(ode, solver, torch.ones(1, 1), bdia.karras_grid(steps), progress=False)
    return ode.nfe


def steps_for(solver, budget: int) -> tuple[int, int] | None:
    """(steps, NFE) of the most steps whose NFE fits ``budget``; None if one step does not."""
    best = None
    for steps in range(1, budget + 1):
        nfe = nfe_of(solver, steps)
        if nfe > budget:
            break
        best = (steps, nfe)
    return best


class Cache:
    """Measurements by key, saved atomically after every addition."""

    def __init__(self, path: Path | None, fingerprint: dict) -> None:
        self.path, self.data = path, {"fingerprint": fingerprint, "results": {}}
        if path is not None and path.exists():
            old = json.loads(path.read_text())
            if old.get("fingerprint") == fingerprint:
                self.data = old

    def get(self, key: str):
        return self.data["results"].get(key)

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        if self.path is not None:
            write_atomic(self.path, json.dumps(self.data, indent=1))


def sampling_study(args, net, classifier, split, cache: Cache, log) -> list[dict]:
    gen = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.randn(args.samples, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = [i % 10 for i in range(args.samples)]
    target = torch.tensor(labels)
    rows = []
    for base in args.solvers:
        for gamma in (None, *args.gammas):
            solver = make_solver(base, gamma)
            row = {"base": base, "gamma": gamma, "label": variant_label(base, gamma), "cells": {}}
            for budget in args.budgets:
                key = f"sample|{row['label']}|{budget}"
                cell = cache.get(key)
                if cell is None:
                    fit = steps_for(solver, budget)
                    if fit is None:
                        cell = {"steps": 0, "nfe": 0, "fdd": math.nan, "accuracy": math.nan}
                    else:
                        start = time.perf_counter()
                        ts = bdia.karras_grid(fit[0])
                        images = generate.sample_images(
                            net, solver, ts, noise, labels, state_dtype=torch.float64
                        ).float()
                        fdd = digits.frechet_digit_distance(
                            classifier, images, split.held_out_images
                        )
                        correct = digits.predict(classifier, images) == target
                        cell = {
                            "steps": fit[0],
                            "nfe": fit[1],
                            "fdd": fdd,
                            "accuracy": float(correct.double().mean()),
                            "seconds": time.perf_counter() - start,
                        }
                    cache.put(key, cell)
                    log(
                        f"{row['label']:>26} NFE {budget:3d}: steps {cell['steps']:3d} "
                        f"NFE {cell['nfe']:3d} FDD {cell['fdd']:8.3f} acc {cell['accuracy']:.4f}"
                    )
                row["cells"][budget] = cell
            rows.append(row)
    return rows


def inversion_study(args, net, split, cache: Cache, log) -> list[dict]:
    images = split.held_out_images[: args.inversion_count]
    labels = split.held_out_labels[: args.inversion_count].tolist()
    ts = bdia.karras_grid(INVERSION_STEPS, final_zero=False)
    rows = []
    for base in args.solvers:
        for gamma in (None, *INVERSION_GAMMAS):
            label = variant_label(base, gamma) if gamma is not None else f"{base} backward"
            row = {"label": label, "base": base, "gamma": gamma}
            for dtype in (torch.float32, torch.float64):
                key = f"invert|{label}|{dtype}"
                cell = cache.get(key)
                if cell is None:
                    solver = make_solver(base, gamma)
                    # The amplification warning's content is a column of the table.
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        _, back = generate.reconstruct(
                            net, solver, ts, images, labels, state_dtype=dtype
                        )
                    error = (back.double() - images.double()).flatten(1)
                    cell = {
                        "max": float(error.abs().max()),
                        "rms": float(error.square().mean().sqrt()),
                    }
                    cache.put(key, cell)
                    log(
                        f"{label:>26} {str(dtype):>13}: max {cell['max']:.3e} rms {cell['rms']:.3e}"
                    )
                row[str(dtype)] = cell
            if gamma is not None:
                ode = bdia.DiffusionODE(lambda x, sigma: x, bdia.EDM())
                row["amplification"] = make_solver(base, gamma).amplification(
                    ode, [float(t) for t in ts]
                )
            rows.append(row)
    for base in args.single_word_bases:
        label = f"bdia({base}, 0.96), single words"
        row = {"label": label, "base": base, "gamma": 0.96}
        for dtype in (torch.float32, torch.float64):
            key = f"invert|{label}|{dtype}"
            cell = cache.get(key)
            if cell is None:
                back = single_word_round_trip(net, base, 0.96, ts, images, labels, dtype)
                error = (back.double() - images.double()).flatten(1)
                cell = {
                    "max": float(error.abs().max()),
                    "rms": float(error.square().mean().sqrt()),
                }
                cache.put(key, cell)
                log(f"{label:>26} {str(dtype):>13}: max {cell['max']:.3e} rms {cell['rms']:.3e}")
            row[str(dtype)] = cell
        rows.append(row)
    return rows


@torch.no_grad()
def single_word_round_trip(net, base, gamma, ts, images, labels, dtype):
    """The textbook BDIA update and its inverse on plain states, without the low words:
    x_{k+1} = gamma (x_{k-1} - Phi(x_k; t_k -> t_{k-1})) + Phi(x_k; t_k -> t_{k+1})."""
    solver = bdia.bdia(bdia.get_solver(base), gamma)
    phi = solver.solver.flow
    ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": torch.eye(10)[labels]})
    grid = [float(t) for t in ts]
    gammas = solver.gammas(ode, grid)
    n = len(grid) - 1

    def both(k, x):
        first = ode.evaluate(grid[k], x)
        return phi(ode, grid[k], grid[k + 1], x, first), phi(ode, grid[k], grid[k - 1], x, first)

    x_next = images.to(dtype)
    x = phi(ode, grid[n], grid[n - 1], x_next)
    for k in range(n - 1, 0, -1):
        forward, backward = both(k, x)
        x, x_next = (x_next - forward) / gammas[k - 1] + backward, x
    for k in range(1, n):
        forward, backward = both(k, x_next)
        x, x_next = x_next, gammas[k - 1] * (x - backward) + forward
    return x_next


def edit_example(net, classifier, split, path: Path) -> dict:
    """Edits: held-out digits inverted under their label with bdia(euler, 0.96), regenerated
    under another label. Returns the classifier's accuracy on the new labels for all held-out
    digits (label + 1 mod 10), regenerated by BDIA itself and by the base solver; writes a
    figure of one digit per class edited into every class by the base solver."""
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    ts = bdia.karras_grid(INVERSION_STEPS, final_zero=False)
    images, labels = split.held_out_images, split.held_out_labels
    targets = ((labels + 1) % 10).tolist()
    accuracy = {}
    for name, edit_solver in (("bdia(euler, 0.96)", None), ("euler", solver.solver)):
        _, edited = generate.reconstruct(
            net,
            solver,
            ts,
            images,
            labels.tolist(),
            target_labels=targets,
            edit_solver=edit_solver,
        )
        hits = digits.predict(classifier, edited.float()) == torch.tensor(targets)
        accuracy[name] = float(hits.double().mean())

    picks = [int((labels == c).nonzero()[0]) for c in range(10)]
    sources = images[picks]
    _, exact = generate.reconstruct(net, solver, ts, sources, list(range(10)))
    tiles = [generate.to_uint8(sources), generate.to_uint8(exact.float())]
    for target in range(10):
        _, edited = generate.reconstruct(
            net,
            solver,
            ts,
            sources,
            list(range(10)),
            target_labels=[target] * 10,
            edit_solver=solver.solver,
        )
        tiles.append(generate.to_uint8(edited.float()))
    # Rows: the ten source digits; columns: the input, its exact reconstruction, then 0 .. 9.
    grid = np.stack(tiles, axis=1).reshape(-1, 8, 8)
    canvas = generate.grid_image(grid, 12, captions=["in", "rec"] + [str(c) for c in range(10)])
    generate.write_grid(path, canvas)
    return accuracy


def samples_figure(net, path: Path) -> None:
    """Eight samples per class from heun at 35 NFE (18 steps), seeds 0..79."""
    seeds = list(range(80))
    noise, labels = generate.seed_inputs(seeds, (1, 8, 8), 10, [s % 10 for s in seeds])
    images = generate.sample_images(
        net, bdia.get_solver("heun"), bdia.karras_grid(18), noise, labels
    )
    canvas = generate.grid_image(
        generate.to_uint8(images.float()), 10, captions=[str(c) for c in range(10)]
    )
    generate.write_grid(path, canvas)


def plot(rows: list[dict], budgets, path: Path, metric: str, ylabel: str, yline=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(r["base"] for r in rows))
    cols = 4
    fig, axes = plt.subplots(
        math.ceil(len(bases) / cols),
        cols,
        figsize=(4 * cols, 3.2 * math.ceil(len(bases) / cols)),
        squeeze=False,
        sharey=True,
    )
    for ax, base in zip(axes.flat, bases):
        for r in (r for r in rows if r["base"] == base):
            pts = [
                (c["nfe"], c[metric])
                for c in (r["cells"][b] for b in budgets)
                if c["nfe"] and math.isfinite(c[metric])
            ]
            if pts:
                style = "k-o" if r["gamma"] is None else "-."
                ax.plot(
                    *zip(*pts),
                    style,
                    ms=3,
                    label="plain" if r["gamma"] is None else f"γ={r['gamma']}",
                )
        if yline is not None:
            ax.axhline(yline, color="grey", lw=0.8, ls=":")
        ax.set_title(base, fontsize=10)
        ax.set_xscale("log")
        if metric == "fdd":
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(bases) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _fmt(value: float, digits_: int = 3) -> str:
    return "—" if not math.isfinite(value) else f"{value:.{digits_}g}"


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def report(args, rows, inversion, baseline, edits, seconds, figures: dict[str, str]) -> str:
    budgets = args.budgets
    lines = [
        "# Digits: solvers and bdia on a trained 8x8 model",
        "",
        f"Written by `python benchmarks/{Path(__file__).name}"
        + (" " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "")
        + f"` on {datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()} CPU, "
        f"torch {torch.__version__}, {_threads(torch.get_num_threads())}, {seconds / 60:.1f} min.",
        "",
        f'Model: the shipped `load_network("digits")`; {args.samples} class-conditional samples '
        f"({args.samples // 10} per class, the same noise for every solver), float64 state, "
        "float32 network, EDM's rho = 7 grid from sigma 80 to 0. FDD is the Frechet distance "
        f"to the {len(baseline['held_out'])} held-out digits in the shipped classifier's 64 "
        "features; accuracy is the share of samples that the classifier assigns to the class "
        "they were sampled under.",
        "",
        f"Yardsticks: FDD(training digits, held-out digits) = **{baseline['fdd']:.3f}**; "
        f"classifier accuracy on the held-out digits = **{baseline['accuracy']:.4f}**.",
        "",
        "Each cell is `FDD / accuracy % (NFE used)`, the NFE being the most that fits the "
        "budget heading the column (— where even one step does not fit).",
        "",
        "| solver | " + " | ".join(f"NFE ≤ {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for r in rows:
        cells = []
        for b in budgets:
            c = r["cells"][b]
            cells.append(
                "—"
                if not c["nfe"]
                else f"{_fmt(c['fdd'])} / {100 * c['accuracy']:.1f} ({c['nfe']})"
            )
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![{k}]({v})" for k, v in figures.items() if k.startswith("plot")), ""]
    lines += [
        "## Inversion of the held-out digits",
        "",
        f"{args.inversion_count} held-out digits, each taken as the state at sigma 0.002 of a "
        f"{INVERSION_STEPS}-step rho = 7 grid to sigma 80, inverted under its label and sampled "
        "back. Error is in pixel units of [-1, 1] (one grey level of 16 is 0.125). The backward "
        "base solver is the usual approximate inversion; bdia inverts exactly up to rounding "
        "after one approximate base step that forms the pair at the data end; it carries each "
        "state as two words (state + low word, see the theory page). The `single words` rows "
        "run the textbook update on plain states, for comparison. Amplification is "
        "prod 1/gamma_k over the grid.",
        "",
        "| inversion | amplification | max abs, float32 state | max abs, float64 state "
        "| rms, float32 | rms, float64 |",
        "|---|---|---|---|---|---|",
    ]
    for r in inversion:
        f32, f64 = r["torch.float32"], r["torch.float64"]
        amp = _fmt(r["amplification"]) if "amplification" in r else "—"
        lines.append(
            f"| {r['label']} | {amp} | {f32['max']:.2e} | {f64['max']:.2e} | "
            f"{f32['rms']:.2e} | {f64['rms']:.2e} |"
        )
    lines += [
        "",
        "## Samples and an edit",
        "",
        "heun, 35 NFE, eight samples of each class (columns):",
        "",
        f"![samples]({figures['samples']})",
        "",
        "Edit: each held-out digit inverted under its own label with bdia(euler, 0.96) over "
        f"{INVERSION_STEPS} steps, then regenerated from the inverted pair under label + 1 "
        "(mod 10); the share the classifier assigns to the new label:",
        "",
        "| regenerated by | accuracy on the new label |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in edits.items()),
        "",
        "BDIA regenerating under another label keeps the pair's parasitic mode, which only the "
        "original conditioning cancels; it grows toward the data and leaves noise. The base "
        "solver continuing from the pair's later state gives clean edits. Below: one held-out "
        "digit per class (rows): input, exact bdia reconstruction, and the base solver's "
        "regeneration under each label 0-9:",
        "",
        f"![edit]({figures['edit']})",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the page, its figures beside it (default docs/benchmarks/digits.md; needed "
        "with --smoke)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="default: beside --out")
    parser.add_argument("--samples", type=positive_int, default=SAMPLES)
    parser.add_argument(
        "--inversion-count", type=positive_int, default=None, help="default: all 360"
    )
    # One thread, as `bdia` uses for networks of at most 16x16 pixels: an 8x8 batch gains
    # nothing from a second, and loses several times over on cores that other work shares.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="2 solvers, 100 samples, 16 digits")
    args = parser.parse_args(argv)
    args.out = out_or_default(parser, args, DOCS / "digits.md")
    args.solvers = bdia.available_solvers()
    args.gammas, args.budgets = GAMMAS, BUDGETS
    args.single_word_bases = ["euler", "heun"]
    if args.smoke:
        args.solvers, args.gammas, args.budgets = ["euler", "heun"], (0.96,), (6, 10)
        args.samples, args.inversion_count = 100, 16
    torch.set_num_threads(args.threads)
    split = digits.load_digits_split()
    args.inversion_count = args.inversion_count or len(split.held_out_labels)
    net = load_network("digits")
    classifier = load_network("digits-classifier")
    cache_path = args.cache or args.out.with_name(f".{args.out.stem}-cache.json")
    weights = sum(float(p.double().sum()) for p in net.parameters())
    cache = Cache(
        cache_path,
        {
            "samples": args.samples,
            "noise_seed": NOISE_SEED,
            "weights": weights,
            "inversion_count": args.inversion_count,
            "torch": torch.__version__,
        },
    )
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f} s] {text}", flush=True)

    baseline = {
        "held_out": split.held_out_labels,
        "fdd": digits.frechet_digit_distance(classifier, split.train_images, split.held_out_images),
        "accuracy": float(
            (digits.predict(classifier, split.held_out_images) == split.held_out_labels)
            .double()
            .mean()
        ),
    }
    log(f"FDD(train, held out) {baseline['fdd']:.4f}; accuracy {baseline['accuracy']:.4f}")
    rows = sampling_study(args, net, classifier, split, cache, log)
    inversion = inversion_study(args, net, split, cache, log)

    stem = args.out.stem
    figures = {
        "plot-fdd": f"{stem}_fdd.png",
        "plot-accuracy": f"{stem}_accuracy.png",
        "samples": f"{stem}_samples.png",
        "edit": f"{stem}_edit.png",
    }
    folder = args.out.parent
    folder.mkdir(parents=True, exist_ok=True)
    plot(rows, args.budgets, folder / figures["plot-fdd"], "fdd", "FDD", baseline["fdd"])
    plot(rows, args.budgets, folder / figures["plot-accuracy"], "accuracy", "accuracy")
    samples_figure(net, folder / figures["samples"])
    edits = edit_example(net, classifier, split, folder / figures["edit"])
    log(f"edit accuracy {edits}")
    text = report(args, rows, inversion, baseline, edits, time.perf_counter() - start, figures)
    print(text)
    write_atomic(args.out, text)
    log(f"wrote {args.out} and {', '.join(figures.values())}")


if __name__ == "__main__":
    main()
