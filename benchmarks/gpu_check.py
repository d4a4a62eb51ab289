"""One-GPU check: sampling speed, BDIA overhead and round-trip error on random-weight DDPM++.

    bash benchmarks/gpu_check.sh            # one H100, well under 8 minutes
    python benchmarks/gpu_check.py --smoke  # CPU, tiny network, writes nothing under docs/

Throughput is images/s of 35-NFE sampling (EDM's Heun on karras_grid(18)); achieved TFLOP/s
counts ~42 GFLOP per DDPM++ CIFAR-10 evaluation and is compared with the card's nominal peak.
Without a CUDA device the script behaves as ``--smoke``.

Rows: ``fp32`` (TF32 off), ``tf32`` (TF32 matmuls and convolutions) and the half-precision
rows ``bf16`` / ``fp16``, which set ``net.compute_dtype`` to bfloat16 / float16: the
preconditioner, the skip path ``c_skip x + c_out F``, the noise and label embedding and the
attention softmax run in float32, the U-Net's activations in bfloat16 / float16, and the
weights stay float32, each layer casting them per call. The state column is the sampler's
state dtype (the network's input and output are float32).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from bdia import generate
from bdia._files import write_atomic
from bdia.ode import DiffusionODE
from bdia.sampling import invert, sample
from bdia.schedules import EDM, karras_grid
from bdia.solvers import bdia, get_solver

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "gpu.md"
GFLOP_PER_EVAL = 42.0  # DDPM++ cond, 32x32, one forward pass (approximate)
# Nominal dense peaks (TFLOP/s) from NVIDIA's datasheets, H100 SXM; other cards: unknown.
NOMINAL_PEAK = {"H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}}
# Compute dtype of the U-Net per row; the weights stay float32 in every row.
COMPUTE_DTYPE = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(net, mode: str, channels_last: bool, compiled: bool):
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    net = copy.deepcopy(net)
    net.compute_dtype = COMPUTE_DTYPE[mode]
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        net._bdia_channels_last = True
    if compiled:
        if hasattr(net, "model"):
            net.model = torch.compile(net.model)
        else:
            net = torch.compile(net)
    return net


def _ode(net, batch: int, device) -> DiffusionODE:
    label_dim = getattr(net, "label_dim", 0)
    labels = torch.arange(batch, device=device) % max(label_dim, 1)
    cond = {"class_labels": torch.eye(label_dim, device=device)[labels]} if label_dim else {}
    # The preconditioner takes and returns float32 in every row; half precision is applied
    # inside it, through net.compute_dtype.
    return DiffusionODE(net, EDM(), cond=cond, model_dtype=torch.float32)


def _noise(net, batch: int, ts, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    return (float(ts[0]) * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


def time_sampling(net, solver, ts, batch, device, state_dtype, repeats: int) -> tuple[float, int]:
    """Seconds per sampling run (best of ``repeats`` after one warm-up) and its NFE."""
    ode = _ode(net, batch, device)
    x = _noise(net, batch, ts, device, state_dtype)
    if getattr(net, "_bdia_channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            ode.reset_nfe()
            _sync(device)
            t0 = time.perf_counter()
            sample(ode, solver, x, ts, progress=False)
            _sync(device)
            if i > 0 or repeats == 0:
                best = min(best, time.perf_counter() - t0)
    return best, ode.nfe


def round_trip_error(net, ts, batch, device, state_dtype) -> float:
    solver = bdia("heun", 0.96)
    ode = _ode(net, batch, device)
    x0 = _noise(net, batch, ts, device, state_dtype)
    with torch.no_grad():
        pair = sample(ode, solver, x0, ts, return_pair=True, progress=False)
        back = invert(ode, solver, pair, ts, progress=False)
    err = (back.earlier.double() - x0.double()).norm() / x0.double().norm()
    return float(err)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=18, help="karras_grid steps (18: 35 NFE Heun)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per row after a warm-up")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny network; writes no file")
    args = p.parse_args(argv)

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        device = torch.device("cpu")
        net0 = generate.random_network("tiny-cond")
        batch, steps, repeats, use_compile = 4, 3, 0, False
        card = "CPU (smoke)"
    else:
        device = torch.device("cuda")
        net0 = generate.random_network("ddpmpp-cond")
        batch, steps, repeats = args.batch, args.steps, args.repeats
        use_compile = not args.no_compile
        card = torch.cuda.get_device_name(device)
    ts = karras_grid(steps)
    heun = get_solver("heun")
    peaks = next((v for k, v in NOMINAL_PEAK.items() if k in card), {})

    rows = []  # (config, state, images/s, nfe, TFLOP/s)

    def run(mode, state, channels_last=False, compiled=False):
        net = _setup(net0.to(device), mode, channels_last, compiled)
        sec, nfe = time_sampling(net, heun, ts, batch, device, state, repeats)
        ips = batch / sec
        tflops = ips * nfe * GFLOP_PER_EVAL / 1e3
        label = (
            mode + (" +channels_last" if channels_last else "") + (" +compile" if compiled else "")
        )
        rows.append((label, str(state).replace("torch.", ""), ips, nfe, tflops, mode))
        print(
            f"{label} state {state}: {ips:.1f} img/s, {tflops:.1f} TFLOP/s",
            file=sys.stderr,
            flush=True,
        )
        return ips

    for mode in ("fp32", "tf32", "bf16", "fp16"):
        for state in (torch.float32, torch.float64):
            run(mode, state)
    fastest = max(rows, key=lambda r: r[2])
    best_mode = fastest[5]
    best_state = torch.float32 if fastest[1] == "float32" else torch.float64
    run(best_mode, best_state, channels_last=True)
    if use_compile:
        try:
            run(best_mode, best_state, channels_last=True, compiled=True)
        except Exception as exc:  # report, do not lose the rest of the check
            print(f"torch.compile failed: {exc!r}", file=sys.stderr)

    # BDIA overhead: bdia(heun, 0.96) over heun, same network, dtype and state.
    net = _setup(net0.to(device), best_mode, False, False)
    t_heun, _ = time_sampling(net, heun, ts, batch, device, best_state, repeats)
    t_bdia, nfe_bdia = time_sampling(
        net, bdia("heun", 0.96), ts, batch, device, best_state, repeats
    )
    ratio = t_bdia / t_heun

    # Round trip in fp32 network (no TF32) with float32 and float64 state.
    net = _setup(net0.to(device), "fp32", False, False)
    rt_batch = min(batch, 64)  # a relative error needs no large batch; saves fp32 time
    errors = {
        s: round_trip_error(net, ts, rt_batch, device, s) for s in (torch.float32, torch.float64)
    }
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    lines = [
        f"# GPU check: {card}",
        "",
        f"Random-weight {'tiny-cond' if smoke else 'DDPM++ cond'} network, batch {batch}, "
        f"Heun on karras_grid({steps}) ({rows[0][3]} NFE). TFLOP/s assumes "
        f"{GFLOP_PER_EVAL:.0f} GFLOP per evaluation; peaks are nominal datasheet values "
        "(H100 SXM dense: BF16 and FP16 ~989, TF32 ~494, FP32 ~67 TFLOP/s). In the bf16 and "
        "fp16 rows the U-Net runs in bfloat16 / float16 (net.compute_dtype) while the "
        "preconditioner, the skip path and the noise embedding stay float32 and the float32 "
        "weights are cast per layer per call; the state column is the sampler state's dtype."
        + (
            " Smoke run: the TFLOP/s column is not meaningful for the tiny network."
            if smoke
            else ""
        ),
        "",
        "| network | state | images/s | NFE | TFLOP/s | % of nominal peak |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, state, ips, nfe, tflops, mode in rows:
        peak = peaks.get(mode)
        pct = f"{100 * tflops / peak:.1f}" if peak else "n/a"
        lines.append(f"| {label} | {state} | {ips:.2f} | {nfe} | {tflops:.2f} | {pct} |")
    lines += [
        "",
        f"bdia(heun, 0.96) / heun time ratio ({best_mode}, {fastest[1]} state, "
        f"{nfe_bdia} NFE): {ratio:.3f}",
        "",
        f"| round trip (bdia(heun, 0.96), fp32 network, batch {rt_batch}) | relative error |",
        "|---|---:|",
    ]
    for s, err in errors.items():
        lines.append(f"| {str(s).replace('torch.', '')} state | {err:.3e} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if not smoke:
        write_atomic(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
