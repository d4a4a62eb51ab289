"""Check bdia against diffusers on your own UNet and scheduler.

``diffusers_states`` runs diffusers' own sampling loop (as its pipelines do) and keeps every
state; ``bdia_states`` runs the named bdia solver on ``from_diffusers`` and
``diffusers_grid`` of the same scheduler. ``relative_difference`` compares the two state by
state. The tests and ``benchmarks/diffusers_parity.py`` use these; a user can too, on real
weights:

    ref = diffusers_states(unet, DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
                           noise, 50)
    ours = bdia_states(unet, scheduler, "ddim", noise, 50)
    print(relative_difference(ours, ref))
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...sampling import sample
from ...solvers.registry import get_solver
from ._scheduler_config import _scheduler
from .adapter import from_diffusers
from .grid import diffusers_grid

__all__ = ["diffusers_states", "bdia_states", "relative_difference"]


@torch.no_grad()
def diffusers_states(
    unet: Any, scheduler: Any, noise: Tensor, num_inference_steps: int, **unet_kwargs: Any
) -> list[Tensor]:
    """diffusers' sampling loop on a copy of ``scheduler``; every state, the start first.

    Args:
        unet: the network, called as ``unet(scale_model_input(x, tau), tau, **unet_kwargs)``.
        scheduler: a diffusers scheduler (not modified).
        noise: unit-variance noise of shape ``(batch, channels, height, width)``; the loop
            starts from ``noise * init_noise_sigma``, as pipelines do.
        num_inference_steps: passed to ``set_timesteps``.

    Returns:
        ``num_inference_steps + 1`` tensors of ``noise``'s shape (the states diffusers keeps,
        in the scheduler's space and dtype).
    """
    s = copy.deepcopy(scheduler)
    s.set_timesteps(num_inference_steps)
    x = noise * s.init_noise_sigma
    states = [x]
    for tau in s.timesteps:
        out = unet(s.scale_model_input(x, tau), tau, **unet_kwargs)
        x = s.step(out.sample if hasattr(out, "sample") else out[0], tau, x).prev_sample
        states.append(x)
    return states


@torch.no_grad()
def bdia_states(
    unet: Any,
    scheduler: Any,
    solver: str,
    noise: Tensor,
    num_inference_steps: int,
    **cond: Any,
) -> Tensor:
    """The bdia solver named ``solver`` on the same problem; every grid state, the start first.

    The start is diffusers' own, ``noise * init_noise_sigma`` after ``set_timesteps``: ``noise``
    in VP space, ``noise * sigma_max`` in EDM space, and ``noise * sqrt(sigma_max^2 + 1)`` for
    an EDM scheduler with ``"leading"`` spacing and for the EDM-preconditioned ones
    (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``). ``cond`` goes to
    ``from_diffusers`` (guidance included).

    Returns:
        Tensor of shape ``(len(grid), *noise.shape)`` in ``noise``'s dtype.
    """
    ode = from_diffusers(unet, scheduler, **cond)
    ts = diffusers_grid(scheduler, num_inference_steps)
    # diffusers_states' start: under "leading" spacing an EDM scheduler's init_noise_sigma is
    # sqrt(sigma_max^2 + 1), not the grid's first noise level, and so is an
    # EDM-preconditioned scheduler's.
    fresh = copy.deepcopy(_scheduler(scheduler))
    fresh.set_timesteps(num_inference_steps)
    start = noise * fresh.init_noise_sigma
    return sample(ode, get_solver(solver), start, ts, trajectory=True, progress=False)


def relative_difference(ours: Sequence[Tensor] | Tensor, reference: Sequence[Tensor]) -> float:
    """``max_k max|ours[k] - reference[k]| / max|reference[k]|`` over the common states."""
    worst = 0.0
    for a, b in zip(ours, reference):
        b = b.to(a.dtype)
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst
