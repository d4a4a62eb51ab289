"""Saved latents: a BDIA pair in a safetensors file, with what is needed to come back.

One file holds one ``StatePair`` exactly, low words included, so that sampling from the
loaded pair under the ODE that made it returns the data bit for bit as from the pair in
memory. ``bdia invert --images`` writes one file per image; ``bdia sample --latents`` reads
them back.

The file's tensors:

- ``earlier``, ``later``: the pair's states at ``ts[0]`` and ``ts[1]``, shape ``(batch, ...)``
  (``(1, C, H, W)`` from the command line), the state dtype (float64 or float32);
- ``earlier_low``, ``later_low``: the low words, same shape and dtype, only when not None;
- ``ts``: the grid, float64 of shape ``(steps + 1,)``, noisiest first.

Its string metadata (all values are strings): ``format`` (``"bdia-latents/2"``),
``fingerprint`` (``ode.fingerprint()`` of the ODE that made the pair), ``solver`` (the base
solver's name), ``gamma`` (a number such as ``"0.96"`` or a named schedule such as
``"obelm"``), ``class`` (an integer, or ``"none"`` for an unconditional network), ``network``
(as a run record names it: ``"sha256:..."`` or ``"random:NAME"``), ``network_path`` (the
network as it was given: a shipped name or a file's absolute path) and ``source`` (the file
name of the inverted image).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._files import replace_atomic
from .sampling import StatePair
from .solvers.bidirectional import _check_user_gamma
from .solvers.registry import bdia, get_solver

__all__ = ["LATENTS_FORMAT", "save_latents", "load_latents"]

#: The format tag in the metadata of every latents file. Version 2 changed no field, only
#: how ``ode.fingerprint()`` is computed (it now covers a network's buffers and the state a
#: function or bound method carries), so a version-1 file's fingerprint cannot be checked.
LATENTS_FORMAT = "bdia-latents/2"
_OLD_FORMATS = ("bdia-latents/1",)

_TEXT_KEYS = ("solver", "network", "network_path", "source")
_STATE_DTYPES = (torch.float64, torch.float32)


def _gamma(text: str) -> float | str:
    """The ``gamma`` of a file's metadata: a number, or a schedule's name."""
    try:
        return float(text)
    except ValueError:
        return text


def _identity(solver: str, gamma: float | str) -> str | None:
    """The identity of ``bdia(solver, gamma)``, the solver a file's metadata names (as
    ``bdia sample --latents`` builds it), or None if this bdia cannot build it."""
    try:
        return bdia(get_solver(solver), gamma).identity
    except (KeyError, TypeError, ValueError):
        return None


def save_latents(
    path: str | os.PathLike[str],
    pair: StatePair,
    ts: Tensor,
    *,
    solver: str,
    gamma: float | str,
    class_label: int | None,
    network: str,
    network_path: str | os.PathLike[str] = "",
    source: str = "",
) -> Path:
    """Write ``pair`` and the grid ``ts`` to ``path`` (a ``.safetensors`` file), atomically.

    Args:
        pair: the pair at ``ts[0]``, ``ts[1]`` that ``invert`` or ``Inversion.of`` returns;
            its ``fingerprint`` must be set.
        ts: the grid the pair was made on (stored as float64, shape ``(steps + 1,)``).
        solver: the base solver's name.
        gamma: bdia's gamma: a number in [0, 1] (of Python, numpy or torch, or a
            ``Fraction``; recorded as the Python float that ``bdia(solver, gamma)`` keeps)
            or a schedule name.
        class_label: the class the data were inverted under, or None.
        network: the network's identity (``"sha256:..."``).
        network_path: where the network was loaded from (a path is stored as text).
        source: the name of the inverted image.

    Raises:
        TypeError: if ``pair`` is not a ``StatePair`` (latents files hold BDIA's pairs), or
            ``gamma`` is neither a number nor a string (a bool, or one gamma per step).
        ValueError: before writing, if the pair has no fingerprint, its tensors do not match
            or are not float64 or float32, its ``times`` are set and are not ``(ts[0],
            ts[1])``, a numeric ``gamma`` lies outside [0, 1], the pair's ``solver`` is set
            and is not ``bdia(solver, gamma)``, or ``ts`` is not 1-D with at least 2 points:
            what ``load_latents`` would refuse or give back otherwise.
    """
    from safetensors.torch import save_file

    if not isinstance(pair, StatePair):
        # The metadata (solver, gamma) and the command line's --latents rebuild a bdia
        # solver; the chains of edict and reversible would need their own record.
        raise TypeError(
            f"latents files hold the StatePair of a bdia solver, got a {type(pair).__name__}; "
            "invert with bdia(solver, gamma), or keep an edict/reversible CoupledPair with "
            "safetensors.torch.save_file on its fields (x, y, x_low, y_low)"
        )
    if pair.fingerprint is None:
        raise ValueError("the pair has no fingerprint; save the pair that invert returns")
    tensors = {"earlier": pair.earlier, "later": pair.later}
    if pair.earlier_low is not None:
        tensors["earlier_low"] = pair.earlier_low
    if pair.later_low is not None:
        tensors["later_low"] = pair.later_low
    for name, t in tensors.items():
        if t.shape != pair.earlier.shape or t.dtype != pair.earlier.dtype:
            raise ValueError(f"pair.{name} does not match pair.earlier in shape and dtype")
    if pair.earlier.dtype not in _STATE_DTYPES:
        raise ValueError(
            f"latents files hold float64 or float32 states, got {pair.earlier.dtype}; "
            "invert with state_dtype float64 or float32"
        )
    grid = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().contiguous().clone()
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(
            f"latents need a grid ts of at least 2 points, got shape {tuple(grid.shape)}"
        )
    # A loaded pair takes its times from the grid's first two points; a pair from elsewhere
    # on the grid (sample's return_pair: its last two) would come back claiming those.
    start = (float(grid[0]), float(grid[1]))
    if pair.times is not None and tuple(pair.times) != start:
        raise ValueError(
            f"the pair's times {tuple(pair.times)} are not the grid's first two points "
            f"{start}; save the pair that invert returns, with its grid"
        )
    if not isinstance(gamma, str):
        # The float the solver keeps, written so that it reads back as that float: str() of
        # the number given could name another gamma (np.float32(0.96) as "0.96") or none
        # (Fraction(24, 25) as "24/25").
        gamma = _check_user_gamma(gamma, "")
    # The file records the solver as its base's name and gamma, from which a loaded pair
    # takes its ``solver`` back: a pair made by another solver would come back claiming
    # this one, and be continued by it.
    recorded = _identity(solver, _gamma(str(gamma)))  # as load_latents reads it back
    if pair.solver is not None and pair.solver != recorded:
        raise ValueError(
            f"the pair was made by {pair.solver}, but solver={solver!r} and gamma={gamma!r} "
            f"name {recorded or 'no solver this bdia can build'}; give the base solver's name "
            "and the gamma the pair was made with"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tensors["ts"] = grid
    metadata = {
        "format": LATENTS_FORMAT,
        "fingerprint": pair.fingerprint,
        "solver": solver,
        "gamma": str(gamma),
        "class": "none" if class_label is None else str(int(class_label)),
        "network": network,
        "network_path": os.fspath(network_path),
        "source": source,
    }
    return replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_latents(path: str | os.PathLike[str]) -> tuple[StatePair, Tensor, dict[str, Any]]:
    """Read a latents file: ``(pair, ts, metadata)``, all on the CPU.

    ``pair`` is the saved ``StatePair`` (its fingerprint from the metadata, its ``times``
    ``(ts[0], ts[1])``, its ``solver`` the identity of ``bdia(solver, gamma)`` from the
    metadata, or None when this bdia cannot build that solver: a base registered by another
    program), ``ts`` the float64 grid of shape ``(steps + 1,)``, ``metadata`` a dict with
    ``fingerprint``,
    ``solver``, ``network``, ``network_path``, ``source`` (strings), ``gamma`` (a float, or
    a schedule's name) and ``class`` (an int or None).

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: in one line naming the file, if it is not a bdia latents file, its
            contents do not fit together, or it is a ``bdia-latents/1`` file (whose
            fingerprint no longer checks: invert the images again).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latents file at {path}")
    expected = f"expected a {LATENTS_FORMAT} file as bdia invert --images writes"

    def refuse(problem: str) -> ValueError:
        return ValueError(f"{path} is not bdia latents: {problem}; {expected}")

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            if meta.get("format") in _OLD_FORMATS:
                raise ValueError(
                    f"{path} holds {meta['format']} latents, whose ODE fingerprint an earlier "
                    "bdia computed without the network's buffers, so it cannot be checked "
                    f"against a network now; invert the images again ({LATENTS_FORMAT})"
                )
            if meta.get("format") != LATENTS_FORMAT:
                raise refuse(f"format tag {meta.get('format')!r}")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise refuse(f"not a safetensors file ({' '.join(str(err).split())})") from None
    missing = [k for k in ("fingerprint", "gamma", "class", *_TEXT_KEYS) if k not in meta]
    missing += [k for k in ("earlier", "later", "ts") if k not in tensors]
    if missing:
        raise refuse(f"it lacks {', '.join(missing)}")
    earlier, ts = tensors["earlier"], tensors["ts"]
    if earlier.dtype not in _STATE_DTYPES or earlier.ndim < 1:
        raise refuse(f"the state is {earlier.dtype} of shape {tuple(earlier.shape)}")
    for name in ("later", "earlier_low", "later_low"):
        t = tensors.get(name)
        if t is not None and (t.shape != earlier.shape or t.dtype != earlier.dtype):
            raise refuse(f"{name} does not match earlier in shape and dtype")
    if ts.dtype != torch.float64 or ts.ndim != 1 or len(ts) < 2:
        raise refuse(f"the grid ts is {ts.dtype} of shape {tuple(ts.shape)}")
    gamma = _gamma(meta["gamma"])
    try:
        label = None if meta["class"] == "none" else int(meta["class"])
    except ValueError:
        raise refuse(f"class {meta['class']!r}") from None
    pair = StatePair(
        earlier,
        tensors["later"],
        tensors.get("earlier_low"),
        tensors.get("later_low"),
        meta["fingerprint"],
        # The saved states sit at the grid's first two points, so a pair loaded and then
        # continued on another grid is refused as one fresh from ``invert`` would be.
        (float(ts[0]), float(ts[1])),
        _identity(meta["solver"], gamma),
    )
    info: dict[str, Any] = {k: meta[k] for k in ("fingerprint", *_TEXT_KEYS)}
    info.update(gamma=gamma, **{"class": label})
    return pair, ts, info
