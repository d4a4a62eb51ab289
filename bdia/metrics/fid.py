"""FID as EDM computes it.

The Inception detector is a file the user supplies (NVIDIA's TorchScript
``inception-2015-12-05.pt``, called as ``net(images, return_features=True)`` on
uint8 NCHW images, 2048 features). Statistics are accumulated in float64 with the
unbiased covariance; reference statistics use EDM's npz format (arrays ``mu`` and
``sigma``). Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from .._files import replace_atomic

__all__ = [
    "FeatureStatistics",
    "frechet_distance",
    "load_reference",
    "save_reference",
    "load_detector",
    "extract_features",
    "DETECTOR_FILENAME",
]

ArrayLike = torch.Tensor | np.ndarray
DETECTOR_FILENAME = "inception-2015-12-05.pt"


def _as_float64_2d(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a feature batch of shape (N, D), got shape {x.shape}")
    return x


class FeatureStatistics:
    """Running count, sum and sum of outer products of feature vectors (float64)."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim, dtype=np.float64)
        self.sum_outer = None if dim is None else np.zeros((dim, dim), dtype=np.float64)

    def _init(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
            self.sum = np.zeros(dim, dtype=np.float64)
            self.sum_outer = np.zeros((dim, dim), dtype=np.float64)
        elif dim != self.dim:
            raise ValueError(f"feature dimension {dim} does not match accumulated {self.dim}")

    def add(self, features: ArrayLike) -> FeatureStatistics:
        x = _as_float64_2d(features)
        self._init(x.shape[1])
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    update = add

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add another accumulator's totals into this one (in place); returns self."""
        if other.dim is None:
            return self
        self._init(other.dim)
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        out = FeatureStatistics()
        out.merge(self)
        out.merge(other)
        return out

    @property
    def mu(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features accumulated")
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.mu
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    out = scipy.linalg.sqrtm(a)
    if isinstance(out, tuple):  # some scipy versions return (sqrtm, errest)
        out = out[0]
    return np.asarray(out)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part (as EDM)."""
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    m = np.square(mu1 - mu2).sum()
    s = _sqrtm(np.dot(sigma1, sigma2))
    fid = m + np.trace(sigma1 + sigma2 - s * 2)
    return float(np.real(fid))


def load_reference(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load (mu, sigma) from an npz in EDM's format (e.g. cifar10-32x32.npz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID reference statistics not found: {path}. Get EDM's published FID "
            "reference statistics (cifar10-32x32.npz) and put the file there, or make "
            "one from a dataset with `bdia fid-ref`."
        )
    with np.load(path, allow_pickle=False) as data:
        for key in ("mu", "sigma"):
            if key not in data.files:
                raise ValueError(
                    f"{path}: FID reference npz has no array '{key}' (found {data.files})"
                )
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
    return mu, sigma


def save_reference(path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as float64 arrays to an npz in EDM's format, atomically."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)

    replace_atomic(path, write)


def load_detector(
    path: str | os.PathLike[str], device: torch.device | str | None = None
) -> torch.jit.ScriptModule:
    """Load NVIDIA's TorchScript Inception detector (inception-2015-12-05.pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception detector not found: {path}. Get {DETECTOR_FILENAME}, NVIDIA's "
            "TorchScript Inception-v3 that EDM's FID uses, put it at that path or pass its "
            "location; nothing is downloaded at run time."
        )
    map_location = torch.device("cpu") if device is None else torch.device(device)
    net = torch.jit.load(str(path), map_location=map_location)
    net.eval()
    return net


@torch.no_grad()
def extract_features(detector: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features (N, 2048) in float64 of uint8 NCHW images (1 channel is repeated to 3)."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, 3, H, W) or (N, 1, H, W), "
            f"got shape {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    try:
        device = next(detector.parameters()).device
        images = images.to(device)
    except (StopIteration, AttributeError, RuntimeError):
        pass
    feats = detector(images, return_features=True)
    return feats.to(torch.float64)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(source: str | os.PathLike[str]) -> list[Path] | np.ndarray:
    """The images of ``source``: sorted image files of a folder (recursively), or the uint8
    array (N, H, W, C) of an npz (its first array, as EDM's ``samples.npz`` files hold)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p
            for p in source.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
        return files
    if source.suffix == ".npz" and source.is_file():
        with np.load(source) as data:
            array = data[data.files[0]]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(
                f"{source}: expected uint8 images (N, H, W, 1 or 3), "
                f"got {array.dtype} {array.shape}"
            )
        return array
    raise FileNotFoundError(f"no image folder or .npz at {source}")


def _load_batch(items: list[Path] | np.ndarray) -> torch.Tensor:
    if isinstance(items, np.ndarray):
        array = items
    else:
        from PIL import Image

        arrays = [np.asarray(Image.open(p)) for p in items]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"images of different sizes in one folder: {sorted(shapes)}")
        array = np.stack(arrays)
        if array.ndim == 3:
            array = array[..., None]
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {array.shape[1:]}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def image_statistics(
    detector: torch.nn.Module,
    source: str | os.PathLike[str],
    *,
    batch: int = 64,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> FeatureStatistics:
    """Accumulate detector features of this rank's share (``[rank::world_size]``) of ``source``."""
    items = list_images(source)
    mine = items[rank::world_size]
    stats = FeatureStatistics()
    for start in range(0, len(mine), batch):
        images = _load_batch(mine[start : start + batch]).to(device)
        stats.add(extract_features(detector, images))
    return stats
