"""The tensor operations a sampling run makes outside the network, against EDM's Heun loop.

On a GPU each such operation launches at least one kernel, an elementwise one passes over the
whole state, and a read of a device value (``_local_scalar_dense``) makes the host wait for
the device. This script counts them with a dispatch mode on the CPU (a sampler makes the same
calls on any device; a CPU-only check of the network's is inside the network and not
counted), for runs of 35 NFE under ``EDM()`` on ``karras_grid(18)`` with the network
``random_network("tiny-cond")``: EDM's deterministic Heun loop as ``benchmarks/gpu_check.py``
writes it out, ``bdia.sample(heun)``, and bdia(heun, 0.96) sampled to a pair and inverted.
The counts depend on neither the network's size nor the batch. Views, which launch nothing,
are left out. The page also counts the library's NaN check on its own (``torch.isfinite(x)
.all()``, once a step, read a step late) and its check of the start state, so that the
difference from the written-out loop can be read off.

Run from the repository root::

    python benchmarks/sampler_ops.py              # writes docs/benchmarks/sampler_ops.md
    python benchmarks/sampler_ops.py --out /tmp/ops.md

It takes a few seconds. The markdown table is printed to stdout and written atomically.
"""

from __future__ import annotations

import argparse
import collections
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_check import edm_heun  # the benchmarks folder is the script's path
from torch.utils._python_dispatch import TorchDispatchMode

from bdia import generate
from bdia._files import write_atomic
from bdia.ode import DiffusionODE
from bdia.sampling import invert, sample
from bdia.schedules import EDM, karras_grid
from bdia.solvers import bdia, get_solver

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "sampler_ops.md"
GAMMA = 0.96
STEPS = 18  # karras_grid(18): 35 NFE for Heun, whose step to sigma = 0 is an Euler step
# Operations that make a new view of a tensor's memory and launch no kernel.
VIEWS = frozenset(
    {"alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice",
     "squeeze", "t", "transpose", "unsqueeze", "view", "_unsafe_view", "lift_fresh"}
)  # fmt: skip
HOST_READ = "_local_scalar_dense"


class OperationCount(TorchDispatchMode):
    """Counts the torch operations made while it is active, by name, except those made
    inside a ``CountedNetwork``'s call and views."""

    def __init__(self) -> None:
        super().__init__()
        self.made: collections.Counter[str] = collections.Counter()
        self.inside_network = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if self.inside_network == 0 and name not in VIEWS:
            self.made[name] += 1
        return func(*args, **(kwargs or {}))


class CountedNetwork(torch.nn.Module):
    """``net`` (a module or any callable), whose calls the active ``OperationCount``
    (``counter``) leaves out."""

    def __init__(self, net: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.counter: OperationCount | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.counter is not None:
            self.counter.inside_network += 1
        try:
            return self.net(*args, **kwargs)
        finally:
            if self.counter is not None:
                self.counter.inside_network -= 1


def count(network: CountedNetwork, run: Callable[[], Any]) -> collections.Counter[str]:
    """The operations ``run()`` makes outside ``network``, after one uncounted run (first
    calls build caches that later runs reuse)."""
    with torch.no_grad():
        run()
        counter = OperationCount()
        network.counter = counter
        try:
            with counter:
                run()
        finally:
            network.counter = None
    return counter.made


def _setup(batch: int) -> tuple[CountedNetwork, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    network = CountedNetwork(generate.random_network("tiny-cond").eval())
    x = 80.0 * torch.randn(batch, 3, 16, 16)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    return network, x, {"class_labels": labels}


def measure(batch: int = 2, steps: int = STEPS, *, reversible_runs: bool = True) -> dict[str, Any]:
    """Every count the page reports: ``rows`` (name, NFE, operations by name), the loop's
    first and ``bdia.sample(heun)``'s second, and the two checks' (``checks``).
    ``reversible_runs=False`` leaves out BDIA's sampling and inversion; ``steps`` is the
    grid's (a test takes fewer)."""
    network, x, cond = _setup(batch)
    ts = karras_grid(steps)
    sigmas = [float(t) for t in ts]  # made before counting, as the loop receives them
    ode = DiffusionODE(network, EDM(), cond=cond)
    rows: list[tuple[str, int, collections.Counter[str]]] = []

    def add(name: str, run: Callable[[], Any]) -> None:
        ode.reset_nfe()
        made = count(network, run)
        rows.append((name, ode.nfe // 2, made))  # count() ran it twice

    loop_nfe = []
    made = count(network, lambda: loop_nfe.append(edm_heun(network, x, sigmas, cond)[1]))
    rows.append(("EDM's Heun loop written out", loop_nfe[-1], made))
    add("`bdia.sample(heun)`", lambda: sample(ode, get_solver("heun"), x, ts, progress=False))
    if reversible_runs:
        solver = bdia("heun", GAMMA)
        with torch.no_grad():
            pair = sample(ode, solver, x, ts, progress=False, return_pair=True)
        add(
            f"`bdia.sample(bdia(heun, {GAMMA}), return_pair=True)`",
            lambda: sample(ode, solver, x, ts, progress=False, return_pair=True),
        )
        add(
            f"`bdia.invert(bdia(heun, {GAMMA}))`",
            lambda: invert(ode, solver, pair, ts, progress=False),
        )

    checks = {}
    for name, fn in [
        ("the NaN check of a step, `torch.isfinite(x).all()`", lambda: torch.isfinite(x).all()),
        ("the start state's count, `int((~torch.isfinite(x)).sum())`",
         lambda: int((~torch.isfinite(x)).sum())),
    ]:  # fmt: skip
        counter = OperationCount()
        with counter:
            fn()
        checks[name] = counter.made
    return {"rows": rows, "checks": checks, "batch": batch, "steps": steps}


def beyond_checks(result: dict[str, Any]) -> dict[str, int]:
    """What ``bdia.sample(heun)`` makes beyond its checks (each step's, read a step late, and
    the start state's), less what the loop makes, by operation name (negative: fewer)."""
    (_, _, loop), (_, _, library) = result["rows"][:2]
    step_check, start_check = result["checks"].values()
    steps = result["steps"]
    checks_made: collections.Counter[str] = collections.Counter({HOST_READ: steps})
    for _ in range(steps):
        checks_made.update(step_check)
    checks_made.update(start_check)
    return {name: library[name] - checks_made[name] - loop[name] for name in library | loop}


def _breakdown(made: collections.Counter[str]) -> str:
    return ", ".join(
        f"{name} {n}" for name, n in sorted(made.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def _signed(diff: dict[str, int]) -> str:
    parts = [f"{name} {n:+d}" for name, n in sorted(diff.items()) if n]
    return ", ".join(parts) if parts else "none"


def report(result: dict[str, Any], command: str) -> str:
    rows, checks = result["rows"], result["checks"]
    step_check, start_check = checks.values()
    steps = result["steps"]
    lines = [
        "# Tensor operations outside the network",
        "",
        "Each sampler's operations outside the network's calls in one run under `EDM()` on "
        f"`karras_grid({steps})`, counted with a dispatch mode on the CPU (views left out; "
        f"`{HOST_READ}` is a read of a tensor's value by the host, which on a GPU waits for "
        "the device). On a GPU each operation launches at least one kernel, and an elementwise "
        'one passes over the whole state. The network is `random_network("tiny-cond")` at '
        f"batch {result['batch']}; the counts depend on neither.",
        "",
        f"- Software: torch {torch.__version__}, Python {platform.python_version()}",
        "",
        "| run | NFE | operations | per NFE | host reads | by name |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, nfe, made in rows:
        total = sum(made.values())
        lines.append(
            f"| {name} | {nfe} | {total} | {total / nfe:.2f} | {made[HOST_READ]} | "
            f"{_breakdown(made)} |"
        )
    lines += ["", "The library's checks, counted alone on a state:", ""]
    for name, made in checks.items():
        lines.append(f"- {name}: {sum(made.values())} ({_breakdown(made)})")
    (_, _, loop), (_, _, library) = rows[0], rows[1]
    lines += [
        "",
        f"`bdia.sample(heun)` makes {sum(library.values()) - sum(loop.values())} operations "
        f"more than the loop: {steps} NaN checks of {sum(step_check.values())} operations and "
        f"the read of each, a step late; the start state's count "
        f"({sum(start_check.values())}); and, in the steps' own arithmetic, "
        f"{_signed(beyond_checks(result))} (negative: fewer than the loop).",
        "",
        "A run that makes or continues a pair (`return_pair=True`, `invert`) also takes the "
        "ODE's fingerprint: one `cat` of the first and last entries of all the network's "
        "parameters and buffers (counted above), and its copy to the host, which is no "
        "operation on the CPU and not counted here, but on a GPU one copy that the host "
        "waits for ([fingerprint.md](fingerprint.md) times a fingerprint).",
        "",
        f"Written by `{command}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    given = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    text = report(measure(), f"python benchmarks/sampler_ops.py {given}".strip())
    print(text, end="")
    write_atomic(args.out, text)


if __name__ == "__main__":
    main()
