"""The solver interface and the registry.

A solver is a small immutable object that knows its ``name``, ``order``, ``stages`` (model
evaluations per step when nothing is reused) and whether it ``needs_diffusion``; its one
method ``step`` advances a state from ``t`` to ``t_next`` on either side of ``t``.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor

from ..ode import ODE, Evaluation

__all__ = ["Solver", "register_solver", "get_solver", "available_solvers"]


class Solver(ABC):
    """A single-step ODE solver.

    Subclasses set ``name``, ``order``, ``stages`` and ``needs_diffusion`` (class attributes
    or properties) and implement ``step``. Instances hold no state between calls.
    """

    name: str
    order: int
    stages: int
    needs_diffusion: bool = False

    @abstractmethod
    def step(
        self, ode: ODE, t: float, t_next: float, x: Tensor, first: Evaluation | None = None
    ) -> Tensor:
        """Advance ``x`` from time ``t`` to ``t_next`` (either side of ``t``).

        Args:
            ode: the problem; every model call goes through ``ode.evaluate``.
            t: current time.
            t_next: target time; ``t_next < t`` and ``t_next > t`` are both ordinary steps.
            x: state at ``t``, shape ``(batch, ...)``, any floating dtype.
            first: an evaluation already made at ``(t, x)``, reused instead of calling the
                model again.

        Returns:
            The state at ``t_next``, same shape, dtype and device as ``x``.
        """

    def first_evaluation(
        self, ode: ODE, t: float, x: Tensor, first: Evaluation | None
    ) -> Evaluation:
        """``first`` if given (checked to be at ``t``), else a fresh evaluation at ``(t, x)``."""
        if self.needs_diffusion and not ode.is_diffusion:
            raise TypeError(
                f"solver {self.name!r} is an exponential integrator and needs a DiffusionODE "
                f"(a noise schedule), got {type(ode).__name__}; use a generic solver such as "
                "'euler', 'heun', 'midpoint' or 'rk4' for a plain ODE"
            )
        if first is None:
            return ode.evaluate(t, x)
        if first.t != float(t):
            raise ValueError(
                f"the evaluation passed as `first` is at t = {first.t}, not at t = {t}"
            )
        return first

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, order={self.order}, stages={self.stages})"
        )


SolverFactory = Callable[..., Solver]
_REGISTRY: dict[str, SolverFactory] = {}
F = TypeVar("F", bound=SolverFactory)


def register_solver(name: str) -> Callable[[F], F]:
    """Decorator that registers a solver class (or any factory returning a Solver) under ``name``.

    ``get_solver(name, **options)`` then calls ``factory(**options)``.
    """
    if not name or name.startswith("bdia"):
        raise ValueError(f"invalid solver name {name!r} (names starting with 'bdia' are reserved)")

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"a solver named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _lookup(name: str) -> SolverFactory:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY) + [f"bdia-{n}" for n in _REGISTRY])
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
        raise KeyError(
            f"unknown solver {name!r}{hint} Registered: {', '.join(sorted(_REGISTRY))} "
            "(each also as 'bdia-<name>')"
        ) from None


def _options_of(factory: SolverFactory) -> dict[str, Any] | None:
    """The keyword options ``factory`` takes, with their defaults (``inspect._empty`` for
    none); None when it takes ``**kwargs`` or its signature cannot be read."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    out: dict[str, Any] = {}
    for p in parameters:
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[p.name] = p.default
    return out


def _check_options(name: str, factory: SolverFactory, options: dict[str, Any]) -> None:
    """Raise TypeError naming an option ``factory`` does not take, and the ones it does."""
    accepted = _options_of(factory)
    if accepted is None:
        return
    unknown = [k for k in options if k not in accepted]
    if not unknown:
        return
    if unknown == ["gamma"]:
        # gamma is BDIA's parameter; point to the two spellings that take it.
        gamma = options["gamma"]
        rest = [f"{k}={v!r}" for k, v in options.items() if k != "gamma"]
        wrapped_args = ", ".join([f'"bdia-{name}"', f"gamma={gamma!r}", *rest])
        base_args = ", ".join([f'"{name}"', *rest])
        raise TypeError(
            f"solver {name!r} takes no option 'gamma': gamma belongs to BDIA. Use "
            f"get_solver({wrapped_args}) or bdia(get_solver({base_args}), {gamma!r})"
        )
    if accepted:
        takes = "its options are " + ", ".join(
            k if d is inspect.Parameter.empty else f"{k} (default {d!r})"
            for k, d in accepted.items()
        )
    else:
        takes = "it takes no options"
    if "gamma" in unknown:
        takes += f' (gamma belongs to BDIA: use "bdia-{name}")'
    plural = "s" if len(unknown) > 1 else ""
    raise TypeError(
        f"solver {name!r} has no option{plural} {', '.join(repr(k) for k in unknown)}; {takes}"
    )


def get_solver(name: str, **options: Any) -> Any:
    """Build the solver registered as ``name``.

    ``"bdia-<base>"`` wraps the base solver with ``bdia``; the option ``gamma`` goes to the
    wrapper and the rest to the base. An unknown name raises KeyError listing close matches;
    an option the solver does not take raises TypeError naming the options it does take
    (``gamma`` on a plain name points to ``"bdia-<name>"``).
    """
    if not isinstance(name, str):
        raise TypeError(f"a solver name must be a string, got {type(name).__name__}")
    if name.startswith("bdia-"):
        from .bidirectional import bdia

        gamma = options.pop("gamma", 1.0)
        base = name[len("bdia-") :]
        if base not in _REGISTRY:
            _lookup(name)  # raises, suggesting close 'bdia-' names
        return bdia(get_solver(base, **options), gamma=gamma)
    factory = _lookup(name)
    _check_options(name, factory, options)
    return factory(**options)


def available_solvers() -> list[str]:
    """Names of all registered solvers, sorted."""
    return sorted(_REGISTRY)
