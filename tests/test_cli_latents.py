"""``bdia invert --images`` writes latents; ``bdia sample --latents`` regenerates from them.

Everything runs on the shipped digits network (8x8, one channel, ten classes) with PNGs the
tests write from held-out digits.
"""

from __future__ import annotations

import contextlib
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import fake_mps, folder_bytes, torchrun_bdia
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli_errors import fails_in_one_line

import bdia
from bdia import generate
from bdia.cli import main
from bdia.latents import LATENTS_FORMAT, load_latents, save_latents
from bdia.models import digits
from bdia.models.checkpoints import load_network, save_network, shipped_network_path

# Six digits over 20 steps: every check below holds as it does for more, at a third of the cost.
SOURCE_CLASS, EDIT_CLASS, COUNT, STEPS = 3, 5, 6, 20
NAMES = [f"digit{i}" for i in range(COUNT)]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def pixels(path):
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """COUNT held-out digits of one class as 8x8 grey PNGs."""
    split = digits.load_digits_split()
    picks = (split.held_out_labels == SOURCE_CLASS).nonzero()[:COUNT, 0]
    folder = tmp_path_factory.mktemp("pngs")
    for name, image in zip(NAMES, generate.to_uint8(split.held_out_images[picks])):
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def inverted(pngs, tmp_path_factory):
    """``bdia invert --images`` of the PNGs: (outdir, the run's result)."""
    out = tmp_path_factory.mktemp("inverted") / "latents"
    result = invoke(
        "invert", "--images", pngs, "--class", SOURCE_CLASS, "--steps", STEPS, "--outdir", out
    )
    return out, result


def test_invert_writes_latents_reconstructions_and_a_summary(pngs, inverted):
    out, result = inverted
    expected = ["bdia-invert.json"]
    expected += [f"{n}.safetensors" for n in NAMES] + [f"{n}-reconstruction.png" for n in NAMES]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # no temporary files
    summary = json.loads((out / "bdia-invert.json").read_text())
    # Exact inversion: float64 state, bdia(euler, 0.96), STEPS steps.
    assert summary["max abs error"] < 1e-12 and summary["rms error"] < 1e-12
    assert summary["class"] == SOURCE_CLASS and summary["network path"] == "digits"
    assert [r["source"] for r in summary["images"]] == [f"{n}.png" for n in NAMES]
    assert "round trip" in result.stdout and "max abs error" in result.stdout
    for name in NAMES:
        reconstruction = pixels(out / f"{name}-reconstruction.png")
        assert np.array_equal(reconstruction, pixels(pngs / f"{name}.png"))


def test_latents_hold_the_pair_of_the_in_process_inversion_bit_for_bit(pngs, inverted):
    out, _ = inverted
    net = load_network("digits")
    ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": torch.eye(10)[[SOURCE_CLASS]]})
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    grid = bdia.karras_grid(STEPS, final_zero=False)
    for name in NAMES[:3]:
        data = torch.from_numpy(pixels(pngs / f"{name}.png")).double()[None, None] / 127.5 - 1
        expected = bdia.Inversion.of(ode, solver, data, grid, state_dtype=torch.float64).pair
        pair, ts, meta = load_latents(out / f"{name}.safetensors")
        assert expected.earlier_low is not None  # the low words are part of what is saved
        for field in ("earlier", "later", "earlier_low", "later_low"):
            a, b = getattr(pair, field), getattr(expected, field)
            assert a.dtype == b.dtype == torch.float64 and a.shape == (1, 1, 8, 8)
            assert torch.equal(a.view(torch.int64), b.view(torch.int64)), field
        assert pair.fingerprint == expected.fingerprint
        # The file records the solver as its base and gamma; the loaded pair carries it.
        assert pair.solver == expected.solver == solver.identity == "bdia(euler, gamma=0.96)"
        assert pair == expected
        assert torch.equal(ts, grid)
        assert pair.times == expected.times == (float(grid[0]), float(grid[1]))
        assert meta["class"] == SOURCE_CLASS and meta["source"] == f"{name}.png"
        assert (meta["solver"], meta["gamma"], meta["network_path"]) == ("euler", 0.96, "digits")
        assert meta["network"].startswith("sha256:")


def test_sample_from_latents_under_their_class_reproduces_the_images(pngs, inverted, tmp_path):
    out, _ = inverted
    back = tmp_path / "back"
    result = invoke("sample", "--latents", out, "--outdir", back)
    assert f"{COUNT} reconstructed" in result.stderr
    assert sorted(p.name for p in back.iterdir()) == sorted(f"{n}.png" for n in NAMES)
    for name in NAMES:
        assert np.array_equal(pixels(back / f"{name}.png"), pixels(pngs / f"{name}.png"))
    # Naming the network and the recorded class changes nothing.
    again = tmp_path / "again"
    one = out / f"{NAMES[0]}.safetensors"
    invoke("sample", "--latents", one, "--network", "digits", "--class", 3, "--outdir", again)
    assert np.array_equal(pixels(again / f"{NAMES[0]}.png"), pixels(pngs / f"{NAMES[0]}.png"))


def test_sample_from_latents_under_another_class_edits(inverted, tmp_path):
    out, _ = inverted
    edits = tmp_path / "edits"
    result = invoke("sample", "--latents", out, "--class", EDIT_CLASS, "--outdir", edits)
    assert f"{COUNT} edited to class {EDIT_CLASS}" in result.stderr
    images = np.stack([pixels(edits / f"{n}.png") for n in NAMES])
    read = digits.predict(
        load_network("digits-classifier"), torch.from_numpy(images)[:, None] / 127.5 - 1
    )
    # benchmarks/editing.py measured 99.2% of 360 held-out digits read as the new class with
    # this rule at 20 steps (continuing the pair instead: 75%, in values far outside [-1, 1]).
    # All but one of COUNT leaves room for a digit that platform rounding might tip.
    assert int((read == EDIT_CLASS).sum()) >= COUNT - 1, read.tolist()


def test_latents_round_trip_without_low_words_and_refuse_other_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    pair = bdia.StatePair(a, b, fingerprint="0123456789abcdef")
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    path = tmp_path / "x.safetensors"
    save_latents(path, pair, ts, solver="heun", gamma="obelm", class_label=None, network="n")
    loaded, ts_back, meta = load_latents(path)
    assert torch.equal(loaded.earlier, a) and torch.equal(loaded.later, b)
    assert loaded.earlier_low is None and loaded.later_low is None
    assert loaded.fingerprint == pair.fingerprint and torch.equal(ts_back, ts)
    assert loaded.times == (80.0, 1.0)  # the saved states sit at the grid's first two points
    assert loaded.solver == bdia.bdia("heun", "obelm").identity  # from the solver and gamma
    toy = bdia.ODE(lambda t, x: -x)
    with pytest.raises(ValueError, match="grid"):  # continued on another grid: refused
        bdia.sample(toy, bdia.bdia("euler", 0.96), loaded, [60.0, 1.0, 0.5], progress=False)
    assert meta["gamma"] == "obelm" and meta["class"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    with pytest.raises(ValueError, match="no fingerprint"):
        save_latents(
            tmp_path / "y.safetensors",
            bdia.StatePair(a, b),
            ts,
            solver="heun",
            gamma=1.0,
            class_label=None,
            network="n",
        )
    with pytest.raises(TypeError, match="StatePair of a bdia solver, got a CoupledPair"):
        save_latents(
            tmp_path / "z.safetensors",
            bdia.CoupledPair(a, b, fingerprint="0123456789abcdef"),
            ts,
            solver="heun",
            gamma=1.0,
            class_label=None,
            network="n",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(
        ValueError, match=rf"text.safetensors is not bdia latents.*{LATENTS_FORMAT}"
    ):
        load_latents(tmp_path / "text.safetensors")
    # A version-1 file: its fingerprint was computed by the former rule and cannot be checked.
    with safe_open(str(path), framework="pt") as fh:
        old = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = {**fh.metadata(), "format": "bdia-latents/1"}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"old.safetensors holds bdia-latents/1 .*invert the"):
        load_latents(tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match=f"format tag 'bdia-network-v1'.*{LATENTS_FORMAT}"):
        load_latents(shipped_network_path("digits"))


@pytest.mark.parametrize(
    "case,words",
    [
        # Each of these used to be written, as a file that load_latents refuses (or, for the
        # times, reads back as a pair at the grid's first two points where it is not).
        ("float16", "float64 or float32 states, got torch.float16"),
        ("bfloat16", "float64 or float32 states, got torch.bfloat16"),
        (
            "times",
            r"the pair's times \(1\.0, 0\.002\) are not the grid's first two "
            r"points \(80\.0, 1\.0\)",
        ),
        ("one point", r"grid ts of at least 2 points, got shape \(1,\)"),
        # The file records the solver as the base's name and gamma, which the loaded pair
        # takes as its own: a pair made by another solver would come back claiming this one.
        (
            "gamma",
            r"the pair was made by bdia\(euler, gamma=0.5\), but solver='euler' and "
            r"gamma=0.96 name bdia\(euler, gamma=0.96\); give the base solver's name and the "
            "gamma",
        ),
        ("base", r"made by bdia\(heun, gamma=0.96\), but .* name bdia\(euler, gamma=0.96\)"),
        (
            "unknown",
            r"made by bdia\(nonesuch, gamma=0.96\), but solver='nonesuch' and gamma=0.96 "
            "name no solver this bdia can build",
        ),
    ],
)
def test_save_latents_refuses_what_load_latents_would_not_give_back(tmp_path, case, words):
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    a = torch.zeros(1, 3, 2, 2, dtype=dtype)
    # A pair that sample(..., return_pair=True) gives: at the grid's last two points.
    times = (1.0, 0.002) if case == "times" else None
    made_by = {
        "gamma": "bdia(euler, gamma=0.5)",
        "base": "bdia(heun, gamma=0.96)",
        "unknown": "bdia(nonesuch, gamma=0.96)",
    }.get(case)
    pair = bdia.StatePair(a, a + 1, fingerprint="0123456789abcdef", times=times, solver=made_by)
    with pytest.raises(ValueError, match=words):
        save_latents(
            tmp_path / "x.safetensors",
            pair,
            ts[:1] if case == "one point" else ts,
            solver="nonesuch" if case == "unknown" else "euler",
            gamma=0.96,
            class_label=None,
            network="n",
        )
    assert not list(tmp_path.iterdir())


def _save_euler(folder, gamma, made_by=None):
    """save_latents of a pair made by ``made_by`` (None: unrecorded) as bdia(euler, gamma)'s."""
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    a = torch.zeros(1, 3, 2, 2, dtype=torch.float32)
    pair = bdia.StatePair(a, a + 1, fingerprint="0123456789abcdef", solver=made_by)
    return save_latents(
        folder / "x.safetensors",
        pair,
        ts,
        solver="euler",
        gamma=gamma,
        class_label=None,
        network="n",
    )


@pytest.mark.parametrize(
    "gamma",
    [np.float32(0.96), Fraction(24, 25), torch.tensor(0.96, dtype=torch.float64), 1],
    ids=["numpy-float32", "Fraction", "tensor", "int"],
)
def test_save_latents_records_a_gamma_given_as_any_number_as_the_solver_keeps_it(tmp_path, gamma):
    """bdia(solver, gamma) keeps gamma as a Python float; the file records that float, so
    the loaded pair names the solver that made it. The gamma was written as str(gamma):
    np.float32(0.96) as "0.96", another gamma than the 0.9599999785423279 that made the
    pair, Fraction(24, 25) as "24/25" and a tensor as "tensor(0.9600, ...)", which name no
    gamma; since pairs record their solver, save_latents refused each of them, telling the
    caller to give the gamma they had given."""
    maker = bdia.bdia("euler", gamma)
    path = _save_euler(tmp_path, gamma, made_by=maker.identity)
    loaded, _, meta = load_latents(path)
    assert loaded.solver == maker.identity
    assert meta["gamma"] == maker.gamma and type(meta["gamma"]) is float
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["gamma"] == repr(maker.gamma)  # "0.9599999785423279" for float32


@pytest.mark.parametrize(
    "gamma, error, words",
    [
        (True, TypeError, "gamma must be a number in .0, 1., got the bool True"),
        ((0.9, 0.8), TypeError, r"gamma must be a number, got \(0.9, 0.8\)"),
        (1.5, ValueError, r"gamma = 1.5 lies outside \[0, 1\]"),
    ],
)
def test_save_latents_refuses_a_gamma_that_names_no_solver(tmp_path, gamma, error, words):
    """A file records one gamma, which bdia(solver, gamma) must take: a flag, a sequence
    (one gamma per step) or a number outside [0, 1] was written and named no solver."""
    with pytest.raises(error, match=words):
        _save_euler(tmp_path, gamma)
    assert not list(tmp_path.iterdir())


def test_a_network_path_may_be_a_path(tmp_path):
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    a = torch.zeros(1, 3, 2, 2, dtype=torch.float32)
    pair = bdia.StatePair(a, a + 1, fingerprint="0123456789abcdef")
    where = tmp_path / "nets" / "net.safetensors"
    path = save_latents(
        tmp_path / "x.safetensors",
        pair,
        ts,
        solver="euler",
        gamma=0.96,
        class_label=None,
        network="n",
        network_path=where,
    )
    assert load_latents(path)[2]["network_path"] == str(where)


def test_a_file_whose_solver_this_bdia_cannot_build_loads_with_no_solver(tmp_path):
    """A file that names a base solver registered only by the program that wrote it (and a
    pair that records no solver, as before) still loads: its pair records no solver, and
    is taken as it is."""
    ts = torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64)
    a = torch.zeros(1, 3, 2, 2, dtype=torch.float32)
    pair = bdia.StatePair(a, a + 1, fingerprint="0123456789abcdef")
    path = save_latents(
        tmp_path / "x.safetensors",
        pair,
        ts,
        solver="ralston",
        gamma=0.96,
        class_label=None,
        network="n",
    )
    loaded, _, meta = load_latents(path)
    assert meta["solver"] == "ralston" and loaded.solver is None


# ------------------------------------------------------------------------- bad inputs


def write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "case,words",
    [
        ("size", ["'--images'", "16x16 L", "needs 8x8 L"]),
        ("mode", ["'--images'", "8x8 RGB", "needs 8x8 L"]),
        ("not a png", ["'--images'", "bad.png", "not a readable PNG"]),
        ("jpeg", ["'--images'", "bad.png", "JPEG image, not a PNG"]),
        ("no class", ["--class", "conditional"]),
        ("class out of range", ["'--class'", "0..9"]),
        ("no outdir", ["--outdir"]),
        ("count", ["--count"]),
    ],
)
def test_invert_refuses_bad_inputs_in_one_line(case, words, pngs, tmp_path):
    bad = tmp_path / "bad.png"
    if case == "size":
        write_png(bad, np.zeros((16, 16)))
    elif case == "mode":
        write_png(bad, np.zeros((8, 8, 3)))
    elif case == "not a png":
        bad.write_text("not an image")
    elif case == "jpeg":
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(bad, format="JPEG")
    else:
        bad = pngs
    args = ["invert", "--images", bad, "--outdir", tmp_path / "out", "--class", 3]
    if case == "no class":
        args = args[:-2]
    elif case == "class out of range":
        args[-1] = 10
    elif case == "no outdir":
        args = ["invert", "--images", bad, "--class", 3]
    elif case == "count":
        args += ["--count", 2]
    fails_in_one_line(args, tmp_path, *words, status=2)


def test_sample_latents_refuses_bad_inputs_in_one_line(inverted, tmp_path):
    out, _ = inverted
    target = tmp_path / "out"
    base = ["sample", "--latents", out, "--outdir", target]
    fails_in_one_line([*base, "--seeds", "0-3"], tmp_path, "--latents and --seeds", status=2)
    fails_in_one_line([*base, "--grid", tmp_path / "g.png"], tmp_path, "--grid", status=2)
    fails_in_one_line([*base, "--steps", 8], tmp_path, "leave --steps out", status=2)
    fails_in_one_line([*base, "--class", 10], tmp_path, "'--class'", "0..9", status=2)
    # A file that is not latents: a network file among them.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.safetensors").write_bytes((out / f"{NAMES[0]}.safetensors").read_bytes())
    network = load_network("digits")
    save_network(network, mixed / "net.safetensors")
    args = ["sample", "--latents", mixed, "--outdir", target]
    fails_in_one_line(
        args, tmp_path, "'--latents'", "net.safetensors is not bdia latents", status=2
    )
    # Latents given to another network (the digits with one weight changed).
    next(network.parameters()).data.view(-1)[0] += 0.01
    other = tmp_path / "other.safetensors"
    save_network(network, other)
    args = [*base, "--network", other]
    fails_in_one_line(args, tmp_path, "'--latents'", "made with another network", status=2)


def test_existing_outputs_are_kept_unless_overwrite(pngs, inverted, tmp_path):
    out, _ = inverted
    one = pngs / f"{NAMES[0]}.png"
    line = fails_in_one_line(
        ["invert", "--images", one, "--class", 3, "--outdir", out], out, "--overwrite", status=1
    )
    assert f"--steps ({STEPS} in the record, 35 now)" in line
    back = tmp_path / "back"
    invoke("sample", "--latents", out / f"{NAMES[0]}.safetensors", "--outdir", back)
    args = ["sample", "--latents", out / f"{NAMES[0]}.safetensors", "--outdir", back]
    fails_in_one_line(args, tmp_path, f"{NAMES[0]}.png", "--overwrite", status=1)
    invoke(*args, "--overwrite")


def _tampered(source, target, **changes):
    """``source`` re-saved to ``target`` with tensors or metadata replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for key, value in changes.items():
        (tensors if isinstance(value, torch.Tensor) else meta)[key] = value
    save_file(tensors, str(target), metadata=meta)
    return target


@pytest.mark.parametrize(
    "case,words",
    [
        ("bytes overwritten at the end", ["is damaged", "grid ts holds NaN"]),
        ("nan state", ["is damaged", "states hold NaN"]),
        ("reversed grid", ["is damaged", "not a noise grid"]),
        ("two-point grid", ["is damaged", "at least 3"]),
        ("class 99", ["records 'digits', the network given, but does not fit", "class 99"]),
    ],
)
def test_sample_latents_refuses_damaged_files_before_any_image(case, words, inverted, tmp_path):
    out, _ = inverted
    good = out / f"{NAMES[0]}.safetensors"
    bad = tmp_path / "bad.safetensors"
    pair, ts, _ = load_latents(good)
    if case == "bytes overwritten at the end":
        data = bytearray(good.read_bytes())
        data[-24:] = b"\xff" * 24  # the last tensor's last three float64s become NaN
        bad.write_bytes(bytes(data))
    elif case == "nan state":
        earlier = pair.earlier.clone()
        earlier[0, 0, 0, 0] = float("nan")
        _tampered(good, bad, earlier=earlier)
    elif case == "reversed grid":
        _tampered(good, bad, ts=ts.flip(0).contiguous())
    elif case == "two-point grid":
        _tampered(good, bad, ts=ts[:2].clone())
    else:
        _tampered(good, bad, **{"class": "99"})
    args = ["sample", "--latents", bad, "--outdir", tmp_path / "back"]
    line = fails_in_one_line(args, tmp_path, "Invalid value for '--latents'", *words, status=2)
    assert "another network" not in line


def _copy_pngs(pngs, folder, names):
    folder.mkdir()
    for name in names:
        (folder / f"{name}.png").write_bytes((pngs / f"{name}.png").read_bytes())
    return folder


def _count_inversions(monkeypatch):
    from bdia.editing import Inversion

    calls = []
    real = Inversion.of

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(Inversion, "of", counted)
    return calls


def assert_outputs_as_uninterrupted(out, full, names):
    """The outputs of ``names`` in ``out`` are those of the uninterrupted run in ``full``:
    reconstructions bit for bit, latents with equal metadata and tensors."""
    for name in names:
        recon = f"{name}-reconstruction.png"
        assert (out / recon).read_bytes() == (full / recon).read_bytes()
        (pair, ts, meta), (pair0, ts0, meta0) = (
            load_latents(folder / f"{name}.safetensors") for folder in (out, full)
        )
        assert meta == meta0 and torch.equal(ts, ts0)
        for field in ("earlier", "later", "earlier_low", "later_low"):
            assert torch.equal(getattr(pair, field), getattr(pair0, field)), field


def test_an_interrupted_invert_resumes_where_it_stopped(pngs, inverted, tmp_path, monkeypatch):
    import bdia.cli._invert

    full, _ = inverted
    images = _copy_pngs(pngs, tmp_path / "pngs", NAMES[:3])
    out = tmp_path / "out"
    args = ["invert", "--images", images, "--class", SOURCE_CLASS, "--steps", STEPS]
    args += ["--outdir", out, "--no-progress"]
    real_write_png = bdia.cli._invert.write_png

    def interrupted(path, image):
        if len(list(out.glob("*.png"))) == 2:
            raise KeyboardInterrupt  # Ctrl-C with the third image's latents written
        real_write_png(path, image)

    monkeypatch.setattr(bdia.cli._invert, "write_png", interrupted)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 130 and "Aborted." in result.stderr
    listed = json.loads((out / "bdia-invert.json").read_text())
    assert [e["source"] for e in listed["images"]] == [f"{n}.png" for n in NAMES[:2]]
    assert "max abs error" not in listed  # not finished
    assert (out / f"{NAMES[2]}.safetensors").exists()  # written, but not listed

    monkeypatch.setattr(bdia.cli._invert, "write_png", real_write_png)
    calls = _count_inversions(monkeypatch)
    result = invoke(*args)  # no --overwrite needed
    assert len(calls) == 1 and "2 already in" in result.stdout
    summary = json.loads((out / "bdia-invert.json").read_text())
    assert [e["source"] for e in summary["images"]] == [f"{n}.png" for n in NAMES[:3]]
    assert summary["max abs error"] < 1e-12
    assert_outputs_as_uninterrupted(out, full, NAMES[:3])
    invoke(*args)  # finished: a rerun has nothing to do
    assert len(calls) == 1


def test_invert_refuses_another_image_of_the_same_name(pngs, tmp_path):
    images = _copy_pngs(pngs, tmp_path / "pngs", NAMES[:1])
    out = tmp_path / "out"
    args = ["invert", "--images", images, "--class", SOURCE_CLASS, "--steps", 2, "--outdir", out]
    invoke(*args)
    (images / f"{NAMES[0]}.png").write_bytes((pngs / f"{NAMES[1]}.png").read_bytes())
    fails_in_one_line(args, out, f"another {NAMES[0]}.png", "--overwrite", status=1)
    invoke(*args, "--overwrite")
    (out / "bdia-invert.json").unlink()  # outputs, but no summary that says how they were made
    fails_in_one_line(args, out, "not listed in bdia-invert.json", "--overwrite", status=1)


def test_invert_overwrite_under_other_settings_removes_the_images_it_listed(pngs, tmp_path):
    out = tmp_path / "out"
    args = ["invert", "--class", SOURCE_CLASS, "--outdir", out, "--steps"]
    invoke(*args, 2, "--images", _copy_pngs(pngs, tmp_path / "a", NAMES[:2]))
    (out / "notes.txt").write_text("the user's")
    invoke(*args, 3, "--images", _copy_pngs(pngs, tmp_path / "b", NAMES[2:3]), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["bdia-invert.json", "notes.txt", f"{NAMES[2]}.safetensors"]
        + [f"{NAMES[2]}-reconstruction.png"]
    )
    assert json.loads((out / "bdia-invert.json").read_text())["steps"] == 3


def outputs_of(names):
    return [f"{n}{end}" for n in names for end in (".safetensors", "-reconstruction.png")]


def test_rank_one_of_two_writes_only_its_files_and_leaves_the_rest_to_rank_zero(
    pngs, inverted, tmp_path, monkeypatch
):
    """The split without processes: rank 1 of 2 (the group's calls stood in for) inverts
    and regenerates the files [1::2] and nothing else, writes no summary but its own
    listing of them (which rank 0 removes once the summary lists them), and prints nothing;
    rank 0's share and the summary are the torchrun test's (marked slow)."""
    import torch.distributed as dist

    import bdia.cli._ranks

    monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(bdia.cli._ranks, "wait_for_ranks", lambda world, leave=False: None)

    def gathered(parts, mine):
        parts[:] = [{}, mine]  # rank 0 made nothing

    monkeypatch.setattr(dist, "all_gather_object", gathered)
    out = tmp_path / "out"
    result = invoke(
        "invert", "--images", pngs, "--class", SOURCE_CLASS, "--steps", STEPS, "--outdir", out
    )
    listing = ".bdia-invert.rank1.json"
    assert sorted(p.name for p in out.iterdir()) == sorted([listing, *outputs_of(NAMES[1::2])])
    listed = json.loads((out / listing).read_text())["images"]
    assert [e["source"] for e in listed] == [f"{n}.png" for n in NAMES[1::2]]
    assert result.output == ""
    back = tmp_path / "back"
    result = invoke("sample", "--latents", inverted[0], "--outdir", back)
    assert sorted(p.name for p in back.iterdir()) == [f"{n}.png" for n in NAMES[1::2]]
    assert result.output == ""


def test_each_image_is_listed_as_soon_as_it_is_made(pngs, tmp_path, monkeypatch):
    """The summary (rank 0) and a rank's own listing (other ranks) list every image before
    the next one is inverted, so a run killed midway, where no clean-up runs, keeps them.
    Before, the summary was written only when the run ended or raised: a killed run left
    every image of the run unlisted, and its rerun made them all again."""
    import bdia.cli._invert
    import bdia.cli._ranks
    from bdia.editing import Inversion

    real = Inversion.of
    for rank in (0, 1):
        out = tmp_path / f"rank{rank}"
        listing = out / ("bdia-invert.json" if rank == 0 else ".bdia-invert.rank1.json")
        seen = []

        def recorded(*args, listing=listing, seen=seen, **kwargs):
            listed = json.loads(listing.read_text())["images"] if listing.exists() else []
            seen.append([e["source"] for e in listed])
            return real(*args, **kwargs)

        monkeypatch.setattr(Inversion, "of", recorded)
        monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(bdia.cli._ranks, "wait_for_ranks", lambda world, leave=False: None)

        def stopped(parts, mine):
            raise KeyboardInterrupt  # the other rank's images are not this test's

        monkeypatch.setattr(bdia.cli._invert.torch.distributed, "all_gather_object", stopped)
        args = ["invert", "--images", pngs, "--class", SOURCE_CLASS, "--steps", 2]
        args += ["--outdir", out, "--no-progress"]
        assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 130
        mine = [f"{n}.png" for n in NAMES[rank::2]]
        assert seen == [mine[:i] for i in range(len(mine))], rank


# About 2 s: the single-process resume (test_an_interrupted_invert_resumes_where_it_stopped)
# runs by default.
@pytest.mark.slow
def test_a_killed_torchrun_invert_resumes_from_every_ranks_listing(
    pngs, inverted, tmp_path, monkeypatch
):
    """Rank 0 stopped after two of its three images and rank 1 before the gather (its
    images made and listed in its own file, not in the summary): a rerun of one process
    makes only the image nobody listed and ends with the uninterrupted folder, the rank's
    listing merged into the summary and removed."""
    import torch.distributed as dist

    import bdia.cli._invert
    import bdia.cli._ranks

    full, _ = inverted
    out = tmp_path / "out"
    args = ["invert", "--images", pngs, "--class", SOURCE_CLASS, "--steps", STEPS]
    args += ["--outdir", out, "--no-progress"]
    monkeypatch.setattr(bdia.cli._ranks, "wait_for_ranks", lambda world, leave=False: None)

    def killed(parts, mine):
        raise KeyboardInterrupt

    monkeypatch.setattr(dist, "all_gather_object", killed)
    real_write_png = bdia.cli._invert.write_png

    def stopped(path, image):
        if len(list(out.glob("*-reconstruction.png"))) == 2:
            raise KeyboardInterrupt  # rank 0's third image
        real_write_png(path, image)

    monkeypatch.setattr(bdia.cli._invert, "write_png", stopped)
    monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda: (0, 2))
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 130
    monkeypatch.setattr(bdia.cli._invert, "write_png", real_write_png)
    monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda: (1, 2))
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 130
    assert (out / ".bdia-invert.rank1.json").exists()

    monkeypatch.setattr(bdia.cli._ranks, "rank_and_world", lambda: (0, 1))
    calls = _count_inversions(monkeypatch)
    result = invoke(*args)
    assert len(calls) == 1 and f"{COUNT - 1} already in" in result.stdout
    assert not (out / ".bdia-invert.rank1.json").exists()
    summary = json.loads((out / "bdia-invert.json").read_text())
    assert [e["source"] for e in summary["images"]] == [f"{n}.png" for n in NAMES]
    assert_outputs_as_uninterrupted(out, full, NAMES)


@pytest.mark.slow  # three torchrun launches of two processes, seconds each
def test_two_ranks_split_the_files_and_write_what_one_process_writes(pngs, inverted, tmp_path):
    """Under torchrun, invert --images and sample --latents give rank r the files
    [r::world_size] (sorted by name), as sample's seeds: each file is written once, by one
    rank, rank 0 writes the summary and reports, and the folder holds one process's files,
    bit for bit. Every rank used to do all the work and write every file."""
    one, _ = inverted
    two = tmp_path / "two"
    summary, listing = "bdia-invert.json", ".bdia-invert.rank1.json"
    invert = ["invert", "--images", pngs, "--class", SOURCE_CLASS, "--steps", STEPS]
    invert += ["--outdir", two, "--no-progress"]
    result, written, left = torchrun_bdia(tmp_path / "invert", *invert)
    assert left == [True, True]
    assert folder_bytes(two) == folder_bytes(one)
    assert not (two / listing).exists()  # merged into the summary
    for rank in (0, 1):
        made = [name for name in written[rank] if name not in (summary, listing)]
        assert made == outputs_of(NAMES[rank::2])
    assert summary in written[0] and summary not in written[1]
    assert listing in written[1] and listing not in written[0]
    assert result.stdout.count(f"{COUNT} images of class") == 1
    assert result.stdout.count("round trip") == 1
    assert result.stderr.count(f"reconstructions of {COUNT} images") == 1

    # Stopped as a run of one process stops: two images listed, the third one's files
    # written but not listed, the rest missing. The rerun makes the four that are not
    # listed, each on its own rank, and ends with the uninterrupted folder.
    record = json.loads((two / summary).read_text())
    del record["max abs error"], record["rms error"]
    record["images"] = record["images"][:2]
    (two / summary).write_text(json.dumps(record, indent=1) + "\n")
    for name in outputs_of(NAMES[3:]):
        (two / name).unlink()
    result, written, left = torchrun_bdia(tmp_path / "resume", *invert)
    assert left == [True, True]
    assert folder_bytes(two) == folder_bytes(one)
    assert [name for name in written[0] if name != summary] == outputs_of(NAMES[2::2])
    assert [name for name in written[1] if name != listing] == outputs_of(NAMES[3::2])
    assert summary not in written[1] and "2 already in" in result.stdout

    back_one, back_two = tmp_path / "back1", tmp_path / "back2"
    invoke("sample", "--latents", one, "--outdir", back_one)
    result, written, left = torchrun_bdia(
        tmp_path / "back", "sample", "--latents", two, "--outdir", back_two, "--no-progress"
    )
    assert left == [True, True]
    assert folder_bytes(back_two) == folder_bytes(back_one)
    assert written == [[f"{n}.png" for n in NAMES[rank::2]] for rank in (0, 1)]
    assert result.stderr.count(f"{COUNT} images in {back_two} ({COUNT} reconstructed)") == 1


# About 5 s (four commands on two devices, every torch call through the pretend device's
# mode); the refusals on MPS run by default.
@pytest.mark.slow
def test_on_a_device_without_float64_the_commands_give_the_cpus_float32_results(
    pngs, tmp_path, monkeypatch
):
    """On MPS (pretended on the CPU, where a float64 tensor on the device is refused),
    invert --images, sample --latents, the held-out table and sample with bdia give what
    --device cpu gives with a float32 state, bit for bit. invert read each PNG onto the
    device in float64 and formed its round-trip error there in float64, so it failed at its
    first image, as the table did at its first error."""
    args = ["invert", "--images", pngs, "--class", SOURCE_CLASS, "--steps", 4, "--no-progress"]
    table = ["invert", "--steps", 3, "--count", 4, "--no-progress"]
    seeds = ["sample", "--network", "digits", "--seeds", "0-1", "--steps", 3, "--gamma", 0.96]
    runs = {}
    for device in ("cpu", "mps"):
        out = tmp_path / device
        given = ["--device", device, *(["--state-dtype", "float32"] if device == "cpu" else [])]
        with fake_mps(monkeypatch) if device == "mps" else contextlib.nullcontext() as mode:
            invoke(*args, "--outdir", out / "latents", *given)
            back = ["sample", "--latents", out / "latents", "--outdir", out / "back"]
            invoke(*back, "--device", device, "--no-progress")
            invoke(*seeds, "--outdir", out / "seeds", *given, "--no-progress")
            runs[device] = (folder_bytes(out), invoke(*table, *given).output)
    assert mode.placed > 1000  # the network and the states were on the pretend device
    assert runs["mps"] == runs["cpu"]
    assert "float32 state" in runs["mps"][1]


def test_a_state_on_mps_is_float32_and_float64_is_refused_there(
    pngs, inverted, tmp_path, monkeypatch
):
    """MPS has no float64: the state dtype defaults to float32 there, and an explicit float64
    state or float64 latents are refused before any work (not by torch at the first cast)."""
    from bdia.cli._common import _state_dtype

    assert _state_dtype(None, "cpu") is torch.float64
    assert _state_dtype(None, "mps") is torch.float32
    assert _state_dtype(torch.float32, "mps") is torch.float32
    # The device check accepts mps where it is available; nothing below gets to use it.
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    out, _ = inverted
    mps = ["--device", "mps", "--no-progress"]
    grid = tmp_path / "grid.png"
    args = ["sample", "--network", "digits", "--seeds", "0-3", "--grid", grid, *mps]
    fails_in_one_line(
        [*args, "--state-dtype", "float64"],
        tmp_path,
        "'--state-dtype'",
        "use --state-dtype float32",
        status=2,
    )
    args = ["invert", "--images", pngs, "--outdir", tmp_path / "o", *mps]
    fails_in_one_line([*args, "--state-dtype", "fp64"], tmp_path, "no float64", status=2)
    target = tmp_path / "regenerated"
    args = ["sample", "--latents", out, "--outdir", target, *mps]
    fails_in_one_line(args, tmp_path, "'--device'", "float64 state", "--device cpu", status=2)
    assert not grid.exists() and not (tmp_path / "o").exists() and not target.exists()
