"""FID's feature extraction on the card: images/s of reading, decoding and the detector.

    python benchmarks/fid_speed.py                  # CUDA, about a minute
    python benchmarks/fid_speed.py --detector inception-2015-12-05.pt   # NVIDIA's own file
    python benchmarks/fid_speed.py --smoke          # CPU, seconds; writes only to --out

On CUDA it writes docs/benchmarks/fid_speed.md (or ``--out``) after every row, so that a run
stopped by a time limit still leaves what it measured. In a temporary folder it writes PNG
files of uniform noise (the costliest PNGs to decode, since noise does not compress) and an
.npz of the same images, then measures:

* the detector alone, on uint8 batches already on the device: the most that feature
  extraction can reach;
* ``bdia.metrics.fid.image_statistics``, which ``bdia fid`` and ``bdia fid-ref`` call, on the
  PNG folder for several ``--batch`` and ``--workers``, on the .npz, and on larger PNGs: the
  rate of reading, decoding and the detector; the seconds of the whole call, the upfront check
  of every file included; whether the statistics equal, bit for bit, those of the same batch
  with 0 workers;
* ``bdia fid-ref`` as a user runs it, in a child process: the rate it prints, its wall time.

Without ``--detector`` the detector is an Inception-v3 of random weights: torchvision's
``inception_v3``, traced, behind a scripted module with NVIDIA's call contract (uint8 NCHW in,
resized to 299x299 in float32, 2048 features out), saved as TorchScript and loaded with
``load_detector`` as the real file is. Its convolutions are those of the TF Inception graph
that NVIDIA's file holds, so its rate stands for the real detector's; the FID values it gives
mean nothing. With ``--smoke``, or where torchvision cannot be imported, ``StandInDetector``
stands in, and the rates then measure reading and decoding almost alone (the report says so).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bdia._files import write_atomic
from bdia.metrics import fid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "fid_speed.md"
INCEPTION_SIZE = 299  # NVIDIA's detector resizes every image to 299x299 before Inception-v3
LOGITS = 1008  # what the detector returns without return_features


class Deadline(BaseException):
    """Raised by the alarm past the budget; a BaseException, so that no ``except Exception``
    (a row's own, or one inside torch) swallows it."""


@dataclass(frozen=True)
class Plan:
    """The images and settings of one run."""

    small: int  # CIFAR-size images (32x32)
    large: int  # images of large_size
    large_size: int
    batches: tuple[int, ...]  # the first is the CLI's default
    workers: tuple[int, ...]  # 0 first: the rows after it are compared with it


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity; all of them off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_for(device: torch.device, smoke: bool) -> Plan:
    """10,000 CIFAR-size images and 2,000 of 256x256 on a GPU, with 0 workers, the default
    (``default_workers``) and twice it (at most the cores less one); a few tiny ones on the
    CPU. The large images are read at the first batch only, the CLI's default."""
    if smoke:
        return Plan(small=48, large=8, large_size=64, batches=(16,), workers=(0, 1))
    default = fid.default_workers(device)
    more = max(min(2 * default, usable_cores() - 1), default)
    workers = tuple(dict.fromkeys((0, default, more)))
    return Plan(small=10_000, large=2_000, large_size=256, batches=(64, 256), workers=workers)


# ------------------------------------------------------------------------------ images
def _write_pngs(folder: str, start: int, count: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(folder) / f"{i:06d}.png")


def write_images(folder: Path, count: int, size: int, processes: int) -> None:
    """``count`` RGB PNGs of uniform noise, ``size`` pixels square, written by ``processes``."""
    folder.mkdir(parents=True)
    chunk = -(-count // processes)
    starts = range(0, count, chunk)
    if processes == 1:
        _write_pngs(str(folder), 0, count, size)
        return
    with ProcessPoolExecutor(processes) as pool:
        jobs = [
            pool.submit(_write_pngs, str(folder), s, min(chunk, count - s), size) for s in starts
        ]
        for job in jobs:
            job.result()


def folder_as_npz(folder: Path, path: Path) -> None:
    """The folder's images as one uint8 (N, H, W, C) array in an .npz, as EDM's samples are."""
    from PIL import Image

    images = []
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            images.append(np.asarray(im))
    np.savez(path, images=np.stack(images))


# ------------------------------------------------------------------------------ detector
class ContractDetector(torch.nn.Module):
    """NVIDIA's call contract around a network of features: ``det(images, return_features)``
    takes uint8 ``(N, 3, H, W)``, resizes to 299x299 (bilinear, float32), maps [0, 255] to
    [-1, 1] and returns the features ``(N, F)`` float32, or their first 1008 columns (where
    the real detector gives logits) without ``return_features``."""

    def __init__(self, features: torch.nn.Module) -> None:
        super().__init__()
        self.features = features
        # Attributes, since a scripted module reads no module-level numbers.
        self.size, self.logits = INCEPTION_SIZE, LOGITS

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 images")
        x = torch.nn.functional.interpolate(
            x.to(torch.float32),
            size=(self.size, self.size),
            mode="bilinear",
            align_corners=False,
        )
        feats = self.features((x - 128.0) / 128.0)
        return feats if return_features else feats[:, : self.logits]


def contract_detector(features: torch.nn.Module, device: torch.device) -> torch.jit.ScriptModule:
    """``ContractDetector`` around ``features`` traced on ``device``, scripted as a whole.

    Traced, because torchvision's Inception returns a named tuple when scripted; the wrapper
    is scripted so that ``return_features`` stays an argument, as in NVIDIA's file.
    """
    features = features.eval().to(device)
    example = torch.zeros(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device)
    with torch.no_grad():
        traced = torch.jit.trace(features, example, check_trace=False)
    return torch.jit.script(ContractDetector(traced))


def random_inception() -> torch.nn.Module:
    """torchvision's Inception-v3 with random weights and no classifier: 2048 features."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    return net.eval()


def count_gflop(detector: torch.nn.Module, device: torch.device) -> float | None:
    """GFLOP per image of the detector on one 32x32 image (it resizes every input to 299x299),
    counted by FlopCounterMode (it sees the ops of a TorchScript file too); None where the
    count fails."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            detector(x, return_features=True)
    except Exception:
        return None
    flops = counter.get_total_flops()
    return flops / 1e9 if flops else None


def build_detector(
    args: argparse.Namespace, device: torch.device, folder: Path, smoke: bool
) -> tuple[torch.nn.Module, Path, str, float | None]:
    """The detector loaded by ``load_detector`` (as ``bdia fid`` loads it), its file, what it
    is, and its GFLOP per image."""
    if args.detector:
        path = Path(args.detector)
        detector = fid.load_detector(path, device)
        return detector, path, f"{path.name} (given)", count_gflop(detector, device)
    path = folder / "detector.pt"
    why = "--smoke"
    if not smoke:
        try:
            eager = random_inception()
            gflop = count_gflop(ContractDetector(eager).to(device), device)
            torch.jit.save(contract_detector(eager, device), str(path))
        except ImportError as exc:
            why = f"torchvision cannot be imported ({exc})"
        except Exception as exc:  # a torchvision built for another torch, a failed trace
            why = f"the random Inception-v3 could not be built ({type(exc).__name__}: {exc})"
        else:
            what = (
                "Inception-v3 of random weights (torchvision's inception_v3, traced) behind "
                "NVIDIA's call contract, saved as TorchScript"
            )
            return fid.load_detector(path, device), path, what, gflop
    torch.jit.save(torch.jit.script(fid.StandInDetector()), str(path))
    what = (
        f"StandInDetector ({why}): a pooling and one matrix product, so the rates measure "
        "reading and decoding almost alone"
    )
    return fid.load_detector(path, device), path, what, count_gflop(fid.StandInDetector(), device)


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    source: str
    size: int
    images: int
    batch: int | str | None = None  # None: does not apply
    workers: int | str | None = None
    rate: float | None = None  # images/s of reading, decoding and the detector
    call_s: float | None = None  # the whole call (the upfront check of the files included)
    same: bool | None = None  # statistics equal, bit for bit, to the first row's (see render)
    note: str = ""


def sync(device: torch.device) -> None:
    """Wait for the card's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def detector_alone(
    detector: torch.nn.Module, device: torch.device, batch: int, images: int, size: int
) -> Row:
    """The detector on one uint8 batch already on the device, called until ``images`` images
    have gone through (two calls first, unclocked)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)
    calls = max(-(-images // batch), 1)
    with torch.no_grad():
        for _ in range(2):
            detector(x, return_features=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            detector(x, return_features=True)
        sync(device)
        seconds = time.perf_counter() - start
    return Row("detector alone", size, calls * batch, batch, rate=calls * batch / seconds)


def statistics_row(
    detector: torch.nn.Module,
    source: Path,
    label: str,
    size: int,
    batch: int,
    workers: int,
    device: torch.device,
) -> tuple[Row, fid.FeatureStatistics]:
    """One call of ``image_statistics`` on ``source`` (a folder of ``size``-pixel uint8 images
    or an .npz of them): its row (the features' rate as the library measures it, the whole
    call's seconds) and the float64 statistics, for comparison with other rows."""
    start = time.perf_counter()
    stats = fid.image_statistics(detector, source, batch=batch, device=device, workers=workers)
    call_s = time.perf_counter() - start
    row = Row(label, size, stats.n, batch, workers, stats.images_per_second, call_s)
    return row, stats


def same_statistics(a: fid.FeatureStatistics, b: fid.FeatureStatistics) -> bool:
    """Whether the image counts, the float64 sums (dim,) and the sums of outer products
    (dim, dim) are equal, bit for bit."""
    sums_equal = np.array_equal(a.sum, b.sum) and np.array_equal(a.sum_outer, b.sum_outer)
    return bool(a.n == b.n and sums_equal)


CLI_SOURCE = "`bdia fid-ref`"
CLI_BATCH = 64  # the --batch default of bdia fid and fid-ref
RATE_LINE = re.compile(r"features at ([\d,]+(?:\.\d+)?) images/s")


def cli_row(
    detector_path: Path, folder: Path, size: int, out: Path, device: torch.device, smoke: bool
) -> Row:
    """``bdia fid-ref`` in a child process with its defaults (batch, workers), as a user runs
    it: the rate it prints and the wall time of the whole process, start-up included."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if smoke:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["fid-ref", "--images", str(folder), "--detector", str(detector_path)]
    args += ["--out", str(out), "--device", str(device), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bdia.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    wall = time.perf_counter() - start
    match = RATE_LINE.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        tail = " ".join(proc.stderr.split())[-200:]
        raise RuntimeError(f"bdia fid-ref exited with {proc.returncode}: {tail}")
    rate = float(match.group(1).replace(",", ""))
    images = len(fid.list_images(folder))
    batch, workers = f"{CLI_BATCH} (default)", f"{fid.default_workers(device)} (default)"
    return Row(CLI_SOURCE, size, images, batch, workers, rate=rate, call_s=wall)


# ------------------------------------------------------------------------------ report
def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def render(facts: dict[str, str], rows: Sequence[Row], gflop: float | None) -> str:
    lines = [
        "# FID feature extraction speed",
        "",
        f"Written by `{facts['command']}`; do not edit by hand.",
        "",
        "| fact | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in facts.items() if k != "command"]
    lines += [
        "",
        "features images/s: images over the seconds of reading, decoding and the detector "
        "(the rate `bdia fid` prints); whole call s: the call or process from start to end, "
        "the upfront check of every file included; detector TFLOP/s: at the features' rate; "
        "same statistics: the float64 sums equal, bit for bit, to those of the first row of "
        "the same image size and batch (the PNG folder with 0 workers): the same whatever the "
        "workers, and the same from the .npz as from the PNGs.",
        "",
        "| source | image size | images | batch | workers | features images/s | "
        "detector TFLOP/s | whole call s | same statistics | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        tflops = r.rate * gflop / 1e3 if r.rate is not None and gflop else None
        same = "-" if r.same is None else ("yes" if r.same else "no")
        cells = [
            r.source,
            f"{r.size}x{r.size}",
            f"{r.images:,}",
            "-" if r.batch is None else str(r.batch),
            "-" if r.workers is None else str(r.workers),
            _f(r.rate, ",.0f"),
            _f(tflops, ".3g"),
            _f(r.call_s, ".2f"),
            same,
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failure(exc: BaseException) -> str:
    text = " ".join(f"failed: {exc!r}".split()).replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------ main
def positive_seconds(text: str) -> float:
    value = float(text)
    # 0 would not be a budget at all: setitimer(0) disarms the alarm.
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, a few tiny images")
    p.add_argument("--detector", default=None, help="a detector file (default: see above)")
    p.add_argument("--out", default=None, help=f"the report (on CUDA by default {DEFAULT_OUT})")
    p.add_argument(
        "--budget",
        type=positive_seconds,
        default=180.0,
        help="seconds; past them the run stops, reporting",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    out = Path(args.out) if args.out else (None if smoke else DEFAULT_OUT)
    plan = plan_for(device, smoke)
    facts = {
        "device": "CPU (smoke)" if smoke else torch.cuda.get_device_name(device),
        "CPU cores": f"{usable_cores()} usable by this process",
        "torch": torch.__version__,
        "detector": "-",
        "images": f"{plan.small:,} PNG files of 32x32 uniform noise, an .npz of the same, "
        f"{plan.large:,} PNG files of {plan.large_size}x{plan.large_size}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(
            ["python", "benchmarks/fid_speed.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    rows: list[Row] = []
    gflop: float | None = None
    started = time.monotonic()

    def report(final: bool = False) -> str:
        # A page rewritten after each row must say so until the last: an outer time limit
        # may end the run between two rows, and such a page would look finished.
        facts["elapsed"] = f"{time.monotonic() - started:.0f} s" + (
            "" if final else " (in progress: the page is rewritten after every row)"
        )
        text = render(facts, rows, gflop)
        if out is not None:
            write_atomic(out, text)
        return text

    def add(row: Row) -> None:
        rows.append(row)
        rate = "-" if row.rate is None else f"{row.rate:,.0f} images/s"
        print(
            f"{row.source}, batch {row.batch}, workers {row.workers}: {rate} {row.note}",
            file=sys.stderr,
        )
        report()

    def measure() -> None:
        nonlocal gflop
        with tempfile.TemporaryDirectory(prefix="fid_speed.") as tmp:
            work = Path(tmp)
            small, large, npz = work / "small", work / "large", work / "small.npz"
            processes = 1 if smoke else max(usable_cores() - 1, 1)
            write_images(small, plan.small, 32, processes)
            write_images(large, plan.large, plan.large_size, processes)
            folder_as_npz(small, npz)
            detector, detector_path, what, gflop = build_detector(args, device, work, smoke)
            facts["detector"] = what + (f"; {gflop:.3g} GFLOP per image, counted" if gflop else "")
            # The first calls pay for CUDA's and cuDNN's start; none of the rows should.
            for batch in plan.batches:
                fid.image_statistics(detector, npz, batch=batch, device=device)

            for batch in plan.batches:
                try:
                    add(detector_alone(detector, device, batch, plan.small, 32))
                except Exception as exc:  # one failed row must not lose the others
                    add(Row("detector alone", 32, plan.small, batch, note=failure(exc)))
            first: dict[tuple[int, int], fid.FeatureStatistics] = {}  # by (size, batch)
            for label, source, size, batches, workers_list in (
                ("PNG folder", small, 32, plan.batches, plan.workers),
                (".npz", npz, 32, plan.batches, (0,)),  # decoded already: never any workers
                ("PNG folder", large, plan.large_size, plan.batches[:1], plan.workers),
            ):
                for batch in batches:
                    for workers in workers_list:
                        try:
                            row, stats = statistics_row(
                                detector, source, label, size, batch, workers, device
                            )
                        except Exception as exc:
                            add(Row(label, size, 0, batch, workers, note=failure(exc)))
                            continue
                        if (size, batch) in first:
                            row.same = same_statistics(stats, first[size, batch])
                        else:
                            first[size, batch] = stats
                        add(row)
            try:
                add(cli_row(detector_path, small, 32, work / "ref.npz", device, smoke))
            except Exception as exc:
                add(Row(CLI_SOURCE, 32, plan.small, note=failure(exc)))

    def on_alarm(signum: int, frame: object) -> None:
        raise Deadline

    # Past the budget the row in progress is interrupted and the page still written, so a
    # hung DataLoader worker cannot hold the card until an outer limit kills everything.
    alarm = hasattr(signal, "setitimer")
    if alarm:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, args.budget)
    try:
        measure()
    except Deadline:
        facts["stopped"] = f"at the budget ({args.budget:.0f} s); later rows were not run"
    except Exception as exc:  # outside any row (writing the images, the detector): still report
        facts["stopped"] = failure(exc)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    text = report(final=True)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
