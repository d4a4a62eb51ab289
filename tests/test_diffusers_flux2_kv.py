"""Flux2KleinKVPipeline: from_diffusers with its key-value cache, BDIAScheduler in it, and
edit_image on it.

The pipeline is Klein's with its reference images' tokens through a key-value cache: at its
first step the transformer runs on the references' tokens before the latents'
(``kv_cache_mode="extract"``), the references attending to themselves alone and modulated
at timestep 0 whatever the step's, and returns their keys and values; every later step
takes the latents alone with that cache (``kv_cache_mode="cached"``). So the cache depends
on the references alone and the run is an ODE in the latents, whose model is the cached
call at every step: ``from_diffusers`` passes ``kv_cache`` and ``kv_cache_mode="cached"``
through to the transformer. It runs no CFG. The pipeline is tiny (Klein's tiny parts, two
reference images of 64 x 64 and 64 x 68 pixels: 256 and 272 tokens); parity is checked bit
for bit in float32, exactness of the round trip in float64. The pipeline is in diffusers
0.38 and newer; with older ones the module is skipped.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import assert_edit_is_the_pipelines_run, pipeline_run, refused_edit

if not hasattr(diffusers, "Flux2KleinKVPipeline"):
    pytest.skip(
        f"diffusers {diffusers.__version__} has no Flux2KleinKVPipeline (0.38 and newer have it)",
        allow_module_level=True,
    )

from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu  # noqa: E402
from test_diffusers_flux2_edit import _reference  # noqa: E402

import bdia  # noqa: E402
from bdia.integrations.diffusers import (  # noqa: E402
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_flux2_klein_kv_pipeline,
    tiny_flux2_klein_pipeline,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
]

N_STEPS = 4
BATCH = 2
TOKENS = 16  # 16 x 16 images: 16 packed tokens of 16 channels


def _references():
    return [_reference(1, 64, 64), _reference(2, 64, 68)]


def _embeds(seed, tokens=5):
    return torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(seed))


def _grid(scheduler):
    mu = compute_empirical_mu(image_seq_len=TOKENS, num_steps=N_STEPS)
    return diffusers_grid(scheduler, N_STEPS, mu=mu, sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS))


def _noise():
    """The pipeline's latents argument (BATCH, 16, 4, 4) and the packed state (BATCH, 16, 16)."""
    latents = torch.randn(BATCH, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    return latents, latents.flatten(2).transpose(1, 2)


def _first_call(pipe):
    """The pipeline's transformer calls of a run with _references() and _embeds(1): the
    keyword arguments of each, in order."""
    calls = []
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        calls.append(dict(kwargs))
        return forward(*args, **kwargs)

    pipe.transformer.forward = spy
    try:
        pipeline_run(pipe, _noise()[0], N_STEPS, image=_references(), **_call())
    finally:
        pipe.transformer.forward = forward
    return calls


def _call():
    return dict(prompt_embeds=_embeds(1).repeat(BATCH, 1, 1), height=16, width=16)


def _ode(pipe, cache):
    """from_diffusers on the pipeline's transformer with the prompt, the latents' ids and
    the cache, as the pipeline's cached calls take them."""
    embeds, text_ids = pipe.encode_prompt(None, prompt_embeds=_embeds(1).repeat(BATCH, 1, 1))
    ids = pipe._prepare_latent_ids(_noise()[0])
    return from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=ids,
        kv_cache=cache,
        kv_cache_mode="cached",
    )


def test_the_cached_ode_is_the_kv_pipelines_run_and_inverts_exactly():
    """The pipeline's first call extracts the cache (its hidden states the references' 528
    tokens, then the latents' 16); from_diffusers with that cache and kv_cache_mode="cached"
    gives, with euler on the pipeline's grid, its latents bit for bit, the first step
    included (the extract call's latent tokens equal the cached call's); bdia(euler, 0.96)
    in float64 returns the noise with error 0 (measured 0)."""
    pipe = tiny_flux2_klein_kv_pipeline()
    calls = _first_call(pipe)
    assert calls[0]["kv_cache_mode"] == "extract" and calls[0]["num_ref_tokens"] == 256 + 272
    assert calls[0]["hidden_states"].shape == (BATCH, 256 + 272 + TOKENS, 16)
    assert all(c["kv_cache_mode"] == "cached" for c in calls[1:])
    with torch.no_grad():
        _, cache = pipe.transformer(**calls[0])
    ode = _ode(pipe, cache)
    noise = _noise()[1]
    theirs, _ = pipeline_run(pipe, _noise()[0], N_STEPS, image=_references(), **_call())
    ts = _grid(pipe.scheduler)
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts)
        solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
        pair = bdia.sample(ode, solver, noise.double(), ts, return_pair=True)
        back = bdia.invert(ode, solver, pair, ts)
    assert torch.equal(ours, theirs)
    assert float((back.earlier - noise.double()).abs().max()) == 0.0


def test_bdia_scheduler_in_the_kv_pipeline_is_bdia_sample_and_inverts():
    """BDIAScheduler (gamma 0.9) dropped into the pipeline: its latents and final pair are
    bdia.sample's with bdia(euler, 0.9) on the cached ODE, bit for bit, and bdia.invert of
    the pair returns the noise bit for bit."""
    pipe = tiny_flux2_klein_kv_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    calls = _first_call(pipe)
    with torch.no_grad():
        _, cache = pipe.transformer(**calls[0])
    theirs, _ = pipeline_run(pipe, _noise()[0], N_STEPS, image=_references(), **_call())
    final = pipe.scheduler.final_pair
    ode, noise = _ode(pipe, cache), _noise()[1]
    solver = bdia.bdia(bdia.get_solver("euler"), 0.9)
    ts = _grid(pipe.scheduler)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True)
        back = bdia.invert(ode, solver, final, ts)
    assert torch.equal(theirs, pair.later)
    assert torch.equal(final.earlier, pair.earlier) and torch.equal(final.later, pair.later)
    assert torch.equal(back.earlier, noise)


@pytest.mark.parametrize("mode", ["extract", None])
def test_a_cache_not_in_cached_mode_is_refused(mode):
    """kv_cache goes with kv_cache_mode="cached" alone: "extract" (the pipeline's first
    call, which returns the cache rather than a prediction) or no mode is refused in one
    line before any call."""
    pipe = tiny_flux2_klein_kv_pipeline()
    embeds, text_ids = pipe.encode_prompt(None, prompt_embeds=_embeds(1))
    cond = dict(encoder_hidden_states=embeds, txt_ids=text_ids, kv_cache=object())
    cond["img_ids"] = pipe._prepare_latent_ids(_noise()[0])
    if mode is not None:
        cond["kv_cache_mode"] = mode
    with pytest.raises(ValueError) as info:
        from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    message = str(info.value)
    assert "\n" not in message and "kv_cache_mode='cached'" in message, message


def _image():
    return torch.rand(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _edit(pipe, dtype=torch.float32, **options):
    return edit_image(
        pipe,
        _image(),
        _embeds(1),
        _embeds(3, 6),
        num_inference_steps=N_STEPS,
        state_dtype=dtype,
        progress=False,
        **options,
    )


def test_edit_image_on_the_kv_pipeline_is_its_run_and_inverts_exactly():
    """edit_image with reference_image on Flux2KleinKVPipeline: both ODEs take the cache the
    pipeline makes of the references (kv_cache_mode "cached", the latents' ids alone), no
    CFG by default; latent_error 0 in float32 and float64 (measured 0 and 0); with a float32
    state the edited latents are the pipeline's run from the inverted noise under the target
    prompt with image= the same references, bit for bit; the references move the edit.
    Without references it edits as Flux2KleinPipeline of the same parts without CFG, bit
    for bit."""
    pipe = tiny_flux2_klein_kv_pipeline()
    out = _edit(pipe, reference_image=_references())
    assert out.latent_error == 0.0
    for ode in (out.inversion.ode, out.target):
        assert ode.cond["kv_cache_mode"] == "cached" and "negative_cond" not in ode.cond
        assert ode.cond["img_ids"].shape == (BATCH, TOKENS, 4)
    assert _edit(pipe, torch.float64, reference_image=_references()).latent_error == 0.0
    latents = out.inversion.noise.transpose(1, 2).reshape(BATCH, 16, 4, 4)
    assert_edit_is_the_pipelines_run(
        pipe,
        out,
        N_STEPS,
        latents,
        last_step=True,
        image=_references(),
        prompt_embeds=_embeds(3, 6).repeat(BATCH, 1, 1),
        height=16,
        width=16,
    )
    alone = _edit(pipe)
    moved = (out.edited_latents - alone.edited_latents).abs().max()
    assert float(moved / alone.edited_latents.abs().max()) > 1e-3
    klein = _edit(tiny_flux2_klein_pipeline(), guidance_scale=1.0)
    assert torch.equal(alone.edited_latents, klein.edited_latents)


def test_edit_image_refuses_cfg_on_the_kv_pipeline():
    """The pipeline runs no CFG: a guidance_scale other than 1 is refused in one line before
    any network runs."""
    message = refused_edit(
        tiny_flux2_klein_kv_pipeline(), _image(), _embeds(1), _embeds(3, 6), guidance_scale=4.0
    )
    assert "Flux2KleinKVPipeline runs no classifier-free guidance" in message
