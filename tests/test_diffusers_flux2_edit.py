"""edit_image on Flux.2's pipelines: Flux2Pipeline (FLUX.2-dev's embedded guidance, 4 by
default) and Flux2KleinPipeline (true CFG with a negative prompt, 4 by default).

The image is encoded as the pipelines encode their reference images (the VAE's mode
patchified into 2 x 2 patches, normalised by the VAE's batch-norm statistics, packed), the
latents inverted with BDIA on the pipelines' grid (their sigmas shifted by
compute_empirical_mu), re-sampled under the target prompt, and decoded as the pipelines
decode. The pipelines are tiny, of random weights, with drawn batch-norm statistics, and
without text encoders (prompts as embeddings; text through a stand-in of the encoder's
output). Parity with the pipelines is checked in float32, bit for bit; exactness of the
round trip in float64.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import (
    assert_decodes_as_the_pipeline,
    assert_edit_is_the_pipelines_run,
    refused_edit,
)
from PIL import Image

import bdia
from bdia.integrations.diffusers import diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux2_transformer,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # A random network is no denoiser: BDIA's parasitic component grows on it, which the
    # round trip's exactness does not depend on.
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
    pytest.mark.skipif(
        not hasattr(diffusers, "Flux2Pipeline"),
        reason="Flux2Pipeline is in diffusers 0.36 and newer",
    ),
]
needs_klein = pytest.mark.skipif(
    not hasattr(diffusers, "Flux2KleinPipeline"),
    reason="Flux2KleinPipeline is in diffusers 0.37 and newer",
)
# FLUX.2-dev's pipeline, and FLUX.2-klein's where this diffusers has it.
KINDS = [pytest.param(False, id="dev"), pytest.param(True, id="klein-cfg", marks=needs_klein)]

N_STEPS = 8
BATCH = 2
TOKENS = 16  # 16 x 16 images: 4 x 8 x 8 latents in patches of 2 x 2, 16 tokens of 16 channels
GUIDANCE = 4.0  # both pipelines' guidance_scale: dev's embedded guidance, Klein's true CFG


def _pipe(klein):
    return tiny_flux2_klein_pipeline() if klein else tiny_flux2_pipeline()


def _image():
    return torch.rand(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _embeds(seed, tokens):
    return torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(seed))


SOURCE, TARGET, NEGATIVE = (1, 5), (3, 6), (2, 7)  # seeds and token counts


def _edit(pipe, klein, dtype=torch.float64, **options):
    """edit_image from a source prompt of 5 tokens to a target of 6; for Klein with its
    default true CFG against a negative prompt of 7 tokens."""
    if klein:
        options.setdefault("negative_prompt", _embeds(*NEGATIVE))
    return edit_image(
        pipe,
        _image(),
        _embeds(*SOURCE),
        _embeds(*TARGET),
        num_inference_steps=N_STEPS,
        state_dtype=dtype,
        progress=False,
        **options,
    )


def _grid(scheduler):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(image_seq_len=TOKENS, num_steps=N_STEPS)
    return diffusers_grid(scheduler, N_STEPS, mu=mu, sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS))


def _ids(pipe):
    return pipe._prepare_latent_ids(torch.zeros(BATCH, 16, 4, 4))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", KINDS)
@pytest.mark.parametrize(
    "state_dtype, bound",
    # float64 carries the round trip to ~2^-52 relative, float32 to ~2^-23, magnified by
    # prod(1 / gamma) over the steps and by true CFG: 1e-5 there. Measured: 0 in all four.
    [(torch.float64, 0.0), (torch.float32, 1e-5)],
)
def test_edit_image_round_trip_is_exact(klein, state_dtype, bound):
    """edit_image on Flux2Pipeline (the embedded guidance 4 by default, in both ODEs) and
    Flux2KleinPipeline (true CFG 4 by default, with negative embeddings): the grid is the
    pipelines' 8 sigmas shifted by compute_empirical_mu(16, 8) and the final 0, the solver
    bdia(euler, 0.96), and reconstruct() returns the packed latents (BATCH, 16, 16) to
    ``bound`` relative; the decoded reconstruction's error is the VAE's own."""
    pipe = _pipe(klein)
    out = _edit(pipe, klein, state_dtype)
    assert torch.equal(out.inversion.ts, _grid(pipe.scheduler))
    assert out.inversion.solver.identity == "bdia(euler, gamma=0.96)"
    for ode in (out.inversion.ode, out.target):
        cond = ode.cond
        assert cond.get("guidance_scale") == (GUIDANCE if klein else None)
        assert ("negative_cond" in cond) == klein
        if klein:
            assert "guidance" not in cond
        else:
            assert torch.equal(cond["guidance"], torch.tensor([GUIDANCE]))
        assert torch.equal(cond["img_ids"], _ids(pipe))
    assert out.latents.shape == (BATCH, TOKENS, 16) and out.latents.dtype == state_dtype
    assert out.latent_error <= bound
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert float((out.edited_latents - out.reconstructed_latents).abs().max()) > 0.1
    assert out.images.shape == (BATCH, 3, 16, 16)


def _by_hand(pipe, dtype):
    """The image's packed latents made by hand in ``dtype``: the mean of the VAE's
    distribution, patchified, (z - running_mean) / sqrt(running_var + eps), packed."""
    with torch.no_grad():
        z = pipe.vae.encode(_image()).latent_dist.mean.to(dtype)
    z = pipe._patchify_latents(z)
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    mean = bn.running_mean.view(1, -1, 1, 1).to(dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(dtype)
    return pipe._pack_latents((z - mean) / std)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", KINDS)
def test_edit_is_a_hand_run_regenerate_under_the_target(klein):
    """Every stage by hand (float64): the packed, normalised latents; from_diffusers with the
    embeddings and batched txt_ids of encode_prompt, the latents' ids, FLUX.2-dev's
    guidance 4 or Klein's true CFG 4 against the negative embeddings; the pipelines' sigmas
    and mu; Inversion.of with bdia(euler, 0.96): its noise and pair, bit for bit, and
    regenerate(target)."""
    pipe = _pipe(klein)
    out = _edit(pipe, klein)
    latents = _by_hand(pipe, torch.float64)
    assert torch.equal(out.latents, latents)

    def prompt(seed, tokens):
        embeds, ids = pipe.encode_prompt(None, prompt_embeds=_embeds(seed, tokens))
        return dict(encoder_hidden_states=embeds.double(), txt_ids=ids)

    def ode(seed, tokens):
        cond = dict(prompt(seed, tokens), img_ids=_ids(pipe))
        if klein:
            cond.update(guidance_scale=GUIDANCE, negative_cond=prompt(*NEGATIVE))
        else:
            cond["guidance"] = GUIDANCE
        return from_diffusers(pipe.transformer, pipe.scheduler, **cond)

    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    with torch.no_grad():
        inversion = bdia.Inversion.of(
            ode(*SOURCE), solver, latents, _grid(pipe.scheduler), state_dtype=torch.float64
        )
        edited = inversion.regenerate(ode(*TARGET), rule="base")
    assert torch.equal(inversion.noise, out.inversion.noise)
    assert torch.equal(inversion.pair.earlier, out.inversion.pair.earlier)
    assert torch.equal(inversion.pair.later, out.inversion.pair.later)
    assert torch.equal(edited, out.edited_latents)


def _target_args(pipe, klein, noise):
    """The pipeline's arguments for the target prompt from the packed ``noise`` (given
    unpacked, as its latents argument takes it), for BATCH 16 x 16 images with its guidance
    4 (Klein's against the negative prompt)."""
    args = dict(
        prompt_embeds=_embeds(*TARGET),
        latents=pipe._unpack_latents_with_ids(noise, _ids(pipe)),
        num_images_per_prompt=BATCH,
        guidance_scale=GUIDANCE,
        height=16,
        width=16,
    )
    if klein:
        args["negative_prompt_embeds"] = _embeds(*NEGATIVE)
    return args


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", KINDS)
def test_the_edit_is_the_pipelines_run_from_the_inverted_noise(klein):
    """With a float32 state, edit_image's edited latents are bit for bit the packed latents
    of Flux2Pipeline (guidance_scale 4, embedded) or Flux2KleinPipeline (true CFG 4 with the
    negative embeddings) run from the inverted noise under the target prompt: the edit's
    base solver is the pipelines' Euler step on their own sigmas and mu."""
    pipe = _pipe(klein)
    out = _edit(pipe, klein, torch.float32)
    # Klein returns its latents unpacked and denormalised for output_type="latent": the
    # packed ones of its last step are compared.
    target = _target_args(pipe, klein, out.inversion.noise.clone())
    assert_edit_is_the_pipelines_run(pipe, out, N_STEPS, last_step=True, **target)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", KINDS)
def test_edit_image_encodes_and_decodes_as_the_flux2_pipelines(klein):
    """With a float32 state, edit_image's latents are bit for bit the pipeline's own encoding
    of a reference image (its _encode_vae_image: the VAE's mode patchified and normalised by
    the drawn batch-norm statistics, then _pack_latents, as prepare_image_latents packs it),
    and its decoded edit bit for bit the image the pipeline decodes from the edited latents
    (_unpack_latents_with_ids, z * std + mean, _unpatchify_latents, the VAE): the pipeline's
    output_type="pt", (x / 2 + 0.5).clamp(0, 1), of edit_image's x.clamp(-1, 1), exact maps.
    With a float64 state the latents are the same map in float64."""
    pipe = _pipe(klein)
    out = _edit(pipe, klein, torch.float32)
    with torch.no_grad():
        theirs = pipe._pack_latents(pipe._encode_vae_image(_image(), generator=None))
    assert torch.equal(out.latents, theirs)
    target = _target_args(pipe, klein, out.inversion.noise.clone())
    assert_decodes_as_the_pipeline(pipe, out, num_inference_steps=N_STEPS, **target)
    assert torch.equal(_edit(pipe, klein).latents, _by_hand(pipe, torch.float64))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", KINDS)
def test_text_prompts_go_through_the_pipelines_encode_prompt(klein, monkeypatch):
    """Where the pipeline has a text encoder and tokenizer (stand-ins here: the encoder's
    output for each text is drawn), text prompts, the negative one included, are embedded by
    the pipeline's own encode_prompt: the edit is bit for bit the edit of those embeddings."""
    pipe = _pipe(klein)
    pipe.tokenizer, pipe.text_encoder = object(), torch.nn.Identity()
    table = {"a cat": SOURCE, "a dog": TARGET, "": NEGATIVE}
    texts = []

    def encoder_output(*, prompt, **_):
        texts.append(list(prompt))
        return torch.cat([_embeds(*table[p]) for p in prompt])

    name = "_get_qwen3_prompt_embeds" if klein else "_get_mistral_3_small_prompt_embeds"
    monkeypatch.setattr(pipe, name, encoder_output)
    options = dict(negative_prompt="") if klein else {}
    text = edit_image(
        pipe,
        _image(),
        "a cat",
        "a dog",
        num_inference_steps=N_STEPS,
        progress=False,
        **options,
    )
    assert texts == [["a cat"], ["a dog"]] + [[""]] * klein
    embedded = _edit(pipe, klein)
    assert torch.equal(text.edited_latents, embedded.edited_latents)
    assert torch.equal(text.inversion.noise, embedded.inversion.noise)


def _reference(seed, width, height):
    """A random RGB reference image of ``width`` x ``height`` pixels (PIL)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("klein", KINDS)
def test_reference_images_condition_both_odes_as_the_pipelines_image_list(klein):
    """reference_image is the pipelines' image= list: a 64 x 64 image (its 256 tokens) and
    a 66 x 70 one, which the pipelines crop to 64 x 68, multiples of twice the tiny VAE's
    factor 2 (272 tokens), encoded by their
    prepare_image_latents after the latents' 16 tokens, their ids after the latents'. The
    round trip is exact in float64 and float32 (latent_error 0: the references are fixed
    over the run), and with a float32 state the edited latents are bit for bit the
    pipeline's run from the inverted noise under the target prompt with image= the same
    list. The references move the edit (relative difference above 1e-3)."""
    pipe = _pipe(klein)
    references = [_reference(1, 64, 64), _reference(2, 66, 70)]
    out = _edit(pipe, klein, torch.float32, reference_image=references)
    assert out.latent_error == 0.0
    for ode in (out.inversion.ode, out.target):
        assert ode.cond["image_latents"].shape == (BATCH, 256 + 272, 16)
        assert ode.cond["img_ids"].shape == (BATCH, TOKENS + 256 + 272, 4)
        assert torch.equal(ode.cond["img_ids"][:, :TOKENS], _ids(pipe))
    target = _target_args(pipe, klein, out.inversion.noise.clone())
    assert_edit_is_the_pipelines_run(pipe, out, N_STEPS, last_step=True, image=references, **target)
    assert _edit(pipe, klein, reference_image=references).latent_error == 0.0
    alone = _edit(pipe, klein, torch.float32)
    moved = (out.edited_latents - alone.edited_latents).abs().max()
    assert float(moved / alone.edited_latents.abs().max()) > 1e-3


def _refused(pipe, source=None, **options):
    """refused_edit's one-line message for an edit from ``source`` (the source embeddings by
    default) to the target's."""
    source = _embeds(*SOURCE) if source is None else source
    return refused_edit(pipe, options.pop("image", _image()), source, _embeds(*TARGET), **options)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("text", "no tokenizer (Flux2Pipeline.tokenizer is missing or None); edit_image needs"),
        ("text", "to embed the text of source_prompt (or pass prompt embeddings instead)"),
        pytest.param(
            "klein default negative", "to embed the text of negative_prompt", marks=needs_klein
        ),
        ("pair", "source_prompt is a pair of tensors, as Flux.1's (prompt_embeds, pooled_prompt"),
        ("embeddings dim", "dim 8, but the transformer's joint_attention_dim is 16"),
        pytest.param(
            "klein guidance",
            "guidance_embeds = False (FLUX.2-klein's) and embeds no guidance",
            marks=needs_klein,
        ),
        ("size", "not a multiple of 4, the vae's downsampling factor 2 times 2, Flux2Pipeline"),
        ("mask", "mask_image was given, but the pipeline's transformer takes in_channels = 16"),
        ("control", "control_image was given"),
        ("reference", "reference_image[0] is a Tensor; Flux2Pipeline's image= takes PIL images"),
        ("small reference", "reference_image[0]: Image too small: 32×32"),
        ("no bn", "has no bn.running_mean and bn.running_var"),
        ("channels", "the transformer takes in_channels = 32 but the vae's latent_channels = 4"),
    ],
)
def test_edit_image_refuses_what_flux2_does_not_take(kind, fragment):
    """One line each, before the transformer or the VAE runs, the image untouched: text
    without a text encoder (the Klein's default negative prompt "" included), Flux.1's pair
    of embeddings (Flux.2 has no pooled ones), embeddings of another width, an embedded
    guidance for Klein's transformer, a size the patchifying cannot take, a mask, a control
    image, a reference image that is a tensor (the pipelines take PIL images there) or that
    their image processor refuses (below 64 pixels a side), a VAE without batch-norm
    statistics and a transformer of other channels."""
    pipe, source, options = tiny_flux2_pipeline(), None, {}
    if kind == "text":
        source = "a photo of a cat"
    elif kind == "klein default negative":
        pipe = tiny_flux2_klein_pipeline()
    elif kind == "pair":
        source = (_embeds(*SOURCE), torch.zeros(1, 16))
    elif kind == "embeddings dim":
        source = _embeds(*SOURCE)[..., :8]
    elif kind == "klein guidance":
        pipe = tiny_flux2_klein_pipeline()
        options = dict(guidance=3.5, negative_prompt=_embeds(*NEGATIVE))
    elif kind == "size":
        options = dict(image=_image()[..., :14])
    elif kind == "mask":
        options = dict(mask_image=torch.ones(1, 1, 16, 16))
    elif kind == "control":
        options = dict(control_image=torch.zeros(1, 3, 16, 16))
    elif kind == "reference":
        options = dict(reference_image=_image())
    elif kind == "small reference":
        options = dict(reference_image=[_reference(0, 32, 32)])
    elif kind == "no bn":
        del pipe.vae.bn
    else:
        pipe.transformer = tiny_flux2_transformer(in_channels=32)
    assert fragment in _refused(pipe, source, **options)


def test_klein_inpainting_edits_as_klein_without_a_mask_and_refuses_one():
    """Flux2KleinInpaintPipeline blends the re-noised image into the latents after each step
    (no ODE step): without a mask its edit is Flux2KleinPipeline's of the same parts, bit for
    bit; a mask is refused in one line naming it, before any network runs, and so are
    reference images (its image_reference is prepared otherwise than Klein's image=)."""
    if not hasattr(diffusers, "Flux2KleinInpaintPipeline"):
        pytest.skip(f"diffusers {diffusers.__version__} has no Flux2KleinInpaintPipeline")
    parts = tiny_flux2_klein_pipeline().components
    ref = _edit(diffusers.Flux2KleinPipeline(**parts), True)
    inpaint = diffusers.Flux2KleinInpaintPipeline(**parts)
    out = _edit(inpaint, True)
    assert torch.equal(out.inversion.noise, ref.inversion.noise)
    assert torch.equal(out.edited_latents, ref.edited_latents)
    message = _refused(
        inpaint,
        negative_prompt=_embeds(*NEGATIVE),
        mask_image=torch.ones(1, 1, 16, 16),
    )
    assert "Flux2KleinInpaintPipeline" in message and "blends" in message
    message = _refused(
        inpaint, negative_prompt=_embeds(*NEGATIVE), reference_image=[_reference(1, 64, 64)]
    )
    assert "Flux2KleinInpaintPipeline, whose image_reference is prepared otherwise" in message
