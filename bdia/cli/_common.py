"""What the commands share: the group that ends every failure in one line, the option types
(dtypes, devices, paths, gamma), the options every command spells alike, threads, devices,
torchrun ranks, solvers, EDM's grid and ``--network``."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from tqdm.auto import tqdm

from ..ode import DTYPE_NAMES
from ..solvers import available_solvers, bdia, get_solver

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
        from ..solvers.bidirectional import NAMED_GAMMAS

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


#: --gamma of the commands whose bdia run is inverted (invert, edit): a number in (0, 1] or
#: obelm, 0.96 by default.
_invertible_gamma_option = click.option(
    "--gamma",
    default="0.96",
    show_default=True,
    type=GammaType(invertible=True),
    help="bdia's gamma: a number in (0, 1] or obelm.",
)


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
    from ..ode import wide_dtype

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
    from ..schedules import karras_grid

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
    from .. import generate
    from ..models.checkpoints import UnsafeCheckpointError, load_network

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


_SOLVER_HELP = "Base solver (`bdia solvers` lists them)."
_NETWORK_THREADS = (
    f"1 for a network of at most {SMALL_RESOLUTION}x{SMALL_RESOLUTION} pixels (digits), else "
    "torch's (one per core)"
)


def _network_identity(network_spec: str) -> tuple[str, str]:
    """``(identity, where)`` of a loaded ``--network``: ``("sha256:...", "digits")`` for a
    shipped network, ``("sha256:...", absolute path)`` for a file, the spec twice for
    ``random:NAME``."""
    from .._files import file_sha256
    from ..models.checkpoints import SHIPPED_NETWORKS, shipped_network_path

    if network_spec.startswith("random:"):
        return network_spec, network_spec
    if network_spec in SHIPPED_NETWORKS:
        return "sha256:" + file_sha256(shipped_network_path(network_spec)), network_spec
    path = Path(network_spec)
    return "sha256:" + file_sha256(path), str(path.resolve())


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


def _refuse_existing(outdir: Path, targets: list[Path], overwrite: bool, what: str) -> None:
    """Exit 1 when ``outdir`` already holds one of ``targets``, unless ``overwrite``."""
    present = [t for t in targets if t.exists()]
    if present and not overwrite:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise click.ClickException(
            f"--outdir {str(outdir)!r} already holds {present[0].name}{more} ({what}): "
            "use --overwrite to replace them, or another --outdir"
        )
