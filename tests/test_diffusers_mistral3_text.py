"""edit_image on Flux2Pipeline (FLUX.2-dev) with text prompts: the pipeline's own
encode_prompt through a tiny Mistral 3 text encoder (``tiny_mistral3_text_encoder``: a
``Mistral3ForConditionalGeneration`` of 30 text layers and a byte-level tokenizer whose chat
template renders the pipeline's system message and prompt), whose hidden states 10, 20 and
30 it stacks side by side at all 512 tokens, padding included.

Parity with the pipeline is checked in float32, where both sides make the same float
operations on the same inputs and agree bit for bit. Flux2Pipeline is in diffusers 0.36 and
newer, Mistral 3 in transformers 4.50 and newer; with older ones the module is skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import transformers
from _pipeline_runs import pipeline_run
from test_diffusers_editing import _records

if not hasattr(diffusers, "Flux2Pipeline") or not hasattr(
    transformers, "Mistral3ForConditionalGeneration"
):
    pytest.skip(
        f"Flux2Pipeline with Mistral 3 needs diffusers 0.36 and transformers 4.50 (these are "
        f"{diffusers.__version__} and {transformers.__version__})",
        allow_module_level=True,
    )

from bdia.integrations.diffusers import edit_image  # noqa: E402
from bdia.integrations.diffusers.tiny import tiny_flux2_pipeline  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
]

N_STEPS = 6
SOURCE = ("a photo of a cat", "a dog")
TARGET = ("a painting of a red fox", "a blue cat")
GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale, embedded


@pytest.fixture(scope="module")
def dev():
    return tiny_flux2_pipeline(text_encoder=True)


def _image():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _edit(pipe):
    return edit_image(
        pipe,
        _image(),
        list(SOURCE),
        list(TARGET),
        num_inference_steps=N_STEPS,
        state_dtype=torch.float32,
        progress=False,
    )


def test_flux2_dev_gets_encode_prompts_embeddings(dev):
    """Text prompts: FLUX.2-dev's transformer gets exactly the embeddings and txt_ids of
    pipe.encode_prompt(prompts), (2, 512, 48) with the padding and the system message, the
    source's while inverting and the target's while editing, with the embedded guidance 4
    and no second call; the round trip is exact (latent_error 0 in float32)."""
    calls, out = _records(dev.transformer, lambda: _edit(dev))
    with torch.no_grad():
        source, target = (dev.encode_prompt(list(p), device="cpu") for p in (SOURCE, TARGET))
    assert source[0].shape == (2, 512, 48)
    assert len(calls) == 3 * N_STEPS - 1
    for call, (embeds, ids) in ((calls[0], source), (calls[-1], target)):
        assert torch.equal(call["encoder_hidden_states"], embeds)
        assert torch.equal(call["txt_ids"], ids)
        assert torch.equal(call["guidance"], torch.full((2,), GUIDANCE))
    assert out.latent_error == 0.0


def test_the_flux2_dev_edit_is_the_pipelines_text_run_from_the_inverted_noise(dev):
    """The edited packed latents are bit for bit Flux2Pipeline(prompt=TARGET)'s (its
    embedded guidance 4) at the last step, run from the inverted noise (float32)."""
    out = _edit(dev)
    ids = dev._prepare_latent_ids(torch.zeros(2, 16, 4, 4))
    latents = dev._unpack_latents_with_ids(out.inversion.noise.clone(), ids)
    last, _ = pipeline_run(
        dev, latents, N_STEPS, prompt=list(TARGET), guidance_scale=GUIDANCE, height=16, width=16
    )
    assert torch.equal(out.edited_latents, last)
