"""Flux's ControlNet (``FluxControlNetModel``, as ``FluxControlNetPipeline`` calls it) and its
settings, checked as ``from_diffusers`` takes them, and its call.

The controlnet takes the packed latents, the timestep, the prompt, the embedded guidance and
the position ids the transformer takes, and the control image's packed latents; its
residuals go to the transformer. Its settings are checked in one line before any call
(``from_diffusers``' Raises lists them); ``control_guidance_start`` and
``control_guidance_end`` become intervals of ODE times on the pipeline's grid, as for Stable
Diffusion's ControlNet (``_controlnet``). What is not mapped (a union controlnet's modes,
XLabs' controlnets of pixels, several controlnets) is refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...schedules import check_steps
from ._conditioning import _FLOW_RESERVED, _check_cond
from ._controlnet import _per_net
from ._scheduler_config import _class_names
from .grid import diffusers_grid

_FLUX_CONTROLNET = "FluxControlNetModel"
# The transformer's arguments the adapter fills with the controlnet's residuals.
_FLUX_RESIDUALS = ("controlnet_block_samples", "controlnet_single_block_samples")
# FluxControlNetPipeline's arguments of the controlnet that are the transformer's too.
_FLUX_SHARED = (
    "encoder_hidden_states",
    "pooled_projections",
    "guidance",
    "txt_ids",
    "img_ids",
    "joint_attention_kwargs",
)


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
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if isinstance(model_dtype, torch.dtype) and dtype is not None and dtype != model_dtype:
        raise ValueError(
            f"the controlnet's parameters are {dtype} but the transformer runs in "
            f"{model_dtype}; the controlnet gets the transformer's inputs, so load both in one "
            "dtype (controlnet.to(dtype))"
        )


def _check_flux_control_latents(value: Any, net: Any) -> Tensor:
    """The control image's packed latents, checked for kind, dims and channels."""
    channels = net.config.get("in_channels")
    how = (
        "FluxControlNetPipeline's control image: pipe.prepare_image(image, W, H, 1, 1, device, "
        "vae.dtype), encoded by the vae, shifted, scaled and packed with pipe._pack_latents"
    )
    if value is None:
        raise ValueError(f"controlnet needs controlnet_cond, the packed latents of {how}")
    if isinstance(value, (list, tuple)):
        raise ValueError(
            "controlnet_cond for Flux's controlnet is one tensor; several controlnets are not "
            "mapped"
        )
    if not isinstance(value, Tensor):
        raise TypeError(
            f"controlnet_cond must be a tensor, the packed latents of {how}; got "
            f"{type(value).__name__}"
        )
    if not value.is_floating_point() or value.ndim != 3 or value.shape[2] != channels:
        raise ValueError(
            f"controlnet_cond must be a floating tensor of shape (batch or 1, tokens, "
            f"{channels}) (the controlnet's in_channels), the packed latents of {how}; got a "
            f"{value.dtype} tensor of shape {tuple(value.shape)}"
        )
    return value


def _flow_control_ranges(
    sched: Any, steps: Any, starts: list[float], ends: list[float], tokens: int
) -> list[tuple[float, float]]:
    """Each bound pair as the closed interval of ODE times, ``(lo, hi)``, on which
    FluxControlNetPipeline calls the controlnet: at entry ``i`` of the scheduler's ``n``
    timesteps when ``i / n >= start`` and ``(i + 1) / n <= end``, entry ``i`` being the
    pipeline's grid's ``i``-th time (its sigmas ``np.linspace(1, 1 / n, n)``, shifted by the
    ``mu`` of ``tokens`` image tokens where the scheduler shifts dynamically); a run reaching
    the first (last) entry reaches past the grid's start (end), an empty run is ``(inf,
    -inf)``. Refused for a scheduler that calls the transformer more than once a step."""
    steps = check_steps(steps, "num_inference_steps")
    config = sched.config
    mu = None
    if config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ts = [float(v) for v in diffusers_grid(sched, steps, space="flow", mu=mu, sigmas=sigmas)]
    fresh = copy.deepcopy(sched)
    fresh.set_timesteps(sigmas=sigmas, mu=mu)
    n = len(fresh.timesteps)
    if n != len(ts) - 1:
        raise ValueError(
            f"control_guidance_start and control_guidance_end: {type(sched).__name__} calls "
            f"the transformer {n} times for num_inference_steps = {steps}, not once at each of "
            f"the {len(ts) - 1} times of its grid, so its step fractions have no times; leave "
            "them at 0 and 1"
        )
    ranges = []
    for start, end in zip(starts, ends):
        kept = [i for i in range(n) if not (i / n < start or (i + 1) / n > end)]
        if not kept:
            ranges.append((math.inf, -math.inf))
            continue
        hi = math.inf if kept[0] == 0 else ts[kept[0]]
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
    flux: bool,
    extra: bool,
) -> tuple[Any, dict[str, Any]]:
    """The controlnet of a flow-matching transformer and the ODE's cond entries of its
    settings (``from_diffusers``' keyword arguments of the same names), all checked. ``extra``:
    the transformer was given a mask, control latents or a reference image, which no
    ControlNet pipeline gives it."""
    if not flux:
        raise ValueError(
            "controlnet: with SD3's transformer bdia does not map a controlnet "
            "(SD3ControlNetModel); Flux's FluxControlNetModel is mapped"
        )
    if extra:
        raise ValueError(
            "controlnet was given beside mask, masked_image_latents, control_latents or "
            "image_latents; FluxControlNetPipeline calls a text-to-image transformer on the "
            "latents alone: give one or the other"
        )
    _check_flux_controlnet(controlnet, transformer, model_dtype)
    _check_cond(cond, negative_cond, _FLOW_RESERVED + _FLUX_RESIDUALS)
    image = _check_flux_control_latents(settings["controlnet_cond"], controlnet)
    if isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point:
        image = image.to(model_dtype)
    if settings["guess_mode"] is not False:
        raise ValueError(
            "guess_mode is Stable Diffusion's ControlNet pipelines'; FluxControlNetPipeline has "
            "none: leave it out"
        )
    (scale,) = _per_net(settings["conditioning_scale"], 1, "conditioning_scale")
    (start,) = _per_net(settings["control_guidance_start"], 1, "control_guidance_start")
    (end,) = _per_net(settings["control_guidance_end"], 1, "control_guidance_end")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"control_guidance_start = {start} and control_guidance_end = {end} must satisfy "
            "0 <= start < end <= 1, as the pipeline requires"
        )
    steps = settings["num_inference_steps"]
    switched = (start, end) != (0.0, 1.0)
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
    entries: dict[str, Any] = {"controlnet_cond": image, "conditioning_scale": scale}
    if switched:
        tokens = int(cond["img_ids"].shape[0])
        entries["control_range"] = _flow_control_ranges(sched, steps, [start], [end], tokens)
    return controlnet, entries


def _check_flow_control_image(x: Tensor, image: Tensor) -> None:
    """Refuse control latents of another token count than the packed state's."""
    if image.ndim != 3 or x.ndim != 3 or image.shape[1] != x.shape[1]:
        raise ValueError(
            f"controlnet_cond has shape {tuple(image.shape)}, but the state has shape "
            f"{tuple(x.shape)}: give the control image's latents packed with the latents' "
            "tokens, as FluxControlNetPipeline makes them at the image's size"
        )


def _flow_residuals(
    controlnet: Any, x: Tensor, tau: Tensor, kwargs: Mapping[str, Any], image: Tensor, scale: float
) -> dict[str, Any]:
    """The Flux controlnet's residuals as the transformer's arguments, of one call on the
    packed latents ``x`` at the transformer's timestep ``tau`` with the transformer's
    arguments ``kwargs`` (of ``x``'s batch), as FluxControlNetPipeline calls it."""
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
