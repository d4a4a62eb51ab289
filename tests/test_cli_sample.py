"""``bdia sample --outdir`` beside ``--grid``, and what ``--overwrite`` may remove."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bdia import generate
from bdia.cli import main

BASE = ["sample", "--network", "digits", "--steps", "2", "--no-progress"]


def invoke(*args):
    result = CliRunner().invoke(main, [*BASE, *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def count_sampling(monkeypatch):
    calls = []
    real = generate.sample_images

    def counted(*args, **kwargs):
        calls.append(len(args[3]))  # the seeds' noise: one row per image
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "sample_images", counted)
    return calls


def stop_writing_after(monkeypatch, count):
    """Ctrl-C at the PNG write after the first ``count``; returns the real writer."""
    real, written = generate.write_png, []

    def stopping(path, image):
        if len(written) == count:
            raise KeyboardInterrupt
        written.append(path)
        return real(path, image)

    monkeypatch.setattr(generate, "write_png", stopping)
    return real


def test_a_grid_beside_the_outdir_tiles_its_images_instead_of_sampling_them_again(
    tmp_path, monkeypatch
):
    alone = tmp_path / "alone.png"
    invoke("--seeds", "0-3", "--class", "3", "--grid", alone)
    calls = count_sampling(monkeypatch)
    grid = tmp_path / "grid.png"
    result = invoke("--seeds", "0-3", "--class", "3", "--grid", grid, "--outdir", tmp_path / "o")
    assert calls == [4]  # once, for the outdir
    assert grid.read_bytes() == alone.read_bytes()
    assert result.stderr.index("4 images in") < result.stderr.index("wrote")


def test_a_grid_of_one_class_per_column_is_sampled_on_its_own(tmp_path, monkeypatch):
    calls = count_sampling(monkeypatch)
    invoke("--seeds", "0-3", "--grid", tmp_path / "g.png", "--outdir", tmp_path / "o")
    assert calls == [4, 4]  # the outdir's classes come from the seeds, the grid's from columns


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("seeds,line", [("0", "1 image in"), ("0-1", "2 images in")])
def test_the_closing_line_counts_in_words(seeds, line, tmp_path):
    assert line in invoke("--seeds", seeds, "--outdir", tmp_path / "o").stderr


def test_overwrite_removes_only_images_named_as_bdia_names_them(tmp_path):
    out = tmp_path / "o"
    invoke("--seeds", "0-1", "--outdir", out)
    mine = [out / "000000" / "1.png", out / "000000" / "0000001.png", out / "7" / "000007.png"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"the user's")
    invoke("--seeds", "0", "--steps", "3", "--outdir", out, "--overwrite")
    assert all(path.read_bytes() == b"the user's" for path in mine)
    assert not (out / "000000" / "000001.png").exists()  # seed 1, made with 2 steps


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("seeds,line", [("0", "(1 image)"), ("0-1", "(2 images)")])
def test_the_grid_line_counts_in_words(seeds, line, tmp_path):
    assert line in invoke("--seeds", seeds, "--grid", tmp_path / "g.png").stderr


def test_an_overwrite_stopped_midway_leaves_no_image_of_the_old_settings(tmp_path, monkeypatch):
    """The new record is written before the first image; an image of the old settings left
    beside it would pass for a new one, and a plain rerun would resume past it."""
    out, fresh = tmp_path / "o", tmp_path / "fresh"
    invoke("--seeds", "0-5", "--outdir", out)
    real = stop_writing_after(monkeypatch, 2)
    args = ["--seeds", "0-5", "--steps", "3", "--batch", "1"]
    stopped = CliRunner().invoke(main, [*BASE, *args, "--outdir", str(out), "--overwrite"])
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.setattr(generate, "write_png", real)
    invoke(*args, "--outdir", out)
    invoke(*args, "--outdir", fresh)
    images = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert len(images) == 6
    assert [p for p in images if (out / p).read_bytes() != (fresh / p).read_bytes()] == []


@pytest.mark.parametrize("inside", ["grid.png", "000000/000000.png"])
def test_a_grid_inside_the_outdir_is_refused_before_any_work(inside, tmp_path):
    """bdia fid reads every PNG under the folder as a sample, and 000000/000000.png is seed
    0's own path, which a resumed run would then take for seed 0's image."""
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, [*BASE, "--seeds", "0-3", "--outdir", str(out), "--grid", str(out / inside)]
    )
    assert result.exit_code == 2
    assert "--grid" in result.output and "inside --outdir" in result.output
    assert not out.exists()


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("own_grid", [True, False], ids=["sampled-grid", "tiled-grid"])
def test_an_interrupted_run_with_a_grid_resumes_when_run_again(own_grid, tmp_path, monkeypatch):
    """The grid is written after every image of --outdir, so a run stopped midway leaves no
    grid, and the same command run again (without --overwrite) finishes the folder and then
    writes the grid. It used to write a grid sampled on its own first, and the rerun was
    refused because that grid existed (--overwrite would regenerate every image)."""
    # Without --class the digits' grid gives column c class c and is sampled on its own;
    # with it the grid tiles the folder's images.
    chosen = [] if own_grid else ["--class", "3"]
    args = ["--seeds", "0-5", "--batch", "1", *chosen]
    out, grid = tmp_path / "o", tmp_path / "grid.png"
    fresh = tmp_path / "fresh"
    invoke(*args, "--outdir", fresh, "--grid", tmp_path / "fresh.png")
    real = stop_writing_after(monkeypatch, 2)
    command = [*BASE, *args, "--outdir", str(out), "--grid", str(grid)]
    stopped = CliRunner().invoke(main, command)
    assert stopped.exit_code == 130, stopped.output
    assert not grid.exists() and len(list(out.rglob("*.png"))) == 2
    monkeypatch.setattr(generate, "write_png", real)
    calls = count_sampling(monkeypatch)
    resumed = invoke(*args, "--outdir", out, "--grid", grid)
    # The four missing images, one per batch, then the grid's six if it is sampled.
    assert calls == [1] * (4 + 6 * own_grid)
    assert "6 images in" in resumed.stderr and f"wrote {grid}" in resumed.stderr
    assert grid.read_bytes() == (tmp_path / "fresh.png").read_bytes()
    images = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert len(images) == 6
    assert all((out / p).read_bytes() == (fresh / p).read_bytes() for p in images)
