"""What ``edit_image`` needs of Z-Image's pipelines (``ZImagePipeline``, its img2img and
inpainting siblings): the prompts' transformer argument through their own
``encode_prompt``, and the image's latents made and decoded in the VAE's dtype, as they
encode and decode them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._edit_prompts import _is_text
from ._pipeline_parts import _decode, _encode

# ZImagePipeline's max_sequence_length, given to encode_prompt.
_Z_IMAGE_TOKENS = 512


def _embed_z_image(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None
) -> dict[str, Any]:
    """Z-Image's transformer argument of a prompt, ``cap_feats``: a list of one ``(L_i, D)``
    embedding per prompt, in ``dtype``; text through the pipeline's ``encode_prompt`` (its
    valid tokens of ``max_sequence_length`` 512, the pipeline's), embeddings as given, as
    ``encode_prompt`` passes them on."""
    if _is_text(prompt):
        # A copy: encode_prompt writes the chat template over the list's strings.
        text = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, _ = pipe.encode_prompt(
            text,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=_Z_IMAGE_TOKENS,
        )
    else:
        embeds = list(prompt)
    return {"cap_feats": [e.to(device) if dtype is None else e.to(device, dtype) for e in embeds]}


def _z_image_encode(vae: Any, pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """The image's latents (B, C, H / f, W / f), image-shaped: ZImageImg2ImgPipeline's shift
    and scale of the VAE's mean, in the VAE's dtype, then in ``dtype``."""
    return _encode(vae, pixels, vae.dtype).to(dtype)


def _z_image_decode(vae: Any, latents: Tensor) -> Tensor:
    """``_z_image_encode``'s inverse: ZImagePipeline unscales and shifts the latents in the
    VAE's dtype."""
    return _decode(vae, latents.to(vae.dtype))
