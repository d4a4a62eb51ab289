"""bdia.integrations.diffusers with Flux's ControlNet: from_diffusers(controlnet=,
controlnet_cond=) against FluxControlNetPipeline's run, BDIAScheduler in that pipeline, and
the refusals.

The controlnet is a tiny random ``FluxControlNetModel`` of the tiny Flux transformer's config
(``tiny_flux_controlnet``, InstantX's kind: it takes the control image's packed latents).
The pipeline calls it before the transformer on the same latents, timestep, prompt, guidance
embedding and ids, with the control latents, which are fixed over the run, so the run is an
ODE in the latents. As for FluxPipeline, parity is checked in float32, where both sides make
the same float operations on the same inputs and agree bit for bit; exactness of the
inversion in float64.
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from _pipeline_runs import (
    assert_bdia_run_inverts,
    assert_refused_at_first_evaluation,
    controlnet_euler_sample,
    pipeline_controlnet_ode,
)
from conftest import (
    Counter,
    flow_img2img_runs,
    flow_round_trip_error,
    untouched,
)
from test_diffusers_flux import (
    EMBEDDED,
    N_STEPS,
    TOKENS,
    TRUE_CFG,
    _cond,
    _dev_scheduler,
    _encoded,
    _mu,
    _noise,
    _one_line_error,
    _pipeline_latents,
    _sigmas,
)
from test_diffusers_flux_control import (
    PROMPT,
    SEED,
    _control_image,
    _edit,
    _pipeline_control_latents,
    _stand_in,
)

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_controlnet,
    tiny_flux_controlnet,
    tiny_flux_controlnet_pipeline,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NEGATIVE = "a painting of a dog"


def _pipeline_cond(pipe, true_cfg=False):
    """from_diffusers' Flux conditioning of PROMPT (and NEGATIVE under true CFG) as the
    pipeline encodes it."""
    cond = dict(_encoded(pipe, PROMPT), img_ids=_cond(torch.float32)["img_ids"], guidance=EMBEDDED)
    if true_cfg:
        cond.update(guidance_scale=TRUE_CFG, negative_cond=_encoded(pipe, NEGATIVE))
    return cond


def _grid(scheduler):
    return diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())


_SETTINGS = {
    "plain": ({}, False),
    "true-cfg": ({}, True),
    "scaled-and-switched": (
        dict(conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7),
        False,
    ),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_SETTINGS))
def test_controlnet_pipeline_gives_bdia_samples_latents(tmp_path, kind):
    """FluxControlNetPipeline itself (tiny parts, a prompt through its encoders, a PIL control
    image it prepares and encodes itself, guidance embedding 3.5; true CFG with a negative
    prompt; a scale of 0.6 and the controlnet on from 20% to 70% of the steps) returns the
    latents of bdia.sample with euler on from_diffusers(controlnet=pipe.controlnet,
    controlnet_cond=<the pipeline's control latents>) over the pipeline's grid, bit for bit.
    The controlnet runs once per step where the pipeline keeps it (5 of 10 steps when
    switched: the pipeline calls it at every step with a scale of 0 elsewhere, which adds
    nothing), and another control image gives another run."""
    settings, true_cfg = _SETTINGS[kind]
    pipe = tiny_flux_controlnet_pipeline(tmp_path)
    noise = _noise(torch.float32)
    control_image = _control_image()
    options = dict(
        control_image=control_image,
        generator=torch.Generator().manual_seed(SEED),
        controlnet_conditioning_scale=settings.get("conditioning_scale", 1.0),
        control_guidance_start=settings.get("control_guidance_start", 0.0),
        control_guidance_end=settings.get("control_guidance_end", 1.0),
    )
    if true_cfg:
        options.update(negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG)
    latents = _pipeline_latents(pipe, noise, PROMPT, **options)
    control = _pipeline_control_latents(pipe, control_image)
    if settings.get("control_guidance_start") is not None:
        settings = dict(settings, num_inference_steps=N_STEPS)
    cond = _pipeline_cond(pipe, true_cfg)
    ts = _grid(pipe.scheduler)
    ours, calls = controlnet_euler_sample(pipe, control, noise, ts, **settings, **cond)
    assert torch.equal(ours, latents)
    assert calls[0] == (5 if "control_guidance_start" in settings else N_STEPS)
    other = dict(options, control_image=_control_image(seed=9))
    other["generator"] = torch.Generator().manual_seed(SEED)
    moved = _pipeline_latents(pipe, noise, PROMPT, **other)
    assert float((moved - latents).abs().max() / latents.abs().max()) > 1e-3


def test_bdia_euler_inverts_the_controlnet_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the ControlNet ODE (float64 transformer, controlnet and state,
    Flux-dev's shifted grid, the controlnet on from 20% to 70% of the steps), from the noise
    at t = 1 to 0 and back, returns the noise to 1e-12 relative (measured: 0; the pair's low
    words carry what the state's rounding drops)."""
    transformer = tiny_flux_transformer(dtype=torch.float64)
    ode = from_diffusers(
        transformer,
        _dev_scheduler(),
        controlnet=tiny_flux_controlnet(transformer),
        controlnet_cond=_stand_in(torch.float64),
        control_guidance_start=0.2,
        control_guidance_end=0.7,
        num_inference_steps=N_STEPS,
        **_cond(torch.float64, true_cfg=True),
    )
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_dev_scheduler())) < 1e-12


def test_bdia_scheduler_in_controlnet_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """FluxControlNetPipeline with BDIAScheduler.from_config(its config, gamma=0.9) and the
    controlnet on from 20% to 70% of the steps gives the latents and the final pair (low
    words included) of bdia.sample with bdia(euler, 0.9) on the ControlNet ODE, bit for bit;
    bdia.invert from the pair returns the starting noise bit for bit."""
    pipe = tiny_flux_controlnet_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise(torch.float32)
    control_image = _control_image()
    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7)
    latents = _pipeline_latents(
        pipe,
        noise,
        PROMPT,
        control_image=control_image,
        generator=torch.Generator().manual_seed(SEED),
        **bounds,
    )
    ode = pipeline_controlnet_ode(
        pipe,
        _pipeline_control_latents(pipe, control_image),
        num_inference_steps=N_STEPS,
        **bounds,
        **_pipeline_cond(pipe),
    )
    ts = _grid(pipe.scheduler)
    assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.9)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("strength, k, kept", [(0.6, 4, 2), (0.65, 3, 2)])
def test_img2img_controlnet_pipeline_is_the_odes_run_on_the_grids_tail(tmp_path, strength, k, kept):
    """FluxControlNetImg2ImgPipeline on the tiny ControlNet pipeline's parts, a scale of 0.6
    and the controlnet on from 20% to 70%. At strength 0.6 it runs the last 6 of 10
    timesteps from the image latents noised to grid[4] and counts the bounds over those 6
    (steps 2 and 3 of them kept; over all 10, entries 4 to 6 would be). At 0.65 it runs
    ceil(6.5) = 7 from grid[3] (the Stable Diffusion pipelines run int(6.5) = 6) and keeps
    steps 2 and 3 of those 7. With its own scheduler its latents are euler's on
    from_diffusers(..., strength=strength) over grid[k:] from the noised latents (its first
    step's sample), bit for bit, with the controlnet called at the kept steps alone; with
    BDIAScheduler (gamma 0.9) they and the final pair are bdia.sample's with bdia(euler,
    0.9), bit for bit, and bdia.invert from the pair returns the noised latents bit for
    bit."""
    parts = dict(tiny_flux_controlnet_pipeline(tmp_path).components)
    for name in ("image_encoder", "feature_extractor"):  # the img2img pipeline has neither
        parts.pop(name)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    control_image = _control_image()
    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7)

    def img2img(pipe):
        return _pipeline_latents(
            pipe,
            None,
            PROMPT,
            image=image,
            strength=strength,
            control_image=control_image,
            controlnet_conditioning_scale=0.6,
            generator=torch.Generator().manual_seed(SEED),
            **bounds,
        )

    pipe, runs = flow_img2img_runs(diffusers.FluxControlNetImg2ImgPipeline, parts, img2img)
    (euler_latents, euler_samples), (latents, samples) = runs
    start = samples[0]
    assert torch.equal(start, euler_samples[0]) and len(samples) == N_STEPS - k
    ode = pipeline_controlnet_ode(
        pipe,
        _pipeline_control_latents(pipe, control_image),
        conditioning_scale=0.6,
        num_inference_steps=N_STEPS,
        strength=strength,
        **bounds,
        **_pipeline_cond(pipe),
    )
    ts = _grid(pipe.scheduler)
    calls = Counter(pipe.controlnet)
    with torch.no_grad():
        euler = bdia.sample(ode, bdia.get_solver("euler"), start, ts[k:], progress=False)
    assert torch.equal(euler, euler_latents)
    assert calls.calls == kept
    assert_bdia_run_inverts(pipe, latents, ode, start, ts, 0.9, start_index=k)


# -------------------------------------------------------------------------- refusals


def test_controlnets_and_settings_not_mapped_are_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: several controlnets,
    a union controlnet (num_mode), an XLabs one (an input_hint_block), one of another
    transformer or of another guidance embedding or dtype, Stable Diffusion's ControlNetModel,
    a controlnet for SD3's transformer; beside a Depth/Canny transformer's control latents;
    no control latents, a list, a non-tensor, latents not packed or of other channels; guess
    mode; bounds out of order or without num_inference_steps; a strength without bounds or
    outside (0, 1]; a residual key in cond."""
    transformer = tiny_flux_transformer()
    net = tiny_flux_controlnet(transformer)
    control = _stand_in()
    flow = _dev_scheduler()
    base = dict(_cond(torch.float32), controlnet=net, controlnet_cond=control)
    counters = [Counter(transformer), Counter(net)]
    fields = {k: v for k, v in net.config.items() if not k.startswith("_")}
    union = diffusers.FluxControlNetModel(**{**fields, "num_mode": 3})
    xlabs = diffusers.FluxControlNetModel(**{**fields, "conditioning_embedding_channels": 16})
    unet_net = tiny_controlnet(tiny_unet(conditional=True, channels=4, cross_attention_dim=16))
    cases = [
        (dict(controlnet=[net, net]), ValueError, "several controlnets"),
        (dict(controlnet=union), ValueError, "num_mode = 3"),
        (dict(controlnet=xlabs), ValueError, "input_hint_block"),
        (
            dict(controlnet=tiny_flux_controlnet(tiny_flux_transformer(joint_attention_dim=8))),
            ValueError,
            "joint_attention_dim",
        ),
        (
            dict(controlnet=tiny_flux_controlnet(tiny_flux_transformer(guidance_embeds=False))),
            ValueError,
            "guidance_embeds = False",
        ),
        (
            dict(controlnet=tiny_flux_controlnet(tiny_flux_transformer(dtype=torch.float64))),
            ValueError,
            "torch.float64",
        ),
        (dict(controlnet=unet_net), ValueError, "ControlNetModel"),
        (dict(controlnet_cond=None), ValueError, "needs controlnet_cond"),
        (dict(controlnet_cond=[control]), ValueError, "one tensor"),
        (dict(controlnet_cond=control.numpy()), TypeError, "must be a tensor"),
        (dict(controlnet_cond=control[None]), ValueError, "(batch or 1, tokens, 16)"),
        (dict(controlnet_cond=control[..., :8]), ValueError, "(batch or 1, tokens, 16)"),
        (dict(guess_mode=True), ValueError, "guess_mode"),
        (
            dict(control_guidance_start=0.8, control_guidance_end=0.2, num_inference_steps=4),
            ValueError,
            "0 <= start < end",
        ),
        (dict(control_guidance_start=0.2), ValueError, "need num_inference_steps"),
        (dict(num_inference_steps=4), ValueError, "leave it out"),
        (dict(strength=0.5), ValueError, "strength is needed only with"),
        (
            dict(strength=1.5, control_guidance_start=0.2, num_inference_steps=4),
            ValueError,
            "0 < strength <= 1",
        ),
        (dict(strength="0.5"), TypeError, "strength must be a number"),
        (dict(controlnet_block_samples=[control]), ValueError, "controlnet_block_samples"),
    ]
    with untouched(control):
        for kwargs, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(transformer, flow, **{**base, **kwargs})
            _one_line_error(exc_info, field)
        depth = tiny_flux_transformer(in_channels=32, out_channels=16)
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(depth, flow, **base, control_latents=control)
        _one_line_error(exc_info, "beside mask")
        sd3 = dict(
            encoder_hidden_states=torch.zeros(1, 4, 16), pooled_projections=torch.zeros(1, 8)
        )
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(
                tiny_sd3_transformer(), flow, controlnet=net, controlnet_cond=control, **sd3
            )
        _one_line_error(exc_info, "SD3")
    assert [c.calls for c in counters] == [0, 0]


def test_control_latents_of_another_size_are_refused_before_the_call():
    """At the first evaluation, before the controlnet or the transformer is called: control
    latents of another token count than the state's, or of a batch neither 1 nor the
    state's."""
    transformer = tiny_flux_transformer()
    net = tiny_flux_controlnet(transformer)
    cases = [
        (dict(controlnet_cond=_stand_in()[:, :4]), "packed with the latents' tokens"),
        (dict(controlnet_cond=_stand_in().repeat(3, 1, 1)), "batch 3"),
    ]
    noise, cond = _noise(torch.float32), _cond(torch.float32)
    assert_refused_at_first_evaluation(transformer, net, _dev_scheduler(), noise, cond, cases)


# ----------------------------------------------------------------------- edit_image


def edit_is_exact_under_the_control_image(pipe, shape):
    """edit_image on ``pipe`` (a ControlNet pipeline of a transformer) inverts and
    regenerates two images under one control image: latent_error 0 with a float64 state,
    with a float32 one and with the controlnet switched on from 20% to 70% of the steps, the
    control latents of ``shape`` (both images') in both ODEs, the caller's images left as
    they were. Returns the relative difference another control image makes to the edit."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    image = torch.cat([image, image.flip(-1)]) * 2 - 1
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with untouched(image, control):
        result = _edit(pipe, image, control)
    assert result.latent_error == 0.0
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["controlnet_cond"].shape == shape
    assert _edit(pipe, image, control, state_dtype=torch.float32).latent_error == 0.0
    switched = _edit(pipe, image, control, control_guidance_start=0.2, control_guidance_end=0.7)
    assert switched.latent_error == 0.0
    assert len(switched.target.cond["control_range"]) == 1
    other = _edit(pipe, image, control.flip(-2))
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    return float(moved / result.edited_latents.abs().max())


def test_edit_image_inverts_exactly_under_the_control_image(tmp_path):
    """edit_image on FluxControlNetPipeline inverts and regenerates two images under one
    control image exactly (see edit_is_exact_under_the_control_image: latent_error measured
    0 in float64, float32 and switched); another control image gives another edit (relative
    difference above 1e-3; measured 0.24)."""
    pipe = tiny_flux_controlnet_pipeline(tmp_path)
    assert edit_is_exact_under_the_control_image(pipe, (2, TOKENS, 16)) > 1e-3


# About 2.5 s; edit_image on the text-to-image Flux ControlNet pipeline runs by default.
@pytest.mark.slow
def test_edit_image_on_the_img2img_controlnet_pipeline_is_the_controlnet_pipelines(tmp_path):
    """FluxControlNetImg2ImgPipeline on the tiny ControlNet pipeline's parts (those its
    __init__ takes: no IP-Adapter's image_encoder and feature_extractor): edit_image inverts
    and regenerates under its control image exactly, as for FluxControlNetPipeline
    (latent_error 0 in float64, float32 and switched; another control image moves the edit
    by more than 1e-3 relative, measured 0.24), and its edit is FluxControlNetPipeline's of
    the same parts bit for bit: its prepare_image makes the same control image, and its
    strength plays no part (the whole image is inverted over the whole grid)."""
    base = tiny_flux_controlnet_pipeline(tmp_path)
    fields = inspect.signature(diffusers.FluxControlNetImg2ImgPipeline.__init__).parameters
    pipe = diffusers.FluxControlNetImg2ImgPipeline(
        **{k: v for k, v in base.components.items() if k in fields}
    )
    assert edit_is_exact_under_the_control_image(pipe, (2, TOKENS, 16)) > 1e-3
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    ours, theirs = (_edit(p, image, control) for p in (pipe, base))
    assert torch.equal(ours.edited_latents, theirs.edited_latents)


def test_edit_image_conditions_as_the_controlnet_pipeline_prepares_its_image(tmp_path, monkeypatch):
    """For a PIL control image, the control latents of edit_image's ODEs are bit for bit
    those FluxControlNetPipeline gives its controlnet (its prepare_image, the VAE's encoding,
    shift, scale and packing), with the VAE's mean where the pipeline draws a sample (patched
    in for the comparison: edit_image takes the mean, so that its edit is deterministic)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    pipe = tiny_flux_controlnet_pipeline(tmp_path)
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(5)) * 255).byte()
    image, control_image = Image.fromarray(pixels.numpy()), _control_image()
    result = _edit(pipe, image, control_image)
    seen = []
    pipe.controlnet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["controlnet_cond"]), with_kwargs=True
    )
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    pipe(
        prompt=PROMPT,
        control_image=control_image,
        num_inference_steps=1,
        height=16,
        width=16,
        max_sequence_length=16,
        output_type="latent",
    )
    for ode in (result.inversion.ode, result.target):
        assert torch.equal(ode.cond["controlnet_cond"], seen[0])


def test_edit_image_refuses_a_controlnet_pipeline_without_its_control_image(tmp_path):
    """One line, before any network runs: FluxControlNetPipeline without control_image, and
    with guess_mode (which the pipeline has not); a tensor control image not at the image's
    size, and the pipeline without its prepare_image, each named as the pipeline it is and
    as the pipeline whose preparation is followed (FluxControlNetPipeline's, not the Depth
    and Canny pipeline's)."""
    pipe = tiny_flux_controlnet_pipeline(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    control = torch.zeros(1, 3, 16, 16)
    calls = [Counter(pipe.transformer), Counter(pipe.controlnet), Counter(pipe.vae)]
    for kwargs, field in (
        ({}, "give control_image"),
        (dict(control_image=control, guess_mode=True), "guess_mode"),
        (dict(control_image=control[..., :8]), "(FluxControlNetPipeline's prepare_image"),
    ):
        with pytest.raises(ValueError) as exc_info:
            edit_image(pipe, image, PROMPT, "a dog", num_inference_steps=2, **kwargs)
        _one_line_error(exc_info, field)
        assert "FluxControlPipeline" not in str(exc_info.value)
    pipe.prepare_image = None
    with pytest.raises(ValueError) as exc_info:
        edit_image(pipe, image, PROMPT, "a dog", num_inference_steps=2, control_image=control)
    _one_line_error(exc_info, "as FluxControlNetPipeline does")
    assert "FluxControlPipeline" not in str(exc_info.value)
    assert all(c.calls == 0 for c in calls)
