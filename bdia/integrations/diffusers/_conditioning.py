"""The conditioning of a diffusers network's calls: the unet's keyword arguments (``cond``) and
classifier-free guidance (``guidance_scale`` with ``negative_cond``, the unconditional
branch's arguments).

The checks refuse, in one line and before any call, arguments the adapter sets itself,
guidance that cannot run and an LCM-distilled unet without its ``timestep_cond``; Flux's
have their own (its position ids ``txt_ids`` and ``img_ids``, 2-D and passed as they are,
and its embedded ``guidance``), Chroma's (Flux's ids, its ``attention_mask``, and no pooled
or guidance embedding), and so have an inpainting unet's and a Flux Fill
transformer's (their ``mask`` and ``masked_image_latents``, extra input channels beside the
latents), a Flux Depth or Canny transformer's control image (its ``control_latents``, extra
channels too) and FluxKontextPipeline's reference image (its ``image_latents``, extra tokens
after the latents'), and so has Qwen-Image's transformer (its embeddings, their padding
mask and its ``img_shapes``, checked against the arguments of the installed diffusers'
transformer). At each call, tensors of batch 1 are expanded to the state's batch, and under
guidance stacked into the batch ``[unconditional, conditional]``; floating ones are cast to
the unet's dtype once, when the ODE is built.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# Flux's position ids: one row per token, shared by the batch (2-D), passed as they are.
_FLUX_IDS = ("txt_ids", "img_ids")
# unet (and flow transformer) keyword arguments that the adapter itself sets.
_RESERVED = ("sample", "timestep", "return_dict")
_FLOW_RESERVED = ("hidden_states", "timestep", "return_dict")
# The ODE's cond keys of a controlnet, beside the unet's arguments (DiffusersModel.forward's).
_CONTROL_KEYS = ("controlnet_cond", "conditioning_scale", "guess_mode", "control_range")
# The ODE's cond keys of an inpainting unet's extra input channels (DiffusersModel.forward's).
_INPAINT_KEYS = ("mask", "masked_image_latents")
# The ODE's cond key of FluxKontextPipeline's reference image tokens (DiffusersModel.forward's).
_KONTEXT_KEY = "image_latents"
# The ODE's cond key of FluxControlPipeline's control image channels (DiffusersModel.forward's).
_FLUX_CONTROL_KEY = "control_latents"
# An IP-Adapter's image projection (the unet's encoder_hid_dim_type once one is loaded), and
# the other projections and added embeddings of a unet that read added_cond_kwargs'
# image_embeds (Kandinsky's, diffusers' UNet2DConditionModel).
_IP_PROJECTION = "ip_image_proj"
_IMAGE_PROJECTIONS = (_IP_PROJECTION, "image_proj", "text_image_proj")
_IMAGE_ADDITIONS = ("image", "text_image", "image_hint")
_CONTROL_HOW = (
    "packed as FluxControlPipeline makes them: the control image through its prepare_image, "
    "encoded by the vae, shifted and scaled, then _pack_latents"
)


def _batched(value: Any, batch: int, where: str) -> Any:
    """``value`` with every tensor of batch 1 expanded to ``batch`` (through dicts and lists)."""
    if isinstance(value, Tensor):
        if value.ndim == 0 or value.shape[0] == batch:
            return value
        if value.shape[0] == 1:
            return value.expand(batch, *value.shape[1:])
        raise ValueError(
            f"{where} has batch {value.shape[0]} but the state has batch {batch}; give batch 1 "
            f"(shared by every sample) or {batch}"
        )
    if isinstance(value, Mapping):
        return {k: _batched(v, batch, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_batched(v, batch, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _doubled(value: Any, batch: int, where: str) -> Any:
    """A conditioning value shared by both halves of a guidance batch."""
    if isinstance(value, Tensor) and value.ndim > 0:
        b = _batched(value, batch, where)
        return torch.cat([b, b])
    if isinstance(value, Mapping):
        return {k: _doubled(v, batch, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_doubled(v, batch, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _paired(negative: Any, positive: Any, batch: int, where: str) -> Any:
    """The unet argument of the batch [unconditional, conditional]."""
    if isinstance(positive, Tensor) and isinstance(negative, Tensor) and positive.ndim > 0:
        return torch.cat(
            [_batched(negative, batch, f"negative_cond{where}"), _batched(positive, batch, where)]
        )
    if isinstance(positive, Mapping) and isinstance(negative, Mapping):
        extra = [k for k in negative if k not in positive]
        if extra:
            raise ValueError(
                f"negative_cond{where} has key {extra[0]!r}, which the conditional arguments "
                "lack; give both branches the same keys"
            )
        return {
            k: _paired(negative[k], v, batch, f"{where}[{k!r}]")
            if k in negative
            else _doubled(v, batch, f"{where}[{k!r}]")
            for k, v in positive.items()
        }
    if (
        isinstance(positive, (list, tuple))
        and isinstance(negative, (list, tuple))
        and len(positive) == len(negative)
    ):
        return type(positive)(
            _paired(n, p, batch, f"{where}[{i}]")
            for i, (n, p) in enumerate(zip(negative, positive))
        )
    same = negative is positive
    if not same and not isinstance(positive, Tensor) and not isinstance(negative, Tensor):
        try:
            same = bool(negative == positive)
        except Exception:  # an object without a usable == is not known to be equal
            same = False
    if isinstance(positive, Tensor) and isinstance(negative, Tensor):
        same = positive.shape == negative.shape and bool(torch.equal(positive, negative))
    if not same:
        raise ValueError(
            f"negative_cond{where} and the conditional argument differ but cannot be stacked "
            "into one batch (not tensors with a batch dimension); give equal values"
        )
    return positive


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor (through dicts and lists) cast to ``dtype``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    return value


def _cast_cond(
    cond: Mapping[str, Any], dtype: torch.dtype, keep: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``cond`` with its floating tensors cast to ``dtype``, but the keys in ``keep``."""
    return {k: v if k in keep else _cast_floating(v, dtype) for k, v in cond.items()}


def _check_guidance(guidance_scale: Any, negative_cond: Any) -> None:
    """One-line errors for a classifier-free guidance setting that cannot run."""
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if negative_cond is not None and not isinstance(negative_cond, Mapping):
        raise TypeError(
            "negative_cond must be a dict of the unconditional branch's unet arguments, e.g. "
            f"{{'encoder_hidden_states': negative_embeds}}, got {type(negative_cond).__name__}"
        )
    if guidance_scale is not None and guidance_scale != 1 and negative_cond is None:
        raise ValueError(
            f"guidance_scale = {guidance_scale} needs negative_cond, the unet arguments of the "
            "unconditional branch, e.g. negative_cond={'encoder_hidden_states': negative_embeds}"
        )
    if negative_cond is not None and guidance_scale is None:
        raise ValueError(
            "negative_cond was given without guidance_scale; pass guidance_scale=g for the "
            "guided output u + g (c - u)"
        )


def _check_rescale_value(guidance_rescale: Any) -> None:
    """A ``guidance_rescale`` that is a number in [0, 1], or a one-line error."""
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, numbers.Real):
        raise TypeError(f"guidance_rescale must be a number, got {guidance_rescale!r}")
    if not 0 <= float(guidance_rescale) <= 1:
        raise ValueError(
            f"guidance_rescale = {guidance_rescale} lies outside [0, 1]: it mixes the guided "
            "output with its rescaled copy (0: none, the pipelines' default; 0.7: Lin et al.'s)"
        )


def _rescaled_guidance(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """The pipelines' ``rescale_noise_cfg``: ``guided`` rescaled to the per-sample standard
    deviation of the conditional prediction ``cond``, mixed with itself by
    ``guidance_rescale``, in the order of diffusers' operations (so that a float32 run is
    the pipeline's bit for bit)."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _check_timestep_cond(unet_config: Mapping[str, Any], cond: Mapping[str, Any]) -> None:
    """Refuse a UNet with ``time_cond_proj_dim`` (an LCM-distilled one) without its
    ``timestep_cond``: diffusers' UNet then leaves the guidance embedding out of its time
    embedding without a word, and predicts as a network it was not distilled into."""
    dim = unet_config.get("time_cond_proj_dim")
    if dim is not None and cond.get("timestep_cond") is None:
        raise ValueError(
            f"the unet has time_cond_proj_dim = {dim} (a guidance-distilled unet, such as "
            "LCM's): it takes its guidance scale w as timestep_cond, and runs as another "
            "network without it; pass timestep_cond=pipe.get_guidance_scale_embedding("
            f"torch.tensor([w - 1.0]), embedding_dim={dim}), as LatentConsistencyModelPipeline "
            "makes it"
        )


def _check_cond(
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    reserved: tuple[str, ...] = _RESERVED,
) -> None:
    for where, mapping in (("", cond), ("negative_cond", negative_cond or {})):
        for key in mapping:
            if key in reserved:
                raise ValueError(
                    f"{where or 'cond'} key {key!r} is set by the adapter in the unet calls it "
                    "makes; remove it"
                )
            if key == "skip_layers" and reserved == _FLOW_RESERVED:
                raise ValueError(
                    f"{where or 'cond'} key 'skip_layers' leaves out transformer blocks, the "
                    "third model of skip-layer guidance (StableDiffusion3Pipeline's "
                    "skip_guidance_layers), which bdia does not map: the pipeline adds it at "
                    "some steps only; remove it"
                )
    if "control_range" in cond:
        raise ValueError(
            "cond key 'control_range' is set by the adapter from control_guidance_start and "
            "control_guidance_end; pass those (with num_inference_steps) instead"
        )
    shared = _CONTROL_KEYS + _INPAINT_KEYS + (_KONTEXT_KEY, _FLUX_CONTROL_KEY)
    control = [k for k in (negative_cond or {}) if k in shared]
    if control:
        what = "the inpainting mask and masked image are"
        if control[0] in _CONTROL_KEYS:
            what = "the control image and its settings are"
        elif control[0] == _KONTEXT_KEY:
            what = "the reference image's latents are"
        elif control[0] == _FLUX_CONTROL_KEY:
            what = "the control image's latents are"
        raise ValueError(
            f"negative_cond has key {control[0]!r}: {what} shared by both branches of "
            "guidance, as the pipelines share them; leave it out of negative_cond"
        )
    extra = [k for k in (negative_cond or {}) if k not in cond]
    if extra:
        raise ValueError(
            f"negative_cond has key {extra[0]!r}, which the conditional arguments lack; give "
            f"the conditional branch's value as {extra[0]}=... too"
        )


def _ids_message(key: str, value: Any, axes: int, batched: bool = False) -> str | None:
    """Why ``value`` is not a Flux position-id tensor of ``axes`` columns, or None; with
    ``batched`` (Flux.2's), one of shape ``(batch, tokens, axes)`` is taken too."""
    shape = f"(tokens, {axes}) or (batch, tokens, {axes})" if batched else f"(tokens, {axes})"
    if not isinstance(value, Tensor):
        return f"{key} must be a tensor of shape {shape}, got {type(value).__name__}"
    if value.ndim == 2 and value.shape[1] == axes:
        return None
    if batched and value.ndim == 3 and value.shape[2] == axes:
        return None
    if batched:
        return (
            f"{key} must have shape {shape}, one row per token, as Flux2Pipeline passes it; "
            f"got {tuple(value.shape)}"
        )
    hint = f" (a batched one: pass {key}[0])" if value.ndim == 3 else ""
    return (
        f"{key} must have shape (tokens, {axes}), one row per token shared by the batch, as "
        f"FluxPipeline passes it; got {tuple(value.shape)}{hint}"
    )


def _guidance_tensor(value: Any, where: str) -> Tensor:
    """Flux-dev's embedded guidance scale: a number becomes ``torch.full([1], g)`` in float32,
    as FluxPipeline makes it; a tensor must hold one value per sample (or one for all)."""
    if isinstance(value, Tensor):
        if value.ndim != 1 or not value.is_floating_point():
            raise ValueError(
                f"{where} must be a number or a floating tensor of shape (batch,) or (1,), got "
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number (the embedded guidance scale), got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return torch.full([1], float(value), dtype=torch.float32)


def _flux_kwargs(kwargs: Mapping[str, Any], batch: int, where: str) -> dict[str, Any]:
    """One Flux call's keyword arguments: tensors of batch 1 expanded to ``batch``, but the
    position ids ``txt_ids`` and ``img_ids`` (one row per token) passed as they are."""
    rest = {k: v for k, v in kwargs.items() if k not in _FLUX_IDS}
    ids = {k: v for k, v in kwargs.items() if k in _FLUX_IDS}
    return {**_batched(rest, batch, where), **ids}


def _check_flux_tokens(
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    axes: int,
    batched: bool = False,
) -> None:
    """Refuse position ids that are not ``(tokens, axes)`` (with ``batched``, Flux.2's, or
    ``(batch, tokens, axes)``) and prompt embeddings of another length than their
    ``txt_ids``, in either branch (the negative one is a call of its own: its ``txt_ids``,
    else the conditional ones)."""
    for where, mapping in (("", cond), ("negative_cond", negative_cond or {})):
        for key in _FLUX_IDS:
            if key in mapping:
                label = f"{where}[{key!r}]" if where else key
                problem = _ids_message(label, mapping[key], axes, batched)
                if problem is not None:
                    raise ValueError(problem)
        rows = mapping.get("txt_ids", cond["txt_ids"]).shape[-2]
        embeds = mapping.get("encoder_hidden_states")
        if isinstance(embeds, Tensor) and (embeds.ndim != 3 or embeds.shape[1] != rows):
            label = f"{where}['encoder_hidden_states']" if where else "encoder_hidden_states"
            raise ValueError(
                f"{label} has shape {tuple(embeds.shape)}, but its txt_ids has "
                f"{rows} rows: give embeddings of shape (batch or 1, tokens, D) with "
                "one txt_ids row per token"
            )


def _check_flux_cond(
    transformer: Any, cond: Mapping[str, Any], negative_cond: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Refuse, in one line and before any call, Flux conditioning the transformer cannot take
    as FluxPipeline gives it. Returns copies of ``cond`` and ``negative_cond`` in which a
    ``guidance`` number is a tensor. The negative branch may have ``txt_ids`` of its own
    (negative embeddings of another length): it is a call of its own, as in FluxPipeline."""
    config = transformer.config
    name = type(transformer).__name__
    axes = len(config.get("axes_dims_rope", (16, 56, 56)))
    for key in ("encoder_hidden_states", "pooled_projections", "txt_ids"):
        if key not in cond:
            raise ValueError(
                f"{name} needs cond key {key!r}: FluxPipeline.encode_prompt returns "
                "(prompt_embeds, pooled_prompt_embeds, text_ids); pass them as "
                "encoder_hidden_states, pooled_projections and txt_ids"
            )
    if "img_ids" not in cond:
        raise ValueError(
            f"{name} needs cond key 'img_ids', the (tokens, {axes}) positions of the packed "
            "latents' tokens: FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, "
            "dtype) for latents of h x w before packing"
        )
    _check_flux_tokens(cond, negative_cond, axes)
    return _embedded_guidance(
        transformer,
        cond,
        negative_cond,
        "a timestep-distilled model such as Flux.1-schnell",
        "Flux.1-dev",
        "FluxPipeline's guidance_scale (3.5 by default)",
        bool(transformer.config.get("guidance_embeds", False)),
    )


def _embedded_guidance(
    transformer: Any,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    without: str,
    embedding: str,
    scale: str,
    embedded: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Copies of ``cond`` and ``negative_cond`` in which a ``guidance`` number is a tensor;
    refuses, in one line, guidance for a transformer that embeds none (``embedded`` false;
    ``without`` names such a model) and its absence for one that does (``embedding`` names
    it, ``scale`` the pipeline's value)."""
    name = type(transformer).__name__
    positive = dict(cond)
    negative = None if negative_cond is None else dict(negative_cond)
    branches: list[tuple[str, dict[str, Any] | None]] = [
        ("guidance", positive),
        ("negative_cond['guidance']", negative),
    ]
    for where, branch in branches:
        if branch is None or "guidance" not in branch:
            continue
        if not embedded:
            raise ValueError(
                f"{name} has guidance_embeds = False ({without}) and embeds no guidance "
                f"scale; leave {where} out (classifier-free guidance is guidance_scale with "
                "negative_cond)"
            )
        branch["guidance"] = _guidance_tensor(branch["guidance"], where)
    if embedded and "guidance" not in positive:
        raise ValueError(
            f"{name} has guidance_embeds = True ({embedding}) and embeds the guidance scale: "
            f"give guidance=g, {scale}, as a number or a tensor of shape (batch,) or (1,)"
        )
    return positive, negative


def _flux2_embeds_guidance(config: Mapping[str, Any]) -> bool:
    """Whether a Flux.2 transformer of ``config`` embeds a guidance scale. A config without
    ``guidance_embeds`` is diffusers 0.36's, whose Flux2Transformer2DModel has no such option
    and always embeds one (FLUX.2-dev's kind); 0.37 added it, True by default."""
    return bool(config.get("guidance_embeds", True))


def _check_flux2_cond(
    transformer: Any, cond: Mapping[str, Any], negative_cond: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Refuse, in one line and before any call, Flux.2 conditioning the transformer cannot
    take as Flux2Pipeline and Flux2KleinPipeline give it: the prompt embeddings and their
    ``txt_ids``, the latents' ``img_ids`` (4 axes, 2-D or batched, as the pipelines pass
    them: the transformer reads the first sample's rows), no pooled embeddings (Flux.2 has
    none), and the embedded ``guidance`` for a transformer with ``guidance_embeds``
    (FLUX.2-dev's), none without (FLUX.2-klein's: its pipeline passes ``guidance=None`` and
    guides by true CFG). Returns copies as ``_check_flux_cond`` does."""
    config = transformer.config
    name = type(transformer).__name__
    axes = len(config.get("axes_dims_rope", (32, 32, 32, 32)))
    for where, mapping in (("", cond), ("negative_cond", negative_cond or {})):
        if "pooled_projections" in mapping:
            raise ValueError(
                f"{where or 'cond'} has 'pooled_projections', which {name} has no input for: "
                "Flux.2 embeds the prompt with one text encoder and no pooled embeddings; "
                "leave it out"
            )
    for key in ("encoder_hidden_states", "txt_ids"):
        if key not in cond:
            raise ValueError(
                f"{name} needs cond key {key!r}: Flux2Pipeline.encode_prompt returns "
                "(prompt_embeds, text_ids); pass them as encoder_hidden_states and txt_ids"
            )
    if "img_ids" not in cond:
        raise ValueError(
            f"{name} needs cond key 'img_ids', the (tokens, {axes}) positions of the packed "
            "latents' tokens: Flux2Pipeline._prepare_latent_ids(latents) for latents of shape "
            "(batch, channels, h, w) before packing"
        )
    _check_flux_tokens(cond, negative_cond, axes, batched=True)
    for where, mapping in (("", cond), ("negative_cond", negative_cond or {})):
        cached = mapping.get("kv_cache") is not None, mapping.get("kv_cache_mode") == "cached"
        if ("kv_cache" in mapping or "kv_cache_mode" in mapping) and not all(cached):
            raise ValueError(
                f"{where or 'cond'} has kv_cache {'without' if cached[0] else 'or'} "
                "kv_cache_mode='cached': Flux2KleinKVPipeline's reference images go to the "
                "transformer as the key-value cache of its first call (kv_cache_mode="
                "'extract', which returns it) and kv_cache_mode='cached' at every call; give "
                "both, or neither"
            )
    return _embedded_guidance(
        transformer,
        cond,
        negative_cond,
        "FLUX.2-klein's, which Flux2KleinPipeline calls with guidance=None",
        "FLUX.2-dev's",
        "Flux2Pipeline's guidance_scale (4 by default)",
        _flux2_embeds_guidance(config),
    )


# Flux's transformer arguments that Chroma's transformer has no input for, and why.
_CHROMA_LACKS = {
    "pooled_projections": "Chroma encodes the prompt with T5 alone, and has no pooled embeddings",
    "guidance": "it embeds no guidance scale; ChromaPipeline's guidance_scale is true CFG, "
    "guidance_scale= with negative_cond=",
}
_CHROMA_MASK_HOW = (
    "pipe._prepare_attention_mask(1, tokens, dtype, prompt_attention_mask), the prompt's mask "
    "from encode_prompt followed by ones for the image tokens"
)


def _check_chroma_cond(
    transformer: Any, cond: Mapping[str, Any], negative_cond: Mapping[str, Any] | None
) -> None:
    """Refuse, in one line and before any call, Chroma conditioning the transformer cannot take
    as ChromaPipeline gives it.

    ChromaPipeline calls its transformer as FluxPipeline calls Flux's, on the packed latents
    with ``txt_ids`` ``(L, 3)`` and ``img_ids`` ``(tokens, 3)``, but with the T5 embeddings
    ``encoder_hidden_states`` ``(batch or 1, L, D)`` alone (no ``pooled_projections``, no
    ``guidance``) and an ``attention_mask`` ``(batch or 1, L + tokens)``: the prompt's mask
    (``encode_prompt``'s, which keeps the first padding token) followed by ones for the image
    tokens (``_prepare_attention_mask``). Its ``guidance_scale`` is true CFG, a second call
    with the negative prompt's embeddings and their own mask: negative embeddings without a
    mask of their own are refused (the conditional mask would let the negative call attend to
    the padding after the positive prompt's length, another vector field than the
    pipeline's). An IP-Adapter's image prompt is ``_check_flux_ip_adapter``'s to check, as
    for Flux: ChromaPipeline loads Flux's (``FluxIPAdapterMixin``) and passes its embeddings
    as FluxPipeline does."""
    name = type(transformer).__name__
    axes = len(transformer.config.get("axes_dims_rope", (16, 56, 56)))
    branches = (("", cond), ("negative_cond", negative_cond or {}))
    for where, branch in branches:
        for key, why in _CHROMA_LACKS.items():
            if key in branch:
                label = f"{where}[{key!r}]" if where else key
                raise ValueError(f"{name} takes no {key} ({why}); leave {label} out")
    for key in ("encoder_hidden_states", "txt_ids", "attention_mask"):
        if key not in cond:
            raise ValueError(
                f"{name} needs cond key {key!r}: ChromaPipeline.encode_prompt returns "
                "(prompt_embeds, text_ids, prompt_attention_mask, ...); pass them as "
                f"encoder_hidden_states, txt_ids and attention_mask = {_CHROMA_MASK_HOW}"
            )
    if "img_ids" not in cond:
        raise ValueError(
            f"{name} needs cond key 'img_ids', the (tokens, {axes}) positions of the packed "
            "latents' tokens: ChromaPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "
            "device, dtype) for latents of h x w before packing"
        )
    _check_flux_tokens(cond, negative_cond, axes)
    negative = negative_cond or {}
    if "encoder_hidden_states" in negative and "attention_mask" not in negative:
        raise ValueError(
            "negative_cond has encoder_hidden_states but no attention_mask: ChromaPipeline's "
            "negative call masks the negative prompt by its own length; give "
            "negative_cond['attention_mask'] = pipe._prepare_attention_mask(1, tokens, dtype, "
            "negative_prompt_attention_mask), encode_prompt's negative mask followed by ones"
        )
    for where, branch in branches:
        mask = branch.get("attention_mask")
        if mask is None:
            continue
        text = len(branch.get("txt_ids", cond["txt_ids"]))
        tokens = len(branch.get("img_ids", cond["img_ids"]))
        if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[1] == text + tokens:
            continue
        label = f"{where}['attention_mask']" if where else "attention_mask"
        got = f"a {type(mask).__name__}"
        hint = ""
        if isinstance(mask, Tensor):
            got = f"shape {tuple(mask.shape)}"
            if mask.ndim == 2 and mask.shape[1] == text:
                hint = f" (the prompt's mask alone: make it {_CHROMA_MASK_HOW})"
        raise ValueError(
            f"{label} must have shape (batch or 1, {text + tokens}), one entry per text token "
            f"({text}) then per image token ({tokens}), as ChromaPipeline passes it; got "
            f"{got}{hint}"
        )


# Qwen-Image's text arguments beside its embeddings: the padding mask and, in diffusers
# versions whose transformer takes them (0.35 to 0.38), the text lengths. Each call of true
# CFG takes its own prompt's, so the negative call never inherits the conditional ones.
_QWEN_TEXT = ("encoder_hidden_states_mask", "txt_seq_lens")


def _qwen_needs_lengths(transformer: Any, params: Mapping[str, Any]) -> bool:
    """Whether Qwen-Image's ``transformer`` cannot run without ``txt_seq_lens``: its
    ``forward`` (``params``) takes them and the module that defines it cannot count the text
    tokens from the mask. diffusers 0.35 and 0.36 need them (the pipeline passes
    ``prompt_embeds_mask.sum(dim=1).tolist()``); 0.37 and 0.38 count them with
    ``compute_text_seq_len_from_mask`` and take ``txt_seq_lens`` only as a deprecated
    argument, which their pipeline does not pass; 0.39 on take none."""
    if "txt_seq_lens" not in params:
        return False
    module = inspect.getmodule(type(transformer).forward)
    return not hasattr(module, "compute_text_seq_len_from_mask")


def _check_longest_prompt(txt_seq_lens: Any, tokens: int, where: str, name: str) -> None:
    """Refuse text lengths whose longest is not the embeddings' ``tokens``, for a transformer
    that needs them (diffusers 0.35's and 0.36's): its rotary embedding gives the text
    ``max(txt_seq_lens)`` positions, which must be one per token (their encode_prompt pads
    the prompts to the longest alone), or its call fails part way."""
    label = f"{where}['txt_seq_lens']" if where else "txt_seq_lens"
    ok = isinstance(txt_seq_lens, (list, tuple)) and len(txt_seq_lens) > 0
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) for n in txt_seq_lens)
    if not ok or max(txt_seq_lens) != tokens:
        raise ValueError(
            f"{label} is {txt_seq_lens!r}, whose longest is not the {tokens} tokens of the "
            f"embeddings: this diffusers' {name} gives the text max(txt_seq_lens) rotary "
            "positions; give a list of ints, the mask's sums, and trim the padding after the "
            "longest prompt, as its encode_prompt does"
        )


_QWEN_IMAGE_HOW = (
    "[[(1, H // 16, W // 16)]] for an H x W image, as QwenImagePipeline makes it (latents of "
    "H // 8 x W // 8 in patches of 2 x 2: vae_scale_factor 8)"
)


def _qwen_image_tokens(img_shapes: Any) -> int:
    """The image tokens ``img_shapes`` describes: ``sum(f h w)`` over its first sample's
    ``(frame, height, width)`` entries, the only sample diffusers' rotary embedding reads."""
    return sum(f * h * w for f, h, w in img_shapes[0])


def _is_shape(shape: Any) -> bool:
    """Whether ``shape`` is one ``(frame, height, width)`` triple of positive integers."""
    return (
        isinstance(shape, (list, tuple))
        and len(shape) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    )


def _check_img_shapes(value: Any) -> None:
    """Refuse ``img_shapes`` that are not a list, one entry per sample, of lists of
    ``(frame, height, width)`` integer triples, as QwenImagePipeline passes them."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if ok:
        first = value[0]
        ok = isinstance(first, (list, tuple)) and len(first) > 0
        ok = ok and all(_is_shape(shape) for shape in first)
    if not ok:
        raise ValueError(
            f"img_shapes must be a list of lists of (frame, height, width) positive integers "
            f"in patches, {_QWEN_IMAGE_HOW}; got {value!r}"
        )


def _zero_cond_split(sample: Any) -> tuple[int, int]:
    """The tokens of one sample's ``img_shapes`` entry that a transformer with
    ``zero_cond_t`` modulates at the call's timestep (its first shape, the latents') and at
    timestep 0 (the others, the reference images')."""
    counts = [f * h * w for f, h, w in sample]
    return counts[0], sum(counts[1:])


def _check_zero_cond_shapes(img_shapes: Any, label: str) -> None:
    """Refuse, for a transformer with ``zero_cond_t``, ``img_shapes`` whose samples split
    their tokens otherwise than the first: that transformer reads every sample's entry (the
    rotary embedding the first alone), as QwenImageEditPlusPipeline repeats one per
    sample."""
    first = _zero_cond_split(img_shapes[0])
    for k, sample in enumerate(img_shapes[1:], 1):
        ok = isinstance(sample, (list, tuple)) and len(sample) > 0
        if not (ok and all(_is_shape(s) for s in sample)) or _zero_cond_split(sample) != first:
            raise ValueError(
                f"{label}[{k}] is {sample!r}, whose tokens are not split as {label}[0]'s "
                f"({first[0]} latents', then {first[1]} of the reference images); a "
                "transformer with zero_cond_t reads every sample's entry to find the "
                "images' tokens: give each sample the first's entry, as "
                "QwenImageEditPlusPipeline repeats it"
            )


def _check_qwen_image_cond(
    transformer: Any,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    guided: bool,
    image_latents: Any = None,
) -> None:
    """Refuse, in one line and before any call, conditioning that Qwen-Image's transformer
    cannot take as QwenImagePipeline gives it: its keyword arguments (``forward``'s
    parameters, so that a key another diffusers version's transformer takes is named),
    ``encoder_hidden_states`` and its ``encoder_hidden_states_mask``, ``img_shapes``, the
    text lengths where this diffusers' transformer needs them, and no embedded ``guidance``
    (QwenImagePipeline passes None to a transformer without ``guidance_embeds``). Under true
    CFG (``guided``) the negative call needs its own embeddings, and its own mask where the
    conditional call has one. With ``image_latents`` (QwenImageEditPipeline's reference
    image, a tensor; QwenImageEditPlusPipeline's images' concatenated), each sample's
    ``img_shapes`` must hold the latents' shape and, after it, shapes of as many tokens as
    the images have, as those pipelines make them. For a transformer with ``zero_cond_t``
    every sample's entry must split its tokens as the first's."""
    config = transformer.config
    name = type(transformer).__name__
    if config.get("guidance_embeds", False):
        raise ValueError(
            f"{name} has guidance_embeds = True, a guidance-distilled model, which bdia does "
            "not map (no released Qwen-Image embeds a guidance scale); give a transformer "
            "with guidance_embeds = False"
        )
    params = inspect.signature(transformer.forward).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    lengths = _qwen_needs_lengths(transformer, params)
    for where, mapping in (("cond", cond), ("negative_cond", negative_cond or {})):
        for key in mapping:
            if key == "guidance":
                raise ValueError(
                    f"{where} key 'guidance' is an embedded guidance scale, which {name} with "
                    "guidance_embeds = False does not take (QwenImagePipeline passes None); "
                    "leave it out (true CFG is guidance_scale with negative_cond)"
                )
            if key == "controlnet_block_samples":
                raise ValueError(
                    f"{where} key 'controlnet_block_samples' is a Qwen-Image ControlNet's "
                    "residuals, which bdia does not map; leave it out"
                )
            if not open_ended and key not in params:
                raise ValueError(
                    f"{where} key {key!r} is not an argument of this diffusers' {name}.forward "
                    f"({', '.join(k for k in params if k not in _FLOW_RESERVED)}); leave it out "
                    "(QwenImagePipeline passes encoder_hidden_states, "
                    "encoder_hidden_states_mask and img_shapes)"
                )
    width = config.get("joint_attention_dim")
    branches = [("", cond)] + ([("negative_cond", negative_cond)] if negative_cond else [])
    for where, branch in branches:
        label = f"{where}['encoder_hidden_states']" if where else "encoder_hidden_states"
        embeds = branch.get("encoder_hidden_states")
        if embeds is None:
            raise ValueError(
                f"{name} needs {label}: QwenImagePipeline.encode_prompt returns (prompt_embeds, "
                "prompt_embeds_mask); pass them as encoder_hidden_states and "
                f"encoder_hidden_states_mask{' in negative_cond' if where else ''}"
            )
        ok = isinstance(embeds, Tensor) and embeds.is_floating_point() and embeds.ndim == 3
        if not ok or (isinstance(width, int) and embeds.shape[2] != width):
            what = type(embeds).__name__
            if isinstance(embeds, Tensor):
                what = f"a {embeds.dtype} tensor of shape {tuple(embeds.shape)}"
            raise ValueError(
                f"{label} must be a floating tensor of shape (batch or 1, L, {width}) (the "
                f"transformer's joint_attention_dim), got {what}"
            )
        mask = branch.get("encoder_hidden_states_mask")
        if mask is not None and (
            not isinstance(mask, Tensor)
            or mask.ndim != 2
            or mask.shape[1] != embeds.shape[1]
            or mask.shape[0] not in (1, embeds.shape[0])
        ):
            what = type(mask).__name__
            if isinstance(mask, Tensor):
                what = f"a tensor of shape {tuple(mask.shape)}"
            mask_label = (
                f"{where}['encoder_hidden_states_mask']" if where else "encoder_hidden_states_mask"
            )
            raise ValueError(
                f"{mask_label} must be None or a tensor of shape (batch or 1, "
                f"{embeds.shape[1]}), one entry per token of {label} (1 valid, 0 padding), as "
                f"encode_prompt returns it; got {what}"
            )
        if lengths and branch.get("txt_seq_lens") is None:
            raise ValueError(
                f"this diffusers' {name} needs txt_seq_lens: pass "
                f"{where + '[' if where else ''}txt_seq_lens{']' if where else ''} = "
                "the prompt's mask.sum(dim=1).tolist(), as its QwenImagePipeline does"
            )
        if lengths:
            _check_longest_prompt(branch["txt_seq_lens"], embeds.shape[1], where, name)
    if "img_shapes" not in cond:
        raise ValueError(f"{name} needs cond key 'img_shapes', {_QWEN_IMAGE_HOW}")
    _check_img_shapes(cond["img_shapes"])
    if negative_cond is not None and "img_shapes" in negative_cond:
        _check_img_shapes(negative_cond["img_shapes"])
    if config.get("zero_cond_t", False):
        _check_zero_cond_shapes(cond["img_shapes"], "img_shapes")
        if negative_cond is not None and "img_shapes" in negative_cond:
            _check_zero_cond_shapes(negative_cond["img_shapes"], "negative_cond['img_shapes']")
    if isinstance(image_latents, Tensor) and image_latents.ndim == 3:
        shapes = cond["img_shapes"][0]
        after = sum(f * h * w for f, h, w in shapes[1:])
        if after != image_latents.shape[1]:
            raise ValueError(
                f"img_shapes {cond['img_shapes']!r} hold {after} tokens after the latents' "
                f"shape but image_latents has {image_latents.shape[1]}; give [[(1, h // 2, w "
                "// 2), (1, h' // 2, w' // 2)]] * batch for latents of h x w and a reference "
                "image of h' x w' latents, as QwenImageEditPipeline makes it "
                "(QwenImageEditPlusPipeline's one such shape per image, in their order)"
            )
    if guided and negative_cond is not None:
        for key in _QWEN_TEXT:
            if cond.get(key) is not None and key not in negative_cond:
                raise ValueError(
                    f"cond has {key} but negative_cond has none: the negative call takes its "
                    "own prompt's (from QwenImagePipeline's negative_prompt_embeds_mask, None "
                    f"where encode_prompt returned None); give negative_cond['{key}']"
                )


def _both_given(mask: Any, masked_image_latents: Any, how: str) -> None:
    """Refuse one of ``mask`` and ``masked_image_latents`` without the other."""
    if mask is None or masked_image_latents is None:
        given, missing = (
            ("mask", "masked_image_latents")
            if mask is not None
            else ("masked_image_latents", "mask")
        )
        raise ValueError(f"{given} was given without {missing}; the network takes both, {how}")


def _check_tensors(tensors: Mapping[str, Any], ndim: int, shape: str) -> None:
    """Refuse conditioning that is not a floating tensor of ``ndim`` dims (``shape`` in words)."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(value).__name__}")
        if not value.is_floating_point() or value.ndim != ndim:
            raise ValueError(
                f"{name} must be a floating tensor of shape {shape}, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )


def _extra_channels(config: Mapping[str, Any] | None) -> tuple[Any, Any, int | None]:
    """``(in_channels, out_channels, in_channels - out_channels)`` of a network's config
    (None where unknown); a Flux transformer's ``out_channels`` None is its ``in_channels``."""
    c_in = c_out = None
    if isinstance(config, Mapping):
        c_in, c_out = config.get("in_channels"), config.get("out_channels")
        if c_out is None:
            c_out = c_in
    extra = c_in - c_out if isinstance(c_in, int) and isinstance(c_out, int) else None
    return c_in, c_out, extra


def _inpaint_cond(
    unet_config: Mapping[str, Any] | None,
    mask: Any,
    masked_image_latents: Any,
) -> dict[str, Tensor]:
    """The ODE's cond entries of an inpainting unet's extra input channels, checked against
    the unet's config: ``{}`` without them, else ``mask`` and ``masked_image_latents`` (the
    caller casts them to the unet's dtype, in which the pipelines make them).

    An inpainting unet (Stable Diffusion's or SDXL's, ``in_channels = 9`` for
    ``out_channels = 4``) takes ``torch.cat([latents, mask, masked_image_latents], dim=1)``;
    refused in one line: one without the other, a unet of no extra channels given them, and
    tensors that are not ``(batch or 1, C, h, w)`` with channels adding up to
    ``in_channels``. The batch and the size are checked against the state at each call."""
    c_in, c_out, extra = _extra_channels(unet_config)
    how = (
        "as the inpainting pipelines' prepare_mask_latents makes them (with "
        "do_classifier_free_guidance=False: the adapter doubles them under guidance)"
    )
    if mask is None and masked_image_latents is None:
        if extra is not None and extra >= 2:  # a mask channel and at least one of latents
            raise ValueError(
                f"the unet takes in_channels = {c_in} for out_channels = {c_out}: an inpainting "
                f"unet, whose {extra} extra input channels are the mask and the masked image's "
                f"latents; pass mask= (batch or 1, 1, h, w) and masked_image_latents= (batch or "
                f"1, {extra - 1}, h, w), {how}"
            )
        return {}
    _both_given(mask, masked_image_latents, how)
    if extra is not None and extra < 2:
        raise ValueError(
            f"mask and masked_image_latents are an inpainting unet's extra input channels, but "
            f"this unet takes in_channels = {c_in} for out_channels = {c_out}, not the latents "
            "and a mask and masked image beside them; give a 9-channel inpainting unet "
            "(stable-diffusion-inpainting, SDXL inpainting), or leave them out: a 4-channel "
            "unet has no mask input (StableDiffusionInpaintPipeline blends the image back into "
            "its latents after each step instead, which is no ODE step)"
        )
    tensors = {"mask": mask, "masked_image_latents": masked_image_latents}
    _check_tensors(tensors, 4, f"(batch or 1, C, h, w) at the latents' size, {how}")
    if mask.shape[1] != 1:
        raise ValueError(
            f"mask must have one channel, shape (batch or 1, 1, h, w), got {tuple(mask.shape)}"
        )
    if mask.shape[2:] != masked_image_latents.shape[2:]:
        raise ValueError(
            f"mask is {' x '.join(map(str, mask.shape[2:]))} (h x w) but masked_image_latents "
            f"is {' x '.join(map(str, masked_image_latents.shape[2:]))}; give both at the "
            f"latents' size, {how}"
        )
    if extra is not None and 1 + masked_image_latents.shape[1] != extra:
        raise ValueError(
            f"masked_image_latents has {masked_image_latents.shape[1]} channels, but the unet "
            f"takes in_channels = {c_in} = {c_out} (latents) + 1 (mask) + {extra - 1} (masked "
            "image latents); encode the masked image with the pipeline's vae"
        )
    return tensors


def _fill_cond(
    config: Mapping[str, Any] | None, mask: Any, masked_image_latents: Any
) -> dict[str, Tensor]:
    """The ODE's cond entries of a Flux Fill transformer's extra input channels, checked
    against its config: ``{}`` without them, else ``mask`` and ``masked_image_latents``.

    FluxFillPipeline calls its transformer (FLUX.1-Fill-dev's: ``in_channels = 384`` for
    ``out_channels = 64``) on ``torch.cat([latents, masked_image_latents, mask], dim=2)`` of
    packed tokens: the latents' ``out_channels``, as many of the masked image's packed
    latents, and the rest the packed mask (the VAE's factor squared, in 2 x 2 patches).
    Refused in one line: one without the other, a transformer without room for both given
    them (a text-to-image one, or a Depth or Canny one, whose extra channels are as many as
    the latents'), one with extra channels given neither (a Depth or Canny one is told of
    ``control_latents``), and tensors that are not ``(batch or 1, tokens, C)`` of one token
    count with those channels. The batch and the token count are checked against the state
    at each call."""
    c_in, c_out, extra = _extra_channels(config)
    how = (
        "as FluxFillPipeline.prepare_mask_latents returns them (mask, masked_image_latents), packed"
    )
    if mask is None and masked_image_latents is None:
        if extra and extra == c_out:
            raise ValueError(
                f"the transformer takes in_channels = {c_in} for out_channels = {c_out}: a Depth "
                f"or Canny transformer (FluxControlPipeline's), whose {extra} extra input "
                "channels are the control image's packed latents; pass control_latents= (batch "
                f"or 1, tokens, {c_out}), {_CONTROL_HOW}"
            )
        if extra:
            raise ValueError(
                f"the transformer takes in_channels = {c_in} for out_channels = {c_out}: a Fill "
                f"transformer (FluxFillPipeline's), whose {extra} extra input channels are the "
                "masked image's packed latents and the packed mask; pass masked_image_latents= "
                f"and mask=, {how}"
            )
        return {}
    _both_given(mask, masked_image_latents, how)
    if extra is not None and c_out is not None and extra <= c_out:
        raise ValueError(
            f"mask and masked_image_latents are a Fill transformer's extra input channels, but "
            f"this transformer takes in_channels = {c_in} for out_channels = {c_out}, which "
            "leaves no room for the masked image's latents and a mask beside the latents; give "
            "FluxFillPipeline's transformer (FLUX.1-Fill-dev's), or leave them out"
        )
    tensors = {"mask": mask, "masked_image_latents": masked_image_latents}
    _check_tensors(tensors, 3, f"(batch or 1, tokens, C), {how}")
    if mask.shape[1] != masked_image_latents.shape[1]:
        raise ValueError(
            f"mask has {mask.shape[1]} tokens but masked_image_latents has "
            f"{masked_image_latents.shape[1]}; give both at the latents' size, {how}"
        )
    if extra is not None and c_out is not None:
        for name, value, want in (
            ("masked_image_latents", masked_image_latents, c_out),
            ("mask", mask, extra - c_out),
        ):
            if value.shape[2] != want:
                raise ValueError(
                    f"{name} has {value.shape[2]} channels, but the transformer takes "
                    f"in_channels = {c_in} = {c_out} (latents) + {c_out} (masked image latents) "
                    f"+ {extra - c_out} (mask), in that order; {how}"
                )
    return tensors


def _kontext_cond(config: Mapping[str, Any] | None, image_latents: Any) -> dict[str, Tensor]:
    """The ODE's cond entry of FluxKontextPipeline's (QwenImageEditPipeline's) reference
    image, checked against the transformer's config: ``{}`` without it, else
    ``image_latents``, the image's packed latents ``(batch or 1, image tokens,
    in_channels)``, which the pipeline puts after the latents' tokens
    (``torch.cat([latents, image_latents], dim=1)``). The batch is checked against the state
    at each call, and ``img_ids`` (``img_shapes``) against both token counts."""
    if image_latents is None:
        return {}
    how = "packed, as FluxKontextPipeline's (QwenImageEditPipeline's) prepare_latents makes them"
    _check_tensors({_KONTEXT_KEY: image_latents}, 3, f"(batch or 1, tokens, C), {how}")
    c_in = config.get("in_channels") if isinstance(config, Mapping) else None
    if isinstance(c_in, int) and image_latents.shape[2] != c_in:
        raise ValueError(
            f"image_latents has {image_latents.shape[2]} channels, but the transformer takes "
            f"tokens of in_channels = {c_in}, the latents' and the reference image's alike; "
            f"give the image's latents {how}"
        )
    return {_KONTEXT_KEY: image_latents}


def _flux_control_cond(
    config: Mapping[str, Any] | None, control_latents: Any, **beside: Any
) -> dict[str, Tensor]:
    """The ODE's cond entry of a Flux Depth or Canny transformer's extra input channels,
    checked against its config: ``control_latents``, the control image's packed latents.

    FluxControlPipeline and FluxControlImg2ImgPipeline call their transformer
    (FLUX.1-Depth-dev's and FLUX.1-Canny-dev's: ``in_channels = 128`` for ``out_channels =
    64``) on ``torch.cat([latents, control_image], dim=2)`` of packed tokens: the control
    image encoded by the VAE, shifted, scaled and packed as the latents are, as many channels
    as theirs. Refused in one line: beside any of ``beside`` (the Fill transformer's mask
    and masked image, Kontext's reference image: no pipeline gives both), for a transformer
    whose extra channels are not as many as the latents' (a text-to-image or a Fill one),
    and a tensor that is not ``(batch or 1, tokens, out_channels)``. The batch and the token
    count are checked against the state at each call."""
    given = [name for name, value in beside.items() if value is not None]
    if given:
        owner = "FluxKontextPipeline" if given[0] == _KONTEXT_KEY else "FluxFillPipeline"
        raise ValueError(
            f"control_latents (FluxControlPipeline's control image) were given beside "
            f"{given[0]} ({owner}'s); no Flux pipeline gives its transformer both: give one"
        )
    c_in, c_out, extra = _extra_channels(config)
    if extra is not None and extra != c_out:
        has = "no extra input channels" if extra == 0 else f"{extra} extra input channels"
        raise ValueError(
            f"control_latents are a Depth or Canny transformer's extra input channels, as many "
            f"as the latents', but this transformer takes in_channels = {c_in} for out_channels "
            f"= {c_out}, {has}; give FluxControlPipeline's transformer (FLUX.1-Depth-dev's or "
            "FLUX.1-Canny-dev's), or leave them out (a Fill transformer takes mask= and "
            "masked_image_latents=)"
        )
    _check_tensors(
        {_FLUX_CONTROL_KEY: control_latents}, 3, f"(batch or 1, tokens, C), {_CONTROL_HOW}"
    )
    if c_out is not None and control_latents.shape[2] != c_out:
        raise ValueError(
            f"control_latents has {control_latents.shape[2]} channels, but the transformer "
            f"takes in_channels = {c_in} = {c_out} (latents) + {c_out} (control image latents); "
            f"give the control image's latents {_CONTROL_HOW}"
        )
    return {_FLUX_CONTROL_KEY: control_latents}


def _hid_dim_type(config: Any) -> Any:
    """A unet config's ``encoder_hid_dim_type`` as the unet reads it: the attribute, which
    ``load_ip_adapter`` sets on the frozen config without changing its mapping (where the
    field stays None), else the mapping's entry."""
    value = getattr(config, "encoder_hid_dim_type", None)
    if value is None and isinstance(config, Mapping):
        value = config.get("encoder_hid_dim_type")
    return value


def _ip_adapters(unet: Any) -> int | None:
    """How many IP-Adapters the unet has loaded (``pipe.load_ip_adapter`` sets its
    ``encoder_hid_dim_type`` to ``"ip_image_proj"`` and its ``encoder_hid_proj`` to a
    ``MultiIPAdapterImageProjection`` of one projection each); None for a unet without one."""
    if _hid_dim_type(getattr(unet, "config", None)) != _IP_PROJECTION:
        return None
    layers = getattr(getattr(unet, "encoder_hid_proj", None), "image_projection_layers", None)
    return len(layers) if layers is not None else 0


# Where a branch's image prompt sits: a unet's added_cond_kwargs' image_embeds (Stable
# Diffusion's, SDXL's), a Flux or SD3 transformer's joint_attention_kwargs'
# ip_adapter_image_embeds.
_UNET_IMAGES = ("added_cond_kwargs", "image_embeds")
_JOINT_IMAGES = ("joint_attention_kwargs", "ip_adapter_image_embeds")


def _image_embeds(branch: Mapping[str, Any] | None, where: tuple[str, str] = _UNET_IMAGES) -> Any:
    """``branch[where[0]][where[1]]`` (by default ``branch['added_cond_kwargs']
    ['image_embeds']``), or None where either key is missing."""
    outer = (branch or {}).get(where[0])
    return outer.get(where[1]) if isinstance(outer, Mapping) else None


def _check_image_embeds(
    value: Any, label: str, adapters: int, how: str, ndims: tuple[int, ...] = (3, 4)
) -> None:
    """Refuse, in one line, image embeddings ``value`` (named ``label``) that are not a list
    of ``adapters`` floating tensors of shape ``(batch, images, D)`` or, where ``ndims``
    allows 4 dims, ``(batch, images, tokens, D)``; ``how`` says how to make them."""
    if not isinstance(value, list) or len(value) != adapters:
        got = f"a list of {len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"
        raise ValueError(f"{label} must be a list of {adapters} tensor(s), {how}; got {got}")
    for i, tensor in enumerate(value):
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.ndim in ndims:
            continue
        what = f"a {type(tensor).__name__}"
        if isinstance(tensor, Tensor):
            what = f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
        shapes = "(batch or 1, images, D)"
        if 4 in ndims:
            shapes += " or (batch or 1, images, tokens, D)"
        raise ValueError(
            f"{label}[{i}] must be a floating tensor of shape {shapes}, {how}; got {what}"
        )


def _check_ip_adapter(
    unet: Any,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    guidance_scale: float | None,
) -> None:
    """Refuse, in one line and before any call, an IP-Adapter's image prompt that the unet
    would not take as the pipelines give it.

    A unet with IP-Adapters loaded takes ``added_cond_kwargs={"image_embeds": [...]}``, a
    list of one floating tensor per adapter, ``(batch or 1, images, D)`` (a plain
    IP-Adapter's CLIP image embeddings) or ``(batch or 1, images, tokens, D)`` (an IP-Adapter
    Plus's hidden states), as ``prepare_ip_adapter_image_embeds`` makes them. Under guidance
    the pipelines give the unconditional branch its own (zeros, or the image encoder's
    hidden states of an all-zero input): without image embeddings in ``negative_cond`` the
    adapter would double the conditional ones into both halves, another vector field than
    the pipeline's, so that is refused. Image embeddings for a unet that reads none (no
    IP-Adapter and no image projection or image embedding of its own) are refused too:
    diffusers would ignore them without a word."""
    config = getattr(unet, "config", None)
    if not isinstance(config, Mapping):
        return
    adapters = _ip_adapters(unet)
    embeds = _image_embeds(cond)
    how = (
        "one tensor per adapter as the pipeline's prepare_ip_adapter_image_embeds(image, "
        "None, device, 1, do_classifier_free_guidance) makes them"
    )
    if adapters is None:
        projection = _hid_dim_type(config)
        reads = projection in _IMAGE_PROJECTIONS or config.get("addition_embed_type") in (
            _IMAGE_ADDITIONS
        )
        if not reads and (embeds is not None or _image_embeds(negative_cond) is not None):
            raise ValueError(
                "added_cond_kwargs has image_embeds, an IP-Adapter's image prompt, but the unet "
                f"has no IP-Adapter loaded (its encoder_hid_dim_type is {projection!r}) and "
                "would ignore them; load one "
                "with pipe.load_ip_adapter(...), or leave image_embeds out"
            )
        return
    if embeds is None:
        raise ValueError(
            f"the unet has {adapters} IP-Adapter(s) loaded (encoder_hid_dim_type = "
            f"{_IP_PROJECTION!r}) and takes an image prompt: pass added_cond_kwargs="
            f"{{'image_embeds': [...]}}, {how}, or unload it (pipe.unload_ip_adapter())"
        )
    for where, value in (("", embeds), ("negative_cond", _image_embeds(negative_cond))):
        if value is not None:
            label = f"{where}['added_cond_kwargs']['image_embeds']" if where else "image_embeds"
            _check_image_embeds(value, label, adapters, how)
    guided = guidance_scale is not None and guidance_scale != 1 and negative_cond is not None
    if guided and _image_embeds(negative_cond) is None:
        raise ValueError(
            "under guidance the unconditional branch needs image embeddings of its own, as the "
            "pipelines give it: put negative_cond['added_cond_kwargs']['image_embeds'] = the "
            "first halves of prepare_ip_adapter_image_embeds(..., do_classifier_free_guidance="
            "True) (e.chunk(2)[0] of each; zeros for a plain IP-Adapter), or the conditional "
            "list itself to give both branches the image prompt"
        )


def _check_flux_ip_adapter(
    transformer: Any,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    guidance_scale: float | None,
    pipeline: str = "FluxPipeline",
) -> None:
    """Refuse, in one line and before any call, a Flux IP-Adapter's image prompt that the
    transformer would not take as FluxPipeline (``pipeline``: ChromaPipeline, which loads
    the same adapters and passes their embeddings alike) gives it.

    A transformer with IP-Adapters loaded (``FluxIPAdapterMixin.load_ip_adapter``) takes
    ``joint_attention_kwargs={"ip_adapter_image_embeds": [...]}``, a list of one floating
    tensor ``(batch or 1, images, D)`` per adapter, as ``prepare_ip_adapter_image_embeds``
    makes them; without them its attention processors fail mid-call. Under true CFG the
    pipeline gives the negative call embeddings of its own (``negative_ip_adapter_image``,
    by default an all-zero image's): without them in ``negative_cond`` the adapter would give
    that call the conditional ones, another vector field than the pipeline's, so that is
    refused. Embeddings for a transformer without an IP-Adapter (which has no projection for
    them) are refused too."""
    adapters = _ip_adapters(transformer)
    embeds = _image_embeds(cond, _JOINT_IMAGES)
    negative = _image_embeds(negative_cond, _JOINT_IMAGES)
    how = (
        f"one per adapter as {pipeline}.prepare_ip_adapter_image_embeds(image, None, device, 1) "
        "makes them"
    )
    if adapters is None:
        if embeds is not None or negative is not None:
            raise ValueError(
                "joint_attention_kwargs has ip_adapter_image_embeds, a Flux IP-Adapter's image "
                "prompt, but the transformer has no IP-Adapter loaded (no image projection "
                "for them); load one with pipe.load_ip_adapter(...), or leave them out"
            )
        return
    if embeds is None:
        raise ValueError(
            f"the transformer has {adapters} IP-Adapter(s) loaded (encoder_hid_dim_type = "
            f"{_IP_PROJECTION!r}) and takes an image prompt: pass joint_attention_kwargs="
            f"{{'ip_adapter_image_embeds': [...]}}, {how}, or unload it "
            "(pipe.unload_ip_adapter())"
        )
    for where, value in (("", embeds), ("negative_cond", negative)):
        if value is not None:
            label = "['joint_attention_kwargs']['ip_adapter_image_embeds']"
            label = f"{where}{label}" if where else "ip_adapter_image_embeds"
            _check_image_embeds(value, label, adapters, how, ndims=(3,))
    guided = guidance_scale is not None and guidance_scale != 1 and negative_cond is not None
    if guided and negative is None:
        raise ValueError(
            f"under true CFG the negative call needs image embeddings of its own, as {pipeline} "
            "gives it: put negative_cond['joint_attention_kwargs']['ip_adapter_image_embeds'] = "
            "prepare_ip_adapter_image_embeds(negative_ip_adapter_image, None, device, 1) (the "
            "pipeline's default: an all-zero image, np.zeros((width, height, 3), np.uint8), one "
            "per adapter), or the conditional list itself to give both calls the image prompt"
        )


def _check_sd3_ip_adapter(
    transformer: Any,
    cond: Mapping[str, Any],
    negative_cond: Mapping[str, Any] | None,
    guidance_scale: float | None,
) -> None:
    """Refuse, in one line and before any call, an SD3 IP-Adapter's image prompt that the
    transformer would not take as StableDiffusion3Pipeline gives it.

    A transformer with an IP-Adapter loaded (``SD3IPAdapterMixin.load_ip_adapter``: its
    ``image_proj``) takes ``joint_attention_kwargs={"ip_adapter_image_embeds": e}``, one
    floating tensor ``(batch or 1, tokens, D)`` (the image encoder's penultimate hidden
    states), which it projects at each call's timestep. Without it its attention processors
    attend to the text alone, as the pipeline runs without an image prompt, so that is
    taken. Under guidance the pipeline gives the unconditional half its own (zeros for an
    image): without them in ``negative_cond`` the adapter would double the conditional ones
    into both halves, so that is refused; so are embeddings for a transformer without an
    IP-Adapter (which has no ``image_proj`` for them)."""
    embeds = _image_embeds(cond, _JOINT_IMAGES)
    negative = _image_embeds(negative_cond, _JOINT_IMAGES)
    how = (
        "the conditional half of StableDiffusion3Pipeline.prepare_ip_adapter_image_embeds(image, "
        "None, device, 1, do_classifier_free_guidance)"
    )
    if getattr(transformer, "image_proj", None) is None:
        if embeds is not None or negative is not None:
            raise ValueError(
                "joint_attention_kwargs has ip_adapter_image_embeds, an SD3 IP-Adapter's image "
                "prompt, but the transformer has no IP-Adapter loaded (no image_proj for them); "
                "load one with pipe.load_ip_adapter(...), or leave them out"
            )
        return
    for where, value in (("", embeds), ("negative_cond", negative)):
        if value is None:
            continue
        if isinstance(value, Tensor) and value.is_floating_point() and value.ndim == 3:
            continue
        label = "['joint_attention_kwargs']['ip_adapter_image_embeds']"
        label = f"{where}{label}" if where else "ip_adapter_image_embeds"
        what = f"a {type(value).__name__}"
        if isinstance(value, Tensor):
            what = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        raise ValueError(
            f"{label} must be one floating tensor of shape (batch or 1, tokens, D), {how}; got "
            f"{what}"
        )
    guided = guidance_scale is not None and guidance_scale != 1 and negative_cond is not None
    if guided and embeds is not None and negative is None:
        raise ValueError(
            "under guidance the unconditional branch needs image embeddings of its own, as "
            "StableDiffusion3Pipeline gives it: put negative_cond['joint_attention_kwargs']"
            "['ip_adapter_image_embeds'] = the first half of prepare_ip_adapter_image_embeds("
            "..., do_classifier_free_guidance=True) (e.chunk(2)[0]; zeros for an image), or the "
            "conditional tensor itself to give both halves the image prompt"
        )
