"""bdia.integrations.diffusers with Flux.2: Flux2Transformer2DModel and its flow-matching
scheduler as a rectified-flow ODE on Flux2Pipeline's and Flux2KleinPipeline's packed latents,
with and without reference images, BDIAScheduler in both pipelines, and the refusals.

Flux2Pipeline (diffusers 0.36 and newer) calls its transformer as FluxPipeline calls Flux's,
but with position ids of 4 axes (batched, of which the transformer reads the first sample's),
no pooled embeddings, the embedded guidance of FLUX.2-dev, and its reference images' packed
latents after the latents' tokens (the output cut back to them), as FluxKontextPipeline does.
Flux2KleinPipeline (0.37 and newer) passes ``guidance=None`` and guides by true CFG, the
conditional call first. Both shift the sigmas by their own ``compute_empirical_mu``, which
``diffusers_grid`` takes as ``mu``. The pipelines are tiny, of random weights and without text
encoders (prompts as embeddings). Parity is checked in float32, bit for bit; exactness of the
inversion in float64.
"""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import assert_bdia_run_inverts
from conftest import Counter, flow_round_trip_error, untouched

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    FLUX_DEV_SCHEDULER,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.skipif(
        not hasattr(diffusers, "Flux2Pipeline"),
        reason="Flux2Pipeline and Flux2Transformer2DModel are in diffusers 0.36 and newer",
    ),
]
needs_klein = pytest.mark.skipif(
    not hasattr(diffusers, "Flux2KleinPipeline"),
    reason="Flux2KleinPipeline is in diffusers 0.37 and newer",
)

# diffusers 0.36's Flux2Transformer2DModel always embeds a guidance scale (FLUX.2-dev's kind).
KLEIN_TRANSFORMER = (
    "guidance_embeds"
    in inspect.signature(getattr(diffusers, "Flux2Transformer2DModel", object).__init__).parameters
)
needs_klein_transformer = pytest.mark.skipif(
    not KLEIN_TRANSFORMER,
    reason="Flux2Transformer2DModel's guidance_embeds (FLUX.2-klein's kind, without guidance "
    "embedding) is in diffusers 0.37 and newer",
)

N_STEPS = 6
BATCH = 2
TOKENS = 16  # 16 x 16 images: 4 x 8 x 8 latents in patches of 2 x 2, 16 tokens of 16 channels
IMAGE_TOKENS = 256  # a 64 x 64 reference image (the pipelines' smallest): 16 x 16 tokens
EMBEDDED = 4.0  # Flux2Pipeline's guidance_scale, FLUX.2-dev's embedded guidance
TRUE_CFG = 3.0  # Flux2KleinPipeline's guidance_scale, true CFG


def _pipeline_class():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    return Flux2Pipeline


def _mu(tokens=TOKENS, steps=N_STEPS):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=tokens, num_steps=steps)


def _sigmas(steps=N_STEPS):
    """The unshifted sigmas both pipelines pass to set_timesteps."""
    return np.linspace(1.0, 1 / steps, steps)


def _grid(scheduler):
    return diffusers_grid(scheduler, N_STEPS, mu=_mu(), sigmas=_sigmas())


def _scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


def _image_noise(dtype=torch.float32):
    """The pipelines' latents argument: patchified noise of shape (BATCH, 16, 4, 4)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 16, 4, 4, generator=g).to(dtype)


def _noise(dtype=torch.float32):
    """The pipelines' loop state: _image_noise packed into tokens, (BATCH, 16, 16)."""
    return _pipeline_class()._pack_latents(_image_noise(dtype))


def _embeds(seed, tokens, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 16, generator=g).to(dtype)


def _reference_image():
    from PIL import Image

    g = np.random.default_rng(4)
    return Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _encoded(pipe, embeds):
    """The pipeline's prompt arguments for ``embeds``, as its encode_prompt returns them for
    BATCH images: encoder_hidden_states and their batched 4-axis txt_ids."""
    prompt_embeds, text_ids = pipe.encode_prompt(
        prompt=None, prompt_embeds=embeds, device="cpu", num_images_per_prompt=BATCH
    )
    return dict(encoder_hidden_states=prompt_embeds, txt_ids=text_ids)


def _reference(pipe, image):
    """The reference image's packed latents and ids, as the pipelines' prepare_image_latents
    makes them (the image preprocessed at its size, the VAE's mode patchified and normalised
    by the batch-norm statistics), of batch BATCH."""
    pixels = pipe.image_processor.preprocess(image, height=64, width=64, resize_mode="crop")
    with torch.no_grad():
        return pipe.prepare_image_latents(
            images=[pixels], batch_size=BATCH, generator=None, device="cpu", dtype=torch.float32
        )


def _ode_kwargs(pipe, image=None, *, klein=False, dtype=torch.float32):
    """from_diffusers' keyword arguments for the pipeline's run of _run: its prompt (and the
    negative one for Klein's true CFG), the latents' ids (followed by the reference image's,
    with its latents, where it has one), and Flux2Pipeline's embedded guidance."""
    latent_ids = _pipeline_class()._prepare_latent_ids(_image_noise())
    kwargs = dict(_encoded(pipe, _embeds(1, 5, dtype)), img_ids=latent_ids)
    if image is not None:
        image_latents, image_ids = _reference(pipe, image)
        kwargs.update(
            img_ids=torch.cat([latent_ids, image_ids], dim=1),
            image_latents=image_latents.to(dtype),
        )
    if klein:
        kwargs.update(guidance_scale=TRUE_CFG, negative_cond=_encoded(pipe, _embeds(2, 7, dtype)))
    else:
        kwargs["guidance"] = EMBEDDED
    return kwargs


def _run(pipe, image=None, *, klein=False):
    """The pipeline's last latents, packed (BATCH, TOKENS, 16), from _image_noise: BATCH 16 x
    16 images of one prompt of 5 tokens, with the 64 x 64 reference ``image`` where given;
    Flux2Pipeline with its guidance embedding, Flux2KleinPipeline with true CFG against a
    negative prompt of 7 tokens. Caught at the last step, before Klein's decoding
    normalisation."""
    seen = []

    def keep(_pipe, _i, _t, kwargs):
        seen.append(kwargs["latents"])
        return {}

    options = dict(
        prompt_embeds=_embeds(1, 5),
        latents=_image_noise(),
        image=image,
        num_images_per_prompt=BATCH,
        num_inference_steps=N_STEPS,
        height=16,
        width=16,
        output_type="latent",
        callback_on_step_end=keep,
    )
    if klein:
        options.update(guidance_scale=TRUE_CFG, negative_prompt_embeds=_embeds(2, 7))
    else:
        options["guidance_scale"] = EMBEDDED
    pipe(**options)
    assert len(seen) == N_STEPS
    return seen[-1]


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


# --------------------------------------------------------------------------- parity


_KINDS = {
    "dev": (False, False),
    "dev-reference": (False, True),
    "klein-cfg": (True, False),
    "klein-cfg-reference": (True, True),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_KINDS))
def test_pipeline_gives_bdia_samples_latents(kind):
    """Flux2Pipeline (guidance embedding 4) and Flux2KleinPipeline (true CFG 3, a negative
    prompt of its own length), with or without a 64 x 64 reference image that they encode
    themselves, return the latents of bdia.sample with euler on from_diffusers /
    diffusers_grid(mu=compute_empirical_mu(16, 6), sigmas=linspace(1, 1/6, 6)), bit for bit
    in float32: each transformer call takes the latents' 16 tokens followed by the image's
    256, with the ids of all 272, and the velocity is the output's first 16 rows."""
    klein, reference = _KINDS[kind]
    if klein and not hasattr(diffusers, "Flux2KleinPipeline"):
        pytest.skip("Flux2KleinPipeline is in diffusers 0.37 and newer")
    pipe = tiny_flux2_klein_pipeline() if klein else tiny_flux2_pipeline()
    image = _reference_image() if reference else None
    latents = _run(pipe, image, klein=klein)
    kwargs = _ode_kwargs(pipe, image, klein=klein)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **kwargs)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape, k.get("guidance"))), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ours = bdia.sample(ode, bdia.get_solver("euler"), _noise(), _grid(pipe.scheduler))
    finally:
        hook.remove()
    tokens = TOKENS + (IMAGE_TOKENS if reference else 0)
    assert [shape for shape, _ in seen] == [(BATCH, tokens, 16)] * (N_STEPS * (1 + klein))
    assert all((g is None) == klein for _, g in seen)
    assert torch.equal(ours, latents)


@needs_klein
def test_reference_image_and_negative_prompt_change_the_run():
    """The inputs the mapping passes are the ones that count: Klein's run without the
    reference image, or with the negative prompt's embeddings in place of the prompt's,
    differs from its run with both."""
    pipe = tiny_flux2_klein_pipeline()
    kwargs = _ode_kwargs(pipe, _reference_image(), klein=True)
    ts = _grid(pipe.scheduler)

    def sample(**changes):
        ode = from_diffusers(pipe.transformer, pipe.scheduler, **dict(kwargs, **changes))
        with torch.no_grad():
            return bdia.sample(ode, bdia.get_solver("euler"), _noise(), ts, progress=False)

    full = sample()
    alone = dict(kwargs)
    alone.pop("image_latents")
    alone["img_ids"] = kwargs["img_ids"][:, :TOKENS]
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **alone)
    with torch.no_grad():
        plain = bdia.sample(ode, bdia.get_solver("euler"), _noise(), ts, progress=False)
    assert not torch.equal(plain, full)
    assert not torch.equal(sample(guidance_scale=1.5), full)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "klein",
    [
        pytest.param(False, id="dev-reference"),
        pytest.param(True, id="klein-cfg-reference", marks=needs_klein_transformer),
    ],
)
def test_bdia_euler_inverts_the_flux2_ode_to_float64_rounding(klein):
    """bdia(euler, 0.96) on the Flux.2 ODE with a reference image (float64 transformer, state,
    embeddings and image latents; FLUX.2-dev's guidance embedding, or Klein's true CFG), from
    the noise at t = 1 to 0 and back, returns the noise to 1e-12 relative (measured: 0). The
    ids are given 2-D here, one row per token, which the transformer reads as it reads the
    pipeline's batched ones."""
    pipe = tiny_flux2_pipeline(guidance_embeds=not klein)
    kwargs = _ode_kwargs(pipe, _reference_image(), klein=klein, dtype=torch.float64)
    kwargs["txt_ids"], kwargs["img_ids"] = kwargs["txt_ids"][0], kwargs["img_ids"][0]
    if klein:
        kwargs["negative_cond"]["txt_ids"] = kwargs["negative_cond"]["txt_ids"][0]
    transformer = tiny_flux2_transformer(guidance_embeds=not klein, dtype=torch.float64)
    ode = from_diffusers(transformer, _scheduler(), **kwargs)
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_scheduler())) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


def _invert(pipe, pair, kwargs, klein):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as the pipelines
    do: the latents' tokens followed by the reference image's, the output cut to the
    latents', Flux2Pipeline's guidance embedding or Klein's two calls of true CFG."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=_sigmas(), mu=_mu())
    image = kwargs["image_latents"]
    guidance = None if klein else torch.full([1], EMBEDDED).expand(BATCH)

    def call(x, t, prompt):
        return pipe.transformer(
            hidden_states=torch.cat([x, image], dim=1),
            timestep=t.expand(BATCH).to(x.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=prompt["encoder_hidden_states"],
            txt_ids=prompt["txt_ids"],
            img_ids=kwargs["img_ids"],
            return_dict=False,
        )[0][:, :TOKENS]

    with torch.no_grad():
        x = inverse.begin(pair)
        for t in inverse.timesteps:
            out = call(x, t, kwargs)
            if klein:
                negative = call(x, t, kwargs["negative_cond"])
                out = negative + TRUE_CFG * (out - negative)
            x = inverse.step(out, t, x).prev_sample
    return inverse


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", [False, True], ids=["dev", "klein-cfg"])
def test_bdia_scheduler_in_flux2_pipelines_is_bdia_sample_and_inverts(klein):
    """Flux2Pipeline (and Flux2KleinPipeline with true CFG) with a reference image and
    BDIAScheduler.from_config(its config, gamma=0.9) gives the latents and the final pair
    (low words included) of bdia.sample with bdia(euler, 0.9) on the Flux.2 ODE, bit for bit:
    the pipelines pass their sigmas and compute_empirical_mu to set_timesteps and call
    set_begin_index. The inverse scheduler's loop, calling the transformer as the pipelines
    do, returns the starting noise bit for bit, and so does bdia.invert from the pair."""
    if klein and not hasattr(diffusers, "Flux2KleinPipeline"):
        pytest.skip("Flux2KleinPipeline is in diffusers 0.37 and newer")
    pipe = tiny_flux2_klein_pipeline() if klein else tiny_flux2_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    image = _reference_image()
    latents = _run(pipe, image, klein=klein)
    kwargs = _ode_kwargs(pipe, image, klein=klein)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **kwargs)
    ts = _grid(pipe.scheduler)
    pair = assert_bdia_run_inverts(pipe, latents, ode, _noise(), ts, gamma=0.9)
    inverse = _invert(pipe, pair, kwargs, klein)
    assert torch.equal(inverse.pair.earlier, _noise())


# -------------------------------------------------------------------------- refusals


def test_flux2_conditioning_it_cannot_take_is_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: pooled embeddings
    (Flux.2 has none), missing embeddings, txt_ids or img_ids, ids of Flux.1's 3 axes,
    embeddings of another length than their txt_ids, guidance for a transformer without a
    guidance embedding (Klein's) and none for one with it (dev's), and a controlnet, Fill
    mask or Depth control image, which no Flux.2 pipeline gives (Klein's case where this
    diffusers has its kind of transformer, 0.37 on)."""
    dev = tiny_flux2_transformer()
    klein = tiny_flux2_transformer(guidance_embeds=False) if KLEIN_TRANSFORMER else None
    counters = [Counter(t) for t in (dev, klein) if t is not None]
    embeds = _embeds(1, 5)
    base = dict(
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(5, 4),
        img_ids=torch.zeros(TOKENS, 4),
        guidance=EMBEDDED,
    )
    packed = torch.zeros(1, TOKENS, 16)
    no_guidance = {k: v for k, v in base.items() if k != "guidance"}
    cases = [
        (dev, dict(base, pooled_projections=torch.zeros(1, 8)), "pooled_projections"),
        (dev, {k: v for k, v in base.items() if k != "txt_ids"}, "'txt_ids'"),
        (dev, {k: v for k, v in base.items() if k != "img_ids"}, "_prepare_latent_ids"),
        (dev, dict(base, txt_ids=torch.zeros(5, 3)), "(tokens, 4) or (batch, tokens, 4)"),
        (dev, dict(base, txt_ids=torch.zeros(6, 4)), "6 rows"),
        (klein, base, "guidance_embeds = False (FLUX.2-klein's"),
        (dev, no_guidance, "guidance_embeds = True (FLUX.2-dev's"),
        (dev, dict(base, mask=packed, masked_image_latents=packed), "mask was given"),
        (dev, dict(base, control_latents=packed), "control_latents was given"),
        (dev, dict(base, controlnet=dev), "controlnet was given"),
    ]
    with untouched(embeds):
        for transformer, cond, field in cases:
            if transformer is None:
                continue
            with pytest.raises(ValueError) as exc_info:
                from_diffusers(transformer, _scheduler(), **cond)
            _one_line_error(exc_info, field)
    assert [c.calls for c in counters] == [0] * len(counters)


@pytest.mark.skipif(KLEIN_TRANSFORMER, reason="this diffusers has FLUX.2-klein's transformer")
def test_a_klein_transformer_is_refused_where_diffusers_has_none():
    """diffusers 0.36's Flux2Transformer2DModel takes no guidance_embeds (it always embeds a
    guidance scale): tiny_flux2_transformer(guidance_embeds=False) is refused in one line
    naming the release that has FLUX.2-klein's kind, and a dev transformer's config, which
    lacks the key, is read as embedding guidance, so that the pipeline's guidance is taken
    and its absence refused."""
    with pytest.raises(ImportError, match=r"FLUX\.2-klein's kind\) is in diffusers 0\.37"):
        tiny_flux2_transformer(guidance_embeds=False)
    dev = tiny_flux2_transformer()
    assert "guidance_embeds" not in dev.config
    cond = dict(
        encoder_hidden_states=_embeds(1, 5),
        txt_ids=torch.zeros(5, 4),
        img_ids=torch.zeros(TOKENS, 4),
    )
    from_diffusers(dev, _scheduler(), guidance=EMBEDDED, **cond)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(dev, _scheduler(), **cond)
    _one_line_error(exc_info, "guidance_embeds = True (FLUX.2-dev's")


def test_flux2_states_that_are_not_the_pipelines_are_refused_before_the_call():
    """At the first evaluation, before the transformer is called: a state that is not packed
    (Flux2Pipeline's patchified latents (batch, 16, 4, 4)), img_ids of another token count
    than the state's, and with a reference image, img_ids of the latents' tokens alone."""
    dev = tiny_flux2_transformer()
    calls = Counter(dev)
    ids = _pipeline_class()._prepare_latent_ids(_image_noise())
    base = dict(encoder_hidden_states=_embeds(1, 5), txt_ids=torch.zeros(5, 4), guidance=4.0)
    image = torch.zeros(1, 8, 16)
    cases = [
        (dict(base, img_ids=ids), _image_noise(), "Flux2Pipeline._pack_latents(latents)"),
        (dict(base, img_ids=ids[:, :8]), _noise(), "_prepare_latent_ids(latents)"),
        (dict(base, img_ids=ids, image_latents=image), _noise(), "dim=1) as Flux2Pipeline"),
    ]
    for cond, state, field in cases:
        ode = from_diffusers(dev, _scheduler(), **cond)
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, state)
        _one_line_error(exc_info, field)
    assert calls.calls == 0
