"""The prompts of ``edit_image``, as each pipeline takes them: their checks (text, or the
embeddings and their companions its ``encode_prompt`` returns: SDXL's, SD3's and Flux's
pooled embeddings, Qwen-Image's and PixArt's masks, Z-Image's list of embeddings of their
own lengths), the text encoders that text needs, and the unet's, PixArt's and SD3's
arguments of one branch of guidance, made by the pipeline's own ``encode_prompt`` (the other
families' are their own modules')."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ._edit_conditions import _TIME_IDS
from ._edit_network import _Network
from ._pipeline_parts import _part
from ._z_image import _Z_IMAGE_HOW, _check_cap_feats

_QWEN_MASK = "prompt_embeds_mask"
_PIXART_MASK = "prompt_attention_mask"


def _is_text(prompt: Any) -> bool:
    return isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt)
    )


def _is_pair(prompt: Any) -> bool:
    """Whether ``prompt`` is SDXL's, SD3's or Flux's embeddings: (prompt_embeds,
    pooled_prompt_embeds); or Qwen-Image's, (prompt_embeds, prompt_embeds_mask)."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) == 2
        and all(isinstance(p, Tensor) for p in prompt)
    )


@dataclass(frozen=True)
class _Takes:
    """What the pipeline's network takes for a prompt, for ``_check_prompt``'s checks and words.

    Attributes:
        model: ``"unet"`` or ``"transformer"``.
        pipeline: ``"SDXL"``, ``"SD3"`` or ``"Flux"``, whose prompt embeddings come as the
            pair ``(prompt_embeds, pooled_prompt_embeds)``, or ``"Qwen-Image"``, as
            ``(prompt_embeds, prompt_embeds_mask)`` (``second`` names the pair's second,
            ``second_says`` says what it is); None for Stable Diffusion's one tensor.
            ``article`` goes before its name.
        cross_name: the model's config field of the embeddings' width, ``cross_dim`` its value.
        pooled_dim: the pooled embeddings' width; ``pooled_says`` says so after "the model's".
        outputs: which of ``encode_prompt``'s outputs the pair is.
    """

    model: str
    pipeline: str | None
    cross_name: str
    cross_dim: int | None
    pooled_dim: int | None = None
    pooled_says: str = ""
    outputs: str = "first and third"
    article: str = "an"
    second: str = "pooled_prompt_embeds"
    second_says: str = "the pooled embeddings"


def _check_prompt(prompt: Any, name: str, batch: int, takes: _Takes) -> None:
    """A prompt is a string, a list of 1 or ``batch`` strings, or embeddings (1 or batch, L, D)
    with D = ``takes.cross_dim``; for SDXL, SD3 and Flux the pair of those and the pooled
    embeddings (1 or batch, ``takes.pooled_dim``); for Qwen-Image the pair of those and their
    mask, of shape (the embeddings' batch, L)."""
    if isinstance(prompt, str):
        return
    paired = takes.pipeline is not None
    if paired and _is_pair(prompt):
        embeds, pooled = prompt
        _check_prompt(embeds, f"{name}[0]", batch, replace(takes, pipeline=None))
        if takes.second in (_QWEN_MASK, _PIXART_MASK):
            # encode_prompt views the mask as the embeddings' (batch, L).
            if pooled.shape != embeds.shape[:2]:
                raise ValueError(
                    f"{name}[1], the {takes.second}, must have shape "
                    f"{tuple(embeds.shape[:2])}, one entry per token of {name}[0] (1 valid, 0 "
                    f"padding), as the {takes.pipeline} pipeline's encode_prompt returns it; "
                    f"got {tuple(pooled.shape)}"
                )
            return
        if pooled.ndim != 2 or pooled.shape[0] not in (1, batch):
            raise ValueError(
                f"{name}[1], the pooled embeddings, must have shape (1 or {batch}, dim), got "
                f"{tuple(pooled.shape)}"
            )
        if takes.pooled_dim is not None and pooled.shape[1] != takes.pooled_dim:
            raise ValueError(
                f"{name}[1], the pooled embeddings, have dim {pooled.shape[1]}, but the "
                f"{takes.model}'s {takes.pooled_says}"
            )
        return
    tensor = f"the pair (prompt_embeds, {takes.second})" if paired else "a tensor"
    if isinstance(prompt, (list, tuple)):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"{name} must be a string, a non-empty list of strings or {tensor}")
        if len(prompt) not in (1, batch):
            raise ValueError(
                f"{name} has {len(prompt)} prompts for {batch} images; give 1 (shared) or {batch}"
            )
        return
    if paired:
        what = type(prompt).__name__
        if isinstance(prompt, Tensor):
            what = (
                f"one tensor: {takes.article} {takes.pipeline} {takes.model} also needs "
                f"{takes.second_says}"
            )
        raise TypeError(
            f"{name} must be a string, a list of strings or {tensor} as the {takes.pipeline} "
            f"pipeline's encode_prompt returns them (its {takes.outputs} outputs), got {what}"
        )
    if not isinstance(prompt, Tensor):
        raise TypeError(
            f"{name} must be a string, a list of strings or prompt embeddings (a tensor of shape "
            f"(batch, tokens, dim)), got {type(prompt).__name__}"
        )
    if prompt.ndim != 3 or prompt.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} as embeddings must have shape (1 or {batch}, tokens, dim), got "
            f"{tuple(prompt.shape)}"
        )
    if takes.cross_dim is not None and prompt.shape[-1] != takes.cross_dim:
        raise ValueError(
            f"{name} embeddings have dim {prompt.shape[-1]}, but the {takes.model}'s "
            f"{takes.cross_name} is {takes.cross_dim}"
        )


def _check_z_image_prompt(prompt: Any, name: str, batch: int, width: Any) -> None:
    """A Z-Image prompt is a string, a list of 1 or ``batch`` strings, or a list of 1 or
    ``batch`` embeddings ``(L_i, width)``, as ``ZImagePipeline.encode_prompt`` returns its
    ``prompt_embeds``."""
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise TypeError(
            f"{name} must be a string, a non-empty list of strings or {_Z_IMAGE_HOW}, got "
            f"{type(prompt).__name__}"
        )
    if not _is_text(prompt):
        _check_cap_feats(prompt, width, name)
    if len(prompt) not in (1, batch):
        raise ValueError(
            f"{name} has {len(prompt)} prompts for {batch} images; give 1 (shared) or {batch}"
        )


def _check_base_time_ids(pipe: Any) -> None:
    """Refuse an SDXL pipeline that gives its unet a refiner's time ids."""
    pipe_config = getattr(pipe, "config", None)
    if isinstance(pipe_config, Mapping) and pipe_config.get("requires_aesthetics_score"):
        # The img2img, inpainting and ControlNet inpainting pipelines then give the unet (and
        # its controlnet) a refiner's time ids, with an aesthetic score in each branch.
        raise ValueError(
            f"the pipeline's config sets requires_aesthetics_score: {type(pipe).__name__} "
            "gives its unet a refiner's time ids (original size, crop, aesthetic score), but "
            "edit_image makes SDXL base's (original size, crop, target size); use "
            "from_diffusers with the pipeline's time ids in each branch and bdia.Inversion "
            "directly"
        )


def _zero_negative(pipe: Any, net: _Network, negative_prompt: Any) -> bool:
    """Whether the unconditional branch is zeros rather than the negative prompt's
    embeddings."""
    xl = net.xl
    # SDXL's unconditional branch for the empty prompt is zeros, where the pipeline's config
    # says so (force_zeros_for_empty_prompt, True for SDXL base), as in its default.
    pipe_config = getattr(pipe, "config", None)
    zero_negative = (
        xl
        and isinstance(pipe_config, Mapping)
        and bool(pipe_config.get("force_zeros_for_empty_prompt", False))
        and _empty(negative_prompt)
    )
    return zero_negative


def _prompt_takes(net: _Network) -> _Takes:
    """What the network takes for a prompt, for ``_check_prompt``."""
    unet_config, model, xl = net.config, net.model, net.xl
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    # A unet with encoder_hid_dim_type "text_proj" projects encoder_hid_dim-wide embeddings
    # to its cross-attention width itself (and a 'text' added embedding reads them as given).
    cross_name = "cross_attention_dim"
    if unet_config.get("encoder_hid_dim_type") == "text_proj":
        cross_name = "encoder_hid_dim"
    if sd3 or flux or qwen or flux2:
        cross_name = "joint_attention_dim"
    if net.kind == "pixart":  # T5's width, which the transformer projects to its own
        cross_name = "caption_channels"
    cross_dim = unet_config.get(cross_name)
    takes = _Takes(model, None, cross_name, cross_dim if isinstance(cross_dim, int) else None)
    pooled_dim = _pooled_dim(unet_config) if xl else None
    if xl:
        takes = replace(
            takes,
            pipeline="SDXL",
            pooled_dim=pooled_dim,
            pooled_says=f"added embedding takes {pooled_dim} (projection_class_embeddings_"
            f"input_dim less {_TIME_IDS} x addition_time_embed_dim)",
        )
    elif sd3 or flux:
        pooled = unet_config.get("pooled_projection_dim")
        pooled = pooled if isinstance(pooled, int) else None
        takes = replace(
            takes,
            pipeline="SD3" if sd3 else "Flux",
            pooled_dim=pooled,
            pooled_says=f"pooled_projection_dim is {pooled}",
        )
        if flux:  # (prompt_embeds, pooled_prompt_embeds, text_ids)
            takes = replace(takes, outputs="first and second", article="a")
    elif net.kind == "pixart":  # encode_prompt returns (prompt_embeds, its mask, ...)
        takes = replace(
            takes,
            pipeline="PixArt",
            outputs="first and second",
            article="a",
            second=_PIXART_MASK,
            second_says="the embeddings' mask (1 for the prompt's tokens, 0 for padding)",
        )
    elif qwen:  # encode_prompt returns (prompt_embeds, prompt_embeds_mask)
        takes = replace(
            takes,
            pipeline="Qwen-Image",
            outputs="two",
            article="a",
            second=_QWEN_MASK,
            second_says="the embeddings' mask (torch.ones where no token is padding)",
        )
    return takes


def _check_prompts(prompts: Mapping[str, Any], batch: int, net: _Network) -> None:
    """Check each of ``prompts`` (by its argument's name) against what the network takes
    for a batch of ``batch`` images."""
    unet_config, zimage, chroma = net.config, net.kind == "zimage", net.chroma
    flux2 = net.kind == "flux2"
    takes = _prompt_takes(net)
    for name, prompt in prompts.items():
        if zimage:
            _check_z_image_prompt(prompt, name, batch, unet_config.get("cap_feat_dim"))
            continue
        if chroma and not _is_text(prompt):
            raise TypeError(
                f"{name} must be text for ChromaPipeline (a string or a list of strings): its "
                "embeddings go with the attention mask its encode_prompt makes beside them, "
                "which edit_image makes from the text; got "
                f"{type(prompt).__name__}"
            )
        if flux2 and _is_pair(prompt):
            raise TypeError(
                f"{name} is a pair of tensors, as Flux.1's (prompt_embeds, "
                "pooled_prompt_embeds); Flux.2 embeds the prompt with one text encoder and no "
                "pooled embeddings: pass prompt_embeds alone, of shape (1 or batch, tokens, "
                "joint_attention_dim), as Flux2Pipeline's encode_prompt returns it"
            )
        _check_prompt(prompt, name, batch, takes)


def _check_text_parts(
    pipe: Any, prompts: Mapping[str, Any], zero_negative: bool, net: _Network
) -> None:
    """Refuse, where a prompt is text, a pipeline without the tokenizers, text encoders and
    ``encode_prompt`` that embed it (or a Qwen-Image Edit pipeline, which embeds text with
    the image), and an SDXL text encoder that pools to another width than the unet takes."""
    unet_config, xl, chroma = net.config, net.xl, net.chroma
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    zimage, qwen_edit, pipeline = net.kind == "zimage", net.qwen_edit, net.pipeline
    pooled_dim = _pooled_dim(unet_config) if xl else None
    embedded = [p for k, p in prompts.items() if not (k == "negative_prompt" and zero_negative)]
    if any(_is_text(p) for p in embedded):
        parts: tuple[str, ...] = ("tokenizer", "text_encoder")
        if xl:
            parts = ("tokenizer_2", "text_encoder_2")
        elif chroma or net.kind == "pixart":  # T5 alone
            parts = ("tokenizer", "text_encoder")
        elif sd3 or flux:
            # SD3: both CLIP encoders, T5 (text_encoder_3) only where the pipeline has it;
            # Flux: CLIP (the pooled embeddings) and T5 (the embeddings).
            parts = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
        why = "to embed text prompts (or pass prompt embeddings instead)"
        if zimage:  # the tiny and the saved pipelines may come without Qwen3
            text = ", ".join(k for k, p in prompts.items() if _is_text(p))
            why = f"to embed the text of {text} (or pass {_Z_IMAGE_HOW} instead)"
        if flux2:  # the tiny and the saved pipelines may come without Mistral or Qwen3
            text = ", ".join(k for k, p in prompts.items() if _is_text(p))
            why = f"to embed the text of {text} (or pass prompt embeddings instead)"
        if qwen:  # the tiny and the saved pipelines may come without Qwen2.5-VL
            text = ", ".join(k for k, p in prompts.items() if _is_text(p))
            if qwen_edit:
                raise ValueError(
                    f"the text of {text} was given, but {pipeline} embeds text with the "
                    "image through Qwen2.5-VL (its encode_prompt(prompt, image)), which "
                    f"edit_image does not map; pass the pair (prompt_embeds, {_QWEN_MASK}) "
                    "that encode_prompt returns for the image instead"
                )
            why = (
                f"to embed the text of {text} (or pass the pair (prompt_embeds, "
                f"{_QWEN_MASK}) instead)"
            )
        for name in (*parts, "encode_prompt"):
            _part(pipe, name, why)
        projection = getattr(getattr(pipe, "text_encoder_2", None), "config", None)
        projection = getattr(projection, "projection_dim", None)
        if xl and pooled_dim is not None and projection not in (None, pooled_dim):
            raise ValueError(
                f"the unet's added embedding takes pooled embeddings of dim {pooled_dim} beside "
                f"{_TIME_IDS} time ids (projection_class_embeddings_input_dim = "
                f"{unet_config['projection_class_embeddings_input_dim']}), but text_encoder_2 "
                f"pools to projection_dim = {projection}; edit_image makes SDXL base's time ids "
                "(original size, crop, target size), not a refiner's aesthetic score"
            )


def _embed(pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    if isinstance(prompt, Tensor):
        embeds = prompt.to(device)
    else:
        text = prompt if isinstance(prompt, str) else list(prompt)
        embeds, _ = pipe.encode_prompt(text, device, 1, False)
    return embeds if dtype is None else embeds.to(dtype)


def _embed_pair(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None, sd3: bool = False
) -> tuple[Tensor, Tensor]:
    """SDXL's or SD3's prompt embeddings (B, L, D) and pooled embeddings (B, P), in ``dtype``."""
    if _is_pair(prompt):
        embeds, pooled = (p.to(device) for p in prompt)
    else:
        text = prompt if isinstance(prompt, str) else list(prompt)
        # The same text goes to every encoder (the pipeline's default without prompt_2 and,
        # for SD3, prompt_3; SD3's pipeline puts zeros in T5's place without text_encoder_3).
        others = {"prompt_2": None, "prompt_3": None} if sd3 else {}
        embeds, _, pooled, _ = pipe.encode_prompt(
            text,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **others,
        )
    return (embeds, pooled) if dtype is None else (embeds.to(dtype), pooled.to(dtype))


def _embed_pixart(
    pipe: Any, prompt: Any, device: torch.device, dtype: torch.dtype | None
) -> dict[str, Any]:
    """PixArt's transformer arguments of one branch: T5's embeddings (B, L, D) in ``dtype``
    and their mask (B, L), of text through the pipeline's ``encode_prompt`` (its default
    ``max_sequence_length``, no caption cleaning, which needs beautifulsoup4 and ftfy), or
    the pair given."""
    if _is_pair(prompt):
        embeds, mask = (p.to(device) for p in prompt)
    else:
        text = prompt if isinstance(prompt, str) else list(prompt)
        embeds, mask, _, _ = pipe.encode_prompt(
            text, do_classifier_free_guidance=False, device=device, clean_caption=False
        )
    embeds = embeds if dtype is None else embeds.to(dtype)
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def _xl_cond(embeds: Tensor, pooled: Tensor, time_ids: Tensor) -> dict[str, Any]:
    """The unet arguments of one SDXL branch."""
    return {
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }


def _empty(prompt: Any) -> bool:
    """Whether ``prompt`` is the empty text: ``""`` or a list of them."""
    return _is_text(prompt) and all(
        p == "" for p in ([prompt] if isinstance(prompt, str) else prompt)
    )


def _pooled_dim(unet_config: Mapping[str, Any]) -> int | None:
    """The pooled width the SDXL unet's added embedding takes beside its six time ids."""
    total = unet_config.get("projection_class_embeddings_input_dim")
    per_id = unet_config.get("addition_time_embed_dim")
    if not isinstance(total, int) or not isinstance(per_id, int):
        return None
    return total - _TIME_IDS * per_id
