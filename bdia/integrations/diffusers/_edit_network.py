"""What ``edit_image`` knows of a pipeline's network, checked before any network runs: which
family it belongs to (a unet of Stable Diffusion or SDXL, or the transformer of SD3, Flux,
Chroma, Qwen-Image, Z-Image or Flux.2), which of the family's pipelines it sits in, that the
VAE's latents are what it takes, and what it takes besides them (an inpainting unet's mask,
a Flux Fill, Depth or Canny transformer's channels, Kontext's and Qwen-Image Edit's
reference image, IP-Adapters)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import diffusers

from ._conditioning import _hid_dim_type, _ip_adapters
from ._edit_conditions import (
    _QWEN_EDIT_INPAINT,
    _check_image_prompt,
    _check_sd3_image_prompt,
    _fill_channels,
)
from ._flow_controlnet import _Z_INPAINT_PIPELINE, _Z_PIPELINE
from ._flux2_edit import _check_flux2_parts
from ._pipeline_parts import (
    _FLUX_PACKING,
    _frame_stats,
    _latent_channels,
    _latent_stats,
    _part,
)
from ._scheduler_config import _class_names, _is_chroma

# SDXL's added conditioning; the time ids are the original size (H, W), the crop's top-left
# corner (top, left) and the target size (H, W), each embedded in addition_time_embed_dim.
_TEXT_TIME = "text_time"
_TEXT = "text"
# The transformers whose pipelines edit_image knows how to embed prompts for and call.
_SD3 = "SD3Transformer2DModel"
_FLUX = "FluxTransformer2DModel"
_CHROMA = "ChromaTransformer2DModel"
_QWEN = "QwenImageTransformer2DModel"
_FLUX2 = "Flux2Transformer2DModel"
_Z_IMAGE = "ZImageTransformer2DModel"
_PIXART = "PixArtTransformer2DModel"
# Every transformer class edit_image takes (a subclass of one too, by its MRO).
_EDIT_TRANSFORMERS = (_SD3, _FLUX, _CHROMA, _QWEN, _Z_IMAGE, _FLUX2, _PIXART)
# The Flux.2 pipelines edit_image maps: FLUX.2-dev's, Klein's, Klein's key-value-cache one
# (its reference tokens' keys and values made once) and, without a mask, Klein's inpainting
# one (it blends).
_FLUX2_INPAINT = "Flux2KleinInpaintPipeline"
_FLUX2_KV = "Flux2KleinKVPipeline"
_FLUX2_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", _FLUX2_KV, _FLUX2_INPAINT)
# The Z-Image pipelines edit_image maps: text-to-image, img2img, without a mask the
# inpainting one (it blends), and the ControlNet and ControlNet inpainting ones, the
# controlnet on a control image (and the image under a mask); the Omni one gives the
# transformer condition images and SigLIP features.
_Z_IMAGE_PIPELINES = (
    "ZImagePipeline",
    "ZImageImg2ImgPipeline",
    "ZImageInpaintPipeline",
    _Z_PIPELINE,
    _Z_INPAINT_PIPELINE,
)
# The Qwen-Image pipelines edit_image maps: text-to-image, img2img, without a mask the
# inpainting and Edit inpainting ones (they blend), the Edit and Edit Plus ones (and Edit
# inpainting), the image their own (first) reference, and the ControlNet and ControlNet
# inpainting ones, the controlnet on a control image (and a mask); the Layered one gives
# the transformer more than the latents, the prompt, reference images and one
# controlnet's residuals.
_QWEN_EDIT = "QwenImageEditPipeline"
_QWEN_EDIT_PLUS = "QwenImageEditPlusPipeline"
_QWEN_PIPELINES = (
    "QwenImagePipeline",
    "QwenImageImg2ImgPipeline",
    "QwenImageInpaintPipeline",
    _QWEN_EDIT,
    _QWEN_EDIT_PLUS,
    _QWEN_EDIT_INPAINT,
    "QwenImageControlNetPipeline",
    "QwenImageControlNetInpaintPipeline",
)
# The families whose pipelines edit_image maps one by one, by the prefix of their classes'
# names: the family's name, the pipelines mapped, what the others give the transformer
# besides, and which inpainting pipelines are mapped (without a mask).
_MAPPED_PIPELINES = {
    "qwen": (
        "QwenImage",
        "Qwen-Image",
        _QWEN_PIPELINES,
        "latents, the prompt, reference images and one controlnet's residuals",
        "the inpainting ones",
    ),
    "flux2": (
        "Flux2",
        "Flux.2",
        _FLUX2_PIPELINES,
        "latents, the prompt and reference images",
        "the inpainting one",
    ),
    "zimage": (
        "ZImage",
        "Z-Image",
        _Z_IMAGE_PIPELINES,
        "latents, the prompts and one controlnet's residuals (condition images and SigLIP "
        "features)",
        "the inpainting one",
    ),
}
# The static methods of FluxPipeline that make its state and positions.
_FLUX_METHODS = ("_pack_latents", "_unpack_latents", "_prepare_latent_image_ids")
# The pipelines that give their Flux transformer a reference image's tokens (the inpainting
# one the image itself, where it has no image_reference, as the other's image=).
_KONTEXT = ("FluxKontextPipeline", "FluxKontextInpaintPipeline")


@dataclass(frozen=True)
class _Network:
    """The pipeline's network as ``edit_image`` takes it, once checked.

    Attributes:
        unet: the unet or transformer; ``config`` its config (``{}`` where it has none).
        kind: ``_network``'s family: ``"unet"``, ``"pixart"``, ``"sd3"``, ``"flux"``
            (Chroma's too), ``"qwen"``, ``"zimage"`` or ``"flux2"``.
        pipeline: the most derived of the pipeline's Qwen-Image classes (None for another
            family, or a pipeline of no such class), which says how it edits.
        xl: an SDXL unet (``addition_embed_type="text_time"``).
        chroma: Chroma's transformer, called as Flux's.
        latent: the VAE's latent channels.
        inpaint: a 9-channel inpainting unet (the mask and the masked image's latents).
        fill, flux_control: a Flux Fill transformer, or a Depth or Canny one (a control
            image's packed latents besides); ``fill_channels`` the Fill one's channels.
        kontext: a Kontext pipeline: the image is its own reference.
        adapters: the number of IP-Adapters of a unet's or Flux transformer's (None without).
        sd3_image: an SD3 transformer with an IP-Adapter (one, taking one tensor).
    """

    unet: Any
    kind: str
    config: Mapping[str, Any]
    pipeline: str | None
    xl: bool
    chroma: bool
    latent: Any
    inpaint: bool
    fill: bool
    flux_control: bool
    kontext: bool
    fill_channels: Any
    adapters: int | None
    sd3_image: bool

    @property
    def model(self) -> str:
        """``"unet"`` or ``"transformer"``, as the messages name the network."""
        return "unet" if self.kind == "unet" else "transformer"

    @property
    def qwen_edit(self) -> bool:
        """QwenImageEditPipeline or its Plus or inpainting sibling: the image its reference."""
        return self.kind == "qwen" and self.pipeline in (
            _QWEN_EDIT,
            _QWEN_EDIT_PLUS,
            _QWEN_EDIT_INPAINT,
        )


def _network(pipe: Any) -> tuple[Any, str]:
    """The pipeline's unet (then ``"unet"``), or its PixArt, SD3, Flux, Flux.2, Qwen-Image or
    Z-Image transformer (``"pixart"``, ``"sd3"``, ``"flux"``, ``"flux2"``, ``"qwen"``,
    ``"zimage"``; Chroma's, called as Flux's on the same packed latents, is ``"flux"`` too)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return unet, "unet"
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(
            f"the pipeline has neither a unet nor a transformer ({type(pipe).__name__}.unet and "
            ".transformer are missing or None); edit_image needs one to invert and regenerate "
            "the latents"
        )
    names = [c.__name__ for c in type(transformer).__mro__]
    if _SD3 in names:
        return transformer, "sd3"
    if _FLUX in names or _CHROMA in names:
        return transformer, "flux"
    if _QWEN in names:
        return transformer, "qwen"
    if _Z_IMAGE in names:
        return transformer, "zimage"
    if _FLUX2 in names:
        return transformer, "flux2"
    if _PIXART in names:
        return transformer, "pixart"
    raise ValueError(_untaken_transformer(type(transformer).__name__))


def _untaken_transformer(name: str) -> str:
    """Why edit_image does not take a pipeline whose transformer is of class ``name``."""
    return (
        f"the pipeline's transformer is a {name}; of transformers, "
        f"edit_image takes PixArt's {_PIXART} (PixArtSigmaPipeline, PixArtAlphaPipeline), "
        f"Stable Diffusion 3's {_SD3} (StableDiffusion3Pipeline), Flux's "
        f"{_FLUX} (FluxPipeline), Chroma's {_CHROMA} (ChromaPipeline), Qwen-Image's "
        f"{_QWEN} (QwenImagePipeline), Flux.2's {_FLUX2} (Flux2Pipeline, "
        f"Flux2KleinPipeline) and Z-Image's {_Z_IMAGE} (ZImagePipeline), and besides them "
        "the unets of Stable Diffusion and SDXL"
    )


def _takes_transformer(name: str) -> bool:
    """Whether edit_image takes a transformer of the diffusers class ``name`` (a subclass of
    one it takes too); a name diffusers does not know is left to the load to judge."""
    try:
        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError):  # diffusers' lazy import of the class's module
        return True
    if not isinstance(cls, type):
        return True
    return any(c.__name__ in _EDIT_TRANSFORMERS for c in cls.__mro__)


def _pipeline_class(pipe: Any, kind: str) -> str | None:
    """The most derived of the pipeline's Qwen-Image, Flux.2 or Z-Image classes for a
    network of that ``kind`` (None for the other families or where it has none), refused in
    one line where it is a pipeline ``edit_image`` does not map."""
    if kind not in _MAPPED_PIPELINES:
        return None
    prefix, family, mapped, besides, inpainting = _MAPPED_PIPELINES[kind]
    # The most derived of the pipeline's classes of the family says what it does.
    others = [n for n in _class_names(pipe) if n.startswith(prefix)]
    if others and others[0] not in mapped:
        raise ValueError(
            f"the pipeline is a {others[0]}, which gives the transformer more than the "
            f"{besides}; of {family}'s pipelines edit_image maps {', '.join(mapped)} "
            f"({inpainting} without a mask)"
        )
    return others[0] if others else None


def _z_image_options(kind: str, cfg_normalization: Any, cfg_truncation: Any) -> dict[str, Any]:
    """ZImagePipeline's CFG options that were given, passed through to ``from_diffusers``;
    refused for any other network."""
    zimage = kind == "zimage"
    z_options = {
        name: value
        for name, value in (
            ("cfg_normalization", cfg_normalization),
            ("cfg_truncation", cfg_truncation),
        )
        if value is not None
    }
    if z_options and not zimage:
        raise ValueError(
            f"{next(iter(z_options))} is ZImagePipeline's CFG option, but the pipeline's "
            f"{'unet' if kind == 'unet' else 'transformer'} is no Z-Image one; leave it out"
        )
    return z_options


def _check_reference_image(
    pipe: Any, pipeline: str | None, kind: str, reference_image: Any
) -> None:
    """Only QwenImageEditPlusPipeline and Flux.2's text-to-image pipelines take reference
    images (Flux2KleinInpaintPipeline prepares its image_reference otherwise)."""
    if reference_image is not None and pipeline == _FLUX2_INPAINT:
        raise ValueError(
            f"reference_image was given, but the pipeline is a {_FLUX2_INPAINT}, whose "
            "image_reference is prepared otherwise than Flux2KleinPipeline's image= list; edit "
            "with a Flux2KleinPipeline of the same parts (pipe.components)"
        )
    takes = pipeline == _QWEN_EDIT_PLUS or kind == "flux2"
    if reference_image is not None and not takes:
        raise ValueError(
            f"reference_image was given, but the pipeline is a {type(pipe).__name__}; only "
            f"{_QWEN_EDIT_PLUS} (beside the edited image: its image list after the first) and "
            "Flux.2's pipelines (their image= list) take reference images; leave it out"
        )


def _check_network(
    pipe: Any,
    vae: Any,
    unet: Any,
    kind: str,
    pipeline: str | None,
    ip_adapter_image: Any,
    ip_adapter_image_embeds: Any,
) -> _Network:
    """Check, in ``edit_image``'s order, the VAE's config and statistics, the unet's added
    conditioning, the image prompt against the network's IP-Adapters and the network's
    channels against the VAE's latents (and the parts of the pipeline its family needs),
    and say what the network takes."""
    sd3, flux, qwen, flux2 = kind == "sd3", kind == "flux", kind == "qwen", kind == "flux2"
    chroma = flux and _is_chroma(unet)
    model = "unet" if kind == "unet" else "transformer"
    # Qwen-Image's video VAE has no scaling_factor: its latents_mean and latents_std
    # normalise the latents, one per channel of z_dim. Flux.2's has none either: its
    # batch-norm statistics normalise them.
    scaled = ("scaling_factor", "latent_channels")
    for name in ("z_dim",) if qwen else scaled[1:] if flux2 else scaled:
        if getattr(vae.config, name, None) is None:
            raise ValueError(f"the pipeline's vae has no config.{name}; it is not a latent VAE")
    # Refuses bad statistics (Qwen-Image's missing ones too) before any network runs.
    (_frame_stats if qwen else _latent_stats)(vae.config)
    unet_config = getattr(unet, "config", None) or {}
    addition = unet_config.get("addition_embed_type")
    xl = addition == _TEXT_TIME
    # A 'text' added embedding is the unet's own pooling of encoder_hidden_states: it needs
    # no added_cond_kwargs, and the unet takes it as Stable Diffusion's. (SD3's transformer
    # has neither field.)
    if addition not in (None, _TEXT, _TEXT_TIME):
        raise ValueError(
            f"the unet has addition_embed_type = {addition!r}: it needs added conditioning "
            f"(image embeddings or hints) that edit_image does not make (it takes {_TEXT!r}, "
            f"from the prompt embeddings, and makes SDXL's, {_TEXT_TIME!r}); use "
            "from_diffusers with the unet's arguments and bdia.Inversion directly"
        )
    # An IP-Adapter's image prompt goes to both ODEs; another image projection takes
    # image_embeds that edit_image does not make, and diffusers' own error would come after
    # the VAE has run.
    adapters = _ip_adapters(unet) if kind in ("unet", "flux") else None
    # SD3's one adapter takes one tensor, not a list; without an image prompt its
    # processors attend to the text alone, as the pipeline runs then.
    sd3_image = sd3 and getattr(unet, "image_proj", None) is not None
    if sd3_image:
        _check_sd3_image_prompt(pipe, ip_adapter_image, ip_adapter_image_embeds)
    else:
        _check_image_prompt(
            pipe,
            _hid_dim_type(unet_config),
            adapters,
            ip_adapter_image,
            ip_adapter_image_embeds,
            model,
            (3,) if flux else (3, 4),  # Flux's loader makes no IP-Adapter Plus resampler
        )
    # An inpainting unet takes the mask and the masked image's latents beside the latents.
    latent = _latent_channels(vae.config)
    inpaint = kind == "unet" and unet_config.get("in_channels") == 2 * latent + 1
    fill = kontext = flux_control = False
    fill_channels = None
    if flux:
        fill, flux_control, kontext, fill_channels = _check_flux_channels(
            pipe, vae, unet_config, chroma
        )
    elif flux2:
        _check_flux2_channels(pipe, vae, unet_config, latent)
    elif qwen:
        _check_qwen_channels(pipe, unet_config, latent, pipeline)
    elif unet_config.get("in_channels") != vae.config.latent_channels and not inpaint:
        # SD3's inpainting transformer (2 x 16 + 1 channels, StableDiffusion3InpaintPipeline's
        # other mode, which does not blend) is not mapped.
        besides = (
            f"or an inpainting unet of 2 x {latent} + 1 (not a depth unet)"
            if model == "unet"
            else "not an inpainting one (the mask's and the masked image's channels besides)"
        )
        raise ValueError(
            f"the {model} takes in_channels = {unet_config.get('in_channels')} but the vae makes "
            f"latent_channels = {vae.config.latent_channels}; edit_image needs a text-to-image "
            f"{model} of the vae's latents, {besides}"
        )
    return _Network(
        unet=unet,
        kind=kind,
        config=unet_config,
        pipeline=pipeline,
        xl=xl,
        chroma=chroma,
        latent=latent,
        inpaint=inpaint,
        fill=fill,
        flux_control=flux_control,
        kontext=kontext,
        fill_channels=fill_channels,
        adapters=adapters,
        sd3_image=sd3_image,
    )


def _check_flux_channels(
    pipe: Any, vae: Any, unet_config: Mapping[str, Any], chroma: bool
) -> tuple[bool, bool, bool, int]:
    """Refuse a Flux (Chroma) pipeline without the parts that pack its latents and embed its
    prompts, or a transformer that takes neither the VAE's packed latents nor a Fill or a
    Depth or Canny transformer's channels; return whether it is a Fill one, a Depth or
    Canny one, a Kontext pipeline, and a Fill transformer's channels."""
    for name in _FLUX_METHODS:
        _part(pipe, name, "to pack the latents into the tokens a Flux transformer takes")
    _part(pipe, "encode_prompt", "to make the prompts' text_ids, as FluxPipeline does")
    if chroma:
        _part(
            pipe,
            "_prepare_attention_mask",
            "to extend the prompts' masks, as ChromaPipeline does",
        )
    # The packed latents: the VAE's channels in 2 x 2 patches.
    packed = vae.config.latent_channels * _FLUX_PACKING**2
    # A Fill transformer takes the masked image's packed latents and the packed mask too.
    fill_channels = _fill_channels(pipe, vae)
    fill = (unet_config.get("in_channels"), unet_config.get("out_channels")) == (
        fill_channels,
        packed,
    )
    # A Depth or Canny transformer takes a control image's packed latents too.
    flux_control = (unet_config.get("in_channels"), unet_config.get("out_channels")) == (
        2 * packed,
        packed,
    )
    kontext = bool(set(_KONTEXT) & set(_class_names(pipe)))
    if kontext:
        _part(pipe, "prepare_latents", "to encode the reference image as the pipeline does")
    if unet_config.get("in_channels") != packed and not (fill or flux_control):
        raise ValueError(
            f"the transformer takes in_channels = {unet_config.get('in_channels')} but the "
            f"vae's latent_channels = {vae.config.latent_channels} packed in 2 x 2 patches "
            f"make {packed}; edit_image needs a text-to-image Flux transformer of the vae's "
            f"latents, a Fill one of {fill_channels} (the masked image's and the mask's "
            f"besides) or a Depth or Canny one of {2 * packed} (a control image's besides)"
        )
    return fill, flux_control, kontext, fill_channels


def _check_flux2_channels(pipe: Any, vae: Any, unet_config: Mapping[str, Any], latent: Any) -> None:
    """Refuse a Flux.2 pipeline without its parts, or a transformer not of the VAE's
    patchified latents."""
    _check_flux2_parts(pipe, vae)
    if unet_config.get("in_channels") != latent * _FLUX_PACKING**2:
        raise ValueError(
            f"the transformer takes in_channels = {unet_config.get('in_channels')} but the "
            f"vae's latent_channels = {latent} patchified in 2 x 2 patches make "
            f"{latent * _FLUX_PACKING**2}; edit_image needs a Flux.2 transformer of the "
            "vae's latents"
        )


def _check_qwen_channels(
    pipe: Any, unet_config: Mapping[str, Any], latent: Any, pipeline: str | None
) -> None:
    """Refuse a Qwen-Image pipeline without the parts that embed the prompts, pack the
    latents and (the Edit ones) encode the reference image, or a transformer not of the
    VAE's packed latents."""
    qwen_edit = pipeline in (_QWEN_EDIT, _QWEN_EDIT_PLUS, _QWEN_EDIT_INPAINT)
    _part(pipe, "encode_prompt", "to take the prompts as QwenImagePipeline does")
    for name in _FLUX_METHODS[:2]:
        _part(pipe, name, "to pack the latents into the tokens Qwen-Image's transformer takes")
    if qwen_edit:
        _part(pipe, "prepare_latents", "to encode the reference images as the pipeline does")
    if unet_config.get("in_channels") != latent * _FLUX_PACKING**2:
        raise ValueError(
            f"the transformer takes in_channels = {unet_config.get('in_channels')} but the "
            f"vae's z_dim = {latent} latent channels packed in 2 x 2 patches make "
            f"{latent * _FLUX_PACKING**2}; edit_image needs a text-to-image Qwen-Image "
            "transformer of the vae's latents"
        )
