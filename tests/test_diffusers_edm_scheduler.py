"""BDIAScheduler / BDIAInverseScheduler in EDM mode: Playground v2.5-style pipelines.

``BDIAScheduler.from_config`` of an EDM-preconditioned scheduler's config
(``EDMDPMSolverMultistepScheduler``, Playground v2.5's, or ``EDMEulerScheduler``) in a
``StableDiffusionXLPipeline`` of tiny random parts (``tiny_playground_pipeline``), float32.
The scheduler gives the pipeline ``c_in x`` and the timesteps ``0.25 log sigma`` of the EDM
scheduler, replays each raw unet output through ``from_diffusers``' denoiser ``c_skip x +
c_out F`` and takes ``BidirectionalWrapper.step`` of ``bdia(euler, gamma)``, so a pipeline
run and ``bdia.sample`` make the same float operations on the same inputs: the tests ask for
bitwise equality (measured 0), and the inverse returns the pipeline's start exactly
(measured 0; two-word states).
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import (
    assert_flow_img2img_is_bdia_sample,
    assert_flow_run_is_bdia_sample,
    flow_img2img_runs,
    untouched,
)

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import tiny_playground_pipeline, tiny_unet

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 10
GAMMA = 0.9
GUIDANCE = 5.0
PROMPT = "a photo of a cat"
# SDXL's micro-conditioning of the tiny pipeline's 16 x 16 images: size, crop, target size.
TIME_IDS = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
EDM_CLASSES = (diffusers.EDMDPMSolverMultistepScheduler, diffusers.EDMEulerScheduler)


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


@torch.no_grad()
def _embeds(pipe):
    """``(embeds, negative, pooled, negative_pooled)`` of the prompt, as the pipeline makes
    them (negative ones zero: force_zeros_for_empty_prompt)."""
    return pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)


def _cond(pipe):
    """from_diffusers' conditioning for the pipeline's guided unet calls."""
    embeds, negative, pooled, negative_pooled = _embeds(pipe)
    return dict(
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": TIME_IDS},
        guidance_scale=GUIDANCE,
        negative_cond={
            "encoder_hidden_states": negative,
            "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": TIME_IDS},
        },
    )


@torch.no_grad()
def _latents(pipe, **inputs):
    return pipe(
        PROMPT,
        height=16,
        width=16,
        num_inference_steps=N_STEPS,
        guidance_scale=GUIDANCE,
        output_type="latent",
        **inputs,
    ).images


@torch.no_grad()
def _invert_guided(pipe, pair):
    """The docs' inverse loop: the unet called as the pipeline calls it (c_in x of the batch
    [negative, positive], then u + g (c - u)), from the pipeline scheduler's final_pair."""
    embeds, negative, pooled, negative_pooled = _embeds(pipe)
    kwargs = dict(
        encoder_hidden_states=torch.cat([negative, embeds]),
        added_cond_kwargs={
            "text_embeds": torch.cat([negative_pooled, pooled]),
            "time_ids": TIME_IDS.repeat(2, 1),
        },
    )
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(N_STEPS)
    x = inverse.begin(pair)
    for t in inverse.timesteps:
        x_in = inverse.scale_model_input(torch.cat([x] * 2), t)
        u, c = pipe.unet(x_in, t, **kwargs).sample.chunk(2)
        x = inverse.step(u + GUIDANCE * (c - u), t, x).prev_sample
    return inverse


# ------------------------------------------------------------------ pipeline parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cls", EDM_CLASSES, ids=["dpm", "euler"])
def test_bdia_scheduler_in_playground_pipeline_is_bdia_sample_and_inverts(
    tmp_path, cls, prediction_type
):
    """StableDiffusionXLPipeline with BDIAScheduler.from_config(its EDM scheduler's config,
    gamma=0.9), guidance 5: the latents and the final pair (low words included) are
    bdia.sample's with bdia(euler, 0.9) on from_diffusers/diffusers_grid of the pipeline's
    own scheduler, from the pipeline's start noise * init_noise_sigma (sqrt(80^2 + 1), as
    diffusers has it), bit for bit; the inverse scheduler's loop, calling the unet as the
    pipeline does, returns that start bit for bit, and so does bdia.invert from the pair.
    With EDMEulerScheduler, bdia(euler, 0) on the same ODE gives the latents of the pipeline
    with that scheduler, bit for bit (the BDIA scheduler itself refuses gamma 0, whose steps
    cannot be inverted). Before, from_config refused these configs."""
    pipe = tiny_playground_pipeline(tmp_path, cls(prediction_type=prediction_type))
    source = pipe.scheduler
    pipe.scheduler = BDIAScheduler.from_config(source.config, gamma=GAMMA)
    assert pipe.scheduler.config.edm_scheduler == cls.__name__
    assert pipe.scheduler.init_noise_sigma == source.init_noise_sigma == (80.0**2 + 1) ** 0.5
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = _latents(pipe, latents=noise)

    ode = from_diffusers(pipe.unet, source, **_cond(pipe))
    ts = diffusers_grid(source, N_STEPS)
    start = noise * source.init_noise_sigma
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, start, ts, gamma=GAMMA)
    inverse = _invert_guided(pipe, pair)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), GAMMA), pair, ts)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, start)
    assert torch.equal(back.earlier, start)
    if cls is diffusers.EDMEulerScheduler:
        pipe.scheduler = source
        own = _latents(pipe, latents=noise)
        with torch.no_grad():
            euler = bdia.sample(ode, bdia.bdia("euler", 0.0), start, ts, progress=False)
        assert torch.equal(euler, own)


def test_bdia_scheduler_in_sdxl_img2img_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """StableDiffusionXLImg2ImgPipeline with strength 0.6 runs the last 6 of 10 timesteps
    from the image latents noised by add_noise to timesteps[4] (after set_begin_index(4)).
    With BDIAScheduler (gamma 0.9) the noised latents are those of the pipeline with its own
    EDMEulerScheduler, bit for bit (the same generator draws and add_noise's float
    operations, x0 + sigma noise); the latents and final pair (low words included,
    start_index 4) are bdia.sample's with bdia(euler, 0.9) from them over grid[4:], bit for
    bit; bdia(euler, 0) there gives the own scheduler's latents bit for bit; and the inverse
    scheduler's loop stops at index 4 with the noised latents, bit for bit, as does
    bdia.invert on grid[4:]."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    parts = tiny_playground_pipeline(tmp_path, diffusers.EDMEulerScheduler()).components
    pipe, runs = flow_img2img_runs(
        diffusers.StableDiffusionXLImg2ImgPipeline,
        parts,
        lambda pipe: _latents(
            pipe, image=image, strength=0.6, generator=torch.Generator().manual_seed(0)
        ),
    )
    ode = from_diffusers(pipe.unet, pipe.scheduler, **_cond(pipe))
    ts = diffusers_grid(pipe.scheduler, N_STEPS)
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, ts, 4, lambda pair: _invert_guided(pipe, pair)
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["f64", "bf16", "f16"]
)
def test_other_dtypes_are_bdia_sample_and_invert_exactly(dtype):
    """A hand-written pipeline loop (scale_model_input, unet, step) with a unet and latents
    in ``dtype``, epsilon, DPM-Solver's config: the final pair is bdia.sample's with a state
    in ``dtype`` promoted to float32 and the unet in ``dtype``, bit for bit (low words
    included), the latents its later state cast down, and the inverse loop (fed ``dtype``
    inputs) and bdia.invert return the start bit for bit (measured 0).

    In half precision the latents are the float32 state cast down; scale_model_input forms
    c_in x from the scheduler's float32 state, as the adapter's model does from the ODE's.
    From the half latents instead, the run is 0.21 (bfloat16) and 0.02 (float16) off
    bdia.sample's at states of about 266, and bdia.invert from its pair misses the start by
    1.3 and 0.11. In float64 the ODE's c_noise is 0.25 log sigma in float64, up to 5.7e-8
    from the scheduler's float32 timestep, which the step accepts as that timestep's (the
    replay's slack; without it the first step raises); the unet, given the float32 timestep
    by the loop and the float64 one by bdia.sample, takes either to float32 in its time
    embedding, where they agree at these sigmas."""
    unet = tiny_unet(dtype=dtype)
    source = diffusers.EDMDPMSolverMultistepScheduler()
    sched = BDIAScheduler.from_config(source.config, gamma=GAMMA)
    sched.set_timesteps(N_STEPS)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = start = noise.to(dtype) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        ode = from_diffusers(unet, source)
        ts = diffusers_grid(source, N_STEPS)
        wide = start.to(torch.promote_types(dtype, torch.float32))
        ref = bdia.sample(
            ode, bdia.bdia("euler", GAMMA), wide, ts, return_pair=True, progress=False
        )
    pair = sched.final_pair
    for name in ("earlier", "later", "earlier_low", "later_low"):
        assert torch.equal(getattr(pair, name), getattr(ref, name)), name
    assert x.dtype == dtype and torch.equal(x, ref.later.to(dtype))
    inverse = BDIAInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(N_STEPS)
    y = inverse.begin(pair, dtype=dtype)
    with torch.no_grad():
        for t in inverse.timesteps:
            y = inverse.step(unet(inverse.scale_model_input(y, t), t).sample, t, y).prev_sample
        back = bdia.invert(ode, bdia.bdia("euler", GAMMA), pair, ts)
    assert torch.equal(inverse.pair.earlier, wide)
    assert torch.equal(back.earlier, wide)


# ------------------------------------------------------------ the pipeline's contract


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("cls", EDM_CLASSES, ids=["dpm", "euler"])
def test_the_pipeline_sees_the_edm_schedulers_numbers(cls, final_sigmas_type):
    """What a pipeline reads is the EDM scheduler's, bit for bit in float32: timesteps (c_noise
    = 0.25 log sigma), sigmas, init_noise_sigma, scale_model_input's c_in x at every timestep
    and len. The grid is diffusers_grid's (a final repeat of sigma_min left out: the last
    timestep's step then moves nothing). The first step is EDMEulerScheduler's: its
    prev_sample and pred_original_sample (the denoiser) bit for bit."""
    source = cls(final_sigmas_type=final_sigmas_type)
    sched = BDIAScheduler.from_config(source.config, gamma=GAMMA)
    source.set_timesteps(N_STEPS)
    sched.set_timesteps(N_STEPS)
    assert torch.equal(sched.timesteps, source.timesteps)
    assert sched.timesteps.dtype == torch.float32
    assert torch.equal(sched.sigmas, source.sigmas)
    assert sched.init_noise_sigma == source.init_noise_sigma and len(sched) == len(source)
    assert sched.grid == diffusers_grid(source, N_STEPS).tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 80
    for t in source.timesteps:
        with untouched(x):
            got = sched.scale_model_input(x, t)
        source._step_index = None
        assert torch.equal(got, source.scale_model_input(x, t))
    unet = tiny_unet()
    euler = diffusers.EDMEulerScheduler(final_sigmas_type=final_sigmas_type)
    euler.set_timesteps(N_STEPS)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = unet(sched.scale_model_input(x, t), t).sample
            ours = sched.step(out, t, x)
            if i == 0 and cls is diffusers.EDMEulerScheduler:
                theirs = euler.step(out, t, x)
                assert torch.equal(ours.prev_sample, theirs.prev_sample)
                assert torch.equal(ours.pred_original_sample, theirs.pred_original_sample)
            before, x = x, ours.prev_sample
    if final_sigmas_type == "sigma_min":
        # The last timestep sits on the grid's end, sigma_min: its step moves nothing.
        assert len(sched.grid) == N_STEPS and torch.equal(x, before)
    assert torch.equal(sched.final_pair.later, x)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
        (torch.float32, torch.float16),
    ],
    ids=["f32", "f16", "f64", "f32-noise16"],
)
@pytest.mark.parametrize("cls", EDM_CLASSES, ids=["dpm", "euler"])
def test_add_noise_is_the_edm_schedulers(cls, dtypes):
    """add_noise is the EDM scheduler's, bit for bit, dtype included, at every timestep of
    the run, as StableDiffusionXLImg2ImgPipeline calls it (after set_begin_index, a timestep
    tensor repeated over the batch) and without a begin index (each timestep's own sigma):
    the sigmas cast to the samples' dtype, then x0 + noise * sigma; the caller's tensors are
    left as they were."""
    sample_dtype, noise_dtype = dtypes
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(sample_dtype)
    noise = torch.randn(2, 4, 8, 8, generator=g).to(noise_dtype)
    source = cls()
    ours = BDIAScheduler.from_config(source.config)
    for begin in (None, *range(N_STEPS)):
        for scheduler in (source, ours):
            scheduler.set_timesteps(N_STEPS)
            if begin is not None:
                scheduler.set_begin_index(begin)
        indices = range(N_STEPS) if begin is None else [begin]
        for i in indices:
            timestep = source.timesteps[i : i + 1].repeat(2)
            with untouched(sample, noise, timestep):
                got = ours.add_noise(sample, noise, timestep)
            want = source.add_noise(sample, noise, timestep)
            assert got.dtype == want.dtype and torch.equal(got, want), (begin, i)


def test_config_round_trips_and_the_adapter_takes_the_schedulers(tmp_path):
    """save_config / from_config keep edm_scheduler, gamma and the EDM scheduler's fields
    (defaults included: Playground's config read from disk has _class_name); the inverse
    built from the config is in EDM mode too; from_diffusers and diffusers_grid take both
    BDIA schedulers as the EDM scheduler they were built from (the inverse's grid is the
    forward run's)."""
    source = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_max=60.0, prediction_type="v_prediction"
    )
    read = {**source.config, "_class_name": "EDMDPMSolverMultistepScheduler"}
    forward = BDIAScheduler.from_config(read, gamma=0.8)
    forward.save_config(tmp_path)
    again = BDIAScheduler.from_config(BDIAScheduler.load_config(tmp_path))
    inverse = BDIAInverseScheduler.from_config(again.config)
    for scheduler in (forward, again, inverse):
        cfg = scheduler.config
        assert cfg.edm_scheduler == "EDMDPMSolverMultistepScheduler" and cfg.gamma == 0.8
        assert cfg.sigma_max == 60.0 and cfg.algorithm_type == "dpmsolver++"
        assert cfg.prediction_type == "v_prediction"
        assert torch.equal(diffusers_grid(scheduler, N_STEPS), diffusers_grid(source, N_STEPS))
    assert again.init_noise_sigma == source.init_noise_sigma == (60.0**2 + 1) ** 0.5
    unet = tiny_unet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = from_diffusers(unet, source).evaluate(5.0, x).denoised
        for scheduler in (again, inverse):
            ode = from_diffusers(unet, scheduler)
            assert ode.prediction == "denoised"
            assert torch.equal(ode.evaluate(5.0, x).denoised, want)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "source, field, fix",
    [
        # diffusers' EDM precondition_outputs raises for any other (at the first step).
        (
            diffusers.EDMDPMSolverMultistepScheduler(prediction_type="sample"),
            "prediction_type",
            None,
        ),
        (
            diffusers.EDMDPMSolverMultistepScheduler(thresholding=True),
            "thresholding",
            dict(thresholding=False),
        ),
        (
            diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
            "algorithm_type",
            dict(algorithm_type="dpmsolver++"),
        ),
        (diffusers.EDMEulerScheduler(sigma_data=0.0), "sigma_data", None),
    ],
    ids=["sample", "thresholding", "sde", "sigma_data"],
)
def test_edm_configs_the_adapter_refuses_are_refused_by_from_config(source, field, fix):
    """One line each, naming the field and, where it gives one, a fix that works: the
    class's own from_config with the field set (an EDM scheduler's field, such as
    algorithm_type, goes to that scheduler's config)."""
    for cls in (BDIAScheduler, BDIAInverseScheduler):
        with pytest.raises(ValueError) as exc_info:
            cls.from_config(source.config)
        _one_line_error(exc_info, field)
        if fix is not None:
            ((name, value),) = fix.items()
            _one_line_error(exc_info, f"{cls.__name__}.from_config(scheduler.config, {name}=")
            assert cls.from_config(source.config, **fix).config[name] == value


def test_edm_mode_refusals():
    """One line each: gamma 0 (plain Euler cannot be inverted), an edm_scheduler bdia does
    not map or together with flow_matching, scale_noise (the flow-matching forward process),
    custom sigmas and mu in set_timesteps, scale_model_input without its timestep (c_in
    depends on sigma), add_noise at another timestep than timesteps[begin_index] before the
    first step or with noise of another shape; the noise table's attributes do not exist."""
    config = diffusers.EDMDPMSolverMultistepScheduler().config
    with pytest.raises(ValueError) as exc_info:
        BDIAScheduler.from_config(config, gamma=0)
    _one_line_error(exc_info, "gamma = 0 lies outside (0, 1]")
    for make in (
        lambda: BDIAScheduler(edm_scheduler="EDMHeunScheduler"),
        lambda: BDIAScheduler.from_config(config, flow_matching=True),
    ):
        with pytest.raises(ValueError) as exc_info:
            make()
        _one_line_error(exc_info, "edm_scheduler = ")
    sched = BDIAScheduler.from_config(config)
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError) as exc_info:
        sched.set_timesteps(N_STEPS, sigmas=[80.0, 1.0])
    _one_line_error(exc_info, "is EDM-preconditioned and takes none")
    with pytest.raises(ValueError) as exc_info:
        sched.set_timesteps(N_STEPS, mu=0.5)
    _one_line_error(exc_info, "mu")
    sched.set_timesteps(N_STEPS)
    with pytest.raises(ValueError) as exc_info:
        sched.scale_noise(x, sched.timesteps[0], x)
    _one_line_error(exc_info, "is EDM-preconditioned: noise with add_noise(")
    with pytest.raises(ValueError) as exc_info:
        sched.scale_model_input(x)
    _one_line_error(exc_info, "scale_model_input needs the timestep")
    sched.set_begin_index(4)
    with pytest.raises(ValueError) as exc_info:
        sched.add_noise(x, x, sched.timesteps[3:4])
    _one_line_error(exc_info, "set_begin_index set the run's start at index 4")
    with pytest.raises(ValueError) as exc_info:
        sched.add_noise(x, x[:1], sched.timesteps[4:5])
    _one_line_error(exc_info, "noise has shape (1, 4, 8, 8) but the sample has shape")
    assert not hasattr(sched, "alphas_cumprod")
