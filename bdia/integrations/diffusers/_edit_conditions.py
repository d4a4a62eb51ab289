"""The conditions ``edit_image`` prepares as each pipeline prepares them, for both of its
ODEs: control images and their latents (Stable Diffusion's, SDXL's, SD3's and Flux's
ControlNets, Flux's Depth and Canny transformers), inpainting masks and masked-image
latents (9-channel unets, Flux Fill, SD3's and Qwen-Image's inpainting controlnets),
Kontext's reference
image, and an IP-Adapter's image prompt; and the stand-ins of each that ``from_diffusers``
checks before any network runs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._conditioning import _IP_PROJECTION, _JOINT_IMAGES, _UNET_IMAGES, _check_image_embeds
from ._controlnet import _MULTI_CONTROLNET, _control_factor, _controlnets
from ._flow_controlnet import (
    _FLUX_CONTROLNET,
    _QWEN_CONTROLNET,
    _QWEN_INPAINT_PIPELINE,
    _QWEN_PIPELINE,
    _SD3_CONTROLNET,
    _SD3_INPAINT_PIPELINE,
    _SD3_PIPELINE,
    _Z_CONTROLNET,
    _Z_INPAINT_PIPELINE,
    _Z_PIPELINE,
    _qwen_inpainting,
    _sd3_inpainting,
)
from ._pipeline_parts import (
    _FLUX_PACKING,
    _encode_frame,
    _float32_vae,
    _mean,
    _part,
    _vae_factor,
)
from ._scheduler_config import _class_names

# SDXL's time ids: the original size (H, W), the crop's top-left corner and the target size.
_TIME_IDS = 6
# The inpainting pipeline whose prepare_mask_latents encodes the masked image it is given,
# even as latents, where the others take 4-channel latents as they are.
_ENCODES_MASKED = "StableDiffusionXLControlNetInpaintPipeline"
# The inpainting pipelines that, for a network that takes no mask (a 4-channel unet, SD3's,
# Flux's, Chroma's, Qwen-Image's and Z-Image's text-to-image transformers, Flux's Depth or
# Canny ones), blend the noised image back into the latents outside the mask after every
# step: no ODE, so no exact inversion of the run.
_BLENDING = frozenset(
    {
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionControlNetInpaintPipeline",
        "StableDiffusionXLControlNetInpaintPipeline",
        "StableDiffusionXLControlNetUnionInpaintPipeline",
        "StableDiffusionPAGInpaintPipeline",
        "StableDiffusionXLPAGInpaintPipeline",
        "StableDiffusionControlNetPAGInpaintPipeline",
        "StableDiffusion3InpaintPipeline",
        "QwenImageInpaintPipeline",
        "QwenImageEditInpaintPipeline",
        "FluxInpaintPipeline",
        "FluxControlInpaintPipeline",
        "FluxControlNetInpaintPipeline",
        "FluxKontextInpaintPipeline",
        "ChromaInpaintPipeline",
        "ZImageInpaintPipeline",
        "Flux2KleinInpaintPipeline",
    }
)
# The Kontext pipeline whose prepare_latents noises the image for its blend.
_KONTEXT_INPAINT = "FluxKontextInpaintPipeline"
# Qwen-Image-Edit's inpainting pipeline, which blends; its prepare_latents noises the image
# for the blend and encodes its reference as QwenImageImg2ImgPipeline encodes its image.
_QWEN_EDIT_INPAINT = "QwenImageEditInpaintPipeline"
# The ControlNet pipelines' settings edit_image takes, by their names, and their defaults
# (a scale of None is the pipeline's default, _Z_IMAGE_SCALE for Z-Image's, else 1).
_CONTROL_DEFAULTS = {
    "controlnet_conditioning_scale": 1.0,
    "guess_mode": False,
    "control_guidance_start": 0.0,
    "control_guidance_end": 1.0,
}
# ZImageControlNetPipeline's and ZImageControlNetInpaintPipeline's controlnet_conditioning_scale.
_Z_IMAGE_SCALE = 0.75


def _flux_probe_cond(config: Mapping[str, Any], guidance: float | None) -> dict[str, Any]:
    """What ``from_diffusers`` requires of Flux's conditioning, with no tokens: for the probe
    that checks the scheduler and the transformer's dtype before any network runs (the
    prompts are not embedded yet), and is never evaluated."""
    axes = len(config.get("axes_dims_rope", (16, 56, 56)))
    cond: dict[str, Any] = {
        "encoder_hidden_states": torch.zeros(1, 0, 1),
        "pooled_projections": torch.zeros(1, 1),
        "txt_ids": torch.zeros(0, axes),
        "img_ids": torch.zeros(0, axes),
    }
    if guidance is not None:
        cond["guidance"] = guidance
    return cond


def _chroma_probe_cond(config: Mapping[str, Any]) -> dict[str, Any]:
    """``_flux_probe_cond``'s for Chroma's transformer: its attention mask in place of the
    pooled embeddings, with no tokens either."""
    cond = _flux_probe_cond(config, None)
    del cond["pooled_projections"]
    cond["attention_mask"] = torch.zeros(1, 0)
    return cond


def _qwen_probe_cond(
    config: Mapping[str, Any], img_shapes: list[Any], lengths: bool
) -> dict[str, Any]:
    """``_flux_probe_cond``'s for Qwen-Image's transformer: its embeddings with no tokens, no
    mask, the image's ``img_shapes`` and, where the transformer takes them (``lengths``), no
    text lengths."""
    cond: dict[str, Any] = {
        "encoder_hidden_states": torch.zeros(1, 0, config.get("joint_attention_dim", 1)),
        "encoder_hidden_states_mask": None,
        "img_shapes": img_shapes,
    }
    if lengths:
        cond["txt_seq_lens"] = [0]
    return cond


def _fill_channels(pipe: Any, vae: Any) -> int:
    """A Flux Fill transformer's ``in_channels`` with ``vae``: the packed latents, the masked
    image's packed latents, and the packed mask (a latent pixel's ``f x f`` mask pixels in
    2 x 2 patches): 64 + 64 + 256 = 384 for FLUX.1-Fill-dev's VAE."""
    packed = vae.config.latent_channels * _FLUX_PACKING**2
    return 2 * packed + (_FLUX_PACKING * _vae_factor(pipe, vae)) ** 2


def _flux_image_probe_cond(
    config: Mapping[str, Any], latent_size: tuple[int, int], kind: str
) -> dict[str, Tensor]:
    """Stand-ins of the packed latents' tokens for a Fill transformer's mask and masked image
    latents (``kind`` "fill"), a Depth or Canny one's control image latents ("control") or
    Kontext's reference image latents ("kontext"), for ``from_diffusers``' checks in the
    probe, which is never evaluated."""
    tokens = (latent_size[0] // _FLUX_PACKING) * (latent_size[1] // _FLUX_PACKING)
    c_in, c_out = config["in_channels"], config.get("out_channels") or config["in_channels"]
    if kind == "fill":
        return {
            "mask": torch.zeros(1, tokens, c_in - 2 * c_out),
            "masked_image_latents": torch.zeros(1, tokens, c_out),
        }
    if kind == "control":
        return {"control_latents": torch.zeros(1, tokens, c_out)}
    return {"image_latents": torch.zeros(1, tokens, c_in)}


def _fill_kwargs(
    pipe: Any, vae: Any, condition: Tensor, pixels: Tensor, dtype: torch.dtype, device: Any
) -> dict[str, Tensor]:
    """``from_diffusers``' ``mask`` and ``masked_image_latents`` for a Flux Fill transformer,
    as ``_inpaint_kwargs`` makes them for an inpainting unet: the image blanked where the
    mask is 1, ``pixels * (1 - condition)`` as FluxFillPipeline blanks it, encoded to the
    *mean* of the VAE's latent distribution (the pipeline draws a sample), and both through
    the pipeline's own ``prepare_mask_latents``, which shifts and scales those latents,
    repeats a batch of 1, packs them, and packs the mask's pixels, in ``dtype``."""
    batch, _, height, width = pixels.shape
    masked = pixels.float() * (1 - condition.to(pixels.device))
    # Latents of the VAE's channels: prepare_mask_latents takes them as encoded.
    latents = _mean(vae, masked.to(device, dtype))
    mask, masked_latents = pipe.prepare_mask_latents(
        condition, latents, batch, vae.config.latent_channels, 1, height, width, dtype, device, None
    )
    return {"mask": mask, "masked_image_latents": masked_latents}


def _flux_control_image(
    pipe: Any, control_image: Any, shape: Sequence[int], device: torch.device, maker: str
) -> Tensor:
    """The control image for the images ``shape`` = (batch, 3, H, W) as the pipeline's
    ``prepare_image`` makes it (a PIL image or list resized to H x W and mapped to [-1, 1] by
    its ``image_processor``, a tensor taken as it is; one repeated to the batch), in the
    VAE's dtype: ``maker``, the pipeline whose preparation this is (FluxControlPipeline,
    FluxControlNetPipeline, StableDiffusion3ControlNetPipeline), names it where the pipeline
    has no ``prepare_image``. StableDiffusion3ControlNetInpaintingPipeline has none: its
    ``prepare_image_with_mask`` prepares the image in StableDiffusion3ControlNetPipeline's
    ``prepare_image``'s steps, which make it here. Refuses, before any network runs, a
    tensor the VAE cannot take as the image's and a batch that is neither 1 nor the
    image's."""
    if maker == _SD3_INPAINT_PIPELINE:
        _part(pipe, "prepare_image_with_mask", f"to prepare the control image as {maker} does")
        _part(pipe, "image_processor", f"to prepare the control image as {maker} does")
        import diffusers

        sibling = diffusers.StableDiffusion3ControlNetPipeline
        prepare = functools.partial(sibling.prepare_image, pipe)
    else:
        prepare = _part(pipe, "prepare_image", f"to prepare the control image as {maker} does")
    batch, _, height, width = shape
    if isinstance(control_image, Tensor) and not (
        control_image.ndim == 4
        and control_image.shape[1] == 3
        and tuple(control_image.shape[2:]) == (height, width)
        and control_image.is_floating_point()
        and control_image.numel() > 0
        and bool(torch.isfinite(control_image).all())
        and float(control_image.abs().max()) <= 1.0
    ):
        raise ValueError(
            f"control_image as a tensor goes to the vae as it is ({type(pipe).__name__}'s "
            f"prepare_image does not process tensors): give shape (1 or {batch}, 3, {height}, "
            f"{width}), the image's size, floating and finite in [-1, 1] (from [0, 1]: "
            f"image * 2 - 1), got a {control_image.dtype} tensor of shape "
            f"{tuple(control_image.shape)}"
        )
    vae = pipe.vae
    made = prepare(control_image, width, height, batch, 1, device, vae.dtype)
    if made.shape[0] != batch:
        raise ValueError(
            f"control_image holds {made.shape[0]} images for {batch} images to edit; give 1 "
            f"(shared) or {batch}"
        )
    return made


def _flux_control_latents(pipe: Any, vae: Any, control: Tensor) -> Tensor:
    """``from_diffusers``' ``control_latents`` of the prepared control image ``control`` (B,
    3, H, W), as FluxControlPipeline encodes it but with the *mean* of the VAE's latent
    distribution where the pipeline draws a sample: shifted by ``shift_factor``, scaled by
    ``scaling_factor`` and packed by its ``_pack_latents``, in the VAE's dtype."""
    latents = (_mean(vae, control) - vae.config.shift_factor) * vae.config.scaling_factor
    return pipe._pack_latents(latents, *latents.shape)


def _qwen_control_latents(
    pipe: Any, vae: Any, control: Tensor, condition: Tensor | None = None
) -> Tensor:
    """``from_diffusers``' ``controlnet_cond`` of the prepared control image ``control`` (B,
    3, H, W) for QwenImageControlNetPipeline's controlnet, as the pipeline encodes it but
    with the *mean* of the VAE's latent distribution where the pipeline draws a sample: one
    frame, ``(z - latents_mean) * (1 / latents_std)`` in float32 at least (the pipeline's
    statistics are float32 tensors), packed by its ``_pack_latents`` (B, tokens, 4 z_dim).
    For an inpainting controlnet, QwenImageControlNetInpaintPipeline's, with the mask
    ``condition`` (1 or B, 1, H, W) in [0, 1], as its ``prepare_image_with_mask`` makes them
    (the mean where it draws): the image set to -1 where the mask is above 0.5, encoded so
    and cast to the VAE's dtype, then ``1 - mask`` sized to the latents (nearest) as the last
    channel, packed: (B, tokens, 4 (z_dim + 1))."""
    mask = None
    if condition is not None and _qwen_inpainting(pipe.controlnet):
        mask = condition.to(control.device, control.dtype).expand(control.shape[0], -1, -1, -1)
        control = control.masked_fill(mask > 0.5, -1.0)
    latents = _encode_frame(vae, control, torch.promote_types(vae.dtype, torch.float32))
    if mask is not None:
        latents = latents.to(vae.dtype)
        # The pipeline sizes the mask as one frame too, (B, 1, 1, H, W) to the latents'.
        kept = 1 - torch.nn.functional.interpolate(mask.unsqueeze(2), size=latents.shape[-3:])
        latents = torch.cat([latents, kept.to(latents.dtype)], dim=1)
    batch, channels, _, height, width = latents.shape
    # One frame: (B, C, 1, h, w) holds its values in the order of the pipeline's permuted
    # (B, 1, C, h, w), which _pack_latents reads through a view.
    return pipe._pack_latents(latents, batch, channels, height, width)


def _sd3_control_latents(
    pipe: Any, vae: Any, control: Tensor, condition: Tensor | None = None
) -> Tensor:
    """``from_diffusers``' ``controlnet_cond`` of the prepared control image ``control`` (B,
    3, H, W) for StableDiffusion3ControlNetPipeline's controlnet, as the pipeline encodes it
    but with the *mean* of the VAE's latent distribution where the pipeline draws a sample:
    less ``shift_factor`` (none where the controlnet's ``force_zeros_for_pooled_projection``
    is set, InstantX's, as the pipeline does), times ``scaling_factor``, in the VAE's
    dtype. For an inpainting controlnet, StableDiffusion3ControlNetInpaintingPipeline's, with
    the mask ``condition`` (1 or B, 1, H, W) in [0, 1], as its ``prepare_image_with_mask``
    makes them (the mean where it draws): the image set to -1 where the mask is above 0.5,
    encoded, less ``shift_factor`` (always), times ``scaling_factor``, then ``1 - mask``
    sized to the latents (nearest) as the last channel: (B, latent_channels + 1, h, w)."""
    shift = vae.config.shift_factor
    if condition is not None and _sd3_inpainting(pipe.controlnet):
        mask = condition.to(control.device, control.dtype).expand(control.shape[0], -1, -1, -1)
        latents = (_mean(vae, control.masked_fill(mask > 0.5, -1.0)) - shift) * (
            vae.config.scaling_factor
        )
        kept = 1 - torch.nn.functional.interpolate(mask, size=tuple(latents.shape[2:]))
        return torch.cat([latents, kept.to(latents.dtype)], dim=1)
    if pipe.controlnet.config.get("force_zeros_for_pooled_projection", True):
        shift = 0
    return (_mean(vae, control) - shift) * vae.config.scaling_factor


def _z_image_control_latents(
    pipe: Any, vae: Any, control: Tensor, condition: Tensor | None, pixels: Tensor
) -> Tensor:
    """``from_diffusers``' ``controlnet_cond`` of the prepared control image ``control`` (B,
    3, H, W) for ZImageControlNetPipeline's controlnet, as the pipeline makes it: the VAE's
    mode (its mean) of the image, ``(z - shift_factor) * scaling_factor`` in the VAE's
    dtype, as one frame, then zeros up to the controlnet's ``control_in_dim``: (B,
    control_in_dim, 1, h, w). For ZImageControlNetInpaintPipeline, with the mask
    ``condition`` (1 or B, 1, H, W) in [0, 1] and the edited image ``pixels`` (B, 3, H, W)
    in [-1, 1] (the pipeline's ``image``), as that pipeline makes it: those latents, then
    ``1 - mask`` (binarised at 0.5 by its ``mask_processor``) sized to the latents
    (nearest), then the latents of the image set to 0 where the mask is 1, each as one
    frame: (B, 2 C + 1, 1, h, w)."""
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    latents = ((_mean(vae, control) - shift) * scale).unsqueeze(2)
    batch = latents.shape[0]
    if condition is None:
        # The pipeline's zeros: after the latents' channels, where a controlnet takes more.
        missing = pipe.controlnet.config["control_in_dim"] - pipe.transformer.config["in_channels"]
        zeros = latents.new_zeros(batch, max(missing, 0), *latents.shape[2:])
        return torch.cat([latents, zeros], dim=1)
    height, width = control.shape[-2:]
    mask = pipe.mask_processor.preprocess(condition, height=height, width=width)
    mask = mask.to(control.device, control.dtype).expand(batch, -1, -1, -1)
    masked = (_mean(vae, pixels.to(control.device, control.dtype) * (mask < 0.5)) - shift) * scale
    kept = torch.nn.functional.interpolate(1 - mask, size=tuple(masked.shape[-2:]), mode="nearest")
    return torch.cat([latents, kept.unsqueeze(2), masked.unsqueeze(2)], dim=1)


def _flow_controlnet_kwargs(
    pipe: Any,
    control_image: Any,
    settings: Mapping[str, Any],
    steps: Any,
    shape: Sequence[int],
    device: torch.device,
) -> dict[str, Any]:
    """``from_diffusers``' ControlNet arguments for FluxControlNetPipeline's,
    StableDiffusion3ControlNetPipeline's, StableDiffusion3ControlNetInpaintingPipeline's,
    QwenImageControlNetPipeline's (and its inpainting sibling's) or ZImageControlNetPipeline's
    (and its inpainting sibling's) controlnet, but with ``controlnet_cond`` the control image
    as its ``prepare_image`` makes it (B, 3, H, W), which ``_flux_control_latents``,
    ``_sd3_control_latents`` (with the mask, for the inpainting controlnet),
    ``_qwen_control_latents`` or ``_z_image_control_latents`` encodes once the VAE may run."""
    names = _class_names(pipe.controlnet)
    if _Z_CONTROLNET in names:
        # Z-Image's control image guides (the image under the mask is the edited one).
        maker = _Z_INPAINT_PIPELINE if _Z_INPAINT_PIPELINE in _class_names(pipe) else _Z_PIPELINE
        inpainting = False
    else:
        inpainting = _sd3_inpainting(pipe.controlnet) or _qwen_inpainting(pipe.controlnet)
        maker = "FluxControlNetPipeline" if _FLUX_CONTROLNET in names else _SD3_PIPELINE
        if _QWEN_CONTROLNET in names:
            maker = _QWEN_PIPELINE
        if inpainting:
            maker = _QWEN_INPAINT_PIPELINE if _QWEN_CONTROLNET in names else _SD3_INPAINT_PIPELINE
    if control_image is None:
        what = "the image that guides it, as the pipeline's control_image"
        if inpainting:
            what = (
                "the image kept outside mask_image, which guides it with the mask (as a rule "
                "the image itself)"
            )
        raise ValueError(
            f"the pipeline has a controlnet ({type(pipe.controlnet).__name__}); give "
            f"control_image, {what}"
        )
    start, end = settings["control_guidance_start"], settings["control_guidance_end"]
    return {
        "controlnet": pipe.controlnet,
        "controlnet_cond": _flux_control_image(pipe, control_image, shape, device, maker),
        "conditioning_scale": settings["controlnet_conditioning_scale"],
        "guess_mode": settings["guess_mode"],
        "control_guidance_start": start,
        "control_guidance_end": end,
        # from_diffusers takes the steps with a switch only (and checks the bounds).
        "num_inference_steps": steps if (start, end) != (0, 1) else None,
    }


def _kontext_kwargs(
    pipe: Any, pixels: Tensor, img_ids: Tensor, dtype: torch.dtype, device: torch.device
) -> dict[str, Tensor]:
    """FluxKontextPipeline's reference image for the edited image ``pixels`` (B, 3, H, W) in
    [-1, 1]: its packed latents (the mode of the VAE's distribution, its mean, shifted and
    scaled) and the latents' ``img_ids`` followed by the image's, as the pipeline's
    ``prepare_latents`` makes them in ``dtype`` (``FluxKontextInpaintPipeline``'s, which
    noises the image for its blend, by FluxKontextPipeline's: the same encoding, packing and
    ids of the reference image its transformer takes without ``image_reference``)."""
    batch, _, height, width = pixels.shape
    channels = pipe.vae.config.latent_channels
    prepare = pipe.prepare_latents
    if _KONTEXT_INPAINT in _class_names(pipe):
        import diffusers

        prepare = functools.partial(diffusers.FluxKontextPipeline.prepare_latents, pipe)
    # Latents given, so that prepare_latents draws no noise; only the image's are used.
    placeholder = torch.zeros(batch, img_ids.shape[0], channels * _FLUX_PACKING**2)
    _, image_latents, _, image_ids = prepare(
        pixels.to(dtype), batch, channels, height, width, dtype, device, None, placeholder
    )
    return {"image_latents": image_latents, "img_ids": torch.cat([img_ids, image_ids])}


def _qwen_edit_reference(
    pipe: Any,
    pixels: Tensor,
    dtype: torch.dtype,
    device: torch.device,
    references: Sequence[Tensor] = (),
) -> Tensor:
    """QwenImageEditPipeline's reference image for the edited image ``pixels`` (B, 3, H, W)
    in [-1, 1]: its packed latents (B, tokens, 4 z_dim), as the pipeline's
    ``prepare_latents`` makes them in ``dtype`` of the one-frame video (the mode of the VAE's
    distribution, its mean, normalised ``(z - latents_mean) / latents_std``, packed). With
    ``references`` (each (1 or B, 3, H', W') in [-1, 1]), QwenImageEditPlusPipeline's: the
    edited image's latents followed along the tokens by each reference's, made alike (a
    reference of batch 1 repeated to B), as that pipeline's ``prepare_latents`` makes them
    for its list of images. QwenImageEditInpaintPipeline's, as its ``prepare_latents``
    makes them (of another signature: it noises the image too): the VAE's mean where it
    draws a sample, normalised ``(z - latents_mean) * (1 / latents_std)``, packed."""
    batch, _, height, width = pixels.shape
    channels = pipe.vae.config.z_dim
    if _QWEN_EDIT_INPAINT in _class_names(pipe):
        latents = _encode_frame(pipe.vae, pixels.to(device), dtype)
        return pipe._pack_latents(latents, batch, channels, *latents.shape[-2:])
    frames: Any = pixels.unsqueeze(2).to(dtype)
    if references:
        frames = [frames, *(r.unsqueeze(2).to(device, dtype) for r in references)]
    # Latents given, so that prepare_latents draws no noise; only the images' are used.
    placeholder = torch.zeros(batch, 1, channels * _FLUX_PACKING**2)
    _, image_latents = pipe.prepare_latents(
        frames, batch, channels, height, width, dtype, device, None, placeholder
    )
    return image_latents


def _control_kwargs(
    pipe: Any,
    model: str,
    control_image: Any,
    settings: Mapping[str, Any],
    steps: Any,
    shape: Sequence[int],
    device: torch.device,
    inpaint: bool = False,
) -> dict[str, Any]:
    """``from_diffusers``' ControlNet arguments for the pipeline's controlnet: the control
    image made as the pipeline makes it (its ``prepare_image``, at the image's size ``shape``
    = (batch, C, H, W), one per image; the img2img pipelines' ``prepare_control_image`` where
    the pipeline has no ``prepare_image``; with ``inpaint``, an inpainting unet's, the
    ControlNet inpainting pipelines' ``prepare_control_image`` of the whole image, no crop),
    its scale, guess mode and switch (``settings``, by the pipelines' names); ``{}`` for a
    pipeline without a controlnet."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        if control_image is not None:
            raise ValueError(
                "control_image was given, but the pipeline has no controlnet; it guides a "
                "ControlNet pipeline's (StableDiffusionControlNetPipeline's, "
                "StableDiffusionXLControlNetPipeline's) controlnet"
            )
        for name, default in _CONTROL_DEFAULTS.items():
            value = settings[name]
            # A scale of None stands for the pipeline's default.
            unset = value is None and name == "controlnet_conditioning_scale"
            if not unset and not (type(value) in (int, float, bool) and value == default):
                raise ValueError(
                    f"{name} is a ControlNet setting, but the pipeline has no controlnet; "
                    "leave it out"
                )
        return {}
    names = set(_class_names(controlnet))
    if settings["controlnet_conditioning_scale"] is None:  # the pipeline's default
        scale = _Z_IMAGE_SCALE if _Z_CONTROLNET in names else 1.0
        settings = {**settings, "controlnet_conditioning_scale": scale}
    if {_FLUX_CONTROLNET, _SD3_CONTROLNET, _QWEN_CONTROLNET, _Z_CONTROLNET} & names:
        return _flow_controlnet_kwargs(pipe, control_image, settings, steps, shape, device)
    if model != "unet":
        raise ValueError(
            f"the pipeline has a controlnet ({type(controlnet).__name__}) beside a transformer; "
            "edit_image maps the ControlNet pipelines of Stable Diffusion and SDXL (a "
            "ControlNetModel beside a unet), FluxControlNetPipeline's, "
            "StableDiffusion3ControlNetPipeline's, QwenImageControlNetPipeline's (one "
            "QwenImageControlNetModel) and ZImageControlNetPipeline's, not this one"
        )
    # The text-to-image ControlNet pipelines prepare the control image with prepare_image;
    # the img2img and inpainting ones, whose image= is the image to start from, take it as
    # control_image= and prepare it with prepare_control_image.
    method = "prepare_image"
    if inpaint or (
        getattr(pipe, method, None) is None
        and getattr(pipe, "prepare_control_image", None) is not None
    ):
        method = "prepare_control_image"
    if control_image is None:
        given = "image=" if method == "prepare_image" else "control_image="
        raise ValueError(
            f"the pipeline has a controlnet ({type(controlnet).__name__}); give control_image, "
            f"the image that guides it (the pipeline's {given}), as it guided the image's "
            "making (a list, one per controlnet, for several)"
        )
    prepare = _part(pipe, method, "to prepare the control image as the pipeline does")
    crop = {}
    if "crops_coords" in inspect.signature(prepare).parameters:
        # The inpainting pipelines' method takes the crop of their padding_mask_crop too:
        # none here, the image's whole frame (their default).
        crop = {"crops_coords": None, "resize_mode": "default"}
    module, nets = _controlnets(controlnet)
    batch, _, height, width = shape
    factor = _vae_factor(pipe, pipe.vae)
    for net in nets:
        if _control_factor(net) != factor:
            raise ValueError(
                f"the controlnet takes control images {_control_factor(net)} times the "
                f"latents' size, but the vae's downsampling factor is {factor}: it was not "
                "made for this pipeline"
            )
    multi = _MULTI_CONTROLNET in _class_names(module)
    if multi and (not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets)):
        raise ValueError(
            f"control_image must be a list of {len(nets)} images, one per controlnet of the "
            "pipeline's MultiControlNetModel"
        )
    prepared = []
    for i, image in enumerate(control_image if multi else [control_image]):
        # The pipelines' own preparation (resized to the image's size, in [0, 1]), without
        # the doubling for guidance, which from_diffusers makes.
        made = prepare(
            image=image,
            width=width,
            height=height,
            batch_size=batch,
            num_images_per_prompt=1,
            device=device,
            dtype=module.dtype,
            do_classifier_free_guidance=False,
            guess_mode=False,
            **crop,
        )
        if made.shape[0] != batch:
            where = f"control_image[{i}]" if multi else "control_image"
            raise ValueError(
                f"{where} holds {made.shape[0]} images for {batch} images to edit; give 1 "
                f"(shared) or {batch}"
            )
        prepared.append(made)
    start, end = settings["control_guidance_start"], settings["control_guidance_end"]
    starts = start if isinstance(start, (list, tuple)) else [start]
    ends = end if isinstance(end, (list, tuple)) else [end]
    # from_diffusers takes the steps with a switch only (and checks the bounds).
    switched = any(v != 0 for v in starts) or any(v != 1 for v in ends)
    return {
        "controlnet": controlnet,
        "controlnet_cond": prepared if multi else prepared[0],
        "conditioning_scale": settings["controlnet_conditioning_scale"],
        "guess_mode": settings["guess_mode"],
        "control_guidance_start": start,
        "control_guidance_end": end,
        "num_inference_steps": steps if switched else None,
    }


def _mask_condition(
    pipe: Any,
    mask_image: Any,
    inpaint: bool,
    what: str,
    shape: Sequence[int],
    controlnet: bool = False,
) -> Tensor | None:
    """The mask as an inpainting pipeline preprocesses it (its ``mask_processor``: grayscale,
    binarised at 0.5, in [0, 1]), of shape ``(1 or batch, 1, H, W)`` for images of ``shape``
    = (batch, C, H, W); None for a pipeline whose network is not an inpainting unet
    (``inpaint``; ``what`` names its input channels). With ``controlnet``, for SD3's or
    Qwen-Image's inpainting controlnet, a tensor is taken as it is (a copy), as
    StableDiffusion3ControlNetInpaintingPipeline's and QwenImageControlNetInpaintPipeline's
    ``prepare_image_with_mask`` take it, and
    the pipeline needs no ``prepare_mask_latents``. One-line refusals for a mask that the
    pipeline would resize or tile (another size, another batch than 1 and the image's) or
    that is no mask (other channels, values outside [0, 1]), and for any mask to a pipeline
    that blends the image back in (``_BLENDING``) about a network that takes none, before any
    network runs."""
    from PIL import Image

    if not inpaint:
        blends = [name for name in _class_names(pipe) if name in _BLENDING]
        if mask_image is not None and blends:
            raise ValueError(
                f"mask_image was given, but the pipeline is a {blends[0]} whose {what}, no "
                "mask: it blends the noised image back into the latents outside the mask at "
                "every step, which is not an ODE, so its run has no exact inversion and "
                "edit_image takes no mask for it; use an inpainting model, whose network takes "
                "the mask: a 9-channel inpainting unet (StableDiffusionInpaintPipeline, "
                "StableDiffusionXLInpaintPipeline and their ControlNet inpainting pipelines) or "
                "a Flux Fill transformer (FluxFillPipeline); or leave mask_image out to edit the "
                "whole image with this pipeline's model"
            )
        if mask_image is not None:
            raise ValueError(
                f"mask_image was given, but the pipeline's {what}; it conditions an inpainting "
                "unet (in_channels = 9: the latents, the mask and the masked image's latents; "
                "StableDiffusionInpaintPipeline's, StableDiffusionXLInpaintPipeline's and "
                "their ControlNet inpainting pipelines'), a Flux Fill transformer "
                "(FluxFillPipeline's), SD3's inpainting controlnet (extra_conditioning_"
                f"channels = 1, {_SD3_INPAINT_PIPELINE}'s), Qwen-Image's (extra_condition_"
                f"channels = 4, {_QWEN_INPAINT_PIPELINE}'s) or Z-Image's ({_Z_INPAINT_PIPELINE}'s "
                "controlnet, which takes the image under it)"
            )
        return None
    if mask_image is None:
        raise ValueError(
            "the pipeline's unet is an inpainting one (in_channels = 9: the latents, the mask "
            "and the masked image's latents); give mask_image, white (1) where the edit may "
            "repaint, as the pipeline's mask_image"
        )
    parts = ("mask_processor",) if controlnet else ("mask_processor", "prepare_mask_latents")
    for name in parts:
        _part(pipe, name, "to prepare the mask and the masked image as the pipeline does")
    batch, _, height, width = shape
    masks = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]
    if masks and all(isinstance(m, Image.Image) for m in masks):
        sizes = {m.size for m in masks}
        if sizes != {(width, height)}:
            raise ValueError(
                f"mask_image is {' and '.join(f'{w} x {h}' for w, h in sorted(sizes))} (W x H), "
                f"but the image is {width} x {height}; give masks of the image's size"
            )
        count = len(masks)
    elif isinstance(mask_image, Tensor):
        if (
            mask_image.ndim != 4
            or mask_image.shape[1] != 1
            or tuple(mask_image.shape[2:]) != (height, width)
        ):
            raise ValueError(
                f"mask_image as a tensor must have shape (1 or {batch}, 1, {height}, {width}), "
                f"one channel at the image's size, got {tuple(mask_image.shape)}"
            )
        if not mask_image.is_floating_point() or not bool(torch.isfinite(mask_image).all()):
            raise ValueError(
                f"mask_image as a tensor must be finite floating point in [0, 1], got "
                f"{mask_image.dtype}"
            )
        lo, hi = float(mask_image.min()), float(mask_image.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"mask_image values lie in [{lo:.4g}, {hi:.4g}]; a mask lies in [0, 1], 1 "
                "where the edit may repaint"
            )
        count = mask_image.shape[0]
    else:
        raise TypeError(
            "mask_image must be a PIL image, a list of PIL images or a tensor of shape "
            f"(1 or batch, 1, H, W) in [0, 1], got {type(mask_image).__name__}"
        )
    if count not in (1, batch):
        raise ValueError(
            f"mask_image holds {count} masks for {batch} images to edit; give 1 (shared) or {batch}"
        )
    # A copy: the processor binarises a tensor in place where it passes it through.
    given = mask_image.clone() if isinstance(mask_image, Tensor) else mask_image
    if controlnet and isinstance(given, Tensor):
        return given
    condition: Tensor = pipe.mask_processor.preprocess(given, height=height, width=width)
    return condition


def _inpaint_kwargs(
    pipe: Any,
    vae: Any,
    condition: Tensor,
    pixels: Tensor,
    dtype: torch.dtype,
    upcast: bool,
    device: torch.device,
) -> dict[str, Tensor]:
    """``from_diffusers``' ``mask`` and ``masked_image_latents`` for the mask ``condition``
    (``_mask_condition``'s) and the image ``pixels`` (B, 3, H, W) in [-1, 1]: the image
    blanked where the mask is 1, as the pipelines blank it, encoded to the *mean* of the
    VAE's latent distribution times ``scaling_factor`` in ``dtype`` (the pipelines'
    ``_encode_vae_image`` draws a sample there, from the masked image in ``dtype``; SDXL's,
    ``upcast``, in float32 where the VAE's config says ``force_upcast``, and neither applies
    ``latents_mean`` or ``latents_std``), then both
    through the pipeline's own ``prepare_mask_latents``, which sizes the mask to the latents
    (nearest) and repeats a batch of 1 to B, undoubled: ``from_diffusers`` doubles them
    under guidance. ``StableDiffusionXLControlNetInpaintPipeline``'s encodes the masked image
    itself, whatever it is given: there it makes the mask alone, and the latents (of batch B
    already) are cast to ``dtype`` as it casts its own."""
    batch, _, height, width = pixels.shape
    # Blanked in float32 and rounded to the unet's dtype, as the pipelines hand it to the VAE.
    masked = (pixels.float() * (condition.to(pixels.device) < 0.5)).to(device, dtype)
    with _float32_vae(vae, upcast, encoding=True):
        latents = _mean(vae, masked).to(dtype) * vae.config.scaling_factor
    if _ENCODES_MASKED in _class_names(pipe):
        # Its prepare_mask_latents encodes whatever it is given (a draw), so it makes the
        # mask alone; the latents, of the batch already, go as it casts its own.
        mask, _ = pipe.prepare_mask_latents(
            condition, None, batch, height, width, dtype, device, None, False
        )
        return {"mask": mask, "masked_image_latents": latents.to(device, dtype)}
    mask, masked_latents = pipe.prepare_mask_latents(
        condition, latents, batch, height, width, dtype, device, None, False
    )
    return {"mask": mask, "masked_image_latents": masked_latents}


def _control_probe_cond(xl: bool) -> dict[str, Any]:
    """Stand-ins with no tokens for the prompt embeddings (and SDXL's added conditioning)
    that ``from_diffusers`` asks of a controlnet's conditioning, for the probe that checks
    its settings before any network runs; it is never evaluated."""
    cond: dict[str, Any] = {"encoder_hidden_states": torch.zeros(1, 0, 1)}
    if xl:
        added = {"text_embeds": torch.zeros(1, 1), "time_ids": torch.zeros(1, _TIME_IDS)}
        cond["added_cond_kwargs"] = added
    return cond


def _check_image_prompt(
    pipe: Any,
    projection: Any,
    adapters: int | None,
    image: Any,
    embeds: Any,
    model: str = "unet",
    ndims: tuple[int, ...] = (3, 4),
) -> None:
    """Refuse, in one line and before any network runs, an image prompt that does not fit
    the pipeline: a ``model`` (its unet, or Flux's transformer) with IP-Adapters loaded
    (``adapters`` of them) without one, one for a network without an IP-Adapter, both
    ``image`` and ``embeds``, images or embeddings of another count than the adapters,
    embeddings that are not floating tensors of ``ndims`` dims (3 or 4 for a unet's, 3 for
    Flux's), and a unet with an image projection (``projection``) that is not an
    IP-Adapter's."""
    given = image is not None or embeds is not None
    if projection == _IP_PROJECTION and adapters is not None and not given:
        raise ValueError(
            f"the {model} has encoder_hid_dim_type = {projection!r}: an IP-Adapter is loaded, "
            "which takes an image prompt; give ip_adapter_image (or ip_adapter_image_embeds), "
            "as the pipeline's, or unload the adapter (pipe.unload_ip_adapter())"
        )
    if projection not in (None, "text_proj", _IP_PROJECTION):
        raise ValueError(
            f"the unet has encoder_hid_dim_type = {projection!r} (an image projection, not an "
            "IP-Adapter's): it needs image embeddings that edit_image does not make; unload "
            "an adapter that set it (pipe.unload_ip_adapter()), or use from_diffusers with the "
            "unet's arguments and bdia.Inversion directly"
        )
    if not given:
        return
    if adapters is None:
        name = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds"
        raise ValueError(
            f"{name} was given, but the pipeline's network has no IP-Adapter loaded; load one "
            "with pipe.load_ip_adapter(...) (edit_image maps the IP-Adapters of Stable "
            "Diffusion's and SDXL's unets and Flux's and Chroma's transformers), or leave it out"
        )
    if image is not None and embeds is not None:
        raise ValueError(
            "ip_adapter_image and ip_adapter_image_embeds were both given; give one, as the "
            "pipeline takes one"
        )
    _part(pipe, "prepare_ip_adapter_image_embeds", "to embed the image prompt as it does")
    if image is not None:
        for name in ("image_encoder", "feature_extractor"):
            _part(pipe, name, "to embed ip_adapter_image (or pass ip_adapter_image_embeds)")
        count = len(image) if isinstance(image, list) else 1
        if count != adapters:
            raise ValueError(
                f"ip_adapter_image holds {count} image prompts for the {model}'s {adapters} "
                "IP-Adapters; give one per adapter (a list of them; several images for one "
                "adapter as a list inside it), as the pipeline's ip_adapter_image"
            )
        return
    _check_image_embeds(
        embeds, "ip_adapter_image_embeds", adapters, "one per IP-Adapter, as the pipeline's", ndims
    )


def _check_sd3_image_prompt(pipe: Any, image: Any, embeds: Any) -> None:
    """Refuse, in one line and before any network runs, an image prompt that SD3's
    transformer with an IP-Adapter loaded would not take as StableDiffusion3Pipeline gives
    it: both ``image`` and ``embeds``, ``image`` without the pipeline's ``image_encoder``
    and ``feature_extractor``, and ``embeds`` that are not one 3-D floating tensor. Neither
    is taken: the pipeline then runs without an image prompt."""
    if image is not None and embeds is not None:
        raise ValueError(
            "ip_adapter_image and ip_adapter_image_embeds were both given; give one, as the "
            "pipeline takes one"
        )
    if image is None and embeds is None:
        return
    _part(pipe, "prepare_ip_adapter_image_embeds", "to embed the image prompt as it does")
    if image is not None:
        for name in ("image_encoder", "feature_extractor"):
            _part(pipe, name, "to embed ip_adapter_image (or pass ip_adapter_image_embeds)")
        return
    if not (isinstance(embeds, Tensor) and embeds.is_floating_point() and embeds.ndim == 3):
        what = f"a {type(embeds).__name__}"
        if isinstance(embeds, Tensor):
            what = f"a {embeds.dtype} tensor of shape {tuple(embeds.shape)}"
        raise ValueError(
            "ip_adapter_image_embeds must be one floating tensor of shape (batch or 1, tokens, "
            "D) for SD3's IP-Adapter, torch.cat([negative, positive]) under guidance, as "
            f"StableDiffusion3Pipeline.prepare_ip_adapter_image_embeds makes it; got {what}"
        )


def _check_embeds_batch(embeds: Sequence[Tensor], guided: bool, batch: int) -> None:
    """Refuse, before any network runs, ``ip_adapter_image_embeds`` whose batch does not
    fit ``batch`` images: under guidance (``guided``) each holds the negative and the
    positive halves, so twice 1 or twice ``batch``; without, 1 or ``batch``."""
    for i, tensor in enumerate(embeds):
        rows = tensor.shape[0]
        if rows in ((2, 2 * batch) if guided else (1, batch)):
            continue
        if guided:
            raise ValueError(
                f"ip_adapter_image_embeds[{i}] has batch {rows}; under guidance it is "
                "torch.cat([negative, positive]), each of batch 1 or "
                f"{batch} (the images'), as prepare_ip_adapter_image_embeds(..., "
                "do_classifier_free_guidance=True) makes them: batch 2 or "
                f"{2 * batch}"
            )
        raise ValueError(
            f"ip_adapter_image_embeds[{i}] has batch {rows}; give 1 (shared) or {batch} (the "
            "images'), without the negative half: guidance_scale is 1"
        )


def _flux_image_prompt(
    pipe: Any,
    image: Any,
    embeds: Sequence[Tensor] | None,
    guided: bool,
    size: tuple[int, int],
    device: torch.device,
) -> list[Tensor]:
    """A Flux pipeline's image embeddings of the image prompt, one tensor per adapter, each
    ``torch.cat([negative, positive])`` when ``guided`` (true CFG), as edit_image takes them
    for every pipeline. From ``image``, FluxPipeline's ``prepare_ip_adapter_image_embeds``
    makes the positive ones and, under true CFG, the negative ones of its default
    ``negative_ip_adapter_image``, an all-zero image of ``size`` (width, height) laid out as
    it makes it; ``embeds`` (stacked so already) are taken as they are, on ``device``."""
    if embeds is not None:
        return [e.to(device) for e in embeds]
    positive = pipe.prepare_ip_adapter_image_embeds(image, None, device, 1)
    if not guided:
        return positive
    blank = [np.zeros((*size, 3), dtype=np.uint8)] * len(positive)
    negative = pipe.prepare_ip_adapter_image_embeds(blank, None, device, 1)
    return [torch.cat([n, p]) for n, p in zip(negative, positive)]


def _with_image_prompt(cond: dict[str, Any], images: Any, joint: bool = False) -> dict[str, Any]:
    """One branch's network arguments with ``images``, an IP-Adapter's image embeddings (one
    tensor per adapter; SD3's one tensor), as its ``added_cond_kwargs``' ``image_embeds``
    (with ``joint``, for Flux's or SD3's transformer, its ``joint_attention_kwargs``'
    ``ip_adapter_image_embeds``); ``cond`` itself where ``images`` is None."""
    if images is None:
        return cond
    outer, inner = _JOINT_IMAGES if joint else _UNET_IMAGES
    return {**cond, outer: {**cond.get(outer, {}), inner: images}}
