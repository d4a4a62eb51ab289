"""Every ``bdia`` command under torchrun: which rank works, writes and prints, and that every
rank leaves the process group.

The default pass runs one rank in this process with the group's calls (``bdia.cli._ranks``'
``rank_and_world`` and ``wait_for_ranks``) stood in for; the test marked slow launches two
gloo processes with torchrun. ``invert --images`` and ``sample --latents`` are tested in
test_cli_latents.py, ``fid-ref`` in test_fid_distributed.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import folder_bytes, torchrun_bdia

import bdia.cli._ranks
import bdia.cli._sample
from bdia import generate
from bdia.cli import main
from bdia.models.checkpoints import shipped_network_path

SAMPLE = ["sample", "--network", "digits", "--steps", "2"]


def invoke(*args, status=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == status, result.output
    return result


def as_rank(monkeypatch, rank, world=2):
    """Run the commands as rank ``rank`` of ``world``: returns the list that the group's
    calls are logged to, "wait" for a wait and "leave" for a wait that leaves the group."""
    log = []
    monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda: (rank, world))
    monkeypatch.setattr(
        bdia.cli._ranks,
        "wait_for_ranks",
        lambda w, leave=False: log.append("leave" if leave else "wait"),
    )
    return log


def logged(monkeypatch, log, owner, name, event):
    """Log ``event`` to ``log`` whenever ``owner.name`` is called (which it still is)."""
    real = getattr(owner, name)

    def call(*args, **kwargs):
        log.append(event)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, call)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("rank", [0, 1])
def test_a_grid_alone_is_rank_zeros_once_every_rank_has_left_the_group(rank, tmp_path, monkeypatch):
    """sample --grid without --outdir: rank 0 samples and writes the grid after leaving the
    group; another rank leaves it and does nothing. Ranks but 0 used to return at once and
    no rank left the group."""
    log = as_rank(monkeypatch, rank)
    logged(monkeypatch, log, generate, "write_grid", "grid")
    grid = tmp_path / "g.png"
    result = invoke(*SAMPLE, "--seeds", "0-3", "--grid", grid, "--no-progress")
    if rank == 0:
        assert log == ["leave", "grid"] and grid.is_file()
        assert result.output == f"wrote {grid} (4 images)\n"
    else:
        assert log == ["leave"] and not grid.exists() and result.output == ""


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("rank", [0, 1])
def test_sample_outdir_is_checked_by_every_rank_before_rank_zero_changes_it(
    rank, tmp_path, monkeypatch
):
    """sample --outdir --overwrite into a folder made with other settings: every rank has
    checked the folder (waits for the others) before rank 0 removes its images and writes
    the record, and no rank samples before that is done. Rank 0 used to change the folder
    while another rank might still be reading it."""
    out = tmp_path / "out"
    invoke(*SAMPLE, "--seeds", "0-3", "--outdir", out, "--no-progress")
    log = as_rank(monkeypatch, rank)
    logged(monkeypatch, log, bdia.cli._sample, "_claim_outdir", "check")
    logged(monkeypatch, log, generate, "write_run_record", "record")
    logged(monkeypatch, log, generate, "generate_images", "sample")
    unlink = Path.unlink
    monkeypatch.setattr(
        Path, "unlink", lambda p, *a: log.append(f"remove {p.name}") or unlink(p, *a)
    )
    other = ["--steps", "3", "--seeds", "0-3", "--outdir", out, "--overwrite", "--no-progress"]
    invoke(*SAMPLE[:-2], *other)
    removed = [f"remove {seed:06d}.png" for seed in range(4)] if rank == 0 else []
    record = ["record"] if rank == 0 else []
    assert log == ["check", "wait", *removed, *record, "wait", "sample", "leave"]


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("rank", [0, 1])
def test_the_held_out_table_is_rank_zeros_alone(rank, monkeypatch):
    """invert without --images: rank 0 inverts the digits and prints the table once every
    rank has left the group; another rank leaves it and does nothing. Every rank used to
    invert them all and print the table."""
    args = ["invert", "--count", "2", "--steps", "2", "--no-progress"]
    one = invoke(*args).output
    log = as_rank(monkeypatch, rank)
    logged(monkeypatch, log, generate, "reconstruct", "invert")
    result = invoke(*args)
    if rank == 0:
        assert log == ["leave", "invert", "invert"] and result.output == one
        assert "bdia(euler, 0.96) (exact)" in one
    else:
        assert log == ["leave"] and result.output == ""


NOT_SPLIT = {
    "solvers": ["solvers"],
    "compare": ["compare", "--solvers", "euler", "--gammas", "1.0", "--budgets", "4"]
    + ["--no-plot", "--no-progress", "--out", "r.md"],
    "convert": ["convert", shipped_network_path("digits"), "n.safetensors"],
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("command", sorted(NOT_SPLIT))
def test_commands_that_do_not_split_their_work_leave_it_to_rank_zero(
    command, tmp_path, monkeypatch
):
    """solvers, compare and convert: rank 0 prints and writes what one process does; another
    rank leaves the group and prints and writes nothing. Every rank used to do the work,
    print it and write the same file (a rank that checked it after another had written it
    was refused)."""
    runs = {}
    for run in ("one", 0, 1):
        folder = tmp_path / str(run)
        folder.mkdir()
        with monkeypatch.context() as m:
            m.chdir(folder)
            log = as_rank(m, run) if run != "one" else []
            runs[run] = (invoke(*NOT_SPLIT[command]).output, folder_bytes(folder), log)
    assert runs[0] == (*runs["one"][:2], ["leave"])
    assert runs[1] == ("", {}, ["leave"])
    assert runs["one"][0] and (command == "solvers" or runs["one"][1])


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("command", ["sample", "fid-ref"])
def test_a_refused_run_joins_no_group(command, tmp_path, monkeypatch):
    """A run refused after its options are read (sample: a folder made with other
    settings; fid-ref: a detector that is not there) exits before joining the group, so no
    rank is left in it. Both used to join first."""
    out = tmp_path / "out"
    invoke(*SAMPLE, "--seeds", "0", "--outdir", out, "--no-progress")
    joined = []
    monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda: joined.append(True) or (0, 1))
    if command == "sample":
        invoke(*SAMPLE[:-2], "--steps", "3", "--seeds", "0", "--outdir", out, status=1)
    else:
        detector = tmp_path / "missing.pt"
        args = ["--images", out, "--detector", detector, "--out", tmp_path / "r.npz"]
        invoke("fid-ref", *args, status=2)
    assert joined == []


# Each: the command, and the names of the files that ranks 0 and 1 write.
TWO_RANKS = {
    # Rank 0's alone; ranks but 0 used to return at once, and no rank left the group.
    "grid": ([*SAMPLE, "--seeds", "0-7", "--grid", "g.png"], [["g.png"], []]),
    # Split by seed into a folder of other settings, rank 0 removing its images and writing
    # the record between two waits.
    "overwrite": (
        [*SAMPLE[:-2], "--steps", "3", "--seeds", "0-3", "--outdir", "out", "--overwrite"],
        [["bdia-run.json", "000000.png", "000002.png"], ["000001.png", "000003.png"]],
    ),
    # Rank 0's alone; every rank used to do it all and print (compare: and write) it.
    "invert": (["invert", "--count", "3", "--steps", "2"], [[], []]),
    "compare": (NOT_SPLIT["compare"], [["r.md"], []]),
}


@pytest.mark.slow  # a torchrun launch of two processes: seconds
@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_two_ranks_print_and_write_what_one_process_does_and_leave_the_group(
    case, tmp_path, monkeypatch
):
    """Under torchrun (two gloo processes) a command prints what one process prints and
    leaves the files one process leaves, each written once, by the rank TWO_RANKS names,
    and every rank leaves the process group."""
    args, files = TWO_RANKS[case]
    args = [*args, "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        with monkeypatch.context() as m:
            m.chdir(folder)
            if case == "overwrite":
                invoke(*SAMPLE, "--seeds", "0-3", "--outdir", "out", "--no-progress")
            if folder == one:
                expected = invoke(*args)
    result, written, left = torchrun_bdia(tmp_path / "log", *args, cwd=two)
    assert (written, left) == (files, [True, True])
    assert result.stdout == expected.stdout
    if expected.stderr:
        assert result.stderr.count(expected.stderr) == 1, result.stderr
    assert folder_bytes(two) == folder_bytes(one)
