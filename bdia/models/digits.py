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

``benchmarks/train_digits.py`` makes both files with the training loops below.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    "build_denoiser",
    "edm_loss",
    "train_denoiser",
    "train_classifier",
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


def to_pixels(images: Tensor) -> np.ndarray:
    """Images in [-1, 1] of shape ``(n, 1, 8, 8)`` as uint8 grey levels ``(n, 8, 8)``."""
    grey = ((images.detach().double().cpu()[:, 0] + 1.0) * 127.5).round().clamp(0, 255)
    return grey.to(torch.uint8).numpy()


# --------------------------------------------------------------------------------- classifier


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


# ---------------------------------------------------------------------------------- training


def build_denoiser(seed: int = 0) -> nn.Module:
    """A freshly initialised digits denoiser (``DENOISER_KWARGS``), the same for the same seed."""
    from .checkpoints import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network("EDMPrecond", copy.deepcopy(DENOISER_KWARGS))


def edm_loss(net: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """EDM's training loss, one value per image (float32 ``(n,)``).

    ``sigma = exp(P_MEAN + P_STD z)``, ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` and
    the loss is ``lambda(sigma) * mean((D(y + sigma n; sigma) - y)^2)`` over the pixels.
    """
    n = images.shape[0]
    z = torch.randn(n, generator=generator)
    sigma = (P_MEAN + P_STD * z).exp()
    noise = torch.randn(images.shape, generator=generator)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    one_hot = F.one_hot(labels, 10).to(torch.float32)
    denoised = net(images + sigma.view(-1, 1, 1, 1) * noise, sigma, one_hot)
    return weight * (denoised - images).square().mean(dim=(1, 2, 3))


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_denoiser(
    iterations: int,
    *,
    batch: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    split: DigitsSplit | None = None,
    net: nn.Module | None = None,
    log: Callable[[int, float], None] | None = None,
    log_every: int = 100,
) -> tuple[nn.Module, list[float]]:
    """Train a digits denoiser with EDM's loss on the training split; deterministic per seed.

    Args:
        iterations: optimiser steps (Adam, linear warm-up then cosine decay to lr/10).
        batch: images per step, drawn with replacement.
        ema_decay: decay of the exponential moving average of the weights that is returned.
        net: a network to continue training (default: ``build_denoiser(seed)``).
        log: called as ``log(step, mean loss over the last log_every steps)``.

    Returns:
        (EMA network in eval mode, the loss of every step).
    """
    split = split or load_digits_split()
    images, labels = split.train_images, split.train_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = net if net is not None else build_denoiser(seed)
        net.train().requires_grad_(True)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        warmup = min(200, max(iterations // 10, 1))
        for step in range(iterations):
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, iterations, lr, warmup)
            idx = torch.randint(images.shape[0], (batch,), generator=gen)
            loss = edm_loss(net, images[idx], labels[idx], gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # A short average early on, so that a short run still returns trained weights.
            decay = min(ema_decay, (step + 1) / (step + 10))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
            losses.append(float(loss.detach()))
            if log is not None and (step + 1) % log_every == 0:
                log(step + 1, float(np.mean(losses[-log_every:])))
    net.eval().requires_grad_(False)
    return ema, losses


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by -1, 0 or +1 pixel in each direction (background fills in)."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(3, (n,), generator=generator)
    dx = torch.randint(3, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(8)).view(n, 1, 8, 1).expand(n, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(8)).view(n, 1, 1, 8).expand(n, 1, 8, 8)
    return out.gather(3, cols)


def train_classifier(
    epochs: int = 60,
    *,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    split: DigitsSplit | None = None,
    log: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train a ``DigitClassifier`` on the training split with one-pixel shift augmentation.

    Deterministic per seed. Returns the network in eval mode with ``.config`` set.
    """
    split = split or load_digits_split()
    images, labels = split.train_images, split.train_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitClassifier()
        net.config = {"class_name": "DigitClassifier", "init_kwargs": {}}
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * math.ceil(images.shape[0] / batch)
        )
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen)
            total = 0.0
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                x = _shift(images[idx], gen)
                loss = F.cross_entropy(net(x), labels[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if log is not None:
                log(epoch + 1, total / images.shape[0])
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------- metrics


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """FDD features of ``images`` ``(n, 1, 8, 8)`` in [-1, 1]: float64 ``(n, feature_dim)``.

    Images are clipped to [-1, 1] first, as they would be when saved as pixels.
    """
    images = images.clamp(-1.0, 1.0)
    out = [classifier.features(images[i : i + batch]) for i in range(0, images.shape[0], batch)]
    return torch.cat(out).double()


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    """Predicted classes (int64 ``(n,)``) of images in [-1, 1] (clipped to it first)."""
    images = images.clamp(-1.0, 1.0)
    out = [classifier(images[i : i + batch]).argmax(1) for i in range(0, images.shape[0], batch)]
    return torch.cat(out)


def frechet_digit_distance(classifier: nn.Module, images_a: Tensor, images_b: Tensor) -> float:
    """FDD: the Frechet distance between classifier-feature Gaussians of two image sets."""
    from ..metrics.fid import frechet_distance

    stats = []
    for images in (images_a, images_b):
        feats = classifier_features(classifier, images).numpy()
        if feats.shape[0] < 2:
            raise ValueError("the Frechet distance needs at least 2 images in each set")
        stats.append((feats.mean(0), np.cov(feats, rowvar=False)))
    return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
