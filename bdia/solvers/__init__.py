"""Solvers: the registry, the single-step families and the BDIA meta-solver."""

from .base import Solver, available_solvers, get_solver, register_solver
from .bidirectional import BidirectionalWrapper, bdia
from .exponential import (
    DDIM,
    DPMSolver1,
    DPMSolver2,
    DPMSolver3,
    DPMSolverPP1,
    DPMSolverPP2S,
    DPMSolverPP3S,
)
from .runge_kutta import ButcherTableau, ExplicitRungeKutta, register_tableau

__all__ = [
    "Solver",
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
