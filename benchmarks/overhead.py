"""Wall-time overhead of BDIA over its base solver on a convolutional denoiser.

BDIA reuses the one model evaluation of each step for both the forward and the backward
integration, so wrapping a one-stage solver should cost no extra network calls and only a few
element-wise tensor operations per step. This script checks that on a small, randomly
initialised U-Net-like denoiser (EDM preconditioning, float32, CPU): for each one-stage base
solver it times ``bdia.sample`` with the base solver and with ``bdia.bdia(base, gamma=0.96)``
on the same noise and the same 50-step Karras grid, interleaving the two after one warm-up
each, and reports the median wall times, their ratio and the NFE each run used (target:
ratio <= 1.03 at identical NFE).

Run from the repository root::

    python benchmarks/overhead.py               # writes docs/benchmarks/overhead.md
    python benchmarks/overhead.py --repeats 9   # more repeats on a noisy machine

The markdown table is printed to stdout and written atomically to ``--out``. The run takes a
few minutes on two CPU cores; other processes on the machine inflate the timings of both arms
and can push a ratio over the target, so rerun before reading much into a FAIL.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bdia
from bdia._files import write_atomic

BASE_SOLVERS = ("euler", "ddim", "dpm_solver_1", "dpm_solver_pp_1")
GAMMA = 0.96
TARGET_RATIO = 1.03
SLOW_EVALUATION_S = 0.3
DEFAULT_SIZE = 32
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "overhead.md"


# ----------------------------------------------------------------------------- the network


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, modulated by the noise embedding."""

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(8, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return x + self.conv2(h)


class SmallUNet(nn.Module):
    """A three-level convolutional network ``F(x, c_noise)`` with additive skip connections.

    Resolutions ``size``, ``size / 2`` and ``size / 4`` with ``channels`` feature maps; the
    noise level enters through Fourier features and an MLP that scales and shifts every block.
    """

    def __init__(
        self, in_channels: int = 3, channels: Sequence[int] = (64, 128, 256), emb_dim: int = 256
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), 32)))
        self.embed = nn.Sequential(
            nn.Linear(64, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU()
        )
        self.stem = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.enc1 = ResBlock(c1, emb_dim)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.enc2 = ResBlock(c2, emb_dim)
        self.down2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid = ResBlock(c3, emb_dim)
        self.up2 = nn.Conv2d(c3, c2, 3, padding=1)
        self.dec2 = ResBlock(c2, emb_dim)
        self.up1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.dec1 = ResBlock(c1, emb_dim)
        self.head = nn.Sequential(
            nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, in_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.freqs
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h1 = self.enc1(self.stem(x), emb)
        h2 = self.enc2(self.down1(h1), emb)
        h = self.mid(self.down2(h2), emb)
        h = self.dec2(self.up2(F.interpolate(h, scale_factor=2.0)) + h2, emb)
        h = self.dec1(self.up1(F.interpolate(h, scale_factor=2.0)) + h1, emb)
        return self.head(h)


class EDMDenoiser(nn.Module):
    """EDM preconditioning (Karras et al. 2022) around a network ``F(x, c_noise)``.

    ``D(x_bar; sigma_bar) = c_skip x_bar + c_out F(c_in x_bar, log(sigma_bar) / 4)``, the form
    ``bdia.DiffusionODE`` expects: ``sigma_bar`` has shape ``(batch,)``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x_bar: Tensor, sigma_bar: Tensor) -> Tensor:
        sigma = sigma_bar.to(x_bar.dtype)[:, None, None, None]
        var = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / var
        c_out = sigma * self.sigma_data / var.sqrt()
        c_in = var.rsqrt()
        c_noise = sigma_bar.log().to(x_bar.dtype) / 4
        return c_skip * x_bar + c_out * self.net(c_in * x_bar, c_noise)


# ------------------------------------------------------------------------------ timing


@dataclass
class Row:
    solver: str
    base_times: list[float]
    bdia_times: list[float]
    base_nfe: set[int]
    bdia_nfe: set[int]

    @property
    def ratio(self) -> float:
        return statistics.median(self.bdia_times) / statistics.median(self.base_times)

    @property
    def passed(self) -> bool:
        same_nfe = len(self.base_nfe) == 1 and self.base_nfe == self.bdia_nfe
        return same_nfe and self.ratio <= TARGET_RATIO


def timed_sample(ode: bdia.DiffusionODE, solver, x: Tensor, ts: Tensor) -> tuple[float, int]:
    """Wall time of one ``bdia.sample`` run and the model evaluations it made."""
    ode.reset_nfe()
    start = time.perf_counter()
    bdia.sample(ode, solver, x, ts, progress=False)
    return time.perf_counter() - start, ode.nfe


def compare(ode: bdia.DiffusionODE, name: str, x: Tensor, ts: Tensor, repeats: int) -> Row:
    """Time the base solver and its BDIA form, interleaved, after one warm-up each."""
    base = bdia.get_solver(name)
    wrapped = bdia.bdia(base, gamma=GAMMA)
    timed_sample(ode, base, x, ts)
    timed_sample(ode, wrapped, x, ts)
    row = Row(name, [], [], set(), set())
    for _ in range(repeats):
        elapsed, nfe = timed_sample(ode, base, x, ts)
        row.base_times.append(elapsed)
        row.base_nfe.add(nfe)
        elapsed, nfe = timed_sample(ode, wrapped, x, ts)
        row.bdia_times.append(elapsed)
        row.bdia_nfe.add(nfe)
    return row


def evaluation_time(ode: bdia.DiffusionODE, x: Tensor, t: float, repeats: int = 3) -> float:
    """Median wall time of one model evaluation, after a warm-up."""
    ode.evaluate(t, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ode.evaluate(t, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------ report


def cpu_name() -> str:
    """``platform.processor()``, or the model name Linux reports when that is empty."""
    name = platform.processor()
    if not name:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next(
                    (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    "",
                )
        except OSError:
            pass
    return name or platform.machine() or "unknown CPU"


def fmt_nfe(values: set[int]) -> str:
    return "/".join(str(v) for v in sorted(values))


def render(rows: list[Row], facts: dict[str, str], command: str) -> str:
    lines = [
        "# BDIA overhead on a convolutional denoiser",
        "",
        "Median wall time of `bdia.sample` with each one-stage base solver and with "
        f"`bdia.bdia(base, gamma={GAMMA})` on the same network, noise and grid, and the NFE "
        f"each run counted; the target is median(bdia) / median(base) <= {TARGET_RATIO} at "
        "identical NFE.",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += [
        "",
        "| solver | NFE base | NFE bdia | median base (s) | median bdia (s) | ratio "
        f"| <= {TARGET_RATIO} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.solver} | {fmt_nfe(row.base_nfe)} | {fmt_nfe(row.bdia_nfe)} "
            f"| {statistics.median(row.base_times):.3f} "
            f"| {statistics.median(row.bdia_times):.3f} "
            f"| {row.ratio:.4f} | {'PASS' if row.passed else 'FAIL'} |"
        )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"Written by `{command}` on {date}.", ""]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed runs per arm (default 5)"
    )
    parser.add_argument("--batch", type=positive_int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--steps", type=positive_int, default=50, help="steps of the Karras grid (default 50)"
    )
    parser.add_argument(
        "--size",
        type=positive_int,
        default=DEFAULT_SIZE,
        help=f"image side, a multiple of 4 (default {DEFAULT_SIZE}; lower it only if one "
        f"evaluation takes more than {SLOW_EVALUATION_S} s)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="markdown file to write (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.size % 4:
        parser.error(f"--size must be a multiple of 4, got {args.size}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (BDIA's first step is a plain base step)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    denoiser = EDMDenoiser(SmallUNet()).eval()
    n_params = sum(p.numel() for p in denoiser.parameters())
    ode = bdia.DiffusionODE(denoiser, bdia.EDM())
    ts = bdia.karras_grid(args.steps, final_zero=False)
    noise = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    load = os.getloadavg()[0]

    with torch.inference_mode():
        x = float(ts[0]) * torch.randn(shape, generator=noise, dtype=torch.float32)
        per_eval = evaluation_time(ode, x, float(ts[0]))
        print(
            f"{n_params:,} parameters, {torch.get_num_threads()} threads, "
            f"one evaluation {per_eval:.3f} s",
            file=sys.stderr,
        )
        if per_eval > SLOW_EVALUATION_S and args.size == DEFAULT_SIZE:
            print(
                f"one evaluation takes more than {SLOW_EVALUATION_S} s; "
                f"consider --size {DEFAULT_SIZE // 2}",
                file=sys.stderr,
            )
        rows = []
        for name in BASE_SOLVERS:
            row = compare(ode, name, x, ts, args.repeats)
            print(f"{name}: ratio {row.ratio:.4f}", file=sys.stderr, flush=True)
            rows.append(row)

    size = f"3x{args.size}x{args.size}"
    if args.size != DEFAULT_SIZE:
        size += f" (reduced from 3x{DEFAULT_SIZE}x{DEFAULT_SIZE} to keep the run short)"
    facts = {
        "Machine": f"{cpu_name()}, {os.cpu_count()} CPUs, "
        f"1-minute load average {load:.2f} before the run",
        "Software": f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}",
        "Model": f"small U-Net with EDM preconditioning, {n_params:,} parameters, float32, "
        f"random weights (seed 0), one evaluation {per_eval:.3f} s",
        "Run": f"batch {args.batch}, images {size}, "
        f"`karras_grid({args.steps}, final_zero=False)` ({args.steps} steps), "
        f"{args.repeats} timed runs per arm after one warm-up each, base and bdia interleaved",
    }
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/overhead.py", *given])
    text = render(rows, facts, command)
    print(text)
    write_atomic(args.out, text)


if __name__ == "__main__":
    main()
