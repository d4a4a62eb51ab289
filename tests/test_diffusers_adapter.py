"""bdia.integrations.diffusers: parity with diffusers' scheduler loops, guidance, errors.

Every network here is a tiny randomly initialised diffusers UNet in float64, and every
scheduler gets a float64 ``alphas_cumprod`` (and ``final_alpha_cumprod``), so that where the
scheduler computes in float64 the comparison is at float64 rounding. Where it does not
(Euler, Heun and DPM-Solver keep their sigmas in float32; Euler and DPM-Solver also cast the
sample to float32 in ``step``), the tolerance is float32-level and each test says why.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys

import diffusers
import pytest
import torch
from conftest import Counter, run_child

import bdia
from bdia.integrations.diffusers import (
    DiffusersModel,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.parity import bdia_states, diffusers_states
from bdia.integrations.diffusers.tiny import (
    tiny_playground_pipeline,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 10
BATCH = 2


def _unet(**overrides):
    return tiny_unet(dtype=torch.float64, **overrides)


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def cond_unet():
    return tiny_unet(conditional=True, cross_attention_dim=8, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(
        BATCH, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )


def f64(scheduler):
    """The scheduler with its noise tables in float64 (the adapter reads them as they are)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    return scheduler


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize(
    "spacing", [("leading", 0), ("leading", 1), ("trailing", 0)], ids=["leading", "offset", "trail"]
)
def test_ddim_matches_diffusers_step_by_step(
    unet, noise, spacing, set_alpha_to_one, prediction_type
):
    """bdia's 'ddim' on from_diffusers/diffusers_grid is DDIMScheduler (eta = 0) state by state
    to 1e-12 relative (measured: at most 2.3e-15, float64 rounding of two formulas for the same
    step). With leading spacing, no offset and set_alpha_to_one=False, diffusers' last step goes
    from timestep 0 to alphas_cumprod[0], the same noise level: an identity step that bdia's
    grid leaves out, so diffusers has one state more and its last two agree."""
    timestep_spacing, steps_offset = spacing
    scheduler = f64(
        diffusers.DDIMScheduler(
            clip_sample=False,
            set_alpha_to_one=set_alpha_to_one,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
        )
    )
    ref = diffusers_states(unet, scheduler, noise, N_STEPS)
    ours = bdia_states(unet, scheduler, "ddim", noise, N_STEPS)
    identity_step = timestep_spacing == "leading" and not steps_offset and not set_alpha_to_one
    assert len(ours) == len(ref) - identity_step
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-12, k
    assert rel(ours[-1], ref[-1]) < 1e-12


def _zero_snr_ddim(prediction_type="v_prediction", spacing="trailing"):
    """DDIMScheduler with zero terminal SNR, as its models are sampled (Lin et al. 2024:
    v-prediction, trailing timesteps, which start at the last, pure-noise one)."""
    return f64(
        diffusers.DDIMScheduler(
            clip_sample=False,
            set_alpha_to_one=False,
            rescale_betas_zero_snr=True,
            prediction_type=prediction_type,
            timestep_spacing=spacing,
        )
    )


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_matches_diffusers_with_zero_terminal_snr(unet, noise, prediction_type, spacing):
    """rescale_betas_zero_snr=True ends the table at alphas_cumprod = 0; with trailing
    timesteps the run starts there, at pure noise, where the v or x0 prediction gives
    x0 and eps (= x) without dividing by alpha. bdia's 'ddim' is DDIMScheduler state by
    state to 1e-12 relative, as for other tables (measured: 6e-16 for v, 2e-15 for x0).
    Leading timesteps start below the end and, as above, end in diffusers' identity step,
    which bdia leaves out."""
    scheduler = _zero_snr_ddim(prediction_type, spacing)
    grid = diffusers_grid(scheduler, N_STEPS)
    assert (float(grid[0]) == 1.0) == (spacing == "trailing")
    ref = diffusers_states(unet, scheduler, noise, N_STEPS)
    ours = bdia_states(unet, scheduler, "ddim", noise, N_STEPS)
    identity_step = spacing == "leading"
    assert len(ours) == len(ref) - identity_step
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-12, k
    assert rel(ours[-1], ref[-1]) < 1e-12


def test_bdia_inverts_a_zero_terminal_snr_run_exactly(unet, noise):
    """From pure noise and back: bdia(ddim, 0.96)'s round trip on the zero-SNR table returns
    the noise bit for bit in float64, as on any other grid."""
    scheduler = _zero_snr_ddim()
    ode, grid = from_diffusers(unet, scheduler), diffusers_grid(scheduler, N_STEPS)
    solver = bdia.bdia("ddim", 0.96)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, grid, return_pair=True)
        back = bdia.invert(ode, solver, pair, grid)
    assert torch.isfinite(pair.later).all()
    assert torch.equal(back.earlier, noise)


def test_a_zero_terminal_snr_table_is_refused_where_its_end_cannot_be_reached(unet):
    """An epsilon model's data estimate divides by alpha = 0 at the table's end, and EDM
    space would hold its infinite noise level: both are refused in one line, before any unet
    call, naming the setting to change."""
    calls = Counter(unet)
    with pytest.raises(ValueError) as info:
        from_diffusers(unet, _zero_snr_ddim("epsilon"))
    _one_line_error(info, "prediction_type = 'epsilon'")
    assert "v_prediction" in str(info.value)
    with pytest.raises(ValueError) as info:
        from_diffusers(unet, _zero_snr_ddim(), space="edm")
    _one_line_error(info, "use space='vp'")
    with pytest.raises(ValueError, match="prediction_type = 'epsilon'"):
        diffusers_grid(_zero_snr_ddim("epsilon"), N_STEPS)
    assert calls.calls == 0


def test_ddim_in_edm_space_is_euler_to_float64_rounding(unet, noise):
    """DDIM is Euler in (sigma_bar, x / alpha): the EDM-space ODE of the same scheduler, sampled
    with 'euler' on its grid, gives the VP states divided by alpha to 1e-12 (measured ~1e-15).
    This checks the EDM-space model input x / sqrt(sigma^2 + 1) and the timestep of a noise
    level at float64 precision (the grid comes from the table, not from float32 sigmas)."""
    scheduler = f64(diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))
    vp = from_diffusers(unet, scheduler)
    vp_ts = diffusers_grid(scheduler, N_STEPS)
    edm = from_diffusers(unet, scheduler, space="edm")
    edm_ts = diffusers_grid(scheduler, N_STEPS, space="edm")
    expected = [vp.schedule.sigma_bar(float(t)) for t in vp_ts]
    assert edm_ts.tolist() == pytest.approx(expected, rel=1e-14, abs=0)
    with torch.no_grad():
        a = bdia.sample(vp, bdia.get_solver("ddim"), noise, vp_ts, trajectory=True, progress=False)
        start = noise / vp.schedule.alpha(float(vp_ts[0]))
        b = bdia.sample(
            edm, bdia.get_solver("euler"), start, edm_ts, trajectory=True, progress=False
        )
    for k, t in enumerate(vp_ts.tolist()):
        assert rel(b[k] * vp.schedule.alpha(t), a[k]) < 1e-12, k


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"use_karras_sigmas": True},
        {"timestep_type": "continuous", "prediction_type": "v_prediction"},
        {"final_sigmas_type": "sigma_min"},
        # SD 2's and SDXL's Euler configs. diffusers starts at init_noise_sigma =
        # sqrt(sigma_max^2 + 1) here; bdia_states started at sigma_max: 1.3e-4 apart.
        {"timestep_spacing": "leading", "steps_offset": 1},
    ],
    ids=["eps", "v", "x0", "karras", "continuous", "sigma_min", "leading"],
)
def test_euler_matches_euler_discrete_scheduler(unet, noise, config):
    """'euler' in EDM space is EulerDiscreteScheduler to 1e-6 relative (measured: up to 2.7e-7).

    Float32-level because diffusers keeps its sigmas in float32, computes the input scale
    (sigma^2 + 1)^0.5 and the v conversion in float32, and casts the sample to float32 in every
    step (rounding 6e-8 each, accumulated over 10 steps). The grid points themselves are
    diffusers' float32 sigmas, exactly.
    """
    scheduler = f64(diffusers.EulerDiscreteScheduler(**config))
    ref = diffusers_states(unet, scheduler, noise, N_STEPS)
    ours = bdia_states(unet, scheduler, "euler", noise, N_STEPS)
    # final_sigmas_type='sigma_min' repeats the last sigma (timestep 0's): diffusers' last step
    # has length 0, and bdia's grid leaves it out.
    assert len(ours) == len(ref) - ("final_sigmas_type" in config)
    assert rel(ours[-1], ref[-1]) < 1e-6
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-6, k


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_heun_matches_heun_discrete_scheduler(unet, noise, prediction_type):
    """'heun' in EDM space is HeunDiscreteScheduler to 1e-6 relative (measured: 4.9e-9 for
    epsilon, 5.7e-7 for v_prediction). diffusers interleaves the corrector's timesteps
    (every sigma after the first twice) and takes the last step to sigma = 0 as Euler, as bdia's
    heun does; its states after each corrector are compared. The sample stays float64 there, but
    the sigmas, the input scale and the v conversion are float32."""
    scheduler = f64(diffusers.HeunDiscreteScheduler(prediction_type=prediction_type))
    steps = 6
    ref = diffusers_states(unet, scheduler, noise, steps)
    ref = [ref[0], *ref[2::2], ref[-1]]  # skip the predictor states
    ode = from_diffusers(unet, scheduler)
    ts = diffusers_grid(scheduler, steps)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("heun"), noise * float(ts[0]), ts, trajectory=True, progress=False
        )
    assert len(ours) == len(ref) and ode.nfe == 2 * steps - 1
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-6, k


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpm_solver_pp_1_matches_dpm_solver_multistep(unet, noise, final_sigmas_type, spacing):
    """'dpm_solver_pp_1' is DPMSolverMultistepScheduler(solver_order=1, 'dpmsolver++') to 1e-6
    (measured: up to 2.2e-7) even with float64 tables: the scheduler keeps its sigmas in float32,
    computes alpha_t, sigma_t and h from them in float32, and casts the sample to float32 in
    every step. Any spacing works here: the scheduler steps to its next timestep."""
    scheduler = f64(
        diffusers.DPMSolverMultistepScheduler(
            solver_order=1,
            algorithm_type="dpmsolver++",
            final_sigmas_type=final_sigmas_type,
            timestep_spacing=spacing,
        )
    )
    ref = diffusers_states(unet, scheduler, noise, N_STEPS)
    ours = bdia_states(unet, scheduler, "dpm_solver_pp_1", noise, N_STEPS)
    assert len(ours) == len(ref)
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-6, k


@pytest.mark.parametrize("spacing", ["use_karras_sigmas", "use_lu_lambdas"])
def test_dpm_solver_grid_is_the_schedulers_sigmas(unet, spacing):
    """With Karras sigmas or lu lambdas, DPMSolverMultistepScheduler steps through sigmas
    that are not the table's at its (rounded) timesteps; the grid's noise levels are those
    sigmas, to their float32 rounding (1e-6 relative; measured 1.9e-8). With lu lambdas the
    grid used to come from the rounded timesteps: 3.6e-3 off at the second point."""
    scheduler = f64(
        diffusers.DPMSolverMultistepScheduler(
            solver_order=1, algorithm_type="dpmsolver++", **{spacing: True}
        )
    )
    ode = from_diffusers(unet, scheduler)
    levels = [ode.schedule.sigma_bar(t) for t in diffusers_grid(scheduler, N_STEPS).tolist()]
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(N_STEPS)
    assert levels == pytest.approx(reference.sigmas.double().tolist(), rel=1e-6, abs=0)


# ------------------------------------------------------- EDM-preconditioned schedulers

# Their defaults are Playground v2.5's settings: Karras sigmas from 80 to 0.002, sigma_data
# 0.5, epsilon (and for DPM-Solver++ order 2 and a final sigma of 0).
EDM_CLASSES = (diffusers.EDMEulerScheduler, diffusers.EDMDPMSolverMultistepScheduler)


@pytest.fixture(scope="module")
def unet32():
    return tiny_unet()


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_is_edm_euler_scheduler_bit_for_bit(
    unet32, noise, prediction_type, sigma_schedule, final_sigmas_type
):
    """'euler' on from_diffusers/diffusers_grid of EDMEulerScheduler is its loop bit for bit
    in float32, every state. The adapter forms c_in x, the timestep 0.25 log sigma and the
    denoiser c_skip x + c_out F with the scheduler's own float32 operations on its float32
    sigmas, and Euler's x + (sigma_next - sigma) (x - D) / sigma is the scheduler's step.
    With final_sigmas_type='sigma_min' diffusers' last step repeats sigma_min, a step of
    length 0 that leaves the state as it is, and bdia's grid leaves it out."""
    scheduler = diffusers.EDMEulerScheduler(
        prediction_type=prediction_type,
        sigma_schedule=sigma_schedule,
        final_sigmas_type=final_sigmas_type,
    )
    x = noise.float()
    ref = diffusers_states(unet32, scheduler, x, N_STEPS)
    ours = bdia_states(unet32, scheduler, "euler", x, N_STEPS)
    assert len(ours) == len(ref) - (final_sigmas_type == "sigma_min")
    for k in range(len(ours)):
        assert torch.equal(ours[k], ref[k]), k
    assert torch.equal(ours[-1], ref[-1])


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("rescale", [None, 0.7], ids=["plain", "rescaled"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_is_the_sdxl_pipeline_with_edm_euler_bit_for_bit(tmp_path, prediction_type, rescale):
    """StableDiffusionXLPipeline with EDMEulerScheduler (a Playground v2.5-style pipeline)
    under classifier-free guidance 5: its latents (output_type='latent') are bdia's 'euler'
    on from_diffusers(pipe.unet, pipe.scheduler, SDXL's conditioning) and diffusers_grid,
    bit for bit, from the pipeline's own start, noise * init_noise_sigma. With the pipeline's
    guidance_rescale too: the raw outputs rescaled before the preconditioning, in diffusers'
    order of operations."""
    pipe = tiny_playground_pipeline(
        tmp_path, diffusers.EDMEulerScheduler(prediction_type=prediction_type)
    )
    prompt, g = "a photo of a cat", 5.0
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = Counter(pipe.unet)
    with torch.no_grad():
        theirs = pipe(
            prompt,
            height=16,
            width=16,
            num_inference_steps=N_STEPS,
            guidance_scale=g,
            guidance_rescale=rescale or 0.0,
            latents=noise,
            output_type="latent",
        ).images
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device="cpu", do_classifier_free_guidance=True
        )
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    ode = from_diffusers(
        pipe.unet,
        pipe.scheduler,
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        guidance_scale=g,
        negative_cond={
            "encoder_hidden_states": negative,
            "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids},
        },
        guidance_rescale=rescale,
    )
    ts = diffusers_grid(pipe.scheduler, N_STEPS)
    start = noise * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), start, ts, progress=False)
    assert torch.equal(ours, theirs)
    assert calls.calls == 2 * N_STEPS and float(ts[-1]) == 0.0


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_pp_1_matches_edm_dpm_solver_multistep(
    unet32, noise, prediction_type, final_sigmas_type
):
    """'dpm_solver_pp_1' is EDMDPMSolverMultistepScheduler(solver_order=1) to 1e-6 relative
    (measured: up to 4.9e-7) in float32: diffusers forms sigma_t / sigma_s and exp(-h) - 1
    from float32 logs of its float32 sigmas, bdia in float64 from the same sigmas, and the
    two roundings of each step's coefficients accumulate. With final_sigmas_type='sigma_min'
    diffusers' last step goes from its Karras sigma_min to config.sigma_min, 2.3e-7 relative
    above it (the float32 rounding of its formula), which bdia's grid leaves out: its last
    state is compared with diffusers' last."""
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(
        solver_order=1, prediction_type=prediction_type, final_sigmas_type=final_sigmas_type
    )
    x = noise.float()
    ref = diffusers_states(unet32, scheduler, x, N_STEPS)
    ours = bdia_states(unet32, scheduler, "dpm_solver_pp_1", x, N_STEPS)
    assert len(ours) == len(ref) - (final_sigmas_type == "sigma_min")
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-6, k
    assert rel(ours[-1], ref[-1]) < 1e-6


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
@pytest.mark.parametrize("cls", EDM_CLASSES, ids=["euler", "dpm"])
def test_edm_grid_is_the_schedulers_sigmas(cls, sigma_schedule, final_sigmas_type):
    """The grid is the scheduler's float32 sigmas after set_timesteps, widened to float64
    unchanged (its first noise level 80, or 79.99998 for DPM-Solver's float32 Karras ramp),
    and its final 0. A final repeat of sigma_min (final_sigmas_type='sigma_min': exact for
    Euler, the same level to 2.3e-7 for DPM-Solver) is left out. A config read from disk,
    with _class_name, gives the same grid."""
    scheduler = cls(sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type)
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(N_STEPS)
    sigmas = reference.sigmas.double()
    ts = diffusers_grid(scheduler, N_STEPS)
    if final_sigmas_type == "zero":
        assert torch.equal(ts, sigmas) and float(ts[-1]) == 0.0
    else:
        assert torch.equal(ts, sigmas[:-1])
        assert float(ts[-1]) == pytest.approx(float(sigmas[-1]), rel=1e-6)
    assert ts.numel() == N_STEPS + (final_sigmas_type == "zero")
    read = {**scheduler.config, "_class_name": cls.__name__}
    assert torch.equal(diffusers_grid(read, N_STEPS), ts)


def _edm_guided(unet, prediction_type):
    scheduler = diffusers.EDMEulerScheduler(prediction_type=prediction_type)
    ode = from_diffusers(
        unet,
        scheduler,
        encoder_hidden_states=_embeds(1, 4),
        guidance_scale=5.0,
        negative_cond={"encoder_hidden_states": _embeds(1, 5)},
    )
    return ode, diffusers_grid(scheduler, N_STEPS)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_bdia_euler_round_trip_under_edm_preconditioning_is_exact(
    cond_unet, noise, prediction_type
):
    """bdia(euler, 0.96) samples the EDM-preconditioned ODE (float64 unet and state,
    guidance 5, Playground v2.5's Karras grid from 80 to 0, 10 steps) and invert returns the
    start: asserted to 1e-12 relative (float64 rounding), measured 0."""
    ode, ts = _edm_guided(cond_unet, prediction_type)
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    start = noise * float(ts[0])
    with torch.no_grad():
        pair = bdia.sample(ode, solver, start, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts, progress=False)
    assert rel(back.earlier, start) < 1e-12
    assert bool(torch.isfinite(pair.later).all())


def test_a_half_unet_gets_c_in_x_in_half_and_the_skip_path_stays_float32(noise):
    """A float16 unet under a float32 state: the ODE's model_dtype is float32, the unet gets
    c_in x in float16 at the float32 timestep 0.25 log sigma, and the denoiser c_skip x +
    c_out F is formed in float32 from the float32 state, bit for bit the formula by hand.
    Near the clean end c_skip is 1 and D is almost x: rounding x to float16 first, as the
    unet's model_dtype would, changes D by 3.1e-4 of max |D| here."""
    unet = tiny_unet().half()
    ode = from_diffusers(unet, diffusers.EDMEulerScheduler())
    assert ode.model_dtype == torch.float32 and ode.f.unet_dtype == torch.float16
    x = noise.float()
    sigma = torch.tensor(0.01, dtype=torch.float32)
    calls = []
    unet.register_forward_pre_hook(lambda m, args: calls.append(args))
    with torch.no_grad():
        got = ode.evaluate(float(sigma), x).denoised
        c_in = 1 / ((sigma**2 + 0.25) ** 0.5)
        tau = (0.25 * torch.log(sigma)).expand(BATCH)
        out = unet((x * c_in).half(), tau).sample.float()
        c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25) ** 0.5
        want = c_skip * x + c_out * out
    sample, timestep = calls[0]
    assert sample.dtype == torch.float16 and timestep.dtype == torch.float32
    assert torch.equal(timestep, tau)
    assert torch.equal(got, want)
    rounded = c_skip * x.half().float() + c_out * out
    assert rel(rounded, want) > 1e-4


@pytest.mark.parametrize(
    "scheduler, field",
    [
        # diffusers' EDM precondition_outputs raises for any other (at the first step).
        (
            lambda: diffusers.EDMDPMSolverMultistepScheduler(prediction_type="sample"),
            "prediction_type",
        ),
        (lambda: diffusers.EDMDPMSolverMultistepScheduler(thresholding=True), "thresholding"),
        (
            lambda: diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
            "algorithm_type",
        ),
        (lambda: diffusers.EDMEulerScheduler(sigma_data=0.0), "sigma_data"),
    ],
    ids=["sample", "thresholding", "sde", "sigma_data"],
)
def test_edm_configs_bdia_cannot_map_are_refused_before_any_unet_call(unet, scheduler, field):
    calls = Counter(unet)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet, scheduler())
    _one_line_error(exc_info, field)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet, diffusers.EDMEulerScheduler(), space="vp")
    _one_line_error(exc_info, "EDM-preconditioned")
    assert calls.calls == 0


def test_a_flow_transformer_with_an_edm_scheduler_is_refused_before_any_call():
    """SD3's transformer predicts a velocity at timestep sigma N; an EDM scheduler would
    call it on c_in x at 0.25 log sigma and read its output as an EDM network's."""
    transformer = tiny_sd3_transformer()
    calls = Counter(transformer)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(transformer, diffusers.EDMEulerScheduler())
    _one_line_error(exc_info, "EDMEulerScheduler is an EDM-preconditioned scheduler")
    assert calls.calls == 0


@pytest.mark.parametrize(
    "scheduler, steps, field",
    [
        # EDMEulerScheduler's one step with a final sigma_min goes from 80 to 80.
        (lambda: diffusers.EDMEulerScheduler(final_sigmas_type="sigma_min"), 1, "no step"),
        (lambda: diffusers.EDMEulerScheduler(sigma_min=100.0), N_STEPS, "sigma_min < sigma_max"),
        (
            lambda: diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
            N_STEPS,
            "algorithm_type",
        ),
    ],
    ids=["one_step", "sigma_min", "sde"],
)
def test_edm_grid_refusals_name_the_cause(scheduler, steps, field):
    with pytest.raises(ValueError) as exc_info:
        diffusers_grid(scheduler(), steps)
    _one_line_error(exc_info, field)
    # One step to a final 0 is a grid.
    assert diffusers_grid(diffusers.EDMEulerScheduler(), 1).tolist() == [80.0, 0.0]


# ------------------------------------------------------------------------- guidance


def _embeds(batch, seed):
    return torch.randn(
        batch, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def test_guidance_is_u_plus_g_times_c_minus_u_in_one_call(cond_unet, noise):
    """One evaluation = one unet call on [unconditional, conditional]; the output is
    u + g (c - u) of the two separate calls to float64 rounding. Embeddings of batch 1 are
    shared by the whole batch."""
    scheduler = f64(diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))
    positive, negative, g = _embeds(1, 4), _embeds(1, 5), 4.5
    ode = from_diffusers(
        cond_unet,
        scheduler,
        encoder_hidden_states=positive,
        guidance_scale=g,
        negative_cond={"encoder_hidden_states": negative},
    )
    assert set(ode.cond) == {"encoder_hidden_states", "guidance_scale", "negative_cond"}
    calls = Counter(cond_unet)
    t = float(diffusers_grid(scheduler, N_STEPS)[0])
    with torch.no_grad():
        e = ode.evaluate(t, noise)
        assert calls.calls == 1
        tau = torch.tensor(t * 1000 - 1)
        assert tau == 999
        u = cond_unet(noise, 999, encoder_hidden_states=negative.expand(BATCH, -1, -1)).sample
        c = cond_unet(noise, 999, encoder_hidden_states=positive.expand(BATCH, -1, -1)).sample
    assert rel(e.eps, u + g * (c - u)) < 1e-12


def test_inversion_under_guidance_is_exact(cond_unet, noise):
    """BDIA sampling and inversion under CFG: the guided model is a function of (x, t) only, so
    invert returns the starting noise to float64 rounding (< 1e-12 relative)."""
    scheduler = f64(diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))
    ode = from_diffusers(
        cond_unet,
        scheduler,
        encoder_hidden_states=_embeds(BATCH, 6),
        guidance_scale=7.5,
        negative_cond={"encoder_hidden_states": _embeds(1, 7)},
    )
    ts = diffusers_grid(scheduler, N_STEPS)
    solver = bdia.bdia(bdia.get_solver("ddim"), 0.9)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts, progress=False)
    assert rel(back.earlier, noise) < 1e-12


def test_guidance_scale_one_is_the_conditional_model(cond_unet, noise):
    scheduler = f64(diffusers.DDIMScheduler(clip_sample=False))
    positive = _embeds(1, 4)
    guided = from_diffusers(
        cond_unet,
        scheduler,
        encoder_hidden_states=positive,
        guidance_scale=1.0,
        negative_cond={"encoder_hidden_states": _embeds(1, 5)},
    )
    plain = from_diffusers(cond_unet, scheduler, encoder_hidden_states=positive)
    with torch.no_grad():
        assert torch.equal(guided.evaluate(0.5, noise).eps, plain.evaluate(0.5, noise).eps)


def test_learned_variance_takes_the_first_half(noise):
    """out_channels = 2 in_channels with variance_type 'learned_range': the prediction is the
    first half of the channels, as diffusers' pipelines take it."""
    unet6 = _unet(out_channels=6)
    scheduler = f64(diffusers.DDPMScheduler(clip_sample=False, variance_type="learned_range"))
    ode = from_diffusers(unet6, scheduler)
    assert ode.schedule.t_min == 0.0  # DDPM steps to alpha = 1 past timestep 0
    with torch.no_grad():
        e = ode.evaluate(0.5, noise)
        expected = unet6(noise, torch.tensor(499.0)).sample[:, :3]
    assert torch.equal(e.eps, expected)


def test_model_dtype_defaults_to_the_unets():
    """A float32 unet under a float64 state: the ODE runs the unet in float32."""
    unet32 = _unet().float()
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    ode = from_diffusers(unet32, scheduler)
    assert ode.model_dtype == torch.float32
    assert isinstance(ode.f, DiffusersModel)
    with torch.no_grad():
        e = ode.evaluate(0.5, torch.randn(BATCH, 3, 8, 8, dtype=torch.float64))
    assert e.eps.dtype == torch.float64
    assert from_diffusers(unet32, scheduler, model_dtype="float64").model_dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_conditioning_is_cast_to_the_unets_dtype(noise, dtype):
    """Embeddings in another dtype than the unet's (float64 here; float32 ones with a float16
    unet in practice), in both guidance branches: the floating conditioning is cast to the
    unet's dtype, as diffusers' pipelines pass it, and the prediction is that of embeddings
    cast by hand, bit for bit (the same unet inputs). Integer conditioning stays as it is.
    Before, torch raised a dtype error inside attention."""
    unet = tiny_unet(conditional=True, cross_attention_dim=8, seed=1, dtype=dtype)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 4, 8, generator=g, dtype=torch.float64)
    negative = torch.randn(1, 4, 8, generator=g, dtype=torch.float64)

    def guided(positive, negative, **extra):
        return from_diffusers(
            unet,
            scheduler,
            encoder_hidden_states=positive,
            guidance_scale=7.5,
            negative_cond={"encoder_hidden_states": negative},
            **extra,
        )

    ode = guided(embeds, negative, class_labels=torch.tensor([1]))
    assert ode.cond["encoder_hidden_states"].dtype == dtype
    assert ode.cond["negative_cond"]["encoder_hidden_states"].dtype == dtype
    assert ode.cond["class_labels"].dtype == torch.int64
    ode, by_hand = guided(embeds, negative), guided(embeds.to(dtype), negative.to(dtype))
    with torch.no_grad():
        assert torch.equal(ode.evaluate(0.5, noise).eps, by_hand.evaluate(0.5, noise).eps)


def test_a_config_mapping_builds_its_class(unet):
    scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    # As load_config or scheduler_config.json give it: the class name included.
    config = {**scheduler.config, "_class_name": "DDIMScheduler"}
    ode = from_diffusers(unet, config)
    assert repr(ode.schedule) == "VPDiscrete(N=1000)"
    assert torch.equal(diffusers_grid(config, 5), diffusers_grid(scheduler, 5))


def test_the_scheduler_is_left_as_it_was(unet):
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(7)
    before = (scheduler.timesteps.clone(), scheduler.sigmas.clone(), scheduler.num_inference_steps)
    from_diffusers(unet, scheduler)
    ts = diffusers_grid(scheduler, 12)
    assert len(ts) == 13
    assert torch.equal(scheduler.timesteps, before[0]) and torch.equal(scheduler.sigmas, before[1])
    assert scheduler.num_inference_steps == before[2] == 7
    fresh = diffusers.DDIMScheduler()
    diffusers_grid(fresh, 5)
    assert fresh.num_inference_steps is None


def test_grids_end_where_the_scheduler_ends():
    ddim_one = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ddim_min = diffusers.DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    assert diffusers_grid(ddim_one, 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert diffusers_grid(ddim_min, 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.001]
    # linspace: the next evaluated timestep (diffusers' DDIM would step to tau - N // n).
    linspace = diffusers.DDIMScheduler(timestep_spacing="linspace")
    assert diffusers_grid(linspace, 4).tolist() == [1.0, 0.667, 0.334, 0.001, 0.0]
    heun = diffusers.HeunDiscreteScheduler()
    heun.set_timesteps(4)
    assert diffusers_grid(heun, 4).tolist() == sorted(set(heun.sigmas.double().tolist()))[::-1]


# --------------------------------------------------------------------------- errors


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


@pytest.mark.parametrize(
    "scheduler, field",
    [
        (
            lambda: diffusers.DDIMScheduler(clip_sample=False, prediction_type="flow"),
            "prediction_type",
        ),
        (lambda: diffusers.DDIMScheduler(), "clip_sample"),
        (lambda: diffusers.DDIMScheduler(clip_sample=False, thresholding=True), "thresholding"),
        (
            lambda: diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="even"),
            "timestep_spacing",
        ),
        (
            lambda: diffusers.EulerDiscreteScheduler(interpolation_type="log_linear"),
            "interpolation_type",
        ),
        (lambda: diffusers.LCMScheduler(), "space="),
        (
            lambda: diffusers.DDIMScheduler(clip_sample=False, rescale_betas_zero_snr=True),
            "rescale_betas_zero_snr=True",
        ),
        # Euler puts 2^-24 where the zero-SNR table has 0: the table turns, not vanishes.
        (
            lambda: diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True),
            "rescale_betas_zero_snr=True",
        ),
        # Not "pass space=": a UNet does not go with a flow-matching scheduler, and no
        # space helps a scheduler without a noise table.
        (lambda: diffusers.FlowMatchEulerDiscreteScheduler(), "flow-matching"),
        # Consistency models' sampler: EDM-preconditioned too, but not an ODE solver.
        (lambda: diffusers.CMStochasticIterativeScheduler(), "no alphas_cumprod noise table"),
    ],
    ids=[
        "prediction",
        "clip",
        "threshold",
        "spacing",
        "interpolation",
        "unknown",
        "zero_snr",
        "zero_snr_euler",
        "flow",
        "consistency",
    ],
)
def test_bad_scheduler_configs_are_refused_before_any_unet_call(unet, scheduler, field):
    calls = Counter(unet)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet, scheduler())
    _one_line_error(exc_info, field)
    assert calls.calls == 0


@pytest.mark.parametrize(
    "scheduler, field",
    [
        (diffusers.CMStochasticIterativeScheduler, "flow-matching or EDM-preconditioned"),
        (lambda: diffusers.EulerDiscreteScheduler(rescale_betas_zero_snr=True), "zero_snr"),
    ],
    ids=["consistency", "zero_snr_euler"],
)
def test_diffusers_grid_refusals_name_the_cause(scheduler, field):
    with pytest.raises(ValueError) as exc_info:
        diffusers_grid(scheduler(), N_STEPS)
    _one_line_error(exc_info, field)


@pytest.mark.parametrize(
    "scheduler, field",
    [
        (diffusers.EulerDiscreteScheduler, "sigma_min"),
        (diffusers.EulerDiscreteScheduler, "sigma_max"),
        (diffusers.UniPCMultistepScheduler, "sigma_min"),
        (diffusers.UniPCMultistepScheduler, "sigma_max"),
    ],
    ids=["euler_min", "euler_max", "unipc_min", "unipc_max"],
)
def test_karras_sigmas_past_the_table_are_refused_by_the_grid(scheduler, field):
    """Karras sigmas bounded by the config's sigma_min = 0.002 or sigma_max = 200 run past
    the table's noise levels [0.0100, 157.4], where the unet has no timestep (diffusers
    clamps it to 0 or N - 1). The grid used to keep them: in EDM space sampling failed at the
    first such level, after the unet calls above it; in VP space the unet saw timestep -0.96."""
    if field not in inspect.signature(scheduler.__init__).parameters:
        # Before diffusers took these fields (UniPC in 0.30), Karras sigmas span the table.
        pytest.skip(f"{scheduler.__name__} of diffusers {diffusers.__version__} has no {field}")
    bound = {"sigma_min": 0.002, "sigma_max": 200.0}[field]
    with pytest.raises(ValueError) as exc_info:
        diffusers_grid(scheduler(use_karras_sigmas=True, **{field: bound}), N_STEPS)
    _one_line_error(exc_info, field)


def test_continuous_timesteps_take_karras_sigmas_past_the_table(unet, noise):
    """With timestep_type='continuous' (and v_prediction) the unet's timestep is
    0.25 log(sigma), defined at every noise level: sigmas past the table (CosXL-style
    sigma_min = 0.002, sigma_max = 120) are its grid, and sampling runs through them as
    EulerDiscreteScheduler does, to its float32 rounding (1e-6 relative, measured 4.8e-7; see
    test_euler_matches_euler_discrete_scheduler)."""

    def scheduler():
        return f64(
            diffusers.EulerDiscreteScheduler(
                timestep_type="continuous",
                prediction_type="v_prediction",
                use_karras_sigmas=True,
                sigma_min=0.002,
                sigma_max=120.0,
            )
        )

    ts = diffusers_grid(scheduler(), 4)
    assert float(ts[0]) == pytest.approx(120.0, rel=1e-6)
    assert float(ts[-2]) == pytest.approx(0.002, rel=1e-6)
    ode = from_diffusers(unet, scheduler())
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), noise * float(ts[0]), ts, progress=False)
    assert bool(torch.isfinite(out).all()) and ode.nfe == 4
    ref = diffusers_states(unet, scheduler(), noise, 4)
    ours = bdia_states(unet, scheduler(), "euler", noise, 4)
    assert len(ours) == len(ref) == 5
    for k in range(len(ours)):
        assert rel(ours[k], ref[k]) < 1e-6, k


def test_clip_sample_error_says_how_to_turn_it_off(unet):
    with pytest.raises(ValueError, match=r"DDIMScheduler.from_config\(scheduler.config, clip"):
        from_diffusers(unet, diffusers.DDIMScheduler())


def test_unknown_class_runs_with_space_given(unet, noise):
    ode = from_diffusers(unet, diffusers.LCMScheduler(), space="vp")
    assert ode.schedule.t_min == 0.0
    with pytest.raises(ValueError, match="space must be"):
        from_diffusers(unet, diffusers.LCMScheduler(), space="ve")


def test_bad_unet_and_guidance_are_refused_before_any_unet_call(unet, noise):
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    unet6 = _unet(out_channels=6)
    calls, calls6 = Counter(unet), Counter(unet6)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet6, scheduler)
    _one_line_error(exc_info, "out_channels")
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet, scheduler, guidance_scale=5.0)
    _one_line_error(exc_info, "negative_cond")
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet, scheduler, negative_cond={"class_labels": torch.zeros(1)})
    _one_line_error(exc_info, "guidance_scale")
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(unet, scheduler, timestep=3)
    _one_line_error(exc_info, "timestep")
    # At call time: a state with the wrong number of channels, a conditioning batch that fits
    # neither 1 nor the state's.
    ode = from_diffusers(unet, scheduler)
    ts = diffusers_grid(scheduler, 3)
    with pytest.raises(ValueError) as exc_info:
        bdia.sample(ode, bdia.get_solver("ddim"), noise[:, :2], ts, progress=False)
    _one_line_error(exc_info, "in_channels")
    ode = from_diffusers(unet, scheduler, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError) as exc_info:
        bdia.sample(ode, bdia.get_solver("ddim"), noise, ts, progress=False)
    _one_line_error(exc_info, "class_labels")
    assert calls.calls == calls6.calls == 0


def test_a_model_output_of_the_wrong_shape_is_named(noise):
    """A module with diffusers' call contract that returns the wrong shape."""

    def half(sample, timestep, **kwargs):
        return (sample[:, :1],)

    ode = from_diffusers(half, diffusers.DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError) as exc_info:
        ode.evaluate(0.5, noise)
    _one_line_error(exc_info, "out_channels")


def test_edm_noise_levels_outside_the_table_are_refused(unet, noise):
    ode = from_diffusers(unet, diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError) as exc_info:
        ode.evaluate(500.0, noise)
    _one_line_error(exc_info, "noise range")


# ----------------------------------------------------------------------- packaging


def test_missing_diffusers_names_the_extra(monkeypatch):
    for name in ("bdia.integrations.diffusers", "bdia.integrations.diffusers.adapter"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'bdia\[diffusers\]'"):
        importlib.import_module("bdia.integrations.diffusers")


@pytest.mark.slow  # another process: its start costs seconds on busy cores
def test_core_package_does_not_import_integrations():
    result = run_child(
        ["-c", "import sys, bdia; print(sorted(m for m in sys.modules if 'diffusers' in m))"],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_guidance_distilled_unet_needs_its_timestep_cond():
    """A UNet with time_cond_proj_dim (LCM's) takes its guidance scale as timestep_cond and,
    without it, runs as another network without a word: refused in one line before any
    call. Given, it reaches the UNet: the ODE's model equals the UNet called with it."""
    unet = tiny_unet(conditional=True, channels=4, cross_attention_dim=16, time_cond_proj_dim=8)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    embeds = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
    calls = Counter(unet)
    with pytest.raises(ValueError, match=r"time_cond_proj_dim = 8 .*timestep_cond") as info:
        from_diffusers(unet, scheduler, encoder_hidden_states=embeds)
    assert "\n" not in str(info.value) and calls.calls == 0
    w = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    ode = from_diffusers(unet, scheduler, encoder_hidden_states=embeds, timestep_cond=w)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = diffusers_grid(scheduler, 10)[3].item()
    with torch.no_grad():
        got = ode.evaluate(t, x).eps
        tau = round(t * 1000 - 1)
        want = unet(
            x, tau, encoder_hidden_states=embeds.expand(2, -1, -1), timestep_cond=w.expand(2, -1)
        ).sample
        without = unet(x, tau, encoder_hidden_states=embeds.expand(2, -1, -1)).sample
    assert torch.equal(got, want)
    assert not torch.equal(want, without)  # the embedding changes the prediction
