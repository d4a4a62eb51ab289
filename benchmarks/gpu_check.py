"""One-GPU check: the library's sampling speed against a plain EDM Heun loop, BDIA's overhead.

    bash benchmarks/gpu_check.sh            # one H100/H200: this (--budget 270), then fid_speed.py
    python benchmarks/gpu_check.py --smoke  # CPU, tiny network, seconds; writes only to --out

On CUDA it writes docs/benchmarks/gpu.md (or ``--out``), after every step, so that a run
stopped by its time limit still leaves what it measured. Without a CUDA device the script
behaves as ``--smoke``: the same functions on the CPU with ``random_network("tiny-cond")``,
small batches and a 3-step grid, compiled rows through ``backend="aot_eager"``, and no file
written unless ``--out`` is given.

What it measures, on a random-weight DDPM++ cond network (``random_network("ddpmpp-cond")``),
Heun on ``karras_grid(18)`` (35 NFE) under ``EDM()``, float32 state:

* per row (precision: fp32 with TF32 off, tf32, bf16, fp16; eager or compiled): images/s of
  ``bdia.sample(ode, get_solver("heun"), ...)`` and of EDM's deterministic Heun sampler
  (Algorithm 1 of Karras et al. 2022 without churn) written out below as a plain loop, on the
  same network object and the same noise, timed alternately (best and median of the repeats);
  their time ratio; TFLOP/s from FLOPs counted with ``FlopCounterMode``; the share of the
  card's datasheet peak; peak memory; compile time and recompiles;
* for a row whose library/reference ratio misses the target (every row in a smoke run), one
  more run of each sampler through a clocked copy of the call, which splits the run into the
  time before the first network call, inside the calls, between them and after the last;
* bdia(heun, 0.96) against heun per network evaluation, on the fastest half-precision row;
* the round trip of bdia(heun, 0.96) (``sample(..., return_pair=True)`` then ``invert``) with
  a bf16 network in float32 and float64 state: the relative error of the recovered noise.

Half precision sets ``net.compute_dtype`` (the U-Net's activations in bfloat16/float16; the
preconditioner, skip path, embeddings and weights stay float32). Only the network is compiled
(``bdia.models.compile_network``), never the sampler or BDIA's two-word arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from _args import positive_int  # the benchmarks folder is the script's path
from torch import Tensor

from bdia import generate
from bdia._files import write_atomic
from bdia.ode import DiffusionODE
from bdia.sampling import invert, sample
from bdia.schedules import EDM, karras_grid
from bdia.solvers import bdia, get_solver

# The budget counts from here: the imports before (torch's, a few seconds) are outside it.
T0 = time.monotonic()

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "gpu.md"
GAMMA = 0.96

# Datasheet dense peaks (TFLOP/s, the sparsity figures halved) by a substring of
# torch.cuda.get_device_name, most specific first ("GH200" and "H200 NVL" before "H200").
# H100 SXM: FP32 67, TF32 495, BF16/FP16 989; the H200 SXM and GH200 have the H100 SXM's
# compute. PCIe and NVL cards run at lower clocks and power. Unknown cards show 'n/a'.
_H100_SXM = {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0}
_NVL = {"fp32": 60.0, "tf32": 418.0, "bf16": 835.0, "fp16": 835.0}
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("GH200", _H100_SXM),
    ("H200 NVL", _NVL),
    ("H200", _H100_SXM),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", _NVL),
    ("H100", _H100_SXM),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
]
# ~790 TFLOP/s is the practical dense half-precision figure the targets below are set against
# for the H200 (SXM), shown beside the datasheet's share; no such figure for other cards.
PRACTICAL = {"H200": 790.0}

# The targets (docs/edm_cifar10.md); met / not met is computed from the measured numbers.
TARGET_BF16_IMAGES_S = 260.0  # whole sampling runs, batch 512, 35 NFE
TARGET_BATCH, TARGET_NFE = 512, 35
TARGET_RATIO = 1.02  # library / reference time, and BDIA / heun time per NFE
TARGET_COMPILE_S = 90.0

COMPUTE_DTYPE = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
HALF = ("bf16", "fp16")

# Seconds per image per evaluation at batch 512 on an H100, used to plan a row before one of
# its precision has been measured: fp32 without TF32 takes ~20 s per 35-NFE run (measured
# before); TF32 and half precision are guesses on the slow side. Measured rates replace them.
PRIOR_RATE = {
    "fp32": 20.0 / (512 * 35),
    "tf32": 8.0 / (512 * 35),
    "bf16": 4.0 / (512 * 35),
    "fp16": 4.0 / (512 * 35),
}
PRIOR_COMPILE_S = 45.0  # ~40 s per compiled DDPM++ configuration on an H200 (measured before)
STEP_OVERHEAD_S = 3.0  # per row: cuDNN's autotuning for new shapes, copies, bookkeeping
HARD_STOP_GRACE_S = 15.0  # past the budget, a running step is interrupted


class Deadline(BaseException):
    """Raised by the alarm past the budget; a BaseException so that no ``except Exception``
    inside torch swallows it."""


def elapsed() -> float:
    return time.monotonic() - T0


def log(message: str) -> None:
    print(f"[{elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ device
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_precision(precision: str) -> None:
    """TF32 on only for the tf32 row: cuDNN allows it by default, which fp32 must not."""
    on = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


class PeakMemory:
    """Peak bytes allocated during a block beyond what was allocated at its start (the earlier
    rows' kept network included there), or None off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


def compile_counters() -> dict[str, int]:
    """Dynamo's graph count and inductor's CUDA-graph skips so far (zeros before any compile;
    reading them must not import torch._dynamo, which changes bdia.twoword's path)."""
    if "torch._dynamo" not in sys.modules:
        return {"graphs": 0, "cudagraph_skips": 0}
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def peaks_for(card: str) -> tuple[dict[str, float], float | None]:
    """The card's datasheet dense peaks by precision ({} if unknown) and its practical
    half-precision reference (None if none is known)."""
    for key, peaks in PEAKS:
        if key in card:
            return peaks, PRACTICAL.get(key)
    return {}, None


# ------------------------------------------------------------------------------ inputs
def count_gflop(net: torch.nn.Module, batch: int) -> tuple[float, str]:
    """GFLOP of one network evaluation per image, counted by FlopCounterMode (convolutions,
    matrix products, attention; elementwise work is not counted), and how it was counted.

    On the meta device the full batch costs nothing; if the network does not run there, a
    batch of 2 is counted where the network lies and divided (the work is linear in the batch).
    """
    from torch.utils.flop_counter import FlopCounterMode

    def count(module: torch.nn.Module, n: int) -> int:
        device = next(module.parameters()).device
        x, sigma, cond = network_inputs(module, n, 1.0, device, torch.float32)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x, sigma, **cond)
        return counter.get_total_flops()

    try:
        flops = count(copy.deepcopy(net).to("meta"), batch)
        return flops / batch / 1e9, f"counted on the meta device at batch {batch}"
    except Exception as exc:  # an op without a meta kernel: count a small real batch
        log(f"FLOP count on the meta device failed ({exc!r}); counting a batch of 2")
        return count(net, 2) / 2 / 1e9, "counted at batch 2, scaled to the batch"


def network_inputs(
    net: torch.nn.Module, batch: int, sigma: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Noise scaled by ``sigma`` (seed 0, the same for every row), a ``(batch,)`` sigma and
    one-hot class labels 0, 1, ..., as the sampler passes them to the network."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    x = (sigma * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
    sigmas = torch.full((batch,), sigma, dtype=torch.float32, device=device)
    label_dim = getattr(net, "label_dim", 0)
    cond = {}
    if label_dim:
        labels = torch.arange(batch, device=device) % label_dim
        cond["class_labels"] = torch.eye(label_dim, device=device)[labels]
    return x, sigmas, cond


def make_ode(net: torch.nn.Module, cond: dict[str, Tensor]) -> DiffusionODE:
    # float32 in and out of the preconditioner in every row; half precision lives inside it.
    return DiffusionODE(net, EDM(), cond=cond, model_dtype=torch.float32)


# ------------------------------------------------------------------------------ samplers
def edm_heun(
    net: torch.nn.Module, x: Tensor, sigmas: Sequence[float], cond: dict[str, Tensor]
) -> tuple[Tensor, int]:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1, no churn), the
    reference the library is timed against; returns the sample and the evaluation count.

    ``sigmas`` decrease to 0. Each step takes the slope ``d = (x - D(x, sigma)) / sigma``, an
    Euler step to the next sigma and, unless that sigma is 0, Heun's correction with the slope
    there. The network gets sigma as a ``(batch,)`` tensor, as the library passes it: a
    scalar would give a compiled network another input signature, hence another graph.
    """
    nfe = 0

    def denoise(x: Tensor, sigma: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        return net(x, s, **cond)

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - denoise(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * d
        if sigma_next != 0:
            d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x, nfe


def library_sample(ode: DiffusionODE, solver: Any, x: Tensor, ts: Tensor) -> tuple[Tensor, int]:
    ode.reset_nfe()
    out = sample(ode, solver, x, ts, progress=False)
    return out, ode.nfe


class ClockedNetwork(torch.nn.Module):
    """``net`` with a mark before and after each call, to split a sampling run into the
    network's part and the sampler's (`measure_split`). On CUDA a mark is an event recorded on
    the current stream, which the host does not wait for, so the run keeps its pace; on the
    CPU it is a clock reading."""

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net = net
        self.device = device
        self.spans: list[tuple[Any, Any]] = []

    def mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        start = self.mark()
        out = self.net(*args, **kwargs)
        self.spans.append((start, self.mark()))
        return out


def seconds_between(start: Any, end: Any) -> float:
    """Seconds between two marks of `ClockedNetwork.mark` (the device's time on CUDA)."""
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1e3


@dataclass
class Split:
    """One sampling run taken apart, in seconds: ``total`` from the run's first mark to its
    last (on CUDA the device's time line, which starts idle: the run was synchronised before);
    ``before``: until the first network call starts (the sampler's checks, with nothing for
    the device to do); ``network``: inside the calls; ``after``: from the last call's end;
    ``between``: the rest, the sampler's arithmetic between calls and any wait for the host."""

    total: float
    before: float
    network: float
    after: float
    calls: int

    @property
    def between(self) -> float:
        return self.total - self.before - self.network - self.after


def measure_split(run: Callable[[ClockedNetwork], Any], clocked: ClockedNetwork) -> Split:
    """Run ``run(clocked)`` once between two marks, the device synchronised before and after."""
    device = clocked.device
    clocked.spans = []
    sync(device)
    begin = clocked.mark()
    run(clocked)
    end = clocked.mark()
    sync(device)
    spans = clocked.spans
    if not spans:
        raise RuntimeError("the sampler made no network call")
    return Split(
        total=seconds_between(begin, end),
        before=seconds_between(begin, spans[0][0]),
        network=sum(seconds_between(a, b) for a, b in spans),
        after=seconds_between(spans[-1][1], end),
        calls=len(spans),
    )


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleave(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of ``repeats`` calls of each function, taking turns, and each one's last output.

    The order is reversed every other round (A B, B A, ...), so that a drift in the card's
    clock or temperature falls on every function alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, last[name] = timed(fns[name], device)
            times[name].append(seconds)
    return times, last


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Config:
    """One row: the U-Net's precision, the batch, and the compile settings (None: eager).
    ``channels_last``: the network's weights in that layout; both samplers hand it the
    standard layout, as the library hands every model call (``bdia.ODE``)."""

    name: str
    precision: str
    batch: int
    compile: dict[str, Any] | None = None
    channels_last: bool = False


@dataclass
class Row:
    config: Config
    lib: list[float] = field(default_factory=list)  # seconds per sampling run
    ref: list[float] = field(default_factory=list)
    nfe_lib: int = 0
    nfe_ref: int = 0
    peak_bytes: int | None = None
    compile_s: float | None = None
    graphs: int | None = None  # graphs compiled by the first call
    recompiles: int | None = None  # graphs compiled after it
    cudagraph_skips: int | None = None
    difference: float | None = None  # library's images against the reference's
    split: dict[str, Split] | None = None  # "lib" and "ref": one clocked run of each
    note: str = ""

    @property
    def measured(self) -> bool:
        return bool(self.lib and self.ref)

    def images_s(self, which: str = "lib") -> float:
        return self.config.batch / min(getattr(self, which))

    @property
    def ratio(self) -> float:
        return min(self.lib) / min(self.ref)

    @property
    def ratio_median(self) -> float:
        return statistics.median(self.lib) / statistics.median(self.ref)

    def rate(self) -> float:
        """Seconds per image per evaluation (the library's best run)."""
        return min(self.lib) / (self.config.batch * self.nfe_lib)


@dataclass
class Overhead:
    """bdia(heun, GAMMA) against heun on one row's network."""

    row: str
    batch: int = 0
    heun: list[float] = field(default_factory=list)
    bdia: list[float] = field(default_factory=list)
    nfe_heun: int = 0
    nfe_bdia: int = 0
    recompiles: int | None = None
    note: str = ""

    @property
    def measured(self) -> bool:
        return bool(self.heun and self.bdia)

    @property
    def per_nfe(self) -> float:
        return (min(self.bdia) / self.nfe_bdia) / (min(self.heun) / self.nfe_heun)

    @property
    def per_nfe_median(self) -> float:
        bdia_s = statistics.median(self.bdia) / self.nfe_bdia
        return bdia_s / (statistics.median(self.heun) / self.nfe_heun)


@dataclass
class RoundTrip:
    state: str
    batch: int = 0
    nfe: int = 0
    error: float | None = None
    exact: bool | None = None  # the recovered noise equal to the start, bit for bit
    low: float | None = None  # the largest low word the recovered state carries, relative
    note: str = ""


def prepare_network(net0: torch.nn.Module | None, config: Config) -> torch.nn.Module:
    """A copy of ``net0`` set up for the row: compute dtype, memory format, compilation.

    A copy, because compiling changes the network in place and each compiled row must
    compile afresh.
    """
    assert net0 is not None, "the network is built first"
    net = copy.deepcopy(net0)
    net.compute_dtype = COMPUTE_DTYPE[config.precision]
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if config.compile is not None:
        from bdia.models import compile_network

        net = compile_network(net, **config.compile)
    return net


@dataclass
class Context:
    """What the steps share: the device, the eager float32 network, the grid, the budget, the
    rates measured so far (for planning) and the fastest half-precision row's network."""

    device: torch.device
    steps: int
    repeats: int
    trip_batch: int
    deadline: float  # seconds since T0
    net0: torch.nn.Module | None = None  # built inside the deadline's reach
    warm_steps: int = 2  # a short grid first: autotuning, compiling, CUDA-graph recording
    rates: dict[str, float] = field(default_factory=lambda: dict(PRIOR_RATE))
    compile_s: float = PRIOR_COMPILE_S
    kept: tuple[Row, torch.nn.Module, DiffusionODE, Tensor] | None = None
    split_every_row: bool = False  # a smoke run splits every row, to exercise the code

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1

    def left(self) -> float:
        return self.deadline - elapsed()

    def run_s(self, precision: str, batch: int, nfe: int | None = None) -> float:
        return self.rates[precision] * batch * (nfe or self.nfe)

    def row_s(self, config: Config, repeats: int) -> float:
        """Planned seconds of a row: first call (compiling), warm-up, the timed runs."""
        run = self.run_s(config.precision, config.batch)
        first = self.compile_s if config.compile is not None else 0.0
        warm = 2 * run * (2 * self.warm_steps - 1) / self.nfe
        return STEP_OVERHEAD_S + first + warm + 2 * repeats * run

    def overhead_s(self, repeats: int) -> float:
        """Planned seconds of the BDIA overhead step (BDIA takes a few more NFE than heun)."""
        if self.kept is not None:
            row = self.kept[0]
            run = row.rate() * row.config.batch * (self.nfe + 2)
        else:
            run = self.run_s("bf16", TARGET_BATCH, self.nfe + 2)
        return STEP_OVERHEAD_S + 2 * repeats * run

    def round_trip_s(self) -> float:
        """Planned seconds of one round trip (sample and invert); a small batch uses the card
        less well, so it is counted at twice the per-image time of the eager bf16 row."""
        return STEP_OVERHEAD_S + 2 * 2 * self.run_s("bf16", self.trip_batch, self.nfe + 2)

    def final_s(self) -> float:
        """What every row leaves for the BDIA overhead and the two round trips."""
        return self.overhead_s(self.repeats) + 2 * self.round_trip_s()


def affordable_repeats(ctx: Context, warm_s: float, repeats: int, reserve: float) -> int:
    """How many of ``repeats`` timed rounds fit what is left, reserve aside, judged from the
    warm-up round (``warm_s``: both samplers on the short grid, each run's first calls and
    cuDNN's tuning included, so the estimate errs long); at least 1."""
    round_s = warm_s * ctx.nfe / (2 * ctx.warm_steps - 1)
    return max(1, min(repeats, int((ctx.left() - reserve) // round_s)))


def measure_row(ctx: Context, config: Config, repeats: int, reserve: float = 0.0) -> Row:
    """Time the library's heun and the reference loop on one network copy, alternately.

    The rounds are planned again after the warm-up from its measured time, so that a row
    slower than planned drops rounds, down to one, rather than the steps after it.
    """
    row = Row(config)
    device = ctx.device
    set_precision(config.precision)
    with PeakMemory(device) as memory, torch.no_grad():
        net = prepare_network(ctx.net0, config)
        ts, warm_ts = karras_grid(ctx.steps), karras_grid(ctx.warm_steps)
        x, sigma0, cond = network_inputs(net, config.batch, float(ts[0]), device, torch.float32)
        ode = make_ode(net, cond)
        heun = get_solver("heun")
        before = compile_counters()
        # Called as the samplers call it, so that this call compiles the graph they use.
        first_s, _ = timed(lambda: net(x, sigma0, **cond), device)
        after_first = compile_counters()
        if config.compile is not None:
            row.compile_s = first_s
            row.graphs = after_first["graphs"] - before["graphs"]
            log(f"{config.name}: first call (compiling) {first_s:.1f} s")

        def samplers(grid: Tensor) -> dict[str, Callable[[], Any]]:
            return {
                "lib": lambda: library_sample(ode, heun, x, grid),
                "ref": lambda: edm_heun(net, x, grid.tolist(), cond),
            }

        warm, _ = interleave(samplers(warm_ts), 1, device)
        planned = repeats
        repeats = affordable_repeats(ctx, sum(t[0] for t in warm.values()), repeats, reserve)
        if repeats < planned:
            row.note = f"{repeats} run(s) only (budget, after the warm-up)"
            log(f"{config.name}: {repeats} run(s) of each sampler after the warm-up")
        times, last = interleave(samplers(ts), repeats, device)
        row.lib, row.ref = times["lib"], times["ref"]
        (out_lib, row.nfe_lib), (out_ref, row.nfe_ref) = last["lib"], last["ref"]
        row.difference = relative_difference(out_lib, out_ref)
        # Where the library's extra time goes, for a row that misses the target: one more run
        # of each, if both fit what is left (their best runs' time).
        split_s = min(row.lib) + min(row.ref)
        missed = ctx.split_every_row or row.ratio > TARGET_RATIO
        if missed and split_s + STEP_OVERHEAD_S <= ctx.left() - reserve:
            clocked = ClockedNetwork(net, device)
            clocked_ode = make_ode(clocked, cond)
            row.split = {
                "lib": measure_split(lambda n: library_sample(clocked_ode, heun, x, ts), clocked),
                "ref": measure_split(lambda n: edm_heun(n, x, ts.tolist(), cond), clocked),
            }
        end = compile_counters()
        if config.compile is not None:
            row.recompiles = end["graphs"] - after_first["graphs"]
            row.cudagraph_skips = end["cudagraph_skips"] - before["cudagraph_skips"]
    row.peak_bytes = memory.peak
    if config.precision in HALF and (ctx.kept is None or row.rate() < ctx.kept[0].rate()):
        ctx.kept = (row, net, ode, x)
    return row


def measure_overhead(ctx: Context, repeats: int) -> Overhead:
    """bdia(heun, GAMMA) and heun per NFE, alternately, on the fastest half-precision row."""
    assert ctx.kept is not None
    row, net, ode, x = ctx.kept
    result = Overhead(row.config.name, row.config.batch)
    set_precision(row.config.precision)
    ts, warm_ts = karras_grid(ctx.steps), karras_grid(ctx.warm_steps)
    heun, both = get_solver("heun"), bdia("heun", GAMMA)
    before = compile_counters()
    with torch.no_grad():
        # Should BDIA hand the network another memory layout, its graph compiles here.
        interleave({"bdia": lambda: library_sample(ode, both, x, warm_ts)}, 1, ctx.device)
        after_warm = compile_counters()
        fns = {
            "heun": lambda: library_sample(ode, heun, x, ts),
            "bdia": lambda: library_sample(ode, both, x, ts),
        }
        times, last = interleave(fns, repeats, ctx.device)
    result.heun, result.bdia = times["heun"], times["bdia"]
    result.nfe_heun, result.nfe_bdia = last["heun"][1], last["bdia"][1]
    if row.config.compile is not None:
        result.recompiles = compile_counters()["graphs"] - after_warm["graphs"]
        if after_warm["graphs"] > before["graphs"]:
            result.note = f"{after_warm['graphs'] - before['graphs']} graph(s) in BDIA's warm-up"
    return result


def measure_round_trip(ctx: Context, state: torch.dtype) -> RoundTrip:
    """bdia(heun, GAMMA) forward with return_pair, then invert, on an eager bf16 network.

    Exact means the recovered noise's high word equals the start bit for bit, as
    ``bdia.invert`` promises; its low word (the part below the state dtype's precision that
    BDIA carries, zero at the start) is reported apart, relative to the largest start entry.
    cuDNN is asked for deterministic algorithms here: the inversion re-evaluates the network
    at the forward pass's inputs and is exact only if those give the same outputs.
    """
    result = RoundTrip(str(state).removeprefix("torch."), ctx.trip_batch)
    set_precision("bf16")
    net = prepare_network(ctx.net0, Config("bf16", "bf16", ctx.trip_batch))
    ts = karras_grid(ctx.steps)
    x0, _, cond = network_inputs(net, ctx.trip_batch, float(ts[0]), ctx.device, state)
    ode = make_ode(net, cond)
    solver = bdia("heun", GAMMA)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        with torch.no_grad():
            pair = sample(ode, solver, x0, ts, return_pair=True, progress=False)
            back = invert(ode, solver, pair, ts, progress=False)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    result.nfe = ode.nfe
    result.error = relative_difference(back.earlier, x0)
    result.exact = bool(torch.equal(back.earlier, x0))
    low = back.earlier_low
    result.low = 0.0 if low is None else float(low.abs().max() / x0.abs().max())
    return result


def failure(exc: BaseException) -> str:
    """A one-line note for a failed step, safe inside a Markdown table."""
    text = " ".join(f"failed: {exc!r}".split()).replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------ report
def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "not met")


def targets(
    rows: Sequence[Row], overhead: Overhead | None, trips: Sequence[RoundTrip]
) -> list[tuple[str, str, bool | None]]:
    """(target, measured value, met: True / False / None when not measured) for each target."""
    done = [r for r in rows if r.measured]
    out: list[tuple[str, str, bool | None]] = []

    bf16 = [
        r
        for r in done
        if (r.config.precision, r.config.batch, r.nfe_lib) == ("bf16", TARGET_BATCH, TARGET_NFE)
    ]
    best = max(bf16, key=Row.images_s, default=None)
    out.append(
        (
            f"bf16 >= {TARGET_BF16_IMAGES_S:.0f} images/s (library, batch {TARGET_BATCH}, "
            f"{TARGET_NFE} NFE)",
            f"no bf16 row at batch {TARGET_BATCH}, {TARGET_NFE} NFE"
            if best is None
            else f"{best.images_s():.1f} ({best.config.name})",
            None if best is None else best.images_s() >= TARGET_BF16_IMAGES_S,
        )
    )

    worst = max(done, key=lambda r: r.ratio, default=None)
    out.append(
        (
            f"library / reference time <= {TARGET_RATIO} in every row (best runs)",
            "no row measured"
            if worst is None
            else f"worst {worst.ratio:.3f} ({worst.config.name})",
            None if worst is None else worst.ratio <= TARGET_RATIO,
        )
    )

    measured = overhead is not None and overhead.measured
    out.append(
        (
            f"bdia(heun, {GAMMA}) / heun time per NFE <= {TARGET_RATIO} (fastest half row)",
            f"{overhead.per_nfe:.3f} ({overhead.row})" if measured else "not measured",
            overhead.per_nfe <= TARGET_RATIO if measured else None,
        )
    )

    slowest = max(
        (r for r in rows if r.compile_s is not None), key=lambda r: r.compile_s, default=None
    )
    out.append(
        (
            f"compile < {TARGET_COMPILE_S:.0f} s per compiled configuration",
            "no compiled row"
            if slowest is None
            else f"longest {slowest.compile_s:.1f} s ({slowest.config.name})",
            None if slowest is None else slowest.compile_s < TARGET_COMPILE_S,
        )
    )

    trip = next((t for t in trips if t.state == "float64" and t.exact is not None), None)
    out.append(
        (
            "round trip bit-exact in float64 state (bf16 network)",
            "not measured" if trip is None else f"relative error {trip.error:.3g}",
            None if trip is None else trip.exact,
        )
    )
    return out


def render_splits(rows: Sequence[Row]) -> list[str]:
    """The section on where the time of a row that missed the ratio target goes."""
    lines = [
        "",
        "## Where the time goes",
        "",
        f"For each row whose library/reference ratio is above {TARGET_RATIO} (every row in a "
        "smoke run), one more run of each sampler with each network call between two marks "
        "(CUDA events on the device's time line; clock readings on the CPU): milliseconds of "
        "the run in all, before the first call starts (the sampler's checks, the device idle), "
        "inside the calls, between them (the sampler's arithmetic, and any wait for the host "
        "to launch work), and after the last call ends.",
        "",
    ]
    split = [r for r in rows if r.split]
    if not split:
        return lines + ["No row split (none was measured above the target)."]
    lines += [
        "| row | sampler | total ms | before ms | network ms | between ms | after ms | calls |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in split:
        assert r.split is not None
        for which, label in (("lib", "library"), ("ref", "reference")):
            t = r.split[which]
            ms = [t.total, t.before, t.network, t.between, t.after]
            cells = [r.config.name, label, *(f"{1e3 * v:.2f}" for v in ms), str(t.calls)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(
    facts: dict[str, str],
    rows: Sequence[Row],
    overhead: Overhead | None,
    trips: Sequence[RoundTrip],
    gflop: float,
    card: str,
    notes: Sequence[str] = (),
) -> str:
    """The report as Markdown: what was measured, the targets, the rows, BDIA, round trip."""
    peaks, practical = peaks_for(card)
    lines = [
        f"# GPU check: {card}",
        "",
        "What this measures (benchmarks/gpu_check.py): the library's sampling speed on a "
        "random-weight network against EDM's deterministic Heun sampler (Karras et al. 2022, "
        "Algorithm 1, no churn) written as a plain loop, the same network object and noise, "
        "the two timed alternately (best and median of the runs); TFLOP/s from FLOPs counted "
        "with torch.utils.flop_counter.FlopCounterMode; bdia(heun, 0.96) against heun per "
        "network evaluation; and the exactness of bdia(heun, 0.96)'s round trip "
        "(sample with return_pair=True, then invert) with a bf16 network. Half-precision rows "
        "set net.compute_dtype (weights stay float32, cast per layer per call; the "
        "preconditioner, skip path and embeddings stay float32); only the network is "
        "compiled (bdia.models.compile_network), never the sampler. The sampler state is "
        "float32 in the speed rows.",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    for target, measured, met in targets(rows, overhead, trips):
        lines.append(f"| {target} | {measured} | {_verdict(met)} |")

    practical_col = f"% of {practical:.0f}" if practical else "% of practical"
    header = [
        "row",
        "batch",
        "NFE",
        "images/s",
        "TFLOP/s",
        "% of dense peak",
        practical_col,
        "reference images/s",
        "reference TFLOP/s",
        "ratio",
        "ratio (median)",
        "peak GiB",
        "compile s",
        "recompiles",
        "difference",
        "runs",
        "note",
    ]
    lines += [
        "",
        "## Sampling speed",
        "",
        "images/s and TFLOP/s: best run of the library (and of the reference); ratio: library "
        "time over the reference's, best runs and medians; % of dense peak: of the card's "
        "datasheet peak for the row's precision"
        + (f"; {practical_col}: of the practical half-precision figure" if practical else "")
        + "; peak GiB: allocated during the row beyond what earlier rows hold; difference: "
        "relative L2 distance of the library's images from the reference's; recompiles: "
        "graphs compiled after the first call.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if h in ("row", "note") else "---:" for h in header) + "|",
    ]
    for r in rows:
        c = r.config
        if not r.measured:
            cells = [c.name, str(c.batch)] + ["-"] * (len(header) - 4) + ["0", r.note]
            cells[header.index("compile s")] = _f(r.compile_s, ".1f")
            lines.append("| " + " | ".join(cells) + " |")
            continue

        def tflops(which: str, r: Row = r) -> float:
            return r.images_s(which) * r.nfe_lib * gflop / 1e3

        peak = peaks.get(c.precision)
        half = practical if c.precision in HALF else None
        recompiles = "n/a" if r.recompiles is None else str(r.recompiles)
        if r.graphs is not None:
            recompiles += f" (first call: {r.graphs} graph{'s' if r.graphs != 1 else ''}"
            recompiles += (
                f"; CUDA graphs skipped {r.cudagraph_skips}x)" if r.cudagraph_skips else ")"
            )
        cells = [
            c.name,
            str(c.batch),
            str(r.nfe_lib) if r.nfe_lib == r.nfe_ref else f"{r.nfe_lib}/{r.nfe_ref}",
            f"{r.images_s():.2f}",
            _f(tflops("lib"), ".4g"),
            _f(100 * tflops("lib") / peak if peak else None, ".1f"),
            _f(100 * tflops("lib") / half if half else None, ".1f"),
            f"{r.images_s('ref'):.2f}",
            _f(tflops("ref"), ".4g"),
            f"{r.ratio:.3f}",
            f"{r.ratio_median:.3f}",
            _f(r.peak_bytes / 2**30 if r.peak_bytes is not None else None, ".2f"),
            _f(r.compile_s, ".1f"),
            recompiles,
            _f(r.difference, ".2e"),
            str(len(r.lib)),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")

    lines += render_splits(rows)
    lines += ["", f"## bdia(heun, {GAMMA}) against heun", ""]
    if overhead is not None and overhead.measured:
        recompiles = "n/a" if overhead.recompiles is None else str(overhead.recompiles)
        lines += [
            "| row | batch | NFE heun | NFE bdia | per-NFE ratio | per-NFE ratio (median) | "
            "runs | recompiles | note |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {overhead.row} | {overhead.batch} | {overhead.nfe_heun} | {overhead.nfe_bdia} | "
            f"{overhead.per_nfe:.3f} | {overhead.per_nfe_median:.3f} | {len(overhead.heun)} | "
            f"{recompiles} | {overhead.note} |",
        ]
    else:
        lines.append(f"Not measured: {overhead.note if overhead else 'no half-precision row'}.")

    lines += [
        "",
        f"## Round trip of bdia(heun, {GAMMA}), bf16 network",
        "",
        "relative error: of the recovered noise's high word from the start; bit-exact: the "
        "two equal, bit for bit; low word: the largest entry of the low word the recovered "
        "state carries, relative to the largest start entry (cuDNN in deterministic mode).",
        "",
        "| state | batch | NFE | relative error | bit-exact | low word | note |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for t in trips:
        exact = "n/a" if t.exact is None else ("yes" if t.exact else "no")
        error = "-" if t.error is None else f"{t.error:.3e}"
        low = "-" if t.low is None else f"{t.low:.2e}"
        lines.append(
            f"| {t.state} | {t.batch} | {t.nfe or '-'} | {error} | {exact} | {low} | {t.note} |"
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main
def seconds(text: str) -> float:
    value = float(text)
    # A NaN budget would reach setitimer only after the card is set up, and fail there.
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny network (also without CUDA)")
    p.add_argument(
        "--batch", type=positive_int, default=512, help="batch of the half-precision rows"
    )
    p.add_argument(
        "--fp32-batch", type=positive_int, default=64, help="batch of the fp32 and tf32 rows"
    )
    p.add_argument("--round-trip-batch", type=positive_int, default=64)
    p.add_argument(
        "--steps", type=positive_int, default=18, help="karras_grid steps (18: 35 NFE Heun)"
    )
    p.add_argument(
        "--repeats", type=positive_int, default=2, help="timed runs of each sampler per row"
    )
    p.add_argument("--budget", type=seconds, default=270.0, help="seconds, after the imports")
    p.add_argument("--out", default=None, help=f"the report (on CUDA by default {DEFAULT_OUT})")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument(
        "--compile-backend", default=None, help="default: inductor; with --smoke aot_eager"
    )
    return p.parse_args(argv)


def first_rows(batch: int, fp32_batch: int, compiled: dict[str, Any] | None) -> list[Config]:
    """Eager rows, then the half-precision ones compiled in the default mode."""
    rows = [
        Config("fp32", "fp32", fp32_batch),
        Config("tf32", "tf32", fp32_batch),
        Config("bf16", "bf16", batch),
        Config("fp16", "fp16", batch),
    ]
    if compiled is not None:
        rows += [
            Config("bf16 +compile", "bf16", batch, compiled),
            Config("fp16 +compile", "fp16", batch, compiled),
        ]
    return rows


def extra_rows(
    batch: int, compiled: dict[str, Any] | None, cudagraphs: dict[str, Any] | None
) -> list[Config]:
    """Compiled bf16 with CUDA graphs, then with channels_last: bf16, the precision the
    speed target names (fp16 compiled ran within 0.3% of it on an H200, either side). CUDA
    graphs first: with the launches gone the sampler's own work weighs most there."""
    if compiled is None or cudagraphs is None:
        return []
    return [
        Config("bf16 +compile reduce-overhead", "bf16", batch, cudagraphs),
        Config("bf16 +compile +channels_last", "bf16", batch, compiled, channels_last=True),
    ]


class Check:
    """The steps in order, each planned against the budget, caught if it fails, and the
    report rewritten after each."""

    def __init__(self, ctx: Context, facts: dict[str, str], card: str, out: Path | None) -> None:
        self.ctx, self.facts, self.card, self.out = ctx, facts, card, out
        self.gflop = math.nan
        self.rows: list[Row] = []
        self.overhead: Overhead | None = None
        self.trips: list[RoundTrip] = []
        self.notes: list[str] = []

    def report(self, final: bool = False) -> str:
        self.facts["elapsed"] = f"{elapsed():.0f} s" + ("" if final else " (in progress)")
        text = render(
            self.facts, self.rows, self.overhead, self.trips, self.gflop, self.card, self.notes
        )
        if self.out is not None:
            write_atomic(self.out, text)
        return text

    def fits(self, planned: float, reserve: float = 0.0) -> bool:
        return planned + reserve <= self.ctx.left()

    def row(self, config: Config) -> None:
        ctx = self.ctx
        reserve = ctx.final_s()
        repeats = ctx.repeats if self.fits(ctx.row_s(config, ctx.repeats), reserve) else 1
        planned = ctx.row_s(config, repeats)
        if not self.fits(planned, reserve):
            note = f"skipped: planned {planned:.0f} s + {reserve:.0f} s, {ctx.left():.0f} s left"
            self.rows.append(Row(config, note=note))
            log(f"{config.name}: {note}")
            return
        log(f"{config.name}: batch {config.batch}, {repeats} run(s) of each sampler")
        try:
            row = measure_row(ctx, config, repeats, reserve)
        except (Exception, Deadline) as exc:
            row = Row(config, note=failure(exc))
            log(f"{config.name}: {row.note}")
        else:
            if repeats < ctx.repeats and not row.note:
                row.note = f"{repeats} run(s) only (budget)"
            ctx.rates[config.precision] = row.rate()
            if row.compile_s is not None:
                # The longest so far: a later compile may reuse kernels an earlier one built.
                ctx.compile_s = max(ctx.compile_s, row.compile_s)
            log(
                f"{config.name}: {row.images_s():.1f} images/s, library/reference "
                f"{row.ratio:.3f}, {row.nfe_lib} NFE"
            )
        self.rows.append(row)
        self.report()

    def bdia_overhead(self) -> None:
        ctx = self.ctx
        if ctx.kept is None:
            self.overhead = Overhead("-", note="no half-precision row measured")
            return
        name = ctx.kept[0].config.name
        trips = 2 * ctx.round_trip_s()
        repeats = ctx.repeats if self.fits(ctx.overhead_s(ctx.repeats), trips) else 1
        try:
            if not self.fits(ctx.overhead_s(repeats), trips):
                self.overhead = Overhead(name, note=f"skipped: {ctx.left():.0f} s left")
                return
            log(f"bdia(heun, {GAMMA}) against heun on {name}: {repeats} run(s) of each")
            self.overhead = measure_overhead(ctx, repeats)
            log(f"bdia / heun per NFE: {self.overhead.per_nfe:.3f}")
        except (Exception, Deadline) as exc:
            self.overhead = Overhead(name, note=failure(exc))
            log(f"bdia overhead: {self.overhead.note}")
        finally:
            ctx.kept = None  # frees the row's network before the round trips
            self.report()

    def round_trip(self, state: torch.dtype) -> None:
        name = str(state).removeprefix("torch.")
        if not self.fits(self.ctx.round_trip_s()):
            note = f"skipped: {self.ctx.left():.0f} s left"
            self.trips.append(RoundTrip(name, self.ctx.trip_batch, note=note))
            return
        try:
            self.trips.append(measure_round_trip(self.ctx, state))
            log(f"round trip, {name} state: relative error {self.trips[-1].error:.3e}")
        except (Exception, Deadline) as exc:
            self.trips.append(RoundTrip(name, self.ctx.trip_batch, note=failure(exc)))
            log(f"round trip, {name} state: {self.trips[-1].note}")
        self.report()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        device, network, card = torch.device("cpu"), "tiny-cond", "CPU (smoke)"
        batch, fp32_batch, trip_batch, steps = 4, 2, 2, 3
        backend = args.compile_backend or "aot_eager"
        out = Path(args.out) if args.out else None
    else:
        device, network = torch.device("cuda"), "ddpmpp-cond"
        card = torch.cuda.get_device_name(device)
        batch, fp32_batch, trip_batch = args.batch, args.fp32_batch, args.round_trip_batch
        steps = args.steps
        backend = args.compile_backend or "inductor"
        out = Path(args.out) if args.out else DEFAULT_OUT
        # cuDNN picks its fastest convolution per shape, as EDM's sampler lets it; the library
        # and the reference share the choice, and the warm-up pays for it.
        torch.backends.cudnn.benchmark = True
    if args.no_compile:
        compiled = cudagraphs = None
    elif backend == "inductor":
        compiled, cudagraphs = {}, {"mode": "reduce-overhead"}
    else:  # modes are inductor's own; other backends warn and ignore them
        compiled = cudagraphs = {"backend": backend}

    ctx = Context(device, steps, args.repeats, trip_batch, args.budget)
    ctx.split_every_row = smoke
    facts = {
        "device": card,
        "torch": torch.__version__,
        "CUDA": "n/a" if smoke else str(torch.version.cuda),
        "cuDNN": "n/a" if smoke else str(torch.backends.cudnn.version()),
        "network": f"random:{network} (bdia.generate.random_network, seed 0), EDM() schedule",
        "sampler": f"heun on karras_grid({steps}), {ctx.nfe} NFE, float32 state",
        "compile": "off (--no-compile)"
        if compiled is None
        else f"bdia.models.compile_network, backend {backend}",
        "budget": f"{args.budget:.0f} s after the imports; a step that would not fit "
        "(planned from the rates measured so far) is skipped",
        "FLOPs": "not counted",
        "command": shlex.join(
            ["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    check = Check(ctx, facts, card, out)

    def on_alarm(signum: int, frame: object) -> None:
        raise Deadline

    # Past the budget a step in progress is interrupted, so that the report is still written
    # before an outer time limit; the alarm is never closer than the grace, so that even a
    # tiny budget first skips its rows (and says so) before anything is interrupted.
    alarm = hasattr(signal, "setitimer")
    if alarm:
        signal.signal(signal.SIGALRM, on_alarm)
        hard_stop = max(args.budget - elapsed(), 0.0) + HARD_STOP_GRACE_S
        signal.setitimer(signal.ITIMER_REAL, hard_stop)
    try:
        log(f"{card}: building random:{network}")
        net0 = generate.random_network(network)
        check.gflop, how = count_gflop(net0, batch)
        facts["FLOPs"] = (
            f"{check.gflop:.4g} GFLOP per image per evaluation ({how}); "
            f"{check.gflop * batch:.4g} GFLOP per evaluation of a batch of {batch}"
        )
        log(f"FLOPs: {facts['FLOPs']}")
        ctx.net0 = net0.to(device)
        for config in first_rows(batch, fp32_batch, compiled):
            check.row(config)
        done = [r for r in check.rows if r.measured and r.config.compile is not None]
        for config in extra_rows(batch, compiled, cudagraphs):
            if done:
                check.row(config)
            else:  # what failed in the default mode would fail here too, after as long
                check.rows.append(Row(config, note="skipped: no default-mode compiled row ran"))
        check.bdia_overhead()
        for state in (torch.float32, torch.float64):
            check.round_trip(state)
    except Deadline:
        check.notes.append(f"stopped at the hard deadline (budget + {HARD_STOP_GRACE_S:.0f} s)")
        log(check.notes[-1])
    except Exception as exc:  # outside any step (building the network, say): still report
        check.notes.append(f"stopped: {failure(exc)}")
        log(check.notes[-1])
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
        set_precision("fp32")
    text = check.report(final=True)
    print(text, end="")
    if out is not None:
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
