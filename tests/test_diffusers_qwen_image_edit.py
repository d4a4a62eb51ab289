"""bdia.integrations.diffusers with Qwen-Image-Edit: from_diffusers(image_latents=...) against
QwenImageEditPipeline's run, BDIAScheduler in that pipeline, the refusals, and edit_image on
QwenImageEditPipeline.

QwenImageEditPipeline (diffusers 0.35 and newer) calls Qwen-Image's transformer on the packed
latents' tokens followed by its reference image's packed latents, with the shapes of both in
each sample's ``img_shapes`` entry, and keeps the output's rows of the latents; true CFG and
its rescaling are QwenImagePipeline's. The image is fixed over the run, so the run is an ODE
in the latents, as Flux Kontext's is. The pipeline is the tiny random one
(``tiny_qwen_image_edit_pipeline``), given prompt embeddings and their masks (it has no
Qwen2.5-VL to embed text with the image). It resizes its reference image to about 1024 x
1024 pixels (its ``calculate_dimensions``), a 65536-token image for the tiny VAE's factor 2:
the tests have that function return the image's own 32 x 16, which changes only the size the
pipeline computes. As for QwenImagePipeline, parity is checked in float32, bit for bit;
exactness of the inversion in float64.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

if not hasattr(diffusers, "QwenImageEditPipeline"):
    pytest.skip("QwenImageEditPipeline is in diffusers 0.35 and newer", allow_module_level=True)

from _pipeline_runs import assert_bdia_run_inverts, assert_edit_is_the_pipelines_run  # noqa: E402
from conftest import Counter, flow_round_trip_error  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit  # noqa: E402
from PIL import Image  # noqa: E402
from test_diffusers_qwen_image import (  # noqa: E402
    BATCH,
    IMG_SHAPES,
    N_STEPS,
    TOKENS,
    TRUE_CFG,
    _cond,
    _grid,
    _img2img_parts,
    _invert,
    _negative,
    _noise,
    _one_line_error,
    _pipeline_latents,
    _prompt,
    _scheduler,
    _target,
    _target_args,
)

import bdia  # noqa: E402
from bdia.integrations.diffusers import (  # noqa: E402
    BDIAScheduler,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGE_TOKENS = 32  # a 32 x 16 reference image: 16 x 8 latents in patches of 2 x 2
# QwenImageEditPipeline's img_shapes for a 16 x 16 output and a 32 x 16 (W x H) reference.
EDIT_SHAPES = [[(1, 4, 4), (1, 4, 8)]] * BATCH


def _image():
    """The reference image, an RGB PIL image 32 wide and 16 high (the pipeline takes PIL
    images: it reads their ``size``)."""
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (16, 32, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture
def own_size(monkeypatch):
    """The Edit pipeline keeps its reference image at the image's size (see the module's
    docstring); returns the image."""
    image = _image()
    monkeypatch.setattr(
        pipeline_qwenimage_edit,
        "calculate_dimensions",
        lambda area, ratio: (image.width, image.height, None),
    )
    return image


def _reference(pipe, image, dtype=torch.float32):
    """The reference image's packed latents (BATCH, IMAGE_TOKENS, 16), as
    QwenImageEditPipeline makes them for ``image`` (one PIL image, or a list of them) kept
    at its size: resized and preprocessed, a one-frame video, encoded and packed by its
    prepare_latents."""
    pixels = pipe.image_processor.resize(image, 16, 32)
    pixels = pipe.image_processor.preprocess(pixels, 16, 32).unsqueeze(2)
    with torch.no_grad():
        _, image_latents = pipe.prepare_latents(
            pixels, BATCH, 4, 16, 16, dtype, "cpu", None, _noise(dtype)
        )
    return image_latents


def _edit_cond(dtype, image_latents, *, true_cfg=False):
    """from_diffusers' conditioning: test_diffusers_qwen_image's, with the reference image's
    latents and the img_shapes of the latents and the image."""
    return dict(
        _cond(dtype, true_cfg=true_cfg), img_shapes=EDIT_SHAPES, image_latents=image_latents
    )


def _kwargs_of_calls(transformer, run):
    """The keyword arguments of each transformer call while ``run()`` runs, and its result."""
    seen = []
    handle = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return seen, result


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_edit_pipeline_gives_bdia_euler_latents(own_size, true_cfg):
    """QwenImageEditPipeline itself (tiny parts, prompt embeddings with a padded prompt, a 32
    x 16 reference image it encodes itself, with or without true CFG 4 and negative prompts
    of another length) returns the latents of bdia.sample with euler on from_diffusers with
    its own prepare_latents' image latents, bit for bit in float32; every call gets the same
    keyword arguments from both, bit for bit: the latents' 16 tokens followed by the
    image's 32, the timestep t / 1000, each branch's embeddings and mask, and img_shapes of
    two entries per sample. Without the reference (QwenImagePipeline's ODE) the run
    differs."""
    pipe = tiny_qwen_image_edit_pipeline()
    noise = _noise(torch.float32)
    image_latents = _reference(pipe, own_size)
    assert image_latents.shape == (BATCH, IMAGE_TOKENS, 16)
    cond = _edit_cond(torch.float32, image_latents, true_cfg=true_cfg)
    theirs, latents = _kwargs_of_calls(
        pipe.transformer, lambda: _pipeline_latents(pipe, noise, cond, image=own_size)
    )
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    euler = bdia.get_solver("euler")

    def ours_run():
        with torch.no_grad():
            return bdia.sample(ode, euler, noise, ts, progress=False)

    ours, sampled = _kwargs_of_calls(pipe.transformer, ours_run)
    assert torch.equal(sampled, latents)
    assert len(ours) == len(theirs) == N_STEPS * (2 if true_cfg else 1)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a["hidden_states"].shape == (BATCH, TOKENS + IMAGE_TOKENS, 16)
        assert a["img_shapes"] == b["img_shapes"] == EDIT_SHAPES, k
        for key in ("hidden_states", "timestep", "encoder_hidden_states"):
            assert torch.equal(a[key], b[key]), (k, key)
        assert torch.equal(a["encoder_hidden_states_mask"], b["encoder_hidden_states_mask"]), k
    plain = {k: v for k, v in cond.items() if k != "image_latents"}
    plain = from_diffusers(pipe.transformer, pipe.scheduler, **dict(plain, img_shapes=IMG_SHAPES))
    with torch.no_grad():
        alone = bdia.sample(plain, euler, noise, ts, progress=False)
    assert float((alone - latents).abs().max()) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_bdia_euler_inverts_the_edit_ode_to_float64_rounding(true_cfg):
    """bdia(euler, 0.96) on the Edit ODE (float64 transformer and state, Qwen-Image's shifted
    grid, a reference image of batch 1 shared by the batch), from the noise at t = 1 to 0
    and back, returns the noise to 1e-12 relative (measured: 0, with the CFG rescaling
    too)."""
    transformer = tiny_qwen_image_transformer(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    image_latents = torch.randn(1, IMAGE_TOKENS, 16, generator=g).double()
    cond = _edit_cond(torch.float64, image_latents, true_cfg=true_cfg)
    ode = from_diffusers(transformer, _scheduler(), **cond)
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_scheduler())) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


def test_bdia_scheduler_in_edit_pipeline_is_bdia_sample_and_inverts(own_size):
    """QwenImageEditPipeline (true CFG 4) with BDIAScheduler.from_config(its config,
    gamma=0.96) gives the latents and the final pair (low words included) of bdia.sample
    with bdia(euler, 0.96) on the Edit ODE, bit for bit; bdia.invert from the pair, and the
    inverse scheduler's loop with the pipeline's transformer calls, return the pipeline's
    noise bit for bit."""
    pipe = tiny_qwen_image_edit_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    noise = _noise(torch.float32)
    cond = _edit_cond(torch.float32, _reference(pipe, own_size), true_cfg=True)
    latents = _pipeline_latents(pipe, noise, cond, image=own_size)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.96)
    inverse = _invert(pipe, pair, cond, cond["image_latents"], EDIT_SHAPES)
    assert torch.equal(inverse.pair.earlier, noise)


# -------------------------------------------------------------------------- refusals


def test_bad_reference_images_are_refused_before_any_call():
    """One line each, before any call: img_shapes without the reference image's entry, or
    whose entries after the latents' count other tokens than the image's; image latents of
    other channels than the transformer's, not packed (4-D), or in the negative branch."""
    transformer = tiny_qwen_image_transformer()
    calls = Counter(transformer)
    image = torch.zeros(1, IMAGE_TOKENS, 16)
    base = _edit_cond(torch.float32, image)
    guided = _edit_cond(torch.float32, image, true_cfg=True)
    negative = dict(guided["negative_cond"], image_latents=image)
    cases = [
        (dict(base, img_shapes=IMG_SHAPES), "hold 0 tokens after the latents' shape"),
        (dict(base, img_shapes=[[(1, 4, 4), (1, 4, 4)]]), "but image_latents has 32"),
        (dict(base, image_latents=torch.zeros(1, IMAGE_TOKENS, 8)), "image_latents has 8"),
        (dict(base, image_latents=image[None]), "(batch or 1, tokens, C)"),
        (dict(guided, negative_cond=negative), "negative_cond has key 'image_latents'"),
    ]
    for cond, field in cases:
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(transformer, _scheduler(), **cond)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_edit_states_that_are_not_the_pipelines_are_refused_before_the_call():
    """At the first evaluation, before the transformer is called: a state of another token
    count than img_shapes' first entry (their sum counts the state's and the image's), and
    a reference image whose batch is neither 1 nor the state's."""
    transformer = tiny_qwen_image_transformer()
    calls = Counter(transformer)
    image = torch.zeros(1, IMAGE_TOKENS, 16)
    for cond, x, field in (
        (_edit_cond(torch.float32, image), torch.zeros(BATCH, 4 * TOKENS, 16), "make 48 tokens"),
        (_edit_cond(torch.float32, image.repeat(3, 1, 1)), _noise(torch.float32), "batch 3"),
    ):
        ode = from_diffusers(transformer, _scheduler(), **cond)
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, x)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


# ----------------------------------------------------------------------- edit_image


def _pixels(pipe, image):
    """The pixels (BATCH, 3, 16, 32) in [-1, 1] QwenImageEditPipeline makes of BATCH copies
    of ``image``, the list it is given: the VAE's float32 encoding of a batch of 2 may
    differ in the last bit from that of one image, so each side encodes BATCH of them."""
    return pipe.image_processor.preprocess([image] * BATCH, 16, 32)


def _edit(pipe, image, true_cfg, dtype=torch.float64):
    """edit_image on ``pipe`` of ``image`` (the pixels the pipeline makes of BATCH copies)
    from source prompts of 5 tokens to targets of 6, with true CFG 4 and negative prompts of
    7 tokens where ``true_cfg``."""
    options = {}
    if true_cfg:
        options = dict(guidance_scale=TRUE_CFG, negative_prompt=_negative())
    pixels = _pixels(pipe, image)
    return edit_image(
        pipe,
        pixels,
        _prompt(torch.float32, 1, 5),
        _target(),
        num_inference_steps=N_STEPS,
        state_dtype=dtype,
        progress=False,
        **options,
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_edit_image_on_the_edit_pipeline_takes_the_image_as_its_reference(own_size, true_cfg):
    """edit_image on QwenImageEditPipeline (a VAE with latents_mean and latents_std other
    than 0 and 1, prompt embeddings, with or without true CFG 4) conditions both ODEs on the
    edited image, as the pipeline's image=: the image latents are bit for bit those of the
    pipeline's prepare_latents ((mode - latents_mean) / latents_std, packed; not
    QwenImagePipeline's reciprocal), img_shapes hold the latents' shape and the image's, and
    with a float32 state the latents edit_image inverts are the reference's, bit for bit.
    The round trip is exact (latent_error 0 with a float64 state, measured 0). Without the
    reference (QwenImagePipeline of the same parts) the edit differs."""
    pipe = diffusers.QwenImageEditPipeline(**_img2img_parts(), processor=None)
    pipe.set_progress_bar_config(disable=True)
    result = _edit(pipe, own_size, true_cfg)
    assert result.latent_error == 0.0
    reference = _reference(pipe, [own_size] * BATCH)
    assert reference.shape == (BATCH, IMAGE_TOKENS, 16)
    for ode in (result.inversion.ode, result.target):
        assert torch.equal(ode.cond["image_latents"], reference)
        assert ode.cond["img_shapes"] == [[(1, 4, 8), (1, 4, 8)]] * BATCH
    single = _edit(pipe, own_size, true_cfg, torch.float32)
    assert torch.equal(single.latents, reference)
    config = pipe.vae.config
    with torch.no_grad():
        z = pipe.vae.encode(_pixels(pipe, own_size).unsqueeze(2)).latent_dist.mean
    z = z - torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 4, 1, 1, 1)
    pack = diffusers.QwenImagePipeline._pack_latents
    assert torch.equal(reference, pack(z / std, BATCH, 4, 8, 16))
    assert not torch.equal(reference, pack(z * (1.0 / std), BATCH, 4, 8, 16))
    plain = diffusers.QwenImagePipeline(**_img2img_parts())
    alone = _edit(plain, own_size, true_cfg)
    assert "image_latents" not in alone.target.cond
    assert float((alone.edited_latents - result.edited_latents).abs().max()) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_the_edit_is_the_edit_pipelines_run_from_the_inverted_noise(own_size, true_cfg):
    """With a float32 state, edit_image's edited latents are bit for bit what
    QwenImageEditPipeline returns from the inverted noise with the image as its reference
    under the target prompt (its true_cfg_scale 4 with the negative embeddings where
    guided), the edit's base solver being the pipeline's Euler step on its own sigmas."""
    pipe = tiny_qwen_image_edit_pipeline()
    out = _edit(pipe, own_size, true_cfg, torch.float32)
    target = _target_args(_target(), _negative() if true_cfg else None)
    assert_edit_is_the_pipelines_run(
        pipe, out, N_STEPS, image=[own_size] * BATCH, height=16, width=32, **target
    )


def test_edit_image_refuses_text_prompts_for_the_edit_pipeline(own_size):
    """QwenImageEditPipeline embeds text with the image through Qwen2.5-VL: a text prompt is
    refused in one line, before the transformer or the VAE runs, even with a tokenizer and a
    text encoder (stand-ins here)."""
    pipe = tiny_qwen_image_edit_pipeline()
    pipe.tokenizer, pipe.text_encoder = object(), torch.nn.Identity()
    counters = [Counter(pipe.transformer), Counter(pipe.vae.encoder), Counter(pipe.vae.decoder)]
    with pytest.raises(ValueError) as exc_info:
        edit_image(pipe, _pixels(pipe, own_size), "a cat", _target(), num_inference_steps=2)
    _one_line_error(exc_info, "QwenImageEditPipeline embeds text with the image")
    assert [c.calls for c in counters] == [0, 0, 0]


# --------------------------------------------------------- Edit's inpainting pipeline


def _edit_inpaint(parts):
    """QwenImageEditInpaintPipeline of the Edit pipeline's ``parts`` (diffusers 0.36 and
    newer; skipped before)."""
    if not hasattr(diffusers, "QwenImageEditInpaintPipeline"):
        pytest.skip(f"diffusers {diffusers.__version__} has no QwenImageEditInpaintPipeline")
    pipe = diffusers.QwenImageEditInpaintPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_mask_for_the_edit_inpainting_pipeline_is_refused_in_one_line(own_size):
    """QwenImageEditInpaintPipeline's transformer takes no mask: the pipeline blends the
    re-noised image into the latents outside the mask after every step, which is not an
    ODE. A mask is refused in one line that names the pipeline and says so, before the
    transformer or the VAE runs, the caller's mask untouched (before: edit_image refused the
    pipeline by its class, mask or not)."""
    pipe = _edit_inpaint(tiny_qwen_image_edit_pipeline().components)
    mask = torch.ones(1, 1, 16, 32)
    counters = [Counter(pipe.transformer), Counter(pipe.vae.encoder), Counter(pipe.vae.decoder)]
    with pytest.raises(ValueError) as exc_info:
        edit_image(
            pipe,
            _pixels(pipe, own_size),
            _prompt(torch.float32, 1, 5),
            _target(),
            num_inference_steps=2,
            mask_image=mask,
        )
    message = str(exc_info.value)
    for field in ("is a QwenImageEditInpaintPipeline whose", "blends", "no exact inversion"):
        _one_line_error(exc_info, field)
    assert "leave mask_image out" in message
    assert torch.equal(mask, torch.ones(1, 1, 16, 32))
    assert [c.calls for c in counters] == [0, 0, 0]


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_without_a_mask_the_edit_inpainting_pipeline_edits_as_the_edit_pipeline(own_size, true_cfg):
    """Without a mask, edit_image on QwenImageEditInpaintPipeline is the edit of
    QwenImageEditPipeline of the same parts, bit for bit (the image its own reference), its
    round trip exact (latent_error 0 in float64)."""
    parts = tiny_qwen_image_edit_pipeline().components
    ours = _edit(_edit_inpaint(parts), own_size, true_cfg)
    theirs = _edit(diffusers.QwenImageEditPipeline(**parts), own_size, true_cfg)
    assert ours.latent_error == 0.0
    assert torch.equal(ours.target.cond["image_latents"], theirs.target.cond["image_latents"])
    assert torch.equal(ours.edited_latents, theirs.edited_latents)


def test_the_edit_inpainting_pipelines_reference_is_its_own_encoding(own_size, monkeypatch):
    """The reference latents edit_image gives QwenImageEditInpaintPipeline's transformer are
    the ones its own prepare_latents makes (the VAE's mean patched in where it draws a
    sample: (z - latents_mean) * (1 / latents_std), QwenImageImg2ImgPipeline's
    normalisation), bit for bit, with a VAE whose latents_std have inexact reciprocals; they
    differ from QwenImageEditPipeline's (z - latents_mean) / latents_std in the last bits.
    With a float32 state, the latents edit_image inverts are the reference's, bit for bit,
    as the pipeline's start is the same encoding."""
    pipe = _edit_inpaint(dict(_img2img_parts(), processor=None))
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint

    result = _edit(pipe, own_size, False, torch.float32)
    monkeypatch.setattr(
        pipeline_qwenimage_edit_inpaint,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean,
    )
    with torch.no_grad():
        _, _, theirs = pipe.prepare_latents(
            _pixels(pipe, own_size),
            torch.tensor([1000.0] * BATCH),
            BATCH,
            4,
            16,
            32,
            torch.float32,
            "cpu",
            torch.Generator().manual_seed(0),
        )
    assert theirs.shape == (BATCH, IMAGE_TOKENS, 16)
    assert torch.equal(result.target.cond["image_latents"], theirs)
    assert torch.equal(result.latents, theirs)
    edit = diffusers.QwenImageEditPipeline(**dict(_img2img_parts(), processor=None))
    assert not torch.equal(theirs, _reference(edit, [own_size] * BATCH))
