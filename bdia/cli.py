"""The ``bdia`` command: list solvers and compare them on the built-in toy problems."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from . import compare as cmp
from ._files import write_atomic
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
        write_atomic(out, report)
        click.echo(f"wrote {out}", err=True)
    if plot:
        try:
            cmp.plot_errors(chosen, results, plot)
            click.echo(f"wrote {plot}", err=True)
        except ImportError:
            log.warning("matplotlib is not installed: no plot (pip install 'bdia[plot]')")


NETWORK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _distributed() -> tuple[int, int]:
    """(rank, world size), joining the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


@main.command(name="sample")
@click.option(
    "--network",
    "network_spec",
    required=True,
    help="digits (the shipped 8x8 digits model), an EDM .pkl, a bdia .safetensors, or "
    "random:NAME (ddpmpp-cond, ncsnpp-cond, ddpmpp-uncond, ncsnpp-uncond, tiny-cond).",
)
@click.option("--solver", "solver_name", default="heun", show_default=True)
@click.option("--gamma", default=None, help="Wrap the solver with bdia at this gamma (or 'obelm').")
@click.option("--steps", default=18, show_default=True, type=click.IntRange(1))
@click.option("--sigma-min", default=0.002, show_default=True, type=float)
@click.option("--sigma-max", default=80.0, show_default=True, type=float)
@click.option("--rho", default=7.0, show_default=True, type=float)
@click.option("--seeds", default="0-63", show_default=True, help="e.g. 0-49999 or 1,5,7-9")
@click.option("--class", "class_label", default=None, type=int, help="Fixed class label.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option(
    "--outdir", default=None, type=click.Path(file_okay=False), help="One PNG per seed here."
)
@click.option(
    "--grid",
    "grid_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="One labelled PNG grid of all seeds (at most 1024); for a conditional network "
    "without --class, column c holds class c.",
)
@click.option(
    "--dtype",
    "network_dtype",
    type=click.Choice(sorted(NETWORK_DTYPES)),
    default="fp32",
    show_default=True,
    help="Dtype the network runs in.",
)
@click.option(
    "--state-dtype", type=click.Choice(sorted(DTYPES)), default="float64", show_default=True
)
@click.option("--device", default=None, help="Defaults to this rank's GPU, else the CPU.")
def sample_command(
    network_spec: str,
    solver_name: str,
    gamma: str | None,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    seeds: str,
    class_label: int | None,
    batch: int,
    outdir: str | None,
    grid_path: str | None,
    network_dtype: str,
    state_dtype: str,
    device: str | None,
) -> None:
    """Sample one PNG per seed with EDM's grid (reruns skip finished seeds), or a grid PNG."""
    from . import generate
    from .models.checkpoints import load_network
    from .schedules import karras_grid

    try:
        seed_list = generate.parse_seeds(seeds)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--seeds") from None
    try:
        solver = get_solver(solver_name)
        if gamma is not None:
            solver = bdia(solver, _parse_gamma(gamma))
    except (KeyError, TypeError, ValueError) as err:
        raise click.BadParameter(str(err.args[0]), param_hint="--solver/--gamma") from None
    if outdir is None and grid_path is None:
        raise click.UsageError("give --outdir (one PNG per seed), --grid (one PNG), or both")
    if grid_path is not None and len(seed_list) > GRID_MAX_IMAGES:
        raise click.BadParameter(
            f"{len(seed_list)} seeds make an unreadable grid; give at most {GRID_MAX_IMAGES} "
            "or use --outdir",
            param_hint="--seeds",
        )
    for folder, hint in (
        (outdir, "--outdir"),
        (grid_path and str(Path(grid_path).parent), "--grid"),
    ):
        if folder is None:
            continue
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-")
            probe.close()
        except OSError as err:
            raise click.BadParameter(f"cannot write to {folder}: {err}", param_hint=hint) from None
    rank, world = _distributed()
    if device is None:
        device = (
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
    try:
        if network_spec.startswith("random:"):
            net = generate.random_network(network_spec[len("random:") :])
        else:
            net = load_network(network_spec)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    net = net.to(device=device, dtype=NETWORK_DTYPES[network_dtype])
    ts = karras_grid(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    if grid_path is not None and rank == 0:
        try:
            _write_sample_grid(
                grid_path,
                net,
                solver,
                ts,
                seed_list,
                class_label,
                batch,
                DTYPES[state_dtype],
                device,
            )
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"wrote {grid_path} ({len(seed_list)} images)", err=True)
    if outdir is None:
        return
    todo = len(seed_list[rank::world])
    with tqdm(total=todo, disable=rank != 0, desc="images", unit="img") as bar:
        try:
            generate.generate_images(
                net,
                solver,
                ts,
                seed_list,
                outdir,
                batch=batch,
                class_label=class_label,
                state_dtype=DTYPES[state_dtype],
                device=device,
                rank=rank,
                world_size=world,
                on_batch=bar.update,
            )
        except ValueError as err:
            raise click.ClickException(str(err)) from None
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        click.echo(f"{len(seed_list)} images in {outdir}", err=True)


@main.command(name="invert")
@click.option(
    "--network",
    "network_spec",
    default="digits",
    show_default=True,
    type=click.Choice(["digits"]),
    help="A shipped network whose held-out data are inverted.",
)
@click.option("--solver", "solver_name", default="euler", show_default=True)
@click.option(
    "--gamma", default="0.96", show_default=True, help="bdia's gamma (a number in (0, 1] or obelm)."
)
@click.option("--steps", default=35, show_default=True, type=click.IntRange(2))
@click.option(
    "--sigma-min", default=0.002, show_default=True, type=click.FloatRange(min=0, min_open=True)
)
@click.option("--sigma-max", default=80.0, show_default=True, type=float)
@click.option("--rho", default=7.0, show_default=True, type=float)
@click.option(
    "--count", default=None, type=click.IntRange(1), help="Invert the first N (default: all)."
)
@click.option(
    "--state-dtype", type=click.Choice(sorted(DTYPES)), default="float64", show_default=True
)
def invert_command(
    network_spec: str,
    solver_name: str,
    gamma: str,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    count: int | None,
    state_dtype: str,
) -> None:
    """Invert the held-out digits to noise and back; report the reconstruction error.

    Each real image is taken as the state at sigma_min. bdia(SOLVER, GAMMA) inverts it exactly
    up to rounding (after one approximate base step that makes the pair); the base solver run
    backward in time is the usual approximate inversion, reported beside it.
    """
    from . import generate
    from .models import digits
    from .models.checkpoints import load_network
    from .schedules import karras_grid

    try:
        base = get_solver(solver_name)
        exact = bdia(base, _parse_gamma(gamma))
    except (KeyError, TypeError, ValueError) as err:
        raise click.BadParameter(str(err.args[0]), param_hint="--solver/--gamma") from None
    if not sigma_min < sigma_max:
        raise click.BadParameter(
            f"sigma_min {sigma_min} must be below sigma_max {sigma_max}", param_hint="--sigma-min"
        )
    net = load_network(network_spec)
    split = digits.load_digits_split()
    images, labels = split.held_out_images, split.held_out_labels.tolist()
    if count is not None:
        images, labels = images[:count], labels[:count]
    ts = karras_grid(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, final_zero=False)
    dtype = DTYPES[state_dtype]
    click.echo(
        f"{len(labels)} held-out digits; {steps} steps from sigma {sigma_max:g} to "
        f"{sigma_min:g}; {state_dtype} state, float32 network"
    )
    rows = [("inversion", "max abs error", "rms error")]
    for solver, kind in ((exact, "exact"), (base, "approximate")):
        _, back = generate.reconstruct(net, solver, ts, images, labels, state_dtype=dtype)
        error = (back.double() - images.double()).flatten(1)
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


GRID_MAX_IMAGES = 1024


def _write_sample_grid(
    path: str,
    net: torch.nn.Module,
    solver: object,
    ts: torch.Tensor,
    seeds: list[int],
    class_label: int | None,
    batch: int,
    state_dtype: torch.dtype,
    device: str,
) -> None:
    """Sample ``seeds`` and write them as one grid, its columns captioned with their class."""
    import numpy as np

    from . import generate

    label_dim = getattr(net, "label_dim", 0)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    if label_dim and class_label is None:
        # One class per column, so that every row shows each class once.
        classes: list[int] | int | None = [i % label_dim for i in range(len(seeds))]
        columns = label_dim
    else:
        classes, columns = class_label, min(len(seeds), 8)
    images, labels = [], []
    for start in range(0, len(seeds), batch):
        group = seeds[start : start + batch]
        fixed = classes[start : start + batch] if isinstance(classes, list) else classes
        noise, drawn = generate.seed_inputs(group, shape, label_dim, fixed)
        out = generate.sample_images(
            net, solver, ts, noise, drawn, state_dtype=state_dtype, device=device
        )
        images.append(generate.to_uint8(out))
        labels += drawn
    captions = [str(c) for c in labels[:columns]] if label_dim else None
    rows = -(-len(seeds) // columns)
    row_captions = [str(seeds[r * columns]) for r in range(rows)]
    canvas = generate.grid_image(
        np.concatenate(images), columns, captions=captions, row_captions=row_captions
    )
    generate.write_grid(path, canvas)


def _gathered_statistics(detector_path: str, images: str, batch: int, device: str | None):
    """Feature statistics of ``images``, split across torchrun ranks and summed."""
    from .metrics import fid

    rank, world = _distributed()
    if device is None:
        device = (
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
    detector = fid.load_detector(detector_path, device)
    stats = fid.image_statistics(
        detector, images, batch=batch, device=device, rank=rank, world_size=world
    )
    if world > 1:
        import torch.distributed as dist

        if stats.n == 0:
            raise click.ClickException(f"rank {rank} got no images: use fewer processes")
        parts = [
            torch.tensor([float(stats.n)], dtype=torch.float64),
            torch.from_numpy(stats.sum),
            torch.from_numpy(stats.sum_outer),
        ]
        for part in parts:
            moved = part.to(device)
            dist.all_reduce(moved)
            part.copy_(moved.cpu())
        stats.n = int(parts[0].item())
        stats.sum, stats.sum_outer = parts[1].numpy(), parts[2].numpy()
        dist.destroy_process_group()
    return stats, rank


@main.command(name="fid")
@click.option("--images", required=True, help="Folder of images, or an .npz of uint8 NHWC images.")
@click.option(
    "--ref", "ref_path", required=True, help="Reference statistics (.npz with mu, sigma)."
)
@click.option("--detector", required=True, help="NVIDIA's TorchScript inception-2015-12-05.pt.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default=None)
def fid_command(images: str, ref_path: str, detector: str, batch: int, device: str | None) -> None:
    """Frechet Inception Distance of IMAGES against reference statistics, as EDM computes it."""
    from .metrics import fid

    try:
        mu_ref, sigma_ref = fid.load_reference(ref_path)
        stats, rank = _gathered_statistics(detector, images, batch, device)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if rank == 0:
        value = fid.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
        click.echo(f"{value:.6g}")
        click.echo(f"FID over {stats.n} images", err=True)


@main.command(name="fid-ref")
@click.option("--images", required=True, help="Folder of images, or an .npz of uint8 NHWC images.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--detector", required=True, help="NVIDIA's TorchScript inception-2015-12-05.pt.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default=None)
def fid_ref_command(images: str, out: str, detector: str, batch: int, device: str | None) -> None:
    """Write reference statistics (mu, sigma) of IMAGES to an npz in EDM's format."""
    from .metrics import fid

    try:
        stats, rank = _gathered_statistics(detector, images, batch, device)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if rank == 0:
        fid.save_reference(out, stats.mu, stats.sigma)
        click.echo(f"wrote {out} from {stats.n} images", err=True)


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
