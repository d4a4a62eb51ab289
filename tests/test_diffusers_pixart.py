"""PixArt-alpha and PixArt-Sigma: ``PixArtTransformer2DModel`` under its noise table, called
as ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` call it (the timestep by keyword, the
prompt's attention mask, the micro-conditions, the learned variance's half dropped)."""

from __future__ import annotations

import pytest
import torch
from conftest import Counter, assert_ddim_run_is_bdia_sample

import bdia

diffusers = pytest.importorskip("diffusers")

from bdia.integrations.diffusers import (  # noqa: E402
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_pixart_pipeline,
    tiny_pixart_transformer,
)

STEPS = 6
GUIDANCE = 4.5
PROMPT = "a photo of a fox"
# The tiny pipeline's 16 x 16 images, as PixArtAlphaPipeline passes their size to a
# transformer with micro-conditions.
MICRO = {"resolution": torch.tensor([[16.0, 16.0]]), "aspect_ratio": torch.tensor([[1.0]])}


def _noise() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _run(pipe, noise: torch.Tensor, guidance: float = GUIDANCE) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            PROMPT,
            height=16,
            width=16,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=noise,
            output_type="latent",
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=16,
        ).images


def _cond(pipe, alpha: bool, guidance: float = GUIDANCE) -> dict:
    """from_diffusers' conditioning of the pipeline's prompt, its negative under guidance."""
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            PROMPT,
            do_classifier_free_guidance=guidance > 1,
            clean_caption=False,
            max_sequence_length=16,
        )
    cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if alpha:
        cond["added_cond_kwargs"] = MICRO
    if guidance > 1:
        cond["guidance_scale"] = guidance
        cond["negative_cond"] = {
            "encoder_hidden_states": negative,
            "encoder_attention_mask": negative_mask,
        }
    return cond


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("alpha", [False, True], ids=["sigma", "alpha"])
def test_bdia_scheduler_in_the_pixart_pipelines_is_bdia_sample_and_inverts(alpha):
    """PixArtSigmaPipeline (and PixArtAlphaPipeline with its micro-conditions) under guidance
    4.5, with BDIAScheduler.from_config(PixArt's DPM-Solver config, gamma=0.9): its latents
    are bdia.sample's with bdia(ddim, 0.9) on from_diffusers' ODE, bit for bit, so the
    adapter calls the transformer as the pipeline does (the timestep by keyword, the masks,
    the guided eps with the learned variance's half dropped, though the scheduler names no
    learned variance), and the pipeline's final pair inverts to its noise bit for bit. In
    float64 state the round trip returns to the noise within 1e-12 (measured 0)."""
    pipe = tiny_pixart_pipeline(alpha=alpha)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    assert pipe.scheduler.config.variance_type not in ("learned", "learned_range")
    assert pipe.transformer.config.out_channels == 8  # eps and its variance
    noise = _noise()
    theirs = _run(pipe, noise)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(pipe, alpha))
    calls = Counter(pipe.transformer)
    back = assert_ddim_run_is_bdia_sample(pipe, theirs, ode, noise, 0.9, STEPS)
    # One call a step on the batch [negative, prompt], in float32 and float64 state: a sample
    # of STEPS steps, and an inversion from its final pair, which holds the last step's two
    # ends already (STEPS - 1 calls).
    assert calls.calls == 2 * (2 * STEPS - 1)
    assert float((back - noise.double()).abs().max() / noise.abs().max()) < 1e-12


def test_guidance_scale_one_is_the_pipelines_run_without_guidance():
    """At guidance 1 the pipeline makes one call a step on the prompt alone; so does the ODE
    made without negative_cond, and bdia(ddim, 0.9) gives the pipeline's latents bit for
    bit."""
    pipe = tiny_pixart_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise()
    theirs = _run(pipe, noise, guidance=1.0)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(pipe, False, guidance=1.0))
    with torch.no_grad():
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(ode, bdia.bdia("ddim", 0.9), noise, ts, progress=False)
    assert torch.equal(ours, theirs)


def test_the_micro_conditions_change_the_field():
    """PixArt-alpha's 1024 transformer reads the image's size: another resolution gives
    another eps (so the adapter passes them through, and a test of them can fail)."""
    transformer = tiny_pixart_transformer(micro_conditions=True)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
    embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    x = _noise()
    outs = []
    for size in (16.0, 32.0):
        micro = {"resolution": torch.tensor([[size, size]]), "aspect_ratio": MICRO["aspect_ratio"]}
        ode = from_diffusers(
            transformer, scheduler, encoder_hidden_states=embeds, added_cond_kwargs=micro
        )
        with torch.no_grad():
            outs.append(ode.evaluate(0.5, x).eps)
    assert (outs[0] - outs[1]).abs().max() > 1e-3 * outs[0].abs().max()


def test_a_transformer_with_micro_conditions_refuses_to_run_without_them():
    transformer = tiny_pixart_transformer(micro_conditions=True)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
    calls = Counter(transformer)
    with pytest.raises(ValueError, match=r"takes micro-conditions .*added_cond_kwargs="):
        from_diffusers(transformer, scheduler, encoder_hidden_states=torch.zeros(1, 5, 16))
    assert calls.calls == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"mask": torch.ones(1, 1, 8, 8), "masked_image_latents": torch.zeros(1, 4, 8, 8)},
        {"image_latents": torch.zeros(1, 16, 16)},
    ],
    ids=["inpainting", "reference"],
)
def test_other_pipelines_inputs_are_refused_for_pixart(extra):
    transformer = tiny_pixart_transformer()
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
    with pytest.raises(ValueError, match=r"PixArtTransformer2DModel, which PixArtAlphaPipeline"):
        from_diffusers(transformer, scheduler, encoder_hidden_states=torch.zeros(1, 5, 16), **extra)


def test_pixart_with_a_flow_matching_scheduler_is_refused():
    transformer = tiny_pixart_transformer()
    with pytest.raises(ValueError, match=r"PixArtTransformer2DModel with FlowMatchEuler"):
        from_diffusers(transformer, diffusers.FlowMatchEulerDiscreteScheduler())


# ---------------------------------------------------------------------------- edit_image

SOURCE, TARGET = "a photo of a cat", "a painting of a dog"


def _image() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("alpha", [False, True], ids=["sigma", "alpha"])
def test_edit_image_is_a_hand_run_of_the_pixart_pipelines_parts(alpha):
    """edit_image on PixArtSigmaPipeline (PixArtAlphaPipeline with micro-conditions): by
    default guidance 4.5 with the negative prompt "", bdia(ddim, 0.96) and a float64 state,
    as by hand: the VAE's mean scaled, the prompts through the pipeline's encode_prompt
    with their masks, from_diffusers (the alpha transformer given the image's size),
    diffusers_grid to t = 1/N, Inversion.of and regenerate under the target, bit for bit. The round
    trip is exact (latent_error 0, measured 0), and the target changes the edit."""
    pipe, image = tiny_pixart_pipeline(alpha=alpha), _image()
    steps = 6
    result = edit_image(pipe, image, SOURCE, TARGET, num_inference_steps=steps)
    assert result.latent_error == 0.0

    def cond(prompt):
        with torch.no_grad():
            embeds, mask, negative, negative_mask = pipe.encode_prompt(
                prompt, do_classifier_free_guidance=True, clean_caption=False
            )
        out = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if alpha:
            out["added_cond_kwargs"] = MICRO
        out["guidance_scale"] = 4.5
        out["negative_cond"] = {
            "encoder_hidden_states": negative,
            "encoder_attention_mask": negative_mask,
        }
        return out

    source = from_diffusers(pipe.transformer, pipe.scheduler, **cond(SOURCE))
    target = from_diffusers(pipe.transformer, pipe.scheduler, **cond(TARGET))
    # PixArt's scheduler ends at sigma 0, where edit_image ends at the table's smallest
    # noise level, t = 1/N, instead (as for any noise-table pipeline).
    ts = diffusers_grid(pipe.scheduler, steps)
    assert float(ts[-1]) == 0.0 and float(result.inversion.ts[-1]) == 1 / 1000
    ts = torch.cat([ts[:-1], result.inversion.ts[-1:]])
    assert torch.equal(result.inversion.ts, ts)
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.mean.double()
    latents = latents * pipe.vae.config.scaling_factor
    assert torch.equal(result.latents, latents)
    solver = bdia.bdia(bdia.get_solver("ddim"), 0.96)
    inversion = bdia.Inversion.of(source, solver, latents, ts, state_dtype=torch.float64)
    assert torch.equal(inversion.noise, result.inversion.noise)
    assert torch.equal(inversion.regenerate(target, rule="base"), result.edited_latents)
    assert source.fingerprint() == result.inversion.ode.fingerprint()
    assert target.fingerprint() == result.target.fingerprint()
    change = (result.edited_latents - result.reconstructed_latents).abs().max()
    assert change > 0.1 * result.latents.abs().max()


def test_edit_image_takes_pixart_embeddings_with_their_mask():
    """The pairs (prompt_embeds, prompt_attention_mask) that encode_prompt returns give the
    text's edit bit for bit; embeddings without their mask, or a mask of another shape, are
    refused in one line before any network runs."""
    pipe, image = tiny_pixart_pipeline(), _image()
    with torch.no_grad():
        source = pipe.encode_prompt(SOURCE, do_classifier_free_guidance=False)[:2]
        target = pipe.encode_prompt(TARGET, do_classifier_free_guidance=False)[:2]
        negative = pipe.encode_prompt("", do_classifier_free_guidance=False)[:2]
    text = edit_image(pipe, image, SOURCE, TARGET, num_inference_steps=3)
    pairs = edit_image(pipe, image, source, target, num_inference_steps=3, negative_prompt=negative)
    assert torch.equal(pairs.edited_latents, text.edited_latents)
    calls = Counter(pipe.transformer)
    with pytest.raises(TypeError, match=r"also needs the embeddings' mask"):
        edit_image(pipe, image, source[0], target, negative_prompt=negative)
    bad = (source[0], source[1][:, :5])
    with pytest.raises(ValueError, match=r"the prompt_attention_mask, must have shape"):
        edit_image(pipe, image, bad, target, negative_prompt=negative)
    assert calls.calls == 0


def test_edit_image_refuses_a_mask_for_pixart():
    pipe, image = tiny_pixart_pipeline(), _image()
    calls = Counter(pipe.transformer)
    with pytest.raises(ValueError, match="mask_image"):
        edit_image(pipe, image, SOURCE, TARGET, mask_image=torch.ones(1, 1, 16, 16))
    assert calls.calls == 0
