"""``bdia edit``: a photo through a diffusers pipeline saved on disk, from the command line.

The pipelines are the tiny random ones of ``bdia.integrations.diffusers.tiny`` (16 x 16 RGB
images, a VAE of factor 2), written with ``save_pretrained`` and read back by the command
offline. A random network is no denoiser, so the edits are not images of anything; what is
checked is that the command writes what ``edit_image`` gives for the same photo and options,
pixel for pixel, and that every mistake ends in one line with nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings

import diffusers
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from PIL import Image
from test_cli_errors import fails_in_one_line

from bdia.cli import main
from bdia.integrations.diffusers import edit_image
from bdia.integrations.diffusers.tiny import (
    tiny_chroma_pipeline,
    tiny_controlnet_inpaint_pipeline,
    tiny_controlnet_pipeline,
    tiny_flux2_klein_kv_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_control_pipeline,
    tiny_flux_controlnet_pipeline,
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_inpaint_pipeline,
    tiny_pixart_pipeline,
    tiny_playground_pipeline,
    tiny_qwen_image_controlnet_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_edit_plus_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_controlnet_inpaint_pipeline,
    tiny_sd3_controlnet_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    tiny_text_to_image_pipeline,
    tiny_z_image_controlnet_pipeline,
    tiny_z_image_pipeline,
)

pytestmark = [
    # diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # The tiny random unet is no denoiser: at 4 steps bdia's parasitic mode outgrows it.
    pytest.mark.filterwarnings("ignore::bdia.sampling.ParasiticWarning"),
]

SOURCE, TARGET = "a photo of a cat", "a painting of a dog"
STEPS = 4
BUILDERS = {
    "sd": tiny_text_to_image_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "playground": tiny_playground_pipeline,
    # A 9-channel inpainting unet, a Flux Fill transformer: they take --mask.
    "inpaint": tiny_inpaint_pipeline,
    "fill": tiny_flux_fill_pipeline,
    # One ControlNetModel, and a MultiControlNetModel of two: they take --control-image, and
    # so does the ControlNet img2img pipeline; the ControlNet inpainting one takes both.
    "controlnet": tiny_controlnet_pipeline,
    "controlnets": lambda folder: tiny_controlnet_pipeline(folder, controlnets=2),
    "controlnet-img2img": lambda folder: tiny_controlnet_pipeline(folder, img2img=True),
    "controlnet-inpaint": tiny_controlnet_inpaint_pipeline,
    # Flux's Depth/Canny transformer, Flux's and SD3's ControlNets: --control-image too.
    "flux-control": tiny_flux_control_pipeline,
    "flux-controlnet": tiny_flux_controlnet_pipeline,
    "sd3-controlnet": tiny_sd3_controlnet_pipeline,
    # SD3's ControlNet inpainting pipeline: its controlnet takes the mask, so both.
    "sd3-controlnet-inpaint": tiny_sd3_controlnet_inpaint_pipeline,
}
# FluxKontextPipeline, the image its own reference: in diffusers 0.35 and newer.
KONTEXT = hasattr(diffusers, "FluxKontextPipeline")
if KONTEXT:
    BUILDERS["kontext"] = tiny_flux_kontext_pipeline
NO_KONTEXT = pytest.mark.skipif(
    not KONTEXT, reason="FluxKontextPipeline is in diffusers 0.35 and newer"
)
# PixArtSigmaPipeline: T5 alone, under its noise table (made in memory).
BUILDERS["pixart"] = lambda folder: tiny_pixart_pipeline()
# ChromaPipeline, T5 alone and true CFG (made in memory, without a CLIP tokenizer to write).
CHROMA = hasattr(diffusers, "ChromaPipeline")
if CHROMA:
    BUILDERS["chroma"] = lambda folder: tiny_chroma_pipeline()
NO_CHROMA = pytest.mark.skipif(
    not CHROMA, reason=f"diffusers {diffusers.__version__} has no ChromaPipeline"
)
# QwenImagePipeline with a tiny Qwen2.5-VL text encoder and Qwen2 tokenizer: diffusers 0.35
# and transformers 4.49 and newer.
QWEN = hasattr(diffusers, "QwenImagePipeline") and hasattr(
    transformers, "Qwen2_5_VLForConditionalGeneration"
)
if QWEN:
    BUILDERS["qwen"] = lambda folder: tiny_qwen_image_pipeline(text_encoder=True)
# QwenImageControlNetPipeline of those parts: diffusers 0.36 and newer.
QWEN_CONTROLNET = QWEN and hasattr(diffusers, "QwenImageControlNetPipeline")
if QWEN_CONTROLNET:
    BUILDERS["qwen-controlnet"] = lambda folder: tiny_qwen_image_controlnet_pipeline(
        text_encoder=True
    )
NO_QWEN_CONTROLNET = pytest.mark.skipif(
    not QWEN_CONTROLNET, reason="QwenImageControlNetPipeline is in diffusers 0.36 and newer"
)
NO_QWEN = pytest.mark.skipif(
    not QWEN,
    reason=f"QwenImagePipeline with Qwen2.5-VL needs diffusers 0.35 and transformers 4.49 "
    f"(these are {diffusers.__version__} and {transformers.__version__})",
)
# ZImagePipeline and Flux2KleinPipeline with a tiny Qwen3 text encoder and Qwen2 tokenizer:
# diffusers 0.36 (Z-Image) and 0.37 (Klein), transformers 4.51 (Qwen3) and newer.
QWEN3 = hasattr(transformers, "Qwen3Model")
Z_IMAGE = QWEN3 and hasattr(diffusers, "ZImagePipeline")
if Z_IMAGE:
    BUILDERS["zimage"] = lambda folder: tiny_z_image_pipeline(text_encoder=True)
NO_Z_IMAGE = pytest.mark.skipif(
    not Z_IMAGE,
    reason=f"ZImagePipeline with Qwen3 needs diffusers 0.36 and transformers 4.51 (these are "
    f"{diffusers.__version__} and {transformers.__version__})",
)
# ZImageControlNetPipeline and its inpainting sibling of those parts: diffusers 0.37 and newer.
Z_IMAGE_CONTROLNET = Z_IMAGE and hasattr(diffusers, "ZImageControlNetPipeline")
if Z_IMAGE_CONTROLNET:
    for _name, _inpaint in (("zimage-controlnet", False), ("zimage-controlnet-inpaint", True)):
        BUILDERS[_name] = lambda folder, inpaint=_inpaint: tiny_z_image_controlnet_pipeline(
            inpaint=inpaint, text_encoder=True
        )
NO_Z_IMAGE_CONTROLNET = pytest.mark.skipif(
    not Z_IMAGE_CONTROLNET,
    reason="ZImageControlNetPipeline with Qwen3 needs diffusers 0.37 and transformers 4.51",
)
KLEIN = QWEN3 and hasattr(diffusers, "Flux2KleinPipeline")
if KLEIN:
    BUILDERS["klein"] = lambda folder: tiny_flux2_klein_pipeline(text_encoder=True)
# Flux2Pipeline (FLUX.2-dev) with a tiny Mistral 3 text encoder: diffusers 0.36 and
# transformers 4.50 and newer.
FLUX2_DEV = hasattr(diffusers, "Flux2Pipeline") and hasattr(
    transformers, "Mistral3ForConditionalGeneration"
)
if FLUX2_DEV:
    BUILDERS["flux2-dev"] = lambda folder: tiny_flux2_pipeline(text_encoder=True)
NO_FLUX2_DEV = pytest.mark.skipif(
    not FLUX2_DEV, reason="Flux2Pipeline with Mistral 3 needs diffusers 0.36, transformers 4.50"
)
# Flux2KleinKVPipeline of those parts: diffusers 0.38 and newer.
KLEIN_KV = KLEIN and hasattr(diffusers, "Flux2KleinKVPipeline")
if KLEIN_KV:
    BUILDERS["klein-kv"] = lambda folder: tiny_flux2_klein_kv_pipeline(text_encoder=True)
NO_KLEIN = pytest.mark.skipif(
    not KLEIN,
    reason=f"Flux2KleinPipeline with Qwen3 needs diffusers 0.37 and transformers 4.51 (these "
    f"are {diffusers.__version__} and {transformers.__version__})",
)


def quietly_built(build, *args):
    """``build(*args)`` without the FutureWarning of diffusers' Chroma transformer and
    Flux ControlNet, which build its own deprecated FluxPosEmbed (the command hides it
    too)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`FluxPosEmbed` is deprecated", FutureWarning)
        return build(*args)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Folder of each tiny pipeline as ``save_pretrained`` writes it (about 0.1 s each)."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for name, build in BUILDERS.items():
        words = root / f"{name}-words"
        words.mkdir()
        quietly_built(build, words).save_pretrained(root / name)
        folders[name] = root / name
    return folders


def photo(path, width=16, height=16, mode="RGB", seed=0):
    """A random photo of ``width`` x ``height`` pixels in ``mode``, saved at ``path``."""
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode).save(path)
    return path


def mask_file(path, width=16, height=16, top=4, left=2):
    """A mask of ``width`` x ``height`` pixels, white (repaint) in an 8 x 8 square at (top,
    left), black elsewhere, saved as a grey PNG at ``path``."""
    mask = np.zeros((height, width), np.uint8)
    mask[top : top + 8, left : left + 8] = 255
    Image.fromarray(mask, "L").save(path)
    return path


def edit(folder, image, out, *more):
    args = ["edit", "--pipeline", folder, "--image", image, "--source", SOURCE]
    args += ["--target", TARGET, "--out", out, "--steps", STEPS, "--device", "cpu", *more]
    return [str(a) for a in args]


def run(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def loaded(folder):
    """The pipeline saved in ``folder``; the tiny SD3 one was saved without T5, which diffusers
    wants to be told again."""
    absent = {}
    if json.loads((folder / "model_index.json").read_text()).get("text_encoder_3") == [None] * 2:
        absent = {"text_encoder_3": None, "tokenizer_3": None}
    load = diffusers.DiffusionPipeline.from_pretrained
    return quietly_built(lambda: load(folder, local_files_only=True, **absent))


def expected_edit(folder, image, **options):
    """What edit_image gives for the photo at ``image``, read as the command reads it (or the
    PIL image ``image`` itself), through the pipeline saved in ``folder``."""
    if not isinstance(image, Image.Image):
        image = read(image, "RGB")
    return edit_image(loaded(folder), image, SOURCE, TARGET, num_inference_steps=STEPS, **options)


def read(path, mode):
    with Image.open(path) as im:
        return im.convert(mode)


def pixels(path):
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


# ------------------------------------------------------------------------------ the edit


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name",
    [
        "sd",
        "sd3",
        "flux",
        "playground",
        "pixart",
        pytest.param("kontext", marks=NO_KONTEXT),
        pytest.param("chroma", marks=NO_CHROMA),
        pytest.param("qwen", marks=NO_QWEN),
        pytest.param("zimage", marks=NO_Z_IMAGE),
        pytest.param("klein", marks=NO_KLEIN),
        pytest.param("flux2-dev", marks=NO_FLUX2_DEV),
    ],
)
def test_the_written_pngs_are_edit_images_pil_output(name, pipelines, tmp_path):
    """The edit and the reconstruction as edit_image gives them for the same photo (as PIL
    images, rounded to uint8 as diffusers rounds), pixel for pixel; latent_error is printed."""
    image = photo(tmp_path / "photo.png")
    out, back = tmp_path / "edited.png", tmp_path / "recon.png"
    result = run(edit(pipelines[name], image, out, "--reconstruction", back))
    expected = expected_edit(pipelines[name], image)
    assert np.array_equal(pixels(out), np.asarray(expected.images[0]))
    assert np.array_equal(pixels(back), np.asarray(expected.reconstruction[0]))
    # The tiny pipelines' round trip is bitwise (docs/diffusers.md), so the error printed is 0.
    assert f"latent error {expected.latent_error:.3e}" in result.stdout
    assert "latent error 0.000e+00" in result.stdout
    assert f"vae error {expected.vae_error:.3e}" in result.stdout
    assert f"wrote {out} and {back} (the reconstruction)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.png", "photo.png", "recon.png"]


def test_the_options_reach_edit_image(pipelines, tmp_path):
    """Guidance, negative prompt, solver, gamma, rule and a float32 state as edit_image takes
    them; the edit differs from the default one, so the options are not ignored."""
    image = photo(tmp_path / "photo.png")
    more = ["--guidance", "3", "--negative", "a fox", "--solver", "euler", "--gamma", "0.5"]
    more += ["--rule", "restart", "--state-dtype", "float32"]
    result = run(edit(pipelines["sd"], image, tmp_path / "e.png", *more))
    run(edit(pipelines["sd"], image, tmp_path / "default.png"))
    expected = expected_edit(
        pipelines["sd"],
        image,
        guidance_scale=3.0,
        negative_prompt="a fox",
        solver="euler",
        gamma=0.5,
        rule="restart",
        state_dtype=torch.float32,
    )
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "default.png"))
    assert "bdia(euler, 0.5), 4 steps, float32 state" in result.stdout


def test_the_guidance_rescale_reaches_edit_image(pipelines, tmp_path):
    """--guidance-rescale is edit_image's guidance_rescale: the same edit, and another than
    without it; without guidance it is refused in the command's words (status 2)."""
    image = photo(tmp_path / "photo.png")
    run(edit(pipelines["sd"], image, tmp_path / "e.png", "--guidance-rescale", "0.7"))
    expected = expected_edit(pipelines["sd"], image, guidance_rescale=0.7)
    plain = expected_edit(pipelines["sd"], image)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    assert not torch.equal(expected.edited_latents, plain.edited_latents)
    args = edit(pipelines["sd"], image, tmp_path / "f.png", "--guidance", "1")
    line = fails_in_one_line(
        args + ["--guidance-rescale", "0.7"], tmp_path, "--guidance-rescale 0.7 rescales", status=2
    )
    assert "guidance_rescale" not in line


def test_flux_takes_the_embedded_guidance(pipelines, tmp_path):
    image = photo(tmp_path / "photo.png")
    run(edit(pipelines["flux"], image, tmp_path / "e.png", "--embedded-guidance", "2"))
    expected = expected_edit(pipelines["flux"], image, guidance=2.0)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))


@NO_CHROMA
def test_chroma_takes_the_guidance_as_true_cfg(pipelines, tmp_path):
    """ChromaPipeline's guidance_scale is true CFG (a second transformer call with the
    negative prompt), not an embedded scale: by default 5 with the negative prompt "", as
    the pipeline's own default; --guidance and --negative reach edit_image and change the
    edit. No line of diffusers' about its own deprecated FluxPosEmbed, which its Chroma
    transformer builds on loading: nothing the user can change."""
    image = photo(tmp_path / "photo.png")
    result = run(edit(pipelines["chroma"], image, tmp_path / "default.png"))
    assert "FluxPosEmbed" not in result.stderr
    default = expected_edit(pipelines["chroma"], image, guidance_scale=5.0, negative_prompt="")
    assert np.array_equal(pixels(tmp_path / "default.png"), np.asarray(default.images[0]))
    more = ["--guidance", "2", "--negative", "a fox"]
    result = run(edit(pipelines["chroma"], image, tmp_path / "e.png", *more))
    assert "latent error 0.000e+00" in result.stdout
    expected = expected_edit(
        pipelines["chroma"], image, guidance_scale=2.0, negative_prompt="a fox"
    )
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "default.png"))


@NO_QWEN
def test_qwen_image_takes_the_guidance_as_true_cfg(pipelines, tmp_path):
    """QwenImagePipeline runs without guidance by default (its true_cfg_scale acts only with
    a negative prompt), and so does the command, whose --negative '' is then unused;
    --guidance is its true_cfg_scale with --negative, both prompts through its Qwen2.5-VL
    text encoder; the round trip is exact either way."""
    image = photo(tmp_path / "photo.png")
    run(edit(pipelines["qwen"], image, tmp_path / "default.png"))
    default = expected_edit(pipelines["qwen"], image)
    assert np.array_equal(pixels(tmp_path / "default.png"), np.asarray(default.images[0]))
    assert "negative_cond" not in default.inversion.ode.cond
    more = ["--guidance", "4", "--negative", "a fox"]
    result = run(edit(pipelines["qwen"], image, tmp_path / "e.png", *more))
    assert "latent error 0.000e+00" in result.stdout
    expected = expected_edit(pipelines["qwen"], image, guidance_scale=4.0, negative_prompt="a fox")
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "default.png"))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,default,other",
    [
        pytest.param("zimage", 5.0, 0.0, marks=NO_Z_IMAGE),
        pytest.param("klein", 4.0, 1.0, marks=NO_KLEIN),
    ],
)
def test_z_image_and_klein_take_the_guidance_as_cfg(name, default, other, pipelines, tmp_path):
    """ZImagePipeline's CFG (5 by default, c + g (c - u), off at 0) and Flux2KleinPipeline's
    true CFG (4 by default, off at 1), with the negative prompt "" by default, as edit_image's
    defaults; --guidance and --negative reach edit_image, all prompts through the Qwen3 text
    encoder; the round trip is exact either way."""
    image = photo(tmp_path / "photo.png")
    run(edit(pipelines[name], image, tmp_path / "default.png"))
    expected = expected_edit(pipelines[name], image, guidance_scale=default, negative_prompt="")
    assert np.array_equal(pixels(tmp_path / "default.png"), np.asarray(expected.images[0]))
    assert expected.inversion.ode.cond.get("negative_cond") is not None
    more = ["--guidance", "2", "--negative", "a fox"]
    result = run(edit(pipelines[name], image, tmp_path / "e.png", *more))
    assert "latent error 0.000e+00" in result.stdout
    expected = expected_edit(pipelines[name], image, guidance_scale=2.0, negative_prompt="a fox")
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "default.png"))
    run(edit(pipelines[name], image, tmp_path / "none.png", "--guidance", str(other)))
    expected = expected_edit(pipelines[name], image, guidance_scale=other)
    assert "negative_cond" not in expected.inversion.ode.cond
    assert np.array_equal(pixels(tmp_path / "none.png"), np.asarray(expected.images[0]))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("klein", marks=NO_KLEIN),
        pytest.param(
            "klein-kv",
            marks=pytest.mark.skipif(not KLEIN_KV, reason="Flux2KleinKVPipeline needs 0.38"),
        ),
    ],
)
def test_reference_images_reach_edit_image_for_flux2(name, pipelines, tmp_path):
    """--reference-image, once per reference, gives FLUX.2-klein's pipeline (and its
    key-value-cache one) its image= list: the PNG is edit_image's with reference_image the
    files read as RGB, in order (the photo itself one of them), pixel for pixel; the round
    trip is exact. A pipeline of another family refuses it in one line before it loads."""
    image = photo(tmp_path / "photo.png", width=64, height=64)
    other = photo(tmp_path / "other.png", width=68, height=64, seed=3)
    more = ["--reference-image", image, "--reference-image", other]
    result = run(edit(pipelines[name], image, tmp_path / "e.png", *more))
    assert "latent error 0.000e+00" in result.stdout
    references = [read(image, "RGB"), read(other, "RGB")]
    expected = expected_edit(pipelines[name], image, reference_image=references)
    # edit_image's own tests show that the references move the edit.
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    result = CliRunner().invoke(main, edit(pipelines["sd"], image, tmp_path / "x.png", *more))
    assert result.exit_code == 2 and "'--reference-image'" in result.output
    assert "takes no reference images" in result.output and not (tmp_path / "x.png").exists()


def test_the_help_names_chroma_qwen_image_and_their_defaults():
    text = " ".join(CliRunner().invoke(main, ["edit", "--help"]).output.split())
    assert "Flux, Flux Kontext, Chroma, Qwen-Image" in text  # --pipeline
    assert "Playground v2.5, PixArt-alpha and PixArt-Sigma, Stable Diffusion 3" in text
    assert "[default: 7.5; 4.5 for PixArt, 1 for Flux" in text  # --guidance
    assert "Z-Image (ZImagePipeline and its img2img one), FLUX.2-dev" in text  # --pipeline
    assert "FLUX.2-klein (Flux2KleinPipeline, Flux2KleinKVPipeline)" in text
    assert "(8 for SD, 16 for PixArt, SD3, Flux, Chroma," in text  # --image
    assert "1: none, but 0 for Z-Image" in text  # --guidance
    assert "true CFG for Chroma, Qwen-Image and FLUX.2-klein" in text  # --guidance
    assert "1 for Flux and Qwen-Image, 5 for Chroma and Z-Image, 4 for FLUX.2-klein" in text
    assert "euler for SD3, Flux, Chroma, Qwen-Image, Z-Image and Flux.2" in text  # --solver


def test_size_resizes_the_photo_first(pipelines, tmp_path):
    """--size WxH: the photo resized with Lanczos, then edited; the PNG is of that size."""
    image = photo(tmp_path / "photo.png", width=21, height=13)
    run(edit(pipelines["sd"], image, tmp_path / "e.png", "--size", "12x8"))
    with Image.open(image) as im:
        resized = im.convert("RGB").resize((12, 8), Image.LANCZOS)
    expected = expected_edit(pipelines["sd"], resized)
    assert pixels(tmp_path / "e.png").shape == (8, 12, 3)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grey_and_opaque_images_are_read_as_rgb(mode, pipelines, tmp_path):
    image = photo(tmp_path / "photo.png", mode=mode)
    if mode == "RGBA":  # opaque: the alpha channel says nothing
        with Image.open(image) as im:
            rgba = np.asarray(im).copy()
        rgba[..., 3] = 255
        Image.fromarray(rgba, "RGBA").save(image)
    run(edit(pipelines["sd"], image, tmp_path / "e.png"))
    expected = expected_edit(pipelines["sd"], image)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))


def test_the_exif_orientation_is_applied(pipelines, tmp_path):
    """A phone's photo stored sideways with an EXIF orientation is edited upright, as every
    viewer shows it."""
    stored = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 16, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    stored.save(tmp_path / "photo.png", exif=exif.tobytes())
    run(edit(pipelines["sd"], tmp_path / "photo.png", tmp_path / "e.png"))
    assert pixels(tmp_path / "e.png").shape == (16, 8, 3)  # upright: 8 wide, 16 high


def test_bdias_instability_is_one_warning_in_the_commands_words(pipelines, tmp_path):
    """The tiny random unet at 4 steps makes bdia's parasitic mode outgrow the state, while
    inverting and while reconstructing: one line that names the options to change, not the
    library's two, which advise Python calls."""
    image = photo(tmp_path / "photo.png")
    result = run(edit(pipelines["sd"], image, tmp_path / "e.png", "--no-progress"))
    warned = [line for line in result.stderr.splitlines() if line.startswith("Warning")]
    assert len(warned) == 1 and "parasitic" in warned[0], result.stderr
    assert "--steps" in warned[0] and "--gamma" in warned[0]
    assert "bdia.Inversion" not in result.stderr


def test_overwrite_replaces_an_existing_output(pipelines, tmp_path):
    image = photo(tmp_path / "photo.png")
    out = tmp_path / "e.png"
    out.write_text("the user's file")
    run(edit(pipelines["sd"], image, out, "--overwrite"))
    assert pixels(out).shape == (16, 16, 3)


def test_progress_is_one_line_without_a_terminal(pipelines, tmp_path):
    image = photo(tmp_path / "photo.png")
    result = run(edit(pipelines["sd"], image, tmp_path / "e.png"))
    assert any(line.startswith("edit: 1/1 img in ") for line in result.stderr.splitlines())
    quiet = run(edit(pipelines["sd"], image, tmp_path / "q.png", "--no-progress"))
    assert not any(line.startswith("edit:") for line in quiet.stderr.splitlines())


def test_the_pipeline_is_loaded_offline_without_unused_parts(pipelines, tmp_path, monkeypatch):
    """from_pretrained(local_files_only=True, torch_dtype=--dtype); the safety checker and
    feature extractor of a Stable Diffusion folder are not loaded (edit_image never runs
    them), and parts saved as absent (SD3 without T5) are passed as None."""
    calls = []
    original = diffusers.DiffusionPipeline.from_pretrained

    def spy(folder, **kwargs):
        calls.append(kwargs)
        return original(folder, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", spy)
    image = photo(tmp_path / "photo.png")
    run(edit(pipelines["sd"], image, tmp_path / "a.png", "--dtype", "bfloat16"))
    run(edit(pipelines["sd3"], image, tmp_path / "b.png"))
    sd, sd3 = calls
    assert sd["local_files_only"] and sd["torch_dtype"] == torch.bfloat16
    assert sd["safety_checker"] is None and sd["feature_extractor"] is None
    assert sd3["text_encoder_3"] is None and sd3["tokenizer_3"] is None
    assert sd3["torch_dtype"] == torch.float32


# ------------------------------------------------------------------ masks and control images


def conditioning(name, tmp_path, swapped=False):
    """The command's --mask and --control-image options for the pipeline ``name`` and
    edit_image's mask_image and control_image from the same files; ``swapped``: another mask
    (moved), or the control images in the other order (two controlnets) or another one."""
    options, given = [], {}
    masked = ("controlnet-inpaint", "sd3-controlnet-inpaint", "zimage-controlnet-inpaint")
    if name in ("inpaint", "fill", *masked):
        mask = mask_file(tmp_path / "mask.png", left=6 if swapped else 2)
        options, given = ["--mask", mask], {"mask_image": read(mask, "L")}
    if name in ("inpaint", "fill"):
        return options, given
    controls = [photo(tmp_path / f"control{i}.png", seed=10 + i) for i in range(2)]
    if swapped:
        controls.reverse()
    if name != "controlnets":
        options += ["--control-image", controls[0]]
        return options, {**given, "control_image": read(controls[0], "RGB")}
    options = [a for c in controls for a in ("--control-image", c)]
    return options, {"control_image": [read(c, "RGB") for c in controls]}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name",
    [
        "inpaint",
        "fill",
        "controlnet",
        "controlnets",
        "controlnet-img2img",
        "controlnet-inpaint",
        "flux-control",
        "flux-controlnet",
        "sd3-controlnet",
        "sd3-controlnet-inpaint",
        pytest.param("qwen-controlnet", marks=NO_QWEN_CONTROLNET),
        pytest.param("zimage-controlnet", marks=NO_Z_IMAGE_CONTROLNET),
        pytest.param("zimage-controlnet-inpaint", marks=NO_Z_IMAGE_CONTROLNET),
    ],
)
def test_the_mask_and_the_control_images_reach_edit_image(name, pipelines, tmp_path):
    """--mask for an inpainting or Fill pipeline, --control-image once per controlnet (in
    their order), for a ControlNet img2img pipeline, Flux's Depth/Canny transformer and
    Flux's and SD3's ControlNets too, and both for a ControlNet inpainting one: the PNG is
    edit_image's for the same photo and files, pixel for pixel, and the round trip under
    them is exact (the tiny pipelines' is bitwise). Another mask, or the control
    images in the other order, edit otherwise: the files are not ignored."""
    image = photo(tmp_path / "photo.png")
    options, given = conditioning(name, tmp_path)
    result = run(edit(pipelines[name], image, tmp_path / "e.png", *options))
    expected = expected_edit(pipelines[name], image, **given)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))
    assert "latent error 0.000e+00" in result.stdout
    (tmp_path / "other").mkdir()
    _, other = conditioning(name, tmp_path / "other", swapped=True)
    moved = expected_edit(pipelines[name], image, **other)
    assert not np.array_equal(pixels(tmp_path / "e.png"), np.asarray(moved.images[0]))


def test_the_mask_help_names_the_pipelines_that_take_one():
    """--mask's help names the pipelines edit_image takes a mask for, as its docstring does:
    the four inpainting pipelines of SD and SDXL with a 9-channel unet, Flux Fill, and SD3's,
    Qwen-Image's and Z-Image's ControlNet inpainting pipelines."""
    text = " ".join(CliRunner().invoke(main, ["edit", "--help"]).output.split())
    mask = text[text.index("--mask FILE") : text.index("--control-image FILE")]
    for name in (
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionControlNetInpaintPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
        "FluxFillPipeline",
        "StableDiffusion3ControlNetInpaintingPipeline",
        "QwenImageControlNetInpaintPipeline",
        "ZImageControlNetInpaintPipeline",
    ):
        assert name in mask, name
    assert "in_channels 9" in mask and "a 4-channel unet in them is refused" in mask


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", ["inpaint", "controlnet"])
def test_size_resizes_the_mask_and_the_control_image_with_the_photo(name, pipelines, tmp_path):
    """--size WxH resizes the photo and its mask or control image alike (Lanczos; the mask
    read as grey): the PNG is edit_image's for the three resized so."""
    image = photo(tmp_path / "photo.png", width=21, height=13)
    if name == "inpaint":
        mask = mask_file(tmp_path / "mask.png", width=21, height=13)
        options, key, path, mode = ["--mask", mask], "mask_image", mask, "L"
    else:
        control = photo(tmp_path / "control.png", width=21, height=13, seed=10)
        options, key, path, mode = ["--control-image", control], "control_image", control, "RGB"
    run(edit(pipelines[name], image, tmp_path / "e.png", "--size", "12x8", *options))
    resized = {
        key: read(path, mode).resize((12, 8), Image.LANCZOS),
        "image": read(image, "RGB").resize((12, 8), Image.LANCZOS),
    }
    expected = expected_edit(pipelines[name], **resized)
    assert pixels(tmp_path / "e.png").shape == (8, 12, 3)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected.images[0]))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,option,words",
    [
        # edit_image's own refusals, naming the pipeline that takes no mask or control image.
        ("sd", "--mask", ["--mask was given", "StableDiffusionPipeline's unet", "in_channels = 4"]),
        ("flux", "--mask", ["--mask was given", "FluxPipeline's transformer", "packed latents"]),
        ("controlnet", "--mask", ["--mask was given", "StableDiffusionControlNetPipeline's"]),
        pytest.param(
            "chroma",
            "--mask",
            ["--mask was given", "ChromaPipeline's transformer", "packed latents"],
            marks=NO_CHROMA,
        ),
        pytest.param(
            "chroma",
            "--control-image",
            ["--control-image was given", "ChromaPipeline has no controlnet"],
            marks=NO_CHROMA,
        ),
        (
            "sd",
            "--control-image",
            ["--control-image was given", "StableDiffusionPipeline has no controlnet"],
        ),
        (
            "inpaint",
            "--control-image",
            ["--control-image was given", "StableDiffusionInpaintPipeline has no controlnet"],
        ),
    ],
)
def test_a_mask_or_control_image_the_pipeline_takes_not_is_refused(
    name, option, words, pipelines, tmp_path
):
    image = photo(tmp_path / "p.png")
    given = mask_file(tmp_path / "m.png") if option == "--mask" else photo(tmp_path / "c.png")
    more = [option, given]
    if name == "controlnet":
        more += ["--control-image", photo(tmp_path / "c.png")]
    if name == "inpaint":
        more += ["--mask", mask_file(tmp_path / "m.png")]
    args = edit(pipelines[name], image, tmp_path / "e.png", *more)
    fails_in_one_line(args, tmp_path, *words, status=2)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,given,words",
    [
        (
            "inpaint",
            [],
            [
                "StableDiffusionInpaintPipeline's unet is an inpainting one",
                "give --mask",
                "StableDiffusionInpaintPipeline's mask_image",
            ],
        ),
        (
            "fill",
            [],
            [
                "FluxFillPipeline's transformer is a Fill one",
                "give --mask",
                "FluxFillPipeline's mask_image",
            ],
        ),
        (
            "controlnet",
            [],
            [
                "has a controlnet (ControlNetModel)",
                "give --control-image",
                "StableDiffusionControlNetPipeline's image=",
            ],
        ),
        # The img2img and inpainting pipelines take the control image as control_image=.
        (
            "controlnet-img2img",
            [],
            [
                "StableDiffusionControlNetImg2ImgPipeline has a controlnet",
                "give --control-image",
                "StableDiffusionControlNetImg2ImgPipeline's control_image=",
            ],
        ),
        (
            "controlnet-inpaint",
            ["--mask"],
            [
                "StableDiffusionControlNetInpaintPipeline has a controlnet",
                "give --control-image",
                "StableDiffusionControlNetInpaintPipeline's control_image=",
            ],
        ),
        (
            "controlnet-inpaint",
            ["--control-image"],
            [
                "StableDiffusionControlNetInpaintPipeline's unet is an inpainting one",
                "give --mask",
                "StableDiffusionControlNetInpaintPipeline's mask_image",
            ],
        ),
        # SD3's: its controlnet takes the mask, and the control image is the image kept.
        (
            "sd3-controlnet-inpaint",
            ["--mask"],
            ["StableDiffusion3ControlNetInpaintingPipeline has a controlnet", "--control-image"],
        ),
        (
            "sd3-controlnet-inpaint",
            ["--control-image"],
            [
                "StableDiffusion3ControlNetInpaintingPipeline's controlnet takes a mask",
                "give --mask",
                "StableDiffusion3ControlNetInpaintingPipeline's control_mask",
            ],
        ),
        pytest.param(
            "qwen-controlnet",
            [],
            ["QwenImageControlNetPipeline has a controlnet", "give --control-image"],
            marks=NO_QWEN_CONTROLNET,
        ),
    ],
)
def test_a_pipeline_without_its_mask_or_control_image_is_refused(
    name, given, words, pipelines, tmp_path
):
    """edit_image's refusal in the command's words: no argument names but the pipeline's
    own (as its mask_image or control_image=), no Python list."""
    more = {"--mask": mask_file(tmp_path / "m.png"), "--control-image": photo(tmp_path / "c.png")}
    options = [a for option in given for a in (option, more[option])]
    args = edit(pipelines[name], photo(tmp_path / "p.png"), tmp_path / "e.png", *options)
    line = fails_in_one_line(args, tmp_path, *words, status=2)
    assert "give mask_image" not in line and "give control_image" not in line
    assert "--control-image=" not in line and "a list" not in line


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,count,words",
    [
        ("controlnet", 2, ["given 2 times", "has one controlnet", "give it once"]),
        ("controlnets", 1, ["given 1 time", "2 controlnets (MultiControlNetModel)", "2 times"]),
        ("controlnets", 3, ["given 3 times", "2 controlnets", "one per controlnet"]),
    ],
)
def test_control_images_not_one_per_controlnet_are_refused(name, count, words, pipelines, tmp_path):
    more = [a for i in range(count) for a in ("--control-image", photo(tmp_path / f"c{i}.png"))]
    args = edit(pipelines[name], photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    fails_in_one_line(args, tmp_path, "'--control-image'", *words, status=2)


def no_pipeline_loads(monkeypatch):
    """A pipeline load fails the test: what is refused before it is refused in seconds."""

    def load(*args, **kwargs):
        pytest.fail("the pipeline was loaded before the files were checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", load)


def flawed(kind, path):
    """A file at ``path`` that is no image, a transparent one, a 16-bit one, or of 16 x 12
    pixels beside the 16 x 16 photo."""
    if kind == "text":
        path.write_text("not an image")
    elif kind == "transparent":
        photo(path, mode="RGBA")
    elif kind == "16-bit":
        Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(path)
    else:
        mask_file(path, height=12)
    return path


@pytest.mark.parametrize("option", ["--mask", "--control-image"])
@pytest.mark.parametrize(
    "kind,words",
    [
        ("text", ["not a readable image"]),
        ("transparent", ["transparent pixels", "flatten"]),
        ("16-bit", ["16-bit or float"]),
        ("size", ["is 16x12, but --image", "is 16x16", "of the photo's own size"]),
    ],
)
def test_a_mask_or_control_image_file_is_checked_before_the_pipeline_loads(
    option, kind, words, pipelines, tmp_path, monkeypatch
):
    name = "inpaint" if option == "--mask" else "controlnet"
    no_pipeline_loads(monkeypatch)
    given = flawed(kind, tmp_path / "given.png")
    args = edit(pipelines[name], photo(tmp_path / "p.png"), tmp_path / "e.png", option, given)
    fails_in_one_line(args, tmp_path, f"'{option}'", *words, status=2)


def test_the_mask_must_have_the_photos_size_even_with_size(pipelines, tmp_path, monkeypatch):
    """A mask of the --size size beside a photo of another size is refused: --size resizes
    the photo and the mask alike, so the two must match before it."""
    no_pipeline_loads(monkeypatch)
    image = photo(tmp_path / "p.png", width=21, height=13)
    more = ["--mask", mask_file(tmp_path / "m.png", width=12, height=8), "--size", "12x8"]
    args = edit(pipelines["inpaint"], image, tmp_path / "e.png", *more)
    fails_in_one_line(args, tmp_path, "'--mask'", "is 12x8, but --image", "is 21x13", status=2)


@pytest.mark.parametrize(
    "more,words",
    [
        (["--mask", "missing.png"], ["'--mask'", "does not exist"]),
        (["--control-image", "missing.png"], ["'--control-image'", "does not exist"]),
        (["--mask", ""], ["'--mask'", "the path is empty"]),
        (["--mask", "m.png", "--out", "m.png"], ["'--out'", "is --mask"]),
        (["--control-image", "m.png", "--out", "m.png"], ["'--out'", "is --control-image"]),
    ],
)
def test_a_wrong_mask_or_control_image_option_is_one_line(
    more, words, pipelines, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    no_pipeline_loads(monkeypatch)
    photo(tmp_path / "p.png")
    mask = mask_file(tmp_path / "m.png").read_bytes()
    args = edit(pipelines["inpaint"], "p.png", "e.png", *more)
    fails_in_one_line(args, tmp_path, *words, status=2)
    assert (tmp_path / "m.png").read_bytes() == mask


# ------------------------------------------------------------------ IP-Adapter image prompts


def write_ip_adapter(state, path):
    """``state`` (the dicts image_proj and ip_adapter) written at ``path``: torch.save's dict
    of the two dicts for a .bin, else safetensors with keys image_proj.NAME and
    ip_adapter.NAME. Returns ``path``."""
    from safetensors.torch import save_file

    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({f"{p}.{k}": v.contiguous() for p in state for k, v in state[p].items()}, path)
    return path


def save_ip_adapter(pipe_folder, folder, *, plus=False, seed=5, suffix=".safetensors", keep=None):
    """A random IP-Adapter (Plus with ``plus``) for the unet saved in ``pipe_folder``, in
    h94/IP-Adapter's layout: ``folder/ip-adapter.safetensors`` (keys image_proj.NAME and
    ip_adapter.NAME; with ``suffix=".bin"`` torch.save's dict of the two dicts) beside
    ``folder/image_encoder``, the tiny CLIPVisionModelWithProjection (image embeddings and
    hidden states of width 8) saved with save_pretrained. ``keep``: how many of the key and
    value maps to write (all by default). Returns the weight file."""

    from bdia.integrations.diffusers.tiny import _ip_adapter_state_dict, _tiny_image_encoder

    unet = diffusers.UNet2DConditionModel.from_pretrained(pipe_folder / "unet")
    encoder, _ = _tiny_image_encoder(seed=4)
    state = _ip_adapter_state_dict(unet, 8, seed=seed, plus=plus)
    state["ip_adapter"] = dict(list(state["ip_adapter"].items())[:keep])
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(folder / "image_encoder")
    return write_ip_adapter(state, folder / f"ip-adapter{suffix}")


@pytest.fixture(scope="module")
def adapters(pipelines, tmp_path_factory):
    """IP-Adapter files of ``save_ip_adapter``: a plain one for the tiny SD and SDXL unets
    (.safetensors, and SD's as .bin too) and an IP-Adapter Plus for SD's."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sd": save_ip_adapter(pipelines["sd"], root / "sd"),
        "sdxl": save_ip_adapter(pipelines["sdxl"], root / "sdxl"),
        "sd-bin": save_ip_adapter(pipelines["sd"], root / "sd-bin", suffix=".bin"),
        "sd-plus": save_ip_adapter(pipelines["sd"], root / "sd-plus", plus=True),
    }


def with_ip_adapter(folder, adapter, scale=None):
    """The pipeline saved in ``folder`` with the adapter file ``adapter`` loaded as a
    diffusers user loads it: ``load_ip_adapter(its folder, subfolder="", weight_name=its
    name)``, which finds the image encoder in the image_encoder folder beside it."""
    pipe = loaded(folder)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    return pipe


def ip_edit(pipe, image, prompt, **options):
    """edit_image's edit of the photo at ``image`` through ``pipe`` with the image prompt at
    ``prompt``, both read as the command reads them, and edit_image's ``options``."""
    return edit_image(
        pipe,
        read(image, "RGB"),
        SOURCE,
        TARGET,
        num_inference_steps=STEPS,
        ip_adapter_image=read(prompt, "RGB"),
        **options,
    ).images[0]


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,kind", [("sd", "sd"), ("sdxl", "sdxl"), ("sd", "sd-bin"), ("sd", "sd-plus")]
)
def test_the_image_prompt_reaches_edit_image(name, kind, pipelines, adapters, tmp_path):
    """--ip-adapter FILE (its image encoder beside it) with --ip-adapter-image: the PNG is
    edit_image's through the pipeline with the same adapter loaded by load_ip_adapter and
    the same image prompt, pixel for pixel, for SD and SDXL, a .bin file and an IP-Adapter
    Plus; the round trip under it is exact (the tiny pipelines' is bitwise). Another image
    prompt edits otherwise: it is not ignored."""
    image = photo(tmp_path / "photo.png")
    prompt, other = photo(tmp_path / "prompt.png", seed=20), photo(tmp_path / "o.png", seed=21)
    more = ["--ip-adapter", adapters[kind], "--ip-adapter-image", prompt]
    result = run(edit(pipelines[name], image, tmp_path / "e.png", *more))
    pipe = with_ip_adapter(pipelines[name], adapters[kind])
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(ip_edit(pipe, image, prompt)))
    assert "latent error 0.000e+00" in result.stdout
    assert f"IP-Adapter {adapters[kind].name} at scale 1" in result.stdout
    assert not np.array_equal(pixels(tmp_path / "e.png"), np.asarray(ip_edit(pipe, image, other)))
    plain = expected_edit(pipelines[name], image).images[0]
    assert not np.array_equal(pixels(tmp_path / "e.png"), np.asarray(plain))


def test_the_ip_adapter_scale_is_applied(pipelines, adapters, tmp_path):
    """--ip-adapter-scale 0.5 is set_ip_adapter_scale(0.5): edit_image's edit at that
    scale, pixel for pixel, and another than at the default 1; 0 turns the image prompt
    off."""
    image, prompt = photo(tmp_path / "photo.png"), photo(tmp_path / "prompt.png", seed=20)
    more = ["--ip-adapter", adapters["sd"], "--ip-adapter-image", prompt]
    result = run(
        edit(pipelines["sd"], image, tmp_path / "e.png", *more, "--ip-adapter-scale", "0.5")
    )
    run(edit(pipelines["sd"], image, tmp_path / "one.png", *more))
    pipe = with_ip_adapter(pipelines["sd"], adapters["sd"], scale=0.5)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(ip_edit(pipe, image, prompt)))
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "one.png"))
    assert "IP-Adapter ip-adapter.safetensors at scale 0.5" in result.stdout
    # At 0 the adapters' attention adds zeros: the edit without an adapter, pixel for pixel.
    run(edit(pipelines["sd"], image, tmp_path / "off.png", *more, "--ip-adapter-scale", "0"))
    plain = expected_edit(pipelines["sd"], image).images[0]
    assert np.array_equal(pixels(tmp_path / "off.png"), np.asarray(plain))


def test_the_image_encoder_can_be_given_elsewhere(pipelines, adapters, tmp_path):
    """--image-encoder FOLDER: the adapter file alone in its folder, the encoder elsewhere;
    the PNG is the same as with the encoder beside the adapter."""
    image, prompt = photo(tmp_path / "photo.png"), photo(tmp_path / "prompt.png", seed=20)
    (tmp_path / "weights").mkdir()
    alone = shutil.copy(adapters["sd"], tmp_path / "weights" / "sd15-adapter.safetensors")
    encoder = shutil.copytree(adapters["sd"].parent / "image_encoder", tmp_path / "clip")
    more = ["--ip-adapter", alone, "--image-encoder", encoder, "--ip-adapter-image", prompt]
    run(edit(pipelines["sd"], image, tmp_path / "e.png", *more))
    pipe = with_ip_adapter(pipelines["sd"], adapters["sd"])
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(ip_edit(pipe, image, prompt)))


def test_the_pipelines_own_image_encoder_is_used(pipelines, adapters, tmp_path):
    """A pipeline folder with an image_encoder of its own: the adapter file alone loads with
    it, as diffusers loads it, and the PNG is the same as with the encoder beside the
    adapter."""
    folder = shutil.copytree(pipelines["sd"], tmp_path / "sd")
    shutil.copytree(adapters["sd"].parent / "image_encoder", folder / "image_encoder")
    index = json.loads((folder / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "weights").mkdir()
    alone = shutil.copy(adapters["sd"], tmp_path / "weights" / "ip-adapter.safetensors")
    image, prompt = photo(tmp_path / "photo.png"), photo(tmp_path / "prompt.png", seed=20)
    run(
        edit(folder, image, tmp_path / "e.png", "--ip-adapter", alone, "--ip-adapter-image", prompt)
    )
    pipe = with_ip_adapter(pipelines["sd"], adapters["sd"])
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(ip_edit(pipe, image, prompt)))


def misfit_ip_adapter(kind, pipelines, adapters, tmp_path):
    """(--pipeline, the options) of an IP-Adapter mistake ``kind``."""
    prompt = photo(tmp_path / "prompt.png", seed=20)
    sd, adapter = pipelines["sd"], adapters["sd"]
    given = ["--ip-adapter", adapter, "--ip-adapter-image", prompt]
    if kind == "no adapter":
        return sd, ["--ip-adapter-image", prompt]
    if kind == "encoder without adapter":
        return sd, ["--image-encoder", adapter.parent / "image_encoder"]
    if kind == "scale without adapter":
        return sd, ["--ip-adapter-scale", "0.5"]
    if kind == "no image prompt":
        return sd, ["--ip-adapter", adapter]
    if kind == "suffix":
        return sd, ["--ip-adapter", shutil.copy(adapter, tmp_path / "ip.pt"), *given[2:]]
    if kind == "garbage":
        (tmp_path / "ip.safetensors").write_text("not weights")
        return sd, ["--ip-adapter", tmp_path / "ip.safetensors", *given[2:]]
    if kind == "not an adapter":
        (weights,) = (sd / "vae").glob("*.safetensors")
        return sd, ["--ip-adapter", weights, *given[2:]]
    if kind == "no encoder":
        (tmp_path / "w").mkdir()
        return sd, ["--ip-adapter", shutil.copy(adapter, tmp_path / "w"), *given[2:]]
    if kind == "encoder not clip":
        return sd, [*given, "--image-encoder", sd / "vae"]
    if kind == "encoder width":
        import transformers

        from bdia.integrations.diffusers.tiny import _tiny_image_encoder

        config = _tiny_image_encoder(seed=4)[0].config
        config.projection_dim = 6  # embeddings of width 6 where the adapter takes 8
        transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
        return sd, [*given, "--image-encoder", tmp_path / "clip"]
    if kind == "other unet":
        return pipelines["sdxl"], given
    assert kind == "prompt no image"
    (tmp_path / "prompt.png").write_text("not an image")
    return sd, given


@pytest.mark.parametrize(
    "kind,words",
    [
        ("no adapter", ["'--ip-adapter-image'", "give --ip-adapter too"]),
        ("encoder without adapter", ["'--image-encoder'", "give --ip-adapter too"]),
        ("scale without adapter", ["'--ip-adapter-scale'", "give --ip-adapter too"]),
        ("no image prompt", ["'--ip-adapter'", "give --ip-adapter-image"]),
        ("suffix", ["'--ip-adapter'", "ip.pt' is not an IP-Adapter's weight file", ".bin"]),
        ("garbage", ["'--ip-adapter'", "does not read"]),
        ("not an adapter", ["'--ip-adapter'", "holds no IP-Adapter weights"]),
        ("no encoder", ["'--image-encoder'", "needs an image encoder", "image_encoder folder"]),
        ("encoder not clip", ["'--image-encoder'", "'AutoencoderKL'", "not a CLIP vision model"]),
        ("encoder width", ["'--image-encoder'", "width 8 (the image encoder's projection_dim)"]),
        ("other unet", ["'--ip-adapter'", "cross_attention_dim 16", "sdxl' has 24"]),
        ("prompt no image", ["'--ip-adapter-image'", "not a readable image"]),
    ],
)
def test_an_ip_adapter_mistake_is_refused_before_the_pipeline_loads(
    kind, words, pipelines, adapters, tmp_path, monkeypatch
):
    """Each in one line with exit status 2 and nothing written, the files checked (and the
    adapter's shapes against the unet's and the encoder's configs) before the pipeline
    loads, which can take minutes."""
    folder, more = misfit_ip_adapter(kind, pipelines, adapters, tmp_path)
    no_pipeline_loads(monkeypatch)
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    fails_in_one_line(args, tmp_path, *words, status=2)


@pytest.mark.parametrize("scale", ["-1", "inf", "nan"])
def test_an_ip_adapter_scale_that_is_no_weight_is_refused(scale, pipelines, adapters, tmp_path):
    prompt = photo(tmp_path / "prompt.png", seed=20)
    more = ["--ip-adapter", adapters["sd"], "--ip-adapter-image", prompt]
    args = edit(pipelines["sd"], photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    fails_in_one_line(
        args + ["--ip-adapter-scale", scale], tmp_path, "'--ip-adapter-scale'", ">= 0", status=2
    )


def test_an_ip_adapter_that_does_not_load_into_the_unet_is_refused(pipelines, tmp_path):
    """An adapter whose key and value maps miss some of the unet's cross-attention layers
    passes the checks before the pipeline loads; load_ip_adapter's failure is one line
    naming --ip-adapter and the pipeline, exit status 2."""
    adapter = save_ip_adapter(pipelines["sd"], tmp_path / "short", keep=2)
    more = ["--ip-adapter", adapter, "--ip-adapter-image", photo(tmp_path / "prompt.png")]
    args = edit(pipelines["sd"], photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    fails_in_one_line(
        args, tmp_path, "'--ip-adapter'", "does not load into the StableDiffusionPipeline", status=2
    )


def test_the_image_prompt_is_never_the_output(pipelines, adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_pipeline_loads(monkeypatch)
    photo(tmp_path / "p.png")
    prompt = photo(tmp_path / "prompt.png", seed=20).read_bytes()
    more = ["--ip-adapter", adapters["sd"], "--ip-adapter-image", "prompt.png"]
    args = edit(pipelines["sd"], "p.png", "prompt.png", *more)
    fails_in_one_line(args, tmp_path, "'--out'", "is --ip-adapter-image", status=2)
    assert (tmp_path / "prompt.png").read_bytes() == prompt


# ----------------------------------------------- Flux's and SD3's IP-Adapters (a transformer)


def save_transformer_ip_adapter(
    family, pipe_folder, folder, *, xlabs=True, suffix=".safetensors", **config
):
    """A random IP-Adapter of ``family`` ("flux" or "sd3") for the transformer saved in
    ``pipe_folder`` (with ``config``, for one of that config instead), beside
    ``folder/image_encoder``, the family's tiny encoder saved with save_pretrained. Flux's:
    ``folder/ip_adapter.safetensors`` in XLabs' layout (keys ip_adapter_proj_model.NAME and
    double_blocks.N.processor.ip_adapter_double_stream_k_proj.NAME, ..._v_proj.NAME), with
    ``xlabs=False`` in diffusers' (image_proj.NAME, ip_adapter.N.to_k_ip.NAME), and the
    CLIPVisionModelWithProjection (image embeddings of width 8). SD3's:
    ``folder/ip-adapter.safetensors`` (keys image_proj.NAME and ip_adapter.NAME), and the
    SiglipVisionModel (hidden states of width 8) with its SiglipImageProcessor. With
    ``suffix=".bin"`` either is torch.save's dict of the two dicts (as
    InstantX/SD3.5-Large-IP-Adapter's ip-adapter.bin). Returns the weight file."""
    from safetensors.torch import save_file

    from bdia.integrations.diffusers import tiny

    flux = family == "flux"
    model = diffusers.FluxTransformer2DModel if flux else diffusers.SD3Transformer2DModel
    transformer = model.from_pretrained(pipe_folder / "transformer")
    if config:
        transformer = (tiny.tiny_flux_transformer if flux else tiny.tiny_sd3_transformer)(**config)
    weights = tiny._flux_ip_adapter_state_dict if flux else tiny._sd3_ip_adapter_state_dict
    state = weights(transformer, 8, seed=7)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = tiny._tiny_image_encoder(seed=4)[:1] if flux else tiny._tiny_siglip_encoder(seed=4)
    for part in encoder:
        part.save_pretrained(folder / "image_encoder")
    path = folder / f"{'ip_adapter' if flux else 'ip-adapter'}{suffix}"
    if not (flux and xlabs) or suffix == ".bin":  # XLabs' files are safetensors
        return write_ip_adapter(state, path)
    flat = {f"ip_adapter_proj_model.{k}": v for k, v in state["image_proj"].items()}
    for key, value in state["ip_adapter"].items():
        block, name, kind = key.split(".")  # 0, to_k_ip, weight
        xlabs_name = f"processor.ip_adapter_double_stream_{name[3]}_proj.{kind}"
        flat[f"double_blocks.{block}.{xlabs_name}"] = value
    save_file(flat, path)
    return path


@pytest.fixture(scope="module")
def transformer_adapters(pipelines, tmp_path_factory):
    """IP-Adapter files for the tiny Flux transformer (XLabs' safetensors, diffusers'
    safetensors and .bin), the tiny SD3 one (safetensors, .bin) and the SD3 ControlNet
    pipeline's (two joint blocks), their encoders beside."""
    root = tmp_path_factory.mktemp("transformer-adapters")
    flux, sd3 = pipelines["flux"], pipelines["sd3"]
    return {
        "sd3-controlnet": save_transformer_ip_adapter(
            "sd3", pipelines["sd3-controlnet"], root / "sd3-cn"
        ),
        "flux": save_transformer_ip_adapter("flux", flux, root / "flux"),
        "flux-diffusers": save_transformer_ip_adapter(
            "flux", flux, root / "flux-diffusers", xlabs=False
        ),
        "flux-bin": save_transformer_ip_adapter("flux", flux, root / "flux-bin", suffix=".bin"),
        "sd3": save_transformer_ip_adapter("sd3", sd3, root / "sd3"),
        "sd3-bin": save_transformer_ip_adapter("sd3", sd3, root / "sd3-bin", suffix=".bin"),
    }


def with_transformer_ip_adapter(folder, adapter, scale=1.0):
    """The Flux (or Chroma) or SD3 pipeline saved in ``folder`` with the adapter file
    ``adapter`` loaded as a diffusers user loads it from local files, its image encoder the
    folder beside it: Flux's (Chroma's) ``load_ip_adapter(its folder, weight_name=its name,
    image_encoder_pretrained_model_name_or_path=the encoder's folder,
    image_encoder_dtype=float32)``, SD3's ``load_ip_adapter(its folder, weight_name=its name,
    image_encoder_folder=the encoder's folder)``; then ``set_ip_adapter_scale(scale)`` (SD3's
    loader leaves 0.5, the command sets 1 by default)."""
    pipe, encoder = loaded(folder), str(adapter.parent / "image_encoder")
    if isinstance(pipe.transformer, diffusers.SD3Transformer2DModel):
        pipe.load_ip_adapter(
            str(adapter.parent), weight_name=adapter.name, image_encoder_folder=encoder
        )
    else:
        pipe.load_ip_adapter(
            str(adapter.parent),
            weight_name=adapter.name,
            image_encoder_pretrained_model_name_or_path=encoder,
            image_encoder_dtype=torch.float32,
        )
    pipe.set_ip_adapter_scale(scale)
    return pipe


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,kind",
    [
        ("flux", "flux"),
        ("flux", "flux-diffusers"),
        ("flux", "flux-bin"),
        ("sd3", "sd3"),
        ("sd3", "sd3-bin"),
        pytest.param("kontext", "flux", marks=NO_KONTEXT),
        # Chroma's transformer loads Flux's adapters (the tiny one has Flux's block sizes).
        pytest.param("chroma", "flux", marks=NO_CHROMA),
        ("flux-controlnet", "flux"),
        ("sd3-controlnet", "sd3-controlnet"),
        ("sd3-controlnet-inpaint", "sd3-controlnet"),
    ],
)
def test_flux_and_sd3_image_prompts_reach_edit_image(
    name, kind, pipelines, transformer_adapters, tmp_path
):
    """--ip-adapter FILE for a Flux or SD3 pipeline (its image encoder beside it): the PNG is
    edit_image's through the pipeline with the same adapter loaded as a diffusers user loads
    it and the same image prompt, pixel for pixel, for XLabs' and diffusers' Flux files and
    SD3's, and for FluxKontextPipeline, ChromaPipeline (a Flux file; under its default true
    CFG 5) and Flux's and SD3's ControlNet pipelines (with
    --control-image; SD3's ControlNet inpainting one with --mask too); another image
    prompt edits otherwise, and so does none."""
    adapter = transformer_adapters[kind]
    image = photo(tmp_path / "photo.png")
    prompt, other = photo(tmp_path / "prompt.png", seed=20), photo(tmp_path / "o.png", seed=21)
    options, given = conditioning(name, tmp_path) if "controlnet" in name else ([], {})
    more = ["--ip-adapter", adapter, "--ip-adapter-image", prompt, *options]
    result = run(edit(pipelines[name], image, tmp_path / "e.png", *more))
    pipe = with_transformer_ip_adapter(pipelines[name], adapter)
    ours = pixels(tmp_path / "e.png")
    assert np.array_equal(ours, np.asarray(ip_edit(pipe, image, prompt, **given)))
    assert f"IP-Adapter {adapter.name} at scale 1" in result.stdout
    assert not np.array_equal(ours, np.asarray(ip_edit(pipe, image, other, **given)))
    plain = expected_edit(pipelines[name], image, **given).images[0]
    assert not np.array_equal(pixels(tmp_path / "e.png"), np.asarray(plain))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_a_transformers_ip_adapter_scale_is_applied(
    name, pipelines, transformer_adapters, tmp_path
):
    """--ip-adapter-scale 0.5 on Flux or SD3 is set_ip_adapter_scale(0.5): edit_image's
    edit at that scale, pixel for pixel, and another than at the default 1."""
    adapter = transformer_adapters[name]
    image, prompt = photo(tmp_path / "photo.png"), photo(tmp_path / "prompt.png", seed=20)
    more = ["--ip-adapter", adapter, "--ip-adapter-image", prompt]
    run(edit(pipelines[name], image, tmp_path / "e.png", *more, "--ip-adapter-scale", "0.5"))
    run(edit(pipelines[name], image, tmp_path / "one.png", *more))
    pipe = with_transformer_ip_adapter(pipelines[name], adapter, scale=0.5)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(ip_edit(pipe, image, prompt)))
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "one.png"))


def save_whole_encoder(family, folder):
    """The tiny image encoder of ``family`` ("sd", "flux": the CLIPVisionModelWithProjection;
    "sd3": the SiglipVisionModel and its SiglipImageProcessor; seed 4) as a whole model's
    folder, as openai/clip-vit-large-patch14 and google/siglip-so400m-patch14-384 are: a
    CLIPModel or SiglipModel with a one-layer text model of width 8 beside the vision model,
    whose weights (the projection too, for CLIP) are the vision-only encoder's. Returns the
    folder."""
    import transformers

    from bdia.integrations.diffusers.tiny import _tiny_image_encoder, _tiny_siglip_encoder

    siglip = family == "sd3"
    vision, processor = (_tiny_siglip_encoder if siglip else _tiny_image_encoder)(seed=4)
    text = dict(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    if siglip:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision.config.to_dict())
        whole = transformers.SiglipModel(config)
    else:
        config = transformers.CLIPConfig(
            text_config=text, vision_config=vision.config.to_dict(), projection_dim=8
        )
        whole = transformers.CLIPModel(config)
    # The whole model names the vision weights as the vision-only one does (CLIP's vision_model
    # and visual_projection; SigLIP's vision_model before transformers 5), or one level down
    # (transformers 5's SiglipModel holds a whole SiglipVisionModel as its vision_model).
    own = whole.state_dict()
    placed = {}
    for key, value in vision.state_dict().items():
        names = [name for name in (key, f"vision_model.{key}") if name in own]
        assert len(names) == 1, key  # every vision weight has one place in the whole model
        placed[names[0]] = value
    taken = whole.load_state_dict(placed, strict=False)
    assert not taken.unexpected_keys
    whole.save_pretrained(folder)
    if siglip:
        processor.save_pretrained(folder)
    return folder


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", ["sd", "flux", "sd3"])
def test_a_whole_clip_or_siglip_model_is_taken_as_the_image_encoder(
    name, pipelines, adapters, transformer_adapters, tmp_path
):
    """--image-encoder DIR of a whole CLIPModel (SD, Flux) or SiglipModel (SD3, with its
    processor), as the released encoders are: read for its vision model, the PNG is the one
    with the vision-only encoder of the same weights (the adapter file alone in its folder,
    so that no other encoder is at hand), to one level of a pixel: the two encoders' weights
    are equal bit for bit but read from other files, and their image embeddings came out up to
    1.2e-7 apart on the CPU (measured, SD's), which can round a pixel to the next level. Any
    other encoder (the text half, other weights) moves the picture far more."""
    given = adapters["sd"] if name == "sd" else transformer_adapters[name]
    (tmp_path / "weights").mkdir()
    adapter = shutil.copy(given, tmp_path / "weights" / given.name)
    image, prompt = photo(tmp_path / "photo.png"), photo(tmp_path / "prompt.png", seed=20)
    whole = save_whole_encoder(name, tmp_path / "whole")
    more = ["--ip-adapter", adapter, "--ip-adapter-image", prompt, "--image-encoder"]
    for out, encoder in (("whole.png", whole), ("vision.png", given.parent / "image_encoder")):
        run(edit(pipelines[name], image, tmp_path / out, *more, encoder))
    whole_png, vision_png = (pixels(tmp_path / f).astype(int) for f in ("whole.png", "vision.png"))
    assert np.abs(whole_png - vision_png).max() <= 1
    assert (whole_png != vision_png).mean() < 0.05
    config = json.loads((whole / "config.json").read_text())
    assert config["model_type"] == ("siglip" if name == "sd3" else "clip")


def misfit_transformer_ip_adapter(kind, pipelines, adapters, transformer_adapters, tmp_path):
    """(--pipeline, the options) of a Flux or SD3 IP-Adapter mistake ``kind``."""
    import transformers

    from bdia.integrations.diffusers.tiny import _tiny_image_encoder, _tiny_siglip_encoder

    prompt = photo(tmp_path / "prompt.png", seed=20)
    flux, sd3 = transformer_adapters["flux"], transformer_adapters["sd3"]
    pipeline, adapter = kind.split(" ")[0], {"sd": adapters["sd"], "flux": flux, "sd3": sd3}
    adapter["flux-diffusers"] = transformer_adapters["flux-diffusers"]
    given = ["--ip-adapter-image", prompt]
    if " adapter on " in kind:  # "A adapter on B"
        return pipelines[kind.split(" ")[-1]], ["--ip-adapter", adapter[pipeline], *given]
    given = ["--ip-adapter", adapter[pipeline], *given]
    if kind == "flux encoder siglip":
        return pipelines["flux"], [*given, "--image-encoder", sd3.parent / "image_encoder"]
    if kind == "sd3 encoder clip":
        return pipelines["sd3"], [*given, "--image-encoder", flux.parent / "image_encoder"]
    if kind == "sd3 encoder without processor":
        _tiny_siglip_encoder(seed=4)[0].save_pretrained(tmp_path / "siglip")
        return pipelines["sd3"], [*given, "--image-encoder", tmp_path / "siglip"]
    if kind == "flux encoder width":
        config = _tiny_image_encoder(seed=4)[0].config
        config.projection_dim = 6  # embeddings of width 6 where the adapter takes 8
        transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
        return pipelines["flux"], [*given, "--image-encoder", tmp_path / "clip"]
    if kind == "sd3 encoder width":
        encoder, processor = _tiny_siglip_encoder(seed=4)
        encoder.config.hidden_size = 6  # hidden states of width 6 where the adapter takes 8
        transformers.SiglipVisionModel(encoder.config).save_pretrained(tmp_path / "siglip")
        processor.save_pretrained(tmp_path / "siglip")
        return pipelines["sd3"], [*given, "--image-encoder", tmp_path / "siglip"]
    if kind == "flux other width":  # three heads of 8 where the pipeline's has two
        wide = save_transformer_ip_adapter(
            "flux", pipelines["flux"], tmp_path / "w", num_attention_heads=3
        )
        return pipelines["flux"], ["--ip-adapter", wide, *given[2:]]
    if kind == "flux bin order":
        state = torch.load(transformer_adapters["flux-bin"], weights_only=True)
        torch.save(
            {"ip_adapter": state["ip_adapter"], "image_proj": state["image_proj"]},
            tmp_path / "ip.bin",
        )
        return pipelines["flux"], ["--ip-adapter", tmp_path / "ip.bin", *given[2:]]
    assert kind == "sd3 other layers"
    deeper = save_transformer_ip_adapter("sd3", pipelines["sd3"], tmp_path / "d", num_layers=2)
    return pipelines["sd3"], ["--ip-adapter", deeper, *given[2:]]


# An adapter of another family is refused as one, saying which pipelines load it.
SD_ADAPTER = "is a Stable Diffusion or SDXL IP-Adapter"
SD3_ADAPTER = "is an SD3 IP-Adapter"
XLABS_ADAPTER = "is a Flux IP-Adapter (XLabs' keys ip_adapter_proj_model.* and double_blocks.*)"
FLUX_WANTED = "give this pipeline a Flux IP-Adapter (e.g. XLabs-AI/flux-ip-adapter's)"


@pytest.mark.parametrize(
    "kind,words",
    [
        (
            "sd adapter on flux",
            ["'--ip-adapter'", f"{SD_ADAPTER} (its key and value maps have no", FLUX_WANTED],
        ),
        (
            "sd3 adapter on flux",
            ["'--ip-adapter'", f"{SD3_ADAPTER} (its image projection is", FLUX_WANTED],
        ),
        (
            "sd adapter on sd3",
            ["'--ip-adapter'", SD_ADAPTER, "give this pipeline an SD3 IP-Adapter"],
        ),
        ("flux adapter on sd3", ["'--ip-adapter'", XLABS_ADAPTER, "this pipeline an SD3 IP"]),
        (
            "flux adapter on sd",
            ["'--ip-adapter'", XLABS_ADAPTER, "this pipeline a Stable Diffusion"],
        ),
        (
            "flux-diffusers adapter on sd",
            ["'--ip-adapter'", "a Flux IP-Adapter (its key and value maps have biases)"],
        ),
        ("sd3 adapter on sd", ["'--ip-adapter'", SD3_ADAPTER, "to an SD3 pipeline"]),
        ("flux adapter on fill", ["'--ip-adapter'", "FluxFillPipeline takes no IP-Adapter"]),
        # ChromaPipeline loads Flux's adapters, and is told so for another family's.
        pytest.param(
            "sd adapter on chroma",
            ["'--ip-adapter'", f"{SD_ADAPTER} (its key and value maps have no", FLUX_WANTED],
            marks=NO_CHROMA,
        ),
        ("flux encoder siglip", ["'--image-encoder'", "'siglip_vision_model'", "not a CLIP"]),
        ("sd3 encoder clip", ["'--image-encoder'", "not a SigLIP vision model"]),
        ("sd3 encoder without processor", ["'--image-encoder'", "no preprocessor_config.json"]),
        ("flux encoder width", ["'--image-encoder'", "width 8 (the image encoder's projection_"]),
        ("sd3 encoder width", ["'--image-encoder'", "width 8 (the image encoder's hidden_size)"]),
        ("flux other width", ["'--ip-adapter'", "width 16 to 24", "takes 16"]),
        ("flux bin order", ["'--ip-adapter'", "exactly the dicts image_proj and ip_adapter"]),
        ("sd3 other layers", ["'--ip-adapter'", "processors of 2 attention layers", "has 1"]),
    ],
)
def test_a_transformers_ip_adapter_mistake_is_refused_before_the_pipeline_loads(
    kind, words, pipelines, adapters, transformer_adapters, tmp_path, monkeypatch
):
    """Each in one line with exit status 2 and nothing written, before the pipeline loads:
    an adapter of another family (its file's keys: XLabs', biased key and value maps for
    Flux, unbiased ones for SD and SDXL, a time-conditioned projection for SD3), named as
    that family's with what to give instead, a pipeline that loads none, an encoder of
    the wrong kind, without SD3's processor or of another width, an adapter for a transformer
    of another width or depth, a Flux .bin that Flux's loader does not read."""
    args = misfit_transformer_ip_adapter(kind, pipelines, adapters, transformer_adapters, tmp_path)
    folder, more = args
    no_pipeline_loads(monkeypatch)
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    fails_in_one_line(args, tmp_path, *words, status=2)


# ------------------------------------------------------------------------------ mistakes


def test_a_missing_pipeline_folder_says_nothing_is_downloaded(tmp_path):
    args = edit(tmp_path / "stable-diffusion-v1-5", photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(
        args, tmp_path, "'--pipeline'", "does not exist", "downloads nothing", status=2
    )


def test_a_folder_that_is_no_pipeline_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    args = edit(tmp_path / "weights", photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "'--pipeline'", "no model_index.json", status=2)


def test_a_pipeline_folder_that_does_not_load_is_refused(pipelines, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(pipelines["sd"], folder)
    shutil.rmtree(folder / "unet")
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(
        args, tmp_path, "'--pipeline'", "does not load as a diffusers pipeline", status=2
    )


def test_a_pipeline_without_a_latent_vae_is_refused(tmp_path):
    from bdia.integrations.diffusers.tiny import tiny_unet

    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / "ddpm")
    args = edit(tmp_path / "ddpm", photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "'--pipeline'", "DDPMPipeline without a vae", status=2)


def test_edit_images_own_refusals_are_one_line_with_the_options_names(pipelines, tmp_path):
    """What edit_image refuses before any network runs is a wrong option (status 2), in the
    command's words: one step of Playground's EDM scheduler leaves none above sigma_min."""
    args = edit(pipelines["playground"], photo(tmp_path / "p.png"), tmp_path / "e.png")
    args[args.index("--steps") + 1] = "1"
    line = fails_in_one_line(args, tmp_path, "--steps 1 leaves no step", status=2)
    assert "num_inference_steps" not in line


def test_a_guidance_below_1_is_refused_in_the_commands_words(pipelines, tmp_path):
    """SD-Turbo's --guidance 0, which StableDiffusionPipeline runs as no guidance, would be
    u + 0 (c - u), the unconditional branch alone: refused (status 2), naming --guidance."""
    args = edit(pipelines["sd"], photo(tmp_path / "p.png"), tmp_path / "e.png", "--guidance", "0")
    line = fails_in_one_line(args, tmp_path, "--guidance 0.0: StableDiffusionPipeline", status=2)
    assert "give --guidance=1 for none" in line and "guidance_scale" not in line
    assert not (tmp_path / "e.png").exists()


def test_a_pipeline_without_its_text_encoder_is_refused_by_edit_image(pipelines, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(pipelines["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "no text_encoder", status=2)


def test_an_image_that_is_no_image_is_refused(pipelines, tmp_path):
    (tmp_path / "photo.png").write_text("not an image")
    args = edit(pipelines["sd"], tmp_path / "photo.png", tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "'--image'", "not a readable image", status=2)


def test_a_transparent_image_is_refused(pipelines, tmp_path):
    args = edit(pipelines["sd"], photo(tmp_path / "p.png", mode="RGBA"), tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "'--image'", "transparent pixels", "flatten", status=2)


def test_a_16_bit_image_is_refused(pipelines, tmp_path):
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "deep.png")
    args = edit(pipelines["sd"], tmp_path / "deep.png", tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "'--image'", "16-bit or float", status=2)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "name,width,height,words",
    [
        # The tiny VAE's factor is 2; SD3 and Flux take patches of 2 latents, 4 pixels.
        (
            "sd",
            16,
            15,
            ["is 16x15", "multiples of the vae's downsampling factor 2", "--size 16x14"],
        ),
        ("flux", 18, 16, ["is 18x16", "multiples of 4", "packing", "--size 16x16"]),
        # At most pos_embed_max_size (8) patches of 4 pixels a side for the tiny SD3.
        ("sd3", 40, 16, ["is 40x16", "at most 32", "--size 32x16"]),
    ],
)
def test_a_size_the_pipeline_cannot_take_points_to_size(
    name, width, height, words, pipelines, tmp_path
):
    image = photo(tmp_path / "p.png", width=width, height=height)
    args = edit(pipelines[name], image, tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "'--image'", *words, status=2)


@pytest.mark.parametrize(
    "size,words",
    [
        ("18x18", ["'--size'", "18x18", "multiples of 4", "--size 16x16"]),
        ("16", ["'--size'", "not a size WxH"]),
        ("0x16", ["'--size'", "1..16384"]),
        ("20000x20000", ["'--size'", "1..16384"]),
    ],
)
def test_a_wrong_size_is_refused(size, words, pipelines, tmp_path):
    args = edit(pipelines["sd3"], photo(tmp_path / "p.png"), tmp_path / "e.png", "--size", size)
    fails_in_one_line(args, tmp_path, *words, status=2)


@pytest.mark.parametrize("option", ["--out", "--reconstruction"])
def test_an_existing_output_is_kept(option, pipelines, tmp_path):
    image = photo(tmp_path / "p.png")
    existing = tmp_path / "mine.png"
    existing.write_text("the user's file")
    out = existing if option == "--out" else tmp_path / "e.png"
    args = edit(pipelines["sd"], image, out, "--reconstruction", tmp_path / "r.png")
    if option == "--reconstruction":
        args[args.index("--reconstruction") + 1] = str(existing)
    fails_in_one_line(args, tmp_path, f"{option} '{existing}' exists", "--overwrite", status=1)
    assert existing.read_text() == "the user's file"


@pytest.mark.parametrize(
    "more,words",
    [
        (["--dtype", "half"], ["'--dtype'", "float32, bfloat16, float16"]),
        (["--state-dtype", "float16"], ["'--state-dtype'", "float64, float32"]),
        (["--target", " "], ["'--target'", "the prompt is empty"]),
        (["--guidance", "inf"], ["'--guidance'", "not a finite number"]),
        (["--solver", "bdia-ddim"], ["'--solver'", "--solver ddim --gamma G"]),
        (["--gamma", "0"], ["'--gamma'", "(0, 1]"]),
        (["--steps", "0"], ["'--steps'"]),
        (["--rule", "continue"], ["'--rule'"]),
        (["--device", "cpu:1"], ["'--device'", "one CPU device"]),
        (["--out", "e.jpg"], ["'--out'", "must end in .png"]),
        (["--out", "p.png"], ["'--out'", "is --image"]),
        (["--reconstruction", "e.png"], ["'--reconstruction'", "it is --out"]),
        (["--image", ""], ["'--image'", "the path is empty"]),
        (["--pipeline", ""], ["'--pipeline'", "the path is empty"]),
    ],
)
def test_a_wrong_option_is_one_line(more, words, pipelines, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "p.png")
    args = edit(pipelines["sd"], "p.png", "e.png", *more)
    fails_in_one_line(args, tmp_path, *words, status=2)


@pytest.mark.parametrize("name", ["sd", "sd3", pytest.param("chroma", marks=NO_CHROMA)])
def test_the_embedded_guidance_is_refused_where_nothing_embeds_it(
    name, pipelines, tmp_path, monkeypatch
):
    """A unet, SD3's and Chroma's transformers embed no guidance scale (Chroma's guidance is
    true CFG, --guidance): model_index.json says so, and the refusal comes before the
    pipeline loads."""
    no_pipeline_loads(monkeypatch)
    args = edit(pipelines[name], photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(
        args + ["--embedded-guidance", "3"],
        tmp_path,
        "'--embedded-guidance'",
        f"the {loaded_class(pipelines[name])}'s network",
        "Flux.1-dev",
        status=2,
    )


@pytest.mark.parametrize(
    "pipeline,transformer",
    [("SanaPipeline", "SanaTransformer2DModel"), ("WanPipeline", "WanTransformer3DModel")],
    ids=["sana", "wan"],
)
def test_a_transformer_edit_image_does_not_take_is_refused_before_the_pipeline_loads(
    pipeline, transformer, tmp_path, monkeypatch
):
    """Known from model_index.json: a pipeline whose transformer edit_image does not take
    (Sana's, Wan's, whose ODEs from_diffusers makes) is refused in one line naming the class
    and the families it takes, before the pipeline (billions of weights) loads; the folder
    here holds model_index.json alone, which a load would fail on otherwise."""
    folder = tmp_path / "pipe"
    folder.mkdir()
    index = {
        "_class_name": pipeline,
        "transformer": ["diffusers", transformer],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.chdir(tmp_path)
    no_pipeline_loads(monkeypatch)
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png")
    words = ["'--pipeline'", f"a {pipeline}: the pipeline's transformer is a {transformer}"]
    fails_in_one_line(args, tmp_path, *words, "nothing was loaded", status=2)


@NO_QWEN
@pytest.mark.parametrize(
    "more,words",
    [
        (["--embedded-guidance", "3"], ["'--embedded-guidance'", "QwenImagePipeline's network"]),
        (["--mask", "m.png"], ["'--mask'", "a QwenImagePipeline takes no mask", "packed latents"]),
        (["--control-image", "c.png"], ["'--control-image'", "has no controlnet"]),
        (
            ["--ip-adapter", "c.png", "--ip-adapter-image", "c.png"],
            ["'--ip-adapter'", "a QwenImagePipeline takes no IP-Adapter"],
        ),
        ([], ["'--pipeline'", "a QwenImageEditPipeline embeds the prompt with the image"]),
        (None, ["'--pipeline'", "a QwenImageEditPlusPipeline embeds the prompt with the image"]),
        (
            ["edit-inpaint"],
            ["'--pipeline'", "a QwenImageEditInpaintPipeline embeds the prompt with the image"],
        ),
    ],
)
def test_what_qwen_image_takes_not_is_refused_before_the_pipeline_loads(
    more, words, pipelines, tmp_path, monkeypatch
):
    """Known from model_index.json, each in one line before the pipeline (Qwen-Image's 20B
    transformer) loads: an embedded guidance scale, a mask and a control image (its
    transformer takes the packed latents alone), an IP-Adapter, and QwenImageEditPipeline
    and QwenImageEditPlusPipeline (``more`` None) and QwenImageEditInpaintPipeline, whose
    prompts are embedded with the image, which bdia edit's text cannot give."""
    folder = pipelines["qwen"]
    if more == ["edit-inpaint"]:
        if not hasattr(diffusers, "QwenImageEditInpaintPipeline"):
            pytest.skip(f"diffusers {diffusers.__version__} has no QwenImageEditInpaintPipeline")
        folder, more = tmp_path / "qwen-edit-inpaint", []
        parts = tiny_qwen_image_edit_pipeline().components
        diffusers.QwenImageEditInpaintPipeline(**parts).save_pretrained(folder)
    elif more is None:
        if not hasattr(diffusers, "QwenImageEditPlusPipeline"):
            pytest.skip(f"diffusers {diffusers.__version__} has no QwenImageEditPlusPipeline")
        folder, more = tmp_path / "qwen-edit-plus", []
        tiny_qwen_image_edit_plus_pipeline().save_pretrained(folder)
    elif not more:
        folder = tmp_path / "qwen-edit"
        tiny_qwen_image_edit_pipeline().save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    no_pipeline_loads(monkeypatch)
    mask_file(tmp_path / "m.png")
    photo(tmp_path / "c.png")
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    fails_in_one_line(args, tmp_path, *words, status=2)


def test_the_embedded_guidance_of_a_flux_transformer_without_it_is_refused(tmp_path, monkeypatch):
    """A Flux transformer with guidance_embeds False (Flux.1-schnell's) is known from its
    config.json: refused in one line before the pipeline loads."""
    folder = tmp_path / "schnell"
    (tmp_path / "words").mkdir()
    tiny_flux_pipeline(tmp_path / "words", guidance_embeds=False).save_pretrained(folder)
    no_pipeline_loads(monkeypatch)
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(
        args + ["--embedded-guidance", "3"],
        tmp_path,
        "'--embedded-guidance'",
        "the FluxPipeline's network embeds no guidance scale",
        status=2,
    )


@pytest.mark.parametrize(
    "name,pipeline,family",
    [
        pytest.param("zimage", "ZImagePipeline", "Z-Image", marks=NO_Z_IMAGE),
        pytest.param("klein", "Flux2KleinPipeline", "Flux.2", marks=NO_KLEIN),
    ],
)
@pytest.mark.parametrize(
    "more,words",
    [
        (["--embedded-guidance", "3"], ["'--embedded-guidance'", "{pipeline}'s network"]),
        (["--mask", "m.png"], ["'--mask'", "a {pipeline} takes no mask", "{family}'s transformer"]),
        (["--control-image", "c.png"], ["'--control-image'", "a {pipeline} has no controlnet"]),
        (
            ["--ip-adapter", "c.png", "--ip-adapter-image", "c.png"],
            ["'--ip-adapter'", "a {pipeline} takes no IP-Adapter"],
        ),
    ],
    ids=["embedded-guidance", "mask", "control-image", "ip-adapter"],
)
def test_what_z_image_and_klein_take_not_is_refused_before_the_pipeline_loads(
    name, pipeline, family, more, words, pipelines, tmp_path, monkeypatch
):
    """Known from model_index.json (and, for Klein's transformer, whose class FLUX.2-dev's
    shares, from its config.json's guidance_embeds false), each in one line before the
    pipeline (a 6B or 4B transformer and a Qwen3 text encoder) loads: an embedded guidance
    scale, a mask and a control image without a controlnet (their transformers take the
    latents alone), and an IP-Adapter."""
    monkeypatch.chdir(tmp_path)
    no_pipeline_loads(monkeypatch)
    mask_file(tmp_path / "m.png")
    photo(tmp_path / "c.png")
    args = edit(pipelines[name], photo(tmp_path / "p.png"), tmp_path / "e.png", *more)
    words = [w.format(pipeline=pipeline, family=family) for w in words]
    fails_in_one_line(args, tmp_path, *words, status=2)


def loaded_class(folder):
    return json.loads((folder / "model_index.json").read_text())["_class_name"]


def test_without_diffusers_the_command_says_how_to_install_it(pipelines, tmp_path, monkeypatch):
    """The options are right, the work cannot go on: status 1, with the extra to install."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    args = edit(pipelines["sd"], photo(tmp_path / "p.png"), tmp_path / "e.png")
    fails_in_one_line(args, tmp_path, "pip install 'bdia[diffusers]'", status=1)


def test_an_image_decoded_to_nan_is_not_written(pipelines, tmp_path):
    """A VAE whose decoder gives NaN (a float16 one overflowing, here weights set to NaN)
    leaves no PNG of black pixels behind: status 1, nothing written."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sd3"
    shutil.copytree(pipelines["sd3"], folder)
    (weights,) = (folder / "vae").glob("*.safetensors")
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = torch.full_like(tensors["decoder.conv_out.bias"], np.nan)
    save_file(tensors, weights)
    args = edit(folder, photo(tmp_path / "p.png"), tmp_path / "e.png", "--no-progress")
    fails_in_one_line(args, tmp_path, "NaN or Inf", "nothing written", status=1)


def test_a_failure_after_a_network_ran_is_no_refusal(pipelines, tmp_path, monkeypatch):
    """A ValueError once the networks run is a failure of the work (status 1, with its type
    and the pointer to --debug), not a wrong option, and writes nothing."""
    from bdia.integrations.diffusers import editing

    def broken(vae, latents):
        raise ValueError("the decoder broke")

    monkeypatch.setattr(editing, "_decode", broken)
    args = edit(pipelines["sd3"], photo(tmp_path / "p.png"), tmp_path / "e.png", "--no-progress")
    fails_in_one_line(args, tmp_path, "ValueError: the decoder broke", "--debug", status=1)


def test_a_flux2_config_without_guidance_embeds_is_read_as_embedding_one():
    """diffusers 0.36's Flux2Transformer2DModel has no guidance_embeds option and always
    embeds a guidance scale: a loaded Flux.2 transformer whose config lacks the key takes
    --embedded-guidance (FLUX.2-dev's kind), one whose config says False does not (Klein's),
    and any other transformer embeds one only where its config says so."""
    from bdia.cli._edit import _embeds_guidance

    def transformer(name, config):
        return type(name, (), {"config": config})()

    assert _embeds_guidance(transformer("Flux2Transformer2DModel", {}))
    assert _embeds_guidance(transformer("Flux2Transformer2DModel", {"guidance_embeds": True}))
    assert not _embeds_guidance(transformer("Flux2Transformer2DModel", {"guidance_embeds": False}))
    assert not _embeds_guidance(transformer("FluxTransformer2DModel", {}))
    assert _embeds_guidance(transformer("FluxTransformer2DModel", {"guidance_embeds": True}))
    assert not _embeds_guidance(None)
