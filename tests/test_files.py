"""The atomic writers of bdia/_files.py: what reaches the disk, and in which order."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from bdia import _files


@pytest.fixture
def disk_calls(monkeypatch):
    """Every fsync (of the path it was opened for) and rename, in order."""
    opened: dict[int, str] = {}
    calls: list[tuple[str, str]] = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd):
        calls.append(("fsync", opened.get(fd, "?")))
        real_fsync(fd)

    def spy_replace(src, dst):
        calls.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(_files.os, "open", spy_open)
    monkeypatch.setattr(_files.os, "fsync", spy_fsync)
    monkeypatch.setattr(_files.os, "replace", spy_replace)
    return calls


def test_a_written_file_is_flushed_before_its_rename_and_its_folder_after(tmp_path, disk_calls):
    target = tmp_path / "sub" / "report.md"
    _files.write_atomic(target, "text")
    assert target.read_text() == "text"
    kinds = [kind for kind, _ in disk_calls]
    assert kinds == ["fsync", "replace", "fsync"]
    # The first flush is of the temporary file (beside the target, with its suffix), the last
    # of the folder that holds the new name.
    tmp = disk_calls[0][1]
    assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".md") and tmp != str(target)
    assert disk_calls[2][1] == str(target.parent)


def test_png_images_are_renamed_into_place_without_a_flush(tmp_path, disk_calls):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    _files.write_png(tmp_path / "0.png", image)
    assert [kind for kind, _ in disk_calls] == ["replace"]
    assert (tmp_path / "0.png").read_bytes().startswith(b"\x89PNG")


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "stats.npz"
    target.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _files.replace_atomic(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_a_new_file_gets_the_mode_of_a_plainly_created_one(tmp_path):
    umask = os.umask(0o022)
    try:
        _files.write_atomic(tmp_path / "a.txt", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_a_folder_that_cannot_be_flushed_is_no_error_but_a_file_that_cannot_be_is(
    tmp_path, monkeypatch
):
    """A flush of the folder is best effort (some network file systems refuse it, and the
    file is complete); a failed flush of the file means its data may be lost, and is raised
    before the rename, leaving no file."""
    real_fsync = os.fsync
    folder_fds: set[int] = set()
    real_open = os.open

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.isdir(path):
            folder_fds.add(fd)
        return fd

    def refuse_folders(fd):
        if fd in folder_fds:
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(_files.os, "open", spy_open)
    monkeypatch.setattr(_files.os, "fsync", refuse_folders)
    _files.write_atomic(tmp_path / "a.md", "text")
    assert (tmp_path / "a.md").read_text() == "text"

    def refuse_all(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_files.os, "fsync", refuse_all)
    with pytest.raises(OSError, match="Input/output error"):
        _files.write_atomic(tmp_path / "b.md", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md"]
