"""Exact gradients through a reversible sampler in memory independent of the number of steps.

``bdia.sample(..., adjoint="reversible")`` calls ``reversible_sample``. Its forward pass runs
the solver's steps under ``torch.no_grad()`` and keeps only the final ``SolverState``. Its
backward pass walks the steps from the last to the first; for step k it

1. rebuilds the state before the step from the state after it with ``solver.rewind``
   (without grad; BDIA's ``rewind`` is its exact ``unstep``, turned around),
2. recomputes that one step with grad enabled, from detached copies of the rebuilt state's
   tensors made leaves, and
3. backpropagates the cotangent of the state after the step through it with
   ``torch.autograd.grad``: that gives the cotangent of the state before the step, and adds
   the step's share to the gradients of the network's parameters and of the conditioning.

At the end the cotangent of the first state is carried through ``solver.init`` onto the start
(a tensor, a ``StatePair`` or another solver's pair). Only one step's graph is alive at a
time, so memory does not grow with the number of steps; the price is one more pass of model
calls (the rewinds) and the recomputation of each step's graph.

The state's tensors. A solver's state is ``x`` and whatever it keeps in ``memory``, which the
drivers never look inside. Here ``state_tensors`` walks ``x`` and ``memory`` recursively
(dataclass fields, tuples, lists and dicts) and takes every floating tensor it meets as a
leaf, named by its path (``("memory", "neighbour", "x")``); ``with_state_tensors`` puts
tensors back at those paths. BDIA's neighbour and both low words are found that way, and so
is any solver that keeps its memory in dataclasses. ``evaluation`` and ``parasitic`` are
what a move produced, not what the next move reads, and are left out.

Low words. BDIA carries each state as ``x + x_low`` and updates the pair with error-free
transformations. Differentiated as real arithmetic those transformations have the derivative
of the exact sum: every output's low word has derivative 0 (in exact arithmetic it is 0), and
an input's low word enters wherever it enters, additively, beside its high word. So the
gradient with respect to a low word equals that of its high word's additive part: for the
earlier state of a pair, which enters only the update, ``grad(earlier_low) ==
grad(earlier)``; the later state also feeds the network, its low word does not. A cotangent
placed on a returned low word propagates nothing. This is what autograd through the unrolled
loop computes too (the same operations are differentiated); the adjoint merely differentiates
them one step at a time.

What gets gradients: the start's tensors, the tensors in ``ode.cond`` that require grad
(leaves or not: a class embedding computed from a learnable table is fine), and
``ode.f.parameters()`` that require grad when ``ode.f`` is an ``nn.Module``. A network that
closes over other tensors requiring grad (a module wrapped in a function, say) gives them
no gradient; the backward pass warns when it finds such tensors in a step's graph. The
network must be deterministic (``eval()`` mode: no dropout), since every step is computed
twice and rebuilt once.

Buffers. The backward pass calls the model twice more per evaluation (the rewind and the
recomputation); a layer that updates a buffer on each call (batch norm's running statistics
in ``train()`` mode) would count those calls too. When ``ode.f`` is an ``nn.Module`` its
buffers are put back, at the end of the backward pass or when it stops, as the forward pass
left them: what autograd through the loop leaves.

Checks. A recomputed step must land on the state it led to in the forward pass (or that the
rebuild gave), to ``sqrt(eps)`` of the state dtype (relative rms); otherwise the backward
pass raises a ``RuntimeError``, since its gradients would be those of another trajectory (a
random layer in ``train()`` mode, or rebuilt states drifted past repair). At the end, a
rebuilt first state further than that from the real one makes it warn (``RuntimeWarning``):
undoing the steps magnified the rounding that far, and the gradients may be off by as much.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._steps import FiniteCheck, progress_bar
from ._warnings import warn_at_caller
from .ode import ODE, wide_dtype
from .solvers.base import Solver, SolverState, move_report

__all__ = ["reversible_sample", "state_tensors", "with_state_tensors"]

Path = tuple[Any, ...]

# Values that may sit in a solver's memory beside tensors and carry none.
_CONSTANTS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


# ------------------------------------------------------------------ the state's tensors


# Types a sequence of which holds no tensor (BDIA's gammas: one float per step). Such a
# sequence is passed over whole; walking it item by item would cost O(steps) per state.
_PLAIN = frozenset({bool, int, float, complex, str, bytes, type(None)})


def _plain(value: tuple | list) -> bool:
    return all(type(item) in _PLAIN for item in value)


def _walk(value: Any, path: Path, out: list[tuple[Path, Tensor]]) -> None:
    if isinstance(value, (tuple, list)) and _plain(value):
        return
    if isinstance(value, Tensor):
        if value.is_floating_point():
            out.append((path, value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            if field.init:
                _walk(getattr(value, field.name), (*path, field.name), out)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _walk(item, (*path, i), out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, (*path, key), out)
    elif value is not None and not isinstance(value, _CONSTANTS):
        raise TypeError(
            f"adjoint='reversible' cannot see inside a {type(value).__name__} in the solver's "
            f"memory (at {'.'.join(map(str, path))}); keep tensors in dataclasses, tuples, "
            "lists or dicts there"
        )


def _put(value: Any, path: Path, new: dict[Path, Tensor]) -> Any:
    if isinstance(value, (tuple, list)) and _plain(value):
        return value
    if isinstance(value, Tensor):
        return new.get(path, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _put(getattr(value, f.name), (*path, f.name), new)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, (tuple, list)):
        items = [_put(item, (*path, i), new) for i, item in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {key: _put(item, (*path, key), new) for key, item in value.items()}
    return value


def state_tensors(state: SolverState) -> list[tuple[Path, Tensor]]:
    """The floating tensors of ``state.x`` and ``state.memory``, each with its path.

    Paths are tuples of field names, indices and keys: ``("x",)`` for the state itself,
    ``("memory", "neighbour", "x")`` for BDIA's neighbouring state. ``evaluation`` and
    ``parasitic`` are left out: no move reads them.

    Raises:
        TypeError: if the memory holds an object the walk cannot see inside.
    """
    out: list[tuple[Path, Tensor]] = [(("x",), state.x)]
    _walk(state.memory, ("memory",), out)
    return out


def with_state_tensors(state: SolverState, new: dict[Path, Tensor]) -> SolverState:
    """``state`` with the tensors at the given paths replaced (``evaluation`` and
    ``parasitic`` dropped); paths not given keep their tensors."""
    return SolverState(
        state.k, new.get(("x",), state.x), memory=_put(state.memory, ("memory",), new)
    )


# ------------------------------------------------------------------------ the driver

Callback = Callable[[dict[str, Any]], None]


def _targets(ode: ODE) -> list[Tensor]:
    """The tensors besides the start that gradients reach: the network's parameters and the
    conditioning tensors that require grad (each once)."""
    found: list[Tensor] = []
    if isinstance(ode.f, torch.nn.Module):
        found += [p for p in ode.f.parameters() if p.requires_grad]
    cond = getattr(ode, "cond", None) or {}
    stack = list(cond.values())
    while stack:
        value = stack.pop(0)
        if isinstance(value, Tensor):
            if value.requires_grad and value.is_floating_point():
                found.append(value)
        elif isinstance(value, (tuple, list)):
            stack += list(value)
        elif isinstance(value, dict):
            stack += list(value.values())
    unique: dict[int, Tensor] = {}
    for t in found:
        unique.setdefault(id(t), t)
    return list(unique.values())


class _Run:
    """What the autograd function needs besides tensors: the problem, the solver, the grid,
    how to rebuild the start from its tensors, and (after the forward pass) the final state's
    structure."""

    def __init__(
        self,
        ode: ODE,
        solver: Solver,
        start: Any,
        ts: list[float],
        progress: bool | None,
        callback: Callback | None,
        on_state: Callable[[SolverState], None] | None,
    ) -> None:
        self.ode, self.solver, self.ts = ode, solver, ts
        self.progress, self.callback, self.on_state = progress, callback, on_state
        # A pair (a StatePair, or any dataclass of tensors a solver continues from) is
        # differentiated through each of its tensor fields; a tensor is its own one field.
        self.pair = start if dataclasses.is_dataclass(start) else None
        if self.pair is not None:
            self.pair_fields = tuple(
                f.name
                for f in dataclasses.fields(start)
                if isinstance(getattr(start, f.name), Tensor)
            )
            self.start_tensors = [getattr(start, f) for f in self.pair_fields]
        else:
            self.pair_fields = ()
            self.start_tensors = [start]
        self.targets = _targets(ode)
        with torch.no_grad():
            self.first = self.init(self.start_tensors)  # the state init makes from the start
        self.k_start = self.first.k
        self.paths: list[Path] = []
        self.template: SolverState | None = None  # the final state's structure, once known

    def start(self, tensors: Sequence[Tensor]) -> Any:
        if self.pair is None:
            return tensors[0]
        pair: Any = self.pair  # a dataclass instance (is_dataclass also admits classes)
        return dataclasses.replace(pair, **dict(zip(self.pair_fields, tensors)))

    def init(self, tensors: Sequence[Tensor]) -> SolverState:
        return self.solver.init(self.ode, self.ts, self.start(tensors), at=0)

    def final(self, tensors: Sequence[Tensor]) -> SolverState:
        """The final state with ``tensors`` at its paths; the forward pass records its
        structure."""
        assert self.template is not None, "the forward pass runs first"
        return with_state_tensors(self.template, dict(zip(self.paths, tensors)))


def _hidden_leaves(outputs: Sequence[Tensor], known: Sequence[Tensor]) -> int:
    """How many tensors requiring grad, other than ``known``, the graph of ``outputs``
    reaches (through the step's own operations; a known non-leaf stops the walk)."""
    known_ids = {id(t) for t in known}
    stops = {t.grad_fn for t in known if t.grad_fn is not None}
    stack: list[Any] = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    hidden = 0
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            hidden += id(variable) not in known_ids
            continue
        stack += [child for child, _ in node.next_functions]
    return hidden


def _warn_hidden_leaves(outputs: Sequence[Tensor], known: Sequence[Tensor]) -> None:
    """Warn when the graph of ``outputs`` reaches tensors requiring grad besides ``known``."""
    hidden = _hidden_leaves(outputs, known)
    if hidden:
        warn_at_caller(
            f"adjoint='reversible': the model uses {hidden} tensor(s) that require grad but "
            "are neither parameters of ode.f (an nn.Module) nor tensors in ode.cond; they get "
            "no gradient. Pass the module itself as the model, put the tensor in cond, or "
            "freeze it",
            RuntimeWarning,
            through_torch=True,
        )


def _relative_rms(difference: Tensor, reference: Tensor) -> float:
    """rms(difference) / rms(reference): 0 where both are zero, inf where only the reference
    is, nan where either holds a NaN."""
    wide = wide_dtype(reference.device)
    with torch.no_grad():
        num = float(difference.to(wide).square().mean().sqrt())
        den = float(reference.to(wide).square().mean().sqrt())
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _rebuild_tolerance(dtype: torch.dtype) -> float:
    """How far (relative rms) a rebuilt state may lie from the forward pass's.

    With a deterministic model, one rewind and the recomputed step give back the state to a
    few units in the last place: the rebuilt states carry the forward pass's high words (bit
    for bit, or one unit off where a value sits within u^2 of a rounding midpoint). Over
    many rewinds that rounding is magnified, from u^2, by the inverse steps. ``sqrt(eps)``
    of the state dtype (1.5e-8 in float64, 3.5e-4 in float32) lies far above the first and
    far below what a random layer (a dropout of 0.2 moved a step by 7e-3) or a magnification
    that has used up the two words' precision gives.
    """
    return torch.finfo(dtype).eps ** 0.5


def _check_reproduced(
    recomputed: Tensor, original: Tensor, k: int, ts: list[float], *, first: bool
) -> None:
    """Raise unless step ``k``, recomputed from the rebuilt state before it, lands on the
    state after it (``recomputed`` and ``original``: x at ``ts[k + 1]``, same shape and
    dtype). ``first``: this is the backward pass's first step, whose state after it is the
    forward pass's own, so that only the model can be at fault."""
    tolerance = _rebuild_tolerance(original.dtype)
    off = _relative_rms(recomputed.detach() - original, original)
    if off <= tolerance:
        return
    model = (
        "the model does not give the same output for the same input (dropout or another "
        "random layer in train() mode?)"
    )
    drift = (
        "the states rebuilt so far have drifted from the forward pass's (undoing a step "
        "magnifies rounding by 1/gamma, 1/p^2 for edict, 1/coupling for reversible)"
    )
    cause, fix = model, "call model.eval() before sampling"
    if not first:
        cause += f", or {drift}"
        fix += ", use a float64 state or a gamma (p, coupling) nearer 1"
    raise RuntimeError(
        f"adjoint='reversible': step {k} (t = {ts[k]:.6g} -> {ts[k + 1]:.6g}), recomputed in "
        f"the backward pass, lands {off:.3g} (relative rms) away from the state it should "
        f"reach, where rounding allows {tolerance:.2g}: {cause}, so the gradients would be "
        f"wrong. To fix it, {fix}, or use adjoint='autograd'"
    )


def _check_rebuilt_start(rebuilt: SolverState, first: SolverState, solver: Solver) -> None:
    """Warn when the backward pass's rebuilt first state is not the forward pass's.

    The rebuilt states carry the rounding of every rewind, magnified by the inverse steps
    (``prod 1 / gamma_k`` for BDIA, ``1 / p^2`` and ``1 / lambda`` per step for EDICT and
    McCallum-Foster, times the problem's own growth); the first state has been through them
    all, so its drift is the largest. Each step's gradient is taken at a rebuilt state: the
    gradients then follow a trajectory other than the forward pass's, by up to that drift.
    """
    found = dict(state_tensors(first))
    drifts = [
        _relative_rms(tensor - found[path], found[path])
        for path, tensor in state_tensors(rebuilt)
        # Low words (BDIA's low, the chains' x_low and y_low) lie below the state's
        # precision: measured against themselves, the last bits of a rebuild would read as
        # a drift of the whole state.
        if path in found and not str(path[-1]).endswith("low")
    ]
    drift = math.nan if any(math.isnan(d) for d in drifts) else max(drifts, default=0.0)
    tolerance = _rebuild_tolerance(first.x.dtype)
    if not drift <= tolerance:
        mixing = solver.mixing_parameter
        nearer_one = f", a {mixing} nearer 1" if mixing else ""
        warn_at_caller(
            f"adjoint='reversible' with {solver.name}: the backward pass rebuilt the first "
            f"state {drift:.3g} (relative rms) away from the forward pass's, where rounding "
            f"allows {tolerance:.2g}; the gradients were taken along states that far off and "
            "may be wrong accordingly (compare with adjoint='autograd'). Undoing a step "
            "magnifies rounding by 1/gamma (1/p^2 for edict, 1/coupling for reversible): use "
            f"a float64 state (state_dtype='float64'){nearer_one} or fewer steps",
            RuntimeWarning,
            through_torch=True,
        )


@contextlib.contextmanager
def _kept_buffers(ode: ODE) -> Iterator[None]:
    """Put the buffers of ``ode.f`` (when an ``nn.Module``) back as they were on entry.

    Only buffers whose values changed are written: a copy bumps a tensor's version, and a
    graph of the user's that saved an unchanged buffer must stay valid.
    """
    module = ode.f if isinstance(ode.f, torch.nn.Module) else None
    kept = [] if module is None else [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


def _grad(
    outputs: list[Tensor], cotangents: list[Tensor], inputs: list[Tensor]
) -> list[Tensor | None]:
    if not outputs:
        return [None] * len(inputs)
    return list(torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True))


def _pulled_back(state: SolverState, cotangent: dict[Path, Tensor]) -> tuple[list, list]:
    """The tensors of ``state`` (recomputed with grad) that carry a cotangent, and those
    cotangents. A path the recomputed state lacks (a low word the step made as None, i.e.
    zero) is a constant there and passes nothing back."""
    outputs, cotangents = [], []
    for path, tensor in state_tensors(state):
        g = cotangent.get(path)
        if g is not None and tensor.requires_grad:
            outputs.append(tensor)
            cotangents.append(g)
    return outputs, cotangents


class _ReversibleSampling(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _Run, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ode, solver, ts = run.ode, run.solver, run.ts
        state = run.first
        finite = FiniteCheck()
        for _ in progress_bar(range(state.k, len(ts) - 1), run.progress, f"sampling {solver.name}"):
            with finite.guard():
                new = solver.step(ode, ts, state)
            finite(new.x, state.k, ts[state.k], ts[new.k], now=run.callback is not None)
            if run.callback is not None:
                run.callback(move_report(state, new, ts))
            if run.on_state is not None:
                run.on_state(new)
            state = new
        finite.finish()
        found = state_tensors(state)
        run.paths = [path for path, _ in found]
        # An input handed back unchanged (the start, one step on) is returned as a copy.
        outputs = tuple(t.clone() if any(t is i for i in inputs) else t for _, t in found)
        # Only the structure is kept here (detached aliases, no graph references); the
        # tensors themselves are saved with save_for_backward.
        run.template = with_state_tensors(
            state, {path: t.detach() for path, t in zip(run.paths, outputs)}
        )
        ctx.run = run
        ctx.save_for_backward(*outputs)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        run: _Run = ctx.run
        ode, solver, ts = run.ode, run.solver, run.ts
        targets = run.targets
        totals: list[Tensor | None] = [None] * len(targets)
        state = run.final(ctx.saved_tensors)
        cotangent = {p: g for p, g in zip(run.paths, grads) if g is not None}
        checked = False
        steps = range(state.k, run.k_start, -1)
        with _kept_buffers(ode):
            for k in progress_bar(steps, run.progress, f"adjoint {solver.name}"):
                with torch.no_grad():
                    before = solver.rewind(ode, ts, state)
                leaves = {p: t.detach().requires_grad_() for p, t in state_tensors(before)}
                with torch.enable_grad():
                    after = solver.step(ode, ts, with_state_tensors(before, leaves))
                    _check_reproduced(after.x, state.x, k - 1, ts, first=k == steps[0])
                    outputs, cotangents = _pulled_back(after, cotangent)
                    inputs = [*leaves.values(), *targets]
                    if not checked and outputs:
                        checked = True
                        _warn_hidden_leaves(outputs, inputs)
                    found = _grad(outputs, cotangents, inputs)
                cotangent = {p: g for p, g in zip(leaves, found) if g is not None}
                for i, g in enumerate(found[len(leaves) :]):
                    total = totals[i]
                    if g is not None:
                        totals[i] = g if total is None else total + g
                state = before
        _check_rebuilt_start(state, run.first, solver)
        # Onto the start: ``init`` is a relabelling of its tensors, differentiated as such
        # (its checks, which warned in the forward pass if at all, are not repeated).
        start = [t.detach().requires_grad_() for t in run.start_tensors]
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs, cotangents = _pulled_back(run.init(start), cotangent)
            start_grads = _grad(outputs, cotangents, start)
        return (None, *start_grads, *totals)


def reversible_sample(
    ode: ODE,
    solver: Solver,
    start: Any,
    ts: Sequence[float],
    *,
    return_pair: bool = False,
    progress: bool | None = None,
    callback: Callback | None = None,
    on_state: Callable[[SolverState], None] | None = None,
) -> Any:
    """``sample``'s loop, differentiable in memory independent of the number of steps.

    ``bdia.sample(..., adjoint="reversible")`` validates its arguments and calls this; call
    ``sample``. The forward value is bitwise what ``sample`` gives; gradients are those of
    autograd through the unrolled loop, up to the rounding of the rebuilt states.

    Args:
        ode: the problem; its network must be deterministic (``eval()`` mode).
        solver: a reversible solver that implements ``rewind`` (``bdia(...)``).
        start: x at ``ts[0]`` (validated and cast), or the pair the solver continues from
            (a ``StatePair`` for BDIA; a frozen dataclass of tensors for any solver).
        ts: the grid as Python floats.
        return_pair: return ``solver.pair`` of the final state (BDIA: the final ``StatePair``)
            instead of x at ``ts[-1]``. All of its tensors carry the graph; a cotangent on a
            low word propagates nothing (see the module docstring).
        progress: tqdm bars for the forward and the backward pass; None shows them only on a
            terminal.
        callback: called after every forward step, as in ``sample`` (tensors without graph).
        on_state: called with every new state of the forward pass (``sample`` passes its
            watch of the parasitic component).

    Returns:
        x at ``ts[-1]`` (or the final pair), differentiable with respect to ``start``'s
        tensors, the tensors of ``ode.cond`` that require grad and the parameters of
        ``ode.f`` that require grad.

    Raises:
        ValueError: if the solver cannot rewind its steps.
        FloatingPointError: if a forward step produces NaN or Inf.
    """
    if type(solver).rewind is Solver.rewind:
        raise ValueError(
            f"adjoint='reversible' needs a solver that can rewind its steps; {solver.name!r} "
            "does not implement Solver.rewind. Use adjoint='autograd'"
        )
    grid = [float(t) for t in ts]
    run = _Run(ode, solver, start, grid, progress, callback, on_state)
    if run.k_start >= len(grid) - 1:
        # No step to take (a pair on a two-point grid): the start is the result.
        state = run.first
    else:
        outputs = _ReversibleSampling.apply(run, *run.start_tensors, *run.targets)
        state = run.final(outputs)
    if return_pair:
        return solver.pair(state, ode.fingerprint())
    return state.x
