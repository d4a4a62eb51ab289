"""Solvers: the protocol, the single-step families, BDIA, EDICT and McCallum-Foster, and the
name-to-solver table."""

from .base import SingleStepSolver, Solver, SolverState
from .bidirectional import BidirectionalWrapper
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
from .registry import (
    available_solvers,
    bdia,
    edict,
    get_solver,
    register_solver,
    register_tableau,
    reversible,
)
from .runge_kutta import ButcherTableau, ExplicitRungeKutta

__all__ = [
    "Solver",
    "SingleStepSolver",
    "SolverState",
    "available_solvers",
    "get_solver",
    "register_solver",
    "BidirectionalWrapper",
    "bdia",
    "EDICTWrapper",
    "edict",
    "ReversibleWrapper",
    "reversible",
    "ButcherTableau",
    "ExplicitRungeKutta",
    "register_tableau",
    "DDIM",
    "DPMSolver1",
    "DPMSolver2",
    "DPMSolver3",
    "DPMSolverPP1",
    "DPMSolverPP2S",
    "DPMSolverPP3S",
]
