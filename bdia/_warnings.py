"""Warnings attributed to the user's line, however deep in the package they arise."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn_at_caller"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the innermost frame outside the package: the user's
    call of ``sample``, ``invert``, ``odeint`` or ``Inversion.of``, whichever of the
    package's functions lie between (Python 3.12's ``skip_file_prefixes``; 3.10 lacks it).
    A fixed ``stacklevel`` is right for one path only, and one frame too many points at the
    caller's caller, or at ``sys:1``."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
