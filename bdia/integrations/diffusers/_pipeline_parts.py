"""The parts of a diffusers pipeline that ``edit_image`` and its conditions share: a part
looked up with a clear error, the VAE's factor, and encoding to and decoding from the VAE's
latents (the mean of the latent distribution, shifted and scaled as the pipelines do; for
Qwen-Image's video VAE one frame, normalised as its pipelines do), with the float32 upcast
the SDXL pipelines apply to a half-precision VAE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

# FluxPipeline packs the latents in 2 x 2 patches, one token each.
_FLUX_PACKING = 2


def _part(pipe: Any, name: str, why: str) -> Any:
    part = getattr(pipe, name, None)
    if part is None:
        raise ValueError(
            f"the pipeline has no {name} ({type(pipe).__name__}.{name} is missing or None); "
            f"edit_image needs it {why}"
        )
    return part


def _vae_factor(pipe: Any, vae: Any) -> int:
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(factor, int) and factor > 0:
        return factor
    # Qwen-Image's video VAE halves the image once per temporal_downsample entry.
    downsample = vae.config.get("temperal_downsample")
    if downsample is not None:
        return 2 ** len(downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _latent_channels(config: Any) -> Any:
    """The VAE's latent channels: ``latent_channels``, or ``z_dim`` for Qwen-Image's (None
    where the config has neither)."""
    channels = getattr(config, "latent_channels", None)
    return getattr(config, "z_dim", None) if channels is None else channels


def _latent_stats(config: Any) -> tuple[Tensor, Tensor] | None:
    """The VAE's ``latents_mean`` and ``latents_std``, each of shape ``(latent_channels,)``;
    None unless the config sets both.

    diffusers' SDXL pipelines use them only together, built as ``torch.tensor(values)``
    (torch's default dtype, float32) and cast to the latents' dtype, as ``_per_channel`` does.
    Values that cannot be used raise a one-line ValueError; ``edit_image`` asks before any
    network runs.
    """
    values = [getattr(config, name, None) for name in ("latents_mean", "latents_std")]
    if any(v is None for v in values):
        return None
    if getattr(config, "shift_factor", None) is not None:
        raise ValueError(
            "the vae's config sets shift_factor as well as latents_mean and latents_std; "
            "diffusers' pipelines use one or the other, and edit_image does not guess which: "
            "set the one the model was not trained with to None"
        )
    channels = _latent_channels(config)
    stats = []
    for name, value in zip(("latents_mean", "latents_std"), values):
        try:
            stat = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError):
            stat = None
        if stat is None or stat.shape != (channels,) or not bool(torch.isfinite(stat).all()):
            raise ValueError(
                f"the vae's config.{name} = {value!r} is not {channels} finite numbers, one per "
                f"latent channel ({channels} latent channels)"
            )
        stats.append(stat)
    if not bool((stats[1] != 0).all()):
        raise ValueError(
            f"the vae's config.latents_std = {values[1]!r} has a zero; the encoding divides by it"
        )
    return stats[0], stats[1]


def _per_channel(stat: Tensor, like: Tensor) -> Tensor:
    """``stat`` of shape (C,) as (1, C, 1, 1) (for 5-D ``like``, (1, C, 1, 1, 1)), on
    ``like``'s device and in its dtype."""
    return stat.view(1, -1, *[1] * (like.ndim - 2)).to(like.device, like.dtype)


def _mean(vae: Any, pixels: Tensor) -> Tensor:
    """The mean of the VAE's latent distribution of ``pixels``, unscaled, in the VAE's dtype."""
    out = vae.encode(pixels.to(vae.dtype))
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.mean
    if getattr(out, "latents", None) is not None:
        return out.latents
    if isinstance(out, (tuple, list)):
        return out[0].mean
    raise TypeError(f"vae.encode returned {type(out).__name__}, with no latent distribution")


def _encode(vae: Any, pixels: Tensor, dtype: torch.dtype) -> Tensor:
    """The VAE's deterministic latents (the distribution's mean), scaled, in ``dtype``."""
    latents = _mean(vae, pixels).to(dtype)
    stats = _latent_stats(vae.config)
    if stats is not None:  # the inverse of _decode's, as the SDXL img2img pipeline encodes
        latents_mean, latents_std = (_per_channel(stat, latents) for stat in stats)
        return (latents - latents_mean) * vae.config.scaling_factor / latents_std
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def _decode(vae: Any, latents: Tensor) -> Tensor:
    """The image of ``latents`` (as ``_encode`` makes them), clamped to [-1, 1], float32."""
    stats = _latent_stats(vae.config)
    if stats is not None:  # the SDXL pipeline's formula, in the state dtype
        latents_mean, latents_std = (_per_channel(stat, latents) for stat in stats)
        z = latents * latents_std / vae.config.scaling_factor + latents_mean
    else:
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
    out = vae.decode(z.to(vae.dtype))
    image = out.sample if hasattr(out, "sample") else out[0]
    return image.float().clamp(-1.0, 1.0)


def _encode_frame(vae: Any, pixels: Tensor, dtype: torch.dtype, divide: bool = False) -> Tensor:
    """Qwen-Image's latents of ``pixels`` (B, 3, H, W): the mean of its video VAE's latent
    distribution of the one-frame video (B, 3, 1, H, W), of shape (B, C, 1, H / f, W / f) in
    ``dtype``, normalised as QwenImageImg2ImgPipeline's ``_encode_vae_image`` does, ``(z -
    latents_mean) * (1 / latents_std)``, the reciprocal taken in ``dtype``; with ``divide``
    as QwenImageEditPipeline's does, ``(z - latents_mean) / latents_std`` (the two differ in
    the last bit where the reciprocal is inexact)."""
    latents = _mean(vae, pixels.unsqueeze(2)).to(dtype)
    mean, std = _frame_stats(vae.config)
    centred = latents - _per_channel(mean, latents)
    if divide:
        return centred / _per_channel(std, latents)
    return centred * (1.0 / _per_channel(std, latents))


def _decode_frame(vae: Any, latents: Tensor) -> Tensor:
    """The image (B, 3, H, W) of Qwen-Image's latents (B, C, 1, h, w), as ``_encode_frame``
    makes them: ``latents / (1 / latents_std) + latents_mean``, as QwenImagePipeline
    decodes, in the latents' dtype; its one frame, clamped to [-1, 1], float32."""
    mean, std = _frame_stats(vae.config)
    z = latents / (1.0 / _per_channel(std, latents)) + _per_channel(mean, latents)
    out = vae.decode(z.to(vae.dtype))
    image = out.sample if hasattr(out, "sample") else out[0]
    return image[:, :, 0].float().clamp(-1.0, 1.0)


def _frame_stats(config: Any) -> tuple[Tensor, Tensor]:
    """``_latent_stats`` of Qwen-Image's VAE, whose pipelines always normalise by them: a
    one-line ValueError where the config lacks one."""
    stats = _latent_stats(config)
    if stats is None:
        raise ValueError(
            "the vae's config lacks latents_mean or latents_std, by which Qwen-Image's "
            "pipelines normalise its latents (one per latent channel, z_dim)"
        )
    return stats


@contextlib.contextmanager
def _float32_vae(vae: Any, upcast: bool, encoding: bool = False) -> Iterator[None]:
    """The VAE in float32 for the block, where ``upcast`` (an SDXL pipeline's) and its config
    says ``force_upcast``: to encode (``encoding``) a float16 or bfloat16 VAE, as the SDXL
    img2img and inpainting pipelines encode (their ``prepare_latents`` and
    ``_encode_vae_image`` upcast whatever the VAE's dtype), and to decode a float16 one
    only, as they decode (their ``needs_upcasting``). A float32 or float64 VAE runs as it is.

    SDXL's VAE overflows in float16 (NaN images), which is why the pipelines upcast. Each
    weight and buffer goes back to the dtype it had, bit for bit (float16 or bfloat16 to
    float32 and back is exact): a VAE that keeps some layers in float32 (diffusers'
    ``_keep_in_fp32_modules``, or a user's own choice) comes back as it was, not all in one
    dtype as the pipelines leave it (they cast it to the unet's after encoding).
    """
    config = getattr(vae, "config", None) or {}
    halves = (torch.float16, torch.bfloat16) if encoding else (torch.float16,)
    if not upcast or getattr(vae, "dtype", None) not in halves or not config.get("force_upcast"):
        yield
        return
    params = [(p, p.dtype) for p in vae.parameters()]
    buffers = [
        (module, name, buffer.dtype)
        for module in vae.modules()
        for name, buffer in module.named_buffers(recurse=False)
    ]
    vae.to(torch.float32)
    try:
        yield
    finally:
        for param, dtype in params:
            param.data = param.data.to(dtype)
        for module, name, dtype in buffers:
            setattr(module, name, getattr(module, name).to(dtype))
