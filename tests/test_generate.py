"""Seed-sharded sampling: determinism, resume after a kill, and torchrun sharding."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bdia.cli import main
from bdia.generate import image_path, parse_seeds

ARGS = ["--network", "random:tiny-cond", "--steps", "3", "--solver", "euler"]


def pngs(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(main, ["sample", *ARGS, *args])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "text,seeds",
    [
        ("0-3", [0, 1, 2, 3]),
        ("5", [5]),
        ("1,5,7-9", [1, 5, 7, 8, 9]),
        (" 2 - 3 ,2", [2, 3]),
    ],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "1,,2", "-4"])
def test_bad_seeds_are_refused_with_the_part_named(text):
    with pytest.raises(ValueError, match="cannot parse seeds"):
        parse_seeds(text)


def test_image_layout():
    assert image_path("out", 12345) == Path("out/012000/012345.png")


def test_images_do_not_depend_on_batch_size_or_resume(tmp_path):
    run_cli("--seeds", "0-5", "--batch", "6", "--outdir", str(tmp_path / "a"))
    run_cli("--seeds", "0-5", "--batch", "1", "--outdir", str(tmp_path / "b"))
    # A run over part of the seeds, then the whole range: only the rest is generated.
    run_cli("--seeds", "2-3", "--batch", "4", "--outdir", str(tmp_path / "c"))
    run_cli("--seeds", "0-5", "--batch", "4", "--outdir", str(tmp_path / "c"))
    a = pngs(tmp_path / "a")
    assert len(a) == 6 and len(set(a.values())) == 6
    assert pngs(tmp_path / "b") == a
    assert pngs(tmp_path / "c") == a


def test_killed_run_resumed_gives_identical_images(tmp_path):
    reference, resumed = tmp_path / "ref", tmp_path / "resumed"
    run_cli("--seeds", "0-11", "--batch", "1", "--outdir", str(reference))
    cmd = [
        sys.executable,
        "-m",
        "bdia.cli",
        "sample",
        *ARGS,
        "--seeds",
        "0-11",
        "--batch",
        "1",
        "--outdir",
        str(resumed),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(resumed.rglob("*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(resumed.rglob("[0-9]*.png")))
    assert 3 <= finished < 12  # killed mid-way
    run_cli("--seeds", "0-11", "--batch", "1", "--outdir", str(resumed))
    assert pngs(resumed) == pngs(reference)  # also: no temporary file left behind


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is installed with torch")
def test_torchrun_two_processes_give_the_images_of_one(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    run_cli("--seeds", "0-5", "--batch", "2", "--outdir", str(single))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "bdia.cli",
        "sample",
        *ARGS,
        "--seeds",
        "0-5",
        "--batch",
        "2",
        "--outdir",
        str(double),
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    assert pngs(double) == pngs(single)


def test_unwritable_outdir_and_bad_class_leave_no_image(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(
        main, ["sample", *ARGS, "--seeds", "0", "--outdir", str(blocker / "sub")]
    )
    assert result.exit_code == 2 and "cannot write to" in result.output
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["sample", *ARGS, "--seeds", "0", "--class", "12", "--outdir", str(out)]
    )
    assert result.exit_code == 1 and "class 12 is outside 0..9" in result.output
    assert not list(out.rglob("*.png"))
