"""Peak memory and time of gradients through a sampler: autograd against the reversible adjoint.

``bdia.sample(..., adjoint="autograd")`` keeps every step's graph, so its memory grows with
the number of steps; ``adjoint="reversible"`` keeps only the final state and rebuilds the
earlier ones with BDIA's exact inverse, so its memory should not. This script measures both
on a small convolutional denoiser (EDM form, float32, random weights, class conditioning)
with ``bdia(euler, 0.96)``, differentiating a loss on the sample with respect to the starting
noise, the class embedding and the network's parameters, at 10, 20, 50, 100 and 200 steps.

Targets: the reversible adjoint's peak memory at 200 steps within 1.3x of its peak at 10
steps; its time within 2.5x of autograd's at every step count.

How memory is measured. On the CPU each (method, steps) pair runs in a fresh Python process
(one thread) in which glibc maps every allocation over 64 KiB on its own and hands freed
memory back at once (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``), so that
the resident set size follows the live tensors rather than the allocator's cache. The
process builds the network and the inputs, makes one warm-up pass of 3 steps (which faults
in the library code the pass runs: tens of MiB that are not tensors), then, for each of
three measured passes, reads its resident set size (VmRSS), resets the kernel's peak
counter (``/proc/self/clear_refs``), makes the pass and reads the peak (VmHWM) less the size
before: the memory the pass added, tensors and Python objects. It reports the median of the
three (single passes scatter by about 0.5 MiB: small objects that glibc keeps in its heap).
On CUDA (``--device cuda``) it is ``torch.cuda.max_memory_allocated()`` less the allocation
before the pass. Times are medians of ``--repeats`` passes per method in one process, the
two methods interleaved (after a warm-up pass each) so that a change in the machine's load
touches both.

Run from the repository root::

    python benchmarks/gradients.py              # writes docs/benchmarks/gradients.md and .png

The run takes about two minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from _args import positive_int  # the benchmarks folder is the script's path
from overhead import cpu_name  # the benchmarks folder is the script's path
from torch import Tensor, nn

import bdia
from bdia._files import replace_atomic, write_atomic

STEPS = (10, 20, 50, 100, 200)
METHODS = ("autograd", "reversible")
GAMMA = 0.96
MEMORY_TARGET = 1.3
TIME_TARGET = 2.5
MEMORY_PASSES = 3
BATCH = 8
SIZE = 16
WIDTH = 32
CLASSES = 10
# glibc: allocations over 64 KiB mapped on their own, freed memory returned at once.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
DEFAULT_OUT = DOCS / "gradients.md"


class ConvDenoiser(nn.Module):
    """EDM preconditioning around four 3x3 convolutions with SiLU, the noise level as an
    input channel and a class embedding added to every hidden layer."""

    def __init__(self, width: int = WIDTH, classes: int = CLASSES, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.hidden = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.embed = nn.Linear(classes, width)
        self.head = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x_bar: Tensor, sigma_bar: Tensor, class_labels: Tensor) -> Tensor:
        sigma = sigma_bar.to(x_bar.dtype)[:, None, None, None]
        var = sigma**2 + self.sigma_data**2
        c_skip, c_out, c_in = (
            self.sigma_data**2 / var,
            sigma * self.sigma_data / var.sqrt(),
            1 / var.sqrt(),
        )
        shift = self.embed(class_labels)[:, :, None, None]
        h = self.stem(torch.cat([c_in * x_bar, (sigma.log() / 4).expand_as(x_bar)], dim=1))
        h = nn.functional.silu(h + shift)
        for conv in self.hidden:
            h = h + nn.functional.silu(conv(h) + shift)
        return c_skip * x_bar + c_out * self.head(h)


def problem(device: str):
    """The network, the class logits (learnable), the noise and a target image."""
    torch.manual_seed(0)
    net = ConvDenoiser().to(device)
    logits = torch.zeros(BATCH, CLASSES, device=device)
    logits[torch.arange(BATCH), torch.arange(BATCH) % CLASSES] = 4.0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(BATCH, 1, SIZE, SIZE, generator=g).to(device)
    target = torch.rand(BATCH, 1, SIZE, SIZE, generator=g).to(device) * 2 - 1
    return net, logits.requires_grad_(True), noise, target


def one_pass(net, logits, noise, target, steps: int, method: str) -> list[Tensor]:
    """Forward and backward: the gradients w.r.t. the noise, the logits and the weights."""
    for p in net.parameters():
        p.grad = None
    logits.grad = None
    x = (80.0 * noise).requires_grad_(True)
    ode = bdia.DiffusionODE(net, cond={"class_labels": logits.softmax(-1)})
    solver = bdia.bdia(bdia.get_solver("euler"), GAMMA)
    out = bdia.sample(ode, solver, x, bdia.karras_grid(steps), adjoint=method, progress=False)
    ((out - target) ** 2).mean().backward()
    return [x.grad, logits.grad, *(p.grad for p in net.parameters())]


def status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, steps: int, device: str) -> None:
    """Measure the peak memory of ``MEMORY_PASSES`` passes in this fresh process; print their
    median as a JSON line."""
    torch.set_num_threads(1)
    net, logits, noise, target = problem(device)
    one_pass(net, logits, noise, target, 3, method)  # warm-up: faults in the code it runs
    peaks = []
    for _ in range(MEMORY_PASSES):
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset VmHWM, the peak resident set size
        one_pass(net, logits, noise, target, steps, method)
        if device == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        else:
            peaks.append(status_kb("VmHWM") * 1024 - before)
    print(json.dumps({"peak": statistics.median(peaks)}))


def peak_memory(method: str, steps: int, device: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **MALLOC}
    cmd = [sys.executable, __file__, "--child", method, str(steps), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at {steps} steps failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


def timings(steps: int, repeats: int, device: str) -> tuple[dict[str, list[float]], float]:
    """Wall times of ``repeats`` passes per method, the two interleaved after one warm-up
    pass each, and the largest relative difference between the two methods' gradients."""
    net, logits, noise, target = problem(device)
    grads = {m: one_pass(net, logits, noise, target, steps, m) for m in METHODS}
    agreement = max(rel(g, a) for g, a in zip(grads["reversible"], grads["autograd"], strict=True))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:
            start = time.perf_counter()
            one_pass(net, logits, noise, target, steps, method)
            if device == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - start)
    return times, agreement


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ report


def plot(results: dict, steps: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, style in zip(METHODS, ("o-", "s-")):
        left.plot(steps, [results[method, n]["peak"] / 2**20 for n in steps], style, label=method)
        median = [statistics.median(results[method, n]["times"]) for n in steps]
        right.plot(steps, median, style, label=method)
    left.set(xscale="log", yscale="log", xlabel="steps", ylabel="peak memory added (MiB)")
    right.set(xscale="log", yscale="log", xlabel="steps", ylabel="forward + backward (s)")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"gradients through bdia(euler, {GAMMA}): autograd vs the reversible adjoint")
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def render(
    results: dict, agreement: dict, steps: Sequence[int], facts: dict, command: str, figure: str
):
    rev = [results["reversible", n]["peak"] for n in steps]
    growth = rev[-1] / rev[0]
    ratios = {
        n: statistics.median(results["reversible", n]["times"])
        / statistics.median(results["autograd", n]["times"])
        for n in steps
    }
    worst_ratio = max(ratios.values())
    lines = [
        "# Gradients through a sampler: memory and time",
        "",
        "Peak memory and wall time of one forward and backward pass through `bdia.sample` "
        f"with `bdia(euler, {GAMMA})`, differentiating a loss on the sample with respect to "
        "the starting noise, the class embedding (`cond`) and the network's weights: "
        '`adjoint="autograd"` (autograd through the unrolled loop) against '
        '`adjoint="reversible"` (only the final state kept; each earlier state rebuilt by '
        "BDIA's exact inverse and that one step recomputed).",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += [
        "",
        "| steps | peak autograd (MiB) | peak reversible (MiB) | median autograd (s) "
        "| median reversible (s) | time ratio | gradient difference |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in steps:
        a, r = results["autograd", n], results["reversible", n]
        lines.append(
            f"| {n} | {a['peak'] / 2**20:.1f} | {r['peak'] / 2**20:.1f} "
            f"| {statistics.median(a['times']):.3f} | {statistics.median(r['times']):.3f} "
            f"| {ratios[n]:.2f} | {agreement[n]:.1e} |"
        )
    lines += [
        "",
        "Gradient difference: the largest, over the noise, the class logits and each weight "
        "tensor, of ||g_reversible - g_autograd|| / ||g_autograd|| (float32 state and network).",
        "",
        "| target | measured | met |",
        "| --- | ---: | :---: |",
        f"| reversible peak at {steps[-1]} steps / at {steps[0]} steps <= {MEMORY_TARGET} "
        f"| {growth:.2f} | {'yes' if growth <= MEMORY_TARGET else 'no'} |",
        f"| reversible time / autograd time <= {TIME_TARGET} (worst over the step counts) "
        f"| {worst_ratio:.2f} | {'yes' if worst_ratio <= TIME_TARGET else 'no'} |",
        "",
        f"![peak memory and time against the number of steps]({figure})",
        "",
    ]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [f"Written by `{command}` on {date}.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed passes (default 3)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        nargs="+",
        default=list(STEPS),
        help="step counts (default %(default)s)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.device)
        return
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("CPU memory is measured through /proc (Linux only)")
    steps = sorted(args.steps)
    torch.set_num_threads(1)
    results, agreement = {}, {}
    load = os.getloadavg()[0]
    begun = time.perf_counter()
    for n in steps:
        times, agreement[n] = timings(n, args.repeats, args.device)
        for method in METHODS:
            peak = peak_memory(method, n, args.device)
            results[method, n] = {"peak": peak, "times": times[method]}
            print(
                f"{method:10s} {n:4d} steps: peak {peak / 2**20:8.1f} MiB, "
                f"median {statistics.median(times[method]):.3f} s",
                file=sys.stderr,
                flush=True,
            )
    net = ConvDenoiser()
    n_params = sum(p.numel() for p in net.parameters())
    device = cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    facts = {
        "Machine": f"{device}, {os.cpu_count()} CPUs, 1-minute load average {load:.2f} "
        "before the run",
        "Software": f"torch {torch.__version__}, one thread, Python {platform.python_version()}",
        "Model": f"four 3x3 convolutions ({WIDTH} channels) with EDM preconditioning and a "
        f"class embedding, {n_params:,} parameters, float32, random weights (seed 0)",
        "Run": f"batch {BATCH}, images 1x{SIZE}x{SIZE}, float32 state, `karras_grid(steps)`, "
        f"loss mean((x - target)^2); peak memory: median of {MEMORY_PASSES} passes; time: "
        f"median of {args.repeats} timed passes per method in one process, the methods "
        f"interleaved after a warm-up pass each; {time.perf_counter() - begun:.0f} s in all",
        "Memory": "peak resident set size during a pass less the resident size before it "
        "(Linux /proc: VmHWM after resetting it, less VmRSS), each pair in a fresh process "
        "after a 3-step warm-up pass, with glibc returning freed memory at once (see the "
        "script's docstring)"
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated() during the pass less the allocation before it",
    }
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/gradients.py", *given])
    # The page links its figure by name, so the link follows --out as the figure does.
    figure = args.out.with_suffix(".png")
    text = render(results, agreement, steps, facts, command, figure.name)
    print(text)
    plot(results, steps, figure)
    write_atomic(args.out, text)


if __name__ == "__main__":
    main()
