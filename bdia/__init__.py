"""bdia: single-step ODE solvers for diffusion sampling and their exactly invertible BDIA form."""

from .editing import EDIT_RULES, Inversion, edit
from .ode import ODE, DiffusionODE, Evaluation
from .pairs import CoupledPair
from .sampling import PairMismatchWarning, ParasiticWarning, StatePair, invert, odeint, sample
from .schedules import (
    EDM,
    Schedule,
    VPCosine,
    VPDiscrete,
    VPLinear,
    karras_grid,
    quadratic_t_grid,
    uniform_logsnr_grid,
    uniform_t_grid,
)
from .solvers import (
    BidirectionalWrapper,
    ButcherTableau,
    EDICTWrapper,
    ExplicitRungeKutta,
    ReversibleWrapper,
    SingleStepSolver,
    Solver,
    SolverState,
    available_solvers,
    bdia,
    edict,
    get_solver,
    register_solver,
    register_tableau,
    reversible,
)

__version__ = "0.1.0"

__all__ = [
    "ODE",
    "DiffusionODE",
    "Evaluation",
    "StatePair",
    "CoupledPair",
    "PairMismatchWarning",
    "ParasiticWarning",
    "sample",
    "invert",
    "Inversion",
    "edit",
    "EDIT_RULES",
    "odeint",
    "Schedule",
    "EDM",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "karras_grid",
    "uniform_logsnr_grid",
    "uniform_t_grid",
    "quadratic_t_grid",
    "Solver",
    "SingleStepSolver",
    "SolverState",
    "ButcherTableau",
    "ExplicitRungeKutta",
    "BidirectionalWrapper",
    "bdia",
    "EDICTWrapper",
    "edict",
    "ReversibleWrapper",
    "reversible",
    "get_solver",
    "register_solver",
    "register_tableau",
    "available_solvers",
]
