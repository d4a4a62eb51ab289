"""File helpers shared by the writers of reports, images and network files."""

from __future__ import annotations

import os


def give_default_mode(path: str | os.PathLike[str]) -> None:
    """Set the permissions a plainly created file would get (0666 less the umask).

    ``tempfile.mkstemp`` creates files readable by their owner only; a report, image or
    network file renamed into place from one should be as readable as any other.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
