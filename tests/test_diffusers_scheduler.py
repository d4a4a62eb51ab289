"""BDIAScheduler / BDIAInverseScheduler: diffusers pipelines give bdia.sample's numbers.

A tiny randomly initialised UNet2DModel in float32. The scheduler replays each model output
through the ODE that from_diffusers builds and takes BidirectionalWrapper.step, so
a pipeline run and bdia.sample make the same float operations on the same inputs: the tests
ask for bitwise equality (measured difference 0), and the inverse returns the pipeline's
starting noise exactly (measured 0; two-word states).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import diffusers
import numpy as np
import pytest
import torch
from conftest import device_reads, fake_mps
from diffusers.utils.torch_utils import randn_tensor

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIARestartWarning,
    BDIAScheduler,
    BDIASchedulerOutput,
    BDIASchedulerPair,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import SD_NOISE_TABLE, tiny_text_to_image_pipeline, tiny_unet

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 10
_DIFFUSERS = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
BATCH = 2
SHAPE = (BATCH, 3, 8, 8)
GAMMA = 0.9


def _unet(dtype=torch.float32):
    return tiny_unet(dtype=dtype)


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _noise(seed, dtype=torch.float32):
    """The noise the pipelines draw from ``torch.Generator().manual_seed(seed)``."""
    return randn_tensor(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _postprocess(x):
    return (x / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def _run_pipeline(pipe, seed=0, output_type="np"):
    """The pipeline's images as a (BATCH, C, H, W) tensor.

    ``"np"`` works in every diffusers release this package supports: the pipeline's float32
    images, moved to channels-last numpy, which this moves back (the same numbers).
    ``"pt"`` (diffusers 0.41 and later) returns the tensor itself, in the unet's dtype.
    """
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=BATCH,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=STEPS,
        output_type=output_type,
    )
    if output_type == "np":
        return torch.from_numpy(out.images).permute(0, 3, 1, 2)
    return out.images


@torch.no_grad()
def _invert_loop(unet, config, pair, dtype=None):
    inv = BDIAInverseScheduler.from_config(config)
    inv.set_timesteps(STEPS)
    x = inv.begin(pair, dtype=dtype)
    for t in inv.timesteps:
        x = inv.step(unet(x, t).sample, t, x).prev_sample
    return inv, x


def _max_abs(a, b):
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------ pipeline parity


@pytest.mark.parametrize("set_alpha_to_one", [True, False], ids=["alpha1", "alpha0"])
@pytest.mark.parametrize(
    "spacing",
    [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)],
    ids=["leading", "offset", "trailing", "linspace"],
)
def test_ddim_pipeline_is_bdia_sample_and_inverts_exactly(unet, spacing, set_alpha_to_one):
    """DDIMPipeline with BDIAScheduler gives bdia.sample's images bit for bit (measured max
    difference 0 in every case: the same float32 operations on the same unet outputs), and
    final_pair is sample's return_pair, low words included. Inverting it with
    BDIAInverseScheduler (unet calls in a loop) and with bdia.invert returns the pipeline's
    noise exactly (measured 0), and the two inversions agree bit for bit."""
    timestep_spacing, steps_offset = spacing
    ddim = diffusers.DDIMScheduler(
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
    )
    pipe = diffusers.DDIMPipeline(unet, ddim)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    images = _run_pipeline(pipe)

    noise = _noise(0)
    ode = from_diffusers(unet, ddim)
    ts = diffusers_grid(ddim, STEPS)
    solver = bdia.bdia("ddim", GAMMA)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
    assert torch.equal(images, _postprocess(pair.later))

    final = pipe.scheduler.final_pair
    for field in ("earlier", "later", "earlier_low", "later_low"):
        assert torch.equal(getattr(final, field), getattr(pair, field)), field
    assert final.later.dtype == torch.float32

    inv, x = _invert_loop(unet, pipe.scheduler.config, final)
    assert len(inv.timesteps) == len(ts) - 2  # the pair holds the last two states
    assert torch.equal(inv.pair.earlier, noise)
    assert torch.equal(x, noise)
    with torch.no_grad():
        back = bdia.invert(ode, solver, final, ts, progress=False)
    assert torch.equal(back.earlier, inv.pair.earlier)
    assert torch.equal(back.later, inv.pair.later)


def test_ddpm_pipeline_takes_the_scheduler(unet):
    """DDPMPipeline (step(model_output, t, image, generator=...)) with a BDIAScheduler built
    from a DDPMScheduler config is bdia.sample on that scheduler's table and grid: bit for
    bit (measured 0). DDPM ends at alpha = 1, as BDIAScheduler's default set_alpha_to_one."""
    ddpm = diffusers.DDPMScheduler(clip_sample=False)
    pipe = diffusers.DDPMPipeline(unet, ddpm)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    images = _run_pipeline(pipe, seed=1)

    noise = _noise(1)
    with torch.no_grad():
        pair = bdia.sample(
            from_diffusers(unet, ddpm),
            bdia.bdia("ddim", GAMMA),
            noise,
            diffusers_grid(ddpm, STEPS),
            return_pair=True,
            progress=False,
        )
    assert torch.equal(images, _postprocess(pair.later))
    _, x = _invert_loop(unet, pipe.scheduler.config, pipe.scheduler.final_pair)
    assert torch.equal(x, noise)


@pytest.mark.skipif(
    _DIFFUSERS < (0, 41),
    reason="DDIMPipeline returns bfloat16 images only as tensors (output_type='pt', 0.41+)",
)
def test_half_precision_unet_keeps_a_float32_state():
    """With a bfloat16 unet the pipeline's latents are bfloat16 while the scheduler keeps a
    float32 state (plus low words): the images are bdia.sample's with a float32 state and
    model_dtype bfloat16, cast down (bit for bit), and the inverse, fed bfloat16 inputs by
    begin(pair, dtype=torch.bfloat16), returns the bfloat16 noise to the two-word precision.

    A float32 two-word round trip is exact to a few u^2 of the state times its low words' growth
    while the passes agree on the high words (docs/theory.md), not bitwise: an error of that
    size is absorbed by rounding to float32 wherever the noise is not near zero, but a noise
    value of 0 comes back as the error itself (measured 2.4e-14 for one element with torch 2.11;
    0 with 2.13, where rounding happened to fall the other way). Hence a bound everywhere and
    bitwise equality where a float32 ulp exceeds it."""
    unet = _unet(torch.bfloat16)
    ddim = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = diffusers.DDIMPipeline(unet, ddim)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    images = _run_pipeline(pipe, seed=2, output_type="pt")
    assert images.dtype == torch.bfloat16

    noise = _noise(2, torch.bfloat16).float()
    with torch.no_grad():
        pair = bdia.sample(
            from_diffusers(unet, ddim),
            bdia.bdia("ddim", GAMMA),
            noise,
            diffusers_grid(ddim, STEPS),
            return_pair=True,
            progress=False,
        )
    assert torch.equal(images, _postprocess(pair.later.to(torch.bfloat16)))
    final = pipe.scheduler.final_pair
    assert final.later.dtype == torch.float32
    assert torch.equal(final.later, pair.later)
    inv, x = _invert_loop(unet, pipe.scheduler.config, final, dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16
    # 1e-12 is about 280 u^2 (u = 2^-24) for a state of unit size: room for a low-word growth
    # of about 100 over 10 steps. From |noise| >= 2^-12 on, half a float32 ulp (at least 2^-37,
    # 7e-12) is larger, so the recovered high word must be the noise there, bit for bit.
    recovered = inv.pair.earlier
    assert _max_abs(recovered, noise) <= 1e-12
    away_from_zero = noise.abs() >= 2.0**-12
    assert away_from_zero.float().mean() > 0.99
    assert torch.equal(recovered[away_from_zero], noise[away_from_zero])


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_predictions_match_bdia_sample(unet, prediction_type):
    """v and x0 predictions go through the same conversion as in bdia.sample (measured 0)."""
    ddim = diffusers.DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    sched = BDIAScheduler.from_config(ddim.config, gamma=GAMMA)
    sched.set_timesteps(STEPS)
    x = noise = _noise(3)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        ref = bdia.sample(
            from_diffusers(unet, ddim),
            bdia.bdia("ddim", GAMMA),
            noise,
            diffusers_grid(ddim, STEPS),
            progress=False,
        )
    assert torch.equal(x, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_zero_terminal_snr_config_runs_from_pure_noise_and_back(unet, dtype):
    """rescale_betas_zero_snr=True with v-prediction and trailing timesteps, as zero-SNR
    models run: the loop starts at the table's last timestep, pure noise, and is
    bdia.sample's run of bdia(ddim, gamma) bit for bit; the inverse scheduler brings the
    noise back bit for bit (float32 state and float16 latents alike: two words)."""
    ddim = diffusers.DDIMScheduler(
        clip_sample=False,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    sched = BDIAScheduler.from_config(ddim.config, gamma=GAMMA)
    sched.set_timesteps(STEPS)
    assert int(sched.timesteps[0]) == 999
    noise = _noise(4)
    x = noise.to(dtype)
    net = copy.deepcopy(unet).to(dtype)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t).sample, t, x).prev_sample
        ref = bdia.sample(
            from_diffusers(net, ddim),
            bdia.bdia("ddim", GAMMA),
            noise.to(dtype).float(),
            diffusers_grid(ddim, STEPS),
            return_pair=True,
            progress=False,
        )
        assert torch.equal(sched.final_pair.later, ref.later)
        inv = BDIAInverseScheduler.from_config(sched.config)
        inv.set_timesteps(STEPS)
        z = inv.begin(sched.final_pair, dtype=dtype)
        for t in inv.timesteps:
            z = inv.step(net(z, t).sample, t, z).prev_sample
    assert torch.equal(inv.pair.earlier, noise.to(dtype).float())


def _tiny_stable_diffusion(tmp_path):
    """A StableDiffusionPipeline of tiny random parts, with SD 1.5's scheduler config (a
    PNDMScheduler: leading spacing, steps_offset 1, set_alpha_to_one False)."""
    scheduler = diffusers.PNDMScheduler(
        **SD_NOISE_TABLE,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return tiny_text_to_image_pipeline(tmp_path, scheduler)


@torch.no_grad()
def _invert_guided(pipe, prompt, guidance, latents_dtype):
    """The docs' inverse loop: the unet called as the pipeline calls it (batch [uncond,
    cond], then u + g (c - u)), from the pipeline scheduler's final_pair."""
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    embeds = torch.cat([uncond, cond])
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    x = inverse.begin(pipe.scheduler.final_pair, dtype=latents_dtype)
    for t in inverse.timesteps:
        out = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=embeds).sample
        u, c = out.chunk(2)
        x = inverse.step(u + guidance * (c - u), t, x).prev_sample
    return inverse


def _latents(pipe, prompt, guidance, **inputs):
    """The pipeline's latents after STEPS steps from seed 0 (inputs: the image's size, or
    the image and strength of img2img)."""
    return pipe(
        prompt,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **inputs,
    ).images


def test_stable_diffusion_pipeline_with_guidance_inverts_exactly(tmp_path):
    """The docs' recipe on a tiny StableDiffusionPipeline: guidance 7.5, the scheduler built
    from SD 1.5's (PNDM) config. The latents the pipeline returns are final_pair.later, and
    the inverse loop, calling the unet as the pipeline does (batch [uncond, cond], then
    u + g (c - u)), returns the pipeline's starting noise exactly (measured 0)."""
    pipe = _tiny_stable_diffusion(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    prompt, guidance = "a fox", 7.5
    latents = _latents(pipe, prompt, guidance, height=16, width=16)
    assert torch.equal(latents, pipe.scheduler.final_pair.later)
    noise = randn_tensor(latents.shape, generator=torch.Generator().manual_seed(0))
    inverse = _invert_guided(pipe, prompt, guidance, latents.dtype)
    assert torch.equal(inverse.pair.earlier, noise)


def test_config_rewritten_by_the_pipeline_is_followed(tmp_path):
    """StableDiffusionPipeline.__init__ rewrites steps_offset to 1 in the scheduler's config
    (with a deprecation warning). The scheduler steps on the timesteps of that config, which
    DDIMScheduler and the inverse built from it also use, so the docs' inverse loop returns
    the noise exactly (measured 0). Before, it kept its offset-0 timesteps and the inverse
    (offset 1) came back up to 19 off."""
    parts = _tiny_stable_diffusion(tmp_path).components
    sched = BDIAScheduler(
        **SD_NOISE_TABLE,
        set_alpha_to_one=False,
        steps_offset=0,
        gamma=GAMMA,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the pipeline's steps_offset notice
        pipe = diffusers.StableDiffusionPipeline(**{**parts, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.steps_offset == 1
    ddim = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    ddim.set_timesteps(STEPS)
    pipe.scheduler.set_timesteps(STEPS)
    assert pipe.scheduler.timesteps.tolist() == ddim.timesteps.tolist()

    prompt, guidance = "a fox", 7.5
    latents = _latents(pipe, prompt, guidance, height=16, width=16)
    noise = randn_tensor(latents.shape, generator=torch.Generator().manual_seed(0))
    inverse = _invert_guided(pipe, prompt, guidance, latents.dtype)
    assert torch.equal(inverse.pair.earlier, noise)


def test_register_to_config_is_followed_and_a_change_mid_run_refused(unet):
    """A field set with register_to_config after __init__ reaches set_timesteps (the noise
    table too), a refused value is refused there, and a change after set_timesteps stops the
    next step with a one-line error naming the field."""
    sched = BDIAScheduler()
    sched.register_to_config(timestep_spacing="trailing", beta_schedule="scaled_linear")
    sched.set_timesteps(5)
    ddim = diffusers.DDIMScheduler(
        clip_sample=False, timestep_spacing="trailing", beta_schedule="scaled_linear"
    )
    ddim.set_timesteps(5)
    assert sched.timesteps.tolist() == ddim.timesteps.tolist()
    assert torch.equal(sched.alphas_cumprod, ddim.alphas_cumprod)

    x = _noise(8)
    t = sched.timesteps[0]
    sched.register_to_config(steps_offset=1)
    with pytest.raises(ValueError, match=r"config changed after set_timesteps \(steps_offset\)"):
        sched.step(x, t, x)
    sched.register_to_config(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample = True") as info:
        sched.set_timesteps(5)
    assert "\n" not in str(info.value)


def test_timesteps_outside_the_noise_table_are_refused():
    """Leading spacing with steps_offset 1 and 1000 steps gives timestep 1000, past the
    table's 999: DDIM itself fails there with an IndexError, and the grid would be
    extrapolated (t = 1.001). Refused in one line; 999 steps are fine."""
    for make in (BDIAScheduler, BDIAInverseScheduler):
        sched = make(steps_offset=1, set_alpha_to_one=False)
        with pytest.raises(ValueError, match="timestep 1000 .* outside the noise table") as info:
            sched.set_timesteps(1000)
        assert "\n" not in str(info.value)
        sched.set_timesteps(999)
        assert int(sched.timesteps.max()) <= 999
    ddim = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    with pytest.raises(ValueError, match="timestep 1000 .* outside the noise table"):
        diffusers_grid(ddim, 1000)


# ------------------------------------------------------------------ the start of a run


def _recorded_img2img(tmp_path):
    """The tiny StableDiffusionImg2ImgPipeline with BDIAScheduler(gamma=GAMMA), and the list
    its steps fill with a copy of each sample they are given (in its own layout)."""
    parts = _tiny_stable_diffusion(tmp_path).components
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    samples = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        samples.append(sample.clone(memory_format=torch.preserve_format))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    return pipe, samples


def test_img2img_run_inverts_back_to_its_start(tmp_path):
    """img2img with strength 0.5 runs the last 5 of 10 timesteps. final_pair records where
    the run began, the inverse stops there, and inverse.pair.earlier is the noised image
    latents the run started from, exactly (measured 0). Before, the loop ran on over the
    timesteps the run never took, to an error of 10 at timestep 800."""
    pipe, samples = _recorded_img2img(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt, guidance = "a fox", 7.5
    latents = _latents(pipe, prompt, guidance, image=image, strength=0.5)
    pair = pipe.scheduler.final_pair
    assert pipe.scheduler.start_index == pair.start_index == STEPS // 2
    assert torch.equal(pair.later, latents)
    inverse = _invert_guided(pipe, prompt, guidance, latents.dtype)
    assert inverse.start_index == STEPS // 2
    assert len(inverse.timesteps) == STEPS // 2 - 1
    assert torch.equal(inverse.pair.earlier, samples[0])
    with pytest.raises(ValueError, match="the inversion is done"):
        inverse.step(latents, inverse.timesteps[-1], inverse.pair.earlier)


def test_an_img2img_run_on_a_picture_inverts_with_bdia_invert_too(tmp_path):
    """img2img of a picture whose pixels were permuted to channels first (as diffusers reads a
    PIL image): with diffusers 0.42 its latents come channels_last from the VAE, and a
    unet's output can depend on its input's layout. The scheduler hands the pipeline its
    states in the standard layout, as bdia's ODE hands every call, so the pipeline's final
    pair inverts to the run's start bit for bit both through the inverse scheduler's loop
    and through bdia.invert on from_diffusers' ODE. (Before, the pipeline stepped on
    channels_last latents throughout and bdia.invert came back 5.8e-6 off.)"""
    pipe, samples = _recorded_img2img(tmp_path)
    # The picture as channels first, in [0, 1], as a PIL image's array permuted to it is.
    pixels = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    picture = pixels.permute(0, 3, 1, 2)
    prompt, guidance = "a fox", 7.5
    _latents(pipe, prompt, guidance, image=picture, strength=0.5)
    # The picture's latents, noised, are channels_last with diffusers 0.42 (contiguous with
    # 0.34, where the layouts cannot differ); the scheduler's states never are.
    assert all(x.is_contiguous() for x in samples[1:])
    inverse = _invert_guided(pipe, prompt, guidance, samples[0].dtype)
    assert torch.equal(inverse.pair.earlier, samples[0])
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    negative = {"encoder_hidden_states": uncond}
    ode = from_diffusers(
        pipe.unet,
        pipe.scheduler,
        encoder_hidden_states=cond,
        guidance_scale=guidance,
        negative_cond=negative,
    )
    pair = pipe.scheduler.final_pair
    ts = diffusers_grid(pipe.scheduler, STEPS)[pair.start_index :]
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia("ddim", GAMMA), pair, ts, progress=False)
    assert torch.equal(back.earlier, samples[0])


def test_begin_takes_the_start_of_a_run_on_the_grid_tail(unet):
    """A bdia.sample pair made on grid[3:] carries no start: begin(pair, start_index=3)
    inverts it back to its start (measured 0), as bdia.invert on grid[3:] does. A start_index
    that contradicts the pair's, or lies outside the run, is refused in one line."""
    sched = BDIAScheduler(gamma=GAMMA)
    ode = from_diffusers(unet, sched)
    grid = diffusers_grid(sched, STEPS)
    solver = bdia.bdia("ddim", GAMMA)
    start = _noise(9)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, start, grid[3:], return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, grid[3:], progress=False)
    inverse = BDIAInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(STEPS)
    x = inverse.begin(pair, start_index=3)
    assert len(inverse.timesteps) == STEPS - 4
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(unet(x, t).sample, t, x).prev_sample
    assert torch.equal(inverse.pair.earlier, start)
    assert torch.equal(back.earlier, start)

    recorded = BDIASchedulerPair(pair.earlier, pair.later, start_index=3)
    inverse.begin(recorded)
    assert inverse.start_index == 3
    with pytest.raises(ValueError, match="records that its run began at index 3") as mismatch:
        inverse.begin(recorded, start_index=2)
    with pytest.raises(ValueError, match=r"start_index = 10 is not a step") as outside:
        inverse.begin(pair, start_index=10)
    assert "\n" not in str(mismatch.value) + str(outside.value)


def test_pairs_record_their_grid_times_and_begin_refuses_another_grid(unet, tmp_path):
    """final_pair records (grid[-2], grid[-1]) and the inverse's pair the times it sits at,
    so bdia.sample and bdia.invert accept them on the run's grid; torch.save and torch.load
    (weights_only) keep every field. A pair from a run of
    another step count is refused by begin in one line: its states are not at this grid's
    times, and inverting it anyway returns noise that is wrong without a sign. (Trailing
    spacing: under leading spacing every step count ends on the same two times, which the
    pair cannot tell apart.)"""
    ddim = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = diffusers.DDIMPipeline(unet, ddim)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    _run_pipeline(pipe)
    final = pipe.scheduler.final_pair
    grid = pipe.scheduler.grid
    assert final.times == (grid[-2], grid[-1])
    torch.save(final, tmp_path / "pair.pt")  # torch.load's default weights_only reads it back
    loaded = torch.load(tmp_path / "pair.pt")
    assert isinstance(loaded, BDIASchedulerPair) and loaded.start_index == final.start_index
    assert loaded.times == final.times and torch.equal(loaded.later_low, final.later_low)
    # Compared by value like every pair (the dataclass's own __eq__ compared tuples of
    # tensors and raised), start_index included; and, holding tensors, not hashable.
    assert loaded == final and not loaded != final
    assert dataclasses.replace(final, start_index=final.start_index + 1) != final
    with pytest.raises(TypeError, match="unhashable"):
        hash(final)

    inv, _ = _invert_loop(unet, pipe.scheduler.config, final)
    assert inv.pair.times == (grid[0], grid[1])
    assert torch.equal(inv.pair.earlier, _noise(0))
    ode = from_diffusers(unet, pipe.scheduler)
    with torch.no_grad():  # the inverse's pair starts bdia.sample on the same grid
        again = bdia.sample(ode, bdia.bdia("ddim", GAMMA), inv.pair, grid, progress=False)
    assert torch.equal(again, final.later)

    other = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    other.set_timesteps(STEPS - 2)
    with pytest.raises(ValueError, match="pair was made at t = ") as refused:
        other.begin(final)
    assert "\n" not in str(refused.value)


def test_pairs_record_their_gamma_and_begin_refuses_an_inverse_of_another(unet):
    """final_pair records the solver (gamma included) that made it, as bdia.sample's pair
    does. An inverse scheduler built with another gamma (from the DDIM config the forward
    one came from, whose gamma is the default 0.96) inverted it to noise that was wrong
    without a sign; begin refuses it in one line that names both, and so do bdia.invert
    and bdia.sample with the inverse's pair."""
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DDIMPipeline(unet, ddim)
    pipe.scheduler = BDIAScheduler.from_config(ddim.config, gamma=GAMMA)
    _run_pipeline(pipe)
    final = pipe.scheduler.final_pair
    assert final.solver == bdia.bdia("ddim", GAMMA).identity == "bdia(ddim, gamma=0.9)"
    for inverse in (
        BDIAInverseScheduler.from_config(ddim.config),
        BDIAInverseScheduler.from_config(pipe.scheduler.config, gamma=0.5),
    ):
        inverse.set_timesteps(STEPS)
        other = bdia.bdia("ddim", inverse.config["gamma"]).identity
        with pytest.raises(ValueError) as refused:
            inverse.begin(final)
        message = str(refused.value)
        assert f"the begin pair was made by bdia(ddim, gamma=0.9), not by {other}" in message
        assert "BDIAInverseScheduler.from_config(pipe.scheduler.config)" in message
        assert "\n" not in message and inverse.pair is None
    inv, x = _invert_loop(unet, pipe.scheduler.config, final)
    assert inv.pair.solver == final.solver and torch.equal(x, _noise(0))
    ode, grid = from_diffusers(unet, pipe.scheduler), pipe.scheduler.grid
    with torch.no_grad(), pytest.raises(ValueError, match="made by bdia.ddim, gamma=0.9., not"):
        bdia.invert(ode, bdia.bdia("ddim", 0.96), final, grid, progress=False)
    with torch.no_grad(), pytest.raises(ValueError, match="made by bdia.ddim, gamma=0.9., not"):
        bdia.sample(ode, bdia.bdia("ddim", 0.96), inv.pair, grid, progress=False)


# ------------------------------------------------------------------ restarts


def test_changed_latents_restart_the_recursion_with_a_warning(unet):
    """A loop that changes the latents between steps (in place, on the returned tensor)
    restarts the recursion there with one BDIARestartWarning; the run then continues as
    bdia.sample from the changed state on the rest of the grid (bit for bit), and its
    final_pair records the last restart as its start."""
    sched = BDIAScheduler(gamma=GAMMA)
    sched.set_timesteps(STEPS)
    x = _noise(4)
    changed, states = None, []
    with torch.no_grad(), pytest.warns(BDIARestartWarning, match="changed the latents") as seen:
        for i, t in enumerate(sched.timesteps):
            if i in (4, 7):
                x.mul_(1.01)
                changed = x.clone() if changed is None else changed
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            states.append(x.clone())
    assert sched.restarts == [int(sched.timesteps[4]), int(sched.timesteps[7])]
    # The warning names the inpainting pipelines that blend, of every family mapped.
    warned = [w for w in seen if issubclass(w.category, BDIARestartWarning)]
    message = " ".join(str(warned[0].message).split())
    for name in (
        "StableDiffusionInpaintPipeline",
        "StableDiffusion3InpaintPipeline",
        "FluxInpaintPipeline",
        "ChromaInpaintPipeline",
        "QwenImageInpaintPipeline",
        "QwenImageEditInpaintPipeline",
        "ZImageInpaintPipeline",
        "Flux2KleinInpaintPipeline",
    ):
        assert name in message, name
    # The recursion began again at the last restart: an inversion stops there.
    assert sched.start_index == sched.final_pair.start_index == 7
    # From timestep 4 to the next restart: bdia.sample from the changed state on grid[4:8].
    grid = diffusers_grid(sched, STEPS)
    with torch.no_grad():
        ref = bdia.sample(
            from_diffusers(unet, sched),
            bdia.bdia("ddim", GAMMA),
            changed,
            grid[4:8],
            trajectory=True,
            progress=False,
        )
    for k in range(3):
        assert torch.equal(states[4 + k], ref[k + 1])


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ({}, torch.float32),
        ({"flow_matching": True}, torch.float32),
        (diffusers.EDMEulerScheduler().config, torch.float32),
        # scale_model_input then makes the unet's input from the float32 state itself.
        (diffusers.EDMEulerScheduler().config, torch.float16),
    ],
    ids=["ddim", "flow", "edm", "edm-fp16"],
)
def test_a_pipelines_loop_reads_nothing_back_from_the_device(unet, config, dtype, monkeypatch):
    """On a device (MPS, pretended on the CPU), a loop that steps as the pipelines do (each t
    an entry of ``timesteps``, ``scale_model_input`` first, the returned latents fed back)
    reads no tensor back to Python in any step, forward or back: the timestep's value is
    known from where it sits in ``timesteps``, the latents are the state because they are
    the copy handed out, and the replayed output's timestep is checked on the host. Each
    such read would make the host wait for a GPU at every step. A timestep given as a tensor
    of its own and latents equal to the state but another tensor are read and compared
    instead, to the same numbers bit for bit."""
    noise = _noise(5)

    def run(fresh):
        sched = BDIAScheduler.from_config(config, gamma=GAMMA)
        inv = BDIAInverseScheduler.from_config(sched.config)
        reads = []
        with fake_mps(monkeypatch), torch.no_grad():
            net = copy.deepcopy(unet).to("mps", dtype)
            sched.set_timesteps(STEPS, device="mps")
            inv.set_timesteps(STEPS, device="mps")
            x = noise.to("mps", dtype)
            for scheduler in (sched, inv):
                if scheduler is inv:
                    x = inv.begin(sched.final_pair, dtype=dtype)
                for t in scheduler.timesteps:
                    if fresh:
                        t, x = torch.tensor(t.item(), device="mps"), x.clone()
                    with device_reads() as seen:
                        x_in = scheduler.scale_model_input(x, t)
                    out = net(x_in, t).sample
                    with device_reads() as stepping:
                        x = scheduler.step(out, t, x).prev_sample
                    reads.append(seen + stepping)
            back = inv.pair.earlier.cpu()
        return back, reads

    back, reads = run(fresh=False)
    # A float32 state on MPS (no float64 there), two words: the round trip is exact.
    assert torch.equal(back, noise.to(dtype).float())
    assert reads == [[]] * (2 * STEPS - 1)
    again, reads = run(fresh=True)
    assert torch.equal(again, back)
    assert all("equal" in r for r in reads[1:]) and all("cpu" in r for r in reads), reads


def test_a_timestep_is_read_when_timesteps_were_written_in_place(unet):
    """An entry of ``timesteps`` written in place since ``set_timesteps`` is read as it now
    is: here a timestep off the schedule, refused by name."""
    sched = BDIAScheduler(gamma=GAMMA)
    sched.set_timesteps(STEPS)
    x = _noise(6)
    with torch.no_grad():
        t = sched.timesteps[0]
        x = sched.step(unet(x, t).sample, t, x).prev_sample
        sched.timesteps[1] += 1
        t = sched.timesteps[1]
        with pytest.raises(ValueError, match=f"timestep {int(t)} is not in this schedule"):
            sched.step(unet(x, t).sample, t, x)


def test_out_of_order_timestep_warns_and_a_late_start_does_not(unet):
    """Skipping a timestep restarts with a warning naming it; a run that starts at a later
    timestep (img2img) starts there silently."""
    sched = BDIAScheduler(gamma=GAMMA)
    sched.set_timesteps(STEPS)
    ts = sched.timesteps
    x = _noise(5)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error", BDIARestartWarning)
            x = sched.step(unet(x, ts[3]).sample, ts[3], x).prev_sample
        with pytest.warns(BDIARestartWarning, match=f"timestep {int(ts[5])} is not the next"):
            sched.step(unet(x, ts[5]).sample, ts[5], x)
    assert sched.restarts == [int(ts[5])]


# ------------------------------------------------------------------ config and timesteps


@pytest.mark.parametrize(
    "spacing,offset",
    [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)],
)
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_set_timesteps_are_ddims(spacing, offset, steps):
    kwargs = dict(clip_sample=False, timestep_spacing=spacing, steps_offset=offset)
    ddim = diffusers.DDIMScheduler(**kwargs)
    ddim.set_timesteps(steps)
    sched = BDIAScheduler.from_config(ddim.config)
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps, ddim.timesteps)
    assert sched.init_noise_sigma == 1.0 and sched.order == 1
    x = torch.randn(1, 3, 4, 4)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    assert sched.grid == diffusers_grid(ddim, steps).tolist()


def test_config_round_trips_and_holds_gamma(tmp_path):
    ddim = diffusers.DDIMScheduler(clip_sample=False, **SD_NOISE_TABLE)
    sched = BDIAScheduler.from_config(ddim.config, gamma=0.8)
    assert sched.config.gamma == 0.8
    assert BDIAScheduler().config.gamma == 0.96
    assert torch.equal(sched.alphas_cumprod, ddim.alphas_cumprod)
    sched.save_config(tmp_path)
    again = BDIAScheduler.from_config(BDIAScheduler.load_config(tmp_path))

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(again.config) == public(sched.config)
    assert again.config["_class_name"] == "BDIAScheduler"
    inverse = BDIAInverseScheduler.from_config(again.config)
    assert inverse.config.gamma == 0.8


def test_adapter_knows_both_schedulers(unet):
    """from_diffusers and diffusers_grid take the BDIA schedulers; the inverse's grid is the
    forward run's (its own timesteps are part of it, backward)."""
    sched = BDIAScheduler(set_alpha_to_one=False, timestep_spacing="trailing")
    inverse = BDIAInverseScheduler.from_config(sched.config)
    assert from_diffusers(unet, sched).schedule.clean_end is False
    assert torch.equal(diffusers_grid(inverse, STEPS), diffusers_grid(sched, STEPS))
    sched.set_timesteps(STEPS)
    inverse.set_timesteps(STEPS)
    assert inverse.timesteps.tolist() == sched.timesteps.tolist()[1:][::-1]


def test_step_output_forms(unet):
    """return_dict=False gives (prev_sample, pred_original_sample); with variance_type
    'learned_range' a model output of twice the channels is cut to its first half; a step's
    prev_sample is a copy, not the scheduler's state; pred_original_sample is the x0 that
    DDIMScheduler predicts from the same output.

    Both form x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) in float32, this scheduler with
    float64 schedule constants: a few float32 roundings (6e-8 each) of terms as large as x0
    itself (measured 1.5e-7 of max |x0|, which is about 200 at the first timestep), so 1e-6
    of max |x0| bounds it, while another prediction in its place (eps, say) is off by x0."""
    sched = BDIAScheduler(variance_type="learned_range")
    sched.set_timesteps(STEPS)
    x = _noise(6)
    t = sched.timesteps[0]
    with torch.no_grad():
        out = unet(x, t).sample
    twin = copy.deepcopy(sched)
    a = sched.step(out, t, x)
    assert isinstance(a, BDIASchedulerOutput)
    b = twin.step(torch.cat([out, torch.randn_like(out)], dim=1), t, x, return_dict=False)
    assert isinstance(b, tuple) and torch.equal(a.prev_sample, b[0])
    assert torch.equal(a.pred_original_sample, b[1])
    assert a.prev_sample is not sched._state.x
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(STEPS)
    x0 = ddim.step(out, t, x).pred_original_sample
    assert a.pred_original_sample.dtype == x0.dtype == torch.float32
    assert _max_abs(a.pred_original_sample, x0) <= 1e-6 * float(x0.abs().max())


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(clip_sample=True), "clip_sample = True .* not an ODE"),
        (dict(thresholding=True), "thresholding = True"),
        (dict(gamma=0), r"gamma = 0 lies outside \(0, 1\]"),
        (dict(gamma=1.5), r"gamma = 1.5 lies outside \(0, 1\]"),
        (dict(gamma=-0.1), "lies outside"),
        (dict(gamma="fast"), "not a named schedule"),
        (dict(rescale_betas_zero_snr=True), "alphas_cumprod"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
    ],
)
def test_bad_config_is_refused_in_one_line(kwargs, match):
    for cls in (BDIAScheduler, BDIAInverseScheduler):
        with pytest.raises(ValueError, match=match) as info:
            cls.from_config(BDIAScheduler().config, **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "source,match",
    [
        (dict(use_flow_sigmas=True, flow_shift=3.0), "use_flow_sigmas = True.*integer part"),
        (dict(interpolation_type="log_linear"), "interpolation_type = 'log_linear'"),
        (dict(final_sigmas_type="denoised"), "final_sigmas_type = 'denoised'"),
    ],
    ids=["flow_sigmas", "log_linear", "final_sigmas"],
)
def test_a_schedule_field_of_another_scheduler_is_refused_by_from_config(source, match):
    """Fields that are not BDIA's own (a DPM-Solver config's use_flow_sigmas, say) stay in the
    config and change the grid; a config bdia cannot follow used to pass from_config and fail
    only at set_timesteps, after the pipeline was built around it."""
    config = {**diffusers.DDIMScheduler().config, **source}
    for cls in (BDIAScheduler, BDIAInverseScheduler):
        with pytest.raises(ValueError, match=match) as info:
            cls.from_config(config)
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match=match):
            cls.from_config(config, return_unused_kwargs=True)


def test_clip_sample_written_out_is_refused_and_its_default_is_not():
    """diffusers' from_config replaces the fields a config holds at their defaults by the new
    class's defaults: DDIMScheduler's default clip_sample=True becomes BDIA's False, and only
    a clip_sample=True that was set is refused (as docs/diffusers.md says)."""
    assert BDIAScheduler.from_config(diffusers.DDIMScheduler().config).config.clip_sample is False
    with pytest.raises(ValueError, match="clip_sample = True"):
        BDIAScheduler.from_config(diffusers.DDIMScheduler(clip_sample=True).config)


def test_bad_steps_are_refused_in_one_line(unet):
    x = _noise(7)
    sched = BDIAScheduler()
    errors = []
    with pytest.raises(ValueError, match="before set_timesteps") as info:
        sched.step(x, 999, x)
    errors.append(info)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="eta = 0.5: BDIA is deterministic") as info:
        sched.step(x, t, x, eta=0.5)
    errors.append(info)
    with pytest.raises(ValueError, match="timestep 998 is not in this schedule") as info:
        sched.step(x, 998, x)
    errors.append(info)
    with pytest.raises(ValueError, match="model_output has shape") as info:
        sched.step(x[:, :2], t, x)
    errors.append(info)
    sched.step(x, t, x, eta=0.0, use_clipped_model_output=None, generator=torch.Generator())

    inverse = BDIAInverseScheduler()
    with pytest.raises(ValueError, match="before set_timesteps") as info:
        inverse.begin(None)
    errors.append(info)
    inverse.set_timesteps(STEPS)
    t = inverse.timesteps[0]
    with pytest.raises(ValueError, match="before begin") as info:
        inverse.step(x, t, x)
    errors.append(info)
    start = inverse.begin(bdia.StatePair(x, x))
    with pytest.raises(ValueError, match="not the inversion's next one") as info:
        inverse.step(x, inverse.timesteps[1], start)
    errors.append(info)
    with pytest.raises(ValueError, match="feed prev_sample back unchanged") as info:
        inverse.step(x, t, start + 1)
    errors.append(info)
    assert all("\n" not in str(e.value) for e in errors)


@pytest.mark.parametrize("steps", [np.int64(STEPS), torch.tensor(STEPS)], ids=["numpy", "torch"])
def test_integer_step_counts_of_numpy_and_torch_are_taken(steps):
    """A step count from numpy or torch (np.arange, a sweep) gives the timesteps of the same
    Python int, as DDIMScheduler takes it; diffusers_grid takes it as well."""
    expected = BDIAScheduler()
    expected.set_timesteps(STEPS)
    for cls in (BDIAScheduler, BDIAInverseScheduler):
        sched = cls()
        sched.set_timesteps(steps)
        assert sched.num_inference_steps == STEPS and type(sched.num_inference_steps) is int
        assert sched.grid == expected.grid
    ddim = diffusers.DDIMScheduler()
    assert torch.equal(diffusers_grid(ddim, steps), diffusers_grid(ddim, STEPS))


@pytest.mark.parametrize(
    "steps, error, match",
    [
        (0, ValueError, "num_inference_steps must be 1 or more, got 0"),
        (None, TypeError, "num_inference_steps must be an integer .*, got NoneType None"),
        (2.0, TypeError, "num_inference_steps must be an integer .*, got float 2.0"),
        (True, TypeError, "num_inference_steps must be an integer .*, got bool True"),
    ],
)
def test_bad_step_counts_are_named_before_ddim_sees_them(steps, error, match):
    # DDIMScheduler itself divides by the count (ZeroDivisionError) or compares it with
    # num_train_timesteps (TypeError about NoneType) before any check of ours.
    for cls in (BDIAScheduler, BDIAInverseScheduler):
        with pytest.raises(error, match=match) as info:
            cls().set_timesteps(steps)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "steps, error",
    [
        (True, TypeError),
        (np.bool_(True), TypeError),
        (torch.tensor(True), TypeError),
        (18.0, TypeError),
        (np.float64(18.0), TypeError),
        (torch.tensor(18.0), TypeError),
        (torch.tensor([18]), TypeError),
        (np.array([18]), TypeError),
        ("18", TypeError),
        (None, TypeError),
        (0, ValueError),
        (np.int64(-2), ValueError),
        (torch.tensor(0), ValueError),
    ],
    ids=repr,
)
def test_grids_and_the_diffusers_adapter_refuse_a_bad_step_count_alike(steps, error):
    """The grids and the adapter read a step count with one check. They used to differ: a
    bool or 18.0 was a ValueError ("a positive integer") for the grids and a TypeError ("an
    int") for the adapter, and a 0-dim bool tensor or a tensor of shape (1,) passed both."""
    what = (
        "must be an integer (an int, or an integer of numpy or torch), got "
        f"{type(steps).__name__} {steps!r}"
        if error is TypeError
        else f"must be 1 or more, got {int(steps)}"
    )
    calls = [
        ("steps", lambda: bdia.karras_grid(steps)),
        ("steps", lambda: bdia.uniform_t_grid(steps, 1.0, 0.1)),
        ("num_inference_steps", lambda: diffusers_grid(diffusers.DDIMScheduler(), steps)),
        ("num_inference_steps", lambda: BDIAScheduler().set_timesteps(steps)),
    ]
    for name, call in calls:
        with pytest.raises(error) as info:
            call()
        assert str(info.value) == f"{name} {what}"


# Stable Audio's CosineDPMSolverMultistepScheduler needs torchsde to be built; its fields, as
# its config holds them: all of them EDMDPMSolverMultistepScheduler's, but algorithm_type.
_COSINE_DPM = dict(
    sigma_min=0.3,
    sigma_max=500.0,
    sigma_data=1.0,
    sigma_schedule="exponential",
    num_train_timesteps=1000,
    solver_order=2,
    prediction_type="v_prediction",
    rho=7.0,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    final_sigmas_type="zero",
)


@pytest.mark.parametrize(
    "source, name",
    [
        (diffusers.CMStochasticIterativeScheduler().config, "CMStochasticIterativeScheduler"),
        (_COSINE_DPM, "CosineDPMSolverMultistepScheduler"),
    ],
    ids=["consistency", "cosine"],
)
def test_a_config_without_a_noise_table_is_refused(source, name):
    """A consistency model's config, or Stable Audio's, has no beta fields and is neither a
    flow-matching nor an EDM-preconditioned one: from_config would fill DDIM's default betas
    in and sample the model on a VP table. It is refused, naming the class when the config
    names it (one read from disk does; a scheduler's .config does not), and the message says
    which schedulers without a table bdia maps. Stable Audio's fields are all of them
    EDMDPMSolverMultistepScheduler's, whose preconditioning its c_noise is not: without that
    scheduler's algorithm_type (or its _class_name) the config is not taken for it. The
    EDM-preconditioned configs themselves are taken (tests/test_diffusers_edm_scheduler.py),
    and flow-matching ones (tests/test_diffusers_flow.py)."""
    read = {**source, "_class_name": name}
    for cls in (BDIAScheduler, BDIAInverseScheduler):
        for config, named in ((source, "the scheduler config (no betas; "), (read, name)):
            with pytest.raises(ValueError, match="has no alphas_cumprod noise table") as info:
                cls.from_config(config)
            message = str(info.value)
            assert message.startswith(named) and "\n" not in message
            maps = "EDMDPMSolverMultistepScheduler only (from_diffusers, diffusers_grid and "
            assert maps + "BDIAScheduler)" in message
    # A config written for BDIA by hand, without betas, still takes the defaults.
    hand = BDIAScheduler.from_config({"num_train_timesteps": 1000, "gamma": 0.9})
    assert hand.config.gamma == 0.9 and hand.config.beta_schedule == "linear"
