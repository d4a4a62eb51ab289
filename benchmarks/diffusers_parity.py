"""bdia against diffusers: solver parity and exact round trips on tiny random diffusers models.

Builds small randomly initialised diffusers models from config (nothing is downloaded) and
measures (1) the largest relative difference, over all states, between bdia's solvers on
``from_diffusers``/``diffusers_grid`` and diffusers' own scheduler loops, with float64 UNets
and float64 noise tables; (2) exact inversion under classifier-free guidance; (3) the round
trips of ``BDIAScheduler`` in a ``DDIMPipeline`` and of ``edit_image`` on a tiny
text-to-image pipeline. Writes docs/benchmarks/diffusers.md.

    python benchmarks/diffusers_parity.py            # about a minute on one core
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import diffusers
import torch

import bdia
from bdia._files import write_atomic
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.parity import bdia_states, diffusers_states, relative_difference
from bdia.integrations.diffusers.tiny import tiny_text_to_image_pipeline, tiny_unet

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "diffusers.md"
STEPS = 10


def float64_tables(scheduler):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    return scheduler


def parity_rows(unet, noise) -> list[tuple[str, str, str, float]]:
    """(bdia solver, diffusers scheduler, settings, max relative difference) per case."""
    cases = []
    for spacing in ("leading", "trailing"):
        for prediction in ("epsilon", "v_prediction", "sample"):
            cases.append(
                (
                    "ddim",
                    diffusers.DDIMScheduler(
                        clip_sample=False,
                        set_alpha_to_one=True,
                        timestep_spacing=spacing,
                        steps_offset=1 if spacing == "leading" else 0,
                        prediction_type=prediction,
                    ),
                    f"{spacing}, {prediction}",
                )
            )
    cases += [
        ("euler", diffusers.EulerDiscreteScheduler(), "linspace, epsilon"),
        ("euler", diffusers.EulerDiscreteScheduler(use_karras_sigmas=True), "Karras sigmas"),
        ("dpm_solver_pp_1", _dpm(), "order 1, dpmsolver++, linspace"),
    ]
    rows = []
    for (
        solver,
        scheduler,
        settings,
    ) in cases:
        scheduler = float64_tables(scheduler)
        reference = diffusers_states(unet, scheduler, noise, STEPS)
        ours = bdia_states(unet, scheduler, solver, noise, STEPS)
        rows.append(
            (solver, type(scheduler).__name__, settings, relative_difference(ours, reference))
        )
    # Heun: diffusers keeps a predictor state between correctors; compare after each corrector.
    heun = float64_tables(diffusers.HeunDiscreteScheduler())
    reference = diffusers_states(unet, heun, noise, STEPS)
    reference = [reference[0], *reference[2::2], reference[-1]]
    ours = bdia_states(unet, heun, "heun", noise, STEPS)
    rows.append(
        ("heun", "HeunDiscreteScheduler", "linspace, epsilon", relative_difference(ours, reference))
    )
    return rows


def _dpm():
    return diffusers.DPMSolverMultistepScheduler(solver_order=1, algorithm_type="dpmsolver++")


def guided_round_trip(noise) -> float:
    """Relative error of noise -> sample -> invert under CFG (g = 7.5) with bdia(ddim, 0.96)."""
    unet = tiny_unet(conditional=True, cross_attention_dim=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(1, 5, 8, dtype=torch.float64, generator=g)
    uncond = torch.randn(1, 5, 8, dtype=torch.float64, generator=g)
    scheduler = float64_tables(diffusers.DDIMScheduler(clip_sample=False))
    ode = from_diffusers(
        unet,
        scheduler,
        encoder_hidden_states=cond,
        guidance_scale=7.5,
        negative_cond={"encoder_hidden_states": uncond},
    )
    ts = diffusers_grid(scheduler, STEPS)
    solver = bdia.bdia("ddim", 0.96)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts, progress=False)
    return float((back.earlier - noise).abs().max() / noise.abs().max())


@torch.no_grad()
def scheduler_round_trip(gamma: float = 0.96) -> tuple[float, float]:
    """``DDIMPipeline`` with ``BDIAScheduler`` (float32 UNet): the largest difference of its
    final states (before the clamp to images) from ``bdia.sample`` on the same noise, and the
    largest error of the pipeline's noise recovered by the ``BDIAInverseScheduler`` loop from
    ``final_pair``."""
    unet = tiny_unet()
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DDIMPipeline(unet, ddim)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=gamma)
    pipe.set_progress_bar_config(disable=True)
    # "np" (channels last) rather than "pt", which DDIMPipeline takes only from diffusers 0.41.
    images = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=STEPS,
        output_type="np",
    ).images
    images = torch.from_numpy(images).permute(0, 3, 1, 2)
    noise = diffusers.utils.torch_utils.randn_tensor(
        (2, 3, 8, 8), generator=torch.Generator().manual_seed(0)
    )
    ode, ts = from_diffusers(unet, ddim), diffusers_grid(ddim, STEPS)
    ours = bdia.sample(ode, bdia.bdia("ddim", gamma), noise, ts, progress=False)
    # The clamp to [0, 1] images would hide most of the comparison (a random unet's samples
    # lie far outside [-1, 1]): the states the pipeline ended at are compared, and its images
    # with them.
    final = pipe.scheduler.final_pair.later
    difference = max(
        float((final - ours).abs().max()),
        float((images - (final / 2 + 0.5).clamp(0, 1)).abs().max()),
    )
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    x = inverse.begin(pipe.scheduler.final_pair)
    for t in inverse.timesteps:
        x = inverse.step(unet(x, t).sample, t, x).prev_sample
    return difference, float((inverse.pair.earlier - noise).abs().max())


def editing_rows(folder: Path) -> list[tuple[str, float, float, float]]:
    """``edit_image`` on the tiny text-to-image pipeline (guidance 7.5): per state dtype, the
    UNet round trip in latent space and the VAE's own and the reconstruction's pixel errors."""
    pipe = tiny_text_to_image_pipeline(folder)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    rows = []
    for dtype in (torch.float64, torch.float32):
        result = edit_image(
            pipe,
            image,
            "a photo of a cat",
            "a painting of a dog",
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            state_dtype=dtype,
            progress=False,
        )
        rows.append(
            (
                str(dtype).removeprefix("torch."),
                result.latent_error,
                result.vae_error,
                result.reconstruction_error,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # diffusers' schedulers call np.array on tensors, which numpy 2 warns about.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started = time.perf_counter()
    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    unet = tiny_unet(dtype=torch.float64)

    lines = [
        "# bdia and diffusers",
        "",
        "Written by `python benchmarks/diffusers_parity.py`: tiny randomly initialised diffusers "
        f"models built from config, batch 2, {STEPS} inference steps, 1000 training steps.",
        "",
        "## Solver parity",
        "",
        "Largest `max|bdia - diffusers| / max|diffusers|` over all states of the loop; float64 "
        "UNet and float64 `alphas_cumprod`. diffusers keeps the sigmas of Euler, Heun and "
        "DPM-Solver in float32 (and casts the sample to float32 in Euler's and DPM-Solver's "
        "`step`), so those agree to float32 rounding; DDIM computes in the table's dtype. "
        "See [Solvers: conventions that differ from diffusers]"
        "(../solvers.md#conventions-that-differ-from-diffusers).",
        "",
        "| bdia solver | diffusers scheduler | settings | max relative difference |",
        "|---|---|---|---:|",
    ]
    for solver, scheduler, settings, diff in parity_rows(unet, noise):
        lines.append(f"| `{solver}` | `{scheduler}` | {settings} | {diff:.1e} |")
        print(lines[-1], flush=True)
    # Not a parity case: with linspace spacing DDIMScheduler steps to tau - N // n while its
    # next unet call is at the next timestep; bdia's grid steps to the next timestep.
    linspace = float64_tables(
        diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="linspace")
    )
    final = relative_difference(
        bdia_states(unet, linspace, "ddim", noise, STEPS)[-1:],
        diffusers_states(unet, linspace, noise, STEPS)[-1:],
    )
    lines += [
        "",
        f'Not a parity case: with `timestep_spacing="linspace"` the final samples differ by '
        f"{final:.2f} (relative), because `DDIMScheduler` steps from timestep tau to "
        "tau - N // n while its next UNet call is at the next entry of its timesteps; bdia's "
        "grid steps to the timestep it evaluates next.",
    ]
    lines += [
        "",
        "## Exact inversion under guidance",
        "",
        "bdia(ddim, 0.96) on a tiny `UNet2DConditionModel` with classifier-free guidance "
        "(scale 7.5), float64 state: noise -> sample -> invert returns the noise with relative "
        f"error {guided_round_trip(noise):.1e}.",
        "",
    ]
    print(lines[-2], flush=True)
    difference, recovered = scheduler_round_trip()
    lines += [
        "## BDIAScheduler in a pipeline",
        "",
        "`DDIMPipeline` (tiny float32 `UNet2DModel`) with "
        "`pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)`: its "
        "final states (before the clamp to images, which the random UNet's samples mostly "
        "leave) differ from `bdia.sample(from_diffusers(...), bdia(ddim, 0.96), ...)` on the "
        f"same noise by at most {difference:.1e}; the `BDIAInverseScheduler` loop from the "
        "scheduler's `final_pair` returns the pipeline's noise with max abs error "
        f"{recovered:.1e}.",
        "",
        "## Editing with a latent-diffusion pipeline",
        "",
        "`edit_image` on a tiny random `StableDiffusionPipeline` (16 x 16 images, guidance 7.5, "
        f"{STEPS} steps, DDIM with SD 1.5's settings). *UNet round trip*: max relative error "
        "of the reconstructed latents; *VAE*: RMS pixel error of decode(encode(image)), the "
        "VAE's own; *reconstruction*: RMS pixel error of the decoded reconstruction. A random "
        "VAE reconstructs poorly, and the reconstruction inherits exactly that error.",
        "",
        "| state dtype | UNet round trip | VAE | reconstruction |",
        "|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for dtype, latent, vae, reconstruction in editing_rows(Path(folder)):
            lines.append(f"| {dtype} | {latent:.1e} | {vae:.4f} | {reconstruction:.4f} |")
            print(lines[-1], flush=True)
    lines += ["", f"Run time: {time.perf_counter() - started:.0f} s on one thread.", ""]
    write_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
