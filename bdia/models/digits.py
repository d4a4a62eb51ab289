"""A real, learned diffusion model that runs anywhere: scikit-learn's 8x8 handwritten digits.

The data are the 1797 digits that scikit-learn bundles (values 0..16, ten classes), scaled to
[-1, 1] by ``x / 8 - 1`` and split once, stratified by class, into 80% training and 20%
held-out images (``SPLIT_SEED``); training never sees the held-out part. Two networks are
shipped with the package and load offline:

- ``load_network("digits")``: a class-conditional ``EDMPrecond(SongUNet)`` trained with EDM's
  loss (sigma_data 0.5, ln sigma ~ N(P_MEAN, P_STD^2)), images of shape ``(batch, 1, 8, 8)``.
- ``load_network("digits-classifier")``: a small convolutional ``DigitClassifier`` whose
  penultimate activations are the features of the Frechet digit distance (FDD, the FID
  analogue on this data) and whose logits score the class accuracy of conditional samples.

``benchmarks/train_digits.py`` makes both files; the training loops live there, outside the
installed package, as in EDM (training apart from the networks). ``P_MEAN``, ``P_STD`` and
``DENOISER_KWARGS`` record how the shipped denoiser was made.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .registry import register_network

__all__ = [
    "SPLIT_SEED",
    "HELD_OUT_FRACTION",
    "SIGMA_DATA",
    "P_MEAN",
    "P_STD",
    "DENOISER_KWARGS",
    "DigitsSplit",
    "load_digits_split",
    "to_pixels",
    "DigitClassifier",
    "classifier_features",
    "predict",
    "frechet_digit_distance",
    "probe_inputs",
]

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2

#: The shipped denoiser: EDMPrecond(SongUNet) at 8x8, one channel, ten classes.
DENOISER_KWARGS: dict[str, Any] = dict(
    img_resolution=8,
    img_channels=1,
    label_dim=10,
    sigma_data=SIGMA_DATA,
    model_channels=16,
    channel_mult=[1, 2, 2],
    num_blocks=2,
    attn_resolutions=[4],
    dropout=0.1,
    augment_dim=0,
)


class DigitsSplit(NamedTuple):
    """Digits as float32 images of shape ``(n, 1, 8, 8)`` in [-1, 1] and int64 labels ``(n,)``."""

    train_images: Tensor
    train_labels: Tensor
    held_out_images: Tensor
    held_out_labels: Tensor


def load_digits_split() -> DigitsSplit:
    """The fixed 80/20 split of scikit-learn's digits (stratified, ``SPLIT_SEED``).

    Always the same 1437 training and 360 held-out images, in the same order.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32) / 8.0 - 1.0
    labels = data.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=HELD_OUT_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels,
    )

    def as_images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)

    return DigitsSplit(
        as_images(train_x),
        torch.from_numpy(train_y),
        as_images(test_x),
        torch.from_numpy(test_y),
    )


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images must have shape (n, 1, 8, 8), got {tuple(images.shape)}")


def to_pixels(images: Tensor) -> np.ndarray:
    """Images in [-1, 1] of shape ``(n, 1, 8, 8)`` as uint8 grey levels ``(n, 8, 8)``.

    Raises:
        ValueError: ``images`` is not of shape ``(n, 1, 8, 8)``.
    """
    _check_images(images)
    grey = ((images.detach().double().cpu()[:, 0] + 1.0) * 127.5).round().clamp(0, 255)
    return grey.to(torch.uint8).numpy()


# --------------------------------------------------------------------------------- classifier


@register_network
class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits: ``forward(x) -> logits (n, 10)``, ``features(x) -> (n, 64)``.

    Input: float images ``(n, 1, 8, 8)`` in [-1, 1] (any float dtype; computed in float32).
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(8 * width, feature_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, float32 ``(n, feature_dim)``."""
        return self.body(x.to(torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def probe_inputs() -> tuple[Tensor, Tensor, Tensor]:
    """A fixed input for checking a network file: ``(x (4, 1, 8, 8), sigma (4,), labels (4,))``.

    The shipped files record the outputs on it in their metadata (key ``"probe"``), so a
    loaded network can be compared with the one that was written.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0])
    return sigma.view(-1, 1, 1, 1) * x, sigma, torch.tensor([0, 3, 7, 9])


# ----------------------------------------------------------------------------------- metrics


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """FDD features of ``images`` ``(n, 1, 8, 8)`` in [-1, 1]: float64 ``(n, feature_dim)``.

    Images are clipped to [-1, 1] first, as they would be when saved as pixels. An empty set
    (n = 0) gives ``(0, feature_dim)``.

    Raises:
        ValueError: ``images`` is not of shape ``(n, 1, 8, 8)``.
    """
    _check_images(images)
    images = images.clamp(-1.0, 1.0)
    # range(0, 0, batch) is empty, and torch.cat needs one piece: an empty set runs as one.
    starts = range(0, max(images.shape[0], 1), batch)
    # nn.Module types an attribute it does not declare as Tensor | Module; features is the
    # classifier's method (DigitClassifier.features).
    out = [classifier.features(images[i : i + batch]) for i in starts]  # type: ignore[operator]
    return torch.cat(out).double()


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """Predicted classes (int64 ``(n,)``) of images ``(n, 1, 8, 8)`` in [-1, 1] (clipped to it
    first); ``(0,)`` for an empty set.

    Raises:
        ValueError: ``images`` is not of shape ``(n, 1, 8, 8)``.
    """
    _check_images(images)
    images = images.clamp(-1.0, 1.0)
    starts = range(0, max(images.shape[0], 1), batch)  # an empty set runs as one (see above)
    out = [classifier(images[i : i + batch]).argmax(1) for i in starts]
    return torch.cat(out)


def frechet_digit_distance(classifier: nn.Module, images_a: Tensor, images_b: Tensor) -> float:
    """FDD: the Frechet distance between classifier-feature Gaussians of two image sets.

    Each set is ``(n, 1, 8, 8)`` with n >= 2, clipped to [-1, 1] (see ``classifier_features``).

    Raises:
        ValueError: a set has fewer than 2 images, another shape, or NaN values (which the
            clipping keeps, and which no covariance survives).
    """
    from ..metrics.fid import frechet_distance

    stats = []
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        nan = int(torch.isnan(images).sum())
        if nan:
            raise ValueError(f"{name} holds {nan} NaN values; the Frechet distance needs numbers")
        feats = classifier_features(classifier, images).numpy()
        if feats.shape[0] < 2:
            raise ValueError("the Frechet distance needs at least 2 images in each set")
        stats.append((feats.mean(0), np.cov(feats, rowvar=False)))
    return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
