"""What ``edit_image`` needs of Qwen-Image's pipelines (``QwenImagePipeline``, its img2img,
inpainting, Edit, Edit Plus and ControlNet siblings): the prompts' transformer arguments
through their own ``encode_prompt``, the ``img_shapes`` of the latents (and of the Edit
pipelines' reference images), and the image's latents made and decoded as one frame of the
video VAE, packed as they pack them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._edit_conditions import _QWEN_EDIT_INPAINT
from ._edit_network import _Network
from ._edit_prompts import _is_pair
from ._pipeline_parts import _FLUX_PACKING, _decode_frame, _encode_frame

# QwenImagePipeline's max_sequence_length (and its img2img, inpainting and Edit siblings'):
# the prompt's tokens kept, given to encode_prompt, whose own default keeps 1024.
_QWEN_TOKENS = 512


def _embed_qwen(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None, lengths: bool
) -> dict[str, Any]:
    """Qwen-Image's transformer arguments of a prompt, text or the pair ``(prompt_embeds,
    prompt_embeds_mask)`` alike, as QwenImagePipeline makes them with its ``encode_prompt``:
    ``encoder_hidden_states`` (B, L, D) in ``dtype`` and ``encoder_hidden_states_mask`` (B,
    L) as returned (None where every token is valid: ``encode_prompt`` drops an all-ones
    mask), under the key even then, so that the negative call never inherits the
    conditional one's. With ``lengths`` (diffusers 0.35's and 0.36's transformer) also
    ``txt_seq_lens``, the mask's row sums as their pipeline passes them (every token where
    the mask is None). A prompt keeps its first 512 tokens, as the pipeline's
    ``max_sequence_length``."""
    tokens = _QWEN_TOKENS
    if _is_pair(prompt):
        embeds, mask = (p.to(device) for p in prompt)
        out = pipe.encode_prompt(
            None,
            device=device,
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,
            max_sequence_length=tokens,
        )
    else:
        text = prompt if isinstance(prompt, str) else list(prompt)
        out = pipe.encode_prompt(
            text, device=device, num_images_per_prompt=1, max_sequence_length=tokens
        )
    embeds, mask = out
    cond = {
        "encoder_hidden_states": embeds if dtype is None else embeds.to(dtype),
        "encoder_hidden_states_mask": mask,
    }
    if lengths:
        rows, tokens = embeds.shape[:2]
        cond["txt_seq_lens"] = [tokens] * rows if mask is None else mask.sum(dim=1).tolist()
    return cond


def _qwen_img_shapes(
    net: _Network,
    latent_size: tuple[int, int],
    vae_factor: int,
    references: list[Tensor],
    batch: int,
) -> list[list[tuple[int, int, int]]]:
    """QwenImagePipeline's img_shapes: one frame of the packed rows and columns, per image."""
    qwen_edit = net.qwen_edit
    rows, cols = (n // _FLUX_PACKING for n in latent_size)
    img_shapes = [[(1, rows, cols)]] * batch
    if qwen_edit:  # QwenImageEditPipeline's: the latents' shape, then the reference image's
        # (QwenImageEditPlusPipeline's: then each further reference's, in order).
        packed = vae_factor * _FLUX_PACKING
        shapes = [(1, rows, cols)] * 2
        shapes += [(1, r.shape[2] // packed, r.shape[3] // packed) for r in references]
        img_shapes = [shapes] * batch
    return img_shapes


def _qwen_encode(
    pipe: Any,
    vae: Any,
    net: _Network,
    pixels: Tensor,
    dtype: torch.dtype,
    latent_size: tuple[int, int],
) -> Tensor:
    """The image's latents (B, h w / 4, 4 C) in ``dtype``: one frame of the video VAE's mean,
    normalised as the pipeline of ``net`` encodes its image, packed as its loop carries
    them."""
    batch = pixels.shape[0]
    # The one frame's latents, (B, C, 1, h, w), packed as (B, C, h, w): QwenImageEditPipeline's
    # own normalisation, its reference image's (the Edit inpainting pipeline's reference has
    # QwenImageImg2ImgPipeline's, as its start).
    divide = net.qwen_edit and net.pipeline != _QWEN_EDIT_INPAINT
    latents = _encode_frame(vae, pixels, dtype, divide=divide)
    return pipe._pack_latents(latents, batch, net.latent, *latent_size)


def _qwen_decode(
    pipe: Any, vae: Any, latents: Tensor, size: tuple[int, int], vae_factor: int
) -> Tensor:
    """``_qwen_encode``'s inverse: the image (B, 3, H, W) of ``size`` (H, W), unpacked and
    decoded as QwenImagePipeline decodes, the decoded video's one frame."""
    latents = pipe._unpack_latents(latents, *size, vae_factor)
    return _decode_frame(vae, latents)
