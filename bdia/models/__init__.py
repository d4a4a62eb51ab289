"""Models: analytic toy problems (``bdia.models.toy``) and EDM's networks (``networks``).

Network classes that files may name are registered with ``registry.register_network``.
"""

from . import networks, toy
from .networks import EDMPrecond, SongUNet, VEPrecond, VPPrecond, compile_network
from .registry import register_network

__all__ = [
    "toy",
    "networks",
    "SongUNet",
    "EDMPrecond",
    "VPPrecond",
    "VEPrecond",
    "compile_network",
    "register_network",
]
