"""Inpainting in bdia.integrations.diffusers: from_diffusers(mask=..., masked_image_latents=...)
against StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline with a 9-channel
unet, BDIAScheduler in them (img2img's later start included), a 4-channel unet's blend, and the
refusals, the same with a controlnet against the ControlNet inpainting pipelines of SD and
SDXL (at strength < 1 with a switched controlnet too), and edit_image on all of them.

Tiny random pipelines (``tiny_inpaint_pipeline``: the tiny SD or SDXL parts with an inpainting
unet of ``in_channels=9``; ``tiny_controlnet_inpaint_pipeline``: those with a controlnet). The
mask and the masked image's latents enter every unet call as extra channels and are fixed
over the run, so the run is an ODE in the latents: a pipeline's DDIM step and bdia's ``ddim``
are the same update written in two ways, so whole runs agree to rounding (float64
pipelines: below 1e-12 relative); the model itself is compared bit for bit in float32 at
each of the pipeline's states, and so are whole runs where the step is the same arithmetic
(``BDIAScheduler`` and ``bdia.sample``; ``EDMEulerScheduler`` and ``euler``).
"""

from __future__ import annotations

import warnings

import diffusers
import pytest
import torch
from conftest import (
    Counter,
    assert_ddim_run_is_bdia_sample,
    float64_pipeline,
    record_step_samples,
    untouched,
)
from test_diffusers_controlnet import _branches, _unet_calls
from test_diffusers_editing import _conv_in_dtypes

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIARestartWarning,
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    tiny_controlnet,
    tiny_controlnet_inpaint_pipeline,
    tiny_controlnet_pipeline,
    tiny_inpaint_pipeline,
    tiny_sd3_transformer,
    tiny_text_to_image_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 10
PROMPT = "a photo of a cat"
GUIDANCE = 7.5
GAMMA = 0.9


def _inputs(dtype=torch.float32, batch=1):
    """The image (1, 3, 16, 16) in [0, 1], a mask (1, 1, 16, 16) of 1 in a rectangle, stand-in
    latents of the masked image (1, 4, 8, 8), and the starting noise (batch, 4, 8, 8)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g, dtype=dtype)
    mask_image = torch.zeros(1, 1, 16, 16, dtype=dtype)
    mask_image[..., 4:12, 2:10] = 1.0
    masked = torch.randn(1, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    return image, mask_image, masked, noise


def _mask_latents(pipe, mask_image, masked):
    """The mask at the latents' size and the masked image's latents, as the pipeline makes
    them (once, not doubled: the adapter doubles them under guidance)."""
    condition = pipe.mask_processor.preprocess(mask_image, height=16, width=16)
    return pipe.prepare_mask_latents(condition, masked, 1, 16, 16, masked.dtype, "cpu", None, False)


def _ode(pipe, xl, mask_image, masked):
    mask, masked_latents = _mask_latents(pipe, mask_image, masked)
    cond, negative = _branches(pipe, xl)
    return from_diffusers(
        pipe.unet,
        pipe.scheduler,
        mask=mask,
        masked_image_latents=masked_latents,
        guidance_scale=GUIDANCE,
        negative_cond=negative,
        **cond,
    )


def _run(pipe, image, mask_image, masked, noise=None, strength=1.0, seed=3, per_prompt=1, **extra):
    """The pipeline's latents: from ``noise`` (times init_noise_sigma), or with ``strength``
    < 1 from the image latents noised by ``add_noise`` (``noise`` None). ``masked`` None:
    the pipeline encodes the masked image itself; ``extra``: more of its arguments."""
    if masked is not None:
        extra["masked_image_latents"] = masked
    with torch.no_grad():
        return pipe(
            PROMPT,
            image=image,
            mask_image=mask_image,
            height=16,
            width=16,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            strength=strength,
            latents=noise,
            num_images_per_prompt=per_prompt,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **extra,
        ).images


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_ddim_is_the_inpaint_pipeline_to_float64_rounding(tmp_path, xl):
    """bdia's 'ddim' on from_diffusers(unet, scheduler, mask=..., masked_image_latents=...)
    and diffusers_grid is the inpainting pipeline's DDIM run under classifier-free guidance
    7.5, the whole pipeline in float64 (its scheduler's tables too): below 1e-12 relative
    (measured: up to 8.3e-16, float64 rounding of two ways of writing DDIM's step; 4.5e-7 to
    4.9e-7 in float32). A mask or masked image left out, undoubled or of another region would
    be off by O(1)."""
    pipe = float64_pipeline(tiny_inpaint_pipeline(tmp_path, xl=xl))
    image, mask_image, masked, noise = _inputs(torch.float64)
    theirs = _run(pipe, image, mask_image, masked, noise)
    with torch.no_grad():
        ode = _ode(pipe, xl, mask_image, masked)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(ode, bdia.get_solver("ddim"), noise, ts, progress=False)
    assert ours.dtype == torch.float64
    assert _rel(ours, theirs) < 1e-12


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_the_model_is_the_pipelines_bit_for_bit_at_each_step(tmp_path, xl):
    """In float32, two images a prompt (the pipeline repeats the batch-1 mask and masked image
    to batch 2, the adapter expands them): at each of the pipeline's states, the latents in the
    first 4 channels of its unet input, the ODE's model at the grid's time calls the unet on
    the same 9-channel input, [unconditional, conditional] with the mask and masked image in
    both halves, and gets the same output, bit for bit."""
    pipe = tiny_inpaint_pipeline(tmp_path, xl=xl)
    image, mask_image, masked, noise = _inputs(batch=2)
    calls, handle = _unet_calls(pipe.unet)
    try:
        _run(pipe, image, mask_image, masked, noise, per_prompt=2)
        theirs = list(calls)
        calls.clear()
        with torch.no_grad():
            ode = _ode(pipe, xl, mask_image, masked)
            n = pipe.scheduler.config.num_train_timesteps
            for sample, tau, _, _ in theirs:
                ode.evaluate((float(tau) + 1.0) / n, sample[:2, :4])
    finally:
        handle.remove()
    assert len(calls) == len(theirs) == STEPS
    for i, ((x, tau, _, out), (x2, tau2, _, out2)) in enumerate(zip(calls, theirs)):
        assert x.shape == (4, 9, 8, 8), i
        assert torch.equal(x, x2) and torch.equal(tau.float(), tau2.float().expand(4)), i
        assert torch.equal(out, out2), i


def test_euler_is_the_sdxl_inpaint_pipeline_with_edm_euler_bit_for_bit(tmp_path):
    """StableDiffusionXLInpaintPipeline with EDMEulerScheduler under guidance 7.5: the unet
    gets the preconditioned c_in x with the mask and masked image after it, and bdia's 'euler'
    on from_diffusers and diffusers_grid gives the pipeline's latents bit for bit in float32."""
    pipe = tiny_inpaint_pipeline(tmp_path, diffusers.EDMEulerScheduler(), xl=True)
    image, mask_image, masked, noise = _inputs()
    theirs = _run(pipe, image, mask_image, masked, noise)
    with torch.no_grad():
        ode = _ode(pipe, True, mask_image, masked)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        start = noise * pipe.scheduler.init_noise_sigma
        ours = bdia.sample(ode, bdia.get_solver("euler"), start, ts, progress=False)
    assert torch.equal(ours, theirs)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_bdia_scheduler_in_the_inpaint_pipeline_is_bdia_sample_and_inverts(tmp_path, xl):
    """BDIAScheduler in the inpainting pipeline with a 9-channel unet (guidance 7.5) gives
    bdia.sample's latents over from_diffusers' ODE bit for bit (measured 0), without a
    restart, and its final_pair inverts under that ODE to the pipeline's noise exactly
    (measured 0). With a float64 state the round trip comes back to the noise exactly
    (measured 0; asserted equal)."""
    pipe = tiny_inpaint_pipeline(tmp_path, xl=xl)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    image, mask_image, masked, noise = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BDIARestartWarning)
        theirs = _run(pipe, image, mask_image, masked, noise)
    assert pipe.scheduler.restarts == [] and pipe.scheduler.start_index == 0
    with torch.no_grad():
        ode = _ode(pipe, xl, mask_image, masked)
    back = assert_ddim_run_is_bdia_sample(pipe, theirs, ode, noise, GAMMA, STEPS)
    assert torch.equal(back, noise.double())


@torch.no_grad()
def _invert_inpaint(pipe, pair, mask_image, masked):
    """The docs' inverse loop for an inpainting unet: the unet called as the pipeline calls
    it, on [unconditional, conditional] with the mask and masked image after the latents."""
    mask, masked_latents = _mask_latents(pipe, mask_image, masked)
    cond, negative = _branches(pipe, False)
    embeds = torch.cat([negative["encoder_hidden_states"], cond["encoder_hidden_states"]])
    extra = torch.cat([mask, masked_latents], dim=1).repeat(2, 1, 1, 1)
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    x = inverse.begin(pair)
    for t in inverse.timesteps:
        sample = torch.cat([torch.cat([x] * 2), extra], dim=1)
        u, c = pipe.unet(sample, t, encoder_hidden_states=embeds).sample.chunk(2)
        x = inverse.step(u + GUIDANCE * (c - u), t, x).prev_sample
    return inverse


def test_strength_below_one_starts_later_and_inverts_to_its_start(tmp_path):
    """With strength 0.5 the pipeline noises the image latents to the 6th of 10 timesteps
    with the scheduler's add_noise and runs the last 5. BDIAScheduler starts there without a
    restart and records it; the run is bdia.sample on the grid's tail ts[5:] from that state
    (bit for bit), and the inverse loop stops at the start and returns it exactly (measured
    0)."""
    pipe = tiny_inpaint_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    starts = record_step_samples(pipe.scheduler)
    image, mask_image, masked, _ = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BDIARestartWarning)
        theirs = _run(pipe, image, mask_image, masked, strength=0.5)
    k = STEPS // 2
    pair = pipe.scheduler.final_pair
    assert pipe.scheduler.start_index == pair.start_index == k
    assert torch.equal(pair.later, theirs)
    with torch.no_grad():
        ode = _ode(pipe, False, mask_image, masked)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(ode, bdia.bdia("ddim", GAMMA), starts[0], ts[k:], progress=False)
    assert torch.equal(ours, theirs)
    inverse = _invert_inpaint(pipe, pair, mask_image, masked)
    assert inverse.start_index == k and len(inverse.timesteps) == k - 1
    assert torch.equal(inverse.pair.earlier, starts[0])


def test_a_4_channel_unet_in_the_inpaint_pipeline_restarts_at_every_step(tmp_path):
    """A 4-channel unet in StableDiffusionInpaintPipeline: the pipeline blends the noised
    image back into the latents after every step, which is no ODE step. BDIAScheduler then
    restarts its recursion at every step but the first, with one BDIARestartWarning that names
    the 9-channel unet; each step is a plain DDIM step, so the run gives DDIMScheduler's
    latents to float32 rounding (below 1e-5 relative; measured 5.3e-7), and final_pair holds
    the last step alone (start_index 9), not the latents the pipeline blends once more."""
    pipe = tiny_inpaint_pipeline(tmp_path, in_channels=4)
    image, mask_image, _, noise = _inputs()
    ddim = _run(pipe, image, mask_image, None, noise)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _run(pipe, image, mask_image, None, noise)
    restarts = [w for w in caught if issubclass(w.category, BDIARestartWarning)]
    assert len(restarts) == 1 and "9-channel" in str(restarts[0].message)
    assert pipe.scheduler.restarts == pipe.scheduler.timesteps[1:].tolist()
    assert _rel(ours, ddim) < 1e-5
    pair = pipe.scheduler.final_pair
    assert pair.start_index == STEPS - 1 and not torch.equal(pair.later, ours)


# ------------------------------------------------------------------- the conditioning


def test_the_mask_enters_the_fingerprint_and_is_cast_to_the_unets_dtype(tmp_path):
    """Another mask or masked image is another vector field: the fingerprints differ, so a
    BDIA pair is not continued under the other. A float64 mask is cast to the float32 unet's
    dtype, as the pipeline makes it, and the caller's tensor is left as it was."""
    pipe = tiny_inpaint_pipeline(tmp_path)
    _, mask_image, masked, _ = _inputs()
    cond, _ = _branches(pipe, False)
    mask, latents = _mask_latents(pipe, mask_image, masked)

    def ode(mask, latents):
        return from_diffusers(
            pipe.unet, pipe.scheduler, mask=mask, masked_image_latents=latents, **cond
        )

    a, b, c = ode(mask, latents), ode(1.0 - mask, latents), ode(mask, latents + 1.0)
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3
    assert ode(mask.clone(), latents.clone()).fingerprint() == a.fingerprint()
    wide = mask.double()
    with untouched(wide):
        cast = ode(wide, latents)
    assert cast.cond["mask"].dtype == torch.float32
    assert cast.fingerprint() == a.fingerprint()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    pipe = tiny_inpaint_pipeline(tmp_path_factory.mktemp("inpaint"))
    cond, negative = _branches(pipe, False)
    _, mask_image, masked, _ = _inputs()
    mask, latents = _mask_latents(pipe, mask_image, masked)
    return pipe, cond, negative, mask, latents


def test_bad_inpainting_inputs_are_refused_before_any_call(parts, tmp_path):
    """Each refusal is one line naming the cause, before any network runs, and leaves the
    caller's tensors as they were: a 9-channel unet without the mask and masked image (or with
    one of them), them for a 4-channel unet, tensors of the wrong kind, dims, channels or
    sizes, either in negative_cond, them beside a flow-matching transformer, a controlnet of
    the unet's 9 input channels (StableDiffusionControlNetInpaintPipeline gives it the 4
    latent channels alone) and a controlnet beside a 4-channel unet with a mask."""
    pipe, cond, negative, mask, latents = parts
    plain = tiny_inpaint_pipeline(tmp_path, in_channels=4)
    net = tiny_controlnet(plain.unet)
    wide = tiny_controlnet(pipe.unet)
    assert wide.config.in_channels == 9
    unets = [Counter(pipe.unet), Counter(plain.unet), Counter(net), Counter(wide)]
    both = dict(mask=mask, masked_image_latents=latents)
    nine, four = (pipe.unet, pipe.scheduler), (plain.unet, plain.scheduler)
    cases = [
        (nine, {}, ValueError, "pass mask="),
        (nine, dict(mask=mask), ValueError, "mask was given without masked_image_latents"),
        (nine, dict(masked_image_latents=latents), ValueError, "without mask"),
        (four, both, ValueError, "9-channel inpainting unet"),
        (nine, dict(both, mask=mask[0]), ValueError, "(batch or 1, C, h, w)"),
        (nine, dict(both, mask=mask.long()), ValueError, "floating"),
        (nine, dict(both, mask=mask.numpy()), TypeError, "tensor"),
        (nine, dict(both, mask=mask.repeat(1, 2, 1, 1)), ValueError, "one channel"),
        (nine, dict(both, masked_image_latents=latents[:, :3]), ValueError, "in_channels = 9"),
        (nine, dict(both, mask=mask[..., :4]), ValueError, "(h x w)"),
        (
            nine,
            dict(both, guidance_scale=GUIDANCE, negative_cond={**negative, "mask": mask}),
            ValueError,
            "negative_cond",
        ),
        (
            four,
            dict(both, controlnet=net, controlnet_cond=torch.rand(1, 3, 16, 16)),
            ValueError,
            "9-channel inpainting unet",
        ),
        (
            nine,
            dict(both, controlnet=wide, controlnet_cond=torch.rand(1, 3, 16, 16)),
            ValueError,
            "controlnet has in_channels = 9 but the inpainting unet's latents have 4",
        ),
        (
            nine,
            dict(controlnet=net, controlnet_cond=torch.rand(1, 3, 16, 16)),
            ValueError,
            "pass mask=",
        ),
    ]
    with untouched(mask, latents):
        for (unet, scheduler), kwargs, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(unet, scheduler, **cond, **kwargs)
            _one_line_error(exc_info, field)
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(
                tiny_sd3_transformer(),
                diffusers.FlowMatchEulerDiscreteScheduler(),
                encoder_hidden_states=torch.zeros(1, 4, 16),
                pooled_projections=torch.zeros(1, 8),
                **both,
            )
        _one_line_error(exc_info, "flow-matching")
    assert all(c.calls == 0 for c in unets)


def test_a_mask_of_the_wrong_batch_or_size_is_refused_at_the_first_call(parts):
    """At the first evaluation, before the unet is called: a mask (or masked image) whose batch
    is neither 1 nor the state's, or whose size is not the latents'; a state whose channels
    and the extra ones do not make the unet's in_channels."""
    pipe, cond, _, mask, latents = parts
    calls = Counter(pipe.unet)
    t = float(diffusers_grid(pipe.scheduler, STEPS)[0])
    x = torch.randn(2, 4, 8, 8)
    big = torch.nn.functional.interpolate(torch.cat([mask, latents], dim=1), size=(16, 16))
    cases = [
        (dict(mask=mask.repeat(3, 1, 1, 1), masked_image_latents=latents), x, "batch 3"),
        (dict(mask=big[:, :1], masked_image_latents=big[:, 1:]), x, "16 x 16 (h x w)"),
        (dict(mask=mask, masked_image_latents=latents), x[:, :3], "make 8"),
    ]
    for kwargs, state, field in cases:
        ode = from_diffusers(pipe.unet, pipe.scheduler, **cond, **kwargs)
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(t, state)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_a_batch_1_mask_is_the_same_as_one_per_sample(parts):
    """A mask and masked image of batch 1 serve every sample: the model's output equals the
    one with them repeated to the state's batch, bit for bit, under guidance too."""
    pipe, cond, negative, mask, latents = parts
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = float(diffusers_grid(pipe.scheduler, STEPS)[3])
    guided = dict(guidance_scale=GUIDANCE, negative_cond=negative)
    with torch.no_grad():
        one = from_diffusers(
            pipe.unet, pipe.scheduler, mask=mask, masked_image_latents=latents, **cond, **guided
        )
        each = from_diffusers(
            pipe.unet,
            pipe.scheduler,
            mask=mask.repeat(3, 1, 1, 1),
            masked_image_latents=latents.repeat(3, 1, 1, 1),
            **cond,
            **guided,
        )
        assert torch.equal(one.evaluate(t, x).derivative, each.evaluate(t, x).derivative)


# ------------------------------------------------------------ ControlNet with inpainting

CONTROL_SCALE = 0.7
# The ControlNet inpainting pipelines (tiny_controlnet_inpaint_pipeline): Stable Diffusion's,
# SDXL's, and SDXL's with requires_aesthetics_score (five time ids, the aesthetic score's
# differing between the branches of guidance).
CONTROL_KINDS = ["sd", "sdxl", "sdxl-aesthetic"]
# The aesthetic time ids of SDXL's ControlNet inpainting pipeline for 16 x 16 images: the
# original size, the crop and its default aesthetic_score 6 (negative_aesthetic_score 2.5 in
# the unconditional branch).
AESTHETIC_IDS = torch.tensor([[16.0, 16.0, 0.0, 0.0, 6.0]])
NEGATIVE_AESTHETIC_IDS = torch.tensor([[16.0, 16.0, 0.0, 0.0, 2.5]])


def _control_inpaint_pipeline(tmp_path, kind):
    return tiny_controlnet_inpaint_pipeline(
        tmp_path, xl=kind != "sd", aesthetic=kind == "sdxl-aesthetic"
    )


def _control_inpaint_branches(pipe, kind):
    """The unet and controlnet arguments of the conditional and unconditional branches, as
    the pipeline makes them; with the aesthetic score, time ids of their own in each."""
    cond, negative = _branches(pipe, kind != "sd")
    if kind == "sdxl-aesthetic":
        for branch, ids in ((cond, AESTHETIC_IDS), (negative, NEGATIVE_AESTHETIC_IDS)):
            added = branch["added_cond_kwargs"]
            added["time_ids"] = ids.to(added["text_embeds"].dtype)
    return cond, negative


def _control_inpaint_ode(
    pipe, kind, mask_image, image, control, guess, seed=3, made=None, **settings
):
    """from_diffusers of a ControlNet inpainting pipeline's unet and controlnet, the mask and
    masked image made as the pipeline makes them (its image in float32, the masked image
    encoded by its vae with the run's generator, which nothing draws from before), or
    ``made``, the pipeline's own; ``settings``: more ControlNet settings."""
    dtype = pipe.unet.dtype
    if made is None:
        condition = pipe.mask_processor.preprocess(mask_image, height=16, width=16)
        pixels = pipe.image_processor.preprocess(image, height=16, width=16).to(torch.float32)
        made = pipe.prepare_mask_latents(
            condition,
            pixels * (condition < 0.5),
            1,
            16,
            16,
            dtype,
            "cpu",
            torch.Generator().manual_seed(seed),
            False,
        )
    mask, masked_latents = made
    cond, negative = _control_inpaint_branches(pipe, kind)
    return from_diffusers(
        pipe.unet,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=control.to(dtype),
        conditioning_scale=CONTROL_SCALE,
        guess_mode=guess,
        mask=mask,
        masked_image_latents=masked_latents,
        guidance_scale=GUIDANCE,
        negative_cond=negative,
        **settings,
        **cond,
    )


def _control_inpaint_run(pipe, image, mask_image, control, noise, guess):
    return _run(
        pipe,
        image,
        mask_image,
        None,
        noise,
        control_image=control,
        controlnet_conditioning_scale=CONTROL_SCALE,
        guess_mode=guess,
    )


def _control_image():
    """The control image (1, 3, 16, 16) in [0, 1], float32: the pipeline's
    prepare_control_image rounds it to float32 before it casts it to the controlnet's dtype,
    so a float64 pipeline gets a float32 image too."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("guess", [False, True], ids=["plain", "guess"])
@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_ddim_is_the_controlnet_inpaint_pipeline_to_rounding(tmp_path, kind, guess, dtype):
    """bdia's 'ddim' on from_diffusers(unet, scheduler, controlnet=..., controlnet_cond=...,
    mask=..., masked_image_latents=...) is the ControlNet inpainting pipeline's DDIM run with
    a 9-channel unet under guidance 7.5 (StableDiffusionControlNetInpaintPipeline's, and
    StableDiffusionXLControlNetInpaintPipeline's with SDXL's six time ids or, with
    requires_aesthetics_score, five ending in an aesthetic score of 6 and 2.5 in the
    unconditional branch, which the controlnet gets too), the whole pipeline in float64:
    below 1e-12 relative (measured 5.5e-16 to 1.3e-15, float64 rounding of two ways of
    writing DDIM's step); in float32 below 1e-5, float32's rounding of the same over 10
    steps (measured 2.6e-7 to 5.9e-7). The control image is float32 and the masked image is
    encoded from float32 pixels in both, as the pipeline rounds them. A controlnet given the
    9-channel input would not run; one left out, a mask left out, or the conditional time
    ids in the unconditional branch would be off by O(1)."""
    pipe = _control_inpaint_pipeline(tmp_path, kind)
    if dtype == torch.float64:
        pipe = float64_pipeline(pipe)
    image, mask_image, _, noise = _inputs(dtype)
    control = _control_image()
    theirs = _control_inpaint_run(pipe, image, mask_image, control, noise, guess)
    with torch.no_grad():
        ode = _control_inpaint_ode(pipe, kind, mask_image, image, control, guess)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(ode, bdia.get_solver("ddim"), noise, ts, progress=False)
    assert ours.dtype == dtype
    assert _rel(ours, theirs) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_ddim_is_the_controlnet_inpaint_pipeline_at_strength_to_float64_rounding(tmp_path):
    """StableDiffusionControlNetInpaintPipeline (9-channel unet, guidance 7.5) at strength 0.5
    runs the last 5 of 10 DDIM steps from the image's latents noised at the 6th timestep,
    and counts the controlnet's switch, on at 20 % and off at 70 %, over those 5 (steps 1
    and 2 of them, the grid's 7th and 8th; over all 10, the 6th and 7th). bdia's 'ddim' on
    from_diffusers(..., strength=0.5, control_guidance_start=0.2, control_guidance_end=0.7,
    num_inference_steps=10) with the mask and masked image the pipeline made, from its first
    step's sample over ts[5:], is its run, the whole pipeline in float64: below 1e-12
    relative (measured 6.8e-16, float64 rounding of two ways of writing DDIM's step), with
    the controlnet called at 2 steps. Without strength= the switch, counted over all 10,
    is off by 8.1e-2."""
    pipe = float64_pipeline(_control_inpaint_pipeline(tmp_path, "sd"))
    image, mask_image, _, _ = _inputs(torch.float64)
    control = _control_image()
    made = []
    prepare = pipe.prepare_mask_latents

    def keep(*args, **kwargs):  # the pipeline's mask and masked image, doubled for guidance
        made.append(prepare(*args, **kwargs))
        return made[-1]

    pipe.prepare_mask_latents = keep
    starts = record_step_samples(pipe.scheduler)
    switch = dict(control_guidance_start=0.2, control_guidance_end=0.7)
    theirs = _run(
        pipe,
        image,
        mask_image,
        None,
        strength=0.5,
        control_image=control,
        controlnet_conditioning_scale=CONTROL_SCALE,
        **switch,
    )
    assert len(starts) == 5 and len(made) == 1
    with torch.no_grad():
        ode = _control_inpaint_ode(
            pipe,
            "sd",
            mask_image,
            image,
            control,
            False,
            made=[t.chunk(2)[0] for t in made[0]],
            num_inference_steps=STEPS,
            strength=0.5,
            **switch,
        )
        ts = diffusers_grid(pipe.scheduler, STEPS)
        calls = Counter(pipe.controlnet)
        ours = bdia.sample(ode, bdia.get_solver("ddim"), starts[0], ts[5:], progress=False)
    assert calls.calls == 2
    assert ours.dtype == torch.float64
    assert _rel(ours, theirs) < 1e-12


def _controlnet_calls(controlnet):
    """A list that receives (sample, timestep, keyword arguments) of each controlnet call,
    and the hook's handle."""
    calls = []

    def hook(module, args, kwargs):
        sample, timestep = (args + (None, None))[:2]
        calls.append((kwargs.get("sample", sample), kwargs.get("timestep", timestep), kwargs))

    return calls, controlnet.register_forward_pre_hook(hook, with_kwargs=True)


def _assert_same_added(kwargs, theirs, where):
    """SDXL's added conditioning (text_embeds and time_ids) of two calls, bit for bit."""
    for key in ("text_embeds", "time_ids"):
        ours_, theirs_ = kwargs["added_cond_kwargs"][key], theirs["added_cond_kwargs"][key]
        assert torch.equal(ours_, theirs_), (where, key)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("guess", [False, True], ids=["plain", "guess"])
@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_the_controlnet_gets_the_latents_and_the_unet_all_nine_channels(tmp_path, kind, guess):
    """In float32, at each of the pipeline's states: the ODE's model calls the controlnet on
    the pipeline's 4-channel input (the latents, before the mask and masked image are added;
    the conditional half alone in guess mode) with its timestep, control image and prompt
    embeddings (for SDXL its text_embeds and time_ids, the aesthetic ones included), and the
    unet on its 9-channel input with its residuals and embeddings, all bit for bit, and gets
    the pipeline's output bit for bit."""
    pipe = _control_inpaint_pipeline(tmp_path, kind)
    image, mask_image, _, noise = _inputs()
    control = _control_image()
    unet_calls, unet_handle = _unet_calls(pipe.unet)
    net_calls, net_handle = _controlnet_calls(pipe.controlnet)
    try:
        _control_inpaint_run(pipe, image, mask_image, control, noise, guess)
        theirs, their_nets = list(unet_calls), list(net_calls)
        unet_calls.clear()
        net_calls.clear()
        with torch.no_grad():
            ode = _control_inpaint_ode(pipe, kind, mask_image, image, control, guess)
            n = pipe.scheduler.config.num_train_timesteps
            for sample, tau, _, _ in theirs:
                ode.evaluate((float(tau) + 1.0) / n, sample[:1, :4])
    finally:
        unet_handle.remove()
        net_handle.remove()
    assert len(unet_calls) == len(theirs) == len(net_calls) == len(their_nets) == STEPS
    batch = 1 if guess else 2
    for i, ((x, tau, kw), (x2, tau2, kw2)) in enumerate(zip(net_calls, their_nets)):
        assert x.shape == (batch, 4, 8, 8), i
        assert torch.equal(x, x2) and torch.equal(tau.float(), tau2.float().expand(batch)), i
        for key in ("controlnet_cond", "encoder_hidden_states"):
            assert torch.equal(kw[key], kw2[key]), (i, key)
        assert kw["conditioning_scale"] == kw2["conditioning_scale"] == CONTROL_SCALE, i
        assert kw["guess_mode"] == kw2["guess_mode"] == guess, i
        if kind != "sd":
            _assert_same_added(kw, kw2, i)
    for i, ((x, tau, kw, out), (x2, tau2, kw2, out2)) in enumerate(zip(unet_calls, theirs)):
        assert x.shape == (2, 9, 8, 8), i
        assert torch.equal(x, x2) and torch.equal(tau.float(), tau2.float().expand(2)), i
        assert torch.equal(kw["encoder_hidden_states"], kw2["encoder_hidden_states"]), i
        assert torch.equal(
            kw["mid_block_additional_residual"], kw2["mid_block_additional_residual"]
        )
        for a, b in zip(
            kw["down_block_additional_residuals"], kw2["down_block_additional_residuals"]
        ):
            assert torch.equal(a, b), i
        if kind != "sd":
            _assert_same_added(kw, kw2, i)
        assert torch.equal(out, out2), i


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_bdia_scheduler_in_the_controlnet_inpaint_pipeline_is_bdia_sample_and_inverts(
    tmp_path, kind
):
    """BDIAScheduler in a ControlNet inpainting pipeline (9-channel unet, guidance 7.5) gives
    bdia.sample's latents over from_diffusers' ODE bit for bit, without a restart, and its
    final_pair inverts under that ODE to the pipeline's noise exactly; a float64 state's
    round trip comes back to the noise exactly (asserted equal)."""
    pipe = _control_inpaint_pipeline(tmp_path, kind)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    image, mask_image, _, noise = _inputs()
    control = _control_image()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BDIARestartWarning)
        theirs = _control_inpaint_run(pipe, image, mask_image, control, noise, False)
    assert pipe.scheduler.restarts == [] and pipe.scheduler.start_index == 0
    with torch.no_grad():
        ode = _control_inpaint_ode(pipe, kind, mask_image, image, control, False)
    back = assert_ddim_run_is_bdia_sample(pipe, theirs, ode, noise, GAMMA, STEPS)
    assert torch.equal(back, noise.double())


# --------------------------------------------------------------------------- editing


def _edit_inputs(seed=1):
    """Two images (2, 3, 16, 16) in [-1, 1] and a mask (1, 1, 16, 16) of 1 in a rectangle."""
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    return image, mask


def _edit(pipe, image, mask, **kwargs):
    kwargs.update(num_inference_steps=STEPS, mask_image=mask)
    return edit_image(pipe, image, PROMPT, "a photo of a dog", **kwargs)


# The random 9-channel unet under guidance 7.5 drives BDIA's parasitic mode past the warning's
# threshold at 10 steps; the round trip is exact all the same, which is the point.
@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_edit_image_inverts_exactly_under_the_mask(tmp_path, xl):
    """edit_image on an inpainting pipeline inverts and regenerates under the same mask and
    masked image: latent_error 0 with a float64 state (measured 0), the mask at the latents'
    size and the masked image's latents in both ODEs, the caller's mask left as it was; the
    mask is what the edit follows: another mask gives another edit (relative difference above
    1e-3; measured 1.5 and 1.6 for SD and SDXL). A float32 state's round trip measured 0 too.
    """
    pipe = tiny_inpaint_pipeline(tmp_path, xl=xl)
    image, mask = _edit_inputs()
    with untouched(mask, image):
        result = _edit(pipe, image, mask)
    assert result.latent_error == 0.0
    assert result.edited_latents.dtype == torch.float64
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["mask"].shape == (2, 1, 8, 8)
        assert ode.cond["masked_image_latents"].shape == (2, 4, 8, 8)
    other = _edit(pipe, image, 1.0 - mask)
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_edit_image_conditions_as_the_pipeline_prepares_its_mask(tmp_path, xl, monkeypatch):
    """For a PIL image and a grayscale PIL mask with values between 0 and 255, the mask and
    masked image latents of edit_image's ODE are bit for bit those of the pipeline's own
    preprocessing: image_processor and mask_processor (binarised at 0.5), the image blanked
    where the mask is 1, and prepare_mask_latents (the mask sized to the latents, nearest),
    with the VAE's mean where the pipeline draws a sample (patched in for the comparison).
    The pipeline's draw differs from the mean (checked above 1e-3 relative): edit_image takes
    the mean, which is deterministic."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    pipe = tiny_inpaint_pipeline(tmp_path, xl=xl)
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()
    shades = (torch.rand(16, 16, generator=g) * 255).byte().numpy()
    image, mask_image = Image.fromarray(pixels), Image.fromarray(shades, mode="L")
    result = edit_image(
        pipe, image, PROMPT, "a photo of a dog", num_inference_steps=2, mask_image=mask_image
    )
    cond = result.inversion.ode.cond
    condition = pipe.mask_processor.preprocess(mask_image, height=16, width=16)
    assert 0 < float(condition.sum()) < 256 and set(condition.unique().tolist()) == {0.0, 1.0}
    masked = pipe.image_processor.preprocess(image, height=16, width=16) * (condition < 0.5)

    def prepared():
        with torch.no_grad():
            return pipe.prepare_mask_latents(
                condition, masked, 1, 16, 16, torch.float32, "cpu", torch.Generator(), False
            )

    _, drawn = prepared()
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    mask, latents = prepared()
    assert torch.equal(cond["mask"], mask)
    assert torch.equal(cond["masked_image_latents"], latents)
    assert _rel(drawn, latents) > 1e-3


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_the_unet_sees_the_image_only_outside_the_mask_and_the_edit_is_no_blend(tmp_path):
    """The masked image holds the image outside the mask only: changing the pixels under the
    mask leaves masked_image_latents bit for bit as they were (the latents, which hold the
    whole image, change). The edit is the inpainting model's, not a blend of the input back
    in, as a 4-channel unet's pipeline makes it: outside the mask (the latent positions where
    the mask is 0) the edited latents are not the input's (their largest difference there is
    above 1e-3 of the latents' size; measured 1.3e4 times it with the random unet, which is
    no denoiser). What a trained
    inpainting unet keeps there is its own to keep; the round trip is exact either way."""
    pipe = tiny_inpaint_pipeline(tmp_path)
    image, mask = _edit_inputs()
    result = _edit(pipe, image, mask)
    inside = torch.where(mask.bool(), -image, image)
    changed = _edit(pipe, inside, mask)
    cond, cond2 = result.inversion.ode.cond, changed.inversion.ode.cond
    assert torch.equal(cond["masked_image_latents"], cond2["masked_image_latents"])
    assert not torch.equal(result.latents, changed.latents)
    outside = (cond["mask"] == 0).expand_as(result.latents)
    assert bool(outside.any()) and bool((~outside).any())
    moved = (result.edited_latents - result.latents)[outside].abs().max()
    assert float(moved) > 1e-3 * float(result.latents.abs().max())


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("unet_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_bfloat16_sdxl_vae_encodes_the_masked_image_as_the_pipeline(
    tmp_path, unet_dtype, monkeypatch
):
    """A bfloat16 VAE whose config says force_upcast (diffusers' default, SDXL's VAE's) in
    SDXL's inpainting pipeline, beside a float32 or a bfloat16 unet: the pipeline encodes
    the masked image in float32 whatever the VAE's dtype (its _encode_vae_image), from the
    masked image rounded to the unet's dtype, and so does edit_image, whose masked image's
    latents are the pipeline's prepare_mask_latents' bit for bit (the VAE's mean patched in
    for its draw). Both encodings, the masked image's and the image's, run in float32, the
    three decodings in bfloat16 (the pipelines upcast a float16 VAE only to decode), and the
    VAE is bfloat16 again afterwards, each tensor bit for bit (the pipeline would leave it in
    the unet's dtype)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pipe = tiny_inpaint_pipeline(tmp_path, xl=True)
    vae = pipe.vae.to(torch.bfloat16)
    pipe.unet.to(unet_dtype)
    assert vae.config.force_upcast
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seen = _conv_in_dtypes(vae)
    image, mask = _edit_inputs()
    result = edit_image(
        pipe, image, PROMPT, "a photo of a dog", num_inference_steps=2, mask_image=mask
    )
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 3
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    condition = pipe.mask_processor.preprocess(mask, height=16, width=16)
    with torch.no_grad():
        theirs = pipe.prepare_mask_latents(
            condition, image * (condition < 0.5), 2, 16, 16, unet_dtype, "cpu", None, False
        )
    cond = result.inversion.ode.cond
    assert torch.equal(cond["mask"], theirs[0])
    assert torch.equal(cond["masked_image_latents"], theirs[1])


def test_edit_image_refuses_masks_that_do_not_fit_before_any_network(tmp_path):
    """One line each, before any network runs, the caller's mask left as it was: mask_image
    for a text-to-image pipeline (naming what a mask conditions: an inpainting unet, in the
    ControlNet inpainting pipelines too, or a Flux Fill transformer) and for a 4-channel unet
    in the inpainting pipeline; an inpainting pipeline without mask_image; a mask of another
    size, of three channels, of another batch than 1 and the image's, integer or outside
    [0, 1], or not an image."""
    from PIL import Image

    pipe = tiny_inpaint_pipeline(tmp_path)
    four = tiny_inpaint_pipeline(tmp_path, in_channels=4)
    plain = tiny_text_to_image_pipeline(tmp_path)
    image, mask = _edit_inputs()
    targets = (pipe, four, plain)
    calls = [Counter(n) for p in targets for n in (p.unet, p.text_encoder)]
    vae_calls = []
    for target in targets:
        for name in ("encode", "decode"):
            method = getattr(target.vae, name)
            setattr(target.vae, name, lambda *a, _m=method, **k: vae_calls.append(1) or _m(*a, **k))
    cases = [
        (plain, mask, ValueError, "in_channels = 4, the vae's latents alone"),
        (plain, mask, ValueError, "ControlNet inpainting pipelines'), a Flux Fill transformer"),
        (four, mask, ValueError, "in_channels = 4"),
        (pipe, None, ValueError, "give mask_image"),
        (pipe, mask[..., :8, :], ValueError, "(1 or 2, 1, 16, 16)"),
        (pipe, Image.new("L", (8, 16)), ValueError, "8 x 16 (W x H)"),
        (pipe, mask.repeat(1, 3, 1, 1), ValueError, "one channel"),
        (pipe, mask.repeat(3, 1, 1, 1), ValueError, "holds 3 masks for 2 images"),
        (pipe, mask.long(), ValueError, "floating"),
        (pipe, mask * 255, ValueError, "[0, 1]"),
        (pipe, mask.numpy(), TypeError, "PIL image"),
    ]
    with untouched(mask):
        for target, mask_image, error, field in cases:
            with pytest.raises(error) as exc_info:
                edit_image(
                    target, image, PROMPT, "a dog", num_inference_steps=2, mask_image=mask_image
                )
            _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in calls) and not vae_calls


# ------------------------------------------------------------ editing with a ControlNet

# edit_image takes these; it refuses the aesthetic score's time ids, which it does not make.
CONTROL_PIPELINES = ["sd", "sdxl"]


def _control_edit(pipe, image, mask, control, **kwargs):
    kwargs.update(control_image=control, controlnet_conditioning_scale=CONTROL_SCALE)
    return _edit(pipe, image, mask, **kwargs)


@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", CONTROL_PIPELINES)
def test_edit_image_inverts_exactly_under_the_mask_and_control_image(tmp_path, kind, state_dtype):
    """edit_image on a ControlNet inpainting pipeline, Stable Diffusion's or SDXL's (guidance
    7.5, 10 steps), inverts and regenerates under the same mask, masked image and control
    image: latent_error 0 with a float64 state and with a float32 one (measured 0: the round
    trip is exact in the state's own arithmetic), the mask and masked image in both ODEs
    beside the controlnet, the caller's tensors left as they were. The control image is what
    the controlnet follows: another one gives another edit (relative difference above 1e-3;
    measured 0.48 for SD and 1.09 for SDXL)."""
    pipe = _control_inpaint_pipeline(tmp_path, kind)
    image, mask = _edit_inputs()
    control = _control_image()
    with untouched(image, mask, control):
        result = _control_edit(pipe, image, mask, control, state_dtype=state_dtype)
    assert result.latent_error == 0.0
    assert result.edited_latents.dtype == state_dtype
    for ode in (result.inversion.ode, result.target):
        assert ode.f.controlnet is pipe.controlnet
        assert ode.cond["controlnet_cond"].shape == (2, 3, 16, 16)
        assert ode.cond["mask"].shape == (2, 1, 8, 8)
        assert ode.cond["masked_image_latents"].shape == (2, 4, 8, 8)
    other = _control_edit(pipe, image, mask, 1.0 - control, state_dtype=state_dtype)
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", CONTROL_PIPELINES)
def test_edit_image_calls_the_controlnet_and_unet_as_the_pipeline(tmp_path, kind, monkeypatch):
    """In float32, for a PIL image, a grayscale PIL mask and a PIL control image: the
    pipeline's first step and edit_image's first model call give the controlnet the same
    control image (the pipeline's prepare_control_image, in both halves of guidance), scale
    and prompt embeddings (for SDXL its text_embeds and time_ids), and the unet the same
    mask and masked image's latents in its channels 5 to 9 and the same embeddings, bit for
    bit; the controlnet gets the unet's
    first 4 channels, the latents, alone. The VAE's draw is replaced by its mean in the
    pipeline for the comparison (edit_image takes the mean)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    pipe = _control_inpaint_pipeline(tmp_path, kind)
    g = torch.Generator().manual_seed(5)
    image, control = (
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(2)
    )
    shades = (torch.rand(16, 16, generator=g) * 255).byte().numpy()
    mask = Image.fromarray(shades, mode="L")
    settings = dict(
        mask_image=mask,
        control_image=control,
        guidance_scale=GUIDANCE,
        controlnet_conditioning_scale=CONTROL_SCALE,
    )
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    (x, kw, y, nkw), (x2, kw2, y2, nkw2) = first_calls_of_pipeline_and_edit(
        pipe, image, settings, kind != "sd"
    )
    assert x.shape == x2.shape == (2, 9, 8, 8)
    assert torch.equal(x[:, 4:], x2[:, 4:])
    assert torch.equal(y, x[:, :4]) and torch.equal(y2, x2[:, :4])
    assert not torch.equal(x[:, :4], x2[:, :4])  # the pipeline's noise, edit_image's image


def first_calls_of_pipeline_and_edit(pipe, image, settings, xl):
    """The pipeline's first step (at strength 1) and edit_image's first model call, float32,
    on ``image`` (PIL) with ``settings`` (its control image a PIL image, its scale): asserts
    that they give the controlnet the same control image (two halves of guidance), scale and
    prompt embeddings, and the unet the same embeddings (with ``xl`` SDXL's text_embeds and
    time_ids to both), bit for bit; returns ``(x, unet kwargs, controlnet input, controlnet
    kwargs)`` of the pipeline's call and of edit_image's."""
    unet_calls, unet_handle = _unet_calls(pipe.unet)
    net_calls, net_handle = _controlnet_calls(pipe.controlnet)
    try:
        with torch.no_grad():
            pipe(
                PROMPT,
                image=image,
                num_inference_steps=1,
                strength=1.0,
                output_type="latent",
                **settings,
            )
        edit_image(
            pipe,
            image,
            PROMPT,
            "a photo of a dog",
            num_inference_steps=2,
            state_dtype=torch.float32,
            **settings,
        )
    finally:
        unet_handle.remove()
        net_handle.remove()
    (x, _, kw, _), (x2, _, kw2, _) = unet_calls[0], unet_calls[1]
    (y, _, nkw), (y2, _, nkw2) = net_calls[0], net_calls[1]
    scale = settings["controlnet_conditioning_scale"]
    assert nkw["controlnet_cond"].shape == (2, 3, 16, 16)
    assert torch.equal(nkw["controlnet_cond"], nkw2["controlnet_cond"])
    assert nkw["conditioning_scale"] == nkw2["conditioning_scale"] == scale
    for where, (a, b) in {"unet": (kw, kw2), "controlnet": (nkw, nkw2)}.items():
        assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"]), where
        if xl:
            _assert_same_added(a, b, where)
    return (x, kw, y, nkw), (x2, kw2, y2, nkw2)


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_4_channel_unet_in_the_controlnet_inpaint_pipeline_edits_as_text_to_image(tmp_path):
    """StableDiffusionControlNetInpaintPipeline with the text-to-image unet (4 channels), as
    StableDiffusionInpaintPipeline with one, edits without a mask as its text-to-image sibling
    does: the control image made by its prepare_control_image of the whole frame is
    StableDiffusionControlNetPipeline's prepare_image's, and the edit of the same parts is
    that pipeline's, bit for bit (latent_error 0)."""
    base = tiny_controlnet_pipeline(tmp_path)
    four = diffusers.StableDiffusionControlNetInpaintPipeline(
        **base.components, requires_safety_checker=False
    )
    image, _ = _edit_inputs()
    control = _control_image()
    theirs, ours = (
        edit_image(pipe, image, PROMPT, "a dog", num_inference_steps=4, control_image=control)
        for pipe in (base, four)
    )
    assert ours.latent_error == 0.0
    assert torch.equal(ours.edited_latents, theirs.edited_latents)


def test_edit_image_refuses_a_pipeline_that_requires_an_aesthetic_score(tmp_path):
    """SDXL's img2img, inpainting and ControlNet inpainting pipelines give the unet a
    refiner's time ids (original size, crop, aesthetic score) where their config sets
    requires_aesthetics_score; edit_image makes SDXL base's, so it refuses such a pipeline in
    one line naming the setting, before any network runs: the ControlNet inpainting one
    whose unets take five time ids, and an inpainting one whose unet takes six (which the
    pipeline itself would refuse at its call)."""
    control_pipe = _control_inpaint_pipeline(tmp_path, "sdxl-aesthetic")
    inpaint_pipe = tiny_inpaint_pipeline(tmp_path, xl=True)
    inpaint_pipe.register_to_config(requires_aesthetics_score=True)
    image, mask = _edit_inputs()
    for pipe, extra in ((control_pipe, {"control_image": _control_image()}), (inpaint_pipe, {})):
        networks = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae.encoder]
        networks += [pipe.controlnet] if "control_image" in extra else []
        calls = [Counter(n) for n in networks]
        with pytest.raises(ValueError) as exc_info:
            edit_image(
                pipe, image, PROMPT, "a dog", num_inference_steps=2, mask_image=mask, **extra
            )
        _one_line_error(exc_info, "requires_aesthetics_score")
        assert all(c.calls == 0 for c in calls)
