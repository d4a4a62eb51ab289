"""What ``edit_image`` needs of Flux's and Chroma's pipelines (``FluxPipeline`` and its
Fill, Control, Kontext and ControlNet siblings, ``ChromaPipeline``): the prompts' transformer
arguments, made by their own ``encode_prompt`` (Chroma's with the attention mask its
pipeline extends over the image's tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._edit_prompts import _is_pair

# ChromaPipeline's (and ChromaImg2ImgPipeline's) T5 tokens, max_sequence_length: given to
# encode_prompt, whose default in ChromaInpaintPipeline is 256, so that the edit through
# that pipeline's parts is the plain pipeline's.
_CHROMA_TOKENS = 512


def _embed_flux(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """Flux's transformer arguments of a prompt: ``encoder_hidden_states`` (B, L, D) and
    ``pooled_projections`` (B, P) in ``dtype``, and ``txt_ids`` (L, 3) as FluxPipeline's
    ``encode_prompt`` makes them (in the text encoder's dtype), for text or for a pair of
    embeddings alike, as the pipeline calls it."""
    if _is_pair(prompt):
        embeds, pooled = (p.to(device) for p in prompt)
        # prompt_2 by name: FluxPipeline's encode_prompt requires it before diffusers 0.35.
        out = pipe.encode_prompt(
            None, prompt_2=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, device=device
        )
    else:
        text = prompt if isinstance(prompt, str) else list(prompt)
        # The same text to CLIP (pooled) and T5 (the embeddings), the pipeline's default
        # without prompt_2, and its max_sequence_length.
        out = pipe.encode_prompt(text, prompt_2=None, device=device, num_images_per_prompt=1)
    embeds, pooled, text_ids = out
    if dtype is not None:
        embeds, pooled = embeds.to(dtype), pooled.to(dtype)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}


def _embed_chroma(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None, tokens: int
) -> dict[str, Tensor]:
    """Chroma's transformer arguments of a text prompt, as ChromaPipeline makes them:
    ``encoder_hidden_states`` (B, L, D) in ``dtype``, ``txt_ids`` (L, 3), and
    ``attention_mask`` (B, L + ``tokens``): ``encode_prompt``'s mask (the prompt's tokens and
    its first padding token) followed by ones for the ``tokens`` image tokens, by the
    pipeline's ``_prepare_attention_mask`` in the embeddings' dtype as encoded; ``L`` is
    ChromaPipeline's 512 T5 tokens, for every Chroma pipeline's parts."""
    text = prompt if isinstance(prompt, str) else list(prompt)
    embeds, text_ids, mask, *_ = pipe.encode_prompt(
        text,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=_CHROMA_TOKENS,
    )
    mask = pipe._prepare_attention_mask(mask.shape[0], tokens, embeds.dtype, mask)
    if dtype is not None:
        embeds = embeds.to(dtype)
    return {"encoder_hidden_states": embeds, "txt_ids": text_ids, "attention_mask": mask}
