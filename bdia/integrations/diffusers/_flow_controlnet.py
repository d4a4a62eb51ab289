"""Flux's, SD3's, Qwen-Image's and Z-Image's ControlNets (``FluxControlNetModel`` as
``FluxControlNetPipeline`` calls it, ``SD3ControlNetModel`` as
``StableDiffusion3ControlNetPipeline`` does, or with the mask's channel, Alimama's inpainting
kind, as ``StableDiffusion3ControlNetInpaintingPipeline`` does, ``QwenImageControlNetModel``
or ``QwenImageMultiControlNetModel`` as ``QwenImageControlNetPipeline`` does, or with the
mask's channels as ``QwenImageControlNetInpaintPipeline`` does, ``ZImageControlNetModel`` as
``ZImageControlNetPipeline`` and ``ZImageControlNetInpaintPipeline`` do) and their settings,
checked as ``from_diffusers`` takes them, and their calls.

Flux's controlnet takes the packed latents, the timestep, the prompt, the embedded guidance
and the position ids the transformer takes, and the control image's packed latents; SD3's
takes the latents, the timestep, the prompt (or none) and the pooled prompt (or zeros), and
the control image's latents (the inpainting kind: the masked image's latents and the mask,
in one tensor); Qwen-Image's takes the packed latents, the timestep, the prompt with its
mask and the image shapes the transformer takes, and the control image's packed latents
(its union wrapper one such tensor per control image, summing the residuals; the inpainting
kind the masked image's packed latents and the packed mask, in one tensor); Z-Image's takes
the transformer's list of per-sample latents, its timestep and its list of prompts (twice
the batch under CFG), and the control image's latents as one frame (its inpainting kind the
mask and the masked image's latents after them, in one tensor). Their residuals go to the
transformer. The settings are checked in one line before any call
(``from_diffusers``' Raises lists them); ``control_guidance_start`` and
``control_guidance_end`` become intervals of ODE times on the pipeline's grid, as for Stable
Diffusion's ControlNet (``_controlnet``). What is not mapped (a union controlnet's modes,
XLabs' controlnets of pixels, several controlnets, SD3.5's controlnets without their own
``pos_embed``, Qwen-Image's union wrapper of an inpainting controlnet, a guidance window or
a strength for Z-Image's, whose pipelines have neither) is refused.

``kind`` names the transformer's family throughout: ``"flux"``, ``"sd3"``, ``"qwen"`` or
``"zimage"``.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...schedules import check_steps
from ._conditioning import _FLOW_RESERVED, _check_cond, _qwen_image_tokens
from ._controlnet import _per_net, _strength
from ._scheduler_config import _class_names
from .grid import diffusers_grid

_FLUX_CONTROLNET = "FluxControlNetModel"
_SD3_CONTROLNET = "SD3ControlNetModel"
_QWEN_CONTROLNET = "QwenImageControlNetModel"
# Qwen-Image's union wrapper: one controlnet called once per control image.
_QWEN_MULTI = "QwenImageMultiControlNetModel"
_QWEN_PIPELINE = "QwenImageControlNetPipeline"
# Its controlnet takes the masked image's packed latents and then the packed mask: the one
# mask channel in 2 x 2 patches, 4 channels more (extra_condition_channels).
_QWEN_INPAINT_PIPELINE = "QwenImageControlNetInpaintPipeline"
_QWEN_MASK_CHANNELS = 4
_SD3_PIPELINE = "StableDiffusion3ControlNetPipeline"
_Z_CONTROLNET = "ZImageControlNetModel"
_Z_PIPELINE = "ZImageControlNetPipeline"
# Its controlnet takes the control image's latents, the mask's channel and the masked image's
# latents, control_in_dim = 2 C + 1 for latents of C channels (Z-Image-Turbo-Fun-Controlnet-
# Union-2.x's), which ZImageControlNetPipeline fills with zeros after the control image's.
_Z_INPAINT_PIPELINE = "ZImageControlNetInpaintPipeline"
# The transformer's modules that ZImageControlNetModel.from_transformer gives the controlnet,
# as both ControlNet pipelines do when they are made: it runs them itself.
_Z_SHARED = (
    "t_embedder",
    "all_x_embedder",
    "cap_embedder",
    "rope_embedder",
    "noise_refiner",
    "context_refiner",
    "x_pad_token",
    "cap_pad_token",
)
# Its controlnet takes the masked image's latents and then the mask, one channel more: the
# only SD3 pipeline that gives a controlnet extra_conditioning_channels.
_SD3_INPAINT_PIPELINE = "StableDiffusion3ControlNetInpaintingPipeline"
# The transformer's arguments the adapter fills with the controlnet's residuals.
_FLUX_RESIDUALS = ("controlnet_block_samples", "controlnet_single_block_samples")
_SD3_RESIDUALS = ("block_controlnet_hidden_states",)
_QWEN_RESIDUALS = ("controlnet_block_samples",)
_Z_RESIDUALS = ("controlnet_block_samples",)
# FluxControlNetPipeline's arguments of the controlnet that are the transformer's too.
_FLUX_SHARED = (
    "encoder_hidden_states",
    "pooled_projections",
    "guidance",
    "txt_ids",
    "img_ids",
    "joint_attention_kwargs",
)
# QwenImageControlNetPipeline's arguments of the controlnet that are the transformer's too
# (diffusers 0.36's took the text lengths as well); it gives it no attention kwargs.
_QWEN_SHARED = ("encoder_hidden_states", "encoder_hidden_states_mask", "img_shapes", "txt_seq_lens")


def _check_flux_controlnet(net: Any, transformer: Any, model_dtype: Any) -> None:
    """Refuse a controlnet that FluxControlNetPipeline would not call as mapped here."""
    names = _class_names(net)
    if _FLUX_CONTROLNET not in names:
        kind = "several controlnets" if isinstance(net, (list, tuple)) else type(net).__name__
        raise ValueError(
            f"controlnet is {kind}; with Flux's transformer bdia calls one diffusers "
            f"{_FLUX_CONTROLNET} (pipe.controlnet of a FluxControlNetPipeline); several "
            "controlnets (FluxMultiControlNetModel) and Stable Diffusion's ControlNetModel are "
            "not mapped"
        )
    config = net.config
    if config.get("num_mode") is not None:
        raise ValueError(
            f"the controlnet has num_mode = {config.get('num_mode')} (a union controlnet, "
            "which FluxControlNetPipeline gives a control_mode); its modes are not mapped: give "
            "a controlnet of one kind of control"
        )
    if getattr(net, "input_hint_block", None) is not None:
        raise ValueError(
            "the controlnet has an input_hint_block (conditioning_embedding_channels is set, "
            "XLabs'): it takes the control image's pixels and its blocks repeat over the "
            "transformer's, which is not mapped; give one that takes the image's latents "
            "(InstantX's)"
        )
    theirs = transformer.config
    for field in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
        mine = config.get(field)
        other = theirs.get(field)
        if mine is not None and other is not None and mine != other:
            raise ValueError(
                f"the controlnet has {field} = {mine!r} but the transformer {other!r}: it was "
                "made for another transformer; give the controlnet of this one"
            )
    mine, other = bool(config.get("guidance_embeds")), bool(theirs.get("guidance_embeds"))
    if mine != other:
        raise ValueError(
            f"the controlnet has guidance_embeds = {mine} but the transformer {other}: "
            "FluxControlNetPipeline gives each the guidance scale by its own config, so the "
            "two would see different guidance; give a controlnet of the transformer's kind "
            "(Flux.1-dev's or schnell's)"
        )
    _check_dtype(net, model_dtype)


def _check_sd3_controlnet(net: Any, transformer: Any, model_dtype: Any) -> None:
    """Refuse a controlnet that StableDiffusion3ControlNetPipeline would not call as mapped
    here."""
    if _SD3_CONTROLNET not in _class_names(net):
        kind = "several controlnets" if isinstance(net, (list, tuple)) else type(net).__name__
        raise ValueError(
            f"controlnet is {kind}; with SD3's transformer bdia calls one diffusers "
            f"{_SD3_CONTROLNET} (pipe.controlnet of a StableDiffusion3ControlNetPipeline); "
            "several controlnets (SD3MultiControlNetModel) and Stable Diffusion's "
            "ControlNetModel are not mapped"
        )
    if getattr(net, "pos_embed", None) is None:
        raise ValueError(
            "the controlnet has no pos_embed (use_pos_embed = False, SD3.5's 8b controlnets): "
            "StableDiffusion3ControlNetPipeline gives it the transformer's when it is made; "
            "give pipe.controlnet of that pipeline"
        )
    extra = net.config.get("extra_conditioning_channels") or 0
    if extra not in (0, 1):
        raise ValueError(
            f"the controlnet has extra_conditioning_channels = {extra!r}: "
            f"{_SD3_PIPELINE} gives an SD3 controlnet the control image's latents alone (0 "
            f"extra channels) and {_SD3_INPAINT_PIPELINE} the masked image's latents and the "
            "mask (1); no pipeline calls this one, which is not mapped"
        )
    if extra and net.config.get("joint_attention_dim") is None:
        raise ValueError(
            "the controlnet takes the mask's channel (extra_conditioning_channels = 1) but has "
            f"no joint_attention_dim: {_SD3_INPAINT_PIPELINE} gives it the prompt, which such "
            "a controlnet refuses; give one with a context embedder (Alimama's)"
        )
    theirs = transformer.config
    for field in ("in_channels", "patch_size", "pooled_projection_dim"):
        mine, other = net.config.get(field), theirs.get(field)
        if mine is not None and other is not None and mine != other:
            raise ValueError(
                f"the controlnet has {field} = {mine!r} but the transformer {other!r}: it was "
                "made for another transformer; give the controlnet of this one"
            )
    _check_dtype(net, model_dtype)


def _qwen_nets(net: Any) -> list[Any]:
    """The QwenImageControlNetModel ``net`` is or wraps (a QwenImageMultiControlNetModel's
    nets); empty for another class."""
    names = _class_names(net)
    if _QWEN_MULTI in names:
        return list(getattr(net, "nets", []))
    return [net] if _QWEN_CONTROLNET in names else []


def _qwen_multi(net: Any) -> bool:
    """Whether ``net`` is Qwen-Image's union wrapper, which takes one control image per
    scale."""
    return _QWEN_MULTI in _class_names(net)


def _check_qwen_controlnet(net: Any, transformer: Any, model_dtype: Any) -> None:
    """Refuse a controlnet that QwenImageControlNetPipeline would not call as mapped here."""
    nets = _qwen_nets(net)
    if _qwen_multi(net) and len(nets) != 1:
        raise ValueError(
            f"the {_QWEN_MULTI} holds {len(nets)} controlnets; diffusers calls it with one "
            "(a union controlnet, once per control image) and refuses more: give it one"
        )
    if not nets or _QWEN_CONTROLNET not in _class_names(nets[0]):
        kind = "several controlnets" if isinstance(net, (list, tuple)) else type(net).__name__
        raise ValueError(
            f"controlnet is {kind}; with Qwen-Image's transformer bdia calls a diffusers "
            f"{_QWEN_CONTROLNET} or a {_QWEN_MULTI} of one (pipe.controlnet of a "
            f"{_QWEN_PIPELINE}); Flux's, SD3's and Stable Diffusion's are not mapped"
        )
    config, theirs = nets[0].config, transformer.config
    extra = config.get("extra_condition_channels") or 0
    if extra not in (0, _QWEN_MASK_CHANNELS):
        raise ValueError(
            f"the controlnet has extra_condition_channels = {extra!r}: {_QWEN_PIPELINE} gives "
            "a Qwen-Image controlnet the control image's packed latents alone (0 extra "
            f"channels) and {_QWEN_INPAINT_PIPELINE} the masked image's and the mask packed "
            f"in 2 x 2 patches ({_QWEN_MASK_CHANNELS}); no pipeline calls this one, which is "
            "not mapped"
        )
    if extra and _qwen_multi(net):
        raise ValueError(
            f"the {_QWEN_MULTI} holds an inpainting controlnet (extra_condition_channels = "
            f"{extra}); {_QWEN_INPAINT_PIPELINE} calls a {_QWEN_CONTROLNET} itself, not "
            "wrapped: give pipe.controlnet of that pipeline"
        )
    for field in ("in_channels", "joint_attention_dim"):
        mine, other = config.get(field), theirs.get(field)
        if mine is not None and other is not None and mine != other:
            raise ValueError(
                f"the controlnet has {field} = {mine!r} but the transformer {other!r}: it was "
                "made for another transformer; give the controlnet of this one"
            )
    widths = [
        c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0) for c in (config, theirs)
    ]
    if widths[0] != widths[1]:
        raise ValueError(
            f"the controlnet's residuals are {widths[0]} wide (num_attention_heads x "
            f"attention_head_dim) but the transformer's blocks {widths[1]}: it was made for "
            "another transformer; give the controlnet of this one"
        )
    _check_dtype(net, model_dtype)


def _check_z_image_controlnet(net: Any, transformer: Any, model_dtype: Any) -> None:
    """Refuse a controlnet that ZImageControlNetPipeline would not call as mapped here."""
    if _Z_CONTROLNET not in _class_names(net):
        kind = "several controlnets" if isinstance(net, (list, tuple)) else type(net).__name__
        raise ValueError(
            f"controlnet is {kind}; with Z-Image's transformer bdia calls one diffusers "
            f"{_Z_CONTROLNET} (pipe.controlnet of a {_Z_PIPELINE} or {_Z_INPAINT_PIPELINE}); "
            "Flux's, SD3's, Qwen-Image's and Stable Diffusion's are not mapped"
        )
    for name in _Z_SHARED:
        mine = getattr(net, name, None)
        if mine is not getattr(transformer, name, None):
            whose = "none of the transformer's" if mine is None else "another transformer's"
            raise ValueError(
                f"the controlnet's {name} is {whose}: {_Z_PIPELINE} gives it the "
                "transformer's own shared modules when it is made; give pipe.controlnet, or "
                f"{_Z_CONTROLNET}.from_transformer(controlnet, transformer)"
            )
    config, theirs = net.config, transformer.config
    if config.get("dim") != theirs.get("dim"):
        raise ValueError(
            f"the controlnet's residuals are dim = {config.get('dim')!r} wide but the "
            f"transformer's blocks {theirs.get('dim')!r}: it was made for another "
            "transformer; give the controlnet of this one"
        )
    channels, latents = config.get("control_in_dim"), theirs.get("in_channels")
    if isinstance(channels, int) and isinstance(latents, int) and channels < latents:
        raise ValueError(
            f"the controlnet has control_in_dim = {channels}, fewer than the latents' "
            f"in_channels = {latents}: {_Z_PIPELINE} gives it the control image's latents "
            "(zeros after them up to control_in_dim), so no pipeline makes its input"
        )
    # Its first parameters are the transformer's, which from_transformer gave it: its own
    # blocks tell its dtype.
    _check_dtype(net.control_layers, model_dtype)


def _z_inpainting(net: Any, transformer: Any) -> bool:
    """Whether ``net`` is a Z-Image controlnet that takes a mask: ``control_in_dim = 2 C +
    1`` for the transformer's ``C`` latent channels, the control image's latents, the mask
    and the masked image's latents, which ZImageControlNetInpaintPipeline gives it (and
    ZImageControlNetPipeline zeros in place of the last two)."""
    config = getattr(net, "config", None)
    latents = getattr(transformer, "config", {}).get("in_channels")
    if _Z_CONTROLNET not in _class_names(net) or not isinstance(latents, int):
        return False
    return isinstance(config, Mapping) and config.get("control_in_dim") == 2 * latents + 1


def _sd3_inpainting(net: Any) -> bool:
    """Whether ``net`` is an SD3 controlnet of the inpainting kind, which takes the mask's
    channel after the masked image's latents (``extra_conditioning_channels`` 1, Alimama's):
    StableDiffusion3ControlNetInpaintingPipeline's, whose control input no other pipeline
    makes."""
    config = getattr(net, "config", None)
    if _SD3_CONTROLNET not in _class_names(net) or not isinstance(config, Mapping):
        return False
    return bool(config.get("extra_conditioning_channels"))


def _qwen_inpainting(net: Any) -> bool:
    """Whether ``net`` is a Qwen-Image controlnet of the inpainting kind, which takes the
    packed mask after the masked image's packed latents (``extra_condition_channels``):
    QwenImageControlNetInpaintPipeline's, whose control input no other pipeline makes."""
    nets = _qwen_nets(net)
    config = getattr(nets[0], "config", None) if nets else None
    return isinstance(config, Mapping) and bool(config.get("extra_condition_channels"))


def _check_dtype(net: Any, model_dtype: Any) -> None:
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if isinstance(model_dtype, torch.dtype) and dtype is not None and dtype != model_dtype:
        raise ValueError(
            f"the controlnet's parameters are {dtype} but the transformer runs in "
            f"{model_dtype}; the controlnet gets the transformer's inputs, so load both in one "
            "dtype (controlnet.to(dtype))"
        )


def _check_flow_controlnet(net: Any, transformer: Any, model_dtype: Any, kind: str) -> None:
    """Refuse a controlnet its transformer's ControlNet pipeline would not call as mapped."""
    checks = {
        "flux": _check_flux_controlnet,
        "qwen": _check_qwen_controlnet,
        "zimage": _check_z_image_controlnet,
    }
    checks.get(kind, _check_sd3_controlnet)(net, transformer, model_dtype)


def _check_control_latents(
    value: Any, net: Any, kind: str, transformer: Any = None
) -> Tensor | list[Tensor]:
    """The control image's latents (for Flux and Qwen-Image, packed; for Z-Image, one frame),
    checked for kind, dims and channels; for Qwen-Image's union wrapper a list of them, one
    per control image. ``transformer``: Z-Image's, whose latent channels tell where a mask
    channel lies."""
    # Qwen-Image's union wrapper has no config: its one controlnet's says.
    config = (_qwen_nets(net) if kind == "qwen" else [net])[0].config
    packed = kind in ("flux", "qwen")
    # Where the channel of an inpainting controlnet's mask lies in the control input.
    mask_channel = None
    if kind == "zimage":
        channels, ndim, dim, shape = config.get("control_in_dim"), 5, 1, "{}, 1, h, w"
        how = (
            f"{_Z_PIPELINE}'s control image: pipe.prepare_image(image, W, H, 1, 1, device, "
            "vae.dtype) encoded by the vae (its mode), (z - shift_factor) * scaling_factor, "
            "as one frame (unsqueeze(2)), zeros after it up to the controlnet's control_in_dim"
        )
        if _z_inpainting(net, transformer):
            mask_channel = transformer.config["in_channels"]
            how += (
                f"; or {_Z_INPAINT_PIPELINE}'s: those latents, then 1 - the binarised mask "
                "sized to the latents (nearest), then the latents of the image set to 0 where "
                "the mask is above 0.5, each as one frame, concatenated on dim 1"
            )
    elif packed:
        # Packed tokens carry their channels last, latents first after the batch.
        channels, ndim, dim, shape = config.get("in_channels"), 3, 2, "tokens, {}"
        how = (
            "FluxControlNetPipeline's control image: pipe.prepare_image(image, W, H, 1, 1, "
            "device, vae.dtype), encoded by the vae, shifted, scaled and packed with "
            "pipe._pack_latents"
        )
        if kind == "qwen" and _qwen_inpainting(net):
            channels += config.get("extra_condition_channels")
            how = (
                f"{_QWEN_INPAINT_PIPELINE}'s control image and mask: its prepare_image_with_"
                "mask(image, mask, W, H, 1, 1, device, vae.dtype), the image set to -1 where "
                "the mask is above 0.5, encoded by the vae as one frame, (z - latents_mean) * "
                "(1 / latents_std), then 1 - the mask at the latents' size as the last channel, "
                "packed with pipe._pack_latents"
            )
        elif kind == "qwen":
            how = (
                f"{_QWEN_PIPELINE}'s control image: pipe.prepare_image(image, W, H, 1, 1, "
                "device, vae.dtype) as one frame (unsqueeze(2)), encoded by the vae, (z - "
                "latents_mean) * (1 / latents_std), moved to (B, 1, C, h, w) and packed with "
                "pipe._pack_latents"
            )
    elif _sd3_inpainting(net):
        channels = config.get("in_channels", 16) + 1
        ndim, dim, shape = 4, 1, "{}, h, w"
        how = (
            f"{_SD3_INPAINT_PIPELINE}'s control image and mask: its prepare_image_with_mask"
            "(image, mask, W, H, 1, 1, device, dtype), the image set to -1 where the mask is "
            "above 0.5, encoded by the vae, less its shift_factor, times its scaling_factor, "
            "then 1 - the mask at the latents' size as the last channel"
        )
    else:
        channels = config.get("in_channels", 16) + config.get("extra_conditioning_channels", 0)
        ndim, dim, shape = 4, 1, "{}, h, w"
        how = (
            f"{_SD3_PIPELINE}'s control image: pipe.prepare_image(image, W, H, 1, 1, device, "
            "dtype) encoded by the vae, less its shift_factor (none where the controlnet's "
            "force_zeros_for_pooled_projection is set), times its scaling_factor"
        )
    if value is None:
        raise ValueError(f"controlnet needs controlnet_cond, the latents of {how}")
    multi = kind == "qwen" and _qwen_multi(net)
    if multi and not (isinstance(value, (list, tuple)) and value):
        raise ValueError(
            f"controlnet_cond for a {_QWEN_MULTI} is a list of tensors, one per control image "
            f"(the pipeline's list of control images), each the latents of {how}; got "
            f"{type(value).__name__}"
        )
    if not multi and isinstance(value, (list, tuple)):
        raise ValueError(
            "controlnet_cond for this controlnet is one tensor; several controlnets are not mapped"
        )
    for i, image in enumerate(value if multi else [value]):
        where = f"controlnet_cond[{i}]" if multi else "controlnet_cond"
        if not isinstance(image, Tensor):
            raise TypeError(
                f"{where} must be a tensor, the latents of {how}; got {type(image).__name__}"
            )
        frames = kind == "zimage" and image.ndim == ndim and image.shape[2] != 1
        if (
            not image.is_floating_point()
            or image.ndim != ndim
            or image.shape[dim] != channels
            or frames
        ):
            raise ValueError(
                f"{where} must be a floating tensor of shape (batch or 1, "
                f"{shape.format(channels)}) (the controlnet's channels), the latents of {how}; "
                f"got a {image.dtype} tensor of shape {tuple(image.shape)}"
            )
    if mask_channel is not None:
        kept = value[:, mask_channel]
        if kept.numel() and not bool(((kept >= 0) & (kept <= 1)).all()):
            raise ValueError(
                f"controlnet_cond's channel {mask_channel} is the controlnet's mask channel, 1 "
                "- mask in [0, 1] (1 where the image is kept; 0 for ZImageControlNetPipeline's "
                f"zeros), but its values lie in [{float(kept.min()):.4g}, "
                f"{float(kept.max()):.4g}]: give the latents of {how}"
            )
    inpainting = _qwen_inpainting(net) if kind == "qwen" else _sd3_inpainting(net)
    if kind != "zimage" and inpainting:
        # Packing puts a channel's 2 x 2 patch in 4 consecutive channels: the mask's last.
        kept = value[..., -_QWEN_MASK_CHANNELS:] if packed else value[:, -1]
        where = f"last {_QWEN_MASK_CHANNELS} channels are" if packed else "last channel is"
        if kept.numel() and not bool(((kept >= 0) & (kept <= 1)).all()):
            raise ValueError(
                f"controlnet_cond's {where} the inpainting controlnet's mask channel, 1 - mask "
                "in [0, 1] (1 where the image is kept), but its values lie in "
                f"[{float(kept.min()):.4g}, {float(kept.max()):.4g}]: give the latents of {how}"
            )
    return list(value) if multi else value


def _flow_control_ranges(
    sched: Any,
    steps: Any,
    starts: list[float],
    ends: list[float],
    tokens: int | None,
    strength: float = 1.0,
) -> list[tuple[float, float]]:
    """Each bound pair as the closed interval of ODE times, ``(lo, hi)``, on which the
    ControlNet pipeline calls the controlnet: at entry ``i`` of the scheduler's ``n``
    timesteps when ``i / n >= start`` and ``(i + 1) / n <= end``, entry ``i`` being the
    pipeline's grid's ``i``-th time (FluxControlNetPipeline's, and QwenImageControlNetPipeline's
    in the same arithmetic, for ``tokens`` image tokens:
    sigmas ``np.linspace(1, 1 / n, n)``, shifted by their ``mu`` where the scheduler shifts
    dynamically; StableDiffusion3ControlNetPipeline's, ``tokens`` None: the scheduler's own
    for ``n`` steps); a run reaching the first entry run (the last entry) reaches past the
    grid's start (end), an empty run is ``(inf, -inf)``. With ``strength`` < 1
    (FluxControlNetImg2ImgPipeline's) the pipeline runs the entries from ``int(n - n *
    strength)`` on, and counts ``i`` and ``n`` over those alone. Refused for a scheduler
    that calls the transformer more than once a step."""
    steps = check_steps(steps, "num_inference_steps")
    config = sched.config
    mu = sigmas = None
    if tokens is not None and config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    if tokens is not None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    ts = [float(v) for v in diffusers_grid(sched, steps, space="flow", mu=mu, sigmas=sigmas)]
    fresh = copy.deepcopy(sched)
    if tokens is None:
        fresh.set_timesteps(steps)
    else:
        fresh.set_timesteps(sigmas=sigmas, mu=mu)
    n = len(fresh.timesteps)
    if n != len(ts) - 1:
        raise ValueError(
            f"control_guidance_start and control_guidance_end: {type(sched).__name__} calls "
            f"the transformer {n} times for num_inference_steps = {steps}, not once at each of "
            f"the {len(ts) - 1} times of its grid, so its step fractions have no times; leave "
            "them at 0 and 1"
        )
    # The Flux img2img pipelines' get_timesteps, in their arithmetic: they run ceil(n * s)
    # steps where the Stable Diffusion pipelines' _first_entry runs int(n * s).
    first = int(max(steps - min(steps * strength, steps), 0))
    run = n - first
    ranges = []
    for start, end in zip(starts, ends):
        kept = [first + i for i in range(run) if not (i / run < start or (i + 1) / run > end)]
        if not kept:
            ranges.append((math.inf, -math.inf))
            continue
        hi = math.inf if kept[0] == first else ts[kept[0]]
        lo = -math.inf if kept[-1] == n - 1 else ts[kept[-1]]
        ranges.append((lo, hi))
    return ranges


def _flow_control(
    controlnet: Any,
    transformer: Any,
    sched: Any,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    model_dtype: Any,
    settings: Mapping[str, Any],
    kind: str,
    extra: bool,
) -> tuple[Any, dict[str, Any]]:
    """The controlnet of a flow-matching transformer and the ODE's cond entries of its
    settings (``from_diffusers``' keyword arguments of the same names), all checked. ``extra``:
    the transformer was given a mask, control latents or a reference image, which no
    ControlNet pipeline gives it. For Qwen-Image's union wrapper the control latents, scales
    and bounds are lists, one per control image, as the pipeline takes them."""
    pipeline = {
        "flux": "FluxControlNetPipeline",
        "qwen": _QWEN_PIPELINE,
        "zimage": _Z_PIPELINE,
    }.get(kind, _SD3_PIPELINE)
    if kind == "sd3" and _sd3_inpainting(controlnet):
        pipeline = _SD3_INPAINT_PIPELINE
    if kind == "qwen" and _qwen_inpainting(controlnet):
        pipeline = _QWEN_INPAINT_PIPELINE
    if extra:
        raise ValueError(
            "controlnet was given beside mask, masked_image_latents, control_latents or "
            f"image_latents; {pipeline} calls a text-to-image transformer on the latents "
            "alone: give one or the other"
        )
    _check_flow_controlnet(controlnet, transformer, model_dtype, kind)
    residuals = {"flux": _FLUX_RESIDUALS, "qwen": _QWEN_RESIDUALS, "zimage": _Z_RESIDUALS}.get(
        kind, _SD3_RESIDUALS
    )
    _check_cond(cond, negative_cond, _FLOW_RESERVED + residuals)
    image = _check_control_latents(settings["controlnet_cond"], controlnet, kind, transformer)
    if isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point:
        image = (
            [v.to(model_dtype) for v in image] if isinstance(image, list) else image.to(model_dtype)
        )
    if settings["guess_mode"] is not False:
        raise ValueError(
            f"guess_mode is Stable Diffusion's ControlNet pipelines'; {pipeline} has none: "
            "leave it out"
        )
    count = len(image) if isinstance(image, list) else 1
    scales = _per_net(settings["conditioning_scale"], count, "conditioning_scale")
    starts = _per_net(settings["control_guidance_start"], count, "control_guidance_start")
    ends = _per_net(settings["control_guidance_end"], count, "control_guidance_end")
    for start, end in zip(starts, ends):
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"control_guidance_start = {start} and control_guidance_end = {end} must "
                "satisfy 0 <= start < end <= 1, as the pipeline requires"
            )
    steps = settings["num_inference_steps"]
    switched = any((start, end) != (0.0, 1.0) for start, end in zip(starts, ends))
    if kind == "zimage":
        _check_z_image_settings(switched, steps, settings["strength"])
    if switched and steps is None:
        raise ValueError(
            "control_guidance_start and control_guidance_end switch the controlnet by the "
            "fraction of steps done, so they need num_inference_steps= (the pipeline's)"
        )
    if steps is not None and not switched:
        raise ValueError(
            "num_inference_steps is needed only with control_guidance_start or "
            "control_guidance_end; leave it out"
        )
    strength = _strength(settings["strength"], switched)
    if strength != 1.0 and kind != "flux":
        family = "Qwen-Image" if kind == "qwen" else "SD3"
        raise ValueError(
            f"strength = {strength}: {pipeline} runs every step (no {family} ControlNet "
            "pipeline takes a strength); leave it out"
        )
    multi = isinstance(image, list)
    entries: dict[str, Any] = {
        "controlnet_cond": image,
        "conditioning_scale": scales if multi else scales[0],
    }
    if switched:
        tokens = None
        if kind == "flux":
            tokens = int(cond["img_ids"].shape[0])
        elif kind == "qwen":
            tokens = _qwen_image_tokens(cond["img_shapes"])
        entries["control_range"] = _flow_control_ranges(
            sched, steps, starts, ends, tokens, strength
        )
    return controlnet, entries


def _check_z_image_settings(switched: bool, steps: Any, strength: Any) -> None:
    """Refuse the settings of other ControlNet pipelines than Z-Image's, which switch the
    controlnet by the steps' fractions or run part of the grid: Z-Image's call it at every
    step of the whole grid."""
    if switched:
        raise ValueError(
            f"control_guidance_start and control_guidance_end: {_Z_PIPELINE} and "
            f"{_Z_INPAINT_PIPELINE} have none (they call the controlnet at every step); leave "
            "them at 0 and 1"
        )
    if steps is not None:
        raise ValueError(
            "num_inference_steps is needed only with control_guidance_start or "
            f"control_guidance_end, which {_Z_PIPELINE} has not; leave it out"
        )
    if strength != 1.0:
        raise ValueError(
            f"strength = {strength!r}: {_Z_PIPELINE} runs every step (no Z-Image ControlNet "
            "pipeline takes a strength); leave it out"
        )


def _check_flow_control_image(x: Tensor, image: Tensor, kind: str, where: str) -> None:
    """Refuse control latents of another token count than the packed state's (Flux,
    Qwen-Image), or of another size than the latents' (SD3, Z-Image)."""
    if kind == "zimage":
        if x.ndim != 4 or tuple(image.shape[3:]) != tuple(x.shape[2:]):
            raise ValueError(
                f"{where} has shape {tuple(image.shape)}, but the state has shape "
                f"{tuple(x.shape)}: give the control image's latents at the latents' size, "
                f"(batch or 1, C, 1, h, w) for latents (batch, C', h, w), as {_Z_PIPELINE} "
                "encodes the control image at the image's size"
            )
        return
    if kind != "sd3" and (image.ndim != 3 or x.ndim != 3 or image.shape[1] != x.shape[1]):
        pipeline = _QWEN_PIPELINE if kind == "qwen" else "FluxControlNetPipeline"
        raise ValueError(
            f"{where} has shape {tuple(image.shape)}, but the state has shape "
            f"{tuple(x.shape)}: give the control image's latents packed with the latents' "
            f"tokens, as {pipeline} makes them at the image's size"
        )
    if kind == "sd3" and tuple(image.shape[2:]) != tuple(x.shape[2:]):
        raise ValueError(
            f"{where} has shape {tuple(image.shape)}, but the state has shape "
            f"{tuple(x.shape)}: give the control image's latents at the latents' size, as "
            "the SD3 ControlNet pipelines encode the image at the image's size"
        )


def _flow_residuals(
    controlnet: Any,
    x: Tensor | list[Tensor],
    tau: Tensor,
    kwargs: Mapping[str, Any],
    image: Tensor | list[Tensor],
    scale: float | list[float],
) -> dict[str, Any]:
    """The controlnet's residuals as the transformer's arguments, of one call on the (for
    Flux and Qwen-Image, packed) latents ``x`` at the transformer's timestep ``tau`` with the
    transformer's arguments ``kwargs`` (of ``x``'s batch), as FluxControlNetPipeline,
    StableDiffusion3ControlNetPipeline, (a controlnet with the mask's channel)
    StableDiffusion3ControlNetInpaintingPipeline or QwenImageControlNetPipeline calls it
    (its union wrapper with the lists ``image`` and ``scale``, one entry per control
    image) or, an inpainting controlnet, QwenImageControlNetInpaintPipeline, in the same
    call. For Z-Image's, ``x`` is the transformer's list of per-sample latents ``(C, 1, h,
    w)`` (twice the batch under CFG, as ``tau``, ``kwargs``' ``cap_feats`` and ``image``),
    called as ZImageControlNetPipeline and ZImageControlNetInpaintPipeline call it."""
    if _Z_CONTROLNET in _class_names(controlnet):
        # The pipelines call it positionally, without the transformer's attention kwargs;
        # it returns the residuals, keyed by the transformer's layer.
        samples = controlnet(x, tau, kwargs["cap_feats"], image, conditioning_scale=scale)
        return {_Z_RESIDUALS[0]: samples}
    if _qwen_nets(controlnet):
        taken = inspect.signature(controlnet.forward).parameters
        shared = {k: kwargs[k] for k in _QWEN_SHARED if k in kwargs and k in taken}
        # Qwen-Image's controlnets return the list of residuals itself where return_dict is
        # False.
        samples = controlnet(
            hidden_states=x,
            controlnet_cond=image,
            conditioning_scale=scale,
            timestep=tau,
            return_dict=False,
            **shared,
        )
        return {_QWEN_RESIDUALS[0]: samples}
    if _SD3_CONTROLNET in _class_names(controlnet):
        config = controlnet.config
        pooled = kwargs["pooled_projections"]
        embeds = kwargs["encoder_hidden_states"]
        # InstantX's SD3 controlnets were trained with zeros for the pooled prompt, and
        # SD3.5's without the prompt: the pipeline gives them so. The inpainting pipeline
        # gives its controlnet zeros and the prompt whatever its config says.
        inpainting = _sd3_inpainting(controlnet)
        if inpainting or config.get("force_zeros_for_pooled_projection", True):
            pooled = torch.zeros_like(pooled)
        if not inpainting and config.get("joint_attention_dim") is None:
            embeds = None
        (blocks,) = controlnet(
            hidden_states=x,
            timestep=tau,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            joint_attention_kwargs=kwargs.get("joint_attention_kwargs"),
            controlnet_cond=image,
            conditioning_scale=scale,
            return_dict=False,
        )
        return {_SD3_RESIDUALS[0]: blocks}
    shared = {k: kwargs[k] for k in _FLUX_SHARED if k in kwargs}
    blocks, singles = controlnet(
        hidden_states=x,
        controlnet_cond=image,
        conditioning_scale=scale,
        timestep=tau,
        return_dict=False,
        **shared,
    )
    return {_FLUX_RESIDUALS[0]: blocks, _FLUX_RESIDUALS[1]: singles}
