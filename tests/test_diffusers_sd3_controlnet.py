"""bdia.integrations.diffusers with SD3's ControlNet: from_diffusers(controlnet=,
controlnet_cond=) against StableDiffusion3ControlNetPipeline's run, BDIAScheduler in that
pipeline, and the refusals.

The controlnet is a tiny random ``SD3ControlNetModel`` (``tiny_sd3_controlnet``, InstantX's
kind: zeros for the pooled prompt, the control latents not shifted) of a tiny SD3
transformer's config with two joint blocks (the last takes no residual). The pipeline calls
it before the transformer, under guidance on the batch ``[unconditional, conditional]``, with
the control image's latents, which are fixed over the run, so the run is an ODE in the
latents. The pipeline encodes the control image (doubled for guidance) with a draw of the
VAE's distribution from torch's global generator, one per half of the batch; the comparisons
patch that draw to the distribution's mean, so that both halves have the latents given to
from_diffusers. Parity is checked in float32, bit for bit; exactness of the inversion in
float64.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import Counter, assert_flow_run_is_bdia_sample, flow_round_trip_error, untouched
from test_diffusers_flow import BATCH, N_STEPS, _cond, _noise, _one_line_error
from test_diffusers_flow import _pipeline_latents as _sd3_latents
from test_diffusers_flux_control import PROMPT, _control_image, _edit
from test_diffusers_flux_controlnet import edit_is_exact_under_the_control_image

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_controlnet,
    tiny_flux_controlnet,
    tiny_flux_transformer,
    tiny_sd3_controlnet,
    tiny_sd3_controlnet_pipeline,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture
def mean_draws(monkeypatch):
    """The VAE's draws patched to its distribution's mean, as edit_image encodes."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )


def _control_latents(pipe, control_image):
    """The control latents StableDiffusion3ControlNetPipeline gives its controlnet (the mean
    patched in for its draw) for BATCH images: prepare_image, doubled for guidance, encoded,
    less no shift (the controlnet's force_zeros_for_pooled_projection), scaled; the
    conditional half, which the unconditional one equals."""
    vae = pipe.vae
    with torch.no_grad():
        image = pipe.prepare_image(
            control_image, 16, 16, BATCH, BATCH, "cpu", torch.float32, True, False
        )
        latents = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    assert torch.equal(latents[:BATCH], latents[BATCH:])
    return latents[BATCH:]


def _pipeline_latents(pipe, cond, noise, control_image, **options):
    """The pipeline's latents from ``noise`` under ``cond``'s embeddings and guidance, guided
    by ``control_image``."""
    size = dict(height=16, width=16)
    return _sd3_latents(pipe, cond, latents=noise, control_image=control_image, **size, **options)


def _stand_in(dtype=torch.float32):
    """Control latents (1, 4, 8, 8), as the pipeline makes them for one image."""
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)).to(dtype)


_SETTINGS = {
    "plain": {},
    "scaled-and-switched": dict(
        conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7
    ),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_SETTINGS))
def test_controlnet_pipeline_gives_bdia_samples_latents(tmp_path, mean_draws, kind):
    """StableDiffusion3ControlNetPipeline itself (tiny parts, embeddings given, guidance 5, a
    PIL control image it prepares and encodes itself; a scale of 0.6 and the controlnet on
    from 20% to 70% of the steps) returns the latents of bdia.sample with euler on
    from_diffusers(controlnet=pipe.controlnet, controlnet_cond=<its control latents>) over
    diffusers_grid, bit for bit. The controlnet runs once per step where the pipeline keeps
    it (5 of 10 switched), and another control image gives another run."""
    settings = _SETTINGS[kind]
    pipe = tiny_sd3_controlnet_pipeline(tmp_path)
    cond = _cond(torch.float32, True)
    noise = _noise(torch.float32)
    control_image = _control_image()
    options = dict(
        controlnet_conditioning_scale=settings.get("conditioning_scale", 1.0),
        control_guidance_start=settings.get("control_guidance_start", 0.0),
        control_guidance_end=settings.get("control_guidance_end", 1.0),
    )
    latents = _pipeline_latents(pipe, cond, noise, control_image, **options)
    if settings:
        settings = dict(settings, num_inference_steps=N_STEPS)
    ode = from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=_control_latents(pipe, control_image),
        **settings,
        **cond,
    )
    calls = Counter(pipe.controlnet)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, diffusers_grid(pipe.scheduler, N_STEPS)
        )
    assert torch.equal(ours, latents)
    assert calls.calls == (5 if settings else N_STEPS)
    moved = _pipeline_latents(pipe, cond, noise, _control_image(seed=9), **options)
    assert float((moved - latents).abs().max() / latents.abs().max()) > 1e-3


def test_bdia_euler_inverts_the_controlnet_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the ControlNet ODE (float64 transformer, controlnet and state,
    SD3's shifted grid, guidance 5, the controlnet on from 20% to 70% of the steps), from the
    noise at t = 1 to 0 and back, returns the noise to 1e-12 relative (measured: 0)."""
    transformer = tiny_sd3_transformer(num_layers=2, dtype=torch.float64)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ode = from_diffusers(
        transformer,
        scheduler,
        controlnet=tiny_sd3_controlnet(transformer),
        controlnet_cond=_stand_in(torch.float64),
        control_guidance_start=0.2,
        control_guidance_end=0.7,
        num_inference_steps=N_STEPS,
        **_cond(torch.float64, True),
    )
    ts = diffusers_grid(scheduler, N_STEPS)
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


def test_bdia_scheduler_in_controlnet_pipeline_is_bdia_sample_and_inverts(tmp_path, mean_draws):
    """StableDiffusion3ControlNetPipeline with BDIAScheduler.from_config(its config,
    gamma=0.9) and the controlnet on from 20% to 70% of the steps gives the latents and the
    final pair (low words included) of bdia.sample with bdia(euler, 0.9) on the ControlNet
    ODE, bit for bit; bdia.invert from the pair returns the starting noise bit for bit."""
    pipe = tiny_sd3_controlnet_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    cond = _cond(torch.float32, True)
    noise = _noise(torch.float32)
    control_image = _control_image()
    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7)
    latents = _pipeline_latents(pipe, cond, noise, control_image, **bounds)
    control = _control_latents(pipe, control_image)
    assert_scheduler_run_is_bdia_sample_and_inverts(pipe, latents, noise, cond, control, bounds)


def assert_scheduler_run_is_bdia_sample_and_inverts(pipe, latents, noise, cond, control, bounds):
    """``latents``, ``pipe``'s run from ``noise`` with BDIAScheduler (gamma 0.9) under
    ``cond`` and the controlnet ``bounds``, and its final pair are bdia.sample's on
    from_diffusers(controlnet=pipe.controlnet, controlnet_cond=control), bit for bit;
    bdia.invert from the pair returns ``noise`` bit for bit."""
    ode = from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=control,
        num_inference_steps=N_STEPS,
        **bounds,
        **cond,
    )
    ts = diffusers_grid(pipe.scheduler, N_STEPS)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(back.earlier, noise)


# -------------------------------------------------------------------------- refusals


def test_controlnets_and_settings_not_mapped_are_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: several controlnets,
    Stable Diffusion's ControlNetModel or Flux's controlnet, one without its pos_embed
    (SD3.5's, outside its pipeline), one of another transformer or dtype; no control latents,
    a list, a non-tensor, latents not 4-D or of other channels; guess mode; a strength (no
    SD3 ControlNet pipeline has one); a residual key in cond."""
    transformer = tiny_sd3_transformer()
    net = tiny_sd3_controlnet(transformer)
    control = _stand_in()
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = dict(_cond(torch.float32, False), controlnet=net, controlnet_cond=control)
    counters = [Counter(transformer), Counter(net)]
    fields = {k: v for k, v in net.config.items() if not k.startswith("_")}
    no_pos = diffusers.SD3ControlNetModel(**{**fields, "use_pos_embed": False})
    unet_net = tiny_controlnet(tiny_unet(conditional=True, channels=4, cross_attention_dim=16))
    cases = [
        (dict(controlnet=[net, net]), ValueError, "several controlnets"),
        (dict(controlnet=unet_net), ValueError, "ControlNetModel"),
        (dict(controlnet=tiny_flux_controlnet(tiny_flux_transformer())), ValueError, "Flux"),
        (dict(controlnet=no_pos), ValueError, "pos_embed"),
        (
            dict(controlnet=tiny_sd3_controlnet(tiny_sd3_transformer(pooled_projection_dim=4))),
            ValueError,
            "pooled_projection_dim",
        ),
        (
            dict(controlnet=tiny_sd3_controlnet(tiny_sd3_transformer(dtype=torch.float64))),
            ValueError,
            "torch.float64",
        ),
        (dict(controlnet_cond=None), ValueError, "needs controlnet_cond"),
        (dict(controlnet_cond=[control]), ValueError, "one tensor"),
        (dict(controlnet_cond=control.numpy()), TypeError, "must be a tensor"),
        (dict(controlnet_cond=control[0]), ValueError, "(batch or 1, 4, h, w)"),
        (dict(controlnet_cond=control[:, :2]), ValueError, "(batch or 1, 4, h, w)"),
        (dict(guess_mode=True), ValueError, "guess_mode"),
        (
            dict(strength=0.5, control_guidance_start=0.2, num_inference_steps=4),
            ValueError,
            "no SD3 ControlNet pipeline takes a strength",
        ),
        (dict(block_controlnet_hidden_states=[control]), ValueError, "block_controlnet"),
    ]
    with untouched(control):
        for kwargs, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(transformer, flow, **{**base, **kwargs})
            _one_line_error(exc_info, field)
    assert [c.calls for c in counters] == [0, 0]


def test_control_latents_of_another_size_are_refused_before_the_call():
    """At the first evaluation, before the controlnet or the transformer is called: control
    latents of another size than the latents', or of a batch neither 1 nor the state's."""
    transformer = tiny_sd3_transformer()
    net = tiny_sd3_controlnet(transformer)
    calls = [Counter(transformer), Counter(net)]
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for given, field in (
        (_stand_in()[..., :4], "at the latents' size"),
        (_stand_in().repeat(3, 1, 1, 1), "batch 3"),
    ):
        ode = from_diffusers(
            transformer, flow, controlnet=net, controlnet_cond=given, **_cond(torch.float32, True)
        )
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, _noise(torch.float32))
        _one_line_error(exc_info, field)
    assert [c.calls for c in calls] == [0, 0]


# ----------------------------------------------------------------------- edit_image


def test_edit_image_inverts_exactly_under_the_control_image(tmp_path):
    """edit_image on StableDiffusion3ControlNetPipeline (guidance 7.5) inverts and
    regenerates two images under one control image exactly (see
    test_diffusers_flux_controlnet's edit_is_exact_under_the_control_image: latent_error
    measured 0 in float64, float32 and switched); another control image gives another edit
    (relative difference above 1e-3; measured 0.053)."""
    pipe = tiny_sd3_controlnet_pipeline(tmp_path)
    assert edit_is_exact_under_the_control_image(pipe, (2, 4, 8, 8)) > 1e-3


def test_edit_image_conditions_as_the_controlnet_pipeline_prepares_its_image(tmp_path, mean_draws):
    """For a PIL control image, the control latents of edit_image's ODEs are bit for bit
    those StableDiffusion3ControlNetPipeline gives its controlnet (its prepare_image, the
    VAE's encoding, no shift for InstantX's kind, the scale), with the VAE's mean where the
    pipeline draws a sample (patched in for the comparison: edit_image takes the mean, so that
    its edit is deterministic). The pipeline runs without guidance here, so that it encodes
    one image as edit_image does: under guidance it encodes the image twice in one batch,
    where the VAE's convolutions may round otherwise."""
    from PIL import Image

    pipe = tiny_sd3_controlnet_pipeline(tmp_path)
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(5)) * 255).byte()
    image, control_image = Image.fromarray(pixels.numpy()), _control_image()
    result = _edit(pipe, image, control_image)
    assert_edit_conditions_as_the_pipeline(pipe, result, control_image=control_image)


def assert_edit_conditions_as_the_pipeline(pipe, result, **inputs):
    """Both ODEs of edit_image's ``result`` hold, bit for bit, the controlnet_cond that
    ``pipe`` gives its controlnet in a one-step run on ``inputs`` (its control image, and
    mask), 16 x 16, without guidance."""
    seen = []
    pipe.controlnet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["controlnet_cond"]), with_kwargs=True
    )
    pipe(
        prompt=PROMPT,
        num_inference_steps=1,
        height=16,
        width=16,
        guidance_scale=1.0,
        output_type="latent",
        **inputs,
    )
    for ode in (result.inversion.ode, result.target):
        assert torch.equal(ode.cond["controlnet_cond"], seen[0])
