"""BDIA as diffusers schedulers: ``BDIAScheduler`` samples, ``BDIAInverseScheduler`` inverts.

``BDIAScheduler`` drops into a diffusers pipeline in place of its DDIM-type scheduler, of
the ``FlowMatchEulerDiscreteScheduler`` of Stable Diffusion 3, Flux or Qwen-Image, or of the
EDM-preconditioned scheduler of Playground v2.5 (``EDMDPMSolverMultistepScheduler``,
``EDMEulerScheduler``; BDIA over Euler in both)::

    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    image = pipe(...).images
    pair = pipe.scheduler.final_pair        # the exact input of the inversion

Each ``step`` is the library's own update: the model output the pipeline passes in is replayed
through a ``DiffusionODE`` built by ``from_diffusers`` (the same eps / x0 / v conversion as
``bdia.sample``), and ``BidirectionalWrapper.step`` takes the step on the grid of
``diffusers_grid`` (its one evaluation per step is the replayed output). So a pipeline run
gives the numbers of ``bdia.sample(from_diffusers(unet, scheduler), bdia.bdia("ddim", gamma),
noise, diffusers_grid(scheduler, n))``, bit for bit (``bdia.bdia("euler", gamma)`` and the
transformer for flow matching; ``bdia.bdia("euler", gamma)`` from ``noise *
init_noise_sigma`` with an EDM-preconditioned scheduler, whose unet input ``c_in x`` and
timesteps ``0.25 log sigma`` the scheduler makes as the adapter does).

The scheduler keeps the solver's ``SolverState`` between calls (the two-step recursion's
previous state and both low words live in it); the pipeline only ever sees the state's high
word. ``BDIAInverseScheduler`` runs the recursion backward from ``final_pair`` with the same
unet calls, and returns the starting noise to rounding (exactly, in the tests).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from ...ode import DiffusionODE, Evaluation
from ...pairs import StatePair, check_solver, check_times, stamped
from ...sampling import _pair
from ...schedules import check_steps
from ...solvers.base import SolverState
from ...solvers.bidirectional import NAMED_GAMMAS, BidirectionalWrapper
from ...solvers.registry import bdia
from ._scheduler_config import (
    _EDM_PRECONDITIONED,
    _EDM_PREDICTIONS,
    _check_edm_config,
    _check_model_config,
    _check_schedule_config,
    _flow_sigmas_refusal,
    _no_table,
    _table,
)
from .adapter import DiffusersModel, from_diffusers
from .grid import diffusers_grid


def _init_fields(cls: Any) -> tuple[str, ...]:
    """The config fields of a diffusers scheduler class: its ``__init__``'s parameters."""
    return tuple(k for k in inspect.signature(cls.__init__).parameters if k != "self")


# The FlowMatchEulerDiscreteScheduler fields, which a flow-matching BDIA scheduler keeps in
# its config (as fields of another class) and builds its sigmas from.
_FLOW_FIELDS = _init_fields(FlowMatchEulerDiscreteScheduler)

# The fields of each EDM-preconditioned scheduler, which an EDM-mode BDIA scheduler keeps in
# its config and builds that scheduler from (for its sigmas, timesteps and init_noise_sigma).
_EDM_FIELDS = {name: _init_fields(getattr(diffusers, name)) for name in _EDM_PRECONDITIONED}

# A timestep the ODE gives the replayed unet in EDM mode, c_noise = 0.25 log sigma, is the
# scheduler's float32 one to this relative slack (times max(1, |c_noise|)): equal in float32,
# and a float64 state's c_noise is within a float32 rounding and the float32 log's error of it
# (5.7e-8 at most over Playground v2.5's 50 sigmas), while neighbouring grid points lie far
# apart (0.0014 at the least, at 1000 Karras steps from 80 to 0.002).
_C_NOISE_SLACK = 1e-6

__all__ = [
    "BDIAScheduler",
    "BDIAInverseScheduler",
    "BDIASchedulerOutput",
    "BDIASchedulerPair",
    "BDIARestartWarning",
]

# The fields that make a noise table; every scheduler that has one holds them in its config.
_BETA_FIELDS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")

# The DDIMScheduler fields that make its noise table and its timesteps.
_DDIM_FIELDS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


@dataclass
class BDIASchedulerOutput(BaseOutput):
    """What ``step`` returns.

    Attributes:
        prev_sample: the next state to feed the unet, in the dtype of the ``sample`` passed in
            (the high word of the scheduler's state).
        pred_original_sample: the model's x0 prediction at this step, same dtype.
    """

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


# eq=False keeps StatePair's comparison by value (a generated __eq__ would compare tuples of
# tensors, which raises) and its refusal to hash.
@dataclass(frozen=True, eq=False)
class BDIASchedulerPair(StatePair):
    """``BDIAScheduler.final_pair``: a ``StatePair`` that also records where the run began and
    where it stopped.

    Attributes:
        start_index: the index in ``timesteps`` (and in ``grid``) of the run's first step, or
            of its last restart: where its recursion began. A text-to-image run starts at 0;
            img2img with ``strength < 1`` starts later. ``BDIAInverseScheduler.begin`` stops
            the inversion there, so that ``inverse.pair.earlier`` is the state the run started
            from (the noised image latents, for img2img).
        end_index: the index in ``grid`` of ``later``, where the run stopped: the grid's end
            (``len(grid) - 1``), or earlier for a run cut short (SDXL's base with
            ``denoising_end``); None stands for the grid's end. ``BDIAInverseScheduler.begin``
            inverts from there.
    """

    start_index: int = 0
    end_index: int | None = None


torch.serialization.add_safe_globals([BDIASchedulerPair])  # see bdia.pairs: torch.load


class BDIARestartWarning(UserWarning):
    """``BDIAScheduler.step`` got a sample or timestep that does not continue its recursion."""


def _check_gamma(gamma: Any) -> float | str:
    if isinstance(gamma, str):
        if gamma not in NAMED_GAMMAS:
            raise ValueError(
                f"gamma = {gamma!r} is not a named schedule; give a number in (0, 1] or one of "
                f"{', '.join(repr(n) for n in NAMED_GAMMAS)}"
            )
        return gamma
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a number in (0, 1], got {gamma!r}")
    g = float(gamma)
    if not (math.isfinite(g) and 0.0 < g <= 1.0):
        raise ValueError(
            f"gamma = {gamma} lies outside (0, 1]: 0 is the base step alone (DDIM, or Euler for "
            "flow-matching and EDM configs), which cannot be inverted, and above 1 the "
            "recursion grows; 0.96 is the usual value"
        )
    return g


def _comparable(value: Any) -> Any:
    """A config value in a form that ``==`` compares whole (trained_betas may be an array)."""
    if isinstance(value, (Tensor, np.ndarray)):
        return tuple(np.asarray(value, dtype=np.float64).reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    return value


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, Tensor):
        values = timestep.detach().reshape(-1).cpu().unique()
        if values.numel() != 1:
            raise ValueError(
                f"timestep must be one value (shared by the batch), got {timestep.tolist()}"
            )
        return float(values[0])
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
    return float(timestep)


def _entries_read(timesteps: Any) -> tuple[Tensor, int, list[float]] | None:
    """``timesteps`` (a 1-D tensor), its version counter and its values read once on the
    host; None for anything else."""
    if type(timesteps) is not Tensor or timesteps.ndim != 1 or timesteps.device.type == "meta":
        return None
    return timesteps, timesteps._version, [float(v) for v in timesteps.detach().cpu().tolist()]


def _entry_value(timestep: Any, entries: tuple[Tensor, int, list[float]] | None) -> float | None:
    """The value of ``timestep`` when it is one entry of the tensor ``entries`` read (a
    pipeline's ``for t in scheduler.timesteps``, or of a slice of them), unchanged since;
    else None.

    Found from where the entry sits in the tensor's memory, so a step given such an entry
    does not wait for the device to read it back.
    """
    if entries is None or type(timestep) is not Tensor or timestep.numel() != 1:
        return None
    tensor, version, values = entries
    if (
        tensor._version != version  # written in place since (a view's writes count too)
        or timestep.dtype != tensor.dtype
        or timestep.device != tensor.device
        or timestep.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    ):
        return None
    offset, stride = timestep.storage_offset() - tensor.storage_offset(), tensor.stride(0)
    if stride < 1 or offset % stride:
        return None
    index = offset // stride
    return values[index] if 0 <= index < len(values) else None


def _flow_source(config: Any) -> bool:
    """Whether ``config`` is a flow-matching scheduler's: ``shift`` and no beta field (SD3's
    and Flux's ``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``)."""
    return (
        isinstance(config, Mapping)
        and "shift" in config
        and not any(k in config for k in _BETA_FIELDS)
    )


def _edm_source(config: Any) -> str | None:
    """The EDM-preconditioned scheduler whose config ``config`` is (``EDMEulerScheduler``,
    ``EDMDPMSolverMultistepScheduler``: Playground v2.5's), or None.

    No beta field, and the class it names (``_class_name``, in a config read from disk), else
    fields all of that class with ``sigma_data`` among them (a scheduler's ``.config`` holds
    every field). A DPM-Solver config must hold ``algorithm_type``: without it its fields are
    also those of ``CosineDPMSolverMultistepScheduler`` (Stable Audio), whose preconditioning
    is another.
    """
    if not isinstance(config, Mapping) or any(k in config for k in _BETA_FIELDS):
        return None
    name = config.get("_class_name")
    if name is not None:
        return name if name in _EDM_PRECONDITIONED else None
    keys = {k for k in config if not k.startswith("_")}
    if "sigma_data" not in keys:
        return None
    if keys <= set(_EDM_FIELDS["EDMEulerScheduler"]):
        return "EDMEulerScheduler"
    if keys <= set(_EDM_FIELDS["EDMDPMSolverMultistepScheduler"]) and "algorithm_type" in keys:
        return "EDMDPMSolverMultistepScheduler"
    return None


def _check_source_config(config: Any, own: Any) -> None:
    """Refuse the config of a diffusers scheduler that has no noise table of betas.

    A config without the beta fields that is neither a flow-matching nor an EDM-preconditioned
    one (which set their modes): a consistency model's ``CMStochasticIterativeScheduler``'s,
    say, or Stable Audio's ``CosineDPMSolverMultistepScheduler``'s, would keep only
    ``num_train_timesteps`` in ``from_config`` and fill in DDIM's default betas: the pipeline
    would then sample its model on a VP table it was never trained on, without a word. Such a
    config is known by fields of its own and no beta field (a scheduler's ``.config`` does not
    hold ``_class_name``; one read from disk does). ``own`` are this class's config fields.
    """
    if not isinstance(config, Mapping) or any(k in config for k in _BETA_FIELDS):
        return
    foreign = sorted(k for k in config if not k.startswith("_") and k not in own)
    if foreign:
        name = config.get("_class_name")
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise _no_table(
            name if isinstance(name, str) else f"the scheduler config (no betas; {shown})"
        )


def _table_attribute(name: str) -> property:
    """DDIMScheduler's noise-table attribute ``name``, of the config as it is now."""

    def get(self: _BDIASchedulerBase) -> Tensor:
        self._sync()
        if self._flow or self._edm is not None:
            raise AttributeError(name)  # no noise table (ConfigMixin words the message)
        return getattr(self._inner, name)

    return property(get, doc=f"DDIMScheduler's ``{name}`` for the current config.")


def _recorded_index(pair: Any, field: str, given: Any, default: int, what: str, fix: str) -> int:
    """``given``, else the index the pair records as ``field``, else ``default``: refused
    where ``given`` contradicts the pair's, or is not an int."""
    recorded = getattr(pair, field, None)
    if given is None:
        given = default if recorded is None else recorded
    elif recorded is not None and recorded != given:
        raise ValueError(
            f"{field} = {given}, but the pair records that its run {what} {recorded}; "
            f"leave {field} out to {fix}"
        )
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):
        raise TypeError(f"{field} must be an int, got {given!r}")
    return int(given)


class _Replay:
    """The "unet" of the scheduler's ODE: returns the output the pipeline passed to ``step``.

    ``from_diffusers`` wraps it, so the output goes through the adapter and
    ``DiffusionODE.evaluate`` exactly as a real unet's does in ``bdia.sample``. It checks the
    timestep it is called with against the one the output is for, in Python: the adapter
    hands it the timestep on the host.
    """

    reads_timestep_on_host = True

    def __init__(self) -> None:
        self.output: Tensor | None = None
        self.timestep: float | None = None
        self.slack = 0.0  # how far the ODE's timestep may lie from it (see _C_NOISE_SLACK)

    def __call__(
        self,
        x: Tensor | None = None,
        timestep: Tensor | None = None,
        *,
        hidden_states: Tensor | None = None,
        return_dict: bool = True,
    ) -> Tensor:
        # Called as a unet (x, timestep) or, in flow space, as SD3's transformer (keywords).
        assert timestep is not None
        out, self.output = self.output, None
        if out is None:
            raise RuntimeError("BDIA scheduler: the replayed model was called twice in one step")
        assert self.timestep is not None  # armed with the output
        if not bool(((timestep - self.timestep).abs() <= self.slack).all()):
            raise RuntimeError(
                f"BDIA scheduler: the ODE asked for timestep {timestep.tolist()}, but the model "
                f"output is for {self.timestep}"
            )
        return out


# diffusers declares config_name a str in SchedulerMixin and None in ConfigMixin; its own
# schedulers combine the two the same way.
class _BDIASchedulerBase(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """Config, noise table, grid and the replayed evaluation, shared by both directions."""

    # SD3's flow-matching scheduler and the EDM-preconditioned ones too: their fields then stay
    # in the config without a warning.
    _compatibles = [
        *(e.name for e in KarrasDiffusionSchedulers),
        "FlowMatchEulerDiscreteScheduler",
        *_EDM_PRECONDITIONED,
    ]
    order = 1
    _state: SolverState | None  # the solver's state of a run, None before it (see _reset)
    _timestep_entries: tuple[Tensor, int, list[float]] | None = None  # see _entry_value
    # The last sample handed to the pipeline, its version counter then, and the state it is
    # a copy of: given back unwritten, it is that state without comparing them on the device.
    _handed_out: tuple[Tensor, int, SolverState | None] | None = None

    @property
    def timesteps(self) -> Tensor:
        """The timesteps at which the pipeline calls its unet and ``step``, in order."""
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value: Tensor) -> None:
        self._timesteps = value
        self._timestep_entries = _entries_read(value)

    @classmethod
    def from_config(  # type: ignore[override]
        cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """diffusers' ``from_config``, refusing the config of a class without a noise table
        (a consistency model's), which would otherwise take DDIM's default betas, and a grid
        field bdia cannot follow (``use_flow_sigmas``, say) at once, not at ``set_timesteps``.
        A flow-matching config (SD3's ``FlowMatchEulerDiscreteScheduler``) sets
        ``flow_matching=True``; an EDM-preconditioned one (``EDMEulerScheduler``,
        ``EDMDPMSolverMultistepScheduler``) sets ``edm_scheduler`` to its class's name, and
        ``kwargs`` may then set that class's fields too (``algorithm_type="dpmsolver++"``)."""
        own = inspect.signature(cls.__init__).parameters
        if isinstance(config, Mapping) and config.get("use_flow_sigmas", False):
            # Named before its prediction_type ("flow_prediction"), which DDIM mode would refuse.
            name = config.get("_class_name")
            raise _flow_sigmas_refusal(name if isinstance(name, str) else "scheduler", config)
        edm = _edm_source(config)
        if _flow_source(config) and kwargs.get("flow_matching", True):
            # Every field, defaults included: StableDiffusion3Pipeline reads some from the
            # scheduler's config (max_shift, for dynamic shifting) with defaults of its own.
            full = FlowMatchEulerDiscreteScheduler.from_config(config).config
            config = {k: v for k, v in full.items() if k != "_use_default_values"}
            kwargs["flow_matching"] = True
        elif edm is not None and kwargs.get("edm_scheduler", edm) is not None:
            # Every field, defaults included (init_noise_sigma reads sigma_max), as the EDM
            # scheduler has them, with the ones given here.
            fields = {k: kwargs[k] for k in _EDM_FIELDS[edm] if k in kwargs}
            kwargs = {k: v for k, v in kwargs.items() if k in own or k not in fields}
            full = getattr(diffusers, edm).from_config(config, **fields).config
            config = {k: v for k, v in full.items() if k != "_use_default_values"}
            kwargs["edm_scheduler"] = edm
        else:
            _check_source_config(config, own)
        built = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        # Fields that are not ours reach the config only after __init__, which checked it.
        scheduler = built[0] if isinstance(built, tuple) else built
        scheduler._sync()
        return built

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = False,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        variance_type: str = "fixed_small",
        gamma: float | str = 0.96,
        flow_matching: bool = False,
        edm_scheduler: str | None = None,
    ) -> None:
        self._replay = _Replay()
        self._configured: dict[str, Any] | None = None  # the config the internals were built for
        self._sync()
        self.num_inference_steps: int | None = None
        self.timesteps = self._inner.timesteps.clone()
        self.grid: list[float] | None = None
        self._taus: list[float] = []
        self._built_for: dict[str, Any] | None = None  # the config set_timesteps used
        self._begin_index: int | None = None  # set_begin_index's, until set_timesteps
        self._reset()

    def _config_snapshot(self) -> dict[str, Any]:
        return {k: _comparable(v) for k, v in self.config.items() if not k.startswith("_")}

    def _sync(self) -> None:
        """Build the internal DDIMScheduler, ODE and solver from ``self.config`` if it changed.

        The config can change after ``__init__``: StableDiffusionPipeline rewrites
        ``steps_offset`` (and ``clip_sample``) in place, and ``register_to_config`` replaces
        fields. Internals built once at ``__init__`` would then step on other timesteps than
        a scheduler built from the config, such as the inverse, and invert to the wrong noise.
        """
        snapshot = self._config_snapshot()
        if snapshot == self._configured:
            return
        cfg = self.config
        self._gamma = _check_gamma(cfg["gamma"])
        self._flow = bool(cfg.get("flow_matching", False))
        self._edm: str | None = cfg.get("edm_scheduler")
        if self._edm is not None and (self._flow or self._edm not in _EDM_PRECONDITIONED):
            raise ValueError(
                f"edm_scheduler = {self._edm!r} (with flow_matching = {self._flow}) is not an "
                f"EDM-preconditioned scheduler bdia maps ({', '.join(_EDM_PRECONDITIONED)}, "
                "without flow_matching); build the scheduler with from_config from that "
                "scheduler's config, which sets it"
            )
        if self._flow:
            if self._gamma == "obelm":
                raise ValueError(
                    "gamma = 'obelm' takes its gammas from noise-level differences, and its "
                    "first tends to 0 on a flow-matching grid, which starts at pure noise; "
                    "give a number in (0, 1]"
                )
            # FlowMatchEulerDiscreteScheduler makes the sigmas and timesteps; from_diffusers
            # refuses its fields that are no ODE (stochastic_sampling, invert_sigmas).
            fields = {k: cfg[k] for k in _FLOW_FIELDS if k in cfg}
            inner: Any = FlowMatchEulerDiscreteScheduler(**fields)
            base = "euler"
        elif self._edm is not None:
            # One-line refusals naming this class (prediction_type, thresholding,
            # algorithm_type, sigma_data), as from_diffusers gives them for the EDM scheduler,
            # which makes the sigmas, the timesteps c_noise and init_noise_sigma.
            _check_model_config(self, _EDM_PREDICTIONS)
            _check_edm_config(self)
            source = getattr(diffusers, self._edm)
            inner = source(**{k: cfg[k] for k in _EDM_FIELDS[self._edm] if k in cfg})
            base = "euler"
        else:
            # One-line refusals naming this class (clip_sample, thresholding,
            # prediction_type, timestep_spacing), as from_diffusers gives them.
            _check_model_config(self)
            _check_schedule_config(self, "vp")
            # DDIMScheduler makes the noise table and the timesteps; the adapter reads them.
            fields = {k: cfg[k] for k in _DDIM_FIELDS}
            inner = DDIMScheduler(**fields, clip_sample=False, thresholding=False)
            _table(inner)  # a zero-SNR table with an epsilon model is refused here, by name
            base = "ddim"
        self._ode: DiffusionODE = from_diffusers(self._replay, inner)
        model = self._ode.f
        assert isinstance(model, DiffusersModel)  # from_diffusers makes one
        self._model = model  # its preconditioning makes scale_model_input's c_in x
        self._inner = inner
        self._solver: BidirectionalWrapper = bdia(base, self._gamma)
        self._configured = snapshot

    betas = _table_attribute("betas")
    alphas = _table_attribute("alphas")
    alphas_cumprod = _table_attribute("alphas_cumprod")
    final_alpha_cumprod = _table_attribute("final_alpha_cumprod")

    def _reset(self) -> None:
        """Forget the state of a run."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The index in ``timesteps`` of the run's first step, as the pipelines that call it
        set it (FluxPipeline with 0; StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline
        and QwenImageImg2ImgPipeline with ``t_start``, before ``scale_noise``). Each step
        finds its index from its timestep; ``scale_noise`` (``add_noise`` in EDM mode) checks
        its timestep against this one."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral):
            raise TypeError(f"begin_index must be an int, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the first state, ``noise * init_noise_sigma``, as pipelines make it:
        1 (VP and flow-matching states start as unit noise); in EDM mode the EDM
        scheduler's ``sqrt(sigma_max^2 + 1)`` (80.006 for Playground v2.5), which diffusers
        takes at the grid's first sigma (80)."""
        self._sync()
        return float(self._inner.init_noise_sigma) if self._edm is not None else 1.0

    @property
    def sigmas(self) -> Tensor:
        """Flow matching and EDM mode only: the inner FlowMatchEulerDiscreteScheduler's or EDM
        scheduler's ``sigmas`` (float32, the grid's points and, in EDM mode with
        ``final_sigmas_type="sigma_min"``, a repeat of the last) for the last
        ``set_timesteps``, as those pipelines read them."""
        self._sync()
        if not self._flow and self._edm is None:
            raise AttributeError("sigmas")  # DDIM keeps none (ConfigMixin words the message)
        return self._inner.sigmas

    @property
    def sigma_min(self) -> float:
        """Flow matching only: the inner FlowMatchEulerDiscreteScheduler's smallest sigma,
        where its own spacing ends. Setting it is refused: ZImagePipeline and its kin in
        diffusers 0.36 to 0.38 set it to 0 and run the scheduler's own spacing to 0, with a
        last step of no length, which this scheduler does not follow."""
        self._sync()
        if not self._flow:
            raise AttributeError("sigma_min")
        return float(self._inner.sigma_min)

    @sigma_min.setter
    def sigma_min(self, value: Any) -> None:
        raise ValueError(
            f"the pipeline set the scheduler's sigma_min to {value!r}, as the Z-Image pipelines "
            f"of diffusers 0.36 to 0.38 (here {diffusers.__version__}) do; {type(self).__name__} "
            "does not follow their spacing: use diffusers 0.39 or newer for Z-Image"
        )

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The unet's input: ``sample`` itself for VP and flow-matching states; in EDM mode
        ``c_in x``, as the EDM schedulers' ``scale_model_input`` (and the adapter) make it.

        In EDM mode ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` at the sigma of ``timestep``
        multiplies ``x`` in the state dtype (float32 at least) and the product is cast to
        ``sample``'s dtype, as ``from_diffusers``' model does it. ``x`` is the scheduler's own
        state where ``sample`` is that state's high word cast down (a half-precision
        pipeline's latents, repeated for guidance's batch), else ``sample`` widened.

        Args:
            sample: the latents, shape ``(batch, C, H, W)`` (twice the batch under guidance),
                any float dtype.
            timestep: an entry of ``timesteps``; needed in EDM mode.

        Returns:
            A tensor of ``sample``'s shape and dtype.
        """
        self._sync()
        if self._edm is None:
            return sample
        if not isinstance(sample, Tensor):
            raise TypeError(f"sample must be a tensor, got {type(sample).__name__}")
        if timestep is None:
            raise ValueError(
                "scale_model_input needs the timestep in EDM mode (c_in depends on sigma); "
                "call scale_model_input(sample, t) with t from timesteps"
            )
        k = self._index(timestep, "scale_model_input")
        x = self._wide_sample(sample, k)
        # Filled on the device, not copied there: a copy from the host would wait for it.
        sigma = torch.full((), self._grid()[k], dtype=x.dtype, device=x.device)
        return (x * self._model._c_in(sigma)).to(sample.dtype)

    def _wide_sample(self, sample: Tensor, k: int) -> Tensor:
        """``sample`` in the state dtype: the state at grid index ``k`` where ``sample`` is its
        high word cast down, repeated along the batch (guidance), else ``sample`` widened.

        A half-precision pipeline's latents are the state cast down; the ODE of ``bdia.sample``
        gives its model the state itself, so the unet's input is formed from it here too.
        """
        wide = self._state_dtype(sample)
        state = self._state
        if sample.dtype == wide or state is None or state.k != k:
            return sample.to(wide)
        x = state.x
        b, m = x.shape[0], sample.shape[0] // max(x.shape[0], 1)
        if (
            x.dtype != wide
            or sample.shape[1:] != x.shape[1:]
            or sample.device != x.device
            or m * b != sample.shape[0]
        ):
            return sample.to(wide)
        whole = x.repeat(m, *(1,) * (x.ndim - 1))
        # Chosen on the device: reading the comparison back would make the host wait for it.
        same = (sample == whole.to(sample.dtype)).all()
        return torch.where(same, whole, sample.to(wide))

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha x0 + sigma noise`` at ``timesteps`` (DDIM's), for img2img-style pipelines;
        in EDM mode the EDM schedulers' ``x0 + sigma noise`` (see below); under
        ``flow_matching``, ``scale_noise`` instead.

        In EDM mode, with that scheduler's float operations (``sigmas`` cast to
        ``original_samples``' dtype and device, given its rank, then the sum), so the result
        is its own bit for bit. The sigma is the one of each timestep given (one for the
        batch, or one a sample); after ``set_begin_index`` and before the first step it must
        be ``timesteps[begin_index]``, which the EDM schedulers would take whatever the
        timestep (``StableDiffusionXLImg2ImgPipeline`` passes that one).

        Raises:
            ValueError: under ``flow_matching``; in EDM mode, for a noise of another shape
                than the samples', before ``set_timesteps``, for a timestep that is not in
                ``timesteps`` or, after ``set_begin_index`` and before the first step, is not
                ``timesteps[begin_index]``.
        """
        self._sync()
        if self._flow:
            raise ValueError(
                "add_noise is DDIM's forward process; a flow-matching BDIA scheduler noises "
                "with scale_noise(sample, timestep, noise), as StableDiffusion3Img2ImgPipeline "
                "and FluxImg2ImgPipeline call it"
            )
        if self._edm is None:
            return self._inner.add_noise(original_samples, noise, timesteps)
        self._check_noise_args("add_noise", original_samples, noise)
        values = timesteps.reshape(-1) if isinstance(timesteps, Tensor) else [timesteps]
        if len(values) == 0:
            raise ValueError("add_noise: timesteps is empty; pass one per sample (or one)")
        indices = [self._noise_index(t, "add_noise") for t in values]
        sigmas = self._inner.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[indices].flatten()
        while sigma.ndim < original_samples.ndim:
            sigma = sigma.unsqueeze(-1)
        return original_samples + noise * sigma

    def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor) -> Tensor:
        """Flow matching only: ``sigma * noise + (1 - sigma) * sample`` at the sigma of
        ``timestep``, FlowMatchEulerDiscreteScheduler's forward process, which
        StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline and QwenImageImg2ImgPipeline
        call to noise the image latents to their first timestep.

        The same float operations as that scheduler's: ``sigmas`` cast to ``sample``'s dtype
        and device, then the sum, so the result is its own bit for bit (in ``sample``'s
        dtype, or the promotion of ``sample``'s and ``noise``'s).

        Args:
            sample: the clean latents, any shape (the pipelines pass ``(batch, channels, h,
                w)``, QwenImageImg2ImgPipeline ``(batch, 1, channels, h, w)``; both Flux's
                and Qwen-Image's pack the result afterwards).
            timestep: an entry of ``timesteps``, a number or a tensor of one value (the
                pipelines repeat it over the batch).
            noise: a tensor of ``sample``'s shape.

        Raises:
            ValueError: without ``flow_matching`` (use ``add_noise``), for a noise of
                another shape than the sample's, before
                ``set_timesteps``, for a timestep that is not in ``timesteps``, or for one
                that is not ``timesteps[begin_index]`` after ``set_begin_index`` and before
                the first step (FlowMatchEulerDiscreteScheduler would take the sigma at
                ``begin_index`` whatever the timestep).
        """
        self._sync()
        if not self._flow:
            kind = "is EDM-preconditioned" if self._edm is not None else "has a noise table"
            raise ValueError(
                f"scale_noise is the flow-matching forward process; this BDIA scheduler {kind}: "
                "noise with add_noise(original_samples, noise, timesteps)"
            )
        self._check_noise_args("scale_noise", sample, noise)
        k = self._noise_index(timestep, "scale_noise")
        sigma = self._inner.sigmas.to(device=sample.device, dtype=sample.dtype)[k]
        # Of sample's rank, as that scheduler's: a 0-d sigma would promote like a Python
        # number, and float32 latents with float16 noise would come out float16.
        sigma = sigma.reshape((1,) * sample.ndim)
        return sigma * noise + (1.0 - sigma) * sample

    @staticmethod
    def _check_noise_args(caller: str, sample: Any, noise: Any) -> None:
        for name, value in (("sample", sample), ("noise", noise)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{caller}: {name} must be a tensor, got {type(value).__name__}")
        if noise.shape != sample.shape:
            raise ValueError(
                f"{caller}: noise has shape {tuple(noise.shape)} but the sample has shape "
                f"{tuple(sample.shape)}; draw the noise in the sample's shape"
            )

    def _noise_index(self, timestep: Any, caller: str) -> int:
        """The index of the timestep at which ``caller`` noises; before the first step, after
        ``set_begin_index``, that index (diffusers' schedulers take its sigma whatever the
        timestep)."""
        k = self._index(timestep, caller)
        begin = self._begin_index
        if begin is not None and self._state is None and k != begin:
            raise ValueError(
                f"{caller}: timestep {self._taus[k]} is timesteps[{k}], but set_begin_index "
                f"set the run's start at index {begin}; pass timesteps[{begin}], where the "
                "pipeline's first step is"
            )
        return k

    def _build(
        self,
        num_inference_steps: int | None,
        device: Any,
        mu: float | None = None,
        sigmas: Any = None,
    ) -> None:
        """The inner scheduler's timesteps for ``num_inference_steps`` (or ``sigmas``) and the
        bdia grid through them."""
        self._sync()
        if self._flow:
            if not self.config.get("use_dynamic_shifting", False):
                # FluxPipeline passes its mu whatever the config; the flow-matching scheduler
                # ignores it without dynamic shifting, and so does its stand-in.
                mu = None
            # diffusers_grid first: it refuses a missing mu, bad sigmas or steps in one line.
            times = diffusers_grid(self._inner, num_inference_steps, mu=mu, sigmas=sigmas)
            steps = len(times) - 1
            self._inner.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
            taus = [float(v) for v in self._inner.timesteps]
            self._set_grid(steps, taus, [float(t) for t in times])
            return
        kind = "is EDM-preconditioned" if self._edm is not None else "has a noise table"
        if sigmas is not None:
            raise ValueError(
                "sigmas: a flow-matching BDIA scheduler takes custom sigmas, but this one "
                f"{kind} and takes none; leave them out"
            )
        # Checked before DDIM sees it: DDIM divides by it (ZeroDivisionError for 0).
        num_inference_steps = check_steps(num_inference_steps, "num_inference_steps")
        if mu is not None:
            raise ValueError(
                "mu is the shift of a flow-matching scheduler's dynamic shifting; this BDIA "
                f"scheduler {kind} and takes none; leave it out"
            )
        if self._edm is not None:
            # diffusers_grid first: it refuses sigmas that leave no step in one line. The
            # timesteps are the EDM scheduler's float32 c_noise = 0.25 log sigma; with a final
            # repeat of sigma_min the grid has one point fewer than the sigmas, and the last
            # timestep sits on its end (a step that moves nothing, as diffusers' nearly does).
            grid = [float(t) for t in diffusers_grid(self._inner, num_inference_steps).tolist()]
            self._inner.set_timesteps(num_inference_steps, device=device)
            taus = [float(v) for v in self._inner.timesteps.cpu().tolist()]
            self._set_grid(num_inference_steps, taus, grid)
            return
        self._inner.set_timesteps(num_inference_steps, device=device)
        taus = [int(v) for v in self._inner.timesteps.cpu().tolist()]
        if len(set(taus)) != len(taus):
            raise ValueError(
                f"num_inference_steps = {num_inference_steps} repeats timesteps under "
                f"timestep_spacing = {self.config['timestep_spacing']!r}; use fewer steps"
            )
        grid = [float(t) for t in diffusers_grid(self._inner, num_inference_steps).tolist()]
        n = self.config["num_train_timesteps"]
        # The grid's first points are the timesteps' times; one more is the end point unless
        # the last timestep sits on it (leading spacing, no offset, set_alpha_to_one=False:
        # DDIM's last step from timestep 0 to alphas_cumprod[0] changes nothing).
        if grid[: len(taus)] != [(tau + 1.0) / n for tau in taus][: len(grid)] or len(grid) < 2:
            raise ValueError(
                f"num_inference_steps = {num_inference_steps} gives the grid {grid}, which "
                "does not run through the timesteps: nothing to integrate"
            )
        self._set_grid(num_inference_steps, taus, grid)

    def _set_grid(self, num_inference_steps: int, taus: Sequence[float], grid: list[float]) -> None:
        self.num_inference_steps = num_inference_steps
        self.grid = grid
        self._taus = list(taus)
        self._built_for = self._configured
        self._begin_index = None  # FlowMatchEulerDiscreteScheduler forgets it here too
        self._reset()

    def _grid(self) -> list[float]:
        """``grid``, where set_timesteps has made it (the caller has checked)."""
        assert self.grid is not None
        return self.grid

    def _index(self, timestep: Any, caller: str = "step") -> int:
        if self.grid is None:
            raise ValueError(
                f"{type(self).__name__}.{caller} was called before set_timesteps; call "
                "set_timesteps(num_inference_steps) first"
            )
        now, then = self._config_snapshot(), self._built_for
        assert then is not None  # set_timesteps records it with the grid
        if now != then:
            changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
            raise ValueError(
                f"the scheduler's config changed after set_timesteps ({', '.join(changed)}); "
                "call set_timesteps again so that the steps follow it"
            )
        value = _entry_value(timestep, self._timestep_entries)
        if value is None:
            value = _timestep_value(timestep)
        if value in self._taus:
            return self._taus.index(value)
        shown = self._taus if len(self._taus) <= 12 else [*self._taus[:6], "...", *self._taus[-3:]]
        raise ValueError(
            f"timestep {value:g} is not in this schedule's timesteps {shown}; step with the "
            "timesteps that set_timesteps made"
        )

    def _replayed(self, model_output: Tensor, k: int, x: Tensor, move: Callable[[], Any]) -> Any:
        """``move()`` with the model output armed as the one evaluation at ``(grid[k], x)``.

        ``move`` is one solver move from grid point ``k`` (or the bare evaluation there); it
        must evaluate the ODE exactly once, at ``(grid[k], x)``: a second call, or none, is
        an error.
        """
        if not isinstance(model_output, Tensor):
            raise TypeError(f"model_output must be a tensor, got {type(model_output).__name__}")
        channels = x.shape[1] if x.ndim > 1 else None
        if (
            self.config["variance_type"] in ("learned", "learned_range")
            and channels is not None
            and model_output.ndim == x.ndim
            and model_output.shape[1] == 2 * channels
        ):
            model_output = model_output[:, :channels]  # the second half is the variance
        if model_output.shape != x.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but the sample has shape "
                f"{tuple(x.shape)}; pass the unet's prediction for this sample"
            )
        self._replay.output = model_output
        self._replay.timestep = tau = float(self._taus[k])
        self._replay.slack = _C_NOISE_SLACK * max(1.0, abs(tau)) if self._edm is not None else 0.0
        try:
            result = move()
            if self._replay.output is not None:
                raise RuntimeError("BDIA scheduler: the step made no model evaluation")
            return result
        finally:
            self._replay.output = None

    @staticmethod
    def _state_dtype(sample: Tensor) -> torch.dtype:
        # At least float32: a half-precision pipeline's latents are the state's high word cast
        # down, as bdia.sample feeds a half unet through model_dtype.
        return torch.promote_types(sample.dtype, torch.float32)

    def _output(
        self, prev: Tensor, evaluation: Evaluation, dtype: torch.dtype, return_dict: bool
    ) -> BDIASchedulerOutput | tuple[Tensor, Tensor]:
        # A copy: a pipeline that edits the returned latents in place must not edit the state.
        # In the standard layout, which bdia's ODEs hand every model call: the pipeline's unet
        # then sees the same layout for the same values as an inversion by bdia.invert (an
        # img2img pipeline's latents of a picture come channels_last from its VAE).
        prev_sample = self._hand_out(
            prev.to(dtype, copy=True, memory_format=torch.contiguous_format)
        )
        assert evaluation.denoised is not None  # a DiffusionODE's evaluations have it
        x0 = evaluation.denoised.to(dtype)
        if not return_dict:
            return prev_sample, x0
        return BDIASchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _hand_out(self, sample: Tensor) -> Tensor:
        """``sample``, a copy of the current state's x, recorded as handed to the pipeline."""
        self._handed_out = (sample, sample._version, self._state)
        return sample

    def _is_state(self, sample: Tensor, state: SolverState) -> bool:
        """Whether ``sample`` is ``state``'s x in ``sample``'s dtype, bit for bit.

        The sample handed out for this state and given back unwritten is, without a look at
        its values (on a GPU the host would wait for the device there at every step);
        anything else is compared.
        """
        handed = self._handed_out
        if handed is not None and handed[0] is sample:
            if sample._version == handed[1] and handed[2] is state:
                return True
        return (
            sample.shape == state.x.shape
            and sample.device == state.x.device
            and bool(torch.equal(sample, state.x.to(sample.dtype)))
        )

    @staticmethod
    def _check_step_args(eta: Any) -> None:
        if eta is not None and eta != 0:
            raise ValueError(
                f"eta = {eta}: BDIA is deterministic (an ODE integrator) and adds no noise; "
                "use eta=0"
            )


class BDIAScheduler(_BDIASchedulerBase):
    """BDIA over DDIM as a diffusers scheduler, for pipelines that take a DDIM-type scheduler;
    BDIA over Euler for ``StableDiffusion3Pipeline``, ``FluxPipeline`` and
    ``QwenImagePipeline``, and for a ``StableDiffusionXLPipeline`` with an EDM-preconditioned
    scheduler (Playground v2.5).

    Build it from the pipeline's scheduler config: ``BDIAScheduler.from_config(
    pipe.scheduler.config, gamma=0.96)``. The config takes DDIMScheduler's fields (from a
    DDPMScheduler config too) and ``gamma``. The fields shared with DDIMScheduler
    (``num_train_timesteps``, ``beta_*``, ``trained_betas``, ``set_alpha_to_one``,
    ``steps_offset``, ``prediction_type``, ``timestep_spacing``, ``rescale_betas_zero_snr``)
    mean what they mean there: an internal DDIMScheduler makes the noise table and the
    timesteps, rebuilt from ``self.config`` when it changes (StableDiffusionPipeline rewrites
    ``steps_offset``); a step after a change needs ``set_timesteps`` again.
    ``rescale_betas_zero_snr=True`` (zero terminal SNR: pure noise at the last timestep)
    needs ``prediction_type="v_prediction"`` (or ``"sample"``), as its models are trained;
    with ``timestep_spacing="trailing"`` the run starts at that timestep.
    ``dynamic_thresholding_ratio``, ``clip_sample_range`` and ``sample_max_value`` are kept in
    the config and unused.

    Args:
        gamma: BDIA's gamma in (0, 1] (default 0.96) or the named schedule ``"obelm"``; 0 is
            plain DDIM, which cannot be inverted. With gamma = 1 and DDIM the scheme is the
            leapfrog.
        clip_sample: must be False (clipping x0 while keeping eps is not an ODE); a config
            with True is refused with a one-line ValueError.
        thresholding: must be False, as ``clip_sample``.
        variance_type: as DDPMScheduler's; with ``"learned"`` or ``"learned_range"`` a
            model output of twice the sample's channels is cut to its first half.
        flow_matching: the flow-matching mode, which ``from_config`` sets for the config of
            a ``FlowMatchEulerDiscreteScheduler`` (``shift`` and no betas): the config then
            also holds that scheduler's fields (all of them, defaults included, as the SD3
            pipeline reads ``max_shift`` and the like from it), an internal
            ``FlowMatchEulerDiscreteScheduler`` makes the sigmas and the (float) timesteps,
            ``set_timesteps`` takes ``mu`` for ``use_dynamic_shifting`` (and ignores it
            otherwise, as FluxPipeline passes one whatever the config) and the unshifted
            ``sigmas`` FluxPipeline passes, and the base solver is Euler on
            ``RectifiedFlow``: ``bdia.bdia("euler", gamma)`` on ``from_diffusers(transformer,
            scheduler)`` and ``diffusers_grid(scheduler, n, mu=mu, sigmas=sigmas)``. The
            DDIM fields are unused then; ``gamma="obelm"`` is refused. ``sigmas`` is the
            inner scheduler's. Image to image (StableDiffusion3Img2ImgPipeline,
            FluxImg2ImgPipeline, QwenImageImg2ImgPipeline) noises with ``scale_noise``,
            that scheduler's forward process (``add_noise``, DDIM's, is refused), and runs
            BDIA over the grid's tail from ``timesteps[begin_index]``, as in DDIM mode.
        edm_scheduler: the EDM mode, which ``from_config`` sets to the class's name for the
            config of an ``EDMEulerScheduler`` or ``EDMDPMSolverMultistepScheduler``
            (Playground v2.5's): the config then also holds that scheduler's fields (all of
            them, defaults included), and an internal one of that class makes the sigmas, the
            timesteps (its float32 ``c_noise = 0.25 log sigma``) and ``init_noise_sigma``
            (its ``sqrt(sigma_max^2 + 1)``). The model output is the unet's raw output ``F``
            of the denoiser ``c_skip x + c_out F(c_in x, c_noise)``; ``scale_model_input``
            gives ``c_in x`` and ``step`` forms the denoiser, both with ``from_diffusers``'
            model; the base solver is Euler on ``EDM()``: ``bdia.bdia("euler", gamma)`` on
            ``from_diffusers(unet, scheduler)`` and ``diffusers_grid(scheduler, n)`` from
            ``noise * init_noise_sigma``. The DDIM fields are unused then; ``sigmas`` is the
            inner scheduler's, ``mu`` and custom ``sigmas`` are refused, and ``add_noise``
            (image to image: StableDiffusionXLImg2ImgPipeline) is the EDM schedulers'
            ``x0 + sigma noise``.

    Each step goes from a timestep to the next one in ``timesteps`` (the last to alpha = 1
    with ``set_alpha_to_one``, else to ``alphas_cumprod[0]``): the grid of ``diffusers_grid``.
    That is DDIM's own target for "leading" spacing, not for "linspace" (see the docs).

    Attributes:
        timesteps: DDIM's timesteps for the ``set_timesteps`` call, noisiest first (the inner
            scheduler's in the flow-matching and EDM modes).
        grid: the bdia time grid (float64 values as Python floats), one point per timestep
            and the end point.
        final_pair: after the last step, a ``BDIASchedulerPair``: ``StatePair(x at grid[-2],
            x at grid[-1])`` with the low words, its ``times`` ``(grid[-2], grid[-1])``, the
            run's ``start_index`` and its ``end_index`` (``len(grid) - 1``), the exact input of
            ``BDIAInverseScheduler.begin`` (and of ``bdia.invert`` on
            ``grid[start_index:]``); None before the first step. It is the pair of the last
            two grid points the run has reached, so a run the pipeline stops early (SDXL's
            base with ``denoising_end``, whose loop leaves out the timesteps below its cut)
            has it at ``(grid[e - 1], grid[e])`` with ``end_index = e``, for ``bdia.invert``
            on ``grid[start_index : e + 1]``. Its tensors are in the state dtype (float32 at
            least). Its ``solver`` is ``"bdia(ddim, gamma=...)"``
            (``bdia(euler, ...)`` over Euler) with this scheduler's gamma, which ``begin``
            and ``bdia.invert`` check. Its ``fingerprint`` is None: the scheduler sees model
            outputs, never the unet or the prompt, so continuing the pair under another
            prompt is not detected.
        start_index: the index in ``timesteps`` of the run's first step (or of its last
            restart), where an inversion of the run must stop; None before the first step.
        restarts: timesteps at which the recursion restarted (see ``step``) in this run.
    """

    def _reset(self) -> None:
        self._k: int | None = None  # timestep index of the next expected step
        self._state: SolverState | None = None  # the solver's state at grid index _k (or end)
        self.start_index: int | None = None
        self._warned = False
        self.restarts: list[float] = []  # ints of DDIM, floats of flow matching

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        sigmas: Any = None,
    ):
        """DDIM's timesteps for ``num_inference_steps`` steps; starts a new run.

        Under ``flow_matching``, FlowMatchEulerDiscreteScheduler's, shifted by ``mu`` with
        ``use_dynamic_shifting`` (as StableDiffusion3Pipeline and FluxPipeline pass it; without
        dynamic shifting ``mu`` is ignored, as that scheduler ignores it), from the unshifted
        ``sigmas`` if given (FluxPipeline's ``np.linspace(1.0, 1 / n, n)``, one per step;
        ``num_inference_steps`` may then be None). In EDM mode, the EDM scheduler's float32
        ``c_noise = 0.25 log sigma`` of its sigmas (``mu`` and ``sigmas`` are refused).
        """
        self._build(num_inference_steps, device, mu, sigmas)
        self.timesteps = self._inner.timesteps

    @property
    def final_pair(self) -> BDIASchedulerPair | None:
        state = self._state
        if self.grid is None or state is None:
            return None
        # The grid up to where the run stopped: its end, or a pipeline's denoising_end.
        reached = self.grid[: state.k + 1]
        try:
            pair = stamped(self._solver.pair(state), reached, state.k, self._solver)
        except ValueError:  # no step since the (re)start: no neighbour to pair with
            return None
        fields = {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair)}
        assert self.start_index is not None  # _restart set it with the state
        return BDIASchedulerPair(**fields, start_index=self.start_index, end_index=state.k)

    def _restart(self, k: int, sample: Tensor) -> None:
        why = None
        if self._state is not None:
            assert self._k is not None  # set with the state
            if k != self._k:
                expected = self._taus[self._k] if self._k < len(self._taus) else "none (done)"
                why = f"timestep {self._taus[k]} is not the next one ({expected})"
            else:
                why = (
                    "the sample is not the state the last step returned (the pipeline changed "
                    "the latents: a callback, or an inpainting pipeline that blends the image "
                    "back into the latents after each step, as StableDiffusionInpaintPipeline "
                    "does over a 4-channel unet, and StableDiffusion3InpaintPipeline, "
                    "FluxInpaintPipeline, Flux's other inpainting pipelines, "
                    "ChromaInpaintPipeline, QwenImageInpaintPipeline, "
                    "QwenImageEditInpaintPipeline, ZImageInpaintPipeline and "
                    "Flux2KleinInpaintPipeline do; an inpainting "
                    "model's pipeline, a 9-channel inpainting unet's or FluxFillPipeline's, "
                    "does not)"
                )
        if why is not None:
            self.restarts.append(self._taus[k])
            if not self._warned:
                self._warned = True
                base = "DDIM" if self._solver.solver.name == "ddim" else "Euler"
                warnings.warn(
                    f"BDIAScheduler.step: {why}; the two-step recursion restarts there with a "
                    f"plain {base} step, so the run cannot be inverted exactly past it (warned "
                    "once per set_timesteps; restarts are listed in scheduler.restarts)",
                    BDIARestartWarning,
                    stacklevel=3,
                )
        x = sample.to(self._state_dtype(sample), copy=True)
        # A plain state at k with no neighbour: the next step is a plain DDIM (Euler) step.
        self._state = self._solver.init(self._ode, self._grid(), x, at=k)
        self._k = k
        self.start_index = k

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> BDIASchedulerOutput | tuple[Tensor, Tensor]:
        """One BDIA step from ``timestep`` to the next grid point.

        The first step of a run is a plain DDIM (Euler) step; the others are BDIA's two-step
        update from the previous state and this one, both kept (with their low words) by the
        scheduler. If ``sample`` is not the ``prev_sample`` that the last step returned, or
        ``timestep`` is not the next one, the recursion restarts at this step (a plain DDIM
        step from ``sample``) with a ``BDIARestartWarning``; a run that starts at a later
        timestep (img2img) simply starts there. An inpainting pipeline with a 4-channel unet
        (and ``StableDiffusion3InpaintPipeline``, ``FluxInpaintPipeline``,
        ``FluxControlInpaintPipeline``, ``FluxControlNetInpaintPipeline``,
        ``FluxKontextInpaintPipeline``, ``ChromaInpaintPipeline``,
        ``QwenImageInpaintPipeline``, ``QwenImageEditInpaintPipeline``,
        ``ZImageInpaintPipeline``, ``Flux2KleinInpaintPipeline``) blends the image back
        into the latents after every
        step, so each of its steps but the first is such a restart: the run is DDIM's
        (Euler's), and only an inpainting model's run (a 9-channel inpainting unet's,
        ``FluxFillPipeline``'s) is BDIA's and can be inverted.

        Args:
            model_output: the unet's prediction at ``(sample, timestep)`` (after guidance); in
                EDM mode its raw output ``F`` at ``scale_model_input(sample, timestep)``,
                which the step makes the denoiser ``c_skip x + c_out F`` of the state ``x``.
            timestep: an entry of ``timesteps``.
            sample: the current state, as the last step returned it (any float dtype; the
                scheduler's state is float32 at least).
            eta: must be 0.
            use_clipped_model_output: accepted for the pipelines that pass it; unused.
            generator: accepted and unused (no noise).
            variance_noise: accepted and unused (no noise).
            return_dict: return a ``BDIASchedulerOutput``, else ``(prev_sample,
                pred_original_sample)``.
        """
        self._check_step_args(eta)
        k = self._index(timestep)
        if not isinstance(sample, Tensor):
            raise TypeError(f"sample must be a tensor, got {type(sample).__name__}")
        current = self._state
        continues = current is not None and k == self._k and self._is_state(sample, current)
        if not continues:
            self._restart(k, sample)
        state, grid = self._state, self._grid()
        assert state is not None  # continued, or set by _restart
        if k + 1 >= len(grid):
            # The last timestep sits on the grid's end (DDIM's identity step): nothing moves.
            evaluation = self._replayed(
                model_output, k, state.x, lambda: self._ode.evaluate(grid[k], state.x)
            )
            self._k = k + 1
            return self._output(state.x, evaluation, sample.dtype, return_dict)
        new = self._replayed(
            model_output, k, state.x, lambda: self._solver.step(self._ode, grid, state)
        )
        self._state = new
        self._k = new.k
        return self._output(new.x, new.evaluation, sample.dtype, return_dict)


class BDIAInverseScheduler(_BDIASchedulerBase):
    """The exact inverse of ``BDIAScheduler``: from its ``final_pair`` back to the noise.

    Same config as ``BDIAScheduler`` (build it from that scheduler's config). Used like
    diffusers' inverse schedulers::

        inv = BDIAInverseScheduler.from_config(pipe.scheduler.config)
        inv.set_timesteps(num_inference_steps)          # as for the forward run
        x = inv.begin(pipe.scheduler.final_pair)        # the first state to feed the unet
        for t in inv.timesteps:
            x = inv.step(unet(x, t).sample, t, x).prev_sample
        noise = inv.pair.earlier                        # x at the grid's first point

    In EDM mode the unet gets ``inv.scale_model_input(x, t)`` (``c_in x``), as the pipeline
    gave it ``scale_model_input`` of its scheduler.

    Attributes:
        timesteps: the forward timesteps at which the inversion evaluates the unet, from the
            second-to-last grid point back to the one after the run's start (the pair already
            holds the last two states); one fewer than the forward run's unet calls.
            ``set_timesteps`` makes them for a run from the first timestep to the grid's end;
            ``begin`` cuts them at the run's ``start_index`` and ``end_index``.
        forward_timesteps: the forward run's timesteps (what ``diffusers_grid`` reads).
        grid: the forward run's bdia time grid.
        start_index: the index in ``forward_timesteps`` where the forward run began (set by
            ``begin``); the inversion ends there.
        pair: the current ``StatePair(x at grid[k], x at grid[k + 1])`` with low words and
            those ``times``; after the loop, the pair at the run's start, whose ``.earlier``
            is the state the run started from (the noise).
    """

    def _reset(self) -> None:
        self._state: SolverState | None = None  # at grid index k, its neighbour at k + 1
        self._feed_dtype: torch.dtype | None = None
        self.start_index: int | None = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        sigmas: Any = None,
    ):
        """The inversion's timesteps for a forward run of ``num_inference_steps`` (and ``mu``
        and ``sigmas``, as the forward run had them); call ``begin(pair)`` next."""
        self._build(num_inference_steps, device, mu, sigmas)
        self.forward_timesteps = self._inner.timesteps
        last = len(self._grid()) - 1
        self.timesteps = self._inner.timesteps[1:last].flip(0)

    def begin(
        self,
        pair: StatePair,
        dtype: torch.dtype | None = None,
        start_index: int | None = None,
        end_index: int | None = None,
    ) -> Tensor:
        """Start the inversion from the forward run's ``final_pair``; cut ``timesteps`` at
        the run's start and where it stopped.

        Args:
            pair: ``BDIAScheduler.final_pair`` (or ``bdia.sample(..., return_pair=True)`` on
                the same grid, its tail or its head): x at the two grid points where the run
                stopped, low words included.
            dtype: the dtype the unet gets its input in (the forward pipeline's latents
                dtype, e.g. torch.float16); defaults to the pair's.
            start_index: the index in ``forward_timesteps`` where the forward run began. By
                default the pair's ``start_index`` (``final_pair`` records it), else 0. The
                inversion stops there: stepping on would invert steps the run never took.
            end_index: the index in ``grid`` of the pair's later state, where the forward run
                stopped. By default the pair's ``end_index`` (``final_pair`` records it: less
                than the grid's end for SDXL's base with ``denoising_end``), else the grid's
                end.

        Returns:
            The first state to feed the unet (x at the grid point before ``end_index``, a
            copy in ``dtype``).

        Raises:
            ValueError: if the pair records other grid times (a run of another step count)
                or another solver than this scheduler's (a forward run with another gamma),
                if its gamma underflows in the pair's dtype, or for a ``start_index`` or
                ``end_index`` that contradicts the pair's or leaves no step.
        """
        if self.grid is None:
            raise ValueError(
                "BDIAInverseScheduler.begin was called before set_timesteps; call "
                "set_timesteps(num_inference_steps) with the forward run's step count first"
            )
        if not isinstance(pair, (StatePair, tuple)):
            raise TypeError(
                f"begin takes the forward scheduler's final_pair (a StatePair), got "
                f"{type(pair).__name__}"
            )
        last = self._end_index(pair, end_index)
        start = self._start_index(pair, start_index, last)
        checked = _pair(pair, None, "pair")
        check_times(checked, self.grid[: last + 1], last, "begin")
        # The inverse's gamma comes from its own config, which need not be the forward run's.
        fix = (
            "build the inverse from the forward scheduler's config, its gamma included: "
            "BDIAInverseScheduler.from_config(pipe.scheduler.config)"
        )
        check_solver(checked, self._solver, "begin", fix)
        self._state = self._solver.init(self._ode, self.grid, checked, at=last)
        self._feed_dtype = dtype or checked.earlier.dtype
        self.start_index = start
        self.timesteps = self.forward_timesteps[start + 1 : last].flip(0)
        return self._hand_out(
            self._state.x.to(self._feed_dtype, copy=True, memory_format=torch.contiguous_format)
        )

    def _start_index(self, pair: StatePair, start_index: Any, end: int) -> int:
        """The grid index where the forward run began: ``start_index``, the pair's, or 0;
        before the run's ``end``."""
        index = _recorded_index(
            pair, "start_index", start_index, 0, "began at index", "invert back to the run's start"
        )
        last = end - 1  # the pair's earlier state: no step back from there
        if not 0 <= index <= last:
            raise ValueError(
                f"start_index = {index} is not a step of this schedule's run (0 .. "
                f"{last} for num_inference_steps = {self.num_inference_steps} and a run that "
                f"stopped at grid index {end}); call set_timesteps with the forward run's step "
                "count"
            )
        return index

    def _end_index(self, pair: StatePair, end_index: Any) -> int:
        """The grid index where the forward run stopped: ``end_index``, the pair's, or the
        grid's end."""
        last = len(self._grid()) - 1
        index = _recorded_index(
            pair, "end_index", end_index, last, "stopped at grid index", "invert from there"
        )
        recorded = getattr(pair, "end_index", None)
        if index > last and index == recorded:
            raise ValueError(
                f"the pair was made at t = {pair.times} and its run stopped at grid index "
                f"{index}, past this grid's end ({last} for num_inference_steps = "
                f"{self.num_inference_steps}): a run of another step count; call set_timesteps "
                "with the forward run's step count"
            )
        if not 1 <= index <= last:
            raise ValueError(
                f"end_index = {index} is not where a run of this schedule stops (1 .. {last} "
                f"for num_inference_steps = {self.num_inference_steps}); call set_timesteps "
                "with the forward run's step count"
            )
        return index

    @property
    def pair(self) -> StatePair | None:
        """``StatePair(x at grid[k], x at grid[k + 1])`` of the current grid index, or None
        before ``begin``."""
        if self._state is None:
            return None
        grid = self._grid()[self._state.k :]
        return stamped(self._solver.pair(self._state), grid, 0, self._solver)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> BDIASchedulerOutput | tuple[Tensor, Tensor]:
        """One step back: ``(x_k, x_{k+1}) -> x_{k-1}``, the exact inverse of the forward
        update at ``timestep``.

        Args:
            model_output: the unet's prediction at ``(sample, timestep)``.
            timestep: the next entry of ``timesteps``.
            sample: the state ``begin`` or the last step returned, unchanged.
            eta: must be 0; the other arguments as in ``BDIAScheduler.step`` (unused).

        Returns:
            ``prev_sample``: x one grid point noisier, in ``sample``'s dtype (the next unet
            input); ``pred_original_sample``: the x0 prediction at this step.
        """
        self._check_step_args(eta)
        k = self._index(timestep)
        state = self._state
        if state is None:
            raise ValueError(
                "BDIAInverseScheduler.step was called before begin(pair); call "
                "x = inv.begin(forward_scheduler.final_pair) after set_timesteps"
            )
        assert self.start_index is not None  # begin set it with the state
        if state.k <= self.start_index:
            raise ValueError(
                f"the inversion is done: inv.pair holds the states at the run's start (index "
                f"{self.start_index}); call set_timesteps and begin(pair) for another"
            )
        if k != state.k:
            raise ValueError(
                f"timestep {self._taus[k]} is not the inversion's next one "
                f"({self._taus[state.k]}); step through inv.timesteps in order"
            )
        if not isinstance(sample, Tensor):
            raise TypeError(f"sample must be a tensor, got {type(sample).__name__}")
        if not self._is_state(sample, state):
            raise ValueError(
                "sample is not the state that begin(pair) or the last step returned; the "
                "inversion continues its own two-word state, so feed prev_sample back unchanged"
            )
        new = self._replayed(
            model_output, k, state.x, lambda: self._solver.unstep(self._ode, self._grid(), state)
        )
        self._state = new
        return self._output(new.x, new.evaluation, sample.dtype, return_dict)
