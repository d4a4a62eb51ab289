"""diffusers' ControlNet (``ControlNetModel``, of Stable Diffusion's or SDXL's unet, or several
in a ``MultiControlNetModel``) and its settings, checked as ``from_diffusers`` takes them.

A controlnet of another class, made for another unet or of another dtype, and settings that
do not fit it are refused in one line before any call (``from_diffusers``' Raises lists
them). ``control_guidance_start`` and ``control_guidance_end``, the fractions of the
pipeline's steps between which it calls the controlnet, become the intervals of ODE times on
``diffusers_grid`` at which the model calls it. ``DiffusersModel`` makes the calls.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...schedules import check_steps
from ._conditioning import _RESERVED, _check_cond
from ._scheduler_config import _class_names
from .grid import diffusers_grid

# The ControlNet the adapter calls as StableDiffusionControlNetPipeline and
# StableDiffusionXLControlNetPipeline call it, and the wrapper those pipelines make of a list.
_CONTROLNET = "ControlNetModel"
_MULTI_CONTROLNET = "MultiControlNetModel"
# Of SDXL's added conditioning, what the pipelines give the controlnet (an IP-Adapter's
# image_embeds goes to the unet only).
_CONTROLNET_ADDED = ("text_embeds", "time_ids")
# The unet's arguments the adapter fills with the controlnet's residuals.
_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return float(value)


def _per_net(value: Any, count: int, name: str) -> list[float]:
    """One number per controlnet: a list of ``count``, or one number for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"{name} has {len(value)} values for {count} controlnet(s); give one per "
                "controlnet, or one number for all"
            )
        return [_number(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [_number(value, name)] * count


def _strength(value: Any, switched: bool) -> float:
    """The img2img and inpainting pipelines' ``strength``, in (0, 1], checked: only with the
    controlnet switched (``switched``), whose fractions it makes count over the steps run."""
    strength = _number(value, "strength")
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength = {strength} must satisfy 0 < strength <= 1, as the img2img and "
            "inpainting pipelines' strength"
        )
    if strength != 1.0 and not switched:
        raise ValueError(
            "strength is needed only with control_guidance_start or control_guidance_end "
            "(a pipeline's strength below 1 counts their fractions over the steps it runs); "
            "leave it out"
        )
    return strength


def _controlnets(controlnet: Any) -> tuple[Any, list[Any]]:
    """The module to call and its nets: a ControlNetModel itself; a list or tuple of them
    wrapped in a MultiControlNetModel, as the pipelines wrap one; a MultiControlNetModel as
    it is."""
    if isinstance(controlnet, (list, tuple)):
        nets, where = list(controlnet), "controlnet[{}]"
    elif _MULTI_CONTROLNET in _class_names(controlnet):
        nets, where = list(controlnet.nets), "controlnet.nets[{}]"
    else:
        nets, where = [controlnet], "controlnet"
    if not nets:
        raise ValueError("controlnet holds no ControlNetModel; give one, or a list of them")
    for i, net in enumerate(nets):
        if _CONTROLNET not in _class_names(net):
            raise ValueError(
                f"{where.format(i)} is a {type(net).__name__}; bdia calls diffusers' "
                f"{_CONTROLNET} (Stable Diffusion's and SDXL's, as StableDiffusionControlNet"
                "Pipeline and StableDiffusionXLControlNetPipeline do), a list of them or a "
                f"{_MULTI_CONTROLNET} beside a unet; SD3's and Flux's controlnets go with their "
                "own transformers (pass pipe.transformer with a flow-matching scheduler), and "
                "union controlnets and ControlNet-XS are called otherwise and are not mapped"
            )
    if isinstance(controlnet, (list, tuple)):
        # Its module path since diffusers 0.31; the top-level name is not in every release.
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        return MultiControlNetModel(nets), nets
    return controlnet, nets


def _control_factor(net: Any) -> int:
    """How many times the latents' size a control image is: the conditioning embedding
    halves it in each block but the first (8 for Stable Diffusion's (16, 32, 96, 256))."""
    blocks = net.config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    return 2 ** (len(blocks) - 1)


def _control_images(value: Any, nets: list[Any], multi: bool) -> list[Tensor]:
    """The control images, one per net, checked for kind and channels (the batch and the size
    are checked against the state at the first call)."""
    if multi:
        if not isinstance(value, (list, tuple)) or len(value) != len(nets):
            got = f"{len(value)} of them" if isinstance(value, (list, tuple)) else type(value)
            raise ValueError(
                f"controlnet_cond must be a list of {len(nets)} control images, one per "
                f"controlnet, got {got}"
            )
        images = list(value)
    elif isinstance(value, (list, tuple)):
        raise ValueError(
            "controlnet_cond for one ControlNetModel is one tensor; a list is for a list of "
            "controlnets (or a MultiControlNetModel)"
        )
    else:
        images = [value]
    for i, (image, net) in enumerate(zip(images, nets)):
        where = f"controlnet_cond[{i}]" if multi else "controlnet_cond"
        channels = net.config.get("conditioning_channels", 3)
        if not isinstance(image, Tensor):
            raise TypeError(
                f"{where} must be a tensor, the control image as the pipeline prepares it "
                "(pipe.control_image_processor.preprocess(image, height=H, width=W): shape "
                f"(1, 3, H, W), values in [0, 1]), got {type(image).__name__}"
            )
        if not image.is_floating_point() or image.ndim != 4 or image.shape[1] != channels:
            raise ValueError(
                f"{where} must be a floating tensor of shape (batch or 1, {channels}, H, W) "
                f"(the controlnet's conditioning_channels = {channels}), got a {image.dtype} "
                f"tensor of shape {tuple(image.shape)}"
            )
    return images


def _first_entry(sched: Any, steps: int, strength: float) -> int:
    """The entry of the scheduler's ``n`` timesteps at which a pipeline run at ``strength``
    starts, as the img2img and inpainting pipelines' ``get_timesteps`` finds it: it runs the
    last ``int(steps * strength)`` of the ``steps`` steps, from entry ``t_start * order``."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(
            f"strength = {strength} of num_inference_steps = {steps} leaves no step "
            f"(int({steps} * {strength}) = 0), which the pipelines refuse too; raise either"
        )
    return (steps - kept) * int(getattr(sched, "order", 1))


def _control_ranges(
    sched: Any,
    space: str,
    steps: Any,
    starts: list[float],
    ends: list[float],
    strength: float = 1.0,
) -> list[tuple[float, float]]:
    """Each controlnet's ``control_guidance_start`` and ``control_guidance_end`` as the
    closed interval of ODE times, ``(lo, hi)``, on which the ControlNet pipelines call it.

    The pipelines keep controlnet k at entry i of the scheduler's n ``timesteps`` when ``i /
    n >= start`` and ``(i + 1) / n <= end``: a run of entries. With ``strength`` < 1 (the
    img2img and inpainting pipelines') they run the entries from ``_first_entry`` on, and
    count i and n over those alone. Each entry's unet call is at a time of
    ``diffusers_grid`` (the j-th distinct noise level is the grid's j-th time; a scheduler
    that calls the unet twice at one level, Heun, PNDM, has it twice), and the run's first
    and last entries' times bound the interval; a run that reaches the first entry run (the
    last entry) reaches past the grid's start (end). An empty run is the empty interval
    ``(inf, -inf)``. Refused where the pipeline switches between two calls at one time."""
    steps = check_steps(steps, "num_inference_steps")
    ts = [float(v) for v in diffusers_grid(sched, steps, space=space)]
    fresh = copy.deepcopy(sched)
    fresh.set_timesteps(steps)
    taus = [float(v) for v in torch.as_tensor(fresh.timesteps).reshape(-1)]
    n = len(taus)
    first = _first_entry(fresh, steps, strength)
    # The noise level of each call: the scheduler's sigmas where it has them (its timesteps
    # may repeat where its sigmas do not), else its timesteps.
    sigmas = getattr(fresh, "sigmas", None)
    marks = taus
    if sigmas is not None and torch.as_tensor(sigmas).numel() >= n:
        marks = [float(v) for v in torch.as_tensor(sigmas).reshape(-1)[:n]]
    index = [0]
    for previous, mark in zip(marks, marks[1:]):
        index.append(index[-1] + (mark != previous))
    name = type(sched).__name__
    # The last level is the grid's end where the pipeline's last step has no length (DDIM
    # from timestep 0 to alphas_cumprod[0], a final repeat of sigma_min).
    if index[-1] + 1 not in (len(ts) - 1, len(ts)):
        raise ValueError(
            f"control_guidance_start and control_guidance_end: {name} calls the unet at "
            f"{index[-1] + 1} noise levels for num_inference_steps = {steps}, not at the "
            f"{len(ts) - 1} times of its grid, so its step fractions have no times; leave "
            "them at 0 and 1"
        )
    ranges = []
    run = n - first
    for start, end in zip(starts, ends):
        # The pipelines' keep, of the entries they run (all of them at strength 1).
        keep = [False] * first
        keep += [not (i / run < start or (i + 1) / run > end) for i in range(run)]
        split = [
            i for i in range(first + 1, n) if index[i] == index[i - 1] and keep[i] != keep[i - 1]
        ]
        if split:
            raise ValueError(
                f"control_guidance_start = {start} and control_guidance_end = {end} switch "
                f"the controlnet between {name}'s two unet calls at one time (timesteps "
                f"{split[0] - 1} and {split[0]} of {n}), which no function of the time does; "
                "move the bound by a step"
            )
        kept = [i for i in range(n) if keep[i]]
        if not kept:
            ranges.append((math.inf, -math.inf))
            continue
        hi = math.inf if kept[0] == first else ts[index[kept[0]]]
        lo = -math.inf if kept[-1] == n - 1 else ts[index[kept[-1]]]
        ranges.append((lo, hi))
    return ranges


def _check_control_pairing(
    net: Any, unet: Any, cond: Mapping[str, Any], inpaint: bool = False
) -> None:
    """Refuse a controlnet made for another unet, and conditioning it cannot be called with.

    With ``inpaint`` (an inpainting unet given its mask and masked image) the controlnet gets
    the latents alone, as the ControlNet inpainting pipelines of Stable Diffusion and SDXL
    call it before they add the mask and masked image's channels for the unet: its
    ``in_channels`` must be the unet's ``out_channels``, the latents' channels."""
    unet_config = getattr(unet, "config", None)
    if isinstance(unet_config, Mapping):
        latents = unet_config.get("out_channels") if inpaint else None
        mine = net.config.get("in_channels")
        if latents is not None and mine is not None and mine != latents:
            raise ValueError(
                f"the controlnet has in_channels = {mine!r} but the "
                f"inpainting unet's latents have {latents} channels (its in_channels = "
                f"{unet_config.get('in_channels')} add the mask and masked image, which "
                "StableDiffusionControlNetInpaintPipeline gives the unet alone); give a "
                "controlnet of the latents, such as the base model's"
            )
        for field in ("in_channels", "cross_attention_dim", "block_out_channels"):
            if inpaint and field == "in_channels":
                continue
            mine, theirs = net.config.get(field), unet_config.get(field)
            if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
                mine, theirs = tuple(mine), tuple(theirs)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"the controlnet has {field} = {mine!r} but the unet {theirs!r}: it was "
                    "made for another unet (Stable Diffusion's and SDXL's controlnets do not "
                    "mix); give the controlnet of this unet"
                )
    if "encoder_hidden_states" not in cond:
        raise ValueError(
            "the controlnet needs encoder_hidden_states (the prompt embeddings, which the "
            "pipelines give it as they give the unet); pass encoder_hidden_states=..."
        )
    if net.config.get("addition_embed_type") == "text_time":
        added = cond.get("added_cond_kwargs")
        missing = [k for k in _CONTROLNET_ADDED if not isinstance(added, Mapping) or k not in added]
        if missing:
            raise ValueError(
                f"the controlnet has addition_embed_type = 'text_time' (SDXL's) and needs "
                f"added_cond_kwargs with {' and '.join(map(repr, missing))}, as "
                "StableDiffusionXLControlNetPipeline gives it: added_cond_kwargs={'text_embeds': "
                "pooled_embeds, 'time_ids': time_ids}"
            )


def _control(
    controlnet: Any,
    unet: Any,
    sched: Any,
    space: str,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    model_dtype: Any,
    settings: Mapping[str, Any],
    inpaint: bool = False,
) -> tuple[Any, list[Any] | None, dict[str, Any]]:
    """The controlnet module to call, its nets, and the ODE's cond entries of its settings
    (``from_diffusers``' keyword arguments of the same names), all checked; ``(None, None,
    {})`` without a controlnet. ``inpaint``: the unet is an inpainting one, given its mask
    and masked image (see ``_check_control_pairing``). ``from_diffusers`` gives a flow
    transformer's controlnet (Flux's, SD3's) to ``_flow_controlnet._flow_control`` instead, so
    a controlnet here is of a unet."""
    defaults = {
        "controlnet_cond": None,
        "conditioning_scale": 1.0,
        "guess_mode": False,
        "control_guidance_start": 0.0,
        "control_guidance_end": 1.0,
        "num_inference_steps": None,
        "strength": 1.0,
    }
    if controlnet is None:
        for name, default in defaults.items():
            value = settings[name]
            same = value is None if default is None else type(value) in (int, float, bool)
            if not (same and value == default):
                raise ValueError(
                    f"{name} is a ControlNet setting, but no controlnet was given; pass "
                    "controlnet=pipe.controlnet with it, or leave it out"
                )
        return None, None, {}
    module, nets = _controlnets(controlnet)
    multi = _MULTI_CONTROLNET in _class_names(module)
    for net in nets:
        _check_control_pairing(net, unet, cond, inpaint)
    _check_cond(cond, negative_cond, _RESERVED + _RESIDUALS)
    if settings["controlnet_cond"] is None:
        raise ValueError(
            "controlnet needs controlnet_cond, the control image as the pipeline prepares it: "
            "pipe.control_image_processor.preprocess(image, height=H, width=W), of shape "
            "(1 or batch, 3, H, W) with values in [0, 1]"
        )
    images = _control_images(settings["controlnet_cond"], nets, multi)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if isinstance(model_dtype, torch.dtype) and dtype is not None and dtype != model_dtype:
        raise ValueError(
            f"the controlnet's parameters are {dtype} but the unet runs in {model_dtype}; the "
            "controlnet gets the unet's inputs, so load both in one dtype (controlnet.to(dtype))"
        )
    if dtype is not None:  # the pipelines' prepare_image casts it to the controlnet's dtype
        images = [image.to(dtype) for image in images]
    scales = _per_net(settings["conditioning_scale"], len(nets), "conditioning_scale")
    guess_mode = settings["guess_mode"]
    if not isinstance(guess_mode, bool):
        raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")
    # The pipelines' rule: a controlnet whose residuals are pooled runs in guess mode.
    guess_mode = guess_mode or bool(nets[0].config.get("global_pool_conditions", False))
    starts = _per_net(settings["control_guidance_start"], len(nets), "control_guidance_start")
    ends = _per_net(settings["control_guidance_end"], len(nets), "control_guidance_end")
    for i, (start, end) in enumerate(zip(starts, ends)):
        if not 0.0 <= start < end <= 1.0:
            which = f" (controlnet {i})" if multi else ""
            raise ValueError(
                f"control_guidance_start = {start} and control_guidance_end = {end}{which} must "
                "satisfy 0 <= start < end <= 1, as the pipelines require"
            )
    steps = settings["num_inference_steps"]
    switched = any(s != 0.0 or e != 1.0 for s, e in zip(starts, ends))
    if switched and steps is None:
        raise ValueError(
            "control_guidance_start and control_guidance_end switch the controlnet by the "
            "fraction of steps done, so they need num_inference_steps= (the grid's, as for "
            "diffusers_grid)"
        )
    if steps is not None and not switched:
        raise ValueError(
            "num_inference_steps is needed only with control_guidance_start or "
            "control_guidance_end; leave it out"
        )
    strength = _strength(settings["strength"], switched)
    entries: dict[str, Any] = {
        "controlnet_cond": images if multi else images[0],
        "conditioning_scale": scales if multi else scales[0],
        "guess_mode": guess_mode,
    }
    if switched:
        entries["control_range"] = _control_ranges(sched, space, steps, starts, ends, strength)
    return module, nets, entries
