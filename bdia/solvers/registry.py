"""The name-to-solver table, above every solver (torchdiffeq's way): no solver imports it.

``get_solver(name, **options)`` builds a registered single-step solver; ``"bdia-<name>"``
wraps one in BDIA. ``register_solver`` and ``register_tableau`` add methods; ``bdia(solver,
gamma)``, ``edict(solver, p)`` and ``reversible(solver, coupling)`` take a solver or a
registered name.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from .base import SingleStepSolver, Solver
from .bidirectional import BidirectionalWrapper, GammaSpec
from .coupled import EDICTWrapper, ReversibleWrapper
from .exponential import (
    DDIM,
    DPMSolver1,
    DPMSolver2,
    DPMSolver3,
    DPMSolverPP1,
    DPMSolverPP2S,
    DPMSolverPP3S,
)
from .runge_kutta import EULER, HEUN, MIDPOINT, RK4, ButcherTableau, ExplicitRungeKutta

__all__ = [
    "register_solver",
    "register_tableau",
    "get_solver",
    "available_solvers",
    "bdia",
    "edict",
    "reversible",
]

SolverFactory = Callable[..., Solver]
_REGISTRY: dict[str, SolverFactory] = {}
F = TypeVar("F", bound=SolverFactory)


def register_solver(name: str) -> Callable[[F], F]:
    """Decorator that registers a solver class (or any factory returning a Solver) under ``name``.

    ``get_solver(name, **options)`` then calls ``factory(**options)``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a solver name must be a non-empty string, got {name!r}")
    if name.startswith("bdia"):
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
        gamma = options.pop("gamma", 1.0)
        base = name[len("bdia-") :]
        if base not in _REGISTRY:
            _lookup(name)  # raises, suggesting close 'bdia-' names
        return bdia(get_solver(base, **options), gamma=gamma)
    factory = _lookup(name)
    _check_options(name, factory, options)
    solver = factory(**options)
    if not isinstance(solver, Solver):
        # Caught here, not at the first step of a run that was handed a non-solver.
        raise TypeError(
            f"the factory registered as {name!r} ({getattr(factory, '__qualname__', factory)}) "
            f"returned {type(solver).__name__}, not a Solver; register a Solver subclass or a "
            "function that returns an instance of one"
        )
    return solver


def available_solvers() -> list[str]:
    """Names of all registered solvers, sorted."""
    return sorted(_REGISTRY)


def register_tableau(name: str, tableau: ButcherTableau) -> None:
    """Register an explicit Runge-Kutta method as solver ``name``.

    For example ``register_tableau("ralston", ButcherTableau(c=(0, 2/3), a=((), (2/3,)),
    b=(1/4, 3/4), order=2))``.
    """
    if not isinstance(tableau, ButcherTableau):
        raise TypeError(
            f"register_tableau needs a ButcherTableau, got {type(tableau).__name__}; build one "
            "with ButcherTableau(c=..., a=..., b=..., order=...)"
        )

    def factory() -> ExplicitRungeKutta:
        return ExplicitRungeKutta(tableau, name)

    register_solver(name)(factory)


def bdia(solver: Solver | str, gamma: GammaSpec = 1.0) -> BidirectionalWrapper:
    """Wrap ``solver`` (an instance or a registered name) as a time-reversible BDIA scheme.

    ``gamma = 1`` (the default; with Euler or DDIM the leapfrog scheme) keeps inversion free
    of amplification but is only weakly stable: the parasitic mode, which flips sign every
    step, is not damped, and on a dissipative problem (``y' = -5 y``, or a diffusion ODE as
    the noise level falls) it grows by about ``1 + mu`` per step where the exact flow
    contracts by ``e^-mu``. A gamma below 1 damps it only where ``gamma (1 + mu) < 1``, that
    is for steps small against the problem's rates: on ``y' = -5 y`` with ``h = 0.05``
    (``mu = 0.25``) gamma = 0.96 still grows, and only a single-step solver or a small gamma
    is stable. See the theory page, "Stability: the parasitic mode".

    Args:
        solver: the base single-step solver, or its registered name.
        gamma: a number in [0, 1], one value per two-step update, or ``"obelm"``.

    Returns:
        A BidirectionalWrapper, usable wherever ``sample``, ``invert`` or ``odeint`` take a solver.
    """
    base = get_solver(solver) if isinstance(solver, str) else solver
    # The wrapper's __post_init__ refuses a solver that is not single-step (with a TypeError
    # that names it) and turns a sequence of gammas into a tuple.
    return BidirectionalWrapper(base, gamma)  # type: ignore[arg-type]


def edict(solver: SingleStepSolver | str, p: float = 0.93) -> EDICTWrapper:
    """Wrap ``solver`` (an instance or a registered name) as EDICT's coupled, exactly
    invertible scheme (Wallace, Gokul & Naik 2023).

    Two chains ``x, y`` start at the same state and take turns stepping with the base
    increment evaluated at the other; ``p`` mixes them after every step. See the theory page,
    "Other reversible schemes: EDICT and McCallum-Foster".

    Args:
        solver: the base single-step solver, or its registered name.
        p: the mixing weight, in (0, 1]; EDICT's default 0.93. The inverse divides by ``p``.

    Returns:
        An EDICTWrapper (name ``"edict-<base>"``), usable wherever ``sample`` or ``invert``
        take a solver; ``return_pair`` gives a ``CoupledPair``. Each step costs two base steps.
    """
    base = get_solver(solver) if isinstance(solver, str) else solver
    return EDICTWrapper(base, p)


def reversible(solver: SingleStepSolver | str, coupling: float = 0.999) -> ReversibleWrapper:
    """Wrap ``solver`` (an instance or a registered name) in McCallum and Foster's
    algebraically reversible scheme (2024; diffrax's ``Reversible``).

    Two chains ``y, z``: ``y`` steps forward from ``z`` and is coupled to its old value by
    ``coupling``; ``z`` steps back from the new ``y``. It keeps the base's order. See the
    theory page, "Other reversible schemes: EDICT and McCallum-Foster".

    Args:
        solver: the base single-step solver, or its registered name.
        coupling: lambda, in (0, 1]; default 0.999. The inverse divides by it.

    Returns:
        A ReversibleWrapper (name ``"reversible-<base>"``), usable wherever ``sample`` or
        ``invert`` take a solver, on grids without a point at sigma = 0; ``return_pair``
        gives a ``CoupledPair``. Each step costs two base steps.
    """
    base = get_solver(solver) if isinstance(solver, str) else solver
    return ReversibleWrapper(base, coupling)


for _name, _tableau in (("euler", EULER), ("heun", HEUN), ("midpoint", MIDPOINT), ("rk4", RK4)):
    register_tableau(_name, _tableau)
for _name, _cls in (
    ("ddim", DDIM),
    ("dpm_solver_1", DPMSolver1),
    ("dpm_solver_2", DPMSolver2),
    ("dpm_solver_3", DPMSolver3),
    ("dpm_solver_pp_1", DPMSolverPP1),
    ("dpm_solver_pp_2s", DPMSolverPP2S),
    ("dpm_solver_pp_3s", DPMSolverPP3S),
):
    register_solver(_name)(_cls)
