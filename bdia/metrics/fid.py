"""FID as EDM computes it.

The Inception detector is a file the user supplies (NVIDIA's TorchScript
``inception-2015-12-05.pt``, called as ``net(images, return_features=True)`` on
uint8 NCHW images, 2048 features). Statistics are accumulated in float64 with the
unbiased covariance; reference statistics use EDM's npz format (arrays ``mu`` and
``sigma``). Nothing is downloaded at run time.

A covariance from ``n`` feature vectors has rank at most ``n - 1``: with fewer images than
the feature dimension (2048) it is singular and the Frechet distance is biased, possibly
negative. ``FeatureStatistics.sigma`` then issues a ``FIDSampleSizeWarning``; a meaningful
FID needs 10k-50k images (EDM uses 50k).
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from .._files import replace_atomic
from .._shards import check_share
from ..twoword import has_float64

__all__ = [
    "FIDSampleSizeWarning",
    "FeatureStatistics",
    "frechet_distance",
    "load_reference",
    "save_reference",
    "load_detector",
    "extract_features",
    "DETECTOR_FILENAME",
    "StandInDetector",
    "image_statistics",
    "default_workers",
]

ArrayLike = torch.Tensor | np.ndarray
DETECTOR_FILENAME = "inception-2015-12-05.pt"


class FIDSampleSizeWarning(UserWarning):
    """Statistics from fewer feature vectors than dimensions: a singular covariance, so the
    Frechet distance is biased (and may come out negative)."""


def _warn_sample_size(n: int, dim: int, stacklevel: int) -> None:
    warnings.warn(
        f"FID statistics from {n} images (feature vectors) of dimension {dim}: with fewer "
        f"than {dim} the covariance is singular (rank <= {max(n - 1, 0)}) and the Frechet "
        f"distance is biased, even negative. Use at least {dim} images, and in practice "
        "10k-50k (EDM uses 50k), for a meaningful FID",
        FIDSampleSizeWarning,
        stacklevel=stacklevel + 1,
    )


def _as_float64_2d(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a feature batch of shape (N, D), got shape {x.shape}")
    return x


class FeatureStatistics:
    """Running count, sum and sum of outer products of feature vectors (float64).

    Feature batches given as torch tensors are summed on their own device (a GPU's float64
    matrix product, without a copy to the host or a wait for the detector per batch), or on
    the host where the device has no float64 (MPS); the totals move to the host when
    ``sum`` or ``sum_outer`` is read. NumPy batches are summed on the host.

    Attributes:
        n: number of feature vectors added.
        sum: ``(dim,)`` float64 NumPy array, their sum (None until the first vectors fix
            ``dim``).
        sum_outer: ``(dim, dim)`` float64 NumPy array, the sum of their outer products.
        seconds: wall-clock seconds ``image_statistics`` spent reading images and running
            the detector for them (0.0 for vectors added directly); ``merge`` adds them,
            ``all_reduce`` keeps the slowest rank's.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self._sum = None if dim is None else np.zeros(dim, dtype=np.float64)
        self._sum_outer = None if dim is None else np.zeros((dim, dim), dtype=np.float64)
        # (sum, sum_outer) of the torch batches not yet added to the host totals.
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seconds = 0.0

    def _flush(self) -> None:
        if self._pending is not None:
            pending_sum, pending_outer = self._pending
            self._pending = None
            self._sum += pending_sum.cpu().numpy()
            self._sum_outer += pending_outer.cpu().numpy()

    @property
    def sum(self) -> np.ndarray | None:
        self._flush()
        return self._sum

    @sum.setter
    def sum(self, value: np.ndarray) -> None:
        self._flush()
        self._sum = value

    @property
    def sum_outer(self) -> np.ndarray | None:
        self._flush()
        return self._sum_outer

    @sum_outer.setter
    def sum_outer(self, value: np.ndarray) -> None:
        self._flush()
        self._sum_outer = value

    def _init(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
            self._sum = np.zeros(dim, dtype=np.float64)
            self._sum_outer = np.zeros((dim, dim), dtype=np.float64)
        elif dim != self.dim:
            raise ValueError(f"feature dimension {dim} does not match accumulated {self.dim}")

    def add(self, features: ArrayLike) -> FeatureStatistics:
        """Add a batch of feature vectors ``(N, dim)`` (a tensor on any device, or an array)."""
        if not isinstance(features, torch.Tensor):
            a = _as_float64_2d(features)
            self._init(a.shape[1])
            self.n += a.shape[0]
            self._sum += a.sum(axis=0)
            self._sum_outer += a.T @ a
            return self
        if features.ndim != 2:
            raise ValueError(
                f"expected a feature batch of shape (N, D), got shape {tuple(features.shape)}"
            )
        x = features.detach()
        if not has_float64(x.device):
            # MPS has no float64: its features are summed on the host.
            x = x.cpu()
        x = x.to(torch.float64)
        dim = x.shape[1]
        self._init(dim)
        if self._pending is not None and self._pending[0].device != x.device:
            self._flush()
        if self._pending is None:
            self._pending = (
                torch.zeros(dim, dtype=torch.float64, device=x.device),
                torch.zeros(dim, dim, dtype=torch.float64, device=x.device),
            )
        self.n += x.shape[0]
        self._pending[0].add_(x.sum(dim=0))
        self._pending[1].addmm_(x.T, x)
        return self

    update = add

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add another accumulator's totals into this one (in place); returns self.

        The seconds add too: merged parts are taken to have run one after the other.

        Raises:
            ValueError: the two hold features of different dimensions; this one is left
                unchanged.
        """
        if other.dim is None:
            self.seconds += other.seconds
            return self
        self._init(other.dim)
        self.seconds += other.seconds
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def all_reduce(self, device: torch.device | str = "cpu") -> FeatureStatistics:
        """Sum the statistics of every rank of torch.distributed's default process group,
        in place (every rank ends with the totals); returns self.

        The sums travel as float64 tensors on ``device``, which must be one the group's
        backend takes (this rank's GPU for NCCL, the CPU for gloo). A rank that got no
        images joins with zeros. ``seconds`` becomes the slowest rank's, since the ranks run
        at the same time. Without an initialised process group this does nothing.

        Raises:
            ValueError: on every rank alike, when ranks accumulated different feature
                dimensions (say, two different detectors); the statistics are left unchanged.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        # One MAX reduction carries the largest dimension, minus the smallest (ranks without
        # features send -inf for both) and the slowest time, so that every rank learns the
        # shape to send, and every rank refuses a mismatch, rather than one rank raising
        # while the others wait in the next collective.
        dims = [-math.inf] * 2 if self.dim is None else [float(self.dim), -float(self.dim)]
        info = torch.tensor([*dims, self.seconds], dtype=torch.float64, device=device)
        dist.all_reduce(info, op=dist.ReduceOp.MAX)
        largest, smallest, seconds = info[0].item(), -info[1].item(), info[2].item()
        if largest != smallest and largest != -math.inf:
            raise ValueError(
                f"ranks accumulated features of different dimensions ({smallest:.0f} to "
                f"{largest:.0f}); every rank must use the same detector"
            )
        self.seconds = seconds
        if largest == -math.inf:  # no rank has any features
            return self
        self._init(int(largest))
        # float64 holds the count exactly up to 2**53 images.
        head = np.concatenate([[float(self.n)], self.sum])
        outer = self.sum_outer
        assert outer is not None  # _init made it
        for host in (head, outer):
            moved = torch.from_numpy(host).to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            host[...] = moved.cpu().numpy()
        self.n, self.sum = int(head[0]), head[1:].copy()
        return self

    @property
    def images_per_second(self) -> float:
        """``n / seconds``: the rate ``image_statistics`` ran at (NaN if it never ran)."""
        return self.n / self.seconds if self.seconds > 0 else math.nan

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        out = FeatureStatistics()
        out.merge(self)
        out.merge(other)
        return out

    @property
    def mu(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features accumulated")
        total = self.sum
        assert total is not None  # made with dim by the first vectors
        return total / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``(dim, dim)``, float64.

        Warns:
            FIDSampleSizeWarning: when ``n < dim`` (the covariance is then singular).
        """
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        dim, outer = self.dim, self.sum_outer
        assert dim is not None and outer is not None  # set by the first vectors
        if self.n < dim:
            _warn_sample_size(self.n, dim, stacklevel=2)
        mu = self.mu
        cov = (outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)``; warns as ``sigma`` does when ``n < dim``."""
        if self.dim is not None and 2 <= self.n < self.dim:
            _warn_sample_size(self.n, self.dim, stacklevel=2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FIDSampleSizeWarning)
                return self.mu, self.sigma
        return self.mu, self.sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    out = scipy.linalg.sqrtm(a)
    if isinstance(out, tuple):  # some scipy versions return (sqrtm, errest)
        out = out[0]
    return np.asarray(out)


def _statistics_problem(mu: np.ndarray, sigma: np.ndarray) -> str | None:
    """Why float64 ``mu`` and ``sigma`` are not feature statistics ``(D,)``, ``(D, D)``, or
    None."""
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        return f"mu has shape {mu.shape} and sigma {sigma.shape}"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "mu or sigma holds NaN or Inf"
    return None


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part (as EDM).

    ``mu`` are ``(D,)`` and ``sigma`` ``(D, D)`` arrays (a scalar pair for ``D = 1``); the
    result is a float. When a covariance is singular (fewer feature vectors than D), sqrtm of
    the product is ill-conditioned: its tiny imaginary part is dropped as EDM does, and a
    result below zero (which a distance cannot be) issues a ``FIDSampleSizeWarning``.

    Raises:
        ValueError: if a ``mu`` and its ``sigma`` do not have shapes ``(D,)`` and ``(D, D)``,
            hold NaN or Inf, or the two pairs differ in ``D``.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    for which, mu, sigma in (("first", mu1, sigma1), ("second", mu2, sigma2)):
        problem = _statistics_problem(mu, sigma)
        if problem is not None:
            # NaN would come out as the distance, where it reads as a result.
            raise ValueError(
                f"the {which} statistics are not feature statistics: {problem}; expected mu "
                "(D,) and sigma (D, D), finite"
            )
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mismatched statistics: features of dimension {mu1.size} and {mu2.size} (are "
            "both from the same detector?)"
        )
    m = np.square(mu1 - mu2).sum()
    s = _sqrtm(np.dot(sigma1, sigma2))
    fid = float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))
    # The trace cancels terms of size tr(S1) + tr(S2). Full-rank covariances (d <= 256)
    # round to within 1e-11 of that scale; singular ones (2 to 10 vectors in 64 or 2048
    # dimensions) came out 3e-8 to 2e-6 of it below zero.
    scale = float(np.trace(sigma1) + np.trace(sigma2))
    if fid < -1e-8 * scale:
        warnings.warn(
            f"the Frechet distance came out negative ({fid:.6g}), which a distance cannot be: "
            f"the covariances are singular, as statistics from fewer than {sigma1.shape[0]} "
            "images are; the value is not meaningful (use 10k-50k images)",
            FIDSampleSizeWarning,
            stacklevel=2,
        )
    return fid


_REFERENCE_FORMAT = "an npz with arrays mu (D,) and sigma (D, D), as EDM's cifar10-32x32.npz"


def load_reference(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load (mu, sigma) from an npz in EDM's format (e.g. cifar10-32x32.npz).

    Returns:
        ``mu`` of shape ``(D,)`` and ``sigma`` of shape ``(D, D)``, float64.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is not such an npz (one line naming the file and what was
            expected).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID reference statistics not found: {path}. Get EDM's published FID "
            "reference statistics (cifar10-32x32.npz) and put the file there, or make "
            "one from a dataset with `bdia fid-ref`."
        )

    def refuse(problem: str) -> ValueError:
        return ValueError(
            f"{path}: not FID reference statistics ({problem}); expected {_REFERENCE_FORMAT}"
        )

    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        # numpy's reason (e.g. "contains pickled data" for a text file) would mislead.
        raise refuse("not an npz file") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise refuse("a single .npy array, not an npz")
    with data:
        for key in ("mu", "sigma"):
            if key not in data.files:
                raise refuse(f"no array '{key}'; found {data.files}")
        try:
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
        except (ValueError, TypeError, OSError, zipfile.BadZipFile) as err:
            raise refuse(f"unreadable arrays: {str(err).splitlines()[0]}") from None
    problem = _statistics_problem(mu, sigma)
    if problem is not None:
        raise refuse(problem)
    return mu, sigma


def save_reference(path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as float64 arrays to an npz in EDM's format, atomically.

    Raises:
        ValueError: before writing, for what ``load_reference`` would refuse: shapes other
            than ``(D,)`` and ``(D, D)``, or NaN or Inf.
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    problem = _statistics_problem(mu, sigma)
    if problem is not None:
        raise ValueError(
            f"cannot save FID reference statistics to {path}: {problem}; expected "
            f"{_REFERENCE_FORMAT}, finite"
        )

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
    try:
        with warnings.catch_warnings():
            # The detector EDM's FID is defined by is a TorchScript file; torch's deprecation
            # of TorchScript says nothing the user of that file can act on.
            warnings.filterwarnings("ignore", r".*torch\.jit\.load", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=map_location)
    except (RuntimeError, ValueError, OSError) as err:
        # torch's reason runs on with advice about corrupted checkpoints; keep its first
        # sentence, which says what failed.
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        raise ValueError(
            f"{path}: not a TorchScript module ({reason}); expected NVIDIA's TorchScript "
            f"{DETECTOR_FILENAME}, the Inception-v3 detector EDM's FID uses"
        ) from None
    net.eval()
    return net


class StandInDetector(torch.nn.Module):
    """A stand-in for NVIDIA's Inception detector, for tests and smoke runs; not a metric.

    It has the detector's call contract: ``detector(images, return_features=True)`` takes
    uint8 NCHW images with 3 channels and returns float32 features ``(N, features)``
    (without ``return_features``, the first 1008 columns, where the real detector gives
    logits). The features are the images average-pooled to 4x4 and multiplied by a fixed
    random matrix (seed 0), so the same input always gives the same features. It can be
    scripted and saved (``torch.jit.save(torch.jit.script(StandInDetector()), path)``) for
    ``load_detector``. FID values computed with it mean nothing.

    Args:
        features: feature dimension; 2048 as the real detector by default. Fewer keep the
            matrix square roots of the FID cheap where the dimension does not matter.
    """

    def __init__(self, features: int = 2048) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # The buffer's type, for type checkers. Declared here: TorchScript reads class
        # annotations, and cannot resolve this one.
        self.proj: torch.Tensor
        self.register_buffer("proj", torch.randn(3 * 4 * 4, features, generator=g))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 input")
        if x.shape[1] != 3:
            raise RuntimeError("expected 3 channels")
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32), (4, 4))
        feats = pooled.flatten(1) @ self.proj
        if return_features:
            return feats
        return feats[:, :1008]


@torch.no_grad()
def extract_features(detector: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features ``(N, D)`` in float64 (D = 2048 for NVIDIA's detector) of uint8 images
    ``(N, 3, H, W)`` or ``(N, 1, H, W)`` (the one channel is repeated to 3), on the
    detector's device, or on the host where that device has no float64 (MPS)."""
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
    # The detector's device: of its first parameter or, for one that holds only buffers (the
    # stand-in), of its first buffer. A module that exposes neither keeps the images' device.
    try:
        tensors = itertools.chain(detector.parameters(), detector.buffers())
        device = next(tensors).device
        images = images.to(device)
    except (StopIteration, AttributeError, RuntimeError):
        pass
    feats = detector(images, return_features=True)
    if not has_float64(feats.device):
        feats = feats.cpu()
    return feats.to(torch.float64)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(source: str | os.PathLike[str]) -> list[Path] | np.ndarray:
    """The images of ``source``: sorted image files of a folder (recursively), or the uint8
    array (N, H, W, C) of an npz (its first array, as EDM's ``samples.npz`` files hold).

    Hidden files and everything under a hidden folder (a name starting with ``.``, as
    ``.ipynb_checkpoints`` or ``.git``) are skipped, below ``source`` only: a hidden
    ``source`` itself (``~/.cache/imgs``) is read.

    Raises:
        FileNotFoundError: nothing exists at ``source``.
        ValueError: the folder holds no images, ``source`` is a file other than an npz (one
            image, say), or the npz holds no uint8 images.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p
            for p in source.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        if not files:
            raise ValueError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source} "
                "(hidden files and folders, named .*, are skipped)"
            )
        return files
    if source.suffix.lower() == ".npz" and source.is_file():
        return _npz_images(source)
    if source.exists():
        raise ValueError(
            f"{source} is a file, not a folder of images or an .npz of them; give the folder "
            "that holds the images"
        )
    raise FileNotFoundError(f"no image folder or .npz at {source}")


# What numpy raises for a file that is no npz, or whose member is damaged.
_NPZ_ERRORS = (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _npz_images(source: Path) -> np.ndarray:
    """The first array of npz ``source``, checked to hold uint8 images (N >= 1, H, W, 1|3)."""

    def refuse(problem: str) -> ValueError:
        return ValueError(
            f"{source}: {problem}; expected an npz whose first array holds uint8 images "
            "(N, H, W, 1 or 3), as EDM's samples.npz"
        )

    try:
        data = np.load(source, allow_pickle=False)
    except _NPZ_ERRORS:
        # numpy's reason (e.g. "contains pickled data" for a text file) would mislead.
        raise refuse("not an npz file") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise refuse("a single .npy array, not an npz")
    with data:
        if not data.files:
            raise refuse("it holds no arrays")
        try:
            array = data[data.files[0]]
        except _NPZ_ERRORS as err:
            raise refuse(f"its array {data.files[0]!r} is unreadable ({err})") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise refuse(f"its first array is {array.dtype} of shape {array.shape}")
    if len(array) == 0:
        raise refuse(f"its first array holds no images (shape {array.shape})")
    return array


# What PIL raises for a file it cannot identify or decode (UnidentifiedImageError is an
# OSError; a broken PNG chunk is a SyntaxError; truncated headers give struct.error).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_IMAGE_MODES = {"L": 1, "RGB": 3}


# A file's (mode, (width, height)), or the message that says why it is not a readable image.
_Header = tuple[str, tuple[int, int]] | str


def _header(p: Path) -> _Header:
    """A file's (mode, size) from its header, or why it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(p) as im:
            mode, size = im.mode, im.size
            im.verify()
    except _IMAGE_ERRORS as err:
        return f"{p}: not a readable image ({err})"
    return mode, size


def _headers(files: list[Path]) -> list[_Header]:
    return [_header(p) for p in files]


# Files per task when several processes read headers: enough that a task costs far more than
# handing it over (a header takes about 0.06 ms), few enough that the pool stays balanced.
_HEADER_CHUNK = 512


def check_images(files: list[Path], workers: int = 0) -> None:
    """Check that every file is an 8-bit grayscale or RGB image of one size, before any
    feature is computed. ``Image.verify`` reads each file without decoding its pixels.

    With ``workers > 0``, that many processes read the headers, in chunks of files; the
    files are still judged in order, so the error names the same file as with 0 (this
    process alone, stopping at the first bad file).

    Raises:
        ValueError: naming the first file that is unreadable, of another mode or size.
    """
    if workers > 0 and len(files) > _HEADER_CHUNK:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [files[i : i + _HEADER_CHUNK] for i in range(0, len(files), _HEADER_CHUNK)]
        with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
            try:
                _judge(files, (h for chunk in pool.map(_headers, chunks) for h in chunk))
            except ValueError:
                pool.shutdown(cancel_futures=True)
                raise
    else:
        _judge(files, map(_header, files))


def _judge(files: list[Path], headers: Iterable[_Header]) -> None:
    """Raise for the first file, in order, whose header is not an image or does not match."""
    first: tuple[Path, tuple[int, int]] | None = None
    for p, header in zip(files, headers):
        if isinstance(header, str):
            raise ValueError(header)
        mode, size = header
        if mode not in _IMAGE_MODES:
            raise ValueError(
                f"{p}: image mode {mode!r}; expected 8-bit grayscale ('L') or RGB images"
            )
        if first is None:
            first = (p, size)
        elif size != first[1]:
            raise ValueError(
                f"{p}: size {size[0]}x{size[1]} differs from {first[0]}'s "
                f"{first[1][0]}x{first[1][1]}; all images must have one size"
            )


def _read_image(p: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(p) as im:
            return np.asarray(im)
    except _IMAGE_ERRORS as err:
        raise ValueError(f"{p}: not a readable image ({err})") from None


def _load_batch(items: list[Path] | np.ndarray) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` from image files or an ``(N, H, W, C)`` array."""
    if isinstance(items, np.ndarray):
        array = items
    else:
        arrays = [_read_image(p) for p in items]
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"images of different sizes in one folder: {sorted(sizes)}")
        if any(a.ndim == 3 for a in arrays):
            # A folder may mix grayscale and RGB files (check_images accepts both). The
            # detector sees a grayscale image as its channel repeated three times, so
            # repeating it here gives it the same features whichever batch it falls in.
            arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
        array = np.stack(arrays)
        if array.ndim == 3:
            array = array[..., None]
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {array.shape[1:]}")
    # Contiguous NCHW, the layout the detector is traced for: a permuted view would carry
    # channels-last strides through the copy to the device and into its convolutions.
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def default_workers(device: torch.device | str) -> int:
    """The number of DataLoader worker processes ``image_statistics`` decodes images with
    when it is not told: 0 (decoding in the main process) on the CPU, where the detector
    itself keeps the cores busy and costs far more per image than decoding a PNG; on a GPU
    ``min(4, cores per process - 1)``, the cores this process may run on shared among
    torchrun's ``LOCAL_WORLD_SIZE`` processes, less one for the process feeding the GPU.
    One core decoded a 32x32 PNG of noise in 0.2 ms and a 256x256 one in 3 ms (a busy 2-core
    machine): larger images on a fast GPU want more."""
    if torch.device(device).type == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(min(4, cores // local - 1), 0)


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` of ``items`` (image files or an (N, H, W, C) uint8 array) as ``_load_batch``
    gives it: uint8 ``(N, C, H, W)``. Whole batches, so that a worker process hands over one
    tensor per detector call, batched exactly as the main process would."""

    def __init__(self, items: list[Path] | np.ndarray, batch: int) -> None:
        self.items, self.batch = items, batch

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            return _load_batch(self.items[i * self.batch : (i + 1) * self.batch])
        except ValueError as err:
            # The DataLoader re-raises a worker's exception under a multi-line message of its
            # own; returning the one-line message lets the main process raise it as it is.
            return str(err)


def _one_thread(worker_id: int) -> None:
    # Decoding needs no intra-op threads; several workers with a thread per core each would
    # crowd out the process that runs the detector.
    torch.set_num_threads(1)


def image_statistics(
    detector: torch.nn.Module,
    source: str | os.PathLike[str],
    *,
    batch: int = 64,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> FeatureStatistics:
    """Accumulate detector features of this rank's share (``[rank::world_size]``) of ``source``.

    Every image file of a folder is checked first (``check_images``, its headers read by
    ``workers`` processes), on every rank, so that an unreadable file stops all ranks alike
    before the detector runs. Then ``workers`` DataLoader processes
    (``default_workers(device)`` when None; 0 decodes in this process) read and decode
    batches of ``batch`` images while the detector runs, into pinned memory when ``device`` is
    a GPU. An .npz is already decoded and is sliced in this process.
    Batches reach the detector in order, so the statistics do not depend on ``workers``.
    ``on_batch`` (a progress bar's ``update``, say) is called with the number of images
    after each batch.

    Returns:
        The statistics, float64, with ``seconds`` the wall-clock time of reading, decoding
        and the detector (not of the upfront check): ``images_per_second`` is the rate.

    Raises:
        ValueError: naming an unreadable image, or one of another mode or size; or for a
            negative ``workers``, a ``batch`` below 1 or a ``rank`` outside
            ``0..world_size - 1``.
    """
    if workers is None:
        workers = default_workers(device)
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    check_share(batch, rank, world_size)
    items = list_images(source)
    if isinstance(items, np.ndarray):
        workers = 0
    else:
        check_images(items, workers)
    mine = items[rank::world_size]
    pin = torch.device(device).type == "cuda"
    loader = torch.utils.data.DataLoader(
        _Batches(mine, batch),
        batch_size=None,  # the dataset's items are whole batches already
        num_workers=workers,
        pin_memory=pin,
        worker_init_fn=_one_thread if workers else None,
    )
    stats = FeatureStatistics()
    start = time.perf_counter()
    for images in loader:
        if isinstance(images, str):
            raise ValueError(images)
        images = images.to(device, non_blocking=pin)
        stats.add(extract_features(detector, images))
        if on_batch is not None:
            on_batch(images.shape[0])
    # The sums stay on the detector's device while it runs; bringing them to the host
    # also waits for its last batch, so the clock stops when the work is done.
    stats._flush()
    stats.seconds = time.perf_counter() - start
    return stats
