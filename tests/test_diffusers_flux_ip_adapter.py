"""Flux's IP-Adapter (image prompts, XLabs' format) in bdia.integrations.diffusers:
from_diffusers with the transformer's ``joint_attention_kwargs={"ip_adapter_image_embeds":
[...]}`` against FluxPipeline with an IP-Adapter loaded, BDIAScheduler in it, edit_image on
it, and the refusals.

Tiny random pipelines (``tiny_flux_ip_adapter_pipeline``: the tiny Flux parts with a tiny
CLIP image encoder and an IP-Adapter of random weights loaded by ``load_ip_adapter`` from a
state dict). The image embeddings are fixed over the run (true CFG's negative call has its
own, by default an all-zero image's), so the run is an ODE; as for Flux without the adapter,
parity is bit for bit in float32 and the round trip exact in float64.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import assert_bdia_run_inverts
from conftest import Counter, flow_round_trip_error, untouched
from test_diffusers_flux import (
    BATCH,
    EMBEDDED,
    N_STEPS,
    TRUE_CFG,
    _encoded,
    _img_ids,
    _mu,
    _noise,
    _pipeline_latents,
    _sigmas,
)
from test_diffusers_ip_adapter import _edit_image, _image_prompt, _one_line_error, _refused, _rel

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import tiny_flux_ip_adapter_pipeline, tiny_flux_pipeline

pytestmark = [
    # diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.skipif(
        not hasattr(diffusers.loaders, "FluxIPAdapterMixin"),
        reason="this diffusers has no FluxIPAdapterMixin (Flux's IP-Adapter came in 0.33)",
    ),
]

PROMPT, NEGATIVE = "a photo of a cat", "a blue painting"
EULER = bdia.get_solver("euler")


def _embeds(adapters, dtype=torch.float32, seed=3):
    """One image prompt per adapter as FluxPipeline's ip_adapter_image_embeds: (1, 1, 8)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, 8, generator=g, dtype=dtype) for _ in range(adapters)]


def _with_images(branch, images):
    """A branch's transformer arguments with ``images`` as its ip_adapter_image_embeds."""
    return {**branch, "joint_attention_kwargs": {"ip_adapter_image_embeds": images}}


def _cond(pipe, embeds, negative=None):
    """from_diffusers' conditioning of the pipeline's prompt and image prompt ``embeds``;
    with ``negative`` (the negative call's image embeddings), true CFG with NEGATIVE."""
    cond = dict(_with_images(_encoded(pipe, PROMPT), embeds), img_ids=_img_ids())
    cond["guidance"] = EMBEDDED
    if negative is not None:
        cond["guidance_scale"] = TRUE_CFG
        cond["negative_cond"] = _with_images(_encoded(pipe, NEGATIVE), negative)
    return cond


def _float64(cond):
    """``cond`` with its floating tensors (those of ``negative_cond`` too) cast to float64."""
    return {
        key: value.to(torch.float64)
        if torch.is_tensor(value) and value.is_floating_point()
        else _float64(value)
        if key == "negative_cond"
        else value
        for key, value in cond.items()
    }


def _run(pipe, embeds, negative=None, noise=None, **options):
    """FluxPipeline's latents with ``embeds`` as its ip_adapter_image_embeds and, with
    ``negative``, true CFG with NEGATIVE and those as negative_ip_adapter_image_embeds."""
    if negative is not None:
        options.update(
            negative_prompt=NEGATIVE,
            true_cfg_scale=TRUE_CFG,
            negative_ip_adapter_image_embeds=negative,
        )
    with torch.no_grad():
        return _pipeline_latents(
            pipe,
            _noise(torch.float32) if noise is None else noise,
            PROMPT,
            ip_adapter_image_embeds=embeds,
            **options,
        )


def _grid(pipe):
    return diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("adapters", [1, 2], ids=["one", "two"])
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_flux_ip_adapter_pipeline_gives_bdia_samples_latents(tmp_path, true_cfg, adapters):
    """FluxPipeline with an IP-Adapter (guidance embedding 3.5; with true CFG 4 and a
    negative prompt, negative image embeddings of their own, not zeros) returns the latents
    of bdia.sample with euler on from_diffusers' ODE with the image embeddings in
    joint_attention_kwargs, bit for bit: batch-1 embeddings expanded to the 2 images, the
    negative call given its own. Image embeddings left out of a call, or given to the other,
    would be another run (checked: the conditional ones in both calls are off by more than
    1e-2 relative; measured 0.72)."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path, adapters=adapters)
    embeds = _embeds(adapters)
    negative = _embeds(adapters, seed=4) if true_cfg else None
    theirs = _run(pipe, embeds, negative)
    cond = _cond(pipe, embeds, negative)
    with torch.no_grad():
        ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
        ours = bdia.sample(ode, EULER, _noise(torch.float32), _grid(pipe), progress=False)
    assert torch.equal(ours, theirs)
    # The transformer pops the embeddings from the dict it is given: the ODE's stay.
    assert ode.cond["joint_attention_kwargs"]["ip_adapter_image_embeds"][0].shape == (1, 1, 8)
    if true_cfg:
        both = dict(cond, negative_cond=_with_images(cond["negative_cond"], embeds))
        with torch.no_grad():
            ode = from_diffusers(pipe.transformer, pipe.scheduler, **both)
            other = bdia.sample(ode, EULER, _noise(torch.float32), _grid(pipe), progress=False)
        assert _rel(other, theirs) > 1e-2


def test_the_ip_adapter_pipeline_with_an_image_gives_bdia_samples_latents(tmp_path):
    """With ip_adapter_image (a PIL image through the pipeline's feature_extractor and
    image_encoder) and true CFG, the pipeline embeds an all-zero image for the negative call;
    from prepare_ip_adapter_image_embeds of the image and of that all-zero image, bdia.sample
    gives the pipeline's latents bit for bit."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path)
    image = _image_prompt(0)
    theirs = _run(pipe, None, negative=None, ip_adapter_image=image)
    options = dict(negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG, ip_adapter_image=image)
    with torch.no_grad():
        guided = _pipeline_latents(pipe, _noise(torch.float32), PROMPT, **options)
    embeds, negative = _prompt_and_zero_embeds(pipe, image)
    for negative_embeds, latents in ((None, theirs), (negative, guided)):
        ode = from_diffusers(
            pipe.transformer, pipe.scheduler, **_cond(pipe, embeds, negative_embeds)
        )
        with torch.no_grad():
            ours = bdia.sample(ode, EULER, _noise(torch.float32), _grid(pipe), progress=False)
        assert torch.equal(ours, latents)
    assert negative[0].abs().max() > 0.1  # an all-zero image's embedding is not zeros


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_bdia_euler_inverts_exactly_under_the_image_prompt(tmp_path, true_cfg):
    """bdia(euler, 0.96) on the float64 pipeline's transformer with its IP-Adapter, from the
    noise at t = 1 to 0 and back, returns the noise to 1e-12 relative (measured: 0,
    exactly)."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path)
    embeds = _embeds(1, torch.float64)
    negative = _embeds(1, torch.float64, seed=4) if true_cfg else None
    # The prompt is encoded in float32 and cast: a float64 CLIP text encoder fails in
    # transformers before 4.41 (its causal mask fills float32 with float64's minimum).
    cond = _float64(_cond(pipe, embeds, negative))
    pipe.transformer.to(torch.float64)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    assert ode.model_dtype == torch.float64
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(pipe)) < 1e-12


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_bdia_scheduler_in_the_ip_adapter_pipeline_is_bdia_sample_and_inverts(tmp_path, true_cfg):
    """FluxPipeline with an IP-Adapter and BDIAScheduler (gamma 0.9) gives the latents and
    final pair (low words included) of bdia.sample with bdia(euler, 0.9) on from_diffusers'
    ODE, bit for bit, and bdia.invert from that pair returns the pipeline's noise bit for
    bit."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    embeds = _embeds(1)
    negative = _embeds(1, seed=4) if true_cfg else None
    noise = _noise(torch.float32)
    latents = _run(pipe, embeds, negative, noise=noise)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(pipe, embeds, negative))
    ts = _grid(pipe)
    assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.9)


def test_the_adapters_scale_is_the_pipelines_and_enters_the_fingerprint(tmp_path):
    """set_ip_adapter_scale sets the attention processors' scale, which the ODE's calls use
    as the pipeline's do: at scale 0.5 the run is the pipeline's at 0.5 bit for bit, and
    another run than at scale 1 (relative difference above 1e-2; measured 0.30). The scale
    enters the fingerprint, read when it is taken: another at 0.5, the first again back at
    1."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path)
    embeds = _embeds(1)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(pipe, embeds))
    at_one = ode.fingerprint()
    with torch.no_grad():
        full = bdia.sample(ode, EULER, _noise(torch.float32), _grid(pipe), progress=False)
        pipe.set_ip_adapter_scale(0.5)
        half = bdia.sample(ode, EULER, _noise(torch.float32), _grid(pipe), progress=False)
    assert ode.fingerprint() != at_one
    assert torch.equal(half, _run(pipe, embeds))
    assert _rel(half, full) > 1e-2
    pipe.set_ip_adapter_scale(1.0)
    assert ode.fingerprint() == at_one


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A pipeline with two IP-Adapters, and its conditioning without an image prompt."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path_factory.mktemp("flux_ip"), adapters=2)
    cond = dict(_encoded(pipe, PROMPT), img_ids=_img_ids(), guidance=EMBEDDED)
    return pipe, cond, _encoded(pipe, NEGATIVE)


def assert_ip_conditioning_refused(pipe, cond, negative, pipeline):
    """Image embeddings missing, not a list, of another count than the adapters (``pipe``'s
    two), not 3-D floating tensors (an IP-Adapter Plus's 4-D ones: Flux's loader makes no
    resampler), missing from the negative call under true CFG (``negative`` without
    joint_attention_kwargs, or with them but no embeddings) are refused by from_diffusers
    in one line each, naming what to give and ``pipeline``'s method, before any call;
    ``cond`` is the conditional call's arguments without an image prompt."""
    good = [torch.zeros(1, 1, 8)] * 2
    calls = Counter(pipe.transformer)
    cases = [
        (None, None, f"{pipeline}.prepare_ip_adapter_image_embeds"),
        (good[0], None, "a list of 2"),
        (good[:1], None, "got a list of 1"),
        ([good[0], torch.zeros(1, 8)], None, "ip_adapter_image_embeds[1]"),
        ([good[0], torch.zeros(1, 1, 5, 8)], None, "(batch or 1, images, D)"),
        ([good[0], torch.zeros(1, 1, 8, dtype=torch.long)], None, "int64"),
        (good, {}, "negative_cond['joint_attention_kwargs']['ip_adapter_image_embeds']"),
        (good, {"scale": 1.0}, f"negative call needs image embeddings of its own, as {pipeline}"),
        (good, {"ip_adapter_image_embeds": good[:1]}, "negative_cond['joint_attention_kwargs']"),
    ]
    for images, negative_kwargs, field in cases:
        branch = dict(cond) if images is None else _with_images(cond, images)
        guided = {}
        if negative_kwargs is not None:
            negative_branch = dict(negative)
            if negative_kwargs:
                negative_branch["joint_attention_kwargs"] = negative_kwargs
            guided = {"guidance_scale": TRUE_CFG, "negative_cond": negative_branch}
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(pipe.transformer, pipe.scheduler, **branch, **guided)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_ip_adapter_conditioning_that_does_not_fit_is_refused_when_the_ode_is_built(two):
    """assert_ip_conditioning_refused's refusals, for FluxPipeline."""
    assert_ip_conditioning_refused(*two, "FluxPipeline")


def test_image_embeds_for_a_transformer_without_an_ip_adapter_are_refused(tmp_path):
    """A Flux transformer without an IP-Adapter has no projection for image embeddings:
    refused when the ODE is built, naming load_ip_adapter (diffusers would fail mid-call)."""
    pipe = tiny_flux_pipeline(tmp_path)
    cond = dict(_encoded(pipe, PROMPT), img_ids=_img_ids(), guidance=EMBEDDED)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(pipe.transformer, pipe.scheduler, **_with_images(cond, _embeds(1)))
    _one_line_error(exc_info, "load_ip_adapter")


def assert_one_image_prompt_for_both_calls(pipe, cond, negative, branch_kwargs):
    """from_diffusers under true CFG with the conditional image embeddings given to both
    calls (``cond`` and ``negative`` without an image prompt, for ``pipe``'s two adapters)
    is the transformer's two calls combined, bit for bit, each given the image prompt
    expanded to the batch and ``branch_kwargs(branch)``, its own prompt's arguments; the
    caller's dicts and tensors are left as they were (the transformer pops the embeddings
    from the dict it gets)."""
    images = _embeds(2)
    cond = _with_images(cond, images)
    negative = _with_images(negative, images)
    x = _noise(torch.float32)
    with untouched(*images):
        ode = from_diffusers(
            pipe.transformer,
            pipe.scheduler,
            guidance_scale=TRUE_CFG,
            negative_cond=negative,
            **cond,
        )
        with torch.no_grad():
            ours = ode.f(x, torch.full((BATCH,), 0.5), **ode.cond)
    assert cond["joint_attention_kwargs"]["ip_adapter_image_embeds"] is images
    assert negative["joint_attention_kwargs"]["ip_adapter_image_embeds"] is images

    def call(branch):
        return pipe.transformer(
            hidden_states=x,
            timestep=torch.full((BATCH,), 0.5),
            img_ids=cond["img_ids"],
            joint_attention_kwargs={
                "ip_adapter_image_embeds": [im.expand(BATCH, -1, -1) for im in images]
            },
            return_dict=False,
            **branch_kwargs(branch),
        )[0]

    with torch.no_grad():
        c, u = call(cond), call(negative)
    assert torch.equal(ours, u + TRUE_CFG * (c - u))


def test_one_image_prompt_for_both_calls_is_taken_and_the_callers_dicts_are_kept(two):
    """The negative call may be given the conditional image embeddings themselves (the image
    prompt in both calls, true CFG on the text alone): taken, and the model is then the
    transformer's two calls combined, bit for bit, the caller's dicts and tensors left as
    they were (assert_one_image_prompt_for_both_calls)."""

    def branch_kwargs(branch):
        return dict(
            guidance=torch.full((BATCH,), EMBEDDED),
            pooled_projections=branch["pooled_projections"].expand(BATCH, -1),
            encoder_hidden_states=branch["encoder_hidden_states"].expand(BATCH, -1, -1),
            txt_ids=branch["txt_ids"],
        )

    assert_one_image_prompt_for_both_calls(*two, branch_kwargs)


# --------------------------------------------------------------------------- editing


def _edit(pipe, image, **kwargs):
    kwargs.setdefault("ip_adapter_image", _image_prompt(0))
    return edit_image(pipe, image, PROMPT, "a photo of a dog", num_inference_steps=8, **kwargs)


def _prompt_and_zero_embeds(pipe, prompt):
    """The pipeline's prepare_ip_adapter_image_embeds of the image prompt ``prompt`` and of
    the all-zero image it embeds for the negative call under true CFG: two lists of one
    tensor (1, 1, D) each."""
    with torch.no_grad():
        embeds = pipe.prepare_ip_adapter_image_embeds(prompt, None, "cpu", 1)
        zeros = [np.zeros((16, 16, 3), dtype=np.uint8)]
        return embeds, pipe.prepare_ip_adapter_image_embeds(zeros, None, "cpu", 1)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_edit_image_inverts_exactly_under_the_image_prompt(tmp_path, true_cfg):
    """edit_image on a Flux pipeline with an IP-Adapter and ip_adapter_image inverts and
    regenerates under the same image prompt: latent_error 0 with a float64 state (measured
    0), both ODEs given the pipeline's image embeddings (batch 1, expanded to the images'
    2) and, with true CFG (guidance_scale 4), the negative call an all-zero image's, as
    FluxPipeline makes them; another image prompt gives another edit (relative difference
    above 1e-2; measured 0.85, and 1.20 with true CFG)."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path)
    image = _edit_image()
    settings = dict(guidance_scale=TRUE_CFG, negative_prompt=NEGATIVE) if true_cfg else {}
    result = _edit(pipe, image, **settings)
    assert result.latent_error == 0.0
    embeds, zeros = _prompt_and_zero_embeds(pipe, _image_prompt(0))
    for ode in (result.inversion.ode, result.target):
        (images,) = ode.cond["joint_attention_kwargs"]["ip_adapter_image_embeds"]
        assert torch.equal(images, embeds[0])
        if true_cfg:
            negative = ode.cond["negative_cond"]["joint_attention_kwargs"]
            assert torch.equal(negative["ip_adapter_image_embeds"][0], zeros[0])
    other = _edit(pipe, image, ip_adapter_image=_image_prompt(1), **settings)
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-2


def test_edit_image_takes_the_pipelines_image_embeddings(tmp_path):
    """ip_adapter_image_embeds made by the pipeline's prepare_ip_adapter_image_embeds of an
    image give edit_image's run with that image bit for bit, and are left as they were; under
    true CFG they are torch.cat([negative, positive]), as edit_image takes them for every
    pipeline."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path)
    image, prompt = _edit_image(1), _image_prompt(2)
    settings = dict(guidance_scale=TRUE_CFG, negative_prompt=NEGATIVE, state_dtype=torch.float32)
    ours = _edit(pipe, image, ip_adapter_image=prompt, **settings)
    (embeds,), (negative,) = _prompt_and_zero_embeds(pipe, prompt)
    stacked = [torch.cat([negative, embeds])]
    with untouched(*stacked):
        again = _edit(
            pipe, image, ip_adapter_image=None, ip_adapter_image_embeds=stacked, **settings
        )
    assert torch.equal(again.edited_latents, ours.edited_latents)


def test_edit_image_refuses_an_image_prompt_that_does_not_fit_before_any_network(tmp_path):
    """A Flux IP-Adapter pipeline without an image prompt, both an image and embeddings,
    another count than the adapters, embeddings of the wrong kind or batch, an image without
    the image encoder, and an image prompt for a Flux pipeline without an IP-Adapter: one
    line each, before any network runs."""
    pipe = tiny_flux_ip_adapter_pipeline(tmp_path, adapters=2)
    assert_image_prompt_refused(pipe, tiny_flux_pipeline(tmp_path), batch=1)


def assert_image_prompt_refused(pipe, plain, batch):
    """edit_image on ``pipe`` (two IP-Adapters loaded) refuses, by _refused (one line, before
    any network runs), no image prompt, both an image and embeddings, another count than the
    adapters, embeddings of the wrong kind (4-D) or batch (3: neither 1 nor ``batch``, the
    batch the pipeline's embeddings have: 2 under true CFG), and an image without the image
    encoder; edit_image on ``plain``, of the same family without an IP-Adapter, refuses an
    image prompt."""
    images = [_image_prompt(0), _image_prompt(1)]
    embeds = [torch.zeros(batch, 1, 8)] * 2
    cases = [
        ({}, "give ip_adapter_image"),
        ({"ip_adapter_image": images[0]}, "1 image prompts for the transformer's 2 IP-Adapters"),
        ({"ip_adapter_image": images, "ip_adapter_image_embeds": embeds}, "both given"),
        ({"ip_adapter_image_embeds": embeds[:1]}, "a list of 2 tensor(s)"),
        ({"ip_adapter_image_embeds": [embeds[0], torch.zeros(batch, 1, 5, 8)]}, "[1] must be"),
        ({"ip_adapter_image_embeds": [embeds[0], torch.zeros(3, 1, 8)]}, "[1] has batch 3"),
    ]
    for kwargs, fragment in cases:
        assert fragment in _refused(pipe, **kwargs), kwargs
    pipe.image_encoder = None
    assert "image_encoder" in _refused(pipe, ip_adapter_image=images)
    assert "no IP-Adapter loaded" in _refused(plain, ip_adapter_image=images[0])
