"""bdia.integrations.diffusers with Qwen-Image-Edit-2509 and 2511: from_diffusers(
image_latents=...) against QwenImageEditPlusPipeline's run with one and two reference images,
with and without a transformer of ``zero_cond_t``, BDIAScheduler in that pipeline, the
refusals, and edit_image on it (the image its first reference, ``reference_image``'s after).

QwenImageEditPlusPipeline (diffusers 0.36 and newer) encodes each of its reference images as
QwenImageEditPipeline encodes its one (the VAE's mode, ``(z - latents_mean) /
latents_std``, packed), puts their packed latents after the latents' tokens in the order
given (``torch.cat([latents, image_latents], dim=1)`` with ``image_latents`` the
concatenation along the tokens), gives each sample's ``img_shapes`` entry the latents'
shape and one shape per image, and keeps the output's rows of the latents; true CFG and its
rescaling are QwenImagePipeline's. A transformer with ``zero_cond_t`` (Qwen-Image-Edit-
2511's, diffusers 0.37 and newer) modulates the tokens after the first ``img_shapes`` entry
with the embedding of timestep 0, read from ``img_shapes`` alone: the images are fixed over
the run, so the run is an ODE in the latents either way, and from_diffusers passes the call
through. The pipeline is the tiny random one (``tiny_qwen_image_edit_plus_pipeline``), given
prompt embeddings and their masks (it has no Qwen2.5-VL). It resizes each reference image to
about 1024 x 1024 pixels for the VAE (and 384 x 384 for Qwen2.5-VL) by its
``calculate_dimensions``: the tests have that function return each image's own size, which
changes only the sizes the pipeline computes. Since diffusers 0.37 it runs one prompt at a
time, so the batch is 1. As for QwenImagePipeline, parity is checked in float32, bit for
bit; exactness of the inversion in float64.
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

if not hasattr(diffusers, "QwenImageEditPlusPipeline"):
    pytest.skip("QwenImageEditPlusPipeline is in diffusers 0.36 and newer", allow_module_level=True)

from _pipeline_runs import assert_bdia_run_inverts, assert_edit_is_the_pipelines_run  # noqa: E402
from conftest import Counter, flow_round_trip_error  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus  # noqa: E402
from PIL import Image  # noqa: E402
from test_diffusers_qwen_image import (  # noqa: E402
    LENGTHS,
    N_STEPS,
    TRUE_CFG,
    _grid,
    _invert,
    _lengths,
    _negative,
    _one_line_error,
    _pipeline_latents,
    _prompt,
    _scheduler,
    _target_args,
)
from test_diffusers_qwen_image_edit import _kwargs_of_calls  # noqa: E402

import bdia  # noqa: E402
from bdia.integrations.diffusers import BDIAScheduler, edit_image, from_diffusers  # noqa: E402
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_qwen_image_edit_plus_pipeline,
    tiny_qwen_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ZERO_COND_T = "zero_cond_t" in inspect.signature(diffusers.QwenImageTransformer2DModel).parameters
needs_zero_cond_t = pytest.mark.skipif(
    not ZERO_COND_T,
    reason="QwenImageTransformer2DModel's zero_cond_t is in diffusers 0.37 and newer",
)
ZERO_COND = [False, pytest.param(True, marks=needs_zero_cond_t)]
# The reference images, W x H: 32 x 16 (16 x 8 latents, 32 tokens) and 16 x 32.
SIZES = ((32, 16), (16, 32))
LATENTS_SHAPE = (1, 4, 4)  # a 16 x 16 output: 8 x 8 latents in patches of 2 x 2, 16 tokens
IMAGE_SHAPES = ((1, 4, 8), (1, 8, 4))


def _images(count):
    """``count`` RGB PIL images of SIZES (the pipeline reads each one's ``size``)."""
    g = torch.Generator().manual_seed(4)
    images = []
    for width, height in SIZES[:count]:
        pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy(), "RGB"))
    return images


@pytest.fixture
def own_size(monkeypatch):
    """The Edit Plus pipeline keeps each reference image at its own size (see the module's
    docstring)."""
    by_ratio = {w / h: (w, h) for w, h in SIZES}
    monkeypatch.setattr(
        pipeline_qwenimage_edit_plus, "calculate_dimensions", lambda area, ratio: by_ratio[ratio]
    )


def _noise(dtype):
    """The pipeline's state for a 16 x 16 image: noise packed into tokens, (1, 16, 16)."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 1, 4, 8, 8, generator=g).to(dtype)
    return diffusers.QwenImagePipeline._pack_latents(noise, 1, 4, 8, 8)


def _one(prompt):
    """The padded second prompt of test_diffusers_qwen_image's pair: its mask holds zeros, so
    that the pipeline's encode_prompt keeps it (it drops an all-ones mask). Where the
    transformer takes the text lengths (diffusers 0.36), the first, unpadded: that release's
    encode_prompt keeps every mask and pads to the longest prompt alone, whose length its
    rotary embedding takes as the text's."""
    embeds, mask = prompt
    return (embeds[:1], mask[:1]) if LENGTHS else (embeds[1:], mask[1:])


def _img_shapes(count):
    """QwenImageEditPlusPipeline's img_shapes for a 16 x 16 output and ``count`` images."""
    return [[LATENTS_SHAPE, *IMAGE_SHAPES[:count]]]


def _references(pipe, images, dtype=torch.float32):
    """The reference images' packed latents (1, 32 * len(images), 16), as
    QwenImageEditPlusPipeline makes them for ``images`` kept at their sizes: each
    preprocessed to a one-frame video, encoded and packed by its prepare_latents, and
    concatenated along the tokens."""
    videos = [pipe.image_processor.preprocess(i, i.height, i.width).unsqueeze(2) for i in images]
    with torch.no_grad():
        _, image_latents = pipe.prepare_latents(
            videos, 1, 4, 16, 16, dtype, "cpu", None, _noise(dtype)
        )
    return image_latents


def _cond(dtype, image_latents, count, *, true_cfg=False):
    """from_diffusers' conditioning: a padded prompt of 5 tokens, the references' latents
    and img_shapes, and with ``true_cfg`` a negative prompt of 7 tokens (its own mask)."""
    embeds, mask = _one(_prompt(dtype, 1, 5))
    cond = dict(
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=_img_shapes(count),
        image_latents=image_latents,
        **_lengths(mask),
    )
    if true_cfg:
        negative, negative_mask = _one(_prompt(dtype, 2, 7))
        cond.update(
            guidance_scale=TRUE_CFG,
            negative_cond=dict(
                encoder_hidden_states=negative,
                encoder_hidden_states_mask=negative_mask,
                **_lengths(negative_mask),
            ),
        )
    return cond


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("zero_cond_t", ZERO_COND, ids=["plain-t", "zero-cond-t"])
@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
@pytest.mark.parametrize("count", [1, 2], ids=["one-image", "two-images"])
def test_edit_plus_pipeline_gives_bdia_euler_latents(own_size, count, true_cfg, zero_cond_t):
    """QwenImageEditPlusPipeline itself (tiny parts, a padded prompt's embeddings, one
    reference image of 32 x 16 or that and one of 16 x 32, with or without true CFG 4 and a
    negative prompt of another length, a transformer with or without zero_cond_t) returns
    the latents of bdia.sample with euler on from_diffusers with its own prepare_latents'
    image latents, bit for bit in float32; every call gets the same keyword arguments from
    both, bit for bit: the latents' 16 tokens followed by 32 per image, in order, the
    timestep t / 1000, each branch's embeddings and mask, and img_shapes of one entry per
    image after the latents'."""
    pipe = tiny_qwen_image_edit_plus_pipeline(zero_cond_t=zero_cond_t)
    assert pipe.transformer.config.get("zero_cond_t", False) is zero_cond_t
    images = _images(count)
    noise = _noise(torch.float32)
    image_latents = _references(pipe, images)
    assert image_latents.shape == (1, 32 * count, 16)
    cond = _cond(torch.float32, image_latents, count, true_cfg=true_cfg)
    theirs, latents = _kwargs_of_calls(
        pipe.transformer, lambda: _pipeline_latents(pipe, noise, cond, image=images)
    )
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)

    def ours_run():
        with torch.no_grad():
            return bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)

    ours, sampled = _kwargs_of_calls(pipe.transformer, ours_run)
    assert torch.equal(sampled, latents)
    assert len(ours) == len(theirs) == N_STEPS * (2 if true_cfg else 1)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a["hidden_states"].shape == (1, 16 + 32 * count, 16)
        assert a["img_shapes"] == b["img_shapes"] == _img_shapes(count), k
        for key in ("hidden_states", "timestep", "encoder_hidden_states"):
            assert torch.equal(a[key], b[key]), (k, key)
        assert torch.equal(a["encoder_hidden_states_mask"], b["encoder_hidden_states_mask"]), k


@needs_zero_cond_t
def test_zero_cond_t_changes_the_velocity_and_the_images_order_matters():
    """The same weights with zero_cond_t give another velocity (the reference tokens are
    modulated as at timestep 0), and swapping the two images (their latents and their
    img_shapes entries together) gives another one too: the ODE is the pipeline's for the
    images in the order given. Both differ by more than 1e-3, well above float32 rounding of
    velocities of unit size (measured: 4.5e-3 and 9.6e-3, the velocity at most 1.7)."""
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(1, 32, 16, generator=g), torch.randn(1, 32, 16, generator=g)
    x = _noise(torch.float32)

    def velocity(transformer, image_latents, shapes):
        cond = _cond(torch.float32, image_latents, 2)
        ode = from_diffusers(transformer, _scheduler(), **dict(cond, img_shapes=[shapes]))
        with torch.no_grad():
            return ode.evaluate(0.6, x).derivative

    shapes = _img_shapes(2)[0]
    plain = velocity(tiny_qwen_image_transformer(), torch.cat([first, second], 1), shapes)
    zero = tiny_qwen_image_transformer(zero_cond_t=True)
    ordered = velocity(zero, torch.cat([first, second], 1), shapes)
    swapped = velocity(zero, torch.cat([second, first], 1), [shapes[0], shapes[2], shapes[1]])
    assert float((ordered - plain).abs().max()) > 1e-3
    assert float((ordered - swapped).abs().max()) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("zero_cond_t", ZERO_COND, ids=["plain-t", "zero-cond-t"])
@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
def test_bdia_euler_inverts_the_edit_plus_ode_to_float64_rounding(true_cfg, zero_cond_t):
    """bdia(euler, 0.96) on the Edit Plus ODE (float64 transformer and state, two reference
    images, Qwen-Image's shifted grid), from the noise at t = 1 to 0 and back, returns the
    noise to 1e-12 relative (measured: 0, with the CFG rescaling and zero_cond_t too)."""
    # zero_cond_t only where set: diffusers 0.36's transformer has no such argument.
    kind = dict(zero_cond_t=True) if zero_cond_t else {}
    transformer = tiny_qwen_image_transformer(dtype=torch.float64, **kind)
    g = torch.Generator().manual_seed(5)
    image_latents = torch.randn(1, 64, 16, generator=g).double()
    cond = _cond(torch.float64, image_latents, 2, true_cfg=true_cfg)
    ode = from_diffusers(transformer, _scheduler(), **cond)
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_scheduler())) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("zero_cond_t", ZERO_COND, ids=["plain-t", "zero-cond-t"])
def test_bdia_scheduler_in_edit_plus_pipeline_is_bdia_sample_and_inverts(own_size, zero_cond_t):
    """QwenImageEditPlusPipeline (two reference images, true CFG 4) with
    BDIAScheduler.from_config(its config, gamma=0.96) gives the latents and the final pair
    (low words included) of bdia.sample with bdia(euler, 0.96) on the Edit Plus ODE, bit for
    bit; bdia.invert from the pair, and the inverse scheduler's loop with the pipeline's
    transformer calls, return the pipeline's noise bit for bit."""
    pipe = tiny_qwen_image_edit_plus_pipeline(zero_cond_t=zero_cond_t)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    images = _images(2)
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, _references(pipe, images), 2, true_cfg=True)
    latents = _pipeline_latents(pipe, noise, cond, image=images)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.96)
    inverse = _invert(pipe, pair, cond, cond["image_latents"], _img_shapes(2))
    assert torch.equal(inverse.pair.earlier, noise)


# -------------------------------------------------------------------------- refusals


def test_img_shapes_that_do_not_count_the_images_tokens_are_refused_before_any_call():
    """One line each, before any call: img_shapes whose entries after the latents' count
    other tokens than the images' latents (one image's entry for two images' latents, or
    three entries), and images' latents of other channels than the transformer's."""
    transformer = tiny_qwen_image_transformer()
    calls = Counter(transformer)
    images = torch.zeros(1, 64, 16)
    base = _cond(torch.float32, images, 2)
    cases = [
        (dict(base, img_shapes=_img_shapes(1)), "hold 32 tokens after the latents' shape"),
        (dict(base, img_shapes=[[*_img_shapes(2)[0], (1, 2, 2)]]), "but image_latents has 64"),
        (dict(base, image_latents=torch.zeros(1, 64, 8)), "image_latents has 8"),
    ]
    for cond, field in cases:
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(transformer, _scheduler(), **cond)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


@needs_zero_cond_t
def test_zero_cond_t_img_shapes_of_another_split_or_count_are_refused_before_the_call():
    """For a transformer with zero_cond_t, which reads every sample's img_shapes entry to find
    the images' tokens (its rotary embedding the first alone): a sample whose entry splits
    the tokens otherwise than the first is refused in one line when the ODE is built (the
    negative branch's img_shapes too), and img_shapes of neither 1 nor the state's batch
    entries at the first evaluation; the transformer is never called. Without zero_cond_t
    the transformer reads the first entry alone, and the same img_shapes are taken."""
    transformer = tiny_qwen_image_transformer(zero_cond_t=True)
    calls = Counter(transformer)
    base = _cond(torch.float32, torch.zeros(1, 64, 16), 2, true_cfg=True)
    first = _img_shapes(2)[0]
    other = [(1, 4, 8), (1, 4, 4), (1, 8, 4)]  # 80 tokens, as many, split 32 + 48
    negative = dict(base["negative_cond"], img_shapes=[first, other])
    for cond, field in (
        (dict(base, img_shapes=[first, other]), "img_shapes[1] is [(1, 4, 8), (1, 4, 4)"),
        (dict(base, img_shapes=[first, first[:2]]), "split as img_shapes[0]'s (16 latents'"),
        (dict(base, negative_cond=negative), "negative_cond['img_shapes'][1] is"),
    ):
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(transformer, _scheduler(), **cond)
        _one_line_error(exc_info, field)
        plain = from_diffusers(tiny_qwen_image_transformer(), _scheduler(), **cond)
        assert plain.cond["img_shapes"] == cond["img_shapes"]
    ode = from_diffusers(transformer, _scheduler(), **dict(base, img_shapes=[first] * 3))
    with pytest.raises(ValueError) as exc_info:
        ode.evaluate(1.0, _noise(torch.float32).repeat(2, 1, 1))
    _one_line_error(exc_info, "img_shapes has 3 entries but the state's batch is 2")
    assert calls.calls == 0


# ----------------------------------------------------------------------- edit_image


def _edit(pipe, image, references, true_cfg, dtype=torch.float64):
    """edit_image on ``pipe`` of ``image`` (a 32 x 16 PIL image, given as the pixels the
    pipeline makes of it) with ``references`` as reference_image, from a padded source
    prompt of 5 tokens to a target of 6, with true CFG 4 and a negative prompt of 7 tokens
    where ``true_cfg``."""
    options = {}
    if true_cfg:
        options = dict(guidance_scale=TRUE_CFG, negative_prompt=_one(_negative()))
    if references:
        options["reference_image"] = references
    pixels = pipe.image_processor.preprocess(image, image.height, image.width)
    return edit_image(
        pipe,
        pixels,
        _one(_prompt(torch.float32, 1, 5)),
        _one(_prompt(torch.float32, 3, 6)),
        num_inference_steps=N_STEPS,
        state_dtype=dtype,
        progress=False,
        **options,
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("zero_cond_t", ZERO_COND, ids=["plain-t", "zero-cond-t"])
@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
@pytest.mark.parametrize("extra", [0, 1], ids=["own-image", "one-more"])
def test_edit_image_on_edit_plus_is_exact_and_the_pipelines_run(
    own_size, extra, true_cfg, zero_cond_t
):
    """edit_image on QwenImageEditPlusPipeline (prompt embeddings, with or without true CFG 4
    and zero_cond_t) takes the edited 32 x 16 image as its first reference and
    reference_image's (a 16 x 32 one, where given) after it: both ODEs' image latents
    are bit for bit those of the pipeline's prepare_latents for [image, *references], with
    img_shapes of the latents and each image. The round trip is exact (latent_error 0 with a
    float64 state, measured 0), and with a float32 state the edited latents are bit for bit
    what the pipeline returns from the inverted noise with image=[image, *references] under
    the target prompt."""
    pipe = tiny_qwen_image_edit_plus_pipeline(zero_cond_t=zero_cond_t)
    image, *references = _images(2)
    references = references[:extra]
    result = _edit(pipe, image, references, true_cfg)
    assert result.latent_error == 0.0
    expected = _references(pipe, [image, *references])
    shapes = [[(1, 4, 8), (1, 4, 8), *[(1, 8, 4)] * extra]]
    for ode in (result.inversion.ode, result.target):
        assert torch.equal(ode.cond["image_latents"], expected)
        assert ode.cond["img_shapes"] == shapes
    out = _edit(pipe, image, references, true_cfg, torch.float32)
    negative = _one(_negative()) if true_cfg else None
    target = _target_args(_one(_prompt(torch.float32, 3, 6)), negative)
    assert_edit_is_the_pipelines_run(
        pipe, out, N_STEPS, image=[image, *references], height=16, width=32, **target
    )


def test_edit_image_refuses_bad_reference_images_before_any_network_runs(own_size):
    """One line each, before the transformer or the VAE runs: reference_image for a pipeline
    other than Edit Plus (the Edit one), one of a size the packing cannot take, one that is
    not an image, one of another batch than 1 and the image's, and a text prompt for the
    Edit Plus pipeline (it embeds text with its images through Qwen2.5-VL)."""
    plus = tiny_qwen_image_edit_plus_pipeline()
    edit = diffusers.QwenImageEditPipeline(**plus.components)
    image, other = _images(2)
    pixels = plus.image_processor.preprocess(image, image.height, image.width)
    source, target = _one(_prompt(torch.float32, 1, 5)), _one(_prompt(torch.float32, 3, 6))
    cases = [
        (edit, source, dict(reference_image=other), "the pipeline is a QwenImageEditPipeline"),
        (plus, source, dict(reference_image=[other.crop((0, 0, 16, 30))]), "16 x 30 (W x H)"),
        (plus, source, dict(reference_image=[other, "a cat"]), "reference_image[1]: image must"),
        (plus, source, dict(reference_image=torch.zeros(3, 3, 16, 16)), "holds 3 images"),
        (plus, "a cat", {}, "QwenImageEditPlusPipeline embeds text with the image"),
    ]
    for pipe, prompt, options, fragment in cases:
        counters = [Counter(pipe.transformer), Counter(pipe.vae.encoder), Counter(pipe.vae.decoder)]
        with pytest.raises((ValueError, TypeError)) as exc_info:
            edit_image(pipe, pixels, prompt, target, num_inference_steps=2, **options)
        _one_line_error(exc_info, fragment)
        assert [c.calls for c in counters] == [0, 0, 0]
