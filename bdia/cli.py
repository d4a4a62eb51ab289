"""The ``bdia`` command line: solvers, compare, sample, invert, fid, fid-ref, convert and edit.

Every user mistake ends the command with one line on stderr that names the option at fault
and says what to do, before any heavy work and before anything is written; ``bdia --debug``
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import torch
from tqdm.auto import tqdm

from . import __version__
from . import compare as cmp
from ._files import write_atomic, write_png
from .ode import DTYPE_NAMES
from .solvers import Solver, available_solvers, bdia, get_solver

log = logging.getLogger("bdia")

# --------------------------------------------------------------------- errors in one line


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _warning_line(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
    """Show a warning as one line on stderr (no source line, no file position)."""
    click.echo(f"Warning: {_one_line(str(message))}", err=True)


class _Command(click.Group):
    """A click group whose failures print one line on stderr (the traceback with --debug)."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        # Only the group's own options, before the command: after it, --debug is a mistake
        # (reported as one line) or the value of an option, and turns nothing on.
        ahead = argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]
        debug = "--debug" in ahead or os.environ.get("BDIA_DEBUG") == "1"
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
                result = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except click.exceptions.Abort as err:
            click.echo("Aborted.", err=True)
            # 128 + SIGINT for Ctrl-C, as shells report a process it ended.
            code = 130 if isinstance(err.__cause__, KeyboardInterrupt) else 1
        except click.exceptions.NoArgsIsHelpError as err:
            # Bare `bdia`: the help, as click shows it (stderr, status 2), not one line.
            err.show()
            code = err.exit_code
        except click.ClickException as err:
            if debug:
                raise
            message = _one_line(err.format_message())
            if isinstance(err, click.NoSuchOption) and err.option_name == "--debug":
                command = err.ctx.info_name if err.ctx is not None else "COMMAND"
                message = (
                    f"{message.rstrip('.')}; --debug goes before the command: "
                    f"bdia --debug {command} ..."
                )
            click.echo(f"Error: {message}", err=True)
            code = err.exit_code
        except Exception as err:  # a failure the checks did not foresee: still one line
            if debug:
                raise
            if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
                hint = self._memory_hint(argv[len(ahead) : len(ahead) + 1])
            else:
                hint = "bdia --debug ... shows the traceback"
            message = _one_line(str(err)) or type(err).__name__
            click.echo(f"Error: {type(err).__name__}: {message} ({hint})", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code

    def _memory_hint(self, name: list[str]) -> str:
        """What a command that ran out of memory can shrink: its ``--batch`` where it has one
        (``invert`` has none), else the device to free or change."""
        command = self.commands.get(name[0]) if name else None
        options = {o for p in (command.params if command else []) for o in p.opts}
        if "--batch" in options:
            return "out of memory: use a smaller --batch"
        if "--device" in options:
            return "out of memory: free memory on the device, or choose another --device"
        return "out of memory"


# ------------------------------------------------------------------------ option types

# One dtype vocabulary for every command: torch's names (as the Python API takes them), with
# the usual short forms.
DTYPE_ALIASES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


class DtypeType(click.ParamType):
    """A torch dtype by name (``float32``) or short form (``fp32``), from an allowed set."""

    name = "dtype"

    def __init__(self, *allowed: str) -> None:
        self.allowed = allowed

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join(self.allowed) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> torch.dtype:
        if isinstance(value, torch.dtype):
            return value
        name = DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
        if name not in self.allowed:
            short = ", ".join(a for a, n in DTYPE_ALIASES.items() if n in self.allowed)
            self.fail(
                f"{value!r} is not one of {', '.join(self.allowed)} (short forms: {short})",
                param,
                ctx,
            )
        return DTYPE_NAMES[name]


NETWORK_DTYPE = DtypeType("float32", "bfloat16", "float16")
STATE_DTYPE = DtypeType("float64", "float32")


class DeviceType(click.ParamType):
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> str:
        try:
            device = torch.device(str(value))
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a device; use cpu, cuda or cuda:N", param, ctx)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
                self.fail(
                    f"{value!r}: CUDA is not available here (torch {torch.__version__}, {build}); "
                    "use --device cpu",
                    param,
                    ctx,
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                self.fail(f"{value!r}: this machine has {count} CUDA device(s)", param, ctx)
        elif device.type == "mps":
            if not torch.backends.mps.is_available():
                self.fail(f"{value!r}: MPS is not available here; use --device cpu", param, ctx)
        elif device.type != "cpu":
            self.fail(f"{value!r}: use cpu, cuda, cuda:N or mps", param, ctx)
        elif device.index not in (None, 0):
            # torch takes cpu:N and runs on the one CPU device all the same.
            self.fail(f"{value!r}: there is one CPU device; use cpu", param, ctx)
        return str(device)


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


class OutputPathType(click.ParamType):
    """A file (or folder) the command will create; checked before any work, created by none.

    The nearest existing ancestor must be a writable folder, so that a path under a regular
    file or in a read-only folder fails at once instead of after the work.
    """

    name = "path"

    def __init__(self, folder: bool = False, suffix: str | None = None) -> None:
        self.folder = folder
        self.suffix = suffix

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> Path:
        if not str(value).strip():
            # Path("") is the current folder: an unset shell variable would write there.
            kind = "folder" if self.folder else "file"
            self.fail(f"the path is empty; give a {kind} name", param, ctx)
        path = Path(value)
        if path.exists():
            if self.folder and not path.is_dir():
                self.fail(f"{str(path)!r} is a file, not a folder", param, ctx)
            if not self.folder and path.is_dir():
                self.fail(f"{str(path)!r} is a folder; give a file name", param, ctx)
        # In any case, as the readers take it (NET.SAFETENSORS is a network file).
        if self.suffix and not self.folder and path.suffix.lower() != self.suffix:
            self.fail(f"{str(path)!r} must end in {self.suffix}", param, ctx)
        parent = path if self.folder and path.is_dir() else path.parent
        existing = _first_existing(parent)
        if not existing.is_dir():
            self.fail(f"cannot create {str(path)!r}: {str(existing)!r} is a file", param, ctx)
        if not os.access(existing, os.W_OK | os.X_OK):
            self.fail(f"cannot create {str(path)!r}: {str(existing)!r} is not writable", param, ctx)
        return path


class InputPathType(click.Path):
    """``click.Path``, refusing an empty value: ``Path("")`` is the current folder, which an
    unset shell variable would hand a command as its input (fid read every image under it)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            kind = "file or folder" if self.dir_okay and self.file_okay else "file"
            self.fail(f"the path is empty; give a {kind} name", param, ctx)
        return super().convert(value, param, ctx)


def _network_given(ctx: Any, param: click.Parameter, value: str | None) -> str | None:
    """--network: an empty value names no network (load_network would read the folder ".")."""
    if value is not None and not value.strip():
        raise click.BadParameter(
            "the path is empty; give digits, random:NAME or a network file (.pkl, .safetensors)",
            ctx,
            param,
        )
    return value


def _overwrite_option(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--overwrite", is_flag=True, help=text)


def _refuse_existing_file(path: Path | None, option: str, overwrite: bool) -> None:
    """Exit 1 when the output file ``path`` exists, unless ``overwrite``: no command replaces
    a file it was not told to (the options are valid; the file holds other work)."""
    if path is not None and path.exists() and not overwrite:
        raise click.ClickException(
            f"{option} {str(path)!r} exists: use --overwrite to replace it, or another {option}"
        )


class GammaType(click.ParamType):
    """bdia's gamma: a number in [0, 1] (or (0, 1] for inversion) or a named schedule."""

    name = "gamma"

    def __init__(self, invertible: bool) -> None:
        self.invertible = invertible

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> float | str:
        from .solvers.bidirectional import NAMED_GAMMAS

        if isinstance(value, float) or value in NAMED_GAMMAS:
            return value
        interval = "(0, 1]" if self.invertible else "[0, 1]"
        try:
            gamma = float(value)
        except ValueError:
            self.fail(
                f"{value!r} is not a number in {interval} or one of {', '.join(NAMED_GAMMAS)}",
                param,
                ctx,
            )
        low_ok = gamma > 0 if self.invertible else gamma >= 0
        if not (low_ok and gamma <= 1):
            why = " (0 is the base solver, which cannot be inverted exactly)" if gamma == 0 else ""
            self.fail(f"{value} lies outside {interval}{why}", param, ctx)
        return gamma


POSITIVE = click.FloatRange(min=0, min_open=True)


def _finite_positive(ctx: Any, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


# ------------------------------------------------------------------ shared options, helpers


def _progress_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--no-progress",
        is_flag=True,
        help="No progress bar (without a terminal on stderr only a final line is shown).",
    )(command)


def _device_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device",
        type=DeviceType(),
        default=None,
        help="cpu, cuda, cuda:N or mps; defaults to this rank's GPU if there is one, else cpu.",
    )(command)


#: Networks of at most this resolution run on one torch thread unless --threads asks for
#: more: their tensors are too small to gain from more, and on a busy machine every extra
#: thread waits for a core at each operation (the 8x8 digits inverted 30 times slower on 2).
SMALL_RESOLUTION = 16


def _threads_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        return click.option(
            "--threads",
            default=None,
            # torch takes a C int.
            type=click.IntRange(1, 2**31 - 1),
            callback=_at_most_the_cpus,
            help=f"torch CPU threads, at most the machine's CPUs; default: {default}.",
        )(command)

    return decorate


def _at_most_the_cpus(ctx: Any, param: click.Parameter, value: int | None) -> int | None:
    # torch starts every thread it is asked for: 100,000 crashed the process (a segmentation
    # fault, after sample had written its run record), and threads beyond the CPUs only wait
    # for each other.
    cpus = os.cpu_count()
    if value is not None and cpus is not None and value > cpus:
        raise click.BadParameter(
            f"{value} is more than the {cpus} CPUs of this machine, beyond which threads only "
            f"wait for each other; give at most {cpus}",
            ctx,
            param,
        )
    return value


def _set_threads(threads: int | None, net: torch.nn.Module | None = None) -> None:
    """Run the rest of the command on ``threads`` torch threads, restored when it ends.

    Without ``threads``: one for a network of at most SMALL_RESOLUTION pixels a side,
    else torch's own setting (one per core, or OMP_NUM_THREADS) is kept.
    """
    if threads is None:
        if net is None or getattr(net, "img_resolution", SMALL_RESOLUTION + 1) > SMALL_RESOLUTION:
            return
        threads = 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    click.get_current_context().call_on_close(lambda: torch.set_num_threads(previous))


class _Progress:
    """A tqdm bar on stderr when stderr is a terminal, else one line when the work is done."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = 0
        self.start = time.perf_counter()
        self.live = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not self.live)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        self.bar.close()
        if self.enabled and not self.live and kind is None:
            elapsed = time.perf_counter() - self.start
            click.echo(
                f"{self.desc}: {self.done}/{self.total} {self.unit} in {elapsed:.1f} s", err=True
            )


def _default_device(device: str | None) -> str:
    if device is not None:
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _state_dtype(given: torch.dtype | None, device: str | None) -> torch.dtype:
    """--state-dtype, else float64, or float32 on a device without float64 (mps)."""
    from .ode import wide_dtype

    where = _default_device(device)
    widest = wide_dtype(where)
    if given is None:
        return widest
    if given.itemsize > widest.itemsize:
        raise click.BadParameter(
            f"a {dtype_name(given)} state cannot live on {where}, which has no "
            f"{dtype_name(given)}; use --state-dtype {dtype_name(widest)} (or --device cpu)",
            param_hint="'--state-dtype'",
        )
    return given


def _distributed() -> tuple[int, int]:
    """(rank, world size), joining the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            # NCCL and pinned-memory copies work on the current device, which is cuda:0 in
            # every process unless each one selects its own.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # Gloo beside NCCL: a run given --device cpu on a CUDA machine reduces CPU tensors,
        # which NCCL cannot.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _wait_for_ranks(world: int, leave: bool = False) -> None:
    """Return once every rank of ``_distributed()``'s group has got here (at once when
    ``world`` is 1); with ``leave``, then leave the group, whose work is done, so that rank 0
    reports only what every rank has finished."""
    if world == 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if leave:
        dist.destroy_process_group()


def _rank_zero_alone() -> bool:
    """Leave work that is not split across torchrun ranks to rank 0: every rank joins
    ``_distributed()``'s group and leaves it at once. True on rank 0 (and in one process),
    which then works alone; another rank has nothing left to do.

    Leaving before the work, not after it, spares the other ranks a wait in the group that
    could outlast its timeout.
    """
    rank, world = _distributed()
    _wait_for_ranks(world, leave=True)
    return rank == 0


def _base_solver(name: str, option: str = "--solver") -> Any:
    """The registered base solver ``name``; errors name ``option`` (--solver or --solvers).

    bdia's variants are refused with a pointer to the base and the gamma option: the command
    line wraps a base itself, so ``bdia-NAME`` is no solver name here.
    """
    gamma = "--gamma G" if option == "--solver" else "--gammas G"
    names = available_solvers()
    base = name.removeprefix("bdia-")
    if base != name and base in names:
        raise click.BadParameter(
            f"{name!r} names a bdia variant; give the base solver and the gamma: "
            f"{option} {base} {gamma}",
            param_hint=f"'{option}'",
        )
    if name not in names:
        import difflib

        close = difflib.get_close_matches(base, names)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
        raise click.BadParameter(
            f"unknown solver {name!r}{hint} Registered: {', '.join(names)} "
            "(`bdia solvers` lists them)",
            param_hint=f"'{option}'",
        )
    return get_solver(name)


def _solver(name: str, gamma: float | str | None) -> Any:
    """The solver ``name``, wrapped by bdia when ``gamma`` is given; errors name --solver."""
    solver = _base_solver(name)
    return solver if gamma is None else bdia(solver, gamma)


def _karras(
    steps: int, sigma_min: float, sigma_max: float, rho: float, final_zero: bool = True
) -> torch.Tensor:
    from .schedules import karras_grid

    if not sigma_min < sigma_max:
        raise click.BadParameter(
            f"{sigma_min:g} must lie below --sigma-max {sigma_max:g}", param_hint="'--sigma-min'"
        )
    # The float32 network's preconditioner squares sigma (EDM's c_in, c_skip, c_out).
    limit = math.sqrt(torch.finfo(torch.float32).max)
    if sigma_max >= limit:
        raise click.BadParameter(
            f"{sigma_max:g} is beyond the float32 network, whose preconditioner squares sigma "
            f"(finite below {limit:.3g}); EDM uses 80",
            param_hint="'--sigma-max'",
        )
    try:
        ts = karras_grid(
            steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, final_zero=final_zero
        )
    except (OverflowError, ZeroDivisionError, ValueError):
        ts = None
    # The grid is built in float64; extreme values overflow, or round points together or to 0.
    if (
        ts is None
        or not bool(ts.isfinite().all())
        or not bool((ts[1:] < ts[:-1]).all())
        or not bool(((ts[:-1] if final_zero else ts) > 0).all())
    ):
        raise click.BadParameter(
            f"--sigma-min {sigma_min:g}, --sigma-max {sigma_max:g} and --rho {rho:g} give no "
            f"grid of {steps} steps in float64 (finite, positive and strictly decreasing); "
            "use values nearer the defaults 0.002, 80 and 7",
            param_hint="'--sigma-min' / '--sigma-max' / '--rho'",
        )
    return ts


def _grid_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """EDM's time grid: --sigma-min, --sigma-max and --rho, each finite and positive."""
    for name, default, text in reversed(
        [
            ("--sigma-min", 0.002, "Lowest noise level of the grid (> 0)."),
            ("--sigma-max", 80.0, "Highest noise level of the grid (> --sigma-min)."),
            ("--rho", 7.0, "Grid exponent (> 0): steps are uniform in sigma ** (1 / rho)."),
        ]
    ):
        command = click.option(
            name,
            default=default,
            show_default=True,
            type=POSITIVE,
            callback=_finite_positive,
            help=text,
        )(command)
    return command


#: Most seeds one run takes; longer runs are split over several.
MAX_SEEDS = 1_000_000
GRID_MAX_IMAGES = 1024
MAX_STEPS = 100_000


def _load_denoiser(spec: str) -> torch.nn.Module:
    """The preconditioned network named by ``--network``; errors name the option."""
    from . import generate
    from .models.checkpoints import UnsafeCheckpointError, load_network

    try:
        if spec.startswith("random:"):
            net = generate.random_network(spec[len("random:") :])
        else:
            net = load_network(spec)
    except (FileNotFoundError, ValueError, UnsafeCheckpointError) as err:
        raise click.BadParameter(_one_line(str(err)), param_hint="'--network'") from None
    if not callable(getattr(net, "coefficients", None)):
        raise click.BadParameter(
            f"{spec!r} is a {type(net).__name__}, not a diffusion model (a preconditioned "
            "denoiser); use e.g. digits, an EDM .pkl or a bdia .safetensors network",
            param_hint="'--network'",
        )
    return net


def _check_class(net: torch.nn.Module, class_label: int | None) -> None:
    label_dim = getattr(net, "label_dim", 0)
    if class_label is None:
        return
    if not label_dim:
        raise click.BadParameter(
            "the network is unconditional; leave --class out", param_hint="'--class'"
        )
    if not 0 <= class_label < label_dim:
        raise click.BadParameter(
            f"{class_label} is not a class of this network, which has {label_dim} "
            f"(0..{label_dim - 1})",
            param_hint="'--class'",
        )


def _set_network_dtype(net: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run the network's inner UNet in ``dtype`` (preconditioner and skip path stay float32)."""
    if dtype == torch.float32:
        return
    if not hasattr(net, "compute_dtype"):
        raise click.BadParameter(
            f"{type(net).__name__} has no half-precision mode; use --dtype float32",
            param_hint="'--dtype'",
        )
    # A property of the preconditioners; nn.Module's __setattr__ is typed for tensors and
    # submodules alone.
    net.compute_dtype = dtype  # type: ignore[assignment]


@click.group(
    cls=_Command,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", "-V", prog_name="bdia")
@click.option(
    "--debug", is_flag=True, help="Show the full traceback of an error instead of one line."
)
def main(debug: bool) -> None:
    """Single-step ODE solvers for diffusion sampling and their exactly invertible BDIA form."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@main.command()
def solvers() -> None:
    """List every registered solver with its order and cost per step."""
    if not _rank_zero_alone():
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
    if not _rank_zero_alone():
        return

    from .sampling import ParasiticWarning

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


_SOLVER_HELP = "Base solver (`bdia solvers` lists them)."
_NETWORK_THREADS = (
    f"1 for a network of at most {SMALL_RESOLUTION}x{SMALL_RESOLUTION} pixels (digits), else "
    "torch's (one per core)"
)


def _network_identity(network_spec: str) -> tuple[str, str]:
    """``(identity, where)`` of a loaded ``--network``: ``("sha256:...", "digits")`` for a
    shipped network, ``("sha256:...", absolute path)`` for a file, the spec twice for
    ``random:NAME``."""
    from ._files import file_sha256
    from .models.checkpoints import SHIPPED_NETWORKS, shipped_network_path

    if network_spec.startswith("random:"):
        return network_spec, network_spec
    if network_spec in SHIPPED_NETWORKS:
        return "sha256:" + file_sha256(shipped_network_path(network_spec)), network_spec
    path = Path(network_spec)
    return "sha256:" + file_sha256(path), str(path.resolve())


def _run_settings(
    network_spec: str,
    solver_name: str,
    gamma: float | str | None,
    steps: int,
    grid: tuple[float, float, float],
    ts: torch.Tensor,
    network_dtype: torch.dtype,
    state_dtype: torch.dtype,
    class_label: int | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings an image of ``bdia sample`` depends on, and what is recorded beside them."""
    info: dict[str, Any] = {"bdia": __version__}
    network, network_path = _network_identity(network_spec)
    if network_path != network:
        info["network path"] = network_path
    sigma_min, sigma_max, rho = grid
    info["grid"] = [float(t) for t in ts]
    settings = {
        "network": network,
        "solver": solver_name,
        "gamma": gamma,
        "steps": steps,
        "sigma-min": sigma_min,
        "sigma-max": sigma_max,
        "rho": rho,
        "dtype": dtype_name(network_dtype),
        "state-dtype": dtype_name(state_dtype),
        "class": class_label,
    }
    return settings, info


def _claim_outdir(outdir: Path, settings: dict[str, Any], overwrite: bool) -> list[Path]:
    """Check ``outdir``'s run record against ``settings``; returns the images to remove.

    A folder made with the same settings resumes. One made with other settings (or holding
    images but no record) is refused, naming each setting that differs, unless ``overwrite``:
    then all its images, made with the old settings, are to be removed before the new
    record is written, so that every image in the folder matches its record.
    """
    from . import generate

    try:
        recorded = generate.read_run_record(outdir) if outdir.is_dir() else None
    except ValueError as err:
        if not overwrite:
            raise click.BadParameter(_one_line(str(err)), param_hint="'--outdir'") from None
        recorded = {}
    # Only the names image_path gives: a user's 000000/1.png is no image of this run.
    found = sorted(outdir.glob("[0-9]*/[0-9]*.png")) if outdir.is_dir() else []
    images = [
        p for p in found if p.stem.isdigit() and generate.image_path(outdir, int(p.stem)) == p
    ]
    if recorded is None and not images:
        return []
    if recorded is None:
        differences = [f"{len(images)} images but no run record ({generate.RUN_RECORD})"]
    else:
        differences = ["--" + d for d in generate.differing_settings(recorded, settings)]
    if not differences:
        return []
    if not overwrite:
        # Exit status 1, not a usage error: the options are valid, the folder holds other work.
        raise click.ClickException(
            f"--outdir {str(outdir)!r} was made with other settings: {'; '.join(differences)}. "
            "Use --overwrite to regenerate its images with these settings, or another --outdir"
        )
    # The requested seeds' images too: were they kept until regenerated, a run stopped
    # midway would leave old images under the new record, and a rerun would resume past them.
    return images


@main.command(name="sample")
@click.option(
    "--network",
    "network_spec",
    default=None,
    metavar="NAME|FILE",
    callback=_network_given,
    help="digits (the shipped 8x8 digits model), an EDM .pkl, a bdia .safetensors, or "
    "random:NAME (ddpmpp-cond, ncsnpp-cond, ddpmpp-uncond, ncsnpp-uncond, tiny-cond); "
    "required unless --latents names the network.",
)
@click.option("--solver", "solver_name", default="heun", show_default=True, help=_SOLVER_HELP)
@click.option(
    "--gamma",
    type=GammaType(invertible=False),
    default=None,
    help="Wrap the solver with bdia at this gamma, a number in [0, 1] or obelm.",
)
@click.option(
    "--steps",
    default=18,
    show_default=True,
    type=click.IntRange(1, MAX_STEPS),
    help="Steps of EDM's grid (the last one ends at sigma 0).",
)
@_grid_options
@click.option(
    "--seeds",
    default="0-63",
    show_default=True,
    help=f"Seeds, one image each: e.g. 0-49999 or 1,5,7-9 (at most {MAX_SEEDS:,}).",
)
@click.option(
    "--class",
    "class_label",
    default=None,
    type=click.IntRange(min=0),
    help="One class for every image (conditional networks; default: drawn from each seed). "
    "With --latents: the recorded class reconstructs, another one edits.",
)
@click.option(
    "--batch", default=64, show_default=True, type=click.IntRange(1), help="Images per model call."
)
@click.option(
    "--outdir",
    default=None,
    type=OutputPathType(folder=True),
    help="One PNG per seed here; a rerun with the same settings resumes. With --latents: "
    "NAME.png per latents file.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the --grid file if it exists, and regenerate the images of --outdir even "
    "if it was made with other settings (with --latents: replace the NAME.png files that "
    "exist).",
)
@click.option(
    "--latents",
    "latents_path",
    default=None,
    type=InputPathType(exists=True, path_type=Path),
    help="A latents file or folder of them (from bdia invert --images): regenerate each one "
    "(grid, solver and gamma from the file) instead of sampling seeds.",
)
@click.option(
    "--grid",
    "grid_path",
    default=None,
    type=OutputPathType(suffix=".png"),
    help=f"One labelled PNG grid of all seeds (at most {GRID_MAX_IMAGES}); for a conditional "
    "network without --class, column c holds class c. With --outdir, written after its images "
    "(a stopped run resumes when run again).",
)
@click.option(
    "--dtype",
    "network_dtype",
    type=NETWORK_DTYPE,
    default="float32",
    show_default=True,
    help="Dtype of the network's UNet (its preconditioner and skip path stay float32).",
)
@click.option(
    "--state-dtype",
    type=STATE_DTYPE,
    default=None,
    help="Dtype of the sampler's state.  [default: float64; float32 on mps, which has no float64]",
)
@click.option(
    "--compile",
    "compile_net",
    is_flag=True,
    help="Compile the network's U-Net with torch.compile (a GPU speed-up; the first batch "
    "pays tens of seconds of compiling). Images may differ from uncompiled ones in the last "
    "bits, so the run record notes it. Never the sampler's own arithmetic.",
)
@_device_option
@_threads_option(_NETWORK_THREADS)
@_progress_option
def sample_command(
    network_spec: str,
    solver_name: str,
    gamma: float | str | None,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    seeds: str,
    class_label: int | None,
    batch: int,
    outdir: Path | None,
    overwrite: bool,
    grid_path: Path | None,
    latents_path: Path | None,
    network_dtype: torch.dtype,
    state_dtype: torch.dtype | None,
    compile_net: bool,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Sample one PNG per seed with EDM's grid (reruns skip finished seeds), or a grid PNG.

    With --latents, regenerate saved latents instead: under the class they were inverted
    under, the exact reconstruction; under another --class, an edit from the inverted noise.
    """
    from . import generate

    if latents_path is not None:
        _sample_latents(
            latents_path, network_spec, class_label, outdir, overwrite, device, threads, no_progress
        )
        return
    if network_spec is None:
        raise click.UsageError("Missing option '--network' (or give --latents)")
    state_dtype = _state_dtype(state_dtype, device)
    if outdir is None and grid_path is None:
        raise click.UsageError("give --outdir (one PNG per seed), --grid (one PNG), or both")
    if outdir is not None and grid_path is not None:
        if grid_path.resolve().is_relative_to(outdir.resolve()):
            # bdia fid reads every PNG under the folder as a sample, and a grid at a seed's
            # own path would pass for that seed's image when a run resumes.
            raise click.BadParameter(
                f"{str(grid_path)!r} lies inside --outdir {str(outdir)!r}, whose PNGs are the "
                "samples (bdia fid reads them all); put the grid beside the folder",
                param_hint="'--grid'",
            )
    limit = GRID_MAX_IMAGES if grid_path is not None else MAX_SEEDS
    try:
        seed_list = generate.parse_seeds(seeds, limit=limit)
    except ValueError as err:
        if "more than" in str(err):
            advice = (
                f"a grid holds at most {GRID_MAX_IMAGES} images: use --outdir for more"
                if grid_path is not None
                else "one run takes at most that many: split the work over several runs"
            )
            err = ValueError(f"{err}; {advice}")
        raise click.BadParameter(str(err), param_hint="'--seeds'") from None
    solver = _solver(solver_name, gamma)
    ts = _karras(steps, sigma_min, sigma_max, rho)
    net = _load_denoiser(network_spec)
    _check_class(net, class_label)
    _set_network_dtype(net, network_dtype)
    _set_threads(threads, net)
    if compile_net:
        from .models.networks import compile_network

        try:
            compile_network(net)
        except TypeError as err:
            raise click.BadParameter(_one_line(str(err)), param_hint="'--compile'") from None
    # After the options' checks: a wrong option is named (status 2) even where the grid
    # exists, and the status 1 of an existing file is left to valid options.
    _refuse_existing_file(grid_path, "--grid", overwrite)
    if outdir is not None:
        # Checked before any image, the grid's included: a refused run writes nothing (and,
        # under torchrun, joins no group).
        settings, info = _run_settings(
            network_spec,
            solver_name,
            gamma,
            steps,
            (sigma_min, sigma_max, rho),
            ts,
            network_dtype,
            state_dtype,
            class_label,
        )
        if compile_net:
            # Absent when off, so that the records of earlier runs still match.
            settings["compile"] = True
        stale = _claim_outdir(outdir, settings, overwrite)
    rank, world = _distributed()
    device = _default_device(device)
    net = net.to(device=device)
    show = not no_progress and rank == 0
    # The grid shows the --outdir images themselves unless it gives column c class c, which
    # the images, of classes drawn from their seeds, do not have.
    grid_of_outdir = outdir is not None and (
        class_label is not None or not getattr(net, "label_dim", 0)
    )

    def write_grid(path: Path) -> None:
        with _Progress(len(seed_list), "grid", "img", show and not grid_of_outdir) as bar:
            _write_sample_grid(
                path,
                net,
                solver,
                ts,
                seed_list,
                class_label,
                batch,
                state_dtype,
                device,
                on_batch=bar.update,
                outdir=outdir if grid_of_outdir else None,
            )
        click.echo(f"wrote {path} ({_images(len(seed_list))})", err=True)

    if outdir is None:
        # A grid is at most GRID_MAX_IMAGES images: rank 0 samples it alone, once every rank
        # has left the group (a wait there while it samples could outlast the group's timeout).
        _wait_for_ranks(world, leave=True)
        if grid_path is not None and rank == 0:
            write_grid(grid_path)
        return

    # Every rank has checked the folder before rank 0 changes it.
    _wait_for_ranks(world)
    if rank == 0:
        for image in stale:
            image.unlink()
        if stale:
            click.echo(f"removed {_images(len(stale))} made with other settings", err=True)
        generate.write_run_record(outdir, settings, info)
    _wait_for_ranks(world)
    with _Progress(len(seed_list[rank::world]), "images", "img", show) as bar:
        generate.generate_images(
            net,
            solver,
            ts,
            seed_list,
            outdir,
            batch=batch,
            class_label=class_label,
            state_dtype=state_dtype,
            device=device,
            rank=rank,
            world_size=world,
            on_batch=bar.update,
            overwrite=overwrite,
        )
    _wait_for_ranks(world, leave=True)
    if rank == 0:
        click.echo(f"{_images(len(seed_list))} in {outdir}", err=True)
        # Last, also where it is sampled on its own: a run stopped before leaves no grid,
        # so the same command run again resumes the folder instead of being refused.
        if grid_path is not None:
            write_grid(grid_path)


# ------------------------------------------------- invert: images to latents, latents back

#: The summary ``bdia invert --images`` writes in its --outdir.
INVERT_SUMMARY = "bdia-invert.json"
INVERT_FORMAT = "bdia-invert/1"


def _rank_listing(outdir: Path, rank: int) -> Path:
    """Where rank ``rank`` (not 0) of a torchrun ``invert --images`` lists its images as it
    makes them: hidden, so that no image reader takes it, and gone once the summary lists
    them."""
    return outdir / f".bdia-invert.rank{rank}.json"


def _rank_listings(outdir: Path) -> list[Path]:
    return sorted(outdir.glob(".bdia-invert.rank*.json"))


_IMAGE_MODES = {1: "L", 3: "RGB"}


def _count(n: int, noun: str) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _images(n: int) -> str:
    return _count(n, "image")


def _files_of(path: Path, suffix: str, option: str) -> list[Path]:
    """``path`` itself, or the files of folder ``path`` ending in ``suffix`` (not hidden)."""
    if not path.is_dir():
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() == suffix and not p.name.startswith(".")
    )
    if not files:
        raise click.BadParameter(f"{str(path)!r} holds no {suffix} files", param_hint=f"'{option}'")
    stems = [p.stem.lower() for p in files]
    twins = sorted({p.name for p in files if stems.count(p.stem.lower()) > 1})
    if twins:
        raise click.BadParameter(
            f"{', '.join(twins)} in {str(path)!r} share a name (their outputs would collide); "
            "rename one",
            param_hint=f"'{option}'",
        )
    return files


def _check_pngs(files: list[Path], net: torch.nn.Module, network_spec: str) -> None:
    """Refuse, naming the file, any that is not a PNG of the network's size and channels."""
    from PIL import Image

    from . import generate
    from .metrics.fid import _IMAGE_ERRORS

    channels, res, _ = generate._image_shape(net)
    mode = _IMAGE_MODES.get(channels)
    if mode is None:
        raise click.BadParameter(
            f"{network_spec!r} has {channels} channels; --images takes networks of 1 (L) or "
            "3 (RGB)",
            param_hint="'--network'",
        )
    needs = (
        f"{network_spec!r} needs {res}x{res} {mode} PNGs ({channels} channel"
        f"{'s' if channels > 1 else ''}); images are neither resized nor converted"
    )
    for p in files:
        try:
            with Image.open(p) as im:
                kind, got, size = im.format, im.mode, im.size
                im.verify()
        except _IMAGE_ERRORS as err:
            raise click.BadParameter(
                f"{str(p)!r} is not a readable PNG ({_one_line(str(err))})",
                param_hint="'--images'",
            ) from None
        if kind != "PNG":
            raise click.BadParameter(
                f"{str(p)!r} is a {kind} image, not a PNG", param_hint="'--images'"
            )
        if got != mode or size != (res, res):
            raise click.BadParameter(
                f"{str(p)!r} is {size[0]}x{size[1]} {got}; {needs}", param_hint="'--images'"
            )


def _read_png(path: Path, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A checked PNG as ``(1, C, H, W)`` in [-1, 1] on ``device``: pixel p becomes
    p / 127.5 - 1, computed in float64 on the host and rounded once to ``dtype`` (the state
    dtype) there, since a device such as MPS holds no float64."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im)
    x = torch.from_numpy(pixels.copy()).to(torch.float64)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    return (x / 127.5 - 1.0).to(dtype).to(device)


def _refuse_existing(outdir: Path, targets: list[Path], overwrite: bool, what: str) -> None:
    """Exit 1 when ``outdir`` already holds one of ``targets``, unless ``overwrite``."""
    present = [t for t in targets if t.exists()]
    if present and not overwrite:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise click.ClickException(
            f"--outdir {str(outdir)!r} already holds {present[0].name}{more} ({what}): "
            "use --overwrite to replace them, or another --outdir"
        )


@main.command(name="invert")
@click.option(
    "--network",
    "network_spec",
    default="digits",
    show_default=True,
    metavar="NAME|FILE",
    callback=_network_given,
    help="digits, an EDM .pkl, a bdia .safetensors or random:NAME, as bdia sample takes it; "
    "without --images only digits, whose held-out set is inverted.",
)
@click.option(
    "--images",
    default=None,
    type=InputPathType(exists=True, path_type=Path),
    help="A PNG or a folder of PNGs to invert, at the network's resolution (L for 1 channel, "
    "RGB for 3); needs --outdir.",
)
@click.option(
    "--class",
    "class_label",
    default=None,
    type=click.IntRange(min=0),
    help="The class of every image of --images (required for a conditional network).",
)
@click.option(
    "--outdir",
    default=None,
    type=OutputPathType(folder=True),
    help=f"With --images: NAME.safetensors (latents) and NAME-reconstruction.png per image, "
    f"and {INVERT_SUMMARY}.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the files of these images already in --outdir.",
)
@click.option("--solver", "solver_name", default="euler", show_default=True, help=_SOLVER_HELP)
@click.option(
    "--gamma",
    default="0.96",
    show_default=True,
    type=GammaType(invertible=True),
    help="bdia's gamma: a number in (0, 1] or obelm.",
)
@click.option(
    "--steps",
    default=35,
    show_default=True,
    type=click.IntRange(2, MAX_STEPS),
    help="Steps of EDM's grid, ending at --sigma-min.",
)
@_grid_options
@click.option(
    "--count",
    default=None,
    type=click.IntRange(1),
    help="Invert the first N held-out digits (default: all; not with --images).",
)
@click.option(
    "--state-dtype",
    type=STATE_DTYPE,
    default=None,
    help="Dtype of the sampler's state.  [default: float64; float32 on mps, which has no float64]",
)
@_device_option
@_threads_option(_NETWORK_THREADS)
@_progress_option
def invert_command(
    network_spec: str,
    images: Path | None,
    class_label: int | None,
    outdir: Path | None,
    overwrite: bool,
    solver_name: str,
    gamma: float | str,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    count: int | None,
    state_dtype: torch.dtype | None,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Invert images to noise exactly with bdia, and check that they come back.

    Each image is taken as the state at sigma_min. bdia(SOLVER, GAMMA) inverts it exactly up
    to rounding (after one approximate base step that makes the pair). With --images, each
    PNG's latents go to --outdir (for `bdia sample --latents`) with its reconstruction.
    Without, the shipped digits' held-out set is inverted and the error printed beside that
    of the base solver run backward in time, the usual approximate inversion.
    """
    exact = _solver(solver_name, gamma)
    ts = _karras(steps, sigma_min, sigma_max, rho, final_zero=False)
    state_dtype = _state_dtype(state_dtype, device)
    if images is None:
        for given, name in (
            (class_label is not None, "--class"),
            (outdir is not None, "--outdir"),
            (overwrite, "--overwrite"),
        ):
            if given:
                raise click.UsageError(f"{name} needs --images (the PNGs to invert)")
        if network_spec != "digits":
            raise click.UsageError(
                f"give --images (PNGs to invert) with --network {network_spec}: only the "
                "shipped digits network has a held-out set built in"
            )
        net = _load_denoiser("digits")
        _set_threads(threads, net)
        # Rank 0 alone: the table's figures, of one batch, may change in their last bits
        # when the digits are split into smaller batches.
        if not _rank_zero_alone():
            return
        _invert_held_out(net, exact, ts, steps, gamma, count, state_dtype, device, no_progress)
        return
    if count is not None:
        raise click.UsageError("--count applies to the held-out digits; --images inverts all")
    if outdir is None:
        raise click.UsageError(
            "give --outdir: the latents and reconstructions of --images are written there"
        )
    net = _load_denoiser(network_spec)
    _check_class(net, class_label)
    label_dim = getattr(net, "label_dim", 0)
    if label_dim and class_label is None:
        raise click.UsageError(
            f"Missing option '--class': {network_spec} is a conditional network "
            f"({label_dim} classes); give the class of the images with --class N"
        )
    files = _files_of(images, ".png", "--images")
    _check_pngs(files, net, network_spec)
    _set_threads(threads, net)
    if images.is_dir() and outdir.resolve() == images.resolve():
        raise click.BadParameter(
            "give another folder than --images: its outputs would be taken as images by the "
            "next run",
            param_hint="'--outdir'",
        )
    network, network_path = _network_identity(network_spec)
    settings = {
        "network": network,
        "solver": exact.solver.name,
        "gamma": gamma,
        "steps": steps,
        "sigma-min": sigma_min,
        "sigma-max": sigma_max,
        "rho": rho,
        "state-dtype": dtype_name(state_dtype),
        "class": class_label,
    }
    entries, stale = _claim_invert_outdir(outdir, files, settings, overwrite)
    rank, world = _distributed()
    # Every rank has read the folder before rank 0 changes it.
    _wait_for_ranks(world)
    if rank == 0:
        for old in stale:
            old.unlink(missing_ok=True)
    _invert_images(
        net,
        files,
        class_label,
        outdir,
        exact,
        ts,
        settings,
        network_path,
        entries,
        device,
        no_progress,
        rank,
        world,
    )


def _invert_held_out(
    net: torch.nn.Module,
    exact: Any,
    ts: torch.Tensor,
    steps: int,
    gamma: float | str,
    count: int | None,
    state_dtype: torch.dtype,
    device: str | None,
    no_progress: bool,
) -> None:
    """The held-out digits to noise and back: a table of exact and approximate errors."""
    from . import generate
    from .models import digits

    base = exact.solver
    device = _default_device(device)
    net = net.to(device)
    split = digits.load_digits_split()
    images, labels = split.held_out_images, split.held_out_labels.tolist()
    if count is not None:
        images, labels = images[:count], labels[:count]
    click.echo(
        f"{len(labels)} held-out digits; {steps} steps from sigma {float(ts[0]):g} to "
        f"{float(ts[-1]):g}; {dtype_name(state_dtype)} state, float32 network"
    )
    rows = [("inversion", "max abs error", "rms error")]
    # Each solver inverts over every step and samples back from the pair's second state.
    with _Progress(2 * (2 * steps - 1), "invert", "step", not no_progress) as bar:
        for solver, kind in ((exact, "exact"), (base, "approximate")):
            _, back = generate.reconstruct(
                net,
                solver,
                ts,
                images,
                labels,
                state_dtype=state_dtype,
                device=device,
                callback=lambda info: bar.update(),
            )
            error = (back.cpu().double() - images.double()).flatten(1)  # MPS has no float64
            name = f"bdia({base.name}, {gamma})" if kind == "exact" else f"{base.name} backward"
            rows.append(
                (
                    f"{name} ({kind})",
                    f"{float(error.abs().max()):.3e}",
                    f"{float(error.square().mean().sqrt()):.3e}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _outputs_of(outdir: Path, source: str) -> tuple[Path, Path]:
    """The latents and reconstruction that ``bdia invert --images`` writes for ``source``."""
    stem = Path(source).stem  # a record's names never lead out of the folder
    return outdir / f"{stem}.safetensors", outdir / f"{stem}-reconstruction.png"


def _listed_by_ranks(outdir: Path, recorded: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The images that other ranks of a stopped torchrun run listed in their own files, where
    those were made with the summary's settings (a damaged or foreign listing is passed
    over: its images are then made again)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in _rank_listings(outdir):
        try:
            listing = json.loads(path.read_text())
            if any(listing.get(k) != v for k, v in recorded.items() if k != "images"):
                continue
            entries.update({str(e["source"]): dict(e) for e in listing["images"]})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return entries


def _claim_invert_outdir(
    outdir: Path, files: list[Path], settings: dict[str, Any], overwrite: bool
) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Check --outdir's summary against ``settings``: ``(entries kept, files to remove)``.

    The summary is written before the first image and lists each image once its files are
    written (under torchrun, ranks but 0 list theirs in files of their own, which count as
    the summary's), so an interrupted run resumes, also one killed: an image listed with the
    same source file (by hash) and both outputs present is skipped, and one not listed is
    made (again). A folder
    made with other settings, or holding outputs of these images but no summary, is refused
    unless ``overwrite``; with it, the images listed under other settings are removed.
    """
    from . import generate
    from ._files import file_sha256

    summary = outdir / INVERT_SUMMARY
    if not summary.is_file():
        targets = [t for p in files for t in _outputs_of(outdir, p.name)]
        _refuse_existing(outdir, targets, overwrite, f"outputs not listed in {INVERT_SUMMARY}")
        return {}, []
    try:
        recorded = json.loads(summary.read_text())
        if recorded.get("format") != INVERT_FORMAT:
            raise ValueError(f"format {recorded.get('format')!r}")
        entries = {str(e["source"]): dict(e) for e in recorded["images"]}
        entries.update(_listed_by_ranks(outdir, recorded))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        if not overwrite:
            raise click.BadParameter(
                f"{str(summary)!r} is not a summary this version of bdia reads ({err}); move "
                "the folder aside or pass --overwrite",
                param_hint="'--outdir'",
            ) from None
        return {}, []
    differences = generate.differing_settings({k: recorded.get(k) for k in settings}, settings)
    if differences:
        if not overwrite:
            raise click.ClickException(
                f"--outdir {str(outdir)!r} was made with other settings: "
                f"{'; '.join('--' + d for d in differences)}. Use --overwrite to replace its "
                "files with these settings, or another --outdir"
            )
        return {}, [t for source in entries for t in _outputs_of(outdir, source)]
    kept = {
        source: e
        for source, e in entries.items()
        if all(t.exists() for t in _outputs_of(outdir, source))
    }
    sources = {p.name: p for p in files}
    for source, e in list(kept.items()):
        if source not in sources:
            continue
        if overwrite:
            del kept[source]
        elif e.get("source sha256") != file_sha256(sources[source]):
            raise click.ClickException(
                f"--outdir {str(outdir)!r} holds the outputs of another {source} (its "
                "contents differ): use --overwrite to replace them, or another --outdir"
            )
    # Outputs of these images that the summary does not list are those of an image that
    # was being written when a run with these settings stopped: they are made again.
    return kept, []


def _invert_images(
    net: torch.nn.Module,
    files: list[Path],
    class_label: int | None,
    outdir: Path,
    exact: Any,
    ts: torch.Tensor,
    settings: dict[str, Any],
    network_path: str,
    entries: dict[str, dict[str, Any]],
    device: str | None,
    no_progress: bool,
    rank: int,
    world: int,
) -> None:
    """Invert each checked PNG on its own; write its latents, reconstruction and the summary.

    ``entries``: the summary's images kept from earlier runs with these settings; those of
    ``files`` among them are skipped. Under torchrun, rank ``rank`` of ``world`` inverts
    ``files[rank::world]``; rank 0 writes the summary and reports.
    """
    from . import generate
    from ._files import file_sha256
    from ._shards import share_of
    from .editing import Inversion
    from .latents import save_latents
    from .ode import DiffusionODE
    from .pairs import StatePair
    from .schedules import EDM

    steps, gamma = settings["steps"], settings["gamma"]
    state_dtype = DTYPE_NAMES[settings["state-dtype"]]
    device = _default_device(device)
    net = net.to(device)
    # One image per inversion: its file then holds the pair of a batch of one, whose ODE
    # (conditioning included) is the one `bdia sample --latents` rebuilds and fingerprints.
    labels = [class_label] if class_label is not None else []
    ode = DiffusionODE(net, EDM(), cond=generate._conditioning(net, labels, 1, device))
    name = f"bdia({exact.solver.name}, {gamma})"
    skipped = [p for p in files if p.name in entries]
    if rank == 0:
        click.echo(
            f"{_images(len(files))}"
            f"{'' if class_label is None else f' of class {class_label}'}; {name}, {steps} "
            f"steps from sigma {settings['sigma-max']:g} to {settings['sigma-min']:g}; "
            f"{settings['state-dtype']} state, float32 network"
            + (f"; {len(skipped)} already in {outdir}, skipped" if skipped else "")
        )
    summary = {
        "format": INVERT_FORMAT,
        "bdia": __version__,
        **settings,
        "network path": network_path,
        "grid": [float(t) for t in ts],
    }

    made: dict[str, dict[str, Any]] = {}  # the images of this run, by source name

    def write_summary(final: bool) -> None:
        # In the order of files whichever rank made them, so that the summary is the same
        # for any number of ranks.
        listed = {**entries, **made}
        named = {p.name for p in files}
        images = [e for source, e in entries.items() if source not in named]
        images += [listed[p.name] for p in files if p.name in listed]
        done = {}
        if final:
            done = {
                "max abs error": max(e["max abs error"] for e in images),
                "rms error": math.sqrt(sum(e["rms error"] ** 2 for e in images) / len(images)),
            }
        record = {**summary, **done, "images": images}
        write_atomic(outdir / INVERT_SUMMARY, json.dumps(record, indent=1) + "\n")

    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        write_summary(final=False)  # first: a rerun after an interruption resumes
        # The summary now lists what the ranks' own listings held.
        for listing in _rank_listings(outdir):
            listing.unlink(missing_ok=True)
    # No rank writes before rank 0 has removed the old files and written the summary.
    _wait_for_ranks(world)

    def list_made() -> None:
        # After each image, so that a run killed midway keeps what it made.
        if rank == 0:
            write_summary(final=False)
        else:
            record = {**summary, "images": list(made.values())}
            write_atomic(_rank_listing(outdir, rank), json.dumps(record, indent=1) + "\n")

    mine = share_of(files, rank, world)
    per_image = 2 * steps - 1
    show = not no_progress and rank == 0
    with _Progress(len(mine) * per_image, "invert", "step", show) as bar:
        bar.update(sum(p.name in entries for p in mine) * per_image)
        try:
            for path in mine:
                if path.name in entries:
                    continue
                x = _read_png(path, device, state_dtype)
                inversion = Inversion.of(
                    ode,
                    exact,
                    x,
                    ts,
                    state_dtype=state_dtype,
                    progress=False,
                    callback=lambda info: bar.update(),
                )
                back = inversion.reconstruct(progress=False, callback=lambda info: bar.update())
                # In the state dtype; widened for the norm on the host (MPS has no float64).
                error = (back - x).cpu()
                latents, reconstruction = _outputs_of(outdir, path.name)
                assert isinstance(inversion.pair, StatePair)  # exact is a bdia solver
                save_latents(
                    latents,
                    inversion.pair,
                    ts,
                    solver=exact.solver.name,
                    gamma=gamma,
                    class_label=class_label,
                    network=settings["network"],
                    network_path=network_path,
                    source=path.name,
                )
                write_png(reconstruction, generate.to_uint8(back)[0])
                made[path.name] = {
                    "source": path.name,
                    "source sha256": file_sha256(path),
                    "latents": latents.name,
                    "reconstruction": reconstruction.name,
                    "max abs error": float(error.abs().max()),
                    "rms error": float(error.double().square().mean().sqrt()),
                }
                list_made()
        finally:
            if rank == 0:
                write_summary(final=False)
    if world > 1:
        import torch.distributed as dist

        # The other ranks' images join the summary once all are made; until then their
        # own listings hold them.
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, made)
        for part in parts:
            made.update(part)
    _wait_for_ranks(world, leave=True)
    if rank != 0:
        return
    listed = {**entries, **made}
    done = [listed[p.name] for p in files]
    worst = max(e["max abs error"] for e in done)
    rms = math.sqrt(sum(e["rms error"] ** 2 for e in done) / len(done))
    click.echo(
        f"round trip (exact reconstruction, {settings['state-dtype']} state): "
        f"max abs error {worst:.3e}, rms error {rms:.3e}"
    )
    write_summary(final=True)
    for listing in _rank_listings(outdir):
        listing.unlink(missing_ok=True)
    click.echo(
        f"wrote the latents and reconstructions of {_images(len(files))} and {INVERT_SUMMARY} "
        f"to {outdir}",
        err=True,
    )


# Options of `bdia sample` that --latents takes from the files (or that do not apply).
_NOT_WITH_LATENTS = {
    "solver_name": "--solver",
    "gamma": "--gamma",
    "steps": "--steps",
    "sigma_min": "--sigma-min",
    "sigma_max": "--sigma-max",
    "rho": "--rho",
    "state_dtype": "--state-dtype",
    "network_dtype": "--dtype",
    "batch": "--batch",
    "compile_net": "--compile",
}


def _latents_damage(pair: Any, ts: torch.Tensor) -> str | None:
    """What makes a loaded latents file unusable although it reads, or None.

    A file of ``bdia invert --images`` holds finite states and a grid of at least three
    points (two steps), finite, non-negative and strictly decreasing.
    """
    states = [pair.earlier, pair.later, pair.earlier_low, pair.later_low]
    if not all(bool(t.isfinite().all()) for t in states if t is not None):
        return "its states hold NaN or Inf"
    if not bool(ts.isfinite().all()):
        return "its grid ts holds NaN or Inf"
    if len(ts) < 3:
        return f"its grid ts has {len(ts)} points; bdia needs at least 3 (two steps)"
    if not bool((ts[1:] < ts[:-1]).all()) or float(ts[-1]) < 0:
        return "its grid ts is not a noise grid (decreasing from the noisiest point to >= 0)"
    return None


def _sample_latents(
    latents_path: Path,
    network_spec: str | None,
    class_label: int | None,
    outdir: Path | None,
    overwrite: bool,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """``bdia sample --latents``: each file's reconstruction, or its edit to ``class_label``."""
    import dataclasses

    from . import generate
    from ._shards import share_of
    from .editing import Inversion
    from .latents import load_latents
    from .ode import DiffusionODE, wide_dtype
    from .schedules import EDM

    ctx = click.get_current_context()
    given = {
        name: opt
        for name, opt in {"seeds": "--seeds", "grid_path": "--grid", **_NOT_WITH_LATENTS}.items()
        if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
    }
    for name in ("seeds", "grid_path"):
        if name in given:
            raise click.UsageError(
                f"--latents and {given[name]} exclude each other: --latents regenerates saved "
                "latents, one NAME.png per file in --outdir; leave "
                f"{given[name]} out"
            )
    if given:
        leave = ", ".join(given.values())
        raise click.UsageError(
            "--latents takes the grid, solver, gamma and state dtype from each file, and "
            f"regenerates it on its own with the float32 network: leave {leave} out"
        )
    if outdir is None:
        raise click.UsageError("give --outdir: one NAME.png per latents file goes there")

    # Every file is read and checked before the network is moved or anything is written.
    files = _files_of(latents_path, ".safetensors", "--latents")
    checked = []
    for path in files:
        try:
            pair, ts, meta = load_latents(path)
        except (FileNotFoundError, ValueError) as err:
            raise click.BadParameter(_one_line(str(err)), param_hint="'--latents'") from None
        damage = _latents_damage(pair, ts)
        if damage:
            raise click.BadParameter(
                f"{str(path)!r} is damaged: {damage}; invert the image again",
                param_hint="'--latents'",
            )
        try:
            solver = bdia(get_solver(meta["solver"]), meta["gamma"])
        except (KeyError, TypeError, ValueError) as err:
            raise click.BadParameter(
                f"{str(path)!r} records solver {meta['solver']!r} with gamma "
                f"{meta['gamma']!r}, which this bdia cannot run ({_one_line(str(err))})",
                param_hint="'--latents'",
            ) from None
        if pair.earlier.dtype.itemsize > wide_dtype(_default_device(device)).itemsize:
            where = _default_device(device)
            raise click.BadParameter(
                f"{str(path)!r} holds a {dtype_name(pair.earlier.dtype)} state, which {where} "
                f"cannot hold; regenerate it on another device (--device cpu)",
                param_hint="'--device'",
            )
        checked.append((path, tuple(pair.earlier.shape), meta, solver))
    if network_spec is None:
        recorded = sorted({meta["network_path"] for _, _, meta, _ in checked})
        if len(recorded) != 1 or not recorded[0]:
            raise click.UsageError(
                "give --network: the latents name "
                + (f"several networks ({', '.join(recorded)})" if len(recorded) > 1 else "none")
            )
        try:
            net = _load_denoiser(recorded[0])
        except click.BadParameter as err:
            raise click.BadParameter(
                f"the latents were made with {recorded[0]!r}: {err.message}; give --network",
                param_hint="'--network'",
            ) from None
        network_spec = recorded[0]
    else:
        net = _load_denoiser(network_spec)
    _check_class(net, class_label)
    label_dim = getattr(net, "label_dim", 0)
    shape = (1, net.img_channels, net.img_resolution, net.img_resolution)

    def ode_of(label: int | None, where: str) -> DiffusionODE:
        labels = [] if label is None else [label]
        return DiffusionODE(net, EDM(), cond=generate._conditioning(net, labels, 1, where))

    for path, got, meta, _ in checked:
        recorded_class = meta["class"]
        fits = (recorded_class is None) == (not label_dim) and (
            recorded_class is None or 0 <= recorded_class < label_dim
        )
        now = ode_of(recorded_class, "cpu").fingerprint() if fits and got == shape else None
        if now != meta["fingerprint"]:
            if now is None:
                why = (
                    f"it holds {got} states of class {recorded_class}; {network_spec!r} takes "
                    f"{shape} and {label_dim or 'no'} classes"
                )
            else:
                why = f"ODE fingerprint {meta['fingerprint']} in the file, {now} with this network"
            if meta["network"] == _network_identity(network_spec)[0]:
                # The very network the file records: the file, not the network, is wrong.
                raise click.BadParameter(
                    f"{str(path)!r} records {network_spec!r}, the network given, but does "
                    f"not fit it ({why}): the file is damaged or not from bdia invert; "
                    "invert the image again",
                    param_hint="'--latents'",
                )
            maker = meta["network_path"] or "an unrecorded network"
            raise click.BadParameter(
                f"{str(path)!r} was made with another network, {maker} "
                f"({meta['network'][:19]}...), not {network_spec!r} ({why}); give the "
                "--network it was inverted with",
                param_hint="'--latents'",
            )
    targets = [outdir / f"{path.stem}.png" for path, *_ in checked]
    if outdir.is_dir():
        _refuse_existing(outdir, targets, overwrite, "images of these latents")
    edits = sum(class_label not in (None, meta["class"]) for _, _, meta, _ in checked)

    _set_threads(threads, net)
    rank, world = _distributed()
    # Every rank has looked for existing images before any rank writes one.
    _wait_for_ranks(world)
    device = _default_device(device)
    net = net.to(device)
    mine = share_of(list(zip(checked, targets)), rank, world)
    with _Progress(len(mine), "images", "img", not no_progress and rank == 0) as bar:
        for (path, _, meta, solver), target in mine:
            pair, ts, _ = load_latents(path)
            pair = dataclasses.replace(
                pair,
                **{
                    field: getattr(pair, field).to(device)
                    for field in ("earlier", "later", "earlier_low", "later_low")
                    if getattr(pair, field) is not None
                },
            )
            recorded_class = meta["class"]
            inversion = Inversion(ode_of(recorded_class, device), solver, ts, pair)
            if class_label is None or class_label == recorded_class:
                image = inversion.reconstruct(progress=False)
            else:
                # An edit starts afresh from the inverted noise: continuing the pair under
                # another label would carry its parasitic mode (see bdia.editing).
                image = inversion.regenerate(ode_of(class_label, device), progress=False)
            write_png(target, generate.to_uint8(image)[0])
            bar.update()
    _wait_for_ranks(world, leave=True)
    if rank != 0:
        return
    what = f"{len(checked) - edits} reconstructed"
    if edits:
        what += f", {edits} edited to class {class_label}"
    click.echo(f"{_images(len(checked))} in {outdir} ({what})", err=True)


def _write_sample_grid(
    path: Path,
    net: torch.nn.Module,
    solver: Solver,
    ts: torch.Tensor,
    seeds: list[int],
    class_label: int | None,
    batch: int,
    state_dtype: torch.dtype,
    device: str,
    on_batch: Callable[[int], None] | None = None,
    outdir: Path | None = None,
) -> None:
    """Sample ``seeds`` and write them as one grid, its columns captioned with their class.

    With ``outdir``, the seeds' PNGs there (sampled with these settings and ``class_label``,
    or unconditionally) are tiled instead of sampling them again.
    """
    import numpy as np
    from PIL import Image

    from . import generate

    label_dim = getattr(net, "label_dim", 0)
    shape = generate._image_shape(net)
    if label_dim and class_label is None:
        # One class per column, so that every row shows each class once.
        classes: list[int] | int | None = [i % label_dim for i in range(len(seeds))]
        columns = label_dim
    else:
        classes, columns = class_label, min(len(seeds), 8)
    images, labels = [], []
    if outdir is not None:
        for seed in seeds:
            with Image.open(generate.image_path(outdir, seed)) as im:
                images.append(np.asarray(im)[None])
        labels = [class_label] * len(seeds) if label_dim else []
        seeds_to_sample: list[int] = []
    else:
        seeds_to_sample = seeds
    for start in range(0, len(seeds_to_sample), batch):
        group = seeds[start : start + batch]
        fixed = classes[start : start + batch] if isinstance(classes, list) else classes
        noise, drawn = generate.seed_inputs(group, shape, label_dim, fixed)
        out = generate.sample_images(
            net, solver, ts, noise, drawn, state_dtype=state_dtype, device=device
        )
        images.append(generate.to_uint8(out))
        labels += drawn
        if on_batch is not None:
            on_batch(len(group))
    captions = [str(c) for c in labels[:columns]] if label_dim else None
    rows = -(-len(seeds) // columns)
    row_captions = [str(seeds[r * columns]) for r in range(rows)]
    canvas = generate.grid_image(
        np.concatenate(images), columns, captions=captions, row_captions=row_captions
    )
    generate.write_grid(path, canvas)


def _fid_inputs(command: Callable[..., Any]) -> Callable[..., Any]:
    """--images, --detector, --batch, --workers, --device and --no-progress, shared by fid and
    fid-ref."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option(
            "--images",
            required=True,
            type=InputPathType(path_type=Path),
            help="Folder of images (searched recursively, skipping hidden files and folders), "
            "or an .npz of uint8 NHWC images.",
        ),
        click.option(
            "--detector",
            required=True,
            type=InputPathType(dir_okay=False, path_type=Path),
            help="NVIDIA's TorchScript Inception, inception-2015-12-05.pt (a local file).",
        ),
        click.option(
            "--batch",
            default=64,
            show_default=True,
            type=click.IntRange(1),
            help="Images per detector call.",
        ),
        click.option(
            "--workers",
            default=None,
            type=click.IntRange(0),
            help="Processes that check the image files' headers first, then read and "
            "decode images while the detector runs (0: none, all in this process). Default: "
            "0 on the CPU; on a GPU min(4, cores per process - 1).",
        ),
        _device_option,
        _threads_option("torch's (one per core); decoding workers use one each"),
        _progress_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _gathered_statistics(
    detector_path: Path,
    images: Path,
    batch: int,
    workers: int | None,
    device: str | None,
    threads: int | None,
    show: bool,
    reference: tuple[Path, int] | None = None,
) -> tuple[Any, int]:
    """Feature statistics of ``images``, split across torchrun ranks and summed.

    ``reference``: the path and dimension of the reference statistics the features will be
    compared with; a detector whose features have another dimension is refused before any
    image is read.
    """
    from .metrics import fid

    _set_threads(threads)
    device = _default_device(device)
    try:
        detector = fid.load_detector(detector_path, device)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(_one_line(str(err)), param_hint="'--detector'") from None
    if reference is not None:
        _check_feature_dim(detector, device, detector_path, *reference)
    try:
        items = fid.list_images(images)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(_one_line(str(err)), param_hint="'--images'") from None
    if len(items) < 2:
        raise click.BadParameter(
            f"{str(images)!r} holds 1 image; FID statistics need at least 2 (a covariance), "
            "and in practice 10k-50k",
            param_hint="'--images'",
        )
    # After the checks: a refused run joins no group.
    rank, world = _distributed()
    mine = len(items[rank::world])
    with _Progress(mine, "features", "img", show and rank == 0) as bar:
        try:
            stats = fid.image_statistics(
                detector,
                images,
                batch=batch,
                device=device,
                rank=rank,
                world_size=world,
                workers=workers,
                on_batch=bar.update,
            )
        except ValueError as err:
            raise click.BadParameter(_one_line(str(err)), param_hint="'--images'") from None
    if world > 1:
        import torch.distributed as dist

        # A rank with no images (more ranks than images) joins with zeros.
        stats.all_reduce(device)
        dist.destroy_process_group()
    # Images are uint8, so features holding NaN or Inf come from the detector; saying so
    # here beats a refusal of the statistics that would name the reference or the output.
    with warnings.catch_warnings():
        # Too few images are warned of where the caller takes sigma; here it would be twice.
        warnings.simplefilter("ignore", fid.FIDSampleSizeWarning)
        sums = (float(stats.mu.sum()), float(stats.sigma.sum()))
    if not all(math.isfinite(v) for v in sums):
        raise click.BadParameter(
            f"{str(detector_path)!r} gave features holding NaN or Inf for the images of "
            f"{str(images)!r}; use the Inception detector file (EDM's inception-2015-12-05)",
            param_hint="'--detector'",
        )
    return stats, rank


def _check_feature_dim(
    detector: torch.nn.Module, device: str, detector_path: Path, ref_path: Path, ref_dim: int
) -> None:
    """Refuse a reference whose dimension differs from the detector's features.

    The detector sees one blank 299x299 image (its input size; fractions of a second),
    which tells its feature dimension before the images' features are computed.
    """
    blank = torch.zeros(1, 3, 299, 299, dtype=torch.uint8, device=device)
    try:
        with torch.no_grad():
            features = detector(blank, return_features=True)
        dim = int(features.shape[-1]) if features.ndim == 2 else None
    except (RuntimeError, TypeError, ValueError, AttributeError):
        dim = None
    if dim is None:
        raise click.BadParameter(
            f"{str(detector_path)!r} does not map a uint8 image batch to features as the "
            "Inception detector does (detector(images, return_features=True) -> (N, D))",
            param_hint="'--detector'",
        )
    if dim != ref_dim:
        raise click.BadParameter(
            f"{str(ref_path)!r} holds statistics of {ref_dim} features and --detector "
            f"{str(detector_path)!r} gives {dim}: use reference statistics made with this "
            "detector (EDM's, or `bdia fid-ref` with this --detector)",
            param_hint="'--ref'",
        )


@main.command(name="fid")
@click.option(
    "--ref",
    "ref_path",
    required=True,
    type=InputPathType(dir_okay=False, path_type=Path),
    help="Reference statistics: an .npz with arrays mu and sigma (EDM's, or `bdia fid-ref`).",
)
@_fid_inputs
def fid_command(
    ref_path: Path,
    images: Path,
    detector: Path,
    batch: int,
    workers: int | None,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Frechet Inception Distance of IMAGES against reference statistics, as EDM computes it."""
    from .metrics import fid

    try:
        mu_ref, sigma_ref = fid.load_reference(ref_path)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(_one_line(str(err)), param_hint="'--ref'") from None
    stats, rank = _gathered_statistics(
        detector, images, batch, workers, device, threads, not no_progress, (ref_path, mu_ref.size)
    )
    if rank == 0:
        try:
            value = fid.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
        except ValueError as err:
            raise click.BadParameter(_one_line(str(err)), param_hint="'--ref'") from None
        click.echo(f"{value:.6g}")
        # The rate is of all ranks together: every image over the slowest rank's time.
        rate = stats.images_per_second
        click.echo(f"FID over {stats.n} images; features at {rate:,.1f} images/s", err=True)


@main.command(name="fid-ref")
@click.option(
    "--out",
    required=True,
    type=OutputPathType(suffix=".npz"),
    help="The .npz of reference statistics (mu, sigma) to write.",
)
@_overwrite_option("Replace --out if it exists.")
@_fid_inputs
def fid_ref_command(
    out: Path,
    overwrite: bool,
    images: Path,
    detector: Path,
    batch: int,
    workers: int | None,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Write reference statistics (mu, sigma) of IMAGES to an npz in EDM's format."""
    from .metrics import fid

    _refuse_existing_file(out, "--out", overwrite)
    stats, rank = _gathered_statistics(
        detector, images, batch, workers, device, threads, not no_progress
    )
    if rank == 0:
        fid.save_reference(out, stats.mu, stats.sigma)
        rate = stats.images_per_second
        click.echo(f"wrote {out} from {stats.n} images; features at {rate:,.1f} images/s", err=True)


@main.command()
@click.argument("source", type=InputPathType(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=OutputPathType(suffix=".safetensors"))
@_overwrite_option("Replace TARGET if it exists.")
def convert(source: Path, target: Path, overwrite: bool) -> None:
    """Convert an EDM network pickle to a bdia safetensors file (no code from SOURCE runs)."""
    from .models.checkpoints import UnsafeCheckpointError, load_network, save_network

    _refuse_existing_file(target, "TARGET", overwrite)
    try:
        net = load_network(source)
    except (FileNotFoundError, ValueError, UnsafeCheckpointError) as err:
        raise click.BadParameter(_one_line(str(err)), param_hint="'SOURCE'") from None
    if not _rank_zero_alone():
        return
    save_network(net, target)
    count = sum(p.numel() for p in net.parameters())
    # save_network has checked the recorded config dict, which nn.Module's typing takes for a
    # tensor or submodule.
    name = net.config["class_name"]  # type: ignore[index]
    click.echo(f"wrote {target}: {name}, {count:,} parameters")


# ---------------------------------------------- edit: a photo through a diffusers pipeline

#: Parts of a pipeline folder that edit_image never uses, left unloaded: Stable Diffusion's
#: safety checker alone is a CLIP vision model of 1.2 GB.
_UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
#: Image modes read as RGB: 8 bits a channel, grey, palette, CMYK or YCbCr (an alpha channel
#: must be opaque). 16-bit and float images (I;16, I, F) would be clipped by the conversion.
_PHOTO_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
#: The largest side --size takes: a typo such as 51200x51200 would fill the memory.
MAX_SIDE = 16384
#: edit_image's names in its messages, and the options that set them (or the words of a
#: command line), in the order tried at each place.
_EDIT_OPTIONS = {
    "num_inference_steps = ": "--steps ",
    "num_inference_steps": "--steps",
    "guidance_scale = ": "--guidance ",
    "guidance_scale": "--guidance",
    "negative_prompt": "--negative",
    "state_dtype": "--state-dtype",
    # A pipeline's own parameter keeps its name: "as the pipeline's mask_image".
    "'s mask_image": "'s mask_image",
    "mask_image": "--mask",
    "'s control_image=": "'s control_image=",
    "control_image": "--control-image",
    "(a list, one per controlnet, for several)": "(once per controlnet, for several)",
}


def _finite_if_given(ctx: Any, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


class SizeType(click.ParamType):
    """An image size ``WxH`` (width first, as image sizes are written), each side in
    1..MAX_SIDE."""

    name = "WxH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
            self.fail(f"{value!r} is not a size WxH, such as 512x512 or 1024x768", param, ctx)
        width, height = (int(p) for p in parts)
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            self.fail(f"{value!r}: each side must lie in 1..{MAX_SIDE}", param, ctx)
        return width, height


def _pipeline_folder(ctx: Any, param: click.Parameter, value: Path) -> Path:
    """--pipeline: a folder that ``save_pretrained`` wrote (its model_index.json names the
    pipeline's class); nothing is downloaded, so a hub name is no pipeline here."""
    if not value.exists():
        raise click.BadParameter(
            f"{str(value)!r} does not exist: give the local folder of a diffusers pipeline "
            "(bdia downloads nothing; hf download NAME --local-dir DIR fetches one)",
            ctx,
            param,
        )
    if not value.is_dir():
        raise click.BadParameter(
            f"{str(value)!r} is a file; give the folder of a diffusers pipeline, which holds "
            "model_index.json",
            ctx,
            param,
        )
    index = value / "model_index.json"
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        why = "has no model_index.json" if not index.exists() else f"model_index.json: {err}"
        raise click.BadParameter(
            f"{str(value)!r} is not a diffusers pipeline folder ({_one_line(why)}); give the "
            "folder that save_pretrained wrote, with model_index.json and one folder per part",
            ctx,
            param,
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise click.BadParameter(
            f"{str(index)!r} names no pipeline class (_class_name); it is not a diffusers "
            "pipeline's model_index.json",
            ctx,
            param,
        )
    return value


def _read_image(path: Path, option: str) -> Any:
    """The image file ``path`` given as ``option`` (--image, --mask, --control-image) as an RGB
    PIL image, upright as its EXIF orientation says; a file that is no image, a transparent
    image or a 16-bit one is refused naming ``option``."""
    import numpy as np
    from PIL import Image, ImageOps

    from .metrics.fid import _IMAGE_ERRORS

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(f"{str(path)!r} {why}", param_hint=f"'{option}'")

    try:
        with Image.open(path) as im:
            im.load()
            picture = ImageOps.exif_transpose(im)
    except (*_IMAGE_ERRORS, Image.DecompressionBombError) as err:
        raise refuse(f"is not a readable image ({_one_line(str(err))})") from None
    if picture.mode not in _PHOTO_MODES:
        raise refuse(
            f"has mode {picture.mode} (16-bit or float pixels), which RGB would clip; save it "
            "with 8 bits a channel"
        )
    if "A" in picture.getbands() or "transparency" in picture.info:
        if int(np.asarray(picture.convert("RGBA"))[..., 3].min()) < 255:
            # The colour under a transparent pixel is whatever the file holds there.
            raise refuse(
                "has transparent pixels, whose colour means nothing; flatten it onto a "
                "background first"
            )
    return picture.convert("RGB")


def _read_beside(path: Path, option: str, what: str, photo: Any, image: Path) -> Any:
    """--mask or a --control-image (``what`` names it), read as ``_read_image`` reads it and
    refused unless it has the size of ``photo``, the image at ``image`` as read: it is drawn
    on the photo, and --size resizes the two alike."""
    picture = _read_image(path, option)
    if picture.size != photo.size:
        raise click.BadParameter(
            f"{str(path)!r} is {picture.size[0]}x{picture.size[1]}, but --image "
            f"{str(image)!r} is {photo.size[0]}x{photo.size[1]}; give {what} of the photo's "
            "own size (--size resizes both alike)",
            param_hint=f"'{option}'",
        )
    return picture


def _resized(picture: Any, size: tuple[int, int] | None) -> Any:
    """``picture`` resized to ``size`` (W, H) with Lanczos filtering, if given."""
    from PIL import Image

    if size is None or picture.size == size:
        return picture
    # Image.LANCZOS, not Image.Resampling (missing from Pillow 9.0, the oldest supported).
    return picture.resize(size, Image.LANCZOS)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """diffusers' and transformers' log lines and loading bars off while loading, and as
    they were after."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    loggers = (diffusers_logging, transformers_logging)
    before = [(log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    for log in loggers:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # Newer diffusers and transformers call it dtype and warn of torch_dtype, the only
            # name diffusers 0.34 to 0.36 and transformers before 4.56 know.
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated")
            # diffusers' own ChromaTransformer2DModel and FluxControlNetModel build FluxPosEmbed
            # from the module that deprecates it: nothing the user can change.
            warnings.filterwarnings("ignore", "`FluxPosEmbed` is deprecated", FutureWarning)
            yield
    finally:
        for log, (level, bars) in zip(loggers, before):
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


def _load_pipeline(folder: Path, dtype: torch.dtype, keep: tuple[str, ...] = ()) -> Any:
    """``DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)``
    without its log lines and bars; a folder it cannot load is refused naming --pipeline.

    Parts recorded as absent in model_index.json (an SD3 pipeline saved without T5) are
    passed as None, which diffusers requires of them, and so are those edit_image never
    uses (_UNUSED_PARTS) but the ones named in ``keep`` (an IP-Adapter's image encoder and
    feature extractor).
    """
    import diffusers

    config = json.loads((folder / "model_index.json").read_text())
    unused = set(_UNUSED_PARTS) - set(keep)
    parts = {
        name: None
        for name, value in config.items()
        if not name.startswith("_") and (value == [None, None] or name in unused)
    }
    try:
        with _quietly():
            return diffusers.DiffusionPipeline.from_pretrained(
                folder, local_files_only=True, torch_dtype=dtype, **parts
            )
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # whatever the folder lacks or holds wrong, in diffusers' words
        raise click.BadParameter(
            f"{str(folder)!r} does not load as a diffusers pipeline ({type(err).__name__}: "
            f"{_one_line(str(err))})",
            param_hint="'--pipeline'",
        ) from err


def _check_photo_size(
    pipe: Any, picture: Any, image: Path, size: tuple[int, int] | None, name: str
) -> None:
    """Refuse an image (or --size) that ``pipe`` cannot take, before any network runs."""
    from .integrations.diffusers.editing import _image_sizes, _network

    try:
        net, kind = _network(pipe)
    except ValueError as err:
        raise click.BadParameter(
            f"a {name}: {_one_line(str(err))}", param_hint="'--pipeline'"
        ) from None
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise click.BadParameter(
            f"a {name} without a vae: edit_image edits the latents of a latent-diffusion "
            "pipeline (Stable Diffusion, SDXL, SD3, Flux, Chroma, Qwen-Image, Z-Image, Flux.2)",
            param_hint="'--pipeline'",
        )
    sizes = _image_sizes(pipe, vae, getattr(net, "config", None) or {}, kind)
    factor, (width, height) = sizes.factor, picture.size
    largest = sizes.patches * factor if sizes.patches is not None else None
    if not (width % factor or height % factor) and (
        largest is None or max(picture.size) <= largest
    ):
        return
    fit = [max(factor, min(side, largest or side) // factor * factor) for side in picture.size]
    needs = f"a {name} takes sides that are multiples of {sizes.what}"
    if largest is not None:
        needs += f", at most {largest}"
    if size is not None:
        raise click.BadParameter(
            f"{width}x{height}: {needs}; use e.g. --size {fit[0]}x{fit[1]}", param_hint="'--size'"
        )
    raise click.BadParameter(
        f"{str(image)!r} is {width}x{height}; {needs}: pass --size {fit[0]}x{fit[1]} to resize "
        "it, or crop it to that size",
        param_hint="'--image'",
    )


def _control_images(pipe: Any, images: list[Any], name: str) -> Any:
    """--control-image as edit_image's ``control_image``: None, the one image of a
    ControlNetModel, or a list of one per net of a MultiControlNetModel, in their order;
    another count than the pipeline's nets is refused. For a pipeline without a controlnet,
    the images as given, which edit_image refuses in its words."""
    from .integrations.diffusers._controlnet import _MULTI_CONTROLNET
    from .integrations.diffusers._scheduler_config import _class_names

    if not images:
        return None
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return images[0] if len(images) == 1 else images
    multi = _MULTI_CONTROLNET in _class_names(controlnet)
    count = len(controlnet.nets) if multi else 1
    if len(images) != count:
        nets = f"{count} controlnets ({_MULTI_CONTROLNET})" if multi else "one controlnet"
        times = f"{count} times, one per controlnet in their order" if multi else "once"
        raise click.BadParameter(
            f"given {_count(len(images), 'time')}, but the {name} has {nets}; give it {times}",
            param_hint="'--control-image'",
        )
    return images if multi else images[0]


#: The IP-Adapter weight files that load_ip_adapter reads (its weight_name): safetensors, keys
#: image_proj.NAME and ip_adapter.NAME (or XLabs' names, for Flux), or a torch file of the
#: two dicts.
_IP_ADAPTER_SUFFIXES = (".safetensors", ".bin")
#: The parts of XLabs' Flux IP-Adapter files by their key prefixes, as Flux's load_ip_adapter
#: reads them beside image_proj and ip_adapter.
_XLABS_PARTS = {"ip_adapter_proj_model": "image_proj", "double_blocks": "ip_adapter"}
#: The networks whose IP-Adapters bdia edit loads, by the class model_index.json gives the
#: pipeline's transformer; a unet's (Stable Diffusion, SDXL) is "unet". Chroma's transformer
#: loads Flux's (ChromaPipeline has FluxIPAdapterMixin's load_ip_adapter).
_IP_ADAPTER_TRANSFORMERS = {
    "FluxTransformer2DModel": "flux",
    "ChromaTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
}
#: Each family's image encoder, its transformers class and model_type (a whole CLIP or SigLIP
#: model's folder is read for its vision model, as from_pretrained reads it), and the image
#: processor SD3's load_ip_adapter reads from the encoder's folder (the others make one).
_IMAGE_ENCODERS = {
    "unet": ("CLIPVisionModelWithProjection", "clip", None),
    "flux": ("CLIPVisionModelWithProjection", "clip", None),
    "sd3": ("SiglipVisionModel", "siglip", "SiglipImageProcessor"),
}
#: The load_ip_adapter argument of each family that says where its image encoder is, None
#: once it is registered.
_ENCODER_ARGUMENT = {
    "unet": "image_encoder_folder",
    "flux": "image_encoder_pretrained_model_name_or_path",
    "sd3": "image_encoder_folder",
}
#: The folder of the network an IP-Adapter loads into, by family.
_NETWORK_FOLDER = {"unet": "unet", "flux": "transformer", "sd3": "transformer"}


def _ip_adapter_scale(ctx: Any, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(
            f"{value} is not a finite number >= 0 (the image prompt's weight: 0 turns it off, "
            "1 is the adapter's own)",
            ctx,
            param,
        )
    return value


def _ip_adapter_family(index: dict[str, Any]) -> str:
    """Whose IP-Adapter the pipeline of ``index`` (its model_index.json) takes: "unet" (Stable
    Diffusion, SDXL), "flux" (Flux's and Chroma's) or "sd3", by its network; a pipeline class
    of diffusers without load_ip_adapter, and another network, are refused naming
    --ip-adapter."""
    name = index["_class_name"]

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(
            f"a {name} {why}: give a Stable Diffusion, SDXL, SD3, Flux or Chroma pipeline that "
            "loads one (e.g. StableDiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline)",
            param_hint="'--ip-adapter'",
        )

    try:
        import diffusers
    except ImportError:  # the command says how to install it, after these checks
        known = None
    else:
        known = getattr(diffusers, name, None)
    if isinstance(known, type) and not hasattr(known, "load_ip_adapter"):
        raise refuse("takes no IP-Adapter (it has no load_ip_adapter)")
    if index.get("unet") not in (None, [None, None]):
        return "unet"
    kind = _transformer_class(index)
    if kind not in _IP_ADAPTER_TRANSFORMERS:
        raise refuse(
            f"has {'a ' + str(kind) if kind else 'no unet or transformer'}, whose IP-Adapter "
            "bdia edit does not map (it takes those of SD's and SDXL's unets, Flux's, Chroma's "
            "and SD3's transformers)"
        )
    return _IP_ADAPTER_TRANSFORMERS[kind]


def _transformer_class(index: dict[str, Any]) -> str | None:
    """The class model_index.json ``index`` gives the pipeline's transformer, None without."""
    network = index.get("transformer")
    return network[1] if isinstance(network, list) and len(network) == 2 else None


def _xlabs_name(name: str) -> str:
    """A Flux IP-Adapter's key and value map ``name`` in diffusers' words, as Flux's
    load_ip_adapter renames XLabs' (``N.processor.ip_adapter_double_stream_k_proj.weight``:
    ``N.to_k_ip.weight``)."""
    for xlabs, ours in (("k", "to_k_ip"), ("v", "to_v_ip")):
        name = name.replace(f"ip_adapter_double_stream_{xlabs}_proj", ours)
    return name.replace("processor.", "")


#: Each family's IP-Adapters in words: the article and family, whose pipelines load them,
#: and a released one.
_ADAPTER_FAMILIES = {
    "unet": ("a Stable Diffusion or SDXL", "Stable Diffusion's and SDXL's", "h94/IP-Adapter's"),
    "flux": ("a Flux", "Flux's", "XLabs-AI/flux-ip-adapter's"),
    "sd3": ("an SD3", "SD3's", "InstantX/SD3.5-Large-IP-Adapter's"),
}


def _ip_adapter_kind(
    shapes: dict[str, dict[str, tuple[int, ...]]], xlabs: bool
) -> tuple[str, str] | None:
    """Whose IP-Adapter the weights of ``shapes`` (by part and name, XLabs' renamed; ``xlabs``
    where the file had XLabs' keys) are, by what tells the families apart, and that evidence
    in words: ("flux", ...) for XLabs' keys or key and value maps with biases, ("sd3", ...) for
    a time-conditioned image projection or the processors' ``norm_ip``, ("unet", ...) for
    key and value maps without biases; None where nothing tells."""
    proj, maps = shapes["image_proj"], shapes["ip_adapter"]
    if xlabs:
        return "flux", "XLabs' keys ip_adapter_proj_model.* and double_blocks.*"
    if "time_embedding.linear_1.weight" in proj or any(".norm_ip." in n for n in maps):
        return "sd3", "its image projection is conditioned on the timestep"
    if any(n.endswith(".to_k_ip.bias") for n in maps):
        return "flux", "its key and value maps have biases"
    if any(n.endswith(".to_k_ip.weight") for n in maps):
        return "unet", "its key and value maps have no biases"
    return None


def _ip_adapter_shapes(path: Path, family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shapes of the IP-Adapter weights in ``path`` (--ip-adapter) by part
    (``image_proj``, ``ip_adapter``) and name, read without their values as ``family``'s
    load_ip_adapter names them: a safetensors file's header (for Flux, XLabs' keys
    ``ip_adapter_proj_model.*`` and ``double_blocks.*`` too), or a torch file memory-mapped
    where it is a zip (torch.save's format since 1.6). A suffix load_ip_adapter does not read,
    a file that does not read and one without both parts are refused naming --ip-adapter."""
    import zipfile

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(f"{str(path)!r} {why}", param_hint="'--ip-adapter'")

    if path.suffix not in _IP_ADAPTER_SUFFIXES:
        raise refuse(
            "is not an IP-Adapter's weight file: give its .safetensors or .bin file (as "
            "load_ip_adapter's weight_name, e.g. ip-adapter_sd15.safetensors)"
        )
    flux, xlabs = family == "flux", False
    shapes: dict[str, dict[str, tuple[int, ...]]] = {"image_proj": {}, "ip_adapter": {}}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    part, _, name = key.partition(".")
                    # XLabs' names are read for every family, so that a Flux adapter given
                    # to another pipeline is refused as one.
                    xlabs = xlabs or part in _XLABS_PARTS
                    part = _XLABS_PARTS.get(part, part)
                    if part in shapes:
                        name = _xlabs_name(name) if part == "ip_adapter" else name
                        shapes[part][name] = tuple(f.get_slice(key).get_shape())
        else:
            mmap = zipfile.is_zipfile(path)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            for part in shapes:
                tensors = state.get(part, {}) if isinstance(state, dict) else {}
                if isinstance(tensors, dict):
                    shapes[part] = {
                        str(k): tuple(v.shape) for k, v in tensors.items() if torch.is_tensor(v)
                    }
            if flux and isinstance(state, dict) and list(state) != list(shapes):
                raise refuse(
                    f"holds {[str(k) for k in state]}: Flux's load_ip_adapter takes a torch "
                    "file of exactly the dicts image_proj and ip_adapter, in that order"
                )
    except (MemoryError, click.BadParameter):
        raise
    except Exception as err:  # whatever the file holds wrong, in the reader's words
        raise refuse(f"does not read ({type(err).__name__}: {_one_line(str(err))})") from None
    found = _ip_adapter_kind(shapes, xlabs)
    if found is not None and found[0] != family:
        kind, evidence = found
        article, whose, example = _ADAPTER_FAMILIES[kind]
        wanted = _ADAPTER_FAMILIES[family]
        raise refuse(
            f"is {article} IP-Adapter ({evidence}), which only {whose} pipelines load; give "
            f"this pipeline {wanted[0]} IP-Adapter (e.g. {wanted[2]}), or this one to "
            f"{article} pipeline"
        )
    if not (shapes["image_proj"] and shapes["ip_adapter"]):
        raise refuse(
            "holds no IP-Adapter weights: load_ip_adapter needs image_proj and ip_adapter "
            "tensors (an IP-Adapter's own file, not a LoRA's or a model's)"
        )
    return shapes


def _image_encoder(
    pipeline: Path, adapter: Path, given: Path | None, family: str
) -> tuple[Path | None, dict[str, Any]]:
    """Where an IP-Adapter's image encoder comes from, and its (vision model's) config:
    --image-encoder (``given``), else the pipeline folder's own image_encoder (None: loaded
    with the pipeline), else the folder image_encoder beside the adapter's file, where Stable
    Diffusion's load_ip_adapter looks for it (h94/IP-Adapter's layout: models/image_encoder
    beside models/*.bin). None at all, and a folder that is not ``family``'s kind (a CLIP
    vision model, SD3's a SigLIP one with its processor), are refused naming
    --image-encoder."""
    model, kind, processor = _IMAGE_ENCODERS[family]
    what = f"{model} (save_pretrained's, with config.json" + (
        f", and its {processor}'s preprocessor_config.json)" if processor else ")"
    )
    index = json.loads((pipeline / "model_index.json").read_text())
    own = given is None and index.get("image_encoder") not in (None, [None, None])
    folder = pipeline / "image_encoder" if own else given or adapter.parent / "image_encoder"
    hint = "'--image-encoder'"
    if given is None and not folder.is_dir():
        raise click.BadParameter(
            f"the IP-Adapter needs an image encoder: {str(pipeline)!r} has none, nor is "
            f"there an image_encoder folder beside {str(adapter)!r}; give the folder of its "
            f"{what}",
            param_hint=hint,
        )
    if own and processor and index.get("feature_extractor") in (None, [None, None]):
        raise click.BadParameter(
            f"{str(pipeline)!r} has an image_encoder but no feature_extractor, which "
            f"{index['_class_name']} embeds the image prompt with; give the folder of a "
            f"{what}",
            param_hint=hint,
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        if own:  # diffusers loads the pipeline's own by model_index.json, and says why not
            return None, {}
        raise click.BadParameter(
            f"{str(folder)!r} has no readable config.json ({_one_line(str(err))}); give the "
            f"folder of a {what}",
            param_hint=hint,
        ) from None
    if not isinstance(config, dict):
        config = {}
    found = config.get("model_type")
    if found not in (f"{kind}_vision_model", kind) and not own:
        name = {"clip": "CLIP", "siglip": "SigLIP"}[kind]
        held = found or config.get("_class_name") or "no model_type"
        whose = "SD3's" if family == "sd3" else "an"
        raise click.BadParameter(
            f"{str(folder)!r} holds {held!r} (its config.json), not a {name} vision model "
            f"(model_type '{kind}_vision_model', or a whole '{kind}' model's): {whose} "
            f"IP-Adapter's image encoder is a {model}",
            param_hint=hint,
        )
    if processor and not own and not (folder / "preprocessor_config.json").is_file():
        raise click.BadParameter(
            f"{str(folder)!r} has no preprocessor_config.json: SD3's load_ip_adapter reads the "
            f"image encoder's {processor} from its folder; give the folder of a {what}",
            param_hint=hint,
        )
    if found == kind and isinstance(config.get("vision_config"), dict):
        config = config["vision_config"]
    return (None if own else folder), config


def _refuse_ip_adapter(adapter: Path, why: str, option: str = "--ip-adapter") -> NoReturn:
    raise click.BadParameter(f"{str(adapter)!r} {why}", param_hint=f"'{option}'")


#: An IP-Adapter file's tensor shapes by part (image_proj, ip_adapter) and name.
_Shapes = dict[str, dict[str, tuple[int, ...]]]
#: What an IP-Adapter's image projection takes: embeddings of a width, the image encoder's
#: config field that must equal it (None: nothing to check).
_Embedding = tuple[int | None, str]


def _check_embedding_width(adapter: Path, takes: _Embedding, encoder: dict[str, Any]) -> None:
    """Refuse an adapter whose image projection takes embeddings of a width (``takes``)
    other than the field of the image encoder's config (``encoder``) that gives them."""
    width, field = takes
    given = encoder.get(field)
    if isinstance(width, int) and isinstance(given, int) and width != given:
        _refuse_ip_adapter(
            adapter,
            f"takes image embeddings of width {width} (the image encoder's {field}), but its "
            f"image encoder gives {given}; give the encoder the adapter was trained with",
            "--image-encoder",
        )


def _check_ip_adapter_fits(
    shapes: dict[str, dict[str, tuple[int, ...]]],
    adapter: Path,
    pipeline: Path,
    family: str,
) -> _Embedding:
    """Refuse, before the pipeline loads, an IP-Adapter that does not fit the pipeline's
    network (its config), read from the file's shapes; return what its image projection
    takes. A unet's: key and value maps of another ``cross_attention_dim`` (an SD 1.5 adapter
    on SDXL); a plain adapter's ``proj`` takes the encoder's ``projection_dim``, a Plus
    adapter's resampler (``proj_in``) its ``hidden_size``. Flux's and SD3's:
    ``_check_flux_ip_adapter``'s and ``_check_sd3_ip_adapter``'s checks."""
    try:
        net = json.loads((pipeline / _NETWORK_FOLDER[family] / "config.json").read_text())
    except (OSError, ValueError):
        net = {}  # diffusers says why when it loads the pipeline
    net = net if isinstance(net, dict) else {}
    if family != "unet":
        check = _check_flux_ip_adapter if family == "flux" else _check_sd3_ip_adapter
        return check(shapes, adapter, pipeline, net)
    cross = net.get("cross_attention_dim")
    keys = [s for name, s in shapes["ip_adapter"].items() if name.endswith("to_k_ip.weight")]
    if isinstance(cross, int) and keys and len(keys[0]) == 2 and keys[0][1] != cross:
        _refuse_ip_adapter(
            adapter,
            f"is an IP-Adapter for a unet of cross_attention_dim {keys[0][1]}, but the unet of "
            f"{str(pipeline)!r} has {cross}; give the adapter made for the pipeline's model "
            "(SD 1.5's and SDXL's differ)",
        )
    proj = shapes["image_proj"]
    for name, field in (("proj.weight", "projection_dim"), ("proj_in.weight", "hidden_size")):
        if name in proj:
            return proj[name][-1], field
    return None, ""


def _ints(config: dict[str, Any], *fields: str) -> list[int] | None:
    values = [config.get(field) for field in fields]
    return values if all(isinstance(v, int) for v in values) else None  # type: ignore[return-value]


def _check_flux_ip_adapter(
    shapes: _Shapes, adapter: Path, pipeline: Path, net: dict[str, Any]
) -> _Embedding:
    """Refuse a Flux IP-Adapter that Flux's load_ip_adapter would not load into the
    transformer of config ``net``, or that would not run: no plain image projection
    (``proj.weight``, of 4 tokens, or 16 for 65536 rows, of ``joint_attention_dim``), or key
    and value maps with biases missing for any of its ``num_layers`` double-stream blocks or
    not from ``joint_attention_dim`` to its width. The projection takes the image encoder's
    ``projection_dim``."""
    proj = shapes["image_proj"].get("proj.weight")
    where = f"the transformer of {str(pipeline)!r}"
    if proj is None or len(proj) != 2:
        _refuse_ip_adapter(
            adapter,
            "has no image_proj.proj.weight (ip_adapter_proj_model.proj.weight in XLabs' "
            "files): it is no Flux IP-Adapter, whose image projection Flux's load_ip_adapter "
            "takes; give one made for Flux (e.g. XLabs-AI/flux-ip-adapter's)",
        )
    sizes = _ints(net, "num_layers", "joint_attention_dim", "num_attention_heads")
    head = net.get("attention_head_dim")
    if sizes is not None and isinstance(head, int):
        layers, joint, heads = sizes
        maps = shapes["ip_adapter"]
        for block in range(layers):
            for name in (f"{block}.to_{kv}_ip.{p}" for kv in "kv" for p in ("weight", "bias")):
                if name not in maps:
                    _refuse_ip_adapter(
                        adapter,
                        f"lacks ip_adapter.{name} (double_blocks.{block}.processor."
                        f"ip_adapter_double_stream_*_proj in XLabs' files): it is no IP-Adapter "
                        f"for {where}, of {_count(layers, 'double-stream block')}",
                    )
        key = maps.get("0.to_k_ip.weight")
        if key is not None and key != (heads * head, joint):
            _refuse_ip_adapter(
                adapter,
                f"maps image tokens of width {key[-1]} to {key[0]}, but {where} takes "
                f"{joint} (joint_attention_dim) to {heads * head}; give the adapter made for "
                "the pipeline's model",
            )
        tokens = 16 if proj[0] == 65536 else 4  # as the loader counts them
        if proj[0] != tokens * joint:
            _refuse_ip_adapter(
                adapter,
                f"projects an image to {tokens} tokens of width {proj[0] / tokens:g}, but "
                f"{where} takes image tokens of its joint_attention_dim, {joint}",
            )
    return proj[-1], "projection_dim"


#: The image projection of an SD3 IP-Adapter (InstantX's), which SD3's load_ip_adapter reads
#: its sizes from.
_SD3_IMAGE_PROJ = ("proj_in.weight", "proj_out.weight", "latents", "time_embedding.linear_1.weight")


def _check_sd3_ip_adapter(
    shapes: _Shapes, adapter: Path, pipeline: Path, net: dict[str, Any]
) -> _Embedding:
    """Refuse an SD3 IP-Adapter that SD3's load_ip_adapter would not load into the
    transformer of config ``net``, or that would not run: no time-conditioned resampler
    (``_SD3_IMAGE_PROJ``) or first attention layer's ``norm_ip``, image tokens not of the
    transformer's width, or processors for another count of attention layers (one a block,
    two in its ``dual_attention_layers``). The resampler takes the image encoder's hidden
    states, of its ``hidden_size``."""
    proj, maps = shapes["image_proj"], shapes["ip_adapter"]
    needed = [f"image_proj.{n}" for n in _SD3_IMAGE_PROJ if n not in proj]
    needed += ["ip_adapter.0.norm_ip.linear.weight"] * ("0.norm_ip.linear.weight" not in maps)
    where = f"the transformer of {str(pipeline)!r}"
    if needed:
        _refuse_ip_adapter(
            adapter,
            f"lacks {needed[0]}: it is no SD3 IP-Adapter (a time-conditioned resampler and a "
            "processor of each attention layer, as InstantX/SD3.5-Large-IP-Adapter's); give "
            "one made for SD3",
        )
    sizes = _ints(net, "num_layers", "num_attention_heads", "attention_head_dim")
    if sizes is not None:
        layers, heads, head = sizes
        dual = net.get("dual_attention_layers") or ()
        layers += len(dual) if isinstance(dual, (list, tuple)) else 0
        found = {name.split(".")[0] for name in maps}
        if found != {str(i) for i in range(layers)}:
            _refuse_ip_adapter(
                adapter,
                f"has the processors of {len(found)} attention layers, but {where} has "
                f"{layers}; give the adapter made for the pipeline's model (SD3.5 Large's and "
                "Medium's differ)",
            )
        width = proj["proj_out.weight"][0]
        if width != heads * head:
            _refuse_ip_adapter(
                adapter,
                f"makes image tokens of width {width}, but {where} is {heads * head} wide "
                "(num_attention_heads x attention_head_dim); give the adapter made for the "
                "pipeline's model",
            )
    return proj["proj_in.weight"][-1], "hidden_size"


def _load_ip_adapter(
    pipe: Any,
    name: str,
    family: str,
    adapter: Path,
    encoder: Path | None,
    scale: float,
    dtype: torch.dtype,
) -> None:
    """``pipe.load_ip_adapter(adapter's folder, subfolder="", weight_name=its name)`` after
    registering ``family``'s image encoder in ``encoder`` (None: the pipeline's own) in
    ``dtype`` as its image_encoder (SD3's with its SiglipImageProcessor as its
    feature_extractor, as SD3's load_ip_adapter loads them), and
    ``pipe.set_ip_adapter_scale(scale)``; nothing is downloaded. A pipeline without
    IP-Adapter support, and an adapter or encoder that does not load, are refused naming
    their option."""
    if not hasattr(pipe, "load_ip_adapter"):
        raise click.BadParameter(
            f"the {name} takes no IP-Adapter (it has no load_ip_adapter); give a Stable "
            "Diffusion, SDXL, SD3 or Flux pipeline that loads one",
            param_hint="'--ip-adapter'",
        )
    import transformers

    option, path = "'--image-encoder'", encoder
    model, _, processor = _IMAGE_ENCODERS[family]
    try:
        with _quietly():
            if encoder is not None:
                parts = {
                    "image_encoder": getattr(transformers, model).from_pretrained(
                        encoder, local_files_only=True, torch_dtype=dtype
                    )
                }
                if processor is not None:
                    parts["feature_extractor"] = getattr(transformers, processor).from_pretrained(
                        encoder, local_files_only=True
                    )
                pipe.register_modules(**parts)
            option, path = "'--ip-adapter'", adapter
            # No encoder's folder: it is registered already, and diffusers would otherwise
            # look for one beside the adapter or on the hub.
            pipe.load_ip_adapter(
                str(adapter.parent),
                subfolder="",
                weight_name=adapter.name,
                local_files_only=True,
                **{_ENCODER_ARGUMENT[family]: None},
            )
            pipe.set_ip_adapter_scale(scale)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # a file that does not fit the pipeline, in diffusers' words
        raise click.BadParameter(
            f"{str(path)!r} does not load into the {name} ({type(err).__name__}: "
            f"{_one_line(str(err))})",
            param_hint=option,
        ) from err


def _ip_adapter_options(
    pipeline: Path,
    adapter: Path | None,
    encoder: Path | None,
    prompt: Path | None,
    scale: float | None,
) -> tuple[Any, Path | None, str]:
    """The image prompt (--ip-adapter-image, read as RGB; None without --ip-adapter), the
    image encoder's folder to load (None: the pipeline's own) and whose IP-Adapter it is
    ("unet", "flux", "sd3"), all checked before the pipeline loads: the options go together,
    the pipeline must load an adapter that edit_image maps (Stable Diffusion's and SDXL's
    unets', Flux's and SD3's transformers'), and the adapter's file must fit the network and
    the encoder."""
    if adapter is None:
        for option, value in (
            ("--ip-adapter-image", prompt),
            ("--image-encoder", encoder),
            ("--ip-adapter-scale", scale),
        ):
            if value is not None:
                raise click.BadParameter(
                    "it belongs to an IP-Adapter: give --ip-adapter too (the adapter's weight "
                    "file), or leave it out",
                    param_hint=f"'{option}'",
                )
        return None, None, ""
    if prompt is None:
        raise click.BadParameter(
            "an IP-Adapter conditions the edit on an image prompt: give --ip-adapter-image "
            "FILE too, or leave --ip-adapter out",
            param_hint="'--ip-adapter'",
        )
    family = _ip_adapter_family(json.loads((pipeline / "model_index.json").read_text()))
    shapes = _ip_adapter_shapes(adapter, family)
    takes = _check_ip_adapter_fits(shapes, adapter, pipeline, family)
    folder, config = _image_encoder(pipeline, adapter, encoder, family)
    _check_embedding_width(adapter, takes, config)
    return _read_image(prompt, "--ip-adapter-image"), folder, family


@main.command(name="edit")
@click.option(
    "--pipeline",
    required=True,
    type=InputPathType(path_type=Path),
    callback=_pipeline_folder,
    help="The local folder of a diffusers pipeline (save_pretrained's, with model_index.json): "
    "Stable Diffusion, SDXL, Playground v2.5, Stable Diffusion 3, Flux, Flux Kontext, Chroma, "
    "Qwen-Image (QwenImagePipeline and its img2img one), Z-Image (ZImagePipeline and its img2img "
    "one) or FLUX.2-klein (Flux2KleinPipeline); "
    "SD's and SDXL's inpainting pipelines and Flux Fill with --mask, their ControlNet and "
    "ControlNet img2img pipelines, Flux Depth and Canny and Flux's and SD3's ControlNet "
    "pipelines with --control-image, SD's and SDXL's ControlNet inpainting pipelines and "
    "SD3's (its controlnet takes the mask) with both. Nothing is downloaded.",
)
@click.option(
    "--image",
    required=True,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="The photo to edit (PNG, JPEG, WebP, ...: any image PIL reads), read as RGB; its "
    "sides must be multiples of the pipeline's factor (8 for SD, 16 for SD3, Flux, Chroma, "
    "Qwen-Image, Z-Image and Flux.2) "
    "unless --size resizes it.",
)
@click.option(
    "--mask",
    default=None,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="For StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, "
    "StableDiffusionControlNetInpaintPipeline and StableDiffusionXLControlNetInpaintPipeline "
    "with an inpainting unet (in_channels 9: the latents, the mask and the masked image's "
    "latents; a 4-channel unet in them is refused), FluxFillPipeline, "
    "StableDiffusion3ControlNetInpaintingPipeline (its control_mask, with --control-image) "
    "and QwenImageControlNetInpaintPipeline (its mask_image, with --control-image): "
    "the region the edit may repaint, white there and black elsewhere, as diffusers' "
    "mask_image (read as grey, binarised at 0.5); of the photo's size, resized with it by "
    "--size.",
)
@click.option(
    "--control-image",
    multiple=True,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="For a ControlNet pipeline, or Flux Depth or Canny: the image that guides its "
    "controlnet or transformer (the pipeline's image= or control_image=; e.g. the photo's "
    "edges or depth map; for SD3's ControlNet inpainting pipeline the image kept outside "
    "--mask, as a rule the photo itself), "
    "read as RGB, of the photo's size, resized with it by --size; once per controlnet, in "
    "their order, for several.",
)
@click.option(
    "--ip-adapter",
    default=None,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="An IP-Adapter's weight file (.safetensors or .bin: h94/IP-Adapter's "
    "models/ip-adapter_sd15.safetensors, XLabs-AI/flux-ip-adapter's ip_adapter.safetensors, "
    "InstantX/SD3.5-Large-IP-Adapter's ip-adapter.bin, ...), loaded by the pipeline's "
    "load_ip_adapter; for a Stable Diffusion, SDXL, Flux, Chroma (Flux's adapters) or SD3 "
    "pipeline that has one, with --ip-adapter-image.",
)
@click.option(
    "--ip-adapter-image",
    default=None,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="The image prompt, the pipeline's ip_adapter_image: any image, read as RGB; the "
    "image encoder's processor resizes and crops it (--size does not).",
)
@click.option(
    "--image-encoder",
    default=None,
    type=InputPathType(exists=True, file_okay=False, path_type=Path),
    help="The IP-Adapter's image encoder, a folder (save_pretrained's): a "
    "CLIPVisionModelWithProjection for SD, SDXL and Flux, a SiglipVisionModel with its "
    "SiglipImageProcessor for SD3 (a whole CLIP or SigLIP model's folder is read for its "
    "vision model).  [default: the pipeline's image_encoder, else the folder image_encoder "
    "beside --ip-adapter, where SD's load_ip_adapter looks for it]",
)
@click.option(
    "--ip-adapter-scale",
    default=None,
    type=float,
    callback=_ip_adapter_scale,
    help="The IP-Adapter's scale (set_ip_adapter_scale): the image prompt's weight, 0 to "
    "turn it off.  [default: 1.0]",
)
@click.option("--source", required=True, help="What the image shows ('' is the unconditional).")
@click.option("--target", required=True, help="What the edited image should show.")
@click.option(
    "--out",
    required=True,
    type=OutputPathType(suffix=".png"),
    help="The edited image, a PNG.",
)
@click.option(
    "--reconstruction",
    default=None,
    type=OutputPathType(suffix=".png"),
    help="Also write the reconstruction (the inverted latents decoded back: the VAE's round "
    "trip, as the network's is exact), a PNG.",
)
@_overwrite_option("Replace --out and --reconstruction if they exist.")
@click.option(
    "--negative",
    default="",
    show_default=True,
    help="Negative prompt: the unconditional branch of classifier-free guidance.",
)
@click.option(
    "--steps",
    default=50,
    show_default=True,
    type=click.IntRange(1, MAX_STEPS),
    help="num_inference_steps of the pipeline's scheduler.",
)
@click.option(
    "--guidance",
    default=None,
    type=float,
    callback=_finite_if_given,
    help="Classifier-free guidance scale (1: none, but 0 for Z-Image; true CFG for Chroma, "
    "Qwen-Image and FLUX.2-klein).  [default: 7.5; 1 for Flux and Qwen-Image, 5 for Chroma and "
    "Z-Image, 4 for FLUX.2-klein]",
)
@click.option(
    "--embedded-guidance",
    default=None,
    type=float,
    callback=_finite_if_given,
    help="Flux.1-dev's embedded guidance scale (FluxPipeline's guidance_scale); only for a "
    "transformer that embeds one.  [default: 3.5]",
)
@click.option(
    "--solver",
    "solver_name",
    default=None,
    help="Base solver (`bdia solvers` lists them).  [default: ddim; euler for SD3, Flux, "
    "Chroma, Qwen-Image, Z-Image and Flux.2]",
)
@click.option(
    "--gamma",
    default="0.96",
    show_default=True,
    type=GammaType(invertible=True),
    help="bdia's gamma: a number in (0, 1] or obelm.",
)
@click.option(
    "--rule",
    type=click.Choice(["base", "restart"]),
    default="base",
    show_default=True,
    help="How the edit regenerates from the inverted noise: the base solver, or bdia "
    "started afresh (bdia.editing).",
)
@click.option(
    "--size",
    default=None,
    type=SizeType(),
    help="Resize the image (and --mask, --control-image) to WxH first (Lanczos), e.g. "
    "512x512; by default the image's own size, which must fit the pipeline.",
)
@click.option(
    "--dtype",
    type=NETWORK_DTYPE,
    default="float32",
    show_default=True,
    help="Dtype the pipeline is loaded in (torch_dtype); float16 or bfloat16 on a GPU.",
)
@click.option(
    "--state-dtype",
    type=STATE_DTYPE,
    default=None,
    help="Dtype of the sampler's state.  [default: float64; float32 on mps, which has no float64]",
)
@_device_option
@_threads_option("torch's (one per core)")
@_progress_option
def edit_command(
    pipeline: Path,
    image: Path,
    mask: Path | None,
    control_image: tuple[Path, ...],
    ip_adapter: Path | None,
    ip_adapter_image: Path | None,
    image_encoder: Path | None,
    ip_adapter_scale: float | None,
    source: str,
    target: str,
    out: Path,
    reconstruction: Path | None,
    overwrite: bool,
    negative: str,
    steps: int,
    guidance: float | None,
    embedded_guidance: float | None,
    solver_name: str | None,
    gamma: float | str,
    rule: str,
    size: tuple[int, int] | None,
    dtype: torch.dtype,
    state_dtype: torch.dtype | None,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Edit a photo with a diffusers pipeline: invert it exactly under --source with bdia,
    regenerate it under --target.

    The pipeline (Stable Diffusion, SDXL, SD3, Flux, Flux Kontext, Chroma, Qwen-Image, Z-Image,
    FLUX.2-klein; an
    inpainting one with --mask, a ControlNet one with --control-image, a ControlNet inpainting
    one with both; SD, SDXL, Flux and SD3 ones with an IP-Adapter's image prompt, --ip-adapter
    and --ip-adapter-image) is loaded from a local folder;
    bdia.integrations.diffusers.edit_image does the work. Prints the latent round trip's error
    (rounding only) and the VAE's.
    """
    if not target.strip():
        raise click.BadParameter(
            "the prompt is empty: give what the edited image should show", param_hint="'--target'"
        )
    if solver_name is not None:
        _base_solver(solver_name)
    state_dtype = _state_dtype(state_dtype, device)
    outputs = {"--out": out, "--reconstruction": reconstruction}
    inputs = [
        ("--image", image),
        ("--mask", mask),
        *(("--control-image", c) for c in control_image),
        ("--ip-adapter-image", ip_adapter_image),
    ]
    for option, path in outputs.items():
        for given, read in inputs:
            if path is not None and read is not None and path.resolve() == read.resolve():
                raise click.BadParameter(
                    f"{str(path)!r} is {given}; give another file", param_hint=f"'{option}'"
                )
    if reconstruction is not None and reconstruction.resolve() == out.resolve():
        raise click.BadParameter("it is --out; give another file", param_hint="'--reconstruction'")
    photo = _read_image(image, "--image")
    # The mask and the control images are drawn on the photo: its size, resized with it.
    mask_image = None
    if mask is not None:
        grey = _read_beside(mask, "--mask", "a mask", photo, image).convert("L")
        mask_image = _resized(grey, size)
    controls = [
        _resized(_read_beside(c, "--control-image", "a control image", photo, image), size)
        for c in control_image
    ]
    picture = _resized(photo, size)
    image_prompt, encoder, family = _ip_adapter_options(
        pipeline, ip_adapter, image_encoder, ip_adapter_image, ip_adapter_scale
    )
    index = json.loads((pipeline / "model_index.json").read_text())
    if embedded_guidance is not None and _never_embeds_guidance(index, pipeline):
        # Known from model_index.json and the transformer's config.json; without the latter,
        # from the transformer's config once it loads.
        raise _no_embedded_guidance(index["_class_name"])
    _check_qwen_image(index)
    _check_latents_alone(index, mask, control_image)
    for option, path in outputs.items():
        # Before the pipeline loads, which can take minutes.
        _refuse_existing_file(path, option, overwrite)
    for module in ("diffusers", "transformers"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise click.ClickException(
                f"bdia edit needs the diffusers library and transformers ({err}); install "
                "them with pip install 'bdia[diffusers]'"
            ) from None
    if not _rank_zero_alone():
        return

    _set_threads(threads)
    device = _default_device(device)
    # An IP-Adapter's image encoder and processor: the folder's own, as diffusers loads them,
    # but an --image-encoder given.
    keep = ("feature_extractor",) + (("image_encoder",) if encoder is None else ())
    pipe = _load_pipeline(pipeline, dtype, keep if ip_adapter is not None else ())
    name = type(pipe).__name__
    _check_photo_size(pipe, picture, image, size, name)
    scale = 1.0 if ip_adapter_scale is None else ip_adapter_scale
    if ip_adapter is not None:
        _load_ip_adapter(pipe, name, family, ip_adapter, encoder, scale, dtype)
    if embedded_guidance is not None and not _embeds_guidance(getattr(pipe, "transformer", None)):
        raise _no_embedded_guidance(name)
    controls_given = _control_images(pipe, controls, name)
    result = _edit(
        pipe.to(device),
        picture,
        source,
        target,
        mask_image=mask_image,
        control_image=controls_given,
        ip_adapter_image=image_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance=embedded_guidance,
        negative_prompt=negative,
        solver=solver_name,
        gamma=gamma,
        rule=rule,
        state_dtype=state_dtype,
        progress=not no_progress,
    )
    pixels = {"the edit": result.images, "the reconstruction": result.reconstruction}
    for what, decoded in pixels.items():
        if not bool(torch.isfinite(decoded).all()):
            raise click.ClickException(
                f"{what} decoded to NaN or Inf (a float16 VAE overflowing? try --dtype "
                "bfloat16 or float32); nothing written"
            )
    import numpy as np

    from .integrations.diffusers.editing import _output

    edited = np.asarray(_output(result.images, "pil")[0])
    click.echo(
        f"{image.name} ({picture.size[0]}x{picture.size[1]}) with {name}: "
        f"bdia({result.inversion.solver.solver.name}, {gamma}), "
        f"{_count(len(result.inversion.ts) - 1, 'step')}, {dtype_name(state_dtype)} state"
        + (f", IP-Adapter {ip_adapter.name} at scale {scale:g}" if ip_adapter else "")
    )
    click.echo(
        f"round trip: latent error {result.latent_error:.3e} (the network's, exact up to "
        f"rounding); vae error {result.vae_error:.3e}, reconstruction error "
        f"{result.reconstruction_error:.3e} (rms, pixels in [-1, 1])"
    )
    write_png(out, edited)
    wrote = f"wrote {out}"
    if reconstruction is not None:
        write_png(reconstruction, np.asarray(_output(result.reconstruction, "pil")[0]))
        wrote += f" and {reconstruction} (the reconstruction)"
    click.echo(wrote, err=True)


#: The transformers that embed no guidance scale, whatever their config: SD3's, Chroma's,
#: whose guidance is true CFG, Qwen-Image's, whose guidance-distilled kind (config
#: guidance_embeds) edit_image refuses, and Z-Image's, which has no guidance embedding.
#: Flux's and Flux.2's embed one as their config's guidance_embeds says (Flux.1-dev's and
#: FLUX.2-dev's do, Flux.1-schnell's and FLUX.2-klein's, of the same classes, not).
_NO_GUIDANCE_EMBEDDING = (
    "SD3Transformer2DModel",
    "ChromaTransformer2DModel",
    "QwenImageTransformer2DModel",
    "ZImageTransformer2DModel",
)


def _embeds_guidance(transformer: Any) -> bool:
    """Whether a loaded ``transformer`` embeds a guidance scale (Flux.1-dev's, FLUX.2-dev's):
    its config's ``guidance_embeds``; for a Flux.2 transformer a config without the key is
    diffusers 0.36's, which always embeds one."""
    config = getattr(transformer, "config", None) or {}
    if type(transformer).__name__ == "Flux2Transformer2DModel":
        from .integrations.diffusers._conditioning import _flux2_embeds_guidance

        return _flux2_embeds_guidance(config)
    return bool(config.get("guidance_embeds", False))


def _never_embeds_guidance(index: dict[str, Any], folder: Path) -> bool:
    """Whether the network of the pipeline in ``folder`` (``index``, its model_index.json)
    cannot embed a guidance scale: a unet, a transformer of _NO_GUIDANCE_EMBEDDING, or one
    whose config.json says guidance_embeds false (an unreadable one is left to loading)."""
    unet = index.get("unet") not in (None, [None, None])
    if unet or _transformer_class(index) in _NO_GUIDANCE_EMBEDDING:
        return True
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("guidance_embeds") is False


def _check_qwen_image(index: dict[str, Any]) -> None:
    """Refuse, from model_index.json ``index`` and before the pipeline loads (Qwen-Image's
    20B transformer takes minutes), QwenImageEditPipeline, QwenImageEditPlusPipeline and
    QwenImageEditInpaintPipeline, which embed text with the image."""
    name = index["_class_name"]
    edits = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")
    if name in edits:
        raise click.BadParameter(
            f"a {name} embeds the prompt with the image through Qwen2.5-VL (its "
            "encode_prompt(prompt, image)), which edit_image does not map from text; it edits "
            "with that pipeline's prompt embeddings, from Python (docs/diffusers.md)",
            param_hint="'--pipeline'",
        )


#: The transformers that take their latents alone (no mask channels) and whose pipelines
#: take no control image but through a controlnet: their family, what the transformer
#: takes, and their inpainting pipeline, which blends the image back after each step.
_LATENTS_ALONE = {
    "QwenImageTransformer2DModel": ("Qwen-Image", "packed latents", "QwenImageInpaintPipeline"),
    "ZImageTransformer2DModel": ("Z-Image", "latents", "ZImageInpaintPipeline"),
    "Flux2Transformer2DModel": ("Flux.2", "packed latents", "Flux2KleinInpaintPipeline"),
}


def _check_latents_alone(
    index: dict[str, Any], mask: Path | None, controls: tuple[Path, ...]
) -> None:
    """Refuse, from model_index.json ``index`` and before the pipeline loads (these
    transformers have billions of weights: minutes), what a pipeline of _LATENTS_ALONE's
    transformers without a controlnet cannot take: --mask and --control-image."""
    known = _LATENTS_ALONE.get(_transformer_class(index) or "")
    if known is None or index.get("controlnet") not in (None, [None, None]):
        return
    family, latents, inpainting = known
    name = index["_class_name"]
    if mask is not None:
        raise click.BadParameter(
            f"a {name} takes no mask: {family}'s transformer takes the {latents} alone "
            f"({inpainting} blends the image back after each step, which is no ODE step, and "
            "is edited without one); leave it out",
            param_hint="'--mask'",
        )
    if controls:
        raise click.BadParameter(
            f"a {name} has no controlnet: {family}'s transformer takes the {latents} alone; "
            "leave it out",
            param_hint="'--control-image'",
        )


def _no_embedded_guidance(name: str) -> click.BadParameter:
    """--embedded-guidance refused for the pipeline of class ``name``."""
    return click.BadParameter(
        f"the {name}'s network embeds no guidance scale (only Flux.1-dev's and FLUX.2-dev's "
        "transformers do); leave it out (--guidance is classifier-free guidance)",
        param_hint="'--embedded-guidance'",
    )


def _in_the_commands_words(message: str, name: str) -> str:
    """edit_image's refusal ``message`` in one line, its arguments by the options that set
    them (in one pass, so that no replacement is rewritten) and "the pipeline" by its class
    ``name``: a mask refused names the pipeline that takes none."""
    import re

    words = re.compile("|".join(map(re.escape, _EDIT_OPTIONS)))
    message = words.sub(lambda match: _EDIT_OPTIONS[match.group()], _one_line(message))
    return re.sub(r"\bthe pipeline\b", f"the {name}", message)


def _edit(pipe: Any, picture: Any, source: str, target: str, **options: Any) -> Any:
    """``edit_image(pipe, picture, source, target, **options)`` with decoded tensors in
    [-1, 1]; a refusal by its checks (no network has run yet) is one line with the options'
    names and the pipeline's class, and exit status 2, running out of memory one line that
    says what to shrink, and bdia's instability one warning line in the command's words."""
    from .integrations.diffusers import edit_image
    from .sampling import ParasiticWarning

    ran: list[bool] = []

    def note(module: torch.nn.Module, args: Any) -> None:
        ran.append(True)
        hook.remove()

    unstable: list[str] = []

    def show(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
        if issubclass(category, ParasiticWarning):
            unstable.append(str(message))
        else:
            _warning_line(message, category)

    # edit_image checks everything before any network runs: a failure before the first
    # forward call of any module is a refusal of what it was given.
    hook = torch.nn.modules.module.register_module_forward_pre_hook(note)
    show_progress = options.pop("progress")
    live = show_progress and sys.stderr.isatty()
    try:
        with (
            warnings.catch_warnings(),
            _Progress(1, "edit", "img", show_progress and not live) as bar,
        ):
            # The library's warning, once per run, advises Python calls that the command
            # already makes.
            warnings.simplefilter("always", ParasiticWarning)
            warnings.showwarning = show
            result = edit_image(
                pipe, picture, source, target, output_type="pt", progress=live, **options
            )
            bar.update()
    except (ValueError, TypeError) as err:
        if ran:
            raise
        raise click.UsageError(_in_the_commands_words(str(err), type(pipe).__name__)) from err
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise click.ClickException(
            f"out of memory editing a {picture.size[0]}x{picture.size[1]} image: use a smaller "
            "--size, or --dtype float16 or bfloat16"
        ) from None
    finally:
        hook.remove()
    if unstable:
        click.echo(
            "Warning: bdia's parasitic mode outgrew the state: the inverted noise, from which "
            "the edit is sampled, is dominated by it rather than by the image (the "
            "reconstruction is exact all the same); use more --steps or another --gamma",
            err=True,
        )
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
