"""edit_image on QwenImagePipeline with text prompts: the pipeline's own encode_prompt through
a tiny Qwen2.5-VL text encoder and Qwen2 tokenizer (``tiny_qwen_text_encoder``), the chat
template's first ``prompt_template_encode_start_idx`` tokens dropped and the prompts of a
batch padded to the longest, their mask going to the transformer as the pipeline gives it.

Parity with the pipeline is checked in float32, where both sides make the same float
operations on the same inputs and agree bit for bit. QwenImagePipeline is in diffusers 0.35
and newer, Qwen2.5-VL in transformers 4.49 and newer; with older ones the module is skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import transformers
from test_diffusers_editing import _records

if not hasattr(diffusers, "QwenImagePipeline"):
    pytest.skip("QwenImagePipeline is in diffusers 0.35 and newer", allow_module_level=True)
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip(
        f"Qwen2.5-VL is in transformers 4.49 and newer; this is {transformers.__version__}",
        allow_module_level=True,
    )

from bdia.integrations.diffusers import edit_image  # noqa: E402
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    TINY_WORDS,
    tiny_qwen_image_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 8
TRUE_CFG = 4.0  # QwenImagePipeline's true_cfg_scale
# Prompts of different lengths in a batch of two: encode_prompt pads the shorter ones, so
# their masks are not all ones (the target's second is 3 tokens shorter than its first).
SOURCE = ["a photo of a cat", "a dog"]
TARGET = ["a painting of a red fox", "a blue cat"]
NEGATIVE = ["", "a photo"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_image_pipeline(text_encoder=True)


def _image():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _edit(pipe, true_cfg, **options):
    """edit_image from SOURCE to TARGET in a float32 state, with true CFG 4 and NEGATIVE
    where ``true_cfg``."""
    if true_cfg:
        options.update(guidance_scale=TRUE_CFG, negative_prompt=NEGATIVE)
    return edit_image(
        pipe,
        _image(),
        options.pop("source", SOURCE),
        options.pop("target", TARGET),
        num_inference_steps=N_STEPS,
        state_dtype=torch.float32,
        **options,
    )


def _pipeline_latents(pipe, noise, prompt, **options):
    """QwenImagePipeline's latents of 16 x 16 images from ``noise`` (not modified) for the
    text ``prompt``, N_STEPS steps; ``options`` are further arguments of the call."""
    return pipe(
        prompt=prompt,
        latents=noise.clone(),
        num_inference_steps=N_STEPS,
        height=16,
        width=16,
        output_type="latent",
        **options,
    ).images


def test_the_tiny_tokenizer_tokenizes_the_template_as_qwen_does(pipe):
    """The chat template's text before the prompt is QwenImagePipeline's
    prompt_template_encode_start_idx tokens (34), as with Qwen2.5-VL's tokenizer, so that
    encode_prompt keeps the prompt's own tokens and the template's end; each tiny word is
    one token, and QwenImageEditPipeline's template up to the image is its 64; every id is
    one token's; the text encoder's width is the transformer's joint_attention_dim."""
    tokenizer, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    assert drop == 34
    ids = tokenizer(pipe.prompt_template_encode.format("a photo of a cat"))["input_ids"]
    kept = tokenizer.convert_ids_to_tokens(ids[drop:])
    assert kept == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat", "<|im_end|>", "Ċ"] + [
        "<|im_start|>",
        "assistant",
        "Ċ",
    ]
    assert all(len(tokenizer(" " + word)["input_ids"]) == 1 for word in TINY_WORDS)
    # QwenImageEditPipeline's template up to the image is its 64 tokens dropped.
    edit = getattr(diffusers, "QwenImageEditPipeline", None)
    if edit is not None:
        bare = edit(*[None] * 6)
        template = bare.prompt_template_encode
        start = template[: template.index("<|vision_start|>")]
        assert len(tokenizer(start)["input_ids"]) == bare.prompt_template_encode_start_idx == 64
    assert sorted(tokenizer.get_vocab().values()) == list(range(len(tokenizer)))
    hidden = pipe.text_encoder.config.get_text_config().hidden_size
    assert hidden == pipe.transformer.config.joint_attention_dim == 16


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_the_transformer_gets_encode_prompts_embeddings_and_mask(pipe, true_cfg):
    """Text prompts of different lengths: the transformer gets exactly the embeddings and
    the padding mask (not all ones) of pipe.encode_prompt(prompts) in each branch, the
    source's while inverting and the target's while editing, the negative prompts' in the
    unconditional call; the round trip is exact (latent_error 0 in float32: the tiny
    transformer's inversion is bitwise)."""
    calls, out = _records(pipe.transformer, lambda: _edit(pipe, true_cfg))
    with torch.no_grad():
        source, target = (pipe.encode_prompt(p, device="cpu") for p in (SOURCE, TARGET))
        negative = pipe.encode_prompt(NEGATIVE, device="cpu")
    branches = [source, negative] if true_cfg else [source]
    assert len(calls) == len(branches) * (3 * N_STEPS - 1)
    edits = [target, negative] if true_cfg else [target]
    for (embeds, mask), call in zip(
        branches + edits, calls[: len(branches)] + calls[-len(edits) :]
    ):
        assert mask is not None and not mask.all()
        assert torch.equal(call["encoder_hidden_states"], embeds)
        assert torch.equal(call["encoder_hidden_states_mask"], mask)
    # A token a word, then the template's 5 after the prompt.
    assert target[1].sum(dim=1).tolist() == [11, 8]
    assert out.latent_error == 0.0


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_the_edit_is_the_pipelines_text_run_from_the_inverted_noise(pipe, true_cfg):
    """The edited latents are bit for bit what QwenImagePipeline(prompt=TARGET,
    negative_prompt=NEGATIVE, true_cfg_scale=4) returns from the inverted noise (float32),
    and without true CFG what it returns from TARGET alone."""
    out = _edit(pipe, true_cfg)
    options = dict(negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG) if true_cfg else {}
    theirs = _pipeline_latents(pipe, out.inversion.noise, TARGET, **options)
    assert torch.equal(out.edited_latents, theirs)
    assert out.latent_error == 0.0


def test_a_long_prompt_is_cut_where_the_pipeline_cuts_it(pipe):
    """QwenImagePipeline.__call__ keeps the first max_sequence_length (512 by default) of a
    prompt's embeddings, where encode_prompt's own default keeps 1024: a target of 600
    words reaches the transformer as 512 tokens, the pipeline's, and the edit is its run;
    so does the pair of its embeddings of 607 tokens (encode_prompt's at 1024) and their
    mask."""
    target = " ".join(["cat"] * 600)
    calls, out = _records(pipe.transformer, lambda: _edit(pipe, False, target=[target] * 2))
    assert calls[-1]["encoder_hidden_states"].shape == (2, 512, 16)
    theirs = _pipeline_latents(pipe, out.inversion.noise, [target] * 2)
    assert torch.equal(out.edited_latents, theirs)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt([target] * 2, device="cpu", max_sequence_length=1024)
    assert embeds.shape == (2, 607, 16)
    pair = (embeds, torch.ones(2, 607, dtype=torch.long))
    assert torch.equal(_edit(pipe, False, target=pair).edited_latents, theirs)
