"""How far the EDM networks' half-precision U-Net lands from float32.

For a random-weight network (default: EDM's CIFAR-10 DDPM++, `random:ddpmpp-cond`) and noise
levels from 0.02 to 80, prints the relative error ``|D_half - D_32| / |c_out F_32|`` of the
network's own part of the denoiser when ``net.compute_dtype`` is bfloat16 or float16 (the
skip part ``c_skip x`` is float32 in both and cancels).

    python benchmarks/half_precision.py                         # CPU, DDPM++, batch 4
    python benchmarks/half_precision.py --network tiny-cond --seeds 0-5
"""

from __future__ import annotations

import argparse
import sys

import torch

from bdia import generate

SIGMAS = (0.02, 0.5, 5.0, 80.0)


def relative_error(net: torch.nn.Module, dtype: torch.dtype, seed: int, batch: int) -> float:
    """The error over ``batch`` noisy inputs at every sigma of SIGMAS (one norm over all)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch * len(SIGMAS), net.img_channels, net.img_resolution, net.img_resolution)
    sigma = torch.tensor(SIGMAS, dtype=torch.float32).repeat_interleave(batch)
    x = sigma.view(-1, 1, 1, 1) * torch.randn(shape, generator=g)
    labels = torch.randint(net.label_dim or 1, (shape[0],), generator=g)
    skip = net.coefficients(sigma.view(-1, 1, 1, 1))[0] * x
    with torch.no_grad():
        net.compute_dtype = None
        full = net(x, sigma, class_labels=labels)
        net.compute_dtype = dtype
        half = net(x, sigma, class_labels=labels)
        net.compute_dtype = None
    return float((half - full).norm() / (full - skip).norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="ddpmpp-cond", choices=sorted(generate.RANDOM_NETWORKS))
    p.add_argument("--seeds", default="0", help="weight seeds, e.g. 0-5")
    p.add_argument("--batch", type=int, default=4, help="inputs per noise level")
    args = p.parse_args(argv)
    print(f"random:{args.network}, sigma {', '.join(map(str, SIGMAS))}, batch {args.batch}")
    print("| weights seed | bfloat16 | float16 |")
    print("|---:|---:|---:|")
    for seed in generate.parse_seeds(args.seeds):
        net = generate.random_network(args.network, seed=seed)
        errors = [relative_error(net, d, seed, args.batch) for d in (torch.bfloat16, torch.float16)]
        print(f"| {seed} | {errors[0]:.1e} | {errors[1]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
