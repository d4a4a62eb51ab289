"""``bdia solvers`` (the registry as a table) and ``bdia compare`` (every solver and its bdia
variants at equal NFE on a toy problem with an exact solution)."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any

import click
import torch

from .. import compare as cmp
from .._files import write_atomic
from ..solvers import available_solvers, bdia, get_solver
from . import _ranks
from ._common import (
    MAX_STEPS,
    STATE_DTYPE,
    GammaType,
    OutputPathType,
    _base_solver,
    _overwrite_option,
    _Progress,
    _progress_option,
    _refuse_existing_file,
    _set_threads,
    _threads_option,
    _warning_line,
    dtype_name,
    log,
)


@click.command()
def solvers() -> None:
    """List every registered solver with its order and cost per step."""
    if not _ranks.rank_zero_alone():
        return
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


@click.command(name="compare")
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
    help="Comma-separated base solvers (`bdia solvers` lists them).",
)
@click.option(
    "--gammas",
    default="1.0,0.96,0.5,obelm",
    show_default=True,
    help="Comma-separated bdia gammas (numbers in (0, 1] or 'obelm'); empty for none.",
)
@click.option(
    "--budgets",
    default="10,20,50,100",
    show_default=True,
    help=f"Comma-separated NFE budgets (at most {MAX_STEPS:,} each).",
)
@click.option(
    "--dtype",
    type=STATE_DTYPE,
    default="float64",
    show_default=True,
    help="State and network dtype for the error columns.",
)
@click.option(
    "--batch",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Start states integrated at once.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    # The seeds of `bdia sample`'s range, all of which torch's generators take.
    type=click.IntRange(0, 2**63 - 1),
    help="Seed of the start states.",
)
@click.option(
    "--out",
    type=OutputPathType(suffix=".md"),
    default=None,
    help="Write the report to this .md file and its plot beside it (same name, .png); "
    "without it the table goes to stdout only and nothing is written.",
)
@click.option("--no-plot", is_flag=True, help="With --out, write no plot.")
@_overwrite_option("Replace the report and plot of --out if they exist.")
@_threads_option("1, the toy tensors are too small to gain from more")
@_progress_option
def compare_command(
    problem: str,
    solver_list: str,
    gammas: str,
    budgets: str,
    dtype: torch.dtype,
    batch: int,
    seed: int,
    out: Path | None,
    no_plot: bool,
    overwrite: bool,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Compare every solver and its bdia variants at equal NFE budgets on a toy problem.

    Prints the markdown table on stdout; writes files only with --out.
    """
    bases = _split(solver_list)
    for name in bases:
        _base_solver(name, "--solvers")
    try:
        budget_values = [int(b) for b in _split(budgets)]
    except ValueError:
        raise click.BadParameter(
            f"{budgets!r} is not a comma-separated list of integers", param_hint="'--budgets'"
        ) from None
    if not budget_values or min(budget_values) < 1:
        raise click.BadParameter("give at least one positive budget", param_hint="'--budgets'")
    if max(budget_values) > MAX_STEPS:
        # A typo such as 10000000000 would run for days while its memory grows (3 GB in
        # the first 20 s), not end with an error.
        raise click.BadParameter(
            f"{max(budget_values):,} NFE is beyond the {MAX_STEPS:,} a run takes (as "
            "`bdia sample --steps`); give smaller budgets",
            param_hint="'--budgets'",
        )
    # Each gamma as --gamma of `bdia invert` takes it: the round-trip columns invert them.
    try:
        gamma_values = [GammaType(invertible=True).convert(g, None, None) for g in _split(gammas)]
    except click.BadParameter as err:
        raise click.BadParameter(err.message, param_hint="'--gammas'") from None
    chosen = cmp.PROBLEMS[problem]
    try:
        cmp.check_selection(chosen, bases, gamma_values, budget_values)
    except cmp.EmptySelection as err:
        hint = {"bases": "'--solvers'", "budgets": "'--budgets'"}[err.argument]
        raise click.BadParameter(str(err), param_hint=hint) from None
    plot = None if out is None or no_plot else out.with_suffix(".png")
    if plot is not None and plot.is_dir():
        raise click.BadParameter(
            f"its plot would go to {str(plot)!r}, which is a folder; give another --out, or "
            "--no-plot",
            param_hint="'--out'",
        )
    _refuse_existing_file(out, "--out", overwrite)
    if plot is not None and plot.exists() and not overwrite:
        raise click.ClickException(
            f"the plot of --out, {str(plot)!r}, exists: use --overwrite to replace it, "
            "--no-plot, or another --out"
        )

    # The report names the command that reproduces it: the options given, in declaration order.
    ctx = click.get_current_context()
    words = ["bdia", "compare"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        if param.name == "overwrite":  # says nothing about the report
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Option) and param.is_flag:
            words += [param.opts[0]] if value else []
        elif isinstance(value, torch.dtype):
            words += [param.opts[0], dtype_name(value)]
        else:
            words += [param.opts[0], str(value)]
    command = " ".join(shlex.quote(w) for w in words)
    if not _ranks.rank_zero_alone():
        return

    from ..sampling import ParasiticWarning

    _set_threads(threads or 1)
    total = len(cmp.variants(bases, gamma_values))
    # bdia's instability warnings come once per run of a variant, with the library's advice;
    # here they become one line naming the variants.
    running: list[cmp.Variant] = []
    unstable: dict[str, list[str]] = {}  # base -> its gammas that warned

    def on_variant(variant: cmp.Variant) -> None:
        running[:] = [variant]
        bar.update(1)

    def show(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
        if not issubclass(category, ParasiticWarning) or not running:
            _warning_line(message, category)
            return
        gammas = unstable.setdefault(running[0].base, [])
        if str(running[0].gamma) not in gammas:
            gammas.append(str(running[0].gamma))

    with warnings.catch_warnings(), _Progress(total, "compare", "variants", not no_progress) as bar:
        warnings.simplefilter("always", ParasiticWarning)
        warnings.showwarning = show
        results = cmp.run_comparison(
            chosen,
            bases,
            gammas=gamma_values,
            budgets=budget_values,
            batch=batch,
            dtype=dtype,
            seed=seed,
            on_variant=on_variant,
        )
    if unstable:
        lists = {", ".join(g) for g in unstable.values()}
        if len(lists) == 1:
            where = f"{', '.join(unstable)} under gamma {lists.pop()}"
        else:
            where = "; ".join(f"{b} under gamma {', '.join(g)}" for b, g in unstable.items())
        click.echo(
            f"Warning: bdia's parasitic mode outgrew the state at some budgets for {where}: "
            "there the errors measure that instability, not the ODE's solution (larger "
            "budgets or another gamma damp it)",
            err=True,
        )
    if plot is not None:
        try:
            cmp.plot_errors(chosen, results, plot)
            click.echo(f"wrote {plot}", err=True)
        except ImportError:
            log.warning("matplotlib is not installed: no plot (pip install 'bdia[plot]')")
            plot = None
    # The plot lies beside the report, so the link is its bare name.
    report = cmp.markdown_report(
        chosen,
        results,
        budget_values,
        dtype,
        command,
        plot=plot.name if plot is not None else None,
    )
    click.echo(report, nl=False)
    if out is not None:
        write_atomic(out, report)
        click.echo(f"wrote {out}", err=True)
