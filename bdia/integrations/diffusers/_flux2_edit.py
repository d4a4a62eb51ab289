"""What ``edit_image`` needs of Flux.2's pipelines (``Flux2Pipeline``, FLUX.2-dev's, and
``Flux2KleinPipeline``): the image's latents made as they make their reference images'
(the VAE's mode patchified into 2 x 2 patches, normalised by the VAE's batch-norm
statistics, packed into tokens), decoded by the inverse as they decode, the reference
images of their ``image=`` list as they prepare them, the prompts' transformer arguments
through their own ``encode_prompt``, and the shift of their sigmas."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._edit_conditions import _flux_probe_cond
from ._pipeline_parts import _mean, _part

# The pipelines' static methods that make the state, its positions and its image back.
_FLUX2_METHODS = (
    "_patchify_latents",
    "_unpatchify_latents",
    "_pack_latents",
    "_unpack_latents_with_ids",
    "_prepare_latent_ids",
)


def _check_flux2_parts(pipe: Any, vae: Any) -> None:
    """Refuse, in one line, a Flux.2 pipeline without the methods that pack its latents and
    make their ids, a VAE without the batch-norm statistics the pipelines normalise by
    (``vae.bn`` and ``config.batch_norm_eps``), or without ``encode_prompt``, which makes
    the prompts' ``txt_ids`` for text and embeddings alike."""
    for name in _FLUX2_METHODS:
        _part(pipe, name, "to pack the latents into the tokens Flux.2's transformer takes")
    _part(pipe, "encode_prompt", "to make the prompts' txt_ids, as Flux2Pipeline does")
    bn = getattr(vae, "bn", None)
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(
            f"the pipeline's vae ({type(vae).__name__}) has no bn.running_mean and "
            "bn.running_var, the batch-norm statistics by which Flux.2's pipelines normalise "
            "its latents; give it an AutoencoderKLFlux2"
        )
    if vae.config.get("batch_norm_eps") is None:
        raise ValueError(
            "the pipeline's vae has no config.batch_norm_eps, which Flux.2's pipelines add to "
            "the batch-norm variance"
        )


def _bn_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's batch-norm mean and standard deviation of shape (1, C, 1, 1), on ``like``'s
    device and in its dtype, as the pipelines make them: ``sqrt(running_var +
    batch_norm_eps)`` in the statistics' own dtype, then cast."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std.to(like.device, like.dtype)


def _flux2_encode(pipe: Any, pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """The packed latents ``(B, h/2 x w/2, 4 C)`` in ``dtype`` of ``pixels`` ``(B, 3, H, W)``
    in [-1, 1], as the pipelines' ``_encode_vae_image`` and ``prepare_image_latents`` make a
    reference image's: the mode of the VAE's distribution (its mean), patchified, ``(z -
    running_mean) / sqrt(running_var + eps)``, packed; normalised in ``dtype`` (bit for bit
    the pipelines' in float32, their VAE's dtype)."""
    latents = pipe._patchify_latents(_mean(pipe.vae, pixels).to(dtype))
    mean, std = _bn_stats(pipe.vae, latents)
    return pipe._pack_latents((latents - mean) / std)


def _flux2_decode(pipe: Any, latents: Tensor, ids: Tensor) -> Tensor:
    """The image ``(B, 3, H, W)`` of packed latents (as ``_flux2_encode`` makes them) with
    their ``ids`` ``(B, tokens, 4)``, as the pipelines decode: ``_unpack_latents_with_ids``,
    ``z * std + mean`` in the latents' dtype, ``_unpatchify_latents``, the VAE's decoding (in
    its dtype); clamped to [-1, 1], float32."""
    z = pipe._unpack_latents_with_ids(latents, ids)
    mean, std = _bn_stats(pipe.vae, z)
    z = pipe._unpatchify_latents(z * std + mean)
    out = pipe.vae.decode(z.to(pipe.vae.dtype))
    image = out.sample if hasattr(out, "sample") else out[0]
    return image.float().clamp(-1.0, 1.0)


# The largest reference image the pipelines take as it is, in pixels; they shrink larger
# ones to this area.
_FLUX2_REFERENCE_AREA = 1024 * 1024


def _flux2_reference_pixels(pipe: Any, reference_image: Any) -> list[Tensor]:
    """The reference images (``reference_image``: a PIL image or a list of them) as
    Flux2Pipeline and Flux2KleinPipeline prepare their ``image=`` list, before any network
    runs: each checked by their image processor's ``check_image_input`` (at least 64 pixels
    a side, an aspect ratio of at most 8), shrunk to 1024 x 1024 pixels' area where larger,
    its sides cut down to multiples of twice the VAE's factor and preprocessed (cropped to
    them, mapped to [-1, 1]): one float32 tensor (1, 3, H', W') each; [] for None.
    Refuses, in one line naming the entry, what is not a PIL image (the pipelines take no
    tensors there) and what ``check_image_input`` refuses."""
    from PIL import Image

    if reference_image is None:
        return []
    items = reference_image if isinstance(reference_image, (list, tuple)) else [reference_image]
    processor = _part(pipe, "image_processor", "to prepare the reference images as it does")
    multiple = 2 * pipe.vae_scale_factor
    references = []
    for i, item in enumerate(items):
        if not isinstance(item, Image.Image):
            raise TypeError(
                f"reference_image[{i}] is a {type(item).__name__}; {type(pipe).__name__}'s "
                "image= takes PIL images, which it resizes and crops: give PIL images"
            )
        try:
            processor.check_image_input(item)
        except ValueError as error:  # named as the argument, in one line
            raise ValueError(f"reference_image[{i}]: {' '.join(str(error).split())}") from None
        if item.width * item.height > _FLUX2_REFERENCE_AREA:
            item = processor._resize_to_target_area(item, _FLUX2_REFERENCE_AREA)
        width, height = (side // multiple * multiple for side in item.size)
        references.append(
            processor.preprocess(item, height=height, width=width, resize_mode="crop")
        )
    return references


def _flux2_reference_kwargs(
    pipe: Any, references: list[Tensor], latent_ids: Tensor, batch: int, device: torch.device
) -> dict[str, Tensor]:
    """``from_diffusers``' ``image_latents`` and ``img_ids`` of the prepared ``references``
    for ``batch`` images whose latents have the ids ``latent_ids`` (B, tokens, 4), as the
    pipelines make them: ``prepare_image_latents`` in the VAE's dtype (each reference's
    packed tokens in turn, the VAE's mode), and the latents' ids followed by the references'."""
    image_latents, image_ids = pipe.prepare_image_latents(
        references, batch, None, device, pipe.vae.dtype
    )
    return {"image_latents": image_latents, "img_ids": torch.cat([latent_ids, image_ids], dim=1)}


def _flux2_kv_kwargs(
    pipe: Any,
    references: list[Tensor],
    latent_ids: Tensor,
    prompt: Mapping[str, Any],
    batch: int,
    device: torch.device,
) -> dict[str, Any]:
    """``from_diffusers``' ``kv_cache`` and ``kv_cache_mode`` of the prepared ``references``
    for Flux2KleinKVPipeline: the cache its first transformer call makes (``kv_cache_mode=
    "extract"``) of the references' tokens (``prepare_image_latents``'), placed before the
    latents' tokens of ``latent_ids`` (B, tokens, 4) with their ids before the latents',
    under ``prompt``'s embeddings and ``txt_ids``. The references attend to themselves alone
    and are modulated at timestep 0 whatever the step's, so the cache depends on them alone:
    it is made once, on zero latents (the call's own output is not used), and every call of
    both ODEs is the pipeline's cached one."""
    image_latents, image_ids = pipe.prepare_image_latents(
        references, batch, None, device, pipe.vae.dtype
    )
    transformer = pipe.transformer
    zeros = image_latents.new_zeros(batch, latent_ids.shape[1], image_latents.shape[2])
    _, cache = transformer(
        hidden_states=torch.cat([image_latents, zeros], dim=1).to(transformer.dtype),
        timestep=torch.zeros(batch, device=device),
        guidance=None,
        encoder_hidden_states=prompt["encoder_hidden_states"],
        txt_ids=prompt["txt_ids"],
        img_ids=torch.cat([image_ids, latent_ids], dim=1),
        return_dict=False,
        kv_cache_mode="extract",
        num_ref_tokens=image_latents.shape[1],
    )
    return {"kv_cache": cache, "kv_cache_mode": "cached"}


def _embed_flux2(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """Flux.2's transformer arguments of a prompt, text or embeddings ``(B, L, D)`` alike,
    through the pipeline's own ``encode_prompt`` (its text encoder's layers and 512 tokens by
    default, as its call): ``encoder_hidden_states`` (B, L, D) in ``dtype`` and ``txt_ids``
    (B, L, 4), batched as the pipelines pass them."""
    if isinstance(prompt, Tensor):
        out = pipe.encode_prompt(None, device=device, prompt_embeds=prompt.to(device))
    else:
        text = prompt if isinstance(prompt, str) else list(prompt)
        out = pipe.encode_prompt(text, device=device, num_images_per_prompt=1)
    embeds, text_ids = out
    if dtype is not None:
        embeds = embeds.to(dtype)
    return {"encoder_hidden_states": embeds, "txt_ids": text_ids}


def _flux2_probe_cond(config: Any, guidance: float | None) -> dict[str, Any]:
    """``_flux_probe_cond``'s for Flux.2's transformer (ids of its 4 axes): no pooled
    embeddings, no tokens, for the probe that checks the scheduler and the transformer's
    dtype before any network runs."""
    cond = _flux_probe_cond(config, guidance)
    del cond["pooled_projections"]
    return cond


def _flux2_mu(tokens: int, steps: int) -> float:
    """The shift of Flux.2's pipelines for ``tokens`` packed latent tokens and ``steps``
    steps: their own ``compute_empirical_mu``, whatever the scheduler config's shifts."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return float(compute_empirical_mu(image_seq_len=tokens, num_steps=steps))
