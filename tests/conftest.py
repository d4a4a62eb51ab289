"""Suite-wide settings.

The default run leaves out tests marked ``slow`` (see ``pyproject.toml``); ``.ci/run`` runs
them in a second pass with ``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark slow every case but the first of a test marked ``first_case_by_default``.

    Such a test's cases (the pipeline families, dtypes or options of one check) each take
    0.05 s or more on one idle core: the default run makes the check once, the slow pass for
    the other cases (``.ci/run`` runs both). ``tryfirst`` so that the marks are there when
    ``-m`` selects.
    """
    seen: set[tuple[str, str]] = set()
    for item in items:
        if item.get_closest_marker("first_case_by_default") is None:
            continue
        test = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        if test in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(test)


#: The most workers ``-n auto`` starts (see ``pytest_xdist_auto_num_workers``).
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """How many worker processes ``-n auto`` (pyproject's ``addopts``) starts: one per core
    this process may run on, at most ``MAX_WORKERS``, and none on a single core, where the
    tests run in this process. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` set: pytest-xdist's own
    rule, which takes that number.

    Each test runs on one torch thread, so a worker per core is what keeps every core at
    work. The cap keeps memory in bounds on a machine of many cores: each worker imports
    torch, diffusers and transformers and builds its own tiny pipelines (the largest Python
    process of the default run peaked at 1.5 GiB).
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(usable or 1, MAX_WORKERS)
    return workers if workers > 1 else 0


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Run the suite's small tensors on one intra-op thread, then restore the setting.

    With states of a few hundred numbers every op is dominated by thread start-up and
    hand-off: on a loaded 2-core machine two threads made such runs about ten times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def float64_text_encoders(pipe: Any) -> Any:
    """``pipe`` with its CLIP text encoders run under torch's default dtype float64, for a test
    that runs a whole diffusers pipeline in float64; returns ``pipe``.

    The project's oldest supported transformers (4.40) makes CLIP's causal mask as
    ``torch.full(shape, finfo(dtype).min)`` in the default dtype, and float64's minimum
    overflows float32 ("value cannot be converted to type float without overflow"), so there
    a float64 pipeline cannot encode its prompt. Under float64 the mask is made in float64, as
    newer transformers make it; only the encoders' calls see the changed default.
    """
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue

        def forward(*args: Any, _forward: Any = encoder.forward, **kwargs: Any) -> Any:
            before = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                return _forward(*args, **kwargs)
            finally:
                torch.set_default_dtype(before)

        encoder.forward = forward
    return pipe


def float64_pipeline(pipe: Any) -> Any:
    """``pipe`` in float64 as a whole: its networks, its CLIP text encoders' calls (see
    ``float64_text_encoders``) and its DDIM-type scheduler's noise tables (diffusers keeps
    them in float32, and its step reads them as they are); returns ``pipe``."""
    pipe = pipe.to(torch.float64)
    float64_text_encoders(pipe)
    scheduler = pipe.scheduler
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    return pipe


def benchmark_module(name: str) -> Any:
    """``benchmarks/NAME.py`` imported as a module (benchmarks/ is not a package), once."""
    # Run as `python benchmarks/NAME.py`, a script finds its neighbours on sys.path
    # (gradients imports overhead); imported here it must too, whichever test runs first.
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def child_env() -> dict[str, str]:
    """The environment of a process a test starts: one thread for torch, OpenMP and BLAS.

    torch takes its intra-op thread count from OMP_NUM_THREADS when it starts, so a child
    started with this environment runs as the suite does (``torch.get_num_threads() == 1``).
    No GPU is visible to it either: the suite's results must not depend on one.
    """
    one = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {**os.environ, **one, "CUDA_VISIBLE_DEVICES": ""}


def run_child(
    args: Sequence[str], timeout: float, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` with ``child_env()``, capturing its output as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def run_torchrun(
    args: Sequence[str], timeout: float, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun ARGS`` with ``child_env()``, capturing its output as text.

    The launcher is this interpreter's ``torch.distributed.run``: a ``torchrun`` found on PATH
    may belong to another environment (one not activated, say). It runs in a session of its
    own, killed whole on timeout: killing the launcher alone would leave its workers running.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"torchrun ran past {timeout} s; killed\n{out}{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextmanager
def untouched(*tensors: torch.Tensor | None) -> Iterator[None]:
    """Assert that the tensors hold exactly the same values (and dtype) after the block.

    Exact (rtol = atol = 0), dtype and device included; NaN equals NaN so that a tensor
    holding NaN can be checked too. None (a pair's missing low word) is skipped.
    """
    kept = tuple(t for t in tensors if t is not None)
    clones = [t.clone() for t in kept]
    yield
    for t, c in zip(kept, clones, strict=True):
        torch.testing.assert_close(t, c, rtol=0.0, atol=0.0, equal_nan=True)


class Counter:
    """Counts the forward calls of a module (positional or keyword) through a pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1


def dtypes_made(fn: Any) -> tuple[Any, set[torch.dtype]]:
    """``fn()`` and the dtypes of every tensor its torch operations produced."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    made: set[torch.dtype] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.update(t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Record():
        result = fn()
    return result, made


class NoFloat64(AssertionError):
    """A float64 tensor made on a pretend device that has none (see ``FakeMPS``)."""


def _fake_mps_mode() -> Any:
    """``FakeMPS``'s class, made at its first use: torch.overrides loads on demand."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves, tree_map
    from torch.utils.weak import WeakIdKeyDictionary

    mps = torch.device("mps")

    def is_mps(value: Any) -> bool:
        return isinstance(value, (str, torch.device)) and torch.device(value).type == "mps"

    class FakeMPS(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.on_device = WeakIdKeyDictionary()
            self.placed = 0  # tensors made on the device, so that a test sees it was used

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func == torch.Tensor.device.__get__:
                return mps if args[0] in self.on_device else func(*args)
            moved = is_mps(kwargs.get("device"))
            if moved:
                kwargs["device"] = "cpu"
            if func is torch.Tensor.to and any(is_mps(a) for a in args[1:]):
                args, moved = tuple("cpu" if is_mps(a) else a for a in args), True
            given = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            there = any(t in self.on_device for t in given)
            if func is torch.Tensor.cpu:
                return args[0].view_as(args[0]) if there else args[0]
            if there and func is torch.Tensor.numpy:
                raise NoFloat64("numpy() of a tensor on mps: move it to the CPU first")
            out = func(*args, **kwargs)
            if not (moved or there):
                return out

            def placed(t: Any) -> Any:
                if not isinstance(t, torch.Tensor):
                    return t
                if t.dtype == torch.float64:
                    raise NoFloat64(f"{getattr(func, '__name__', func)} made float64 on mps")
                if moved and any(t is g for g in given):
                    t = t.view_as(t)  # the caller's tensor stays where it is
                self.on_device[t] = True
                self.placed += 1
                return t

            return tree_map(placed, out)

    return FakeMPS


@contextmanager
def fake_mps(monkeypatch: Any) -> Iterator[Any]:
    """Apple's MPS, pretended on the CPU: a tensor sent to ``mps`` (by ``.to`` or a
    ``device=`` argument) stays on the CPU but reads ``.device`` as mps, and so does what is
    computed from it until ``.cpu()``. Making a float64 tensor there, or reading one into
    numpy, raises ``NoFloat64``, where MPS, which has no float64, would fail. Float32 work
    runs as on the CPU, so its results are the CPU's, bit for bit. Yields the mode, whose
    ``placed`` counts the tensors made on the device."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with _fake_mps_mode()() as mode:
        yield mode


# The calls that hand a tensor's values to Python: on a GPU each makes the host wait until the
# device has done all the work queued before it.
_READS_BACK = (
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.equal,
)


@contextmanager
def device_reads() -> Iterator[list[str]]:
    """Inside ``fake_mps``: yields a list that fills, as the block runs, with the name of each
    call that reads a tensor on the pretend device back to Python (``bool``, ``float``,
    ``item``, ``tolist``, ``cpu``, ``numpy``, ``torch.equal``)."""
    from torch.overrides import TorchFunctionMode

    reads: list[str] = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in _READS_BACK:
                given = [a for a in args if isinstance(a, torch.Tensor)]
                if any(t.device.type == "mps" for t in given):
                    reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Reads():
        yield reads


# torchrun's worker: `bdia ARGS`, logging to LOG.RANK the name of each file it renames into
# place, and LEFT_THE_GROUP when it leaves the process group. bdia writes every output so
# (bdia._files.replace_atomic): the logs tell which rank wrote which file, how often, and
# whether every rank left the group.
LEFT_THE_GROUP = "<left-the-group>"
LOGGING_WORKER = f"""
import os, sys

import torch.distributed as dist

log = open(sys.argv.pop(1) + "." + os.environ["RANK"], "w")
rename, destroy = os.replace, dist.destroy_process_group


def logged(src, dst):
    rename(src, dst)
    print(os.path.basename(dst), file=log, flush=True)


def left(*args, **kwargs):
    destroy(*args, **kwargs)
    print("{LEFT_THE_GROUP}", file=log, flush=True)


os.replace, dist.destroy_process_group = logged, left
from bdia.cli import main

main()
"""


def torchrun_bdia(
    log: Path, *args: object, cwd: Path = REPO
) -> tuple[subprocess.CompletedProcess[str], list[list[str]], list[bool]]:
    """``bdia ARGS`` in two torchrun processes, which must succeed: (the result, the names
    of the files each rank wrote, whether each rank left the process group)."""
    launch = ["--standalone", "--nproc_per_node=2", "--no-python", sys.executable, "-c"]
    launch += [LOGGING_WORKER, str(log), *map(str, args)]
    result = run_torchrun(launch, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    logs = [Path(f"{log}.{rank}").read_text().split() for rank in (0, 1)]
    written = [[name for name in names if name != LEFT_THE_GROUP] for names in logs]
    return result, written, [LEFT_THE_GROUP in names for names in logs]


def folder_bytes(folder: Path) -> dict[str, Any]:
    """Each file under ``folder`` by its path there: its bytes; for a .safetensors file, its
    header as parsed JSON and the bytes after it (safetensors writes the metadata's keys in
    an order that changes from one writing to the next)."""
    files: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors":
            end = 8 + int.from_bytes(data[:8], "little")
            files[name] = (json.loads(data[8:end]), data[end:])
        else:
            files[name] = data
    return files


def assert_flow_run_is_bdia_sample(
    pipe: Any,
    latents: torch.Tensor,
    ode: Any,
    noise: torch.Tensor,
    ts: torch.Tensor,
    gamma: float,
    start_index: int = 0,
) -> Any:
    """A flow-matching (or EDM-preconditioned) pipeline's run with its ``BDIAScheduler``
    (``latents``, and the scheduler's ``final_pair``) is ``bdia.sample`` with ``bdia(euler,
    gamma)`` on ``ode`` over ``ts[start_index:]`` from ``noise`` (the state at
    ``ts[start_index]``: the noised image latents of an img2img run, or the pipeline's first
    latents), bit for bit, low words included; the grid ``ts`` is the scheduler's, and the
    pair records ``start_index``. Returns the scheduler's final pair."""
    import bdia

    assert pipe.scheduler.grid == ts.tolist()
    solver = bdia.bdia(bdia.get_solver("euler"), gamma)
    with torch.no_grad():
        ref = bdia.sample(ode, solver, noise, ts[start_index:], return_pair=True, progress=False)
    pair = pipe.scheduler.final_pair
    assert pair.solver == f"bdia(euler, gamma={gamma})" and pair.start_index == start_index
    assert torch.equal(latents, ref.later)
    for name in ("earlier", "later", "earlier_low", "later_low"):
        assert torch.equal(getattr(pair, name), getattr(ref, name)), name
    return pair


def assert_ddim_run_is_bdia_sample(
    pipe: Any, latents: torch.Tensor, ode: Any, noise: torch.Tensor, gamma: float, steps: int
) -> torch.Tensor:
    """A pipeline's run from ``noise`` with its ``BDIAScheduler`` over DDIM (``latents``) is
    ``bdia.sample`` with ``bdia(ddim, gamma)`` on ``ode`` and the scheduler's grid, bit for
    bit, and the scheduler's ``final_pair`` inverts under ``ode`` to ``noise`` exactly.
    Returns what a float64 state's round trip over that grid comes back to (``noise``, to
    the caller's tolerance)."""
    import bdia
    from bdia.integrations.diffusers import diffusers_grid

    solver = bdia.bdia("ddim", gamma)
    with torch.no_grad():
        ts = diffusers_grid(pipe.scheduler, steps)
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        assert torch.equal(pair.later, latents)
        back = bdia.invert(ode, solver, pipe.scheduler.final_pair, ts, progress=False)
        assert torch.equal(back.earlier, noise)
        wide = bdia.sample(ode, solver, noise.double(), ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, wide, ts, progress=False)
    assert back.earlier.dtype == torch.float64
    return back.earlier


def flow_round_trip_error(ode: Any, noise: torch.Tensor, ts: torch.Tensor) -> float:
    """``max |back - noise| / max |noise|`` of ``noise`` sampled over ``ts`` with
    ``bdia(euler, 0.96)`` and inverted from the final pair."""
    import bdia

    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts)
    return float((back.earlier - noise).abs().max() / noise.abs().max())


def record_step_samples(scheduler: Any) -> list[torch.Tensor]:
    """Wraps ``scheduler.step`` on the instance to keep a copy of each ``sample`` it gets;
    returns the list, which fills as a pipeline steps (its first entry is the state the run
    started from: the noised image latents of img2img)."""
    samples: list[torch.Tensor] = []
    step = scheduler.step

    def recording_step(model_output: Any, timestep: Any, sample: torch.Tensor, *a: Any, **k: Any):
        samples.append(sample.clone())
        return step(model_output, timestep, sample, *a, **k)

    scheduler.step = recording_step
    return samples


def flow_img2img_runs(
    pipeline_class: Any, parts: dict[str, Any], call: Any
) -> tuple[Any, list[tuple[torch.Tensor, list[torch.Tensor]]]]:
    """``pipeline_class`` (an img2img pipeline) on ``parts`` with their own scheduler, then
    with ``BDIAScheduler.from_config`` of its config and gamma 0.9; ``call(pipe)`` runs one
    and returns its latents. Returns the BDIA pipeline and ``[(latents, step samples)]`` of
    the two runs (see ``record_step_samples``)."""
    from bdia.integrations.diffusers import BDIAScheduler

    own = parts["scheduler"]
    runs = []
    for scheduler in (own, BDIAScheduler.from_config(own.config, gamma=0.9)):
        pipe = pipeline_class(**{**parts, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        samples = record_step_samples(pipe.scheduler)
        runs.append((call(pipe), samples))
    return pipe, runs


def assert_flow_img2img_is_bdia_sample(
    pipe: Any,
    runs: Sequence[tuple[torch.Tensor, list[torch.Tensor]]],
    ode: Any,
    ts: torch.Tensor,
    start_index: int,
    invert: Any,
) -> None:
    """An img2img run of a flow-matching (or EDM-preconditioned) pipeline with
    ``BDIAScheduler(gamma=0.9)`` (``pipe``'s scheduler), bit for bit. ``runs`` are ``(latents,
    record_step_samples list)`` of the pipeline with its own FlowMatchEulerDiscreteScheduler
    (EDMEulerScheduler), then with the BDIA scheduler.

    Both runs start from the same noised latents (their first step's sample) at
    ``ts[start_index]``; the BDIA run is ``bdia.sample``'s from them over
    ``ts[start_index:]`` (``assert_flow_run_is_bdia_sample``); ``bdia(euler, 0)`` there gives
    the own scheduler's latents; ``invert(pair)`` (the inverse scheduler's loop, which it
    returns) and ``bdia.invert`` on ``ts[start_index:]`` return the noised latents."""
    import bdia

    (euler_latents, euler_samples), (latents, samples) = runs
    start, k = samples[0], start_index
    assert pipe.scheduler.start_index == k and len(samples) == len(ts) - 1 - k
    assert torch.equal(start, euler_samples[0])
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, start, ts, 0.9, start_index=k)
    with torch.no_grad():
        euler = bdia.sample(ode, bdia.bdia("euler", 0.0), start, ts[k:], progress=False)
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts[k:])
    assert torch.equal(euler, euler_latents)
    inverse = invert(pair)
    assert inverse.start_index == k and len(inverse.timesteps) == len(ts) - 2 - k
    assert torch.equal(inverse.pair.earlier, start)
    assert torch.equal(back.earlier, start)
