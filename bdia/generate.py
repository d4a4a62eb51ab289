"""Seed-sharded image generation with a preconditioned network (the engine of ``bdia sample``).

Every image is a function of its seed alone: its noise and (unless fixed) its class label
come from ``torch.Generator().manual_seed(seed)``, so the images do not depend on batch size,
rank or how often a run was restarted. Each PNG is written to a temporary file and renamed,
and a run skips seeds whose PNG already exists, so a run killed at any moment and restarted
ends with exactly the images of an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .ode import DiffusionODE
from .sampling import sample
from .schedules import EDM

__all__ = ["parse_seeds", "image_path", "random_network", "RANDOM_NETWORKS", "generate_images"]

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0-49999"``, ``"1,5,7-9"`` into a sorted list of distinct seeds.

    Raises:
        ValueError: naming the part that does not parse.
    """
    seeds: set[int] = set()
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


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def generate_images(
    net: torch.nn.Module,
    solver: object,
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
        class_label: a fixed class, or None for one drawn from each seed.
        state_dtype: dtype of the sampler state.

    Returns:
        Paths of the PNGs this call wrote.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not os.access(outdir, os.W_OK):
        raise PermissionError(f"cannot write to {outdir}")
    label_dim = getattr(net, "label_dim", 0)
    if class_label is not None and not 0 <= class_label < max(label_dim, 1):
        raise ValueError(f"class {class_label} is outside 0..{label_dim - 1}")
    res, channels = net.img_resolution, net.img_channels
    mine = []
    for seed in list(seeds)[rank::world_size]:
        path = image_path(outdir, seed)
        # A run killed while writing leaves this seed's temporary file; only this rank owns it.
        for stale in path.parent.glob(f".{path.stem}.*.png"):
            stale.unlink(missing_ok=True)
        if not path.exists():
            mine.append(seed)
    written = []
    sigma_max = float(ts[0])
    for group in _batches(mine, batch):
        noise, labels = [], []
        for seed in group:
            gen = torch.Generator().manual_seed(seed)
            noise.append(torch.randn(channels, res, res, generator=gen, dtype=torch.float64))
            drawn = int(torch.randint(max(label_dim, 1), (1,), generator=gen))
            labels.append(class_label if class_label is not None else drawn)
        x = (sigma_max * torch.stack(noise)).to(device=device, dtype=state_dtype)
        cond = {}
        if label_dim:
            cond["class_labels"] = torch.eye(label_dim, device=device)[labels]
        ode = DiffusionODE(net, EDM(), cond=cond)
        with torch.no_grad():
            images = sample(ode, solver, x, ts, progress=False)
        pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        for seed, image in zip(group, pixels):
            path = image_path(outdir, seed)
            _write_png(path, image[..., 0] if channels == 1 else image)
            written.append(path)
        if on_batch is not None:
            on_batch(len(group))
    return written
