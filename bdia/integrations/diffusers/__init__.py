"""Run diffusers UNets, PixArt's and flow-matching transformers and their schedulers with
bdia's solvers and BDIA.

``from_diffusers(unet, scheduler, **cond)`` returns a ``bdia.DiffusionODE`` and
``diffusers_grid(scheduler, num_inference_steps)`` the time grid of the timesteps diffusers
would use; see ``docs/diffusers.md``. Needs diffusers: ``pip install 'bdia[diffusers]'``.
"""

try:
    import diffusers as _diffusers  # noqa: F401  (only to fail early with the fix)
except ImportError as err:
    raise ImportError(
        f"bdia.integrations.diffusers needs the diffusers library ({err}); install it with "
        "pip install 'bdia[diffusers]'"
    ) from err

from .adapter import DiffusersModel, from_diffusers
from .editing import EditResult, edit_image
from .grid import diffusers_grid
from .scheduler import (
    BDIAInverseScheduler,
    BDIARestartWarning,
    BDIAScheduler,
    BDIASchedulerOutput,
    BDIASchedulerPair,
)

__all__ = [
    "from_diffusers",
    "diffusers_grid",
    "DiffusersModel",
    "edit_image",
    "EditResult",
    "BDIAScheduler",
    "BDIAInverseScheduler",
    "BDIASchedulerOutput",
    "BDIASchedulerPair",
    "BDIARestartWarning",
]
