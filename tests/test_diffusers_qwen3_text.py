"""edit_image on ZImagePipeline and Flux2KleinPipeline with text prompts: each pipeline's own
encode_prompt through a tiny Qwen3 text encoder and a Qwen2 tokenizer with Qwen3's chat
template (``tiny_qwen3_text_encoder``). Z-Image keeps the hidden states of the second to
last layer at the prompt's own tokens, one embedding a prompt of its own length; Klein stacks
those of layers 9, 18 and 27 side by side at all 512 tokens, padding included.

Parity with the pipelines is checked in float32, where both sides make the same float
operations on the same inputs and agree bit for bit. ZImagePipeline is in diffusers 0.36 and
newer, Flux2KleinPipeline in 0.37, Qwen3 in transformers 4.51 and newer; with older ones the
tests are skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import transformers
from test_diffusers_editing import _records

from bdia.integrations.diffusers import edit_image
from bdia.integrations.diffusers.tiny import (
    TINY_WORDS,
    tiny_flux2_klein_pipeline,
    tiny_z_image_pipeline,
)

if not hasattr(transformers, "Qwen3Model"):
    pytest.skip(
        f"Qwen3 is in transformers 4.51 and newer; this is {transformers.__version__}",
        allow_module_level=True,
    )

NO_Z_IMAGE = pytest.mark.skipif(
    not hasattr(diffusers, "ZImagePipeline"), reason="ZImagePipeline is in diffusers 0.36 and newer"
)
NO_KLEIN = pytest.mark.skipif(
    not hasattr(diffusers, "Flux2KleinPipeline"),
    reason="Flux2KleinPipeline is in diffusers 0.37 and newer",
)

pytestmark = [
    # diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # A random network is no denoiser: BDIA's parasitic component grows on it, which the
    # round trip's exactness does not depend on.
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
]

N_STEPS = 8
# Prompts of different lengths in a batch of two (the target's second 3 tokens shorter),
# tuples: ZImagePipeline's encode_prompt writes its chat template over a list's strings, so
# each call is given a list of its own.
SOURCE = ("a photo of a cat", "a dog")
TARGET = ("a painting of a red fox", "a blue cat")
NEGATIVE = ("", "a photo")
Z_CFG = 3.0  # a ZImagePipeline guidance_scale, CFG c + g (c - u) on for g > 0
KLEIN_CFG = 4.0  # Flux2KleinPipeline's default guidance_scale, true CFG against ""


@pytest.fixture(scope="module")
def z_image():
    return tiny_z_image_pipeline(text_encoder=True)


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2_klein_pipeline(text_encoder=True)


def _image():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _edit(pipe, **options):
    """edit_image from SOURCE to TARGET on the photo, N_STEPS steps, a float32 state."""
    return edit_image(
        pipe,
        _image(),
        list(SOURCE),
        list(TARGET),
        num_inference_steps=N_STEPS,
        state_dtype=torch.float32,
        progress=False,
        **options,
    )


def _z_guidance(cfg):
    return (
        dict(guidance_scale=Z_CFG, negative_prompt=list(NEGATIVE))
        if cfg
        else {"guidance_scale": 0.0}
    )


def _cap_feats(transformer, run):
    """The prompt embeddings (its third argument, a list) of each call of Z-Image's
    ``transformer``, which the pipeline and edit_image pass by position, and ``run()``'s
    result."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args: calls.append(args[2]))
    try:
        result = run()
    finally:
        handle.remove()
    return calls, result


@NO_Z_IMAGE
@NO_KLEIN
def test_the_tiny_tokenizer_renders_qwen3s_chat_turns(z_image, klein):
    """The chat template renders a prompt as Qwen3's does for the two pipelines (Klein's
    with its empty thinking block), a token a piece and a token a tiny word; every id is one
    token's; the text encoders' widths are the transformers' (16, and 3 x 16 for Klein's
    three layers)."""
    tokenizer = z_image.tokenizer
    turn = [{"role": "user", "content": "a photo of a cat"}]
    for thinking, end in ((True, []), (False, ["<think>", "ĊĊ", "</think>", "ĊĊ"])):
        text = tokenizer.apply_chat_template(
            turn, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        assert tokens == [
            "<|im_start|>",
            "user",
            "Ċ",
            "a",
            "Ġphoto",
            "Ġof",
            "Ġa",
            "Ġcat",
            "<|im_end|>",
            "Ċ",
            "<|im_start|>",
            "assistant",
            "Ċ",
            *end,
        ]
    assert all(len(tokenizer(" " + word)["input_ids"]) == 1 for word in TINY_WORDS)
    assert sorted(tokenizer.get_vocab().values()) == list(range(len(tokenizer)))
    assert type(z_image.text_encoder).__name__ == "Qwen3Model"
    assert z_image.text_encoder.config.hidden_size == z_image.transformer.config.cap_feat_dim == 16
    assert type(klein.text_encoder).__name__ == "Qwen3ForCausalLM"
    assert klein.text_encoder.config.num_hidden_layers == 28
    assert klein.transformer.config.joint_attention_dim == 3 * 16


@pytest.mark.first_case_by_default
@NO_Z_IMAGE
@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_z_image_gets_encode_prompts_embeddings(z_image, cfg):
    """Text prompts of different lengths: Z-Image's transformer gets exactly the per-sample
    embeddings of pipe.encode_prompt(prompts) (the prompt's own tokens, 13 and 10 for the
    source), the source's while inverting and the target's while editing, the negative
    prompts' after them with CFG; the round trip is exact (latent_error 0 in float32: the
    tiny transformer's inversion is bitwise)."""
    calls, out = _cap_feats(z_image.transformer, lambda: _edit(z_image, **_z_guidance(cfg)))
    with torch.no_grad():
        encode = z_image.encode_prompt
        source, target = (encode(list(p), "cpu", False)[0] for p in (SOURCE, TARGET))
        negative = encode(list(NEGATIVE), "cpu", False)[0]
    assert [len(e) for e in source] == [13, 10]
    # Three calls a step but the first, on the installed ZImagePipeline's grid (one step
    # fewer in diffusers 0.36 to 0.38).
    assert len(calls) == 3 * (len(out.inversion.ts) - 1) - 1
    for call, wanted in ((calls[0], source), (calls[-1], target)):
        wanted = wanted + negative if cfg else wanted
        assert len(call) == len(wanted)
        assert all(torch.equal(a, b) for a, b in zip(call, wanted))
    assert out.latent_error == 0.0


@pytest.mark.first_case_by_default
@NO_Z_IMAGE
@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_the_z_image_edit_is_the_pipelines_text_run_from_the_inverted_noise(z_image, cfg):
    """The edited latents are bit for bit what ZImagePipeline(prompt=TARGET,
    negative_prompt=NEGATIVE, guidance_scale=3) returns from the inverted noise (float32),
    and with guidance_scale 0 (no CFG) what it returns from TARGET alone."""
    guidance = _z_guidance(cfg)
    out = _edit(z_image, **guidance)
    with torch.no_grad():
        theirs = z_image(
            prompt=list(TARGET),
            latents=out.inversion.noise.clone(),
            num_inference_steps=N_STEPS,
            height=16,
            width=16,
            output_type="latent",
            **guidance,
        ).images
    assert torch.equal(out.edited_latents, theirs)
    assert out.latent_error == 0.0


@NO_KLEIN
def test_klein_gets_encode_prompts_embeddings(klein):
    """Text prompts of different lengths: Klein's transformer gets exactly the embeddings and
    the txt_ids of pipe.encode_prompt(prompts), (2, 512, 48) with the padding, the source's while
    inverting and the target's while editing, and in its true CFG's second call those of the
    negative prompt "" (one prompt's, for both images, as the pipeline repeats it); the round
    trip is exact (latent_error 0 in float32)."""
    calls, out = _records(klein.transformer, lambda: _edit(klein))
    with torch.no_grad():
        source, target = (klein.encode_prompt(list(p), device="cpu") for p in (SOURCE, TARGET))
        embeds, ids = klein.encode_prompt("", device="cpu")
    negative = (embeds.expand(2, -1, -1), ids.expand(2, -1, -1))
    assert source[0].shape == (2, 512, 48)
    assert len(calls) == 2 * (3 * N_STEPS - 1)
    for call, (embeds, ids) in zip(calls[:2] + calls[-2:], (source, negative, target, negative)):
        assert torch.equal(call["encoder_hidden_states"], embeds)
        # The transformer takes the first sample's ids (the batch shares its positions):
        # edit_image's negative branch passes the one prompt's.
        assert torch.equal(call["txt_ids"].expand_as(ids), ids)
    assert out.latent_error == 0.0


@NO_KLEIN
def test_the_klein_edit_is_the_pipelines_text_run_from_the_inverted_noise(klein):
    """The edited packed latents are bit for bit Flux2KleinPipeline(prompt=TARGET)'s (its
    true CFG 4 against the negative prompt "", which it always takes) at the last step, run
    from the inverted noise (float32)."""
    out = _edit(klein)
    seen = []

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"])
        return {}

    ids = klein._prepare_latent_ids(torch.zeros(2, 16, 4, 4))
    with torch.no_grad():
        klein(
            prompt=list(TARGET),
            latents=klein._unpack_latents_with_ids(out.inversion.noise.clone(), ids),
            num_inference_steps=N_STEPS,
            guidance_scale=KLEIN_CFG,
            height=16,
            width=16,
            output_type="latent",
            callback_on_step_end=keep,
        )
    assert len(seen) == N_STEPS
    assert torch.equal(out.edited_latents, seen[-1])
    assert out.latent_error == 0.0
