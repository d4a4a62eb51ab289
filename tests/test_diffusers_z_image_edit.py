"""edit_image with Z-Image: ZImagePipeline, ZImageImg2ImgPipeline and, without a mask,
ZImageInpaintPipeline (which blends).

The pipeline is the tiny random ``tiny_z_image_pipeline`` (no Qwen3 text encoder: prompt
embeddings, lists of per-sample tensors of their own lengths, or text through a stand-in of
its encoding). The image is encoded as ZImageImg2ImgPipeline encodes it (the VAE's mean where
it samples, ``(z - shift_factor) * scaling_factor`` in the VAE's dtype), inverted with
bdia(euler, 0.96) on ZImagePipeline's grid, regenerated under the target prompt and decoded
as ZImagePipeline decodes. Parity with the pipelines is checked bit for bit in float32, where
both sides make the same float operations on the same inputs; exactness of the round trip in
float64. The pipelines are in diffusers 0.36 and newer; elsewhere the module is skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from _pipeline_runs import (
    assert_decodes_as_the_pipeline,
    assert_edit_is_the_pipelines_run,
    refused_edit,
)
from conftest import Counter, untouched

if not hasattr(diffusers, "ZImagePipeline"):
    pytest.skip(
        f"diffusers {diffusers.__version__} has no ZImagePipeline (0.36 and newer have it)",
        allow_module_level=True,
    )

import bdia  # noqa: E402
from bdia.integrations.diffusers import diffusers_grid, edit_image, from_diffusers  # noqa: E402
from bdia.integrations.diffusers._z_image import _z_image_grid_inputs  # noqa: E402
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_qwen_image_pipeline,
    tiny_z_image_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
]

N_STEPS = 8
BATCH = 2
CFG = 3.0
# The guidance the edits run: none (Z-Image-Turbo's guidance_scale 0), CFG 3, and CFG 3 with
# its norm capped at the conditional one's and dropped after the steps whose
# (1000 - t) / 1000 passes 0.3.
GUIDANCE = {
    "no-cfg": dict(guidance_scale=0.0),
    "cfg": dict(guidance_scale=CFG),
    "options": dict(guidance_scale=CFG, cfg_normalization=1.0, cfg_truncation=0.3),
}


def _prompts(seed, lengths):
    """Per-sample prompt embeddings (L_i, 16), as ZImagePipeline.encode_prompt returns them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, generator=g) for n in lengths]


def _source():
    return _prompts(1, (5, 3))


def _target():
    return _prompts(3, (6, 4))


def _negative():
    return _prompts(2, (7, 2))


def _image():
    return torch.rand(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _edit(pipe, name="cfg", dtype=torch.float64, **options):
    """edit_image on ``pipe`` from the source embeddings to the target's under ``GUIDANCE
    [name]``, with the negative embeddings where it guides."""
    options.update(GUIDANCE[name])
    if options["guidance_scale"] > 0:
        options.setdefault("negative_prompt", _negative())
    return edit_image(
        pipe,
        _image(),
        _source(),
        _target(),
        num_inference_steps=N_STEPS,
        state_dtype=dtype,
        **options,
    )


def _grid(scheduler):
    """The installed ZImagePipeline's grid: its sigmas torch.linspace(1, 1 / n, n) shifted
    by the scheduler, and the final 0 (in diffusers 0.36 to 0.38 the scheduler's own
    spacing to sigma_min = 0)."""
    sched, sigmas = _z_image_grid_inputs(scheduler, N_STEPS)
    return diffusers_grid(sched, N_STEPS, sigmas=sigmas)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(GUIDANCE))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_edit_image_round_trip_is_exact(name, dtype):
    """edit_image on ZImagePipeline (bdia(euler, 0.96) on its grid of 8 sigmas and the final
    0): reconstruct() returns the image-shaped latents exactly in float64 (0.0: the pair's
    low words carry what the state's rounding drops), and to 1e-5 in float32 (~2^-24
    magnified by prod(1 / gamma) and CFG; measured 0.0 there too); the decoded
    reconstruction's error is the VAE's own."""
    pipe = tiny_z_image_pipeline()
    out = _edit(pipe, name, dtype)
    assert torch.equal(out.inversion.ts, _grid(pipe.scheduler))
    assert out.inversion.solver.identity == "bdia(euler, gamma=0.96)"
    cond = out.inversion.ode.cond
    assert ("negative_cond" in cond) == (name != "no-cfg")
    assert cond.get("guidance_scale") == (None if name == "no-cfg" else CFG)
    assert cond.get("cfg_truncation") == GUIDANCE[name].get("cfg_truncation")
    assert out.latents.shape == (BATCH, 4, 8, 8) and out.latents.dtype == dtype
    if dtype == torch.float64:
        assert out.latent_error == 0.0
    else:
        assert out.latent_error < 1e-5
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert float((out.edited_latents - out.reconstructed_latents).abs().max()) > 0.1
    assert out.images.shape == (BATCH, 3, 16, 16)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(GUIDANCE))
def test_edit_is_a_hand_run_regenerate_under_the_target(name):
    """Every stage by hand (float64): the VAE's mean, (z - shift_factor) * scaling_factor in
    its float32, from_diffusers with the embeddings and the CFG settings, ZImagePipeline's
    sigmas, Inversion.of with bdia(euler, 0.96) and regenerate(target): the latents, the
    noise, the pair and the edit, bit for bit."""
    pipe = tiny_z_image_pipeline()
    out = _edit(pipe, name)
    config = pipe.vae.config
    with torch.no_grad():
        z = pipe.vae.encode(_image()).latent_dist.mean
    latents = ((z - config.shift_factor) * config.scaling_factor).double()
    assert torch.equal(out.latents, latents)

    def ode(prompts):
        cond = dict(GUIDANCE[name], cap_feats=prompts)
        if cond["guidance_scale"] > 0:
            cond["negative_cond"] = dict(cap_feats=_negative())
        return from_diffusers(pipe.transformer, pipe.scheduler, **cond)

    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    with torch.no_grad():
        inversion = bdia.Inversion.of(
            ode(_source()), solver, latents, _grid(pipe.scheduler), state_dtype=torch.float64
        )
        edited = inversion.regenerate(ode(_target()), rule="base")
    assert torch.equal(inversion.noise, out.inversion.noise)
    assert torch.equal(inversion.pair.earlier, out.inversion.pair.earlier)
    assert torch.equal(inversion.pair.later, out.inversion.pair.later)
    assert torch.equal(edited, out.edited_latents)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(GUIDANCE))
def test_the_edit_is_the_pipelines_run_from_the_inverted_noise(name):
    """With a float32 state, edit_image's edited latents are bit for bit what ZImagePipeline
    returns from the inverted noise under the target embeddings, with the same
    guidance_scale, negative embeddings, cfg_normalization and cfg_truncation: the edit's
    base solver is the pipeline's Euler step on its own sigmas."""
    pipe = tiny_z_image_pipeline()
    out = _edit(pipe, name, torch.float32)
    options = dict(GUIDANCE[name])
    if options["guidance_scale"] > 0:
        options["negative_prompt_embeds"] = _negative()
    assert_edit_is_the_pipelines_run(
        pipe, out, N_STEPS, prompt_embeds=_target(), height=16, width=16, **options
    )


def test_edit_image_encodes_and_decodes_as_the_z_image_pipelines(monkeypatch):
    """With a float32 state, edit_image's latents are bit for bit what
    ZImageImg2ImgPipeline's prepare_latents makes of the image (its sample of the latent
    distribution replaced by the mean, which edit_image takes, and its noising by none), and
    its decoded edit is bit for bit the image ZImagePipeline decodes from the edited latents
    (cast to the VAE's dtype, latents / scaling_factor + shift_factor)."""
    from diffusers.pipelines.z_image import pipeline_z_image_img2img

    pipe = tiny_z_image_pipeline()
    out = _edit(pipe, "no-cfg", torch.float32)
    monkeypatch.setattr(
        pipeline_z_image_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean,
    )
    img2img = diffusers.ZImageImg2ImgPipeline(**pipe.components)
    monkeypatch.setattr(img2img.scheduler, "scale_noise", lambda sample, timestep, noise: sample)
    with torch.no_grad():
        theirs = img2img.prepare_latents(
            _image(), None, BATCH, 4, 16, 16, torch.float32, "cpu", None
        )
    assert torch.equal(out.latents, theirs)

    assert_decodes_as_the_pipeline(
        pipe, out, prompt_embeds=_source(), guidance_scale=0.0, height=16, width=16
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", ["ZImageImg2ImgPipeline", "ZImageInpaintPipeline"])
def test_the_img2img_and_inpainting_pipelines_edit_as_the_text_to_image_one(name):
    """ZImageImg2ImgPipeline (its strength plays no part) and, without a mask,
    ZImageInpaintPipeline (which blends) edit as ZImagePipeline of the same parts, bit for
    bit, the round trip exact in float64."""
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    parts = tiny_z_image_pipeline().components
    ref = _edit(diffusers.ZImagePipeline(**parts), "options")
    out = _edit(getattr(diffusers, name)(**parts), "options")
    assert out.latent_error == 0.0
    assert torch.equal(out.latents, ref.latents)
    assert torch.equal(out.inversion.noise, ref.inversion.noise)
    assert torch.equal(out.edited_latents, ref.edited_latents)


def test_a_mask_for_the_inpainting_pipeline_is_refused_in_one_line_naming_it():
    """ZImageInpaintPipeline blends the re-noised image into the latents after every step,
    which is no ODE step: a mask is refused in one line, before any network runs, the
    caller's mask left as it was, naming the pipeline, its transformer's channels, the blend
    and what to use instead."""
    if not hasattr(diffusers, "ZImageInpaintPipeline"):
        pytest.skip(f"diffusers {diffusers.__version__} has no ZImageInpaintPipeline")
    pipe = diffusers.ZImageInpaintPipeline(**tiny_z_image_pipeline().components)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    with untouched(mask):
        message = _refused(pipe, mask_image=mask)
    for field in (
        "is a ZImageInpaintPipeline whose",
        "in_channels = 4",
        "blends the noised image back into the latents",
        "not an ODE",
        "no exact inversion",
        "leave mask_image out",
    ):
        assert field in message, message


def test_text_prompts_go_through_the_pipelines_encode_prompt(monkeypatch):
    """With a tokenizer and a text encoder, text goes through the pipeline's own
    encode_prompt (without CFG, max_sequence_length 512, one call a prompt: the source, the
    target, the negative prompt), whose per-sample list the edit takes as it takes
    embeddings: the same edit, bit for bit. encode_prompt writes the chat template over its
    list's strings; the caller's list is left as it was. (Its _encode_prompt, which runs
    Qwen3, stands in here.)"""
    pipe = tiny_z_image_pipeline()
    ref = _edit(pipe, "cfg")
    table = {"a cat": _source(), "a dog": _target(), " ": _negative()}
    seen = []

    def encode(prompt, device=None, prompt_embeds=None, max_sequence_length=512):
        seen.append((list(prompt), max_sequence_length))
        out = [e for p in prompt for e in table[p]]
        prompt[:] = ["<templated>"] * len(prompt)  # as the pipeline's own does
        return out

    # Stand-ins, never called: edit_image asks encode_prompt, which holds them.
    pipe.tokenizer, pipe.text_encoder = object(), torch.nn.Identity()
    monkeypatch.setattr(pipe, "_encode_prompt", encode)
    source = ["a cat"]
    out = edit_image(
        pipe,
        _image(),
        source,
        "a dog",
        num_inference_steps=N_STEPS,
        guidance_scale=CFG,
        negative_prompt=" ",
    )
    assert seen == [(["a cat"], 512), (["a dog"], 512), ([" "], 512)]
    assert source == ["a cat"]
    assert torch.equal(out.inversion.noise, ref.inversion.noise)
    assert torch.equal(out.edited_latents, ref.edited_latents)


def _refused(pipe, source=None, **options):
    """refused_edit's one-line message for an edit from ``source`` (the source embeddings by
    default) to the target, without guidance unless ``options`` give it."""
    options.setdefault("guidance_scale", 0.0)
    image = options.pop("image", _image())
    return refused_edit(pipe, image, _source() if source is None else source, _target(), **options)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("text", "no tokenizer (ZImagePipeline.tokenizer is missing or None)"),
        ("text", "to embed the text of source_prompt (or pass a list of one 2-D tensor"),
        ("negative text", "to embed the text of negative_prompt"),
        ("one tensor", "source_prompt must be a string, a non-empty list of strings or a list"),
        ("3-D", "source_prompt[0] is (1, 5, 16)"),
        ("width", "cap_feat_dim = 16 channels"),
        ("count", "source_prompt has 3 prompts for 2 images"),
        ("negative scale", "guidance_scale = -1.0: ZImagePipeline's CFG, c + g (c - u), runs"),
        ("no negative", "needs the unconditional branch: give negative_prompt"),
        ("truncation", "cfg_truncation must be a finite number"),
        ("guidance", "guidance is the guidance scale Flux.1-dev's transformer embeds"),
        ("size", "not a multiple of 4, the vae's downsampling factor 2 times 2, as ZImagePipe"),
        ("omni", "the pipeline is a ZImageOmniPipeline"),
        ("mask", "mask_image was given, but the pipeline's transformer takes in_channels = 4"),
        ("reference", "reference_image was given, but the pipeline is a ZImagePipeline"),
    ],
)
def test_edit_image_refuses_what_z_image_does_not_take(kind, fragment):
    """One line each, before the transformer or the VAE runs: text (the default negative
    prompt "" included) without a text encoder, prompts that are not ZImagePipeline's list
    of 2-D embeddings of cap_feat_dim or not 1 or one per image, a negative scale (no CFG in
    the pipeline: 0 says so), CFG without a negative prompt, a malformed cfg_truncation,
    Flux's embedded guidance, a size the transformer's patches cannot take, the Omni
    pipeline (by its class; the ControlNet ones are test_diffusers_z_image_controlnet_edit's),
    a mask and reference images."""
    pipe, source, options = tiny_z_image_pipeline(), None, {}
    if kind == "text":
        source = "a photo of a cat"
    elif kind == "negative text":
        options = dict(guidance_scale=CFG)  # the default negative prompt "" is text
    elif kind == "one tensor":
        source = torch.zeros(2, 5, 16)
    elif kind == "3-D":
        source = [torch.zeros(1, 5, 16)]
    elif kind == "width":
        source = [torch.zeros(5, 8)]
    elif kind == "count":
        source = _prompts(1, (5, 3, 4))
    elif kind == "negative scale":
        options = dict(guidance_scale=-1.0)
    elif kind == "no negative":
        options = dict(guidance_scale=CFG, negative_prompt=None)
    elif kind == "truncation":
        options = dict(cfg_truncation="late")
    elif kind == "guidance":
        options = dict(guidance=3.5)
    elif kind == "size":
        options = dict(image=_image()[..., :14])
    elif kind == "omni":  # by the name: its transformer is the same class
        pipe = type("ZImageOmniPipeline", (diffusers.ZImagePipeline,), {})(**pipe.components)
    elif kind == "mask":
        options = dict(mask_image=torch.ones(1, 1, 16, 16))
    else:
        options = dict(reference_image=_image())
    assert fragment in _refused(pipe, source, **options)


@pytest.mark.parametrize("option", ["cfg_normalization", "cfg_truncation"])
def test_the_cfg_options_are_refused_for_other_pipelines(option):
    """cfg_normalization and cfg_truncation are ZImagePipeline's: for another pipeline
    (Qwen-Image's) they are refused in one line, before any network runs, rather than
    dropped."""
    pipe = tiny_qwen_image_pipeline()
    embeds = torch.zeros(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.long)
    counters = [Counter(pipe.transformer), Counter(pipe.vae.encoder)]
    with pytest.raises(ValueError) as exc_info:
        edit_image(pipe, _image(), (embeds, mask), (embeds, mask), **{option: 0.5})
    message = str(exc_info.value)
    assert "\n" not in message
    assert f"{option} is ZImagePipeline's CFG option" in message, message
    assert [c.calls for c in counters] == [0, 0]
