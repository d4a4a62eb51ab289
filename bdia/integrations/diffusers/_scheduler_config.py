"""What bdia knows of diffusers' schedulers: the space a scheduler keeps its samples in, the
checks of its config, its noise table and the bdia schedule made of it.

Schedulers are told apart by class name along their MRO (so subclasses count; a
``BDIAScheduler`` built from a flow-matching or EDM-preconditioned config says so in its
own): DDIM-like ones keep their samples in ``"vp"`` space, Euler-like ones in ``"edm"``,
the EDM-preconditioned ones (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``) in
``"edm"`` without a noise table, and ``FlowMatchEulerDiscreteScheduler`` and
``FlowMatchHeunDiscreteScheduler`` in ``"flow"``. The
``_check_*`` functions refuse, in one line naming the field and before any network call, a
config that is not an ODE bdia can map, and ``_check_pairing`` a network that does not go
with its scheduler. ``from_diffusers``, ``diffusers_grid``, ``BDIAScheduler`` and
``edit_image`` share them.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from typing import Any

import diffusers
import numpy as np
import torch

from ...schedules import EDM, RectifiedFlow, Schedule, VPDiscrete

# Scheduler classes by the space their samples live in (matched along the class's MRO, so
# subclasses count). Anything else needs space= (see _space).
_VP_SCHEDULERS = (
    "DDIMScheduler",
    "DDIMParallelScheduler",
    "DDPMScheduler",
    "DDPMParallelScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "BDIAScheduler",
    "BDIAInverseScheduler",
)
_EDM_SCHEDULERS = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
)

# Schedulers without a noise table whose unet is the raw network F of an EDM denoiser
# c_skip x + c_out F(c_in x, c_noise), called as StableDiffusionXLPipeline calls it with them.
_EDM_PRECONDITIONED = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
# diffusers' precondition_outputs of these takes two prediction types; c_out's sign tells them
# apart.
_EDM_PREDICTIONS = ("epsilon", "v_prediction")

# Flow-matching schedulers whose sigmas are the transformer's timesteps over N, and the
# flow-matching transformers the adapter calls as their pipelines do: SD3's as
# StableDiffusion3Pipeline calls it, Flux's as FluxPipeline does, Chroma's, Flux's
# transformer without pooled embeddings or guidance embedding, as ChromaPipeline does (on
# Flux's packed latents, ids and timestep, with an attention mask), Qwen-Image's as
# QwenImagePipeline does, Z-Image's as ZImagePipeline does, Flux.2's as Flux2Pipeline
# and Flux2KleinPipeline do (Flux's call on packed latents, with 4-axis ids and no pooled
# embeddings), Sana's as SanaPipeline does (SD3's call, the timestep times the config's
# timestep_scale), and Wan's as WanPipeline does (SD3's call on video latents, guidance in two
# calls).
_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
_SD3_MODELS = ("SD3Transformer2DModel",)
_CHROMA_MODELS = ("ChromaTransformer2DModel",)
_FLUX2_MODELS = ("Flux2Transformer2DModel",)
_FLUX_MODELS = ("FluxTransformer2DModel",) + _CHROMA_MODELS + _FLUX2_MODELS
_QWEN_IMAGE_MODELS = ("QwenImageTransformer2DModel",)
_Z_IMAGE_MODELS = ("ZImageTransformer2DModel",)
_SANA_MODELS = ("SanaTransformer2DModel",)
_WAN_MODELS = ("WanTransformer3DModel",)
_FLOW_MODELS = (
    _SD3_MODELS + _FLUX_MODELS + _QWEN_IMAGE_MODELS + _Z_IMAGE_MODELS + _SANA_MODELS + _WAN_MODELS
)
# PixArt-alpha's and PixArt-Sigma's transformer, a noise-table model called as their pipelines
# call it: the latents positionally, the timestep by keyword (its second positional argument
# is encoder_hidden_states).
_PIXART_MODELS = ("PixArtTransformer2DModel",)
_SPACES = ("vp", "edm", "flow")
# Relative slack on noise levels: diffusers stores its sigmas in float32 (rounding 6e-8), and
# a sigma that close to a table value is that value.
_SIGMA_SLACK = 1e-6

# diffusers' prediction_type -> bdia's DiffusionODE prediction (v = alpha eps - sigma x0 in both).
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SPACINGS = ("linspace", "leading", "trailing")
# Config flags under which a scheduler's sigmas are not the table's values at its timesteps.
_SIGMA_SPACINGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
)


def _scheduler(scheduler: Any) -> Any:
    """A scheduler instance: ``scheduler`` itself, or one built from a config mapping."""
    if isinstance(scheduler, type):
        raise TypeError(
            f"scheduler must be a scheduler instance, got the class {scheduler.__name__}; build "
            f"one, e.g. {scheduler.__name__}.from_pretrained(path, subfolder='scheduler')"
        )
    if isinstance(scheduler, Mapping):
        name = scheduler.get("_class_name")
        if not isinstance(name, str):
            raise ValueError(
                "a scheduler config needs its '_class_name' (the diffusers class to build), as "
                "scheduler_config.json has; or pass the scheduler instance"
            )
        cls = getattr(diffusers, name, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_config"):
            raise ValueError(f"_class_name = {name!r} is not a diffusers scheduler class")
        return cls.from_config(dict(scheduler))
    if not isinstance(getattr(scheduler, "config", None), Mapping):
        raise TypeError(
            f"scheduler must be a diffusers scheduler (or its config mapping), got "
            f"{type(scheduler).__name__}"
        )
    return scheduler


def _class_names(scheduler: Any) -> list[str]:
    return [c.__name__ for c in type(scheduler).__mro__]


def _is_flow(scheduler: Any) -> bool:
    # A BDIA scheduler built from a flow-matching config says so in its own.
    return any(name in _FLOW_SCHEDULERS for name in _class_names(scheduler)) or bool(
        scheduler.config.get("flow_matching", False)
    )


def _is_preconditioned(scheduler: Any) -> bool:
    # A BDIA scheduler built from an EDM-preconditioned config names that class in its own.
    return any(name in _EDM_PRECONDITIONED for name in _class_names(scheduler)) or (
        scheduler.config.get("edm_scheduler") in _EDM_PRECONDITIONED
    )


def _space(scheduler: Any, space: str | None) -> str:
    """``space`` if given (checked), else the space of the scheduler's class."""
    flow = _is_flow(scheduler)
    if space is not None:
        if space not in _SPACES:
            raise ValueError(f"space must be 'vp', 'edm' or 'flow', got {space!r}")
        if _is_preconditioned(scheduler) and space != "edm":
            raise ValueError(
                f"space = {space!r} does not fit {type(scheduler).__name__}, an "
                "EDM-preconditioned scheduler whose samples are x0 + sigma eps; leave space "
                "unset (or give 'edm')"
            )
        if flow and space != "flow":
            raise ValueError(
                f"space = {space!r} does not fit {type(scheduler).__name__}, a flow-matching "
                "scheduler without a noise table; leave space unset (or give 'flow')"
            )
        if space == "flow" and not flow:
            raise ValueError(
                f"space = 'flow' needs a flow-matching scheduler "
                f"({', '.join(_FLOW_SCHEDULERS)}), got {type(scheduler).__name__}"
            )
        return space
    if flow:
        return "flow"
    if _is_preconditioned(scheduler):
        return "edm"
    for name in _class_names(scheduler):
        if name in _VP_SCHEDULERS:
            return "vp"
        if name in _EDM_SCHEDULERS:
            return "edm"
    if getattr(scheduler, "alphas_cumprod", None) is None:
        # No space would help: without a noise table the adapter has no ODE to build.
        raise _no_table(scheduler)
    raise ValueError(
        f"space: bdia does not know in which space {type(scheduler).__name__} keeps its samples; "
        "pass space='vp' (samples are alpha x0 + sigma eps and start as unit noise, as in DDIM) "
        "or space='edm' (samples are x / alpha and start at init_noise_sigma = sigma_max, as "
        "in EulerDiscreteScheduler)"
    )


def _check_schedule_config(scheduler: Any, space: str) -> None:
    """Refuse, in one line naming the field, a config whose grid bdia cannot reproduce."""
    cfg = scheduler.config
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in _SPACINGS:
        raise ValueError(
            f"timestep_spacing = {spacing!r} in the scheduler config is unknown; use one of "
            f"{', '.join(repr(s) for s in _SPACINGS)}"
        )
    interpolation = cfg.get("interpolation_type", "linear")
    if interpolation != "linear":
        raise ValueError(
            f"interpolation_type = {interpolation!r} in the scheduler config is not supported: "
            "its sigmas do not match the timesteps the unet sees, so the noise level is not a "
            "function of the timestep; set interpolation_type='linear' (or use_karras_sigmas=True)"
        )
    timestep_type = cfg.get("timestep_type", "discrete")
    if timestep_type not in ("discrete", "continuous"):
        raise ValueError(
            f"timestep_type = {timestep_type!r} in the scheduler config is unknown; use "
            "'discrete' or 'continuous'"
        )
    if space == "vp" and _continuous(cfg):
        raise ValueError(
            "timestep_type = 'continuous' (with v_prediction) in the scheduler config calls the "
            "unet at 0.25 log(sigma), which is EDM's convention; use space='edm'"
        )
    if cfg.get("use_flow_sigmas", False):
        raise _flow_sigmas_refusal(type(scheduler).__name__, cfg)
    final = cfg.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(
            f"final_sigmas_type = {final!r} in the scheduler config is unknown; use 'zero' or "
            "'sigma_min'"
        )


def _flow_sigmas_refusal(name: str, cfg: Mapping[str, Any]) -> ValueError:
    """The refusal of the ``use_flow_sigmas`` config ``cfg`` of the scheduler class ``name``
    (Sana's DPM-Solver, Wan's UniPC), naming the flow-matching scheduler that bdia maps in its
    place."""
    shift = cfg.get("flow_shift", 1.0)
    n = cfg.get("num_train_timesteps", 1000)
    return ValueError(
        f"use_flow_sigmas = True in the {name} config is a flow-matching "
        "schedule that calls the transformer at the integer part of sigma N, not at sigma N "
        "as the flow ODE does, so no bdia run is that scheduler's; give its transformer the "
        f"flow-matching scheduler of the same shift instead: FlowMatchEulerDiscreteScheduler("
        f"shift={shift!r}, num_train_timesteps={n!r}) (for the pipeline, "
        "BDIAScheduler.from_config(that scheduler's config, gamma=...))"
    )


def _check_flow_config(scheduler: Any) -> None:
    """Refuse, in one line naming the field, a flow-matching config that is not the ODE of
    ``sigma`` with the transformer at ``timestep = sigma N``."""
    cfg = scheduler.config
    name = type(scheduler).__name__
    if cfg.get("invert_sigmas", False):
        raise ValueError(
            "invert_sigmas = True in the scheduler config runs the sigmas from 0 up to 1 (Mochi's "
            "convention), where the transformer's timestep is not sigma N; bdia maps only "
            "invert_sigmas=False"
        )
    if cfg.get("stochastic_sampling", False):
        raise ValueError(
            "stochastic_sampling = True in the scheduler config draws new noise at every step, "
            f"which is not an ODE; set it False: {name}.from_config(scheduler.config, "
            "stochastic_sampling=False)"
        )
    n = cfg.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(
            f"num_train_timesteps = {n!r} in the scheduler config must be an integer >= 1"
        )


def _check_pairing(model: Any, scheduler: Any, space: str) -> None:
    """Refuse a network that does not go with the scheduler: a UNet (or another diffusers
    model than SD3's, Flux's, Qwen-Image's, Z-Image's, Sana's or Wan's transformer) with a
    flow-matching scheduler, one of those transformers with a noise table (its
    ``use_flow_sigmas`` config too) or an EDM-preconditioned scheduler. A plain callable is
    taken as it is documented."""
    names = _class_names(model)
    name, scheduler_name = type(model).__name__, type(scheduler).__name__
    flow_model = any(n in _FLOW_MODELS for n in names)
    if space != "flow":
        if flow_model and scheduler.config.get("use_flow_sigmas", False):
            raise _flow_sigmas_refusal(scheduler_name, scheduler.config)
        if flow_model:
            kind = "an EDM-preconditioned" if _is_preconditioned(scheduler) else "a noise-table"
            raise ValueError(
                f"{name} is a flow-matching model (it predicts the velocity eps - x0 at timestep "
                f"sigma N), but {scheduler_name} is {kind} scheduler; give it the "
                "FlowMatchEulerDiscreteScheduler it was trained with (the pipeline's scheduler; "
                "for Sana's and Wan's schedulers of flow sigmas, one of their flow_shift)"
            )
        return
    if flow_model:
        return
    if any(n.startswith("UNet") for n in names):
        raise ValueError(
            f"a {name} with {scheduler_name}: a UNet is a diffusion model of a noise table, "
            "not a flow-matching model; give it its own scheduler (DDIM, Euler, DPM-Solver, "
            "...), or use the flow-matching scheduler with SD3Transformer2DModel, "
            "FluxTransformer2DModel, Flux2Transformer2DModel, QwenImageTransformer2DModel, "
            "ZImageTransformer2DModel, SanaTransformer2DModel or WanTransformer3DModel"
        )
    if isinstance(model, diffusers.ModelMixin):
        raise ValueError(
            f"{name} with {scheduler_name}: bdia's diffusers adapter calls "
            "SD3Transformer2DModel (Stable Diffusion 3 and 3.5), FluxTransformer2DModel "
            "(Flux.1), ChromaTransformer2DModel, Flux2Transformer2DModel (Flux.2), "
            "QwenImageTransformer2DModel (Qwen-Image), ZImageTransformer2DModel (Z-Image), "
            "SanaTransformer2DModel (Sana) and WanTransformer3DModel (Wan) with a "
            "flow-matching scheduler, and does not know how this model is called"
        )


def _check_edm_config(scheduler: Any) -> None:
    """Refuse, in one line naming the field, an EDM-preconditioned config that is not the ODE
    of the denoiser ``c_skip x + c_out F(c_in x, c_noise)``."""
    cfg = scheduler.config
    name = type(scheduler).__name__
    if cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
        raise ValueError(
            f"algorithm_type = {cfg.get('algorithm_type')!r} in the scheduler config draws new "
            f"noise at every step, which is not an ODE; set it 'dpmsolver++': "
            f"{name}.from_config(scheduler.config, algorithm_type='dpmsolver++')"
        )
    sigma_data = cfg.get("sigma_data", 0.5)
    if (
        isinstance(sigma_data, bool)
        or not isinstance(sigma_data, numbers.Real)
        or not 0.0 < float(sigma_data) < math.inf
    ):
        raise ValueError(
            f"sigma_data = {sigma_data!r} in the scheduler config must be a positive finite "
            "number (the data's standard deviation, 0.5 for EDM and Playground v2.5)"
        )


def _is_flux(model: Any) -> bool:
    """Whether ``model`` is called as FluxPipeline calls its transformer (Chroma's too)."""
    return any(n in _FLUX_MODELS for n in _class_names(model))


def _is_chroma(model: Any) -> bool:
    return any(n in _CHROMA_MODELS for n in _class_names(model))


def _is_flux2(model: Any) -> bool:
    return any(n in _FLUX2_MODELS for n in _class_names(model))


def _is_qwen_image(model: Any) -> bool:
    return any(n in _QWEN_IMAGE_MODELS for n in _class_names(model))


def _is_z_image(model: Any) -> bool:
    return any(n in _Z_IMAGE_MODELS for n in _class_names(model))


def _is_sana(model: Any) -> bool:
    return any(n in _SANA_MODELS for n in _class_names(model))


def _is_wan(model: Any) -> bool:
    return any(n in _WAN_MODELS for n in _class_names(model))


def _is_pixart(model: Any) -> bool:
    return any(n in _PIXART_MODELS for n in _class_names(model))


def _check_model_config(scheduler: Any, allowed: tuple[str, ...] = tuple(_PREDICTIONS)) -> str:
    """The bdia prediction for the config's prediction_type, one of ``allowed`` (the
    EDM-preconditioned schedulers' precondition_outputs takes two); refuse non-ODE output
    processing."""
    cfg = scheduler.config
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in allowed:
        names = ", ".join(repr(p) for p in allowed[:-1]) + f" and {allowed[-1]!r}"
        raise ValueError(
            f"prediction_type = {prediction!r} in the scheduler config is not supported; bdia "
            f"maps {names}"
        )
    name = type(scheduler).__name__
    for field in ("clip_sample", "thresholding"):
        if cfg.get(field, False):
            raise ValueError(
                f"{field} = True in the scheduler config clips the predicted x0 while keeping "
                f"eps, which is not an ODE; set it False: {name}.from_config(scheduler.config, "
                f"{field}=False)"
            )
    return _PREDICTIONS[prediction]


def _continuous(cfg: Mapping[str, Any]) -> bool:
    # diffusers applies timestep_type='continuous' only together with v_prediction.
    return (
        cfg.get("timestep_type", "discrete") == "continuous"
        and cfg.get("prediction_type") == "v_prediction"
    )


def _no_table(scheduler: Any) -> ValueError:
    """The refusal of ``scheduler`` (an instance, or its class name) for want of a table."""
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    return ValueError(
        f"{name} has no alphas_cumprod noise table: it is a flow-matching or "
        "EDM-preconditioned scheduler, and this needs a diffusion model trained on a table of "
        "alphas_cumprod (DDIM, DDPM, PNDM, Euler, DPM-Solver and the like); of the schedulers "
        "without one, bdia's diffusers adapter maps FlowMatchEulerDiscreteScheduler, "
        "FlowMatchHeunDiscreteScheduler, EDMEulerScheduler and EDMDPMSolverMultistepScheduler "
        "only (from_diffusers, diffusers_grid and BDIAScheduler)"
    )


def _table(scheduler: Any, space: str = "vp") -> np.ndarray:
    """The scheduler's ``alphas_cumprod`` as a checked float64 array of N values.

    A last value of 0 (``rescale_betas_zero_snr=True``: zero terminal SNR, pure noise at the
    last timestep) is taken in VP space for a v- or x0-prediction model, whose estimates stay
    finite there; ``VPDiscrete`` then ends at alpha = 0."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise _no_table(scheduler)
    table = torch.as_tensor(ac).detach().to(device="cpu", dtype=torch.float64).numpy()
    if table.ndim != 1 or table.size < 2:
        raise ValueError(
            f"the scheduler's alphas_cumprod must be 1-D with at least 2 values, got shape "
            f"{tuple(table.shape)}"
        )
    # rescale_betas_zero_snr=True makes the last value 0 (infinite noise); Euler-type,
    # DPM-Solver and UniPC schedulers put 2^-24 there instead, which for some tables lies
    # above its neighbour, so the table turns.
    zero_snr = (
        " (rescale_betas_zero_snr=True, which this scheduler follows with 2^-24 in place of "
        "the last value, here out of order; set it False)"
        if scheduler.config.get("rescale_betas_zero_snr", False)
        else ""
    )
    if table[-1] == 0 and np.all((table[:-1] > 0) & (table[:-1] < 1)):
        _check_zero_snr_end(scheduler, space)
    elif not np.all((table > 0) & (table < 1)):
        raise ValueError(
            f"the scheduler's alphas_cumprod must lie in (0, 1), its last value in [0, 1) (0: "
            f"zero terminal SNR); it ranges over [{table.min():.6g}, {table.max():.6g}]"
        )
    if not np.all(np.diff(table) < 0):
        k = int(np.argmax(np.diff(table) >= 0))
        raise ValueError(
            f"the scheduler's alphas_cumprod must be strictly decreasing; it rises at timestep "
            f"{k + 1} ({table[k]:.6g} to {table[k + 1]:.6g}){zero_snr}"
        )
    n = scheduler.config.get("num_train_timesteps", table.size)
    if n != table.size:
        raise ValueError(
            f"num_train_timesteps = {n} in the scheduler config, but alphas_cumprod has "
            f"{table.size} values"
        )
    return table


def _check_zero_snr_end(scheduler: Any, space: str) -> None:
    """Refuse a table ending at alpha = 0 where its end cannot be reached: in EDM space, whose
    noise level x / alpha would be infinite, and for an epsilon-prediction model, whose data
    estimate (x - sigma eps) / alpha divides by 0 there."""
    name = type(scheduler).__name__
    if space != "vp":
        raise ValueError(
            f"{name}'s alphas_cumprod ends at 0 (rescale_betas_zero_snr=True: zero terminal "
            f"SNR), an infinite noise level that space = {space!r} (samples x / alpha) cannot "
            "hold; use space='vp'"
        )
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("v_prediction", "sample"):
        raise ValueError(
            f"{name}'s alphas_cumprod ends at 0 (rescale_betas_zero_snr=True: zero terminal "
            f"SNR), pure noise, where a prediction_type = {prediction!r} model's data estimate "
            "(x - sigma eps) / alpha divides by 0; zero terminal SNR goes with "
            "prediction_type='v_prediction' (or 'sample'), as its models are trained"
        )


def _clean_end(scheduler: Any) -> bool:
    """Whether the scheduler's last step ends at alpha = 1 (sigma = 0), as VP samples."""
    cfg = scheduler.config
    if "set_alpha_to_one" in cfg:  # DDIM, PNDM: final_alpha_cumprod is 1 or alphas_cumprod[0]
        return bool(cfg["set_alpha_to_one"])
    if "final_sigmas_type" in cfg:  # DPM-Solver, UniPC, Euler: 0 or the table's sigma_min
        return cfg["final_sigmas_type"] == "zero"
    # Otherwise the scheduler's own last noise level says it (DEIS ends at sigma_min); one
    # without sigmas (DDPM) steps to alpha = 1 past timestep 0.
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(min(4, len(probe.alphas_cumprod)))
    sigmas = getattr(probe, "sigmas", None)
    return sigmas is None or float(torch.as_tensor(sigmas).reshape(-1)[-1]) == 0.0


def _sigma_rule(cfg: Mapping[str, Any]) -> str:
    """How the scheduler maps a noise level to the timestep the unet sees (EDM space)."""
    if _continuous(cfg):
        return "continuous"
    if any(cfg.get(flag, False) for flag in _SIGMA_SPACINGS):
        return "log"  # diffusers' _sigma_to_t: log sigma interpolated between integer timesteps
    return "linear"  # sigmas = np.interp(timesteps, arange(N), sigma table)


def _schedule(table: np.ndarray | None, space: str, clean_end: bool) -> Schedule:
    if space == "flow":
        return RectifiedFlow()
    if space == "vp":
        return VPDiscrete(alphas_cumprod=table, clean_end=clean_end)
    return EDM()
