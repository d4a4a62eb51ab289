"""The bdia time grid of the timesteps (or sigmas) diffusers would use:
``diffusers_grid(scheduler, num_inference_steps)`` gives the times at which the scheduler's
``set_timesteps`` has the network called, for the ODE that ``from_diffusers`` builds of the
same scheduler (see ``docs/diffusers.md``).

In VP and EDM space the grid is checked to stay on the noise table, where the unet has
timesteps; flow-matching and EDM-preconditioned schedulers' sigmas are taken as diffusers
makes them. ``diffusers_grid`` is importable from ``bdia.integrations.diffusers`` and from
``bdia.integrations.diffusers.adapter``, where it used to live.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...schedules import Schedule, check_steps
from ._scheduler_config import (
    _SIGMA_SLACK,
    _SIGMA_SPACINGS,
    _check_edm_config,
    _check_flow_config,
    _check_schedule_config,
    _clean_end,
    _continuous,
    _is_preconditioned,
    _schedule,
    _scheduler,
    _space,
    _table,
)

__all__ = ["diffusers_grid"]

# EDMDPMSolverMultistepScheduler's final_sigmas_type="sigma_min" appends config.sigma_min after
# its last sigma, which is sigma_min by its own float32 Karras or exponential formula: the
# same noise level to 1.02e-6 relative (measured over sigma_min 1e-4 .. 0.5, sigma_max 14.6
# .. 120 and 2 to 1000 steps), a last step of no length that the grid leaves out, as it does
# EDMEulerScheduler's exact repeat.
_REPEAT_SLACK = 1e-5


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
    if sigmas is not None and "sigmas" not in inspect.signature(fresh.set_timesteps).parameters:
        raise ValueError(
            f"sigmas: {name}.set_timesteps takes no custom sigmas (only a step count); leave "
            "them out"
        )
    # FlowMatchHeunDiscreteScheduler's set_timesteps takes neither mu nor sigmas.
    passed = {k: v for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None}
    fresh.set_timesteps(num_inference_steps, **passed)
    made = [float(v) for v in torch.as_tensor(fresh.sigmas).detach().cpu().reshape(-1)]
    if getattr(fresh, "order", 1) == 2:
        # FlowMatchHeunDiscreteScheduler lists each sigma between the first and the final 0
        # twice, the end of one Heun step and the start of the next: one grid point each.
        made = made[:1] + made[1:-1:2] + made[-1:]
    if len(made) > 2 and made[-1] == made[-2] == 0.0:
        # A scheduler whose sigma_min a pipeline set to 0 (ZImagePipeline in diffusers 0.36
        # to 0.38) ends its own spacing at 0 before the final 0: a last step of no length,
        # which moves nothing, and which the grid leaves out.
        made.pop()
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


def _check_fraction(value: Any, name: str) -> float:
    """``denoising_start`` or ``denoising_end``: a Python float in (0, 1), the only values the
    SDXL pipelines act on (they ignore an int, a numpy float32 or a float outside)."""
    if not isinstance(value, float):
        raise TypeError(
            f"{name} must be a float in (0, 1), as the SDXL pipelines take it (they ignore "
            f"anything else), got {value!r}"
        )
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{name} = {value!r} lies outside (0, 1), where the SDXL pipelines ignore it and "
            "run every step; leave it out for that"
        )
    return value


def _cutoff(sched: Any, fraction: float) -> int:
    """The SDXL pipelines' ``discrete_timestep_cutoff`` of ``denoising_start`` or
    ``denoising_end``: the timestep ``round(N - f N)``, in their float arithmetic."""
    n = sched.config.num_train_timesteps
    return int(round(n - (fraction * n)))


def _ensemble_part(
    sched: Any,
    num_inference_steps: int,
    times: list[float],
    start: float | None,
    end: float | None,
) -> list[float]:
    """The part of the grid ``times`` that an SDXL pipeline with ``denoising_start`` and/or
    ``denoising_end`` runs: as ``StableDiffusionXLPipeline`` and
    ``StableDiffusionXLImg2ImgPipeline`` cut the scheduler's ``timesteps``, the base keeping
    those at or above ``round(N - end N)`` and the refiner the ones below ``round(N - start
    N)``. Each kept timestep's step ends at the next one, so the base's part ends at the
    first timestep it leaves out, which is where the refiner's begins."""
    name = type(sched).__name__
    fresh = copy.deepcopy(sched)
    fresh.set_timesteps(num_inference_steps)
    timesteps = torch.as_tensor(getattr(fresh, "forward_timesteps", fresh.timesteps)).cpu()
    taus = [float(v) for v in timesteps.reshape(-1)]
    if getattr(fresh, "order", 1) != 1 or any(a <= b for a, b in zip(taus, taus[1:])):
        raise ValueError(
            f"denoising_start and denoising_end cut the list of {name}'s timesteps, which has "
            "two unet calls for some steps (a second-order scheduler, or PNDM's repeated "
            "second timestep), and the SDXL pipelines' cut of it does not split the run in "
            "two: Heun's base stops halfway through a step that its refiner takes again from "
            "the start; use a scheduler with one unet call a step (DDIM, Euler, DPM-Solver, "
            "UniPC, ...)"
        )
    count, last = len(taus), len(times) - 1
    # Distinct timesteps make distinct grid points, one each, then the end point unless the
    # last timestep sits on it.
    assert last in (count - 1, count), (times, taus)
    first = 0
    if start is not None:
        cutoff = _cutoff(sched, start)
        first = count - int((timesteps < cutoff).sum())
        if first >= last:
            raise ValueError(
                f"denoising_start = {start!r} leaves the refiner no step: the pipelines run the "
                f"timesteps below {cutoff} = round(N - denoising_start N), and {name}'s "
                f"{num_inference_steps} steps have {count - first} there "
                f"({taus[-1]:g} is the last timestep); use a smaller denoising_start"
            )
    stop = last
    if end is not None:
        cutoff = _cutoff(sched, end)
        kept = int((timesteps[first:] >= cutoff).sum())
        if kept == 0:
            raise ValueError(
                f"denoising_end = {end!r} leaves no step: the pipelines run the timesteps at "
                f"or above {cutoff} = round(N - denoising_end N), and {name}'s "
                f"{num_inference_steps} steps begin at {taus[first]:g}; use a larger "
                "denoising_end"
            )
        if first + kept < count:
            stop = first + kept
    return times[first : stop + 1]


def diffusers_grid(
    scheduler: Any,
    num_inference_steps: int | None,
    *,
    space: str | None = None,
    mu: float | None = None,
    sigmas: Any = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
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
      shifted as diffusers shifts them. ``FlowMatchHeunDiscreteScheduler``'s distinct
      ``sigmas`` (it lists each but the first and the final 0 twice), which are
      ``FlowMatchEulerDiscreteScheduler``'s of the same ``shift``: its Heun steps go between
      them and its last, an Euler step, to 0. A scheduler whose ``sigma_min`` is 0 (which
      ``ZImagePipeline`` sets in diffusers 0.36 to 0.38) ends its spacing at 0 before the
      final 0: that last step has no length and the grid leaves it out.
    - With ``denoising_end`` and/or ``denoising_start``: the part of that grid which
      ``StableDiffusionXLPipeline(denoising_end=f)`` (the base of SDXL's ensemble of expert
      denoisers) and ``StableDiffusionXLImg2ImgPipeline(denoising_start=f)`` (the refiner, on
      the base's latents) run. They cut the scheduler's ``timesteps`` at ``c = round(N - f
      N)``: the base keeps the timesteps at or above ``c`` and the refiner those below, so
      the base's part ends at the first timestep it leaves out, where the refiner's part
      begins (the same point for the same ``f``, scheduler config and step count). The SDXL
      inpainting and ControlNet pipelines cut alike.

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
        denoising_start: VP and EDM space only, the refiner's ``denoising_start`` (a float in
            (0, 1)): the grid from the first timestep below ``round(N - denoising_start N)``
            to the end.
        denoising_end: VP and EDM space only, the base's ``denoising_end`` (a float in (0,
            1)): the grid from the start (from ``denoising_start``'s point, with both) to the
            first timestep below ``round(N - denoising_end N)``, or to the end where every
            timestep is kept.

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
            per step. ``sigmas`` outside flow space, or with a scheduler whose
            ``set_timesteps`` takes none (``FlowMatchHeunDiscreteScheduler``). For an
            EDM-preconditioned scheduler, algorithm_type 'sde-dpmsolver++', a sigma_data that
            is not a positive finite number, and sigmas that do not decrease (a sigma_min not
            below sigma_max) or leave no step (EDMEulerScheduler's one step with
            final_sigmas_type 'sigma_min').
            ``denoising_start`` or ``denoising_end`` outside (0, 1), in flow space, with a
            scheduler that calls the unet more than once a step (Heun, KDPM2, PNDM: the
            pipelines' cut splits a step), or leaving no step; ``denoising_start`` not below
            ``denoising_end``.
        TypeError: ``denoising_start`` or ``denoising_end`` not a Python float.
    """
    if sigmas is None or num_inference_steps is not None:
        num_inference_steps = check_steps(num_inference_steps, "num_inference_steps")
    if denoising_start is not None:
        denoising_start = _check_fraction(denoising_start, "denoising_start")
    if denoising_end is not None:
        denoising_end = _check_fraction(denoising_end, "denoising_end")
    if denoising_start is not None and denoising_end is not None:
        if denoising_start >= denoising_end:
            raise ValueError(
                f"denoising_start = {denoising_start!r} is not below denoising_end = "
                f"{denoising_end!r}, which leaves no step (StableDiffusionXLImg2ImgPipeline "
                "refuses them too)"
            )
    sched = _scheduler(scheduler)
    space = _space(sched, space)
    if space == "flow":
        if denoising_start is not None or denoising_end is not None:
            raise ValueError(
                "denoising_start and denoising_end are the SDXL pipelines' ensemble of expert "
                f"denoisers, with a noise-table or EDM scheduler; {type(sched).__name__} is a "
                "flow-matching scheduler, whose pipelines (SD3, Flux) take neither; leave "
                "them out"
            )
        if sigmas is not None:
            sigmas = _custom_sigmas(sigmas, num_inference_steps)
        return _flow_grid(sched, num_inference_steps, mu, sigmas)
    grid = _table_grid(sched, space, num_inference_steps, mu, sigmas)
    if denoising_start is None and denoising_end is None:
        return grid
    assert num_inference_steps is not None  # checked above, sigmas being None
    times = [float(t) for t in grid.tolist()]
    part = _ensemble_part(sched, num_inference_steps, times, denoising_start, denoising_end)
    return torch.tensor(part, dtype=torch.float64)


def _table_grid(
    sched: Any, space: str, num_inference_steps: int | None, mu: Any, sigmas: Any
) -> Tensor:
    """``diffusers_grid`` in VP or EDM space: of a noise table, or EDM-preconditioned."""
    if sigmas is not None:
        raise ValueError(
            f"sigmas are the custom sigmas of a flow-matching scheduler; "
            f"{type(sched).__name__} takes none here; leave them out"
        )
    assert num_inference_steps is not None  # checked by diffusers_grid, sigmas being None
    if mu is not None:
        raise ValueError(
            f"mu is the shift of a flow-matching scheduler's dynamic shifting; "
            f"{type(sched).__name__} takes none; leave it out"
        )
    if _is_preconditioned(sched):
        return _edm_grid(sched, num_inference_steps)
    _check_schedule_config(sched, space)
    table = _table(sched, space)
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
