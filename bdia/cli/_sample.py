"""``bdia sample``: one PNG per seed with EDM's grid, sharded over torchrun's ranks, reruns
skipping finished seeds; with ``--latents``, images from the latents ``bdia invert`` wrote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from .. import __version__
from .._files import write_png
from ..solvers import Solver, bdia, get_solver
from . import _ranks
from ._common import (
    _NETWORK_THREADS,
    _SOLVER_HELP,
    GRID_MAX_IMAGES,
    MAX_SEEDS,
    MAX_STEPS,
    NETWORK_DTYPE,
    STATE_DTYPE,
    GammaType,
    InputPathType,
    OutputPathType,
    _check_class,
    _default_device,
    _device_option,
    _files_of,
    _grid_options,
    _images,
    _karras,
    _load_denoiser,
    _network_given,
    _network_identity,
    _one_line,
    _Progress,
    _progress_option,
    _refuse_existing,
    _refuse_existing_file,
    _set_network_dtype,
    _set_threads,
    _solver,
    _state_dtype,
    _threads_option,
    dtype_name,
)


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
    from .. import generate

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


@click.command(name="sample")
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
    from .. import generate

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
        from ..models.networks import compile_network

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
    rank, world = _ranks.rank_and_world()
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
        _ranks.wait_for_ranks(world, leave=True)
        if grid_path is not None and rank == 0:
            write_grid(grid_path)
        return

    # Every rank has checked the folder before rank 0 changes it.
    _ranks.wait_for_ranks(world)
    if rank == 0:
        for image in stale:
            image.unlink()
        if stale:
            click.echo(f"removed {_images(len(stale))} made with other settings", err=True)
        generate.write_run_record(outdir, settings, info)
    _ranks.wait_for_ranks(world)
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
    _ranks.wait_for_ranks(world, leave=True)
    if rank == 0:
        click.echo(f"{_images(len(seed_list))} in {outdir}", err=True)
        # Last, also where it is sampled on its own: a run stopped before leaves no grid,
        # so the same command run again resumes the folder instead of being refused.
        if grid_path is not None:
            write_grid(grid_path)


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

    from .. import generate
    from .._shards import share_of
    from ..editing import Inversion
    from ..latents import load_latents
    from ..ode import DiffusionODE, wide_dtype
    from ..schedules import EDM

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
    rank, world = _ranks.rank_and_world()
    # Every rank has looked for existing images before any rank writes one.
    _ranks.wait_for_ranks(world)
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
    _ranks.wait_for_ranks(world, leave=True)
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

    from .. import generate

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
