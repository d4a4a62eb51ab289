"""Tiny randomly initialised diffusers models, built from config with nothing downloaded.

Stand-ins with the call contract of real ones (a ``UNet2DModel``, a ``UNet2DConditionModel``,
Stable Diffusion 3's ``SD3Transformer2DModel``, Flux's ``FluxTransformer2DModel``, a
``ControlNetModel``, a whole ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` (SDXL's,
or Playground v2.5's with an EDM-preconditioned scheduler) and SDXL's refiner
(``StableDiffusionXLImg2ImgPipeline``), their ControlNet pipelines (text-to-image and
img2img), ``StableDiffusion3Pipeline`` or ``FluxPipeline`` with CLIP and T5 tokenizers made
from a vocabulary written locally, ``FluxFillPipeline``, ``FluxControlPipeline`` and
``FluxKontextPipeline``, Chroma's ``ChromaTransformer2DModel`` and ``ChromaPipeline`` (T5
alone), PixArt's ``PixArtTransformer2DModel``, ``PixArtSigmaPipeline`` and
``PixArtAlphaPipeline`` (T5 alone, eps and its learned variance), Sana's
``SanaTransformer2DModel`` and ``SanaPipeline`` (without its text encoder), Wan's
``WanTransformer3DModel`` and ``WanPipeline`` (without its text encoder), the ControlNet pipelines
of Flux (``FluxControlNetModel``, ``FluxControlNetPipeline``) and SD3 (``SD3ControlNetModel``,
``StableDiffusion3ControlNetPipeline``, and with a mask
channel ``StableDiffusion3ControlNetInpaintingPipeline``), the inpainting pipelines of Stable
Diffusion and SDXL and their ControlNet inpainting pipelines, Stable Diffusion's, SDXL's,
Flux's or SD3's pipeline with an IP-Adapter loaded, and Qwen-Image's
``QwenImageTransformer2DModel``, ``QwenImagePipeline`` (with or without a Qwen2.5-VL text
encoder and a Qwen2 tokenizer made locally), and ``QwenImageEditPipeline``,
``QwenImageEditPlusPipeline`` and ``QwenImageControlNetPipeline`` with a
``QwenImageControlNetModel``, without their text encoder), Z-Image's
``ZImageTransformer2DModel`` and ``ZImagePipeline``, with a ``ZImageControlNetModel`` its
``ZImageControlNetPipeline`` and ``ZImageControlNetInpaintPipeline``, and Flux.2's
``Flux2Transformer2DModel``, ``Flux2Pipeline`` and ``Flux2KleinPipeline`` (with an
``AutoencoderKLFlux2``; FLUX.2-dev's without its Mistral text encoder, Z-Image's and
Klein's with or without a Qwen3 one and a Qwen2 tokenizer made locally), a few thousand
weights each: for tests and for checking plumbing and exactness, which do not depend on the
weights. A random network is no denoiser, so what they sample is not an image of anything.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch

__all__ = [
    "SD_NOISE_TABLE",
    "PIXART_NOISE_TABLE",
    "FLUX_DEV_SCHEDULER",
    "QWEN_IMAGE_SCHEDULER",
    "Z_IMAGE_SCHEDULER",
    "SANA_SCHEDULER",
    "WAN_SCHEDULER",
    "tiny_unet",
    "tiny_sd3_transformer",
    "tiny_flux_transformer",
    "tiny_chroma_transformer",
    "tiny_qwen_image_transformer",
    "tiny_flux2_transformer",
    "tiny_flux2_pipeline",
    "tiny_flux2_klein_pipeline",
    "tiny_qwen_text_encoder",
    "tiny_qwen3_text_encoder",
    "tiny_tokenizer",
    "tiny_text_to_image_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_sdxl_refiner_pipeline",
    "tiny_playground_pipeline",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_chroma_pipeline",
    "tiny_pixart_transformer",
    "tiny_pixart_pipeline",
    "tiny_sana_transformer",
    "tiny_sana_pipeline",
    "tiny_wan_transformer",
    "tiny_wan_pipeline",
    "tiny_flux_fill_pipeline",
    "tiny_flux_control_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_mistral3_text_encoder",
    "tiny_flux2_klein_kv_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_qwen_image_edit_pipeline",
    "tiny_qwen_image_edit_plus_pipeline",
    "tiny_qwen_image_controlnet",
    "tiny_qwen_image_controlnet_pipeline",
    "tiny_z_image_transformer",
    "tiny_z_image_pipeline",
    "tiny_z_image_controlnet",
    "tiny_z_image_controlnet_pipeline",
    "tiny_qwen_image_controlnet_inpaint_pipeline",
    "tiny_flux_controlnet",
    "tiny_flux_controlnet_pipeline",
    "tiny_sd3_controlnet",
    "tiny_sd3_controlnet_pipeline",
    "tiny_sd3_controlnet_inpaint_pipeline",
    "tiny_controlnet",
    "tiny_controlnet_pipeline",
    "tiny_inpaint_pipeline",
    "tiny_controlnet_inpaint_pipeline",
    "tiny_ip_adapter_pipeline",
    "add_tiny_ip_adapter",
    "tiny_flux_ip_adapter_pipeline",
    "add_tiny_flux_ip_adapter",
    "add_tiny_sd3_ip_adapter",
    "TINY_WORDS",
    "ZERO_SNR_DDIM",
]

#: Stable Diffusion's noise table (SD 1.x and SDXL alike), as scheduler keyword arguments.
SD_NOISE_TABLE: dict[str, Any] = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)

#: A DDIMScheduler config of a zero-terminal-SNR v-prediction model of Stable Diffusion's
#: table (Lin et al. 2024), as keyword arguments: the table rescaled to end at 0, sampled
#: from that last timestep (trailing spacing).
ZERO_SNR_DDIM: dict[str, Any] = dict(
    **SD_NOISE_TABLE,
    clip_sample=False,
    set_alpha_to_one=False,
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
)

#: PixArt-alpha's and PixArt-Sigma's noise table (linear betas), as scheduler keyword
#: arguments.
PIXART_NOISE_TABLE: dict[str, Any] = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
#: Flux.1-dev's FlowMatchEulerDiscreteScheduler config, as keyword arguments: shift 3 and
#: resolution-dependent shifting from 0.5 (256 image tokens) to 1.15 (4096 tokens).
FLUX_DEV_SCHEDULER: dict[str, Any] = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

#: Qwen-Image's FlowMatchEulerDiscreteScheduler config, as keyword arguments: exponential
#: resolution-dependent shifting from 0.5 (256 image tokens) to 0.9 (8192 tokens), the sigmas
#: stretched to end at 0.02 before the final 0.
QWEN_IMAGE_SCHEDULER: dict[str, Any] = dict(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)

#: A DPMSolverMultistepScheduler config of Sana's kind, as keyword arguments: flow sigmas of
#: shift 3, the transformer called at their integer timesteps.
SANA_SCHEDULER: dict[str, Any] = dict(
    use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
)

#: A UniPCMultistepScheduler config of Wan's kind, as keyword arguments: flow sigmas of shift
#: 3, the transformer called at their integer timesteps.
WAN_SCHEDULER: dict[str, Any] = dict(
    use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
)

#: Z-Image-Turbo's FlowMatchEulerDiscreteScheduler config, as keyword arguments: shift 3, no
#: resolution-dependent shifting (ZImagePipeline passes a mu that this config ignores).
Z_IMAGE_SCHEDULER: dict[str, Any] = dict(shift=3.0, use_dynamic_shifting=False)

#: The words the tiny tokenizer knows whole (any other word is spelled letter by letter).
TINY_WORDS = ("a", "photo", "painting", "of", "cat", "dog", "fox", "red", "blue")


def tiny_unet(
    *,
    conditional: bool = False,
    channels: int = 3,
    cross_attention_dim: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """A ``UNet2DModel`` (or, with ``conditional``, a ``UNet2DConditionModel`` with
    cross-attention of width ``cross_attention_dim``) on ``(batch, channels, 8, 8)`` inputs,
    weights drawn with ``torch.manual_seed(seed)``, in eval mode and ``dtype``."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
    )
    if conditional:
        config.update(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=2,
        )
        config.update(overrides)
        net = diffusers.UNet2DConditionModel(**config)
    else:
        config.update(
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )
        config.update(overrides)
        net = diffusers.UNet2DModel(**config)
    return net.to(dtype).eval()


def _built(
    cls: Any, config: dict[str, Any], overrides: Mapping[str, Any], dtype: torch.dtype
) -> torch.nn.Module:
    """``cls(**config)`` with ``overrides`` added to or replacing its fields, in eval mode and
    ``dtype`` (its weights drawn from torch's generator as it stands)."""
    net = cls(**{**config, **overrides})
    # diffusers warns of any cast with .to(dtype), needed or not.
    return (net if dtype == torch.float32 else net.to(dtype)).eval()


def tiny_sd3_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """An ``SD3Transformer2DModel`` with one joint block on ``(batch, 4, 8, 8)`` latents
    (patches of 2 x 2), text tokens of width 16 (``encoder_hidden_states`` of shape
    ``(batch, L, 16)``) and pooled embeddings of width 8 (``pooled_projections`` of shape
    ``(batch, 8)``); weights drawn with ``torch.manual_seed(seed)``, in eval mode and
    ``dtype``. ``overrides`` add to or replace fields of its config."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
    )
    return _built(diffusers.SD3Transformer2DModel, config, overrides, dtype)


# The blocks of the tiny Flux and Chroma transformers: one double-stream and one
# single-stream block of width 16 on packed latents of 16 channels and text tokens of width 16.
_TINY_FLUX_BLOCKS: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(2, 2, 4),
)


def tiny_flux_transformer(
    *,
    guidance_embeds: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """A ``FluxTransformer2DModel`` with one double-stream and one single-stream block on
    packed latents of shape ``(batch, tokens, 16)`` (4 latent channels in patches of 2 x 2, as
    ``FluxPipeline._pack_latents`` makes them), text tokens of width 16
    (``encoder_hidden_states`` of shape ``(batch, L, 16)``), pooled embeddings of width 8
    (``pooled_projections`` of shape ``(batch, 8)``) and position ids ``txt_ids`` of shape
    ``(L, 3)`` and ``img_ids`` of shape ``(tokens, 3)``. With ``guidance_embeds`` (Flux.1-dev)
    it embeds a guidance scale, ``guidance`` of shape ``(batch,)``; without it, it is
    timestep-distilled as Flux.1-schnell. Weights drawn with ``torch.manual_seed(seed)``, in
    eval mode and ``dtype``; ``overrides`` add to or replace fields of its config."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        _TINY_FLUX_BLOCKS, pooled_projection_dim=8, guidance_embeds=guidance_embeds
    )
    return _built(diffusers.FluxTransformer2DModel, config, overrides, dtype)


def tiny_chroma_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A ``ChromaTransformer2DModel`` with one double-stream and one
    single-stream block on packed latents of shape ``(batch, tokens, 16)``, as
    ``tiny_flux_transformer``'s, text tokens of width 16 (``encoder_hidden_states`` of shape
    ``(batch, L, 16)``, T5's alone: no pooled embeddings, no guidance embedding), position ids
    ``txt_ids`` of shape ``(L, 3)`` and ``img_ids`` of shape ``(tokens, 3)``, an
    ``attention_mask`` of shape ``(batch, L + tokens)``, and a one-layer modulation
    approximator of width 16. Weights drawn with ``torch.manual_seed(seed)``, in eval mode
    and ``dtype``; ``overrides`` add to or replace fields of its config."""
    if not hasattr(diffusers, "ChromaTransformer2DModel"):
        raise ImportError(
            f"diffusers {diffusers.__version__} has no ChromaTransformer2DModel (0.34 and "
            "later have it)"
        )
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        _TINY_FLUX_BLOCKS,
        approximator_num_channels=16,
        approximator_hidden_dim=16,
        approximator_layers=1,
    )
    return _built(diffusers.ChromaTransformer2DModel, config, overrides, dtype)


def tiny_pixart_transformer(
    *,
    micro_conditions: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """A ``PixArtTransformer2DModel`` with two blocks of width 24 on 4 x 8 x 8 latents in
    patches of 2 x 2, predicting eps and its learned variance (``out_channels`` 8, as
    PixArt-alpha's and PixArt-Sigma's), with captions of width 16 (T5's
    ``encoder_hidden_states`` of shape ``(batch, L, 16)``). ``micro_conditions``: the
    resolution and aspect-ratio embeddings of PixArt-alpha's 1024 model
    (``use_additional_conditions``, with ``sample_size`` 128 so that ``PixArtAlphaPipeline``
    passes them), which then take ``added_cond_kwargs={"resolution": (batch, 2),
    "aspect_ratio": (batch, 1)}``; otherwise ``sample_size`` 8. Weights drawn with
    ``torch.manual_seed(seed)``, in eval mode and ``dtype``; ``overrides`` add to or replace
    fields of its config."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        num_attention_heads=2,
        # A width divisible by 3: the micro-conditions take a third of it each for the
        # height, the width and the aspect ratio.
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,
        caption_channels=16,
        sample_size=128 if micro_conditions else 8,
        patch_size=2,
        use_additional_conditions=micro_conditions,
    )
    return _built(diffusers.PixArtTransformer2DModel, config, overrides, dtype)


def tiny_pixart_pipeline(scheduler: Any = None, *, alpha: bool = False) -> Any:
    """A float32 ``PixArtSigmaPipeline`` (``alpha``: ``PixArtAlphaPipeline``, its transformer
    with ``micro_conditions``) of tiny random parts on 16 x 16 RGB images:
    ``tiny_flux_pipeline``'s T5 encoder and tokenizer (prompt embeddings of shape ``(batch,
    L, 16)`` for ``max_sequence_length=L``), ``tiny_pixart_transformer`` and
    ``tiny_text_to_image_pipeline``'s VAE. ``scheduler`` defaults to PixArt's
    ``DPMSolverMultistepScheduler(**PIXART_NOISE_TABLE)``. Call it with
    ``use_resolution_binning=False`` (it would resize a 16 x 16 request to its smallest
    aspect-ratio bin, 256 x 256 and up) and ``clean_caption=False`` (its caption cleaning
    needs beautifulsoup4 and ftfy). The progress bar is off."""
    transformer = tiny_pixart_transformer(micro_conditions=alpha)
    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _tiny_t5_encoder(tokenizer)
    if scheduler is None:
        scheduler = diffusers.DPMSolverMultistepScheduler(**PIXART_NOISE_TABLE)
    cls = diffusers.PixArtAlphaPipeline if alpha else diffusers.PixArtSigmaPipeline
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A ``SanaTransformer2DModel`` with one linear-attention block of width 8 on 4 x 8 x 8
    latents (patches of 1 x 1), predicting the velocity (``out_channels`` 4; 8 gives it
    Sana's learned-variance half, which its pipeline drops), with captions of width 16
    (Gemma's ``encoder_hidden_states`` of shape ``(batch, L, 16)``, their mask
    ``encoder_attention_mask`` of shape ``(batch, L)``). Weights drawn with
    ``torch.manual_seed(seed)``, in eval mode and ``dtype``; ``overrides`` add to or replace
    fields of its config (``timestep_scale``, say)."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=16,
        sample_size=8,
        patch_size=1,
    )
    return _built(diffusers.SanaTransformer2DModel, config, overrides, dtype)


def tiny_sana_pipeline(scheduler: Any = None, **overrides: Any) -> Any:
    """A float32 ``SanaPipeline`` of tiny random parts on 32 x 32 RGB images (the smallest
    size it takes: a multiple of 32), without a text encoder or tokenizer: give it
    ``prompt_embeds`` and ``prompt_attention_mask`` of width 16 (and, under guidance,
    ``negative_prompt_embeds`` with their mask, and ``negative_prompt=None``), and
    ``use_resolution_binning=False``. ``tiny_sana_transformer(**overrides)`` on 4 x 8 x 8
    latents and an ``AutoencoderDC`` of 4 latent channels that quarters the image's size
    (``vae_scale_factor`` 4, seed 1). ``scheduler`` defaults to Sana's
    ``DPMSolverMultistepScheduler(**SANA_SCHEDULER)``. The progress bar is off. diffusers
    imports the pipeline with transformers' Gemma 2, in transformers 4.42 and newer."""
    torch.manual_seed(1)
    blocks = 3  # vae_scale_factor 2 ** (blocks - 1)
    vae = diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * blocks,
        decoder_block_types=("ResBlock",) * blocks,
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        encoder_layers_per_block=(1,) * blocks,
        decoder_layers_per_block=(1,) * blocks,
        encoder_qkv_multiscales=((),) * blocks,
        decoder_qkv_multiscales=((),) * blocks,
        decoder_norm_types="batch_norm",
    ).eval()
    if scheduler is None:
        scheduler = diffusers.DPMSolverMultistepScheduler(**SANA_SCHEDULER)
    pipe = diffusers.SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=tiny_sana_transformer(**overrides),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_video_vae(cls: Any) -> torch.nn.Module:
    """A video VAE of Wan's kind (``AutoencoderKLWan``, or Qwen-Image's
    ``AutoencoderKLQwenImage`` made from it) of 4 latent channels that halves an image's size
    and keeps its frames, its latents' statistics 0 and 1; weights drawn with seed 1, in eval
    mode."""
    torch.manual_seed(1)
    return cls(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


def tiny_wan_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A text-to-video ``WanTransformer3DModel`` with one block of width 16 on video latents
    of shape ``(batch, 4, frames, h, w)`` (patches of 1 x 2 x 2), with prompt embeddings of
    width 16 (UMT5's ``encoder_hidden_states`` of shape ``(batch, L, 16)``). Weights drawn
    with ``torch.manual_seed(seed)``, in eval mode and ``dtype``; ``overrides`` add to or
    replace fields of its config (``image_dim``, say, for an image-to-video one)."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    )
    return _built(diffusers.WanTransformer3DModel, config, overrides, dtype)


def tiny_wan_pipeline(
    scheduler: Any = None,
    *,
    boundary_ratio: float | None = None,
    expand_timesteps: bool = False,
    **overrides: Any,
) -> Any:
    """A float32 ``WanPipeline`` of tiny random parts, without a text encoder or tokenizer:
    give it ``prompt_embeds`` of width 16 (and, under guidance, ``negative_prompt_embeds``)
    and ``latents`` of shape ``(batch, 4, frames, h, w)``. ``tiny_wan_transformer(
    **overrides)`` and an ``AutoencoderKLWan`` of 4 latent channels (seed 1); with
    ``boundary_ratio``, Wan 2.2's two experts: a second transformer of seed 1 as
    ``transformer_2``, called below that ratio of the timesteps; with ``expand_timesteps``,
    Wan 2.2 TI2V-5B's timestep per token (either needs diffusers 0.35 or newer).
    ``scheduler`` defaults to Wan's ``UniPCMultistepScheduler(**WAN_SCHEDULER)``.
    The progress bar is off."""
    experts: dict[str, Any] = {}
    if boundary_ratio is not None or expand_timesteps:
        if "transformer_2" not in inspect.signature(diffusers.WanPipeline.__init__).parameters:
            raise ImportError(
                f"WanPipeline takes transformer_2 and expand_timesteps in diffusers 0.35 and "
                f"newer; this is {diffusers.__version__}"
            )
    if boundary_ratio is not None:
        experts = dict(
            transformer_2=tiny_wan_transformer(seed=1, **overrides), boundary_ratio=boundary_ratio
        )
    if expand_timesteps:
        experts["expand_timesteps"] = True
    vae = _tiny_video_vae(diffusers.AutoencoderKLWan)
    if scheduler is None:
        scheduler = diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER)
    pipe = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=tiny_wan_transformer(**overrides),
        scheduler=scheduler,
        **experts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _recent_class(name: str, since: str) -> Any:
    """diffusers' ``name``, a class of a recent release (Qwen-Image's, Z-Image's, Flux.2's),
    or ImportError before diffusers ``since``."""
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ImportError(
            f"{name} is in diffusers {since} and newer; this is {diffusers.__version__}"
        )
    return cls


def tiny_qwen_image_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A ``QwenImageTransformer2DModel`` with one block on packed latents of shape ``(batch,
    tokens, 16)`` (4 latent channels in patches of 2 x 2, as ``QwenImagePipeline._pack_latents``
    makes them: ``in_channels=16``, ``out_channels=4``) and text tokens of width 16
    (``encoder_hidden_states`` of shape ``(batch, L, 16)`` with ``encoder_hidden_states_mask``
    of ``(batch, L)``). Weights drawn with ``torch.manual_seed(seed)``, in eval mode and
    ``dtype``; ``overrides`` add to or replace fields of its config. Needs diffusers 0.35 or
    newer."""
    cls = _recent_class("QwenImageTransformer2DModel", "0.35")
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    return _built(cls, config, overrides, dtype)


def tiny_flux2_transformer(
    *,
    guidance_embeds: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """A ``Flux2Transformer2DModel`` with one double-stream and one single-stream block of
    width 16 on packed latents of shape ``(batch, tokens, 16)`` (4 latent channels in patches
    of 2 x 2, as ``Flux2Pipeline._patchify_latents`` and ``_pack_latents`` make them), text
    tokens of width 16 (``encoder_hidden_states`` of shape ``(batch, L, 16)``), no pooled
    embeddings, and position ids of 4 axes, ``txt_ids`` ``(L, 4)`` and ``img_ids`` ``(tokens,
    4)`` (or batched, ``(batch, L, 4)``, as the pipeline passes them). With
    ``guidance_embeds`` (FLUX.2-dev) it embeds a guidance scale, ``guidance`` of shape
    ``(batch,)``; without it, it is FLUX.2-klein's kind. Weights drawn with
    ``torch.manual_seed(seed)``, in eval mode and ``dtype``; ``overrides`` add to or replace
    fields of its config. Needs diffusers 0.36 or newer."""
    cls = _recent_class("Flux2Transformer2DModel", "0.36")
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
    )
    # diffusers 0.36's Flux2Transformer2DModel has no guidance_embeds: it always embeds one
    # (FLUX.2-dev's kind), and FLUX.2-klein's kind came with 0.37.
    if "guidance_embeds" in inspect.signature(cls.__init__).parameters:
        config["guidance_embeds"] = guidance_embeds
    elif not guidance_embeds:
        raise ImportError(
            "a Flux2Transformer2DModel without guidance embedding (FLUX.2-klein's kind) is in "
            f"diffusers 0.37 and newer; this is {diffusers.__version__}"
        )
    return _built(cls, config, overrides, dtype)


def _tiny_flux2_vae() -> Any:
    """An ``AutoencoderKLFlux2`` of RGB images to 4-channel latents of half their size (seed
    1), whose batch-norm statistics over the 16 patchified channels are drawn too (seed 6:
    means in [-0.5, 0.5), variances in [0.5, 1.5)), so that the pipelines' normalisation of
    the latents is not the identity."""
    torch.manual_seed(1)
    vae = _recent_class("AutoencoderKLFlux2", "0.36")(**_TINY_VAE_BLOCKS)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.rand(16, generator=g) - 0.5)
        vae.bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    return vae.eval()


def tiny_flux2_pipeline(
    scheduler: Any = None, *, guidance_embeds: bool = True, text_encoder: bool = False
) -> Any:
    """A float32 ``Flux2Pipeline`` of tiny random parts on RGB images, without its Mistral
    text encoder and processor: give it ``prompt_embeds`` of width 16. With ``text_encoder``,
    ``tiny_mistral3_text_encoder()``'s tokenizer and ``Mistral3ForConditionalGeneration``,
    which its ``encode_prompt`` embeds text prompts with (the hidden states of layers 10, 20
    and 30 side by side), and a transformer that takes them (``joint_attention_dim=48``; needs
    transformers 4.50 or newer). ``tiny_flux2_transformer(
    guidance_embeds=guidance_embeds)`` on the packed latents of shape ``(batch, 16, 16)`` for
    16 x 16 images (4 x 8 x 8 latents in patches of 2 x 2), and an ``AutoencoderKLFlux2`` of
    4 latent channels that halves the image's size, with drawn batch-norm statistics.
    Reference images (``image=``) are PIL images of 64 pixels a side at least, as the
    pipeline checks them: 256 tokens for 64 x 64. ``scheduler`` defaults to
    ``FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)`` (the pipeline passes it its own
    mu, ``compute_empirical_mu``, whatever the config's shifts). The progress bar is off.
    Needs diffusers 0.36 or newer, which has the pipeline."""
    pipeline = _recent_class("Flux2Pipeline", "0.36")
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    tokenizer, encoder = None, None
    width: dict[str, Any] = {}
    if text_encoder:
        tokenizer, encoder = tiny_mistral3_text_encoder()
        width = {"joint_attention_dim": 48}
    transformer = tiny_flux2_transformer(guidance_embeds=guidance_embeds, **width)
    pipe = pipeline(
        scheduler=scheduler,
        vae=_tiny_flux2_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_klein_pipeline(
    scheduler: Any = None, *, is_distilled: bool = False, text_encoder: bool = False
) -> Any:
    """A ``Flux2KleinPipeline`` of ``tiny_flux2_pipeline``'s parts with a transformer without
    guidance embedding (FLUX.2-klein's kind), without its Qwen3 text encoder and tokenizer:
    give it ``prompt_embeds`` (and ``negative_prompt_embeds`` for its true CFG, which it runs
    for ``guidance_scale > 1`` unless ``is_distilled``). With ``text_encoder``,
    ``tiny_qwen3_text_encoder(num_layers=28, causal_lm=True)``'s tokenizer and
    ``Qwen3ForCausalLM`` (seed 0), which its ``encode_prompt`` embeds text prompts with, the
    hidden states of layers 9, 18 and 27 side by side, and a transformer that takes them
    (``joint_attention_dim=48``, the same seed; needs transformers 4.51 or newer). Float32;
    the progress bar is off. Needs diffusers 0.37 or newer, which has the pipeline."""
    pipeline = _recent_class("Flux2KleinPipeline", "0.37")
    parts = tiny_flux2_pipeline(scheduler, guidance_embeds=False).components
    if text_encoder:
        tokenizer, encoder = tiny_qwen3_text_encoder(num_layers=28, causal_lm=True)
        transformer = tiny_flux2_transformer(guidance_embeds=False, joint_attention_dim=48)
        parts.update(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer)
    pipe = pipeline(**parts, is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_klein_kv_pipeline(scheduler: Any = None, *, text_encoder: bool = False) -> Any:
    """A ``Flux2KleinKVPipeline`` of ``tiny_flux2_klein_pipeline``'s parts (its transformer's
    attention processors replaced by the key-value-cache ones, as the pipeline does when it
    is made), which runs no CFG and calls its transformer on its reference images' tokens
    once, at its first step, caching their keys and values. Float32; the progress bar is
    off. Needs diffusers 0.38 or newer, which has the pipeline."""
    pipeline = _recent_class("Flux2KleinKVPipeline", "0.38")
    parts = tiny_flux2_klein_pipeline(scheduler, text_encoder=text_encoder).components
    pipe = pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer(folder: str | Path, words: Sequence[str] = TINY_WORDS) -> Any:
    """A CLIP BPE tokenizer (16 tokens long) whose merges build each of ``words`` from its
    letters; its vocab.json and merges.txt are written into ``folder``."""
    import transformers

    folder = Path(folder)
    vocab: dict[str, int] = {}
    merges = ["#version: 0.2"]
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


def _tiny_text_encoder(tokenizer: Any, projection_dim: int | None = None, **config: Any) -> Any:
    """A CLIP text encoder on ``tokenizer``'s vocabulary, in eval mode: a ``CLIPTextModel``,
    or with ``projection_dim`` a ``CLIPTextModelWithProjection``; of width 16 unless
    ``config`` sets ``hidden_size``, as it may set any other field of ``CLIPTextConfig``."""
    import transformers

    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=end,
        pad_token_id=end,
    )
    settings.update(config)
    if projection_dim is None:
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**settings)).eval()
    settings["projection_dim"] = projection_dim
    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**settings)).eval()


# The blocks of the tiny VAEs (AutoencoderKL's, AutoencoderKLFlux2's): RGB images to 4-channel
# latents of half their size.
_TINY_VAE_BLOCKS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def _tiny_vae(dtype: torch.dtype = torch.float32, **config: Any) -> Any:
    """An ``AutoencoderKL`` of 16 x 16 RGB images to 4 x 8 x 8 latents, seed 1, in eval mode;
    ``config`` adds to or overrides its config (the weights do not depend on settings such as
    ``scaling_factor`` or ``latents_mean``)."""
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(**_TINY_VAE_BLOCKS, **config)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def tiny_text_to_image_pipeline(folder: str | Path, scheduler: Any = None) -> Any:
    """A float32 ``StableDiffusionPipeline`` of tiny random parts on 16 x 16 RGB images.

    A one-layer ``CLIPTextModel`` (width 16) with ``tiny_tokenizer(folder)``, a conditional
    ``tiny_unet`` on 4 x 8 x 8 latents and an ``AutoencoderKL`` with downsampling factor 2.
    ``scheduler`` defaults to SD 1.5's DDIM settings (``set_alpha_to_one=False``,
    ``steps_offset=1``, no clipping). The progress bar is off.
    """
    tokenizer = tiny_tokenizer(folder)
    torch.manual_seed(0)
    text_encoder = _tiny_text_encoder(tokenizer)
    unet = tiny_unet(conditional=True, channels=4, cross_attention_dim=16)
    if scheduler is None:
        scheduler = diffusers.DDIMScheduler(
            clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
    pipe = diffusers.StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_text_encoders(tokenizer: Any) -> tuple[Any, Any]:
    """SDXL's two CLIP text encoders on ``tokenizer``'s vocabulary, drawn after
    ``torch.manual_seed(0)``: a ``CLIPTextModel`` of width 16 and a
    ``CLIPTextModelWithProjection`` of width 8 whose projection (8) is the pooled embedding,
    both of two layers (the pipelines take the penultimate hidden states)."""
    torch.manual_seed(0)
    text_encoder = _tiny_text_encoder(tokenizer, num_hidden_layers=2)
    text_encoder_2 = _tiny_text_encoder(
        tokenizer, 8, hidden_size=8, intermediate_size=16, num_hidden_layers=2
    )
    return text_encoder, text_encoder_2


def _sdxl_scheduler() -> Any:
    """DDIM on SDXL's noise table, as the SDXL config spaces it (``steps_offset=1``), with
    ``set_alpha_to_one=False`` and no clipping."""
    return diffusers.DDIMScheduler(
        **SD_NOISE_TABLE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def tiny_sdxl_pipeline(
    folder: str | Path,
    scheduler: Any = None,
    *,
    vae_dtype: torch.dtype = torch.float32,
    vae_config: Mapping[str, Any] | None = None,
) -> Any:
    """A ``StableDiffusionXLPipeline`` of tiny random parts on 16 x 16 RGB images.

    Two two-layer CLIP text encoders sharing ``tiny_tokenizer(folder)``: a ``CLIPTextModel``
    of width 16 and a ``CLIPTextModelWithProjection`` of width 8 whose projection (8) is the
    pooled embedding; a conditional ``tiny_unet`` on 4 x 8 x 8 latents with SDXL's added
    conditioning (``addition_embed_type="text_time"``, ``addition_time_embed_dim=4``,
    cross-attention width 16 + 8 = 24, ``projection_class_embeddings_input_dim`` = 8 + 6 x 4);
    the ``AutoencoderKL`` of ``tiny_text_to_image_pipeline`` in ``vae_dtype`` (its config has
    diffusers' default ``force_upcast=True``, as SDXL's VAE; ``vae_config`` adds to its config,
    e.g. ``latents_mean`` and ``latents_std`` as Playground v2.5's VAE sets them, with the same
    weights). The rest is float32.
    ``scheduler`` defaults to DDIM on SDXL's noise table (``scaled_linear`` betas from
    0.00085 to 0.012, ``steps_offset=1``, ``set_alpha_to_one=False``, no clipping). The
    pipeline's config has ``force_zeros_for_empty_prompt=True``, as SDXL base's; no
    watermarker. The progress bar is off.
    """
    tokenizer = tiny_tokenizer(folder)
    text_encoder, text_encoder_2 = _sdxl_text_encoders(tokenizer)
    unet = tiny_unet(
        conditional=True,
        channels=4,
        cross_attention_dim=16 + 8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(vae_dtype, **(vae_config or {})),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sdxl_scheduler() if scheduler is None else scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_refiner_pipeline(folder: str | Path, scheduler: Any = None) -> Any:
    """A ``StableDiffusionXLImg2ImgPipeline`` made as SDXL's refiner is, of tiny random parts
    on 16 x 16 RGB images (4 x 8 x 8 latents), the refiner of ``tiny_sdxl_pipeline``'s
    ensemble of expert denoisers (``denoising_end`` there, ``denoising_start`` here).

    No first text encoder: the second one of ``tiny_sdxl_pipeline`` (a two-layer
    ``CLIPTextModelWithProjection`` of width 8 on ``tiny_tokenizer(folder)``, its projection
    of 8 the pooled embedding) alone conditions a conditional ``tiny_unet`` (seed 3) with
    cross-attention width 8 and SDXL's added conditioning with the aesthetic score
    (``requires_aesthetics_score=True``: ``time_ids`` of 5 values, original size, crop and
    score, so ``projection_class_embeddings_input_dim`` = 8 + 5 x 4); the VAE of
    ``tiny_sdxl_pipeline``. The pipeline's config has ``force_zeros_for_empty_prompt=False``,
    as SDXL refiner's. ``scheduler`` defaults to that of ``tiny_sdxl_pipeline``. Float32; the
    progress bar is off.
    """
    tokenizer = tiny_tokenizer(folder)
    # The base's encoders, the first dropped: SDXL's refiner shares the base's second one.
    _, text_encoder_2 = _sdxl_text_encoders(tokenizer)
    unet = tiny_unet(
        conditional=True,
        channels=4,
        cross_attention_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 5 * 4,
        seed=3,
    )
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=_tiny_vae(),
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sdxl_scheduler() if scheduler is None else scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_playground_pipeline(folder: str | Path, scheduler: Any = None) -> Any:
    """``tiny_sdxl_pipeline`` made as Playground v2.5 is: an EDM-preconditioned scheduler,
    by default ``EDMDPMSolverMultistepScheduler()``, whose defaults are Playground v2.5's
    config (Karras sigmas from 80 to 0.002, ``sigma_data`` 0.5, ``epsilon``, DPM-Solver++ of
    order 2, a final sigma of 0), and a VAE whose config sets per-channel ``latents_mean``
    and ``latents_std`` (stand-ins, not Playground's values; the same weights). The unet is
    the SDXL one, which the scheduler then takes for the raw network of an EDM denoiser.
    """
    if scheduler is None:
        scheduler = diffusers.EDMDPMSolverMultistepScheduler()
    stats = dict(latents_mean=(-0.3, 0.7, -1.1, 1.9), latents_std=(1.7, 0.6, 2.3, 0.9))
    return tiny_sdxl_pipeline(folder, scheduler, vae_config=stats)


def tiny_sd3_pipeline(folder: str | Path, scheduler: Any = None) -> Any:
    """A float32 ``StableDiffusion3Pipeline`` of tiny random parts on 16 x 16 RGB images.

    Two two-layer ``CLIPTextModelWithProjection`` encoders of width 8 (projections of 4)
    sharing ``tiny_tokenizer(folder)``, no T5 encoder (the pipeline then puts zeros in its
    place, as SD3 does without T5): prompt embeddings of shape ``(batch, 272, 16)`` (16 CLIP
    tokens, then 256 zeros for T5 at the pipeline's default ``max_sequence_length``), pooled ones
    of shape ``(batch, 8)``. ``tiny_sd3_transformer()`` on 4 x 8 x 8 latents and the
    ``AutoencoderKL`` of ``tiny_text_to_image_pipeline`` with SD3's ``scaling_factor`` and
    ``shift_factor``. ``scheduler`` defaults to SD3's ``FlowMatchEulerDiscreteScheduler(shift=
    3.0)``. The progress bar is off.
    """
    tokenizer = tiny_tokenizer(folder)
    torch.manual_seed(0)
    # Two layers: the pipeline takes the encoders' penultimate hidden states.
    encoders = [
        _tiny_text_encoder(tokenizer, 4, hidden_size=8, intermediate_size=16, num_hidden_layers=2)
        for _ in range(2)
    ]
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=scheduler,
        vae=_tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_t5_tokenizer(words: Sequence[str] = TINY_WORDS) -> Any:
    """A T5-style (unigram) fast tokenizer that knows each of ``words`` whole and spells any
    other word letter by letter, ending each text with ``</s>``; made in memory with the
    ``tokenizers`` library, whose model every supported transformers release loads (its
    ``T5Tokenizer`` takes a vocabulary list only from transformers 5). Its
    ``model_max_length`` is T5's 512, as Flux's."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    space = "\u2581"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (space, -3.0)]
    vocab += [(space + word, -1.0) for word in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    unigram = Tokenizer(models.Unigram(vocab, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always")
    unigram.decoder = decoders.Metaspace(replacement=space, prepend_scheme="always")
    unigram.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=unigram,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def _tiny_t5_encoder(tokenizer: Any) -> Any:
    """A one-layer ``T5EncoderModel`` of width 16 on ``tokenizer``, drawn from torch's global
    generator (seed it first); in eval mode."""
    import transformers

    t5_config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.T5EncoderModel(t5_config).eval()


def tiny_flux_pipeline(
    folder: str | Path, scheduler: Any = None, *, guidance_embeds: bool = True
) -> Any:
    """A float32 ``FluxPipeline`` of tiny random parts on 16 x 16 RGB images.

    A one-layer ``CLIPTextModel`` of width 8 on ``tiny_tokenizer(folder)`` (its pooled output
    is the pooled embedding, of shape ``(batch, 8)``) and a one-layer ``T5EncoderModel`` of
    width 16 on a T5 tokenizer of the same words (prompt embeddings of shape ``(batch, L, 16)``
    for ``max_sequence_length=L``; pass ``max_sequence_length=16``, since the pipeline's
    default 512 pads every prompt to 512 tokens). ``tiny_flux_transformer(guidance_embeds=
    guidance_embeds)`` on the packed latents of shape ``(batch, 16, 16)`` (4 x 8 x 8 latents
    in patches of 2 x 2), and the ``AutoencoderKL`` of ``tiny_text_to_image_pipeline`` with
    Flux's ``scaling_factor`` and ``shift_factor``. ``scheduler`` defaults to Flux.1-dev's
    ``FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)``. The progress bar is off.
    """
    tokenizer = tiny_tokenizer(folder)
    tokenizer_2 = _tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _tiny_text_encoder(tokenizer, hidden_size=8, intermediate_size=16)
    text_encoder_2 = _tiny_t5_encoder(tokenizer_2)
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(guidance_embeds=guidance_embeds),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chroma_pipeline(scheduler: Any = None) -> Any:
    """A float32 ``ChromaPipeline`` of tiny random parts on 16 x 16
    RGB images: ``tiny_flux_pipeline``'s T5 encoder and tokenizer (prompt embeddings of shape
    ``(batch, L, 16)`` for ``max_sequence_length=L``; pass ``max_sequence_length=16``),
    ``tiny_chroma_transformer()`` on the packed latents of shape ``(batch, 16, 16)``, and
    ``tiny_flux_pipeline``'s VAE. ``scheduler`` defaults to Flux.1-dev's
    ``FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)`` (ChromaPipeline passes it
    FluxPipeline's sigmas and mu). Made in memory (Chroma has no CLIP tokenizer to write);
    the progress bar is off."""
    transformer = tiny_chroma_transformer()
    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _tiny_t5_encoder(tokenizer)
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    pipe = diffusers.ChromaPipeline(
        scheduler=scheduler,
        vae=_tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_fill_pipeline(
    folder: str | Path, scheduler: Any = None, *, guidance_embeds: bool = True
) -> Any:
    """A ``FluxFillPipeline`` of ``tiny_flux_pipeline``'s parts with a Fill transformer:
    ``tiny_flux_transformer`` with ``in_channels=48`` and ``out_channels=16`` (seed 0), which
    the pipeline calls on the packed latents (16 channels) followed along the channels by the
    packed latents of the masked image (16) and the packed mask (16: the tiny VAE's
    downsampling factor 2 makes a 2 x 2 block of mask pixels per latent pixel, 4 channels, in
    patches of 2 x 2), as FLUX.1-Fill-dev's takes 64 + 64 + 256 = 384. 16 x 16 RGB images and
    1-channel masks; ``scheduler`` defaults to Flux.1-dev's. Float32; the progress bar is
    off."""
    return _tiny_flux_with(
        diffusers.FluxFillPipeline, folder, scheduler, guidance_embeds, in_channels=48
    )


def tiny_flux_control_pipeline(
    folder: str | Path, scheduler: Any = None, *, guidance_embeds: bool = True
) -> Any:
    """A ``FluxControlPipeline`` of ``tiny_flux_pipeline``'s parts with a Depth- or
    Canny-style transformer: ``tiny_flux_transformer`` with ``in_channels=32`` and
    ``out_channels=16`` (seed 0), which the pipeline calls on the packed latents (16 channels)
    followed along the channels by the packed latents of its control image (16), as
    FLUX.1-Depth-dev's and FLUX.1-Canny-dev's take 64 + 64 = 128. 16 x 16 RGB images and
    control images; ``scheduler`` defaults to Flux.1-dev's. Float32; the progress bar is
    off. ``diffusers.FluxControlImg2ImgPipeline(**pipe.components)`` is its img2img
    sibling."""
    return _tiny_flux_with(
        diffusers.FluxControlPipeline, folder, scheduler, guidance_embeds, in_channels=32
    )


def _tiny_flux_with(
    pipeline: Any, folder: str | Path, scheduler: Any, guidance_embeds: bool, in_channels: int
) -> Any:
    """``pipeline`` (a Flux pipeline class without an IP-Adapter's parts) of
    ``tiny_flux_pipeline``'s parts with ``tiny_flux_transformer`` of ``in_channels`` for the
    packed latents' 16 (seed 0); the progress bar off."""
    parts = dict(tiny_flux_pipeline(folder, scheduler, guidance_embeds=guidance_embeds).components)
    for name in ("image_encoder", "feature_extractor"):
        parts.pop(name, None)
    parts["transformer"] = tiny_flux_transformer(
        guidance_embeds=guidance_embeds, in_channels=in_channels, out_channels=16
    )
    pipe = pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_kontext_pipeline(
    folder: str | Path, scheduler: Any = None, *, guidance_embeds: bool = True
) -> Any:
    """A ``FluxKontextPipeline`` of ``tiny_flux_pipeline``'s parts (its transformer too, as
    FLUX.1-Kontext-dev's has FLUX.1-dev's config): the pipeline puts the packed latents of its
    reference image after the packed latents' tokens, with their own ``img_ids``, and keeps
    the transformer's output for the latents' tokens. 16 x 16 RGB images; ``scheduler``
    defaults to Flux.1-dev's. Float32; the progress bar is off. Needs diffusers 0.35 or newer,
    which has the pipeline."""
    kontext = getattr(diffusers, "FluxKontextPipeline", None)
    if kontext is None:
        raise ImportError(
            f"FluxKontextPipeline is in diffusers 0.35 and newer; this is {diffusers.__version__}"
        )
    parts = tiny_flux_pipeline(folder, scheduler, guidance_embeds=guidance_embeds).components
    pipe = kontext(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Qwen2.5-VL's special tokens that Qwen-Image's prompt templates use, the chat turns' and
#: (Qwen-Image-Edit's) the image's place, and the video's place that its config names;
#: <|endoftext|> is the tokenizer's own pad token.
_QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_end|>",
)


#: Qwen3's thinking block's tokens, added tokens of its tokenizer (not special ones).
_QWEN3_THINKING = ("<think>", "</think>")

#: A chat template for Qwen3's turns as Qwen3's own renders the one user message that
#: ZImagePipeline and Flux2KleinPipeline give it: ``<|im_start|>user\nTEXT<|im_end|>\n``, the
#: assistant's turn opened (``add_generation_prompt``), and with ``enable_thinking`` False
#: (Klein's) its thinking block left empty.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


def _qwen_templates() -> list[str]:
    """The prompt templates of diffusers' Qwen-Image pipelines (QwenImagePipeline's and,
    where diffusers has it, QwenImageEditPipeline's), read from bare instances."""
    templates = []
    for name in ("QwenImagePipeline", "QwenImageEditPipeline"):
        cls = getattr(diffusers, name, None)
        if cls is not None:
            bare = cls(
                **{
                    part: None
                    for part in inspect.signature(cls.__init__).parameters
                    if part != "self"
                }
            )
            templates.append(bare.prompt_template_encode.format(""))
    return templates


def _tiny_qwen_tokenizer(words: Sequence[str] = TINY_WORDS, *, chat: bool = False) -> Any:
    """A fast Qwen2 byte-level BPE tokenizer (``Qwen2TokenizerFast``; transformers 5's
    ``Qwen2Tokenizer``) whose vocabulary is the 256 byte symbols, every piece of Qwen-Image's
    prompt templates (as Qwen2's pre-tokenizer splits them) and each of ``words`` (alone or
    after a space) whole, and ``_QWEN_SPECIAL_TOKENS``: a template's text before the prompt is
    one token a piece, as many as with Qwen2.5-VL's own tokenizer (QwenImagePipeline's 34,
    QwenImageEditPipeline's 64 up to the image), and any other text is spelled in the pieces'
    prefixes and bytes. With ``chat``, Qwen3's too: ``_QWEN3_CHAT_TEMPLATE`` as its chat
    template, the pieces of its turns (with and without the empty thinking block) whole, and
    ``<think>`` and ``</think>`` added tokens, as Qwen3's tokenizer has them. Its vocab.json
    and merges.txt are written to a temporary folder, which it reads whole."""
    import re
    import tempfile

    import transformers
    from tokenizers import pre_tokenizers

    # transformers 5's Qwen2Tokenizer is the fast one, which 4.x calls Qwen2TokenizerFast.
    cls = getattr(transformers, "Qwen2TokenizerFast", transformers.Qwen2Tokenizer)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: k for k, symbol in enumerate(alphabet)}
    merges: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        paths = (Path(folder) / "vocab.json", Path(folder) / "merges.txt")

        def tokenizer() -> Any:
            paths[0].write_text(json.dumps(vocab))
            paths[1].write_text("\n".join(["#version: 0.2", *merges]) + "\n")
            return cls(*map(str, paths))

        # The pieces as Qwen2's pre-tokenizer splits the text (byte-level symbols, a space
        # joined to the word after it), the special tokens taken out first.
        split = tokenizer().backend_tokenizer.pre_tokenizer.pre_tokenize_str
        thinking = _QWEN3_THINKING if chat else ()
        special = "|".join(map(re.escape, _QWEN_SPECIAL_TOKENS + thinking))
        texts = [*_qwen_templates(), " ".join(words), " " + " ".join(words)]
        if chat:
            texts += _qwen3_chats(tokenizer())
        pieces = [p for text in texts for part in re.split(special, text) for p, _ in split(part)]
        for piece in pieces:
            # Merged left to right: the piece's prefixes are the tokens on the way.
            for end in range(2, len(piece) + 1):
                if piece[:end] not in vocab:
                    vocab[piece[:end]] = len(vocab)
                    merges.append(f"{piece[: end - 1]} {piece[end - 1]}")
        made = tokenizer()
        for piece in pieces:
            # An earlier merge inside a piece ("user" inside " user") can leave it in parts:
            # each is joined by one more merge, ranked after those that made the parts.
            while len(parts := [t.value for t in made.backend_tokenizer.model.tokenize(piece)]) > 1:
                vocab.setdefault(parts[0] + parts[1], len(vocab))
                merges.append(f"{parts[0]} {parts[1]}")
                made = tokenizer()
    made.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL_TOKENS)})
    if chat:
        made.add_tokens(list(thinking))
        made.chat_template = _QWEN3_CHAT_TEMPLATE
    return made


def _qwen3_chats(tokenizer: Any) -> list[str]:
    """The text of one empty user turn and the assistant's opened after it, as
    ``_QWEN3_CHAT_TEMPLATE`` renders it with ``tokenizer`` for ZImagePipeline (thinking on)
    and Flux2KleinPipeline (off, its empty thinking block)."""
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    turn = [{"role": "user", "content": ""}]
    return [
        tokenizer.apply_chat_template(
            turn, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        for thinking in (True, False)
    ]


def tiny_qwen_text_encoder(*, seed: int = 0) -> tuple[Any, Any]:
    """Qwen-Image's text encoder and tokenizer in miniature, nothing downloaded: a
    ``(tokenizer, text_encoder)`` pair for ``QwenImagePipeline``'s ``encode_prompt``.

    The tokenizer is a fast Qwen2 byte-level BPE one of a few hundred
    tokens that knows the words of Qwen-Image's prompt templates and ``TINY_WORDS`` whole,
    with the special tokens the templates use (``<|im_start|>``, ``<|im_end|>``, and
    Qwen-Image-Edit's ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``): the
    template's text before the prompt is as many tokens as with Qwen2.5-VL's tokenizer, 34
    for QwenImagePipeline, which it drops (``prompt_template_encode_start_idx``). The text
    encoder is a ``Qwen2_5_VLForConditionalGeneration`` of one decoder layer of width 16 (2
    query heads, 1 key-value head: grouped as Qwen2.5-VL's) and a one-block vision tower,
    weights drawn with ``torch.manual_seed(seed)``, float32, in eval mode: its last hidden
    states are the prompt embeddings, ``(batch, tokens, 16)``, of the width of
    ``tiny_qwen_image_transformer``'s ``joint_attention_dim``. Needs transformers 4.49 or
    newer, which have Qwen2.5-VL."""
    import transformers

    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        raise ImportError(
            f"Qwen2_5_VLForConditionalGeneration is in transformers 4.49 and newer; this is "
            f"{transformers.__version__}"
        )
    tokenizer = _tiny_qwen_tokenizer()
    token = tokenizer.convert_tokens_to_ids
    # Flat, as a released config.json: transformers 5 reads the text model's fields from it.
    flat: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        # A head's 4 rotary frequencies split between time, rows and columns, as
        # Qwen2.5-VL's 16, 24, 24 split its 64.
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        bos_token_id=token("<|endoftext|>"),
        eos_token_id=token("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=16,
            fullatt_block_indexes=[0],
        ),
    )
    config = transformers.Qwen2_5_VLConfig(**flat)
    torch.manual_seed(seed)
    return tokenizer, transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen3_text_encoder(
    *, num_layers: int = 2, causal_lm: bool = False, seed: int = 0
) -> tuple[Any, Any]:
    """Z-Image's and FLUX.2-klein's text encoder and tokenizer in miniature, nothing
    downloaded: a ``(tokenizer, text_encoder)`` pair for ``ZImagePipeline``'s and
    ``Flux2KleinPipeline``'s ``encode_prompt``.

    The tokenizer is ``tiny_qwen_text_encoder``'s fast Qwen2 byte-level BPE one with Qwen3's
    chat turns besides: a chat template that renders a user's prompt as Qwen3's does
    (``<|im_start|>user\\nPROMPT<|im_end|>\\n<|im_start|>assistant\\n``, then for
    ``enable_thinking=False`` an empty ``<think>\\n\\n</think>\\n\\n``), each of its pieces
    one token, and ``TINY_WORDS`` whole. The text encoder is Qwen3 (``Qwen3Model``, as
    Z-Image's model_index.json loads it, or with ``causal_lm`` ``Qwen3ForCausalLM``, as
    Klein's) of ``num_layers`` decoder layers of width 16 (2 query heads of 8, 1 key-value
    head), weights drawn with ``torch.manual_seed(seed)``, float32, in eval mode: its hidden
    states are ``(batch, tokens, 16)``. ZImagePipeline takes the second to last
    (``hidden_states[-2]``: the last layer's input, unnormalised; the default 2 layers make it
    the first layer's output), of the width of ``tiny_z_image_transformer``'s
    ``cap_feat_dim``; Flux2KleinPipeline stacks those of layers 9, 18 and 27 into ``(batch,
    tokens, 48)``, which needs 27 layers or more (28 keeps them all unnormalised, as in Qwen3-4B's
    36). Needs transformers 4.51 or newer, which have Qwen3."""
    import transformers

    if not hasattr(transformers, "Qwen3Model"):
        raise ImportError(
            f"Qwen3Model is in transformers 4.51 and newer; this is {transformers.__version__}"
        )
    tokenizer = _tiny_qwen_tokenizer(chat=True)
    token = tokenizer.convert_tokens_to_ids
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        # ZImagePipeline and Flux2KleinPipeline pad every prompt to 512 tokens.
        max_position_embeddings=1024,
        tie_word_embeddings=causal_lm,
        bos_token_id=token("<|endoftext|>"),
        eos_token_id=token("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.Qwen3ForCausalLM if causal_lm else transformers.Qwen3Model
    torch.manual_seed(seed)
    return tokenizer, model(config).eval()


# A Mistral chat template: the system message and the user's prompt, each part of a
# message's content list as text, between Mistral's markers (written as text here).
_MISTRAL3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' }}{% else %}{{ '[INST]' }}"
    "{% endif %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% if message['role'] == 'system' %}{{ '[/SYSTEM_PROMPT]' }}{% else %}{{ '[/INST]' }}"
    "{% endif %}"
    "{% endfor %}"
)


def tiny_mistral3_text_encoder(*, num_layers: int = 30, seed: int = 0) -> tuple[Any, Any]:
    """FLUX.2-dev's text encoder and tokenizer in miniature, nothing downloaded: a
    ``(tokenizer, text_encoder)`` pair for ``Flux2Pipeline``'s ``encode_prompt``.

    The tokenizer is ``tiny_qwen_text_encoder``'s fast byte-level BPE one with a chat
    template that renders the pipeline's messages, a system message and the user's prompt
    whose contents are lists of text parts, between Mistral's markers (written as text);
    FLUX.2-dev's processor (Pixtral's) does the same for text alone. The text encoder is a
    ``Mistral3ForConditionalGeneration`` whose language model has ``num_layers`` decoder
    layers of width 16 (2 query heads of 8, 1 key-value head) and whose Pixtral vision tower
    (one layer) text prompts never reach; weights drawn with ``torch.manual_seed(seed)``,
    float32, in eval mode. Flux2Pipeline stacks its hidden states 10, 20 and 30 into
    ``(batch, 512, 48)``, which needs 30 layers or more. Needs transformers 4.50 or newer,
    which have Mistral 3."""
    import transformers

    if not hasattr(transformers, "Mistral3ForConditionalGeneration"):
        raise ImportError(
            f"Mistral3ForConditionalGeneration is in transformers 4.50 and newer; this is "
            f"{transformers.__version__}"
        )
    tokenizer = _tiny_qwen_tokenizer()
    tokenizer.chat_template = _MISTRAL3_CHAT_TEMPLATE
    text = transformers.MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        # Flux2Pipeline pads every prompt to 512 tokens.
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = transformers.PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    config = transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=0, spatial_merge_size=1
    )
    torch.manual_seed(seed)
    return tokenizer, transformers.Mistral3ForConditionalGeneration(config).eval()


def tiny_qwen_image_pipeline(scheduler: Any = None, *, text_encoder: bool = False) -> Any:
    """A float32 ``QwenImagePipeline`` of tiny random parts on 16 x 16 RGB images, without a
    text encoder or tokenizer: give it ``prompt_embeds`` and ``prompt_embeds_mask`` (and
    ``negative_prompt_embeds`` with their mask for true CFG), of width 16. With
    ``text_encoder``, ``tiny_qwen_text_encoder()``'s tokenizer and Qwen2.5-VL text encoder
    (seed 0), which its ``encode_prompt`` embeds text prompts with (needs transformers 4.49
    or newer).
    ``tiny_qwen_image_transformer()`` on the packed latents of shape ``(batch, 16, 16)`` (4 x 8
    x 8 latents in patches of 2 x 2) and an ``AutoencoderKLQwenImage`` of 4 latent channels
    that halves the image's size (``vae_scale_factor`` 2, seed 1). ``scheduler`` defaults to
    Qwen-Image's ``FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)``. The progress
    bar is off. Needs diffusers 0.35 or newer, which has the pipeline."""
    pipeline = _recent_class("QwenImagePipeline", "0.35")
    vae_class = _recent_class("AutoencoderKLQwenImage", "0.35")
    vae = _tiny_video_vae(vae_class)
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    tokenizer, encoder = tiny_qwen_text_encoder() if text_encoder else (None, None)
    pipe = pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=tiny_qwen_image_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen_image_edit_pipeline(scheduler: Any = None) -> Any:
    """A ``QwenImageEditPipeline`` of ``tiny_qwen_image_pipeline``'s parts (Qwen-Image-Edit's
    transformer has Qwen-Image's config), without the Qwen2.5-VL text encoder, tokenizer and
    processor that embed its prompts with the image: give it ``prompt_embeds`` and
    ``prompt_embeds_mask``. The pipeline puts the packed latents of its reference image
    after the packed latents' tokens, with both shapes in ``img_shapes``, and keeps the
    transformer's output for the latents' tokens. Float32; the progress bar is off. Needs
    diffusers 0.35 or newer, which has the pipeline."""
    pipeline = _recent_class("QwenImageEditPipeline", "0.35")
    parts = tiny_qwen_image_pipeline(scheduler).components
    pipe = pipeline(**parts, processor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen_image_edit_plus_pipeline(scheduler: Any = None, *, zero_cond_t: bool = False) -> Any:
    """A ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509's) of
    ``tiny_qwen_image_edit_pipeline``'s parts, without the Qwen2.5-VL text encoder, tokenizer
    and processor: give it ``prompt_embeds`` and ``prompt_embeds_mask``. The pipeline puts
    the packed latents of each of its reference images, in order, after the packed latents'
    tokens, with one ``img_shapes`` entry per image after the latents'. With ``zero_cond_t``
    the transformer is Qwen-Image-Edit-2511's kind (``zero_cond_t=True`` in its config, the
    same weights): it modulates the reference images' tokens with the embedding of timestep
    0. Float32; the progress bar is off. Needs diffusers 0.36 or newer, which has the
    pipeline (0.37 for ``zero_cond_t``)."""
    pipeline = _recent_class("QwenImageEditPlusPipeline", "0.36")
    parts = tiny_qwen_image_edit_pipeline(scheduler).components
    if zero_cond_t:
        parts["transformer"] = tiny_qwen_image_transformer(zero_cond_t=True)
    pipe = pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen_image_controlnet(
    transformer: torch.nn.Module, *, seed: int = 2, mask_channel: bool = False
) -> torch.nn.Module:
    """A ``QwenImageControlNetModel`` of ``transformer`` (a ``tiny_qwen_image_transformer``),
    with its config (one block): it takes the control image's packed latents, of the
    latents' shape ``(batch, tokens, 16)``; with ``mask_channel``, the inpainting kind
    (``extra_condition_channels=4``, InstantX's Qwen-Image-ControlNet-Inpainting's), the
    masked image's packed latents and the packed mask, ``(batch, tokens, 20)``. Its weights
    are drawn with ``torch.manual_seed(seed)``, its zero layers (the residuals' projections
    and the control latents' embedding, zero as diffusers initialises them, when the
    residuals would be 0) included, so that the transformer's output depends on the control
    image. In eval mode and the transformer's dtype. Needs diffusers 0.36 or newer."""
    extra = {"extra_condition_channels": 4} if mask_channel else {}
    net = _controlnet_of(
        _recent_class("QwenImageControlNetModel", "0.35"), transformer, seed, **extra
    )
    return _drawn(net, [*net.controlnet_blocks, net.controlnet_x_embedder], transformer)


def tiny_qwen_image_controlnet_pipeline(
    scheduler: Any = None, *, multi: bool = False, text_encoder: bool = False
) -> Any:
    """A ``QwenImageControlNetPipeline`` of ``tiny_qwen_image_pipeline``'s parts and
    ``tiny_qwen_image_controlnet`` of its transformer (seed 2); with ``multi``, that
    controlnet in a ``QwenImageMultiControlNetModel`` (the union wrapper, which calls it
    once per control image). Without a text encoder: give it ``prompt_embeds`` and
    ``prompt_embeds_mask``; with ``text_encoder``, ``tiny_qwen_image_pipeline``'s tokenizer
    and Qwen2.5-VL text encoder, which embed text prompts. 16 x 16 RGB images and control
    images; ``scheduler`` defaults to
    Qwen-Image's. Float32; the progress bar is off. Needs diffusers 0.36 or newer, which has
    the pipeline."""
    pipeline = _recent_class("QwenImageControlNetPipeline", "0.36")
    parts = dict(tiny_qwen_image_pipeline(scheduler, text_encoder=text_encoder).components)
    controlnet = tiny_qwen_image_controlnet(parts["transformer"])
    if multi:
        controlnet = _recent_class("QwenImageMultiControlNetModel", "0.36")([controlnet])
    pipe = pipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_z_image_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A ``ZImageTransformer2DModel`` with one refiner block of each kind and one main block
    of width 32 (2 heads of 16) on latents of 4 channels in patches of 2 x 2, called on a
    list of per-sample latents of shape ``(4, 1, h, w)`` and a list of per-sample prompt
    embeddings of shape ``(L_i, 16)`` (``cap_feats``), as ``ZImagePipeline`` calls it.
    Weights drawn with ``torch.manual_seed(seed)``, its pad tokens zero (as diffusers 0.39
    and newer make them), in eval mode and ``dtype``; ``overrides`` add to or replace fields
    of its config. Needs diffusers 0.36 or newer."""
    cls = _recent_class("ZImageTransformer2DModel", "0.36")
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    )
    config.update(overrides)
    net = cls(**config)
    with torch.no_grad():
        # diffusers 0.36 to 0.38 leave the pad tokens uninitialised (torch.empty), 0.39 on
        # zero them: zeros here make the model the same, and finite, on every release.
        for name in ("x_pad_token", "cap_pad_token", "siglip_pad_token"):
            token = getattr(net, name, None)
            if token is not None:
                token.zero_()
    return (net if dtype == torch.float32 else net.to(dtype)).eval()


def tiny_z_image_pipeline(
    scheduler: Any = None, *, cls: Any = None, text_encoder: bool = False
) -> Any:
    """A float32 ``ZImagePipeline`` of tiny random parts on 16 x 16 RGB images, without its
    Qwen3 text encoder or tokenizer: give it ``prompt_embeds`` (a list of per-sample
    embeddings of shape ``(L_i, 16)``, and ``negative_prompt_embeds`` alike for CFG). With
    ``text_encoder``, ``tiny_qwen3_text_encoder()``'s tokenizer and two-layer ``Qwen3Model``
    (seed 0), which its ``encode_prompt`` embeds text prompts with (needs transformers 4.51
    or newer).
    ``tiny_z_image_transformer()`` on latents of shape ``(batch, 4, 8, 8)`` and the
    ``AutoencoderKL`` of ``tiny_flux_pipeline`` (Flux's ``scaling_factor`` and
    ``shift_factor``, which Z-Image's VAE has). ``scheduler`` defaults to
    ``FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)``; ``cls`` (a pipeline class of
    the same parts: ``ZImageImg2ImgPipeline``, ``ZImageInpaintPipeline``) defaults to
    ``ZImagePipeline``. The progress bar is off. Needs diffusers 0.36 or newer."""
    pipeline = cls if cls is not None else _recent_class("ZImagePipeline", "0.36")
    if scheduler is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)
    tokenizer, encoder = tiny_qwen3_text_encoder() if text_encoder else (None, None)
    pipe = pipeline(
        scheduler=scheduler,
        vae=_tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=tiny_z_image_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_z_image_controlnet(
    transformer: torch.nn.Module, *, seed: int = 2, inpaint: bool = False
) -> torch.nn.Module:
    """A ``ZImageControlNetModel`` of ``transformer`` (a ``tiny_z_image_transformer``) with
    one control block, its residual added after the transformer's layer 0, and one refiner
    block of its own, its weights drawn with ``torch.manual_seed(seed)``, the zero layers
    (the blocks' ``before_proj`` and ``after_proj``, zero as diffusers initialises them, when
    the residuals would be 0) included, so that the transformer's output depends on the
    control image; then given the transformer's shared modules
    (``ZImageControlNetModel.from_transformer``), as ``ZImageControlNetPipeline`` gives them.
    It takes the control image's latents, ``control_in_dim = 4`` channels; with ``inpaint``
    9 (Z-Image-Turbo-Fun-Controlnet-Union-2.x's kind: the control image's 4, the mask's 1 and
    the masked image's 4), its refiner block added to the transformer's noise refiner
    (``add_control_noise_refiner="control_noise_refiner"``, 2.0's). In eval mode and the
    transformer's dtype. Needs diffusers 0.37 or newer, which has the controlnet."""
    cls = _recent_class("ZImageControlNetModel", "0.37")
    extra: dict[str, Any] = dict(control_layers_places=[0], control_in_dim=4)
    if inpaint:
        extra.update(
            control_in_dim=9,
            control_refiner_layers_places=[0],
            add_control_noise_refiner="control_noise_refiner",
        )
    net = _controlnet_of(cls, transformer, seed, **extra)
    blocks = [*net.control_layers, *(net.control_noise_refiner if inpaint else [])]
    zeroed = [getattr(b, name) for b in blocks for name in ("before_proj", "after_proj")]
    net = _drawn(net, [m for m in zeroed if m is not None], transformer)
    return cls.from_transformer(net, transformer)


def tiny_z_image_controlnet_pipeline(
    scheduler: Any = None, *, inpaint: bool = False, text_encoder: bool = False
) -> Any:
    """A ``ZImageControlNetPipeline`` of ``tiny_z_image_pipeline``'s parts and
    ``tiny_z_image_controlnet`` of its transformer (seed 2); with ``inpaint``, a
    ``ZImageControlNetInpaintPipeline`` with ``tiny_z_image_controlnet(..., inpaint=True)``,
    which takes the control image's latents, the mask and the masked image's latents.
    Without a text encoder: give it ``prompt_embeds`` (and ``negative_prompt_embeds`` for
    CFG); with ``text_encoder``, ``tiny_z_image_pipeline``'s Qwen3 one and its tokenizer.
    16 x 16 RGB images, control images and masks; ``scheduler`` defaults to Z-Image's.
    Float32; the progress bar is off. Needs diffusers 0.37 or newer, which has the
    pipelines."""
    name = "ZImageControlNetInpaintPipeline" if inpaint else "ZImageControlNetPipeline"
    pipeline = _recent_class(name, "0.37")
    parts = dict(tiny_z_image_pipeline(scheduler, text_encoder=text_encoder).components)
    controlnet = tiny_z_image_controlnet(parts["transformer"], inpaint=inpaint)
    pipe = pipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen_image_controlnet_inpaint_pipeline(scheduler: Any = None) -> Any:
    """A ``QwenImageControlNetInpaintPipeline`` of ``tiny_qwen_image_pipeline``'s parts and
    ``tiny_qwen_image_controlnet(..., mask_channel=True)`` of its transformer (seed 2), which
    takes the masked image's packed latents and the packed mask. Without a text encoder: give
    it ``prompt_embeds`` and ``prompt_embeds_mask``. 16 x 16 RGB images and masks;
    ``scheduler`` defaults to Qwen-Image's. Float32; the progress bar is off. Needs diffusers
    0.36 or newer, which has the pipeline."""
    pipeline = _recent_class("QwenImageControlNetInpaintPipeline", "0.36")
    parts = dict(tiny_qwen_image_pipeline(scheduler).components)
    controlnet = tiny_qwen_image_controlnet(parts["transformer"], mask_channel=True)
    pipe = pipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_controlnet(transformer: torch.nn.Module, *, seed: int = 2) -> torch.nn.Module:
    """A ``FluxControlNetModel`` of ``transformer`` (a ``tiny_flux_transformer``), InstantX's
    kind: its config (one double-stream and one single-stream block), and it takes the
    control image's packed latents, of the latents' shape ``(batch, tokens, 16)``. Its
    weights are drawn with ``torch.manual_seed(seed)``, its zero layers (the residuals'
    projections and the control latents' embedding, zero as diffusers initialises them, when
    the residuals would be 0) included, so that the transformer's output depends on the
    control image. In eval mode and the transformer's dtype."""
    net = _controlnet_of(diffusers.FluxControlNetModel, transformer, seed)
    zeroed = [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]
    return _drawn(net, zeroed, transformer)


def _controlnet_of(cls: Any, transformer: torch.nn.Module, seed: int, **changes: Any) -> Any:
    """A controlnet of class ``cls`` with the fields of ``transformer``'s config that it
    takes (``changes`` over them), its weights drawn with ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config: Mapping[str, Any] = transformer.config  # type: ignore[assignment]
    fields = inspect.signature(cls.__init__).parameters
    taken = {k: v for k, v in config.items() if k in fields and not k.startswith("_")}
    return cls(**{**taken, **changes})


def _drawn(net: Any, zeroed: Sequence[Any], transformer: torch.nn.Module) -> Any:
    """``net`` with the parameters of its ``zeroed`` modules drawn from N(0, 0.2^2) (after
    its own weights, from the same seed), in eval mode and ``transformer``'s dtype."""
    with torch.no_grad():
        for module in zeroed:
            for param in module.parameters():
                param.normal_(0.0, 0.2)
    dtype = next(transformer.parameters()).dtype
    return (net if dtype == torch.float32 else net.to(dtype)).eval()


def tiny_sd3_controlnet(
    transformer: torch.nn.Module, *, seed: int = 2, mask_channel: bool = False
) -> torch.nn.Module:
    """An ``SD3ControlNetModel`` of ``transformer`` (a ``tiny_sd3_transformer``), with its
    config (one joint block; InstantX's kind, ``force_zeros_for_pooled_projection``: zeros
    for the pooled prompt): it takes the control image's latents, of the latents' shape
    ``(batch, 4, 8, 8)``; with ``mask_channel``, Alimama's inpainting kind
    (``extra_conditioning_channels=1``), the masked image's latents and the mask, ``(batch,
    5, 8, 8)``. Its weights are drawn with ``torch.manual_seed(seed)``, its zero layers (the
    residuals' projections and the control latents' embedding) included, so that the
    transformer's output depends on the control image. In eval mode and the transformer's
    dtype."""
    extra = {"extra_conditioning_channels": 1} if mask_channel else {}
    net = _controlnet_of(diffusers.SD3ControlNetModel, transformer, seed, **extra)
    return _drawn(net, [*net.controlnet_blocks, net.pos_embed_input], transformer)


def tiny_sd3_controlnet_pipeline(folder: str | Path, scheduler: Any = None) -> Any:
    """A ``StableDiffusion3ControlNetPipeline`` of ``tiny_sd3_pipeline``'s parts, but a
    transformer of two joint blocks (``tiny_sd3_transformer(num_layers=2)``: the last block
    takes no residual, its context being pre-only), and ``tiny_sd3_controlnet`` of that
    transformer (seed 2). 16 x 16 RGB images and control images; ``scheduler`` defaults to
    SD3's. Float32; the progress bar is off."""
    parts = dict(tiny_sd3_pipeline(folder, scheduler).components)
    for name in ("image_encoder", "feature_extractor"):
        parts.pop(name, None)
    parts["transformer"] = tiny_sd3_transformer(num_layers=2)
    controlnet = tiny_sd3_controlnet(parts["transformer"])
    pipe = diffusers.StableDiffusion3ControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_controlnet_inpaint_pipeline(folder: str | Path, scheduler: Any = None) -> Any:
    """A ``StableDiffusion3ControlNetInpaintingPipeline`` of ``tiny_sd3_controlnet_pipeline``'s
    parts, but ``tiny_sd3_controlnet(..., mask_channel=True)`` of its transformer (seed 2),
    which takes the masked image's latents and the mask (Alimama's kind). 16 x 16 RGB images
    and masks; ``scheduler`` defaults to SD3's. Float32; the progress bar is off."""
    parts = dict(tiny_sd3_controlnet_pipeline(folder, scheduler).components)
    parts["controlnet"] = tiny_sd3_controlnet(parts["transformer"], mask_channel=True)
    pipe = diffusers.StableDiffusion3ControlNetInpaintingPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_controlnet_pipeline(
    folder: str | Path, scheduler: Any = None, *, guidance_embeds: bool = True
) -> Any:
    """A ``FluxControlNetPipeline`` of ``tiny_flux_pipeline``'s parts and
    ``tiny_flux_controlnet`` of its transformer (seed 2). 16 x 16 RGB images and control
    images; ``scheduler`` defaults to Flux.1-dev's. Float32; the progress bar is off."""
    parts = dict(tiny_flux_pipeline(folder, scheduler, guidance_embeds=guidance_embeds).components)
    for name in ("image_encoder", "feature_extractor"):
        parts.pop(name, None)
    controlnet = tiny_flux_controlnet(parts["transformer"])
    pipe = diffusers.FluxControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(unet: torch.nn.Module, *, seed: int = 2) -> torch.nn.Module:
    """A ``ControlNetModel`` of ``unet`` (a conditional ``tiny_unet``), by
    ``ControlNetModel.from_unet``: the unet's encoder weights, and a conditioning embedding of
    two blocks, ``(4, 8)``, which takes RGB control images of twice the latents' size (16 x 16
    for 8 x 8 latents, the images of the tiny pipelines). Its zero convolutions (the residuals'
    projections and the embedding's last layer, zero as diffusers initialises them, when the
    residuals would be 0) are drawn with ``torch.manual_seed(seed)``, so that the unet's
    output depends on the control image. In eval mode and the unet's dtype."""
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    zeroed = [*net.controlnet_down_blocks, net.controlnet_mid_block]
    zeroed.append(net.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for module in zeroed:
            for param in module.parameters():
                param.normal_(0.0, 0.2)
    return net.to(next(unet.parameters()).dtype).eval()


def tiny_controlnet_pipeline(
    folder: str | Path,
    scheduler: Any = None,
    *,
    xl: bool = False,
    controlnets: int = 1,
    img2img: bool = False,
) -> Any:
    """A ``StableDiffusionControlNetPipeline`` of ``tiny_text_to_image_pipeline``'s parts (with
    ``xl``, a ``StableDiffusionXLControlNetPipeline`` of ``tiny_sdxl_pipeline``'s, whose
    ``force_zeros_for_empty_prompt`` it keeps) and ``tiny_controlnet`` of its unet, seed 2;
    with ``controlnets`` > 1 that many (seeds 2, 3, ...), which the pipeline wraps in a
    ``MultiControlNetModel``. With ``img2img``, the same parts in
    ``StableDiffusionControlNetImg2ImgPipeline`` (with ``xl``,
    ``StableDiffusionXLControlNetImg2ImgPipeline``, without an aesthetic score: six time ids,
    as SDXL base), which starts from the image's latents noised at its ``strength``. Control
    images are 16 x 16 RGB, as the pipelines' images. ``scheduler`` defaults to theirs.
    Float32; the progress bar is off."""
    if xl:
        base = tiny_sdxl_pipeline(folder, scheduler)
    else:
        base = tiny_text_to_image_pipeline(folder, scheduler)
    nets = [tiny_controlnet(base.unet, seed=2 + k) for k in range(controlnets)]
    controlnet = nets[0] if controlnets == 1 else nets
    if xl:
        xl_class = diffusers.StableDiffusionXLControlNetPipeline
        extra = {}
        if img2img:
            xl_class = diffusers.StableDiffusionXLControlNetImg2ImgPipeline
            extra = {"requires_aesthetics_score": False}
        pipe = xl_class(
            **base.components,
            controlnet=controlnet,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
            **extra,
        )
    else:
        sd_class = diffusers.StableDiffusionControlNetPipeline
        if img2img:
            sd_class = diffusers.StableDiffusionControlNetImg2ImgPipeline
        pipe = sd_class(**base.components, controlnet=controlnet, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inpaint_unet(unet: Any, in_channels: int, **changes: Any) -> torch.nn.Module:
    """``unet``'s own config with ``in_channels`` and ``changes`` (SDXL's added conditioning
    kept), weights drawn with ``torch.manual_seed(0)``, in eval mode."""
    fields = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    config = {**fields, "in_channels": in_channels, **changes}
    return diffusers.UNet2DConditionModel(**config).eval()


def tiny_inpaint_pipeline(
    folder: str | Path, scheduler: Any = None, *, xl: bool = False, in_channels: int = 9
) -> Any:
    """A ``StableDiffusionInpaintPipeline`` of ``tiny_text_to_image_pipeline``'s parts (with
    ``xl``, a ``StableDiffusionXLInpaintPipeline`` of ``tiny_sdxl_pipeline``'s, whose
    ``force_zeros_for_empty_prompt`` it keeps, without an aesthetic score) on 16 x 16 RGB
    images and 1-channel masks. Its unet is an inpainting one: the conditional ``tiny_unet``
    of those pipelines with ``in_channels=9`` (4 latent channels, the mask's 1 and the masked
    image's 4 latent channels; seed 0, so other weights than theirs), which the pipeline
    calls on ``torch.cat([latents, mask, masked_image_latents], dim=1)``. With
    ``in_channels=4`` it is the text-to-image pipeline's own unet, which the pipeline runs
    on the latents alone and blends the image back into after each step. ``scheduler``
    defaults to theirs. Float32; the progress bar is off."""
    if xl:
        base = tiny_sdxl_pipeline(folder, scheduler)
    else:
        base = tiny_text_to_image_pipeline(folder, scheduler)
    parts = dict(base.components)
    if in_channels != 4:
        parts["unet"] = _inpaint_unet(base.unet, in_channels)
    if xl:
        pipe = diffusers.StableDiffusionXLInpaintPipeline(
            **parts,
            force_zeros_for_empty_prompt=True,
            requires_aesthetics_score=False,
            add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_inpaint_pipeline(
    folder: str | Path, scheduler: Any = None, *, xl: bool = False, aesthetic: bool = False
) -> Any:
    """A ``StableDiffusionControlNetInpaintPipeline`` of ``tiny_text_to_image_pipeline``'s
    parts (with ``xl``, a ``StableDiffusionXLControlNetInpaintPipeline`` of
    ``tiny_sdxl_pipeline``'s, whose ``force_zeros_for_empty_prompt`` it keeps) with
    ``tiny_inpaint_pipeline``'s 9-channel unet and ``tiny_controlnet`` of the text-to-image
    unet (seed 2, ``in_channels = 4``: the pipeline calls it on the latents alone, before it
    adds the mask and masked image's channels for the unet). 16 x 16 RGB images and control
    images, 1-channel masks. With ``aesthetic`` (SDXL only) the pipeline's config has
    ``requires_aesthetics_score=True``, and the unet and the controlnet take five time ids
    (original size, crop, aesthetic score), as SDXL's refiner does: the 9-channel unet and
    the text-to-image one the controlnet is made from have the SDXL unet's config with
    ``projection_class_embeddings_input_dim`` = 8 + 5 x 4, weights drawn with
    ``torch.manual_seed(0)``; without it the pipeline has
    ``requires_aesthetics_score=False``, and six time ids as SDXL base. ``scheduler``
    defaults to theirs. Float32; the progress bar is off."""
    if aesthetic and not xl:
        raise ValueError("aesthetic is SDXL's requires_aesthetics_score; pass xl=True with it")
    if xl:
        base = tiny_sdxl_pipeline(folder, scheduler)
    else:
        base = tiny_text_to_image_pipeline(folder, scheduler)
    parts = dict(base.components)
    unet = base.unet
    if aesthetic:  # the text-to-image unet of five time ids, for the controlnet too
        unet = _inpaint_unet(unet, 4, projection_class_embeddings_input_dim=8 + 5 * 4)
    controlnet = tiny_controlnet(unet)
    parts["unet"] = _inpaint_unet(unet, 9)
    if xl:
        pipe = diffusers.StableDiffusionXLControlNetInpaintPipeline(
            **parts,
            controlnet=controlnet,
            requires_aesthetics_score=aesthetic,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
            **parts, controlnet=controlnet, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_image_encoder(seed: int) -> tuple[Any, Any]:
    """An IP-Adapter's image encoder and its processor: a one-layer
    ``CLIPVisionModelWithProjection`` of width 8 on 16 x 16 RGB images (patches of 8) whose
    projection (8) is the image embedding, weights drawn with ``torch.manual_seed(seed)``, in
    eval mode; and a ``CLIPImageProcessor`` that resizes and crops images to 16 x 16."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=8,
    )
    encoder = transformers.CLIPVisionModelWithProjection(config).eval()
    return encoder, transformers.CLIPImageProcessor(size=16, crop_size=16)


def _ip_adapter_state_dict(
    unet: Any, image_embed_dim: int, seed: int, plus: bool = False
) -> dict[str, Any]:
    """A plain IP-Adapter's weights for ``unet``, in the layout of the released checkpoints
    that ``load_ip_adapter`` takes as a dict: ``image_proj`` (a linear map of the image
    embedding, of width ``image_embed_dim``, to 4 tokens of the unet's
    ``cross_attention_dim``, and their layer norm) and ``ip_adapter`` (the image tokens' key
    and value maps ``to_k_ip`` and ``to_v_ip`` of each cross-attention layer, numbered 1, 3,
    5, ... in the order of ``unet.attn_processors``, of that layer's block width), drawn with
    a generator seeded ``seed``. With ``plus``, an IP-Adapter Plus's: ``image_proj`` is a
    resampler of the image encoder's hidden states (of width ``image_embed_dim``) to 4
    tokens, ``_plus_image_proj``'s."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    cross = unet.config.cross_attention_dim
    tokens = 4  # diffusers' ImageProjection of a plain IP-Adapter
    image_proj = {
        "proj.weight": draw(tokens * cross, image_embed_dim),
        "proj.bias": draw(tokens * cross, scale=0.1),
        "norm.weight": 1.0 + draw(cross, scale=0.1),
        "norm.bias": draw(cross, scale=0.1),
    }
    if plus:
        image_proj = _plus_image_proj(draw, image_embed_dim, cross, tokens)
    widths = list(unet.config.block_out_channels)
    ip_adapter: dict[str, torch.Tensor] = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):  # self-attention: no image tokens
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            width = widths[-1]
        elif block == "up_blocks":
            width = widths[::-1][int(name.split(".")[1])]
        else:
            width = widths[int(name.split(".")[1])]
        key = len(ip_adapter) + 1  # 1, 3, 5, ...: two entries a layer so far
        ip_adapter[f"{key}.to_k_ip.weight"] = draw(width, cross)
        ip_adapter[f"{key}.to_v_ip.weight"] = draw(width, cross)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _plus_image_proj(draw: Any, width: int, cross: int, tokens: int) -> dict[str, Any]:
    """An IP-Adapter Plus's ``image_proj`` in the released checkpoints' layout, drawn by
    ``draw(*shape, scale=...)``: a resampler (diffusers' ``IPAdapterPlusImageProjection``,
    whose loader reads its sizes from these shapes: 4 blocks, heads of 64) of 16 channels
    with ``tokens`` learned queries and one head, from hidden states of ``width`` to tokens
    of ``cross``."""
    hidden, inner = 16, 64  # the loader takes heads = to_q rows // 64
    proj: dict[str, Any] = {
        "latents": draw(1, tokens, hidden, scale=0.25),
        "proj_in.weight": draw(hidden, width),
        "proj_in.bias": draw(hidden, scale=0.1),
        "proj_out.weight": draw(cross, hidden),
        "proj_out.bias": draw(cross, scale=0.1),
        "norm_out.weight": 1.0 + draw(cross, scale=0.1),
        "norm_out.bias": draw(cross, scale=0.1),
    }
    for i in range(4):
        block = f"layers.{i}"
        for norm in (f"{block}.0.norm1", f"{block}.0.norm2", f"{block}.1.0"):
            proj[f"{norm}.weight"] = 1.0 + draw(hidden, scale=0.1)
            proj[f"{norm}.bias"] = draw(hidden, scale=0.1)
        proj[f"{block}.0.to_q.weight"] = draw(inner, hidden)
        proj[f"{block}.0.to_kv.weight"] = draw(2 * inner, hidden)
        proj[f"{block}.0.to_out.weight"] = draw(hidden, inner, scale=0.1)
        proj[f"{block}.1.1.weight"] = draw(4 * hidden, hidden)
        proj[f"{block}.1.3.weight"] = draw(hidden, 4 * hidden, scale=0.1)
    return proj


def add_tiny_ip_adapter(pipe: Any, *, adapters: int = 1, plus: bool = False) -> Any:
    """Load an IP-Adapter of random weights into ``pipe`` (a tiny Stable Diffusion or SDXL
    pipeline of this module: text-to-image, ControlNet, ...), nothing downloaded; returns
    ``pipe``.

    ``_tiny_image_encoder``'s ``CLIPVisionModelWithProjection`` (seed 4, image embeddings of
    width 8 from 16 x 16 RGB images) and ``CLIPImageProcessor`` become its
    ``image_encoder`` and ``feature_extractor``, and ``pipe.load_ip_adapter`` loads a plain
    IP-Adapter's state dict (seed 5; with ``adapters`` > 1 that many, seeds 5, 6, ...),
    which sets the unet's ``encoder_hid_dim_type`` to ``"ip_image_proj"``, its
    ``encoder_hid_proj`` to the image projections (4 image tokens each) and its
    cross-attention processors to IP-Adapter ones (scale 1). The pipeline then takes
    ``ip_adapter_image`` (one image, or a list of one per adapter) or
    ``ip_adapter_image_embeds`` (a list of one ``(2, 1, 8)`` tensor per adapter under
    guidance, negative first, ``(1, 1, 8)`` without). With ``plus``, IP-Adapter Plus ones:
    their projection resamples the image encoder's penultimate hidden states, so the
    embeddings are ``(2, 1, 5, 8)`` (5 tokens: 4 patches and the class token), the
    negative half the hidden states of an all-zero input."""
    # A plain IP-Adapter projects the image embedding; a Plus one the hidden states.
    return _load_tiny_ip_adapters(
        pipe,
        lambda config: [
            _ip_adapter_state_dict(
                pipe.unet,
                config.hidden_size if plus else config.projection_dim,
                seed=5 + k,
                plus=plus,
            )
            for k in range(adapters)
        ],
    )


def _load_tiny_ip_adapters(pipe: Any, weights_of: Any) -> Any:
    """``pipe`` with ``_tiny_image_encoder``'s encoder (seed 4) and processor registered as
    its ``image_encoder`` and ``feature_extractor``, and the IP-Adapters of the state dicts
    ``weights_of(the encoder's config)`` loaded by its ``load_ip_adapter``."""
    encoder, processor = _tiny_image_encoder(seed=4)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    weights = weights_of(encoder.config)
    n = len(weights)
    # A dict is loaded as it is (subfolder and weight_name name no file then).
    pipe.load_ip_adapter(weights, subfolder=[""] * n, weight_name=[""] * n, low_cpu_mem_usage=False)
    return pipe


def tiny_ip_adapter_pipeline(
    folder: str | Path,
    scheduler: Any = None,
    *,
    xl: bool = False,
    adapters: int = 1,
    plus: bool = False,
) -> Any:
    """``tiny_text_to_image_pipeline``'s ``StableDiffusionPipeline`` (with ``xl``,
    ``tiny_sdxl_pipeline``'s ``StableDiffusionXLPipeline``, whose
    ``force_zeros_for_empty_prompt`` it keeps) with ``add_tiny_ip_adapter``'s image encoder
    and IP-Adapter (``adapters`` of them, IP-Adapter Plus ones with ``plus``) loaded. 16 x 16
    RGB images and image prompts; ``scheduler`` defaults to theirs. Float32; the progress
    bar is off."""
    if xl:
        pipe = tiny_sdxl_pipeline(folder, scheduler)
    else:
        pipe = tiny_text_to_image_pipeline(folder, scheduler)
    return add_tiny_ip_adapter(pipe, adapters=adapters, plus=plus)


def _flux_ip_adapter_state_dict(
    transformer: Any, image_embed_dim: int, seed: int
) -> dict[str, Any]:
    """A Flux IP-Adapter's weights for ``transformer``, in the layout that
    ``FluxIPAdapterMixin.load_ip_adapter`` takes as a dict (XLabs' checkpoints after its
    renaming): ``image_proj`` (a linear map of the image embedding, of width
    ``image_embed_dim``, to 4 tokens of the transformer's ``joint_attention_dim``, and their
    layer norm) and ``ip_adapter`` (the image tokens' key and value maps ``to_k_ip`` and
    ``to_v_ip``, with biases, of each double-stream block, numbered 0, 1, ... in block order,
    from ``joint_attention_dim`` to the blocks' width, heads times head dim), drawn with a
    generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    config = transformer.config
    cross = config.joint_attention_dim
    width = config.num_attention_heads * config.attention_head_dim
    tokens = 4  # the loader's ImageProjection of a plain IP-Adapter
    image_proj = {
        "proj.weight": draw(tokens * cross, image_embed_dim),
        "proj.bias": draw(tokens * cross, scale=0.1),
        "norm.weight": 1.0 + draw(cross, scale=0.1),
        "norm.bias": draw(cross, scale=0.1),
    }
    ip_adapter: dict[str, torch.Tensor] = {}
    for block in range(config.num_layers):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{block}.{name}.weight"] = draw(width, cross)
            ip_adapter[f"{block}.{name}.bias"] = draw(width, scale=0.1)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def add_tiny_flux_ip_adapter(pipe: Any, *, adapters: int = 1) -> Any:
    """Load a Flux IP-Adapter of random weights into ``pipe`` (a tiny Flux pipeline of this
    module with the ``FluxIPAdapterMixin``: ``FluxPipeline``, ``FluxControlNetPipeline``,
    ..., or ``tiny_chroma_pipeline``'s ``ChromaPipeline``, which loads Flux's adapters),
    nothing downloaded; returns ``pipe``.

    ``_tiny_image_encoder``'s ``CLIPVisionModelWithProjection`` (seed 4, image embeddings of
    width 8 from 16 x 16 RGB images) and ``CLIPImageProcessor`` become its
    ``image_encoder`` and ``feature_extractor``, and ``pipe.load_ip_adapter`` loads
    ``_flux_ip_adapter_state_dict``'s weights (seed 7; with ``adapters`` > 1 that many,
    seeds 7, 8, ...), which sets the transformer's ``encoder_hid_dim_type`` to
    ``"ip_image_proj"``, its ``encoder_hid_proj`` to the image projections (4 image tokens
    each) and its double-stream blocks' attention processors to IP-Adapter ones (scale 1).
    The pipeline then takes ``ip_adapter_image`` (one image, or a list of one per adapter)
    or ``ip_adapter_image_embeds`` (a list of one ``(1, 1, 8)`` tensor per adapter), and for
    true CFG their ``negative_`` counterparts (by default the embeddings of an all-zero
    image)."""
    return _load_tiny_ip_adapters(
        pipe,
        lambda config: [
            _flux_ip_adapter_state_dict(pipe.transformer, config.projection_dim, seed=7 + k)
            for k in range(adapters)
        ],
    )


def tiny_flux_ip_adapter_pipeline(
    folder: str | Path,
    scheduler: Any = None,
    *,
    guidance_embeds: bool = True,
    adapters: int = 1,
) -> Any:
    """``tiny_flux_pipeline``'s ``FluxPipeline`` with ``add_tiny_flux_ip_adapter``'s image
    encoder and IP-Adapter (``adapters`` of them) loaded. 16 x 16 RGB images and image
    prompts; ``scheduler`` defaults to Flux.1-dev's. Float32; the progress bar is off."""
    pipe = tiny_flux_pipeline(folder, scheduler, guidance_embeds=guidance_embeds)
    return add_tiny_flux_ip_adapter(pipe, adapters=adapters)


def _sd3_ip_adapter_state_dict(transformer: Any, image_embed_dim: int, seed: int) -> dict[str, Any]:
    """An SD3 IP-Adapter's weights for ``transformer`` (InstantX's SD3.5 one in diffusers'
    names, which ``SD3IPAdapterMixin.load_ip_adapter`` takes as a dict as they are):
    ``image_proj``, an ``IPAdapterTimeImageProjection`` (the loader's fixed depth 4 and heads
    of 64; a width of 16, 4 learned queries, timesteps embedded in 8 channels) from image
    hidden states of width ``image_embed_dim`` to the transformer's width, and
    ``ip_adapter``, the ``SD3IPAdapterJointAttnProcessor2_0`` of each attention layer,
    numbered 0, 1, ... in the order of ``transformer.attn_processors``. Each module is made
    by diffusers with weights drawn after ``torch.manual_seed(seed)``, their state dicts
    taken as they are (a random norm or bias of 0 or 1 would hide nothing here: the run is
    compared with the pipeline's, not with a model)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    hidden, time_dim = 16, 8
    torch.manual_seed(seed)
    projection = IPAdapterTimeImageProjection(
        embed_dim=image_embed_dim,
        output_dim=width,
        hidden_dim=hidden,
        heads=1,
        num_queries=4,
        timestep_in_dim=time_dim,
    )
    ip_adapter: dict[str, torch.Tensor] = {}
    for index in range(len(transformer.attn_processors)):
        processor = SD3IPAdapterJointAttnProcessor2_0(
            hidden_size=width,
            ip_hidden_states_dim=width,
            head_dim=config.attention_head_dim,
            timesteps_emb_dim=hidden,
        )
        for name, value in processor.state_dict().items():
            ip_adapter[f"{index}.{name}"] = value
    return {"image_proj": projection.state_dict(), "ip_adapter": ip_adapter}


def _tiny_siglip_encoder(seed: int) -> tuple[Any, Any]:
    """SD3's IP-Adapter's image encoder and its processor: a two-layer ``SiglipVisionModel``
    of width 8 on 16 x 16 RGB images (patches of 8: 4 tokens), weights drawn with
    ``torch.manual_seed(seed)``, in eval mode; and a ``SiglipImageProcessor`` that resizes
    images to 16 x 16."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    encoder = transformers.SiglipVisionModel(config).eval()
    return encoder, transformers.SiglipImageProcessor(size={"height": 16, "width": 16})


def add_tiny_sd3_ip_adapter(pipe: Any) -> Any:
    """Load an SD3 IP-Adapter of random weights into ``pipe`` (``tiny_sd3_pipeline``'s
    ``StableDiffusion3Pipeline``), nothing downloaded; returns ``pipe``.

    ``_tiny_siglip_encoder``'s ``SiglipVisionModel`` (seed 4), whose penultimate hidden
    states, ``(1, 4, 8)`` an image, the pipeline's ``encode_image`` takes, and
    ``SiglipImageProcessor`` become its ``image_encoder`` and ``feature_extractor``;
    ``pipe.load_ip_adapter`` loads ``_sd3_ip_adapter_state_dict``'s weights (seed 7), which
    sets the transformer's ``image_proj`` and its attention processors to IP-Adapter ones
    (scale 0.5, the loader's). The pipeline then takes ``ip_adapter_image`` or
    ``ip_adapter_image_embeds`` (one tensor, ``(2, 4, 8)`` under guidance, the negative half
    first: zeros from an image)."""
    encoder, processor = _tiny_siglip_encoder(seed=4)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    weights = _sd3_ip_adapter_state_dict(pipe.transformer, encoder.config.hidden_size, seed=7)
    pipe.load_ip_adapter(weights, low_cpu_mem_usage=False)
    return pipe
