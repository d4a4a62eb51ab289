"""EDM CIFAR-10 FID comparison: EDM's samplers against BDIA, as one command.

Full run (needs EDM's checkpoint, NVIDIA's Inception detector and EDM's cifar10-32x32.npz):

    python benchmarks/edm_cifar10.py --network edm-cifar10-32x32-cond-vp.pkl \
        --detector inception-2015-12-05.pt --ref cifar10-32x32.npz --outdir out/edm

Every row samples into ``outdir/<row>/`` with ``bdia.generate.generate_images`` (resumable: a
restarted run skips existing PNGs), computes FID against the reference and the table is printed
and written atomically to ``--table``. ``--smoke`` runs three tiny rows on a random network with a
stand-in detector in well under a minute and writes nothing under docs/.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bdia import generate
from bdia._files import write_atomic
from bdia.metrics import fid
from bdia.ode import DiffusionODE
from bdia.sampling import sample
from bdia.schedules import EDM, karras_grid
from bdia.solvers import bdia, get_solver

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = REPO / "docs" / "benchmarks" / "edm_cifar10.md"
NFES = (10, 20, 35, 50)
SMOKE_DIMS = 4


def _solver(base: str, gamma: float | None):
    return get_solver(base) if gamma is None else bdia(base, gamma)


def _row(name: str, base: str, gamma: float | None, steps: int) -> dict:
    return dict(name=name, base=base, gamma=gamma, steps=steps)


def full_rows() -> list[dict]:
    rows = [_row("edm-heun-18", "heun", None, 18)]
    rows += [_row(f"bdia-heun-g{g}-18", "heun", g, 18) for g in (0.5, 0.9, 0.96, 1.0)]
    for base in ("euler", "ddim"):
        for nfe in NFES:
            rows.append(_row(f"{base}-{nfe}", base, None, nfe))
            for g in (1.0, 0.96):
                rows.append(_row(f"bdia-{base}-g{g}-{nfe}", base, g, nfe))
    for base in ("dpm_solver_2", "dpm_solver_pp_2s", "dpm_solver_3", "dpm_solver_pp_3s"):
        stages = get_solver(base).stages
        for nfe in NFES:
            steps = max(nfe // stages, 1)
            rows.append(_row(f"{base}-{steps}steps", base, None, steps))
    return rows


def smoke_rows() -> list[dict]:
    return [
        _row("heun-3", "heun", None, 3),
        _row("bdia-heun-g0.96-3", "heun", 0.96, 3),
        _row("euler-4", "euler", None, 4),
    ]


def count_nfe(net: torch.nn.Module, solver, ts: torch.Tensor, device) -> int:
    """Network evaluations of one sampling run (counted by the ODE on a one-image batch)."""
    label_dim = getattr(net, "label_dim", 0)
    cond = {"class_labels": torch.eye(label_dim, device=device)[[0]]} if label_dim else {}
    ode = DiffusionODE(net, EDM(), cond=cond)
    res, ch = net.img_resolution, net.img_channels
    x = float(ts[0]) * torch.randn(1, ch, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample(ode, solver, x.to(device=device, dtype=torch.float64), ts, progress=False)
    return ode.nfe


def format_table(results: list[tuple[str, int, float]], header: str) -> str:
    lines = [header, "", "| row | NFE | FID |", "|---|---:|---:|"]
    lines += [f"| {name} | {nfe} | {value:.4f} |" for name, nfe, value in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", help="EDM checkpoint (.pkl/.pt) or random:NAME")
    p.add_argument("--detector", help="inception-2015-12-05.pt")
    p.add_argument("--ref", help="reference statistics, e.g. cifar10-32x32.npz")
    p.add_argument(
        "--outdir", help="images go to OUTDIR/<row>/ (--smoke: a temporary folder by default)"
    )
    p.add_argument("--seeds", default="0-49999")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--state-dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--table", default=None, help=f"markdown output (default {DEFAULT_TABLE})")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run; writes nothing to docs/")
    p.add_argument(
        "--write-standin-detector",
        metavar="PATH",
        default=None,
        help="save a TorchScript stand-in with the Inception call contract and exit",
    )
    args = p.parse_args(argv)
    if args.write_standin_detector:
        torch.jit.save(torch.jit.script(fid.StandInDetector()), args.write_standin_detector)
        print(f"wrote {args.write_standin_detector}")
        return 0
    if not args.outdir and not args.smoke:
        p.error("--outdir is required (images go to OUTDIR/<row>/)")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    state_dtype = getattr(torch, args.state_dtype)
    tmpdir = None
    if args.smoke:
        device = args.device or "cpu"
        net = generate.random_network("tiny-cond").to(device)
        seeds = generate.parse_seeds("0-7")
        batch = 8
        rows = smoke_rows()
        tmpdir = tempfile.TemporaryDirectory()
        # Without --outdir the smoke images live and die with the temporary folder.
        outdir = Path(args.outdir) if args.outdir else Path(tmpdir.name) / "images"
        det_path = Path(tmpdir.name) / "standin-detector.pt"
        torch.jit.save(torch.jit.script(fid.StandInDetector()), str(det_path))
        detector = fid.load_detector(det_path, device)
        ref = None  # from the first row's images
        table_path = Path(args.table) if args.table else None
    else:
        missing = [n for n in ("network", "detector", "ref") if getattr(args, n) is None]
        if missing:
            p.error("missing " + ", ".join("--" + n for n in missing) + " (or use --smoke)")
        if args.network.startswith("random:"):
            net = generate.random_network(args.network.split(":", 1)[1])
        else:
            from bdia.models.checkpoints import load_network

            net = load_network(args.network)
        net = net.to(device).eval().requires_grad_(False)
        seeds = generate.parse_seeds(args.seeds)
        batch = args.batch
        rows = full_rows()
        outdir = Path(args.outdir)
        detector = fid.load_detector(args.detector, device)
        ref = fid.load_reference(args.ref)
        table_path = Path(args.table) if args.table else DEFAULT_TABLE

    results: list[tuple[str, int, float]] = []
    try:
        for row in rows:
            t0 = time.perf_counter()
            solver = _solver(row["base"], row["gamma"])
            ts = karras_grid(row["steps"])
            rowdir = outdir / row["name"]
            generate.generate_images(
                net,
                solver,
                ts,
                seeds,
                rowdir,
                batch=batch,
                state_dtype=state_dtype,
                device=device,
            )
            nfe = count_nfe(net, solver, ts, device)
            stats = fid.image_statistics(detector, rowdir, batch=batch, device=device)
            mu, sigma = stats.mu, stats.sigma
            if args.smoke:
                # 8 images cannot fill a 2048-dim covariance, and a 2048x2048 matrix square
                # root costs ~30 s on 2 cores: the smoke FID uses the first SMOKE_DIMS features.
                mu, sigma = mu[:SMOKE_DIMS], sigma[:SMOKE_DIMS, :SMOKE_DIMS]
            if ref is None:
                ref = (mu, sigma)
            value = fid.frechet_distance(mu, sigma, *ref)
            if args.smoke and -1e-6 * float(sigma.trace()) <= value < 0:
                value = 0.0  # rounding of an identical set
            if not math.isfinite(value):
                raise FloatingPointError(f"FID of row {row['name']} is {value}")
            results.append((row["name"], nfe, value))
            print(
                f"{row['name']}: NFE {nfe}, FID {value:.4f} ({time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()

    header = (
        "# EDM CIFAR-10 smoke run (random network, stand-in detector)"
        if args.smoke
        else f"# EDM CIFAR-10: FID of {len(seeds)} images, network {args.network}"
    )
    text = format_table(results, header)
    print(text, end="")
    if table_path is not None:
        write_atomic(table_path, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
