"""bdia.integrations.diffusers with Flux Kontext: from_diffusers(image_latents=...) against
FluxKontextPipeline's run, BDIAScheduler in that pipeline, the refusals, and edit_image on
FluxKontextPipeline.

FluxKontextPipeline (diffusers 0.35 and newer) calls Flux's transformer on the packed latents'
tokens followed by its reference image's packed latents, with the positions of both in
``img_ids`` (the image's with a first column of 1), and keeps the output's rows of the
latents. The image is fixed over the run, so the run is an ODE in the latents. The
transformer is the tiny random Flux one (``tiny_flux_transformer``); the hand-written loop's
tests run with any supported diffusers, the pipeline's need 0.35. As for FluxPipeline, parity
is checked in float32, bit for bit; exactness of the inversion in float64.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import (
    Counter,
    assert_flow_run_is_bdia_sample,
    flow_round_trip_error,
    untouched,
)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from test_diffusers_flux import (
    BATCH,
    EMBEDDED,
    N_STEPS,
    TOKENS,
    TRUE_CFG,
    _cond,
    _dev_scheduler,
    _encoded,
    _flux_loop,
    _invert,
    _mu,
    _noise,
    _one_line_error,
    _pipeline_latents,
    _prompt,
    _sigmas,
)

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_flux_kontext_pipeline,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_DIFFUSERS = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
needs_kontext = pytest.mark.skipif(
    _DIFFUSERS < (0, 35), reason="FluxKontextPipeline is in diffusers 0.35 and newer"
)

PROMPT = "a painting of a fox"
NEGATIVE = "a blue photo"
IMAGE_TOKENS = 32  # a 16 x 32 reference image: 8 x 16 latents in patches of 2 x 2


@pytest.fixture(scope="module")
def dev():
    return tiny_flux_transformer()


def _reference(dtype=torch.float32):
    """Stand-in packed latents of a 16 x 32 reference image, (1, IMAGE_TOKENS, 16), and the
    img_ids of the latents' 16 tokens followed by the image's, as FluxKontextPipeline makes
    them."""
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, IMAGE_TOKENS, 16, generator=g).to(dtype)
    latent_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", dtype)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 8, "cpu", dtype)
    image_ids[..., 0] = 1
    return image, torch.cat([latent_ids, image_ids])


def _kontext_cond(dtype, true_cfg=False):
    """from_diffusers' conditioning: test_diffusers_flux's, its img_ids those of the latents
    and the reference image, and the image's latents."""
    image, img_ids = _reference(dtype)
    return dict(_cond(dtype, true_cfg=true_cfg), img_ids=img_ids, image_latents=image)


def _grid(scheduler):
    return diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())


def _pipeline_reference(pipe, image):
    """The reference image's packed latents (1, IMAGE_TOKENS, 16) and the img_ids of the
    latents and the image, as FluxKontextPipeline makes them for ``image`` (1, 3, 16, 32) in
    [0, 1] with ``_auto_resize=False``: resized and preprocessed at its own size, encoded to
    the mode of the VAE's distribution and packed by its prepare_latents."""
    pixels = pipe.image_processor.resize(image, 16, 32)
    pixels = pipe.image_processor.preprocess(pixels, 16, 32)
    with torch.no_grad():
        _, latents, latent_ids, image_ids = pipe.prepare_latents(
            pixels, 1, 4, 16, 16, torch.float32, "cpu", None, _noise(torch.float32)
        )
    return latents, torch.cat([latent_ids, image_ids])


def _kontext_run(pipe, noise, image, **options):
    """FluxKontextPipeline's latents from ``noise`` (test_diffusers_flux's run: BATCH images of
    PROMPT, 16 x 16, guidance embedding 3.5) with ``image`` as its reference, kept at its
    size."""
    return _pipeline_latents(
        pipe, noise, PROMPT, image=image, max_area=16 * 16, _auto_resize=False, **options
    )


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_euler_is_the_kontext_loop_step_by_step(dev, true_cfg):
    """bdia's euler on from_diffusers(image_latents=) / diffusers_grid is FluxKontextPipeline's
    loop state by state, bit for bit in float32: every transformer call takes the latents'
    16 tokens followed by the reference image's 32 (its batch-1 latents shared by the batch,
    in both calls of true CFG) with img_ids of all 48, and the velocity is the output's first
    16 rows; the state keeps the latents' 16 tokens."""
    cond = _kontext_cond(torch.float32, true_cfg)
    scheduler = _dev_scheduler()
    ode = from_diffusers(dev, scheduler, **cond)
    noise = _noise(torch.float32)
    seen = []
    hook = dev.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ours = bdia.sample(
                ode,
                bdia.get_solver("euler"),
                noise,
                _grid(scheduler),
                trajectory=True,
                progress=False,
            )
    finally:
        hook.remove()
    assert seen == [(BATCH, TOKENS + IMAGE_TOKENS, 16)] * (N_STEPS * (2 if true_cfg else 1))
    image = cond.pop("image_latents").expand(BATCH, -1, -1)
    ref = _flux_loop(dev, scheduler, noise, cond, image=image)
    assert len(ours) == len(ref) == N_STEPS + 1
    for k in range(len(ref)):
        assert torch.equal(ours[k], ref[k]), k
    # The reference image matters: the run without it differs.
    plain = dict(cond, img_ids=cond["img_ids"][:TOKENS])
    assert not torch.equal(_flux_loop(dev, scheduler, noise, plain)[-1], ref[-1])


def test_bdia_euler_inverts_the_kontext_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the Kontext ODE (float64 transformer and state, Flux-dev's shifted
    grid), from the noise at t = 1 to 0 and back, returns the noise to 1e-12 relative
    (measured: 0)."""
    transformer = tiny_flux_transformer(dtype=torch.float64)
    ode = from_diffusers(transformer, _dev_scheduler(), **_kontext_cond(torch.float64))
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_dev_scheduler())) < 1e-12


@pytest.mark.first_case_by_default
@needs_kontext
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_kontext_pipeline_gives_bdia_samples_latents(tmp_path, true_cfg):
    """FluxKontextPipeline itself (tiny parts, prompts through its CLIP and T5 encoders, a 16 x
    32 reference image it encodes itself, guidance embedding 3.5, with or without true CFG 4
    and a negative prompt) returns the latents of bdia.sample with euler on from_diffusers
    with the image latents and ids of its own prepare_latents, bit for bit."""
    pipe = tiny_flux_kontext_pipeline(tmp_path)
    noise = _noise(torch.float32)
    image = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(4))
    options = dict(negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG) if true_cfg else {}
    latents = _kontext_run(pipe, noise, image, **options)
    image_latents, img_ids = _pipeline_reference(pipe, image)
    assert image_latents.shape == (1, IMAGE_TOKENS, 16)
    cond = dict(_encoded(pipe, PROMPT), img_ids=img_ids, guidance=EMBEDDED)
    if true_cfg:
        cond.update(guidance_scale=TRUE_CFG, negative_cond=_encoded(pipe, NEGATIVE))
    ode = from_diffusers(pipe.transformer, pipe.scheduler, image_latents=image_latents, **cond)
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, _grid(pipe.scheduler))
    assert torch.equal(ours, latents)


# ------------------------------------------------------------------ BDIA scheduler


@needs_kontext
def test_bdia_scheduler_in_kontext_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """FluxKontextPipeline with BDIAScheduler.from_config(its config, gamma=0.9) gives the
    latents and the final pair (low words included) of bdia.sample with bdia(euler, 0.9) on
    the Kontext ODE, bit for bit; the inverse scheduler's loop, calling the transformer as the
    pipeline does (the image's tokens after the latents', the output cut to the latents'),
    returns the starting noise bit for bit, and so does bdia.invert from the pair."""
    pipe = tiny_flux_kontext_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise(torch.float32)
    image = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(4))
    latents = _kontext_run(pipe, noise, image)
    image_latents, img_ids = _pipeline_reference(pipe, image)
    cond = dict(_encoded(pipe, PROMPT), img_ids=img_ids, guidance=EMBEDDED)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, image_latents=image_latents, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert(pipe, pair, cond, image=image_latents.expand(BATCH, -1, -1))
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


# -------------------------------------------------------------------------- refusals


def test_bad_reference_images_are_refused_before_any_call(dev):
    """One line each, before any call, the caller's tensors untouched: image_latents for
    SD3's transformer or a unet, beside a Fill transformer's mask, in the negative branch, not
    packed (4-D), not floating, not a tensor, or of other channels than the transformer's
    in_channels."""
    image, _ = _reference()
    base = _kontext_cond(torch.float32)
    fill = tiny_flux_transformer(in_channels=48, out_channels=16)
    counters = [Counter(dev), Counter(fill)]
    flow = _dev_scheduler()
    packed = torch.zeros(1, TOKENS, 16)
    negative = {**_prompt(torch.float32, 2, 7), "image_latents": image}
    cases = [
        (
            dev,
            dict(base, image_latents=image.reshape(1, 1, IMAGE_TOKENS, 16)),
            ValueError,
            "(batch",
        ),
        (dev, dict(base, image_latents=image.long()), ValueError, "floating"),
        (dev, dict(base, image_latents=image.numpy()), TypeError, "tensor"),
        (dev, dict(base, image_latents=image[..., :8]), ValueError, "image_latents has 8 channels"),
        (dev, dict(base, guidance_scale=TRUE_CFG, negative_cond=negative), ValueError, "negative"),
        (fill, dict(base, mask=packed, masked_image_latents=packed), ValueError, "give one"),
    ]
    with untouched(image):
        for transformer, cond, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(transformer, flow, **cond)
            _one_line_error(exc_info, field)
        sd3 = dict(
            encoder_hidden_states=torch.zeros(1, 4, 16),
            pooled_projections=torch.zeros(1, 8),
            image_latents=image,
        )
        unet = tiny_unet(conditional=True, channels=4, cross_attention_dim=16)
        for network, scheduler, cond in (
            (tiny_sd3_transformer(), flow, sd3),
            (unet, diffusers.DDIMScheduler(clip_sample=False), dict(image_latents=image)),
        ):
            with pytest.raises(ValueError) as exc_info:
                from_diffusers(network, scheduler, **cond)
            _one_line_error(exc_info, "FluxKontextPipeline")
        # The model itself refuses them for a network that is not Flux's.
        ode = from_diffusers(
            unet, diffusers.DDIMScheduler(clip_sample=False), encoder_hidden_states=packed
        )
        with pytest.raises(ValueError) as exc_info:
            ode.f(torch.zeros(1, 4, 8, 8), torch.ones(1), image_latents=image)
        _one_line_error(exc_info, "no Flux transformer")
    assert [c.calls for c in counters] == [0, 0]


def test_kontext_states_that_are_not_the_pipelines_are_refused_before_the_call(dev):
    """At the first evaluation, before the transformer is called: img_ids of the latents'
    tokens alone (the pipeline's concatenation holds the image's too), and a reference image
    whose batch is neither 1 nor the state's."""
    calls = Counter(dev)
    image, img_ids = _reference()
    base = _kontext_cond(torch.float32)
    for cond, field in (
        (dict(base, img_ids=img_ids[:TOKENS]), "torch.cat([latent_ids, image_ids])"),
        (dict(base, image_latents=image.repeat(3, 1, 1)), "batch 3"),
    ):
        ode = from_diffusers(dev, _dev_scheduler(), **cond)
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, _noise(torch.float32))
        _one_line_error(exc_info, field)
    assert calls.calls == 0


# ----------------------------------------------------------------------- edit_image


@needs_kontext
def test_edit_image_on_kontext_takes_the_image_as_its_reference(tmp_path):
    """edit_image on FluxKontextPipeline conditions both ODEs on the edited image, as the
    pipeline's image=: the image latents and img_ids are bit for bit those of the pipeline's
    prepare_latents for that image (the VAE's mode, shifted, scaled and packed; the latents'
    positions then the image's, whose first column is 1), and the round trip is exact
    (latent_error 0 with a float64 state, measured 0). Without the reference (FluxPipeline of
    the same parts) the edit differs."""
    pipe = tiny_flux_kontext_pipeline(tmp_path)
    image = torch.rand(2, 3, 16, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with untouched(image):
        result = edit_image(pipe, image, "", PROMPT, num_inference_steps=N_STEPS, progress=False)
    assert result.latent_error == 0.0
    with torch.no_grad():
        _, image_latents, latent_ids, image_ids = pipe.prepare_latents(
            image, 2, 4, 16, 32, torch.float32, "cpu", None, torch.zeros(2, 32, 16)
        )
    assert image_ids[:, 0].eq(1).all() and image_latents.shape == (2, IMAGE_TOKENS, 16)
    for ode in (result.inversion.ode, result.target):
        assert torch.equal(ode.cond["image_latents"], image_latents)
        assert torch.equal(ode.cond["img_ids"], torch.cat([latent_ids, image_ids]))
    plain = diffusers.FluxPipeline(**pipe.components)
    alone = edit_image(plain, image, "", PROMPT, num_inference_steps=N_STEPS, progress=False)
    assert "image_latents" not in alone.target.cond
    assert not torch.equal(alone.edited_latents, result.edited_latents)
