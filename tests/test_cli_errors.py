"""Every user mistake at the command line: one line on stderr naming the option, nothing written.

Each case checks the exit status, that stderr holds exactly one line which names the option at
fault and says what is wrong, and that the run left no file or folder behind.
"""

from __future__ import annotations

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bdia.cli import main


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def fails_in_one_line(args, folder, *words, status=None):
    """Run ``bdia ARGS`` in ``folder``; assert one error line holding ``words``; return it."""
    before = files_under(folder)
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    if status is not None:
        assert result.exit_code == status, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert files_under(folder) == before, "the failed run wrote something"
    return lines[0]


@pytest.fixture
def detector(tmp_path):
    """A TorchScript stand-in with the Inception detector's call contract, giving the 16
    features of ``reference``."""
    from bdia.metrics.fid import StandInDetector

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(StandInDetector(features=16)), str(path))
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(16), sigma=np.eye(16))
    return path


def test_invert_refuses_gamma_zero(tmp_path):
    fails_in_one_line(["invert", "--gamma", "0"], tmp_path, "'--gamma'", "(0, 1]")


def test_sample_refuses_a_network_that_is_not_a_denoiser(tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--network", "digits-classifier", "--outdir", out]
    fails_in_one_line(args, tmp_path, "'--network'", "not a diffusion model")


@pytest.mark.parametrize("command", ["sample", "invert"])
@pytest.mark.parametrize(
    "option,value,words",
    [
        ("--sigma-min", "100", ["'--sigma-min'", "below --sigma-max"]),
        ("--sigma-min", "-1", ["'--sigma-min'", "x>0"]),
        ("--rho", "0", ["'--rho'", "x>0"]),
        ("--sigma-max", "inf", ["'--sigma-max'", "not a finite number"]),
        ("--sigma-max", "1e38", ["'--sigma-max'", "float32 network"]),
        ("--rho", "1e-9", ["'--sigma-min' / '--sigma-max' / '--rho'", "--rho 1e-09 give no grid"]),
        ("--sigma-min", "1e-300", ["'--sigma-min' / '--sigma-max' / '--rho'", "no grid of"]),
    ],
)
def test_grid_options_are_checked(command, option, value, words, tmp_path):
    args = [command, option, value]
    if command == "sample":
        args += ["--network", "digits", "--outdir", tmp_path / "out"]
    else:
        args += ["--count", "1"]
    fails_in_one_line(args, tmp_path, *words)


def test_device_without_cuda_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "out", "--device", "cuda"]
    fails_in_one_line(args, tmp_path, "'--device'", "CUDA is not available", "--device cpu")


def test_unknown_device_is_refused(tmp_path):
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "out", "--device", "foo"]
    fails_in_one_line(args, tmp_path, "'--device'", "'foo' is not a device")


def test_fid_refuses_a_detector_that_is_not_torchscript(tmp_path, images, reference):
    fake = tmp_path / "inception.pt"
    fake.write_text("not a TorchScript archive")
    args = ["fid", "--images", images, "--ref", reference, "--detector", fake]
    fails_in_one_line(args, tmp_path, "'--detector'", "TorchScript")


@pytest.mark.parametrize("command", ["fid", "fid-ref"])
def test_an_unreadable_png_is_named(command, tmp_path, images, reference, detector):
    (images / "broken.png").write_text("not a PNG")
    args = [command, "--images", images, "--detector", detector]
    args += ["--ref", reference] if command == "fid" else ["--out", tmp_path / "r.npz"]
    fails_in_one_line(args, tmp_path, "'--images'", "broken.png")


def test_fid_refuses_a_reference_that_is_not_mu_and_sigma(tmp_path, images, detector):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mean=np.zeros(4))
    args = ["fid", "--images", images, "--ref", wrong, "--detector", detector]
    fails_in_one_line(args, tmp_path, "'--ref'", "wrong.npz", "mu")
    text = tmp_path / "text.npz"
    text.write_text("mu sigma")
    args = ["fid", "--images", images, "--ref", text, "--detector", detector]
    fails_in_one_line(args, tmp_path, "'--ref'", "text.npz")


@pytest.mark.parametrize("command", ["fid-ref", "compare", "convert"])
def test_an_output_under_a_regular_file_is_refused(command, tmp_path, images, detector):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    target = blocker / "sub" / "x"
    if command == "fid-ref":
        args = [command, "--images", images, "--detector", detector, "--out", f"{target}.npz"]
        option = "'--out'"
    elif command == "compare":
        args = [command, "--solvers", "euler", "--out", f"{target}.md"]
        option = "'--out'"
    else:
        source = tmp_path / "net.pkl"
        source.write_bytes(b"")
        args = [command, source, f"{target}.safetensors"]
        option = "'TARGET'"
    fails_in_one_line(args, tmp_path, option, "is a file")


@pytest.mark.parametrize("output", ["--outdir", "--grid"])
def test_a_huge_seed_range_is_refused_before_it_is_built(output, tmp_path):
    target = tmp_path / ("out" if output == "--outdir" else "grid.png")
    args = ["sample", "--network", "digits", output, target, "--seeds", "0-1000000000"]
    line = fails_in_one_line(args, tmp_path, "'--seeds'", "1,000,000,001 seeds")
    assert ("--outdir" in line) == (output == "--grid")


def test_a_class_the_network_lacks_is_refused_before_the_outdir_exists(tmp_path):
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "out", "--class", "11"]
    fails_in_one_line(args, tmp_path, "'--class'", "0..9")


def test_a_class_for_an_unconditional_network_is_refused(tmp_path):
    args = ["sample", "--network", "random:ddpmpp-uncond", "--grid", tmp_path / "g.png"]
    fails_in_one_line([*args, "--class", "1"], tmp_path, "'--class'", "unconditional")


def test_a_bdia_solver_name_points_to_gamma(tmp_path):
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "o", "--solver", "bdia-heun"]
    fails_in_one_line(args, tmp_path, "'--solver'", "--solver heun --gamma")


def test_an_unknown_solver_lists_base_names_only(tmp_path):
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "o", "--solver", "heunn"]
    line = fails_in_one_line(args, tmp_path, "'--solver'", "did you mean 'heun'?", status=2)
    assert "bdia-" not in line  # the command line takes no bdia-NAME solver


def test_unknown_dtype_names_the_vocabulary(tmp_path):
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "o", "--dtype", "half"]
    fails_in_one_line(args, tmp_path, "'--dtype'", "float32, bfloat16, float16")


def test_an_unforeseen_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import bdia.cli._sample

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(bdia.cli._sample, "_load_denoiser", broken)
    args = ["sample", "--network", "digits", "--grid", tmp_path / "g.png"]
    line = fails_in_one_line(args, tmp_path, "RuntimeError: something unexpected", "--debug")
    assert line.count("\n") == 0
    result = CliRunner().invoke(main, ["--debug", *[str(a) for a in args]])
    assert isinstance(result.exception, RuntimeError)


# ------------------------------------------------------------------------------ conventions


def test_version():
    import bdia

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"bdia, version {bdia.__version__}"


def test_bare_bdia_shows_the_help_as_click_does():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2  # click's status for a group called without a command
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and "Commands:" in lines, result.stderr
    assert not any(line.startswith("Error") for line in lines)
    assert any(line.split()[:1] == ["sample"] for line in lines)  # one command a line


def _options():
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                yield name, param


def test_every_option_has_help():
    missing = [f"{name} {param.opts[0]}" for name, param in _options() if not param.help]
    assert not missing, missing


def test_one_dtype_vocabulary_across_commands():
    from bdia.cli._common import DtypeType

    for name, param in _options():
        if "dtype" in param.name:
            assert isinstance(param.type, DtypeType), (name, param.opts)
            assert set(param.type.allowed) <= {"float64", "float32", "bfloat16", "float16"}


def test_solver_options_point_to_the_solver_list():
    helps = [param.help for _, param in _options() if param.opts[0] in ("--solver", "--solvers")]
    assert helps and all("bdia solvers" in h for h in helps)


def test_path_options_are_typed_as_paths():
    from bdia.cli._common import OutputPathType

    for name, param in _options():
        if param.opts[0] in ("--out", "--outdir", "--grid", "--images", "--ref", "--detector"):
            assert isinstance(param.type, (click.Path, OutputPathType)), (name, param.opts)


# ------------------------------------------------------------------------- existing outputs


def _output_args(command, target, images, detector):
    if command == "sample":
        return ["sample", "--network", "digits", "--steps", "1", "--seeds", "0", "--grid", target]
    if command == "fid-ref":
        return ["fid-ref", "--images", images, "--detector", detector, "--out", target]
    if command == "compare":
        return ["compare", "--solvers", "euler", "--gammas", "", "--budgets", "2", "--out", target]
    source = target.parent / "net.pkl"
    source.write_bytes(b"")  # refused before it is read
    return ["convert", source, target]


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "command,name,option",
    [
        ("sample", "g.png", "--grid"),
        ("fid-ref", "r.npz", "--out"),
        ("compare", "r.md", "--out"),
        ("convert", "n.safetensors", "TARGET"),
    ],
)
def test_an_existing_output_file_is_replaced_only_with_overwrite(
    command, name, option, tmp_path, images, detector
):
    target = tmp_path / name
    target.write_text("the user's file")
    args = _output_args(command, target, images, detector)
    line = fails_in_one_line(args, tmp_path, f"{option} '{target}' exists", "--overwrite", status=1)
    assert target.read_text() == "the user's file", line
    if command != "convert":
        result = CliRunner().invoke(main, [*map(str, args), "--overwrite", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert target.read_bytes() != b"the user's file"


def test_compare_keeps_a_file_where_its_plot_would_go(tmp_path):
    plot = tmp_path / "r.png"
    plot.write_text("the user's picture")
    args = ["compare", "--solvers", "euler", "--gammas", "", "--out", tmp_path / "r.md"]
    fails_in_one_line(args, tmp_path, f"'{plot}', exists", "--no-plot", status=1)
    assert plot.read_text() == "the user's picture"
    plot.unlink()
    plot.mkdir()
    fails_in_one_line(args, tmp_path, "'--out'", "is a folder", "--no-plot", status=2)
    result = CliRunner().invoke(main, [*map(str, args), "--budgets", "2", "--no-plot"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.md").is_file() and not any(plot.iterdir())


def test_compare_records_no_overwrite_in_its_command(tmp_path):
    out = tmp_path / "r.md"
    args = ["compare", "--solvers", "euler", "--gammas", "", "--budgets", "2", "--no-plot"]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "--overwrite" not in out.read_text() and "--no-plot" in out.read_text()


# ---------------------------------------------------------------------- fid --images checks


def _write_npz(path, kind):
    if kind == "no arrays":
        np.savez(path)
    elif kind == "no images":
        np.savez(path, x=np.zeros((0, 8, 8, 3), np.uint8))
    elif kind == "one image":
        np.savez(path, x=np.zeros((1, 8, 8, 3), np.uint8))
    elif kind == "text":
        path.write_text("not an npz")
    elif kind == "truncated":
        np.savez(path, x=np.zeros((3, 8, 8, 3), np.uint8))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "damaged":
        np.savez(path, x=np.zeros((3, 8, 8, 3), np.uint8))
        data = bytearray(path.read_bytes())
        data[100:140] = b"\xff" * 40  # inside the member's data: its CRC fails
        path.write_bytes(bytes(data))
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((3, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("command", ["fid", "fid-ref"])
@pytest.mark.parametrize(
    "kind,words",
    [
        ("no arrays", ["holds no arrays"]),
        ("no images", ["holds no images"]),
        ("one image", ["holds 1 image", "at least 2"]),
        ("text", ["not an npz file"]),
        ("truncated", ["not an npz file"]),
        ("damaged", ["'x' is unreadable", "CRC"]),
        ("npy", ["a single .npy array"]),
    ],
)
def test_an_npz_of_images_is_checked_before_any_feature(
    command, kind, words, tmp_path, reference, detector, monkeypatch
):
    from bdia.metrics import fid

    def no_features(*args, **kwargs):
        raise AssertionError("features were extracted")

    monkeypatch.setattr(fid, "extract_features", no_features)
    npz = tmp_path / "images.npz"
    _write_npz(npz, kind)
    args = [command, "--images", npz, "--detector", detector]
    args += ["--ref", reference] if command == "fid" else ["--out", tmp_path / "r.npz"]
    line = fails_in_one_line(args, tmp_path, "Invalid value for '--images'", *words, status=2)
    assert "allow_pickle" not in line


def test_fid_of_a_folder_of_one_image_names_images(tmp_path, images, reference, detector):
    for extra in sorted(images.iterdir())[1:]:
        extra.unlink()
    args = ["fid", "--images", images, "--ref", reference, "--detector", detector]
    fails_in_one_line(args, tmp_path, "Invalid value for '--images'", "1 image", status=2)


# ----------------------------------------------------------------------------- small ones


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize("command", ["sample", "convert"])
def test_an_unsafe_pickle_is_a_wrong_option(command, tmp_path):
    import pickle

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": _RunsCode()}, protocol=2))
    if command == "sample":
        args, option = ["sample", "--network", evil, "--grid", tmp_path / "g.png"], "'--network'"
    else:
        args, option = ["convert", evil, tmp_path / "n.safetensors"], "'SOURCE'"
    fails_in_one_line(args, tmp_path, f"Invalid value for {option}", "refusing global", status=2)


def test_a_cpu_index_is_refused(tmp_path):
    args = ["sample", "--network", "digits", "--outdir", tmp_path / "o", "--device", "cpu:3"]
    fails_in_one_line(args, tmp_path, "'--device'", "one CPU device", status=2)


@pytest.mark.parametrize(
    "args,option",
    [
        (["sample", "--network", "digits", "--seeds", "0", "--outdir", ""], "'--outdir'"),
        (["sample", "--network", "digits", "--seeds", "0", "--grid", ""], "'--grid'"),
        (["invert", "--images", "x.png", "--class", "3", "--outdir", ""], "'--outdir'"),
        (["compare", "--solvers", "euler", "--budgets", "2", "--out", ""], "'--out'"),
        (["convert", "net.pkl", ""], "'TARGET'"),
        # Inputs: fid read every image under the current folder, --network '' was a folder.
        (["fid", "--images", "", "--ref", "ref.npz", "--detector", "inception.pt"], "'--images'"),
        (["fid-ref", "--images", "", "--out", "r.npz", "--detector", "inception.pt"], "'--images'"),
        (["fid", "--images", "images", "--ref", "", "--detector", "inception.pt"], "'--ref'"),
        (["fid", "--images", "images", "--ref", "ref.npz", "--detector", ""], "'--detector'"),
        (["invert", "--images", "", "--class", "3", "--outdir", "o"], "'--images'"),
        (["sample", "--latents", "", "--outdir", "o"], "'--latents'"),
        (["sample", "--network", "", "--seeds", "0", "--outdir", "o"], "'--network'"),
        (["invert", "--network", "", "--images", "x.png", "--outdir", "o"], "'--network'"),
        (["convert", "", "net.safetensors"], "'SOURCE'"),
    ],
)
def test_an_empty_path_is_refused(args, option, tmp_path, monkeypatch, images, detector, reference):
    """An empty path, as an unset shell variable gives, would name the current folder."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "net.pkl").write_bytes(b"")
    fails_in_one_line(args, tmp_path, option, "the path is empty", status=2)


@pytest.mark.parametrize(
    "args,words",
    [
        # After the command, --debug is no option of it: one line that says where it goes.
        (["sample", "--debug", "--network", "digits"], ["--debug", "bdia --debug sample"]),
        # A value that reads --debug turns nothing on.
        (["sample", "--network", "digits", "--grid", "g.png", "--seeds", "--debug"], ["'--seeds'"]),
    ],
)
def test_debug_counts_only_before_the_command(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_in_one_line(args, tmp_path, *words, status=2)


@pytest.mark.parametrize(
    "args,option",
    [
        (["compare", "--seed", str(2**64)], "'--seed'"),
        (["compare", "--seed", "-1"], "'--seed'"),
        (["compare", "--threads", str(2**31)], "'--threads'"),
        (
            ["sample", "--network", "digits", "--grid", "g.png", "--threads", str(2**31)],
            "'--threads'",
        ),
    ],
)
def test_integers_beyond_what_torch_takes_are_refused(args, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_in_one_line(args, tmp_path, option, status=2)


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--network", "digits", "--seeds", "0", "--outdir", "o"],
        ["invert", "--count", "1"],
        ["compare", "--solvers", "euler", "--budgets", "2"],
        ["fid", "--images", "images", "--ref", "ref.npz", "--detector", "det.pt"],
    ],
)
def test_more_threads_than_cpus_are_refused(command, tmp_path, monkeypatch):
    """torch starts every thread asked for: 100,000 crashed the process (a segmentation
    fault, after the run record was written); more than the CPUs only wait for each other."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    args = [*command, "--threads", "5"]
    fails_in_one_line(args, tmp_path, "'--threads'", "4 CPUs", "at most 4", status=2)


def test_compare_refuses_a_budget_beyond_the_step_limit(tmp_path):
    from bdia.cli._common import MAX_STEPS

    args = ["compare", "--solvers", "euler", "--budgets", f"10,{10**11}"]
    fails_in_one_line(args, tmp_path, "'--budgets'", f"{MAX_STEPS:,}", status=2)


def test_fid_refuses_a_reference_of_another_dimension_before_any_image(
    tmp_path, images, detector, monkeypatch
):
    """The detector gives 16 features, the reference has 8: refused at once, not after the
    features of every image."""
    from bdia.metrics import fid

    def no_statistics(*args, **kwargs):
        raise AssertionError("the images were read")

    monkeypatch.setattr(fid, "image_statistics", no_statistics)
    eight = tmp_path / "eight.npz"
    np.savez(eight, mu=np.zeros(8), sigma=np.eye(8))
    args = ["fid", "--images", images, "--ref", eight, "--detector", detector]
    line = fails_in_one_line(args, tmp_path, "'--ref'", "eight.npz", "--detector", status=2)
    assert "of 8 features" in line and "gives 16" in line


def test_fid_refuses_a_detector_without_the_inception_contract(tmp_path, images, reference):
    class NoFeatures(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(NoFeatures()), str(path))
    args = ["fid", "--images", images, "--ref", reference, "--detector", path]
    fails_in_one_line(args, tmp_path, "'--detector'", "other.pt", "return_features", status=2)


@pytest.mark.parametrize("command", ["fid", "fid-ref"])
def test_features_holding_nan_are_blamed_on_the_detector(command, tmp_path, reference):
    class NaNFeatures(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.full((x.shape[0], 16), float("nan"))

    path = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(NaNFeatures()), str(path))
    # 17 images: enough for a 16-feature covariance, so that no sample-size warning shows.
    images = tmp_path / "seventeen"
    images.mkdir()
    for i in range(17):
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(images / f"{i}.png")
    target = ["--ref", reference] if command == "fid" else ["--out", tmp_path / "out.npz"]
    args = [command, "--images", images, *target, "--detector", path, "--no-progress"]
    line = fails_in_one_line(args, tmp_path, "'--detector'", "nan.pt", status=2)
    assert "NaN or Inf" in line


def test_a_wrong_option_is_named_before_an_existing_grid(tmp_path):
    """Exit status 2 names the option at fault; 1 (the file exists) is for valid options."""
    grid = tmp_path / "g.png"
    grid.write_text("the user's file")
    args = ["sample", "--network", "digits", "--seeds", "0", "--grid", grid, "--class", "10"]
    fails_in_one_line(args, tmp_path, "'--class'", status=2)
    assert grid.read_text() == "the user's file"


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "args,target,error,hint",
    [
        (
            ["sample", "--network", "digits", "--steps", "2", "--seeds", "0-1", "--grid", "g.png"],
            "sample_images",
            MemoryError(),
            "out of memory: use a smaller --batch",
        ),
        (
            ["invert", "--count", "2", "--steps", "2"],
            "reconstruct",
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "out of memory: free memory on the device, or choose another --device",
        ),
    ],
)
def test_running_out_of_memory_names_what_the_command_can_shrink(
    monkeypatch, tmp_path, args, target, error, hint
):
    """A command with --batch is told to shrink it; invert, which has none, is not sent to
    look for an option it lacks."""
    from bdia import generate

    def out_of_memory(*a, **k):
        raise error

    monkeypatch.setattr(generate, target, out_of_memory)
    monkeypatch.chdir(tmp_path)
    line = fails_in_one_line([*args, "--no-progress"], tmp_path, status=1)
    assert line.endswith(f"({hint})"), line
