"""The shipped 8x8 digits model and classifier: loading, sampling, training, inversion, CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import benchmark_module, run_child

import bdia
from bdia import generate
from bdia.cli import main
from bdia.models import digits
from bdia.models.checkpoints import (
    load_network,
    read_metadata,
    save_network,
    shipped_network_path,
)


def _training_script():
    """``benchmarks/train_digits.py``: the training loops live there, not in bdia."""
    return benchmark_module("train_digits")


@pytest.fixture(scope="module")
def split() -> digits.DigitsSplit:
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return load_network("digits")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_network("digits-classifier")


def test_split_is_fixed_stratified_and_disjoint(split):
    assert split.train_images.shape == (1437, 1, 8, 8)
    assert split.held_out_images.shape == (360, 1, 8, 8)
    assert split.train_images.dtype == torch.float32
    assert float(split.train_images.min()) == -1.0 and float(split.train_images.max()) == 1.0
    # 20% of every class is held out (stratified), give or take one image per class.
    counts = torch.bincount(split.held_out_labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = digits.load_digits_split()
    assert torch.equal(again.held_out_images, split.held_out_images)
    # No held-out image is (bit for bit) one of the training images it could leak from.
    train = {bytes(x.numpy()) for x in split.train_images}
    leaked = sum(bytes(x.numpy()) in train for x in split.held_out_images)
    assert leaked == 0


@pytest.mark.parametrize("name", ["digits", "digits-classifier"])
def test_shipped_weights_load_and_reproduce_the_recorded_outputs(name):
    path = shipped_network_path(name)
    # The package must stay small enough to install anywhere.
    assert path.stat().st_size <= 5_000_000
    loaded = load_network(name)
    x, sigma, labels = digits.probe_inputs()
    with torch.no_grad():
        out = loaded(x, sigma, labels) if name == "digits" else loaded(x.clamp(-1, 1))
    recorded = torch.tensor(json.loads(read_metadata(name)["probe"]))
    # The same float32 weights and ops: only a different CPU kernel could change the last
    # bits, so 1e-5 relative to the outputs' scale (about 1-10) is the tolerance.
    torch.testing.assert_close(out.flatten(), recorded, rtol=1e-5, atol=1e-5)


def test_saving_and_loading_a_digits_network_is_lossless(net, tmp_path):
    path = tmp_path / "copy.safetensors"
    save_network(net, path)
    copy = load_network(path)
    x, sigma, labels = digits.probe_inputs()
    with torch.no_grad():
        assert torch.equal(copy(x, sigma, labels), net(x, sigma, labels))


def test_classifier_accuracy_on_held_out_digits(classifier, split):
    predicted = digits.predict(classifier, split.held_out_images)
    accuracy = float((predicted == split.held_out_labels).double().mean())
    assert accuracy >= 0.98


def test_sampling_is_deterministic_per_seed(net):
    ts = bdia.karras_grid(6)
    solver = bdia.get_solver("heun")

    def images(seeds):
        noise, labels = generate.seed_inputs(seeds, (1, 8, 8), 10)
        return generate.sample_images(net, solver, ts, noise, labels)

    first, again = images([3, 4, 5]), images([3, 4, 5])
    assert torch.equal(first, again)
    alone = images([5])
    # Another batch size may change the CPU kernels' summation order, not the image.
    torch.testing.assert_close(alone[0], first[2], rtol=0, atol=1e-5)
    assert (first[0] - first[1]).abs().max() > 0.1


def test_ten_training_iterations_lower_the_loss(split):
    training = _training_script()

    def held_out_loss(model):
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return float(
                training.edm_loss(model, split.held_out_images, split.held_out_labels, gen).mean()
            )

    before = held_out_loss(training.build_denoiser(seed=0))
    trained, losses = training.train_denoiser(10, batch=64, seed=0, split=split)
    after = held_out_loss(trained)
    assert len(losses) == 10 and all(np.isfinite(losses))
    # Ten steps from a fresh network take the held-out loss from 1.63 to 1.24 (a ratio of
    # 0.76 with seeds 0, 1 and 2; 0.72 after twenty steps, 0.85 after five).
    assert after < 0.9 * before


def test_conditional_samples_are_classified_as_their_label(net, classifier):
    seeds = list(range(200))
    labels = [s % 10 for s in seeds]
    noise, labels = generate.seed_inputs(seeds, (1, 8, 8), 10, labels)
    solver = bdia.get_solver("heun")
    ts = bdia.karras_grid(10)  # 10 heun steps, the last Euler: 19 NFE
    ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": torch.eye(10)[labels]})
    with torch.no_grad():
        images = bdia.sample(ode, solver, 80.0 * noise, ts, progress=False)
    assert ode.nfe == 19
    accuracy = float(
        (digits.predict(classifier, images.float()) == torch.tensor(labels)).double().mean()
    )
    assert accuracy >= 0.90


# Heun's two evaluations per step double the time; it runs in the slow pass, euler in both.
@pytest.mark.first_case_by_default
@pytest.mark.parametrize("base", ["euler", pytest.param("heun", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "state_dtype,tolerance",
    # Two-word states: measured 1.6e-13 (euler) and 2.4e-7 (heun: a float32 high word may round
    # to the neighbouring value in one direction, see the theory page) in float32 with torch
    # 2.13, 1.2e-6 (heun) with torch 2.8 (.ci/lowest), and 1e-30 in float64. Single-word
    # states lose about 1e-2 and 1e-7 here, so 1e-5 and 1e-25 pin the two-word feature with
    # margin.
    [(torch.float32, 1e-5), (torch.float64, 1e-25)],
)
def test_bdia_round_trips_held_out_digits(net, split, base, state_dtype, tolerance):
    images = split.held_out_images[:16]
    labels = split.held_out_labels[:16].tolist()
    solver = bdia.bdia(bdia.get_solver(base), 0.96)
    ts = bdia.karras_grid(35, final_zero=False)
    pair, back = generate.reconstruct(net, solver, ts, images, labels, state_dtype=state_dtype)
    assert back.dtype == state_dtype
    # The inverted state is noise at sigma 80, far from the data.
    assert float(pair.earlier.std()) > 40
    assert float((back.double() - images.double()).abs().max()) <= tolerance


def test_approximate_inversion_is_far_less_accurate_than_bdia(net, split):
    images = split.held_out_images[:16]
    labels = split.held_out_labels[:16].tolist()
    ts = bdia.karras_grid(35, final_zero=False)
    _, back = generate.reconstruct(net, bdia.get_solver("euler"), ts, images, labels)
    assert float((back.double() - images.double()).abs().max()) > 1e-3


# About 2 s; regenerating under another label through bdia.Inversion
# (tests/test_editing.py) runs by default.
@pytest.mark.slow
def test_edit_regenerates_under_another_label(net, classifier, split):
    picks = [int((split.held_out_labels == c).nonzero()[0]) for c in range(10)]
    images = split.held_out_images[picks]
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    ts = bdia.karras_grid(35, final_zero=False)
    targets = [(c + 1) % 10 for c in range(10)]

    def edit(edit_solver):
        _, edited = generate.reconstruct(
            net, solver, ts, images, list(range(10)), target_labels=targets, edit_solver=edit_solver
        )
        return (digits.predict(classifier, edited.float()) == torch.tensor(targets)).double().mean()

    # From the exactly inverted pair, the base solver regenerates each digit as the new class.
    assert float(edit(solver.solver)) >= 0.9
    # BDIA itself under other labels keeps the pair's parasitic mode, which grows into noise.
    assert float(edit(None)) <= 0.5


def test_frechet_digit_distance_is_zero_for_identical_sets_and_grows_with_noise(classifier, split):
    held = split.held_out_images
    assert digits.frechet_digit_distance(classifier, held, held) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noisy = held + 0.5 * torch.randn(held.shape, generator=gen)
    real = digits.frechet_digit_distance(classifier, split.train_images, held)
    assert digits.frechet_digit_distance(classifier, noisy, held) > 2 * real
    with pytest.raises(ValueError, match="at least 2"):
        digits.frechet_digit_distance(classifier, held[:1], held)


# ------------------------------------------------------------------------------------ CLI


def test_scoring_helpers_take_an_empty_set():
    # torch.cat of no batches used to raise "expected a non-empty list of Tensors".
    classifier = digits.DigitClassifier().eval()
    empty = torch.zeros(0, 1, 8, 8)
    predicted = digits.predict(classifier, empty)
    assert predicted.shape == (0,) and predicted.dtype == torch.int64
    features = digits.classifier_features(classifier, empty)
    assert features.shape == (0, 64) and features.dtype == torch.float64


@pytest.mark.parametrize("shape", [(8, 8), (2, 8, 8), (2, 3, 8, 8), (2, 1, 4, 4)])
def test_scoring_helpers_refuse_images_of_another_shape(shape):
    # to_pixels took row 0 of an (8, 8) image as eight one-pixel "images"; the classifier
    # failed inside its linear layer.
    classifier = digits.DigitClassifier().eval()
    images = torch.zeros(shape)
    for helper in (
        digits.to_pixels,
        lambda x: digits.predict(classifier, x),
        lambda x: digits.classifier_features(classifier, x),
    ):
        with pytest.raises(ValueError, match=r"images must have shape \(n, 1, 8, 8\), got"):
            helper(images)


def test_frechet_digit_distance_refuses_images_that_are_not_finite(split):
    # Clipping keeps NaN, and scipy's sqrtm then failed with "Internal error ... -102".
    classifier = digits.DigitClassifier().eval()
    bad = split.held_out_images[:20].clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="images_b holds 1 NaN values"):
        digits.frechet_digit_distance(classifier, split.held_out_images[20:40], bad)


def test_cli_sample_writes_a_labelled_grid(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        main,
        ["sample", "--network", "digits", "--steps", "6", "--seeds", "0-19", "--grid", str(out)],
    )
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    # Two rows of ten 32-pixel cells (8x8 enlarged four times) under a caption row.
    assert image.shape[1] > 10 * 32 and image.shape[0] > 2 * 32
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_cli_sample_needs_an_output(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--network", "digits", "--steps", "2"])
    assert result.exit_code == 2
    assert "--outdir" in result.output and "--grid" in result.output
    result = CliRunner().invoke(
        main,
        ["sample", "--network", "digits", "--seeds", "0-2000", "--grid", str(tmp_path / "g.png")],
    )
    assert result.exit_code == 2 and "at most 1024" in result.output
    assert not (tmp_path / "g.png").exists()


def test_cli_invert_reports_exact_and_approximate_errors():
    result = CliRunner().invoke(main, ["invert", "--network", "digits", "--count", "4"])
    assert result.exit_code == 0, result.output
    errors = {}
    for line in result.output.splitlines():
        match = re.match(r"(.+?\((exact|approximate)\))\s+(\S+)\s+(\S+)$", line)
        if match:
            errors[match.group(2)] = float(match.group(3))
    assert errors["exact"] <= 1e-12  # float64 state, bdia(euler, 0.96), 35 steps
    assert errors["approximate"] > 1e-3


def test_cli_invert_rejects_a_bad_gamma():
    result = CliRunner().invoke(main, ["invert", "--gamma", "1.5", "--count", "2"])
    assert result.exit_code == 2
    assert "gamma" in result.output


# ------------------------------------------------------------------------------ scripts


def _run_script(*args: str) -> str:
    proc = run_child(args, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_training_script_smoke_writes_loadable_networks(tmp_path):
    out = _run_script("benchmarks/train_digits.py", "--smoke", "--out", str(tmp_path))
    before = float(re.search(r"loss before training: (\S+)", out).group(1))
    after = float(re.search(r"loss after training \(EMA\): (\S+)", out).group(1))
    assert after < before
    net = load_network(tmp_path / "digits.safetensors")
    x, sigma, labels = digits.probe_inputs()
    recorded = torch.tensor(json.loads(read_metadata(tmp_path / "digits.safetensors")["probe"]))
    # Written with two threads, read here with one: kernels may sum in another order.
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, labels).flatten(), recorded, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_study_script_smoke_writes_its_report(tmp_path):
    out_md = tmp_path / "digits.md"
    _run_script("benchmarks/digits_study.py", "--smoke", "--out", str(out_md))
    text = out_md.read_text()
    assert "| bdia(euler, 0.96) |" in text and "single words" in text
    for name in ("digits_fdd.png", "digits_accuracy.png", "digits_samples.png", "digits_edit.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # The exact round trip in float64 state is reported at 1e-12 or below.
    inversion = text.split("## Inversion")[1]
    row = next(line for line in inversion.splitlines() if line.startswith("| bdia(euler, 0.96) |"))
    assert float(row.split("|")[4]) <= 1e-12
