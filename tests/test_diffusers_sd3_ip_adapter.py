"""SD3's IP-Adapter (image prompts, InstantX's SD3.5 layout) in bdia.integrations.diffusers:
from_diffusers with the transformer's ``joint_attention_kwargs={"ip_adapter_image_embeds":
e}`` against StableDiffusion3Pipeline with an IP-Adapter loaded, BDIAScheduler in it, edit_image
on it, and the refusals.

A tiny random pipeline (``tiny_sd3_pipeline`` with ``add_tiny_sd3_ip_adapter``: a tiny
SigLIP image encoder and an IP-Adapter of random weights loaded by ``load_ip_adapter`` from
a state dict). The image embeddings are fixed over the run (the unconditional half has its
own, zeros from an image); the adapter projects them at each call's timestep, which the ODE
gives the transformer as the pipeline does, so the run is an ODE: parity is bit for bit in
float32 and the round trip exact in float64.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import Counter, assert_flow_run_is_bdia_sample, flow_round_trip_error, untouched
from test_diffusers_flow import BATCH, GUIDANCE, N_STEPS, _cond, _noise, _pipeline_latents
from test_diffusers_ip_adapter import _edit_image, _image_prompt, _one_line_error, _refused, _rel

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import add_tiny_sd3_ip_adapter, tiny_sd3_pipeline

pytestmark = [
    # diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.skipif(
        not hasattr(diffusers.loaders, "SD3IPAdapterMixin"),
        reason="this diffusers has no SD3IPAdapterMixin",
    ),
]

EULER = bdia.get_solver("euler")


def _pipe(folder, dtype=torch.float32):
    pipe = add_tiny_sd3_ip_adapter(tiny_sd3_pipeline(folder))
    return pipe if dtype == torch.float32 else pipe.to(dtype)


def _stacked(dtype=torch.float32):
    """An image prompt as the pipeline's ip_adapter_image_embeds under guidance: (2, 4, 8),
    the negative half first, not zeros (a caller's own), so that a half given the other's
    would show."""
    return torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _with_images(branch, images):
    return {**branch, "joint_attention_kwargs": {"ip_adapter_image_embeds": images}}


def _image_cond(stacked, dtype=torch.float32):
    """from_diffusers' conditioning (guidance 5) with each half of ``stacked`` in its branch."""
    negative, positive = stacked.chunk(2)
    cond = _with_images(_cond(dtype, True), positive)
    cond["negative_cond"] = _with_images(cond["negative_cond"], negative)
    return cond


def _sample(pipe, cond, noise):
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    with torch.no_grad():
        return bdia.sample(
            ode, EULER, noise, diffusers_grid(pipe.scheduler, N_STEPS), progress=False
        )


# --------------------------------------------------------------------------- parity


def test_sd3_ip_adapter_pipeline_gives_bdia_samples_latents(tmp_path):
    """StableDiffusion3Pipeline with an IP-Adapter (guidance 5, two images, image embeddings
    whose negative half is not zeros) returns the latents of bdia.sample with euler on
    from_diffusers' ODE, each branch its half in joint_attention_kwargs, bit for bit; so it
    does from ip_adapter_image (the pipeline's zeros for the negative half). The conditional
    half in both would be another run (above 1e-2 relative; measured 0.030)."""
    pipe = _pipe(tmp_path)
    cond, noise, stacked = _cond(torch.float32, True), _noise(torch.float32), _stacked()
    with torch.no_grad():
        theirs = _pipeline_latents(pipe, cond, latents=noise, ip_adapter_image_embeds=stacked)
    assert torch.equal(_sample(pipe, _image_cond(stacked), noise), theirs)
    both = _image_cond(torch.cat([stacked[1:]] * 2))
    assert _rel(_sample(pipe, both, noise), theirs) > 1e-2

    image = _image_prompt(0)
    with torch.no_grad():
        theirs = _pipeline_latents(pipe, cond, latents=noise, ip_adapter_image=image)
        made = pipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
    assert made.shape == (2, 4, 8) and not made[0].any()
    assert torch.equal(_sample(pipe, _image_cond(made), noise), theirs)


def test_a_loaded_adapter_without_an_image_prompt_is_the_pipelines_run_without_one(tmp_path):
    """Without image embeddings the adapter's attention processors attend to the text alone,
    as the pipeline runs without an image prompt: taken, and bdia.sample gives that run's
    latents bit for bit, another than with the image prompt (above 1e-2 relative; measured
    0.037)."""
    pipe = _pipe(tmp_path)
    cond, noise = _cond(torch.float32, True), _noise(torch.float32)
    with torch.no_grad():
        theirs = _pipeline_latents(pipe, cond, latents=noise)
    assert torch.equal(_sample(pipe, cond, noise), theirs)
    assert _rel(_sample(pipe, _image_cond(_stacked()), noise), theirs) > 1e-2


def test_bdia_euler_inverts_exactly_under_the_image_prompt(tmp_path):
    """bdia(euler, 0.96) on the float64 pipeline's transformer with its IP-Adapter, under
    guidance with the image prompt, from the noise at t = 1 to 0 and back, returns the noise
    to 1e-12 relative (measured: 0, exactly)."""
    pipe = _pipe(tmp_path, torch.float64)
    cond = _image_cond(_stacked(torch.float64), torch.float64)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    assert ode.model_dtype == torch.float64
    ts = diffusers_grid(pipe.scheduler, N_STEPS)
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


def test_bdia_scheduler_in_the_ip_adapter_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """StableDiffusion3Pipeline with an IP-Adapter and BDIAScheduler (gamma 0.9) gives the
    latents and final pair of bdia.sample with bdia(euler, 0.9) on from_diffusers' ODE, bit
    for bit, and bdia.invert from that pair returns the pipeline's noise bit for bit."""
    pipe = _pipe(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    cond, noise, stacked = _cond(torch.float32, True), _noise(torch.float32), _stacked()
    with torch.no_grad():
        latents = _pipeline_latents(pipe, cond, latents=noise, ip_adapter_image_embeds=stacked)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_image_cond(stacked))
    ts = diffusers_grid(pipe.scheduler, N_STEPS)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(EULER, 0.9), pair, ts)
    assert torch.equal(back.earlier, noise)


def test_the_adapters_scale_is_the_pipelines_and_enters_the_fingerprint(tmp_path):
    """set_ip_adapter_scale sets the attention processors' scale (the loader's 0.5 at
    first), which the ODE's calls use as the pipeline's do: at scale 1 the run is the
    pipeline's at 1 bit for bit and another than at 0.5 (above 1e-2 relative; measured
    0.036). The scale enters the fingerprint, read when it is taken."""
    pipe = _pipe(tmp_path)
    cond, noise, stacked = _cond(torch.float32, True), _noise(torch.float32), _stacked()
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_image_cond(stacked))
    at_half = ode.fingerprint()
    before = _sample(pipe, _image_cond(stacked), noise)
    pipe.set_ip_adapter_scale(1.0)
    assert ode.fingerprint() != at_half
    with torch.no_grad():
        theirs = _pipeline_latents(pipe, cond, latents=noise, ip_adapter_image_embeds=stacked)
    full = _sample(pipe, _image_cond(stacked), noise)
    assert torch.equal(full, theirs) and _rel(full, before) > 1e-2
    pipe.set_ip_adapter_scale(0.5)
    assert ode.fingerprint() == at_half


# --------------------------------------------------------------------------- refusals


def test_ip_adapter_conditioning_that_does_not_fit_is_refused_when_the_ode_is_built(tmp_path):
    """Image embeddings that are not one 3-D floating tensor (a list, as Flux's and the
    unet's take them; 4-D; integer), in either branch, and under guidance none in the
    unconditional branch: one line each, before any call. The caller's tensors are left as
    they were."""
    pipe = _pipe(tmp_path)
    good = torch.zeros(1, 4, 8)
    calls = Counter(pipe.transformer)
    base = _cond(torch.float32, True)
    cases = [
        ([good], good, "got a list"),
        (torch.zeros(1, 1, 4, 8), good, "(batch or 1, tokens, D)"),
        (good.long(), good, "int64"),
        (good, torch.zeros(4, 8), "negative_cond['joint_attention_kwargs']"),
        (good, None, "negative_cond['joint_attention_kwargs']['ip_adapter_image_embeds']"),
    ]
    with untouched(good):
        for images, negative_images, field in cases:
            cond = _with_images(base, images)
            if negative_images is not None:
                cond["negative_cond"] = _with_images(base["negative_cond"], negative_images)
            with pytest.raises(ValueError) as exc_info:
                from_diffusers(pipe.transformer, pipe.scheduler, **cond)
            _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_image_embeds_for_a_transformer_without_an_ip_adapter_are_refused(tmp_path):
    """An SD3 transformer without an IP-Adapter has no image_proj for image embeddings:
    refused when the ODE is built, naming load_ip_adapter (diffusers would fail mid-call)."""
    pipe = tiny_sd3_pipeline(tmp_path)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(pipe.transformer, pipe.scheduler, **_image_cond(_stacked()))
    _one_line_error(exc_info, "load_ip_adapter")
    assert BATCH == 2 and GUIDANCE == 5.0  # the shared conditioning's, as the docstrings say


# --------------------------------------------------------------------------- editing

PROMPT, TARGET = "a photo of a cat", "a photo of a dog"


def _edit(pipe, image, **kwargs):
    return edit_image(pipe, image, PROMPT, TARGET, num_inference_steps=8, **kwargs)


def test_edit_image_inverts_exactly_under_the_image_prompt(tmp_path):
    """edit_image on an SD3 pipeline with an IP-Adapter and ip_adapter_image inverts and
    regenerates under the same image prompt: latent_error 0 with a float64 state (measured
    0), both ODEs given the pipeline's image embeddings (batch 1, expanded to the images'
    2) and the unconditional branch its zeros; another image prompt gives another edit
    (above 1e-2 relative; measured 0.065), and so does none (the pipeline's run without an
    image prompt, taken: latent_error 0; 0.043 away)."""
    pipe = _pipe(tmp_path)
    image = _edit_image()
    result = _edit(pipe, image, ip_adapter_image=_image_prompt(0))
    assert result.latent_error == 0.0
    for ode in (result.inversion.ode, result.target):
        images = ode.cond["joint_attention_kwargs"]["ip_adapter_image_embeds"]
        negative = ode.cond["negative_cond"]["joint_attention_kwargs"]["ip_adapter_image_embeds"]
        assert images.shape == negative.shape == (1, 4, 8)
        assert images.abs().max() > 0 and not negative.any()
    other = _edit(pipe, image, ip_adapter_image=_image_prompt(1))
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-2
    plain = _edit(pipe, image)
    assert plain.latent_error == 0.0 and "joint_attention_kwargs" not in plain.target.cond
    assert _rel(plain.edited_latents, result.edited_latents) > 1e-2


def test_edit_image_takes_the_pipelines_image_embeddings(tmp_path):
    """ip_adapter_image_embeds made by the pipeline's prepare_ip_adapter_image_embeds of an
    image (under guidance, [zeros, the image's]) give edit_image's run with that image bit
    for bit, and are left as they were."""
    pipe = _pipe(tmp_path)
    image, prompt = _edit_image(1), _image_prompt(2)
    ours = _edit(pipe, image, ip_adapter_image=prompt, state_dtype=torch.float32)
    with torch.no_grad():
        embeds = pipe.prepare_ip_adapter_image_embeds(prompt, None, "cpu", 1, True)
    with untouched(embeds):
        again = _edit(pipe, image, ip_adapter_image_embeds=embeds, state_dtype=torch.float32)
    assert torch.equal(again.edited_latents, ours.edited_latents)


def test_edit_image_refuses_an_image_prompt_that_does_not_fit_before_any_network(tmp_path):
    """Both an image and embeddings, embeddings that are not one 3-D floating tensor or
    whose batch fits neither the image's nor 1 (under guidance twice that), an image
    without the image encoder, and an image prompt for an SD3 pipeline without an
    IP-Adapter: one line each, before any network runs."""
    pipe = _pipe(tmp_path)
    embeds = torch.zeros(2, 4, 8)
    cases = [
        ({"ip_adapter_image": _image_prompt(0), "ip_adapter_image_embeds": embeds}, "both given"),
        ({"ip_adapter_image_embeds": [embeds]}, "got a list"),
        ({"ip_adapter_image_embeds": embeds[None]}, "(batch or 1, tokens, D)"),
        ({"ip_adapter_image_embeds": torch.zeros(3, 4, 8)}, "has batch 3"),
    ]
    for kwargs, fragment in cases:
        assert fragment in _refused(pipe, **kwargs), kwargs
    pipe.image_encoder = None
    assert "image_encoder" in _refused(pipe, ip_adapter_image=_image_prompt(0))
    plain = tiny_sd3_pipeline(tmp_path)
    assert "no IP-Adapter loaded" in _refused(plain, ip_adapter_image=_image_prompt(0))
