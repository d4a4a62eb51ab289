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
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bdia.models import digits
from bdia.models.checkpoints import save_network, shipped_network_path

COMMAND = " ".join(["python", "benchmarks/train_digits.py", *map(shlex.quote, sys.argv[1:])])


def held_out_loss(net: torch.nn.Module, split: digits.DigitsSplit, repeats: int = 8) -> float:
    """EDM loss of ``net`` on the held-out digits, with fixed noise (seed 1234)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        values = [
            digits.edm_loss(net, split.held_out_images, split.held_out_labels, gen).mean()
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
        default=shipped_network_path("digits").parent,
        help="folder for digits.safetensors and digits_classifier.safetensors",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="20 iterations and 2 classifier epochs"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.iterations, args.classifier_epochs = 20, 2
    torch.set_num_threads(args.threads)
    split = digits.load_digits_split()
    print(
        f"digits: {len(split.train_labels)} training, {len(split.held_out_labels)} held out "
        f"(split seed {digits.SPLIT_SEED})"
    )

    start = time.perf_counter()
    classifier = digits.train_classifier(args.classifier_epochs, seed=args.seed, split=split)
    predicted = digits.predict(classifier, split.held_out_images)
    accuracy = float((predicted == split.held_out_labels).double().mean())
    print(f"classifier: held-out accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)")

    net = digits.build_denoiser(args.seed)
    print(f"denoiser: {sum(p.numel() for p in net.parameters()):,} parameters")
    print(f"held-out EDM loss before training: {held_out_loss(net, split):.4f}")
    start = time.perf_counter()

    def log(step: int, loss: float) -> None:
        print(
            f"  step {step:6d}  loss {loss:.4f}  {time.perf_counter() - start:6.0f} s", flush=True
        )

    ema, _ = digits.train_denoiser(
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
