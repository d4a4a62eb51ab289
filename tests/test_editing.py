"""Inversion and editing (bdia.Inversion, bdia.edit) and the pair's ODE fingerprint."""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_child, untouched

import bdia
from bdia.models import digits
from bdia.models.checkpoints import load_network
from bdia.models.toy import GaussianMixture

# 40 held-out digits over the documented 35 steps: enough to tell 0% from 95%, seconds on one
# core. (The parasitic mode of a continued pair is large at every step count, 7 to 41 at 10-35
# steps, but the classifier reads it as noise reliably only from about 25 steps on.)
COUNT, STEPS = 40, 35


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return load_network("digits")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_network("digits-classifier")


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[int]]:
    split = digits.load_digits_split()
    return split.held_out_images[:COUNT].double(), split.held_out_labels[:COUNT].tolist()


def labelled(net: torch.nn.Module, labels: list[int]) -> bdia.DiffusionODE:
    return bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": torch.eye(10)[labels]})


@pytest.fixture(scope="module")
def inversion(net, held_out) -> bdia.Inversion:
    images, labels = held_out
    ts = bdia.karras_grid(STEPS, final_zero=False)
    return bdia.Inversion.of(labelled(net, labels), bdia.bdia("euler", 0.96), images, ts)


@pytest.fixture(scope="module")
def small(net, held_out) -> bdia.Inversion:
    """Four digits over 10 steps, for the checks that measure no accuracy."""
    images, labels = held_out
    ts = bdia.karras_grid(10, final_zero=False)
    return bdia.Inversion.of(labelled(net, labels[:4]), bdia.bdia("euler", 0.96), images[:4], ts)


def test_inversion_reconstructs_exactly(inversion, held_out) -> None:
    images, _ = held_out
    # Two-word float64 states: the round trip keeps about 30 digits, so 1e-20 is far above
    # rounding and far below the 1e-7 the textbook single-word update loses on this model.
    assert float((inversion.reconstruct(progress=False) - images).abs().max()) < 1e-20
    assert inversion.noise.shape == images.shape
    assert float(inversion.noise.std()) > 40  # sigma_max = 80: the inverted state is noise


def test_regenerating_under_a_new_label_edits(inversion, held_out, net, classifier) -> None:
    _, labels = held_out
    targets = [(c + 1) % 10 for c in labels]
    target = labelled(net, targets)
    expected = torch.tensor(targets)
    for rule in bdia.EDIT_RULES:
        edited = inversion.regenerate(target, rule=rule, progress=False)
        hits = float((digits.predict(classifier, edited.float()) == expected).double().mean())
        # 360 held-out digits give 98.9% (base) and 99.2% (restart): 90% leaves room for 40.
        assert hits >= 0.9, (rule, hits)
        assert float(edited.abs().max()) < 2.0  # images in about [-1, 1], not noise


def test_continuing_the_pair_under_a_new_label_warns_and_gives_noise(
    inversion, held_out, net, classifier
) -> None:
    _, labels = held_out
    targets = [(c + 1) % 10 for c in labels]
    with pytest.warns(bdia.PairMismatchWarning, match="different ODE"):
        wrong = bdia.sample(
            labelled(net, targets), inversion.solver, inversion.pair, inversion.ts, progress=False
        )
    hits = float(
        (digits.predict(classifier, wrong.float()) == torch.tensor(targets)).double().mean()
    )
    # What the warning is about: the parasitic mode survives (measured 0% new label, range ~8).
    assert hits <= 0.2
    assert float(wrong.abs().max()) > 3.0


def test_edit_with_return_pair_is_itself_exactly_invertible(small, held_out, net) -> None:
    _, labels = held_out
    target = labelled(net, [(c + 1) % 10 for c in labels[:4]])
    pair = small.regenerate(target, rule="restart", return_pair=True, progress=False)
    assert pair.fingerprint == target.fingerprint()
    back = bdia.invert(target, small.solver, pair, small.ts, progress=False)
    assert float((back.earlier - small.noise).abs().max()) < 1e-20


def test_edit_in_one_call_equals_the_inversion_object(net, held_out) -> None:
    images, labels = held_out
    images, labels = images[:4], labels[:4]
    ts = bdia.karras_grid(6, final_zero=False)
    source, target = labelled(net, labels), labelled(net, [(c + 3) % 10 for c in labels])
    solver = bdia.bdia("euler", 0.9)
    with untouched(images):
        edited = bdia.edit(source, target, solver, images, ts, progress=False)
    again = bdia.Inversion.of(source, solver, images, ts).regenerate(target, progress=False)
    assert torch.equal(edited, again)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("factory", [bdia.edict, bdia.reversible], ids=["edict", "reversible"])
def test_coupled_solvers_invert_reconstruct_and_edit(factory, net, held_out) -> None:
    """EDICT and McCallum-Foster serve Inversion like BDIA: the CoupledPair is the pair, the
    noise is its result chain, and "base" samples with the wrapped solver."""
    images, labels = held_out
    images, labels = images[:4], labels[:4]
    ts = bdia.karras_grid(6, final_zero=False)
    source, target = labelled(net, labels), labelled(net, [(c + 3) % 10 for c in labels])
    solver = factory(bdia.get_solver("euler"))
    with untouched(images):
        inversion = bdia.Inversion.of(source, solver, images, ts)
    assert isinstance(inversion.pair, bdia.CoupledPair)
    assert inversion.noise is inversion.pair.x
    # Float64 states with low words: the round trip is exact to the last bits (measured
    # ~1e-16 of data of size 1; 1e-13 leaves room without admitting a float32-level error).
    assert float((inversion.reconstruct(progress=False) - images).abs().max()) < 1e-13
    edited = inversion.regenerate(target, progress=False)
    by_hand = bdia.sample(target, bdia.get_solver("euler"), inversion.noise, ts, progress=False)
    assert torch.equal(edited, by_hand)
    pair = inversion.regenerate(target, rule="restart", return_pair=True, progress=False)
    back = bdia.invert(target, solver, pair, ts, progress=False)
    assert float((back.x - inversion.noise).abs().max()) < 1e-10 * float(ts[0])


def test_inverting_data_at_sigma_zero_is_refused(net, held_out) -> None:
    images, labels = held_out
    with untouched(images), pytest.raises(ValueError, match="final_zero=False"):
        bdia.Inversion.of(labelled(net, labels), bdia.bdia("euler"), images, bdia.karras_grid(5))


@pytest.mark.parametrize("schedule", [bdia.EDM(), bdia.VPLinear()], ids=["edm", "vp"])
def test_a_grid_from_data_to_noise_is_refused(schedule) -> None:
    # The data are the state at ts[-1] and the noise at ts[0]. A grid given from the data's
    # noise level up (the direction of the inversion) used to run: it "inverted" the data
    # taken at sigma_max down to sigma_min, reconstruct() gave them back exactly, and the
    # "noise" was a denoised image (std 0.007 for EDM data of std 0.5).
    mixture = GaussianMixture.random(2, 4, seed=0)
    ode = mixture.ode(schedule)
    ts = bdia.karras_grid(4, final_zero=False, schedule=schedule).flip(0)
    data = mixture.sample_data(3, generator=torch.Generator().manual_seed(0)).double()
    solver = bdia.bdia("euler", 0.9)
    calls: list[object] = []
    with untouched(data):
        with pytest.raises(ValueError, match=r"noisiest first.*flip"):
            bdia.Inversion.of(ode, solver, data, ts, callback=calls.append)
        with pytest.raises(ValueError, match=r"noisiest first.*flip"):
            bdia.edit(ode, ode, solver, data, ts, callback=calls.append)
    assert calls == [] and ode.nfe == 0


def test_unknown_edit_rule(inversion, net, held_out) -> None:
    with pytest.raises(ValueError, match="rule must be one of 'base', 'restart'"):
        inversion.regenerate(labelled(net, held_out[1]), rule="continue")


def test_a_target_under_another_schedule_is_refused() -> None:
    # The inverted noise is the state at ts[0] under the source's schedule; a target with
    # another schedule reads the same times as other noise levels, and would sample from it
    # without a sign of the mismatch.
    mixture = GaussianMixture.random(2, 4, seed=0)
    linear, cosine = bdia.VPLinear(), bdia.VPCosine()
    ts = bdia.uniform_logsnr_grid(4, 0.9, 1e-3, linear)
    data = mixture.sample_data(3, generator=torch.Generator().manual_seed(0)).double()
    solver = bdia.bdia("euler", 0.9)
    inversion = bdia.Inversion.of(mixture.ode(linear), solver, data, ts, progress=False)
    plain = bdia.ODE(lambda t, x: -x)
    for target in (mixture.ode(cosine), mixture.ode(bdia.VPLinear(beta_max=10.0)), plain):
        for rule in bdia.EDIT_RULES:
            with pytest.raises(ValueError, match="schedule"):
                inversion.regenerate(target, rule=rule, progress=False)
    calls: list[object] = []
    with untouched(data), pytest.raises(ValueError, match="VPCosine"):
        # Refused before the inversion runs: no callback, no model evaluation.
        bdia.edit(mixture.ode(linear), mixture.ode(cosine), solver, data, ts, callback=calls.append)
    with pytest.raises(ValueError, match="rule must be one of"):
        bdia.edit(
            mixture.ode(linear),
            mixture.ode(linear),
            solver,
            data,
            ts,
            rule="continue",
            callback=calls.append,
        )
    assert calls == []
    # The same schedule in another instance (another label, say) is the intended use.
    same = inversion.regenerate(mixture.ode(bdia.VPLinear()), progress=False)
    assert torch.equal(same, inversion.regenerate(inversion.ode, progress=False))


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_tells_conditioning_model_and_schedule_apart(net) -> None:
    base = labelled(net, [1, 2])
    assert base.fingerprint() == labelled(net, [1, 2]).fingerprint()
    assert base.fingerprint() != labelled(net, [1, 3]).fingerprint()
    other_net = load_network("digits")
    with torch.no_grad():
        next(other_net.parameters()).view(-1)[0] += 1.0
    assert bdia.DiffusionODE(other_net, cond=base.cond).fingerprint() != base.fingerprint()
    vp = bdia.DiffusionODE(net, bdia.VPLinear(), cond=base.cond)
    assert vp.fingerprint() != base.fingerprint()


def test_time_fingerprint_follows_the_schedule_alone(net) -> None:
    """What editing compares: two ODEs on one schedule share it whatever their models and
    conditioning; another schedule, or other parameters of one, differ; a plain ODE has none."""
    base = labelled(net, [1, 2])
    mixture = GaussianMixture.random(2, 4, seed=0)
    assert base.time_fingerprint() == labelled(net, [3, 4]).time_fingerprint()
    assert base.time_fingerprint() == mixture.ode(bdia.EDM()).time_fingerprint()
    assert base.time_fingerprint() != mixture.ode(bdia.VPLinear()).time_fingerprint()
    assert (
        mixture.ode(bdia.VPLinear()).time_fingerprint()
        != mixture.ode(bdia.VPLinear(beta_max=10.0)).time_fingerprint()
    )
    assert bdia.ODE(lambda t, y: -y).time_fingerprint() == ""


MATRIX = torch.tensor([[0.0, 1.0], [-4.0, -0.2]])


class Buffered(torch.nn.Module):
    """A model whose only state is a buffer."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Scaled:
    """A callable object: its attributes are its state."""

    def __init__(self, scale: float) -> None:
        self.scale = torch.tensor(scale, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Reporting(torch.nn.Module):
    """A module whose gain is a plain attribute, which it reports by fingerprint_state (as
    an adapter's scale); its gradient_checkpointing flag it does not."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain
        self.gradient_checkpointing = False

    def fingerprint_state(self) -> dict[str, float]:
        return {"gain": self.gain}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def scaled_by_global(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * MATRIX[0, 1]


def toy_fingerprints() -> list[str]:
    """Fingerprints of models whose state is not in a module's parameters (the child process
    of the next test computes them too, importing this file)."""
    return [
        GaussianMixture.random(2, 4, seed=0).ode().fingerprint(),
        bdia.DiffusionODE(
            functools.partial(GaussianMixture.random(2, 4, seed=1).denoiser)
        ).fingerprint(),
        bdia.ODE(lambda t, y: y @ MATRIX.T).fingerprint(),
        bdia.DiffusionODE(Buffered(0.5)).fingerprint(),
        bdia.DiffusionODE(Scaled(0.5)).fingerprint(),
        bdia.DiffusionODE(torch.nn.Sequential(Reporting(0.5))).fingerprint(),
    ]


@pytest.mark.slow  # another process: its start costs seconds on busy cores
def test_fingerprint_is_the_same_in_another_process(net) -> None:
    code = (
        "import torch, bdia; from bdia.models.checkpoints import load_network; "
        "from test_editing import toy_fingerprints; "
        "ode = bdia.DiffusionODE(load_network('digits'), bdia.EDM(), "
        "cond={'class_labels': torch.eye(10)[[1, 2]]}); print(ode.fingerprint()); "
        "print(*toy_fingerprints())"
    )
    child = run_child(["-c", code], timeout=120, cwd=Path(__file__).parent)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == [labelled(net, [1, 2]).fingerprint(), *toy_fingerprints()]


def two_of_each() -> dict[str, tuple[object, object, object]]:
    """Per kind of model: two of it that compute different fields, and a twin of the first."""
    m0, m1 = (GaussianMixture.random(2, 4, seed=s) for s in (0, 1))
    nets = [torch.nn.Linear(2, 2).double() for _ in range(2)]
    torch.nn.init.zeros_(nets[1].bias)

    def wrap(net):
        return lambda x, s: net(x)

    return {
        "bound method": (m0.denoiser, m1.denoiser, GaussianMixture.random(2, 4, seed=0).denoiser),
        "closure": (wrap(nets[0]), wrap(nets[1]), wrap(nets[0])),
        "partial": tuple(functools.partial(m.denoiser) for m in (m0, m1, m0)),
        "partial arguments": tuple(
            functools.partial(lambda x, s, k: x * k, k=k) for k in (1.0, 2.0, 1.0)
        ),
        "buffers": (Buffered(0.1), Buffered(0.9), Buffered(0.1)),
        "callable object": (Scaled(0.1), Scaled(0.9), Scaled(0.1)),
        "reported state": tuple(torch.nn.Sequential(Reporting(g)) for g in (0.1, 0.9, 0.1)),
    }


@pytest.mark.parametrize("kind", list(two_of_each()))
def test_fingerprint_tells_models_apart_by_their_state(kind: str) -> None:
    one, other, twin = two_of_each()[kind]
    fingerprint = bdia.DiffusionODE(one).fingerprint()
    assert bdia.DiffusionODE(other).fingerprint() != fingerprint
    assert bdia.DiffusionODE(twin).fingerprint() == fingerprint


def test_fingerprint_reads_what_a_module_reports_and_no_other_attribute() -> None:
    """Plain attributes a module does not report (a gradient checkpointing flag) stay out,
    and a module that reports nothing has the fingerprint it had before the hook existed."""
    net = Reporting(0.5)
    before = bdia.DiffusionODE(net).fingerprint()
    net.gradient_checkpointing = True
    assert bdia.DiffusionODE(net).fingerprint() == before
    # Named as its base, so that only the empty report could tell the two apart.
    silent = type("Buffered", (Buffered,), {"fingerprint_state": lambda self: {}})
    plain = bdia.DiffusionODE(Buffered(0.5)).fingerprint()
    assert bdia.DiffusionODE(silent(0.5)).fingerprint() == plain


def _mixed_module() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    with torch.no_grad():  # values of their own, not those of torch's initialisation
        for p in net.parameters():
            p.copy_(torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape))
    net[2].half()  # parameters of two dtypes
    net.register_buffer("mask", torch.arange(40) % 3 == 0)  # bool, over 32 entries: sampled
    net.register_buffer("small", torch.tensor([1.5, -2.0]))  # under 32 entries: whole
    net.register_buffer("broadcast", torch.ones(1).expand(40))  # a view of stride 0
    return net


def test_fingerprints_stored_with_latents_stay_what_they_were() -> None:
    """A fingerprint is stored with saved latents and compared in later processes and
    versions, so how a module's tensors are read must not change its digest. These two were
    computed when each parameter was copied to the host on its own; they are now copied
    together, one copy per device."""
    net = _mixed_module()
    assert bdia.ODE(lambda t, x: net(x)).fingerprint() == "978c744bd3ce454b"
    assert bdia.DiffusionODE(net, bdia.EDM()).fingerprint() == "1df9193f226c7dda"


def test_a_modules_tensors_are_read_back_in_order_each_its_own_bytes() -> None:
    from bdia.ode import _host_bytes

    tensors = list(_mixed_module().state_dict().values()) + [torch.zeros(0), torch.tensor(3)]
    one_by_one = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.numel() > 32:
            flat = torch.cat([flat[:16], flat[-16:]])
        one_by_one.append(flat.contiguous().view(torch.uint8).numpy().tobytes())
    assert _host_bytes(tensors, sampled=True) == one_by_one


def test_fingerprint_follows_the_tensors_a_function_names(monkeypatch) -> None:
    before = bdia.DiffusionODE(scaled_by_global).fingerprint()
    monkeypatch.setattr(sys.modules[__name__], "MATRIX", 2.0 * MATRIX)
    assert bdia.DiffusionODE(scaled_by_global).fingerprint() != before


def test_fingerprint_of_a_model_that_calls_an_ode_ignores_its_call_count() -> None:
    inner = GaussianMixture.random(2, 4, seed=0).ode()
    outer = bdia.ODE(lambda t, x: inner.evaluate(float(t), x).derivative)
    before = outer.fingerprint()
    inner.evaluate(1.0, torch.ones(1, 2, dtype=torch.float64))
    assert outer.fingerprint() == before


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_pair_continued_under_another_mixture_warns() -> None:
    """The toy's bound-method denoiser, which every docs example uses."""
    ts = bdia.karras_grid(4, final_zero=False)
    x = torch.ones(2, 2, dtype=torch.float64)
    solver = bdia.bdia("euler", 0.9)
    pair = bdia.sample(GaussianMixture.random(2, 4, seed=0).ode(), solver, x, ts, return_pair=True)
    with pytest.warns(bdia.PairMismatchWarning, match="different ODE"):
        bdia.invert(GaussianMixture.random(2, 4, seed=1).ode(), solver, pair, ts, progress=False)


def test_same_ode_and_unfingerprinted_pairs_do_not_warn(small) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bdia.sample(small.ode, small.solver, small.pair, small.ts, progress=False)
        bare = dataclasses.replace(small.pair, fingerprint=None)
        bdia.sample(small.ode, small.solver, bare, small.ts, progress=False)


def test_edit_calls_back_from_both_runs() -> None:
    mixture = GaussianMixture.random(2, 4, seed=0)
    ts = bdia.karras_grid(4, final_zero=False)
    data = mixture.sample_data(3, generator=torch.Generator().manual_seed(0)).double()
    moves: list[tuple[int, int]] = []
    bdia.edit(
        mixture.ode(),
        GaussianMixture.random(2, 4, seed=1).ode(),
        bdia.bdia("euler", 0.9),
        data,
        ts,
        progress=False,
        callback=lambda d: moves.append((d["i"], ts.tolist().index(d["t_next"]))),
    )
    assert moves == [(4, 3), (3, 2), (2, 1), (1, 0), (0, 1), (1, 2), (2, 3), (3, 4)]


def test_pair_is_not_a_sequence(small) -> None:
    with pytest.raises(TypeError, match="pair.earlier, pair.later"):
        earlier, later = small.pair
    assert dataclasses.is_dataclass(small.pair)
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.pair.earlier = small.pair.later  # type: ignore[misc]
