"""What the benchmark scripts refuse before any work: a smoke run without --out (whose default
is a published page or the package's networks) and arguments out of range; and the command
each page names being the one that ran."""

import argparse
from pathlib import Path

import pytest
import torch
from conftest import REPO, benchmark_module

SMOKE_DEFAULTS = {
    "reversible": "docs/benchmarks/reversible.md",
    "two_word": "docs/benchmarks/two_word.md",
    "digits_study": "docs/benchmarks/digits.md",
    "train_digits": "bdia/models/weights",
    "fingerprint": "docs/benchmarks/fingerprint.md",
}


@pytest.mark.parametrize("script", sorted(SMOKE_DEFAULTS))
def test_a_smoke_run_without_out_is_refused(script, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_module(script).main(["--smoke"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--smoke needs --out" in err and SMOKE_DEFAULTS[script] in err


def test_out_or_default_refuses_a_smoke_run_without_out_naming_the_default(capsys):
    args_module = benchmark_module("_args")
    parser = argparse.ArgumentParser(prog="study")
    default = REPO / "docs" / "benchmarks" / "study.md"

    def out(smoke, given=None, name=None):
        args = argparse.Namespace(out=given, smoke=smoke)
        return args_module.out_or_default(parser, args, default, name)

    assert out(False) == default
    assert (
        out(True, Path("/tmp/page.md")) == out(False, Path("/tmp/page.md")) == Path("/tmp/page.md")
    )
    with pytest.raises(SystemExit) as exc:
        out(True)
    assert exc.value.code == 2
    # The default as a path from the repository root, wherever the suite runs from.
    assert "--smoke needs --out: the default is docs/benchmarks/study.md" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        out(True, name="the package's networks")
    assert "the default is the package's networks" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("editing", ["--count", "0"], "--count: must be at least 1, got 0"),
        ("editing", ["--count", "-5"], "--count: must be at least 1, got -5"),
        ("editing", ["--steps", "10,,35"], "--steps: expected step counts of at least 1"),
        ("editing", ["--steps", "0"], "--steps: expected step counts of at least 1"),
        ("busy_machine", ["--repeats", "0"], "--repeats: must be at least 1, got 0"),
        ("busy_machine", ["--busy", "-1"], "--busy: must be at least 0, got -1"),
        ("gradients", ["--repeats", "0"], "--repeats: must be at least 1, got 0"),
        ("gradients", ["--steps", "5", "0"], "--steps: must be at least 1, got 0"),
        # Counts that ran the study for minutes and then crashed or wrote nan.
        ("reversible", ["--count", "0"], "--count: must be at least 1, got 0"),
        ("reversible", ["--samples", "0"], "--samples: must be at least 1, got 0"),
        ("reversible", ["--batch", "-1"], "--batch: must be at least 1, got -1"),
        ("two_word", ["--growth-count", "0"], "--growth-count: must be at least 1, got 0"),
        ("two_word", ["--points", "0"], "--points: must be at least 1, got 0"),
        ("two_word", ["--digits", "-2"], "--digits: must be at least 1, got -2"),
        ("digits_study", ["--samples", "0"], "--samples: must be at least 1, got 0"),
        ("digits_study", ["--inversion-count", "0"], "--inversion-count: must be at least 1"),
    ],
)
def test_arguments_out_of_range_are_refused(script, args, message, capsys, monkeypatch):
    def ran(threads):
        raise AssertionError(f"{script} {args} went past its arguments")

    # Every script sets its threads once its arguments are read: an argument let through
    # fails here, before the study starts (and before a default page could be written).
    monkeypatch.setattr(torch, "set_num_threads", ran)
    with pytest.raises(SystemExit) as exc:
        benchmark_module(script).main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_editing_page_names_the_command_that_wrote_it_and_the_machine(tmp_path):
    out = tmp_path / "editing.md"
    args = ["--count", "2", "--steps", "2", "--out", str(out)]
    assert benchmark_module("editing").main(args) == 0
    text = out.read_text()
    assert f"Written by `python benchmarks/editing.py {' '.join(args)}`." in text
    assert "Run time:" in text and " CPU, torch " in text


def test_the_busy_machine_page_names_the_command_that_wrote_it(tmp_path, monkeypatch):
    bm = benchmark_module("busy_machine")
    monkeypatch.setattr(bm, "timed", lambda command, cwd: 1.0)
    monkeypatch.setattr(bm.time, "sleep", lambda seconds: None)
    out = tmp_path / "busy.md"
    for where in (["--out", str(out)], [f"--out={out}"]):
        assert bm.main(["--busy", "0", *where, "--repeats", "2", "--skip-tests"]) == 0
        # The options as given, but where the page went.
        command = "python benchmarks/busy_machine.py --busy 0 --repeats 2 --skip-tests"
        assert f"Written by `{command}`." in out.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gradients_on_cuda_without_a_device_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_module("gradients").main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_the_gradients_page_links_the_figure_written_beside_it(tmp_path, monkeypatch):
    gr = benchmark_module("gradients")
    monkeypatch.setattr(
        gr, "timings", lambda n, repeats, device: ({m: [n / 10] for m in gr.METHODS}, 0.0)
    )
    monkeypatch.setattr(gr, "peak_memory", lambda method, n, device: 2**20 * n)
    out = tmp_path / "memory.md"
    gr.main(["--steps", "2", "4", "--repeats", "1", "--out", str(out)])
    links = [ln for ln in out.read_text().splitlines() if ln.startswith("![")]
    assert links == ["![peak memory and time against the number of steps](memory.png)"]
    assert (tmp_path / "memory.png").is_file()
