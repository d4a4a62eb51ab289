"""What a ``from_diffusers`` ODE's fingerprint costs on a real-size unet.

``bdia.sample`` and ``bdia.invert`` take one fingerprint per call, so that a pair continued
or inverted under another vector field warns. For a diffusers unet the fingerprint digests
the class and a sample of each parameter and buffer, and the settings the model reports
from ``fingerprint_state()`` (attention processors' IP-Adapter scale, peft LoRA layers'
state, FreeU's factors, the adapter's own timestep rule). This script builds Stable
Diffusion 1.5's unet from its config with random weights (nothing downloaded), and times,
over ``--repeats`` calls each, the whole fingerprint and the settings walk alone: for the
plain unet, and, where peft is installed, with a LoRA of rank 4 on the attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``). Medians in milliseconds, one torch thread.

Run from the repository root::

    python benchmarks/fingerprint.py            # writes docs/benchmarks/fingerprint.md
    python benchmarks/fingerprint.py --smoke --out /tmp/fingerprint.md   # a tiny unet

The markdown table is printed to stdout and written atomically to ``--out``. The full run
builds an 860 M-parameter unet (3.4 GB in float32) and takes about a minute.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _args import out_or_default, positive_int
from overhead import cpu_name

from bdia._files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "fingerprint.md"
# Stable Diffusion 1.5's UNet2DConditionModel config (the fields that differ from the
# class's defaults).
SD15 = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_unet(smoke: bool) -> torch.nn.Module:
    """SD 1.5's unet from its config with random weights, or the suite's tiny one."""
    if smoke:
        from bdia.integrations.diffusers.tiny import tiny_unet

        return tiny_unet(conditional=True)
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**SD15).eval()


def median_ms(call: Any, repeats: int) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls, after one warm-up, in ms."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(unet: torch.nn.Module, repeats: int) -> dict[str, Any]:
    """The unet's size and the medians of its ODE's fingerprint and settings walk."""
    import diffusers

    from bdia.integrations.diffusers import from_diffusers

    # A prompt's embeddings (77 tokens), digested as conditioning as a real run's are.
    embeds = torch.zeros(1, 77, unet.config.cross_attention_dim)
    ode = from_diffusers(unet, diffusers.EulerDiscreteScheduler(), encoder_hidden_states=embeds)
    return {
        "parameters": sum(p.numel() for p in unet.parameters()),
        "tensors": len(list(unet.parameters())) + len(list(unet.buffers())),
        "modules": len(list(unet.modules())),
        "fingerprint": median_ms(ode.fingerprint, repeats),
        "settings": median_ms(ode.f.fingerprint_state, repeats),
    }


def with_lora(unet: torch.nn.Module) -> torch.nn.Module | None:
    """``unet`` with a rank-4 LoRA on its attention projections, or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    return unet


def report(rows: list[tuple[str, dict[str, Any]]], command: str, repeats: int) -> str:
    lines = [
        "# Fingerprint cost",
        "",
        f"Written by `{command}` on {cpu_name()}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, one thread; medians of {repeats} calls after one "
        "warm-up. A fingerprint is taken once per `bdia.sample` or `bdia.invert` call.",
        "",
        "| unet | parameters | tensors | modules | fingerprint (ms) | of which settings (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['parameters']:,} | {m['tensors']} | {m['modules']} | "
            f"{m['fingerprint']:.1f} | {m['settings']:.1f} |"
        )
    if len(rows) == 1:
        lines += ["", "peft is not installed: no LoRA row."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--smoke", action="store_true", help="the suite's tiny unet")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = out_or_default(parser, args, DEFAULT_OUT)
    torch.set_num_threads(1)
    unet = build_unet(args.smoke)
    name = "tiny" if args.smoke else "SD 1.5 (random weights)"
    rows = [(name, measure(unet, args.repeats))]
    lora = with_lora(unet)
    if lora is not None:
        rows.append((f"{name} + LoRA rank 4", measure(lora, args.repeats)))
    given = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    text = report(rows, f"python benchmarks/fingerprint.py {given}".strip(), args.repeats)
    print(text, end="")
    write_atomic(out, text)


if __name__ == "__main__":
    main()
