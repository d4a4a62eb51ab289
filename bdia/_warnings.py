"""Warnings attributed to the user's line, however deep in the package they arise."""

from __future__ import annotations

import os
import sys
import warnings

import torch.utils._contextlib

__all__ = ["warn_at_caller"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# The wrapper of torch.no_grad() and its kin used as decorators (``bdia.k_diffusion``'s
# functions): a frame there is still the package's call, not the user's.
_TORCH_DECORATORS = os.path.abspath(torch.utils._contextlib.__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _inside(filename: str, through_torch: bool) -> bool:
    path = os.path.abspath(filename)
    if through_torch and path.startswith(_TORCH):
        return True
    return path.startswith(_PACKAGE) or path == _TORCH_DECORATORS


def warn_at_caller(message: str, category: type[Warning], *, through_torch: bool = False) -> None:
    """``warnings.warn`` pointing at the innermost frame outside the package: the user's
    call of ``sample``, ``invert``, ``odeint``, ``Inversion.of`` or ``bdia.k_diffusion``'s
    functions, whichever of the package's functions (and torch's decorator wrappers) lie
    between (Python 3.12's ``skip_file_prefixes``; 3.10 lacks it).
    A fixed ``stacklevel`` is right for one path only, and one frame too many points at the
    caller's caller, or at ``sys:1``.

    ``through_torch``: skip every frame of torch too, for a warning raised in an autograd
    ``backward``, which torch's engine calls from the user's ``loss.backward()`` through
    its own frames (on the CPU; for CUDA tensors torch runs backward in a thread of its own,
    whose stack holds no frame of the user's, and the warning names its outermost frame)."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and _inside(frame.f_code.co_filename, through_torch):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
