"""Guidance rescale (Lin et al. 2024, 3.4): StableDiffusionPipeline's and the SDXL pipelines'
``guidance_rescale``, which zero-terminal-SNR models are sampled with, in ``from_diffusers``
and ``edit_image``."""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import float64_pipeline

import bdia
from bdia.integrations.diffusers import diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import ZERO_SNR_DDIM, tiny_text_to_image_pipeline

STEPS = 10
GUIDANCE = 7.5
RESCALE = 0.7  # Lin et al.'s

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _zero_snr_pipeline(tmp_path):
    """A tiny StableDiffusionPipeline of a v-prediction model on a zero-terminal-SNR table,
    trailing timesteps: how such models are sampled, with guidance_rescale."""
    return tiny_text_to_image_pipeline(tmp_path, diffusers.DDIMScheduler(**ZERO_SNR_DDIM))


def _noise(dtype=torch.float64):
    return torch.randn(1, 4, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(5))


def _prompts(pipe):
    with torch.no_grad():
        return pipe.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt="")


def _ode(pipe, rescale):
    cond, uncond = _prompts(pipe)
    return from_diffusers(
        pipe.unet,
        pipe.scheduler,
        encoder_hidden_states=cond,
        guidance_scale=GUIDANCE,
        negative_cond={"encoder_hidden_states": uncond},
        guidance_rescale=rescale,
    )


def _pipeline_latents(pipe, noise, rescale):
    """The pipeline's run from ``noise`` under guidance with ``guidance_rescale=rescale``."""
    cond, uncond = _prompts(pipe)
    with torch.no_grad():
        return pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            guidance_scale=GUIDANCE,
            guidance_rescale=rescale,
            latents=noise.clone(),
            num_inference_steps=STEPS,
            output_type="latent",
        ).images


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("rescale", [RESCALE, 1.0])
def test_ddim_is_the_pipeline_with_guidance_rescale(tmp_path, rescale):
    """bdia's 'ddim' on from_diffusers(..., guidance_rescale=phi) is StableDiffusionPipeline's
    DDIM run with guidance_rescale=phi, the whole pipeline in float64: below 1e-12 relative
    (float64 rounding of two ways of writing DDIM's step, as in the other parity tests;
    measured 1.8e-15 and 1.6e-15). Without the rescale the two differ by 7e-3 and 1e-2."""
    pipe = float64_pipeline(_zero_snr_pipeline(tmp_path))
    noise = _noise()
    theirs = _pipeline_latents(pipe, noise, rescale)
    with torch.no_grad():
        ts = diffusers_grid(pipe.scheduler, STEPS)
        ours = bdia.sample(_ode(pipe, rescale), bdia.get_solver("ddim"), noise, ts)
        plain = bdia.sample(_ode(pipe, None), bdia.get_solver("ddim"), noise, ts)
    assert _rel(ours, theirs) < 1e-12
    assert _rel(plain, theirs) > 1e-3


def test_the_rescale_is_lin_et_als_formula():
    """The guided output o rescaled to the conditional prediction c's per-sample standard
    deviation and mixed back: phi o std(c) / std(o) + (1 - phi) o, each sample on its own."""
    from bdia.integrations.diffusers._conditioning import _rescaled_guidance

    g = torch.Generator().manual_seed(0)
    guided = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * 3
    cond = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    out = _rescaled_guidance(guided, cond, RESCALE)
    for i in range(3):
        ratio = float(cond[i].std() / guided[i].std())
        expected = RESCALE * ratio * guided[i] + (1 - RESCALE) * guided[i]
        assert torch.allclose(out[i], expected, rtol=1e-14, atol=0)
    # phi = 1: the standard deviation of the conditional prediction, sample by sample.
    full = _rescaled_guidance(guided, cond, 1.0)
    assert torch.allclose(full.flatten(1).std(dim=1), cond.flatten(1).std(dim=1), rtol=1e-13)


def test_the_rescale_enters_the_fingerprint(tmp_path):
    pipe = _zero_snr_pipeline(tmp_path)
    prints = {_ode(pipe, phi).fingerprint() for phi in (None, 0.5, RESCALE)}
    assert len(prints) == 3


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(guidance_rescale=1.5), r"guidance_rescale = 1.5 lies outside \[0, 1\]"),
        (dict(guidance_rescale=float("nan")), r"guidance_rescale = nan lies outside"),
        (dict(guidance_rescale="0.7"), "guidance_rescale must be a number"),
        (dict(guidance_rescale=True), "guidance_rescale must be a number"),
        (
            dict(guidance_rescale=RESCALE, guidance_scale=None, negative_cond=None),
            "rescales classifier-free guidance; give guidance_scale",
        ),
        (
            dict(guidance_rescale=RESCALE, guidance_scale=1.0, negative_cond=None),
            "rescales classifier-free guidance",
        ),
    ],
    ids=["above-1", "nan", "string", "bool", "no-guidance", "scale-1"],
)
def test_a_guidance_rescale_that_cannot_act_is_refused_before_any_call(tmp_path, options, words):
    pipe = _zero_snr_pipeline(tmp_path)
    cond, uncond = _prompts(pipe)
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    given = dict(
        encoder_hidden_states=cond,
        guidance_scale=GUIDANCE,
        negative_cond={"encoder_hidden_states": uncond},
    )
    given.update(options)
    given = {k: v for k, v in given.items() if v is not None}
    with pytest.raises((ValueError, TypeError), match=words) as info:
        from_diffusers(pipe.unet, pipe.scheduler, **given)
    assert "\n" not in str(info.value) and calls == []


def test_an_edit_with_guidance_rescale_inverts_exactly(tmp_path):
    """edit_image passes guidance_rescale to both ODEs: the round trip is exact (float64
    state: rounding only, 1e-12), and the edit differs from the one without the rescale."""
    pipe = _zero_snr_pipeline(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    options = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt")
    out = edit_image(pipe, image, "a cat", "a dog", guidance_rescale=RESCALE, **options)
    assert out.inversion.ode.cond["guidance_rescale"] == RESCALE
    assert out.target.cond["guidance_rescale"] == RESCALE
    assert out.latent_error < 1e-12
    plain = edit_image(pipe, image, "a cat", "a dog", **options)
    assert _rel(out.edited_latents, plain.edited_latents) > 1e-3


def test_edit_image_refuses_a_guidance_rescale_without_guidance(tmp_path):
    pipe = _zero_snr_pipeline(tmp_path)
    image = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="guidance_rescale = 0.7 rescales classifier-free"):
        edit_image(pipe, image, "a cat", "a dog", guidance_scale=1.0, guidance_rescale=RESCALE)


def test_a_pipelines_run_with_guidance_rescale_inverts_with_the_docs_loop(tmp_path):
    """StableDiffusionPipeline with BDIAScheduler and guidance_rescale: the docs' inverse loop,
    which rescales as the pipeline does (rescale_noise_cfg), brings back the pipeline's noise
    bit for bit (a float32 state with low words; docs/diffusers.md)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from bdia.integrations.diffusers import BDIAInverseScheduler, BDIAScheduler

    pipe = _zero_snr_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    noise = _noise(torch.float32)
    _pipeline_latents(pipe, noise, RESCALE)
    cond, uncond = _prompts(pipe)
    with torch.no_grad():
        embeds = torch.cat([uncond, cond])
        inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
        inverse.set_timesteps(STEPS)
        x = inverse.begin(pipe.scheduler.final_pair, dtype=torch.float32)
        for t in inverse.timesteps:
            out = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=embeds).sample
            u, c = out.chunk(2)
            guided = rescale_noise_cfg(u + GUIDANCE * (c - u), c, guidance_rescale=RESCALE)
            x = inverse.step(guided, t, x).prev_sample
    assert torch.equal(inverse.pair.earlier, noise)
