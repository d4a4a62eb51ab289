"""Exact-inversion image editing with a latent text-to-image pipeline (Stable Diffusion, SDXL,
Stable Diffusion 3, Flux, Chroma, Flux.2, Qwen-Image, Z-Image).

``edit_image(pipe, image, source_prompt, target_prompt)`` takes a pipeline with the parts of
diffusers' ``StableDiffusionPipeline`` (``vae``, ``unet``, ``scheduler``, and ``tokenizer``
with ``text_encoder`` for text prompts), ``StableDiffusionXLPipeline`` (the same, with
``tokenizer_2`` and ``text_encoder_2``) or ``StableDiffusion3Pipeline`` (``transformer`` in
place of ``unet``, a ``FlowMatchEulerDiscreteScheduler``, both CLIP tokenizers and text
encoders, and T5 where it has one) or ``FluxPipeline`` (a ``FluxTransformer2DModel``, the
same scheduler, CLIP and T5, and the pipeline's static methods that pack the latents) or
``ChromaPipeline`` (a ``ChromaTransformer2DModel``, Flux's parts but T5 alone, and its
``_prepare_attention_mask``) or ``QwenImagePipeline`` and ``QwenImageImg2ImgPipeline`` (a
``QwenImageTransformer2DModel``, the video VAE ``AutoencoderKLQwenImage``, ``encode_prompt``
and the static methods that pack the latents) or ``Flux2Pipeline`` and
``Flux2KleinPipeline`` (a ``Flux2Transformer2DModel``, an ``AutoencoderKLFlux2`` with its
batch norm, ``encode_prompt`` and the static methods that patchify and pack the latents and
make their ids) or ``ZImagePipeline`` and ``ZImageImg2ImgPipeline`` (a
``ZImageTransformer2DModel`` on image-shaped latents, an ``AutoencoderKL`` with a
``shift_factor``, and ``encode_prompt`` for text), or the ControlNet pipelines of Stable
Diffusion and SDXL (with ``controlnet`` and ``prepare_image``, or for their img2img pipelines
``prepare_control_image``, given ``control_image``: both ODEs call the controlnet on it; an
img2img pipeline edits as its text-to-image sibling, the whole image inverted), or the
inpainting pipelines of Stable Diffusion and SDXL with a 9-channel unet (with
``mask_processor`` and ``prepare_mask_latents``, given ``mask_image``: both ODEs give the
unet the mask and the masked image's latents as extra input channels), or the
ControlNet inpainting pipelines of Stable Diffusion and SDXL, both at once (their
``prepare_control_image`` makes the control image; the controlnet gets the latents alone,
the unet all 9 channels), or
``FluxFillPipeline`` (the same as a 9-channel unet, packed, for its Fill transformer) or
``FluxControlPipeline`` (with ``prepare_image``, given ``control_image``: both ODEs give its
Depth or Canny transformer the control image's packed latents as extra input channels) or
``FluxControlNetPipeline`` (with ``controlnet`` and ``prepare_image``, given
``control_image``: both ODEs call its ``FluxControlNetModel`` on the control image's packed
latents; ``StableDiffusion3ControlNetPipeline`` likewise, its ``SD3ControlNetModel`` on the
control image's latents; ``QwenImageControlNetPipeline`` its ``QwenImageControlNetModel``
on the control image's packed latents, ``QwenImageControlNetInpaintPipeline`` its
inpainting one on the masked image's and the mask's, given ``mask_image`` too;
``FluxControlNetImg2ImgPipeline`` as its text-to-image sibling) or
``FluxKontextPipeline`` or ``QwenImageEditPipeline`` (with ``prepare_latents``: both ODEs
give the transformer the image itself as the reference image it edits), or, without a mask,
the inpainting pipelines that blend the re-noised image into the latents after each step
(``StableDiffusion3InpaintPipeline``, ``FluxInpaintPipeline``,
``FluxControlInpaintPipeline``, ``FluxControlNetInpaintPipeline``,
``FluxKontextInpaintPipeline``, ``ChromaInpaintPipeline``, ``QwenImageInpaintPipeline``,
``QwenImageEditInpaintPipeline``, ``ZImageInpaintPipeline``, and Stable Diffusion's and
SDXL's over a 4-channel unet), as the plain pipeline of their parts (a
mask is refused: the blend is no ODE step), and any of these that has ``load_ip_adapter``
(Stable Diffusion's and SDXL's; ``FluxPipeline``, ``FluxKontextPipeline``,
``FluxControlNetPipeline``, ``FluxImg2ImgPipeline``, ``FluxInpaintPipeline``,
``FluxKontextInpaintPipeline``; Chroma's ``ChromaPipeline``, ``ChromaImg2ImgPipeline`` and
``ChromaInpaintPipeline``, which load Flux's; SD3's text-to-image, img2img, inpainting and
ControlNet ones) with an IP-Adapter loaded (``pipe.load_ip_adapter``, given
``ip_adapter_image`` or ``ip_adapter_image_embeds``: both ODEs give the unet or the
transformer the pipeline's image embeddings) and:

1. encodes the image with the VAE: the mean of the latent distribution (deterministic, not a
   sample) times ``vae.config.scaling_factor`` (after subtracting ``shift_factor`` where the
   config has one); where the config sets both ``latents_mean`` and ``latents_std`` (per
   channel, as some SDXL models' VAEs do) ``(mean - latents_mean) * scaling_factor /
   latents_std``, as diffusers' SDXL pipelines encode; for SDXL in float32 when the VAE is
   float16 or bfloat16 and its config says ``force_upcast``, as the SDXL img2img and
   inpainting pipelines encode; for Flux packed into 2 x 2 patches, one token each, by the
   pipeline's ``_pack_latents``: the state of FluxPipeline's loop; for Qwen-Image the image
   as a one-frame video, its latents ``(mean - latents_mean) * (1 / latents_std)`` (no
   scaling factor), packed the same way, as QwenImageImg2ImgPipeline encodes (for
   QwenImageEditPipeline ``(mean - latents_mean) / latents_std``, as it encodes its
   reference image); for Flux.2 as its pipelines encode their reference images: patchified
   into 2 x 2 patches, ``(z - running_mean) / sqrt(running_var + eps)`` by the VAE's batch
   norm, packed; for Z-Image ``(mean - shift_factor) * scaling_factor`` in the VAE's
   dtype, then in the state dtype, as ZImageImg2ImgPipeline encodes (image-shaped, unpacked);
2. embeds the prompts with the pipeline's own ``encode_prompt`` (the negative prompt is the
   unconditional branch of classifier-free guidance); for SDXL (a unet with
   ``addition_embed_type="text_time"``) it also makes the unet's ``added_cond_kwargs``: the
   pooled embeddings of each prompt and the time ids of the image's size (original size,
   crop (0, 0), target size, as the SDXL pipeline's defaults); a unet with
   ``addition_embed_type="text"`` pools the prompt embeddings into its added embedding
   itself and is given what Stable Diffusion's is; SD3's transformer gets
   ``encoder_hidden_states`` and ``pooled_projections``, as its pipeline passes them, and
   Flux's those, ``txt_ids``, the latents' ``img_ids`` (the pipeline's
   ``_prepare_latent_image_ids``) and, for Flux.1-dev, the embedded ``guidance``; Chroma's
   the T5 embeddings, ``txt_ids``, ``img_ids`` and the ``attention_mask`` of each prompt
   over its tokens and the image's, as ChromaPipeline makes them from text; Qwen-Image's the
   embeddings, their padding mask (``encode_prompt``'s, for text and embeddings alike) and
   the pipeline's ``img_shapes``; Flux.2's the embeddings and batched ``txt_ids`` of its
   ``encode_prompt``, the latents' ``img_ids`` (its ``_prepare_latent_ids``) and, for
   FLUX.2-dev, the embedded ``guidance``; Z-Image's ``cap_feats``, a list of one embedding
   per prompt of its own length, as ``encode_prompt`` returns them, and its CFG (``c + g (c
   - u)`` for ``guidance_scale > 0``) with ``cfg_normalization`` and ``cfg_truncation``;
3. builds the source and target ODEs with ``from_diffusers`` on the scheduler's noise table
   (for SD3 the rectified flow of its sigmas) and the grid with ``diffusers_grid``, taking
   the encoded latents as the state at the grid's last point; where the scheduler's grid
   ends at sigma = 0 (DDIM's ``set_alpha_to_one=True``, ``final_sigmas_type="zero"``,
   Euler), that point becomes the table's smallest noise level instead, ``alphas_cumprod[0]``
   (``t = 1/N`` in VP space, its ``sigma_bar`` in EDM space), where the model can be
   evaluated; a flow-matching grid, which always ends at 0, keeps it: a flow transformer
   can be evaluated at sigma = 0, so the latents are the state at t = 0 and the inversion's
   first step evaluates the transformer at timestep 0, which the pipelines never do (with
   dynamic shifting, the grid follows the pipeline's ``mu`` for the image's size); Flux's
   grid is made from FluxPipeline's sigmas ``np.linspace(1, 1/n, n)`` and ends the same way,
   Z-Image's from ZImagePipeline's ``torch.linspace(1, 1/n, n)`` likewise (in diffusers
   0.36 to 0.38, where the pipeline sets the scheduler's ``sigma_min`` to 0 and takes its
   own spacing, from that: ``n - 1`` steps to 0, the pipeline's last step, from 0 to 0,
   left out);
   an EDM-preconditioned scheduler's (Playground v2.5's ``EDMDPMSolverMultistepScheduler``
   or ``EDMEulerScheduler``, no table either) ends at its last positive sigma,
   ``sigma_min``, without the final step to 0, where its denoiser cannot be evaluated;
4. inverts the latents under the source ODE with BDIA (``bdia.Inversion.of``), reconstructs
   them (exact up to rounding) and regenerates them under the target ODE by an edit rule of
   ``bdia.editing`` (by default ``"base"``: the base solver from the inverted noise);
5. decodes both with the VAE, undoing step 1's map (``latents * latents_std /
   scaling_factor + latents_mean`` with the statistics, as the SDXL pipeline decodes;
   ``latents / scaling_factor + shift_factor`` with a shift, as the SD3 and Flux pipelines
   decode, Flux's after ``_unpack_latents``; Qwen-Image's after it by ``latents / (1 /
   latents_std) + latents_mean``, the decoded video's one frame, as QwenImagePipeline
   decodes; Flux.2's by ``_unpack_latents_with_ids``, the batch norm's inverse and
   ``_unpatchify_latents``, as its pipelines decode; Z-Image's cast to the VAE's dtype
   first, as ZImagePipeline decodes);
   for SDXL in float32 when the VAE is float16 (not bfloat16) and its config says
   ``force_upcast``, as the SDXL pipelines decode.

Two errors are reported apart: the network's (UNet's or transformer's) round trip in latent
space (reconstructed latents against encoded latents: exact up to rounding) and the VAE's
own error (decode(encode(image)) against the image), so that any imperfection of the
reconstructed image is seen to come from the VAE, not from the inversion.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...editing import EDIT_RULES, Inversion
from ...ode import DiffusionODE, wide_dtype
from ...sampling import _state_dtype
from ...schedules import check_steps
from ...solvers.base import Solver
from ...solvers.bidirectional import BidirectionalWrapper
from ...solvers.registry import bdia, get_solver
from ._conditioning import _check_rescale_value, _flux2_embeds_guidance, _qwen_needs_lengths
from ._edit_conditions import (
    _check_embeds_batch,
    _chroma_probe_cond,
    _control_kwargs,
    _control_probe_cond,
    _fill_kwargs,
    _flux_control_image,
    _flux_control_latents,
    _flux_image_probe_cond,
    _flux_image_prompt,
    _flux_probe_cond,
    _inpaint_kwargs,
    _kontext_kwargs,
    _mask_condition,
    _qwen_control_latents,
    _qwen_edit_reference,
    _qwen_probe_cond,
    _sd3_control_latents,
    _with_image_prompt,
    _z_image_control_latents,
)
from ._edit_network import (
    _FLUX2_KV,
    _check_network,
    _check_reference_image,
    _Network,
    _network,
    _pipeline_class,
    _z_image_options,
)
from ._edit_prompts import (
    _check_base_time_ids,
    _check_prompts,
    _check_text_parts,
    _embed,
    _embed_pair,
    _embed_pixart,
    _xl_cond,
    _zero_negative,
)
from ._flow_controlnet import _Z_INPAINT_PIPELINE, _qwen_inpainting, _sd3_inpainting
from ._flux2_edit import (
    _embed_flux2,
    _flux2_decode,
    _flux2_encode,
    _flux2_kv_kwargs,
    _flux2_mu,
    _flux2_probe_cond,
    _flux2_reference_kwargs,
    _flux2_reference_pixels,
)
from ._flux_edit import _embed_chroma, _embed_flux
from ._pipeline_parts import (
    _FLUX_PACKING,
    _decode,
    _encode,
    _float32_vae,
    _part,
    _vae_factor,
)
from ._qwen_edit import _embed_qwen, _qwen_decode, _qwen_encode, _qwen_img_shapes
from ._scheduler_config import _SIGMA_SLACK
from ._z_image import _z_image_grid_inputs
from ._z_image_edit import (
    _check_z_image_inpainting,
    _embed_z_image,
    _z_image_decode,
    _z_image_encode,
)
from .adapter import DiffusersModel, from_diffusers
from .grid import diffusers_grid

__all__ = ["edit_image", "EditResult"]

_OUTPUT_TYPES = ("pil", "pt")
# ZImagePipeline's default guidance_scale: its CFG c + g (c - u), on for g > 0, with the
# negative prompt "" (Z-Image-Turbo runs with 0, no CFG).
_Z_IMAGE_GUIDANCE = 5.0
# StableDiffusion3Pipeline's mu of dynamic shifting: its scheduler config's fields, with the
# pipeline's own defaults where the config lacks one (its max_shift, 1.16, is not the
# scheduler's 1.15).
_SHIFT_FIELDS = (
    ("base_image_seq_len", 256),
    ("max_image_seq_len", 4096),
    ("base_shift", 0.5),
    ("max_shift", 1.16),
)
# FluxPipeline's: its calculate_shift's defaults (max_shift 1.15).
_FLUX_SHIFT_FIELDS = _SHIFT_FIELDS[:3] + (("max_shift", 1.15),)
# FluxPipeline's default guidance_scale: Flux.1-dev's embedded guidance.
_FLUX_GUIDANCE = 3.5
# Flux2Pipeline's default guidance_scale, FLUX.2-dev's embedded guidance, and
# Flux2KleinPipeline's, its true CFG (off where its config says is_distilled).
_FLUX2_GUIDANCE = 4.0
# ChromaPipeline's default guidance_scale: true CFG, with the negative prompt "".
_CHROMA_GUIDANCE = 5.0
# PixArtSigmaPipeline's and PixArtAlphaPipeline's default guidance_scale, with the negative
# prompt "".
_PIXART_GUIDANCE = 4.5


@dataclass(frozen=True)
class EditResult:
    """What ``edit_image`` returns.

    Attributes:
        images: the edit, decoded: a list of PIL images (``output_type="pil"``) or a tensor of
            shape ``(batch, 3, H, W)`` in [-1, 1] (``output_type="pt"``).
        reconstruction: the reconstructed latents decoded, of the same kind.
        inversion: the ``bdia.Inversion`` of the latents under the source ODE (its ``ode``,
            ``solver``, grid ``ts`` and ``pair``; ``inversion.noise`` is the inverted noise).
        target: the target ODE (the same unet or transformer under the target prompt), e.g. for
            ``inversion.regenerate(target, rule="restart")``.
        latents: the encoded latents, the state at ``inversion.ts[-1]``, shape
            ``(batch, C, H / f, W / f)`` in the state dtype; for Flux packed as FluxPipeline's
            loop carries them, ``(batch, H / 2f x W / 2f, 4 C)``.
        reconstructed_latents: ``inversion.reconstruct()``, same shape and dtype.
        edited_latents: ``inversion.regenerate(target, rule=rule)``, same shape and dtype.
        latent_error: the UNet's (SD3, Flux: the transformer's) round trip, ``max
            |reconstructed_latents - latents| / max |latents|``: rounding only (below 1e-12
            with a float64 state).
        vae_error: the VAE's own error, the root mean square of ``decode(latents) - image``
            over all pixels, in the [-1, 1] range of the pixels (the PSNR of [0, 1] images
            is ``20 log10(2 / vae_error)`` dB).
        reconstruction_error: the same for ``decode(reconstructed_latents) - image``; equal to
            ``vae_error`` up to the latents' rounding, since the latent round trip is exact.
    """

    images: Any
    reconstruction: Any
    inversion: Inversion
    target: DiffusionODE
    latents: Tensor
    reconstructed_latents: Tensor
    edited_latents: Tensor
    latent_error: float
    vae_error: float
    reconstruction_error: float


# ------------------------------------------------------------------------ checks


def _image_tensor(image: Any, channels: int) -> tuple[Tensor, str]:
    """The image as a float tensor of shape (B, C, H, W) in [-1, 1], and its kind."""
    from PIL import Image

    images = image if isinstance(image, (list, tuple)) else [image]
    if not images or (isinstance(image, Tensor) and image.ndim > 0 and image.shape[0] == 0):
        raise ValueError("image holds no images (an empty list or batch); give at least one")
    if all(isinstance(im, Image.Image) for im in images):
        for i, im in enumerate(images):
            if im.mode != "RGB":
                where = "" if len(images) == 1 else f"[{i}]"
                raise ValueError(
                    f"image{where} has mode {im.mode!r}; edit_image takes RGB images: pass "
                    "image.convert('RGB')"
                )
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise ValueError(f"the images differ in size: {sorted(sizes)}; give one size")
        array = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0, "pil"
    if not isinstance(image, Tensor):
        raise TypeError(
            "image must be a PIL image, a list of PIL images or a tensor of shape "
            f"(batch, 3, H, W) in [-1, 1], got {type(image).__name__}"
        )
    if image.ndim != 4 or image.shape[1] != channels:
        hint = " (add the batch dimension: image[None])" if image.ndim == 3 else ""
        raise ValueError(
            f"image as a tensor must have shape (batch, {channels}, H, W), got "
            f"{tuple(image.shape)}{hint}"
        )
    if not image.is_floating_point():
        raise TypeError(f"image as a tensor must be floating point in [-1, 1], got {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or Inf")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.0 or hi > 1.0:
        raise ValueError(
            f"image values lie in [{lo:.4g}, {hi:.4g}]; a tensor image must lie in [-1, 1] "
            "(from [0, 1]: image * 2 - 1; from [0, 255]: image / 127.5 - 1)"
        )
    return image, "pt"


def _reference_pixels(
    reference_image: Any, channels: int, sizes: _Sizes, batch: int
) -> list[Tensor]:
    """QwenImageEditPlusPipeline's further reference images, as ``edit_image`` takes them:
    each a float tensor of shape (1 or ``batch``, C, H', W') in [-1, 1] (``_image_tensor``'s
    of one PIL image or tensor), H' and W' multiples of the packing's factor; [] for None."""
    if reference_image is None:
        return []
    items = reference_image if isinstance(reference_image, (list, tuple)) else [reference_image]
    references = []
    for i, item in enumerate(items):
        try:
            pixels, _ = _image_tensor(item, channels)
        except (TypeError, ValueError) as error:  # named as the argument, in one line
            raise type(error)(f"reference_image[{i}]: {error}") from None
        count, _, height, width = pixels.shape
        if count not in (1, batch):
            raise ValueError(
                f"reference_image[{i}] holds {count} images; give one (shared by the batch) "
                f"or one per edited image ({batch})"
            )
        if height % sizes.factor or width % sizes.factor:
            raise ValueError(
                f"reference_image[{i}] is {width} x {height} (W x H), not a multiple of "
                f"{sizes.what}; resize it (QwenImageEditPlusPipeline resizes its references "
                "to about 1024 x 1024 pixels, multiples of 32)"
            )
        references.append(pixels)
    return references


@dataclass(frozen=True)
class _Sizes:
    """The image sizes a pipeline takes: height and width are multiples of ``factor`` (``what``
    says it in words), and, where ``patches`` is set, at most ``patches * factor``.

    Attributes:
        vae_factor: the VAE's downsampling factor (8 for Stable Diffusion, SDXL, SD3, Flux,
            Qwen-Image, Z-Image).
        patch: the side of the latents' patches, SD3's transformer ``patch_size``, Flux's
            and Qwen-Image's packing or Z-Image's patches (2); None for a unet.
        factor: ``vae_factor`` times ``patch``.
        what: the factor and where it comes from, to end "not a multiple of ...".
        patches: SD3's ``pos_embed_max_size``, the most patches a side its transformer embeds.
    """

    vae_factor: int
    patch: int | None
    factor: int
    what: str
    patches: int | None = None


def _image_sizes(pipe: Any, vae: Any, unet_config: Mapping[str, Any], kind: str) -> _Sizes:
    """The sizes ``edit_image`` takes with ``pipe``, its ``vae`` and its network of ``kind``
    (``_network``'s) and config ``unet_config``."""
    vae_factor = _vae_factor(pipe, vae)
    factor, what = vae_factor, f"the vae's downsampling factor {vae_factor}"
    patch = unet_config.get("patch_size") if kind in ("sd3", "pixart") else None
    if not isinstance(patch, int):
        patch = None
    else:  # SD3 and PixArt take their latents in patch x patch patches
        factor *= patch
        what = f"{factor}, {what} times the transformer's patch_size {patch}"
    if kind in ("flux", "qwen", "flux2"):
        # FluxPipeline and QwenImagePipeline pack them in 2 x 2 patches (Flux's transformer's
        # patch_size is 1; Qwen-Image's patch_size 2 is that packing), and Flux.2's pipelines
        # patchify them so before packing.
        patch = _FLUX_PACKING
        factor *= patch
        owner = {"flux": "FluxPipeline", "qwen": "QwenImagePipeline"}.get(kind, "Flux2Pipeline")
        what = f"{factor}, {what} times {patch}, {owner}'s packing of the latents"
    elif kind == "zimage":
        # ZImagePipeline keeps its latents image-shaped but takes sizes of vae_scale_factor
        # times 2, its transformer's 2 x 2 patches.
        patch = _FLUX_PACKING
        factor *= patch
        what = f"{factor}, {what} times {patch}, as ZImagePipeline takes them"
    patches = unet_config.get("pos_embed_max_size") if kind == "sd3" else None
    return _Sizes(vae_factor, patch, factor, what, patches if isinstance(patches, int) else None)


def _device(pipe: Any, unet: Any) -> torch.device:
    try:
        return torch.device(pipe._execution_device)
    except Exception:  # not a DiffusionPipeline: the unet's device
        return next(unet.parameters()).device


def _solver(solver: Any, gamma: float | None) -> BidirectionalWrapper:
    if isinstance(solver, BidirectionalWrapper):
        if gamma is not None:
            raise ValueError(
                "gamma was given with a BDIA solver that has its own; pass the base solver "
                "(e.g. 'ddim') with gamma, or the BDIA solver alone"
            )
        return solver
    if isinstance(solver, str):
        if solver.startswith("bdia-"):
            raise ValueError(
                f"solver = {solver!r}: give the base solver's name ({solver[5:]!r}); edit_image "
                "wraps it with BDIA at gamma"
            )
        try:
            solver = get_solver(solver)
        except KeyError as err:  # get_solver's message, without KeyError's quotes
            raise ValueError(f"solver: {err.args[0]}") from None
    if not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be a solver name, a Solver or a BDIA solver, got {type(solver).__name__}"
        )
    return bdia(solver, 0.96 if gamma is None else gamma)


def _grid(
    scheduler: Any, steps: int, probe: DiffusionODE, mu: float | None, sigmas: Any = None
) -> Tensor:
    """diffusers' grid, ending at the table's smallest noise level instead of sigma = 0; a
    flow-matching one (no table) as it is, at 0; an EDM-preconditioned one (no table either)
    at its last positive sigma, its sigma_min. ``sigmas``: a pipeline's own (FluxPipeline's),
    as ``diffusers_grid`` takes them."""
    ts = diffusers_grid(scheduler, steps, mu=mu, sigmas=sigmas)
    if not probe.is_terminal(float(ts[-1])):
        # A flow transformer is evaluated at sigma = 0: the grid keeps the pipeline's final 0.
        return ts
    assert isinstance(probe.f, DiffusersModel)  # from_diffusers built the probe
    if probe.f.space != "flow" and probe.f.sigma_data is None:
        table = torch.as_tensor(scheduler.alphas_cumprod).to("cpu", torch.float64)
        a0 = float(table[0])
        end = 1.0 / table.numel() if probe.f.space == "vp" else math.sqrt((1.0 - a0) / a0)
        # diffusers keeps its sigmas in float32: a last timestep 0 may sit a rounding above
        # the float64 end, and is that point all the same.
        if float(ts[-2]) > end * (1.0 + _SIGMA_SLACK):
            return torch.cat([ts[:-1], torch.tensor([end], dtype=torch.float64)])
    if ts.numel() < 3:
        raise ValueError(
            f"num_inference_steps = {steps} leaves no step above the grid's smallest noise "
            "level, where the data are taken; use more steps"
        )
    # The last timestep is already the table's smallest noise level.
    return ts[:-1]


def _pipeline_mu(
    config: Mapping[str, Any],
    latent_size: tuple[int, int],
    patch: int,
    fields: tuple[tuple[str, float], ...] = _SHIFT_FIELDS,
) -> float:
    """The mu of dynamic shifting that ``StableDiffusion3Pipeline`` (``fields``: the config's
    fields with its defaults) or ``FluxPipeline`` (``_FLUX_SHIFT_FIELDS``, ``patch`` 2, its
    packing) computes for latents of ``latent_size`` (H, W) in ``patch`` x ``patch`` patches:
    linear in their number, from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at
    ``max_image_seq_len``, in the pipelines' order of operations (both
    ``calculate_shift``'s, so that the sigmas come out as their own)."""
    base_len, max_len, base_shift, max_shift = (config.get(k, v) for k, v in fields)
    tokens = (latent_size[0] // patch) * (latent_size[1] // patch)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + (base_shift - slope * base_len)


def _check_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_guidance(
    pipe: Any,
    net: _Network,
    guidance_scale: float | None,
    guidance: float | None,
    negative_prompt: Any,
) -> tuple[float, float | None, bool]:
    """``guidance_scale`` (the family's pipeline's default where None) and the embedded
    ``guidance`` (FLUX.1-dev's or FLUX.2-dev's default where None; None where the network
    embeds none), checked, and whether classifier-free guidance is on (a negative prompt
    given for it)."""
    unet_config, chroma, model = net.config, net.chroma, net.model
    flux, qwen, flux2 = net.kind == "flux", net.kind == "qwen", net.kind == "flux2"
    zimage = net.kind == "zimage"
    # Flux runs without classifier-free guidance by default (FluxPipeline's true_cfg_scale
    # is 1): Flux.1-dev embeds its guidance instead, and schnell needs none. So does
    # QwenImagePipeline: its true_cfg_scale (4) acts only with a negative prompt, None by
    # default. FLUX.2-dev embeds its guidance too; Flux2KleinPipeline's guidance_scale is
    # true CFG (4), unless its config says is_distilled.
    guidance_embeds = (flux and bool(unet_config.get("guidance_embeds", False))) or (
        flux2 and _flux2_embeds_guidance(unet_config)
    )
    klein = flux2 and not guidance_embeds
    if guidance_scale is None:
        distilled = isinstance(getattr(pipe, "config", None), Mapping) and bool(
            pipe.config.get("is_distilled", False)
        )
        guidance_scale = _CHROMA_GUIDANCE if chroma else 1.0 if flux or qwen or flux2 else 7.5
        if klein and not distilled:
            guidance_scale = _FLUX2_GUIDANCE
        if zimage:
            guidance_scale = _Z_IMAGE_GUIDANCE
        if net.kind == "pixart":
            guidance_scale = _PIXART_GUIDANCE
        if net.pipeline == _FLUX2_KV:
            guidance_scale = 1.0
    _check_number(guidance_scale, "guidance_scale")
    if net.pipeline == _FLUX2_KV and guidance_scale != 1:
        raise ValueError(
            f"guidance_scale = {guidance_scale}: {_FLUX2_KV} runs no classifier-free guidance "
            "(one transformer call a step, no negative prompt); leave it out"
        )
    if zimage and guidance_scale < 0:
        raise ValueError(
            f"guidance_scale = {guidance_scale}: ZImagePipeline's CFG, c + g (c - u), runs for "
            "a scale above 0 and not at 0 (Z-Image-Turbo's); give 0 for no CFG"
        )
    if guidance is not None and not guidance_embeds:
        if klein:
            raise ValueError(
                "the transformer has guidance_embeds = False (FLUX.2-klein's) and embeds no "
                "guidance scale; leave guidance out (Flux2KleinPipeline's guidance_scale is "
                f"true CFG, edit_image's guidance_scale, {_FLUX2_GUIDANCE:g} by default, with "
                "negative_prompt)"
            )
        if chroma:
            raise ValueError(
                "Chroma's transformer embeds no guidance scale; ChromaPipeline's guidance_scale "
                f"is true CFG, edit_image's guidance_scale ({_CHROMA_GUIDANCE:g} by default, with "
                "negative_prompt): leave guidance out"
            )
        if flux:
            raise ValueError(
                "the transformer has guidance_embeds = False (a timestep-distilled model such "
                "as Flux.1-schnell) and embeds no guidance scale; leave guidance out (true "
                "classifier-free guidance is guidance_scale with negative_prompt)"
            )
        raise ValueError(
            f"guidance is the guidance scale Flux.1-dev's transformer embeds; the {model} "
            "embeds none: leave it out (classifier-free guidance is guidance_scale)"
        )
    if guidance_embeds:
        guidance = (_FLUX2_GUIDANCE if flux2 else _FLUX_GUIDANCE) if guidance is None else guidance
        _check_number(guidance, "guidance")
    # ZImagePipeline's CFG is off at 0, the others' at 1.
    unguided = 0 if zimage else 1
    if guidance_scale < unguided:
        # The pipelines run none below 1 (do_classifier_free_guidance is guidance_scale > 1),
        # where u + g (c - u) would move towards the unconditional prediction: at SD-Turbo's
        # 0.0 the prompts would not count at all.
        raise ValueError(
            f"guidance_scale = {guidance_scale}: {type(pipe).__name__} runs classifier-free "
            "guidance for a scale above 1 and none at or below 1 (SD-Turbo's and SDXL-Turbo's "
            "0.0 is a run without it), where u + g (c - u) would lean towards the "
            "unconditional branch, which no pipeline runs; give guidance_scale=1 for none"
        )
    guided = guidance_scale != unguided
    if guided and negative_prompt is None:
        raise ValueError(
            f"guidance_scale = {guidance_scale} needs the unconditional branch: give "
            "negative_prompt (a string, '' for the usual one, or its embeddings), or "
            f"guidance_scale={unguided}"
        )
    return guidance_scale, guidance, guided


def _check_edit_rescale(net: _Network, guidance_rescale: Any, guided: bool) -> None:
    """A ``guidance_rescale`` a number in [0, 1]; other than 0 only under guidance and for a
    unet's pipelines (StableDiffusionPipeline's and the SDXL pipelines' parameter): the
    other families' pipelines have none."""
    if guidance_rescale is None:
        return
    _check_rescale_value(guidance_rescale)
    if guidance_rescale == 0:
        return
    if not guided:
        raise ValueError(
            f"guidance_rescale = {guidance_rescale} rescales classifier-free guidance, which "
            "is off: give a guidance_scale above 1 with negative_prompt, or leave it out"
        )
    if net.kind != "unet":
        raise ValueError(
            f"guidance_rescale is StableDiffusionPipeline's and the SDXL pipelines' parameter; "
            f"the {type(net.unet).__name__}'s pipelines have none: leave it out"
        )


def _check_options(
    rule: str,
    state_dtype: torch.dtype | str | None,
    solver: Any,
    gamma: float | None,
    kind: str,
    output_type: str | None,
    device: torch.device,
) -> tuple[torch.dtype, BidirectionalWrapper]:
    """The edit rule and output type checked; the state dtype (by default float64, float32
    on a device without float64) and the BDIA solver (by default over DDIM for the networks
    of a noise table, a unet or PixArt's transformer, and Euler for a flow transformer)."""
    if rule not in EDIT_RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, EDIT_RULES))}, got {rule!r}")
    widest = wide_dtype(device)
    dtype = _state_dtype(state_dtype) if state_dtype is not None else widest
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state_dtype must be torch.float32 or torch.float64, got {dtype}")
    if dtype.itemsize > widest.itemsize:
        raise ValueError(
            f"state_dtype={dtype}: the pipeline runs on {device}, which has no {dtype}; use "
            f"state_dtype={widest} (the default there) or run the pipeline on the CPU"
        )
    # Euler in flow matching: the same step as DDIM there, in the scheduler's own arithmetic.
    noise_table = kind in ("unet", "pixart")
    wrapped = _solver(("ddim" if noise_table else "euler") if solver is None else solver, gamma)
    if output_type is not None and output_type not in _OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    return dtype, wrapped


def _check_image(pipe: Any, vae: Any, net: _Network, image: Any) -> tuple[Tensor, str, _Sizes]:
    """The image as ``_image_tensor`` makes it, and its kind, refused where its size is not
    one the network takes; and the sizes it takes."""
    sizes = _image_sizes(pipe, vae, net.config, net.kind)
    factor = sizes.factor
    pixels, kind = _image_tensor(image, vae.config.get("in_channels", 3))
    _, _, height, width = pixels.shape
    if height % factor or width % factor:
        raise ValueError(
            f"the image is {width} x {height} (W x H), not a multiple of {sizes.what}; resize or "
            f"crop it to, e.g., {width // factor * factor or factor} x "
            f"{height // factor * factor or factor}"
        )
    if sizes.patches is not None and max(height, width) > sizes.patches * factor:
        # The transformer would refuse it only after the VAE has run.
        raise ValueError(
            f"the image is {width} x {height} (W x H), more than the {sizes.patches} patches a "
            f"side that the transformer embeds (pos_embed_max_size = {sizes.patches}); resize "
            f"it to at most {sizes.patches * factor} a side"
        )
    return pixels, kind, sizes


def _check_image_prompt_batch(
    net: _Network, ip_adapter_image_embeds: Any, guided: bool, batch: int
) -> None:
    """An embedded image prompt's batch is 1 or the image's (both halves under guidance)."""
    adapters, sd3_image = net.adapters, net.sd3_image
    if adapters is not None and ip_adapter_image_embeds is not None:
        _check_embeds_batch(ip_adapter_image_embeds, guided, batch)
    elif sd3_image and isinstance(ip_adapter_image_embeds, Tensor):  # SD3's one tensor
        _check_embeds_batch([ip_adapter_image_embeds], guided, batch)


def _image_conditions(
    pipe: Any,
    net: _Network,
    shape: torch.Size,
    control_image: Any,
    mask_image: Any,
    control_settings: Mapping[str, Any],
    num_inference_steps: int,
    device: torch.device,
) -> tuple[Any, dict[str, Any], Tensor | None, bool]:
    """The conditions on images that both ODEs take, checked for an image batch of
    ``shape``: the mask's (``_mask_condition``'s), the controlnet's arguments
    (``_control_kwargs``'), the control image's pixels where its latents come once the VAE
    may run (a Flux Depth or Canny transformer's, or a Flux, SD3, Qwen-Image or Z-Image
    controlnet's, whose ``controlnet_cond`` is taken out of the arguments), and whether the
    mask goes to an inpainting controlnet (SD3's, Qwen-Image's or Z-Image's)."""
    unet_config, model, inpaint, chroma = net.config, net.model, net.inpaint, net.chroma
    fill, flux_control, fill_channels = net.fill, net.flux_control, net.fill_channels
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    zimage = net.kind == "zimage"
    control_pixels = None
    if flux_control:
        if control_image is None:
            raise ValueError(
                f"the pipeline's transformer is a Depth or Canny one (in_channels = "
                f"{unet_config.get('in_channels')}: the packed latents and a control image's); "
                "give control_image, the depth map or edge image that guides it, as "
                "FluxControlPipeline's control_image"
            )
        control_pixels = _flux_control_image(
            pipe, control_image, shape, device, "FluxControlPipeline"
        )
    channels = f"{model} takes in_channels = {unet_config.get('in_channels')}"
    if flux2:
        channels += ", the packed latents alone"
    elif not (flux or inpaint):
        channels += ", the vae's latents alone"
    if flux_control:
        channels += f", the packed latents and a control image's (a Fill one takes {fill_channels})"
    elif chroma:  # Chroma has no Fill transformer to point to
        channels += ", the packed latents alone"
    elif flux and not fill:
        channels += f", the packed latents alone (a Fill transformer takes {fill_channels})"
    if fill and mask_image is None:
        raise ValueError(
            f"the pipeline's transformer is a Fill one (in_channels = {fill_channels}: the "
            "packed latents, the masked image's and the mask); give mask_image, white (1) "
            "where the edit may repaint, as FluxFillPipeline's mask_image"
        )
    # SD3's and Qwen-Image's inpainting controlnets take the mask and the masked image in
    # their control latents, and so does Z-Image's in its ControlNet inpainting pipeline.
    controlnet = getattr(pipe, "controlnet", None)
    mask_control = (sd3 and _sd3_inpainting(controlnet)) or (qwen and _qwen_inpainting(controlnet))
    if zimage and net.pipeline == _Z_INPAINT_PIPELINE:  # by the pipeline, not the controlnet
        _check_z_image_inpainting(controlnet, unet_config, mask_image)
        mask_control = True
    if mask_control and mask_image is None:
        field = "extra_condition_channels = 4" if qwen else "extra_conditioning_channels = 1"
        raise ValueError(
            f"the pipeline's controlnet takes a mask ({field}, the inpainting kind); give "
            "mask_image, white (1) where the edit may "
            "repaint (the pipeline's control_mask), and control_image, the image kept outside "
            "it (as a rule the image itself)"
        )
    condition = _mask_condition(
        pipe, mask_image, inpaint or fill or mask_control, channels, shape, mask_control
    )
    # A Flux Depth or Canny transformer's control image is no controlnet's.
    control = _control_kwargs(
        pipe,
        model,
        None if flux_control else control_image,
        control_settings,
        num_inference_steps,
        shape,
        device,
        inpaint,
    )
    if control and (flux or sd3 or qwen or zimage):  # the latents come once the VAE may run
        control_pixels = control.pop("controlnet_cond")
    return condition, control, control_pixels, mask_control


def _pixart_size_cond(
    net: _Network,
    size: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """PixArt-alpha's micro-conditions of an image of ``size`` (H, W) pixels, as
    PixArtAlphaPipeline makes them for its transformers that take them
    (``use_additional_conditions``): ``added_cond_kwargs`` of the resolution ``[[H, W]]``
    and the aspect ratio ``[[H / W]]``; nothing for the others (``from_diffusers`` gives
    them PixArtSigmaPipeline's sizes of None)."""
    if not getattr(net.unet, "use_additional_conditions", False):
        return {}
    height, width = size
    resolution = torch.tensor([[height, width]], dtype=dtype, device=device)
    aspect_ratio = torch.tensor([[height / width]], dtype=dtype, device=device)
    return {"added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect_ratio}}


def _probe_cond(
    net: _Network,
    guidance: float | None,
    z_options: Mapping[str, Any],
    control: Mapping[str, Any],
    latent_size: tuple[int, int],
    img_shapes: list[list[tuple[int, int, int]]],
    lengths: bool,
    references: list[Tensor],
    image_given: bool,
) -> dict[str, Any]:
    """The network's arguments as ``from_diffusers`` checks them before any network runs:
    stand-ins of the prompts', the image conditions' and the image prompt's."""
    unet_config, chroma, xl, inpaint = net.config, net.chroma, net.xl, net.inpaint
    latent = net.latent
    fill, kontext, flux_control, qwen_edit = net.fill, net.kontext, net.flux_control, net.qwen_edit
    adapters, sd3_image = net.adapters, net.sd3_image
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    zimage = net.kind == "zimage"
    probe_cond = _flux_probe_cond(unet_config, guidance) if flux else {}
    if chroma:
        probe_cond = _chroma_probe_cond(unet_config)
    if flux2:
        probe_cond = _flux2_probe_cond(unet_config, guidance)
    if qwen:
        probe_cond = _qwen_probe_cond(unet_config, img_shapes, lengths)
    if net.kind == "pixart":  # stand-in sizes, where it takes them (refused without)
        probe_cond = _pixart_size_cond(net, (1, 1), torch.float32)
    if zimage:  # a stand-in prompt of one token; the CFG options checked as given
        dim = unet_config.get("cap_feat_dim")
        probe_cond = {"cap_feats": [torch.zeros(1, dim if isinstance(dim, int) else 1)]}
        probe_cond.update(z_options)
    if control and zimage:  # one frame of the controlnet's channels
        channels = control["controlnet"].config.get("control_in_dim")
        probe_cond["controlnet_cond"] = torch.zeros(1, channels, 1, 1, 1)
    elif control and (flux or sd3 or qwen):  # the control latents come once the VAE may run
        config = control["controlnet"].config
        # Qwen-Image's inpainting controlnet takes the packed mask too.
        extra = config.get("extra_condition_channels", 0) if qwen else 0
        probe_cond["controlnet_cond"] = torch.zeros(1, 1, unet_config["in_channels"] + extra)
        if sd3:  # latents of the controlnet's channels
            channels = config.get("in_channels", 16) + config.get("extra_conditioning_channels", 0)
            probe_cond["controlnet_cond"] = torch.zeros(1, channels, 1, 1)
    elif control:
        probe_cond = _control_probe_cond(xl)
    if inpaint:  # stand-ins of the latents' size, for from_diffusers' checks
        probe_cond["mask"] = torch.zeros(1, 1, *latent_size)
        probe_cond["masked_image_latents"] = torch.zeros(1, latent, *latent_size)
    if fill or kontext or flux_control or qwen_edit:
        layout = "fill" if fill else "control" if flux_control else "kontext"
        probe_cond.update(_flux_image_probe_cond(unet_config, latent_size, layout))
    if references and qwen:  # the stand-in holds every reference's tokens
        tokens = sum(f * h * w for f, h, w in img_shapes[0][1:])
        probe_cond["image_latents"] = torch.zeros(1, tokens, unet_config["in_channels"])
    if adapters is not None:  # stand-ins of the image prompt, one per adapter
        probe_cond = _with_image_prompt(probe_cond, [torch.zeros(1, 1, 1)] * adapters, flux)
    elif sd3_image and image_given:
        probe_cond = _with_image_prompt(probe_cond, torch.zeros(1, 1, 1), True)
    return probe_cond


def _edit_grid(
    scheduler: Any,
    net: _Network,
    num_inference_steps: int,
    probe: DiffusionODE,
    mu: float | None,
    latent_size: tuple[int, int],
    patch: int | None,
) -> Tensor:
    """The grid of the family's pipeline: its scheduler's, shifted by its ``mu`` for the
    image's size where the scheduler shifts dynamically (and ``mu`` is not given), on the
    pipeline's own sigmas where it sets them (Flux's, Qwen-Image's, Flux.2's, Z-Image's)."""
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    zimage = net.kind == "zimage"
    rows, cols = (n // _FLUX_PACKING for n in latent_size)
    if (
        (sd3 or flux or qwen or zimage)
        and mu is None
        and scheduler.config.get("use_dynamic_shifting")
    ):
        # QwenImagePipeline's and ZImagePipeline's calculate_shift and defaults are
        # FluxPipeline's.
        fields = _SHIFT_FIELDS if sd3 else _FLUX_SHIFT_FIELDS
        mu = _pipeline_mu(scheduler.config, latent_size, patch or 1, fields)
    if flux2 and mu is None and scheduler.config.get("use_dynamic_shifting"):
        mu = _flux2_mu(rows * cols, check_steps(num_inference_steps, "num_inference_steps"))
    sigmas: Any = None
    if flux or qwen or flux2:  # FluxPipeline's (QwenImagePipeline's) own sigmas, shifted
        steps = check_steps(num_inference_steps, "num_inference_steps")
        sigmas = np.linspace(1.0, 1 / steps, steps)
    grid_scheduler = scheduler
    if zimage:  # the installed ZImagePipeline's: its own sigmas, or the scheduler's to 0
        steps = check_steps(num_inference_steps, "num_inference_steps")
        grid_scheduler, sigmas = _z_image_grid_inputs(scheduler, steps)
    return _grid(grid_scheduler, num_inference_steps, probe, mu, sigmas)


# ------------------------------------------------------------------- the parts


def _embed_prompt(
    pipe: Any,
    prompt: Any,
    net: _Network,
    device: torch.device,
    embed_dtype: torch.dtype | None,
    time_ids: Tensor,
    image_tokens: int,
    lengths: bool,
) -> dict[str, Any]:
    """The unet (transformer) arguments of one branch of guidance: ``prompt`` embedded in
    ``embed_dtype`` on ``device``, as the network's family takes it (SDXL's with the
    ``time_ids``, Chroma's masked over its ``image_tokens``, Qwen-Image's with the text
    lengths where ``lengths``)."""
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    if net.xl:
        return _xl_cond(*_embed_pair(pipe, prompt, device, embed_dtype), time_ids)
    if sd3:
        embeds, pooled = _embed_pair(pipe, prompt, device, embed_dtype, sd3=True)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if net.chroma:
        return _embed_chroma(pipe, prompt, device, embed_dtype, image_tokens)
    if flux:
        return _embed_flux(pipe, prompt, device, embed_dtype)
    if qwen:
        return _embed_qwen(pipe, prompt, device, embed_dtype, lengths)
    if net.kind == "zimage":
        return _embed_z_image(pipe, prompt, device, embed_dtype)
    if flux2:
        return _embed_flux2(pipe, prompt, device, embed_dtype)
    if net.kind == "pixart":
        return _embed_pixart(pipe, prompt, device, embed_dtype)
    return {"encoder_hidden_states": _embed(pipe, prompt, device, embed_dtype)}


def _image_prompt(
    pipe: Any,
    net: _Network,
    ip_adapter_image: Any,
    ip_adapter_image_embeds: Any,
    guided: bool,
    size: tuple[int, int],
    device: torch.device,
) -> tuple[Any, Any]:
    """The image prompt's embeddings for the conditional and the unconditional branch, made
    by the pipeline once (the batch expands them); (None, None) without one. ``size`` is
    the image's (W, H), Flux's all-zero negative image's."""
    adapters, sd3_image, flux = net.adapters, net.sd3_image, net.kind == "flux"
    image_given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
    width, height = size
    image_prompt: tuple[Any, Any] = (None, None)
    if adapters is not None:
        # The pipeline's own embeddings of the image prompt, once (the batch expands
        # them); under guidance each is [negative, positive], as the pipeline stacks them.
        if flux:
            made = _flux_image_prompt(
                pipe, ip_adapter_image, ip_adapter_image_embeds, guided, (width, height), device
            )
        else:
            made = pipe.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, 1, guided
            )
        halves = [e.chunk(2) for e in made] if guided else [(None, e) for e in made]
        image_prompt = ([p for _, p in halves], [n for n, _ in halves])
    elif sd3_image and image_given:
        # StableDiffusion3Pipeline's one tensor, [negative, positive] under guidance.
        one = pipe.prepare_ip_adapter_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, 1, guided
        )
        image_prompt = tuple(reversed(one.chunk(2))) if guided else (one, None)
    return image_prompt


def _guide(
    cond: dict[str, Any],
    negative_cond: dict[str, Any] | None,
    image_prompt: tuple[Any, Any],
    joint: bool,
    guidance_scale: float | None,
    time_ids: Tensor,
) -> dict[str, Any]:
    """One branch's arguments with the image prompt and, under guidance (a
    ``guidance_scale``), the unconditional branch: ``negative_cond``, or SDXL's zeros where
    it is None. ``joint``: the image prompt goes in ``joint_attention_kwargs``."""
    guided = guidance_scale is not None
    cond = _with_image_prompt(cond, image_prompt[0], joint)
    if not guided:
        return cond
    negative = negative_cond
    if negative is None:  # SDXL's zeros, of the prompt's token count
        embeds = cond["encoder_hidden_states"]
        pooled = cond["added_cond_kwargs"]["text_embeds"]
        negative = _xl_cond(torch.zeros_like(embeds[:1]), torch.zeros_like(pooled[:1]), time_ids)
    negative = _with_image_prompt(negative, image_prompt[1], joint)
    return {**cond, "guidance_scale": guidance_scale, "negative_cond": negative}


def _call_kwargs(
    pipe: Any,
    vae: Any,
    net: _Network,
    source_cond: Mapping[str, Any],
    pixels: Tensor,
    *,
    img_shapes: list[list[tuple[int, int, int]]],
    z_options: Mapping[str, Any],
    guidance: float | None,
    condition: Any,
    control: Mapping[str, Any],
    control_pixels: Tensor | None,
    mask_control: bool,
    references: list[Tensor],
    latent_size: tuple[int, int],
    embed_dtype: torch.dtype | None,
    device: torch.device,
) -> dict[str, Any]:
    """The network's arguments common to both ODEs and both branches of guidance, as the
    family's pipeline passes them: the latents' positions and the embedded guidance, and the
    image conditions' latents (the mask's and masked image's, the control image's, the
    reference image's), made of ``pixels`` (on ``device``) by the VAE."""
    xl, fill, kontext, qwen_edit = net.xl, net.fill, net.kontext, net.qwen_edit
    sd3, flux, qwen, flux2 = (net.kind == k for k in ("sd3", "flux", "qwen", "flux2"))
    zimage = net.kind == "zimage"
    batch = pixels.shape[0]
    rows, cols = (n // _FLUX_PACKING for n in latent_size)
    # Flux's arguments common to both branches of guidance, as FluxPipeline passes them:
    # the latents' positions, in the embeddings' dtype, and the embedded guidance.
    shared: dict[str, Any] = {"img_shapes": img_shapes} if qwen else {}
    if zimage:
        shared.update(z_options)
    if net.kind == "pixart":  # PixArt-alpha's image size, in the embeddings' dtype
        dtype = source_cond["encoder_hidden_states"].dtype
        shared.update(_pixart_size_cond(net, tuple(pixels.shape[-2:]), dtype, device))
    if flux:
        ids_dtype = source_cond["encoder_hidden_states"].dtype
        shared["img_ids"] = pipe._prepare_latent_image_ids(batch, rows, cols, device, ids_dtype)
        if guidance is not None:
            shared["guidance"] = guidance
    if flux2:  # Flux2Pipeline's ids (B, tokens, 4) of the patchified latents' shape
        shared["img_ids"] = pipe._prepare_latent_ids(torch.zeros(batch, 1, rows, cols))
        shared["img_ids"] = shared["img_ids"].to(device)
        if references and net.pipeline == _FLUX2_KV:  # through the pipeline's cache
            ids = shared["img_ids"]
            shared.update(_flux2_kv_kwargs(pipe, references, ids, source_cond, batch, device))
        elif references:  # their tokens after the latents', their ids after the latents'
            shared.update(
                _flux2_reference_kwargs(pipe, references, shared["img_ids"], batch, device)
            )
        if guidance is not None:
            shared["guidance"] = guidance
    if condition is not None and fill:
        dtype = embed_dtype or torch.float32
        shared.update(_fill_kwargs(pipe, vae, condition, pixels, dtype, device))
    elif condition is not None and not mask_control:
        # In the unet's dtype, as the pipelines make them (of the prompt embeddings').
        shared.update(
            _inpaint_kwargs(pipe, vae, condition, pixels, embed_dtype or torch.float32, xl, device)
        )
    if control_pixels is not None:
        # A Depth or Canny transformer's channels, or FluxControlNetPipeline's controlnet's.
        name = "controlnet_cond" if control else "control_latents"
        if sd3:
            shared[name] = _sd3_control_latents(pipe, vae, control_pixels, condition)
        elif qwen:
            shared[name] = _qwen_control_latents(pipe, vae, control_pixels, condition)
        elif zimage:
            shared[name] = _z_image_control_latents(pipe, vae, control_pixels, condition, pixels)
        else:
            shared[name] = _flux_control_latents(pipe, vae, control_pixels)
    if kontext:  # the image is its own reference, as FluxKontextPipeline(image=...) edits
        shared.update(_kontext_kwargs(pipe, pixels, shared["img_ids"], ids_dtype, device))
    if qwen_edit:  # so is it for QwenImageEditPipeline(image=...), as its prompts' dtype
        embeds_dtype = source_cond["encoder_hidden_states"].dtype
        shared["image_latents"] = _qwen_edit_reference(
            pipe, pixels, embeds_dtype, device, references
        )
    return shared


def _encode_latents(
    pipe: Any,
    vae: Any,
    net: _Network,
    pixels: Tensor,
    state_dtype: torch.dtype,
    latent_size: tuple[int, int],
) -> Tensor:
    """The image's latents, the state: encoded and (Flux's, Qwen-Image's, Flux.2's) packed
    as the family's pipeline encodes an image, in ``state_dtype``."""
    if net.kind == "qwen":
        return _qwen_encode(pipe, vae, net, pixels, state_dtype, latent_size)
    if net.kind == "zimage":
        return _z_image_encode(vae, pixels, state_dtype)
    if net.kind == "flux2":  # as Flux.2's pipelines encode their reference images
        return _flux2_encode(pipe, pixels, state_dtype)
    with _float32_vae(vae, net.xl, encoding=True):
        latents = _encode(vae, pixels, state_dtype)
    if net.kind == "flux":
        latents = pipe._pack_latents(latents, *latents.shape)
    return latents


def _decode_latents(
    pipe: Any,
    vae: Any,
    net: _Network,
    latents: Tensor,
    img_ids: Tensor | None,
    size: tuple[int, int],
    vae_factor: int,
) -> Tensor:
    """``_encode_latents``' inverse: the image (B, 3, H, W) of ``size`` (H, W), decoded as the
    family's pipeline decodes; ``img_ids`` Flux.2's ids of the packed latents (followed by
    the reference images' where it has them)."""
    if net.kind == "flux2":
        assert img_ids is not None  # _call_kwargs makes Flux.2's
        return _flux2_decode(pipe, latents, img_ids[:, : latents.shape[1]])
    if net.kind == "qwen":
        return _qwen_decode(pipe, vae, latents, size, vae_factor)
    if net.kind == "zimage":
        return _z_image_decode(vae, latents)
    if net.kind == "flux":
        latents = pipe._unpack_latents(latents, *size, vae_factor)
    return _decode(vae, latents)


def _rms(a: Tensor, b: Tensor) -> float:
    wide = wide_dtype(a.device)  # float64, or float32 on a device without it
    return float((a.to(wide) - b.to(wide)).pow(2).mean().sqrt())


def _output(images: Tensor, output_type: str) -> Any:
    if output_type == "pt":
        return images
    from diffusers.image_processor import VaeImageProcessor

    array = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return VaeImageProcessor.numpy_to_pil(array)


# -------------------------------------------------------------------- public API


def edit_image(
    pipe: Any,
    image: Any,
    source_prompt: str | Sequence[str] | Tensor | tuple[Tensor, Tensor],
    target_prompt: str | Sequence[str] | Tensor | tuple[Tensor, Tensor],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    guidance: float | None = None,
    negative_prompt: str | Sequence[str] | Tensor | tuple[Tensor, Tensor] | None = "",
    solver: str | Solver | BidirectionalWrapper | None = None,
    gamma: float | None = None,
    rule: str = "base",
    state_dtype: torch.dtype | str | None = None,
    model_dtype: torch.dtype | str | None = None,
    output_type: str | None = None,
    progress: bool | None = None,
    mu: float | None = None,
    control_image: Any = None,
    controlnet_conditioning_scale: float | Sequence[float] | None = None,
    guess_mode: bool = False,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    mask_image: Any = None,
    ip_adapter_image: Any = None,
    ip_adapter_image_embeds: Sequence[Tensor] | None = None,
    reference_image: Any = None,
    cfg_normalization: float | None = None,
    cfg_truncation: float | None = None,
    guidance_rescale: float | None = None,
) -> EditResult:
    """Invert ``image`` exactly under ``source_prompt`` and regenerate it under ``target_prompt``.

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``PixArtSigmaPipeline``, ``PixArtAlphaPipeline`` (T5's prompts with their
            masks; PixArt-alpha's micro-conditions of the image's own size),
            ``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``ChromaPipeline`` (or Stable
            Diffusion's or SDXL's
            ControlNet pipeline or ControlNet img2img pipeline, with ``control_image``, or
            their inpainting pipeline with a 9-channel unet, with ``mask_image``, or their
            ControlNet inpainting pipelines with a 9-channel unet, with both), or any object
            with its parts:
            ``vae`` (an ``AutoencoderKL``), ``unet`` (``UNet2DConditionModel``) or, for SD3
            and Flux, ``transformer`` (``SD3Transformer2DModel``, ``FluxTransformer2DModel``),
            ``scheduler`` (one that ``from_diffusers`` takes, e.g. DDIM or PNDM with
            ``clip_sample=False``, or for an SDXL-architecture unet such as Playground v2.5's
            an EDM-preconditioned one; for SD3 and Flux ``FlowMatchEulerDiscreteScheduler``
            or a ``BDIAScheduler`` made from one), and, for text prompts, ``encode_prompt`` with
            ``tokenizer`` and ``text_encoder`` (for SDXL ``tokenizer_2`` and
            ``text_encoder_2``, for SD3 both pairs, and T5's ``text_encoder_3`` where the
            pipeline has one: without it the pipeline's ``encode_prompt`` puts zeros in its
            place; for Flux CLIP's and T5's pairs), as the pipeline's. Flux also needs
            ``encode_prompt`` for embeddings (it makes their ``txt_ids``) and FluxPipeline's
            ``_pack_latents``, ``_unpack_latents`` and ``_prepare_latent_image_ids``. None of
            them is modified (an SDXL pipeline's float16 or bfloat16 VAE whose config says
            ``force_upcast`` encodes in float32, and a float16 one decodes in float32 too, as
            the SDXL pipelines encode and decode, and on return has each weight and buffer in
            its own dtype again, bit for bit). A VAE whose config
            sets both ``latents_mean`` and ``latents_std`` (one value per latent channel) encodes to
            ``(mean - latents_mean) * scaling_factor / latents_std`` and decodes by the
            inverse, in the state dtype with the statistics as float32 values, as diffusers'
            SDXL pipelines; with only one of them set, neither is used, as there. SD3's VAE
            encodes to ``(mean - shift_factor) * scaling_factor`` and decodes by the inverse,
            as the SD3 pipelines, without an upcast (they have none); so does Flux's, whose
            latents are then packed by ``_pack_latents`` (and unpacked by
            ``_unpack_latents`` before decoding), as FluxImg2ImgPipeline encodes and
            FluxPipeline decodes. A ``ChromaPipeline`` (a ``ChromaTransformer2DModel``, T5's
            ``tokenizer`` and ``text_encoder`` alone, and its ``_prepare_attention_mask``)
            edits as a ``FluxPipeline``, its prompts as text only, each with the attention
            mask the pipeline makes of it over the text and image tokens; its IP-Adapters
            are Flux's. A ``QwenImagePipeline`` or ``QwenImageImg2ImgPipeline`` (a
            ``QwenImageTransformer2DModel``, an ``AutoencoderKLQwenImage``, ``encode_prompt``
            for text and embeddings alike, its Qwen2.5-VL ``tokenizer`` and ``text_encoder``
            for text, and ``_pack_latents`` and ``_unpack_latents``) encodes the image as a
            one-frame video to the mean of the VAE's distribution, ``(mean - latents_mean) *
            (1 / latents_std)`` in the state dtype, packed, as QwenImageImg2ImgPipeline
            encodes, and decodes by the inverse after ``_unpack_latents``, as
            QwenImagePipeline decodes; the img2img pipeline's ``strength`` plays no part. A
            ``QwenImageEditPipeline`` (by its class, with ``prepare_latents``) conditions
            both ODEs on the image itself, as its ``image`` kept at the image's size: the
            packed latents of its ``prepare_latents`` (the mode of the VAE's distribution,
            its mean, ``(mean - latents_mean) / latents_std``, as that pipeline divides) as
            ``from_diffusers``' ``image_latents``, with ``img_shapes`` holding the latents'
            shape and the image's; it encodes the edited latents by the same division, so
            that they are the reference's, and takes prompt embeddings only (its
            ``encode_prompt`` embeds text with the image through Qwen2.5-VL). A
            ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509's or 2511's, by its class)
            edits so too, the image its first reference, kept at its size, followed by
            ``reference_image``'s, as its ``image`` list: their latents made alike by its
            ``prepare_latents`` and concatenated along the tokens, one ``img_shapes`` entry
            per image (a transformer with ``zero_cond_t``, 2511's, is called as given).
            A ``Flux2Pipeline`` or ``Flux2KleinPipeline`` (a ``Flux2Transformer2DModel``, an
            ``AutoencoderKLFlux2`` with its batch norm ``bn``, ``encode_prompt`` for text
            and embeddings alike, its text encoder and tokenizer for text, and
            ``_patchify_latents``, ``_unpatchify_latents``, ``_pack_latents``,
            ``_unpack_latents_with_ids`` and ``_prepare_latent_ids``) encodes the image as
            they encode a reference image, the VAE's mode patchified, ``(z - running_mean)
            / sqrt(running_var + batch_norm_eps)`` in the state dtype and packed, and
            decodes by the inverse as they decode; the grid's shift is their
            ``compute_empirical_mu(tokens, n)``. The image is not its own reference (their
            ``image=`` is an optional list): ``reference_image`` gives that list, the same
            for both ODEs.
            A ``QwenImageControlNetPipeline`` (one ``QwenImageControlNetModel``, not the
            union wrapper) takes ``control_image``, a ``QwenImageControlNetInpaintPipeline``
            (its controlnet of the inpainting kind, ``extra_condition_channels`` 4) both
            ``control_image`` and ``mask_image``. Qwen-Image's Edit Inpaint and Layered
            pipelines are refused by their class. A ``ZImagePipeline``
            or ``ZImageImg2ImgPipeline`` (a ``ZImageTransformer2DModel``, an
            ``AutoencoderKL`` with ``shift_factor``, and, for text, ``encode_prompt`` with
            its Qwen3 ``tokenizer`` and ``text_encoder``) encodes the image to the mean of
            the VAE's distribution, ``(mean - shift_factor) * scaling_factor`` in the VAE's
            dtype, as ZImageImg2ImgPipeline encodes (where it draws a sample), and decodes
            the latents cast to the VAE's dtype by the inverse, as ZImagePipeline decodes;
            the latents stay image-shaped, ``(batch, C, H / f, W / f)``, and the
            img2img pipeline's ``strength`` plays no part. Its ControlNet and Omni pipelines
            are refused by their class. A
            ``FluxFillPipeline`` (a Fill transformer, whose ``in_channels`` are twice the
            packed latents' and the packed mask's) takes
            ``mask_image``; a ``FluxControlPipeline`` (a Depth or Canny transformer, whose
            ``in_channels`` are twice the packed latents') takes ``control_image``, and so
            does a ``FluxControlNetPipeline`` (a ``FluxControlNetModel`` beside the
            transformer, as ``controlnet``) and a ``StableDiffusion3ControlNetPipeline`` (an
            ``SD3ControlNetModel``; its img2img sibling as it, its ``strength`` playing no
            part); a ``StableDiffusion3ControlNetInpaintingPipeline`` (an
            ``SD3ControlNetModel`` with the mask's channel, Alimama's) takes both
            ``control_image`` and ``mask_image``; a ``FluxKontextPipeline`` (by its class)
            conditions both ODEs on the image itself, as its ``image``: the image's packed
            latents and ids from its ``prepare_latents`` (the mode of the VAE's
            distribution, its mean, as the pipeline encodes it) as ``from_diffusers``'
            ``image_latents`` and ``img_ids``. The inpainting pipelines whose network takes
            no mask (``StableDiffusion3InpaintPipeline``, ``FluxInpaintPipeline``,
            ``FluxControlInpaintPipeline``, ``FluxControlNetInpaintPipeline``,
            ``FluxKontextInpaintPipeline``, ``ChromaInpaintPipeline``,
            ``QwenImageInpaintPipeline``, ``QwenImageEditInpaintPipeline``,
            ``ZImageInpaintPipeline``, and Stable Diffusion's and SDXL's inpainting and
            ControlNet inpainting pipelines over a 4-channel unet) blend the re-noised image
            into the latents after each step, which is no ODE step: without ``mask_image``
            they edit as the plain pipeline of their parts (``FluxKontextInpaintPipeline`` as
            ``FluxKontextPipeline``, the image its own reference, as it takes it without
            ``image_reference``; ``QwenImageEditInpaintPipeline`` as
            ``QwenImageEditPipeline``, the image its own reference, encoded as its own
            ``prepare_latents`` encodes it, ``(mean - latents_mean) * (1 / latents_std)``,
            and the state alike; ``ChromaInpaintPipeline`` as ``ChromaPipeline``, its prompts
            in 512 T5 tokens where its own ``encode_prompt`` defaults to 256), and a mask is
            refused.
        image: a PIL image in RGB mode or a list of them (one size), or a tensor of shape
            ``(batch, 3, H, W)`` in [-1, 1] (not modified). H and W must be multiples of the
            VAE's downsampling factor (8 for Stable Diffusion; 512 x 512 for SD 1.5, 1024 x
            1024 for SDXL), for SD3 of that times the transformer's ``patch_size`` (16), and
            at most ``pos_embed_max_size`` patches a side (3072 pixels for SD3 medium); for
            Flux and Qwen-Image of the VAE's factor times 2, the packing's patch (16), and
            for Z-Image likewise, its transformer's 2 x 2 patches (16).
        source_prompt: what the image shows: a string, a list of 1 or ``batch`` strings, or
            prompt embeddings of shape ``(1 or batch, tokens, cross_attention_dim)`` (of
            ``encoder_hid_dim`` for a unet that projects them, ``encoder_hid_dim_type=
            "text_proj"``); for SDXL
            (a unet with ``addition_embed_type="text_time"``) the pair ``(prompt_embeds,
            pooled_prompt_embeds)``, the second of shape ``(1 or batch, projection_dim)``
            (``encode_prompt``'s first and third outputs). An SDXL unet gets
            ``added_cond_kwargs`` of the pooled embeddings and the time ids ``(H, W, 0, 0, H,
            W)`` (original size, crop, target size: the pipeline's defaults). For PixArt the
            pair ``(prompt_embeds, prompt_attention_mask)`` of shapes ``(1 or batch, tokens,
            caption_channels)`` and ``(1 or batch, tokens)``, ``encode_prompt``'s first and
            second outputs. For SD3 the
            pair of shapes ``(1 or batch, tokens, joint_attention_dim)`` and ``(1 or batch,
            pooled_projection_dim)``, ``encode_prompt``'s first and third outputs; for Flux
            the same shapes, ``encode_prompt``'s first and second outputs (its third, the
            ``txt_ids``, is made again from the embeddings' length by ``encode_prompt``); for
            Flux.2 one tensor ``(1 or batch, tokens, joint_attention_dim)`` (no pooled
            embeddings), through its ``encode_prompt``, which makes its ``txt_ids``; for
            Qwen-Image the pair ``(prompt_embeds, prompt_embeds_mask)`` of shapes ``(1 or
            batch, tokens, joint_attention_dim)`` and ``(the same batch, tokens)``, as its
            ``encode_prompt`` returns them (an integer mask, 1 for a token, 0 for padding),
            which goes through ``encode_prompt`` as in the pipeline (an all-ones mask becomes
            None; a prompt keeps its first 512 tokens, the pipeline's
            ``max_sequence_length``); text needs the pipeline's text encoder. For Z-Image a
            list of 1 or ``batch`` embeddings of shapes ``(L_i, cap_feat_dim)``, each of its
            own length, as its ``encode_prompt`` returns ``prompt_embeds`` (each prompt's
            valid tokens, no mask), or text, which goes through ``encode_prompt`` (no CFG,
            ``max_sequence_length`` 512, the pipeline's) and needs its text encoder.
        target_prompt: the edit, in the same forms.
        num_inference_steps: steps of the scheduler's grid (``diffusers_grid``); with an
            EDM-preconditioned scheduler one fewer where that grid ends at 0 (its default
            ``final_sigmas_type="zero"``), the last step, to 0, left out. For SD3
            the grid is the pipeline's ``num_inference_steps`` sigmas and its final 0, where
            the latents are taken: ``num_inference_steps`` steps. For Flux the sigmas are
            FluxPipeline's, ``np.linspace(1, 1 / n, n)`` shifted by the scheduler, and the
            final 0 likewise (for Flux.2 so too, shifted by its pipelines' ``mu``); for
            Z-Image ZImagePipeline's, ``torch.linspace(1, 1 / n, n).tolist()`` (float32
            values) shifted by the scheduler, and the final 0; in diffusers 0.36 to 0.38,
            whose ZImagePipeline sets the scheduler's ``sigma_min`` to 0 and takes its own
            spacing, that spacing to 0 (``n - 1`` steps: the pipeline's last, from 0 to 0,
            moves nothing).
        guidance_scale: ``g`` of classifier-free guidance, ``u + g (c - u)``; 1 is the
            conditional model alone, and a value below 1, which the pipelines run as no
            guidance (SD-Turbo's 0.0), is refused. Every other value needs
            ``negative_prompt``. By default
            7.5, and 1 for Flux: its classifier-free guidance is FluxPipeline's
            ``true_cfg_scale`` (1 by default), two transformer calls a step; Flux.1-dev is
            guidance-distilled and embeds its guidance instead (``guidance``). For Chroma 5,
            ChromaPipeline's ``guidance_scale`` (true CFG, with the negative prompt ``""`` by
            default). For Flux.2 1 with FLUX.2-dev (its guidance embedded, ``guidance``), and
            for Flux2KleinPipeline its ``guidance_scale``, true CFG, 4 (1 where its config
            says ``is_distilled``), with ``negative_prompt``. For Qwen-Image 1:
            QwenImagePipeline's ``true_cfg_scale`` (4) acts only
            with a negative prompt, None by default; another value is its true CFG, the
            guided velocity of each token rescaled to the conditional one's norm. For
            Z-Image 5, ZImagePipeline's ``guidance_scale``, whose CFG is ``c + g (c - u)``,
            on for ``g > 0`` with the negative prompt ``""`` by default; 0 is no CFG
            (Z-Image-Turbo's), and a negative value is refused.
        guidance: Flux.1-dev's embedded guidance scale, FluxPipeline's ``guidance_scale``
            (3.5 by default), given to the transformer in both branches of guidance; FLUX.2-
            dev's, Flux2Pipeline's ``guidance_scale`` (4 by default). Only for a Flux or
            Flux.2 transformer with ``guidance_embeds``: refused for one without (Flux.1-
            schnell, FLUX.2-klein) and for any other network.
        negative_prompt: the unconditional branch: a string (``""`` is the usual unconditional
            embedding), a list, or embeddings; None only with ``guidance_scale=1``. For an
            SDXL pipeline whose config has ``force_zeros_for_empty_prompt`` (SDXL base's),
            ``""`` (or a list of them) is zero embeddings and pooled embeddings, as the
            pipeline's default; any other negative prompt, embeddings included, is used as
            given. SD3's pipeline embeds ``""`` as its default, and so does ``edit_image``.
            FluxPipeline has no default negative prompt; with ``guidance_scale`` other than
            1, ``edit_image`` embeds ``""`` unless given another.
        solver: the base solver (a registered name or a ``Solver``), wrapped as
            ``bdia.bdia(solver, gamma)``; or a BDIA solver, used as it is. By default
            ``"ddim"``, and for SD3 and Flux ``"euler"``: the same step in rectified flow, in
            the flow-matching scheduler's own arithmetic (with
            ``FlowMatchHeunDiscreteScheduler`` too, on its distinct sigmas).
        gamma: BDIA's gamma, 0.96 unless given (not with a BDIA solver).
        rule: how to regenerate under the target (``bdia.EDIT_RULES``): ``"base"`` (the base
            solver from the inverted noise, the default) or ``"restart"``. See
            ``bdia.editing`` for why an edit does not continue the BDIA pair.
        state_dtype: dtype of the ODE state, float64 or float32; by default float64, and
            float32 on a device without float64 (Apple's ``mps``), where float64 is refused.
            The unet runs in ``model_dtype`` whatever it is.
        model_dtype: dtype the unet runs in; by default its parameters' (float16 weights run
            in float16 under a float32 or float64 state).
        output_type: ``"pil"`` (PIL images) or ``"pt"`` (tensors in [-1, 1]); by default the
            kind of ``image``.
        progress: tqdm bars for the three runs (None: only on a terminal).
        mu: the shift of an SD3 or Flux scheduler with ``use_dynamic_shifting=True`` (Flux.1-
            dev's), as the pipeline's ``mu``; by default the pipeline's own for the image's
            size (computed from the number of latent patches, for Flux the packed tokens, and
            the scheduler config's ``base_shift``, ``max_shift``, ``base_image_seq_len`` and
            ``max_image_seq_len``, with the pipeline's defaults for missing ones). Refused
            with any other scheduler, which would ignore it (Flux.1-schnell's). For Flux.2
            by default its pipelines' ``compute_empirical_mu(tokens, num_inference_steps)``.
        control_image: for a ``StableDiffusionControlNetPipeline`` or
            ``StableDiffusionXLControlNetPipeline`` (a pipeline with a ``controlnet``), the
            image that guides the controlnet, as the pipeline's ``image`` (the ControlNet
            img2img and inpainting pipelines' ``control_image``): a PIL image, a list of
            them or a tensor of shape ``(1 or batch, 3, H', W')`` in [0, 1], made by the
            pipeline's ``prepare_image`` at the image's size (H x W), one per image to edit
            (by the img2img pipelines' ``prepare_control_image``, and the ControlNet
            inpainting pipelines', of the whole image: no ``padding_mask_crop``); a list of
            them, one per controlnet, for a ``MultiControlNetModel``. An img2img pipeline's
            ``strength`` plays no part: the whole image is inverted over the whole grid, as
            for its text-to-image sibling. Both ODEs (the inversion's and the edit's) are
            conditioned on it, through
            ``from_diffusers(controlnet=pipe.controlnet, controlnet_cond=...)``. Needed with
            a controlnet, refused without. For a ``FluxControlPipeline`` (or its img2img
            sibling: a Depth or Canny transformer), the depth map or edge image that guides
            the transformer, as the pipeline's ``control_image``: a PIL image or a list of
            them, resized to the image's size and mapped to [-1, 1] by the pipeline's
            ``prepare_image``, or a tensor of shape ``(1 or batch, 3, H, W)`` in [-1, 1],
            which ``prepare_image`` passes on as it is; one per image to edit, or one for
            all. It is encoded to the *mean* of the VAE's latent distribution (the pipeline
            draws a sample with its generator; the mean makes the edit deterministic),
            shifted, scaled and packed as the pipeline does, and both ODEs take it as
            ``from_diffusers``' ``control_latents``. Needed with such a transformer. For a
            ``FluxControlNetPipeline``, the image that guides its controlnet, as the
            pipeline's ``control_image``, prepared and encoded the same way (the mean where
            the pipeline draws a sample), which both ODEs take as ``from_diffusers``'
            ``controlnet_cond``, with ``controlnet_conditioning_scale`` and the
            ``control_guidance_*`` bounds (switched on the pipeline's own grid); needed with
            it. For a ``StableDiffusion3ControlNetPipeline`` the same, the latents less the
            VAE's ``shift_factor`` only where the controlnet's
            ``force_zeros_for_pooled_projection`` is unset, as the pipeline encodes them
            (which draws a sample from torch's global generator, one per half of
            guidance's batch). For a ``StableDiffusion3ControlNetInpaintingPipeline``, the
            image kept outside ``mask_image`` (as a rule the image itself), as the pipeline's
            ``control_image``, prepared the same way, set to -1 under the mask and encoded as
            its ``prepare_image_with_mask`` does (the mean where it draws a sample, less
            ``shift_factor`` always), with ``1 - mask`` at the latents' size as the last
            channel of ``controlnet_cond``; needed with it. For a
            ``QwenImageControlNetPipeline`` as for Flux's, the image encoded as one frame
            and normalised ``(mean - latents_mean) * (1 / latents_std)`` (in float32 at
            least) before packing, as the pipeline does with its draw; for a
            ``QwenImageControlNetInpaintPipeline``, the image kept outside ``mask_image``,
            so, set to -1 under the mask first and the latents cast to the VAE's dtype, with
            ``1 - mask`` at the latents' size as the last channel before packing, as its
            ``prepare_image_with_mask`` does; needed with it. For a
            ``ZImageControlNetPipeline``, the image that guides its controlnet, prepared as
            for Flux's and encoded as the pipeline encodes it (the VAE's mode, ``(z -
            shift_factor) * scaling_factor`` in the VAE's dtype, as one frame, zeros after it
            up to the controlnet's ``control_in_dim``); for a
            ``ZImageControlNetInpaintPipeline`` the same, followed by ``1 - mask`` at the
            latents' size and the latents of the image to edit set to 0 under ``mask_image``,
            as that pipeline makes them from its ``image``; needed with them.
        controlnet_conditioning_scale: the controlnet's scale (one per controlnet, or one for
            all), as the pipeline's; by default the pipeline's own: 0.75 for Z-Image's
            ControlNet pipelines, 1 for the others.
        guess_mode: the pipeline's guess mode.
        control_guidance_start: the fraction of the steps before which the controlnet is off
            (one per controlnet, or one for all), as the pipeline's; mapped by
            ``from_diffusers`` onto the grid's times, so that the inversion and the edit call
            it where the pipeline would.
        control_guidance_end: the fraction of the steps after which it is off, likewise.
        mask_image: for a ``StableDiffusionInpaintPipeline``,
            ``StableDiffusionXLInpaintPipeline``, ``StableDiffusionControlNetInpaintPipeline``
            or ``StableDiffusionXLControlNetInpaintPipeline`` with an inpainting unet
            (``in_channels`` = 2 x the VAE's ``latent_channels`` + 1: 9), the region the edit
            may repaint, as the pipeline's ``mask_image``: a PIL image (any mode; grayscale
            is taken) or a list of them of the image's size, or a tensor of shape ``(1 or
            batch, 1, H, W)`` in [0, 1] (not modified), white (1) where repainted. The
            pipeline's ``mask_processor`` binarises it at 0.5; the image blanked there is
            encoded to the *mean* of the VAE's latent distribution times ``scaling_factor``,
            in the unet's dtype (the pipelines draw a sample; neither applies
            ``latents_mean`` or ``latents_std`` to the masked image, and SDXL's encodes it,
            rounded to the unet's dtype, in float32 where the config says ``force_upcast``, a
            float16 and a bfloat16 VAE alike), and both go through the pipeline's
            ``prepare_mask_latents`` (the mask sized to the latents, nearest; for SDXL's
            ControlNet inpainting pipeline, which encodes whatever it is given, the mask
            alone). Both ODEs give the unet ``torch.cat([latents, mask,
            masked_image_latents], dim=1)`` through
            ``from_diffusers(mask=..., masked_image_latents=...)``. The state is the whole
            image's latents, encoded as for any pipeline; nothing is blended back: outside the
            mask the edit is what the inpainting model makes of it. For a
            ``FluxFillPipeline`` the same, packed: the image times ``1 - mask``, as that
            pipeline blanks it, encoded to the VAE's mean, goes with the binarised mask
            through its ``prepare_mask_latents`` (which shifts and scales the latents and
            packs both, the mask's pixels ``f x f`` a latent pixel). For a
            ``StableDiffusion3ControlNetInpaintingPipeline`` or a
            ``QwenImageControlNetInpaintPipeline``, the pipeline's ``control_mask``:
            binarised by its ``mask_processor`` (a tensor taken as it is, as the pipeline
            takes it), it goes into the controlnet's control input with ``control_image``
            (see there), not into the transformer's. For a
            ``ZImageControlNetInpaintPipeline``, its ``mask_image``, binarised by its
            ``mask_processor`` (a tensor too), which goes into the controlnet's control input
            with the image to edit. Needed with an inpainting unet, a Fill transformer, SD3's
            or Qwen-Image's inpainting controlnet or Z-Image's ControlNet inpainting
            pipeline, refused for any other network: for an
            inpainting pipeline that blends (its network takes no mask), in a line that says
            so.
        ip_adapter_image: for a pipeline whose unet has IP-Adapters loaded
            (``pipe.load_ip_adapter``, Stable Diffusion's or SDXL's; or Flux's transformer,
            the ``load_ip_adapter`` of FluxPipeline, FluxKontextPipeline,
            FluxControlNetPipeline, ...; or Chroma's, ChromaPipeline's, which loads Flux's
            adapters), the image prompt, as
            the pipeline's ``ip_adapter_image``: an image (a PIL image or what its
            ``feature_extractor`` takes) for one adapter, or a list of one per adapter (a
            list inside it for several images to one adapter). The pipeline's own
            ``prepare_ip_adapter_image_embeds`` embeds it with its ``image_encoder`` once,
            shared by the images to edit; under guidance the unconditional branch gets its
            negative embeddings (zeros for a plain IP-Adapter, the encoder's hidden states
            of an all-zero input for an IP-Adapter Plus), as in the pipeline. Both ODEs (the
            inversion's and the edit's) are conditioned on it, through ``from_diffusers``'
            ``added_cond_kwargs={"image_embeds": [...]}``; the adapters' scale is the
            pipeline's (``pipe.set_ip_adapter_scale``). For Flux the pipeline's own
            ``prepare_ip_adapter_image_embeds`` makes them too, given to the transformer as
            ``joint_attention_kwargs={"ip_adapter_image_embeds": [...]}``, and under true
            CFG (``guidance_scale`` other than 1) the negative call gets the embeddings of
            FluxPipeline's default ``negative_ip_adapter_image``, an all-zero image of the
            image's size; so for Chroma, as ChromaPipeline does (its true CFG on by
            default). For SD3 (the ``load_ip_adapter`` of StableDiffusion3Pipeline,
            StableDiffusion3ControlNetPipeline, ..., one adapter) its
            ``prepare_ip_adapter_image_embeds`` makes one tensor, the negative half zeros,
            given as ``joint_attention_kwargs={"ip_adapter_image_embeds": e}``;
            without an image prompt SD3's runs as its pipeline does without one. Needed (or
            ``ip_adapter_image_embeds``) with a unet's, Flux's or Chroma's IP-Adapter,
            refused without one.
        ip_adapter_image_embeds: the image prompt already embedded, as the pipeline's
            ``ip_adapter_image_embeds``: a list of one tensor per adapter, of shape
            ``(1 or batch, images, D)`` (``(1 or batch, images, tokens, D)`` for an
            IP-Adapter Plus); with ``guidance_scale`` other than 1 each is
            ``torch.cat([negative, positive])`` along dim 0, as
            ``prepare_ip_adapter_image_embeds(..., do_classifier_free_guidance=True)``
            returns them. For Flux and Chroma ``(1 or batch, images, D)`` (no IP-Adapter
            Plus), and under true CFG likewise ``torch.cat([negative, positive])``, the
            negative half what FluxPipeline (ChromaPipeline) takes as
            ``negative_ip_adapter_image_embeds``. For SD3 one
            tensor ``(1 or batch, tokens, D)``, likewise stacked under guidance, as its
            pipeline's ``prepare_ip_adapter_image_embeds`` returns it. Not modified. Not
            with ``ip_adapter_image``.
        reference_image: for a ``QwenImageEditPlusPipeline``, the reference images
            after the edited image (its first), as the pipeline's ``image`` list after its
            first entry: a PIL image in RGB mode or a tensor of shape ``(1 or batch, 3, H',
            W')`` in [-1, 1] (not modified), or a list of them, each of its own size, a
            multiple of the VAE's factor times 2. Each is encoded at its size, where the
            pipeline resizes its images to about 1024 x 1024 pixels (multiples of 32): give
            them at the size it computes (``calculate_dimensions(1024 * 1024, W' / H')``) to
            edit as the pipeline runs. For a ``Flux2Pipeline``, ``Flux2KleinPipeline`` or
            ``Flux2KleinKVPipeline``, the pipeline's ``image=`` list: PIL images (or one),
            prepared as it prepares them (checked by its image processor, shrunk to 1024 x
            1024 pixels' area where larger, cropped to multiples of 16) and encoded by its
            ``prepare_image_latents``, their tokens after the latents' (for the
            key-value-cache pipeline, their keys and values cached once, as its first step
            caches them); the image to edit may be one of them, as FLUX.2 edits. Both ODEs
            take them; refused for any other pipeline (Flux2KleinInpaintPipeline's
            ``image_reference`` is prepared otherwise).
        cfg_normalization: for Z-Image only, ZImagePipeline's ``cfg_normalization``: where
            above 0 (``True`` is 1), each sample's guided prediction is scaled down to that
            many times its conditional prediction's norm where it exceeds it. None (the
            default) is the pipeline's ``False``: no cap.
        cfg_truncation: for Z-Image only, ZImagePipeline's ``cfg_truncation``: CFG is off at
            the times whose ``(1000 - t) / 1000`` is above it. None (the default) is the
            pipeline's 1: never. Both go to ``from_diffusers`` for both ODEs; refused for
            any other pipeline.
        guidance_rescale: StableDiffusionPipeline's and the SDXL pipelines'
            ``guidance_rescale`` (Lin et al. 2024, 3.4; 0.7 with zero-terminal-SNR models):
            the guided prediction rescaled towards the conditional one's standard deviation,
            in both ODEs. None or 0 (the pipelines' default): none. Only under guidance and
            for a unet's pipelines; a number in [0, 1].

    Returns:
        An ``EditResult``: the edit and the reconstruction decoded, the inversion, the target
        ODE, the three latents, and the errors ``latent_error`` (the latent round trip) and
        ``vae_error`` (the VAE's own), with ``reconstruction_error`` beside them.

    Raises:
        ValueError or TypeError: one line, before any network runs, for a pipeline missing a
            part; VAE statistics that are not one finite number per latent channel, a zero
            ``latents_std``, or statistics beside a ``shift_factor``; an image of the wrong
            kind, mode, channels or size (not a multiple of the VAE's factor, for SD3 times
            the patch size, for Flux times 2, or more patches than the transformer embeds), or
            outside [-1, 1]; a pipeline with neither a unet nor an SD3 or Flux transformer; a
            VAE whose latent channels are not the network's (for Flux, four times them, the
            packed channels, a Fill transformer's or a Depth or Canny one's);
            ``guidance`` for a network
            without a guidance embedding, or not a finite number; a unet that needs added
            conditioning of images or hints (``addition_embed_type`` other than ``"text"``
            and SDXL's ``"text_time"``), or an SDXL one whose added embedding does not take
            six time ids beside the pooled embeddings (a refiner), or an SDXL pipeline whose
            config sets ``requires_aesthetics_score`` (a refiner's time ids); guidance
            without a negative prompt, or a ``guidance_scale`` below 1 (the pipelines run
            none there; below 0 for Z-Image); text prompts without the tokenizers and text
            encoders; prompts or embeddings of the wrong batch or dim, or SDXL, SD3 or Flux
            embeddings without the pooled ones, or Qwen-Image's without their mask or with
            a mask that is not of their (batch, tokens); for Qwen-Image a VAE config
            without ``z_dim``, ``latents_mean`` or ``latents_std``, a transformer whose
            ``in_channels`` are not 4 ``z_dim``, a Qwen-Image pipeline other than the
            text-to-image, img2img, inpainting, Edit and Edit Plus ones, and text prompts
            for the last two; for Z-Image prompts that are not a string, a list of strings
            or a list of 2-D embeddings of ``cap_feat_dim``, of 1 or ``batch`` entries, a
            negative ``guidance_scale``, ``cfg_normalization`` or ``cfg_truncation`` that
            are not numbers (or given for any other pipeline), and its ControlNet and Omni
            pipelines; ``reference_image`` for any other pipeline than Edit Plus, or
            one that is not an image (as ``image``), holds another batch than 1 and the
            image's, or whose size is not a multiple of the VAE's factor times 2; an unknown
            rule, solver or output type; an SD3 or Flux grid of one step; ``mu`` where the
            scheduler has no dynamic shifting; and whatever ``from_diffusers`` and
            ``diffusers_grid`` refuse in the scheduler (for SD3 and Flux a noise-table
            scheduler, ``stochastic_sampling``, ``invert_sigmas``). A pipeline with a
            controlnet without ``control_image`` (or
            of another class than its network's ControlNet pipeline calls), a
            ``control_image`` or ControlNet setting for a pipeline without one, control
            images of another number than the controlnets or another batch than 1 and the
            image's, a controlnet whose control images are not the VAE's factor times the
            latents' size, and whatever ``from_diffusers`` refuses in the ControlNet
            settings. A Flux Depth or Canny transformer (or the controlnet of
            ``FluxControlNetPipeline`` or ``StableDiffusion3ControlNetPipeline``) without
            ``control_image``, in a pipeline
            without ``prepare_image``, or with a tensor control image that is not of shape
            ``(1 or batch, 3, H, W)``, floating and in [-1, 1], or control images of another
            batch than 1 and the image's.
            An inpainting unet, a Flux Fill transformer or SD3's or Qwen-Image's inpainting
            controlnet without ``mask_image`` (the last two without ``control_image`` too), a
            ``mask_image`` for any other network (a 4-channel unet in an inpainting pipeline
            included, and SD3's, Flux's and Chroma's inpainting pipelines, which blend the
            image back in after every step: the line names the pipeline and the inpainting
            models to use instead), and a mask of another size than the image's, of more
            than one channel, of another batch than 1 and the image's, not floating,
            outside [0, 1] or not an image.
            A unet or Flux (Chroma) transformer with IP-Adapters loaded without
            ``ip_adapter_image`` or ``ip_adapter_image_embeds``, either for a network without
            one, both at once,
            images or embeddings of another count than the adapters, embeddings that are
            not 3-D or 4-D (for Flux, 3-D; for SD3, one 3-D tensor, not a list) floating
            tensors or whose batch is not 1 or the image's (under guidance twice that: both
            halves), ``ip_adapter_image`` without the pipeline's ``image_encoder`` and
            ``feature_extractor``, and a unet with another image projection
            (``encoder_hid_dim_type`` other than ``"text_proj"`` and an IP-Adapter's
            ``"ip_image_proj"``).
    """
    # ---- checks, all before any network runs
    vae = _part(pipe, "vae", "to encode and decode the image")
    unet, kind = _network(pipe)
    scheduler = _part(pipe, "scheduler", "for its noise table and timesteps")
    pipeline = _pipeline_class(pipe, kind)
    z_options = _z_image_options(kind, cfg_normalization, cfg_truncation)
    _check_reference_image(pipe, pipeline, kind, reference_image)
    net = _check_network(pipe, vae, unet, kind, pipeline, ip_adapter_image, ip_adapter_image_embeds)
    image_given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
    guidance_scale, guidance, guided = _check_guidance(
        pipe, net, guidance_scale, guidance, negative_prompt
    )
    _check_edit_rescale(net, guidance_rescale, guided)
    device = _device(pipe, unet)
    state_dtype, wrapped = _check_options(
        rule, state_dtype, solver, gamma, kind, output_type, device
    )
    pixels, image_kind, sizes = _check_image(pipe, vae, net, image)
    batch, _, height, width = pixels.shape
    # QwenImageEditPlusPipeline's further references, after the edited image; Flux.2's
    # pipelines' image= list, prepared as they prepare it.
    if kind == "flux2":
        references = _flux2_reference_pixels(pipe, reference_image)
    else:
        channels = vae.config.get("in_channels", 3)
        references = _reference_pixels(reference_image, channels, sizes, batch)
    prompts: dict[str, Any] = {"source_prompt": source_prompt, "target_prompt": target_prompt}
    if net.xl:
        _check_base_time_ids(pipe)
    if guided:
        prompts["negative_prompt"] = negative_prompt
    _check_prompts(prompts, batch, net)
    _check_image_prompt_batch(net, ip_adapter_image_embeds, guided, batch)
    zero_negative = _zero_negative(pipe, net, negative_prompt)
    _check_text_parts(pipe, prompts, zero_negative, net)

    # ---- the network's call, checked by from_diffusers on stand-ins, and the grid
    control_settings = dict(
        controlnet_conditioning_scale=controlnet_conditioning_scale,
        guess_mode=guess_mode,
        control_guidance_start=control_guidance_start,
        control_guidance_end=control_guidance_end,
    )
    condition, control, control_pixels, mask_control = _image_conditions(
        pipe,
        net,
        pixels.shape,
        control_image,
        mask_image,
        control_settings,
        num_inference_steps,
        device,
    )
    latent_size = (height // sizes.vae_factor, width // sizes.vae_factor)
    img_shapes = _qwen_img_shapes(net, latent_size, sizes.vae_factor, references, batch)
    # diffusers 0.35's and 0.36's Qwen-Image transformer needs the text lengths too (0.37's
    # and 0.38's take them deprecated, counting the text from the mask).
    lengths = kind == "qwen" and _qwen_needs_lengths(
        unet, inspect.signature(unet.forward).parameters
    )
    probe_cond = _probe_cond(
        net, guidance, z_options, control, latent_size, img_shapes, lengths, references, image_given
    )
    probe = from_diffusers(unet, scheduler, model_dtype=model_dtype, **probe_cond, **control)
    ts = _edit_grid(scheduler, net, num_inference_steps, probe, mu, latent_size, sizes.patch)

    # ---- the work
    embed_dtype = probe.model_dtype
    with torch.no_grad():
        # SDXL's time ids are the pipeline's defaults: original size = target size = the
        # image's, no crop; the negative branch has the same.
        time_ids = torch.tensor(
            [[height, width, 0, 0, height, width]], dtype=embed_dtype or torch.float32
        ).to(device)
        image_tokens = (latent_size[0] // _FLUX_PACKING) * (latent_size[1] // _FLUX_PACKING)

        def embed(prompt: Any) -> dict[str, Any]:
            return _embed_prompt(
                pipe, prompt, net, device, embed_dtype, time_ids, image_tokens, lengths
            )

        source_cond, target_cond = embed(source_prompt), embed(target_prompt)
        negative_cond = embed(negative_prompt) if guided and not zero_negative else None
        image_prompt = _image_prompt(
            pipe, net, ip_adapter_image, ip_adapter_image_embeds, guided, (width, height), device
        )
        pixels = pixels.to(device)
        shared = _call_kwargs(
            pipe,
            vae,
            net,
            source_cond,
            pixels,
            img_shapes=img_shapes,
            z_options=z_options,
            guidance=guidance,
            condition=condition,
            control=control,
            control_pixels=control_pixels,
            mask_control=mask_control,
            references=references,
            latent_size=latent_size,
            embed_dtype=embed_dtype,
            device=device,
        )
        scale_given = guidance_scale if guided else None
        joint = kind in ("flux", "sd3")

        def ode(cond: dict[str, Any]) -> DiffusionODE:
            branches = _guide(cond, negative_cond, image_prompt, joint, scale_given, time_ids)
            if guidance_rescale:
                branches["guidance_rescale"] = guidance_rescale
            return from_diffusers(
                unet, scheduler, model_dtype=model_dtype, **branches, **shared, **control
            )

        source_ode, target_ode = ode(source_cond), ode(target_cond)
        latents = _encode_latents(pipe, vae, net, pixels, state_dtype, latent_size)

        def decode(latents: Tensor) -> Tensor:
            size = (height, width)
            return _decode_latents(
                pipe, vae, net, latents, shared.get("img_ids"), size, sizes.vae_factor
            )

        inversion = Inversion.of(
            source_ode, wrapped, latents, ts, state_dtype=state_dtype, progress=progress
        )
        reconstructed = inversion.reconstruct(progress=progress)
        edited = inversion.regenerate(target_ode, rule=rule, progress=progress)

        with _float32_vae(vae, net.xl):
            decoded = decode(latents)
            reconstruction = decode(reconstructed)
            images = decode(edited)

    scale = float(latents.abs().max())
    latent_error = float((reconstructed - latents).abs().max()) / (scale or 1.0)
    out = output_type or image_kind
    return EditResult(
        images=_output(images, out),
        reconstruction=_output(reconstruction, out),
        inversion=inversion,
        target=target_ode,
        latents=latents,
        reconstructed_latents=reconstructed,
        edited_latents=edited,
        latent_error=latent_error,
        vae_error=_rms(decoded, pixels),
        reconstruction_error=_rms(reconstruction, pixels),
    )
