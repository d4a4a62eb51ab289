"""Where one evaluation of EDM's DDPM++ network spends its time, and its 2x2 resampling as
EDM writes it (a grouped convolution) against the blockwise form bdia computes.

    python benchmarks/unet_profile.py                  # CUDA: docs/benchmarks/unet_profile.md
    python benchmarks/unet_profile.py --smoke --out F  # CPU, tiny network, seconds

For each resampling form and mode (eager, or compiled by ``bdia.models.compile_network``):
the median seconds of ``--evals`` evaluations of a random-weight ``ddpmpp-cond`` network at
``--batch`` with its U-Net in bfloat16, each synchronised, after two warm-up calls (the first
compiles); the images/s that rate gives a 35-NFE sampler, and TFLOP/s from FLOPs counted
as ``gpu_check.py`` counts them. Then the kernels of one compiled evaluation in the blockwise
form, ranked by their own device time. The page is rewritten after each step.

The grouped form is the one ``bdia.models.networks`` computed before: the module's
``_upsample`` and ``_downsample`` are swapped for the convolutions while its network is
compiled and timed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from _args import positive_int  # the benchmarks folder is the script's path
from gpu_check import count_gflop, network_inputs, sync
from torch import Tensor

from bdia import generate
from bdia._files import write_atomic
from bdia.models import compile_network, networks

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "unet_profile.md"
NFE = 35  # Heun on karras_grid(18), the sampler the targets are set for
SIGMA = 1.0
TOP_KERNELS = 15


def grouped_upsample(x: Tensor, f: Tensor, pad: int) -> Tensor:
    c = x.shape[1]
    return F.conv_transpose2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


def grouped_downsample(x: Tensor, f: Tensor, pad: int) -> Tensor:
    c = x.shape[1]
    return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


@contextlib.contextmanager
def resampling(form: str) -> Iterator[None]:
    """Within the block the network resamples in ``form``: "blockwise" (bdia's) or "grouped"."""
    if form == "blockwise":
        yield
        return
    saved = networks._upsample, networks._downsample
    networks._upsample, networks._downsample = grouped_upsample, grouped_downsample
    try:
        yield
    finally:
        networks._upsample, networks._downsample = saved


@dataclass
class Result:
    form: str
    mode: str
    seconds: list[float]
    first_s: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_evaluations(
    net: torch.nn.Module, batch: int, evals: int, device: torch.device
) -> tuple[list[float], float]:
    """Seconds of each of ``evals`` synchronised evaluations after two warm-up calls, and the
    first call's seconds (compiling, for a compiled network)."""
    x, sigma, cond = network_inputs(net, batch, SIGMA, device, torch.float32)
    times = []
    with torch.no_grad():
        for _ in range(2 + evals):
            sync(device)
            t0 = time.perf_counter()
            net(x, sigma, **cond)
            sync(device)
            times.append(time.perf_counter() - t0)
    return times[2:], times[0]


def kernel_table(
    net: torch.nn.Module, batch: int, device: torch.device
) -> tuple[list[tuple[str, int, float]], float]:
    """The kernels (on the CPU: the operators) of one evaluation as (name, calls, own
    seconds), longest first, and the total of their own seconds."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    x, sigma, cond = network_inputs(net, batch, SIGMA, device, torch.float32)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with torch.no_grad(), profile(activities=[activity]) as prof:
        net(x, sigma, **cond)
        sync(device)
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [(e.key, e.count, getattr(e, own) / 1e6) for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    rows.sort(key=lambda r: r[2], reverse=True)
    return rows, sum(r[2] for r in rows)


def render(
    facts: dict[str, str],
    results: list[Result],
    kernels: list[tuple[str, int, float]],
    total: float,
    gflop: float,
    batch: int,
) -> str:
    lines = [
        "# Where a DDPM++ evaluation spends its time",
        "",
        "Written by `benchmarks/unet_profile.py`; do not edit by hand. One evaluation of a "
        "random-weight DDPM++ cond network, its U-Net in bfloat16; the resampling of its "
        "2x2 `[1, 1]` filter as a grouped convolution (EDM's form) or as a blockwise "
        "product and sum (bdia's). median s: of the timed evaluations, each synchronised, "
        "after two warm-up calls; images/s at 35 NFE: batch / (35 x median); first call s: "
        "compiling included where compiled.",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += [
        "",
        "| resampling | mode | median s | images/s at 35 NFE | TFLOP/s | first call s | "
        "evaluations |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tflops = gflop * batch / r.median / 1e3
        lines.append(
            f"| {r.form} | {r.mode} | {r.median:.4f} | {batch / (NFE * r.median):.1f} | "
            f"{tflops:.3g} | {r.first_s:.1f} | {len(r.seconds)} |"
        )
    if kernels:
        lines += [
            "",
            f"Kernels of one compiled evaluation (blockwise), by own time; all: "
            f"{total * 1e3:.2f} ms.",
            "",
            "| kernel | calls | ms | share |",
            "|---|---:|---:|---:|",
        ]
        for name, calls, seconds in kernels[:TOP_KERNELS]:
            short = name if len(name) <= 90 else name[:87] + "..."
            short = short.replace("|", "\\|")
            lines.append(f"| `{short}` | {calls} | {seconds * 1e3:.2f} | {seconds / total:.1%} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny network (also without CUDA)")
    p.add_argument("--batch", type=positive_int, default=512)
    p.add_argument("--evals", type=positive_int, default=10, help="timed evaluations per row")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--out", type=Path, default=None, help=f"on CUDA by default {DEFAULT_OUT}")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    # A smoke run writes only where --out says: its numbers must not replace the page.
    out = args.out if smoke else (args.out or DEFAULT_OUT)
    if smoke:
        device, name, batch, evals, backend = torch.device("cpu"), "tiny-cond", 2, 2, "aot_eager"
        card = "CPU (smoke)"
    else:
        device, name, batch, evals, backend = (
            torch.device("cuda"),
            "ddpmpp-cond",
            args.batch,
            args.evals,
            "inductor",
        )
        card = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True
    t0 = time.monotonic()
    net0 = generate.random_network(name)
    gflop, how = count_gflop(net0, batch)
    net0 = net0.to(device)
    net0.compute_dtype = torch.bfloat16
    facts = {
        "device": card,
        "torch": torch.__version__,
        "network": f"random:{name}, compute_dtype bfloat16, batch {batch}",
        "FLOPs": f"{gflop:.4g} GFLOP per image per evaluation ({how})",
        "compile": "off" if args.no_compile else f"compile_network, backend {backend}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    results: list[Result] = []
    kernels: list[tuple[str, int, float]] = []
    total = 0.0

    def report() -> str:
        facts["elapsed"] = f"{time.monotonic() - t0:.0f} s"
        text = render(facts, results, kernels, total, gflop, batch)
        if out is not None:
            write_atomic(out, text)
        return text

    modes = ["eager"] if args.no_compile else ["eager", "compiled"]
    compiled_blockwise = None
    for mode in modes:
        for form in ("grouped", "blockwise"):
            net = copy.deepcopy(net0)
            if mode == "compiled":
                torch._dynamo.reset()
                compile_network(net, backend=backend)
            with resampling(form):
                seconds, first = time_evaluations(net, batch, evals, device)
            results.append(Result(form, mode, seconds, first))
            print(f"{form}, {mode}: median {results[-1].median:.4f} s", file=sys.stderr)
            report()
            if mode == "compiled" and form == "blockwise":
                compiled_blockwise = net
    profiled = compiled_blockwise if compiled_blockwise is not None else net0
    kernels, total = kernel_table(profiled, batch, device)
    text = report()
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
