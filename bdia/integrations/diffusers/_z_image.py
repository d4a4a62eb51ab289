"""Z-Image's transformer (``ZImageTransformer2DModel``) called as ``ZImagePipeline`` and
``ZImageImg2ImgPipeline`` call it, and the checks of its conditioning.

The pipelines carry image-shaped latents ``(batch, C, h, w)`` in float32 and call the
transformer on a list of per-sample latents ``(C, 1, h, w)`` in its dtype, at the timestep
``(1000 - t) / 1000`` of the scheduler's float32 ``t = sigma N`` (1 at the data end, 0 at the
noise), with a list of per-sample prompt embeddings ``(L_i, D)`` of their own lengths
(``cap_feats``, the pipeline's ``prompt_embeds``). The transformer returns a list of
``(C, 1, h, w)`` predictions of ``x0 - eps``; the pipeline negates them into the velocity
``eps - x0`` its scheduler steps with. Its CFG is on when ``guidance_scale > 0``: one call on
the latents twice, the prompts' embeddings then the negative prompts', guided sample by
sample as ``c + g (c - u)`` in float32, its norm capped at ``cfg_normalization`` times the
conditional one's where that is set, and off (the conditional call alone) at the steps whose
``(1000 - t) / 1000`` is above ``cfg_truncation``: a function of the state and the time, so
the run is an ODE. ``ZImageControlNetPipeline`` and ``ZImageControlNetInpaintPipeline`` call
their ``ZImageControlNetModel`` first, on the transformer's list of latents, timestep and
prompts (twice the batch under CFG, the control input twice too) with the control image's
latents fixed over the run, and pass its residuals to the transformer as
``controlnet_block_samples``: an ODE in the latents too.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...ode import values_on

# ZImagePipeline's timestep: (1000 - t) / 1000 of the scheduler's t, whatever its
# num_train_timesteps.
_Z_IMAGE_TIMESTEP = 1000
# ZImagePipeline's CFG options, which from_diffusers takes beside guidance_scale.
_Z_IMAGE_OPTIONS = ("cfg_normalization", "cfg_truncation")
# The keyword arguments of the transformer that ZImagePipeline passes beside the latents,
# the timestep and the prompts: its LoRA scale (diffusers 0.42 and newer pass None).
_Z_IMAGE_KWARGS = ("joint_attention_kwargs",)
_Z_IMAGE_PROMPTS = "cap_feats"
# The transformer's argument that ZImageControlNetPipeline fills with its controlnet's output.
_Z_IMAGE_RESIDUALS = "controlnet_block_samples"
_Z_IMAGE_HOW = (
    "a list of one 2-D tensor (L_i, cap_feat_dim) per sample, as ZImagePipeline.encode_prompt "
    "returns its prompt_embeds (each prompt's tokens, its padding dropped)"
)


def _z_image_grid_inputs(scheduler: Any, steps: int) -> tuple[Any, list[float] | None]:
    """The scheduler and sigmas from which ``diffusers_grid`` makes the grid of ``steps``
    steps that the installed ZImagePipeline (and its img2img, inpainting and ControlNet
    pipelines) runs: ``scheduler`` and its sigmas ``torch.linspace(1, 1 / n, n)`` in float32,
    as a list, where the pipeline passes them (diffusers 0.39 on); else a copy of
    ``scheduler`` with ``sigma_min = 0`` and no sigmas, as the pipeline sets it and takes the
    scheduler's own spacing (0.36 to 0.38), whose last step, from 0 to 0, the grid leaves
    out."""
    from diffusers.pipelines.z_image import pipeline_z_image

    if hasattr(pipeline_z_image, "get_default_z_image_sigmas"):
        return scheduler, torch.linspace(1.0, 1 / steps, steps).tolist()
    fresh = copy.deepcopy(scheduler)
    fresh.sigma_min = 0.0
    return fresh, None


def _check_cap_feats(value: Any, width: Any, where: str) -> None:
    """Refuse ``value`` that is not ZImagePipeline's list of per-sample prompt embeddings."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be {_Z_IMAGE_HOW}; got {type(value).__name__}")
    for i, item in enumerate(value):
        if not (isinstance(item, Tensor) and item.is_floating_point() and item.ndim == 2):
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(f"{where}[{i}] is {shape}; {where} must be {_Z_IMAGE_HOW}")
        if item.shape[0] < 1 or (isinstance(width, int) and item.shape[1] != width):
            raise ValueError(
                f"{where}[{i}] has shape {tuple(item.shape)}, but the transformer takes "
                f"cap_feat_dim = {width} channels and at least one token; {where} must be "
                f"{_Z_IMAGE_HOW}"
            )


def _check_z_image_cond(
    transformer: Any,
    cond: Mapping[str, Any],
    negative_cond: Any,
    guidance_scale: Any,
    normalization: Any,
    truncation: Any,
    parts: Mapping[str, Any],
) -> None:
    """Refuse, in one line and before any call, conditioning that ZImagePipeline does not
    give Z-Image's transformer: other pipelines' inputs in ``parts`` (from_diffusers'
    ``mask`` and the like, each None here; its ``controlnet`` is checked with the other flow
    transformers' controlnets), its prompts (``cap_feats``)
    missing or not a list of 2-D embeddings of its ``cap_feat_dim``, other arguments than
    its LoRA scale's (``joint_attention_kwargs``), CFG (``guidance_scale > 0``) without the
    negative prompts' ``cap_feats`` (one per prompt) or with other keys there, and
    ``cfg_normalization`` or ``cfg_truncation`` that are not numbers."""
    given = [name for name, value in parts.items() if value is not None]
    if given:
        raise ValueError(
            f"{given[0]} is not mapped for ZImageTransformer2DModel: bdia calls it as "
            "ZImagePipeline, ZImageImg2ImgPipeline and the ControlNet pipelines do (not as "
            "ZImageOmniPipeline or ZImageInpaintPipeline; ZImageControlNetInpaintPipeline's "
            "mask goes in controlnet_cond); leave it out"
        )
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, numbers.Real)
        or not math.isfinite(guidance_scale)
    ):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    for name, value, lowest in (
        ("cfg_normalization", normalization, 0.0),
        ("cfg_truncation", truncation, -math.inf),
    ):
        if value is None and name == "cfg_truncation":
            continue
        if not isinstance(value, numbers.Real) or not lowest <= float(value) < math.inf:
            raise ValueError(
                f"{name} must be a finite number{' >= 0 (or a bool)' if lowest == 0 else ''}, "
                f"as ZImagePipeline takes it, got {value!r}"
            )
    if negative_cond is not None and not isinstance(negative_cond, Mapping):
        raise TypeError(
            "negative_cond must be a dict of the negative prompts' arguments, "
            f"{{'cap_feats': negative_prompt_embeds}}, got {type(negative_cond).__name__}"
        )
    config = getattr(transformer, "config", None)
    width = config.get("cap_feat_dim") if isinstance(config, Mapping) else None
    for key in cond:
        if key == _Z_IMAGE_RESIDUALS:
            raise ValueError(
                f"cond key {key!r} is set by the adapter from the controlnet's residuals at "
                "each evaluation; give controlnet=pipe.controlnet and controlnet_cond= (the "
                "control image's latents) instead"
            )
        if key not in (_Z_IMAGE_PROMPTS,) + _Z_IMAGE_KWARGS:
            raise ValueError(
                f"cond key {key!r} is not mapped for ZImageTransformer2DModel: bdia calls it as "
                "ZImagePipeline and ZImageImg2ImgPipeline do, with cap_feats (their "
                "prompt_embeds) and joint_attention_kwargs alone; leave it out"
            )
    if _Z_IMAGE_PROMPTS not in cond:
        raise ValueError(f"ZImageTransformer2DModel needs cap_feats, {_Z_IMAGE_HOW}")
    _check_cap_feats(cond[_Z_IMAGE_PROMPTS], width, "cap_feats")
    guided = guidance_scale is not None and float(guidance_scale) > 0
    if negative_cond is not None:
        extra = [k for k in negative_cond if k != _Z_IMAGE_PROMPTS]
        if extra:
            raise ValueError(
                f"negative_cond key {extra[0]!r}: ZImagePipeline's CFG gives the negative "
                "prompts their own cap_feats alone; leave it out"
            )
    if not guided:
        return
    if negative_cond is None or _Z_IMAGE_PROMPTS not in negative_cond:
        raise ValueError(
            f"guidance_scale = {guidance_scale} turns ZImagePipeline's CFG on (a scale above "
            "0); give the negative prompts' embeddings as negative_cond={'cap_feats': "
            "negative_prompt_embeds}, or guidance_scale=0 for none (Z-Image-Turbo's)"
        )
    negative = negative_cond[_Z_IMAGE_PROMPTS]
    _check_cap_feats(negative, width, "negative_cond['cap_feats']")
    if len(negative) != len(cond[_Z_IMAGE_PROMPTS]):
        raise ValueError(
            f"negative_cond['cap_feats'] has {len(negative)} entries but cap_feats has "
            f"{len(cond[_Z_IMAGE_PROMPTS])}; give one negative prompt per prompt, as "
            "ZImagePipeline.encode_prompt makes them"
        )


def _per_sample(value: Sequence[Tensor], batch: int, where: str) -> list[Tensor]:
    """``value``'s embeddings, one per sample of the state's ``batch`` (one for all where it
    holds one, as the pipeline repeats a prompt for its images)."""
    if len(value) == batch:
        return list(value)
    if len(value) == 1:
        return list(value) * batch
    raise ValueError(
        f"{where} has {len(value)} entries but the state has batch {batch}; give one prompt "
        f"embedding per sample (or one for all)"
    )


def _z_image_timestep(model: Any, x: Tensor, t: Tensor) -> Tensor:
    """ZImagePipeline's ``(1000 - t) / 1000`` of the scheduler's float32 ``t = sigma N``, one
    per sample (in float64 for a float64 state), on the host."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    times = [float(v) for v in t.detach().reshape(-1).cpu().tolist()]
    tau = torch.tensor([model.timestep(v, t.dtype) for v in times], dtype=dtype)
    return (_Z_IMAGE_TIMESTEP - tau) / _Z_IMAGE_TIMESTEP


def z_image_velocity(
    model: Any,
    x: Tensor,
    t: Tensor,
    guidance_scale: float | None,
    negative_cond: Mapping[str, Any] | None,
    kwargs: dict[str, Any],
    controlnet_cond: Any = None,
    conditioning_scale: Any = 1.0,
    control_range: Any = None,
) -> Tensor:
    """The velocity ``eps - x0`` at the latents ``x`` (batch, C, h, w) and the ODE's times
    ``t`` (batch,) of ``model``'s Z-Image transformer (a ``DiffusersModel``), as
    ``ZImagePipeline``'s loop makes its ``noise_pred``: float32 at least, of ``x``'s shape.
    ``kwargs`` holds ``cap_feats``, the transformer's other arguments and the pipeline's
    ``cfg_normalization`` and ``cfg_truncation``. With the model's controlnet, its control
    latents ``controlnet_cond`` ``(batch or 1, control_in_dim, 1, h, w)`` and scale, as
    ``ZImageControlNetPipeline``'s loop calls it (``control_range`` as ``DiffusersModel``
    takes it)."""
    normalization = kwargs.pop("cfg_normalization", False)
    truncation = kwargs.pop("cfg_truncation", 1.0)
    batch = x.shape[0]
    channels = model.in_channels
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(
            f"the state has shape {tuple(x.shape)}, but Z-Image's transformer takes latents of "
            f"shape (batch, {channels}, h, w), as ZImagePipeline's loop carries them"
        )
    control = model._control_inputs(x, t, controlnet_cond, conditioning_scale, control_range, batch)
    prompts = _per_sample(kwargs.pop(_Z_IMAGE_PROMPTS), batch, "cap_feats")
    tau = _z_image_timestep(model, x, t)
    guided = guidance_scale is not None and guidance_scale > 0
    if guided and truncation is not None:
        # ZImagePipeline drops CFG at the steps whose (1000 - t) / 1000 passes the bound.
        past = {float(v) > float(truncation) for v in tau.tolist()}
        if len(past) > 1:
            raise ValueError(
                "the batch's times lie on both sides of cfg_truncation; evaluate the batch at "
                "one time"
            )
        guided = not past.pop()
    tau = values_on(tau, tau.dtype, x.device)
    if guided:
        assert negative_cond is not None
        negative = _per_sample(negative_cond[_Z_IMAGE_PROMPTS], batch, "negative_cond['cap_feats']")
        latents, prompts, tau = x.repeat(2, 1, 1, 1), prompts + negative, tau.repeat(2)
    else:
        latents = x
    inputs = list(latents.unsqueeze(2).unbind(dim=0))
    if control is not None:
        # The ControlNet pipelines call the controlnet on the transformer's inputs, the
        # control input repeated with the latents under CFG.
        images, scales = control
        image = torch.cat([images[0]] * (2 if guided else 1))
        residuals = model._flux_residuals(
            inputs, tau, {_Z_IMAGE_PROMPTS: prompts}, ([image], scales)
        )
        kwargs = {**kwargs, **residuals}
    out = model.unet(inputs, tau, prompts, return_dict=False, **kwargs)[0]
    # The pipeline's .float(), which keeps a float64 transformer's float64.
    wide = torch.promote_types(out[0].dtype, torch.float32)
    if guided:
        preds = []
        for j in range(batch):
            pos, neg = out[j].to(wide), out[batch + j].to(wide)
            pred = pos + guidance_scale * (pos - neg)
            if normalization and float(normalization) > 0.0:
                # The guided prediction's norm capped at cfg_normalization times the
                # conditional one's, over the whole sample, as the pipeline rescales it.
                # Chosen on the device: reading the comparison would make the host wait.
                limit = torch.linalg.vector_norm(pos) * float(normalization)
                norm = torch.linalg.vector_norm(pred)
                pred = torch.where(norm > limit, pred * (limit / norm), pred)
            preds.append(pred)
        velocity = torch.stack(preds, dim=0)
    else:
        velocity = torch.stack([o.to(wide) for o in out], dim=0)
    return -velocity.squeeze(2)
