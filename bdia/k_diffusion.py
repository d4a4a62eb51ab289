"""BDIA with k-diffusion's calling convention, for k-diffusion and ComfyUI-style code.

``sample_bdia(model, x, sigmas, extra_args, callback, disable)`` is shaped like
k-diffusion's ``sample_euler``: ``model(x, sigma, **extra_args)`` returns the denoised ``x``
(``sigma`` of shape ``(batch,)``), ``sigmas`` is a 1-D tensor of EDM noise levels, usually
ending with 0, the callback receives ``{"x", "i", "sigma", "sigma_hat", "denoised"}``, and
``disable`` turns the progress bar off. It runs ``bdia.sample`` with
``DiffusionODE(model, EDM(), cond=extra_args)`` (EDM's time is sigma, so the grid is
``sigmas``) and ``bdia(get_solver(base), gamma)``.

``invert_bdia`` is its exact inverse: from the pair that ``sample_bdia(...,
return_pair=True)`` gave back to the noise at ``sigmas[0]``.

This module is not imported by ``bdia``; import it as ``bdia.k_diffusion``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .ode import DiffusionODE
from .sampling import StatePair, invert, sample
from .schedules import EDM
from .solvers.base import Solver
from .solvers.bidirectional import BidirectionalWrapper, GammaSpec
from .solvers.registry import bdia, get_solver

__all__ = ["sample_bdia", "invert_bdia", "DEFAULT_GAMMA"]

#: The project's usual gamma (README, quick start, EDM CIFAR-10 runs). Slightly below 1, it
#: damps BDIA's parasitic mode while sampling (gamma = 1 only keeps it, and the
#: probability-flow ODE is dissipative), and the gammas' share of inversion's amplification
#: is only 0.96^-(N-1): about 2 over 20 steps and 7 over 50.
DEFAULT_GAMMA = 0.96

KCallback = Callable[[dict[str, Any]], None]


def _sigmas(sigmas: Any) -> tuple[list[float], Tensor]:
    """The grid as float64 Python floats, and ``sigmas`` as a tensor for the callback."""
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise ValueError(
                f"sigmas must be a 1-D tensor of noise levels, got shape {tuple(sigmas.shape)}"
            )
        if sigmas.is_complex() or sigmas.dtype == torch.bool:
            raise TypeError(f"sigmas must be a real tensor of noise levels, got {sigmas.dtype}")
        values = [float(v) for v in sigmas.detach().cpu().tolist()]
        as_tensor = sigmas
    elif isinstance(sigmas, Sequence) and not isinstance(sigmas, str):
        try:
            values = [float(v) for v in sigmas]
        except (TypeError, ValueError):
            raise TypeError("sigmas must be a 1-D tensor (or sequence) of numbers") from None
        as_tensor = torch.tensor(values, dtype=torch.float64)
    else:
        raise TypeError(f"sigmas must be a 1-D tensor of noise levels, got {type(sigmas).__name__}")
    if len(values) < 2:
        raise ValueError(f"sigmas needs at least 2 noise levels (one step), got {len(values)}")
    for i, s in enumerate(values):
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"sigmas[{i}] = {s!r}: noise levels must be finite and >= 0")
    diffs = [b - a for a, b in zip(values, values[1:])]
    if not (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)):
        i = next(i for i, d in enumerate(diffs) if d == 0 or (d > 0) != (diffs[0] > 0))
        raise ValueError(
            f"sigmas must be strictly decreasing (or strictly increasing); it turns or repeats "
            f"at sigmas[{i}] = {values[i]!r}, sigmas[{i + 1}] = {values[i + 1]!r}"
        )
    return values, as_tensor


def _extra_args(extra_args: Any) -> dict[str, Any]:
    if extra_args is None:
        return {}
    if not isinstance(extra_args, Mapping):
        raise TypeError(
            "extra_args must be a mapping of keyword arguments for the model, such as "
            f"{{'cond': c}}, got {type(extra_args).__name__}"
        )
    bad = [k for k in extra_args if not isinstance(k, str)]
    if bad:
        raise TypeError(f"extra_args keys must be strings (keyword names), got {bad[0]!r}")
    return dict(extra_args)


def _solver(base: Any, gamma: GammaSpec) -> BidirectionalWrapper:
    if isinstance(base, str) and base.startswith("bdia"):
        raise ValueError(
            f"base names the solver that BDIA wraps, such as 'euler' or 'heun', got {base!r}; "
            "sample_bdia applies bdia itself"
        )
    if not isinstance(base, (str, Solver)):
        raise TypeError(
            f"base must be a registered solver name such as 'euler' or a Solver, "
            f"got {type(base).__name__}"
        )
    return bdia(get_solver(base) if isinstance(base, str) else base, gamma)


def _callback(
    callback: KCallback | None, sigmas: Tensor, dtype: torch.dtype | None
) -> KCallback | None:
    """bdia's callback dict translated to k-diffusion's keys (tensors cast to ``dtype``)."""
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")

    def report(info: dict[str, Any]) -> None:
        i = info["i"]
        x, denoised = info["x"], info["denoised"]
        if dtype is not None:
            x, denoised = x.to(dtype), denoised.to(dtype)
        sigma = sigmas[i]
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})

    return report


def _model_dtype(model: Any, model_dtype: torch.dtype | str | None) -> Any:
    """The dtype the model gets ``x`` in: ``model_dtype``, else at least float32.

    Not the parameters' dtype (``DiffusionODE``'s default): a k-diffusion wrapper around a
    half-precision network takes float32 and casts for the network itself, and rounding
    ``x`` to float16 before it would change its float32 arithmetic (the skip path
    ``x + c_out eps``) and its result.
    """
    if model_dtype is not None or not isinstance(model, torch.nn.Module):
        return model_dtype
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None if dtype is None else torch.promote_types(dtype, torch.float32)


def _state_dtype(x: Any, state_dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``state_dtype``, else ``x``'s dtype promoted to at least float32.

    k-diffusion samples a half-precision ``x`` in its own dtype; bdia refuses a half state
    (its rounding would swamp the trajectory and the round trip), so a float16 or bfloat16
    ``x`` gets a float32 state, as ``BDIAScheduler`` keeps one under a half pipeline. The
    result still comes back in ``x``'s dtype.
    """
    if state_dtype is not None or not isinstance(x, Tensor) or not x.is_floating_point():
        return state_dtype
    return torch.promote_types(x.dtype, torch.float32)


def _progress(disable: Any) -> bool | None:
    """k-diffusion's ``disable`` as bdia's ``progress``: None shows a bar only on a terminal."""
    return None if disable is None else not disable


@torch.no_grad()
def sample_bdia(
    model: Callable[..., Tensor],
    x: Tensor | StatePair,
    sigmas: Tensor | Sequence[float],
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    gamma: GammaSpec = DEFAULT_GAMMA,
    base: str | Solver = "euler",
    return_pair: bool = False,
    state_dtype: torch.dtype | str | None = None,
    model_dtype: torch.dtype | str | None = None,
) -> Tensor | StatePair:
    """BDIA sampling from ``sigmas[0]`` to ``sigmas[-1]``, called like k-diffusion's samplers.

    Args:
        model: ``model(x, sigma, **extra_args) -> denoised`` with ``sigma`` of shape
            ``(batch,)``: a k-diffusion denoiser wrapper such as ``CompVisDenoiser``.
        x: the noisy start at ``sigmas[0]`` (usually ``noise * sigmas[0]``), ``(batch, ...)``;
            or the ``StatePair`` that ``invert_bdia`` returned, from which BDIA retraces the
            sampling trajectory exactly.
        sigmas: 1-D tensor of EDM noise levels, strictly monotonic, usually ending with 0.
        extra_args: keyword arguments for every model call (conditioning, class labels).
        callback: called after every step with ``{"x", "i", "sigma", "sigma_hat",
            "denoised"}``: ``x`` the state at ``sigmas[i]`` that the step started from,
            ``sigma`` and ``sigma_hat`` both ``sigmas[i]`` (no churn), ``i`` = 0 .. n - 1
            (from 1 when ``x`` is a pair).
        disable: True hides the progress bar; None (k-diffusion's default) shows it only
            on a terminal.
        gamma: BDIA's gamma; the default 0.96 damps the parasitic mode and keeps
            inversion's amplification small (see ``DEFAULT_GAMMA``). 0 is the base solver.
        base: the single-step solver BDIA wraps, a registered name or a Solver.
        return_pair: return the final ``StatePair`` (x at ``sigmas[-2]`` and
            ``sigmas[-1]``, with their low words) instead of a tensor: the input of
            ``invert_bdia``, kept whole for an exact inversion.
        state_dtype: dtype of the solver state (``torch.float64`` for a float64 state);
            defaults to ``x``'s, float32 for a float16 or bfloat16 ``x`` (a half state is
            refused).
        model_dtype: the dtype ``x`` is cast to before each model call. None: float32, or
            float64 when the model is an ``nn.Module`` with float64 parameters; a plain
            function gets the state dtype. So a float32 ``x`` reaches the model unchanged, as
            k-diffusion passes it, even when a wrapper (``CompVisDenoiser``, a CFG wrapper)
            holds a float16 network and casts for it; a float64 state still reaches a float32
            network in float32. A float16 network that does not cast its input itself needs
            ``torch.float16``.

    Returns:
        x at ``sigmas[-1]`` in ``x``'s dtype, or the final pair in the state dtype.
    """
    grid, sigma_tensor = _sigmas(sigmas)
    # What the caller sees comes back in the caller's dtype, as from k-diffusion; only the
    # pair, the exact state, stays in the state dtype.
    dtype = x.later.dtype if isinstance(x, StatePair) else getattr(x, "dtype", None)
    ode = DiffusionODE(
        model, EDM(), model_dtype=_model_dtype(model, model_dtype), cond=_extra_args(extra_args)
    )
    solver = _solver(base, gamma)
    out = sample(
        ode,
        solver,
        x,
        grid,
        return_pair=return_pair,
        progress=_progress(disable),
        callback=_callback(callback, sigma_tensor, dtype),
        state_dtype=_state_dtype(x, state_dtype),
    )
    if isinstance(out, Tensor):
        return out if dtype is None else out.to(dtype)
    assert isinstance(out, StatePair)  # bdia's pair; only edict and reversible make others
    return out


@torch.no_grad()
def invert_bdia(
    model: Callable[..., Tensor],
    pair_or_x: StatePair | Tensor,
    sigmas: Tensor | Sequence[float],
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    gamma: GammaSpec = DEFAULT_GAMMA,
    base: str | Solver = "euler",
    state_dtype: torch.dtype | str | None = None,
    model_dtype: torch.dtype | str | None = None,
) -> StatePair:
    """The exact inverse of ``sample_bdia``: back from ``sigmas[-1]`` to ``sigmas[0]``.

    Give the same ``model``, ``sigmas`` (the sampling grid, noisiest first), ``extra_args``,
    ``gamma`` and ``base`` as to ``sample_bdia``. From the pair that ``sample_bdia(...,
    return_pair=True)`` returned, low words included, the result is the start of sampling
    to about twice the state dtype's precision. A single tensor works only where the grid
    ends at sigma > 0 (its first step back is an approximate base step); at the usual final
    sigma = 0 the model cannot be evaluated, and ``bdia.invert`` raises: keep the pair.

    ``model``, ``extra_args``, ``gamma`` (> 0), ``base``, ``state_dtype`` and
    ``model_dtype`` are as in ``sample_bdia``.

    Args:
        pair_or_x: the ``StatePair`` from ``sample_bdia(..., return_pair=True)``, or x at
            ``sigmas[-1]`` when that is above 0.
        sigmas: the sampling grid, as given to ``sample_bdia``.
        callback: as in ``sample_bdia``, with ``i`` counting down from the last evaluated
            grid index to 1 and ``x`` the state at ``sigmas[i]``.
        disable: as in ``sample_bdia``.

    Returns:
        ``StatePair`` of x at ``sigmas[0]`` (``.earlier``, the noise) and at ``sigmas[1]``,
            in the state dtype.
    """
    grid, sigma_tensor = _sigmas(sigmas)
    ode = DiffusionODE(
        model, EDM(), model_dtype=_model_dtype(model, model_dtype), cond=_extra_args(extra_args)
    )
    solver = _solver(base, gamma)
    return invert(
        ode,
        solver,
        pair_or_x,
        grid,
        progress=_progress(disable),
        callback=_callback(callback, sigma_tensor, None),
        state_dtype=_state_dtype(pair_or_x, state_dtype),
    )
