"""ControlNet in bdia.integrations.diffusers: from_diffusers(controlnet=...) against
StableDiffusionControlNetPipeline and StableDiffusionXLControlNetPipeline, BDIAScheduler in
them, edit_image on them, and the refusals.

Tiny random pipelines (``tiny_controlnet_pipeline``: the tiny SD or SDXL parts with
``tiny_controlnet`` of their unet, whose zero convolutions are drawn at random so that the
residuals are not zero). A pipeline's DDIM step and bdia's ``ddim`` are the same update
written in two ways, so whole runs agree to rounding (float64 pipelines: below 1e-12
relative); the model itself, controlnet and unet, is compared bit for bit in float32 at each
of the pipeline's states, and so are whole runs where the step is the same arithmetic
(``EDMEulerScheduler`` and ``euler``; ``BDIAScheduler`` and ``bdia.sample``).
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from conftest import Counter, assert_ddim_run_is_bdia_sample, float64_pipeline

import bdia
from bdia.integrations.diffusers import (
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    SD_NOISE_TABLE,
    tiny_controlnet,
    tiny_controlnet_pipeline,
    tiny_sd3_controlnet,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 10
PROMPT = "a photo of a cat"
GUIDANCE = 7.5
TIME_IDS = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])

# (controlnets, conditioning_scale, guess_mode, control_guidance_start, control_guidance_end):
# one controlnet at a scale; guess mode; switched on at 20 % of the steps and off at 70 %;
# two controlnets, the first switched, in guess mode.
SETTINGS = [
    (1, 0.7, False, 0.0, 1.0),
    (1, 0.7, True, 0.0, 1.0),
    (1, 0.7, False, 0.2, 0.7),
    (2, [0.7, 1.3], True, [0.3, 0.0], [0.8, 1.0]),
]
SETTING_IDS = ["plain", "guess", "switched", "multi"]


def _control(count, seed=5):
    """``count`` control images as the pipelines prepare them: (1, 3, 16, 16) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 16, 16, generator=g) for _ in range(count)]


def _switched(start, end):
    return any(v != 0.0 for v in (start if isinstance(start, list) else [start])) or any(
        v != 1.0 for v in (end if isinstance(end, list) else [end])
    )


def _branches(pipe, xl, prompt=PROMPT):
    """The unet arguments of the conditional and unconditional branches, as the pipeline
    makes them for ``prompt`` and the empty negative prompt."""
    if xl:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device="cpu", do_classifier_free_guidance=True
        )
        time_ids = TIME_IDS.to(embeds.dtype)
        return (
            {
                "encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
            },
            {
                "encoder_hidden_states": negative,
                "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids},
            },
        )
    embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    return {"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative}


def _ode(pipe, xl, images, scale, guess, start, end, guidance=GUIDANCE, strength=1.0):
    """from_diffusers of the pipeline's unet and controlnet under the pipeline's settings
    (``strength``: an img2img pipeline's, by which it counts the switch)."""
    cond, negative = _branches(pipe, xl)
    multi = len(images) > 1
    switched = _switched(start, end)
    return from_diffusers(
        pipe.unet,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=images if multi else images[0],
        conditioning_scale=scale,
        guess_mode=guess,
        control_guidance_start=start,
        control_guidance_end=end,
        num_inference_steps=STEPS if switched else None,
        strength=strength if switched else 1.0,
        guidance_scale=guidance,
        negative_cond=negative,
        **cond,
    )


def _run(pipe, images, noise, scale, guess, start, end, guidance=GUIDANCE):
    """The pipeline's latents from ``noise`` under the settings."""
    with torch.no_grad():
        return pipe(
            PROMPT,
            image=images if len(images) > 1 else images[0],
            height=16,
            width=16,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=noise,
            output_type="latent",
            controlnet_conditioning_scale=scale,
            guess_mode=guess,
            control_guidance_start=start,
            control_guidance_end=end,
        ).images


def _noise(dtype=torch.float32):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("controlnets, scale, guess, start, end", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_ddim_is_the_controlnet_pipeline_to_float64_rounding(
    tmp_path, xl, controlnets, scale, guess, start, end
):
    """bdia's 'ddim' on from_diffusers(unet, scheduler, controlnet=...) and diffusers_grid is
    the ControlNet pipeline's DDIM run under classifier-free guidance 7.5, the whole pipeline
    in float64 (its scheduler's tables too): below 1e-12 relative (measured: up to 1.0e-15,
    float64 rounding of two ways of writing DDIM's step). A controlnet called on another
    batch, with another image, scale or prompt, or switched at another step would be off by
    O(1)."""
    pipe = float64_pipeline(tiny_controlnet_pipeline(tmp_path, xl=xl, controlnets=controlnets))
    images, noise = _control(controlnets), _noise(torch.float64)
    theirs = _run(pipe, images, noise, scale, guess, start, end)
    with torch.no_grad():
        ode = _ode(pipe, xl, [im.double() for im in images], scale, guess, start, end)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(ode, bdia.get_solver("ddim"), noise, ts, progress=False)
    assert _rel(ours, theirs) < 1e-12


def _unet_calls(unet):
    """A list that receives (sample, timestep, keyword arguments, output) of each unet call,
    and the hook's handle."""
    calls = []

    def hook(module, args, kwargs, output):
        sample, timestep = (args + (None, None))[:2]
        sample = kwargs.get("sample", sample)
        timestep = kwargs.get("timestep", timestep)
        out = output.sample if hasattr(output, "sample") else output[0]
        calls.append((sample, timestep, kwargs, out))

    return calls, unet.register_forward_hook(hook, with_kwargs=True)


def _calls_kept(pipe, xl, controlnets, scale, guess, start, end):
    """Asserts that at each of the pipeline's unet calls, float32, the ODE's model evaluated
    at the call's state (the first half of its input: DDIM and PNDM scale no model input) and
    time ((tau + 1) / N, the grid's) calls the unet on the same input with the pipeline's
    residuals, bit for bit, where its controlnet is on, and gets the pipeline's output, bit
    for bit; returns the number of calls with the controlnet on."""
    images = _control(controlnets)
    calls, handle = _unet_calls(pipe.unet)
    try:
        _run(pipe, images, _noise(), scale, guess, start, end)
        theirs = list(calls)
        calls.clear()
        with torch.no_grad():
            ode = _ode(pipe, xl, images, scale, guess, start, end)
            n = pipe.scheduler.config.num_train_timesteps
            for sample, tau, _, _ in theirs:
                ode.evaluate((float(tau) + 1.0) / n, sample[:1])
    finally:
        handle.remove()
    assert len(calls) == len(theirs) == len(pipe.scheduler.timesteps)
    kept = 0
    for i, ((x, tau, kw, out), (x2, tau2, kw2, out2)) in enumerate(zip(calls, theirs)):
        assert torch.equal(x, x2) and torch.equal(tau.float(), tau2.float().expand(2)), i
        assert torch.equal(out, out2), i
        residuals = kw.get("mid_block_additional_residual")
        if residuals is None:
            assert not kw2["mid_block_additional_residual"].any(), i
            continue
        kept += 1
        assert torch.equal(residuals, kw2["mid_block_additional_residual"]), i
        for a, b in zip(
            kw["down_block_additional_residuals"], kw2["down_block_additional_residuals"]
        ):
            assert torch.equal(a, b), i
    return kept


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("controlnets, scale, guess, start, end", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_the_model_is_the_pipelines_bit_for_bit_at_each_step(
    tmp_path, xl, controlnets, scale, guess, start, end
):
    """In float32 the ODE's model is the DDIM pipeline's at every step (see _calls_kept),
    the controlnet switched on at 20 % and off at 70 % included: on at steps 2 to 6. Where
    the pipeline's controlnet is off it adds residuals of 0, and the ODE's, not called, adds
    none, which is the same sum."""
    pipe = tiny_controlnet_pipeline(tmp_path, xl=xl, controlnets=controlnets)
    kept = _calls_kept(pipe, xl, controlnets, scale, guess, start, end)
    assert kept == (5 if (controlnets, start) == (1, 0.2) else STEPS)


def test_the_switch_follows_a_scheduler_that_calls_twice_at_one_time(tmp_path):
    """SD 1.5's PNDM scheduler (PLMS) has 11 timesteps for 10 steps, its second one twice:
    the pipeline switches by i / 11, and the ODE's interval, placed by noise level, has the
    controlnet on at the same calls (timesteps 3 to 6, 0.2 .. 0.7), model bit for bit."""
    scheduler = diffusers.PNDMScheduler(
        **SD_NOISE_TABLE, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1
    )
    pipe = tiny_controlnet_pipeline(tmp_path, scheduler)
    assert _calls_kept(pipe, False, 1, 0.7, False, 0.2, 0.7) == 4


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("switched", [False, True], ids=["always", "switched"])
def test_euler_is_the_sdxl_controlnet_pipeline_with_edm_euler_bit_for_bit(tmp_path, switched):
    """StableDiffusionXLControlNetPipeline with EDMEulerScheduler under guidance 7.5: bdia's
    'euler' on from_diffusers and diffusers_grid gives its latents bit for bit in float32
    (the controlnet gets the preconditioned input c_in x at c_noise, as the unet does)."""
    pipe = tiny_controlnet_pipeline(tmp_path, diffusers.EDMEulerScheduler(), xl=True)
    start, end = (0.2, 0.7) if switched else (0.0, 1.0)
    images, noise = _control(1), _noise()
    theirs = _run(pipe, images, noise, 0.8, False, start, end)
    calls = Counter(pipe.controlnet)
    with torch.no_grad():
        ode = _ode(pipe, True, images, 0.8, False, start, end)
        ts = diffusers_grid(pipe.scheduler, STEPS)
        start_state = noise * pipe.scheduler.init_noise_sigma
        ours = bdia.sample(ode, bdia.get_solver("euler"), start_state, ts, progress=False)
    assert torch.equal(ours, theirs)
    assert calls.calls == (5 if switched else STEPS)


def test_bdia_scheduler_in_the_controlnet_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """BDIAScheduler in StableDiffusionControlNetPipeline (guidance 7.5, the controlnet
    switched off after 70 % of the steps) gives bdia.sample's latents over from_diffusers'
    ODE bit for bit (measured 0), and its final_pair inverts under that ODE to the
    pipeline's noise exactly (measured 0). With a float64 state the BDIA round trip comes
    back to the noise within 1e-12 (measured 0)."""
    pipe = tiny_controlnet_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    images, noise = _control(1), _noise()
    theirs = _run(pipe, images, noise, 0.7, False, 0.0, 0.7)
    with torch.no_grad():
        ode = _ode(pipe, False, images, 0.7, False, 0.0, 0.7)
    back = assert_ddim_run_is_bdia_sample(pipe, theirs, ode, noise, 0.9, STEPS)
    assert _rel(back, noise.double()) < 1e-12


# ---------------------------------------------------------------- the switch by steps


def test_control_guidance_is_the_interval_of_the_pipelines_kept_steps(tmp_path):
    """The pipelines keep the controlnet at step i of n when i / n >= start and (i + 1) / n
    <= end. At 10 DDIM steps, 0.2 .. 0.7 keeps steps 2 to 6: the interval from ts[6] to
    ts[2]; a run from the first step reaches past the grid's start, one to the last step past
    its end; none kept is the empty interval. Off the interval the controlnet is not called."""
    pipe = tiny_controlnet_pipeline(tmp_path)
    ts = [float(t) for t in diffusers_grid(pipe.scheduler, STEPS)]
    inf = float("inf")
    cases = [
        ((0.2, 0.7), (ts[6], ts[2])),
        ((0.0, 0.5), (ts[4], inf)),
        ((0.5, 1.0), (-inf, ts[5])),
        ((0.05, 0.08), (inf, -inf)),
    ]
    for (start, end), expected in cases:
        ode = _ode(pipe, False, _control(1), 1.0, False, start, end)
        assert ode.cond["control_range"] == [expected], (start, end)
    ode = _ode(pipe, False, _control(1), 1.0, False, 0.0, 1.0)
    assert "control_range" not in ode.cond
    # Off, at and on the bounds.
    ode = _ode(pipe, False, _control(1), 1.0, False, 0.2, 0.7)
    calls = Counter(pipe.controlnet)
    x = _noise()
    with torch.no_grad():
        for t, on in ((ts[1], False), (ts[2], True), (ts[6], True), (ts[7], False)):
            before = calls.calls
            ode.evaluate(t, x)
            assert calls.calls - before == on, t


def test_the_control_image_enters_the_fingerprint(tmp_path):
    """Two ODEs of another control image (or scale) are two vector fields: their
    fingerprints differ, so a BDIA pair is not continued under the other."""
    pipe = tiny_controlnet_pipeline(tmp_path)
    a = _ode(pipe, False, _control(1, seed=5), 1.0, False, 0.0, 1.0)
    b = _ode(pipe, False, _control(1, seed=6), 1.0, False, 0.0, 1.0)
    c = _ode(pipe, False, _control(1, seed=5), 0.5, False, 0.0, 1.0)
    d = _ode(pipe, False, _control(1, seed=5), 1.0, False, 0.0, 1.0)
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3
    assert a.fingerprint() == d.fingerprint()
    assert repr(a.f).endswith(", controlnet=ControlNetModel)")


# --------------------------------------------------------------------------- refusals


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    pipe = tiny_controlnet_pipeline(tmp_path_factory.mktemp("cn"), controlnets=2)
    embeds, negative = _branches(pipe, False)
    return pipe, embeds, negative


def _refusals(pipe, embeds, negative):
    """(from_diffusers keyword arguments, the error class, a word the message must hold)."""
    net, nets = pipe.controlnet.nets[0], list(pipe.controlnet.nets)
    image = _control(1)[0]
    xl_net = tiny_controlnet(
        tiny_unet(
            conditional=True,
            channels=4,
            cross_attention_dim=24,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=32,
        )
    )
    return [
        (dict(controlnet=net), ValueError, "controlnet_cond"),
        (dict(controlnet_cond=image), ValueError, "controlnet="),
        (dict(conditioning_scale=0.5), ValueError, "controlnet="),
        (dict(controlnet=pipe.unet, controlnet_cond=image), ValueError, "ControlNetModel"),
        (dict(controlnet=xl_net, controlnet_cond=image), ValueError, "cross_attention_dim"),
        (dict(controlnet=net, controlnet_cond=image[0]), ValueError, "(batch or 1, 3, H, W)"),
        (dict(controlnet=net, controlnet_cond=image[:, :1]), ValueError, "conditioning_channels"),
        (dict(controlnet=net, controlnet_cond=image.numpy()), TypeError, "tensor"),
        (dict(controlnet=net, controlnet_cond=[image]), ValueError, "one tensor"),
        (dict(controlnet=nets, controlnet_cond=[image]), ValueError, "list of 2"),
        (
            dict(controlnet=nets, controlnet_cond=[image] * 2, conditioning_scale=[1.0]),
            ValueError,
            "conditioning_scale",
        ),
        (
            dict(controlnet=net, controlnet_cond=image, conditioning_scale=float("nan")),
            ValueError,
            "conditioning_scale",
        ),
        (dict(controlnet=net, controlnet_cond=image, guess_mode=1), TypeError, "guess_mode"),
        (
            dict(
                controlnet=net,
                controlnet_cond=image,
                control_guidance_start=0.7,
                control_guidance_end=0.2,
                num_inference_steps=STEPS,
            ),
            ValueError,
            "0 <= start",
        ),
        (
            dict(controlnet=net, controlnet_cond=image, control_guidance_end=0.5),
            ValueError,
            "num_inference_steps",
        ),
        (
            dict(controlnet=net, controlnet_cond=image, num_inference_steps=STEPS),
            ValueError,
            "num_inference_steps",
        ),
        (dict(controlnet=copy.deepcopy(net).double(), controlnet_cond=image), ValueError, "dtype"),
        (
            dict(controlnet=net, controlnet_cond=image, down_block_additional_residuals=[]),
            ValueError,
            "down_block_additional_residuals",
        ),
        (
            dict(
                controlnet=net,
                controlnet_cond=image,
                negative_cond={**negative, "controlnet_cond": image},
            ),
            ValueError,
            "negative_cond",
        ),
        (
            dict(controlnet=net, controlnet_cond=image, control_range=[(0.0, 1.0)]),
            ValueError,
            "control_range",
        ),
    ]


def test_bad_controlnet_settings_are_refused_before_any_call(parts):
    """Each refusal is one line naming the cause, before any network runs, and leaves the
    caller's control image as it was."""
    pipe, embeds, negative = parts
    image = _control(1)[0]
    kept = image.clone()
    calls = [Counter(pipe.unet), Counter(pipe.controlnet.nets[0]), Counter(pipe.controlnet)]
    for kwargs, error, field in _refusals(pipe, embeds, negative):
        kwargs = {"negative_cond": negative, **kwargs}
        with pytest.raises(error) as exc_info:
            from_diffusers(pipe.unet, pipe.scheduler, guidance_scale=GUIDANCE, **embeds, **kwargs)
        _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in calls)
    assert torch.equal(image, kept)


def test_settings_the_adapter_cannot_map_are_refused(parts, tmp_path):
    """A switch between a scheduler's two unet calls at one time (Heun's), a controlnet with
    a flow-matching model, a controlnet without the prompt embeddings it is called with, and
    SDXL's controlnet without its time ids."""
    pipe, embeds, negative = parts
    net, image = pipe.controlnet.nets[0], _control(1)[0]
    heun = diffusers.HeunDiscreteScheduler()

    def switched(start):
        return from_diffusers(
            pipe.unet,
            heun,
            controlnet=net,
            controlnet_cond=image,
            control_guidance_start=start,
            num_inference_steps=STEPS,
            **embeds,
        )

    # Heun's 19 timesteps call the unet twice at each noise level but the first: 0.2 keeps
    # timestep 4 of the pair 3, 4; 0.15 keeps 3 and 4, from the grid's third time on.
    with pytest.raises(ValueError) as exc_info:
        switched(0.2)
    _one_line_error(exc_info, "HeunDiscreteScheduler's two unet calls at one time")
    ts = diffusers_grid(heun, STEPS)
    assert switched(0.15).cond["control_range"] == [(-float("inf"), float(ts[2]))]
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(pipe.unet, pipe.scheduler, controlnet=net, controlnet_cond=image)
    _one_line_error(exc_info, "encoder_hidden_states")
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(
            tiny_sd3_transformer(),
            diffusers.FlowMatchEulerDiscreteScheduler(),
            controlnet=net,
            controlnet_cond=image,
        )
    _one_line_error(exc_info, "SD3's transformer")
    # SD3's and Flux's controlnets are mapped, but with their own transformers: beside a
    # unet the refusal says where they go.
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(
            pipe.unet,
            pipe.scheduler,
            controlnet=tiny_sd3_controlnet(tiny_sd3_transformer()),
            controlnet_cond=image,
            **embeds,
        )
    _one_line_error(exc_info, "go with their own transformers (pass pipe.transformer")
    xl = tiny_controlnet_pipeline(tmp_path, xl=True)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(
            xl.unet,
            xl.scheduler,
            controlnet=xl.controlnet,
            controlnet_cond=image,
            encoder_hidden_states=torch.zeros(1, 16, 24),
            added_cond_kwargs={"text_embeds": torch.zeros(1, 8)},
        )
    _one_line_error(exc_info, "'time_ids'")


def test_a_control_image_of_the_wrong_batch_or_size_is_refused_before_any_call(parts):
    """At the first evaluation, before the controlnet or the unet is called: a control image
    whose batch is neither 1 nor the state's, or whose size is not the latents' times the
    controlnet's factor (2 here)."""
    pipe, embeds, negative = parts
    net = pipe.controlnet.nets[0]
    calls = [Counter(pipe.unet), Counter(net)]
    x = torch.randn(2, 4, 8, 8)
    t = float(diffusers_grid(pipe.scheduler, STEPS)[0])
    for image, field in (
        (torch.rand(3, 3, 16, 16), "batch 3"),
        (torch.rand(1, 3, 8, 8), "8 x 8 (H x W)"),
    ):
        kept = image.clone()
        ode = from_diffusers(
            pipe.unet, pipe.scheduler, controlnet=net, controlnet_cond=image, **embeds
        )
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(t, x)
        _one_line_error(exc_info, field)
        assert torch.equal(image, kept)
    assert all(c.calls == 0 for c in calls)


# --------------------------------------------------------------------------- editing


# The random unet and controlnets under guidance 7.5 drive BDIA's parasitic mode past the
# warning's threshold at 10 steps; the round trip is exact all the same, which is the point.
@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("controlnets", [1, 2], ids=["one", "multi"])
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_edit_image_inverts_exactly_under_the_control_image(tmp_path, xl, controlnets):
    """edit_image on a ControlNet pipeline inverts and regenerates under the same control
    image: latent_error 0 with a float64 state (guidance 7.5, the first controlnet switched
    on at 10 % and off at 80 % of the steps), and the controlnet is what the edit follows:
    another control image gives another edit."""
    pipe = tiny_controlnet_pipeline(tmp_path, xl=xl, controlnets=controlnets)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    control = _control(controlnets)
    settings = dict(
        control_guidance_start=0.1 if controlnets == 1 else [0.1, 0.0],
        control_guidance_end=0.8 if controlnets == 1 else [0.8, 1.0],
    )

    def edit(control):
        return edit_image(
            pipe,
            image,
            PROMPT,
            "a photo of a dog",
            num_inference_steps=STEPS,
            control_image=control if controlnets > 1 else control[0],
            **settings,
        )

    result = edit(control)
    assert result.latent_error == 0.0
    assert result.edited_latents.dtype == torch.float64
    other = edit(_control(controlnets, seed=9))
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-3


def _controlnet_kwargs(controlnet):
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs)

    return calls, controlnet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_edit_image_gives_the_controlnet_what_the_pipeline_gives_it(tmp_path, xl):
    """The pipeline's first step and edit_image's first model call give the controlnet the
    same control image (a PIL image, prepared by the pipeline's prepare_image, in both halves
    of guidance), scale and prompt embeddings, bit for bit."""
    from PIL import Image

    pipe = tiny_controlnet_pipeline(tmp_path, xl=xl)
    pixels = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 255).byte()
    control = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    calls, handle = _controlnet_kwargs(pipe.controlnet)
    try:
        with torch.no_grad():
            pipe(
                PROMPT,
                image=control,
                height=16,
                width=16,
                num_inference_steps=1,
                guidance_scale=GUIDANCE,
                controlnet_conditioning_scale=0.6,
                output_type="latent",
            )
        edit_image(
            pipe,
            torch.zeros(1, 3, 16, 16),
            PROMPT,
            "a photo of a dog",
            num_inference_steps=2,
            guidance_scale=GUIDANCE,
            control_image=control,
            controlnet_conditioning_scale=0.6,
            state_dtype=torch.float32,
        )
    finally:
        handle.remove()
    theirs, ours = calls[0], calls[1]
    assert theirs["controlnet_cond"].shape == (2, 3, 16, 16)
    for key in ("controlnet_cond", "encoder_hidden_states"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["conditioning_scale"] == theirs["conditioning_scale"] == 0.6
    if xl:
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(ours["added_cond_kwargs"][key], theirs["added_cond_kwargs"][key]), (
                key
            )


def test_edit_image_refuses_control_settings_that_do_not_fit_before_any_network(tmp_path):
    """A ControlNet pipeline without control_image, a control image or setting for a pipeline
    without a controlnet, a list of another length than the controlnets, a control image
    batch that is neither 1 nor the image's: one line each, before any network runs."""
    pipe = tiny_controlnet_pipeline(tmp_path, controlnets=2)
    plain = diffusers.StableDiffusionPipeline(
        **{k: v for k, v in pipe.components.items() if k != "controlnet"},
        requires_safety_checker=False,
    )
    image = torch.zeros(2, 3, 16, 16)
    control = _control(2)
    networks = [pipe.unet, pipe.text_encoder, pipe.controlnet, *pipe.controlnet.nets]
    calls = [Counter(n) for n in networks]
    vae_calls = []
    for name in ("encode", "decode"):
        method = getattr(pipe.vae, name)
        setattr(pipe.vae, name, lambda *a, _m=method, **k: vae_calls.append(1) or _m(*a, **k))
    cases = [
        (pipe, {}, "give control_image, the image that guides it (the pipeline's image=)"),
        (pipe, {"control_image": control[0]}, "list of 2"),
        (pipe, {"control_image": [torch.rand(3, 3, 16, 16)] * 2}, "holds 3 images"),
        (pipe, {"control_image": control, "control_guidance_end": 1.5}, "0 <= start"),
        (plain, {"control_image": control[0]}, "no controlnet"),
        (plain, {"guess_mode": True}, "guess_mode"),
    ]
    for target, kwargs, field in cases:
        with pytest.raises(ValueError) as exc_info:
            edit_image(target, image, PROMPT, "a photo of a dog", num_inference_steps=2, **kwargs)
        _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in calls) and not vae_calls
