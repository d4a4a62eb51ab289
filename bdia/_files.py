"""File helpers shared by the writers of reports, images, statistics and network files.

Every file the library writes goes through ``replace_atomic``: it is filled under a temporary
name in its own folder and renamed into place, so a run stopped at any moment leaves either
the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "give_default_mode", "replace_atomic", "write_atomic", "write_png"]


def give_default_mode(path: str | os.PathLike[str]) -> None:
    """Set the permissions a plainly created file would get (0666 less the umask).

    ``tempfile.mkstemp`` creates files readable by their owner only; a report, image or
    network file renamed into place from one should be as readable as any other.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def replace_atomic(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Let ``write(tmp)`` fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary file keeps ``path``'s suffix (some writers choose the format by it) and is
    removed if ``write`` raises. Missing parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``replace_atomic``."""
    payload = data if isinstance(data, bytes) else data.encode()
    return replace_atomic(path, lambda tmp: Path(tmp).write_bytes(payload))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_png(path: str | os.PathLike[str], image: Any) -> Path:
    """Write ``image`` (a uint8 array of shape ``(H, W)`` or ``(H, W, 3)``) as a PNG file."""
    from PIL import Image

    return replace_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
