"""``--threads``: how many torch threads the model-running commands use, and that they restore it;
and what ``bdia compare`` says while it runs.

Each thread test starts from two threads (the suite runs on one), records the count while the
model runs, and checks that the command leaves torch's setting as it found it.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bdia import generate
from bdia.cli import main
from bdia.cli._common import SMALL_RESOLUTION, _set_threads


@pytest.fixture
def two_threads(monkeypatch):
    # The tests ask for two threads; the CLI allows at most os.cpu_count() of them, which a
    # one-CPU runner would refuse though the tests are about where threads apply.
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_while(monkeypatch, module, name, args):
    """Run ``bdia ARGS``; the thread counts seen by each call of ``module.name``."""
    seen = []
    real = getattr(module, name)

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2, "the command did not restore torch's setting"
    return seen


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("threads,expected", [([], 1), (["--threads", "2"], 2)])
def test_sample_runs_the_digits_on_one_thread_unless_told(
    threads, expected, two_threads, monkeypatch, tmp_path
):
    args = ["sample", "--network", "digits", "--steps", "2", "--seeds", "0-1", "--no-progress"]
    args += ["--grid", tmp_path / "g.png", *threads]
    assert set(threads_while(monkeypatch, generate, "sample_images", args)) == {expected}


def test_invert_runs_the_digits_on_one_thread(two_threads, monkeypatch):
    args = ["invert", "--count", "2", "--steps", "2", "--no-progress"]
    assert set(threads_while(monkeypatch, generate, "reconstruct", args)) == {1}


def test_invert_images_and_sample_latents_run_the_digits_on_one_thread(
    two_threads, monkeypatch, tmp_path
):
    from bdia.editing import Inversion

    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(folder / "a.png")
    out = tmp_path / "latents"
    args = ["invert", "--images", folder, "--class", "3", "--steps", "2", "--outdir", out]
    assert set(threads_while(monkeypatch, Inversion, "of", [*args, "--no-progress"])) == {1}
    args = ["sample", "--latents", out, "--outdir", tmp_path / "back", "--no-progress"]
    assert set(threads_while(monkeypatch, Inversion, "reconstruct", args)) == {1}


def test_large_networks_keep_torchs_setting(two_threads):
    with click.Context(click.Command("x")):
        _set_threads(None, SimpleNamespace(img_resolution=SMALL_RESOLUTION * 2))
        assert torch.get_num_threads() == 2
        _set_threads(None, None)  # fid: the detector is Inception
        assert torch.get_num_threads() == 2
    with click.Context(click.Command("x")):
        _set_threads(None, SimpleNamespace(img_resolution=SMALL_RESOLUTION))
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_compare_runs_on_one_thread(two_threads, monkeypatch):
    from bdia import compare

    args = ["compare", "--solvers", "euler", "--gammas", "", "--budgets", "2", "--batch", "2"]
    assert set(threads_while(monkeypatch, compare, "run_comparison", args)) == {1}


def test_compare_shows_the_instability_of_bdia_once_in_its_own_words():
    args = ["compare", "--solvers", "heun,midpoint", "--budgets", "10,20", "--gammas", "1.0,0.5"]
    result = CliRunner().invoke(main, [*args, "--batch", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("Warning")]
    assert len(warned) == 1, result.stderr
    assert "for heun, midpoint under gamma 1.0, 0.5" in warned[0]
    assert "Inversion.regenerate" not in result.stderr
