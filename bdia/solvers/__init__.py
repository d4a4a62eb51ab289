"""Solvers: the protocol, the single-step families, BDIA, and the name-to-solver table."""

from .base import SingleStepSolver, Solver, SolverState
from .bidirectional import BidirectionalWrapper
from .exponential import (
    DDIM,
    DPMSolver1,
    DPMSolver2,
    DPMSolver3,
    DPMSolverPP1,
    DPMSolverPP2S,
    DPMSolverPP3S,
)
from .registry import available_solvers, bdia, get_solver, register_solver, register_tableau
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
