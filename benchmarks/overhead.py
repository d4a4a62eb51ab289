"""Wall-time overhead of BDIA over its base solver on a convolutional denoiser.

BDIA reuses the one model evaluation of each step for both the forward and the backward
integration, so wrapping a one-stage solver should cost no extra network calls and only a few
element-wise tensor operations per step. This script checks that on a small, randomly
initialised U-Net-like denoiser (EDM preconditioning, float32, CPU): for each one-stage base
solver it times ``bdia.sample`` with the base solver and with ``bdia.bdia(base, gamma=0.96)``
on the same noise and the same 50-step Karras grid, interleaving the two after one warm-up
each (the order swapped every round, so neither arm always runs on the other's heels), and
reports the median wall times, their ratio and the NFE each run used (target: BDIA's time at
most 1.03 times the base solver's, at identical NFE).

On a shared machine the network's time varies from run to run by more than BDIA's few tensor
operations cost (10.6 to 13.7 s for the same 50 evaluations, measured), so the ratio of the
medians scatters by several percent either way. The script therefore also clocks each network
call and reports the time each run spent outside the network: the sampler's own work, where
BDIA's cost lies, since both arms make the same calls on inputs of the same shape, dtype and
layout. That difference, over the base solver's median, is the ratio with the network's
spread taken out, and the target is judged on it.

Run from the repository root::

    python benchmarks/overhead.py               # writes docs/benchmarks/overhead.md
    python benchmarks/overhead.py --repeats 9   # more repeats on a noisy machine

The markdown table is printed to stdout and written atomically to ``--out``. The run takes
10 to 20 minutes on two CPU cores with ``--repeats 9``. Other processes on the machine slow
the sampler's own work too, so run it on a quiet machine.
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
from _args import positive_int  # the benchmarks folder is the script's path
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


class Clocked(nn.Module):
    """A denoiser that adds the wall time of each of its calls to ``seconds``."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.seconds = 0.0

    def forward(self, x_bar: Tensor, sigma_bar: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self.denoiser(x_bar, sigma_bar)
        self.seconds += time.perf_counter() - start
        return out


# ------------------------------------------------------------------------------ timing


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory rather than return it to the system.

    The network's activations (megabytes each) are otherwise mapped afresh on every call and
    their pages zeroed on first touch: a run of 20 steps measured 130,000 to 720,000 page
    faults, and a run's time followed that count more than it followed the solver. Pinning
    the mmap and trim thresholds removed the faults (0 per run). Returns False where the C
    library is not glibc (the timings then carry that noise).
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # 1 GiB is above any one allocation of this network, so none is mapped on its own, and
    # the heap is not trimmed until 1 GiB of it is free.
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


@dataclass
class Row:
    solver: str
    base_times: list[float]
    bdia_times: list[float]
    base_nfe: set[int]
    bdia_nfe: set[int]
    # Seconds of each run spent outside the network's calls: the sampler's own work.
    base_outside: list[float]
    bdia_outside: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.bdia_times) / statistics.median(self.base_times)

    @property
    def outside_ratio(self) -> float:
        """The ratio with the network's spread taken out: (base + extra outside) / base."""
        base = statistics.median(self.base_times)
        extra = statistics.median(self.bdia_outside) - statistics.median(self.base_outside)
        return (base + extra) / base

    @property
    def passed(self) -> bool:
        """Same NFE, and the ratio without the network's spread within the target."""
        same_nfe = len(self.base_nfe) == 1 and self.base_nfe == self.bdia_nfe
        return same_nfe and self.outside_ratio <= TARGET_RATIO


def timed_sample(
    ode: bdia.DiffusionODE, clock: Clocked, solver, x: Tensor, ts: Tensor
) -> tuple[float, int, float]:
    """Wall time of one ``bdia.sample`` run, the model evaluations it made and the seconds it
    spent outside them (``clock`` is the denoiser ``ode`` calls)."""
    ode.reset_nfe()
    clock.seconds = 0.0
    start = time.perf_counter()
    bdia.sample(ode, solver, x, ts, progress=False)
    elapsed = time.perf_counter() - start
    return elapsed, ode.nfe, elapsed - clock.seconds


def compare(
    ode: bdia.DiffusionODE, clock: Clocked, name: str, x: Tensor, ts: Tensor, repeats: int
) -> Row:
    """Time the base solver and its BDIA form after one warm-up each, interleaved, in reversed
    order every other round, so that neither always runs right after the other."""
    base = bdia.get_solver(name)
    arms = {"base": base, "bdia": bdia.bdia(base, gamma=GAMMA)}
    for solver in arms.values():
        timed_sample(ode, clock, solver, x, ts)
    runs: dict[str, list[tuple[float, int, float]]] = {arm: [] for arm in arms}
    for round_ in range(repeats):
        for arm in arms if round_ % 2 == 0 else reversed(arms):
            runs[arm].append(timed_sample(ode, clock, arms[arm], x, ts))
    times, nfes, outside = ({arm: [r[i] for r in runs[arm]] for arm in arms} for i in range(3))
    return Row(
        name,
        times["base"],
        times["bdia"],
        set(nfes["base"]),
        set(nfes["bdia"]),
        outside["base"],
        outside["bdia"],
    )


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
        f"each run counted; the target is BDIA's time at most {TARGET_RATIO} times the base "
        "solver's at identical NFE.",
        "",
        "'Outside the network' is the median time of the same runs spent outside the network's "
        "calls, each call clocked: the sampler's own work, where BDIA's extra cost lies (both "
        "arms make the same calls, on inputs of the same shape, dtype and layout). 'Ratio "
        "without the network's spread' is (median base + outside bdia - outside base) / "
        "median base, and the target is judged on it: the measured ratio of the medians also "
        "carries the network's run-to-run spread on a shared machine, several percent either "
        "way.",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += [
        "",
        "| solver | NFE base | NFE bdia | median base (s) | median bdia (s) | measured ratio "
        "| outside the network, base (ms) | outside the network, bdia (ms) "
        f"| ratio without the network's spread | <= {TARGET_RATIO} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.solver} | {fmt_nfe(row.base_nfe)} | {fmt_nfe(row.bdia_nfe)} "
            f"| {statistics.median(row.base_times):.3f} "
            f"| {statistics.median(row.bdia_times):.3f} "
            f"| {row.ratio:.4f} | {1e3 * statistics.median(row.base_outside):.1f} "
            f"| {1e3 * statistics.median(row.bdia_outside):.1f} | {row.outside_ratio:.4f} "
            f"| {'PASS' if row.passed else 'FAIL'} |"
        )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"Written by `{command}` on {date}.", ""]
    return "\n".join(lines)


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
    clock = Clocked(denoiser)
    ode = bdia.DiffusionODE(clock, bdia.EDM())
    ts = bdia.karras_grid(args.steps, final_zero=False)
    noise = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    load = os.getloadavg()[0]
    allocator = "glibc malloc keeping freed memory" if keep_freed_memory() else "system malloc"

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
            row = compare(ode, clock, name, x, ts, args.repeats)
            print(
                f"{name}: ratio {row.ratio:.4f}, without the network's spread "
                f"{row.outside_ratio:.4f}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)

    size = f"3x{args.size}x{args.size}"
    if args.size != DEFAULT_SIZE:
        size += f" (reduced from 3x{DEFAULT_SIZE}x{DEFAULT_SIZE} to keep the run short)"
    facts = {
        "Machine": f"{cpu_name()}, {os.cpu_count()} CPUs, "
        f"1-minute load average {load:.2f} before the run",
        "Software": f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, {allocator}",
        "Model": f"small U-Net with EDM preconditioning, {n_params:,} parameters, float32, "
        f"random weights (seed 0), one evaluation {per_eval:.3f} s",
        "Run": f"batch {args.batch}, images {size}, "
        f"`karras_grid({args.steps}, final_zero=False)` ({args.steps} steps), "
        f"{args.repeats} timed runs per arm after one warm-up each, base and bdia interleaved "
        "(the order swapped every round)",
    }
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/overhead.py", *given])
    text = render(rows, facts, command)
    print(text)
    write_atomic(args.out, text)


if __name__ == "__main__":
    main()
