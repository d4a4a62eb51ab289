"""What ``edit_image`` needs of Z-Image's pipelines (``ZImagePipeline``, its img2img,
inpainting, ControlNet and ControlNet inpainting siblings): the prompts' transformer
argument through their own ``encode_prompt``, the image's latents made and decoded in the
VAE's dtype, as they encode and decode them, and what the ControlNet inpainting pipeline
needs before it runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._edit_prompts import _is_text
from ._flow_controlnet import _Z_INPAINT_PIPELINE, _Z_PIPELINE
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


def _check_z_image_inpainting(controlnet: Any, config: Mapping[str, Any], mask_image: Any) -> None:
    """Refuse, before any network runs, what ZImageControlNetInpaintPipeline would not run:
    no mask, or a controlnet that does not take what the pipeline gives it, the control
    image's latents, the mask and the masked image's latents (``control_in_dim = 2 C + 1``
    for the transformer's ``C = in_channels``)."""
    latents = config.get("in_channels")
    given = getattr(controlnet, "config", {}).get("control_in_dim")
    if isinstance(latents, int) and given != 2 * latents + 1:
        raise ValueError(
            f"the pipeline is a {_Z_INPAINT_PIPELINE}, which gives its controlnet the control "
            f"image's latents, the mask and the masked image's latents ({2 * latents + 1} "
            f"channels for in_channels = {latents}), but the controlnet has control_in_dim = "
            f"{given}; give it an inpainting controlnet, or edit with {_Z_PIPELINE}"
        )
    if mask_image is None:
        raise ValueError(
            f"the pipeline is a {_Z_INPAINT_PIPELINE}, whose controlnet takes the image under a "
            "mask; give mask_image, white (1) where the edit may repaint, as the pipeline's "
            "mask_image, and control_image, the image that guides the controlnet"
        )
