"""bdia.integrations.diffusers.edit_image on a tiny randomly initialised text-to-image pipeline.

Everything is built from config with random weights and nothing downloaded
(``bdia.integrations.diffusers.tiny``): a ``UNet2DConditionModel`` on 4 x 8 x 8 latents, an
``AutoencoderKL`` with downsampling factor 2 (16 x 16 images), a one-layer ``CLIPTextModel``
and a ``CLIPTokenizer`` made from a locally written vocabulary, assembled as a
``StableDiffusionPipeline``; all in float32, as pipelines load. A random unet is no denoiser,
so the edits are not images of anything; what is checked is the plumbing and the exactness,
which do not depend on the weights. The SDXL tests use ``tiny_sdxl_pipeline``: the same VAE
and tokenizer, two CLIP text encoders (the second with a projection) and a unet with SDXL's
added conditioning (``addition_embed_type="text_time"``). The SD3 tests use
``tiny_sd3_pipeline``: the same VAE with SD3's ``scaling_factor`` and ``shift_factor``, two
CLIP text encoders with projections and no T5, an ``SD3Transformer2DModel`` and
``FlowMatchEulerDiscreteScheduler(shift=3.0)``. The Flux tests use ``tiny_flux_pipeline``:
the same VAE with Flux's ``scaling_factor`` and ``shift_factor``, a CLIP and a T5 text
encoder, a ``FluxTransformer2DModel`` with a guidance embedding (Flux.1-dev) or without
(schnell) and Flux.1-dev's scheduler with dynamic shifting.
"""

from __future__ import annotations

import collections

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import bdia
from bdia.integrations.diffusers import (
    EditResult,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    SD_NOISE_TABLE,
    ZERO_SNR_DDIM,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_playground_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    tiny_text_to_image_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SOURCE, TARGET = "a photo of a cat", "a painting of a dog"
GUIDANCE = 7.5
STEPS = 10


class Counter:
    """Counts the forward calls of a module (and its encode/decode for a VAE)."""

    def __init__(self, module, *methods):
        self.calls = 0
        module.register_forward_pre_hook(self._hook)
        for name in methods:
            original = getattr(module, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            setattr(module, name, counted)

    def _hook(self, module, args):
        self.calls += 1


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_text_to_image_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1


def _edited(pipe, image):
    """The edit of SOURCE to TARGET in STEPS steps under GUIDANCE, the image left as it was."""
    before = image.clone()
    out = edit_image(
        pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, guidance_scale=GUIDANCE
    )
    assert torch.equal(image, before), "edit_image modified the caller's image"
    return out


@pytest.fixture(scope="module")
def result(pipe, image):
    return _edited(pipe, image)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _embeds(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt="")


# ------------------------------------------------------------------- exactness


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "state_dtype, bound",
    # float64: the double-word state carries ~2^-106; the tiny pipeline gives exactly 0.
    # float32: the double-word float32 state carries ~2^-48 (4e-15), magnified by the
    # inversion's prod(1/gamma) = 0.96^-49 = 7.4 and the parasitic mode. But the unet sees
    # the float32 high word, which the two directions may round to neighbouring words where
    # the value lies within 2^-48 of a midpoint (docs/theory.md). Such flips, magnified by
    # guidance 7.5 over 50 steps, explain the 3.9e-6 measured with torch 2.8 and diffusers
    # 0.30 (float64 states, where they cannot happen, give 0 there; torch 2.13 and diffusers
    # 0.42 give 0 in float32 too). 1e-5 is the top of the float32 range the docs report
    # for round trips (2.4e-7 to 6.4e-6 on the digits).
    [(torch.float64, 1e-12), (torch.float32, 1e-5)],
)
def test_unet_round_trip_under_guidance_is_exact(pipe, image, state_dtype, bound):
    """50 DDIM steps under CFG 7.5 with a float32 unet: reconstruct() returns the latents."""
    out = edit_image(pipe, image, SOURCE, TARGET, guidance_scale=GUIDANCE, state_dtype=state_dtype)
    assert isinstance(out, EditResult)
    assert out.inversion.ts.numel() == 51
    assert out.latents.dtype == out.reconstructed_latents.dtype == state_dtype
    assert out.inversion.ode.model_dtype == torch.float32
    assert out.latent_error < bound
    # rel() divides in the state's dtype and the library in float64: equal but for the
    # float32 rounding of that quotient (6e-8 relative), and exactly equal when both are 0.
    assert out.latent_error == pytest.approx(rel(out.reconstructed_latents, out.latents), rel=1e-6)
    # The reconstruction's image error is the VAE's: the latents came back exactly.
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)


def test_a_zero_terminal_snr_pipeline_inverts_to_pure_noise_exactly(tmp_path, image):
    """A v-prediction pipeline whose DDIMScheduler rescales its table to zero terminal SNR,
    with trailing timesteps: the inversion ends at t = 1, pure noise, and comes back to the
    latents exactly (float64 state: rounding only, 1e-12 as above), under guidance."""
    scheduler = diffusers.DDIMScheduler(**ZERO_SNR_DDIM)
    zero_snr = tiny_text_to_image_pipeline(tmp_path, scheduler)
    out = edit_image(zero_snr, image, SOURCE, TARGET, num_inference_steps=10)
    assert float(out.inversion.ts[0]) == 1.0 and out.inversion.ode.schedule.zero_snr_end
    assert out.latent_error < 1e-12
    assert torch.isfinite(out.edited_latents).all()


def test_vae_error_is_reported_apart_and_is_decode_of_encode(pipe, image, result):
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean  # the mean: deterministic, no sample
        decoded = vae.decode(mean * sf / sf).sample.clamp(-1, 1)
    assert rel(result.latents, (mean * sf).double()) < 1e-7
    by_hand = float((decoded.double() - image.double()).pow(2).mean().sqrt())
    assert result.vae_error == pytest.approx(by_hand, rel=1e-5)
    assert result.vae_error > 0.1  # a random VAE is far from the identity
    assert result.latent_error < 1e-12  # while the UNet round trip is exact
    assert result.reconstruction.shape == image.shape  # a tensor in, tensors out
    assert result.reconstruction.min() >= -1 and result.reconstruction.max() <= 1


def test_encoding_is_deterministic(pipe, image, result):
    again = edit_image(
        pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, guidance_scale=GUIDANCE
    )
    assert torch.equal(again.latents, result.latents)
    assert torch.equal(again.edited_latents, result.edited_latents)


# ----------------------------------------------------------------------- the edit


def test_prompts_are_embedded_with_the_pipelines_encode_prompt(pipe, result):
    source, negative = _embeds(pipe, SOURCE)
    target, _ = _embeds(pipe, TARGET)
    assert not torch.equal(source, target)
    src_cond, tgt_cond = result.inversion.ode.cond, result.target.cond
    assert torch.equal(src_cond["encoder_hidden_states"], source)
    assert torch.equal(tgt_cond["encoder_hidden_states"], target)
    for cond in (src_cond, tgt_cond):
        assert cond["guidance_scale"] == GUIDANCE
        assert torch.equal(cond["negative_cond"]["encoder_hidden_states"], negative)
    assert result.inversion.ode.fingerprint() != result.target.fingerprint()


def test_edit_is_a_hand_run_regenerate_under_the_target(pipe, image, result):
    """Every stage by hand: VAE mean, encode_prompt, from_diffusers, diffusers_grid,
    Inversion.of with bdia(ddim, 0.96), regenerate(target, rule="base")."""
    source, negative = _embeds(pipe, SOURCE)
    target, _ = _embeds(pipe, TARGET)
    guidance = dict(guidance_scale=GUIDANCE, negative_cond={"encoder_hidden_states": negative})
    src = from_diffusers(pipe.unet, pipe.scheduler, encoder_hidden_states=source, **guidance)
    tgt = from_diffusers(pipe.unet, pipe.scheduler, encoder_hidden_states=target, **guidance)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    assert torch.equal(result.inversion.ts, ts)  # set_alpha_to_one=False: ends at t = 1/N
    assert float(ts[-1]) == 1 / 1000
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.mean.double()
    latents = latents * pipe.vae.config.scaling_factor
    solver = bdia.bdia(bdia.get_solver("ddim"), 0.96)
    inversion = bdia.Inversion.of(src, solver, latents, ts, state_dtype=torch.float64)
    assert torch.equal(inversion.noise, result.inversion.noise)
    edited = inversion.regenerate(tgt, rule="base")
    assert torch.equal(edited, result.edited_latents)
    assert rel(result.edited_latents, result.reconstructed_latents) > 0.1
    assert not torch.equal(result.images, result.reconstruction)


def test_restart_rule_and_embeddings_as_prompts(pipe, image, result):
    """Prompt embeddings in place of strings give the same edit; rule='restart' is
    Inversion.regenerate(target, rule='restart')."""
    source, negative = _embeds(pipe, SOURCE)
    target, _ = _embeds(pipe, TARGET)
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=negative)
    restart = edit_image(pipe, image, source, target, rule="restart", **common)
    assert torch.equal(restart.inversion.noise, result.inversion.noise)
    expected = result.inversion.regenerate(result.target, rule="restart")
    assert torch.equal(restart.edited_latents, expected)
    assert not torch.equal(restart.edited_latents, result.edited_latents)


def test_pil_images_in_pil_images_out(pipe, image, result):
    from PIL import Image

    pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pils = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    out = edit_image(pipe, pils, SOURCE, TARGET, num_inference_steps=STEPS)
    assert len(out.images) == len(out.reconstruction) == 2
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images)
    assert out.latent_error < 1e-12
    # The 8-bit image is within 1/255 of the tensor, so its latents are close to the tensor's.
    assert rel(out.latents, result.latents) < 0.05


def test_a_grid_ending_at_sigma_zero_ends_at_the_smallest_noise_level(tmp_path, image):
    """set_alpha_to_one=True: diffusers' grid ends at alpha = 1 (sigma = 0), where the unet
    cannot be evaluated; the latents are the state at t = 1/N (alphas_cumprod[0]) instead."""
    scheduler = diffusers.DDIMScheduler(
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1
    )
    pipe = tiny_text_to_image_pipeline(tmp_path, scheduler)
    grid = diffusers_grid(scheduler, 5)
    assert float(grid[-1]) == 0.0
    out = edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=5)
    assert torch.equal(out.inversion.ts[:-1], grid[:-1])
    assert float(out.inversion.ts[-1]) == 1 / 1000
    assert out.latent_error < 1e-12


def test_a_last_timestep_at_the_smallest_noise_level_ends_the_grid_there(tmp_path, image):
    """Euler with linspace spacing ends at timestep 0 and then sigma = 0: the grid drops the 0
    and ends at timestep 0's sigma. That sigma is float32 in diffusers (0.029167535 for SD's
    table, 1.6e-9 above the float64 value), and the grid used to keep both, a last step 5.5e-8
    long that cost one unet call in each of the three runs: 14 calls for 4 steps, not 11 (4 to
    invert, 3 to reconstruct from the pair, 4 to regenerate)."""
    scheduler = diffusers.EulerDiscreteScheduler(**SD_NOISE_TABLE, timestep_spacing="linspace")
    pipe = tiny_text_to_image_pipeline(tmp_path, scheduler)
    grid = diffusers_grid(scheduler, 5)
    assert float(grid[-1]) == 0.0
    calls = Counter(pipe.unet)
    out = edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=5, guidance_scale=1)
    assert torch.equal(out.inversion.ts, grid[:-1])
    assert calls.calls == 4 + 3 + 4
    assert out.latent_error < 1e-12


# ------------------------------------------------------------------------ errors


def _refused(pipe, image, source=SOURCE, **kwargs):
    """The error edit_image raises, after checking no network ran."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    counters = [
        Counter(getattr(pipe, "unet", None) or pipe.transformer),
        Counter(pipe.vae, "encode", "decode"),
        *(Counter(encoder) for encoder in encoders if encoder is not None),
    ]
    try:
        with pytest.raises((ValueError, TypeError)) as info:
            edit_image(pipe, image, source, TARGET, **kwargs)
    finally:
        for name in ("encode", "decode"):
            vars(pipe.vae).pop(name, None)
    assert [c.calls for c in counters] == [0] * len(counters)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def fresh_pipe(tmp_path):
    return tiny_text_to_image_pipeline(tmp_path)


def test_a_wrong_size_image_is_refused_before_any_network(fresh_pipe, image):
    message = _refused(fresh_pipe, image[:, :, :15, :])
    assert "16 x 15" in message and "factor 2" in message


def test_guidance_without_negative_embeddings_is_refused(fresh_pipe, image):
    source, _ = _embeds(fresh_pipe, SOURCE)
    message = _refused(fresh_pipe, image, source, guidance_scale=GUIDANCE, negative_prompt=None)
    assert "negative_prompt" in message and "7.5" in message


@pytest.mark.parametrize("scale", [0.0, 0.5, -2.0])
def test_a_guidance_scale_below_1_is_refused_before_any_network(fresh_pipe, image, scale):
    """StableDiffusionPipeline runs no guidance at or below 1 (SD-Turbo's 0.0), where
    u + g (c - u) would weigh the unconditional branch, at 0 alone: the edit would not see
    its prompts, and be no run of the pipeline's."""
    message = _refused(fresh_pipe, image, guidance_scale=scale)
    assert f"guidance_scale = {scale}: StableDiffusionPipeline runs" in message
    assert "give guidance_scale=1 for none" in message


def test_a_guidance_scale_below_1_is_refused_for_transformers_too(fresh_sd3_pipe, image):
    """The same rule for a transformer's pipeline (StableDiffusion3Pipeline's CFG is on for a
    scale above 1)."""
    message = _refused(fresh_sd3_pipe, image, guidance_scale=0.0)
    assert "guidance_scale = 0.0: StableDiffusion3Pipeline runs" in message


@pytest.mark.parametrize("projection", ["ip_image_proj", "image_proj", "text_image_proj"])
def test_a_unet_that_needs_image_embeddings_is_refused_before_the_vae(
    fresh_pipe, image, projection
):
    """Loading an IP-Adapter sets the unet's encoder_hid_dim_type to 'ip_image_proj'; the
    unet then wants image_embeds: of an image prompt, which an edit without one lacks (see
    test_diffusers_ip_adapter for one given), or of another projection, which edit_image does
    not make. diffusers' own error came only after the VAE had encoded the image."""
    fresh_pipe.unet.register_to_config(encoder_hid_dim_type=projection)
    message = _refused(fresh_pipe, image)
    assert f"encoder_hid_dim_type = {projection!r}" in message
    assert "unload_ip_adapter" in message


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("rgba", "image.convert('RGB')"),
        ("unbatched", "image[None]"),
        ("0-255", "[-1, 1]"),
        ("no tokenizer", "tokenizer"),
        ("no vae", "vae"),
        ("prompts", "3 prompts for 2 images"),
        ("embeddings dim", "dim 8, but the unet's cross_attention_dim is 16"),
        ("rule", "rule"),
        ("solver", "did you mean 'ddim'"),
        ("clip_sample", "clip_sample"),
        # Euler's one timestep, 0 under "leading" spacing, is already the table's smallest
        # noise level: the grid without its final 0 has no step.
        ("one step", "num_inference_steps = 1 leaves no step"),
        ("empty list", "no images"),
        ("empty batch", "no images"),
    ],
)
def test_bad_inputs_are_refused_in_one_line(fresh_pipe, image, kind, fragment):
    from PIL import Image

    kwargs = {}
    source = SOURCE
    if kind == "rgba":
        image = Image.new("RGBA", (16, 16))
    elif kind == "unbatched":
        image = image[0]
    elif kind == "0-255":
        image = (image + 1) * 127.5
    elif kind == "no tokenizer":
        fresh_pipe.tokenizer = None
    elif kind == "no vae":
        fresh_pipe.vae = None
        with pytest.raises(ValueError, match="vae") as info:
            edit_image(fresh_pipe, image, SOURCE, TARGET)
        assert "\n" not in str(info.value)
        return
    elif kind == "prompts":
        source = [SOURCE] * 3
    elif kind == "embeddings dim":
        source = _embeds(fresh_pipe, SOURCE)[0][..., :8]
    elif kind == "rule":
        kwargs["rule"] = "continue"
    elif kind == "solver":
        kwargs["solver"] = "ddmi"
    elif kind == "clip_sample":
        fresh_pipe.scheduler = diffusers.DDIMScheduler(clip_sample=True, steps_offset=1)
    elif kind == "one step":
        fresh_pipe.scheduler = diffusers.EulerDiscreteScheduler(timestep_spacing="leading")
        kwargs["num_inference_steps"] = 1
    elif kind == "empty list":
        image = []
    elif kind == "empty batch":
        image = image[:0]
    assert fragment in _refused(fresh_pipe, image, source, **kwargs)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("encoder_hid_dim", [None, 16])
def test_a_unet_with_a_text_added_embedding_is_taken_as_stable_diffusions(
    tmp_path, image, encoder_hid_dim
):
    """addition_embed_type="text": the unet pools encoder_hidden_states into its added
    embedding itself and needs no added_cond_kwargs, so edit_image gives it what it gives a
    Stable Diffusion unet. The round trip is exact, and prompt embeddings give the edit of the
    text, bit for bit; their width is the text encoder's 16, which is encoder_hid_dim where
    the unet projects them to its cross-attention width (8 here), and other widths are
    refused naming that field."""
    from bdia.integrations.diffusers.tiny import tiny_unet

    pipe = tiny_text_to_image_pipeline(tmp_path)
    width = {} if encoder_hid_dim is None else {"encoder_hid_dim": encoder_hid_dim}
    pipe.unet = tiny_unet(
        conditional=True,
        channels=4,
        cross_attention_dim=16 if encoder_hid_dim is None else 8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        **width,
    )
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    text = edit_image(pipe, image, SOURCE, TARGET, **common)
    assert text.latent_error < 1e-12
    assert set(text.inversion.ode.cond) == {
        "encoder_hidden_states",
        "guidance_scale",
        "negative_cond",
    }
    source, negative = _embeds(pipe, SOURCE)
    target, _ = _embeds(pipe, TARGET)
    embedded = edit_image(pipe, image, source, target, negative_prompt=negative, **common)
    assert torch.equal(embedded.inversion.noise, text.inversion.noise)
    assert torch.equal(embedded.edited_latents, text.edited_latents)
    field = "cross_attention_dim" if encoder_hid_dim is None else "encoder_hid_dim"
    message = _refused(pipe, image, source[..., :8], negative_prompt=negative)
    assert f"dim 8, but the unet's {field} is 16" in message


# --------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def xl_pipe(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("xl_tokenizer"))


@pytest.fixture(scope="module")
def xl_result(xl_pipe, image):
    return _edited(xl_pipe, image)


@pytest.fixture
def fresh_xl_pipe(tmp_path):
    return tiny_sdxl_pipeline(tmp_path)


def _xl_embeds(pipe, prompt):
    """(embeds, pooled) of ``prompt`` by the SDXL pipeline's encode_prompt."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", do_classifier_free_guidance=False
        )
    return embeds, pooled


def _added(pooled, time_ids):
    return {"text_embeds": pooled, "time_ids": time_ids}


# The image's size as SDXL's time ids: original (H, W), crop (0, 0), target (H, W).
XL_TIME_IDS = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "state_dtype, bound",
    # As for Stable Diffusion above: float64 carries ~2^-106 and gives exactly 0 here; a
    # float32 state carries ~2^-48, magnified by prod(1/gamma) = 7.4 and guidance 7.5, and the
    # unet's float32 inputs may round to neighbouring words in the two directions, so 1e-5
    # (the top of the float32 range of the docs' round trips). The added conditioning is a
    # constant of the ODE, the same on the way out and back, so it changes none of this.
    [(torch.float64, 1e-12), (torch.float32, 1e-5)],
)
def test_sdxl_unet_round_trip_under_guidance_is_exact(xl_pipe, image, state_dtype, bound):
    """50 DDIM steps under CFG 7.5 on an SDXL pipeline: reconstruct() returns the latents."""
    out = edit_image(xl_pipe, image, SOURCE, TARGET, state_dtype=state_dtype)
    assert out.inversion.ts.numel() == 51
    assert out.latents.dtype == out.reconstructed_latents.dtype == state_dtype
    assert out.latent_error < bound
    assert out.latent_error == pytest.approx(rel(out.reconstructed_latents, out.latents), rel=1e-6)
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert torch.isfinite(out.edited_latents).all()


def test_sdxl_conditioning_is_the_pipelines_encode_prompt_and_time_ids(xl_pipe, xl_result):
    """The added_cond_kwargs: the pooled embeddings of encode_prompt and the image's size as
    time ids; the default negative prompt "" is zeros (force_zeros_for_empty_prompt)."""
    assert xl_pipe.config.force_zeros_for_empty_prompt
    for prompt, cond in ((SOURCE, xl_result.inversion.ode.cond), (TARGET, xl_result.target.cond)):
        embeds, pooled = _xl_embeds(xl_pipe, prompt)
        assert torch.equal(cond["encoder_hidden_states"], embeds)
        assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
        assert torch.equal(cond["added_cond_kwargs"]["time_ids"], XL_TIME_IDS)
        negative = cond["negative_cond"]
        assert torch.equal(negative["encoder_hidden_states"], torch.zeros_like(embeds))
        assert torch.equal(negative["added_cond_kwargs"]["text_embeds"], torch.zeros_like(pooled))
        assert torch.equal(negative["added_cond_kwargs"]["time_ids"], XL_TIME_IDS)
        assert cond["guidance_scale"] == GUIDANCE
    assert not torch.equal(_xl_embeds(xl_pipe, SOURCE)[1], _xl_embeds(xl_pipe, TARGET)[1])


def _timesteps(records):
    """The distinct timesteps of the unet (transformer) calls ``_unet_kwargs`` recorded."""
    return {float(t) for record in records for t in record["timestep"]}


def _unet_kwargs(unet):
    """A list that receives the keyword arguments of each unet call, and the hook's handle."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "return_dict"})

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "prompt, negative, zeros, size, guidance",
    [
        (SOURCE, "", True, (16, 16), GUIDANCE),
        (SOURCE, "a photo of a fox", False, (16, 16), GUIDANCE),
        (SOURCE, "", False, (16, 16), GUIDANCE),
        # A negative prompt is embedded under force_zeros_for_empty_prompt too; a non-square
        # image's time ids are (H, W, 0, 0, H, W), height first, as diffusers' original_size.
        (SOURCE, "a photo of a fox", True, (16, 24), GUIDANCE),
        # One prompt and one negative prompt per image.
        ([SOURCE, "a photo of a fox"], ["a red cat", "blue"], True, (24, 16), GUIDANCE),
        # No guidance: the conditional branch alone.
        ([SOURCE, "a photo of a fox"], None, True, (16, 16), 1),
    ],
)
def test_sdxl_unet_sees_what_the_sdxl_pipeline_gives_it(
    xl_pipe, image, prompt, negative, zeros, size, guidance
):
    """One denoising step of StableDiffusionXLPipeline.__call__ and edit_image's first unet
    call receive the same encoder_hidden_states, text_embeds and time_ids, bit for bit: the
    batch [negative, positive] under guidance, the positive alone without. The pipeline's
    default negative (None: zeros under force_zeros_for_empty_prompt, else the embedding of
    "") is edit_image's ""; any other negative prompt is embedded by both."""
    height, width = size
    batch = len(prompt) if isinstance(prompt, list) else 1
    rows = 2 * batch if guidance != 1 else batch
    pixels = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(5))
    calls, handle = _unet_kwargs(xl_pipe.unet)
    xl_pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
    try:
        with torch.no_grad():
            xl_pipe(
                prompt,
                negative_prompt=negative or None,
                height=height,
                width=width,
                num_inference_steps=1,
                guidance_scale=guidance,
                output_type="latent",
            )
        edit_image(
            xl_pipe,
            pixels * 2 - 1,
            prompt,
            TARGET,
            num_inference_steps=2,
            guidance_scale=guidance,
            negative_prompt=negative,
        )
    finally:
        handle.remove()
        xl_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    theirs, ours = calls[0], calls[1]
    assert theirs["encoder_hidden_states"].shape == (rows, 16, 24)
    assert torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    for key in ("text_embeds", "time_ids"):
        assert torch.equal(ours["added_cond_kwargs"][key], theirs["added_cond_kwargs"][key]), key
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    assert torch.equal(theirs["added_cond_kwargs"]["time_ids"], time_ids.expand(rows, 6))
    zeroed = bool((ours["added_cond_kwargs"]["text_embeds"][:batch] == 0).all())
    assert zeroed == (zeros and negative == "" and guidance != 1)


def test_sdxl_edit_is_a_hand_run_regenerate_under_the_target(xl_pipe, image, xl_result):
    """Every stage by hand, with the unet's added_cond_kwargs given to from_diffusers."""
    ts = diffusers_grid(xl_pipe.scheduler, STEPS)
    assert torch.equal(xl_result.inversion.ts, ts)

    def ode(prompt):
        embeds, pooled = _xl_embeds(xl_pipe, prompt)
        negative = {
            "encoder_hidden_states": torch.zeros_like(embeds),
            "added_cond_kwargs": _added(torch.zeros_like(pooled), XL_TIME_IDS),
        }
        return from_diffusers(
            xl_pipe.unet,
            xl_pipe.scheduler,
            encoder_hidden_states=embeds,
            added_cond_kwargs=_added(pooled, XL_TIME_IDS),
            guidance_scale=GUIDANCE,
            negative_cond=negative,
        )

    with torch.no_grad():
        latents = xl_pipe.vae.encode(image).latent_dist.mean.double()
    latents = latents * xl_pipe.vae.config.scaling_factor
    solver = bdia.bdia(bdia.get_solver("ddim"), 0.96)
    inversion = bdia.Inversion.of(ode(SOURCE), solver, latents, ts, state_dtype=torch.float64)
    assert torch.equal(inversion.noise, xl_result.inversion.noise)
    assert torch.equal(inversion.regenerate(ode(TARGET), rule="base"), xl_result.edited_latents)
    assert rel(xl_result.edited_latents, xl_result.reconstructed_latents) > 0.1


@pytest.mark.parametrize("change", ["text_embeds", "time_ids"])
def test_sdxl_added_conditioning_reaches_the_unet(xl_pipe, xl_result, change):
    """The source ODE's eps changes when only its pooled embeddings, or only its time ids
    (an original size of 32 x 32), change: the unet reads both."""
    cond = xl_result.inversion.ode.cond
    added = dict(cond["added_cond_kwargs"])
    if change == "text_embeds":
        added["text_embeds"] = _xl_embeds(xl_pipe, TARGET)[1]
    else:
        added["time_ids"] = torch.tensor([[32.0, 32.0, 0.0, 0.0, 16.0, 16.0]])
    changed = from_diffusers(
        xl_pipe.unet, xl_pipe.scheduler, **{**cond, "added_cond_kwargs": added}
    )
    x = xl_result.latents
    with torch.no_grad():
        same = xl_result.inversion.ode.evaluate(0.5, x).eps
        again = from_diffusers(xl_pipe.unet, xl_pipe.scheduler, **cond).evaluate(0.5, x).eps
        other = changed.evaluate(0.5, x).eps
    assert torch.equal(same, again)
    assert rel(other, same) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("negative", ["zeros", ""])
def test_sdxl_embeddings_as_prompts_give_the_same_edit(fresh_xl_pipe, image, xl_result, negative):
    """(prompt_embeds, pooled_prompt_embeds) pairs in place of text, and for the negative
    prompt zeros or the default "" (which is zeros): the same edit, bit for bit, with no
    tokenizer or text encoder left in the pipeline (the fresh one has the same weights)."""
    pipe = fresh_xl_pipe
    embeds, pooled = _xl_embeds(pipe, SOURCE)
    target = _xl_embeds(pipe, TARGET)
    pipe.tokenizer = pipe.tokenizer_2 = pipe.text_encoder = pipe.text_encoder_2 = None
    if negative == "zeros":
        negative = (torch.zeros_like(embeds), torch.zeros_like(pooled))
    out = edit_image(
        pipe,
        image,
        (embeds, pooled),
        target,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        negative_prompt=negative,
    )
    assert torch.equal(out.inversion.noise, xl_result.inversion.noise)
    assert torch.equal(out.edited_latents, xl_result.edited_latents)


def test_sdxl_negative_embeddings_are_used_under_force_zeros(xl_pipe, image):
    """force_zeros_for_empty_prompt stands for the empty negative prompt only: the negative
    prompt given as its (prompt_embeds, pooled_prompt_embeds) pair is used, not zeros, and
    gives the edit of the same negative prompt as text, bit for bit."""
    assert xl_pipe.config.force_zeros_for_empty_prompt
    fox = "a photo of a fox"
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    text = edit_image(xl_pipe, image[:1], SOURCE, TARGET, negative_prompt=fox, **common)
    embedded = edit_image(
        xl_pipe, image[:1], SOURCE, TARGET, negative_prompt=_xl_embeds(xl_pipe, fox), **common
    )
    negative = embedded.inversion.ode.cond["negative_cond"]
    assert bool((negative["added_cond_kwargs"]["text_embeds"] != 0).any())
    assert torch.equal(embedded.inversion.noise, text.inversion.noise)
    assert torch.equal(embedded.edited_latents, text.edited_latents)


def test_sdxl_source_and_target_prompts_give_different_edits(xl_pipe, image, xl_result):
    """The target prompt steers the edit: "a painting of a fox" from the same inverted noise
    is not "a painting of a dog" (1.0e-2 apart here, one word of a random text encoder),
    and the edit is not the reconstruction under the source prompt."""
    fox = edit_image(xl_pipe, image, SOURCE, "a painting of a fox", num_inference_steps=STEPS)
    assert torch.equal(fox.inversion.noise, xl_result.inversion.noise)  # same source
    assert rel(fox.edited_latents, xl_result.edited_latents) > 1e-3
    assert rel(xl_result.edited_latents, xl_result.reconstructed_latents) > 0.1


def _conv_in_dtypes(vae):
    """A list that receives the input dtype of each call of the VAE's encoder and decoder."""
    seen = []
    for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
        conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    return seen


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_sdxl_half_vae_with_force_upcast_is_upcast_as_the_pipelines_upcast_it(
    tmp_path, image, half
):
    """SDXL's pipelines upcast a VAE whose config says force_upcast to float32 to encode
    (img2img's prepare_latents, inpainting's _encode_vae_image), whatever its dtype, and to
    decode only where it is float16 (needs_upcasting). The float16 VAE, made to overflow
    float16 as SDXL's does (its first convolutions' weights times 2^18, NaN in float16 and
    finite in float32), encodes and decodes in float32; a bfloat16 one encodes in float32 and
    decodes in bfloat16. Either has its weights in its own dtype again afterwards, bit for
    bit."""
    pipe = tiny_sdxl_pipeline(tmp_path, vae_dtype=half)
    vae = pipe.vae
    assert vae.config.force_upcast
    if half == torch.float16:
        with torch.no_grad():
            for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
                conv.weight.mul_(2.0**18)
            assert not torch.isfinite(vae.encode(image[:1].half()).latent_dist.mean).all()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seen = _conv_in_dtypes(vae)
    out = edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=5)
    decoding = torch.float32 if half == torch.float16 else half
    assert seen == [torch.float32] + [decoding] * 3  # one encoding, three decodings
    assert torch.isfinite(out.latents).all() and torch.isfinite(out.images).all()
    assert out.latent_error < 1e-12
    assert vae.dtype == half
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


def test_a_mixed_precision_vae_comes_back_with_each_dtype_it_had(tmp_path, image):
    """A float16 VAE that keeps some layers in float32 (here its two quantisation convolutions,
    as diffusers' ``_keep_in_fp32_modules`` keeps layers) runs
    in float32 for the upcast and returns with every tensor in its own dtype, bit for bit,
    rather than all float16 as the SDXL pipeline's ``vae.to(float16)`` would leave it."""
    pipe = tiny_sdxl_pipeline(tmp_path, vae_dtype=torch.float16)
    vae = pipe.vae
    vae.quant_conv.float()
    vae.post_quant_conv.float()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    assert {v.dtype for v in before.values()} == {torch.float16, torch.float32}
    seen = _conv_in_dtypes(vae)
    out = edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=5)
    assert seen == [torch.float32] * 4  # upcast: one encoding, three decodings
    assert torch.isfinite(out.images).all()
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", ["sdxl without force_upcast", "stable diffusion"])
def test_a_float16_vae_runs_in_float16_where_the_pipeline_runs_it_so(tmp_path, image, kind):
    """The float32 upcast is the SDXL pipeline's and only where the VAE's config says
    force_upcast: a float16 SDXL VAE with force_upcast=False (a float16-safe one), and a
    float16 VAE in a Stable Diffusion pipeline (whose pipeline never upcasts), encode and
    decode in float16."""
    if kind == "stable diffusion":
        pipe = tiny_text_to_image_pipeline(tmp_path)
        pipe.vae.half()
        assert pipe.vae.config.force_upcast
    else:
        pipe = tiny_sdxl_pipeline(
            tmp_path, vae_dtype=torch.float16, vae_config=dict(force_upcast=False)
        )
    seen = _conv_in_dtypes(pipe.vae)
    out = edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=5)
    assert seen == [torch.float16] * 4  # one encoding, three decodings
    assert pipe.vae.dtype == torch.float16
    assert torch.isfinite(out.images).all() and out.latent_error < 1e-12


def test_sdxl_float16_vae_is_float16_again_after_an_error(tmp_path, image):
    """A decoding that fails (an interrupt, say) leaves the upcast VAE float16 again, bit for
    bit, as a successful one does."""
    pipe = tiny_sdxl_pipeline(tmp_path, vae_dtype=torch.float16)
    vae = pipe.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}

    def fail(*args, **kwargs):
        assert vae.dtype == torch.float32  # upcast at the time
        raise KeyboardInterrupt

    vae.decode = fail
    with pytest.raises(KeyboardInterrupt):
        edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=5)
    assert vae.dtype == torch.float16
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "make, ode_dtype",
    # A Playground-style pipeline (EDM-preconditioned scheduler): the ODE's model_dtype is
    # float32, as the denoiser's skip path runs on the float32 state; the unet itself gets
    # c_in x in float16 (ode.f.unet_dtype).
    [(tiny_sdxl_pipeline, torch.float16), (tiny_playground_pipeline, torch.float32)],
    ids=["sdxl", "playground"],
)
def test_sdxl_float16_unet_under_a_float32_state(tmp_path, image, make, ode_dtype):
    """A float16 SDXL unet gets its embeddings, pooled embeddings and time ids in float16 (as
    the float16 SDXL pipeline gives them) while the state stays float32; the round trip is
    as exact as with a float32 unet (the tolerance of the float32 state above; measured 0)."""
    pipe = make(tmp_path)
    pipe.unet.half()
    calls, handle = _unet_kwargs(pipe.unet)
    try:
        out = edit_image(
            pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, state_dtype=torch.float32
        )
    finally:
        handle.remove()
    assert out.inversion.ode.model_dtype == ode_dtype
    # The EDM denoiser casts c_in x to the unet's dtype itself.
    assert out.inversion.ode.f.unet_dtype == (torch.float16 if ode_dtype != torch.float16 else None)
    assert out.latents.dtype == torch.float32
    added = calls[0]["added_cond_kwargs"]
    assert calls[0]["encoder_hidden_states"].dtype == torch.float16
    assert added["text_embeds"].dtype == added["time_ids"].dtype == torch.float16
    assert torch.equal(added["time_ids"][0], XL_TIME_IDS[0].half())
    assert out.latent_error < 1e-5


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("one tensor", "pooled embeddings"),
        ("pooled dim", "pooled embeddings, have dim 5"),
        ("pooled batch", "must have shape (1 or 2, dim), got (3, 8)"),
        ("no text_encoder_2", "text_encoder_2"),
        ("refiner", "aesthetic score"),
        ("text_image", "addition_embed_type = 'text_image'"),
    ],
)
def test_sdxl_inputs_that_cannot_run_are_refused_in_one_line(fresh_xl_pipe, image, kind, fragment):
    from bdia.integrations.diffusers.tiny import tiny_unet

    pipe, source = fresh_xl_pipe, SOURCE
    if kind == "one tensor":
        source = _xl_embeds(pipe, SOURCE)[0]
    elif kind == "pooled dim":
        embeds, pooled = _xl_embeds(pipe, SOURCE)
        source = (embeds, pooled[:, :5])
    elif kind == "pooled batch":
        embeds, pooled = _xl_embeds(pipe, SOURCE)
        source = (embeds, pooled.expand(3, -1))
    elif kind == "no text_encoder_2":
        pipe.text_encoder_2 = None
    elif kind == "refiner":  # five time ids' width beside the pooled embeddings
        pipe.unet = tiny_unet(
            conditional=True,
            channels=4,
            cross_attention_dim=24,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8 + 5 * 4,
        )
    else:
        pipe.unet = tiny_unet(
            conditional=True, channels=4, cross_attention_dim=24, addition_embed_type="text_image"
        )
    assert fragment in _refused(pipe, image, source)


# ------------------------------------------------- VAE latent statistics (SDXL's)

# Per-channel statistics, distinct in every channel so that a channel mixed up or a broadcast
# over the wrong dimension shows, and none a power of two so that float32 rounds them.
LATENTS_MEAN = (-0.3, 0.7, -1.1, 1.9)
LATENTS_STD = (1.7, 0.6, 2.3, 0.9)


def _stats_pipe(folder, **config):
    """The tiny SDXL pipeline with ``config`` added to its VAE's (the same weights)."""
    return tiny_sdxl_pipeline(folder, vae_config=config)


def _diffusers_stat(values, like):
    """A statistic as diffusers' SDXL pipelines build it: torch.tensor of the config's values
    (float32), viewed per channel, cast to the latents' device and dtype."""
    return torch.tensor(values).view(1, 4, 1, 1).to(like.device, like.dtype)


def test_vae_latent_statistics_encode_and_decode_as_the_sdxl_pipelines(
    tmp_path, image, xl_result, monkeypatch
):
    """A VAE whose config sets latents_mean and latents_std (Playground v2.5's does): with a
    float32 state, edit_image's latents are bit for bit what StableDiffusionXLImg2ImgPipeline's
    prepare_latents makes of the image (its sampling of the latent distribution replaced by
    the mean, which edit_image takes), and its decoded edit is bit for bit the image that
    StableDiffusionXLPipeline decodes from the edited latents."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img

    pipe = _stats_pipe(tmp_path, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    out = edit_image(
        pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, state_dtype=torch.float32
    )
    # Another latent space than the plain one (scaling_factor alone): the unet sees it.
    assert rel(out.latents.double(), xl_result.latents) > 0.1

    monkeypatch.setattr(
        pipeline_stable_diffusion_xl_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean,
    )
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, add_watermarker=False)
    with torch.no_grad():
        theirs = img2img.prepare_latents(image, None, 2, 1, torch.float32, "cpu", add_noise=False)
    assert torch.equal(out.latents, theirs)

    # The pipeline decodes whatever latents its last step ends with: the edited latents here.
    with torch.no_grad():
        decoded = pipe(
            SOURCE,
            height=16,
            width=16,
            num_inference_steps=1,
            guidance_scale=1,
            output_type="pt",
            callback_on_step_end=lambda p, i, t, kwargs: {"latents": out.edited_latents},
        ).images
    # Its images are (x / 2 + 0.5).clamp(0, 1), edit_image's x.clamp(-1, 1): exact maps.
    assert torch.equal(decoded, out.images / 2 + 0.5)


def test_vae_latent_statistics_round_trip_is_exact_in_latent_space(tmp_path, image, xl_result):
    """With a float64 state: the latents are diffusers' encoding of the VAE's mean, (mean -
    latents_mean) * scaling_factor / latents_std; the UNet round trip stays exact; the decoded
    reconstruction is the VAE's decoding of diffusers' formula, latents * latents_std /
    scaling_factor + latents_mean, bit for bit; and that formula undoes the encoding to
    rounding, so the VAE's error is the plain pipeline's."""
    pipe = _stats_pipe(tmp_path, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    out = edit_image(pipe, image, SOURCE, TARGET, num_inference_steps=STEPS)
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean.double()
    shift, scale = _diffusers_stat(LATENTS_MEAN, mean), _diffusers_stat(LATENTS_STD, mean)
    assert torch.equal(out.latents, (mean - shift) * sf / scale)
    assert out.latent_error < 1e-12

    def unscaled(latents):
        return latents * scale / sf + shift

    with torch.no_grad():
        by_hand = vae.decode(unscaled(out.reconstructed_latents).float()).sample.clamp(-1, 1)
    assert torch.equal(out.reconstruction, by_hand)
    # Four float64 roundings of values up to max(|mean|, |latents_mean|) = 1.9 here: 1e-15
    # relative to the mean's largest value is a few units in the last place.
    assert rel(unscaled(out.latents), mean) < 1e-15
    assert out.vae_error == pytest.approx(xl_result.vae_error, rel=1e-6)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("only", ["latents_mean", "latents_std"])
def test_one_vae_latent_statistic_alone_is_ignored_as_diffusers_does(
    tmp_path, image, xl_result, only
):
    """diffusers' SDXL pipelines apply latents_mean and latents_std only together; a config
    with one of them (the other None) encodes and decodes with scaling_factor alone: the same
    edit, bit for bit, as the plain VAE's."""
    stat = LATENTS_MEAN if only == "latents_mean" else LATENTS_STD
    out = _edited(_stats_pipe(tmp_path, **{only: stat}), image)
    assert torch.equal(out.latents, xl_result.latents)
    assert torch.equal(out.edited_latents, xl_result.edited_latents)
    assert torch.equal(out.images, xl_result.images)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (dict(latents_mean=LATENTS_MEAN[:3]), "is not 4 finite numbers"),
        (dict(latents_std=(1.0, 0.0, 1.0, 1.0)), "has a zero"),
        (dict(latents_std=(1.0, float("nan"), 1.0, 1.0)), "latents_std = (1.0, nan"),
        (dict(shift_factor=0.1), "sets shift_factor as well"),
    ],
)
def test_vae_latent_statistics_that_cannot_be_used_are_refused(tmp_path, image, config, fragment):
    stats = {"latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD, **config}
    assert fragment in _refused(_stats_pipe(tmp_path, **stats), image)


# --------------------------------------------------------------- Playground v2.5 (EDM)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "scheduler",
    [diffusers.EDMDPMSolverMultistepScheduler, diffusers.EDMEulerScheduler],
    ids=["dpm", "euler"],
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    # As for SDXL above: float64 carries ~2^-106, float32 ~2^-48 magnified by the inversion;
    # both measured 0 here.
    "state_dtype, bound",
    [(torch.float64, 1e-12), (torch.float32, 1e-5)],
)
def test_playground_unet_round_trip_under_guidance_is_exact(
    tmp_path, image, scheduler, prediction_type, state_dtype, bound
):
    """An SDXL pipeline with an EDM-preconditioned scheduler and VAE latent statistics, as
    Playground v2.5 is made, under guidance 3: the ODEs are the EDM denoiser's, the grid is
    the scheduler's sigmas down to sigma_min = 0.002, where the latents are taken (the
    denoiser cannot be evaluated at the grid's final 0, and no table has a smaller level to
    end at), so n steps of diffusers' grid are n - 1 here: 3 (n - 1) - 1 unet calls of two
    branches. The UNet round trip is exact and the reconstruction has the VAE's error."""
    pipe = tiny_playground_pipeline(tmp_path, scheduler(prediction_type=prediction_type))
    calls = Counter(pipe.unet)
    out = edit_image(
        pipe,
        image,
        SOURCE,
        TARGET,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        state_dtype=state_dtype,
    )
    grid = diffusers_grid(pipe.scheduler, STEPS)
    assert float(grid[-1]) == 0.0 and torch.equal(out.inversion.ts, grid[:-1])
    assert float(out.inversion.ts[-1]) == pytest.approx(0.002, rel=1e-6)
    assert calls.calls == 3 * (STEPS - 1) - 1
    ode = out.inversion.ode
    assert ode.prediction == "denoised" and ode.f.sigma_data == 0.5
    assert out.latent_error < bound
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert torch.isfinite(out.edited_latents).all()


def test_playground_one_step_leaves_no_step_above_sigma_min(tmp_path, image):
    """One step of an EDM scheduler is the grid [80, 0]; without its final 0 it has no step."""
    pipe = tiny_playground_pipeline(tmp_path)
    assert "leaves no step" in _refused(pipe, image, num_inference_steps=1)


# ---------------------------------------------------------------------------- SD3


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3_tokenizer"))


@pytest.fixture(scope="module")
def sd3_result(sd3_pipe, image):
    return _edited(sd3_pipe, image)


@pytest.fixture
def fresh_sd3_pipe(tmp_path):
    return tiny_sd3_pipeline(tmp_path)


def _sd3_embeds(pipe, prompt):
    """(embeds, pooled) of ``prompt`` by the SD3 pipeline's encode_prompt."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, device="cpu", do_classifier_free_guidance=False
        )
    return embeds, pooled


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("steps", [STEPS, 28])
@pytest.mark.parametrize(
    "state_dtype, bound",
    # As for Stable Diffusion above: float64 carries ~2^-106 and gives exactly 0 here; a
    # float32 state carries ~2^-48, magnified by prod(1/gamma) and guidance 7.5, and the
    # transformer's float32 inputs may round to neighbouring words in the two directions, so
    # 1e-5 (the top of the float32 range of the docs' round trips). Measured: 0 in both.
    [(torch.float64, 1e-12), (torch.float32, 1e-5)],
)
def test_sd3_transformer_round_trip_under_guidance_is_exact(
    sd3_pipe, image, steps, state_dtype, bound
):
    """BDIA over Euler under CFG 7.5 on an SD3 pipeline: the grid is the pipeline's `steps`
    sigmas, from 1 (pure noise) down, and its final 0, where the flow transformer is
    evaluated and the latents are taken; reconstruct() returns the latents."""
    out = edit_image(
        sd3_pipe,
        image,
        SOURCE,
        TARGET,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        state_dtype=state_dtype,
    )
    assert torch.equal(out.inversion.ts, diffusers_grid(sd3_pipe.scheduler, steps))
    assert len(out.inversion.ts) == steps + 1
    assert float(out.inversion.ts[0]) == 1.0 and float(out.inversion.ts[-1]) == 0.0
    assert out.inversion.solver.identity == "bdia(euler, gamma=0.96)"
    assert isinstance(out.inversion.ode.schedule, bdia.RectifiedFlow)
    assert out.latents.dtype == out.reconstructed_latents.dtype == state_dtype
    assert out.latent_error < bound
    assert out.latent_error == pytest.approx(rel(out.reconstructed_latents, out.latents), rel=1e-6)
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert torch.isfinite(out.edited_latents).all()


def test_sd3_edit_is_a_hand_run_regenerate_under_the_target(sd3_pipe, image, sd3_result):
    """Every stage by hand: the VAE's mean less shift_factor, times scaling_factor; the
    pipeline's encode_prompt (the negative prompt "" embedded, as the pipeline does);
    from_diffusers with encoder_hidden_states and pooled_projections; diffusers' sigmas
    and their final 0; Inversion.of with bdia(euler, 0.96); regenerate(target)."""
    negative, negative_pooled = _sd3_embeds(sd3_pipe, "")

    def ode(prompt):
        embeds, pooled = _sd3_embeds(sd3_pipe, prompt)
        return from_diffusers(
            sd3_pipe.transformer,
            sd3_pipe.scheduler,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            guidance_scale=GUIDANCE,
            negative_cond={
                "encoder_hidden_states": negative,
                "pooled_projections": negative_pooled,
            },
        )

    config = sd3_pipe.vae.config
    assert config.shift_factor != 0
    with torch.no_grad():
        mean = sd3_pipe.vae.encode(image).latent_dist.mean.double()
    latents = (mean - config.shift_factor) * config.scaling_factor
    assert torch.equal(sd3_result.latents, latents)
    ts = diffusers_grid(sd3_pipe.scheduler, STEPS)
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    inversion = bdia.Inversion.of(ode(SOURCE), solver, latents, ts, state_dtype=torch.float64)
    assert torch.equal(inversion.noise, sd3_result.inversion.noise)
    assert torch.equal(inversion.regenerate(ode(TARGET), rule="base"), sd3_result.edited_latents)
    assert rel(sd3_result.edited_latents, sd3_result.reconstructed_latents) > 0.1


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "prompt, negative, size, guidance, config",
    [
        (SOURCE, "", (16, 16), GUIDANCE, dict(shift=3.0)),
        (SOURCE, "a photo of a fox", (16, 24), GUIDANCE, dict(shift=3.0)),
        # One prompt and one negative prompt per image.
        ([SOURCE, "a photo of a fox"], ["a red cat", "blue"], (24, 16), GUIDANCE, dict(shift=3.0)),
        # No guidance: the conditional branch alone.
        ([SOURCE, "a photo of a fox"], None, (16, 16), 1, dict(shift=3.0)),
        # Dynamic shifting: the pipeline's mu of 16 and of 24 patches.
        (SOURCE, "", (16, 16), GUIDANCE, dict(use_dynamic_shifting=True)),
        (SOURCE, "", (24, 16), GUIDANCE, dict(use_dynamic_shifting=True)),
    ],
)
def test_sd3_transformer_sees_what_the_sd3_pipeline_gives_it(
    tmp_path, prompt, negative, size, guidance, config
):
    """StableDiffusion3Pipeline.__call__ and edit_image (float32 state) give the transformer
    the same encoder_hidden_states and pooled_projections, bit for bit: the batch [negative,
    positive] under guidance, the positive alone without; the pipeline's default negative
    prompt (None, embedded as "") is edit_image's "". And at the same timesteps: edit_image's
    grid is the sigmas the pipeline ran on (with dynamic shifting, after the mu it computes
    from the image's size) and their final 0, and its three runs call the transformer at
    exactly the pipeline's float32 timesteps and, once, at timestep 0, where the inversion
    starts from the latents (the pipeline never evaluates there)."""
    pipe = tiny_sd3_pipeline(
        tmp_path, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**config)
    )
    height, width = size
    batch = len(prompt) if isinstance(prompt, list) else 1
    rows = 2 * batch if guidance != 1 else batch
    pixels = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(5))
    calls, handle = _unet_kwargs(pipe.transformer)
    try:
        with torch.no_grad():
            pipe(
                prompt,
                negative_prompt=negative or None,
                height=height,
                width=width,
                num_inference_steps=STEPS,
                guidance_scale=guidance,
                output_type="latent",
            )
        theirs, sigmas = list(calls), pipe.scheduler.sigmas.tolist()
        calls.clear()
        out = edit_image(
            pipe,
            pixels * 2 - 1,
            prompt,
            TARGET,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            negative_prompt=negative,
            state_dtype=torch.float32,
        )
    finally:
        handle.remove()
    ours = calls
    # 16 CLIP tokens, then T5's place, zeros without T5 (as the pipeline's; 256 tokens from
    # diffusers 0.35, 16 before).
    embeds = theirs[0]["encoder_hidden_states"]
    assert embeds.shape[0] == rows and embeds.shape[1] > 16 and embeds.shape[2] == 16
    assert not embeds[:, 16:].any()
    for key in ("encoder_hidden_states", "pooled_projections"):
        assert torch.equal(ours[0][key], theirs[0][key]), key
    assert theirs[0]["joint_attention_kwargs"] is None and "joint_attention_kwargs" not in ours[0]
    assert out.inversion.ts.tolist() == sigmas and sigmas[-1] == 0.0
    # STEPS steps to invert (the first from t = 0), one fewer evaluation to reconstruct from
    # the pair (none at t = 0), STEPS to edit.
    assert len(theirs) == STEPS and len(ours) == 3 * STEPS - 1

    assert all(record["timestep"].dtype == torch.float32 for record in ours)
    assert _timesteps(ours) == _timesteps(theirs) | {0.0} and len(_timesteps(theirs)) == STEPS
    assert 0.0 not in _timesteps(theirs)
    assert sum(0.0 in record["timestep"].tolist() for record in ours) == 1


def test_sd3_vae_encodes_and_decodes_as_the_sd3_pipelines(sd3_pipe, image, sd3_result, monkeypatch):
    """With a float32 state, edit_image's latents are bit for bit what
    StableDiffusion3Img2ImgPipeline's prepare_latents makes of the image, (mean - shift_factor)
    * scaling_factor (its sample of the latent distribution replaced by the mean, which
    edit_image takes, and its noising by none), and its decoded edit is bit for bit the image
    StableDiffusion3Pipeline decodes from the edited latents, latents / scaling_factor +
    shift_factor. With a float64 state the reconstruction is the VAE's decoding of that map
    in float64, bit for bit."""
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img

    out = edit_image(
        sd3_pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, state_dtype=torch.float32
    )
    monkeypatch.setattr(
        pipeline_stable_diffusion_3_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean,
    )
    img2img = diffusers.StableDiffusion3Img2ImgPipeline(**sd3_pipe.components)
    monkeypatch.setattr(img2img.scheduler, "scale_noise", lambda sample, timestep, noise: sample)
    with torch.no_grad():
        theirs = img2img.prepare_latents(image, None, 2, 1, torch.float32, "cpu")
    assert torch.equal(out.latents, theirs)

    # The pipeline decodes whatever latents its last step ends with: the edited latents here.
    with torch.no_grad():
        decoded = sd3_pipe(
            SOURCE,
            height=16,
            width=16,
            num_inference_steps=1,
            guidance_scale=1,
            output_type="pt",
            callback_on_step_end=lambda p, i, t, kwargs: {"latents": out.edited_latents},
        ).images
    # Its images are (x / 2 + 0.5).clamp(0, 1), edit_image's x.clamp(-1, 1): exact maps.
    assert torch.equal(decoded, out.images / 2 + 0.5)

    config = sd3_pipe.vae.config
    z = sd3_result.reconstructed_latents / config.scaling_factor + config.shift_factor
    with torch.no_grad():
        by_hand = sd3_pipe.vae.decode(z.float()).sample.clamp(-1, 1)
    assert torch.equal(sd3_result.reconstruction, by_hand)


def test_sd3_embeddings_as_prompts_give_the_same_edit(fresh_sd3_pipe, image, sd3_result):
    """(prompt_embeds, pooled_prompt_embeds) pairs in place of text, the negative prompt's
    included, give the same edit, bit for bit, with no tokenizer or text encoder left in the
    pipeline (the fresh one has the same weights)."""
    pipe = fresh_sd3_pipe
    source, target, negative = (_sd3_embeds(pipe, p) for p in (SOURCE, TARGET, ""))
    pipe.tokenizer = pipe.tokenizer_2 = pipe.text_encoder = pipe.text_encoder_2 = None
    out = edit_image(
        pipe,
        image,
        source,
        target,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        negative_prompt=negative,
    )
    assert torch.equal(out.inversion.noise, sd3_result.inversion.noise)
    assert torch.equal(out.edited_latents, sd3_result.edited_latents)


def test_sd3_pipeline_with_a_bdia_scheduler_gives_the_same_edit(fresh_sd3_pipe, image, sd3_result):
    """A pipeline whose scheduler is the flow-matching BDIAScheduler (as one that samples
    with BDIA has) edits as with the FlowMatchEulerDiscreteScheduler it was made from."""
    from bdia.integrations.diffusers import BDIAScheduler

    fresh_sd3_pipe.scheduler = BDIAScheduler.from_config(fresh_sd3_pipe.scheduler.config)
    out = _edited(fresh_sd3_pipe, image)
    assert torch.equal(out.inversion.ts, sd3_result.inversion.ts)
    assert torch.equal(out.edited_latents, sd3_result.edited_latents)


def test_sd3_dynamic_shifting_takes_a_given_mu(tmp_path, image):
    """mu= overrides the pipeline's mu of the image's size, as the pipeline's own mu= does."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = tiny_sd3_pipeline(tmp_path, scheduler=scheduler)
    out = edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=STEPS, mu=1.5)
    assert torch.equal(out.inversion.ts, diffusers_grid(scheduler, STEPS, mu=1.5))
    assert out.latent_error < 1e-12


def test_sd3_flow_match_heun_scheduler_edits_over_its_distinct_sigmas(tmp_path, image):
    """An SD3 pipeline with FlowMatchHeunDiscreteScheduler(shift=3): edit_image runs BDIA over
    Euler, one transformer call a step, on diffusers_grid, the scheduler's STEPS distinct
    sigmas and the final 0 (not heun, which with its last euler step follows the scheduler's
    own sampling run; an edit's base solver is Euler whatever the scheduler, as DDIM is for
    Stable Diffusion). The inversion is exact: latent_error 0 with a float64 state (measured
    0). The pipeline calls the transformer 2 STEPS - 1 times (twice at each sigma but the
    first, the second its predictor's), and edit_image's three runs at exactly its float32
    timesteps and, once, at timestep 0, where the inversion starts. solver="heun" is BDIA
    over heun on the same grid, exact too (measured 0)."""
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    pipe = tiny_sd3_pipeline(tmp_path, scheduler=scheduler)
    calls, handle = _unet_kwargs(pipe.transformer)
    try:
        with torch.no_grad():
            pipe(
                SOURCE,
                height=16,
                width=16,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                output_type="latent",
            )
        theirs = list(calls)
        calls.clear()
        out = edit_image(
            pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, guidance_scale=GUIDANCE
        )
    finally:
        handle.remove()
    assert out.latent_error == 0.0
    assert out.inversion.solver.identity == "bdia(euler, gamma=0.96)"
    assert torch.equal(out.inversion.ts, diffusers_grid(scheduler, STEPS))
    assert len(out.inversion.ts) == STEPS + 1 and float(out.inversion.ts[-1]) == 0.0
    assert len(theirs) == 2 * STEPS - 1 and len(calls) == 3 * STEPS - 1

    assert len(_timesteps(theirs)) == STEPS and 0.0 not in _timesteps(theirs)
    assert _timesteps(calls) == _timesteps(theirs) | {0.0}
    heun = edit_image(pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, solver="heun")
    assert heun.inversion.solver.identity == "bdia(heun, gamma=0.96)"
    assert heun.latent_error == 0.0


class SanaTransformer2DModel(torch.nn.Module):
    """Stands in for diffusers' class of that name, a transformer edit_image does not know:
    it tells transformers apart by class, before calling any."""

    config = {"in_channels": 4}


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("ddim", "DDIMScheduler is a noise-table scheduler"),
        ("stochastic", "stochastic_sampling"),
        ("sana", "a SanaTransformer2DModel"),
        ("patch", "not a multiple of 4, the vae's downsampling factor 2 times the transformer's"),
        ("too large", "pos_embed_max_size = 8"),
        ("mu", "mu = 0.5 shifts the sigmas only with use_dynamic_shifting"),
        ("one tensor", "an SD3 transformer also needs the pooled embeddings"),
        ("pooled dim", "have dim 5, but the transformer's pooled_projection_dim is 8"),
        ("embeddings dim", "dim 8, but the transformer's joint_attention_dim is 16"),
        ("no text_encoder_2", "text_encoder_2"),
    ],
)
def test_sd3_inputs_that_cannot_run_are_refused_in_one_line(fresh_sd3_pipe, image, kind, fragment):
    pipe, source, kwargs = fresh_sd3_pipe, SOURCE, {}
    if kind == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler(clip_sample=False)
    elif kind == "stochastic":
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    elif kind == "sana":
        pipe.transformer = SanaTransformer2DModel()
    elif kind == "patch":
        image = image[:, :, :14, :]
    elif kind == "too large":  # 36 / 2 / 2 = 9 patches a side, more than the 8 it embeds
        image = torch.zeros(1, 3, 36, 36)
    elif kind == "mu":
        kwargs["mu"] = 0.5
    elif kind == "one tensor":
        source = _sd3_embeds(pipe, SOURCE)[0]
    elif kind == "pooled dim":
        embeds, pooled = _sd3_embeds(pipe, SOURCE)
        source = (embeds, pooled[:, :5])
    elif kind == "embeddings dim":
        embeds, pooled = _sd3_embeds(pipe, SOURCE)
        source = (embeds[..., :8], pooled)
    else:
        pipe.text_encoder_2 = None
    assert fragment in _refused(pipe, image, source, **kwargs)


def test_a_pipeline_without_a_unet_or_transformer_is_refused(fresh_sd3_pipe, image):
    fresh_sd3_pipe.transformer = None
    with pytest.raises(ValueError, match="neither a unet nor a transformer") as info:
        edit_image(fresh_sd3_pipe, image, SOURCE, TARGET)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- Flux


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux_tokenizer"))


@pytest.fixture
def fresh_flux_pipe(tmp_path):
    return tiny_flux_pipeline(tmp_path)


def _schnell_pipe(folder):
    """A tiny Flux.1-schnell: no guidance embedding, shift 1 without dynamic shifting."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return tiny_flux_pipeline(folder, scheduler=scheduler, guidance_embeds=False)


def _flux_embeds(pipe, prompt):
    """(embeds, pooled) of ``prompt`` by FluxPipeline's encode_prompt (its text_ids aside)."""
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, device="cpu")
    return embeds, pooled


def _flux_grid(scheduler, steps, tokens=16):
    """FluxPipeline's grid: its sigmas, with its mu for ``tokens`` packed tokens where the
    scheduler shifts dynamically."""
    mu = None
    if scheduler.config.use_dynamic_shifting:
        mu = calculate_shift(tokens)
    return diffusers_grid(scheduler, steps, mu=mu, sigmas=np.linspace(1.0, 1 / steps, steps))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("steps", [STEPS, 28])
@pytest.mark.parametrize("cfg", [None, 4.0], ids=["embedded", "true-cfg"])
@pytest.mark.parametrize(
    "state_dtype, bound",
    # As for SD3 above: float64 carries ~2^-106 and gives exactly 0 here; a float32 state
    # carries ~2^-48, magnified by prod(1/gamma) and true CFG, and the transformer's float32
    # inputs may round to neighbouring words in the two directions, so 1e-5 (the top of the
    # float32 range of the docs' round trips). Measured: 0 in all eight.
    [(torch.float64, 1e-12), (torch.float32, 1e-5)],
)
def test_flux_transformer_round_trip_is_exact(flux_pipe, image, steps, cfg, state_dtype, bound):
    """BDIA over Euler on Flux.1-dev (guidance embedding 3.5, with and without true CFG 4):
    the grid is FluxPipeline's `steps` sigmas, shifted by its mu for the 16 packed tokens,
    and the final 0; the state is the packed latents at t = 0; reconstruct() returns them."""
    out = edit_image(
        flux_pipe,
        image,
        SOURCE,
        TARGET,
        num_inference_steps=steps,
        guidance_scale=cfg,
        state_dtype=state_dtype,
    )
    assert torch.equal(out.inversion.ts, _flux_grid(flux_pipe.scheduler, steps))
    assert len(out.inversion.ts) == steps + 1
    assert float(out.inversion.ts[0]) == 1.0 and float(out.inversion.ts[-1]) == 0.0
    assert out.inversion.solver.identity == "bdia(euler, gamma=0.96)"
    assert isinstance(out.inversion.ode.schedule, bdia.RectifiedFlow)
    cond = out.inversion.ode.cond
    assert torch.equal(cond["guidance"], torch.tensor([3.5]))
    assert ("negative_cond" in cond) == (cfg is not None)
    assert out.latents.shape == (2, 16, 16)  # 4 x 8 x 8 latents in 2 x 2 patches
    assert out.latents.dtype == out.reconstructed_latents.dtype == state_dtype
    assert out.latent_error < bound
    assert out.latent_error == pytest.approx(rel(out.reconstructed_latents, out.latents), rel=1e-6)
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert torch.isfinite(out.edited_latents).all()


def test_flux_schnell_round_trip_is_exact(tmp_path, image):
    """Flux.1-schnell: no guidance embedding, no dynamic shifting (FluxPipeline's mu is
    ignored there, and edit_image computes none); 4 steps give the sigmas 1, 0.75, 0.5, 0.25
    and the final 0, and the latents are the state at 0."""
    pipe = _schnell_pipe(tmp_path)
    out = edit_image(pipe, image, SOURCE, TARGET, num_inference_steps=4)
    assert out.inversion.ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert "guidance" not in out.inversion.ode.cond
    assert out.latent_error < 1e-12


@pytest.mark.parametrize("flux", [False, True], ids=["sd3", "flux-schnell"])
def test_one_step_edits_from_the_latents_at_zero(tmp_path, image, flux):
    """One step is the grid [1, 0]: the latents at t = 0 are inverted in one base step (a
    transformer call at timestep 0), reconstructed from the pair, which holds both states,
    with no call, and edited in one step from the noise (a call at the pipeline's first
    timestep); the round trip is exact to rounding in float64."""
    pipe = _schnell_pipe(tmp_path) if flux else tiny_sd3_pipeline(tmp_path)
    calls, out = _records(
        pipe.transformer,
        lambda: edit_image(pipe, image[:1], SOURCE, TARGET, num_inference_steps=1),
    )
    assert out.inversion.ts.tolist() == [1.0, 0.0]
    steps = [set(record["timestep"].tolist()) for record in calls]
    first = pipe.scheduler.timesteps[0].item() / (1000 if flux else 1)
    assert steps == [{0.0}, {first}] and first > 0
    assert out.latent_error < 1e-12


def _records(module, run):
    """The keyword arguments of each call of ``module`` while ``run()`` runs, and its result."""
    calls, handle = _unet_kwargs(module)
    try:
        result = run()
    finally:
        handle.remove()
    return calls, result


def _flux_pipeline_call(pipe, prompt, negative, cfg, guidance, size):
    """FluxPipeline.__call__ on ``prompt`` (no image: the transformer calls are recorded)."""
    options = {} if guidance is None else {"guidance_scale": guidance}
    if cfg is not None:
        options.update(negative_prompt=negative, true_cfg_scale=cfg)
    with torch.no_grad():
        pipe(
            prompt,
            height=size[0],
            width=size[1],
            num_inference_steps=STEPS,
            output_type="latent",
            **options,
        )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "schnell, prompt, negative, cfg, guidance, size",
    [
        (False, SOURCE, "", None, None, (16, 16)),
        # Another embedded guidance, and a non-square image (its own mu and img_ids).
        (False, SOURCE, "", None, 2.0, (16, 24)),
        # True CFG: the conditional call, then the negative prompt's.
        (False, SOURCE, "a blue painting", 4.0, None, (24, 16)),
        # One prompt and one negative prompt per image.
        (False, [SOURCE, "a photo of a fox"], ["a red cat", "blue"], 4.0, 5.0, (16, 16)),
        # Schnell: no guidance embedding, no dynamic shifting.
        (True, [SOURCE, "a photo of a fox"], "", None, None, (16, 16)),
    ],
)
def test_flux_transformer_sees_what_the_flux_pipeline_gives_it(
    tmp_path, schnell, prompt, negative, cfg, guidance, size
):
    """FluxPipeline.__call__ and edit_image (float32 state) give the transformer the same
    encoder_hidden_states, pooled_projections, txt_ids, img_ids and guidance, bit for bit,
    in each of its calls (under true CFG the conditional one, then the negative one): the
    pipeline's guidance_scale is edit_image's guidance, its true_cfg_scale edit_image's
    guidance_scale. And at the same timesteps: edit_image's grid is the sigmas the pipeline
    ran on (after the mu it computes from the token count) and their final 0, and its three
    runs call the transformer at exactly the pipeline's timesteps and, once (in each branch),
    at timestep 0, where the inversion starts from the latents."""
    pipe = _schnell_pipe(tmp_path) if schnell else tiny_flux_pipeline(tmp_path)
    height, width = size
    batch = len(prompt) if isinstance(prompt, list) else 1
    pixels = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(5))
    theirs, _ = _records(
        pipe.transformer, lambda: _flux_pipeline_call(pipe, prompt, negative, cfg, guidance, size)
    )
    sigmas = pipe.scheduler.sigmas.tolist()
    options = dict(guidance_scale=cfg, guidance=guidance, negative_prompt=negative)
    ours, out = _records(
        pipe.transformer,
        lambda: edit_image(
            pipe,
            pixels * 2 - 1,
            prompt,
            TARGET,
            num_inference_steps=STEPS,
            state_dtype=torch.float32,
            **options,
        ),
    )
    branches = 1 if cfg is None else 2
    # STEPS steps to invert (the first from t = 0), one fewer evaluation to reconstruct from
    # the pair (none at t = 0), STEPS to edit.
    assert len(theirs) == branches * STEPS and len(ours) == branches * (3 * STEPS - 1)
    tokens = (height // 4) * (width // 4)
    # The pipeline's T5 default of 512 tokens, and its packed latents.
    assert theirs[0]["encoder_hidden_states"].shape == (batch, 512, 16)
    assert theirs[0]["img_ids"].shape == (tokens, 3)
    assert ours[0]["hidden_states"].shape == (batch, tokens, 16)
    for k in range(branches):
        for key in ("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids"):
            assert torch.equal(ours[k][key], theirs[k][key]), (k, key)
        if schnell:
            assert theirs[k]["guidance"] is None and "guidance" not in ours[k]
        else:
            expected = torch.full([batch], 3.5 if guidance is None else guidance)
            assert torch.equal(theirs[k]["guidance"], expected)
            assert torch.equal(ours[k]["guidance"], expected)
    if cfg is not None:  # the two branches differ
        assert not torch.equal(ours[1]["encoder_hidden_states"], ours[0]["encoder_hidden_states"])
    # The pipeline passes an empty joint_attention_kwargs; edit_image none.
    assert theirs[0]["joint_attention_kwargs"] == {} and "joint_attention_kwargs" not in ours[0]
    assert out.inversion.ts.tolist() == sigmas and sigmas[-1] == 0.0
    assert all(record["timestep"].dtype == torch.float32 for record in ours)
    timesteps = [{float(t) for record in run for t in record["timestep"]} for run in (ours, theirs)]
    assert timesteps[0] == timesteps[1] | {0.0} and len(timesteps[1]) == STEPS
    assert 0.0 not in timesteps[1]
    assert sum(0.0 in record["timestep"].tolist() for record in ours) == branches


def test_flux_vae_encodes_and_decodes_as_the_flux_pipelines(flux_pipe, image, monkeypatch):
    """With a float32 state, edit_image's latents are bit for bit what FluxImg2ImgPipeline's
    prepare_latents makes of the image: (mean - shift_factor) * scaling_factor packed by
    _pack_latents (its sample of the latent distribution replaced by the mean, which
    edit_image takes, and its noising by none). Its decoded edit is bit for bit the image
    FluxPipeline decodes from the edited latents (_unpack_latents, then latents /
    scaling_factor + shift_factor). With a float64 state the reconstruction is the VAE's
    decoding of that map in float64, bit for bit."""
    from diffusers.pipelines.flux import pipeline_flux_img2img

    out = edit_image(
        flux_pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, state_dtype=torch.float32
    )
    monkeypatch.setattr(
        pipeline_flux_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean,
    )
    img2img = diffusers.FluxImg2ImgPipeline(**flux_pipe.components)
    monkeypatch.setattr(img2img.scheduler, "scale_noise", lambda sample, timestep, noise: sample)
    with torch.no_grad():
        theirs, _ = img2img.prepare_latents(image, None, 2, 4, 16, 16, torch.float32, "cpu", None)
    assert theirs.shape == (2, 16, 16)
    assert torch.equal(out.latents, theirs)

    # The pipeline decodes whatever latents its last step ends with: the edited latents here.
    with torch.no_grad():
        decoded = flux_pipe(
            SOURCE,
            height=16,
            width=16,
            num_inference_steps=1,
            output_type="pt",
            callback_on_step_end=lambda p, i, t, kwargs: {"latents": out.edited_latents},
        ).images
    # Its images are (x / 2 + 0.5).clamp(0, 1), edit_image's x.clamp(-1, 1): exact maps.
    assert torch.equal(decoded, out.images / 2 + 0.5)

    double = edit_image(flux_pipe, image, SOURCE, TARGET, num_inference_steps=STEPS)
    config = flux_pipe.vae.config
    z = flux_pipe._unpack_latents(double.reconstructed_latents, 16, 16, 2)
    z = z / config.scaling_factor + config.shift_factor
    with torch.no_grad():
        by_hand = flux_pipe.vae.decode(z.float()).sample.clamp(-1, 1)
    assert torch.equal(double.reconstruction, by_hand)


def test_flux_edit_is_a_hand_run_regenerate_under_the_target(flux_pipe, image):
    """Every stage by hand, under true CFG: the packed latents; the pipeline's encode_prompt
    (the negative prompt "" embedded); from_diffusers with its text_ids, the pipeline's
    img_ids and the guidance embedding 3.5; FluxPipeline's sigmas and the final 0;
    Inversion.of with bdia(euler, 0.96); regenerate(target)."""
    out = edit_image(flux_pipe, image, SOURCE, TARGET, num_inference_steps=STEPS, guidance_scale=4)
    img_ids = flux_pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)

    def encoded(prompt):
        with torch.no_grad():
            embeds, pooled, text_ids = flux_pipe.encode_prompt(prompt, None, device="cpu")
        return dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids)

    def ode(prompt):
        return from_diffusers(
            flux_pipe.transformer,
            flux_pipe.scheduler,
            **encoded(prompt),
            img_ids=img_ids,
            guidance=3.5,
            guidance_scale=4,
            negative_cond=encoded(""),
        )

    config = flux_pipe.vae.config
    with torch.no_grad():
        mean = flux_pipe.vae.encode(image).latent_dist.mean.double()
    latents = flux_pipe._pack_latents(
        (mean - config.shift_factor) * config.scaling_factor, 2, 4, 8, 8
    )
    assert torch.equal(out.latents, latents)
    ts = _flux_grid(flux_pipe.scheduler, STEPS)
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    inversion = bdia.Inversion.of(ode(SOURCE), solver, latents, ts, state_dtype=torch.float64)
    assert torch.equal(inversion.noise, out.inversion.noise)
    assert torch.equal(inversion.regenerate(ode(TARGET), rule="base"), out.edited_latents)
    assert rel(out.edited_latents, out.reconstructed_latents) > 0.1


def test_flux_embeddings_as_prompts_give_the_same_edit(fresh_flux_pipe, flux_pipe, image):
    """(prompt_embeds, pooled_prompt_embeds) pairs in place of text, the negative prompt's
    included, give the same edit, bit for bit, with no tokenizer or text encoder left in the
    pipeline (the fresh one has the same weights): encode_prompt makes their text_ids."""
    common = dict(num_inference_steps=STEPS, guidance_scale=4.0)
    ref = edit_image(flux_pipe, image, SOURCE, TARGET, negative_prompt="a blue painting", **common)
    pipe = fresh_flux_pipe
    source, target, negative = (_flux_embeds(pipe, p) for p in (SOURCE, TARGET, "a blue painting"))
    pipe.tokenizer = pipe.tokenizer_2 = pipe.text_encoder = pipe.text_encoder_2 = None
    out = edit_image(pipe, image, source, target, negative_prompt=negative, **common)
    assert torch.equal(out.inversion.noise, ref.inversion.noise)
    assert torch.equal(out.edited_latents, ref.edited_latents)


def test_flux_pipeline_with_a_bdia_scheduler_gives_the_same_edit(fresh_flux_pipe, flux_pipe, image):
    """A FluxPipeline whose scheduler is the flow-matching BDIAScheduler made from its own
    edits as with the FlowMatchEulerDiscreteScheduler."""
    from bdia.integrations.diffusers import BDIAScheduler

    ref = edit_image(flux_pipe, image, SOURCE, TARGET, num_inference_steps=STEPS)
    pipe = fresh_flux_pipe
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config)
    out = edit_image(pipe, image, SOURCE, TARGET, num_inference_steps=STEPS)
    assert torch.equal(out.inversion.ts, ref.inversion.ts)
    assert torch.equal(out.edited_latents, ref.edited_latents)


def test_flux_dynamic_shifting_takes_a_given_mu(flux_pipe, image):
    """mu= overrides FluxPipeline's mu of the token count."""
    out = edit_image(flux_pipe, image[:1], SOURCE, TARGET, num_inference_steps=STEPS, mu=1.5)
    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
    expected = diffusers_grid(flux_pipe.scheduler, STEPS, mu=1.5, sigmas=sigmas)
    assert torch.equal(out.inversion.ts, expected)
    assert not torch.equal(out.inversion.ts, _flux_grid(flux_pipe.scheduler, STEPS))
    assert out.latent_error < 1e-12


@pytest.mark.parametrize("size", [(8, 8), (8, 12), (128, 128), (64, 96), (192, 192)])
def test_flux_mu_is_the_pipelines_calculate_shift(size):
    """The default mu is FluxPipeline's calculate_shift of the packed token count, bit for
    bit, with the scheduler config's fields or, where it lacks them, the pipeline's defaults
    (max_shift 1.15, where SD3's pipeline has 1.16)."""
    from bdia.integrations.diffusers.editing import _FLUX_SHIFT_FIELDS, _pipeline_mu

    tokens = (size[0] // 2) * (size[1] // 2)
    config = dict(base_image_seq_len=128, max_image_seq_len=8192, base_shift=0.25, max_shift=2.0)
    assert _pipeline_mu({}, size, 2, _FLUX_SHIFT_FIELDS) == calculate_shift(tokens)
    assert _pipeline_mu(config, size, 2, _FLUX_SHIFT_FIELDS) == calculate_shift(
        tokens, 128, 8192, 0.25, 2.0
    )
    assert _pipeline_mu({}, size, 2) != calculate_shift(tokens)  # SD3's defaults


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("size", "not a multiple of 4, the vae's downsampling factor 2 times 2, FluxPipeline's"),
        ("schnell guidance", "guidance_embeds = False (a timestep-distilled model such as"),
        ("nan guidance", "guidance must be finite, got nan"),
        ("text guidance", "guidance must be a number, got '3.5'"),
        ("schnell mu", "mu = 0.5 shifts the sigmas only with use_dynamic_shifting"),
        ("zero steps", "num_inference_steps"),
        ("fill", "latent_channels = 4 packed in 2 x 2 patches make 16"),
        ("one tensor", "a Flux transformer also needs the pooled embeddings"),
        ("pooled dim", "have dim 5, but the transformer's pooled_projection_dim is 8"),
        ("embeddings dim", "dim 8, but the transformer's joint_attention_dim is 16"),
        ("no text_encoder_2", "text_encoder_2"),
        ("no encode_prompt", "encode_prompt"),
        ("ddim", "DDIMScheduler is a noise-table scheduler"),
        ("stochastic", "stochastic_sampling"),
        ("no negative", "negative_prompt"),
    ],
)
def test_flux_inputs_that_cannot_run_are_refused_in_one_line(
    fresh_flux_pipe, image, kind, fragment
):
    pipe, source, kwargs = fresh_flux_pipe, SOURCE, {}
    if kind == "size":  # FluxPipeline itself would resize it
        image = image[:, :, :14, :]
    elif kind == "schnell guidance":
        pipe.transformer = tiny_flux_transformer(guidance_embeds=False)
        kwargs["guidance"] = 3.5
    elif kind == "nan guidance":
        kwargs["guidance"] = float("nan")
    elif kind == "text guidance":
        kwargs["guidance"] = "3.5"
    elif kind == "schnell mu":
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
        kwargs["mu"] = 0.5
    elif kind == "zero steps":
        kwargs["num_inference_steps"] = 0
    elif kind == "fill":  # extra channels, neither a Fill mask's nor a Depth control image's
        pipe.transformer = tiny_flux_transformer(in_channels=24, out_channels=16)
    elif kind == "one tensor":
        source = _flux_embeds(pipe, SOURCE)[0]
    elif kind == "pooled dim":
        embeds, pooled = _flux_embeds(pipe, SOURCE)
        source = (embeds, pooled[:, :5])
    elif kind == "embeddings dim":
        embeds, pooled = _flux_embeds(pipe, SOURCE)
        source = (embeds[..., :8], pooled)
    elif kind == "no text_encoder_2":
        pipe.text_encoder_2 = None
    elif kind == "no encode_prompt":  # embeddings: encode_prompt makes their text_ids
        source = _flux_embeds(pipe, SOURCE)
        pipe.encode_prompt = None
    elif kind == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler(clip_sample=False)
    elif kind == "stochastic":
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    else:
        kwargs.update(guidance_scale=4.0, negative_prompt=None)
    assert fragment in _refused(pipe, image, source, **kwargs)


def test_guidance_and_flux_transformers_elsewhere_are_refused(fresh_sd3_pipe, fresh_pipe, image):
    """The embedded guidance is refused for a network that embeds none (SD3's transformer, a
    unet); a Flux transformer in a pipeline that cannot pack its latents (an SD3 pipeline) is
    refused for the missing _pack_latents."""
    for pipe in (fresh_sd3_pipe, fresh_pipe):
        message = _refused(pipe, image, guidance=3.5)
        assert "guidance is the guidance scale Flux.1-dev's transformer embeds" in message
    fresh_sd3_pipe.transformer = tiny_flux_transformer()
    assert "has no _pack_latents" in _refused(fresh_sd3_pipe, image)


# ------------------------------------------------------------------ a device without float64


def _image(seed=0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _on_pretend_mps(pipe, monkeypatch):
    """``pipe`` as if placed on MPS (pretended on the CPU by ``fake_mps``): edit_image puts
    the image, the latents and the conditioning on its execution device."""
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("mps")))
    return pipe


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "build",
    [tiny_text_to_image_pipeline, tiny_sdxl_pipeline, tiny_sd3_pipeline, tiny_flux_pipeline],
    ids=["sd", "sdxl", "sd3", "flux"],
)
def test_on_a_device_without_float64_the_state_is_float32_and_steps_read_only_their_check(
    build, tmp_path, monkeypatch
):
    """On MPS, which has no float64, edit_image's state is float32 by default, and no float64
    tensor is made there (its errors too are formed in float32): the edit used to make its
    state float64 and fail there. Each step of the three runs (invert, reconstruct,
    regenerate) reads back from the device only its finite check, one step late: four more
    steps read back twelve more values, each that bool. An explicit float64 state is refused
    there before any work."""
    from conftest import device_reads, fake_mps

    pipe = _on_pretend_mps(build(tmp_path), monkeypatch)
    reads = []
    for steps in (4, 8):
        with fake_mps(monkeypatch), device_reads() as seen:
            result = edit_image(
                pipe, _image(), SOURCE, TARGET, num_inference_steps=steps, output_type="pt"
            )
            assert result.edited_latents.device.type == "mps"  # the pretend device's tensor
        assert result.latents.dtype == result.edited_latents.dtype == torch.float32
        reads.append(collections.Counter(seen))
    assert reads[1] - reads[0] == collections.Counter({"__bool__": 12}), reads
    assert reads[0] - reads[1] == collections.Counter()
    with fake_mps(monkeypatch), pytest.raises(ValueError, match="which has no torch.float64"):
        edit_image(pipe, _image(), SOURCE, TARGET, state_dtype=torch.float64)
