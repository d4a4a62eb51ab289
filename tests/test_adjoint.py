"""``sample(..., adjoint="reversible")``: the gradients of autograd in constant memory.

The reference is ``adjoint="autograd"``, plain autograd through the unrolled loop. The
reversible adjoint differentiates the same operations one step at a time, from states that
``rewind`` rebuilds; with a float64 state those agree with the forward ones to about twice
the state's precision, so the gradients must agree to 1e-8 relative (in practice they agree
to the last bit or nearly).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import bdia
from bdia.adjoint import state_tensors, with_state_tensors
from bdia.models import toy

# sampling's parasitic watch calls float() on a 0-dim tensor that carries a graph under
# adjoint="autograd" (the reference here), which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

TOLERANCE = 1e-8
STEPS = 10
SOLVERS = {
    "bdia-euler-0.9": lambda: bdia.bdia(bdia.get_solver("euler"), 0.9),
    "bdia-heun-0.96": lambda: bdia.bdia(bdia.get_solver("heun"), 0.96),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), var.rsqrt(), sigma.log() / 4


class MLPDenoiser(nn.Module):
    """EDM-form denoiser of a small MLP on ``(batch, dim)`` states, float64."""

    def __init__(self, dim: int = 4, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, x_bar: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma_bar.to(x_bar.dtype)[:, None])
        return c_skip * x_bar + c_out * self.net(torch.cat([c_in * x_bar, c_noise], dim=1))


class ConvDenoiser(nn.Module):
    """EDM-form denoiser of two 3x3 convolutions on ``(batch, 1, 8, 8)`` images, with a
    class embedding added to the hidden features."""

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, width, 3, padding=1)
        self.embed = nn.Linear(classes, width)
        self.conv2 = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x_bar, sigma_bar, class_labels):
        sigma = sigma_bar.to(x_bar.dtype)[:, None, None, None]
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
        h = self.conv1(torch.cat([c_in * x_bar, c_noise.expand_as(x_bar)], dim=1))
        h = torch.tanh(h + self.embed(class_labels.to(x_bar.dtype))[:, :, None, None])
        return c_skip * x_bar + c_out * self.conv2(h)


def run(ode, solver, start, ts, adjoint, **kwargs):
    return bdia.sample(ode, solver, start, ts, adjoint=adjoint, progress=False, **kwargs)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is not proportional to the output (so nothing cancels)."""
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (w * out + 0.1 * out**2).sum()


def gradients(make_problem, solver, adjoint: str):
    """The output and the gradients of ``loss_of`` w.r.t. every tensor ``make_problem``
    marks as a target, on a fresh copy of the problem (same seed)."""
    ode, start, ts, targets = make_problem()
    out = run(ode, solver, start, ts, adjoint)
    grads = torch.autograd.grad(loss_of(out), targets)
    return out.detach(), grads


def toy_start():
    mixture = toy.GaussianMixture.random(4, 3, seed=1)
    ts = bdia.karras_grid(STEPS)
    x = 80.0 * torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x.requires_grad_(True)
    return mixture.ode(), x, ts, [x]


def mlp_params():
    torch.manual_seed(0)
    net = MLPDenoiser().double()
    ts = bdia.karras_grid(STEPS, sigma_max=20.0)
    x = 20.0 * torch.randn(5, 4, dtype=torch.float64)
    return bdia.DiffusionODE(net), x, ts, list(net.parameters())


def conv_all():
    torch.manual_seed(0)
    net = ConvDenoiser().double()
    ts = bdia.karras_grid(STEPS, sigma_max=20.0)
    x = (20.0 * torch.randn(3, 1, 8, 8, dtype=torch.float64)).requires_grad_(True)
    # A class embedding that is not a leaf: softmax of learnable logits.
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    ode = bdia.DiffusionODE(net, cond={"class_labels": logits.softmax(-1)})
    return ode, x, ts, [x, logits, *net.parameters()]


PROBLEMS = {"toy-start": toy_start, "mlp-params": mlp_params, "conv-all": conv_all}


@pytest.mark.parametrize("solver_name", SOLVERS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_gradients_equal_autograd_through_the_loop(problem, solver_name):
    solver = SOLVERS[solver_name]()
    out_ref, ref = gradients(PROBLEMS[problem], solver, "autograd")
    out, got = gradients(PROBLEMS[problem], solver, "reversible")
    assert torch.equal(out, out_ref)
    errors = [rel(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errors) <= TOLERANCE, errors
    assert all(float(r.norm()) > 0 for r in ref)


COUPLED = {
    "edict-heun-0.8": lambda: bdia.edict("heun", 0.8),
    "reversible-euler-0.999": lambda: bdia.reversible("euler", 0.999),
    "reversible-heun-0.9": lambda: bdia.reversible("heun", 0.9),
}


def conv_all_above_zero():
    """``conv_all`` on a grid that ends at sigma > 0, which ``reversible`` needs."""
    ode, x, _, targets = conv_all()
    return ode, x, bdia.karras_grid(STEPS, sigma_max=20.0, final_zero=False), targets


@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("solver_name", COUPLED)
def test_coupled_solvers_gradients_equal_autograd_through_the_loop(solver_name):
    """EDICT's and McCallum-Foster's two chains, differentiated with respect to the noise,
    the class embedding and the weights: autograd's gradients (measured: 4e-16, and 1e-13
    for the noise under reversible(euler, 0.999), whose gradient is the sum of the two
    chains', each 1000 times larger). Over 10 steps the parasitic mode swamps two of these
    samples, which changes nothing in what is compared."""
    solver = COUPLED[solver_name]()
    out_ref, ref = gradients(conv_all_above_zero, solver, "autograd")
    out, got = gradients(conv_all_above_zero, solver, "reversible")
    assert torch.equal(out, out_ref)
    errors = [rel(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errors) <= TOLERANCE, errors
    assert all(float(r.norm()) > 0 for r in ref)


@pytest.mark.parametrize("solver_name", SOLVERS)
def test_forward_value_is_sample_bit_for_bit(solver_name):
    solver = SOLVERS[solver_name]()
    ode, x, ts, _ = conv_all()
    plain = run(ode, solver, x, ts, None)
    assert torch.equal(run(ode, solver, x, ts, "reversible").detach(), plain)
    pair = run(ode, solver, x, ts, None, return_pair=True)
    got = run(ode, solver, x, ts, "reversible", return_pair=True)
    for name in ("earlier", "later", "earlier_low", "later_low"):
        assert torch.equal(getattr(got, name).detach(), getattr(pair, name)), name
    assert got.fingerprint == pair.fingerprint


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_the_forward_pass_saves_only_the_final_state():
    """What the forward pass keeps for backward, counted by autograd's saved-tensor hooks:
    the same whatever the number of steps (autograd through the loop keeps every step's
    graph)."""
    solver = SOLVERS["bdia-euler-0.9"]()
    ode, x, _, _ = toy_start()

    def saved_numel(steps: int, adjoint: str) -> int:
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(ode, solver, x, bdia.karras_grid(steps), adjoint)
        return count[0]

    # The four tensors of the final state, and the start once (sample's check of its input).
    assert saved_numel(5, "reversible") == saved_numel(40, "reversible") == 5 * x.numel()
    assert saved_numel(40, "autograd") > 5 * saved_numel(5, "autograd")


def test_the_parasitic_watch_sees_the_reversible_forward_pass():
    mixture = toy.GaussianMixture.random(2, 2, seed=4)
    x = 5.0 * torch.randn(1, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ts = bdia.karras_grid(4, sigma_max=5.0)
    with pytest.warns(bdia.ParasiticWarning, match="bdia-euler"):
        run(mixture.ode(), SOLVERS["bdia-euler-0.9"](), x, ts, "reversible")


def test_the_callback_sees_what_sample_shows():
    solver = SOLVERS["bdia-euler-0.9"]()
    ode, x, ts, _ = toy_start()
    seen = {None: [], "reversible": []}
    for adjoint, log in seen.items():
        run(ode, solver, x, ts, adjoint, callback=lambda info, log=log: log.append(info))
    assert len(seen[None]) == len(seen["reversible"]) == STEPS
    for a, b in zip(seen[None], seen["reversible"]):
        assert (a["i"], a["t"], a["t_next"]) == (b["i"], b["t"], b["t_next"])
        assert torch.equal(a["x_next"], b["x_next"])


def test_pair_start_and_pair_result_differentiate_every_word():
    """From a StatePair (low words included) to the final pair: the gradients w.r.t. all four
    start tensors through all four result tensors equal autograd's, and the earlier state's
    low word, which enters only the update beside its high word, gets the same gradient."""
    solver = SOLVERS["bdia-heun-0.96"]()
    mixture = toy.GaussianMixture.random(3, 2, seed=2)
    ode = mixture.ode()
    ts = bdia.karras_grid(STEPS)
    x = 80.0 * torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # The pair at ts[0], ts[1] that inverting a sample gives: both low words are set.
    start_pair = bdia.invert(ode, solver, run(ode, solver, x, ts, None, return_pair=True), ts)
    assert start_pair.earlier_low is not None and start_pair.later_low is not None

    def grads(adjoint):
        leaves = {
            name: getattr(start_pair, name).clone().requires_grad_(True)
            for name in ("earlier", "later", "earlier_low", "later_low")
        }
        start = bdia.StatePair(**leaves, fingerprint=start_pair.fingerprint)
        out = run(ode, solver, start, ts, adjoint, return_pair=True)
        loss = loss_of(out.earlier) + loss_of(out.later) + (out.earlier_low * 3.0).sum()
        loss = loss + (out.later_low * -2.0).sum()
        return out, torch.autograd.grad(loss, list(leaves.values()))

    out_ref, ref = grads("autograd")
    out, got = grads("reversible")
    assert torch.equal(out.later.detach(), out_ref.later.detach())
    errors = [rel(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errors) <= TOLERANCE, errors
    d_earlier, _, d_earlier_low, _ = got
    torch.testing.assert_close(d_earlier_low, d_earlier, rtol=1e-12, atol=0.0)


def test_rewinding_every_step_rebuilds_the_start():
    """rewind undoes step: from the final state back to k = 0, the start comes back (x to
    the last bit here, the neighbour and low words to the two-word precision)."""
    solver = SOLVERS["bdia-euler-0.9"]()
    ode, x, ts, _ = toy_start()
    x = x.detach()
    grid = [float(t) for t in ts]
    states = [solver.init(ode, grid, x, at=0)]
    with torch.no_grad():
        for _ in range(STEPS):
            states.append(solver.step(ode, grid, states[-1]))
        state = states[-1]
        for k in range(STEPS, 0, -1):
            state = solver.rewind(ode, grid, state)
            assert state.k == k - 1
            original = dict(state_tensors(states[k - 1]))
            for path, tensor in state_tensors(state):
                if path in original:
                    assert rel(tensor, original[path]) <= 1e-14, (k, path)
    assert torch.equal(state.x, x)
    assert state.memory.neighbour is None


def test_state_tensors_round_trip():
    solver = SOLVERS["bdia-euler-0.9"]()
    ode, x, ts, _ = toy_start()
    grid = [float(t) for t in ts]
    with torch.no_grad():
        state = solver.step(ode, grid, solver.step(ode, grid, solver.init(ode, grid, x, at=0)))
    found = state_tensors(state)
    assert [p for p, _ in found] == [
        ("x",),
        ("memory", "low"),
        ("memory", "neighbour", "x"),
        ("memory", "neighbour", "low"),
    ][: len(found)]
    doubled = with_state_tensors(state, {p: 2 * t for p, t in found})
    for (p, t), (q, u) in zip(found, state_tensors(doubled)):
        assert p == q and torch.equal(u, 2 * t)
    assert doubled.k == state.k and doubled.memory.gammas == state.memory.gammas


def test_gradcheck_on_a_tiny_problem():
    solver = SOLVERS["bdia-heun-0.96"]()
    mixture = toy.GaussianMixture.random(2, 2, seed=4)
    ode = mixture.ode()
    ts = bdia.karras_grid(6, sigma_max=5.0)
    x = 5.0 * torch.randn(1, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: run(ode, solver, z, ts, "reversible"), (x,))


def test_a_non_reversible_solver_is_refused_in_one_line():
    ode, x, ts, _ = toy_start()
    with pytest.raises(ValueError, match="needs a reversible solver") as info:
        run(ode, bdia.get_solver("heun"), x, ts, "reversible")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("gamma", [0.0, [0.9] * (STEPS - 2) + [0.0]])
def test_gamma_zero_is_refused_before_the_forward_pass(gamma):
    ode, x, ts, _ = toy_start()
    solver = bdia.bdia(bdia.get_solver("euler"), gamma)
    with pytest.raises(ValueError, match="gamma = 0 .*cannot be undone exactly") as info:
        run(ode, solver, x, ts, "reversible")
    assert "adjoint='autograd'" in str(info.value)
    assert ode.nfe == 0


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_tensors_the_adjoint_cannot_see_are_named():
    """A module hidden in a plain function: its parameters get no gradient, and a warning
    says so, pointing at the caller's backward() (gradients w.r.t. the start are still
    exact)."""
    torch.manual_seed(0)
    net = MLPDenoiser().double()
    ode = bdia.DiffusionODE(lambda x, s: net(x, s))
    ts = bdia.karras_grid(4, sigma_max=20.0)
    x = (20.0 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_(True)
    out = run(ode, SOLVERS["bdia-euler-0.9"](), x, ts, "reversible")
    with pytest.warns(RuntimeWarning, match="get no gradient") as record:
        out.sum().backward()
    # Raised in backward, whose frames are torch's engine's: the warning still names this line.
    assert [w.filename for w in record if "no gradient" in str(w.message)] == [__file__]
    assert all(p.grad is None for p in net.parameters())
    # Autograd through the loop sees the hidden module too; the start's gradient is the same,
    # to TOLERANCE as in test_gradients_equal_autograd_through_the_loop.
    start = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        run(ode, SOLVERS["bdia-euler-0.9"](), start, ts, "autograd").sum(), start
    )
    assert x.grad is not None and rel(x.grad, expected) <= TOLERANCE


class DropoutDenoiser(MLPDenoiser):
    """``MLPDenoiser`` with a dropout of 0.2 on its hidden features."""

    def __init__(self) -> None:
        super().__init__()
        self.net.insert(2, nn.Dropout(0.2))


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_a_model_with_dropout_in_train_mode_is_refused_in_the_backward_pass():
    """Dropout in train() mode draws new masks when the backward pass rebuilds and
    recomputes the steps; the gradients used to come back 34% off autograd's without a sign
    (bdia) and 6% off (edict). The first recomputed step now misses the final state by about
    1e-2 where rounding allows 1.5e-8, and the backward pass stops there: 2 model calls after
    the forward pass's 8. In eval() mode the same network gives autograd's gradients."""
    torch.manual_seed(0)
    net = DropoutDenoiser().double()
    ode = bdia.DiffusionODE(net)
    ts = bdia.karras_grid(8, sigma_max=20.0)
    x = (20.0 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)
    solver = SOLVERS["bdia-euler-0.9"]()
    out = run(ode, solver, x, ts, "reversible")
    ode.reset_nfe()
    with pytest.raises(RuntimeError, match=r"step 7 .*same output for the same input") as info:
        loss_of(out).backward()
    assert "model.eval()" in str(info.value) and "\n" not in str(info.value)
    assert ode.nfe == 2 and x.grad is None

    net.eval()
    ref = torch.autograd.grad(loss_of(run(ode, solver, x, ts, "autograd")), [x])[0]
    got = torch.autograd.grad(loss_of(run(ode, solver, x, ts, "reversible")), [x])[0]
    assert rel(got, ref) <= TOLERANCE


class BatchNormDenoiser(MLPDenoiser):
    """``MLPDenoiser`` with batch normalization of its hidden features: in ``train()`` mode it
    normalizes by the batch's statistics (deterministic) and updates its running ones."""

    def __init__(self) -> None:
        super().__init__()
        self.net.insert(1, nn.BatchNorm1d(16, dtype=torch.float64))


def batch_norm_gradients(adjoint: str, solver):
    """The start's and the weights' gradients, the buffers after backward and the forward
    pass's model calls, for a freshly built BatchNormDenoiser in train() mode."""
    torch.manual_seed(0)
    net = BatchNormDenoiser().double()
    ode = bdia.DiffusionODE(net)
    x = (20.0 * torch.randn(6, 4, dtype=torch.float64)).requires_grad_(True)
    out = run(ode, solver, x, bdia.karras_grid(STEPS, sigma_max=20.0), adjoint)
    calls = ode.nfe
    grads = torch.autograd.grad(loss_of(out), [x, *net.parameters()])
    return grads, {name: b.clone() for name, b in net.named_buffers()}, calls


@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.parametrize("solver_name", ["bdia-heun-0.96", "edict-heun-0.8"])
def test_running_statistics_are_those_of_the_forward_pass(solver_name):
    """Batch norm in train() mode updates its running statistics on every call. The
    backward pass calls the model twice more per evaluation (rewind and recomputation),
    which used to update them three times as often as sampling does, momentum-weighted
    toward the rebuilt states. Now the network's buffers are put back as the forward pass
    left them: bit for bit those of autograd through the loop (the same calls on the same
    inputs), and the gradients agree as in the tests above."""
    solver = {**SOLVERS, **COUPLED}[solver_name]()
    ref_grads, ref_buffers, calls = batch_norm_gradients("autograd", solver)
    got_grads, got_buffers, _ = batch_norm_gradients("reversible", solver)
    assert list(got_buffers) == list(ref_buffers)
    for name, buffer in got_buffers.items():
        assert torch.equal(buffer, ref_buffers[name]), name
    assert int(got_buffers["net.1.num_batches_tracked"]) == calls
    errors = [rel(g, r) for g, r in zip(got_grads, ref_grads, strict=True)]
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
def test_buffers_are_put_back_when_the_backward_pass_stops():
    """A backward pass refused midway (dropout in train() mode) leaves the network's
    buffers as the forward pass left them too."""
    torch.manual_seed(0)
    net = DropoutDenoiser().double()
    net.net.insert(1, nn.BatchNorm1d(16, dtype=torch.float64))
    ode = bdia.DiffusionODE(net)
    x = (20.0 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)
    ts = bdia.karras_grid(8, sigma_max=20.0)
    out = run(ode, SOLVERS["bdia-euler-0.9"](), x, ts, "reversible")
    after_forward = {name: b.clone() for name, b in net.named_buffers()}
    with pytest.raises(RuntimeError, match="same output for the same input"):
        loss_of(out).backward()
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, after_forward[name]), name


def drifting_gradients(solver, steps: int, dtype: torch.dtype):
    """The start's gradient by both adjoints on the toy mixture (the reversible one's
    backward pass in a pytest.warns block that the caller opens)."""
    mixture = toy.GaussianMixture.random(2, 2, seed=4)
    ts = bdia.karras_grid(steps)
    found = []
    for adjoint in ("autograd", "reversible"):
        x = 80.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=dtype)
        x.requires_grad_(True)
        out = run(mixture.ode(), solver, x, ts, adjoint)
        found.append(torch.autograd.grad(loss_of(out), [x])[0])
    return found


def test_a_rebuild_that_drifted_from_the_forward_pass_warns():
    """edict(heun, p=0.5) undoes each step with a gain of up to 1/p^2 = 4: over 60 steps the
    backward pass rebuilds the start 2.3 (relative rms) away from it, in float64, and the
    gradient comes out 1.5e-6 off autograd's, 150 times the agreement the other tests hold
    (asserted with a margin: more than that agreement).
    It used to pass in silence; now a RuntimeWarning gives the drift and what to change."""
    with pytest.warns(RuntimeWarning, match=r"rebuilt the first state \S+ .*p\^2") as record:
        ref, got = drifting_gradients(bdia.edict("heun", 0.5), 60, torch.float64)
    assert rel(got, ref) > TOLERANCE
    (warning,) = [w for w in record if "first state" in str(w.message)]
    assert warning.filename == __file__  # drifting_gradients' backward(), not torch's frames
    message = str(warning.message)
    drift = float(message.split("first state ")[1].split(" ")[0])
    assert drift > 1.0


def test_the_chains_low_words_are_not_measured_as_drift():
    """edict(euler, 0.85) from the CoupledPair that invert gives, in float32, over 40 steps:
    the backward pass rebuilds both chains' high words bit for bit, and their low words to
    about 1e-3 of themselves, i.e. the value to about 1e-10 of the state, far below float32's
    rounding. The drift check used to measure the low words x_low and y_low against
    themselves (it passed over BDIA's, named low) and warned of a start rebuilt 0.00087 away.
    The gradients agree with autograd's (measured: to the last bit; asserted to 1e-6, a
    margin of float32 rounding)."""
    mixture = toy.GaussianMixture.random(3, 4, seed=1)
    vp = bdia.VPLinear()
    ode = mixture.ode(vp)
    ts = bdia.uniform_logsnr_grid(40, 1.0, 1e-3, vp)
    solver = bdia.edict("euler", 0.85)
    data = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bdia.ParasiticWarning)  # p = 0.85 grows the chains apart
        pair = bdia.invert(ode, solver, data, ts, progress=False)
        assert pair.x_low is not None and pair.y_low is not None
        found = {}
        for adjoint in ("autograd", "reversible"):
            leaves = {name: getattr(pair, name).clone().requires_grad_() for name in ("x", "y")}
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                out = run(ode, solver, dataclasses.replace(pair, **leaves), ts, adjoint)
                loss_of(out).backward()
            drift = [str(w.message) for w in record if "first state" in str(w.message)]
            assert not drift, drift
            found[adjoint] = [leaf.grad for leaf in leaves.values()]
    for ref, got in zip(found["autograd"], found["reversible"]):
        assert rel(got, ref) < 1e-6


def test_a_rebuild_that_drifted_past_repair_is_refused():
    """bdia(euler, 0.3) in float32 over 60 steps: prod 1/gamma is 7e30, far beyond what two
    float32 words (48 bits) carry, and the gradient used to come back 1e-3 off autograd's.
    Recomputing the first step from the rebuilt start misses the rebuilt state by 3.8 where
    rounding allows 3.5e-4, and the error names the drift besides the model."""
    with pytest.raises(RuntimeError, match=r"step \d+ .*drifted") as info:
        drifting_gradients(bdia.bdia("euler", 0.3), 60, torch.float32)
    assert "float64 state" in str(info.value)


# ---------------------------------------------------------------- without an adjoint


@pytest.mark.parametrize("method", ["rk4", "bdia-euler"])
def test_odeint_is_differentiable_like_torchdiffeq(method):
    """On y' = A y every solver is a linear map y0 -> y0 P^T, so the gradient of
    sum(ys[-1]) is ones @ P, with P^T read off odeint run on the identity rows. Both sides
    are the same operations in float64, so they agree to rounding: 1e-12 relative."""
    a = torch.tensor([[0.0, 1.0], [-4.0, -0.2]], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    options = {"gamma": 0.9} if method.startswith("bdia") else None
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ys = bdia.odeint(lambda _, y: y @ a.T, y0, t, method=method, options=options)
    ys[-1].sum().backward()
    with torch.no_grad():
        p_t = bdia.odeint(
            lambda _, y: y @ a.T,
            torch.eye(2, dtype=torch.float64),
            t,
            method=method,
            options=options,
        )[-1]
    expected = torch.ones(1, 2, dtype=torch.float64) @ p_t.T
    assert not p_t.requires_grad
    assert rel(y0.grad, expected) <= 1e-12 and float(expected.abs().min()) > 0


def test_odeint_refuses_times_that_require_grad():
    """torchdiffeq's odeint differentiates with respect to t too; this one reads the grid as
    numbers. A t that required grad used to come back with t.grad None, so an optimizer of
    learnable times skipped it in silence; now the call says so and how to get that
    gradient (the end time as a scale of the vector field). Under no_grad nothing is
    recorded, and the same t is taken."""
    y0 = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"t requires grad.*t\.detach\(\)"):
        bdia.odeint(lambda _, y: -y, y0, t)
    with torch.no_grad():
        ys = bdia.odeint(lambda _, y: -y, y0, t)
    assert torch.equal(ys, bdia.odeint(lambda _, y: -y, y0.detach(), t.detach()))


def test_sample_without_adjoint_returns_no_graph():
    """adjoint=None records nothing, so no result may claim a graph: a trajectory that held
    the start would backpropagate zeros to it, silently."""
    ode, x, ts, _ = toy_start()
    solver = bdia.get_solver("euler")
    assert not run(ode, solver, x, ts, None, trajectory=True).requires_grad
    assert not run(ode, solver, x, ts, None).requires_grad


@pytest.mark.parametrize("adjoint", ["autograd", "reversible"])
def test_no_grad_around_sample_records_nothing(adjoint):
    """Both adjoints follow the caller's grad mode, as torch operations do: under
    torch.no_grad() neither keeps a graph (autograd's would hold every step's tensors)."""
    ode, x, ts, _ = toy_start()
    solver = SOLVERS["bdia-euler-0.9"]()
    with torch.no_grad():
        assert not run(ode, solver, x, ts, adjoint).requires_grad
        assert not run(ode, solver, x, ts, adjoint, return_pair=True).later.requires_grad
    assert run(ode, solver, x, ts, adjoint).requires_grad
