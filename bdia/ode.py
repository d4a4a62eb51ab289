"""ODE objects: the one place where a model is called, and where calls are counted.

``ODE(f)`` is a generic problem ``dx/dt = f(t, x)``. ``DiffusionODE`` is the
probability-flow ODE of a diffusion model in the schedule's own time ``t`` and state ``x``:

    dx/dt = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) eps_hat(x, t)

with the model wrapped once into an EDM-form denoiser ``D(x_bar; sigma_bar)``,
``x_bar = x / alpha``, ``sigma_bar = sigma / alpha``, ``eps_hat = (x_bar - D) / sigma_bar``.

Every model call goes through ``evaluate(t, x)``, which adds one to ``nfe`` and returns an
``Evaluation`` holding what any solver needs at ``(t, x)``, so that a step can reuse it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .schedules import EDM, Schedule
from .twoword import has_float64

__all__ = ["Evaluation", "ODE", "DiffusionODE"]


@dataclass(frozen=True)
class Evaluation:
    """What one model evaluation tells about the ODE at ``(t, x)``.

    Attributes:
        t: the time (float).
        x: the state the model saw, shape ``(batch, ...)``, in the state dtype.
        derivative: ``dx/dt`` at ``(t, x)``, same shape and dtype as ``x``.
        denoised: ``D(x / alpha; sigma / alpha)``, the predicted clean data (diffusion only).
        eps: the predicted noise ``(x / alpha - denoised) / sigma_bar`` (diffusion only).
    """

    t: float
    x: Tensor
    derivative: Tensor
    denoised: Tensor | None = None
    eps: Tensor | None = None


#: dtype names accepted where a dtype is asked for (``state_dtype``, ``model_dtype``).
DTYPE_NAMES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _model_dtype(value: Any) -> torch.dtype | None:
    """``model_dtype`` as a floating torch dtype (a dtype or its name), or None."""
    if value is None:
        return None
    dtype = DTYPE_NAMES.get(value.removeprefix("torch.")) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(
            f"model_dtype must be a floating torch dtype such as torch.float32 or "
            f"torch.bfloat16 (or its name: {', '.join(repr(n) for n in DTYPE_NAMES)}), "
            f"got {value!r}"
        )
    return dtype


# What a schedule given by name most likely meant, for the refusal's hint.
_SCHEDULE_HINTS = {
    "edm": "bdia.EDM()",
    "ve": "bdia.EDM()",
    "vp": "bdia.VPLinear()",
    "vplinear": "bdia.VPLinear()",
    "linear": "bdia.VPLinear()",
    "vpcosine": "bdia.VPCosine()",
    "cosine": "bdia.VPCosine()",
    "vpdiscrete": "bdia.VPDiscrete(betas=...)",
    "discrete": "bdia.VPDiscrete(betas=...)",
}


def _check_schedule(schedule: Any) -> Schedule:
    """``schedule`` if it is a Schedule instance; otherwise a TypeError that names the fix."""
    if isinstance(schedule, Schedule):
        return schedule
    known = "bdia.EDM(), bdia.VPLinear(), bdia.VPCosine() or bdia.VPDiscrete(betas=...)"
    if isinstance(schedule, str):
        key = "".join(c for c in schedule.lower() if c.isalnum())
        hint = _SCHEDULE_HINTS.get(key)
        fix = f"pass {hint}" if hint else f"pass one of {known}"
        raise TypeError(
            f"schedule must be a Schedule instance, not the string {schedule!r}; {fix} "
            "(schedules are objects because they have parameters)"
        )
    if isinstance(schedule, type) and issubclass(schedule, Schedule):
        raise TypeError(
            f"schedule must be a Schedule instance, got the class {schedule.__name__}; "
            f"call it: {schedule.__name__}()"
        )
    raise TypeError(
        f"schedule must be a Schedule instance such as {known}, got {type(schedule).__name__}"
    )


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model gets its time or noise level in, given its input's: the same, but
    float32 for a half-precision model, whose 8 bits of bfloat16 would round t = 1000.3 to
    1000."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def values_on(values: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as ``dtype`` on ``device``, rounded as ``values.to(device, dtype)`` rounds
    them. Values on the host that are all equal (one time for the whole batch, as a sampler
    gives) are filled on the device instead of copied: on CUDA a copy from the host waits
    for the stream, which empties the GPU's queue of launched work at every model call."""
    if values.device.type != "cpu" or values.numel() == 0:
        return values.to(device, dtype)
    flat = values.reshape(-1)
    if not bool((flat == flat[0]).all()):
        return values.to(device, dtype)
    rounded = float(flat[:1].to(dtype))
    return torch.full(values.shape, rounded, dtype=dtype, device=device)


def wide_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of a norm or noise level computed wider than a float32 state: float64, or
    float32 on a device without float64 (``mps``), where ``.double()`` would raise."""
    return torch.float64 if has_float64(device) else torch.float32


def _infer_model_dtype(model: Callable[..., Any]) -> torch.dtype | None:
    """The dtype of a module's first floating parameter, or None for a plain callable."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


class ODE:
    """A generic problem ``dx/dt = f(t, x)``.

    Args:
        f: ``f(t, x) -> dx/dt`` with ``x`` of shape ``(batch, ...)`` and ``t`` a 0-dim
            tensor on ``x``'s device, in ``x``'s dtype (float32 when ``model_dtype`` is
            float16 or bfloat16, as a diffusion network gets its noise level); returns a
            real floating tensor of ``x``'s shape (any floating dtype; it is cast to the
            state's).
        model_dtype: if given (a floating torch dtype or its name), ``x`` is cast to it
            before ``f`` and the result cast back to the state dtype (the precision policy: a
            float64 state around a float32 ``f``).

    Attributes:
        nfe: evaluations of ``f`` so far; ``reset_nfe()`` sets it to 0.
    """

    #: Exponential integrators refuse problems where this is False.
    is_diffusion = False

    def __init__(
        self,
        f: Callable[[Tensor, Tensor], Tensor],
        *,
        model_dtype: torch.dtype | str | None = None,
    ) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        self.f = f
        self.model_dtype = _model_dtype(model_dtype)
        self.nfe = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f!r}, nfe={self.nfe})"

    def reset_nfe(self) -> None:
        """Set the evaluation counter to zero."""
        self.nfe = 0

    def fingerprint(self) -> str:
        """A short hex digest of what defines the problem: the model (a module's class and a
        sample of its parameters and buffers, and what its submodules report by a
        ``fingerprint_state()`` method; a function's name, defaults, closure and the
        tensors, modules and arrays among the globals it names; a bound method's object; a
        partial's function and arguments; a callable object's attributes), and for a
        ``DiffusionODE`` the schedule, the prediction type, the model dtype and the
        conditioning tensors.

        A module's other attributes are not read: they mix settings that change its output
        with ones that do not (gradient checkpointing, caches, counters), which would make
        one model look like two. A module whose output depends on such a setting reports it
        from ``fingerprint_state(self)`` (plain values and tensors; an empty one adds
        nothing): ``from_diffusers``' model reports the unet's IP-Adapter scale, LoRA
        adapters' weights and state, and FreeU's factors.

        Two ODEs with equal fingerprints compute the same vector field; pairs made by
        ``sample``/``invert`` record it, so that continuing a BDIA pair under a different ODE
        (another class label or prompt, say) is noticed. It is stable across processes, so it
        can be stored with saved latents.
        """
        return _fingerprint(type(self).__qualname__, self.f, self.model_dtype)

    def time_fingerprint(self) -> str:
        """A short hex digest of what a time means to this ODE: ``""`` for a plain ODE,
        whose times are its own; a ``DiffusionODE``'s schedule's digest, equal for two ODEs
        whose times are the same noise levels with the same scaling of the state (a state
        inverted under one can be sampled under the other)."""
        return ""

    def is_terminal(self, t: float) -> bool:
        """True where the model cannot be evaluated (a diffusion ODE at sigma = 0, unless its
        network predicts the flow)."""
        return False

    def check_times(self, ts: list[float]) -> None:
        """Raise ValueError if a time lies outside the problem's domain."""
        for i, t in enumerate(ts):
            if not math.isfinite(t):
                raise ValueError(f"time ts[{i}] = {t!r} is not finite")

    def _call(self, fn: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Apply the precision policy around one model call; the model gets ``x`` in the
        standard contiguous layout, whatever the state's."""
        dtype = self.model_dtype
        x_in = x if dtype is None or dtype == x.dtype else x.to(dtype)
        # A network's output can depend on its input's memory layout, not only its values
        # (CPU convolutions take other kernels for channels_last), and a state's layout can
        # change along a run (an elementwise result takes its first operand's, and the
        # forward and inverse steps order their operands differently). Exact inversion needs
        # the same output for the same values, so every call gets one layout.
        x_in = x_in.contiguous()
        out = fn(x_in, *args, **kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the model returned {got}, expected a tensor of shape {tuple(x.shape)}"
            )
        if not out.is_floating_point():
            # Casting would drop an imaginary part, or hide an integer result, silently.
            raise ValueError(
                f"the model returned a {out.dtype} tensor; it must return a real floating "
                f"tensor (the state is {x.dtype}, and the result is cast to it)"
            )
        return out.to(x.dtype)

    def evaluate(self, t: float, x: Tensor) -> Evaluation:
        """Evaluate ``f`` once at ``(t, x)`` (counts one NFE)."""
        self.nfe += 1

        def f(xi: Tensor) -> Tensor:
            # Rounded as torch.tensor rounds it (a t past the dtype's range becomes inf), but
            # filled on the device: see values_on.
            host = torch.tensor(float(t), dtype=_time_dtype(xi.dtype))
            return self.f(values_on(host, host.dtype, xi.device), xi)

        return Evaluation(t=float(t), x=x, derivative=self._call(f, x))


# How many leading and trailing entries of each parameter and buffer enter a model's
# fingerprint: enough to tell trained networks apart, cheap for a network of billions of weights.
_FINGERPRINT_ENTRIES = 16


def _entry_bytes(value: Tensor, sampled: bool) -> list[Tensor]:
    """The entries of ``value`` a digest reads (all, or the leading and trailing
    ``_FINGERPRINT_ENTRIES`` where ``sampled``), as byte views on its device."""
    flat = value.detach().reshape(-1)  # a view where it can be, with any stride (0 too)
    if sampled and flat.numel() > 2 * _FINGERPRINT_ENTRIES:
        parts = [flat[:_FINGERPRINT_ENTRIES], flat[-_FINGERPRINT_ENTRIES:]]
    else:
        parts = [flat]
    return [part.contiguous().view(torch.uint8) for part in parts]


def _host_bytes(tensors: list[Tensor], sampled: bool) -> list[bytes]:
    """Each tensor's digested entries as bytes, in order, with one copy to the host per
    device: a network's hundreds of parameters copied one by one would each make the host
    wait for a GPU."""
    parts = [_entry_bytes(t, sampled) for t in tensors]
    by_device: dict[torch.device, list[Tensor]] = {}
    for part in parts:
        by_device.setdefault(part[0].device, []).extend(part)
    host = {
        device: memoryview(torch.cat(views).cpu().numpy().tobytes())
        for device, views in by_device.items()
    }
    offsets = dict.fromkeys(host, 0)
    out = []
    for part in parts:
        device, size = part[0].device, sum(view.numel() for view in part)
        start = offsets[device]
        out.append(bytes(host[device][start : start + size]))
        offsets[device] = start + size
    return out


def _digest_tensor(h: Any, value: Tensor, sampled: bool) -> None:
    h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
    (data,) = _host_bytes([value], sampled)
    h.update(data)


def _digest_function(h: Any, fn: types.FunctionType, depth: int, path: set[int]) -> None:
    """A Python function: its name, and the values it computes with besides its arguments
    (defaults, closure cells, and the tensors, modules and arrays among the globals it
    names). A lambda wrapping a network differs from one wrapping another."""
    h.update(f"C{fn.__module__}.{fn.__qualname__}".encode())
    _digest(h, fn.__defaults__, depth + 1, path)
    _digest(h, fn.__kwdefaults__, depth + 1, path)
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # a cell not yet filled
            h.update(b"E")
            continue
        _digest(h, contents, depth + 1, path)
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        # Only state a model may hold: a global naming a Python module, a class or a helper
        # function would pull in whatever it reaches.
        if isinstance(value, (Tensor, np.ndarray, torch.nn.Module)):
            h.update(f"G{name}".encode())
            _digest(h, value, depth + 1, path)


def _digest_module_state(h: Any, module: torch.nn.Module, depth: int, path: set[int]) -> None:
    """What the submodules of ``module`` that define ``fingerprint_state()`` report: state
    that changes what a module computes without being a parameter or buffer (an adapter's
    scale, say). Only the module can tell such state from attributes that leave its output
    alone (gradient checkpointing, caches, counters), so plain attributes are not read. A
    module that reports nothing adds nothing, so its digest is as it was before the hook."""
    for name, sub in module.named_modules():
        # On the class: an nn.Module's own lookup of a missing attribute raises, which costs
        # milliseconds over a unet's hundreds of submodules.
        report = getattr(type(sub), "fingerprint_state", None)
        if not callable(report):
            continue
        state = report(sub)
        if state:
            h.update(f"S{name}".encode())
            _digest(h, state, depth + 1, path)


def _digest(h: Any, value: Any, depth: int = 0, path: set[int] | None = None) -> None:
    """Feed ``value`` into the hash ``h``: tensors and arrays by dtype, shape and content,
    modules by class and a sample of every parameter and buffer, mappings by sorted keys,
    callables by name and the state they carry (a bound method's object, a partial's
    arguments, a function's closure, a callable object's attributes), other objects by
    class and attributes. Python modules and classes enter by name only. Nothing depends on
    ``id()`` or addresses, so the digest is the same in every process."""
    path = set() if path is None else path
    if depth > 8 or id(value) in path:
        # Deeper structure, or a cycle back to an enclosing value: only its type.
        h.update(f"X{type(value).__qualname__}".encode())
        return
    if value is None or isinstance(value, (bool, int, float, str, np.generic, torch.dtype)):
        h.update(f"V{type(value).__name__}:{value!r}".encode())
        return
    if isinstance(value, Tensor):
        _digest_tensor(h, value, sampled=isinstance(value, torch.nn.Parameter))
        return
    if isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
        return
    if isinstance(value, types.ModuleType):
        h.update(f"P{value.__name__}".encode())
        return
    if isinstance(value, type):
        h.update(f"K{value.__module__}.{value.__qualname__}".encode())
        return
    path.add(id(value))
    try:
        if isinstance(value, torch.nn.Module):
            h.update(f"M{type(value).__qualname__}".encode())
            named = [
                (f"{kind}{name}", tensor)
                for kind, items in (("p", value.named_parameters()), ("b", value.named_buffers()))
                for name, tensor in items
            ]
            entries = _host_bytes([tensor for _, tensor in named], sampled=True)
            for (label, tensor), data in zip(named, entries, strict=True):
                h.update(label.encode())
                h.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
                h.update(data)
            _digest_module_state(h, value, depth, path)
        elif isinstance(value, ODE):
            # Its own digest, which leaves out what changes as it runs (the call counter).
            h.update(f"E{value.fingerprint()}".encode())
        elif isinstance(value, Mapping):
            h.update(b"D")
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                _digest(h, value[key], depth + 1, path)
        elif isinstance(value, (list, tuple)):
            h.update(f"L{len(value)}".encode())
            for item in value:
                _digest(h, item, depth + 1, path)
        elif isinstance(value, functools.partial):
            h.update(b"F")
            _digest(h, (value.func, value.args, value.keywords), depth + 1, path)
        elif isinstance(value, (types.MethodType, types.BuiltinMethodType)):
            # A bound method is its function and the object it is bound to (for a builtin
            # function, its Python module, which enters by name).
            h.update(f"B{getattr(value, '__qualname__', '')}".encode())
            _digest(h, getattr(value, "__func__", None), depth + 1, path)
            _digest(h, value.__self__, depth + 1, path)
        elif isinstance(value, types.FunctionType):
            _digest_function(h, value, depth, path)
        elif hasattr(value, "__dict__"):
            h.update(f"O{type(value).__module__}.{type(value).__qualname__}".encode())
            _digest(h, vars(value), depth + 1, path)
        else:
            name = getattr(value, "__qualname__", type(value).__qualname__)
            h.update(f"C{getattr(value, '__module__', '')}.{name}".encode())
    finally:
        path.discard(id(value))


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        _digest(h, part)
    return h.hexdigest()[:16]


Denoiser = Callable[..., Tensor]


class DiffusionODE(ODE):
    """The probability-flow ODE of a diffusion model under a noise schedule.

    Args:
        denoiser: ``denoiser(x_bar, sigma_bar, **cond) -> D`` in EDM form: ``x_bar`` of shape
            ``(batch, ...)``, ``sigma_bar`` of shape ``(batch,)``; returns the denoised
            ``x_bar`` (same shape, a real floating dtype). Use ``from_eps``, ``from_x0`` or
            ``from_v`` for networks that predict something else in the schedule's own space.
        schedule: the noise schedule, a ``Schedule`` instance such as ``EDM()``,
            ``VPLinear()``, ``VPCosine()`` or ``VPDiscrete(betas=...)``; defaults to ``EDM()``
            (alpha = 1, sigma = t). A name such as ``"edm"`` is refused with a TypeError
            that names the class to use.
        model_dtype: dtype the network runs in (input cast down, output cast up to the
            state dtype), a torch dtype or its name (``"bfloat16"``). Defaults to the dtype
            of the network's parameters when the denoiser is an ``nn.Module``, else the
            state dtype.
        cond: keyword arguments passed to every model call (class labels, say), as they
            are: what they must look like is the model's contract, so the model checks them
            (EDM's preconditioners and the diffusers adapter refuse a batch that is neither
            the state's nor 1).
        prediction: what the model returns: ``"denoised"`` (EDM form, the default), or
            ``"eps"``, ``"x0"``, ``"v"``, ``"flow"`` for a network called as
            ``model(x, t, **cond)`` in the schedule's own space and time (see ``from_eps``
            and ``from_flow``).
    """

    is_diffusion = True

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: Schedule | None = None,
        *,
        model_dtype: torch.dtype | str | None = None,
        cond: Mapping[str, Any] | None = None,
        prediction: str = "denoised",
    ) -> None:
        if prediction not in ("denoised", "eps", "x0", "v", "flow"):
            raise ValueError(
                f"prediction must be 'denoised', 'eps', 'x0', 'v' or 'flow', got {prediction!r}"
            )
        if not callable(denoiser):
            raise TypeError(f"the model must be callable, got {type(denoiser).__name__}")
        self.f = denoiser
        self.schedule = _check_schedule(schedule) if schedule is not None else EDM()
        model_dtype = _model_dtype(model_dtype)
        self.model_dtype = model_dtype if model_dtype is not None else _infer_model_dtype(denoiser)
        self.cond = dict(cond or {})
        self.prediction = prediction
        self.nfe = 0

    def __repr__(self) -> str:
        return (
            f"DiffusionODE({self.f!r}, {self.schedule!r}, prediction={self.prediction!r}, "
            f"nfe={self.nfe})"
        )

    @classmethod
    def from_eps(
        cls, model: Callable[..., Tensor], schedule: Schedule, **kwargs: Any
    ) -> DiffusionODE:
        """Wrap a noise-prediction network ``model(x, t, **cond) -> eps``.

        ``x`` is in the schedule's own space (shape ``(batch, ...)``), ``t`` a tensor of shape
        ``(batch,)`` holding the schedule's continuous time.
        """
        return cls(model, schedule, prediction="eps", **kwargs)

    @classmethod
    def from_x0(
        cls, model: Callable[..., Tensor], schedule: Schedule, **kwargs: Any
    ) -> DiffusionODE:
        """Wrap a data-prediction network ``model(x, t, **cond) -> x0`` (as ``from_eps``)."""
        return cls(model, schedule, prediction="x0", **kwargs)

    @classmethod
    def from_v(
        cls, model: Callable[..., Tensor], schedule: Schedule, **kwargs: Any
    ) -> DiffusionODE:
        """Wrap a v-prediction network, ``v = alpha eps - sigma x0`` (contract of ``from_eps``)."""
        return cls(model, schedule, prediction="v", **kwargs)

    @classmethod
    def from_flow(
        cls, model: Callable[..., Tensor], schedule: Schedule, **kwargs: Any
    ) -> DiffusionODE:
        """Wrap a flow-matching network that predicts the path's velocity
        ``u = alpha' x0 + sigma' eps`` (``eps - x0`` under ``RectifiedFlow``, as SD3 and Flux
        do), called as ``from_eps`` describes. The ODE's derivative is ``u`` itself, so Euler
        in ``t`` is the flow-matching Euler sampler."""
        return cls(model, schedule, prediction="flow", **kwargs)

    def fingerprint(self) -> str:
        return _fingerprint(
            type(self).__qualname__,
            self.f,
            self.schedule,
            self.prediction,
            self.model_dtype,
            self.cond,
        )

    def time_fingerprint(self) -> str:
        return _fingerprint(self.schedule)

    def is_terminal(self, t: float) -> bool:
        # A denoiser, eps, x0 or v network's estimates divide by sigma at sigma = 0. A flow
        # network's velocity is finite there, and x0 = x / alpha and eps follow from it by
        # dividing by alpha sigma' (evaluate's det), which is not 0 at a clean end.
        sched = self.schedule
        if sched.sigma(t) != 0.0:
            return False
        return self.prediction != "flow" or sched.alpha(t) * sched.sigma_dot(t) == 0.0

    def check_times(self, ts: list[float]) -> None:
        self.schedule.check_times(ts)

    def _noise_input(self, value: float, x: Tensor) -> Tensor:
        """A ``(batch,)`` tensor of ``value`` for the network (float32 for half-precision
        ones), on the state's device, or on the host for a network whose
        ``reads_time_on_host`` is true: one that maps the time to its own timestep in Python
        (bdia's diffusers adapter), where reading a device tensor back would make the host
        wait for the device at every call."""
        dtype = _time_dtype(self.model_dtype or x.dtype)
        host = getattr(self.f, "reads_time_on_host", False) is True
        device = torch.device("cpu") if host else x.device
        return torch.full((x.shape[0],), value, dtype=dtype, device=device)

    def evaluate(self, t: float, x: Tensor) -> Evaluation:
        """Evaluate the network once at ``(t, x)`` (counts one NFE).

        Args:
            t: a time with sigma(t) > 0, or sigma(t) = 0 (the clean end) for the ``"flow"``
                prediction; alpha(t) = 0 (pure noise) only for the ``"x0"``, ``"v"`` and
                ``"flow"`` predictions.
            x: state of shape ``(batch, ...)`` in the schedule's space.

        Returns:
            An Evaluation with ``derivative``, ``denoised`` (in x_bar space) and ``eps``, all
                in ``x``'s dtype.
        """
        t = float(t)
        sched = self.schedule
        sigma = sched.sigma(t)
        if self.is_terminal(t):
            raise ValueError(
                f"the model cannot be evaluated at t = {t}, where sigma = 0; "
                "a grid may end there, but no step may start from it (a flow network, "
                "from_flow, can be evaluated there)"
            )
        alpha = sched.alpha(t)
        if alpha == 0.0 and self.prediction in ("denoised", "eps"):
            # Both recover the data by dividing by alpha: D takes x / alpha, and
            # x0 = (x - sigma eps) / alpha.
            raise ValueError(
                f"a {self.prediction!r}-prediction model cannot be evaluated at t = {t}, where "
                "alpha = 0 (pure noise): the data estimate divides by alpha there. Start the "
                "grid below that time, or wrap a network that predicts x0, v or the flow"
            )
        alpha_dot, sigma_dot = sched.alpha_dot(t), sched.sigma_dot(t)
        self.nfe += 1
        derivative = None
        if self.prediction == "denoised":
            sigma_bar = sigma / alpha
            # Dividing by 1 returns x bit for bit; under EDM's schedule alpha is 1 at every
            # time, where the division would be one more pass over the state per evaluation.
            x_bar = x if alpha == 1.0 else x / alpha
            denoised = self._call(self.f, x_bar, self._noise_input(sigma_bar, x), **self.cond)
            eps = (x_bar - denoised) / sigma_bar
        else:
            out = self._call(self.f, x, self._noise_input(t, x), **self.cond)
            if self.prediction == "eps":
                eps = out
                denoised = (x - sigma * eps) / alpha
            elif self.prediction == "x0":
                denoised = out
                eps = (x - alpha * denoised) / sigma
            elif self.prediction == "v":  # v = alpha eps - sigma x0 and x = alpha x0 + sigma eps
                norm = alpha * alpha + sigma * sigma
                denoised = (alpha * x - sigma * out) / norm
                eps = (sigma * x + alpha * out) / norm
            else:  # u = alpha' x0 + sigma' eps and x = alpha x0 + sigma eps
                det = alpha * sigma_dot - sigma * alpha_dot
                denoised = (sigma_dot * x - sigma * out) / det
                eps = (alpha * out - alpha_dot * x) / det
                derivative = out
        if derivative is None:
            if alpha == 0.0:
                # (alpha'/alpha) x is infinite at pure noise; alpha' x0 + sigma' eps is the
                # same derivative written without the division.
                derivative = alpha_dot * denoised + sigma_dot * eps
            else:
                eps_coef = sigma_dot - alpha_dot * sigma / alpha
                if alpha_dot != 0.0:
                    derivative = (alpha_dot / alpha) * x + eps_coef * eps
                else:  # as above, EDM's (sigma(t) = t) multiplies by 1
                    derivative = eps if eps_coef == 1.0 else eps_coef * eps
        return Evaluation(t=t, x=x, derivative=derivative, denoised=denoised, eps=eps)
