"""Stable Diffusion's denoising loop with ``BDIAScheduler`` against the same loop with
``DDIMScheduler``: what BDIA's step adds to a pipeline's time on a GPU.

    python benchmarks/scheduler_speed.py                  # CUDA: docs/benchmarks/scheduler_speed.md
    python benchmarks/scheduler_speed.py --smoke --out F  # CPU, tiny unet, seconds

The loop is ``StableDiffusionPipeline``'s: the latents twice (classifier-free guidance at
7.5) through ``scale_model_input`` and the unet, the guidance, then ``step``. The unet is a
random-weight ``UNet2DConditionModel`` of Stable Diffusion 1.5's config (about 860M
parameters) in float16, at 64 x 64 latents (512 x 512 images), with random text embeddings.
The runs alternate between the schedulers and a loop with no step (the unet alone), each run
synchronised; the page gives, for each batch size, each loop's median seconds, its
milliseconds a step, the milliseconds a step the host took to queue it (the loop's return,
before the closing synchronise), and its ratio to DDIM's. A step that reads a tensor back
from the device makes the host wait for the GPU, which then idles while the host queues the
next unet call: the ratio shows it. The whole time less the host's is the work still queued
when the loop returned: about nothing where the host bounds the loop (the GPU waits for each
launch, and a step's own host work, Python and launches, adds to the time), about one unet
call where the GPU does (CUDA's launch queue then holds the host that far ahead).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch
from _args import out_or_default, positive_int  # the benchmarks folder is the script's path
from diffusers import DDIMScheduler, UNet2DConditionModel
from gpu_check import sync
from torch import Tensor

from bdia._files import write_atomic
from bdia.integrations.diffusers import BDIAScheduler

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "scheduler_speed.md"
GUIDANCE = 7.5
TEXT_TOKENS = 77

# Stable Diffusion 1.5's unet and noise table.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=8,
    attention_head_dim=2,
    norm_num_groups=4,
)
SD15_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def denoise(
    scheduler: DDIMScheduler | BDIAScheduler | None,
    unet: UNet2DConditionModel,
    timesteps_from: DDIMScheduler | BDIAScheduler,
    noise: Tensor,
    text: Tensor,
    steps: int,
) -> Tensor:
    """The pipeline's loop from ``noise``; with ``scheduler`` None, no step (the unet alone,
    on ``timesteps_from``'s timesteps)."""
    timing = scheduler or timesteps_from
    timing.set_timesteps(steps, device=noise.device)
    x = noise
    for t in timing.timesteps:
        x_in = timing.scale_model_input(torch.cat([x] * 2), t)
        out = unet(x_in, t, encoder_hidden_states=text).sample
        uncond, cond = out.chunk(2)
        out = uncond + GUIDANCE * (cond - uncond)
        if scheduler is not None:
            x = scheduler.step(out, t, x).prev_sample
    return x


def timed(run: Callable[[], Tensor], device: torch.device) -> tuple[float, float]:
    """Seconds of one synchronised run of ``run``, and of the host's part: until ``run``
    returned, its work queued (on the CPU, where nothing is queued, the two agree)."""
    sync(device)
    start = time.perf_counter()
    x = run()
    queued = time.perf_counter() - start
    sync(device)
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(x).all()):
        raise SystemExit("a run ended with non-finite latents")
    return seconds, queued


def table(rows: dict[str, list[tuple[float, float]]], steps: int) -> list[str]:
    """One batch size's table: each loop's median whole and host seconds over its runs."""
    ddim = statistics.median(whole for whole, _ in rows["DDIMScheduler"])
    lines = [
        "| loop | runs | median (s) | ms / step | host ms / step | / DDIM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in rows.items():
        median = statistics.median(whole for whole, _ in runs)
        host = statistics.median(queued for _, queued in runs)
        lines.append(
            f"| {name} | {len(runs)} | {median:.4f} | {1000 * median / steps:.2f} | "
            f"{1000 * host / steps:.2f} | {median / ddim:.3f} |"
        )
    return lines


def page(tables: dict[int, list[str]], setting: str, command: str) -> str:
    lines = ["# BDIAScheduler's speed in a pipeline's loop", "", setting]
    for batch, rows in tables.items():
        lines += ["", f"## Batch {batch} ({2 * batch} through the unet)", "", *rows]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([*lines, "", f"Written by `{command}` on {stamp}.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny unet, 4 steps")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument(
        "--batch", type=positive_int, nargs="+", default=[4, 16], help="images a run, each size"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs of each loop")
    p.add_argument("--out", type=Path, default=None, help="markdown page to write")
    args = p.parse_args(argv)
    out = out_or_default(p, args, DEFAULT_OUT)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        device, dtype, config, card = torch.device("cpu"), torch.float32, TINY_UNET, "CPU"
        steps, repeats = 4, min(args.repeats, 2)
    else:
        device, dtype, config = torch.device("cuda"), torch.float16, SD15_UNET
        card, steps, repeats = torch.cuda.get_device_name(device), args.steps, args.repeats
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()  # its note on casting a built unet
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).eval()
    size, width = config["sample_size"], config["cross_attention_dim"]
    ddim = DDIMScheduler(**SD15_SCHEDULE)
    bdia_scheduler = BDIAScheduler.from_config(ddim.config, gamma=0.96)
    params = sum(w.numel() for w in unet.parameters())
    setting = (
        f"{card}, torch {torch.__version__}, diffusers {diffusers.__version__}; a random-weight "
        f"UNet2DConditionModel of {params:,} parameters in {str(dtype)[6:]}, latents "
        f"4 x {size} x {size}, guidance {GUIDANCE} (the unet sees twice the batch), {steps} "
        f"steps; each loop run once to warm up, then {repeats} times, alternating."
    )
    command = " ".join(["python benchmarks/scheduler_speed.py", *(argv or sys.argv[1:])])
    tables: dict[int, list[str]] = {}
    for batch in dict.fromkeys(args.batch):
        noise = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
        text = torch.randn(2 * batch, TEXT_TOKENS, width, device=device, dtype=dtype)
        loops = {
            name: functools.partial(denoise, scheduler, unet, ddim, noise, text, steps)
            for name, scheduler in (
                ("DDIMScheduler", ddim),
                ("BDIAScheduler (gamma 0.96)", bdia_scheduler),
                ("unet alone (no step)", None),
            )
        }
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
        with torch.no_grad():
            for run in loops.values():
                timed(run, device)
            for _ in range(repeats):
                for name, run in loops.items():
                    rows[name].append(timed(run, device))
        tables[batch] = table(rows, steps)
    text_page = page(tables, setting, command)
    print(text_page, end="")
    write_atomic(out, text_page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
