"""A diffusers UNet and a diffusers scheduler's noise table, or a flow-matching transformer
(Stable Diffusion 3's, Flux's, Qwen-Image's, Z-Image's, Sana's, Wan's, ...) and its
flow-matching scheduler, as a ``bdia.DiffusionODE``.

diffusers keeps the noise schedule in its scheduler (``alphas_cumprod``, one value per
training timestep ``tau = 0 .. N-1``) and calls the network as ``unet(sample, tau, **kwargs)``.
Schedulers keep their samples in one of three spaces, and so does the ODE built here:

- ``"vp"`` (DDIM, DDPM, PNDM, DPM-Solver, DEIS, UniPC, ...): ``x = alpha x0 + sigma eps`` with
  ``alpha^2 = alphas_cumprod``. The schedule is ``VPDiscrete(alphas_cumprod=...)``, whose time
  ``t = (tau + 1) / N`` puts diffusers' timestep ``tau`` on the knot ``alphas_cumprod[tau]``,
  and the network is called at ``tau = t N - 1`` (fractional between knots).
- ``"edm"`` (Euler, Heun, LMS, KDPM2, ...): ``x / alpha = x0 + sigma_bar eps`` with
  ``sigma_bar = sqrt((1 - alphas_cumprod) / alphas_cumprod)``. The schedule is ``EDM()``, whose
  time is ``sigma_bar``; the network sees ``x / sqrt(sigma_bar^2 + 1)`` (diffusers'
  ``scale_model_input``) at the timestep from which the scheduler made that noise level.
- ``"flow"`` (``FlowMatchEulerDiscreteScheduler`` or ``FlowMatchHeunDiscreteScheduler``, with
  ``SD3Transformer2DModel``): no noise table; ``x = (1 - sigma) x0 + sigma eps``, the
  schedule is ``RectifiedFlow()``, whose time is
  diffusers' ``sigma``, and the transformer is called as ``StableDiffusion3Pipeline`` calls it,
  at ``timestep = sigma N``, returning the velocity ``eps - x0`` (prediction ``"flow"``).
  ``FluxTransformer2DModel`` is called as ``FluxPipeline`` calls it: on the packed latents
  ``(batch, tokens, in_channels)`` at ``timestep = sigma N / 1000``, with ``txt_ids`` and
  ``img_ids`` and, for Flux.1-dev, the embedded ``guidance``. A Fill transformer
  (``FluxFillPipeline``'s) takes ``mask=`` and ``masked_image_latents=`` as extra channels of
  those tokens, a Depth or Canny one (``FluxControlPipeline``'s) ``control_latents=``, and
  ``FluxKontextPipeline``'s takes ``image_latents=``, a reference image's tokens after the
  latents' (see below). ``ChromaTransformer2DModel`` is called as ``ChromaPipeline`` calls
  it, as Flux's but with T5's ``encoder_hidden_states`` alone (no pooled embeddings, no
  guidance embedding) and an ``attention_mask`` over the text and image tokens.
  ``Flux2Transformer2DModel`` is called as ``Flux2Pipeline`` and ``Flux2KleinPipeline`` call
  it, as Flux's with ``txt_ids`` and ``img_ids`` of 4 axes, no pooled embeddings, FLUX.2-dev's
  embedded ``guidance`` (Klein's true CFG as Flux's), and their reference images' tokens as
  ``image_latents=``, as Kontext's.
  ``QwenImageTransformer2DModel`` is called as ``QwenImagePipeline`` (and
  ``QwenImageImg2ImgPipeline``, in the same way) calls it: on the packed latents ``(batch,
  tokens, in_channels)`` (its ``out_channels`` count the latents before packing) at
  ``timestep = sigma N / 1000``, with ``encoder_hidden_states``,
  ``encoder_hidden_states_mask`` and ``img_shapes``; its true CFG makes two calls, the
  conditional one first, and rescales the guided velocity of each token to the norm of the
  conditional one, as the pipeline does. ``QwenImageEditPipeline`` calls it so with
  ``image_latents=``, as Flux Kontext's (below), and ``QwenImageEditPlusPipeline`` with
  several reference images' latents concatenated there. ``ZImageTransformer2DModel`` is
  called as ``ZImagePipeline`` (and ``ZImageImg2ImgPipeline``) calls it: on a list of
  per-sample latents ``(C, 1, h, w)`` of the image-shaped state, at ``timestep = (1000 -
  sigma N) / 1000``, with ``cap_feats``, a list of per-sample prompt embeddings of their own
  lengths; it predicts ``x0 - eps``, which is negated, and its CFG is the pipeline's (see
  ``bdia.integrations.diffusers._z_image``). ``SanaTransformer2DModel`` is called as SD3's
  transformer is, with the prompt's ``encoder_attention_mask`` and its timestep times the
  config's ``timestep_scale``, as ``SanaPipeline`` calls it, and Wan's text-to-video
  ``WanTransformer3DModel`` so on video latents ``(batch, C, frames, h, w)``, its guidance
  two calls with the conditional one first, as ``WanPipeline`` makes them, and Wan 2.2's
  low-noise expert (``transformer_2``) below the pipeline's ``boundary_ratio``. Their
  pipelines' own schedulers (DPM-Solver and UniPC with ``use_flow_sigmas``) call the
  transformer at integer timesteps and are refused; the flow-matching scheduler of their
  ``flow_shift`` takes their place.

The EDM-preconditioned schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``:
Playground v2.5's) have no table either. Their samples are ``x = x0 + sigma eps`` (``"edm"``
space, ``EDM()``, time ``sigma``), and the unet is the raw network ``F`` of Karras et al.'s
denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``, with ``c_noise = 0.25 log
sigma`` its timestep and ``c_skip``, ``c_out``, ``c_in`` of the config's ``sigma_data``, as
the schedulers' ``precondition_*`` methods write them (``c_out`` negated for
``v_prediction``); the ODE's model is that denoiser (prediction ``"denoised"``).

With ``controlnet=`` (a ``ControlNetModel`` of Stable Diffusion's or SDXL's unet, or
several), every model evaluation calls it before the unet on the unet's input and timestep,
as ``StableDiffusionControlNetPipeline`` and ``StableDiffusionXLControlNetPipeline`` do, and
the unet gets its residuals. A ``FluxControlNetModel`` is called so before Flux's
transformer, as ``FluxControlNetPipeline`` calls it: on the packed latents, with the control
image's packed latents and the transformer's timestep, prompt, guidance and ids; an
``SD3ControlNetModel`` before SD3's, as ``StableDiffusion3ControlNetPipeline`` calls it: on
the latents, with the control image's latents, the timestep and the prompt, under guidance
on the batch ``[unconditional, conditional]``; one with the mask's channel
(``extra_conditioning_channels = 1``, Alimama's inpainting kind) as
``StableDiffusion3ControlNetInpaintingPipeline`` calls it, with the masked image's latents
and the mask in one control input, fixed over the run: that pipeline does not blend, so its
run is an ODE in the latents too. A ``QwenImageControlNetModel`` (or the union wrapper
``QwenImageMultiControlNetModel`` of one, called once per control image) before Qwen-Image's,
as ``QwenImageControlNetPipeline`` calls it: on the packed latents, with the control image's
packed latents, the timestep, the prompt and its mask and the image shapes, once per
evaluation, true CFG's negative call taking the conditional call's residuals; one with the
packed mask's channels (``extra_condition_channels = 4``, the inpainting kind) as
``QwenImageControlNetInpaintPipeline`` calls it, in the same way, with the masked image's
packed latents and the packed mask in one control input: that pipeline does not blend either.
A ``ZImageControlNetModel`` (given the transformer's shared modules, as the pipelines give
them) before Z-Image's, as ``ZImageControlNetPipeline`` calls it: on the transformer's list
of latents, its timestep and its prompts (twice the batch under CFG, the control input
twice too), with the control image's latents as one frame; one of ``control_in_dim = 2 C +
1`` as ``ZImageControlNetInpaintPipeline`` calls it too, with the mask's channel and the
masked image's latents after the control image's: that pipeline does not blend either.

With ``mask=`` and ``masked_image_latents=`` (an inpainting unet's, Stable Diffusion's or
SDXL's with ``in_channels = 9``), every unet call takes ``torch.cat([x_in, mask,
masked_image_latents], dim=1)`` for its input ``x_in``, as ``StableDiffusionInpaintPipeline``
and ``StableDiffusionXLInpaintPipeline`` make it: the mask and the masked image are fixed
over the run, so the ODE is one in the latents alone. With a controlnet too, the controlnet
gets ``x_in`` alone, as ``StableDiffusionControlNetInpaintPipeline`` and
``StableDiffusionXLControlNetInpaintPipeline`` call it. A Flux Fill
transformer (``in_channels`` 384 for ``out_channels`` 64) takes them packed, after the
latents' channels of each token and in the other order, ``torch.cat([x, masked_image_latents,
mask], dim=2)``, as ``FluxFillPipeline`` makes it. A Depth or Canny transformer
(``in_channels`` 128 for ``out_channels`` 64) takes ``control_latents=``, a control image's
packed latents, after them the same way, ``torch.cat([x, control_latents], dim=2)``, as
``FluxControlPipeline`` makes it: the control image is fixed over the run too.

With ``image_latents=`` (a reference image's packed latents, ``FluxKontextPipeline``'s),
every Flux call takes ``torch.cat([x, image_latents], dim=1)``, the image's tokens after the
latents' (``img_ids`` holds both tokens' positions, as the pipeline concatenates them), and
the output's first ``tokens`` rows are the velocity, as that pipeline keeps them: the image is
fixed over the run too. ``QwenImageEditPipeline`` calls Qwen-Image's transformer the same way,
the shapes of both in each sample's ``img_shapes`` entry, ``[(1, h // 2, w // 2), (1, h' //
2, w' // 2)]``, in both calls of its true CFG; ``QwenImageEditPlusPipeline`` with its images'
latents concatenated along the tokens in their order, one shape per image after the
latents'. A transformer with ``zero_cond_t`` (Qwen-Image-Edit-2511's) modulates the tokens
after the first ``img_shapes`` entry as at timestep 0, which it reads from ``img_shapes``
alone: the call is passed through as the pipeline makes it.

The ODE's time grid is ``diffusers_grid``'s, in ``bdia.integrations.diffusers.grid``
(importable from here too). The scheduler's recognition and config checks, the
conditioning's checks and the ControlNet's have modules of their own in this package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from torch import Tensor

from ...ode import DTYPE_NAMES, DiffusionODE, values_on
from ._conditioning import (
    _FLOW_RESERVED,
    _FLUX_IDS,
    _RESERVED,
    _batched,
    _cast_cond,
    _check_chroma_cond,
    _check_cond,
    _check_flux2_cond,
    _check_flux_cond,
    _check_flux_ip_adapter,
    _check_guidance,
    _check_ip_adapter,
    _check_qwen_image_cond,
    _check_rescale_value,
    _check_sd3_ip_adapter,
    _check_timestep_cond,
    _fill_cond,
    _flux_control_cond,
    _flux_kwargs,
    _inpaint_cond,
    _kontext_cond,
    _paired,
    _qwen_image_tokens,
    _rescaled_guidance,
)
from ._controlnet import (
    _CONTROLNET_ADDED,
    _MULTI_CONTROLNET,
    _RESIDUALS,
    _control,
    _control_factor,
    _controlnets,
)
from ._flow_controlnet import (
    _check_flow_control_image,
    _check_flow_controlnet,
    _flow_control,
    _flow_residuals,
    _qwen_multi,
)
from ._scheduler_config import (
    _EDM_PREDICTIONS,
    _SIGMA_SLACK,
    _SPACES,
    _check_edm_config,
    _check_flow_config,
    _check_model_config,
    _check_pairing,
    _check_schedule_config,
    _class_names,
    _clean_end,
    _is_chroma,
    _is_flux,
    _is_flux2,
    _is_pixart,
    _is_preconditioned,
    _is_qwen_image,
    _is_sana,
    _is_wan,
    _is_z_image,
    _schedule,
    _scheduler,
    _sigma_rule,
    _space,
    _table,
)
from ._z_image import _Z_IMAGE_OPTIONS, _check_z_image_cond, z_image_velocity
from .grid import diffusers_grid

__all__ = ["from_diffusers", "diffusers_grid", "DiffusersModel"]

# FluxPipeline passes the transformer its timestep divided by this constant (which the
# transformer multiplies back), whatever the scheduler's num_train_timesteps.
_FLUX_TIMESTEP_DIVISOR = 1000
# A timestep tau = t N - 1 within this of an integer is that integer (within 2 N eps when t
# arrives in float32), so the network sees diffusers' integer timesteps exactly: a float64 t
# puts tau ~1e-13 off, a float32 one up to N * 6e-8.
_SNAP_TAU = 1e-6
# FreeU's factors, set on each up block of a unet by enable_freeu (None: off).
_FREEU = ("s1", "s2", "b1", "b2")
# Significant digits of a LoRA layer's scaling in the fingerprint: a unet called with
# cross_attention_kwargs={"scale": w} multiplies it by w and divides it back afterwards, which
# may leave it an ulp off, and a fingerprint taken after a run must not see that.
_SCALING_DIGITS = 12
# diffusers' num_train_timesteps of every flow-matching scheduler's config by default.
_FLOW_TIMESTEPS = 1000


def _settings_state(net: Any) -> list[tuple[str, dict[str, Any]]]:
    """The settings in ``net``'s submodules that change what it computes without being a
    parameter or buffer, as ``(submodule name, {setting: value})`` for each submodule that
    has one: an attention processor's ``scale`` (an IP-Adapter's, which
    ``set_ip_adapter_scale`` sets), a peft tuner layer's (a LoRA's) scaling per adapter,
    active adapters, whether adapters are disabled and which are merged (``set_adapters``,
    ``disable_lora``, ``fuse_lora``), and FreeU's factors (``enable_freeu``). Other plain
    attributes are left out: gradient checkpointing, chunking, attention slicing and the
    like leave the output alone, and would make two runs of one model look like two models.
    Empty for a net without any of them."""
    state: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(net, torch.nn.Module):
        return state
    for name, module in net.named_modules():
        attributes = vars(module)
        found: dict[str, Any] = {}
        # Attention's processor: a submodule (an IP-Adapter's) or a plain attribute.
        processor = attributes.get("processor", module._modules.get("processor"))
        if processor is not None and hasattr(processor, "scale"):
            found["processor_scale"] = processor.scale
        if isinstance(attributes.get("scaling"), Mapping) and "merged_adapters" in attributes:
            found["scaling"] = {
                str(k): float(f"{v:.{_SCALING_DIGITS}g}") if isinstance(v, float) else v
                for k, v in module.scaling.items()
            }
            found["active_adapters"] = list(getattr(module, "active_adapters", []))
            found["disable_adapters"] = bool(getattr(module, "disable_adapters", False))
            found["merged_adapters"] = list(module.merged_adapters)
        for key in _FREEU:
            if attributes.get(key) is not None:
                found[key] = attributes[key]
        if found:
            state.append((name, found))
    return state


# ----------------------------------------------------------------------------- model


class DiffusersModel(torch.nn.Module):
    """A diffusers UNet called in bdia's convention for a ``DiffusionODE`` (see ``from_diffusers``).

    Args:
        unet: ``unet(sample, timestep, **kwargs)`` returning a tensor, a tuple whose first
            entry is the prediction, or an object with ``.sample`` (diffusers' UNets); a
            ``PixArtTransformer2DModel`` as ``unet(sample, timestep=tau, return_dict=False,
            **kwargs)``, as PixArt's pipelines call it; in ``"flow"`` space
            ``unet(hidden_states=x, timestep=tau, return_dict=False, **kwargs)`` (SD3's
            transformer; Sana's, at ``tau`` times its config's ``timestep_scale``, as
            ``SanaPipeline`` calls it; Wan's on video latents ``(batch, C, frames, h, w)``,
            guidance in two calls, the conditional one first, as ``WanPipeline`` calls it, and
            with ``expand_timesteps`` one timestep per token of 2 x 2 patches; Flux's with
            ``flux``).
        alphas_cumprod: the noise table, N values (float64 is kept as is); None in ``"flow"``
            space and with ``sigma_data``, which have none.
        space: ``"vp"`` (the ODE's time is ``t = (tau + 1) / N``), ``"edm"`` (its time is
            ``sigma_bar``) or ``"flow"`` (its time is the flow-matching ``sigma``, and
            ``tau = sigma N``).
        sigma_rule: EDM space only, how a noise level maps to the timestep: ``"linear"``
            (sigma interpolated linearly between integer timesteps, diffusers' default),
            ``"log"`` (log sigma, diffusers' ``_sigma_to_t`` for Karras, exponential and beta
            sigmas and lu lambdas) or ``"continuous"`` (``0.25 log sigma``).
        learned_variance: the unet returns ``2 C`` channels for ``C`` input channels, the
            second half a variance; only the first half is used.
        prediction: ``"eps"``, ``"x0"`` or ``"v"``, what the unet predicts (EDM space scales
            ``v`` to the EDM state, see ``forward``); ``"flow"`` in ``"flow"`` space.
        num_train_timesteps: ``N`` in ``"flow"`` space (the noise table's length otherwise).
        sigma_data: ``"edm"`` space only, for an EDM-preconditioned scheduler's unet (no
            table): the model is the denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x,
            c_noise)`` of the unet ``F``, with ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out
            = sigma sd / sqrt(sigma^2 + sd^2)`` (negated for ``prediction="v"``, diffusers'
            ``v_prediction``), ``c_in = 1 / sqrt(sigma^2 + sd^2)`` and the timestep
            ``c_noise = 0.25 log sigma``, where ``sd = sigma_data``.
        unet_dtype: with ``sigma_data``, the dtype the unet gets ``c_in x`` in (its own); the
            preconditioning runs in the state's dtype as it comes, float32 at least. None:
            that dtype.
        flux: ``"flow"`` space only, call the transformer as ``FluxPipeline`` calls Flux's:
            the state is the packed latents ``(batch, tokens, out_channels)`` (the config's
            ``out_channels``, or ``in_channels`` where it is None), the timestep is
            ``tau / 1000`` in the dtype the transformer gets the state in (the pipeline's
            ``t.to(latents.dtype) / 1000``), ``txt_ids`` and ``img_ids`` pass through
            unbatched, and guidance makes two calls, the conditional one first.
        qwen_image: ``"flow"`` space only, call the transformer as ``QwenImagePipeline``
            calls Qwen-Image's: the state is the packed latents ``(batch, tokens,
            in_channels)``, the timestep as with ``flux``, and guidance makes two calls, the
            conditional one first, whose guided output ``g = u + s (c - u)`` is rescaled to
            ``g |c| / |g|``, norms over each token's channels (the last dim); reference
            images' ``image_latents`` as ``QwenImageEditPipeline`` and
            ``QwenImageEditPlusPipeline`` give them.
        z_image: ``"flow"`` space only, call the transformer as ``ZImagePipeline`` calls
            Z-Image's: the state is the image-shaped latents ``(batch, C, h, w)``, passed as a
            list of ``(C, 1, h, w)``, the timestep ``(1000 - tau) / 1000`` (float32, float64
            for a float64 state), the prompts ``cap_feats`` a list of per-sample embeddings,
            and CFG (``guidance_scale > 0``) one call on the batch twice over, the prompts
            then the negative ones, guided as ``c + g (c - u)`` with the pipeline's
            ``cfg_normalization`` and ``cfg_truncation``; the output is negated.
        controlnet: ``"vp"`` and ``"edm"`` space, a diffusers ``ControlNetModel`` or
            ``MultiControlNetModel`` called before the unet on the same inputs, whose
            residuals the unet gets, as ``StableDiffusionControlNetPipeline`` and
            ``StableDiffusionXLControlNetPipeline`` call them (see ``forward``); with
            ``flux``, a ``FluxControlNetModel``, as ``FluxControlNetPipeline`` calls it, with
            ``qwen_image`` a ``QwenImageControlNetModel`` or ``QwenImageMultiControlNetModel``
            of one, as ``QwenImageControlNetPipeline`` calls it, with ``z_image`` a
            ``ZImageControlNetModel``, as ``ZImageControlNetPipeline`` calls it, and in
            ``"flow"`` space without any of them an ``SD3ControlNetModel``, as
            ``StableDiffusion3ControlNetPipeline`` calls it.
        unet_2: Wan 2.2's low-noise transformer, beside a Wan ``unet``: called where the
            float32 timestep ``sigma N`` falls below the float32 ``boundary_ratio N``, under
            ``forward``'s ``guidance_scale_2``.
        boundary_ratio: with ``unet_2``, in (0, 1): the pipeline's ``boundary_ratio``.
        expand_timesteps: a Wan ``unet`` gets its timestep as ``(batch, tokens)``, one copy
            per latent token of 2 x 2 patches, as ``WanPipeline`` with ``expand_timesteps``
            (Wan 2.2 TI2V-5B's) gives it.

    ``forward(x, t, guidance_scale=None, negative_cond=None, controlnet_cond=None,
    conditioning_scale=1.0, guess_mode=False, control_range=None, mask=None,
    masked_image_latents=None, image_latents=None, control_latents=None,
    guidance_scale_2=None, **unet_kwargs)``: see there. An inpainting unet or a Flux Fill
    transformer (``in_channels`` of its config more than the state's channels) takes ``mask``
    and ``masked_image_latents`` there, a Flux Depth or Canny transformer
    ``control_latents``; Flux Kontext's and Qwen-Image-Edit's reference image comes as
    ``image_latents``.
    """

    # It maps each time to its scheduler's timestep in Python: DiffusionODE hands it the time
    # on the host, so that reading it never waits for the device.
    reads_time_on_host = True

    def __init__(
        self,
        unet: Any,
        alphas_cumprod: Any,
        *,
        space: str,
        sigma_rule: str = "linear",
        learned_variance: bool = False,
        prediction: str = "eps",
        num_train_timesteps: int | None = None,
        sigma_data: float | None = None,
        unet_dtype: torch.dtype | None = None,
        flux: bool = False,
        qwen_image: bool = False,
        z_image: bool = False,
        controlnet: Any = None,
        unet_2: Any = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ) -> None:
        super().__init__()
        if space not in _SPACES:
            raise ValueError(f"space must be 'vp', 'edm' or 'flow', got {space!r}")
        if sigma_data is not None and (space != "edm" or prediction not in ("eps", "v")):
            raise ValueError(
                f"sigma_data (an EDM-preconditioned unet) needs space 'edm' and prediction "
                f"'eps' or 'v', got {space!r} and {prediction!r}"
            )
        if (space == "flow" or sigma_data is not None) != (alphas_cumprod is None):
            raise ValueError(
                "space 'flow' (with num_train_timesteps) and sigma_data (an EDM-preconditioned "
                "unet) take no alphas_cumprod; 'vp' and 'edm' otherwise take it"
            )
        if flux and space != "flow":
            raise ValueError(f"flux=True needs space 'flow', got {space!r}")
        if qwen_image and (space != "flow" or flux):
            raise ValueError(f"qwen_image=True needs space 'flow' and no flux, got {space!r}")
        if z_image and (space != "flow" or flux or qwen_image):
            raise ValueError(
                f"z_image=True needs space 'flow' without flux or qwen_image, got space {space!r}"
            )
        if sigma_rule not in ("linear", "log", "continuous"):
            raise ValueError(
                f"sigma_rule must be 'linear', 'log' or 'continuous', got {sigma_rule!r}"
            )
        self.unet = unet
        self.space = space
        self.sigma_rule = sigma_rule
        self.learned_variance = bool(learned_variance)
        self.prediction = prediction
        self.flux = bool(flux)
        # Flux.2's transformer is called as Flux's, with ids of 4 axes, batched or not.
        self._flux2 = self.flux and _is_flux2(unet)
        self.qwen_image = bool(qwen_image)
        self.z_image = bool(z_image)
        # PixArt's transformer takes its timestep by keyword: its second positional argument
        # is encoder_hidden_states.
        self._pixart = space != "flow" and _is_pixart(unet)
        # SanaPipeline multiplies the scheduler's timestep by the transformer's timestep_scale.
        self._sana = space == "flow" and _is_sana(unet)
        if self._sana and (flux or qwen_image or z_image or controlnet is not None):
            raise ValueError(
                "a SanaTransformer2DModel is called as SanaPipeline calls it: no flux, "
                "qwen_image, z_image or controlnet"
            )
        self._timestep_scale = float(unet.config.get("timestep_scale", 1.0)) if self._sana else 1.0
        # WanPipeline guides in two calls, the conditional one first.
        self._wan = space == "flow" and _is_wan(unet)
        if self._wan and (flux or qwen_image or z_image or controlnet is not None):
            raise ValueError(
                "a WanTransformer3DModel is called as WanPipeline calls it: no flux, "
                "qwen_image, z_image or controlnet"
            )
        # Wan 2.2's low-noise expert, called where the timestep falls below the boundary.
        self.unet_2 = unet_2
        if (unet_2 is None) != (boundary_ratio is None):
            raise ValueError(
                "unet_2 (Wan 2.2's low-noise transformer) and boundary_ratio come together: "
                "give both, or neither"
            )
        if unet_2 is not None:
            if not (self._wan and _is_wan(unet_2)):
                raise ValueError(
                    "unet_2 is Wan 2.2's second transformer, for a WanTransformer3DModel under "
                    f"a flow-matching scheduler; got {type(unet_2).__name__} beside "
                    f"{type(unet).__name__}"
                )
            ratio = boundary_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
                raise ValueError(f"boundary_ratio must be a number in (0, 1), got {ratio!r}")
        self._boundary_ratio = boundary_ratio
        # WanPipeline's expand_timesteps (Wan 2.2 TI2V-5B's): one timestep per token.
        if expand_timesteps and not self._wan:
            raise ValueError(
                "expand_timesteps gives a Wan transformer one timestep per token, as "
                "WanPipeline(expand_timesteps=True) does; this network is no "
                "WanTransformer3DModel under a flow-matching scheduler"
            )
        self.expand_timesteps = bool(expand_timesteps)
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self.unet_dtype = unet_dtype
        if sigma_data is not None:
            self.num_train_timesteps = 0  # no table: the timestep is 0.25 log sigma, no index
        elif space == "flow":
            if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
                raise ValueError(
                    f"space 'flow' needs num_train_timesteps, an integer >= 1, got "
                    f"{num_train_timesteps!r}"
                )
            self.num_train_timesteps = num_train_timesteps
        else:
            table = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).numpy()
            self.num_train_timesteps = int(table.size)
            # Noise levels of the integer timesteps, increasing with tau: EDM space reads them.
            # A zero-SNR table's last one is infinite, which only VP space takes.
            with np.errstate(divide="ignore"):
                self._sigmas = np.sqrt((1.0 - table) / table)
            self._log_sigmas = np.log(self._sigmas)
        config = getattr(unet, "config", None)
        self.in_channels = config.get("in_channels") if isinstance(config, Mapping) else None
        # A Flux state's channels: out_channels (None: in_channels), fewer than in_channels
        # for a Fill transformer, whose other input channels hold the mask and masked image,
        # and for a Depth or Canny one, whose other half holds the control image.
        out = config.get("out_channels") if isinstance(config, Mapping) else None
        self._packed_channels = out if isinstance(out, int) else self.in_channels
        if self.qwen_image:
            # Qwen-Image's out_channels are the latents' channels before packing, a quarter of
            # the packed tokens' in_channels, which its proj_out returns.
            self._packed_channels = self.in_channels
        self.controlnet = None
        self._nets: list[Any] = []
        self._multi = False
        # The flow transformer's family, as its ControlNet pipeline calls it.
        self._kind = "flux" if flux else "qwen" if qwen_image else "zimage" if z_image else "sd3"
        if controlnet is not None and space == "flow":
            _check_flow_controlnet(controlnet, unet, None, self._kind)
            self.controlnet, self._nets = controlnet, [controlnet]
            # Qwen-Image's union wrapper takes one control image (and scale) per entry.
            self._multi = _qwen_multi(controlnet)
        elif controlnet is not None:
            self.controlnet, self._nets = _controlnets(controlnet)
            self._multi = _MULTI_CONTROLNET in _class_names(self.controlnet)

    def __repr__(self) -> str:
        # Compact: the unet's own repr runs to hundreds of lines, and DiffusionODE shows this.
        control = ""
        if self.controlnet is not None:
            control = f", controlnet={type(self.controlnet).__name__}"
        if self.sigma_data is not None:
            return (
                f"DiffusersModel({type(self.unet).__name__}, space='edm', "
                f"sigma_data={self.sigma_data!r}, prediction={self.prediction!r}{control})"
            )
        rule = f", sigma_rule={self.sigma_rule!r}" if self.space == "edm" else ""
        return (
            f"DiffusersModel({type(self.unet).__name__}, space={self.space!r}, "
            f"N={self.num_train_timesteps}, prediction={self.prediction!r}{rule}{control})"
        )

    def fingerprint_state(self) -> list[tuple[str, dict[str, Any]]]:
        """The unet's and the controlnet's settings that change the vector field without
        being parameters or buffers (IP-Adapter scale, LoRA adapters' weights and state,
        FreeU), which ``ODE.fingerprint`` digests beside the weights: a pair sampled at one
        IP-Adapter scale and continued or inverted at another is noticed. Empty without any
        of them. Read when the fingerprint is taken, so it follows the pipeline's later
        ``set_ip_adapter_scale`` or ``set_adapters``. Also the adapter's own settings that
        neither the weights nor the ODE's schedule show, where they are not the defaults: a
        ``sigma_rule`` other than ``"linear"`` (Karras sigmas on the same table), an
        EDM-preconditioned unet's ``prediction`` and ``sigma_data``, and a flow
        transformer's ``num_train_timesteps`` other than 1000."""
        own: dict[str, Any] = {}
        if self.sigma_rule != "linear":
            own["sigma_rule"] = self.sigma_rule
        if self.sigma_data is not None:
            own.update(prediction=self.prediction, sigma_data=self.sigma_data)
        if self.space == "flow" and self.num_train_timesteps != _FLOW_TIMESTEPS:
            own["num_train_timesteps"] = self.num_train_timesteps
        # The defaults report nothing, so that ODEs which always differed keep their
        # fingerprints (those stored with saved latents among them).
        return (
            ([("", own)] if own else [])
            + _settings_state(self.unet)
            + [(f"controlnet.{name}", found) for name, found in _settings_state(self.controlnet)]
        )

    # ---------------------------------------------------------------- time -> timestep

    def timestep(self, t: float, dtype: torch.dtype = torch.float64) -> float:
        """The diffusers timestep ``tau`` the unet sees at the ODE time ``t``.

        ``t`` arrived in ``dtype`` (float32 for a float32 or half unet), which sets how far from
        a knot it may be and still count as that knot, so that the unet sees diffusers'
        integer timesteps exactly. In ``"flow"`` space it is ``sigma N`` with ``sigma = t``:
        for a float32 ``t`` the product is exact in float64, so rounding it to float32 gives
        diffusers' float32 ``sigmas * num_train_timesteps``. With ``sigma_data`` it is
        ``c_noise = 0.25 log t``, computed as diffusers' ``precondition_noise`` computes it
        from its float32 sigmas: in ``dtype`` (float64 for float64, float32 otherwise).
        """
        if self.sigma_data is not None:
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            return float(self._c_noise(torch.tensor(t, dtype=wide)))
        n = self.num_train_timesteps
        if self.space == "flow":
            return t * n
        if self.space == "vp":
            tau = t * n - 1.0
            k = round(tau)
            tol = max(_SNAP_TAU, 2.0 * n * torch.finfo(dtype).eps)
            return float(k) if abs(tau - k) <= tol else tau
        sigma = t
        if self.sigma_rule == "continuous":
            return 0.25 * math.log(sigma)
        lo, hi = float(self._sigmas[0]), float(self._sigmas[-1])
        if not lo * (1.0 - _SIGMA_SLACK) <= sigma <= hi * (1.0 + _SIGMA_SLACK):
            raise ValueError(
                f"sigma = {sigma:.6g} lies outside the unet's trained noise range [{lo:.6g}, "
                f"{hi:.6g}] (the scheduler's alphas_cumprod), where it has no timestep; keep the "
                "grid inside it (diffusers_grid does)"
            )
        sigma = min(max(sigma, lo), hi)
        if self.sigma_rule == "log":
            tau = float(np.interp(math.log(sigma), self._log_sigmas, np.arange(n)))
        else:
            tau = float(np.interp(sigma, self._sigmas, np.arange(n)))
        k = int(round(tau))
        # A noise level within float32 rounding of a timestep's is that timestep's: diffusers
        # stores its sigmas in float32.
        return float(k) if abs(sigma - self._sigmas[k]) <= _SIGMA_SLACK * self._sigmas[k] else tau

    # ----------------------------------------------------------------------- the call

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        guidance_scale: float | None = None,
        negative_cond: Mapping[str, Any] | None = None,
        controlnet_cond: Tensor | Sequence[Tensor] | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        control_range: Sequence[tuple[float, float]] | None = None,
        mask: Tensor | None = None,
        masked_image_latents: Tensor | None = None,
        image_latents: Tensor | None = None,
        control_latents: Tensor | None = None,
        guidance_scale_2: float | None = None,
        guidance_rescale: float | None = None,
        **unet_kwargs: Any,
    ) -> Tensor:
        """One unet call (one batch of twice the size under guidance), after one controlnet
        call where the model has a controlnet.

        Args:
            x: state of shape ``(batch, C, ...)`` in the unet's dtype: ``alpha x0 + sigma eps``
                in VP space, ``x0 + sigma_bar eps`` in EDM space (the unet then sees
                ``x / sqrt(sigma_bar^2 + 1)``, as after diffusers' ``scale_model_input``),
                ``(1 - sigma) x0 + sigma eps`` in flow space (for Flux, packed latents of shape
                ``(batch, tokens, out_channels)``). With ``sigma_data``, ``x0 + sigma eps`` in
                float32 at least; the unet sees ``c_in x`` in ``unet_dtype``, at timestep
                ``c_noise``, as after an EDM scheduler's ``scale_model_input``.
            t: shape ``(batch,)``, the ODE's time: ``(tau + 1) / N`` (VP), ``sigma_bar`` (EDM)
                or ``sigma`` (flow).
            guidance_scale: ``g`` of classifier-free guidance; the output is ``u + g (c - u)``
                of the unconditional (``negative_cond``) and conditional (``unet_kwargs``)
                predictions, from one call on the batch ``[unconditional, conditional]`` (for
                Flux, two calls: the conditional one, then the unconditional one).
            negative_cond: the unconditional branch's unet keyword arguments.
            guidance_scale_2: with ``unet_2`` (Wan 2.2's low-noise transformer), the guidance
                scale where it is called (None: ``guidance_scale``); guidance is on in both
                stages where ``guidance_scale`` turns it on, as in ``WanPipeline``.
            guidance_rescale: ``phi`` of the pipelines' ``rescale_noise_cfg`` (Lin et al.
                2024, 3.4; StableDiffusionPipeline's and the SDXL pipelines'
                ``guidance_rescale``): the guided output ``o`` becomes
                ``phi o std(c) / std(o) + (1 - phi) o``, the standard deviations over each
                sample's entries. Only under guidance; None or 0: none.
            controlnet_cond: with a controlnet, the control image, shape ``(batch or 1, C, f h,
                f w)`` for a state of ``(batch, channels, h, w)`` (``C`` the controlnet's
                ``conditioning_channels``, ``f`` the factor of its conditioning embedding, 8
                for Stable Diffusion's), in its dtype; a list of them for a
                ``MultiControlNetModel``. The controlnet is called as the ControlNet pipelines
                call it: on the unet's input (the state's channels alone, before an inpainting
                unet's ``mask`` and ``masked_image_latents``) and timestep, with the unet's
                ``encoder_hidden_states`` and SDXL's ``text_embeds`` and ``time_ids`` of
                ``added_cond_kwargs``, under guidance on the batch ``[unconditional,
                conditional]`` with the control image in both halves; and its down and mid
                residuals go to the unet as ``down_block_additional_residuals`` and
                ``mid_block_additional_residual``. With ``flux``, the control image's packed
                latents, shape ``(batch or 1, tokens, C)`` for a state of ``(batch, tokens,
                C)``: the controlnet is called on the transformer's input, timestep and
                conditional arguments (prompt, guidance, ids), once (true guidance's two
                calls share its residuals, as ``FluxControlNetPipeline``'s do), and its
                residuals go to the transformer as ``controlnet_block_samples`` and
                ``controlnet_single_block_samples``. For SD3's controlnet, the control image's
                latents, shape ``(batch or 1, C, h, w)`` for a state of ``(batch, 4 or 16, h,
                w)``: called on the transformer's input and timestep with its
                ``encoder_hidden_states`` (none where the controlnet has no
                ``joint_attention_dim``) and ``pooled_projections`` (zeros where it has
                ``force_zeros_for_pooled_projection``), under guidance on the batch
                ``[unconditional, conditional]`` with the control latents in both halves;
                its residuals go to the transformer as ``block_controlnet_hidden_states``.
                With ``qwen_image``, as with ``flux`` (prompt, its mask and ``img_shapes``;
                a list of control latents, one per control image, for the union wrapper),
                the residuals going to the transformer as ``controlnet_block_samples``.
            conditioning_scale: the controlnet's scale of its residuals (a list, one per net,
                for a ``MultiControlNetModel``; one per control image for Qwen-Image's union
                wrapper).
            guess_mode: the pipelines' guess mode: the controlnet's residuals scaled from 0.1
                at the first block to 1 at the mid block, and under guidance the controlnet
                called on the conditional half alone, the unconditional half given no
                residuals.
            control_range: one closed interval ``(lo, hi)`` of ODE times per net, where it is
                called (``from_diffusers`` makes them of ``control_guidance_start`` and
                ``control_guidance_end``); elsewhere its scale is 0, and where every net's is,
                the controlnet is not called and the unet gets no residuals (the same output:
                residuals of 0 add nothing). The bounds are taken in ``t``'s dtype, in which
                the grid's times arrive. None: always.
            mask: an inpainting unet's mask, shape ``(batch or 1, 1, h, w)`` for a state of
                ``(batch, C, h, w)``, in the unet's dtype (1 where the image is repainted), as
                the inpainting pipelines' ``prepare_mask_latents`` makes it.
            masked_image_latents: the latents of the image with the masked region blanked,
                shape ``(batch or 1, C', h, w)`` with ``C + 1 + C'`` the unet's
                ``in_channels``. The unet's input is then ``torch.cat([x_in, mask,
                masked_image_latents], dim=1)`` (under guidance, both halves of the batch
                have the same mask and masked image), as
                ``StableDiffusionInpaintPipeline`` and ``StableDiffusionXLInpaintPipeline``
                make it; the output has the state's channels. For a Flux Fill transformer
                both are packed, ``(batch or 1, tokens, C')`` for a state of ``(batch, tokens,
                C)``, and its input is ``torch.cat([x_in, masked_image_latents, mask],
                dim=2)``, as ``FluxFillPipeline`` makes it (in both calls of true guidance).
            image_latents: Flux and Qwen-Image only, a reference image's packed latents,
                shape ``(batch or 1, image tokens, C)`` for a state of ``(batch, tokens,
                C)``: each call takes ``torch.cat([x_in, image_latents], dim=1)`` with
                ``img_ids`` of ``tokens + image tokens`` rows (Qwen-Image's ``img_shapes``
                of as many tokens), and its output's first ``tokens`` rows are the
                prediction, as ``FluxKontextPipeline`` (``QwenImageEditPipeline``,
                ``QwenImageEditPlusPipeline``) calls its transformer.
            control_latents: Flux only, a Depth or Canny transformer's control image, packed
                latents of shape ``(batch or 1, tokens, C)`` for a state of ``(batch, tokens,
                C)``: each call takes ``torch.cat([x_in, control_latents], dim=2)``, as
                ``FluxControlPipeline`` makes it (in both calls of true guidance).
            unet_kwargs: keyword arguments of the unet; tensors of batch 1 are expanded to
                ``batch`` (Flux's ``txt_ids`` and ``img_ids`` excepted: they are passed as
                they are, to both branches of guidance).

        Returns:
            The prediction, shape of ``x``, in the unet's dtype (float32 at least under
            guidance): eps or x0 as the unet gives them; v as well in VP space, and in EDM space
            ``sqrt(sigma_bar^2 + 1) v``, which is the v of the EDM state (bdia's convention,
            ``v = alpha eps - sigma x0`` in the schedule's own space); the velocity
            ``eps - x0`` in flow space. With ``sigma_data``, the denoiser ``c_skip x + c_out
            F`` of the unet's (guided) output ``F``, in ``x``'s dtype (float32 at least).
        """
        self._check_guidance_rescale(guidance_rescale, guidance_scale, negative_cond)
        if self.z_image:
            return z_image_velocity(
                self,
                x,
                t,
                guidance_scale,
                negative_cond,
                unet_kwargs,
                controlnet_cond,
                conditioning_scale,
                control_range,
            )
        _check_guidance(guidance_scale, negative_cond)
        batch = x.shape[0]
        image = None
        if image_latents is not None:
            if not (self.flux or self.qwen_image):
                raise ValueError(
                    "image_latents are a reference image's tokens for a Flux or Qwen-Image "
                    "transformer (FluxKontextPipeline's, QwenImageEditPipeline's); this "
                    "model's network is no Flux transformer and no Qwen-Image one"
                )
            image = _batched(image_latents, batch, "image_latents")
        if self.flux:
            self._check_packed(x, unet_kwargs, image)
        elif self.qwen_image:
            self._check_qwen_image_state(x, unet_kwargs, image)
        extra = self._inpaint_channels(x, mask, masked_image_latents, batch)
        if control_latents is not None:
            extra = self._control_channels(x, control_latents, extra, batch)
        packed = self.flux or self.qwen_image
        if not packed and self.in_channels is not None and extra is None:
            if x.ndim < 2 or x.shape[1] != self.in_channels:
                raise ValueError(
                    f"the state has shape {tuple(x.shape)}, but the unet takes in_channels = "
                    f"{self.in_channels} at dim 1; give a state of shape (batch, "
                    f"{self.in_channels}, height, width) (an inpainting unet's latents take "
                    "mask= and masked_image_latents= beside them)"
                )
        control = self._control_inputs(
            x, t, controlnet_cond, conditioning_scale, control_range, batch
        )
        tau_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        # A unet that reads its timestep in Python (the BDIA scheduler's replay, which checks
        # it) gets it on the host, where reading it does not wait for the device.
        on_host = getattr(self.unet, "reads_timestep_on_host", False) is True
        tau_device = torch.device("cpu") if on_host else x.device
        view = (-1,) + (1,) * (x.ndim - 1)
        if self.sigma_data is not None:
            # The schedulers' precondition_inputs and precondition_noise, on the float32 sigma
            # (float64 with a float64 state), on the state's device as the pipeline's
            # timesteps are.
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            sigma = values_on(t.detach(), x.dtype, x.device).reshape(view)
            x_in = (x * self._c_in(sigma)).to(self.unet_dtype or x.dtype)
            tau = self._c_noise(values_on(t.detach().reshape(-1), tau_dtype, tau_device))
        else:
            times = [float(v) for v in t.detach().reshape(-1).cpu().tolist()]
            tau = torch.tensor([self.timestep(v, t.dtype) for v in times], dtype=tau_dtype)
            if packed:
                # FluxPipeline's and QwenImagePipeline's timestep / 1000 of the scheduler's
                # float32 t = sigma N, cast to the latents' dtype first:
                # t.expand(batch).to(latents.dtype) / 1000.
                tau = tau.to(x.dtype) / _FLUX_TIMESTEP_DIVISOR
            elif self._sana:
                # SanaPipeline's t.expand(batch) * transformer.config.timestep_scale.
                tau = tau * self._timestep_scale
            elif self.expand_timesteps:
                # WanPipeline's (mask[0][0][:, ::2, ::2] * t).flatten(), a mask of ones, for
                # every sample: the timestep of each token of 2 x 2 patches of the latents.
                frames, h, w = x.shape[2:]
                tokens = frames * ((h + 1) // 2) * ((w + 1) // 2)
                tau = tau.view(-1, 1).expand(-1, tokens)
            tau = values_on(tau, tau.dtype, tau_device)
            if self.space == "edm":
                scale = torch.tensor([math.sqrt(s * s + 1.0) for s in times], dtype=torch.float64)
                scale = values_on(scale, scale.dtype, x.device).view(view)
                x_in = (x / scale).to(x.dtype)
            else:
                x_in = x

        net, g = self.unet, guidance_scale
        if self.unet_2 is not None:
            net, g = self._expert(times, guidance_scale, guidance_scale_2)
        elif guidance_scale_2 is not None:
            raise ValueError(
                "guidance_scale_2 is the guidance of Wan 2.2's low-noise transformer; this "
                "model has no unet_2: leave it out"
            )
        if guidance_scale is not None and guidance_scale != 1 and negative_cond is not None:
            if self.flux:
                # FluxPipeline's true classifier-free guidance: two calls, the conditional
                # first, the negative one with its own arguments (txt_ids included).
                negative = {**unet_kwargs, **negative_cond}
                positive = _flux_kwargs(unet_kwargs, batch, "")
                # FluxControlNetPipeline's controlnet sees the prompt alone, and both calls
                # take its residuals.
                residuals = self._flux_residuals(x_in, tau, positive, control)
                c = self._call_unet(x_in, tau, {**positive, **residuals}, extra, image)
                negative = {**_flux_kwargs(negative, batch, "negative_cond"), **residuals}
                u = self._call_unet(x_in, tau, negative, extra, image)
            elif self._wan:
                # WanPipeline's guidance: two calls, the conditional first, the negative one
                # with its own prompt embeddings.
                c = self._call_unet(x_in, tau, _batched(unet_kwargs, batch, ""), net=net)
                negative = _batched({**unet_kwargs, **negative_cond}, batch, "negative_cond")
                u = self._call_unet(x_in, tau, negative, net=net)
            elif self.qwen_image:
                # QwenImagePipeline's true CFG: two calls, the conditional first, the negative
                # one with its own prompt and mask (the image shapes shared).
                # QwenImageControlNetPipeline's controlnet sees the prompt alone, and both
                # calls take its residuals.
                positive = _batched(unet_kwargs, batch, "")
                residuals = self._flux_residuals(x_in, tau, positive, control)
                c = self._call_unet(x_in, tau, {**positive, **residuals}, image=image)
                negative = _batched({**unet_kwargs, **negative_cond}, batch, "negative_cond")
                u = self._call_unet(x_in, tau, {**negative, **residuals}, image=image)
            else:
                kwargs = _paired(negative_cond, unet_kwargs, batch, "")
                x_both, tau_both = torch.cat([x_in, x_in]), torch.cat([tau, tau])
                # The pipelines double the mask and the masked image for guidance's batch.
                extra_both = None if extra is None else torch.cat([extra, extra])
                if control is not None and guess_mode:
                    # The pipelines' guess mode: the controlnet on the conditional half, no
                    # residual for the unconditional one.
                    images, scales = control
                    conditional = _batched(unet_kwargs, batch, "")
                    kwargs.update(
                        self._residuals(x_in, tau, conditional, images, scales, True, pad=True)
                    )
                elif control is not None:
                    images, scales = control
                    doubled = [torch.cat([image, image]) for image in images]
                    kwargs.update(
                        self._residuals(x_both, tau_both, kwargs, doubled, scales, guess_mode)
                    )
                both = self._call_unet(x_both, tau_both, kwargs, extra_both)
                u, c = both[:batch], both[batch:]
            # The raw outputs are combined (linear, so the same in eps, x0 or v), in float32 at
            # least so that a half-precision unet's difference c - u is not rounded again.
            wide = torch.promote_types(c.dtype, torch.float32)
            uncond, cond = u.to(wide), c.to(wide)
            assert g is not None  # guidance_scale, or unet_2's guidance_scale_2 where set
            out = uncond + g * (cond - uncond)
            if guidance_rescale:
                out = _rescaled_guidance(out, cond, guidance_rescale)
            if self.qwen_image:
                # QwenImagePipeline rescales the guided velocity of each token to the norm of
                # the conditional one (over its channels), in this order of operations.
                cond_norm = torch.norm(cond, dim=-1, keepdim=True)
                out = out * (cond_norm / torch.norm(out, dim=-1, keepdim=True))
        elif self.flux:
            kwargs = _flux_kwargs(unet_kwargs, batch, "")
            kwargs.update(self._flux_residuals(x_in, tau, kwargs, control))
            out = self._call_unet(x_in, tau, kwargs, extra, image)
        else:
            kwargs = _batched(unet_kwargs, batch, "")
            if control is not None:
                images, scales = control
                kwargs.update(self._residuals(x_in, tau, kwargs, images, scales, guess_mode))
            out = self._call_unet(x_in, tau, kwargs, extra, image, net=net)
        if self.sigma_data is not None:
            return self._denoised(x, out, sigma)
        if self.space == "edm" and self.prediction == "v":
            # diffusers' v is the VP state's: v_vp = (eps - sigma_bar x0) / sqrt(sigma_bar^2 + 1).
            wide = torch.promote_types(out.dtype, torch.float32)
            out = out.to(wide) * scale.to(wide)
        return out

    def _check_guidance_rescale(
        self, guidance_rescale: Any, guidance_scale: Any, negative_cond: Any
    ) -> None:
        """One-line errors for a ``guidance_rescale`` that cannot act: not a number in
        [0, 1], without guidance, or for Qwen-Image's and Z-Image's transformers, whose
        pipelines rescale their guidance by norms of their own."""
        if guidance_rescale is None:
            return
        _check_rescale_value(guidance_rescale)
        if guidance_rescale == 0:
            return
        if guidance_scale is None or guidance_scale == 1 or negative_cond is None:
            raise ValueError(
                f"guidance_rescale = {guidance_rescale} rescales classifier-free guidance; "
                "give guidance_scale (other than 1) and negative_cond too, or leave it out"
            )
        if self.qwen_image or self.z_image:
            name = "QwenImagePipeline" if self.qwen_image else "ZImagePipeline"
            raise ValueError(
                f"guidance_rescale is StableDiffusionPipeline's and the SDXL pipelines'; "
                f"{name} rescales its guidance by norms of its own, which the adapter applies "
                "as that pipeline does: leave it out"
            )

    def _inpaint_channels(
        self, x: Tensor, mask: Tensor | None, masked_image_latents: Tensor | None, batch: int
    ) -> Tensor | None:
        """``torch.cat([mask, masked_image_latents], dim=1)`` of the state's batch, the channels
        an inpainting unet takes after the state's (for a Flux Fill transformer
        ``torch.cat([masked_image_latents, mask], dim=2)`` of packed tokens); None without
        them. Checks their size and channels against the state and the unet before any
        call."""
        if mask is None and masked_image_latents is None:
            return None
        if mask is None or masked_image_latents is None:
            raise ValueError(
                "an inpainting unet or a Flux Fill transformer takes both mask and "
                "masked_image_latents; give both"
            )
        if self.space == "flow" and not self.flux:
            raise ValueError(
                "mask and masked_image_latents are an inpainting UNet's or a Flux Fill "
                "transformer's input channels, not mapped for SD3's transformer"
            )
        parts = [("mask", mask), ("masked_image_latents", masked_image_latents)]
        dim = 2 if self.flux else 1
        for name, value in parts:
            if self.flux and (value.ndim != 3 or value.shape[1] != x.shape[1]):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, but the state has shape "
                    f"{tuple(x.shape)}: give it packed with the latents' tokens, as "
                    "FluxFillPipeline.prepare_mask_latents makes it for the latents' size"
                )
            if not self.flux and (x.ndim != 4 or tuple(value.shape[2:]) != tuple(x.shape[2:])):
                raise ValueError(
                    f"{name} is {' x '.join(map(str, value.shape[2:]))} (h x w), but the "
                    f"state has shape {tuple(x.shape)}: give it at the latents' size, as the "
                    "inpainting pipelines' prepare_mask_latents makes it (the mask "
                    "interpolated to H / f x W / f, f the vae's factor)"
                )
        channels = x.shape[dim] + mask.shape[dim] + masked_image_latents.shape[dim]
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(
                f"the {'transformer' if self.flux else 'unet'} takes in_channels = "
                f"{self.in_channels}, but the state's {x.shape[dim]} channels, the mask's "
                f"{mask.shape[dim]} and masked_image_latents' {masked_image_latents.shape[dim]} "
                f"make {channels}"
            )
        if self.flux:  # FluxFillPipeline's order: the masked image's latents, then the mask
            parts.reverse()
        return torch.cat([_batched(value, batch, name) for name, value in parts], dim=dim)

    def _control_channels(
        self, x: Tensor, control_latents: Tensor, extra: Tensor | None, batch: int
    ) -> Tensor:
        """A Flux Depth or Canny transformer's control image latents of the state's batch,
        the channels it takes after the packed state's (``extra``, a Fill mask's, must be
        None). Checks them against the state and the transformer before any call."""
        if not self.flux:
            raise ValueError(
                "control_latents are a Flux Depth or Canny transformer's input channels "
                "(FluxControlPipeline's); this model's network is no Flux transformer"
            )
        if extra is not None:
            raise ValueError(
                "control_latents were given beside mask and masked_image_latents; a Flux "
                "transformer takes a control image (FluxControlPipeline's) or a mask and masked "
                "image (FluxFillPipeline's), not both"
            )
        if control_latents.ndim != 3 or control_latents.shape[1] != x.shape[1]:
            raise ValueError(
                f"control_latents has shape {tuple(control_latents.shape)}, but the state has "
                f"shape {tuple(x.shape)}: give it packed with the latents' tokens, as "
                "FluxControlPipeline makes it for the latents' size"
            )
        channels = x.shape[2] + control_latents.shape[2]
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(
                f"the transformer takes in_channels = {self.in_channels}, but the state's "
                f"{x.shape[2]} channels and control_latents' {control_latents.shape[2]} make "
                f"{channels}"
            )
        return _batched(control_latents, batch, "control_latents")

    def _control_inputs(
        self,
        x: Tensor,
        t: Tensor,
        controlnet_cond: Any,
        conditioning_scale: Any,
        control_range: Sequence[tuple[float, float]] | None,
        batch: int,
    ) -> tuple[list[Tensor], list[float]] | None:
        """The control images, one per net, of the state's batch, and each net's scale at
        ``t``; None without a controlnet or where every scale is 0. Checks the images' batch
        and size against the state before any call."""
        if self.controlnet is None:
            if controlnet_cond is not None:
                raise ValueError(
                    "controlnet_cond was given to a model without a controlnet; build it with "
                    "from_diffusers(..., controlnet=pipe.controlnet, controlnet_cond=...)"
                )
            return None
        if controlnet_cond is None:
            raise ValueError(
                "the model has a controlnet and needs controlnet_cond, the control image"
            )
        images = list(controlnet_cond) if self._multi else [controlnet_cond]
        scales = list(conditioning_scale) if self._multi else [conditioning_scale]
        batched = []
        for i, image in enumerate(images):
            where = f"controlnet_cond[{i}]" if self._multi else "controlnet_cond"
            if self.space == "flow":
                _check_flow_control_image(x, image, self._kind, where)
                batched.append(_batched(image, batch, where))
                continue
            f = _control_factor(self._nets[i])
            size = tuple(n * f for n in x.shape[2:])
            if tuple(image.shape[2:]) != size:
                latent = " x ".join(map(str, x.shape[2:]))
                raise ValueError(
                    f"{where} is {' x '.join(map(str, image.shape[2:]))} (H x W), but latents of "
                    f"{latent} take a control image of {' x '.join(map(str, size))}, {f} times "
                    "their size (the controlnet's conditioning embedding downsamples by "
                    f"{f}); prepare it at the image's size: pipe.control_image_processor."
                    "preprocess(image, height=H, width=W)"
                )
            batched.append(_batched(image, batch, where))
        if control_range is not None:
            values = t.detach().reshape(-1).cpu().tolist()
            keeps = []
            for lo, hi in control_range:
                # The bounds in t's dtype: a grid time arrives rounded to it.
                lo, hi = (float(torch.tensor(b, dtype=t.dtype)) for b in (lo, hi))
                inside = {lo <= v <= hi for v in values}
                if len(inside) > 1:
                    raise ValueError(
                        "the batch's times lie on both sides of a controlnet's "
                        "control_guidance bound; evaluate the batch at one time"
                    )
                keeps.append(1.0 if inside.pop() else 0.0)
            # As the pipelines scale it: conditioning_scale * keep.
            scales = [s * k for s, k in zip(scales, keeps)]
        if all(s == 0.0 for s in scales):
            return None
        return batched, scales

    def _flux_residuals(
        self,
        x: Tensor,
        tau: Tensor,
        kwargs: Mapping[str, Any],
        control: tuple[list[Tensor], list[float]] | None,
    ) -> dict[str, Any]:
        """The controlnet's residuals as a packed transformer's (Flux's, Qwen-Image's)
        arguments; none where the model has no controlnet or it is off (``control`` None)."""
        if control is None:
            return {}
        images, scales = control
        return self._residuals(x, tau, kwargs, images, scales, False)

    def _residuals(
        self,
        x: Tensor,
        tau: Tensor,
        kwargs: Mapping[str, Any],
        images: list[Tensor],
        scales: list[float],
        guess_mode: bool,
        pad: bool = False,
    ) -> dict[str, Any]:
        """The controlnet's residuals as the unet's arguments, of one call on ``x`` at
        ``tau`` with the unet's arguments ``kwargs`` of that batch; with ``pad``, zeros for
        an unconditional half before them (guess mode under guidance)."""
        assert self.controlnet is not None
        if self.space == "flow":
            if self._multi:
                return _flow_residuals(self.controlnet, x, tau, kwargs, images, scales)
            return _flow_residuals(self.controlnet, x, tau, kwargs, images[0], scales[0])
        extra: dict[str, Any] = {"encoder_hidden_states": kwargs["encoder_hidden_states"]}
        added = kwargs.get("added_cond_kwargs")
        if isinstance(added, Mapping):
            added = {k: v for k, v in added.items() if k in _CONTROLNET_ADDED}
            if added:
                extra["added_cond_kwargs"] = added
        down, mid = self.controlnet(
            x,
            tau,
            controlnet_cond=images if self._multi else images[0],
            conditioning_scale=scales if self._multi else scales[0],
            guess_mode=guess_mode,
            return_dict=False,
            **extra,
        )
        if pad:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {_RESIDUALS[0]: down, _RESIDUALS[1]: mid}

    # The EDM preconditioning, written as diffusers' EDM schedulers write it (the same
    # operations in the same order), so that float32 sigmas give their float32 results.

    def _c_in(self, sigma: Tensor) -> Tensor:
        sd = self.sigma_data
        assert sd is not None
        return 1 / ((sigma**2 + sd**2) ** 0.5)

    @staticmethod
    def _c_noise(sigma: Tensor) -> Tensor:
        return 0.25 * torch.log(sigma)

    def _denoised(self, x: Tensor, out: Tensor, sigma: Tensor) -> Tensor:
        """``c_skip x + c_out F`` of the unet's (guided) output ``F``, in ``x``'s dtype."""
        sd = self.sigma_data
        assert sd is not None
        c_skip = sd**2 / (sigma**2 + sd**2)
        if self.prediction == "eps":
            c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        else:  # diffusers' v_prediction: the same network output, of the other sign
            c_out = -sigma * sd / (sigma**2 + sd**2) ** 0.5
        return c_skip * x + c_out * out.to(x.dtype)

    def _check_packed_shape(
        self,
        x: Tensor,
        family: str,
        pipeline: str,
        image: str,
        arguments: str = "latents, batch, channels, h, w",
    ) -> None:
        """Refuse a state that is not packed latents ``(batch, tokens, C)``, as ``pipeline``'s
        loop carries them for ``family``'s transformer (``image``: the shape of the latents
        before packing, which ``pipeline._pack_latents(arguments)`` packs)."""
        c = self._packed_channels
        if x.ndim != 3 or (c is not None and x.shape[2] != c):
            packed = f"(batch, tokens, {c})" if c is not None else "(batch, tokens, channels)"
            raise ValueError(
                f"the state has shape {tuple(x.shape)}, but {family}'s transformer takes packed "
                f"latents of shape {packed}, as {pipeline}'s loop carries them; pack "
                f"image-shaped latents {image} with {pipeline}._pack_latents({arguments})"
            )

    def _check_packed(self, x: Tensor, kwargs: Mapping[str, Any], image: Tensor | None) -> None:
        """Refuse a Flux state that is not packed latents matching ``img_ids`` (with a
        reference image's tokens ``image``, the state's and the image's)."""
        if self._flux2:
            family, pipeline, both = "Flux.2", "Flux2Pipeline", ", dim=1) as Flux2Pipeline"
            latent_ids = "Flux2Pipeline._prepare_latent_ids(latents) of latents (batch, C, h, w)"
        else:
            family, pipeline, both = "Flux", "FluxPipeline", ") as FluxKontextPipeline"
            latent_ids = "FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)"
        arguments = "latents" if self._flux2 else "latents, batch, channels, h, w"
        self._check_packed_shape(x, family, pipeline, "(batch, channels, h, w)", arguments)
        ids = kwargs.get("img_ids")
        # Flux.2's ids may be batched, (batch, tokens, 4): their rows are the next to last dim.
        rows = ids.shape[-2] if isinstance(ids, Tensor) and ids.ndim >= 2 else None
        if image is not None:
            if rows is not None and rows != x.shape[1] + image.shape[1]:
                raise ValueError(
                    f"img_ids has {rows} rows but the state has {x.shape[1]} tokens "
                    f"and image_latents {image.shape[1]}; give the positions of both, "
                    f"torch.cat([latent_ids, image_ids]{both} makes them"
                )
        elif rows is not None and rows != x.shape[1]:
            raise ValueError(
                f"img_ids has {rows} rows but the state has {x.shape[1]} tokens; make "
                f"img_ids for the latents' size: {latent_ids}"
            )

    def _check_qwen_image_state(
        self, x: Tensor, kwargs: Mapping[str, Any], image: Tensor | None
    ) -> None:
        """Refuse a Qwen-Image state that is not packed latents matching ``img_shapes``
        (with a reference image's tokens ``image``, the state's and the image's)."""
        self._check_packed_shape(x, "Qwen-Image", "QwenImagePipeline", "(batch, 1, channels, h, w)")
        shapes = kwargs.get("img_shapes")
        tokens = x.shape[1] + (0 if image is None else image.shape[1])
        if shapes is not None and _qwen_image_tokens(shapes) != tokens:
            held = f"{x.shape[1]}" + ("" if image is None else f", image_latents {image.shape[1]}")
            raise ValueError(
                f"img_shapes {shapes!r} make {_qwen_image_tokens(shapes)} tokens but the state "
                f"has {held}; give [[(1, h // 2, w // 2)]] for latents of h x w before "
                "packing, as QwenImagePipeline makes it (QwenImageEditPipeline's holds the "
                "reference image's (1, h' // 2, w' // 2) after it)"
            )
        config = getattr(self.unet, "config", None)
        zero_cond = isinstance(config, Mapping) and bool(config.get("zero_cond_t", False))
        if zero_cond and shapes is not None and len(shapes) not in (1, x.shape[0]):
            # Its timestep-0 modulation takes one row per img_shapes entry.
            raise ValueError(
                f"img_shapes has {len(shapes)} entries but the state's batch is {x.shape[0]}; "
                "a transformer with zero_cond_t reads one entry per sample (or one for all): "
                "give [entry] * batch, as QwenImageEditPlusPipeline makes it"
            )

    def _expert(
        self, times: Sequence[float], guidance_scale: float | None, guidance_scale_2: float | None
    ) -> tuple[Any, float | None]:
        """Wan 2.2's transformer and guidance scale at the ODE times ``times`` (one per
        sample, read on the host): ``unet`` where the float32 timestep ``sigma N`` is at least
        the float32 ``boundary_ratio N``, else ``unet_2`` with ``guidance_scale_2`` (None:
        ``guidance_scale``), as WanPipeline compares its scheduler's float32 timestep with
        ``boundary_ratio * num_train_timesteps``."""
        assert self._boundary_ratio is not None  # set with unet_2
        n = self.num_train_timesteps
        boundary = np.float32(self._boundary_ratio * n)
        high = {bool(np.float32(self.timestep(v)) >= boundary) for v in times}
        if len(high) > 1:
            raise ValueError(
                "the batch's times lie on both sides of Wan 2.2's boundary, where the two "
                "transformers meet; sample every state of a batch at the same time"
            )
        if high.pop():
            return self.unet, guidance_scale
        return self.unet_2, guidance_scale if guidance_scale_2 is None else guidance_scale_2

    def _call_unet(
        self,
        x: Tensor,
        tau: Tensor,
        kwargs: Mapping[str, Any],
        extra: Tensor | None = None,
        image: Tensor | None = None,
        net: Any = None,
    ) -> Tensor:
        """The unet's (``net``'s, where given) prediction at ``x`` (with ``extra``, an
        inpainting unet's mask and
        masked image, concatenated after ``x`` along the channels, dim 1, or a Flux Fill
        transformer's, or a Depth or Canny one's control image latents, dim 2; with
        ``image``, a reference image's tokens after ``x``'s, the output cut to ``x``'s), of
        ``x``'s shape."""
        # In x's dtype, as the pipelines' mask, masked image and reference image (of the
        # prompt embeddings' dtype) and control image (of the vae's, loaded alike) meet
        # latents of that dtype.
        if self.space == "flow":
            hidden = x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=2)
            if image is not None:
                hidden = torch.cat([hidden, image.to(x.dtype)], dim=1)
            # By keyword, as StableDiffusion3Pipeline and FluxPipeline call it: the
            # transformer's second positional argument is encoder_hidden_states.
            unet = self.unet if net is None else net
            result = unet(hidden_states=hidden, timestep=tau, return_dict=False, **kwargs)
        elif self._pixart:
            # As PixArtAlphaPipeline and PixArtSigmaPipeline call it.
            result = self.unet(x, timestep=tau, return_dict=False, **kwargs)
        elif extra is not None:
            result = self.unet(torch.cat([x, extra.to(x.dtype)], dim=1), tau, **kwargs)
        else:
            result = self.unet(x, tau, **kwargs)
        if hasattr(result, "sample"):
            result = result.sample
        elif isinstance(result, (tuple, list)):
            result = result[0]
        if not isinstance(result, Tensor):
            raise TypeError(
                f"the unet returned {type(result).__name__}; it must return a tensor, a tuple "
                "whose first entry is one, or an object with .sample"
            )
        if image is not None:  # FluxKontextPipeline keeps the latents' tokens
            result = result[:, : x.shape[1]]
        channels = x.shape[1]
        if self.learned_variance and result.ndim == x.ndim and result.shape[1] == 2 * channels:
            result = result[:, :channels]  # the mean; the second half is the learned variance
        if result.shape != x.shape:
            raise ValueError(
                f"the unet returned shape {tuple(result.shape)} for an input of shape "
                f"{tuple(x.shape)}; it must predict one value per input entry (check its "
                "out_channels)"
            )
        return result


# ------------------------------------------------------------------------ public API


def _check_qwen_image_parts(**given: Any) -> None:
    """Refuse, in one line, the inputs of other pipelines than QwenImagePipeline,
    QwenImageImg2ImgPipeline, QwenImageEditPipeline and QwenImageControlNetPipeline (Flux's
    extra channels) for Qwen-Image's transformer."""
    for name, value in given.items():
        if value is not None:
            raise ValueError(
                f"{name} is not mapped for QwenImageTransformer2DModel: bdia calls it as "
                "QwenImagePipeline, QwenImageImg2ImgPipeline, QwenImageEditPipeline and "
                "QwenImageControlNetPipeline do; leave it out"
            )


def _check_experts(
    unet: Any,
    transformer_2: Any,
    boundary_ratio: Any,
    guidance_scale_2: Any,
    space: str,
) -> None:
    """Refuse, in one line and before any call, Wan 2.2's second transformer where it does
    not fit: without ``boundary_ratio`` (or this without it), beside another network than a
    Wan transformer under a flow-matching scheduler, of another class or dtype than the
    first, a ratio outside (0, 1), and ``guidance_scale_2`` without it or not a number."""
    if guidance_scale_2 is not None and transformer_2 is None:
        raise ValueError(
            "guidance_scale_2 is the guidance of Wan 2.2's low-noise transformer; give it with "
            "transformer_2=pipe.transformer_2 and boundary_ratio, or leave it out"
        )
    if transformer_2 is None and boundary_ratio is None:
        return
    if transformer_2 is None or boundary_ratio is None:
        raise ValueError(
            "transformer_2 (Wan 2.2's low-noise transformer) and boundary_ratio come together, "
            "as WanPipeline holds them (pipe.transformer_2, pipe.config.boundary_ratio): give "
            "both, or neither"
        )
    if not (space == "flow" and _is_wan(unet)):
        raise ValueError(
            "transformer_2 is Wan 2.2's low-noise transformer, beside a WanTransformer3DModel "
            f"under a flow-matching scheduler; the network is a {type(unet).__name__}"
        )
    if type(transformer_2) is not type(unet):
        raise ValueError(
            f"transformer_2 is a {type(transformer_2).__name__}, but the first transformer a "
            f"{type(unet).__name__}; WanPipeline's two experts are of one class"
        )
    first = getattr(unet, "dtype", None)
    second = getattr(transformer_2, "dtype", None)
    if first != second:
        raise ValueError(
            f"transformer_2 is in {second}, the first transformer in {first}; the ODE runs "
            "both in one dtype: load them alike (WanPipeline.from_pretrained's torch_dtype)"
        )
    ok = isinstance(boundary_ratio, numbers.Real) and not isinstance(boundary_ratio, bool)
    if not ok or not 0 < boundary_ratio < 1:
        raise ValueError(
            f"boundary_ratio must be a number in (0, 1), as a Wan 2.2 pipeline's "
            f"pipe.config.boundary_ratio, got {boundary_ratio!r}"
        )
    bad = isinstance(guidance_scale_2, bool) or not isinstance(guidance_scale_2, numbers.Real)
    if guidance_scale_2 is not None and (bad or not math.isfinite(guidance_scale_2)):
        raise ValueError(f"guidance_scale_2 must be a finite number, got {guidance_scale_2!r}")


@dataclass(frozen=True)
class _PromptOnly:
    """A transformer that its pipeline calls on the latents and the prompt alone: ``keys``
    are the pipeline's keyword arguments beside the latents and timestep (``keys_hint`` says
    what they hold, ``prompt_hint`` where they come from), and a config whose ``field`` is
    set is a model the pipeline does not run as an ODE (``why``, ``kept`` the ones mapped)."""

    model: str
    pipeline: str
    keys: tuple[str, ...]
    keys_hint: str
    prompt_hint: str
    field: str
    why: str
    kept: str


_SANA = _PromptOnly(
    model="SanaTransformer2DModel",
    pipeline="SanaPipeline",
    keys=("encoder_hidden_states", "encoder_attention_mask", "attention_kwargs"),
    keys_hint="encoder_hidden_states (the prompt embeddings, (batch or 1, L, caption_channels)), "
    "encoder_attention_mask ((batch or 1, L), 1 for the prompt's tokens) and attention_kwargs",
    prompt_hint="encoder_hidden_states and encoder_attention_mask, as "
    "SanaPipeline.encode_prompt returns them",
    field="guidance_embeds",
    why="embeds a guidance scale (as SANA-Sprint's), which SanaSprintPipeline samples with "
    "SCMScheduler, a consistency model's few steps and no ODE",
    kept="Sana's text-to-image transformers",
)
_WAN = _PromptOnly(
    model="WanTransformer3DModel",
    pipeline="WanPipeline",
    keys=("encoder_hidden_states", "attention_kwargs"),
    keys_hint="encoder_hidden_states (the prompt's UMT5 embeddings, (batch or 1, L, text_dim)) "
    "and attention_kwargs",
    prompt_hint="encoder_hidden_states, as WanPipeline.encode_prompt returns them",
    field="image_dim",
    why="takes an image (as Wan's image-to-video models), which WanImageToVideoPipeline gives "
    "it beside the latents",
    kept="Wan's text-to-video transformers",
)


def _check_prompt_only(
    unet: Any, cond: Mapping[str, Any], extras: Mapping[str, Any], kind: _PromptOnly
) -> None:
    """Refuse, in one line and before any call, what ``kind``'s pipeline does not give its
    transformer: other pipelines' inputs (a controlnet, inpainting or reference latents),
    keys beside its own, no prompt, and a transformer whose config sets ``kind.field``
    (SANA-Sprint's guidance embedding, Wan's image-to-video ``image_dim``)."""
    given = [k for k, v in extras.items() if v is not None]
    if given:
        raise ValueError(
            f"{given[0]} was given for a {kind.model}, which {kind.pipeline} calls on the "
            "latents alone (no controlnet, inpainting or reference inputs); leave it out"
        )
    config = getattr(unet, "config", None)
    value = config.get(kind.field) if isinstance(config, Mapping) else None
    if value not in (None, False):
        raise ValueError(
            f"this {kind.model} has {kind.field} = {value!r}: it {kind.why}; bdia maps "
            f"{kind.kept} ({kind.field} unset), called as {kind.pipeline} calls them"
        )
    # negative_cond's keys are cond's (_check_cond refuses others), so cond's are checked.
    unknown = [k for k in cond if k not in kind.keys]
    if unknown:
        raise ValueError(
            f"cond key {unknown[0]!r} is not an argument {kind.pipeline} gives {kind.model}; "
            f"give {kind.keys_hint} alone"
        )
    if "encoder_hidden_states" not in cond:
        raise ValueError(f"a {kind.model} needs the prompt: give {kind.prompt_hint}")


def _check_pixart_cond(
    unet: Any, cond: dict[str, Any], extras: Mapping[str, Any]
) -> dict[str, Any]:
    """``cond`` for PixArt's transformer: refuse the inputs of other pipelines, and give it
    ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}`` where none are given and
    it takes no micro-conditions, as PixArtSigmaPipeline passes them; refuse their absence
    where it takes them (PixArt-alpha's 1024 models)."""
    given = [k for k, v in extras.items() if v is not None]
    if given:
        raise ValueError(
            f"{given[0]} was given for a PixArtTransformer2DModel, which PixArtAlphaPipeline "
            "and PixArtSigmaPipeline call on the latents alone (no controlnet, inpainting or "
            "reference inputs); leave it out"
        )
    if "added_cond_kwargs" in cond:
        return cond
    if getattr(unet, "use_additional_conditions", False):
        raise ValueError(
            "this PixArtTransformer2DModel takes micro-conditions (use_additional_conditions, "
            "as PixArt-alpha's 1024 models): give added_cond_kwargs={'resolution': "
            "tensor([[height, width]]), 'aspect_ratio': tensor([[height / width]])}, the "
            "image's size in pixels, in the prompt embeddings' dtype, as PixArtAlphaPipeline "
            "makes them"
        )
    return {**cond, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def from_diffusers(
    unet: Any,
    scheduler: Any,
    *,
    space: str | None = None,
    model_dtype: torch.dtype | str | None = None,
    controlnet: Any = None,
    controlnet_cond: Tensor | Sequence[Tensor] | None = None,
    conditioning_scale: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    num_inference_steps: int | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    masked_image_latents: Tensor | None = None,
    image_latents: Tensor | None = None,
    control_latents: Tensor | None = None,
    transformer_2: Any = None,
    boundary_ratio: float | None = None,
    expand_timesteps: bool = False,
    **cond: Any,
) -> DiffusionODE:
    """The probability-flow ODE of a diffusers UNet under a diffusers scheduler's noise table,
    or the flow-matching ODE of Stable Diffusion 3's, Flux's, Qwen-Image's, Sana's or Wan's
    transformer.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``, PixArt's
            ``PixArtTransformer2DModel`` (called as ``PixArtSigmaPipeline`` and
            ``PixArtAlphaPipeline`` call it: the timestep by keyword, the learned variance's
            half of its output dropped whatever the scheduler's ``variance_type``, and
            ``added_cond_kwargs`` of ``None`` sizes unless given; a transformer with
            micro-conditions needs them given), or any module called as
            ``unet(sample, timestep, **kwargs)`` that returns a tensor, a tuple or an object
            with ``.sample``; with a flow-matching scheduler, an ``SD3Transformer2DModel``, a
            ``FluxTransformer2DModel``, a ``ChromaTransformer2DModel``, a
            ``QwenImageTransformer2DModel``, a ``SanaTransformer2DModel`` (called as
            ``SanaPipeline`` calls it: its timestep times the config's ``timestep_scale``, the
            learned variance's half of its output dropped where ``out_channels`` is twice
            ``in_channels``; cond ``encoder_hidden_states``, ``encoder_attention_mask`` and
            ``attention_kwargs`` only) or a text-to-video ``WanTransformer3DModel`` (called
            as ``WanPipeline`` calls it: on latents ``(batch, C, frames, h, w)``, guidance in
            two calls, the conditional one first; cond ``encoder_hidden_states`` and
            ``attention_kwargs`` only) (``pipe.transformer``), or any module called as
            ``unet(hidden_states=x, timestep=tau, return_dict=False, **kwargs)`` that returns
            the velocity ``eps - x0``. With an EDM-preconditioned scheduler, the raw network
            ``F`` of the denoiser, called as ``StableDiffusionXLPipeline`` calls it with that
            scheduler: ``unet(c_in x, c_noise, **kwargs)``. Put it in eval mode
            (``from_pretrained`` does).
        scheduler: a diffusers scheduler instance, or its config mapping (the class named in
            ``_class_name`` is built). Its ``alphas_cumprod`` (read as float64) is the noise
            table; its ``prediction_type`` says what the unet predicts. A
            ``FlowMatchEulerDiscreteScheduler`` (or ``FlowMatchHeunDiscreteScheduler``) has
            no table: its ``num_train_timesteps`` is ``N`` of the transformer's timestep
            ``sigma N``. Nor have ``EDMEulerScheduler`` and
            ``EDMDPMSolverMultistepScheduler``: their ``sigma_data`` and ``prediction_type``
            (``epsilon`` or ``v_prediction``) make the denoiser. It is not modified.
        space: ``"vp"``, ``"edm"`` or ``"flow"``, the space of the ODE's state (see the module
            docstring); by default the scheduler's (DDIM-like classes ``"vp"``, Euler-like and
            EDM-preconditioned ``"edm"``, flow-matching ``"flow"``). An unknown scheduler
            class needs it.
        model_dtype: dtype the unet runs in (the state is cast to it and the output back);
            defaults to the unet's parameter dtype (a diffusers model's ``dtype``, which
            skips the modules it keeps in float32, as Wan's), so a float16 unet runs under a
            float32 or float64 state. With an EDM-preconditioned scheduler the ODE's
            ``model_dtype`` is this dtype promoted to float32 at least: the denoiser's
            preconditioning gets the state in it, and the unet ``c_in x`` in this dtype.
        controlnet: a diffusers ``ControlNetModel`` of the unet (``pipe.controlnet`` of a
            ``StableDiffusionControlNetPipeline`` or ``StableDiffusionXLControlNetPipeline``),
            a list of them or a ``MultiControlNetModel``; in eval mode and the unet's dtype.
            Each model evaluation then calls it before the unet, as those pipelines do: on
            the unet's input (the latents alone beside an inpainting unet's ``mask``, as
            the ControlNet inpainting pipelines call it) and timestep, with
            ``encoder_hidden_states`` and (SDXL) ``added_cond_kwargs``' ``text_embeds`` and
            ``time_ids`` (not an IP-Adapter's
            ``image_embeds``, ``timestep_cond`` nor ``cross_attention_kwargs``, which the
            pipelines do not give it), under guidance on the batch ``[unconditional,
            conditional]``; its residuals go to the unet as ``down_block_additional_residuals``
            and ``mid_block_additional_residual``. With Flux's transformer, a
            ``FluxControlNetModel`` of it (``pipe.controlnet`` of a ``FluxControlNetPipeline``,
            InstantX's kind: one, not a union controlnet, not XLabs', with the transformer's
            ``guidance_embeds``), called as that pipeline calls it: on the packed latents,
            with the transformer's timestep, ``encoder_hidden_states``,
            ``pooled_projections``, ``guidance``, ``txt_ids`` and ``img_ids`` of the
            conditional branch, once per evaluation (true guidance's negative call takes the
            same residuals); its residuals go to the transformer as
            ``controlnet_block_samples`` and ``controlnet_single_block_samples``. With SD3's
            transformer, an ``SD3ControlNetModel`` of it (``pipe.controlnet`` of a
            ``StableDiffusion3ControlNetPipeline``, which gives an SD3.5 controlnet without
            its own ``pos_embed`` the transformer's; one, not several), called as that
            pipeline calls it: on the latents and the transformer's timestep, with
            ``encoder_hidden_states`` (none for a controlnet without
            ``joint_attention_dim``) and ``pooled_projections`` (zeros for one with
            ``force_zeros_for_pooled_projection``, InstantX's), under guidance on the batch
            ``[unconditional, conditional]``; its residuals go to the transformer as
            ``block_controlnet_hidden_states``. One with ``extra_conditioning_channels = 1``
            (Alimama's inpainting kind, ``pipe.controlnet`` of a
            ``StableDiffusion3ControlNetInpaintingPipeline``) is called as that pipeline calls
            it: the same, with the prompt embeddings and zeros for the pooled ones whatever
            its config says. With Qwen-Image's transformer, a ``QwenImageControlNetModel``
            of it (``pipe.controlnet`` of a ``QwenImageControlNetPipeline``; not the
            inpainting kind, ``extra_condition_channels`` above 0), or a
            ``QwenImageMultiControlNetModel`` of one (the union wrapper, which calls it once
            per control image and sums the residuals), called as that pipeline calls it: on
            the packed latents, with the transformer's timestep, ``encoder_hidden_states``,
            ``encoder_hidden_states_mask`` and ``img_shapes`` of the conditional branch
            (and its ``txt_seq_lens`` where the controlnet takes them, diffusers 0.36's),
            once per evaluation (true CFG's negative call takes the same residuals); its
            residuals go to the transformer as ``controlnet_block_samples``. The pipeline
            passes ``img_shapes`` as ``[(1, h // 2, w // 2)] * batch``, which the rotary
            embedding reads as QwenImagePipeline's ``[[(1, h // 2, w // 2)]] * batch``:
            give the latter, as for QwenImagePipeline. With Z-Image's transformer, a
            ``ZImageControlNetModel`` given that transformer's shared modules
            (``pipe.controlnet`` of a ``ZImageControlNetPipeline`` or
            ``ZImageControlNetInpaintPipeline``, or ``ZImageControlNetModel.from_transformer(
            controlnet, transformer)``), called as those pipelines call it: on the
            transformer's list of per-sample latents, its timestep and its list of
            ``cap_feats``, twice the batch under CFG (the negative prompts' after the
            prompts', the control input repeated), the conditional call alone where
            ``cfg_truncation`` turns CFG off; its residuals go to the transformer as
            ``controlnet_block_samples``.
        controlnet_cond: the control image, as the pipeline prepares it
            (``pipe.control_image_processor.preprocess(image, height=H, width=W)``: values in
            [0, 1]): a floating tensor of shape ``(batch or 1, conditioning_channels, H, W)``
            for latents of ``H / f x W / f`` (``f`` the controlnet's, 8 for Stable
            Diffusion's and SDXL's), cast to the controlnet's dtype; the same image in both
            halves of guidance. A list of them, one per net, for several controlnets. Needed
            with ``controlnet``. For Flux's controlnet, the control image's packed latents
            as ``FluxControlNetPipeline`` makes them: ``pipe.prepare_image(image, W, H, 1, 1,
            device, vae.dtype)`` encoded by the vae (the pipeline draws a sample with its
            generator), shifted by ``shift_factor``, scaled by ``scaling_factor`` and packed
            by ``_pack_latents``: shape ``(batch or 1, tokens, in_channels)``, cast to
            ``model_dtype``. For SD3's, the control image's latents as
            ``StableDiffusion3ControlNetPipeline`` makes them: ``pipe.prepare_image(image, W,
            H, 1, 1, device, dtype)`` encoded by the vae (the pipeline draws a sample from
            torch's global generator, one per half of guidance's batch), less the vae's
            ``shift_factor`` (none where the controlnet has
            ``force_zeros_for_pooled_projection``), times its ``scaling_factor``: shape
            ``(batch or 1, in_channels, h, w)``, cast to ``model_dtype``, the same in both
            halves of guidance. For SD3's inpainting controlnet, the control input as
            ``StableDiffusion3ControlNetInpaintingPipeline``'s ``prepare_image_with_mask(image,
            mask, W, H, 1, 1, device, dtype)`` makes it: the image set to -1 where the
            binarised mask is above 0.5, encoded by the vae (a draw from torch's global
            generator, once for the batch), less ``shift_factor`` (always), times
            ``scaling_factor``, then ``1 - mask`` at the latents' size (nearest) as the last
            channel, in [0, 1]: shape ``(batch or 1, in_channels + 1, h, w)``. For
            Qwen-Image's controlnet, the control image's packed latents as
            ``QwenImageControlNetPipeline`` makes them: ``pipe.prepare_image(image, W, H, 1,
            1, device, vae.dtype)`` as one frame (``unsqueeze(2)``) encoded by the vae (the
            pipeline draws a sample with its generator), ``(z - latents_mean) * (1 /
            latents_std)``, moved to ``(batch, 1, C, h, w)`` and packed by
            ``_pack_latents``: shape ``(batch or 1, tokens, in_channels)``, cast to
            ``model_dtype``; for its union wrapper a list of them, one per control image. For
            its inpainting controlnet, the control input as
            ``QwenImageControlNetInpaintPipeline``'s ``prepare_image_with_mask(image, mask, W,
            H, 1, 1, device, vae.dtype)`` makes it: the image set to -1 where the binarised
            mask is above 0.5, encoded as one frame (a draw from torch's global generator),
            normalised as above, then ``1 - mask`` at the latents' size (nearest) as the last
            channel, packed: shape ``(batch or 1, tokens, in_channels + 4)``, its last 4
            channels in [0, 1]. For Z-Image's controlnet, the control input as
            ``ZImageControlNetPipeline`` makes it: ``pipe.prepare_image(image, W, H, 1, 1,
            device, vae.dtype)`` encoded by the vae (its mode), ``(z - shift_factor) *
            scaling_factor``, as one frame (``unsqueeze(2)``), zeros after it up to the
            controlnet's ``control_in_dim``: shape ``(batch or 1, control_in_dim, 1, h, w)``,
            cast to ``model_dtype``; for ``ZImageControlNetInpaintPipeline`` (``control_in_dim
            = 2 C + 1``) those latents, then ``1 - mask`` at the latents' size (nearest), then
            the latents of the image set to 0 where the binarised mask is above 0.5, each as
            one frame, concatenated on dim 1 (channel ``C`` in [0, 1]).
        conditioning_scale: the scale of the controlnet's residuals, the pipelines'
            ``controlnet_conditioning_scale``: a number, or one per net (for Qwen-Image's
            union wrapper, one per control image). ZImageControlNetPipeline's default is
            0.75, this one's 1: give it.
        guess_mode: the pipelines' guess mode: residuals scaled from 0.1 at the first block
            to 1 at the mid block, and under guidance the controlnet called on the
            conditional half alone, the unconditional half given none. Set as the pipelines
            set it where the (first) controlnet's config has ``global_pool_conditions``.
            Not for Flux's, SD3's, Qwen-Image's or Z-Image's controlnet (their pipelines have
            no guess mode).
        control_guidance_start: the fraction of the pipeline's steps before which the
            controlnet is off (a number, or one per net). The pipelines keep it at entry
            ``i`` of the scheduler's ``n`` timesteps when ``i / n >= start`` and ``(i + 1) /
            n <= end``; the ODE keeps it on the closed interval of times from the first kept
            entry's to the last kept entry's on ``diffusers_grid(scheduler,
            num_inference_steps)`` (past the grid's start or end where the first or last
            entry is kept), so that a solver evaluating on that grid calls it exactly where
            the pipeline does. Bounds that would switch it between a scheduler's two calls
            at one time (Heun's) are refused. For Flux's controlnet the grid is
            ``FluxControlNetPipeline``'s: ``diffusers_grid(scheduler, n, mu=mu,
            sigmas=np.linspace(1, 1 / n, n))``, ``mu`` the pipeline's ``calculate_shift`` of
            ``img_ids``' rows where the scheduler shifts dynamically, and so for Qwen-Image's
            (``QwenImageControlNetPipeline``'s, ``mu`` of ``img_shapes``' tokens); for SD3's,
            ``diffusers_grid(scheduler, n)``. Elsewhere its scale is
            0; where all nets' are, neither it nor its residuals are used. Not for Z-Image's
            controlnet (its pipelines call it at every step).
        control_guidance_end: the fraction of steps after which the controlnet is off, as
            above.
        num_inference_steps: the grid's steps, as given to ``diffusers_grid``; needed with
            (and only with) ``control_guidance_start`` or ``control_guidance_end`` other than
            0 and 1.
        strength: the img2img and inpainting pipelines' ``strength``, in (0, 1]: below 1
            they run the last ``int(num_inference_steps * strength)`` steps
            (``FluxControlNetImg2ImgPipeline`` the last ``ceil(num_inference_steps *
            strength)``), from the grid's time ``ts[k]`` with ``k`` the steps they skip, and
            count ``control_guidance_start`` and ``control_guidance_end`` over the steps they
            run; given so, the ODE keeps the controlnet where such a run does (solve it on
            ``ts[k:]``). Only with the bounds, as ``num_inference_steps``; 1 (all steps,
            the text-to-image pipelines' count) by default. Not for SD3's or Qwen-Image's
            controlnet (no SD3 or Qwen-Image ControlNet pipeline takes a strength), nor
            for Z-Image's.
        mask: for an inpainting unet (``in_channels`` more than ``out_channels``: 9 for 4,
            ``stable-diffusion-inpainting``'s and SDXL inpainting's), the mask at the
            latents' size, 1 where the image is repainted: a floating tensor of shape
            ``(batch or 1, 1, h, w)`` for latents of ``(batch, C, h, w)``, as the pipeline's
            ``prepare_mask_latents`` makes it (``pipe.mask_processor.preprocess(mask_image,
            height=H, width=W)`` interpolated to ``H / f x W / f``), cast to ``model_dtype``.
            Every unet call then takes ``torch.cat([x_in, mask, masked_image_latents],
            dim=1)`` for its input ``x_in``, in both halves of guidance, as
            ``StableDiffusionInpaintPipeline`` and ``StableDiffusionXLInpaintPipeline`` make
            it; the ODE's state is the latents alone. Needed with (and only with) such a unet.
        masked_image_latents: the latents of the image with the masked region blanked
            (``image * (mask < 0.5)`` encoded by the pipeline's vae and scaled), shape
            ``(batch or 1, in_channels - out_channels - 1, h, w)``, cast to ``model_dtype``.
            Needed with ``mask``. For a Flux Fill transformer (``FluxFillPipeline``'s,
            ``in_channels`` more than ``out_channels``: 384 for 64) both are packed as
            ``FluxFillPipeline.prepare_mask_latents`` returns them, ``mask, masked_image_latents
            = pipe.prepare_mask_latents(mask_condition, masked_image, 1, channels, 1, H, W,
            dtype, device, generator)``: ``masked_image_latents`` of shape ``(batch or 1,
            tokens, out_channels)`` and ``mask`` of ``(batch or 1, tokens, in_channels - 2
            out_channels)`` (the mask's pixels, ``f x f`` a latent pixel, in 2 x 2 patches:
            256 channels for ``f = 8``), and every call takes ``torch.cat([x,
            masked_image_latents, mask], dim=2)`` for the packed latents ``x``, as the
            pipeline's ``torch.cat((latents, masked_image_latents), dim=2)`` of its own
            ``masked_image_latents``, the two concatenated.
        image_latents: for ``FluxKontextPipeline``'s transformer, the reference image's
            packed latents, as its ``prepare_latents`` returns them: shape ``(batch or 1,
            image tokens, in_channels)``, cast to ``model_dtype``. Every call then takes
            ``torch.cat([x, image_latents], dim=1)`` and keeps its output's first ``tokens``
            rows, as the pipeline does, and ``img_ids`` must hold ``tokens + image tokens``
            rows: ``torch.cat([latent_ids, image_ids])``, the pipeline's concatenation of the
            latents' positions and the image's (whose first column is 1). For
            ``QwenImageEditPipeline``'s (Qwen-Image's) transformer the same, its
            ``prepare_latents``' second output (the image's latents normalised ``(z -
            latents_mean) / latents_std`` and packed), with each sample's ``img_shapes``
            entry holding the latents' shape and the image's: ``[[(1, h // 2, w // 2), (1,
            h' // 2, w' // 2)]] * batch`` for latents of ``h x w`` and the image's of ``h' x
            w'``, as that pipeline passes them. For ``QwenImageEditPlusPipeline``'s
            (Qwen-Image-Edit-2509's and 2511's) the second output of its ``prepare_latents``
            for its list of images: each image's latents so made, concatenated along the
            tokens in the list's order, with one shape per image after the latents' in each
            ``img_shapes`` entry, ``[[(1, h // 2, w // 2), (1, h1 // 2, w1 // 2), (1, h2 //
            2, w2 // 2), ...]] * batch``. A transformer with ``zero_cond_t`` (2511's) reads
            every sample's entry, which must then split the tokens as the first's. For
            ``Flux2Pipeline``'s and ``Flux2KleinPipeline``'s (Flux.2's) transformer the first
            output of their ``prepare_image_latents`` for their reference images (each
            image's latents, the VAE's mode patchified and normalised by its batch-norm
            statistics, packed and concatenated along the tokens), with ``img_ids`` holding
            the latents' ids and the images' after them, ``torch.cat([latent_ids,
            image_latent_ids], dim=1)`` as those pipelines pass them.
        control_latents: for a Flux Depth or Canny transformer (``FluxControlPipeline``'s and
            ``FluxControlImg2ImgPipeline``'s, ``in_channels`` twice ``out_channels``: 128 for
            64), the control image's packed latents, as the pipeline makes them: its
            ``prepare_image(control_image, W, H, batch, 1, device, vae.dtype)`` encoded by the
            vae (the pipeline draws a sample of the latent distribution with its generator),
            shifted by ``shift_factor``, scaled by ``scaling_factor`` and packed by
            ``_pack_latents``; shape ``(batch or 1, tokens, out_channels)``, cast to
            ``model_dtype``. Every call then takes ``torch.cat([x, control_latents], dim=2)``
            for the packed latents ``x``, as the pipeline does. Needed with (and only with)
            such a transformer.
        transformer_2: Wan 2.2's low-noise transformer (``pipe.transformer_2``), beside its
            high-noise one as ``unet``: each evaluation calls ``unet`` where the float32
            timestep ``sigma N`` is at least the float32 ``boundary_ratio N`` and
            ``transformer_2`` below it, with the cond key ``guidance_scale_2`` as its
            guidance scale (default ``guidance_scale``), as ``WanPipeline`` calls them.
        boundary_ratio: with ``transformer_2``, the pipeline's ``pipe.config.boundary_ratio``,
            in (0, 1).
        expand_timesteps: a Wan transformer gets one timestep per latent token of 2 x 2
            patches, shape ``(batch, frames * ceil(h / 2) * ceil(w / 2))``, as
            ``WanPipeline`` gives it under its ``pipe.config.expand_timesteps`` (Wan 2.2
            TI2V-5B's); its output then differs from that of one timestep per sample in
            the last bits.
        **cond: keyword arguments of every unet call: ``encoder_hidden_states`` of shape
            ``(batch or 1, L, D)``, ``class_labels``, ``added_cond_kwargs``, ... (SD3:
            ``encoder_hidden_states`` and ``pooled_projections`` of shape ``(batch or 1, P)``).
            Tensors of batch 1 are expanded to the state's batch; floating ones are cast to
            ``model_dtype``. Two keys set classifier-free guidance:
            ``guidance_scale=g`` and ``negative_cond={...}``, the unconditional branch's
            arguments (``{"encoder_hidden_states": negative_embeds}``); each model evaluation is
            then one unet call on the batch ``[unconditional, conditional]`` and returns
            ``u + g (c - u)``. Flux needs ``encoder_hidden_states`` ``(batch or 1, L, D)``,
            ``pooled_projections`` ``(batch or 1, P)``, ``txt_ids`` ``(L, 3)`` and ``img_ids``
            ``(tokens, 3)`` (2-D, passed as they are: neither expanded nor cast), and, where
            the transformer has ``guidance_embeds`` (Flux.1-dev), ``guidance``: the embedded
            guidance scale (FluxPipeline's ``guidance_scale``), a number or a tensor of
            shape ``(batch or 1,)``. Its classifier-free guidance (FluxPipeline's
            ``true_cfg_scale`` with a negative prompt) makes two calls, the conditional one
            first, as the pipeline does; the negative branch may have its own ``txt_ids``.
            Chroma needs Flux's ``encoder_hidden_states`` (T5's), ``txt_ids`` and ``img_ids``,
            no ``pooled_projections`` or ``guidance``, and ``attention_mask`` ``(batch or 1,
            L + tokens)``, as ChromaPipeline passes it: ``pipe._prepare_attention_mask(1,
            tokens, dtype, mask)`` of ``encode_prompt``'s mask (the prompt's tokens and its
            first padding token, then ones for the image tokens). Its ``guidance_scale``
            (true CFG, 5 by default) is ``guidance_scale`` here, two calls as Flux's, with
            the negative prompt's embeddings, ``txt_ids`` and its own ``attention_mask`` in
            ``negative_cond``; its IP-Adapters (Flux's, which ChromaPipeline loads) take
            their image embeddings as Flux's do, below.
            Flux.2 (``Flux2Transformer2DModel``) needs Flux's ``encoder_hidden_states``,
            ``txt_ids`` and ``img_ids``, the ids of 4 axes, ``(L, 4)`` and ``(tokens, 4)`` or
            batched as ``Flux2Pipeline.encode_prompt`` and ``_prepare_latent_ids`` make them
            (passed as they are; the transformer reads the first sample's), no
            ``pooled_projections``; with ``guidance_embeds`` (FLUX.2-dev) ``guidance``,
            ``Flux2Pipeline``'s ``guidance_scale`` (4 by default), as for Flux.1-dev; without
            it (FLUX.2-klein) none, and ``Flux2KleinPipeline``'s true CFG (its
            ``guidance_scale`` above 1, with ``negative_prompt_embeds``) is ``guidance_scale``
            with ``negative_cond``, two calls as Flux's. Its sigmas are shifted by the
            pipelines' own ``compute_empirical_mu(tokens, n)``, which ``diffusers_grid`` takes
            as ``mu``. A controlnet, a Fill mask or a Depth or Canny control image is refused:
            no Flux.2 pipeline gives them.
            Qwen-Image needs ``encoder_hidden_states`` ``(batch or 1, L, D)`` and its
            ``encoder_hidden_states_mask`` ``(batch or 1, L)`` (1 valid, 0 padding; None or
            left out where ``encode_prompt`` returns None, all tokens valid), as
            ``QwenImagePipeline.encode_prompt`` returns them, and ``img_shapes``, the packed
            latents' ``[[(1, H // 16, W // 16)]]`` for an ``H x W`` image (passed as given;
            diffusers reads the first sample's); no ``guidance``. Its true CFG (the
            pipeline's ``true_cfg_scale`` above 1 with a negative prompt) makes two calls,
            the conditional one first, the negative one with ``negative_cond``'s embeddings
            and mask (the mask given there whenever the conditional branch has one), and
            rescales the guided velocity ``g`` of each token to ``g |c| / |g|``, the
            conditional velocity's norm over the token's channels, as the pipeline does.
            ``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline`` call it so too,
            with their reference images' ``image_latents`` (see there).
            A unet with IP-Adapters loaded (``pipe.load_ip_adapter``: its
            ``encoder_hid_dim_type`` is ``"ip_image_proj"``) needs the image prompt as
            ``added_cond_kwargs={"image_embeds": [...]}``, a list of one floating tensor per
            adapter, ``(batch or 1, images, D)`` (``(batch or 1, images, tokens, D)`` for an
            IP-Adapter Plus), as the pipeline's ``prepare_ip_adapter_image_embeds(image,
            None, device, 1, do_classifier_free_guidance)`` makes them; under guidance each
            of those is ``torch.cat([negative, positive])``, and the negative halves go to
            ``negative_cond``'s ``added_cond_kwargs`` (zeros for a plain IP-Adapter), as the
            pipelines give the unconditional branch its own. The embeddings are fixed over
            the run, so the ODE is one in the latents alone; the adapters' scale is the
            attention processors' (``pipe.set_ip_adapter_scale``), which every call uses.
            A Flux transformer with IP-Adapters loaded (``FluxPipeline.load_ip_adapter``,
            XLabs' format) needs them as ``joint_attention_kwargs={"ip_adapter_image_embeds":
            [...]}``, one floating tensor ``(batch or 1, images, D)`` per adapter, as
            ``FluxPipeline.prepare_ip_adapter_image_embeds(image, None, device, 1)`` makes
            them; under true CFG ``negative_cond``'s ``joint_attention_kwargs`` holds the
            negative call's own (the pipeline's ``negative_ip_adapter_image``, by default an
            all-zero image's embeddings), as the pipeline gives them. A Chroma transformer
            with Flux's IP-Adapters loaded (``ChromaPipeline.load_ip_adapter``) takes them
            alike, as ChromaPipeline and ChromaImg2ImgPipeline pass them. SD3's transformer
            with an IP-Adapter loaded (``StableDiffusion3Pipeline.load_ip_adapter``: its
            ``image_proj``) takes ``joint_attention_kwargs={"ip_adapter_image_embeds": e}``,
            one floating tensor ``(batch or 1, tokens, D)``, the conditional half of the
            pipeline's ``prepare_ip_adapter_image_embeds(image, None, device, 1,
            do_classifier_free_guidance)``, and under guidance the negative half in
            ``negative_cond``'s (zeros for an image); without one it runs as the pipeline
            does without an image prompt.

    Returns:
        A ``bdia.DiffusionODE``: schedule ``VPDiscrete(alphas_cumprod=..., clean_end=...)``
        (``clean_end`` when the scheduler ends at alpha = 1), ``EDM()`` or ``RectifiedFlow()``,
        prediction ``"eps"``, ``"v"``, ``"x0"`` or ``"flow"`` (``"denoised"`` with an
        EDM-preconditioned scheduler), model a ``DiffusersModel``, and
        ``cond`` holding everything that conditions the unet (``guidance_scale`` and
        ``negative_cond`` included; with a controlnet, ``controlnet_cond``,
        ``conditioning_scale``, ``guess_mode`` and, where it is switched, the times of
        ``control_range``; with an inpainting unet or a Flux Fill transformer, ``mask`` and
        ``masked_image_latents``; for a Flux Depth or Canny transformer, ``control_latents``;
        for Kontext and Qwen-Image-Edit, ``image_latents``). Sample it on
        ``diffusers_grid(scheduler, steps)`` with any bdia solver, or invert it with BDIA.

    Raises:
        ValueError: one line naming the field, before any unet call, for a prediction_type
            other than epsilon, v_prediction or sample; clip_sample or thresholding set; an
            unknown timestep_spacing; interpolation_type 'log_linear'; flow sigmas; an
            alphas_cumprod that is not a noise table; out_channels different from in_channels
            (unless twice as many with the scheduler's variance_type 'learned' or
            'learned_range'); guidance_scale without negative_cond; a scheduler of unknown
            class without ``space=``. With a flow-matching scheduler: invert_sigmas or
            stochastic_sampling set; a UNet or another diffusers model than SD3's, Flux's,
            Qwen-Image's, Z-Image's, Sana's or Wan's transformer; a ``skip_layers`` key (skip-layer
            guidance). For Sana: a noise-table scheduler (its ``use_flow_sigmas`` config
            named, with the flow-matching scheduler to give instead); a transformer with
            ``guidance_embeds`` (SANA-Sprint's); a key other than ``encoder_hidden_states``,
            ``encoder_attention_mask`` and ``attention_kwargs``, or no
            ``encoder_hidden_states``; a ``controlnet``, ``mask``,
            ``masked_image_latents``, ``image_latents`` or ``control_latents``. For Wan: the
            same with Wan's scheduler of flow sigmas; an image-to-video transformer
            (``image_dim``); a key other than ``encoder_hidden_states`` and
            ``attention_kwargs``, or no ``encoder_hidden_states``; other pipelines' inputs as
            for Sana. For
            Qwen-Image: a missing ``encoder_hidden_states`` or ``img_shapes`` (under
            guidance, embeddings missing in ``negative_cond``, or its own mask where the
            conditional branch has one), embeddings that are not ``(batch or 1, L,
            joint_attention_dim)``, a mask that is not ``(batch or 1, L)``, ``img_shapes``
            that are not a list of lists of ``(frame, height, width)``, a key the installed
            diffusers' transformer does not take (``txt_seq_lens`` from 0.39 on; missing
            where it needs it, as 0.35's and 0.36's does, or whose longest is not ``L``),
            ``guidance`` or
            ``controlnet_block_samples``, a transformer with ``guidance_embeds``, and
            ``mask``, ``masked_image_latents`` or ``control_latents`` (a ``controlnet`` as
            below);
            ``image_latents`` (checked as Kontext's) whose tokens are not those of the
            ``img_shapes`` entries after the first; for a transformer with ``zero_cond_t``,
            ``img_shapes`` whose samples split their tokens otherwise than the first (in
            either branch); at the first evaluation, a state that is not packed latents
            ``(batch, tokens, in_channels)`` of ``img_shapes``' token count (with
            ``image_latents``, the state's and the images' together), a reference image
            whose batch is neither 1 nor the state's, and, with ``zero_cond_t``,
            ``img_shapes`` of neither 1 nor the state's batch entries. SD3's, Flux's or
            Qwen-Image's transformer with a noise-table scheduler. With an EDM-preconditioned
            scheduler: a prediction_type other than epsilon and v_prediction, thresholding, an
            algorithm_type other than 'dpmsolver++', a sigma_data that is not a positive finite
            number, a space other than 'edm'. For Flux: a missing
            ``encoder_hidden_states``, ``pooled_projections``, ``txt_ids`` or ``img_ids``;
            ids that are not 2-D ``(tokens, 3)``; embeddings whose length is not their
            ``txt_ids``' rows; ``guidance`` missing (with ``guidance_embeds``), given
            (without it), not finite, or a tensor that is not 1-D and floating. For Chroma:
            ``pooled_projections`` or ``guidance`` (in either branch); a missing
            ``encoder_hidden_states``, ``txt_ids``, ``img_ids`` or ``attention_mask``; ids and
            embeddings as for Flux; a mask that is not ``(batch or 1, L + tokens)`` (the
            prompt's mask alone, not extended over the image tokens, named as such);
            negative embeddings without their own mask; a ``controlnet``,
            ``mask``, ``masked_image_latents``, ``image_latents`` or ``control_latents``. For a Fill
            transformer (``in_channels`` more than ``out_channels``): no ``mask`` or
            ``masked_image_latents`` (or one without the other), them for a transformer
            without room for both beside the latents (``in_channels`` at most twice
            ``out_channels``: a text-to-image, Depth or Canny one), tensors that are not 3-D
            and floating, of two token counts, or of other channels than ``out_channels``
            (the masked image) and ``in_channels - 2 out_channels`` (the mask). For Kontext:
            ``image_latents`` that are not 3-D and floating or not of ``in_channels``, given
            beside ``mask``, or for any network but Flux's or Qwen-Image's transformer.
            For a Depth or Canny transformer (``in_channels`` twice ``out_channels``): no
            ``control_latents``; them
            for any network but Flux's transformer, for a transformer of other extra channels
            (a text-to-image or Fill one), beside ``mask``, ``masked_image_latents`` or
            ``image_latents``, or not a 3-D floating tensor of ``out_channels``. At the first
            evaluation, before the call: a state that is not packed latents
            ``(batch, tokens, out_channels)`` or not of ``img_ids``' token count (with
            ``image_latents``, the state's and the image's together); a mask, masked image,
            control image or reference image whose batch is neither 1 nor the state's, or a
            mask, masked image or control image of another token count. With Flux's
            controlnet: one of another class than ``FluxControlNetModel`` (several, Stable
            Diffusion's), a union one (``num_mode``), XLabs' (an ``input_hint_block``), one
            made for another transformer (``in_channels``, ``joint_attention_dim``,
            ``pooled_projection_dim``) or with other ``guidance_embeds``, of another dtype;
            beside ``mask``, ``control_latents`` or ``image_latents``; a ``controlnet_cond``
            missing, a list, or not a 3-D floating tensor of the controlnet's
            ``in_channels``; ``guess_mode``; a scale, bounds or ``strength`` as below; a
            residual key in ``cond``; at the first evaluation, control latents of another
            token count or of a batch neither 1 nor the state's. With Qwen-Image's
            controlnet: one of another class than ``QwenImageControlNetModel`` or a
            ``QwenImageMultiControlNetModel`` of one (Flux's, SD3's, several), of
            ``extra_condition_channels`` other than 0 and 4, the wrapper of one of 4, made
            for another transformer
            (``in_channels``, ``joint_attention_dim``, the residuals' width), of another
            dtype; ``controlnet_cond`` missing, a list for one controlnet (not a list for
            the wrapper), or not 3-D floating tensors of ``in_channels`` (and the extra
            channels), an inpainting one's last 4 channels outside [0, 1]; scales or bounds
            of another count than the control images; ``strength`` other than 1; the other
            refusals as for Flux's. With Z-Image's controlnet: one of another class than
            ``ZImageControlNetModel`` (several, Qwen-Image's), one without this
            transformer's shared modules (none, or another transformer's), of another
            ``dim`` than the transformer's, of a ``control_in_dim`` below its
            ``in_channels``, of another dtype; a ``controlnet_cond`` missing, a list, or not
            a 5-D floating tensor of one frame and ``control_in_dim`` channels, or (``2 C +
            1`` channels) whose channel ``C``, the mask's, is not in [0, 1]; bounds other
            than 0 and 1, ``num_inference_steps``, ``strength`` other than 1,
            ``guess_mode``, ``controlnet_block_samples`` in ``cond``; at the first
            evaluation, control latents of another size than the latents' or of a batch
            neither 1 nor the state's. With SD3's controlnet: one
            of another class than ``SD3ControlNetModel`` (several, Stable Diffusion's,
            Flux's), one without a ``pos_embed``, made for another transformer
            (``in_channels``, ``patch_size``, ``pooled_projection_dim``), of another dtype, of
            ``extra_conditioning_channels`` other than 0 and 1, or of 1 without
            ``joint_attention_dim``; a ``controlnet_cond`` missing, a list, or not a 4-D
            floating tensor of ``in_channels + extra_conditioning_channels``, or (the
            inpainting kind) whose last channel, the mask's, is not in [0, 1]; ``mask`` or
            ``masked_image_latents`` (the mask goes in ``controlnet_cond``); a ``strength``
            other than 1; the
            other refusals as for Flux's; at the first
            evaluation, control latents of another size or batch. With a controlnet: one of
            another class than ``ControlNetModel`` (a list or ``MultiControlNetModel`` of
            them), made for another unet (its ``in_channels``,
            ``cross_attention_dim`` or ``block_out_channels``; beside an inpainting unet's
            mask, an ``in_channels`` other than the latents', the unet's ``out_channels``),
            of another dtype, or with a
            flow-matching scheduler; no ``controlnet_cond``, no ``encoder_hidden_states``, or
            for SDXL's no ``text_embeds`` and ``time_ids``; control images of the wrong
            number, channels or dims; a scale or bound per net of the wrong count or not
            finite; bounds outside ``0 <= start < end <= 1``, or other than 0 and 1 without
            ``num_inference_steps`` (or switching between a scheduler's two unet calls at one
            time, Heun's), ``num_inference_steps`` or a ``strength`` other than 1 without
            them, a ``strength`` outside (0, 1] or of no step; a ``control_range``,
            residual or control key in ``cond`` or ``negative_cond``; any of these settings
            without ``controlnet``. At the first evaluation, before any call: a control image
            whose batch is neither 1 nor the state's, or whose size is not the latents' times
            the controlnet's factor. For an inpainting unet: no ``mask`` or
            ``masked_image_latents`` (or one without the other), or them for a unet that
            takes no extra channels or with a flow-matching scheduler;
            tensors that are not 4-D and floating, a mask of more than one channel, a mask
            and masked image of two sizes, channels that do not add up to ``in_channels``;
            either key in ``negative_cond``. At the first evaluation, before any call: a mask
            or masked image whose batch is neither 1 nor the state's, or whose size is not the
            latents'.
            With a unet with IP-Adapters loaded: no ``image_embeds`` in ``added_cond_kwargs``,
            a value that is not a list of one 3-D or 4-D floating tensor per adapter (in
            either branch), or, under guidance, none in ``negative_cond`` (give the
            conditional list there too for the image prompt in both branches);
            ``image_embeds`` for a unet that reads none (no IP-Adapter, image projection or
            image embedding), which diffusers would ignore. For a Flux transformer with
            IP-Adapters loaded: no ``ip_adapter_image_embeds`` in ``joint_attention_kwargs``,
            a value that is not a list of one 3-D floating tensor per adapter (in either
            branch), or, under true CFG, none in ``negative_cond``; them for a Flux
            transformer without an IP-Adapter; so for a Chroma transformer. For SD3's
            transformer: an ``ip_adapter_image_embeds`` that is not one 3-D floating tensor (in
            either branch), or, under guidance, given without one in ``negative_cond``; one
            for a transformer without an IP-Adapter.
        TypeError: for Flux, a ``guidance`` that is neither a number nor a tensor; a control
            image that is not a tensor, a scale, bound or strength that is not a number, a
            ``guess_mode`` that is not a bool; a ``mask``, ``masked_image_latents``,
            ``image_latents`` or ``control_latents`` that is not a tensor.
    """
    if not callable(unet):
        raise TypeError(f"unet must be callable (a diffusers UNet), got {type(unet).__name__}")
    sched = _scheduler(scheduler)
    space = _space(sched, space)
    _check_pairing(unet, sched, space)
    table: np.ndarray | None = None
    preconditioned = _is_preconditioned(sched)
    if space == "flow":
        _check_flow_config(sched)
        prediction = "flow"
    elif preconditioned:
        _check_edm_config(sched)
        prediction = _check_model_config(sched, _EDM_PREDICTIONS)
    else:
        _check_schedule_config(sched, space)
        prediction = _check_model_config(sched)
        table = _table(sched, space)

    guidance_scale = cond.pop("guidance_scale", None)
    guidance_scale_2 = cond.pop("guidance_scale_2", None)
    guidance_rescale = cond.pop("guidance_rescale", None)
    _check_experts(unet, transformer_2, boundary_ratio, guidance_scale_2, space)
    if not isinstance(expand_timesteps, bool):
        raise TypeError(f"expand_timesteps must be a bool, got {expand_timesteps!r}")
    negative_cond = cond.pop("negative_cond", None)
    # The inputs of other pipelines than those of the transformers that take none.
    extras = dict(
        controlnet=controlnet,
        mask=mask,
        masked_image_latents=masked_image_latents,
        image_latents=image_latents,
        control_latents=control_latents,
    )
    z_image = space == "flow" and _is_z_image(unet)
    z_options = {k: cond.pop(k) for k in _Z_IMAGE_OPTIONS if k in cond}
    if z_image:
        _check_z_image_cond(
            unet,
            cond,
            negative_cond,
            guidance_scale,
            z_options.get("cfg_normalization", False),
            z_options.get("cfg_truncation", 1.0),
            # Its controlnet is the ControlNet pipelines', checked with the other flow
            # transformers' below.
            {k: v for k, v in extras.items() if k != "controlnet"},
        )
    else:
        if z_options:
            raise ValueError(
                f"{next(iter(z_options))} is ZImagePipeline's CFG option, for Z-Image's "
                "transformer; this network is none: leave it out"
            )
        _check_guidance(guidance_scale, negative_cond)
    flux = space == "flow" and _is_flux(unet)
    chroma = flux and _is_chroma(unet)
    flux2 = flux and _is_flux2(unet)
    qwen_image = space == "flow" and _is_qwen_image(unet)
    if chroma or flux2:
        # Chroma's and Flux.2's pipelines give the transformer none of Flux.1's extra inputs
        # (Flux.2's take reference images, as Kontext's).
        if flux2:
            extras = dict(extras, image_latents=None)
        given = [k for k, v in extras.items() if v is not None]
        if given:
            how = (
                "Flux2Transformer2DModel, which Flux2Pipeline and Flux2KleinPipeline call on "
                "the latents and their reference images' tokens alone (no controlnet, Fill, "
                "Depth or Canny inputs)"
                if flux2
                else "ChromaTransformer2DModel, which ChromaPipeline and ChromaImg2ImgPipeline "
                "call on the latents alone (no controlnet, Fill, Depth, Canny or Kontext inputs)"
            )
            raise ValueError(f"{given[0]} was given for a {how}; leave it out")
    pixart = space != "flow" and _is_pixart(unet)
    if pixart:
        cond = _check_pixart_cond(unet, cond, extras)
    if chroma:
        _check_chroma_cond(unet, cond, negative_cond)
    # Chroma's first: Flux's keys in negative_cond alone are Chroma's to refuse.
    _check_cond(cond, negative_cond, _FLOW_RESERVED if space == "flow" else _RESERVED)
    sana = space == "flow" and _is_sana(unet)
    if sana:
        _check_prompt_only(unet, cond, extras, _SANA)
    wan = space == "flow" and _is_wan(unet)
    if wan:
        _check_prompt_only(unet, cond, extras, _WAN)
    if qwen_image:
        _check_qwen_image_parts(
            mask=mask,
            masked_image_latents=masked_image_latents,
            control_latents=control_latents,
        )
        guided = guidance_scale is not None and guidance_scale != 1
        _check_qwen_image_cond(unet, cond, negative_cond, guided, image_latents)
    if space != "flow":
        _check_ip_adapter(unet, cond, negative_cond, guidance_scale)
    elif not flux and not qwen_image and not z_image and not sana and not wan:
        _check_sd3_ip_adapter(unet, cond, negative_cond, guidance_scale)
    if flux2:
        cond, negative_cond = _check_flux2_cond(unet, cond, negative_cond)
    elif flux and not chroma:
        cond, negative_cond = _check_flux_cond(unet, cond, negative_cond)
    if flux:
        pipeline = "ChromaPipeline" if chroma else "Flux2Pipeline" if flux2 else "FluxPipeline"
        _check_flux_ip_adapter(unet, cond, negative_cond, guidance_scale, pipeline)

    learned_variance = False
    unet_config = getattr(unet, "config", None)
    inpaint: dict[str, Any] = {}
    if control_latents is not None and not flux:
        raise ValueError(
            "control_latents are a control image's channels for a Flux Depth or Canny "
            "transformer (FluxControlPipeline's); this network is no FluxTransformer2DModel "
            "under a flow-matching scheduler"
        )
    if space != "flow":
        inpaint = _inpaint_cond(unet_config, mask, masked_image_latents)
    elif control_latents is not None:
        inpaint = _flux_control_cond(
            unet_config,
            control_latents,
            mask=mask,
            masked_image_latents=masked_image_latents,
            image_latents=image_latents,
        )
    elif flux:
        inpaint = _fill_cond(unet_config, mask, masked_image_latents)
    elif mask is not None or masked_image_latents is not None:
        raise ValueError(
            "mask and masked_image_latents are an inpainting UNet's input channels (Stable "
            "Diffusion's, SDXL's) or a Flux Fill transformer's; they are not mapped for SD3's "
            "flow-matching transformer (SD3's inpainting controlnet, StableDiffusion3Control"
            "NetInpaintingPipeline's, takes the mask as controlnet_cond's last channel)"
        )
    if image_latents is not None and not (flux or qwen_image):
        raise ValueError(
            "image_latents are a reference image's tokens for Flux's or Qwen-Image's "
            "transformer (FluxKontextPipeline's, QwenImageEditPipeline's); this network is no "
            "FluxTransformer2DModel or QwenImageTransformer2DModel under a flow-matching "
            "scheduler"
        )
    if image_latents is not None and inpaint:
        raise ValueError(
            "image_latents (FluxKontextPipeline's reference image) were given beside mask and "
            "masked_image_latents (FluxFillPipeline's); no Flux pipeline gives its transformer "
            "both: give one"
        )
    kontext = _kontext_cond(unet_config, image_latents)
    if isinstance(unet_config, Mapping):
        _check_timestep_cond(unet_config, cond)
        c_in, c_out = unet_config.get("in_channels"), unet_config.get("out_channels")
        # Qwen-Image's out_channels count the latents before packing (a quarter of
        # in_channels); its output has the packed tokens' in_channels.
        if (
            isinstance(c_in, int)
            and isinstance(c_out, int)
            and c_in != c_out
            and not inpaint
            and not qwen_image
        ):
            variance_type = sched.config.get("variance_type")
            # PixArt's and Sana's pipelines keep the first half whatever the scheduler's
            # variance_type (their schedulers have none).
            learned = pixart or sana or variance_type in ("learned", "learned_range")
            if c_out == 2 * c_in and learned:
                learned_variance = True
            else:
                raise ValueError(
                    f"the unet's out_channels = {c_out} differs from its in_channels = {c_in}; "
                    "bdia needs one prediction per input channel (a unet that also predicts its "
                    "variance, out_channels = 2 * in_channels, is accepted with the scheduler's "
                    "variance_type 'learned' or 'learned_range'; an inpainting unet with mask= "
                    "and masked_image_latents=)"
                )

    if model_dtype is None and isinstance(unet, torch.nn.Module):
        # A diffusers model's own dtype, as its pipelines read it (transformer.dtype): its
        # first floating parameter outside the modules it keeps in float32 (Wan's
        # scale_shift_table comes first and stays float32 in a bfloat16 transformer), or the
        # compute dtype of its layerwise casting.
        declared = getattr(unet, "dtype", None) if isinstance(unet, diffusers.ModelMixin) else None
        model_dtype = (
            declared
            if isinstance(declared, torch.dtype)
            else next((p.dtype for p in unet.parameters() if p.is_floating_point()), None)
        )
    if isinstance(model_dtype, str):  # a name such as "float16"; DiffusionODE checks it
        model_dtype = DTYPE_NAMES.get(model_dtype.removeprefix("torch."), model_dtype)
    if isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point:
        # The unet's attention multiplies the embeddings with its own weights, so they must
        # be in its dtype, as diffusers' pipelines pass them (float16 prompt embeddings to a
        # float16 unet); integer inputs (class labels) stay as they are, and so do Flux's
        # position ids, which the transformer reads as float32 itself.
        keep = _FLUX_IDS if flux else ()
        cond = _cast_cond(cond, model_dtype, keep)
        inpaint = _cast_cond(inpaint, model_dtype)
        kontext = _cast_cond(kontext, model_dtype)
        if negative_cond is not None:
            negative_cond = _cast_cond(negative_cond, model_dtype, keep)
    settings = dict(
        controlnet_cond=controlnet_cond,
        conditioning_scale=conditioning_scale,
        guess_mode=guess_mode,
        control_guidance_start=control_guidance_start,
        control_guidance_end=control_guidance_end,
        num_inference_steps=num_inference_steps,
        strength=strength,
    )
    if space == "flow" and controlnet is not None:
        control_module, control_cond = _flow_control(
            controlnet,
            unet,
            sched,
            cond,
            negative_cond,
            model_dtype,
            settings,
            "flux" if flux else "qwen" if qwen_image else "zimage" if z_image else "sd3",
            bool(inpaint or kontext),
        )
    else:
        control_module, _, control_cond = _control(
            controlnet,
            unet,
            sched,
            space,
            cond,
            negative_cond,
            model_dtype,
            settings,
            bool(inpaint),
        )
    clean_end = _clean_end(sched) if space == "vp" else True
    ode_dtype, unet_dtype = model_dtype, None
    if preconditioned and isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point:
        # The denoiser's skip path c_skip x gets the state at float32 at least, as diffusers'
        # step computes it (sample.to(float32)), and casts c_in x to the unet's dtype itself:
        # rounding x to a half unet's dtype before it would put the float16 rounding of x
        # into every denoised estimate.
        ode_dtype, unet_dtype = torch.promote_types(model_dtype, torch.float32), model_dtype
    model = DiffusersModel(
        unet,
        table,
        space=space,
        sigma_rule=_sigma_rule(sched.config),
        learned_variance=learned_variance,
        prediction=prediction,
        num_train_timesteps=int(sched.config.get("num_train_timesteps", 1000))
        if space == "flow"
        else None,
        sigma_data=float(sched.config.get("sigma_data", 0.5)) if preconditioned else None,
        unet_dtype=unet_dtype,
        flux=flux,
        qwen_image=qwen_image,
        z_image=z_image,
        controlnet=control_module,
        unet_2=transformer_2,
        boundary_ratio=boundary_ratio,
        expand_timesteps=expand_timesteps,
    )
    ode_cond = {**cond, **control_cond, **inpaint, **kontext, **z_options}
    if guidance_scale is not None:
        ode_cond["guidance_scale"] = guidance_scale
    if guidance_scale_2 is not None:
        ode_cond["guidance_scale_2"] = guidance_scale_2
    if guidance_rescale is not None:
        model._check_guidance_rescale(guidance_rescale, guidance_scale, negative_cond)
        ode_cond["guidance_rescale"] = guidance_rescale
    if negative_cond is not None:
        ode_cond["negative_cond"] = dict(negative_cond)
    return DiffusionODE(
        model,
        _schedule(table, space, clean_end),
        model_dtype=ode_dtype,
        cond=ode_cond,
        prediction="denoised" if preconditioned else prediction,
    )
