"""Seed-sharded sampling: determinism, resume after a kill, and torchrun sharding."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import child_env, run_child, run_torchrun

from bdia import generate
from bdia.cli import main
from bdia.generate import image_path, parse_seeds, seed_inputs, to_uint8
from bdia.solvers import get_solver

ARGS = ["--network", "random:tiny-cond", "--steps", "3", "--solver", "euler"]


def pngs(folder: Path) -> dict[str, bytes]:
    """Every image of ``folder`` by its relative path (the run record is not an image)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


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


@pytest.mark.parametrize("label", [3, np.int64(3), torch.tensor(3)], ids=["int", "numpy", "tensor"])
def test_one_class_may_be_any_integer(label):
    """A numpy integer or a 0-d tensor fixes the class of every seed like a Python int (it
    used to be taken for a sequence and fail as 'not iterable'); the noise is the seed's."""
    noise, labels = seed_inputs([0, 1, 2], (1, 2, 2), 10, label)
    free, _ = seed_inputs([0, 1, 2], (1, 2, 2), 10)
    assert labels == [3, 3, 3] and all(type(c) is int for c in labels)
    assert torch.equal(noise, free)


@pytest.mark.parametrize(
    "labels", [3.0, [1, 2.5, 3], "3", True, np.True_, [1, True, 3], torch.tensor(True)]
)
def test_a_class_that_is_no_integer_is_refused_by_name(labels):
    """A bool is no class: operator.index takes True as class 1."""
    with pytest.raises(TypeError, match=r"class_label must be one integer class or a sequence"):
        seed_inputs([0, 1, 2], (1, 2, 2), 10, labels)


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


@pytest.mark.slow  # another process: its start costs seconds on busy cores
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
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env()
    )
    # Count finished images only: a writer's temporary file (".name.xxxx.png") also ends in
    # .png, and killing while three files exist, one of them temporary, leaves two images.
    deadline = time.time() + 120
    while time.time() < deadline and len(list(resumed.rglob("[0-9]*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(resumed.rglob("[0-9]*.png")))
    assert 3 <= finished < 12  # killed mid-way
    run_cli("--seeds", "0-11", "--batch", "1", "--outdir", str(resumed))
    assert pngs(resumed) == pngs(reference)  # also: no temporary file left behind


@pytest.mark.slow
def test_torchrun_two_processes_give_the_images_of_one(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    run_cli("--seeds", "0-5", "--batch", "2", "--outdir", str(single))
    args = ["--standalone", "--nproc_per_node=2", "-m", "bdia.cli", "sample", *ARGS]
    args += ["--seeds", "0-5", "--batch", "2", "--outdir", str(double)]
    result = run_torchrun(args, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pngs(double) == pngs(single)


def test_unwritable_outdir_and_bad_class_leave_no_image(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(
        main, ["sample", *ARGS, "--seeds", "0", "--outdir", str(blocker / "sub")]
    )
    assert result.exit_code == 2 and "is a file" in result.output
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["sample", *ARGS, "--seeds", "0", "--class", "12", "--outdir", str(out)]
    )
    assert result.exit_code == 2 and "12 is not a class" in result.output
    assert not out.exists()


def test_a_resumed_run_lists_each_folder_once(tmp_path, monkeypatch):
    """A killed writer's temporary PNG is removed, once per folder listing: a glob per seed
    listed a folder of 1000 images 1000 times (33 s before a resume of 39,000 could start)."""
    import os

    from bdia.models.checkpoints import load_network

    out, seeds = tmp_path / "out", range(2000)
    for seed in seeds:
        image_path(out, seed).parent.mkdir(parents=True, exist_ok=True)
        image_path(out, seed).write_bytes(b"")
    left = [out / "000000" / ".000007.k2_x9.png", out / "001000" / ".001999.abcd.png"]
    kept = [out / "000000" / ".000007.png", out / "002000" / ".002000.abcd.png"]
    for path in left + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    scans, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda *a: scans.append(a) or scandir(*a))
    net = load_network("digits")
    written = generate.generate_images(net, get_solver("euler"), [80.0, 0.0], seeds, out)
    assert written == [] and len(scans) <= 3  # the output folder and its two subfolders
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


@pytest.mark.slow  # another process: its start costs seconds on busy cores
def test_a_child_process_of_the_suite_runs_on_one_thread():
    proc = run_child(["-c", "import torch; print(torch.get_num_threads())"], timeout=120)
    assert proc.stdout.strip() == "1", proc.stdout + proc.stderr


# ------------------------------------------------------------------ the run record of --outdir


def invoke(*args: str):
    return CliRunner().invoke(main, ["sample", *ARGS, *args])


def test_a_rerun_with_other_settings_is_refused_naming_each_difference(tmp_path):
    out = str(tmp_path / "res")
    run_cli("--seeds", "0-3", "--outdir", out)
    before = pngs(tmp_path / "res")
    result = CliRunner().invoke(
        main,
        ["sample", "--network", "random:tiny-cond", "--solver", "euler", "--steps", "4"]
        + ["--gamma", "0.5", "--seeds", "0-7", "--outdir", out],
    )
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line
    assert "--steps (3 in the record, 4 now)" in line
    assert "--gamma (null in the record, 0.5 now)" in line
    assert "--overwrite" in line
    assert pngs(tmp_path / "res") == before  # nothing regenerated, nothing added


def test_a_rerun_with_the_same_settings_resumes_and_counts_the_skipped_seeds(tmp_path):
    out = str(tmp_path / "res")
    run_cli("--seeds", "0-3", "--outdir", out)
    first = pngs(tmp_path / "res")
    result = invoke("--seeds", "0-7", "--outdir", out)
    assert result.exit_code == 0, result.output
    # Without a terminal the bar is one final line; the 4 skipped seeds count toward it.
    assert "images: 8/8 img" in result.stderr
    again = pngs(tmp_path / "res")
    assert len(again) == 8 and {k: again[k] for k in first} == first


def test_overwrite_regenerates_and_drops_images_made_with_other_settings(tmp_path):
    out = tmp_path / "res"
    run_cli("--seeds", "0-7", "--outdir", str(out))
    old = pngs(out)
    result = invoke("--steps", "4", "--seeds", "0-3", "--outdir", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert "removed 8 images made with other settings" in result.stderr
    new = pngs(out)
    assert sorted(new) == sorted(image_path(out, s).relative_to(out).as_posix() for s in range(4))
    assert all(new[k] != old[k] for k in new)  # 4 steps instead of 3: every image changed
    # The folder now records the new settings: a rerun with them resumes, the old ones fail.
    resumed = invoke("--steps", "4", "--seeds", "0-3", "--outdir", str(out))
    assert resumed.exit_code == 0 and pngs(out) == new
    assert invoke("--seeds", "0-3", "--outdir", str(out)).exit_code == 1


def test_images_without_a_record_are_not_trusted(tmp_path):
    out = tmp_path / "res"
    run_cli("--seeds", "0-1", "--outdir", str(out))
    (out / "bdia-run.json").unlink()
    result = invoke("--seeds", "0-1", "--outdir", str(out))
    assert result.exit_code == 1 and "2 images but no run record" in result.stderr


def test_the_record_names_the_network_file_by_its_hash(tmp_path):
    import json

    from bdia._files import file_sha256
    from bdia.models.checkpoints import shipped_network_path

    out = tmp_path / "res"
    result = CliRunner().invoke(
        main,
        ["sample", "--network", "digits", "--steps", "2", "--seeds", "0", "--outdir", str(out)],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "bdia-run.json").read_text())
    digest = file_sha256(shipped_network_path("digits"))
    assert record["settings"]["network"] == f"sha256:{digest}"
    assert record["settings"]["dtype"] == "float32"
    assert record["settings"]["state-dtype"] == "float64"
    assert len(record["info"]["grid"]) == 3  # 2 steps: sigma_max, sigma_min, 0


# ----------------------------------------------------------------------- dtype and progress


@pytest.mark.parametrize(
    "name,dtype", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float32")]
)
def test_dtype_sets_the_dtype_the_unet_convolutions_run_in(name, dtype, tmp_path, monkeypatch):
    import torch

    seen = []
    conv2d = torch.nn.functional.conv2d

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    grid = tmp_path / "g.png"
    result = invoke("--seeds", "0", "--steps", "1", "--dtype", name, "--grid", str(grid))
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {getattr(torch, dtype)}


def test_progress_is_a_bar_on_a_terminal_and_one_line_otherwise(monkeypatch):
    import io

    from bdia.cli._common import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with _Progress(4, "images", "img") as bar:
        bar.update(1)
        bar.update(3)
    assert "100%" in screen.getvalue() and "4/4" in screen.getvalue()
    assert "in " not in screen.getvalue().splitlines()[-1]  # no extra summary line

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with _Progress(4, "images", "img") as bar:
        bar.update(4)
    assert pipe.getvalue().startswith("images: 4/4 img in ") and pipe.getvalue().count("\n") == 1

    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    with _Progress(4, "images", "img", enabled=False) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def test_no_progress_silences_the_final_line(tmp_path):
    result = invoke("--seeds", "0", "--outdir", str(tmp_path / "o"), "--no-progress")
    assert result.exit_code == 0 and "images:" not in result.stderr


def test_a_refused_outdir_keeps_the_grid_of_the_same_run_from_being_written(tmp_path):
    out = tmp_path / "res"
    run_cli("--seeds", "0-1", "--outdir", str(out))
    grid = tmp_path / "grid.png"
    result = invoke("--steps", "4", "--seeds", "0-1", "--outdir", str(out), "--grid", str(grid))
    assert result.exit_code == 1 and not grid.exists()


@pytest.mark.slow  # compiles (Dynamo and AOT autograd take seconds)
def test_compile_flag_compiles_the_network_and_is_recorded(tmp_path, monkeypatch):
    """``--compile`` goes through ``compile_network``; the run record notes it, so a folder
    is not resumed across the flag (compiled kernels may round differently)."""
    import json

    import torch._dynamo

    from bdia.models import networks

    compiled = []

    def without_a_cpp_compiler(net, **kwargs):
        # The inductor backend needs a C++ toolchain and a minute here; aot_eager runs the
        # same capture with eager kernels, so the images must equal uncompiled ones exactly.
        compiled.append(type(net).__name__)
        return networks.compile_network.__wrapped_original__(net, backend="aot_eager")

    without_a_cpp_compiler.__wrapped_original__ = networks.compile_network
    monkeypatch.setattr(networks, "compile_network", without_a_cpp_compiler)
    torch._dynamo.reset()
    try:
        plain, fast = tmp_path / "plain", tmp_path / "fast"
        run_cli("--seeds", "0-2", "--batch", "3", "--outdir", str(plain))
        run_cli("--seeds", "0-2", "--batch", "3", "--outdir", str(fast), "--compile")
    finally:
        torch._dynamo.reset()
    assert compiled == ["EDMPrecond"]
    assert pngs(fast) == pngs(plain)
    record = json.loads((fast / "bdia-run.json").read_text())
    assert record["settings"]["compile"] is True
    assert "compile" not in json.loads((plain / "bdia-run.json").read_text())["settings"]
    refused = invoke("--seeds", "0-2", "--batch", "3", "--outdir", str(fast))
    assert refused.exit_code == 1 and "--compile" in refused.stderr


TINY_TS = torch.tensor([80.0, 10.0, 0.002], dtype=torch.float64)


def _tiny_run(outdir: Path, seeds=(0, 1, 2), *, net=None, **kwargs):
    net = generate.random_network("tiny-cond") if net is None else net
    return generate.generate_images(net, get_solver("euler"), TINY_TS, seeds, outdir, **kwargs)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(batch=0), "batch must be 1 or more, got 0"),
        # A negative batch used to return at once, having written nothing, as if done.
        (dict(batch=-2), "batch must be 1 or more, got -2"),
        # A rank outside the world used to take a share overlapping another rank's.
        (dict(rank=2, world_size=2), r"rank must lie in 0\.\.1 \(world_size 2\), got 2"),
        (dict(rank=-1, world_size=2), r"rank must lie in 0\.\.1 \(world_size 2\), got -1"),
        (dict(world_size=0), "world_size must be 1 or more, got 0"),
    ],
)
def test_generate_images_refuses_a_bad_batch_or_rank_before_any_image(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        _tiny_run(tmp_path / "out", **kwargs)
    assert not list(tmp_path.rglob("*.png"))


def test_a_class_for_an_unconditional_network_is_refused_as_such(tmp_path, monkeypatch):
    net = generate.random_network("tiny-cond")
    monkeypatch.setattr(net, "label_dim", 0)
    # It used to say "class 3 is outside 0..-1".
    with pytest.raises(ValueError, match="unconditional network takes no class; got class 3"):
        _tiny_run(tmp_path, net=net, class_label=3)
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_to_uint8_refuses_images_that_are_not_finite(value):
    """EDM's rounding for finite pixels; a NaN used to become an arbitrary byte (0 on the CPU,
    whatever the device's cast gives elsewhere) and infinities black or white, silently."""
    images = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    images[2, 0, 1, 0] = value
    before = images.clone()
    with pytest.raises(ValueError, match=r"image 2 of 3 holds NaN or Inf"):
        to_uint8(images)
    torch.testing.assert_close(images, before, rtol=0, atol=0, equal_nan=True)  # untouched


def test_seeds_whose_images_are_not_finite_are_named_and_their_batch_is_not_written(
    tmp_path, monkeypatch
):
    real, calls = generate.sample_images, []

    def diverging(*args, **kwargs):
        images = real(*args, **kwargs)
        calls.append(None)
        if len(calls) == 2:  # the second batch: seeds 2 and 3
            images[1] = float("nan")
        return images

    monkeypatch.setattr(generate, "sample_images", diverging)
    with pytest.raises(ValueError, match=r"seed 3 gave an image holding NaN or Inf"):
        _tiny_run(tmp_path, [0, 1, 2, 3], batch=2)
    # The first batch is kept (a rerun resumes after it); none of the failing batch is written.
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["000000.png", "000001.png"]


def test_to_uint8_rounds_as_edm():
    x = torch.tensor([-2.0, -1.0, -1 / 127.5, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    got = to_uint8(x.view(1, 1, 1, -1))
    # EDM: (x * 127.5 + 128).clip(0, 255) cast to uint8 (truncation).
    assert got.dtype == np.uint8 and got.shape == (1, 1, 7)
    assert got.tolist() == [[[0, 0, 127, 128, 191, 255, 255]]]


def _counting_network():
    """random:tiny-cond (10 classes, 16x16 RGB) and a list that grows by one per call."""
    net = generate.random_network("tiny-cond")
    calls: list[None] = []
    net.register_forward_pre_hook(lambda module, args: calls.append(None))
    return net, calls


_PER_IMAGE = r"; give one per image \(4\), or one for the whole batch"


@pytest.mark.parametrize(
    "name,given,words",
    [
        # 3 labels for 4 images used to reach the network, and for target_labels only after
        # the whole inversion under labels had run.
        ("labels", [1, 2, 3], "labels holds 3 class labels for a batch of 4 images" + _PER_IMAGE),
        ("target_labels", [1, 2, 3], "target_labels holds 3 class labels for a batch of 4"),
        ("target_labels", [], "target_labels holds 0 class labels for a batch of 4"),
        # -1 used to pick the last row of the one-hot table: class 9, without a word.
        ("labels", [0, -1, 2, 3], r"labels: -1 is not a class of this network, which has 10 "),
        ("target_labels", [0, 1, 10, 3], r"target_labels: 10 is not a class .* \(0\.\.9\)"),
    ],
)
def test_labels_that_do_not_fit_the_batch_are_refused_before_any_network_call(name, given, words):
    net, calls = _counting_network()
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    images = torch.zeros(4, 3, 16, 16)
    kwargs = {"labels": [0, 1, 2, 3], name: given}
    with pytest.raises(ValueError, match=words):
        generate.reconstruct(net, get_solver("euler"), ts, images, **kwargs)
    assert calls == []
    with pytest.raises(ValueError, match=words.replace("target_labels", "labels")):
        generate.sample_images(net, get_solver("euler"), ts, images, given)
    assert calls == []


@pytest.mark.parametrize(
    "bad",
    [1.0, True, np.bool_(True), "1", None, torch.eye(10)[1]],
    ids=["float", "bool", "numpy-bool", "str", "None", "one-hot-row"],
)
def test_a_label_that_is_no_integer_class_is_named(bad):
    """A label that is no integer was refused by operator.index in words that named neither
    the labels nor the label ("'float' object cannot be interpreted as an integer"), and a
    bool was taken as class 0 or 1."""
    net, calls = _counting_network()
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    images = torch.zeros(4, 3, 16, 16)
    words = r"\[1\] = .* is not an integer class \(an int, or an integer of numpy or torch\)"
    with pytest.raises(TypeError, match="^target_labels" + words):
        generate.reconstruct(
            net, get_solver("euler"), ts, images, [0, 1, 2, 3], target_labels=[0, bad, 2, 3]
        )
    with pytest.raises(TypeError, match="^labels" + words):
        generate.sample_images(net, get_solver("euler"), ts, images, [0, bad, 2, 3])
    assert calls == []


def test_one_label_still_serves_the_whole_batch():
    """The network takes one one-hot row for the whole batch; the check keeps that."""
    net, calls = _counting_network()
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one = generate.sample_images(net, get_solver("euler"), ts, noise, [7])
    each = generate.sample_images(net, get_solver("euler"), ts, noise, [7] * 4)
    assert len(calls) == 4  # two steps of each run
    # The label embedding of one row and of four is the same float32 product per row, but a
    # matrix product of another size may round differently: float32 rounding of the network's
    # output (about 1e-7 relative), carried into a float64 state.
    torch.testing.assert_close(one, each, rtol=1e-6, atol=1e-6)
