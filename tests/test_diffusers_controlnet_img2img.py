"""ControlNet img2img in bdia.integrations.diffusers: from_diffusers(controlnet=...) against
StableDiffusionControlNetImg2ImgPipeline and StableDiffusionXLControlNetImg2ImgPipeline, which
start from the image's latents noised at ``strength`` and run the grid's tail, BDIAScheduler
in them, edit_image on them, and the refusals of ``strength``.

Tiny random pipelines (``tiny_controlnet_pipeline(img2img=True)``: the tiny SD or SDXL parts
with ``tiny_controlnet`` of their unet, whose zero convolutions are drawn at random). With
``strength`` 0.5 a pipeline noises the image's latents to the 6th of its 10 timesteps and
runs the last 5 from there; its first step's sample is that start, and the run is an ODE
solve on the grid's tail ``ts[5:]``. A pipeline's DDIM step and bdia's ``ddim`` are the same
update written in two ways, so whole runs agree to rounding; ``BDIAScheduler`` and
``bdia.sample`` are the same arithmetic, bit for bit. The pipelines count
``control_guidance_start`` and ``control_guidance_end`` over the steps they run, the 5, not
the 10: ``from_diffusers`` takes their ``strength`` to count so.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Counter, float64_pipeline, record_step_samples, untouched
from test_diffusers_controlnet import SETTING_IDS, SETTINGS, _control
from test_diffusers_controlnet import _ode as controlnet_ode
from test_diffusers_inpaint import first_calls_of_pipeline_and_edit

import bdia
from bdia.integrations.diffusers import (
    BDIARestartWarning,
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    tiny_controlnet_inpaint_pipeline,
    tiny_controlnet_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 10
STRENGTH = 0.5
# The pipelines' first timestep at STRENGTH: int(10 * 0.5) = 5 steps run, from the 6th.
START = STEPS - int(STEPS * STRENGTH)
PROMPT = "a photo of a cat"
GUIDANCE = 7.5
GAMMA = 0.9


def _pipeline(tmp_path, xl, controlnets=1):
    return tiny_controlnet_pipeline(tmp_path, xl=xl, controlnets=controlnets, img2img=True)


def _image(dtype=torch.float32):
    """The image to start from, (1, 3, 16, 16) in [0, 1]."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=dtype)


def _run(pipe, image, images, scale, guess, start, end):
    """The pipeline's latents from ``image`` noised at STRENGTH (seed 0) under the ControlNet
    settings."""
    with torch.no_grad():
        return pipe(
            PROMPT,
            image=image,
            control_image=images if len(images) > 1 else images[0],
            height=16,
            width=16,
            strength=STRENGTH,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            controlnet_conditioning_scale=scale,
            guess_mode=guess,
            control_guidance_start=start,
            control_guidance_end=end,
        ).images


def _ode(pipe, xl, images, scale, guess, start, end):
    """from_diffusers of the pipeline's unet and controlnet under its settings, the switch
    counted over the steps that STRENGTH leaves, as the pipeline counts it."""
    return controlnet_ode(pipe, xl, images, scale, guess, start, end, strength=STRENGTH)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("controlnets, scale, guess, start, end", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_ddim_is_the_controlnet_img2img_pipeline_to_rounding(
    tmp_path, xl, controlnets, scale, guess, start, end, dtype
):
    """bdia's 'ddim' on from_diffusers(unet, scheduler, controlnet=...) from the pipeline's
    first state (the image's latents noised by add_noise at the 6th of 10 timesteps) over
    the grid's tail ts[5:] is the ControlNet img2img pipeline's DDIM run at strength 0.5,
    guidance 7.5: the whole pipeline in float64 (its scheduler's tables too), below 1e-12
    relative (measured 0 to 7.1e-16: float64 rounding of two ways of writing DDIM's step);
    in float32 below 1e-5 (measured 4.1e-7 to 6.3e-7). One controlnet or two, in guess mode, and
    switched on at 20 % and off at 70 % of the 5 steps run (steps 1 and 2 of them: the 7th
    and 8th of the grid); counted over all 10 steps, the switch would keep the 6th and 7th
    and be off by O(1)."""
    pipe = _pipeline(tmp_path, xl, controlnets)
    if dtype == torch.float64:
        pipe = float64_pipeline(pipe)
    # Float32 control images: prepare_control_image rounds them to float32 first.
    images = _control(controlnets)
    starts = record_step_samples(pipe.scheduler)
    theirs = _run(pipe, _image(dtype), images, scale, guess, start, end)
    assert len(starts) == STEPS - START
    with torch.no_grad():
        ode = _ode(pipe, xl, images, scale, guess, start, end)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(ode, bdia.get_solver("ddim"), starts[0], ts[START:], progress=False)
    assert ours.dtype == dtype
    assert _rel(ours, theirs) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_bdia_scheduler_in_the_controlnet_img2img_pipeline_is_bdia_sample_and_inverts(tmp_path, xl):
    """BDIAScheduler (gamma 0.9) in the ControlNet img2img pipeline at strength 0.5,
    guidance 7.5, the controlnet switched on at 20 % and off at 70 % of the steps run (2 of
    5, where bdia.sample calls it): it starts at the 6th of 10 timesteps without a restart
    and records it (start_index 5); its latents are bdia.sample's over from_diffusers' ODE on
    ts[5:] from the noised latents, bit for bit, and its final_pair inverts with bdia.invert
    on ts[5:] to them exactly (measured 0). A float64 state's round trip comes back exactly
    (measured 0; asserted equal)."""
    pipe = _pipeline(tmp_path, xl)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=GAMMA)
    starts = record_step_samples(pipe.scheduler)
    images = _control(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BDIARestartWarning)
        theirs = _run(pipe, _image(), images, 0.7, False, 0.2, 0.7)
    pair = pipe.scheduler.final_pair
    assert pipe.scheduler.restarts == []
    assert pipe.scheduler.start_index == pair.start_index == START
    assert torch.equal(pair.later, theirs)
    solver = bdia.bdia("ddim", GAMMA)
    start = starts[0]
    with torch.no_grad():
        ode = _ode(pipe, xl, images, 0.7, False, 0.2, 0.7)
        ts = diffusers_grid(pipe.scheduler, STEPS)[START:]
        calls = Counter(pipe.controlnet)
        ours = bdia.sample(ode, solver, start, ts, progress=False)
        assert calls.calls == 2  # the pipeline's too add residuals at its steps 1 and 2 alone
        back = bdia.invert(ode, solver, pair, ts, progress=False)
        wide = bdia.sample(ode, solver, start.double(), ts, return_pair=True, progress=False)
        wide_back = bdia.invert(ode, solver, wide, ts, progress=False)
    assert torch.equal(ours, theirs)
    assert torch.equal(back.earlier, start)
    assert torch.equal(wide_back.earlier, start.double())


# ---------------------------------------------------------------- the switch by steps


def test_strength_counts_the_switch_over_the_steps_run(tmp_path):
    """At 10 DDIM steps and strength 0.5 the pipelines run steps 5 to 9 and keep the
    controlnet at run step i of 5 when i / 5 >= start and (i + 1) / 5 <= end: 0.2 .. 0.7
    keeps run steps 1 and 2 (grid steps 6 and 7), the interval from ts[7] to ts[6]; a run
    from the run's first step reaches past its start, one to the last past the grid's end.
    Strength 1 is the switch without it; 0.35 leaves int(3.5) = 3 steps, run from the 8th."""
    pipe = _pipeline(tmp_path, False)
    ts = [float(t) for t in diffusers_grid(pipe.scheduler, STEPS)]
    inf = float("inf")
    cases = [
        (0.5, (0.2, 0.7), (ts[7], ts[6])),
        (0.5, (0.0, 0.5), (ts[6], inf)),
        (0.5, (0.5, 1.0), (-inf, ts[8])),
        (1.0, (0.2, 0.7), (ts[6], ts[2])),
        (0.35, (0.3, 1.0), (-inf, ts[8])),
    ]
    for strength, (start, end), expected in cases:
        ode = from_diffusers(
            pipe.unet,
            pipe.scheduler,
            controlnet=pipe.controlnet,
            controlnet_cond=_control(1)[0],
            control_guidance_start=start,
            control_guidance_end=end,
            num_inference_steps=STEPS,
            strength=strength,
            encoder_hidden_states=torch.zeros(1, 4, 16),
        )
        assert ode.cond["control_range"] == [expected], (strength, start, end)


def test_a_strength_that_does_not_fit_is_refused_in_one_line(tmp_path):
    """strength outside (0, 1], one that leaves no step (0.05 of 10 steps: int(0.5) = 0, as
    the pipelines refuse it), not a number, given without a switch (it changes nothing
    then, as num_inference_steps) or without a controlnet: one line each, before any call,
    the caller's control image left as it was."""
    pipe = _pipeline(tmp_path, False)
    image = _control(1)[0]
    embeds = {"encoder_hidden_states": torch.zeros(1, 4, 16)}
    switched = dict(control_guidance_end=0.7, num_inference_steps=STEPS)
    control = dict(controlnet=pipe.controlnet, controlnet_cond=image)
    cases = [
        (dict(control, **switched, strength=1.5), ValueError, "0 < strength <= 1"),
        (dict(control, **switched, strength=0.0), ValueError, "0 < strength <= 1"),
        (dict(control, **switched, strength=0.05), ValueError, "leaves no step"),
        (dict(control, **switched, strength=float("nan")), ValueError, "strength"),
        (dict(control, **switched, strength="0.5"), TypeError, "strength"),
        (dict(control, strength=0.5), ValueError, "strength is needed only"),
        (dict(strength=0.5), ValueError, "controlnet="),
    ]
    calls = [Counter(pipe.unet), Counter(pipe.controlnet)]
    with untouched(image):
        for kwargs, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(pipe.unet, pipe.scheduler, **embeds, **kwargs)
            _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in calls)


# --------------------------------------------------------------------------- editing


def _edit(pipe, image, control, **kwargs):
    return edit_image(
        pipe,
        image,
        PROMPT,
        "a photo of a dog",
        num_inference_steps=STEPS,
        control_image=control,
        **kwargs,
    )


# The random unet and controlnet under guidance 7.5 drive BDIA's parasitic mode past the
# warning's threshold at 10 steps; the round trip is exact all the same, which is the point.
@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_edit_image_inverts_exactly_under_the_control_image(tmp_path, xl, state_dtype):
    """edit_image on a ControlNet img2img pipeline inverts the image itself, over the whole
    grid, as on the text-to-image pipeline: latent_error 0 with a float64 and a float32 state
    (guidance 7.5, the controlnet switched on at 10 % and off at 80 % of the 10 steps), the
    control image in both ODEs, the caller's tensors left as they were. Another control image
    gives another edit (relative difference above 1e-3)."""
    pipe = _pipeline(tmp_path, xl)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    control = _control(1)[0]
    switch = dict(control_guidance_start=0.1, control_guidance_end=0.8, state_dtype=state_dtype)
    with untouched(image, control):
        result = _edit(pipe, image, control, **switch)
    assert result.latent_error == 0.0
    assert result.edited_latents.dtype == state_dtype
    for ode in (result.inversion.ode, result.target):
        assert ode.f.controlnet is pipe.controlnet
        assert ode.cond["controlnet_cond"].shape == (2, 3, 16, 16)
    other = _edit(pipe, image, 1.0 - control, **switch)
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_edit_image_calls_the_controlnet_and_unet_as_the_img2img_pipeline(tmp_path, xl):
    """In float32, for a PIL image and a PIL control image: the pipeline's first step (at
    strength 1) and edit_image's first model call give the controlnet the same control image
    (the pipeline's prepare_control_image, in both halves of guidance), scale and prompt
    embeddings (for SDXL its text_embeds and time_ids), and the unet the same embeddings,
    bit for bit; the controlnet gets the unet's input."""
    from PIL import Image

    pipe = _pipeline(tmp_path, xl)
    g = torch.Generator().manual_seed(5)
    image, control = (
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(2)
    )
    settings = dict(
        control_image=control, guidance_scale=GUIDANCE, controlnet_conditioning_scale=0.6
    )
    (x, _, y, _), (x2, _, y2, _) = first_calls_of_pipeline_and_edit(pipe, image, settings, xl)
    assert torch.equal(y, x) and torch.equal(y2, x2)


def test_edit_image_refuses_an_img2img_pipeline_that_requires_an_aesthetic_score(tmp_path):
    """StableDiffusionXLControlNetImg2ImgPipeline with requires_aesthetics_score in its
    config gives the unet and the controlnet a refiner's time ids, which edit_image does not
    make: refused in one line naming the setting, before any network runs."""
    pipe = _pipeline(tmp_path, True)
    pipe.register_to_config(requires_aesthetics_score=True)
    networks = [pipe.unet, pipe.controlnet, pipe.text_encoder, pipe.text_encoder_2]
    calls = [Counter(n) for n in networks + [pipe.vae.encoder]]
    with pytest.raises(ValueError) as exc_info:
        _edit(pipe, torch.zeros(1, 3, 16, 16), _control(1)[0])
    _one_line_error(exc_info, "requires_aesthetics_score")
    assert all(c.calls == 0 for c in calls)


def test_a_missing_control_image_is_named_as_the_pipeline_takes_it(tmp_path):
    """The img2img and ControlNet inpainting pipelines take the control image as
    control_image= (their image= is the image to start from), and the refusal of an edit
    without one names that parameter; before any network runs."""
    img2img = _pipeline(tmp_path, False)
    inpaint = tiny_controlnet_inpaint_pipeline(tmp_path)
    mask = torch.ones(1, 1, 16, 16)
    for pipe, extra in ((img2img, {}), (inpaint, {"mask_image": mask})):
        calls = [Counter(n) for n in (pipe.unet, pipe.controlnet, pipe.text_encoder)]
        with pytest.raises(ValueError) as exc_info:
            _edit(pipe, torch.zeros(1, 3, 16, 16), None, **extra)
        given = "give control_image, the image that guides it (the pipeline's control_image=)"
        _one_line_error(exc_info, given)
        assert all(c.calls == 0 for c in calls)
