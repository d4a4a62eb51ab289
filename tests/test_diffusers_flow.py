"""bdia.integrations.diffusers with Stable Diffusion 3: SD3Transformer2DModel and
FlowMatchEulerDiscreteScheduler as a rectified-flow ODE.

The transformer is a tiny random ``SD3Transformer2DModel`` (``tiny_sd3_transformer``).
diffusers keeps its sigmas in float32 and its ``step`` casts the sample to float32, so parity
with diffusers is checked in float32, where both sides do the same float operations and
agree bit for bit; exactness of the inversion is checked in float64.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import (
    Counter,
    assert_flow_img2img_is_bdia_sample,
    assert_flow_run_is_bdia_sample,
    flow_img2img_runs,
    flow_round_trip_error,
    untouched,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    FLUX_DEV_SCHEDULER,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 10
BATCH = 2
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def transformer():
    return tiny_sd3_transformer()


@pytest.fixture(scope="module")
def transformer64():
    return tiny_sd3_transformer(dtype=torch.float64)


def _embeds(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 5, 16, dtype=dtype, generator=g),
        torch.randn(1, 8, dtype=dtype, generator=g),
    )


def _noise(dtype):
    return torch.randn(BATCH, 4, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(3))


def _cond(dtype, guidance):
    """from_diffusers' conditioning: prompt embeddings of batch 1, and with ``guidance`` the
    negative branch's."""
    (embeds, pooled), (neg, neg_pooled) = _embeds(dtype, 1), _embeds(dtype, 2)
    cond = dict(encoder_hidden_states=embeds, pooled_projections=pooled)
    if guidance:
        cond.update(
            guidance_scale=GUIDANCE,
            negative_cond=dict(encoder_hidden_states=neg, pooled_projections=neg_pooled),
        )
    return cond


@torch.no_grad()
def _diffusers_loop(transformer, scheduler, noise, steps, cond):
    """StableDiffusion3Pipeline's denoising loop, written out; every state, the start first."""
    batch = noise.shape[0]
    embeds = cond["encoder_hidden_states"].expand(batch, -1, -1)
    pooled = cond["pooled_projections"].expand(batch, -1)
    guided = "negative_cond" in cond
    if guided:
        neg = cond["negative_cond"]
        embeds = torch.cat([neg["encoder_hidden_states"].expand(batch, -1, -1), embeds])
        pooled = torch.cat([neg["pooled_projections"].expand(batch, -1), pooled])
    scheduler.set_timesteps(steps)
    latents, states = noise, [noise]
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        out = transformer(
            hidden_states=model_input,
            timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + GUIDANCE * (text - uncond)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
        states.append(latents)
    return states


def _float64_sigmas(shift, steps, n=1000):
    """The sigmas of FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps) computed in
    float64 throughout (diffusers rounds sigma_min and the result to float32)."""

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigmas = shifted(np.linspace(n * 1.0, n * shifted(1.0 / n), steps) / n)
    return np.concatenate([sigmas, [0.0]])


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("guidance", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_flow_match_euler_step_by_step(transformer, shift, guidance):
    """bdia's euler on from_diffusers/diffusers_grid is the SD3 pipeline's loop state by state,
    bit for bit in float32: the grid holds diffusers' float32 sigmas, so the transformer sees
    the same float32 timesteps sigma * 1000, the step sigma_next - sigma rounds to the same
    float32 number, and guidance is u + g (c - u) in float32 on both sides."""
    cond = _cond(torch.float32, guidance)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ode = from_diffusers(transformer, scheduler, **cond)
    assert isinstance(ode.schedule, bdia.RectifiedFlow) and ode.prediction == "flow"
    ts = diffusers_grid(scheduler, N_STEPS)
    noise = _noise(torch.float32)
    calls = Counter(transformer)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, ts, trajectory=True, progress=False
        )
    assert calls.calls == N_STEPS  # one call per step, guided or not
    ref = _diffusers_loop(transformer, scheduler, noise, N_STEPS, cond)
    assert len(ours) == len(ref) == N_STEPS + 1
    for k in range(len(ref)):
        assert torch.equal(ours[k], ref[k]), k


def _heun_run(ode, noise, ts, trajectory=False):
    """FlowMatchHeunDiscreteScheduler's run in bdia's solvers: heun up to the last positive
    sigma, then one euler step to 0 (the scheduler's last step); with ``trajectory``, every
    state on the grid."""
    with torch.no_grad():
        states = bdia.sample(
            ode, bdia.get_solver("heun"), noise, ts[:-1], trajectory=True, progress=False
        )
        last = bdia.sample(ode, bdia.get_solver("euler"), states[-1], ts[-2:], progress=False)
    return torch.cat([states, last[None]]) if trajectory else last


@pytest.mark.parametrize("guidance", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_is_flow_match_heun_to_float32_rounding(transformer, shift, guidance):
    """diffusers_grid of FlowMatchHeunDiscreteScheduler is FlowMatchEulerDiscreteScheduler's
    of the same shift, bit for bit: its distinct sigmas. bdia's heun on it up to the last
    positive sigma, then euler to 0, is that scheduler's run in the SD3 pipeline's loop: the
    same 2n - 1 transformer calls at the same float32 timesteps (none at sigma = 0), and
    every state at a grid point to 1e-5 relative (measured 1.7e-6 for shift 1, 6.1e-7 for
    shift 3). Not bit for bit: the scheduler forms each slope as (x - (x - v sigma)) / sigma,
    not v, which divides a float32 rounding of x (|x| ~ 4) by sigma, down to the last positive
    sigma, 0.001 for shift 1 (0.0089 for shift 3): up to 2.4e-4 in the last Heun step's
    second slope, 1.3e-5 of x (3e-6 relative) over that step of 0.11. heun's own last step,
    which calls the transformer at sigma = 0 too, ends 2.1e-6 (shift 1) to 8.9e-5 (shift 3)
    away."""
    cond = _cond(torch.float32, guidance)
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    ts = diffusers_grid(scheduler, N_STEPS)
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    assert torch.equal(ts, diffusers_grid(euler, N_STEPS))
    ode = from_diffusers(transformer, scheduler, **cond)
    assert isinstance(ode.schedule, bdia.RectifiedFlow) and ode.prediction == "flow"
    noise = _noise(torch.float32)
    timesteps = []
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(float(kwargs["timestep"][0])),
        with_kwargs=True,
    )
    try:
        ours = _heun_run(ode, noise, ts, trajectory=True)
        called = list(timesteps)
        timesteps.clear()
        ref = _diffusers_loop(transformer, scheduler, noise, N_STEPS, cond)
    finally:
        hook.remove()
    assert called == timesteps == scheduler.timesteps.tolist()
    assert len(called) == 2 * N_STEPS - 1 and 0.0 not in called
    # The loop's states after each Heun step (every second call), then after the Euler step.
    at_grid = [ref[0], *ref[2 : 2 * N_STEPS - 1 : 2], ref[-1]]
    assert len(ref) == 2 * N_STEPS and len(at_grid) == len(ours) == N_STEPS + 1
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, at_grid))
    assert worst < 1e-5


def test_sd3_pipeline_with_flow_match_heun_is_heun_then_euler(tmp_path):
    """StableDiffusion3Pipeline itself with FlowMatchHeunDiscreteScheduler (shift 3, guidance
    5) returns the latents of heun and a last euler step on diffusers_grid, to 1e-5 relative
    (measured 5.8e-7; see the step-by-step test)."""
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    pipe = tiny_sd3_pipeline(tmp_path, scheduler)
    cond = _cond(torch.float32, True)
    noise = _noise(torch.float32)
    latents = _pipeline_latents(pipe, cond, latents=noise)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ours = _heun_run(ode, noise, diffusers_grid(pipe.scheduler, N_STEPS))
    assert float((ours - latents).abs().max() / latents.abs().max()) < 1e-5


def test_bdia_scheduler_from_a_flow_match_heun_config_steps_on_its_grid():
    """BDIAScheduler.from_config of FlowMatchHeunDiscreteScheduler's config (shift, no betas)
    is BDIA over Euler on the flow-matching ODE, its grid the Heun scheduler's."""
    heun = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    scheduler = BDIAScheduler.from_config(heun.config)
    assert scheduler.config.flow_matching and scheduler.order == 1
    scheduler.set_timesteps(N_STEPS)
    assert scheduler.grid == diffusers_grid(heun, N_STEPS).tolist()


def test_float64_state_is_diffusers_to_its_float32_rounding(transformer64):
    """With a float64 transformer and state, diffusers still casts the sample to float32 in
    every step (and keeps float32 sigmas); bdia keeps float64. The two agree to 1e-6 relative
    (measured 1.5e-7): a few float32 roundings (6e-8 each) of a state of size ~3."""
    cond = _cond(torch.float64, True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise = _noise(torch.float64)
    with torch.no_grad():
        ours = bdia.sample(
            from_diffusers(transformer64, scheduler, **cond),
            bdia.get_solver("euler"),
            noise,
            diffusers_grid(scheduler, N_STEPS),
            trajectory=True,
            progress=False,
        )
    ref = _diffusers_loop(transformer64, scheduler, noise, N_STEPS, cond)
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref))
    assert worst < 1e-6


def _pipeline_latents(pipe, cond, **inputs):
    """The pipeline's latents under ``cond``'s embeddings and guidance; ``inputs`` are
    ``latents=noise``, or img2img's ``image``, ``strength`` and ``generator``."""
    negative = cond["negative_cond"]
    return pipe(
        prompt_embeds=cond["encoder_hidden_states"].expand(BATCH, -1, -1),
        pooled_prompt_embeds=cond["pooled_projections"].expand(BATCH, -1),
        negative_prompt_embeds=negative["encoder_hidden_states"].expand(BATCH, -1, -1),
        negative_pooled_prompt_embeds=negative["pooled_projections"].expand(BATCH, -1),
        num_inference_steps=N_STEPS,
        guidance_scale=GUIDANCE,
        output_type="latent",
        **inputs,
    ).images


def test_sd3_pipeline_gives_bdia_samples_latents(tmp_path):
    """StableDiffusion3Pipeline itself (tiny parts, embeddings given, guidance 5) returns
    the latents of bdia.sample with euler, bit for bit (see the step-by-step test)."""
    pipe = tiny_sd3_pipeline(tmp_path)
    cond = _cond(torch.float32, True)
    noise = _noise(torch.float32)
    latents = _pipeline_latents(pipe, cond, latents=noise)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    with torch.no_grad():
        ours = bdia.sample(
            ode,
            bdia.get_solver("euler"),
            noise,
            diffusers_grid(pipe.scheduler, N_STEPS),
            progress=False,
        )
    assert torch.equal(ours, latents)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_bdia_euler_inverts_to_float64_rounding(transformer64, shift):
    """bdia(euler, 0.96) under guidance, sampled from the noise at t = 1 (alpha = 0) to 0 and
    inverted, returns the noise to 1e-12 relative (measured: 0, exactly; the pair's low words
    carry what the state's rounding drops)."""
    ode = from_diffusers(
        transformer64,
        diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
        **_cond(torch.float64, True),
    )
    ts = diffusers_grid(diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), N_STEPS)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


def _invert_guided(pipe, pair, cond, mu=None):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as the SD3 pipelines
    do (batch [negative, positive], then u + g (c - u)); returns the inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(N_STEPS, mu=mu)
    negative = cond["negative_cond"]
    embeds = torch.cat(
        [
            negative["encoder_hidden_states"].expand(BATCH, -1, -1),
            cond["encoder_hidden_states"].expand(BATCH, -1, -1),
        ]
    )
    pooled = torch.cat(
        [
            negative["pooled_projections"].expand(BATCH, -1),
            cond["pooled_projections"].expand(BATCH, -1),
        ]
    )
    with torch.no_grad():
        x = inverse.begin(pair)
        for t in inverse.timesteps:
            out = pipe.transformer(
                hidden_states=torch.cat([x] * 2),
                timestep=t.expand(2 * BATCH),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            u, c = out.chunk(2)
            x = inverse.step(u + GUIDANCE * (c - u), t, x).prev_sample
    return inverse


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "config", [dict(shift=3.0), dict(use_dynamic_shifting=True)], ids=["sd3", "dynamic"]
)
def test_bdia_scheduler_in_sd3_pipeline_is_bdia_sample_and_inverts(tmp_path, config):
    """StableDiffusion3Pipeline with BDIAScheduler.from_config(its config, gamma=0.9) gives
    the latents and the final pair (low words included) of bdia.sample with bdia(euler, 0.9)
    on from_diffusers/diffusers_grid of that scheduler, bit for bit; the inverse scheduler's
    loop, with the pipeline's guided transformer calls, returns its starting noise bit for
    bit, and so does bdia.invert from the pair. With use_dynamic_shifting the pipeline
    computes mu from the latents' size (16 tokens) and the scheduler's config, which holds
    the flow-matching scheduler's fields, defaults included (the pipeline's own default
    max_shift is another), and passes it to set_timesteps; the grid takes the same mu."""
    pipe = tiny_sd3_pipeline(
        tmp_path, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**config)
    )
    source = pipe.scheduler.config
    pipe.scheduler = BDIAScheduler.from_config(source, gamma=0.9)
    assert pipe.scheduler.config.flow_matching
    cond, noise = _cond(torch.float32, True), _noise(torch.float32)
    latents = _pipeline_latents(pipe, cond, latents=noise)

    mu = None
    if config.get("use_dynamic_shifting"):
        mu = calculate_shift(
            16,
            source.base_image_seq_len,
            source.max_image_seq_len,
            source.base_shift,
            source.max_shift,
        )
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=mu)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert_guided(pipe, pair, cond, mu=mu)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


def test_bdia_scheduler_in_sd3_img2img_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """StableDiffusion3Img2ImgPipeline with strength 0.6 runs the last 6 of 10 timesteps from
    the image latents noised by scale_noise to timesteps[4]. With BDIAScheduler (gamma 0.9)
    the noised latents are those of the pipeline with its own FlowMatchEulerDiscreteScheduler,
    bit for bit (the same generator draws and scale_noise's float operations); the latents
    and final pair (low words included, start_index 4) are bdia.sample's with bdia(euler,
    0.9) from them over the grid's tail grid[4:], bit for bit; bdia(euler, 0) there gives the
    own scheduler's latents bit for bit (the BDIA scheduler itself refuses gamma 0, whose
    steps cannot be inverted); and the inverse scheduler's loop stops at index 4
    with the noised latents, bit for bit, as does bdia.invert on grid[4:]. Before,
    BDIAScheduler had no scale_noise and the pipeline stopped with an AttributeError."""
    cond = _cond(torch.float32, True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    pipe, runs = flow_img2img_runs(
        diffusers.StableDiffusion3Img2ImgPipeline,
        tiny_sd3_pipeline(tmp_path).components,
        lambda pipe: _pipeline_latents(
            pipe, cond, image=image, strength=0.6, generator=torch.Generator().manual_seed(0)
        ),
    )
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, N_STEPS)
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, ts, 4, lambda pair: _invert_guided(pipe, pair, cond)
    )


@pytest.mark.parametrize(
    "config",
    [dict(shift=3.0), dict(shift=1.0, use_karras_sigmas=True), dict(FLUX_DEV_SCHEDULER)],
    ids=["sd3", "karras", "flux"],
)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64),
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
    ],
    ids=["f32", "f16", "bf16", "f64", "f32-noise16", "f16-noise32"],
)
def test_scale_noise_is_flow_match_eulers(config, dtypes):
    """scale_noise is FlowMatchEulerDiscreteScheduler.scale_noise bit for bit, dtype
    included, at every timestep of the run, as the img2img pipelines call it (after
    set_begin_index, a timestep tensor repeated over the batch) and without a begin index
    (each timestep's own sigma): sigma cast to the sample's dtype, then sigma * noise +
    (1 - sigma) * sample, promoted with the noise's dtype; the caller's tensors are left as
    they were."""
    sample_dtype, noise_dtype = dtypes
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(BATCH, 4, 8, 8, generator=g).to(sample_dtype)
    noise = torch.randn(BATCH, 4, 8, 8, generator=g).to(noise_dtype)
    source = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ours = BDIAScheduler.from_config(source.config)
    steps = dict(mu=0.7, sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS))
    if not config.get("use_dynamic_shifting"):
        steps = dict(num_inference_steps=N_STEPS)
    for begin in (None, *range(N_STEPS)):
        for scheduler in (source, ours):
            scheduler.set_timesteps(**steps)
            if begin is not None:
                scheduler.set_begin_index(begin)
        assert torch.equal(ours.timesteps, source.timesteps)
        indices = range(N_STEPS) if begin is None else [begin]
        for i in indices:
            timestep = source.timesteps[i : i + 1].repeat(BATCH)
            with untouched(sample, noise, timestep):
                got = ours.scale_noise(sample, timestep, noise)
            want = source.scale_noise(sample, timestep, noise)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), (begin, i)


def test_scale_noise_refusals():
    """One line each: scale_noise with a noise table (add_noise is its forward process),
    before set_timesteps, at a timestep not in timesteps, at another timestep than
    timesteps[begin_index] before the first step (FlowMatchEulerDiscreteScheduler would
    take begin_index's sigma whatever the timestep), arguments of the wrong type, and noise
    of another shape than the sample's (which that scheduler would broadcast). After
    a step (inpainting noises to later timesteps) the begin index no longer holds."""
    x = torch.zeros(BATCH, 4, 8, 8)
    with pytest.raises(ValueError) as exc_info:
        BDIAScheduler().scale_noise(x, torch.tensor([500.0]), x)
    _one_line_error(exc_info, "add_noise(")
    flow = BDIAScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    with pytest.raises(ValueError) as exc_info:
        flow.scale_noise(x, torch.tensor([1000.0]), x)
    _one_line_error(exc_info, "scale_noise was called before set_timesteps")
    flow.set_timesteps(N_STEPS)
    with pytest.raises(ValueError) as exc_info:
        flow.scale_noise(x, torch.tensor([123.0]), x)
    _one_line_error(exc_info, "not in this schedule's timesteps")
    flow.set_begin_index(4)
    with pytest.raises(ValueError) as exc_info:
        flow.scale_noise(x, flow.timesteps[3:4], x)
    _one_line_error(exc_info, "set_begin_index set the run's start at index 4")
    with pytest.raises(TypeError) as exc_info:
        flow.scale_noise(x, flow.timesteps[4:5], None)
    _one_line_error(exc_info, "noise must be a tensor")
    with pytest.raises(ValueError) as exc_info:
        flow.scale_noise(x, flow.timesteps[4:5], x[:1])
    _one_line_error(exc_info, "noise has shape (1, 4, 8, 8) but the sample has shape")
    with pytest.raises(TypeError) as exc_info:
        flow.set_begin_index(4.0)
    _one_line_error(exc_info, "begin_index must be an int")
    flow.step(x, flow.timesteps[4], x)
    assert torch.equal(flow.scale_noise(x, flow.timesteps[5:6], x + 1), flow.sigmas[5].expand_as(x))


def test_a_flow_matching_bdia_config_round_trips(tmp_path):
    """save_config / from_config keep flow_matching and the flow-matching fields, without a
    warning that they are ignored (diffusers warns of fields of classes it does not know
    as compatible)."""
    source = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    forward = BDIAScheduler.from_config(source.config, gamma=0.8)
    forward.save_config(tmp_path)
    again = BDIAScheduler.from_config(BDIAScheduler.load_config(tmp_path))
    for scheduler in (forward, again):
        assert scheduler.config.flow_matching and scheduler.config.shift == 3.0
        assert scheduler.config.use_karras_sigmas and scheduler.config.gamma == 0.8
    assert diffusers_grid(again, N_STEPS).tolist() == diffusers_grid(source, N_STEPS).tolist()
    again.set_timesteps(N_STEPS)
    source.set_timesteps(N_STEPS)
    assert torch.equal(again.timesteps, source.timesteps)
    assert torch.equal(again.sigmas, source.sigmas)


def test_flow_matching_bdia_scheduler_refusals():
    """One line each: a flow config that is no ODE, gamma 'obelm' (its first gamma tends to
    0 from pure noise), dynamic shifting without mu, mu for a noise table, add_noise
    (image to image), and the noise table's attributes."""
    with pytest.raises(ValueError) as exc_info:
        BDIAScheduler.from_config(
            diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config
        )
    _one_line_error(exc_info, "stochastic_sampling")
    flow_config = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config
    with pytest.raises(ValueError) as exc_info:
        BDIAScheduler.from_config(flow_config, gamma="obelm")
    _one_line_error(exc_info, "obelm")
    dynamic = BDIAScheduler.from_config(
        diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    )
    with pytest.raises(ValueError) as exc_info:
        dynamic.set_timesteps(N_STEPS)
    _one_line_error(exc_info, "mu=")
    with pytest.raises(ValueError) as exc_info:
        BDIAScheduler().set_timesteps(N_STEPS, mu=0.5)
    _one_line_error(exc_info, "mu")
    flow = BDIAScheduler.from_config(flow_config)
    with pytest.raises(ValueError) as exc_info:
        flow.add_noise(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    _one_line_error(exc_info, "scale_noise")
    assert not hasattr(flow, "alphas_cumprod") and not hasattr(BDIAScheduler(), "sigmas")


# ----------------------------------------------------------------------------- grids


_GRID_CONFIGS = {
    "shift1": (dict(), None),
    "shift3": (dict(shift=3.0), None),
    "karras": (dict(shift=3.0, use_karras_sigmas=True), None),
    "exponential": (dict(shift=3.0, use_exponential_sigmas=True), None),
    "beta": (dict(shift=3.0, use_beta_sigmas=True), None),
    "terminal": (dict(shift=3.0, shift_terminal=0.1), None),
    "dynamic": (dict(use_dynamic_shifting=True), 0.8),
    "linear": (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1.5),
}
# One step cannot end at shift_terminal (diffusers makes NaN; refused below).
_GRID_CASES = [
    pytest.param(config, mu, steps, id=f"{name}-{steps}")
    for name, (config, mu) in _GRID_CONFIGS.items()
    for steps in (1, N_STEPS, 28)
    if not (name == "terminal" and steps == 1)
]


@pytest.mark.parametrize("config, mu, steps", _GRID_CASES)
def test_grid_is_the_schedulers_sigmas(config, mu, steps):
    """The grid is diffusers' float32 sigmas after set_timesteps(steps, mu=mu), widened to
    float64 exactly, the final 0 included: the times the pipeline calls the transformer at
    (timesteps = sigmas * 1000) and steps between."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ts = diffusers_grid(scheduler, steps, mu=mu)
    scheduler.set_timesteps(steps, mu=mu)
    assert ts.dtype == torch.float64
    assert ts.tolist() == [float(s) for s in scheduler.sigmas]
    assert len(ts) == steps + 1 and float(ts[-1]) == 0.0
    assert torch.equal((ts[:-1].float() * 1000).float(), scheduler.timesteps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [2, N_STEPS, 28, 50, 1000])
def test_float64_sigmas_differ_from_diffusers_by_one_float32_rounding(shift, steps):
    """The same sigmas computed in float64 throughout differ from diffusers' (so from the grid)
    by 6e-8 relative at most (measured 5.8e-8, below 2^-24): diffusers rounds them to float32.
    Rounded to float32 they are not always diffusers' either (with shift 3 and 50 steps one of
    51 differs), since diffusers also rounds sigma_min to float32 before shifting it again;
    the grid takes diffusers' values, which the pipeline's transformer and steps see."""
    ts = diffusers_grid(diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), steps).numpy()
    exact = _float64_sigmas(shift, steps)
    assert ts[0] == exact[0] == 1.0 and ts[-1] == exact[-1] == 0.0
    assert np.max(np.abs(ts[:-1] - exact[:-1]) / exact[:-1]) < 6e-8


# -------------------------------------------------------------------------- refusals


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


@pytest.mark.parametrize(
    "config, field",
    [
        (dict(invert_sigmas=True), "invert_sigmas"),
        (dict(stochastic_sampling=True), "stochastic_sampling"),
    ],
    ids=["invert", "stochastic"],
)
def test_configs_that_are_not_this_ode_are_refused(transformer, config, field):
    calls = Counter(transformer)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    for make in (
        lambda: from_diffusers(transformer, scheduler),
        lambda: diffusers_grid(scheduler, N_STEPS),
    ):
        with pytest.raises(ValueError) as exc_info:
            make()
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_a_grid_that_is_not_decreasing_is_refused():
    """shift_terminal with one step divides 0 by 0 in diffusers (the sigma 1 is to be
    stretched to end at 0.1); a negative shift turns the sigmas around."""
    for config, steps in ((dict(shift_terminal=0.1), 1), (dict(shift=-0.5), N_STEPS)):
        with np.errstate(divide="ignore", invalid="ignore"):
            with pytest.raises(ValueError) as exc_info:
                diffusers_grid(diffusers.FlowMatchEulerDiscreteScheduler(**config), steps)
        _one_line_error(exc_info, "not decreasing")


def test_dynamic_shifting_needs_mu():
    """The ODE does not depend on the shift, the grid does: from_diffusers takes a config with
    use_dynamic_shifting, diffusers_grid needs its mu (and refuses one that would be ignored)."""
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError) as exc_info:
        diffusers_grid(dynamic, N_STEPS)
    _one_line_error(exc_info, "mu=")
    for mu, error in ((float("nan"), "finite"), (True, "finite")):
        with pytest.raises(ValueError) as exc_info:
            diffusers_grid(dynamic, N_STEPS, mu=mu)
        _one_line_error(exc_info, error)
    for scheduler in (
        diffusers.FlowMatchEulerDiscreteScheduler(),
        diffusers.DDIMScheduler(clip_sample=False),
    ):
        with pytest.raises(ValueError) as exc_info:
            diffusers_grid(scheduler, N_STEPS, mu=0.5)
        _one_line_error(exc_info, "mu")


def test_pairings_that_do_not_fit_are_refused(transformer):
    """A UNet with a flow-matching scheduler, SD3's or Flux's transformer with a noise table,
    and spaces that do not fit: one line each, before any call (Flux's own refusals are in
    test_diffusers_flux.py)."""
    unet = tiny_unet(conditional=True, channels=4, cross_attention_dim=16)
    flux = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=4,
        num_attention_heads=1,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(0, 2, 2),
    )
    counters = [Counter(m) for m in (transformer, unet, flux)]
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    cases = [
        (lambda: from_diffusers(unet, flow), "flow-matching"),
        (
            lambda: from_diffusers(
                unet, dict(flow.config, _class_name="FlowMatchEulerDiscreteScheduler")
            ),
            "UNet",
        ),
        (lambda: from_diffusers(transformer, ddim), "FlowMatchEulerDiscreteScheduler"),
        (lambda: from_diffusers(transformer, diffusers.EulerDiscreteScheduler()), "noise-table"),
        (lambda: from_diffusers(flux, ddim), "flow-matching model"),
        (lambda: from_diffusers(transformer, flow, space="vp"), "space"),
        (lambda: from_diffusers(unet, ddim, space="flow"), "space = 'flow'"),
        (lambda: diffusers_grid(ddim, N_STEPS, space="flow"), "space = 'flow'"),
        (lambda: diffusers_grid(flow, N_STEPS, space="edm"), "space"),
    ]
    for make, field in cases:
        with pytest.raises(ValueError) as exc_info:
            make()
        _one_line_error(exc_info, field)
    assert [c.calls for c in counters] == [0, 0, 0]


def test_skip_layers_and_reserved_keys_are_refused(transformer):
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    calls = Counter(transformer)
    cond = _cond(torch.float32, True)
    for extra, field in (
        (dict(skip_layers=[0]), "skip-layer guidance"),
        (dict(hidden_states=torch.zeros(1)), "hidden_states"),
        (dict(timestep=1.0), "timestep"),
    ):
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(transformer, flow, **cond, **extra)
        _one_line_error(exc_info, field)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(transformer, flow, guidance_scale=GUIDANCE)
    _one_line_error(exc_info, "negative_cond")
    assert calls.calls == 0


def test_other_flow_matching_schedulers_are_refused(transformer):
    """FlowMatchLCMScheduler (a consistency model's: new noise at every step) and the like
    have no noise table and are not mapped."""
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(transformer, diffusers.FlowMatchLCMScheduler())
    _one_line_error(exc_info, "FlowMatchHeunDiscreteScheduler")


def test_flow_match_heun_takes_neither_sigmas_nor_mu():
    """FlowMatchHeunDiscreteScheduler.set_timesteps takes a step count alone: custom sigmas
    (FluxPipeline's) and mu (its config has no dynamic shifting) are refused in one line."""
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError) as exc_info:
        diffusers_grid(scheduler, N_STEPS, sigmas=np.linspace(1.0, 0.1, N_STEPS))
    _one_line_error(exc_info, "takes no custom sigmas")
    with pytest.raises(ValueError) as exc_info:
        diffusers_grid(scheduler, N_STEPS, mu=0.5)
    _one_line_error(exc_info, "use_dynamic_shifting")


# ----------------------------------------------------------------------------- dtypes


def test_a_bfloat16_transformer_runs_under_a_float32_state():
    """The UNet path's dtype handling: model_dtype is the transformer's, the float32
    embeddings are cast to it, the state stays float32; the result is the float32 run's to
    bfloat16 accuracy (5e-2 relative; measured 7.5e-3 over 10 steps of this random network)."""
    half = tiny_sd3_transformer(dtype=torch.bfloat16)
    full = tiny_sd3_transformer()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = _cond(torch.float32, True)
    ode = from_diffusers(half, scheduler, **cond)
    assert ode.model_dtype == torch.bfloat16
    assert ode.cond["encoder_hidden_states"].dtype == torch.bfloat16
    ts = diffusers_grid(scheduler, N_STEPS)
    noise = _noise(torch.float32)
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
        ref = bdia.sample(
            from_diffusers(full, scheduler, **cond),
            bdia.get_solver("euler"),
            noise,
            ts,
            progress=False,
        )
    assert out.dtype == torch.float32
    assert float((out - ref).abs().max() / ref.abs().max()) < 5e-2
