"""File helpers shared by the writers of reports, images, statistics and network files.

Every file the library writes goes through ``replace_atomic``: it is filled under a temporary
name in its own folder and renamed into place, so a run stopped at any moment leaves either
the old file or the new one, never a half-written one. Files are also flushed to the disk
before the rename, so that a crash of the machine cannot leave an empty file under the
final name either; PNG images are not, since a sampling run writes tens of thousands of them
and each flush costs a disk round trip.
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


def _flush_to_disk(path: str | os.PathLike[str]) -> None:
    """``fsync`` a file: an error means its data may not be on the disk, and is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_folder(path: str | os.PathLike[str]) -> None:
    """``fsync`` a folder, which makes a rename in it durable, where the system allows it.

    Best effort: some systems cannot open a folder (Windows) or flush one (some network file
    systems), and the file it holds is complete either way.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomic(
    path: str | os.PathLike[str], write: Callable[[str], object], *, durable: bool = True
) -> Path:
    """Let ``write(tmp)`` fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary file keeps ``path``'s suffix (some writers choose the format by it) and is
    removed if ``write`` raises. Missing parent folders are created. Returns ``path``.

    With ``durable`` (the default) the file is flushed to the disk before the rename and its
    folder after, so that a crash of the machine leaves the old file or the whole new one;
    without, only a stopped process is covered (a machine's crash may leave an empty file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_default_mode(tmp)
        if durable:
            _flush_to_disk(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _flush_folder(path.parent)
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
    """Write ``image`` (a uint8 array of shape ``(H, W)`` or ``(H, W, 3)``) as a PNG file.

    Atomic but not flushed to the disk (``durable=False``): a flush per image would cost a
    sampling run of 50,000 images minutes on a slow disk, and an image is cheap to make again.
    """
    from PIL import Image

    def save(tmp: str) -> None:
        Image.fromarray(image).save(tmp, format="PNG")

    return replace_atomic(path, save, durable=False)
