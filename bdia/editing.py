"""Inversion and editing: data to noise under one conditioning, back under another.

``Inversion.of(ode, solver, data, ts)`` runs ``invert`` on data taken as the state at
``ts[-1]`` (a noise level above 0: the model cannot be evaluated at sigma = 0, unless it
predicts the flow, whose data may be taken at t = 0) and keeps what
is needed to come back: the source ODE, the solver, the grid and the pair.
``reconstruct()`` returns the data (exactly, up to rounding, for a BDIA solver), and
``regenerate(target)`` samples under another ODE (another class label or prompt): an edit.

Why an edit does not continue the pair. A BDIA pair carries, beside the trajectory, the
two-step scheme's parasitic mode: the part of ``(x_k, x_{k+1})`` that alternates in sign from
step to step. Under the ODE that made the pair it cancels exactly on the way back; under any
other ODE it does not, and toward the data it grows. On the shipped digits model (360
held-out digits inverted under their label by bdia(euler, 0.96), regenerated under label + 1)
continuing the pair leaves values far outside [-1, 1] (to 41.7 at 10 steps, 8.1 at 35), and at
35 steps the classifier reads the new label 0.0% of the time. The base solver started from
the inverted noise ``pair.earlier`` (rule ``"base"``, the default) reads as the new label
98.9-100% of the time at 10, 20 and 35 steps with values in [-1.04, 1.16]. Restarting BDIA
from the noise (rule ``"restart"``: its first step is a plain base step, so the mode starts at
zero) does as well from 20 steps on (98.9-99.2%) but overshoots at 10 (values to 3.6); its
edit is a BDIA trajectory, so it can itself be inverted exactly. ``benchmarks/editing.py``
measures these; docs/benchmarks/editing.md has the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .ode import ODE
from .pairs import CoupledPair, StatePair
from .sampling import Callback, _grid, invert, sample
from .solvers.base import Solver

__all__ = ["Inversion", "edit", "EDIT_RULES"]

#: How ``Inversion.regenerate`` samples under a new ODE, from the inverted noise
#: (``Inversion.noise``): ``"base"`` (the default) with the single-step solver a reversible
#: solver wraps (``solver.base``), ``"restart"`` with the inversion's own solver (a fresh
#: trajectory, whose result can itself be inverted exactly).
EDIT_RULES = ("base", "restart")


@dataclass(frozen=True)
class Inversion:
    """Data inverted to noise under a source ODE; build it with ``Inversion.of``.

    Attributes:
        ode: the source ODE (its conditioning is the data's own).
        solver: the solver that inverted the data: ``bdia``, ``edict`` or ``reversible``
            around any single-step solver (or a plain solver, whose inversion is
            approximate).
        ts: the grid, a float64 tensor of shape ``(steps + 1,)``, noisiest first; the data are
            the state at ``ts[-1]``.
        pair: what ``invert`` returned, in the state dtype, low words and the source ODE's
            fingerprint included: ``StatePair(x at ts[0], x at ts[1])`` for BDIA, the
            ``CoupledPair`` of both chains at ``ts[0]`` for ``edict`` and ``reversible``.
    """

    ode: ODE
    solver: Solver
    ts: Tensor
    pair: StatePair | CoupledPair

    @classmethod
    def of(
        cls,
        ode: ODE,
        solver: Solver,
        data: Tensor,
        ts: Tensor | Sequence[float],
        *,
        state_dtype: torch.dtype | str | None = None,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> Inversion:
        """Invert ``data`` (shape ``(batch, ...)``, the state at ``ts[-1]``) under ``ode``.

        With a BDIA solver the first step backward, which makes the pair, is an approximate
        base step and everything after it is exact; ``edict`` and ``reversible`` are exact
        from the first step. Either way ``reconstruct()`` returns ``data`` up to rounding.
        ``data`` is not modified.

        Raises:
            ValueError: if ``ts[-1]`` is a noise level of 0 where the model cannot be
                evaluated (build the grid with ``final_zero=False``; a flow network can be
                evaluated there), if ``ts`` is not noisiest first (for an ODE with a
                schedule), or as ``bdia.invert``.
        """
        grid = _grid(ts, ode)
        if ode.is_terminal(grid[-1]):
            raise ValueError(
                f"the data are taken as the state at ts[-1] = {grid[-1]}, where sigma = 0 and "
                "the model cannot be evaluated; end the grid at a small noise level instead, "
                "e.g. bdia.karras_grid(steps, final_zero=False)"
            )
        schedule = getattr(ode, "schedule", None)
        if schedule is not None and schedule.sigma_bar(grid[0]) < schedule.sigma_bar(grid[-1]):
            # The grid of the inversion's direction, from the data up, would take the data
            # at its noisiest point and "invert" them down to its least noisy.
            raise ValueError(
                f"ts runs from noise level {schedule.sigma_bar(grid[0]):.4g} up to "
                f"{schedule.sigma_bar(grid[-1]):.4g}; it must run noisiest first, ending at the "
                "data's noise level (the data are the state at ts[-1]): pass ts.flip(0)"
            )
        with torch.no_grad():
            pair = invert(
                ode,
                solver,
                data,
                grid,
                progress=progress,
                callback=callback,
                state_dtype=state_dtype,
            )
        return cls(ode, solver, torch.tensor(grid, dtype=torch.float64), pair)

    @property
    def noise(self) -> Tensor:
        """The inverted noise, the state at ``ts[0]`` (shape ``(batch, ...)``): the pair's
        earlier state, or the result chain of a ``CoupledPair``."""
        if isinstance(self.pair, CoupledPair):
            return self.pair.x
        return self.pair.earlier

    def reconstruct(
        self, *, progress: bool | None = None, callback: Callback | None = None
    ) -> Tensor:
        """The data back, sampled from the pair under the source ODE (exact up to rounding
        for a reversible solver)."""
        with torch.no_grad():
            return sample(
                self.ode, self.solver, self.pair, self.ts, progress=progress, callback=callback
            )

    def regenerate(
        self,
        target: ODE,
        *,
        rule: str = "base",
        return_pair: bool = False,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> Any:
        """Sample from the inverted noise under ``target`` (an edit), by ``rule``.

        Args:
            target: the ODE to sample under: the same model with other conditioning.
            rule: ``"base"`` (default): the single-step solver the inversion's solver wraps
                (``solver.base``: the solver itself when it is plain) from the noise at
                ``ts[0]``. ``"restart"``: the inversion's own solver from the noise; for BDIA
                a fresh trajectory whose parasitic mode starts at zero, for ``edict`` and
                ``reversible`` fresh chains both at the noise; its result can be inverted
                exactly under ``target`` (with ``return_pair=True``), at the cost of
                overshoot on coarse grids with BDIA. Continuing the pair itself is what
                neither does (see the module docstring).
            return_pair: return the final pair instead of the data.

        Returns:
            The regenerated data at ``ts[-1]`` (shape ``(batch, ...)``, the state dtype),
            or the final pair.

        Raises:
            ValueError: for an unknown ``rule``, or a ``target`` with another schedule than
                the source ODE (the grid's times would be other noise levels), or as
                ``bdia.sample``.
        """
        _check_rule(rule)
        _check_target(self.ode, target)
        solver = self.solver.base if rule == "base" else self.solver
        with torch.no_grad():
            return sample(
                target,
                solver,
                self.noise,
                self.ts,
                return_pair=return_pair,
                progress=progress,
                callback=callback,
            )


def _check_rule(rule: str) -> None:
    if rule not in EDIT_RULES:
        choices = ", ".join(map(repr, EDIT_RULES))
        raise ValueError(f"rule must be one of {choices}, got {rule!r}")


def _schedule(ode: ODE) -> tuple[str, str]:
    """What the grid's times mean under ``ode``: its schedule's name and digest (a plain ODE
    has none: its times are its own)."""
    digest = ode.time_fingerprint()
    if not digest:
        return "no schedule (a plain ODE)", ""
    return repr(getattr(ode, "schedule", None)), digest


def _check_target(source: ODE, target: Any) -> None:
    """Raise ValueError unless ``target`` reads the grid's times as ``source`` does.

    The inverted noise is the state at ``ts[0]`` under the source's schedule; under another
    schedule the same times are other noise levels (and another scaling of the state), so
    sampling from it would start from a state that is not noise at that level, and nothing
    downstream would notice."""
    if not isinstance(target, ODE):
        return  # sample's own check names what an ODE is
    (src_name, src), (tgt_name, tgt) = _schedule(source), _schedule(target)
    if src != tgt:
        raise ValueError(
            f"the target ODE has {tgt_name}, the source {src_name}: the inverted noise is the "
            "state at ts[0] under the source's schedule, which another schedule reads as "
            "another noise level. Regenerate under the same schedule: the same model with "
            "other conditioning (build the target as the source was, changing only cond)"
        )


def edit(
    source: ODE,
    target: ODE,
    solver: Solver,
    data: Tensor,
    ts: Tensor | Sequence[float],
    *,
    rule: str = "base",
    state_dtype: torch.dtype | str | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Invert ``data`` under ``source`` and regenerate it under ``target``.

    ``Inversion.of(source, solver, data, ts).regenerate(target, rule=rule)`` in one call;
    ``data`` (shape ``(batch, ...)``) is the state at ``ts[-1] > 0``. ``progress`` and
    ``callback`` (as in ``sample``) serve both runs: the inversion, from ``ts[-1]`` back to
    ``ts[0]``, then the regeneration (the callback's ``i`` and ``t`` tell them apart).

    Returns:
        The edited data, same shape, in the state dtype.

    Raises:
        ValueError: if ``target`` has another schedule than ``source`` (checked before the
            inversion runs), or as ``Inversion.of`` and ``Inversion.regenerate``.
    """
    _check_rule(rule)
    _check_target(source, target)
    inversion = Inversion.of(
        source,
        solver,
        data,
        ts,
        state_dtype=state_dtype,
        progress=progress,
        callback=callback,
    )
    return inversion.regenerate(target, rule=rule, progress=progress, callback=callback)
