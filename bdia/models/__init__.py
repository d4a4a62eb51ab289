"""Models: analytic toy problems (``bdia.models.toy``) and EDM's networks (``networks``)."""

from . import networks, toy
from .networks import EDMPrecond, SongUNet, VEPrecond, VPPrecond

__all__ = ["toy", "networks", "SongUNet", "EDMPrecond", "VPPrecond", "VEPrecond"]
