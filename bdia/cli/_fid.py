"""``bdia fid`` and ``bdia fid-ref``: Inception statistics of image folders, gathered over
torchrun's ranks, and the Frechet distance between two sets."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from . import _ranks
from ._common import (
    InputPathType,
    OutputPathType,
    _default_device,
    _device_option,
    _one_line,
    _overwrite_option,
    _Progress,
    _progress_option,
    _refuse_existing_file,
    _set_threads,
    _threads_option,
)


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
    from ..metrics import fid

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
    rank, world = _ranks.rank_and_world()
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


@click.command(name="fid")
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
    from ..metrics import fid

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


@click.command(name="fid-ref")
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
    from ..metrics import fid

    _refuse_existing_file(out, "--out", overwrite)
    stats, rank = _gathered_statistics(
        detector, images, batch, workers, device, threads, not no_progress
    )
    if rank == 0:
        fid.save_reference(out, stats.mu, stats.sigma)
        rate = stats.images_per_second
        click.echo(f"wrote {out} from {stats.n} images; features at {rate:,.1f} images/s", err=True)
