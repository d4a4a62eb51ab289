"""The ``bdia`` command: list solvers and compare them on the built-in toy problems."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time

import click
import torch

from . import compare as cmp
from .solvers import available_solvers, bdia, get_solver

log = logging.getLogger("bdia")

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Single-step ODE solvers for diffusion sampling and their exactly invertible BDIA form."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@main.command()
def solvers() -> None:
    """List every registered solver with its order and cost per step."""
    rows = [("name", "order", "NFE/step", "NFE/step under bdia", "needs DiffusionODE")]
    for name in available_solvers():
        s = get_solver(name)
        w = bdia(s, 0.5)
        cost = str(w.nfe_per_step) if s.stages == 1 else f"{s.stages} first, then {w.nfe_per_step}"
        rows.append((name, str(s.order), str(s.stages), cost, "yes" if s.needs_diffusion else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_gamma(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


@main.command(name="compare")
@click.option(
    "--problem",
    type=click.Choice(sorted(cmp.PROBLEMS)),
    default="mixture",
    show_default=True,
    help="Toy problem to integrate.",
)
@click.option(
    "--solvers",
    "solver_list",
    default=",".join(available_solvers()),
    show_default="all registered",
    help="Comma-separated base solvers.",
)
@click.option(
    "--gammas",
    default="1.0,0.96,0.5,obelm",
    show_default=True,
    help="Comma-separated bdia gammas (numbers or 'obelm'); empty for none.",
)
@click.option(
    "--budgets", default="10,20,50,100", show_default=True, help="Comma-separated NFE budgets."
)
@click.option(
    "--dtype",
    type=click.Choice(sorted(DTYPES)),
    default="float64",
    show_default=True,
    help="State and network dtype for the error columns.",
)
@click.option("--batch", default=256, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--out",
    default="docs/benchmarks/toy.md",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Markdown report to write.",
)
@click.option(
    "--plot",
    default="docs/benchmarks/toy.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="PNG plot to write ('' for none).",
)
def compare_command(
    problem: str,
    solver_list: str,
    gammas: str,
    budgets: str,
    dtype: str,
    batch: int,
    seed: int,
    out: str,
    plot: str,
) -> None:
    """Compare every solver and its bdia variants at equal NFE budgets on a toy problem."""
    bases = _split(solver_list)
    for name in bases:
        try:
            get_solver(name)
        except KeyError as err:
            raise click.BadParameter(str(err.args[0]), param_hint="--solvers") from None
    try:
        budget_values = [int(b) for b in _split(budgets)]
    except ValueError:
        raise click.BadParameter(
            f"{budgets!r} is not a comma-separated list of integers", param_hint="--budgets"
        ) from None
    if not budget_values or min(budget_values) < 1:
        raise click.BadParameter("give at least one positive budget", param_hint="--budgets")
    gamma_values = [_parse_gamma(g) for g in _split(gammas)]
    for g in gamma_values:
        try:
            bdia("euler", g)
        except (TypeError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint="--gammas") from None

    chosen = cmp.PROBLEMS[problem]
    start = time.perf_counter()
    with click.progressbar(
        length=len(cmp.variants(bases, gamma_values)), label="comparing", file=sys.stderr
    ) as bar:
        results = cmp.run_comparison(
            chosen,
            bases,
            gammas=gamma_values,
            budgets=budget_values,
            batch=batch,
            dtype=DTYPES[dtype],
            seed=seed,
            on_variant=lambda v: bar.update(1),
        )
    elapsed = time.perf_counter() - start
    command = "bdia " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    plot_link = (
        os.path.relpath(plot, os.path.dirname(os.path.abspath(out))) if plot and out else None
    )
    report = cmp.markdown_report(
        chosen, results, budget_values, DTYPES[dtype], command, plot=plot_link
    )
    click.echo(report)
    click.echo(f"{len(results)} variants in {elapsed:.1f} s", err=True)
    if out:
        cmp.write_atomic(out, report)
        click.echo(f"wrote {out}", err=True)
    if plot:
        try:
            cmp.plot_errors(chosen, results, plot)
            click.echo(f"wrote {plot}", err=True)
        except ImportError:
            log.warning("matplotlib is not installed: no plot (pip install 'bdia[plot]')")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("target", type=click.Path(dir_okay=False))
def convert(source: str, target: str) -> None:
    """Convert an EDM network pickle to a bdia safetensors file (no code from SOURCE runs)."""
    from .models.checkpoints import load_network, save_network

    if not target.endswith(".safetensors"):
        raise click.BadParameter("the target must end in .safetensors", param_hint="TARGET")
    try:
        net = load_network(source)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    save_network(net, target)
    count = sum(p.numel() for p in net.parameters())
    click.echo(f"wrote {target}: {net.config['class_name']}, {count:,} parameters")


if __name__ == "__main__":  # pragma: no cover
    main()
