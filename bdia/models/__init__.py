"""Models: analytic toy problems (``bdia.models.toy``) and, later, networks and loaders."""

from . import toy

__all__ = ["toy"]
