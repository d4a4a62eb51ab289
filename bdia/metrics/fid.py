"""FID as EDM computes it.

The Inception detector is a file the user supplies (NVIDIA's TorchScript
``inception-2015-12-05.pt``, called as ``net(images, return_features=True)`` on
uint8 NCHW images, 2048 features). Statistics are accumulated in float64 with the
unbiased covariance; reference statistics use EDM's npz format (arrays ``mu`` and
``sigma``). Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "FeatureStatistics",
    "frechet_distance",
    "load_reference",
    "save_reference",
    "load_detector",
    "extract_features",
    "DETECTOR_FILENAME",
    "DETECTOR_URL",
]

DETECTOR_FILENAME = "inception-2015-12-05.pt"
DETECTOR_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/"
    "files/metrics/inception-2015-12-05.pkl"
)


def _as_float64_2d(x) -> np.ndarray:
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

    def add(self, features) -> FeatureStatistics:
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


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
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


def load_reference(path) -> tuple[np.ndarray, np.ndarray]:
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


def save_reference(path, mu, sigma) -> None:
    """Write (mu, sigma) to an npz atomically (temporary file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=np.asarray(mu, dtype=np.float64),
                     sigma=np.asarray(sigma, dtype=np.float64))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_detector(path, device=None):
    """Load NVIDIA's TorchScript Inception detector (inception-2015-12-05.pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception detector not found: {path}. Download NVIDIA's TorchScript "
            f"{DETECTOR_FILENAME} (the detector EDM uses for FID, {DETECTOR_URL}) and put "
            "it at that path, or pass its location; nothing is downloaded at run time."
        )
    map_location = torch.device("cpu") if device is None else torch.device(device)
    net = torch.jit.load(str(path), map_location=map_location)
    net.eval()
    return net


@torch.no_grad()
def extract_features(detector, images) -> torch.Tensor:
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
