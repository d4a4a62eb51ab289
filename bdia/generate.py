"""Seed-sharded image generation with a preconditioned network (the engine of ``bdia sample``).

Every image is a function of its seed alone: its noise and (unless fixed) its class label
come from ``torch.Generator().manual_seed(seed)``, so the images do not depend on batch size,
rank or how often a run was restarted. Each PNG is written to a temporary file and renamed,
and a run skips seeds whose PNG already exists, so a run killed at any moment and restarted
ends with exactly the images of an uninterrupted one.
"""

from __future__ import annotations

import fnmatch
import json
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from ._files import write_atomic, write_png
from ._shards import check_share
from .ode import DiffusionODE
from .sampling import sample
from .schedules import EDM
from .solvers.base import Solver, is_flag

__all__ = [
    "parse_seeds",
    "image_path",
    "random_network",
    "RANDOM_NETWORKS",
    "seed_inputs",
    "sample_images",
    "to_uint8",
    "generate_images",
    "grid_image",
    "write_grid",
    "reconstruct",
    "RUN_RECORD",
    "read_run_record",
    "differing_settings",
    "write_run_record",
]

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

#: Seeds must fit torch.Generator.manual_seed, which takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1


def parse_seeds(text: str, limit: int | None = None) -> list[int]:
    """Parse ``"0-49999"``, ``"1,5,7-9"`` into a sorted list of distinct seeds.

    The count is checked against ``limit`` before any list is built, so that a range such as
    ``0-1000000000`` is refused at once instead of filling the memory.

    Raises:
        ValueError: naming the part that does not parse, or the count when it exceeds ``limit``.
    """
    ranges = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(
                f"cannot parse seeds {text!r}: {part.strip()!r} is not N or N-M "
                "(use e.g. '0-49999' or '1,5,7-9')"
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"cannot parse seeds {text!r}: range {part.strip()!r} runs backward")
        if hi > MAX_SEED:
            raise ValueError(f"cannot use seed {hi}: seeds must lie in 0..{MAX_SEED}")
        ranges.append((lo, hi))
    # Count the union of the ranges (they may overlap) without enumerating it.
    count, reach = 0, -1
    for lo, hi in sorted(ranges):
        if hi > reach:
            count += hi - max(lo, reach + 1) + 1
            reach = hi
    if limit is not None and count > limit:
        raise ValueError(f"{text!r} names {count:,} seeds, more than {limit:,}")
    seeds: set[int] = set()
    for lo, hi in ranges:
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def image_path(outdir: str | os.PathLike[str], seed: int) -> Path:
    """Where the PNG of ``seed`` goes: EDM's layout, 1000 images per subfolder."""
    return Path(outdir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


RANDOM_NETWORKS = {
    "ddpmpp-cond": dict(
        embedding_type="positional",
        encoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
        label_dim=10,
    ),
    "ncsnpp-cond": dict(
        embedding_type="fourier",
        encoder_type="residual",
        channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1],
        label_dim=10,
    ),
    "tiny-cond": dict(
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        img_resolution=16,
        label_dim=10,
    ),
}
for _name in ("ddpmpp", "ncsnpp"):
    RANDOM_NETWORKS[f"{_name}-uncond"] = dict(RANDOM_NETWORKS[f"{_name}-cond"], label_dim=0)


def random_network(name: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised EDMPrecond(SongUNet), the same weights for the same name and seed.

    ``ddpmpp-*`` and ``ncsnpp-*`` are EDM's CIFAR-10 configurations; ``tiny-cond`` is a small
    16x16 network for smoke tests.
    """
    from .models.checkpoints import build_network

    if name not in RANDOM_NETWORKS:
        raise ValueError(f"unknown random network {name!r}; choose from {sorted(RANDOM_NETWORKS)}")
    kwargs = dict(
        img_resolution=32,
        img_channels=3,
        model_channels=128,
        channel_mult=[2, 2, 2],
        num_blocks=4,
        attn_resolutions=[16],
        augment_dim=9,
        dropout=0.13,
    )
    kwargs.update(RANDOM_NETWORKS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network("EDMPrecond", kwargs)
        # Fresh output layers are zero; random ones make the images depend on the network.
        for p in net.parameters():
            if not p.any():
                p.data.normal_(0.0, 0.02)
    return net.eval().requires_grad_(False)


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _single_label(class_label: Any) -> int | None:
    """``class_label`` as an int if it is one integer (Python, numpy or a 0-d integer tensor:
    whatever ``operator.index`` takes but a bool), else None."""
    if is_flag(class_label):
        return None
    try:
        return operator.index(class_label)
    except TypeError:
        return None


def seed_inputs(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    label_dim: int,
    class_label: int | Sequence[int] | None = None,
) -> tuple[Tensor, list[int]]:
    """Unit-variance noise (float64, ``(len(seeds), *shape)``) and the class of every seed.

    Both come from ``torch.Generator().manual_seed(seed)`` (noise first, then the class), so an
    image depends on its seed alone. ``class_label`` fixes the classes: one for all seeds, or
    one per seed; None keeps the drawn ones (all 0 for an unconditional network). One class is
    any integer (a numpy integer or a 0-d integer tensor too).
    """
    single = _single_label(class_label)
    fixed: list[int] | None = None
    if class_label is not None and single is None:
        try:
            items = list(cast(Sequence[int], class_label))
            if any(is_flag(c) for c in items):
                raise TypeError("a bool is no class")
            fixed = [operator.index(c) for c in items]
        except TypeError:
            raise TypeError(
                "class_label must be one integer class or a sequence of them, one per seed; "
                f"got {class_label!r}"
            ) from None
        if len(fixed) != len(seeds):
            raise ValueError(f"{len(fixed)} class labels for {len(seeds)} seeds")
    noise, labels = [], []
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(*shape, generator=gen, dtype=torch.float64))
        drawn = int(torch.randint(max(label_dim, 1), (1,), generator=gen))
        if fixed is not None:
            drawn = fixed[i]
        elif single is not None:
            drawn = single
        labels.append(drawn)
    if label_dim and any(not 0 <= c < label_dim for c in labels):
        raise ValueError(f"class labels must lie in 0..{label_dim - 1}, got {sorted(set(labels))}")
    return torch.stack(noise), labels


def _class_of(label: Any, name: str) -> int:
    """``label`` as a Python int, or a TypeError naming it: ``operator.index`` takes a bool
    (as class 0 or 1) and refuses a float in words that name neither."""
    if not is_flag(label):
        try:
            return operator.index(label)
        except TypeError:
            pass
    raise TypeError(
        f"{name} = {label!r:.60} is not an integer class (an int, or an integer of numpy or "
        "torch); give the class numbers, not one-hot rows"
    )


def _conditioning(
    net: torch.nn.Module,
    labels: Sequence[int],
    batch: int,
    device: torch.device | str,
    name: str = "labels",
) -> dict:
    """``net``'s ``class_labels`` for a batch of ``batch`` images: one-hot float32 rows
    ``(batch or 1, label_dim)``, or no conditioning for an unconditional network.

    Checked before any network call: a count that is neither ``batch`` nor 1 would otherwise
    surface at the network's first call (for an edit's ``target_labels``, after the whole
    inversion), and a negative class would pick a row from the end of the one-hot table.

    Raises:
        TypeError: naming ``name`` and the label, for a label that is no integer (a bool,
            a float, a one-hot row).
        ValueError: naming ``name``, for a count other than ``batch`` or 1, or a class
            outside ``0..label_dim - 1``.
    """
    label_dim = getattr(net, "label_dim", 0)
    if not label_dim:
        return {}
    labels = [_class_of(c, f"{name}[{i}]") for i, c in enumerate(labels)]
    if len(labels) not in (batch, 1):
        raise ValueError(
            f"{name} holds {len(labels)} class labels for a batch of {batch} images; give one "
            f"per image ({batch}), or one for the whole batch"
        )
    outside = [c for c in labels if not 0 <= c < label_dim]
    if outside:
        raise ValueError(
            f"{name}: {outside[0]} is not a class of this network, which has {label_dim} "
            f"(0..{label_dim - 1})"
        )
    return {"class_labels": torch.eye(label_dim, device=device)[labels]}


def sample_images(
    net: torch.nn.Module,
    solver: Solver,
    ts: Tensor | Sequence[float],
    noise: Tensor,
    labels: Sequence[int],
    *,
    state_dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Images from unit-variance ``noise`` scaled to ``sigma = ts[0]`` (EDM schedule).

    ``labels`` are the integer classes of the ``n`` images, one per image or one for all
    (ignored by an unconditional network). Returns the final states ``(n, C, H, W)`` in
    ``state_dtype`` on ``device`` (data in roughly [-1, 1], not clipped).

    Raises:
        ValueError: before any network call, for a number of labels other than ``n`` or 1,
            or a class the network does not have.
    """
    cond = _conditioning(net, labels, noise.shape[0], device)
    x = (float(ts[0]) * noise).to(device=device, dtype=state_dtype)
    ode = DiffusionODE(net, EDM(), cond=cond)
    with torch.no_grad():
        return sample(ode, solver, x, ts, progress=False)


def _image_shape(net: torch.nn.Module) -> tuple[int, int, int]:
    """``(channels, resolution, resolution)`` of the images of ``net`` (an EDM-style network,
    which records ``img_channels`` and ``img_resolution``)."""
    # Plain int attributes, which nn.Module's typing takes for tensors or submodules.
    channels, res = cast(int, net.img_channels), cast(int, net.img_resolution)
    return channels, res, res


def _not_finite(images: Tensor) -> list[int]:
    """The indices of the images of a batch ``(n, ...)`` that hold NaN or Inf."""
    return torch.nonzero(~images.isfinite().flatten(1).all(1)).flatten().tolist()


def to_uint8(images: Tensor) -> np.ndarray:
    """Images in [-1, 1], ``(n, C, H, W)``, as uint8 arrays ``(n, H, W)`` or ``(n, H, W, C)``.

    Rounded as EDM saves images: ``(x * 127.5 + 128)`` clamped to [0, 255] and truncated.

    Raises:
        ValueError: naming the images that hold NaN or Inf, which have no pixel value (a
            NaN's cast to uint8 is undefined and differs between devices).
    """
    bad = _not_finite(images)
    if bad:
        raise ValueError(
            f"cannot save images holding NaN or Inf as pixels: image "
            f"{', '.join(map(str, bad))} of {images.shape[0]} holds NaN or Inf"
        )
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    array = pixels.cpu().numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def grid_image(
    images: np.ndarray,
    columns: int,
    *,
    captions: Sequence[str] | None = None,
    scale: int | None = None,
    row_captions: Sequence[str] | None = None,
) -> Any:
    """Tile uint8 images ``(n, H, W[, C])`` into one PIL image, ``columns`` per row.

    ``captions`` label the columns (a header row), ``row_captions`` the rows (a left margin).
    Cells are enlarged by ``scale`` (nearest neighbour; default: to at least 32 pixels).
    """
    from PIL import Image, ImageDraw

    n, h, w = images.shape[:3]
    scale = scale or max(1, -(-32 // max(h, w)))
    rows = -(-n // columns)
    cell_h, cell_w, pad = h * scale, w * scale, 2
    top = 14 if captions else 0
    left = 8 + 7 * max((len(c) for c in row_captions), default=0) if row_captions else 0
    mode = "L" if images.ndim == 3 else "RGB"
    canvas = Image.new(
        mode,
        (left + columns * (cell_w + pad) + pad, top + rows * (cell_h + pad) + pad),
        color=255 if mode == "L" else (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    ink = 0 if mode == "L" else (0, 0, 0)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        # Pillow sets Image.NEAREST at run time (Image.Resampling, which its stubs know, is
        # missing from Pillow 9.0).
        cell = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)  # type: ignore[attr-defined]
        canvas.paste(cell, (left + pad + c * (cell_w + pad), top + pad + r * (cell_h + pad)))
    for c, text in enumerate(captions or []):
        draw.text(
            (left + pad + c * (cell_w + pad) + cell_w // 2 - 3 * len(text), 1), text, fill=ink
        )
    for r, text in enumerate(row_captions or []):
        draw.text((4, top + pad + r * (cell_h + pad) + cell_h // 2 - 5), text, fill=ink)
    return canvas


def write_grid(path: str | os.PathLike[str], canvas: Any) -> Path:
    """Save a PIL image as PNG through a temporary file and a rename."""
    path = Path(path)
    write_png(path, np.asarray(canvas))
    return path


def reconstruct(
    net: torch.nn.Module,
    solver: Solver,
    ts: Tensor | Sequence[float],
    images: Tensor,
    labels: Sequence[int],
    *,
    state_dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    target_labels: Sequence[int] | None = None,
    edit_solver: Solver | None = None,
    callback: Callable[[dict], None] | None = None,
) -> tuple[Any, Tensor]:
    """Invert ``images`` (taken as the state at ``ts[-1] > 0``) and sample them back.

    The inversion runs under ``labels``. With ``target_labels`` (an edit) the regeneration runs
    under those labels and with ``edit_solver`` (default ``solver``): a single-step solver
    continues from the inverted pair's later state. Returns ``(StatePair at ts[0], ts[1];
    images regenerated at ts[-1])`` in ``state_dtype``. ``callback`` is called after every
    step of both passes, as in ``bdia.sample``. ``labels`` and ``target_labels`` hold one
    integer class per image or one for all; both are checked, as in ``sample_images``,
    before the inversion starts.

    A BDIA pair holds the trajectory's parasitic mode, which only its own conditioning
    cancels; regenerated under other labels it grows toward the data and leaves noise, so
    edits are best regenerated with the base solver (``edit_solver=solver.solver``).
    """
    from .sampling import invert

    batch = images.shape[0]
    cond = _conditioning(net, labels, batch, device)
    target = None
    if target_labels is not None:
        target = _conditioning(net, target_labels, batch, device, "target_labels")
    x = images.to(device=device, dtype=state_dtype)
    ode = DiffusionODE(net, EDM(), cond=cond)
    with torch.no_grad():
        pair = invert(ode, solver, x, ts, progress=False, callback=callback)
        if target is not None:
            ode = DiffusionODE(net, EDM(), cond=target)
            solver = edit_solver if edit_solver is not None else solver
        back = sample(ode, solver, pair, ts, progress=False, callback=callback)
    return pair, back


#: The file in an output folder that records the settings its images were made with.
RUN_RECORD = "bdia-run.json"
_RECORD_FORMAT = "bdia-run/1"


def read_run_record(outdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings recorded in ``outdir`` (None if it has no record).

    Raises:
        ValueError: if the record exists but cannot be read as one.
    """
    path = Path(outdir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != _RECORD_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        return dict(record["settings"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{path} is not a run record this version of bdia reads ({err}); move the folder "
            "aside or pass --overwrite to start it afresh"
        ) from None


def differing_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One ``"name (X in the record, Y now)"`` for each setting whose value differs."""

    def show(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return [
        f"{name} ({show(recorded.get(name))} in the record, {show(current.get(name))} now)"
        for name in dict.fromkeys([*current, *recorded])
        if recorded.get(name) != current.get(name)
    ]


def write_run_record(
    outdir: str | os.PathLike[str], settings: dict[str, Any], info: dict[str, Any] | None = None
) -> Path:
    """Record ``settings`` (JSON values; compared by later runs) and ``info`` (not compared)."""
    record = {"format": _RECORD_FORMAT, "settings": settings, "info": info or {}}
    return write_atomic(Path(outdir) / RUN_RECORD, json.dumps(record, indent=1) + "\n")


def _remove_temporaries(outdir: Path, seeds: Sequence[int]) -> None:
    """Remove the temporary PNGs (``.NAME.XXXX.png``) that a run killed while writing left
    for ``seeds``; only the rank whose share they are owns them.

    Each folder is listed once: a glob per seed listed a folder of 1000 images 1000 times,
    33 s before a resumed run of 39,000 images could start.
    """
    stems: dict[Path, set[str]] = {}
    for seed in seeds:
        path = image_path(outdir, seed)
        stems.setdefault(path.parent, set()).add(path.stem)
    for folder, mine in stems.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            hidden = [entry.name for entry in entries if entry.name.startswith(".")]
        for name in hidden:
            stem = name[1:].split(".", 1)[0]
            if stem in mine and fnmatch.fnmatchcase(name, f".{stem}.*.png"):
                (folder / name).unlink(missing_ok=True)


def generate_images(
    net: torch.nn.Module,
    solver: Solver,
    ts: Tensor,
    seeds: Sequence[int],
    outdir: str | os.PathLike[str],
    *,
    batch: int = 64,
    class_label: int | None = None,
    state_dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Sample one PNG per seed into ``outdir`` (this rank's share: ``seeds[rank::world_size]``).

    Args:
        net: preconditioned network ``net(x, sigma, class_labels)`` (EDM form), in its
            dtype on ``device``.
        solver: a registered solver or BidirectionalWrapper.
        ts: the time grid of the EDM schedule (sigma = t), noisiest first.
        seeds: all seeds of the run.
        outdir: output folder; existing PNGs are kept and their seeds skipped.
        batch: images per network call (does not change any image).
        class_label: a fixed class, or None for one drawn from each seed (an unconditional
            network takes None or 0).
        state_dtype: dtype of the sampler state.
        on_batch: called with the number of seeds finished: once at the start with those
            already on disk (skipped), then after every batch, so that the counts of a
            resumed run add up to its share of the seeds.
        overwrite: regenerate the PNGs that already exist instead of skipping their seeds.

    Returns:
        Paths of the PNGs this call wrote.

    Raises:
        ValueError: before any image, for ``batch < 1``, a rank outside ``0..world_size - 1``
            or a class the network does not have; naming the seeds, for images holding NaN
            or Inf (their batch is not written).
    """
    check_share(batch, rank, world_size)
    label_dim = getattr(net, "label_dim", 0)
    if class_label is not None and not label_dim and class_label != 0:
        raise ValueError(
            f"an unconditional network takes no class; got class {class_label} (give none)"
        )
    if class_label is not None and label_dim and not 0 <= class_label < label_dim:
        raise ValueError(f"class {class_label} is outside 0..{label_dim - 1}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not os.access(outdir, os.W_OK):
        raise PermissionError(f"cannot write to {outdir}")
    shape = _image_shape(net)
    share = list(seeds)[rank::world_size]
    _remove_temporaries(outdir, share)
    mine = [seed for seed in share if overwrite or not image_path(outdir, seed).exists()]
    if on_batch is not None and len(share) > len(mine):
        on_batch(len(share) - len(mine))
    written = []
    for group in _batches(mine, batch):
        noise, labels = seed_inputs(group, shape, label_dim, class_label)
        images = sample_images(
            net, solver, ts, noise, labels, state_dtype=state_dtype, device=device
        )
        bad = _not_finite(images)
        if bad:
            # Before any PNG of the batch, so that every PNG on disk is a finished image.
            raise ValueError(
                f"seed {', '.join(str(group[i]) for i in bad)} gave an image holding NaN or "
                "Inf: the sampler diverged (try more steps, a float64 state or another "
                "solver); the images of the batches before it are kept"
            )
        for seed, image in zip(group, to_uint8(images)):
            path = image_path(outdir, seed)
            write_png(path, image)
            written.append(path)
        if on_batch is not None:
            on_batch(len(group))
    return written
