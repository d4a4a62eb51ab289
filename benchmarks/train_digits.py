"""Train the two networks shipped for the 8x8 digits and write them into the package.

1. ``DigitClassifier`` on the training split (shift augmentation), the feature extractor of the
   Frechet digit distance and the judge of conditional samples; its held-out accuracy is
   printed (target >= 98%).
2. The class-conditional ``EDMPrecond(SongUNet)`` of ``bdia.models.digits.DENOISER_KWARGS``,
   trained with EDM's loss; the loss curve is printed as it goes, and the EMA weights are
   written.

Everything is seeded: the same command gives the same weights on the same machine and torch
build. The default run takes about ten minutes on two CPU cores. Run from the repository root::

    python benchmarks/train_digits.py                 # writes bdia/models/weights/*.safetensors
    python benchmarks/train_digits.py --smoke --out /tmp/digits   # 20 iterations, a check

The training loops are here, not in the installed package: only this script trains, and the
package keeps what inference needs (``bdia.models.digits``). Tests import them from this file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _args import out_or_default  # the benchmarks folder is the script's path
from torch import Tensor, nn

from bdia.models import digits
from bdia.models.checkpoints import build_network, save_network, shipped_network_path
from bdia.models.digits import (
    DENOISER_KWARGS,
    P_MEAN,
    P_STD,
    SIGMA_DATA,
    DigitClassifier,
    DigitsSplit,
    load_digits_split,
)

COMMAND = " ".join(["python", "benchmarks/train_digits.py", *map(shlex.quote, sys.argv[1:])])

# ------------------------------------------------------------------------------------ training


def build_denoiser(seed: int = 0) -> nn.Module:
    """A freshly initialised digits denoiser (``DENOISER_KWARGS``), the same for the same seed."""
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

    Deterministic per seed. Returns the network in eval mode (its class records ``.config``).
    """
    split = split or load_digits_split()
    images, labels = split.train_images, split.train_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitClassifier()
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


# -------------------------------------------------------------------------------------- script


def held_out_loss(net: torch.nn.Module, split: digits.DigitsSplit, repeats: int = 8) -> float:
    """EDM loss of ``net`` on the held-out digits, with fixed noise (seed 1234)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        values = [
            edm_loss(net, split.held_out_images, split.held_out_labels, gen).mean()
            for _ in range(repeats)
        ]
    return float(torch.stack(values).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=9000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--classifier-epochs", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for digits.safetensors and digits_classifier.safetensors (default: the "
        "package's, bdia/models/weights; needed with --smoke)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="20 iterations and 2 classifier epochs"
    )
    args = parser.parse_args(argv)
    args.out = out_or_default(
        parser, args, shipped_network_path("digits").parent, "the package's bdia/models/weights"
    )
    if args.smoke:
        args.iterations, args.classifier_epochs = 20, 2
    torch.set_num_threads(args.threads)
    split = digits.load_digits_split()
    print(
        f"digits: {len(split.train_labels)} training, {len(split.held_out_labels)} held out "
        f"(split seed {digits.SPLIT_SEED})"
    )

    start = time.perf_counter()
    classifier = train_classifier(args.classifier_epochs, seed=args.seed, split=split)
    predicted = digits.predict(classifier, split.held_out_images)
    accuracy = float((predicted == split.held_out_labels).double().mean())
    print(f"classifier: held-out accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)")

    net = build_denoiser(args.seed)
    print(f"denoiser: {sum(p.numel() for p in net.parameters()):,} parameters")
    print(f"held-out EDM loss before training: {held_out_loss(net, split):.4f}")
    start = time.perf_counter()

    def log(step: int, loss: float) -> None:
        print(
            f"  step {step:6d}  loss {loss:.4f}  {time.perf_counter() - start:6.0f} s", flush=True
        )

    ema, _ = train_denoiser(
        args.iterations,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        split=split,
        net=net,
        log=log,
        log_every=max(1, min(250, args.iterations // 4)),
    )
    print(f"held-out EDM loss after training (EMA): {held_out_loss(ema, split):.4f}")
    print(f"training took {time.perf_counter() - start:.0f} s")

    x, sigma, labels = digits.probe_inputs()
    with torch.no_grad():
        probes = {
            "digits": ema(x, sigma, labels),
            "digits-classifier": classifier(x.clamp(-1, 1)),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, network in (("digits", ema), ("digits-classifier", classifier)):
        path = args.out / shipped_network_path(name).name
        probe = json.dumps(probes[name].flatten().tolist())
        save_network(network, path, metadata={"probe": probe, "trained_by": COMMAND})
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
