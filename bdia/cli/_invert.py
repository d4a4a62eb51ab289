"""``bdia invert``: images to latents exactly with bdia and back, sharded over torchrun's
ranks, with a summary (``bdia-invert.json``) that a rerun continues."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import torch

from .. import __version__
from .._files import write_atomic, write_png
from ..ode import DTYPE_NAMES
from . import _ranks
from ._common import (
    _NETWORK_THREADS,
    _SOLVER_HELP,
    MAX_STEPS,
    STATE_DTYPE,
    InputPathType,
    OutputPathType,
    _check_class,
    _default_device,
    _device_option,
    _files_of,
    _grid_options,
    _images,
    _invertible_gamma_option,
    _karras,
    _load_denoiser,
    _network_given,
    _network_identity,
    _one_line,
    _Progress,
    _progress_option,
    _refuse_existing,
    _set_threads,
    _solver,
    _state_dtype,
    _threads_option,
    dtype_name,
)

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


def _check_pngs(files: list[Path], net: torch.nn.Module, network_spec: str) -> None:
    """Refuse, naming the file, any that is not a PNG of the network's size and channels."""
    from PIL import Image

    from .. import generate
    from ..metrics.fid import _IMAGE_ERRORS

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


@click.command(name="invert")
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
@_invertible_gamma_option
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
        if not _ranks.rank_zero_alone():
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
    rank, world = _ranks.rank_and_world()
    # Every rank has read the folder before rank 0 changes it.
    _ranks.wait_for_ranks(world)
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
    from .. import generate
    from ..models import digits

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
    from .. import generate
    from .._files import file_sha256

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
    from .. import generate
    from .._files import file_sha256
    from .._shards import share_of
    from ..editing import Inversion
    from ..latents import save_latents
    from ..ode import DiffusionODE
    from ..pairs import StatePair
    from ..schedules import EDM

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
    _ranks.wait_for_ranks(world)

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
    _ranks.wait_for_ranks(world, leave=True)
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
