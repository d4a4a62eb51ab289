"""SDXL's ensemble of expert denoisers in bdia.integrations.diffusers: the base
(``StableDiffusionXLPipeline(denoising_end=f)``) and the refiner
(``StableDiffusionXLImg2ImgPipeline(denoising_start=f)`` on the base's latents) on the parts
of the grid that ``diffusers_grid(..., denoising_end=f)`` and ``denoising_start=f`` give,
BDIAScheduler in both and its inversion across them, and the refusals.

Tiny random pipelines (``tiny_sdxl_pipeline`` and ``tiny_sdxl_refiner_pipeline``: the
refiner's own unet with the aesthetic score in its added conditioning, the base's second text
encoder). A pipeline's DDIM step and bdia's ``ddim`` are the same update written in two ways,
so runs agree to rounding (float64 pipelines: below 1e-12 relative); BDIAScheduler's runs are
``bdia.sample``'s bit for bit, and its inversion is exact.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import float64_text_encoders

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    SD_NOISE_TABLE,
    tiny_sdxl_pipeline,
    tiny_sdxl_refiner_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 10
PROMPT = "a photo of a cat"
GUIDANCE = 7.5
GAMMA = 0.9
# SDXL's micro-conditioning of 16 x 16 images: original size, crop, target size (base);
# original size, crop and aesthetic score, 6 and for the negative branch 2.5 (refiner).
BASE_TIME_IDS = [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
REFINER_TIME_IDS = [[16.0, 16.0, 0.0, 0.0, 6.0]]
REFINER_NEGATIVE_TIME_IDS = [[16.0, 16.0, 0.0, 0.0, 2.5]]


def _branches(pipe, refiner):
    """The unet arguments of the conditional and unconditional branches, as the pipeline
    makes them for PROMPT and no negative prompt."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=True
    )
    ids = REFINER_TIME_IDS if refiner else BASE_TIME_IDS
    negative_ids = REFINER_NEGATIVE_TIME_IDS if refiner else BASE_TIME_IDS
    return (
        {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": torch.tensor(ids, dtype=embeds.dtype),
            },
        },
        {
            "encoder_hidden_states": negative,
            "added_cond_kwargs": {
                "text_embeds": negative_pooled,
                "time_ids": torch.tensor(negative_ids, dtype=embeds.dtype),
            },
        },
    )


def _ode(pipe, refiner):
    cond, negative = _branches(pipe, refiner)
    return from_diffusers(
        pipe.unet, pipe.scheduler, guidance_scale=GUIDANCE, negative_cond=negative, **cond
    )


def _pipes(tmp_path, dtype=torch.float32, scheduler=None):
    """The base and the refiner, each with its own scheduler from the factory ``scheduler``
    (by default the tiny pipelines' DDIM), in ``dtype``."""
    base = tiny_sdxl_pipeline(tmp_path, scheduler and scheduler())
    refiner = tiny_sdxl_refiner_pipeline(tmp_path, scheduler and scheduler())
    if dtype == torch.float64:
        for pipe in (base, refiner):
            pipe.to(torch.float64)
            float64_text_encoders(pipe)
            sched = pipe.scheduler
            sched.alphas_cumprod = sched.alphas_cumprod.double()
            sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return base, refiner


def _noise(dtype=torch.float32):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


@torch.no_grad()
def _base(pipe, noise, fraction):
    return pipe(
        PROMPT,
        height=16,
        width=16,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=noise,
        denoising_end=fraction,
        output_type="latent",
    ).images


@torch.no_grad()
def _refine(pipe, latents, fraction, **cut):
    return pipe(
        PROMPT,
        image=latents,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        denoising_start=fraction,
        output_type="latent",
        **cut,
    ).images


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("fraction", [0.8, 0.55])
def test_ddim_is_each_part_of_the_ensemble_to_float64_rounding(tmp_path, fraction):
    """bdia's 'ddim' on from_diffusers and diffusers_grid(..., denoising_end=f) is the base
    pipeline's DDIM run cut at f, and on the refiner's unet and diffusers_grid(...,
    denoising_start=f), from the base's latents, the refiner's run, under guidance 7.5, the
    pipelines in float64 (their schedulers' tables too): below 1e-12 relative (measured: up to
    9.1e-16, float64 rounding of two ways of writing DDIM's step; 0 for the refiner). The
    base's part one step short is off by 0.085 (f = 0.8) and 0.20 (f = 0.55)."""
    base, refiner = _pipes(tmp_path, torch.float64)
    noise = _noise(torch.float64)
    latents = _base(base, noise, fraction)
    refined = _refine(refiner, latents, fraction)
    ddim = bdia.get_solver("ddim")
    with torch.no_grad():
        first = diffusers_grid(base.scheduler, STEPS, denoising_end=fraction)
        second = diffusers_grid(refiner.scheduler, STEPS, denoising_start=fraction)
        ours = bdia.sample(_ode(base, False), ddim, noise, first, progress=False)
        ours_refined = bdia.sample(_ode(refiner, True), ddim, latents, second, progress=False)
    full = diffusers_grid(base.scheduler, STEPS)
    assert first[-1] == second[0] and len(first) + len(second) == len(full) + 1
    assert _rel(ours, latents) < 1e-12
    assert _rel(ours_refined, refined) < 1e-12


def _unet_timesteps(pipe):
    """A list that receives the timestep of each of the pipeline's unet calls, and the hook."""
    taus = []

    def hook(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        taus.append(float(torch.as_tensor(timestep).reshape(-1)[0]))

    return taus, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(
        **SD_NOISE_TABLE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
    # SDXL's own: Euler, linspace spacing, EDM space.
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD_NOISE_TABLE, steps_offset=1),
    "dpm_karras": lambda: diffusers.DPMSolverMultistepScheduler(
        **SD_NOISE_TABLE, use_karras_sigmas=True
    ),
    "unipc_trailing": lambda: diffusers.UniPCMultistepScheduler(
        **SD_NOISE_TABLE, timestep_spacing="trailing"
    ),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("fraction", [0.8, 0.3])
def test_the_parts_are_where_the_pipelines_call_the_unet(tmp_path, name, fraction):
    """The base calls the unet at the timesteps of its part's points but the last, and the
    refiner at those of its own part (all of them, the end point aside), for DDIM, SDXL's
    Euler (EDM space), DPM-Solver++ with Karras sigmas and UniPC with trailing spacing: the
    parts are the pipelines' own, and they meet where the base stops. The refiner with a
    denoising_end of its own too (0.9) stops where diffusers_grid with both says."""
    base, refiner = _pipes(tmp_path, scheduler=SCHEDULERS[name])
    sched = base.scheduler
    full = diffusers_grid(sched, STEPS).tolist()
    first = diffusers_grid(sched, STEPS, denoising_end=fraction).tolist()
    second = diffusers_grid(sched, STEPS, denoising_start=fraction).tolist()
    both = diffusers_grid(sched, STEPS, denoising_start=fraction, denoising_end=0.9).tolist()
    taus, hook = _unet_timesteps(base)
    latents = _base(base, _noise(), fraction)
    hook.remove()
    called, hook = _unet_timesteps(refiner)
    _refine(refiner, latents, fraction)
    called_both = len(called)
    _refine(refiner, latents, fraction, denoising_end=0.9)
    hook.remove()
    timesteps = sched.timesteps.tolist()
    assert taus == timesteps[: len(taus)] and len(taus) == len(first) - 1 >= 1
    assert called[0] == timesteps[len(taus)]  # the refiner begins where the base stopped
    assert first == full[: len(first)] and second == full[len(full) - len(second) :]
    assert first[-1] == second[0]
    assert called_both == len(second) - 1 >= 1
    assert len(called) - called_both == len(both) - 1 >= 1 and both == second[: len(both)]


# --------------------------------------------------------------------------- refusals


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "scheduler",
    [
        lambda: diffusers.HeunDiscreteScheduler(**SD_NOISE_TABLE),
        lambda: diffusers.KDPM2DiscreteScheduler(**SD_NOISE_TABLE),
        lambda: diffusers.PNDMScheduler(**SD_NOISE_TABLE, skip_prk_steps=True, steps_offset=1),
    ],
    ids=["heun", "kdpm2", "pndm"],
)
@pytest.mark.parametrize("cut", ["denoising_start", "denoising_end"])
# KDPM2 takes logs of torch tensors through numpy, which numpy 2 warns about; not ours.
@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
def test_a_scheduler_with_two_calls_to_a_step_is_refused(scheduler, cut):
    """Heun (order 2) lists each timestep but the first twice, KDPM2 a midpoint between two,
    and SD 1.5's PNDM its second twice. The pipelines' cut of the list by timestep then ends
    Heun's base after the Euler half of a step, which its refiner takes again from the
    step's start (measured with the tiny pipelines at f = 0.55: the base's last call and the
    refiner's first are both at timestep 555); no grid is the run of both parts. One line."""
    with pytest.raises(ValueError, match="two unet calls for some steps") as refused:
        diffusers_grid(scheduler(), STEPS, **{cut: 0.55})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "cut, error, match",
    [
        (dict(denoising_end=1), TypeError, "denoising_end must be a float"),
        (dict(denoising_start=torch.tensor(0.5)), TypeError, "denoising_start must be a float"),
        (dict(denoising_end=1.0), ValueError, r"denoising_end = 1.0 lies outside \(0, 1\)"),
        (dict(denoising_start=0.0), ValueError, r"denoising_start = 0.0 lies outside"),
        (dict(denoising_end=float("nan")), ValueError, "lies outside"),
        (dict(denoising_start=0.8, denoising_end=0.5), ValueError, "is not below denoising_end"),
        # round(1000 - 50) = 950, above the first timestep, 901.
        (dict(denoising_end=0.05), ValueError, "denoising_end = 0.05 leaves no step"),
        # round(1000 - 999.5) = 0: no timestep lies below it.
        (dict(denoising_start=0.9995), ValueError, "leaves the refiner no step"),
    ],
)
def test_bad_fractions_are_refused_in_one_line(cut, error, match):
    """A fraction the pipelines would ignore (not a Python float, or outside (0, 1)) or that
    leaves a part no step is refused, naming it; a flow-matching scheduler's pipelines take
    none."""
    scheduler = SCHEDULERS["ddim"]()
    with pytest.raises(error, match=match) as refused:
        diffusers_grid(scheduler, STEPS, **cut)
    assert "\n" not in str(refused.value)


def test_a_refiner_left_only_a_step_of_no_length_is_refused():
    """With leading spacing, no offset and set_alpha_to_one=False the last timestep, 0, sits
    on the grid's end (DDIM's last step there changes nothing): a refiner left that one
    timestep (f = 0.95, timesteps below 50) has no step of the ODE to take. f = 0.85 leaves it
    100 and 0, one step."""
    scheduler = diffusers.DDIMScheduler(**SD_NOISE_TABLE, clip_sample=False, set_alpha_to_one=False)
    assert diffusers_grid(scheduler, STEPS, denoising_start=0.85).tolist() == [0.101, 0.001]
    with pytest.raises(ValueError, match="leaves the refiner no step"):
        diffusers_grid(scheduler, STEPS, denoising_start=0.95)


def test_a_flow_matching_scheduler_takes_no_fraction():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="flow-matching scheduler, whose pipelines") as refused:
        diffusers_grid(scheduler, STEPS, denoising_end=0.8)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------ BDIA scheduler


@torch.no_grad()
def _invert(pipe, pair, refiner):
    """BDIAInverseScheduler's loop from ``pair``, calling the unet as the SDXL pipelines do
    (batch [unconditional, conditional], then u + g (c - u)); returns the inverse scheduler."""
    cond, negative = _branches(pipe, refiner)
    embeds = torch.cat([negative["encoder_hidden_states"], cond["encoder_hidden_states"]])
    added = {
        key: torch.cat([negative["added_cond_kwargs"][key], cond["added_cond_kwargs"][key]])
        for key in ("text_embeds", "time_ids")
    }
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    x = inverse.begin(pair)
    for t in inverse.timesteps:
        out = pipe.unet(
            torch.cat([x] * 2), t, encoder_hidden_states=embeds, added_cond_kwargs=added
        ).sample
        u, c = out.chunk(2)
        x = inverse.step(u + GUIDANCE * (c - u), t, x).prev_sample
    return inverse


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("fraction", [0.8, 0.55])
def test_bdia_scheduler_runs_both_parts_and_inverts_across_them(tmp_path, fraction):
    """BDIAScheduler in the base (denoising_end=f) and in the refiner (denoising_start=f),
    float32, guidance 7.5: each run is bdia.sample of bdia(ddim, 0.9) on its part of the grid,
    bit for bit. The base's final_pair is where its loop stopped (end_index, the last point of
    its part), the refiner's records where it began (start_index). Inverting the refiner's
    run returns the base's latents, and inverting the base's run from its pair then returns
    the noise, both exactly (measured 0)."""
    base, refiner = _pipes(tmp_path)
    for pipe in (base, refiner):
        pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    noise = _noise()
    solver = bdia.bdia("ddim", GAMMA)
    full = diffusers_grid(base.scheduler, STEPS)
    first = diffusers_grid(base.scheduler, STEPS, denoising_end=fraction)
    second = diffusers_grid(refiner.scheduler, STEPS, denoising_start=fraction)

    latents = _base(base, noise, fraction)
    base_pair = base.scheduler.final_pair
    assert (base_pair.start_index, base_pair.end_index) == (0, len(first) - 1)
    assert base_pair.times == tuple(first[-2:].tolist())
    assert torch.equal(base_pair.later, latents)
    refined = _refine(refiner, latents, fraction)
    refiner_pair = refiner.scheduler.final_pair
    begun = len(full) - len(second)
    assert (refiner_pair.start_index, refiner_pair.end_index) == (begun, len(full) - 1)
    assert torch.equal(refiner_pair.later, refined)
    with torch.no_grad():
        ours = bdia.sample(_ode(base, False), solver, noise, first, progress=False)
        ours_refined = bdia.sample(_ode(refiner, True), solver, latents, second, progress=False)
        # bdia.invert takes the base's pair on its part of the grid.
        back = bdia.invert(_ode(base, False), solver, base_pair, first, progress=False)
    assert torch.equal(ours, latents) and torch.equal(ours_refined, refined)
    assert torch.equal(back.earlier, noise)

    undone = _invert(refiner, refiner_pair, True)
    assert undone.start_index == begun
    assert torch.equal(undone.pair.earlier, latents)
    assert torch.equal(undone.pair.earlier, base_pair.later)
    inverse = _invert(base, base_pair, False)
    assert len(inverse.timesteps) == len(first) - 2
    assert torch.equal(inverse.pair.earlier, noise)


def test_begin_takes_a_pair_that_stopped_early_and_refuses_a_contradiction(tmp_path):
    """A bdia.sample pair on the grid's head grid[:6] carries no end: begin(pair,
    end_index=5) inverts it from there. An end_index that contradicts the pair's, or lies
    outside the grid, is refused in one line."""
    base, _ = _pipes(tmp_path)
    base.scheduler = BDIAScheduler.from_config(base.scheduler.config, gamma=GAMMA)
    noise = _noise()
    _base(base, noise, 0.55)
    recorded = base.scheduler.final_pair
    assert recorded.end_index == 5
    ode = _ode(base, False)
    solver = bdia.bdia("ddim", GAMMA)
    head = diffusers_grid(base.scheduler, STEPS)[:6]
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, head, return_pair=True, progress=False)
    assert pair == bdia.StatePair(
        recorded.earlier,
        recorded.later,
        recorded.earlier_low,
        recorded.later_low,
        pair.fingerprint,
        recorded.times,
        recorded.solver,
    )
    inverse = BDIAInverseScheduler.from_config(base.scheduler.config)
    inverse.set_timesteps(STEPS)
    inverse.begin(pair, end_index=5)
    assert inverse.timesteps.tolist() == [501, 601, 701, 801]  # grid points 4 .. 1
    with pytest.raises(ValueError, match="records that its run stopped at grid index 5") as bad:
        inverse.begin(recorded, end_index=4)
    with pytest.raises(ValueError, match=r"end_index = 11 is not where a run") as outside:
        inverse.begin(pair, end_index=11)
    with pytest.raises(ValueError, match="pair was made at t = ") as other:
        inverse.begin(pair, end_index=4)
    assert "\n" not in str(bad.value) + str(outside.value) + str(other.value)
