"""A diffusers UNet and a diffusers scheduler's noise table, or Stable Diffusion 3's or Flux's
transformer and its flow-matching scheduler, as a ``bdia.DiffusionODE``.

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
- ``"flow"`` (``FlowMatchEulerDiscreteScheduler``, with ``SD3Transformer2DModel``): no noise
  table; ``x = (1 - sigma) x0 + sigma eps``, the schedule is ``RectifiedFlow()``, whose time is
  diffusers' ``sigma``, and the transformer is called as ``StableDiffusion3Pipeline`` calls it,
  at ``timestep = sigma N``, returning the velocity ``eps - x0`` (prediction ``"flow"``).
  ``FluxTransformer2DModel`` is called as ``FluxPipeline`` calls it: on the packed latents
  ``(batch, tokens, in_channels)`` at ``timestep = sigma N / 1000``, with ``txt_ids`` and
  ``img_ids`` and, for Flux.1-dev, the embedded ``guidance``.

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
the unet gets its residuals.

``diffusers_grid`` gives the bdia time grid of the timesteps (or sigmas) diffusers would use.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import diffusers
import numpy as np
import torch
from torch import Tensor

from ...ode import DTYPE_NAMES, DiffusionODE
from ...schedules import EDM, RectifiedFlow, Schedule, VPDiscrete, check_steps

__all__ = ["from_diffusers", "diffusers_grid", "DiffusersModel"]

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
# EDMDPMSolverMultistepScheduler's final_sigmas_type="sigma_min" appends config.sigma_min after
# its last sigma, which is sigma_min by its own float32 Karras or exponential formula: the
# same noise level to 1.02e-6 relative (measured over sigma_min 1e-4 .. 0.5, sigma_max 14.6
# .. 120 and 2 to 1000 steps), a last step of no length that the grid leaves out, as it does
# EDMEulerScheduler's exact repeat.
_REPEAT_SLACK = 1e-5

# Flow-matching schedulers whose sigmas are the transformer's timesteps over N, and the
# flow-matching transformers the adapter calls as their pipelines do: SD3's as
# StableDiffusion3Pipeline calls it, Flux's as FluxPipeline does.
_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
_SD3_MODELS = ("SD3Transformer2DModel",)
_FLUX_MODELS = ("FluxTransformer2DModel",)
_FLOW_MODELS = _SD3_MODELS + _FLUX_MODELS
# FluxPipeline passes the transformer its timestep divided by this constant (which the
# transformer multiplies back), whatever the scheduler's num_train_timesteps.
_FLUX_TIMESTEP_DIVISOR = 1000
# Flux's position ids: one row per token, shared by the batch (2-D), passed as they are.
_FLUX_IDS = ("txt_ids", "img_ids")
_SPACES = ("vp", "edm", "flow")

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
# unet (and flow transformer) keyword arguments that the adapter itself sets.
_RESERVED = ("sample", "timestep", "return_dict")
_FLOW_RESERVED = ("hidden_states", "timestep", "return_dict")

# The ControlNet the adapter calls as StableDiffusionControlNetPipeline and
# StableDiffusionXLControlNetPipeline call it, and the wrapper those pipelines make of a list.
_CONTROLNET = "ControlNetModel"
_MULTI_CONTROLNET = "MultiControlNetModel"
# Of SDXL's added conditioning, what the pipelines give the controlnet (an IP-Adapter's
# image_embeds goes to the unet only).
_CONTROLNET_ADDED = ("text_embeds", "time_ids")
# The unet's arguments the adapter fills with the controlnet's residuals.
_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")
# The ODE's cond keys of a controlnet, beside the unet's arguments (DiffusersModel.forward's).
_CONTROL_KEYS = ("controlnet_cond", "conditioning_scale", "guess_mode", "control_range")

# A timestep tau = t N - 1 within this of an integer is that integer (within 2 N eps when t
# arrives in float32), so the network sees diffusers' integer timesteps exactly: a float64 t
# puts tau ~1e-13 off, a float32 one up to N * 6e-8.
_SNAP_TAU = 1e-6
# Relative slack on noise levels: diffusers stores its sigmas in float32 (rounding 6e-8), and
# a sigma that close to a table value is that value.
_SIGMA_SLACK = 1e-6


# ------------------------------------------------------------------ scheduler and config


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
        raise ValueError(
            "use_flow_sigmas = True in the scheduler config is a flow-matching schedule, not a "
            "noise table of alphas_cumprod; bdia's diffusers adapter does not support it"
        )
    final = cfg.get("final_sigmas_type", "zero")
    if final not in ("zero", "sigma_min"):
        raise ValueError(
            f"final_sigmas_type = {final!r} in the scheduler config is unknown; use 'zero' or "
            "'sigma_min'"
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
    model than SD3's or Flux's transformer) with a flow-matching scheduler, SD3's or Flux's
    transformer with a noise table or an EDM-preconditioned scheduler. A plain callable is
    taken as it is documented."""
    names = _class_names(model)
    name, scheduler_name = type(model).__name__, type(scheduler).__name__
    flow_model = any(n in _FLOW_MODELS for n in names)
    if space != "flow":
        if flow_model:
            kind = "an EDM-preconditioned" if _is_preconditioned(scheduler) else "a noise-table"
            raise ValueError(
                f"{name} is a flow-matching model (it predicts the velocity eps - x0 at timestep "
                f"sigma N), but {scheduler_name} is {kind} scheduler; give it the "
                "FlowMatchEulerDiscreteScheduler it was trained with (the pipeline's scheduler)"
            )
        return
    if flow_model:
        return
    if any(n.startswith("UNet") for n in names):
        raise ValueError(
            f"a {name} with {scheduler_name}: a UNet is a diffusion model of a noise table, "
            "not a flow-matching model; give it its own scheduler (DDIM, Euler, DPM-Solver, "
            "...), or use the flow-matching scheduler with SD3Transformer2DModel or "
            "FluxTransformer2DModel"
        )
    if isinstance(model, diffusers.ModelMixin):
        raise ValueError(
            f"{name} with {scheduler_name}: bdia's diffusers adapter calls "
            "SD3Transformer2DModel (Stable Diffusion 3 and 3.5) and FluxTransformer2DModel "
            "(Flux.1) with a flow-matching scheduler, and does not know how this model is called"
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
    return any(n in _FLUX_MODELS for n in _class_names(model))


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
        "EDMEulerScheduler and EDMDPMSolverMultistepScheduler only (from_diffusers, "
        "diffusers_grid and BDIAScheduler)"
    )


def _table(scheduler: Any) -> np.ndarray:
    """The scheduler's ``alphas_cumprod`` as a checked float64 array of N values."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise _no_table(scheduler)
    table = torch.as_tensor(ac).detach().to(device="cpu", dtype=torch.float64).numpy()
    if table.ndim != 1 or table.size < 2:
        raise ValueError(
            f"the scheduler's alphas_cumprod must be 1-D with at least 2 values, got shape "
            f"{tuple(table.shape)}"
        )
    # rescale_betas_zero_snr=True makes the last value 0 (infinite noise); Euler-type
    # schedulers put 2^-24 there instead, above its neighbour, so the table turns.
    zero_snr = (
        " (rescale_betas_zero_snr=True sets the last value to 0, infinite noise, or in "
        "Euler-type schedulers to 2^-24, out of order; set it False)"
        if scheduler.config.get("rescale_betas_zero_snr", False)
        else ""
    )
    if not np.all((table > 0) & (table < 1)):
        raise ValueError(
            f"the scheduler's alphas_cumprod must lie in (0, 1); it ranges over "
            f"[{table.min():.6g}, {table.max():.6g}]{zero_snr}"
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


# --------------------------------------------------------------------- conditioning


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
    control = [k for k in (negative_cond or {}) if k in _CONTROL_KEYS]
    if control:
        raise ValueError(
            f"negative_cond has key {control[0]!r}: the control image and its settings are "
            "shared by both branches of guidance, as the ControlNet pipelines share them; "
            "leave it out of negative_cond"
        )
    extra = [k for k in (negative_cond or {}) if k not in cond]
    if extra:
        raise ValueError(
            f"negative_cond has key {extra[0]!r}, which the conditional arguments lack; give "
            f"the conditional branch's value as {extra[0]}=... too"
        )


def _ids_message(key: str, value: Any, axes: int) -> str | None:
    """Why ``value`` is not a Flux position-id tensor of ``axes`` columns, or None."""
    if not isinstance(value, Tensor):
        return f"{key} must be a tensor of shape (tokens, {axes}), got {type(value).__name__}"
    if value.ndim == 2 and value.shape[1] == axes:
        return None
    batched = f" (a batched one: pass {key}[0])" if value.ndim == 3 else ""
    return (
        f"{key} must have shape (tokens, {axes}), one row per token shared by the batch, as "
        f"FluxPipeline passes it; got {tuple(value.shape)}{batched}"
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
    for where, mapping in (("", cond), ("negative_cond", negative_cond or {})):
        for key in _FLUX_IDS:
            if key in mapping:
                problem = _ids_message(f"{where}[{key!r}]" if where else key, mapping[key], axes)
                if problem is not None:
                    raise ValueError(problem)
        # The negative branch is its own call: its txt_ids, else the conditional ones.
        txt_ids = mapping.get("txt_ids", cond["txt_ids"])
        embeds = mapping.get("encoder_hidden_states")
        if isinstance(embeds, Tensor) and (embeds.ndim != 3 or embeds.shape[1] != len(txt_ids)):
            label = f"{where}['encoder_hidden_states']" if where else "encoder_hidden_states"
            raise ValueError(
                f"{label} has shape {tuple(embeds.shape)}, but its txt_ids has "
                f"{len(txt_ids)} rows: give embeddings of shape (batch or 1, tokens, D) with "
                "one txt_ids row per token"
            )
    embedded = bool(config.get("guidance_embeds", False))
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
                f"{name} has guidance_embeds = False (a timestep-distilled model such as "
                f"Flux.1-schnell) and embeds no guidance scale; leave {where} out (classifier-"
                "free guidance is guidance_scale with negative_cond)"
            )
        branch["guidance"] = _guidance_tensor(branch["guidance"], where)
    if embedded and "guidance" not in positive:
        raise ValueError(
            f"{name} has guidance_embeds = True (Flux.1-dev) and embeds the guidance scale: "
            "give guidance=g, FluxPipeline's guidance_scale (3.5 by default), as a number or a "
            "tensor of shape (batch,) or (1,)"
        )
    return positive, negative


# ------------------------------------------------------------------------- controlnet


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
                f"{_MULTI_CONTROLNET}; other controlnets (union, SD3, Flux, ControlNet-XS) "
                "are called otherwise and are not mapped"
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


def _control_ranges(
    sched: Any, space: str, steps: Any, starts: list[float], ends: list[float]
) -> list[tuple[float, float]]:
    """Each controlnet's ``control_guidance_start`` and ``control_guidance_end`` as the
    closed interval of ODE times, ``(lo, hi)``, on which the ControlNet pipelines call it.

    The pipelines keep controlnet k at entry i of the scheduler's n ``timesteps`` when ``i /
    n >= start`` and ``(i + 1) / n <= end``: a run of entries. Each entry's unet call is at a
    time of ``diffusers_grid`` (the j-th distinct noise level is the grid's j-th time; a
    scheduler that calls the unet twice at one level, Heun, PNDM, has it twice), and the run's
    first and last entries' times bound the interval; a run that reaches the first (last)
    entry reaches past the grid's start (end). An empty run is the empty interval ``(inf,
    -inf)``. Refused where the pipeline switches between two calls at one time."""
    steps = check_steps(steps, "num_inference_steps")
    ts = [float(v) for v in diffusers_grid(sched, steps, space=space)]
    fresh = copy.deepcopy(sched)
    fresh.set_timesteps(steps)
    taus = [float(v) for v in torch.as_tensor(fresh.timesteps).reshape(-1)]
    n = len(taus)
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
    for start, end in zip(starts, ends):
        keep = [not (i / n < start or (i + 1) / n > end) for i in range(n)]
        split = [i for i in range(1, n) if index[i] == index[i - 1] and keep[i] != keep[i - 1]]
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
        hi = math.inf if kept[0] == 0 else ts[index[kept[0]]]
        lo = -math.inf if kept[-1] == n - 1 else ts[index[kept[-1]]]
        ranges.append((lo, hi))
    return ranges


def _check_control_pairing(net: Any, unet: Any, cond: Mapping[str, Any]) -> None:
    """Refuse a controlnet made for another unet, and conditioning it cannot be called with."""
    unet_config = getattr(unet, "config", None)
    if isinstance(unet_config, Mapping):
        for field in ("in_channels", "cross_attention_dim", "block_out_channels"):
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
) -> tuple[Any, list[Any] | None, dict[str, Any]]:
    """The controlnet module to call, its nets, and the ODE's cond entries of its settings
    (``from_diffusers``' keyword arguments of the same names), all checked; ``(None, None,
    {})`` without a controlnet."""
    defaults = {
        "controlnet_cond": None,
        "conditioning_scale": 1.0,
        "guess_mode": False,
        "control_guidance_start": 0.0,
        "control_guidance_end": 1.0,
        "num_inference_steps": None,
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
    if space == "flow":
        raise ValueError(
            "controlnet: bdia maps the ControlNetModel of Stable Diffusion's and SDXL's unets; "
            "SD3's and Flux's controlnets are other models, called otherwise"
        )
    module, nets = _controlnets(controlnet)
    multi = _MULTI_CONTROLNET in _class_names(module)
    for net in nets:
        _check_control_pairing(net, unet, cond)
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
    entries: dict[str, Any] = {
        "controlnet_cond": images if multi else images[0],
        "conditioning_scale": scales if multi else scales[0],
        "guess_mode": guess_mode,
    }
    if switched:
        entries["control_range"] = _control_ranges(sched, space, steps, starts, ends)
    return module, nets, entries


# ----------------------------------------------------------------------------- model


class DiffusersModel(torch.nn.Module):
    """A diffusers UNet called in bdia's convention for a ``DiffusionODE`` (see ``from_diffusers``).

    Args:
        unet: ``unet(sample, timestep, **kwargs)`` returning a tensor, a tuple whose first
            entry is the prediction, or an object with ``.sample`` (diffusers' UNets); in
            ``"flow"`` space ``unet(hidden_states=x, timestep=tau, return_dict=False,
            **kwargs)`` (SD3's transformer; Flux's with ``flux``).
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
            the state is the packed latents ``(batch, tokens, in_channels)``, the timestep is
            ``tau / 1000`` in the dtype the transformer gets the state in (the pipeline's
            ``t.to(latents.dtype) / 1000``), ``txt_ids`` and ``img_ids`` pass through
            unbatched, and guidance makes two calls, the conditional one first.
        controlnet: ``"vp"`` and ``"edm"`` space only, a diffusers ``ControlNetModel`` or
            ``MultiControlNetModel`` called before the unet on the same inputs, whose
            residuals the unet gets, as ``StableDiffusionControlNetPipeline`` and
            ``StableDiffusionXLControlNetPipeline`` call them (see ``forward``).

    ``forward(x, t, guidance_scale=None, negative_cond=None, controlnet_cond=None,
    conditioning_scale=1.0, guess_mode=False, control_range=None, **unet_kwargs)``: see there.
    """

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
        controlnet: Any = None,
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
        if controlnet is not None and space == "flow":
            raise ValueError("controlnet needs space 'vp' or 'edm' (a unet), got 'flow'")
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
            # Noise levels of the integer timesteps, increasing with tau.
            self._sigmas = np.sqrt((1.0 - table) / table)
            self._log_sigmas = np.log(self._sigmas)
        config = getattr(unet, "config", None)
        self.in_channels = config.get("in_channels") if isinstance(config, Mapping) else None
        self.controlnet = None
        self._nets: list[Any] = []
        self._multi = False
        if controlnet is not None:
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
        **unet_kwargs: Any,
    ) -> Tensor:
        """One unet call (one batch of twice the size under guidance), after one controlnet
        call where the model has a controlnet.

        Args:
            x: state of shape ``(batch, C, ...)`` in the unet's dtype: ``alpha x0 + sigma eps``
                in VP space, ``x0 + sigma_bar eps`` in EDM space (the unet then sees
                ``x / sqrt(sigma_bar^2 + 1)``, as after diffusers' ``scale_model_input``),
                ``(1 - sigma) x0 + sigma eps`` in flow space (for Flux, packed latents of shape
                ``(batch, tokens, in_channels)``). With ``sigma_data``, ``x0 + sigma eps`` in
                float32 at least; the unet sees ``c_in x`` in ``unet_dtype``, at timestep
                ``c_noise``, as after an EDM scheduler's ``scale_model_input``.
            t: shape ``(batch,)``, the ODE's time: ``(tau + 1) / N`` (VP), ``sigma_bar`` (EDM)
                or ``sigma`` (flow).
            guidance_scale: ``g`` of classifier-free guidance; the output is ``u + g (c - u)``
                of the unconditional (``negative_cond``) and conditional (``unet_kwargs``)
                predictions, from one call on the batch ``[unconditional, conditional]`` (for
                Flux, two calls: the conditional one, then the unconditional one).
            negative_cond: the unconditional branch's unet keyword arguments.
            controlnet_cond: with a controlnet, the control image, shape ``(batch or 1, C, f h,
                f w)`` for a state of ``(batch, channels, h, w)`` (``C`` the controlnet's
                ``conditioning_channels``, ``f`` the factor of its conditioning embedding, 8
                for Stable Diffusion's), in its dtype; a list of them for a
                ``MultiControlNetModel``. The controlnet is called as the ControlNet pipelines
                call it: on the unet's input and timestep, with the unet's
                ``encoder_hidden_states`` and SDXL's ``text_embeds`` and ``time_ids`` of
                ``added_cond_kwargs``, under guidance on the batch ``[unconditional,
                conditional]`` with the control image in both halves; and its down and mid
                residuals go to the unet as ``down_block_additional_residuals`` and
                ``mid_block_additional_residual``.
            conditioning_scale: the controlnet's scale of its residuals (a list, one per net,
                for a ``MultiControlNetModel``).
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
        _check_guidance(guidance_scale, negative_cond)
        batch = x.shape[0]
        if self.flux:
            self._check_packed(x, unet_kwargs)
        elif self.in_channels is not None and (x.ndim < 2 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"the state has shape {tuple(x.shape)}, but the unet takes in_channels = "
                f"{self.in_channels} at dim 1; give a state of shape (batch, {self.in_channels}, "
                "height, width)"
            )
        control = self._control_inputs(
            x, t, controlnet_cond, conditioning_scale, control_range, batch
        )
        tau_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        view = (-1,) + (1,) * (x.ndim - 1)
        if self.sigma_data is not None:
            # The schedulers' precondition_inputs and precondition_noise, on the float32 sigma
            # (float64 with a float64 state), on the state's device as the pipeline's
            # timesteps are.
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            sigma = t.detach().reshape(view).to(x.device, x.dtype)
            x_in = (x * self._c_in(sigma)).to(self.unet_dtype or x.dtype)
            tau = self._c_noise(t.detach().reshape(-1).to(x.device, tau_dtype))
        else:
            times = [float(v) for v in t.detach().reshape(-1).cpu().tolist()]
            tau = torch.tensor([self.timestep(v, t.dtype) for v in times], dtype=tau_dtype)
            if self.flux:
                # FluxPipeline's timestep / 1000 of the scheduler's float32 t = sigma N, cast
                # to the latents' dtype first: t.expand(batch).to(latents.dtype) / 1000.
                tau = tau.to(x.dtype) / _FLUX_TIMESTEP_DIVISOR
            tau = tau.to(x.device)
            if self.space == "edm":
                scale = torch.tensor([math.sqrt(s * s + 1.0) for s in times], dtype=torch.float64)
                scale = scale.to(x.device).view(view)
                x_in = (x / scale).to(x.dtype)
            else:
                x_in = x

        if guidance_scale is not None and guidance_scale != 1 and negative_cond is not None:
            if self.flux:
                # FluxPipeline's true classifier-free guidance: two calls, the conditional
                # first, the negative one with its own arguments (txt_ids included).
                negative = {**unet_kwargs, **negative_cond}
                c = self._call_unet(x_in, tau, _flux_kwargs(unet_kwargs, batch, ""))
                u = self._call_unet(x_in, tau, _flux_kwargs(negative, batch, "negative_cond"))
            else:
                kwargs = _paired(negative_cond, unet_kwargs, batch, "")
                x_both, tau_both = torch.cat([x_in, x_in]), torch.cat([tau, tau])
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
                both = self._call_unet(x_both, tau_both, kwargs)
                u, c = both[:batch], both[batch:]
            # The raw outputs are combined (linear, so the same in eps, x0 or v), in float32 at
            # least so that a half-precision unet's difference c - u is not rounded again.
            wide = torch.promote_types(c.dtype, torch.float32)
            uncond, cond = u.to(wide), c.to(wide)
            out = uncond + guidance_scale * (cond - uncond)
        elif self.flux:
            out = self._call_unet(x_in, tau, _flux_kwargs(unet_kwargs, batch, ""))
        else:
            kwargs = _batched(unet_kwargs, batch, "")
            if control is not None:
                images, scales = control
                kwargs.update(self._residuals(x_in, tau, kwargs, images, scales, guess_mode))
            out = self._call_unet(x_in, tau, kwargs)
        if self.sigma_data is not None:
            return self._denoised(x, out, sigma)
        if self.space == "edm" and self.prediction == "v":
            # diffusers' v is the VP state's: v_vp = (eps - sigma_bar x0) / sqrt(sigma_bar^2 + 1).
            wide = torch.promote_types(out.dtype, torch.float32)
            out = out.to(wide) * scale.to(wide)
        return out

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
        for i, (image, net) in enumerate(zip(images, self._nets)):
            where = f"controlnet_cond[{i}]" if self._multi else "controlnet_cond"
            f = _control_factor(net)
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

    def _check_packed(self, x: Tensor, kwargs: Mapping[str, Any]) -> None:
        """Refuse a Flux state that is not packed latents matching ``img_ids``."""
        c = self.in_channels
        if x.ndim != 3 or (c is not None and x.shape[2] != c):
            packed = f"(batch, tokens, {c})" if c is not None else "(batch, tokens, channels)"
            raise ValueError(
                f"the state has shape {tuple(x.shape)}, but Flux's transformer takes packed "
                f"latents of shape {packed}, as FluxPipeline's loop carries them; pack "
                "image-shaped latents (batch, channels, h, w) with "
                "FluxPipeline._pack_latents(latents, batch, channels, h, w)"
            )
        ids = kwargs.get("img_ids")
        if isinstance(ids, Tensor) and ids.shape[0] != x.shape[1]:
            raise ValueError(
                f"img_ids has {ids.shape[0]} rows but the state has {x.shape[1]} tokens; make "
                "img_ids for the latents' size: FluxPipeline._prepare_latent_image_ids(1, h // 2, "
                "w // 2, device, dtype)"
            )

    def _call_unet(self, x: Tensor, tau: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        if self.space == "flow":
            # By keyword, as StableDiffusion3Pipeline and FluxPipeline call it: the
            # transformer's second positional argument is encoder_hidden_states.
            result = self.unet(hidden_states=x, timestep=tau, return_dict=False, **kwargs)
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
    **cond: Any,
) -> DiffusionODE:
    """The probability-flow ODE of a diffusers UNet under a diffusers scheduler's noise table,
    or the flow-matching ODE of Stable Diffusion 3's or Flux's transformer.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``, or any module called as
            ``unet(sample, timestep, **kwargs)`` that returns a tensor, a tuple or an object
            with ``.sample``; with a flow-matching scheduler, an ``SD3Transformer2DModel`` or
            a ``FluxTransformer2DModel`` (``pipe.transformer``), or any module called as
            ``unet(hidden_states=x, timestep=tau, return_dict=False, **kwargs)`` that returns
            the velocity ``eps - x0``. With an EDM-preconditioned scheduler, the raw network
            ``F`` of the denoiser, called as ``StableDiffusionXLPipeline`` calls it with that
            scheduler: ``unet(c_in x, c_noise, **kwargs)``. Put it in eval mode
            (``from_pretrained`` does).
        scheduler: a diffusers scheduler instance, or its config mapping (the class named in
            ``_class_name`` is built). Its ``alphas_cumprod`` (read as float64) is the noise
            table; its ``prediction_type`` says what the unet predicts. A
            ``FlowMatchEulerDiscreteScheduler`` has no table: its ``num_train_timesteps`` is
            ``N`` of the transformer's timestep ``sigma N``. Nor have ``EDMEulerScheduler`` and
            ``EDMDPMSolverMultistepScheduler``: their ``sigma_data`` and ``prediction_type``
            (``epsilon`` or ``v_prediction``) make the denoiser. It is not modified.
        space: ``"vp"``, ``"edm"`` or ``"flow"``, the space of the ODE's state (see the module
            docstring); by default the scheduler's (DDIM-like classes ``"vp"``, Euler-like and
            EDM-preconditioned ``"edm"``, flow-matching ``"flow"``). An unknown scheduler
            class needs it.
        model_dtype: dtype the unet runs in (the state is cast to it and the output back);
            defaults to the unet's parameter dtype, so a float16 unet runs under a float32 or
            float64 state. With an EDM-preconditioned scheduler the ODE's ``model_dtype`` is
            this dtype promoted to float32 at least: the denoiser's preconditioning gets the
            state in it, and the unet ``c_in x`` in this dtype.
        controlnet: a diffusers ``ControlNetModel`` of the unet (``pipe.controlnet`` of a
            ``StableDiffusionControlNetPipeline`` or ``StableDiffusionXLControlNetPipeline``),
            a list of them or a ``MultiControlNetModel``; in eval mode and the unet's dtype.
            Each model evaluation then calls it before the unet, as those pipelines do: on
            the unet's input and timestep, with ``encoder_hidden_states`` and (SDXL)
            ``added_cond_kwargs``' ``text_embeds`` and ``time_ids`` (not an IP-Adapter's
            ``image_embeds``, ``timestep_cond`` nor ``cross_attention_kwargs``, which the
            pipelines do not give it), under guidance on the batch ``[unconditional,
            conditional]``; its residuals go to the unet as ``down_block_additional_residuals``
            and ``mid_block_additional_residual``. Not with a flow-matching scheduler.
        controlnet_cond: the control image, as the pipeline prepares it
            (``pipe.control_image_processor.preprocess(image, height=H, width=W)``: values in
            [0, 1]): a floating tensor of shape ``(batch or 1, conditioning_channels, H, W)``
            for latents of ``H / f x W / f`` (``f`` the controlnet's, 8 for Stable
            Diffusion's and SDXL's), cast to the controlnet's dtype; the same image in both
            halves of guidance. A list of them, one per net, for several controlnets. Needed
            with ``controlnet``.
        conditioning_scale: the scale of the controlnet's residuals, the pipelines'
            ``controlnet_conditioning_scale``: a number, or one per net.
        guess_mode: the pipelines' guess mode: residuals scaled from 0.1 at the first block
            to 1 at the mid block, and under guidance the controlnet called on the
            conditional half alone, the unconditional half given none. Set as the pipelines
            set it where the (first) controlnet's config has ``global_pool_conditions``.
        control_guidance_start: the fraction of the pipeline's steps before which the
            controlnet is off (a number, or one per net). The pipelines keep it at entry
            ``i`` of the scheduler's ``n`` timesteps when ``i / n >= start`` and ``(i + 1) /
            n <= end``; the ODE keeps it on the closed interval of times from the first kept
            entry's to the last kept entry's on ``diffusers_grid(scheduler,
            num_inference_steps)`` (past the grid's start or end where the first or last
            entry is kept), so that a solver evaluating on that grid calls it exactly where
            the pipeline does. Bounds that would switch it between a scheduler's two calls
            at one time (Heun's) are refused. Elsewhere its scale is 0; where all
            nets' are, neither it nor its residuals are used.
        control_guidance_end: the fraction of steps after which the controlnet is off, as
            above.
        num_inference_steps: the grid's steps, as given to ``diffusers_grid``; needed with
            (and only with) ``control_guidance_start`` or ``control_guidance_end`` other than
            0 and 1.
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

    Returns:
        A ``bdia.DiffusionODE``: schedule ``VPDiscrete(alphas_cumprod=..., clean_end=...)``
        (``clean_end`` when the scheduler ends at alpha = 1), ``EDM()`` or ``RectifiedFlow()``,
        prediction ``"eps"``, ``"v"``, ``"x0"`` or ``"flow"`` (``"denoised"`` with an
        EDM-preconditioned scheduler), model a ``DiffusersModel``, and
        ``cond`` holding everything that conditions the unet (``guidance_scale`` and
        ``negative_cond`` included; with a controlnet, ``controlnet_cond``,
        ``conditioning_scale``, ``guess_mode`` and, where it is switched, the times of
        ``control_range``). Sample it on ``diffusers_grid(scheduler, steps)`` with
        any bdia solver, or invert it with BDIA.

    Raises:
        ValueError: one line naming the field, before any unet call, for a prediction_type
            other than epsilon, v_prediction or sample; clip_sample or thresholding set; an
            unknown timestep_spacing; interpolation_type 'log_linear'; flow sigmas; an
            alphas_cumprod that is not a noise table; out_channels different from in_channels
            (unless twice as many with the scheduler's variance_type 'learned' or
            'learned_range'); guidance_scale without negative_cond; a scheduler of unknown
            class without ``space=``. With a flow-matching scheduler: invert_sigmas or
            stochastic_sampling set; a UNet or another diffusers model than SD3's or Flux's
            transformer; a ``skip_layers`` key (skip-layer guidance). SD3's or Flux's
            transformer with a noise-table scheduler. With an EDM-preconditioned scheduler:
            a prediction_type other than epsilon and v_prediction, thresholding, an
            algorithm_type other than 'dpmsolver++', a sigma_data that is not a positive finite
            number, a space other than 'edm'. For Flux: a missing
            ``encoder_hidden_states``, ``pooled_projections``, ``txt_ids`` or ``img_ids``;
            ids that are not 2-D ``(tokens, 3)``; embeddings whose length is not their
            ``txt_ids``' rows; ``guidance`` missing (with ``guidance_embeds``), given
            (without it), not finite, or a tensor that is not 1-D and floating. At the first
            evaluation, before the call: a state that is not packed latents
            ``(batch, tokens, in_channels)`` or not of ``img_ids``' token count. With a
            controlnet: one of another class than ``ControlNetModel`` (a list or
            ``MultiControlNetModel`` of them), made for another unet (its ``in_channels``,
            ``cross_attention_dim`` or ``block_out_channels``), of another dtype, or with a
            flow-matching scheduler; no ``controlnet_cond``, no ``encoder_hidden_states``, or
            for SDXL's no ``text_embeds`` and ``time_ids``; control images of the wrong
            number, channels or dims; a scale or bound per net of the wrong count or not
            finite; bounds outside ``0 <= start < end <= 1``, or other than 0 and 1 without
            ``num_inference_steps`` (or switching between a scheduler's two unet calls at one
            time, Heun's), ``num_inference_steps`` without them; a ``control_range``,
            residual or control key in ``cond`` or ``negative_cond``; any of these settings
            without ``controlnet``. At the first evaluation, before any call: a control image
            whose batch is neither 1 nor the state's, or whose size is not the latents' times
            the controlnet's factor.
        TypeError: for Flux, a ``guidance`` that is neither a number nor a tensor; a control
            image that is not a tensor, a scale or bound that is not a number, a
            ``guess_mode`` that is not a bool.
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
        table = _table(sched)

    guidance_scale = cond.pop("guidance_scale", None)
    negative_cond = cond.pop("negative_cond", None)
    _check_guidance(guidance_scale, negative_cond)
    _check_cond(cond, negative_cond, _FLOW_RESERVED if space == "flow" else _RESERVED)
    flux = space == "flow" and _is_flux(unet)
    if flux:
        cond, negative_cond = _check_flux_cond(unet, cond, negative_cond)

    learned_variance = False
    unet_config = getattr(unet, "config", None)
    if isinstance(unet_config, Mapping):
        _check_timestep_cond(unet_config, cond)
        c_in, c_out = unet_config.get("in_channels"), unet_config.get("out_channels")
        if isinstance(c_in, int) and isinstance(c_out, int) and c_in != c_out:
            variance_type = sched.config.get("variance_type")
            if c_out == 2 * c_in and variance_type in ("learned", "learned_range"):
                learned_variance = True
            else:
                raise ValueError(
                    f"the unet's out_channels = {c_out} differs from its in_channels = {c_in}; "
                    "bdia needs one prediction per input channel (a unet that also predicts its "
                    "variance, out_channels = 2 * in_channels, is accepted with the scheduler's "
                    "variance_type 'learned' or 'learned_range'; inpainting unets are not)"
                )

    if model_dtype is None and isinstance(unet, torch.nn.Module):
        model_dtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), None)
    if isinstance(model_dtype, str):  # a name such as "float16"; DiffusionODE checks it
        model_dtype = DTYPE_NAMES.get(model_dtype.removeprefix("torch."), model_dtype)
    if isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point:
        # The unet's attention multiplies the embeddings with its own weights, so they must
        # be in its dtype, as diffusers' pipelines pass them (float16 prompt embeddings to a
        # float16 unet); integer inputs (class labels) stay as they are, and so do Flux's
        # position ids, which the transformer reads as float32 itself.
        keep = _FLUX_IDS if flux else ()
        cond = _cast_cond(cond, model_dtype, keep)
        if negative_cond is not None:
            negative_cond = _cast_cond(negative_cond, model_dtype, keep)
    settings = dict(
        controlnet_cond=controlnet_cond,
        conditioning_scale=conditioning_scale,
        guess_mode=guess_mode,
        control_guidance_start=control_guidance_start,
        control_guidance_end=control_guidance_end,
        num_inference_steps=num_inference_steps,
    )
    control_module, _, control_cond = _control(
        controlnet, unet, sched, space, cond, negative_cond, model_dtype, settings
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
        controlnet=control_module,
    )
    ode_cond = {**cond, **control_cond}
    if guidance_scale is not None:
        ode_cond["guidance_scale"] = guidance_scale
    if negative_cond is not None:
        ode_cond["negative_cond"] = dict(negative_cond)
    return DiffusionODE(
        model,
        _schedule(table, space, clean_end),
        model_dtype=ode_dtype,
        cond=ode_cond,
        prediction="denoised" if preconditioned else prediction,
    )


def _distinct_decreasing(values: list[float]) -> list[float]:
    return sorted(set(values), reverse=True)


def _vp_time(schedule: Schedule, sigma_bar: float) -> float:
    """The VPDiscrete time of a float32 noise level, clamped onto the table within its rounding."""
    lo, hi = schedule.sigma_bar_range()
    if hi < sigma_bar <= hi * (1.0 + _SIGMA_SLACK):
        sigma_bar = hi
    elif lo * (1.0 - _SIGMA_SLACK) <= sigma_bar < lo:
        sigma_bar = lo
    return schedule.t_from_sigma_bar(sigma_bar)


def _check_timesteps_in_table(sched: Any, taus: list[float], n: int, steps: int) -> None:
    """Refuse timesteps past the noise table, where the grid would be extrapolated."""
    outside = [tau for tau in taus if not 0 <= tau <= n - 1]
    if outside:
        cfg = sched.config
        raise ValueError(
            f"num_inference_steps = {steps} gives timestep {outside[0]:g} (timestep_spacing = "
            f"{cfg.get('timestep_spacing', 'leading')!r}, steps_offset = "
            f"{cfg.get('steps_offset', 0)}), outside the noise table's timesteps 0 .. {n - 1}, "
            "where the unet was never trained; use fewer steps or steps_offset=0"
        )


def _check_sigmas_in_table(sched: Any, sigmas: list[float], table: np.ndarray, steps: int) -> None:
    """Refuse noise levels past the table's (the end point 0 aside): the unet has no timestep
    there. diffusers clamps the timestep to 0 or N - 1; bdia's grid would instead reach a
    timestep below 0 (VP space) or fail in the middle of a run (EDM space)."""
    table_sigmas = np.sqrt((1.0 - table) / table)
    lo, hi = float(table_sigmas[0]), float(table_sigmas[-1])
    outside = [
        s
        for s in sigmas
        if s != 0.0 and not lo * (1 - _SIGMA_SLACK) <= s <= hi * (1 + _SIGMA_SLACK)
    ]
    if outside:
        field = "sigma_min" if outside[0] < lo else "sigma_max"
        bound = sched.config.get(field)
        cause, fix = (
            (f" ({field} = {bound} in the scheduler config)", f"; set {field} inside it or None")
            if bound is not None
            else ("", "")
        )
        raise ValueError(
            f"num_inference_steps = {steps} gives the noise level {outside[0]:.6g}{cause}, "
            f"outside the noise table's range [{lo:.6g}, {hi:.6g}], where the unet has no "
            f"timestep{fix}"
        )


def _custom_sigmas(sigmas: Any, num_inference_steps: int | None) -> list[float]:
    """``sigmas`` as passed to ``set_timesteps(sigmas=...)``, checked: finite numbers, one a
    step."""
    try:
        values = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(
            "sigmas must be a non-empty sequence of finite numbers, one per step, as "
            "FluxPipeline passes np.linspace(1.0, 1 / n, n) to set_timesteps"
        )
    if num_inference_steps is not None and values.size != num_inference_steps:
        raise ValueError(
            f"sigmas has {values.size} values but num_inference_steps = {num_inference_steps}; "
            "give one sigma per step (or num_inference_steps=None)"
        )
    return [float(v) for v in values]


def _flow_grid(sched: Any, num_inference_steps: int | None, mu: Any, sigmas: Any = None) -> Tensor:
    """diffusers' ``sigmas`` of a flow-matching scheduler after ``set_timesteps``, widened."""
    _check_flow_config(sched)
    name = type(sched).__name__
    if sched.config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError(
                "use_dynamic_shifting = True in the scheduler config shifts the sigmas by mu, "
                "which depends on the image size; pass mu= as to set_timesteps "
                "(StableDiffusion3Pipeline takes its mu, or computes one from the latents' "
                "size with calculate_shift)"
            )
        if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
    elif mu is not None:
        raise ValueError(
            f"mu = {mu!r} shifts the sigmas only with use_dynamic_shifting = True, which the "
            f"{name} config does not set (set_timesteps would ignore it); leave mu out"
        )
    fresh = copy.deepcopy(sched)
    if sigmas is None:
        fresh.set_timesteps(num_inference_steps, mu=mu)
    else:
        fresh.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
    made = [float(v) for v in torch.as_tensor(fresh.sigmas).detach().cpu().reshape(-1)]
    ok = all(0.0 <= s <= 1.0 for s in made) and all(a > b for a, b in zip(made, made[1:]))
    if not ok or made[-1] != 0.0:
        shown = ", ".join(f"{s:.6g}" for s in made[:4]) + (", ..." if len(made) > 4 else "")
        fields = ", ".join(f"{k} = {sched.config.get(k)!r}" for k in ("shift", "shift_terminal"))
        given = "" if sigmas is None else " and the sigmas given"
        raise ValueError(
            f"the {name} config ({fields}){given} gives sigmas {shown} for "
            f"num_inference_steps = {len(made) - 1}, not decreasing from at most 1 to 0 as an "
            "ODE's times must"
        )
    return torch.tensor(made, dtype=torch.float64)


def _edm_grid(sched: Any, num_inference_steps: int) -> Tensor:
    """diffusers' ``sigmas`` of an EDM-preconditioned scheduler after ``set_timesteps``,
    widened, without a final repeat of the last one (``final_sigmas_type="sigma_min"``)."""
    _check_edm_config(sched)
    fresh = copy.deepcopy(sched)
    fresh.set_timesteps(num_inference_steps)
    made = [float(v) for v in torch.as_tensor(fresh.sigmas).detach().cpu().reshape(-1)]
    if len(made) > 1 and made[-1] > 0 and abs(made[-1] - made[-2]) <= _REPEAT_SLACK * made[-2]:
        made.pop()
    ok = all(math.isfinite(s) and s >= 0.0 for s in made) and all(
        a > b for a, b in zip(made, made[1:])
    )
    if len(made) < 2 or not ok:
        name = type(sched).__name__
        shown = ", ".join(f"{s:.6g}" for s in made[:4]) + (", ..." if len(made) > 4 else "")
        keys = ("sigma_min", "sigma_max", "final_sigmas_type")
        fields = ", ".join(f"{k} = {sched.config.get(k)!r}" for k in keys)
        why = (
            "one noise level and no step; use more steps or final_sigmas_type='zero'"
            if ok
            else "not decreasing from sigma_max as an ODE's times must; keep 0 < sigma_min < "
            "sigma_max"
        )
        raise ValueError(
            f"the {name} config ({fields}) gives sigmas {shown} for num_inference_steps = "
            f"{num_inference_steps}: {why}"
        )
    return torch.tensor(made, dtype=torch.float64)


def diffusers_grid(
    scheduler: Any,
    num_inference_steps: int | None,
    *,
    space: str | None = None,
    mu: float | None = None,
    sigmas: Any = None,
) -> Tensor:
    """The bdia time grid of the timesteps a diffusers scheduler uses for ``num_inference_steps``.

    ``set_timesteps`` runs on a deep copy of the scheduler (its own tables, float64 ones
    included), so the scheduler itself is left as it was.

    - VP space: ``t = (tau + 1) / N`` for each distinct timestep ``tau``, noisiest first, then
      the end point: ``t = 0`` (alpha = 1) when the scheduler ends there (DDIM's
      ``set_alpha_to_one=True``, ``final_sigmas_type="zero"``, DDPM), else ``t = 1 / N``
      (``alphas_cumprod[0]``). With Karras, exponential or beta sigmas or lu lambdas the
      points are the times of the scheduler's ``sigmas`` instead.
    - EDM space: the scheduler's distinct ``sigmas`` (Heun's repeated ones once), noisiest
      first; for a scheduler without sigmas, the table's at its timesteps and the end point.
    - EDM-preconditioned schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``):
      their ``sigmas`` (Karras or exponential from ``sigma_max`` to ``sigma_min``, then 0 or,
      with ``final_sigmas_type="sigma_min"``, a repeat of ``sigma_min``, a step of no length
      that the grid leaves out), exactly (diffusers' float32 values widened to float64).
    - Flow space: the scheduler's ``sigmas``, the final 0 included, exactly (diffusers'
      float32 values widened to float64): the times at which ``StableDiffusion3Pipeline``
      calls the transformer (``timesteps = sigmas * N``) and between which
      ``FlowMatchEulerDiscreteScheduler.step`` steps. Shifted, Karras, exponential or beta
      sigmas, ``shift_terminal`` and dynamic shifting (with ``mu``) come as diffusers makes
      them. ``sigmas`` are the ones a pipeline passes to ``set_timesteps`` in place of the
      scheduler's own spacing (``FluxPipeline``: ``np.linspace(1.0, 1 / n, n)``), to be
      shifted as diffusers shifts them.

    Each step goes to the next point where the model is evaluated. DDIM's own step goes from
    ``tau`` to ``tau - N // n``, which is the next timestep for ``"leading"`` spacing and for
    ``"trailing"`` when ``n`` divides ``N``, but not for ``"linspace"``; there bdia's grid is
    a consistent discretisation and diffusers' is not, and the two differ.

    Args:
        scheduler: a diffusers scheduler instance or its config mapping.
        num_inference_steps: as for diffusers' ``set_timesteps``; None with ``sigmas``
            (their number then).
        space: ``"vp"``, ``"edm"`` or ``"flow"``; the same as given to ``from_diffusers``.
        mu: the shift of a flow-matching scheduler with ``use_dynamic_shifting=True``, as
            diffusers' ``set_timesteps(mu=...)`` takes it; refused otherwise.
        sigmas: flow space only: the unshifted sigmas, one per step (a sequence or 1-D array
            of floats), as diffusers' ``set_timesteps(sigmas=...)`` takes them.

    Returns:
        float64 tensor of times (noisiest first) for the ODE that
        ``from_diffusers(unet, scheduler, space=space)`` returns.

    Raises:
        ValueError: for a timestep or a noise level outside the noise table (``steps_offset``
            with many steps; Karras sigmas past the table by the config's ``sigma_min`` or
            ``sigma_max``, unless ``timestep_type="continuous"``), where the unet has no
            timestep. In flow space: ``use_dynamic_shifting`` without ``mu`` (or ``mu``
            without it), ``invert_sigmas``, ``stochastic_sampling``, and sigmas that do not
            decrease from at most 1 to 0; ``sigmas`` that are not finite numbers or not one
            per step. ``sigmas`` outside flow space. For an EDM-preconditioned scheduler,
            algorithm_type 'sde-dpmsolver++', a sigma_data that is not a positive finite
            number, and sigmas that do not decrease (a sigma_min not below sigma_max) or leave
            no step (EDMEulerScheduler's one step with final_sigmas_type 'sigma_min').
    """
    if sigmas is None or num_inference_steps is not None:
        num_inference_steps = check_steps(num_inference_steps, "num_inference_steps")
    sched = _scheduler(scheduler)
    space = _space(sched, space)
    if space == "flow":
        if sigmas is not None:
            sigmas = _custom_sigmas(sigmas, num_inference_steps)
        return _flow_grid(sched, num_inference_steps, mu, sigmas)
    if sigmas is not None:
        raise ValueError(
            f"sigmas are the custom sigmas of a flow-matching scheduler; "
            f"{type(sched).__name__} takes none here; leave them out"
        )
    assert num_inference_steps is not None  # checked above, sigmas being None
    if mu is not None:
        raise ValueError(
            f"mu is the shift of a flow-matching scheduler's dynamic shifting; "
            f"{type(sched).__name__} takes none; leave it out"
        )
    if _is_preconditioned(sched):
        return _edm_grid(sched, num_inference_steps)
    _check_schedule_config(sched, space)
    table = _table(sched)
    n = table.size
    clean_end = _clean_end(sched) if space == "vp" else True
    fresh = copy.deepcopy(sched)
    fresh.set_timesteps(num_inference_steps)
    # BDIAInverseScheduler iterates part of its grid backward; forward_timesteps make the grid.
    timesteps = getattr(fresh, "forward_timesteps", fresh.timesteps)
    taus = [float(v) for v in torch.as_tensor(timesteps).reshape(-1).tolist()]
    sigmas = getattr(fresh, "sigmas", None)
    sigmas = None if sigmas is None else [float(v) for v in torch.as_tensor(sigmas).reshape(-1)]
    from_sigmas = sigmas is not None and any(sched.config.get(f, False) for f in _SIGMA_SPACINGS)

    if (space == "vp" and not from_sigmas) or (space == "edm" and sigmas is None):
        _check_timesteps_in_table(sched, taus, n, num_inference_steps)
    elif sigmas is not None and not _continuous(sched.config):
        # A continuous timestep, 0.25 log(sigma), exists at every noise level.
        _check_sigmas_in_table(sched, sigmas, table, num_inference_steps)
    if space == "vp":
        schedule = _schedule(table, space, clean_end)
        end = 0.0 if clean_end else 1.0 / n
        if from_sigmas:
            assert sigmas is not None  # from_sigmas needs them
            times = [end if s == 0.0 else _vp_time(schedule, s) for s in sigmas]
        else:
            times = [(tau + 1.0) / n for tau in taus] + [end]
        times = _distinct_decreasing(times)
    else:
        if sigmas is None:
            table_sigmas = np.sqrt((1.0 - table) / table)
            sigmas = [float(np.interp(tau, np.arange(n), table_sigmas)) for tau in taus]
            sigmas.append(0.0 if _clean_end(sched) else float(table_sigmas[0]))
        times = _distinct_decreasing(sigmas)
    return torch.tensor(times, dtype=torch.float64)
