"""bdia against diffusers: solver parity and exact round trips on tiny random diffusers models.

Builds small randomly initialised diffusers models from config (nothing is downloaded) and
measures (1) the largest relative difference, over all states, between bdia's solvers on
``from_diffusers``/``diffusers_grid`` and diffusers' own scheduler loops, with float64 UNets
and float64 noise tables (the EDM-preconditioned schedulers have none); (2) exact inversion
under classifier-free guidance; (3) the round trips of ``BDIAScheduler`` in a
``DDIMPipeline`` and of ``edit_image`` on a tiny text-to-image pipeline; then the same for
flow matching, on tiny Stable Diffusion 3 and Flux transformers and pipelines: bdia's Euler
against ``FlowMatchEulerDiscreteScheduler``'s loop as the pipelines run it, in float32 and
float64, the round trip of bdia(euler, 0.96), ``BDIAScheduler`` in
``StableDiffusion3Pipeline`` and ``FluxPipeline``, and ``edit_image`` on an SD3 pipeline.
Writes docs/benchmarks/diffusers.md.

    python benchmarks/diffusers_parity.py            # under half a minute on one core
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

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
from bdia.integrations.diffusers.tiny import (
    FLUX_DEV_SCHEDULER,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_text_to_image_pipeline,
    tiny_unet,
)

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "diffusers.md"
STEPS = 10
BATCH = 2
SD3_GUIDANCE = 7.0  # StableDiffusion3Pipeline's default guidance_scale
EMBEDDED = 3.5  # Flux.1-dev's guidance embedding: FluxPipeline's guidance_scale
TRUE_CFG = 4.0  # FluxPipeline's true_cfg_scale
TOKENS = 16  # 4 x 8 x 8 latents in patches of 2 x 2, for SD3 and Flux alike
PROMPT, NEGATIVE = "a photo of a fox", "a blue painting"  # the flow pipelines' prompts


def float64_tables(scheduler):
    if not hasattr(scheduler, "alphas_cumprod"):  # an EDM-preconditioned one has no table
        return scheduler
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
        ("euler", diffusers.EDMEulerScheduler(), "EDM-preconditioned, Karras, epsilon"),
        (
            "dpm_solver_pp_1",
            diffusers.EDMDPMSolverMultistepScheduler(solver_order=1),
            "EDM-preconditioned, order 1, Karras, epsilon",
        ),
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
    return round_trip(ode, "ddim", noise, diffusers_grid(scheduler, STEPS))


def round_trip(ode, base: str, noise, ts) -> float:
    """Relative error of noise -> sample -> invert with bdia(base, 0.96) on ``ts``."""
    solver = bdia.bdia(base, 0.96)
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


def editing_rows(pipe) -> list[tuple[str, float, float, float]]:
    """``edit_image`` on a tiny pipeline (guidance 7.5): per state dtype, the network's round
    trip in latent space and the VAE's own and the reconstruction's pixel errors."""
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


# ------------------------------------------------------------------------ flow matching


class FlowCase:
    """A flow-matching model as its pipeline runs it: a tiny SD3 or Flux transformer, its
    ``FlowMatchEulerDiscreteScheduler`` config, its conditioning, and the pipeline's guidance,
    timesteps and transformer call."""

    def __init__(self, flux: bool, config: dict, settings: str, embedded=False, true_cfg=False):
        self.flux, self.config, self.settings = flux, config, settings
        self.embedded, self.true_cfg = embedded, true_cfg
        self.model = "`FluxTransformer2DModel`" if flux else "`SD3Transformer2DModel`"
        self.pipeline_name = "`FluxPipeline`" if flux else "`StableDiffusion3Pipeline`"
        if not flux:
            self.guidance = f"CFG {SD3_GUIDANCE:g}"
        else:
            parts = [f"embedded {EMBEDDED:g}"] * embedded + [f"true CFG {TRUE_CFG:g}"] * true_cfg
            self.guidance = ", ".join(parts) or "none"

    def scheduler(self):
        return diffusers.FlowMatchEulerDiscreteScheduler(**self.config)

    def transformer(self, dtype):
        if self.flux:
            return tiny_flux_transformer(guidance_embeds=self.embedded, dtype=dtype)
        return tiny_sd3_transformer(dtype=dtype)

    def noise(self, dtype):
        """The pipeline's starting latents, drawn in float32 (the same values in float64);
        Flux's packed into tokens, (BATCH, 16, 16)."""
        noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        if self.flux:
            noise = FluxPipeline._pack_latents(noise, BATCH, 4, 8, 8)
        return noise.to(dtype)

    def _prompt(self, dtype, negative: bool, pipe):
        """A prompt's embeddings of batch 1 (and Flux's txt_ids): drawn at random (5 tokens,
        Flux's negative prompt 7), or with ``pipe`` its ``encode_prompt`` of PROMPT or
        NEGATIVE (T5 tokens cut at 16)."""
        if pipe is not None:
            text = NEGATIVE if negative else PROMPT
            with torch.no_grad():
                if self.flux:
                    embeds, pooled, ids = pipe.encode_prompt(text, None, max_sequence_length=16)
                    return dict(
                        encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=ids
                    )
                embeds, _, pooled, _ = pipe.encode_prompt(
                    text, None, None, device="cpu", do_classifier_free_guidance=False
                )
            return dict(encoder_hidden_states=embeds, pooled_projections=pooled)
        tokens = 7 if negative and self.flux else 5
        g = torch.Generator().manual_seed(2 if negative else 1)
        prompt = dict(
            encoder_hidden_states=torch.randn(1, tokens, 16, generator=g).to(dtype),
            pooled_projections=torch.randn(1, 8, generator=g).to(dtype),
        )
        if self.flux:
            prompt["txt_ids"] = torch.zeros(tokens, 3, dtype=dtype)
        return prompt

    def cond(self, dtype, pipe=None):
        """``from_diffusers``' conditioning (see ``_prompt``)."""
        cond = self._prompt(dtype, False, pipe)
        if not self.flux:
            negative = self._prompt(dtype, True, pipe)
            return dict(cond, guidance_scale=SD3_GUIDANCE, negative_cond=negative)
        cond["img_ids"] = FluxPipeline._prepare_latent_image_ids(BATCH, 4, 4, "cpu", dtype)
        if self.embedded:
            cond["guidance"] = EMBEDDED
        if self.true_cfg:
            cond.update(guidance_scale=TRUE_CFG, negative_cond=self._prompt(dtype, True, pipe))
        return cond

    def timesteps(self) -> dict:
        """What the pipeline passes to ``set_timesteps`` (mu from TOKENS image tokens and the
        scheduler's config with dynamic shifting; FluxPipeline's own sigmas)."""
        mu = None
        if self.config.get("use_dynamic_shifting"):
            c = self.scheduler().config
            mu = calculate_shift(
                TOKENS, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
            )
        if self.flux:
            return dict(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        return dict(num_inference_steps=STEPS, mu=mu)

    def grid(self, scheduler):
        t = self.timesteps()
        return diffusers_grid(scheduler, STEPS, mu=t["mu"], sigmas=t.get("sigmas"))

    def velocity(self, transformer, cond):
        """The pipeline's guided transformer output at the state ``x`` and timestep ``t``:
        SD3's one call on the batch [negative, positive], Flux's calls with the timestep
        t.to(latents dtype) / 1000, the guidance embedding and true CFG's second call."""

        def batched(prompt, n):
            return (
                prompt["encoder_hidden_states"].expand(n, -1, -1),
                prompt["pooled_projections"].expand(n, -1),
            )

        def sd3(x, t):
            neg, neg_pooled = batched(cond["negative_cond"], len(x))
            embeds, pooled = batched(cond, len(x))
            u, c = transformer(
                hidden_states=torch.cat([x] * 2),
                timestep=t.expand(2 * len(x)),
                encoder_hidden_states=torch.cat([neg, embeds]),
                pooled_projections=torch.cat([neg_pooled, pooled]),
                return_dict=False,
            )[0].chunk(2)
            return u + cond["guidance_scale"] * (c - u)

        def flux(x, t):
            guidance = None
            if self.embedded:
                guidance = torch.full([1], EMBEDDED, dtype=torch.float32).expand(len(x))
            timestep = t.expand(len(x)).to(x.dtype)

            def call(prompt):
                embeds, pooled = batched(prompt, len(x))
                return transformer(
                    hidden_states=x,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=embeds,
                    txt_ids=prompt["txt_ids"],
                    img_ids=cond["img_ids"],
                    return_dict=False,
                )[0]

            out = call(cond)
            if self.true_cfg:
                negative = call(cond["negative_cond"])
                out = negative + cond["guidance_scale"] * (out - negative)
            return out

        return flux if self.flux else sd3

    def pipeline(self, folder: Path):
        """The tiny float32 pipeline of this transformer and scheduler."""
        if self.flux:
            return tiny_flux_pipeline(folder, self.scheduler(), guidance_embeds=self.embedded)
        return tiny_sd3_pipeline(folder, self.scheduler())

    def run_pipeline(self, pipe, noise):
        """The pipeline's latents from ``noise``: BATCH images of PROMPT (NEGATIVE as the
        negative prompt where guided), 16 x 16."""
        options = dict(num_images_per_prompt=BATCH, height=16, width=16)
        if self.flux:
            options.update(guidance_scale=EMBEDDED, max_sequence_length=16)
            if self.true_cfg:
                options.update(negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG)
        else:
            options.update(guidance_scale=SD3_GUIDANCE, negative_prompt=NEGATIVE)
        with torch.no_grad():
            return pipe(
                PROMPT, latents=noise, num_inference_steps=STEPS, output_type="latent", **options
            ).images


FLOW_CASES = [
    FlowCase(False, dict(shift=1.0), "shift 1"),
    FlowCase(False, dict(shift=3.0), "shift 3 (SD3)"),
    FlowCase(False, dict(use_dynamic_shifting=True), f"dynamic shifting, mu of {TOKENS} patches"),
    FlowCase(True, FLUX_DEV_SCHEDULER, "Flux.1-dev", embedded=True),
    FlowCase(True, FLUX_DEV_SCHEDULER, "Flux.1-dev", embedded=True, true_cfg=True),
    FlowCase(True, dict(shift=1.0), "Flux.1-schnell"),
]


@torch.no_grad()
def flow_match_states(velocity, scheduler, noise, timesteps: dict) -> list:
    """``FlowMatchEulerDiscreteScheduler``'s loop, as the SD3 and Flux pipelines run it, on a
    copy of ``scheduler``: every state, the start (``noise`` itself) first."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(**timesteps)
    x, states = noise, [noise]
    for t in s.timesteps:
        x = s.step(velocity(x, t), t, x, return_dict=False)[0]
        states.append(x)
    return states


def flow_parity(case: FlowCase, dtype) -> float:
    """bdia's euler on ``from_diffusers``/``diffusers_grid`` against the pipeline's loop, with
    transformer, state and embeddings in ``dtype``: max relative difference over all states."""
    transformer, cond, noise = case.transformer(dtype), case.cond(dtype), case.noise(dtype)
    scheduler = case.scheduler()
    ode = from_diffusers(transformer, scheduler, **cond)
    with torch.no_grad():
        ours = bdia.sample(
            ode,
            bdia.get_solver("euler"),
            noise,
            case.grid(scheduler),
            trajectory=True,
            progress=False,
        )
    reference = flow_match_states(
        case.velocity(transformer, cond), scheduler, noise, case.timesteps()
    )
    return relative_difference(ours, reference)


def flow_round_trip(case: FlowCase) -> float:
    """bdia(euler, 0.96), float64 transformer and state: noise -> sample -> invert."""
    scheduler = case.scheduler()
    ode = from_diffusers(case.transformer(torch.float64), scheduler, **case.cond(torch.float64))
    return round_trip(ode, "euler", case.noise(torch.float64), case.grid(scheduler))


@torch.no_grad()
def flow_scheduler_round_trip(case: FlowCase, folder: Path, gamma: float = 0.96):
    """The case's pipeline with ``BDIAScheduler`` (float32): the largest difference of its
    latents and ``final_pair.later`` from ``bdia.sample`` on the same noise, and the largest
    error of that noise recovered by the ``BDIAInverseScheduler`` loop from ``final_pair``
    with the pipeline's transformer calls."""
    pipe = case.pipeline(folder)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=gamma)
    noise, cond = case.noise(torch.float32), case.cond(torch.float32, pipe)
    latents = case.run_pipeline(pipe, noise)
    final = pipe.scheduler.final_pair.later
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ours = bdia.sample(
        ode, bdia.bdia("euler", gamma), noise, case.grid(pipe.scheduler), progress=False
    )
    difference = max(float((latents - ours).abs().max()), float((final - ours).abs().max()))
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(**case.timesteps())
    velocity = case.velocity(pipe.transformer, cond)
    x = inverse.begin(pipe.scheduler.final_pair)
    for t in inverse.timesteps:
        x = inverse.step(velocity(x, t), t, x).prev_sample
    return difference, float((inverse.pair.earlier - noise).abs().max())


def editing_table(pipe, network: str = "UNet") -> list[str]:
    """``editing_rows`` as a table, each row printed."""
    lines = [
        f"| state dtype | {network} round trip | VAE | reconstruction |",
        "|---|---:|---:|---:|",
    ]
    for dtype, latent, vae, reconstruction in editing_rows(pipe):
        lines.append(f"| {dtype} | {latent:.1e} | {vae:.4f} | {reconstruction:.4f} |")
        print(lines[-1], flush=True)
    return lines


def flow_table(first: str, columns: list[str], measure) -> list[str]:
    """A table of FLOW_CASES, each row printed: the transformer's or the pipeline's name
    (``first``), the scheduler and the guidance, then the figures ``measure(case)`` returns
    under ``columns``."""
    lines = [
        f"| {first} | scheduler | guidance | {' | '.join(columns)} |",
        "|---|---|---|" + "---:|" * len(columns),
    ]
    for case in FLOW_CASES:
        name = case.pipeline_name if first == "pipeline" else case.model
        figures = " | ".join(f"{x:.1e}" for x in measure(case))
        lines.append(f"| {name} | {case.settings} | {case.guidance} | {figures} |")
        print(lines[-1], flush=True)
    return lines


def flow_lines(folder: Path) -> list[str]:
    """The page's flow-matching part, each measured row printed."""
    lines = [
        "",
        "## Flow matching: Stable Diffusion 3 and Flux",
        "",
        "Tiny random `SD3Transformer2DModel` (4 x 8 x 8 latents in patches of 2 x 2) and "
        "`FluxTransformer2DModel` (the same latents packed into 16 tokens of 16 channels), "
        "`FlowMatchEulerDiscreteScheduler`. SD3 with classifier-free guidance "
        f"{SD3_GUIDANCE:g} (the pipeline's default); Flux.1-dev with its guidance embedding "
        f"{EMBEDDED:g}, alone and with true CFG {TRUE_CFG:g} (`true_cfg_scale`, a negative "
        "prompt); Flux.1-schnell without guidance. Dynamic shifting takes the pipelines' `mu` "
        f"of {TOKENS} image tokens; Flux's grid comes from `FluxPipeline`'s own `sigmas`. See "
        "[diffusers: Stable Diffusion 3](../diffusers.md#stable-diffusion-3-and-flow-matching) "
        "and [Flux](../diffusers.md#flux).",
        "",
        "### Solver parity",
        "",
        "Largest `max|bdia - diffusers| / max|diffusers|` over all states of bdia's `euler` on "
        "`from_diffusers`/`diffusers_grid` against `FlowMatchEulerDiscreteScheduler`'s loop "
        "with the transformer called as the pipeline calls it, on prompt embeddings drawn "
        "at random (5 tokens; Flux's negative prompt 7, with its own `txt_ids`). *float32*: "
        "float32 transformer, state and embeddings; both sides make the same float "
        "operations, and the figure is measured, not assumed. *float64*: the same in "
        "float64; diffusers' `step` casts the sample to float32 and its timesteps "
        "(`sigmas * 1000`) are float32, while bdia stays in float64, so the two differ by "
        "float32 rounding.",
        "",
    ]
    lines += flow_table(
        "transformer",
        ["float32 state", "float64 state"],
        lambda case: (flow_parity(case, torch.float32), flow_parity(case, torch.float64)),
    )
    lines += [
        "",
        "### Exact inversion",
        "",
        "bdia(euler, 0.96) on the same models, embeddings and guidance, float64 transformer "
        "and state, from the noise at sigma = 1 to 0 and back: the relative error of the "
        "recovered noise.",
        "",
    ]
    lines += flow_table("transformer", ["round trip"], lambda case: (flow_round_trip(case),))
    lines += [
        "",
        "### BDIAScheduler in a pipeline",
        "",
        "The tiny float32 pipeline with `pipe.scheduler = "
        "BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)`, run from given noise "
        f'(`latents=`, `output_type="latent"`) on the prompt "{PROMPT}" (where guided, the '
        f'negative prompt "{NEGATIVE}"; T5 tokens cut at 16) through its text encoders, '
        "`bdia.sample` on the pipeline's `encode_prompt` of them. *Latents*: the largest "
        "difference of its latents and `final_pair.later` from "
        "`bdia.sample(from_diffusers(...), bdia(euler, 0.96), ...)` on the same noise; "
        "*recovered noise*: the largest error of the noise that the `BDIAInverseScheduler` "
        "loop, calling the transformer as the pipeline does, recovers from `final_pair`.",
        "",
    ]
    lines += flow_table(
        "pipeline",
        ["latents", "recovered noise"],
        lambda case: flow_scheduler_round_trip(case, folder),
    )
    lines += [
        "",
        "### Editing with Stable Diffusion 3",
        "",
        "`edit_image` on a tiny random `StableDiffusion3Pipeline` (16 x 16 images, guidance "
        f"7.5, {STEPS} steps, shift 3, bdia(euler, 0.96)), the columns as for Stable "
        "Diffusion above. Its VAE is the one above with SD3's `scaling_factor` and "
        "`shift_factor`, so the VAE's error is the same.",
        "",
    ]
    return lines + editing_table(tiny_sd3_pipeline(folder), "transformer")


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
        "`step`), and computes the EDM schedulers' preconditioning from them in float32, so "
        "those agree to float32 rounding; DDIM computes in the table's dtype. "
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
    ]
    with tempfile.TemporaryDirectory() as folder:
        lines += editing_table(tiny_text_to_image_pipeline(folder))
        lines += flow_lines(Path(folder))
    lines += ["", f"Run time: {time.perf_counter() - started:.0f} s on one thread.", ""]
    write_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
