"""benchmarks/diffusers_parity.py, run as a subprocess: it writes the page that
docs/benchmarks/diffusers.md publishes (the same rows) and the page's claims hold.

The bounds are the page's own: DDIM computes in the float64 table's dtype, so it agrees with
diffusers to float64 rounding (1e-14 leaves room for a few ulps over 10 steps); the other
UNet schedulers (the EDM-preconditioned ones too) keep their sigmas in float32, so they agree
to float32 rounding (1e-6). In
flow matching, float32 parity is bit for bit (both sides make the same float operations);
with a float64 state diffusers' step casts to float32, so 1e-6 again (a few float32
roundings, 6e-8 each, of states of size ~3). Every round trip is exact.
"""

import re

import pytest
import torch
from conftest import REPO, benchmark_module, run_child


def _tables(text: str) -> list[list[list[str]]]:
    """The cells of each table's body rows (the header, above a "|---" line, left out)."""
    tables: list[list[list[str]]] = []
    lines = text.splitlines()
    for line, below in zip(lines, [*lines[1:], ""]):
        if below.startswith("|---"):
            tables.append([])
        elif line.startswith("|") and not line.startswith("|---"):
            tables[-1].append([c.strip() for c in line.strip("|").split("|")])
    return tables


@pytest.mark.slow
def test_the_script_writes_the_published_page_and_its_claims_hold(tmp_path):
    out = tmp_path / "diffusers.md"
    proc = run_child(["benchmarks/diffusers_parity.py", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    published = (REPO / "docs" / "benchmarks" / "diffusers.md").read_text()
    tables = _tables(text)
    assert [[r[:3] for r in t] for t in tables] == [[r[:3] for r in t] for t in _tables(published)]
    parity, editing, flow, inversion, scheduler, sd3_editing = tables

    assert len(parity) == 12
    for solver, _, settings, difference in parity:
        bound = 1e-14 if solver == "`ddim`" else 1e-6
        assert float(difference) <= bound, f"{solver} {settings}: {difference}"

    for table in (editing, sd3_editing):
        assert [r[0] for r in table] == ["float64", "float32"]
        for _, round_trip, vae, reconstruction in table:
            assert float(round_trip) == 0.0 and vae == reconstruction

    assert len(flow) == len(inversion) == len(scheduler) == 6
    for model, settings, guidance, float32, float64 in flow:
        assert float(float32) == 0.0, f"{model} {settings} {guidance}: {float32}"
        assert 0.0 < float(float64) <= 1e-6, f"{model} {settings} {guidance}: {float64}"
    assert all(float(r[3]) == 0.0 for r in inversion)
    assert all(float(r[3]) == float(r[4]) == 0.0 for r in scheduler)

    exact = re.findall(r"(?:relative error|at most|max abs error) ([0-9.e+-]+?)\.?(?:\s|;|$)", text)
    assert len(exact) == 3 and all(float(x) == 0.0 for x in exact)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("case", range(6))
def test_the_flow_reference_is_the_pipelines_own_loop(tmp_path, case):
    """The hand-run FlowMatchEulerDiscreteScheduler loop the page compares bdia with ends
    where the pipeline itself (its own scheduler, prompts through its encoders) ends, bit for
    bit: the page's float32 zeros are parity with the pipeline, not with a loop of its own."""
    pytest.importorskip("diffusers")
    parity = benchmark_module("diffusers_parity")
    case = parity.FLOW_CASES[case]
    pipe = case.pipeline(tmp_path)
    noise = case.noise(torch.float32)
    velocity = case.velocity(pipe.transformer, case.cond(torch.float32, pipe))
    states = parity.flow_match_states(velocity, pipe.scheduler, noise, case.timesteps())
    assert torch.equal(states[-1], case.run_pipeline(pipe, noise))


def test_the_pipeline_comparison_sees_states_the_clamp_to_images_would_hide(monkeypatch):
    # The tiny random unet's samples lie far outside [-1, 1] (98% of them): a difference
    # there vanishes once both are clamped to [0, 1] images.
    pytest.importorskip("diffusers")
    import bdia

    parity = benchmark_module("diffusers_parity")
    sample = bdia.sample

    def off_by_half_outside_the_image_range(*args, **kwargs):
        x = sample(*args, **kwargs)
        return x + 0.5 * x.sign() * (x.abs() > 1)

    assert parity.scheduler_round_trip()[0] == 0.0
    monkeypatch.setattr(bdia, "sample", off_by_half_outside_the_image_range)
    assert parity.scheduler_round_trip()[0] == pytest.approx(0.5, rel=1e-4)


# ------------------------------------------------------------------- scheduler_speed


@pytest.mark.slow
def test_scheduler_speed_smoke_times_the_three_loops(tmp_path):
    page = REPO / "docs" / "benchmarks" / "scheduler_speed.md"
    before = page.read_bytes() if page.exists() else None
    out = tmp_path / "speed.md"
    proc = run_child(["benchmarks/scheduler_speed.py", "--smoke", "--out", str(out)], 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (page.read_bytes() if page.exists() else None) == before
    assert out.read_text() == proc.stdout
    tables = _tables(proc.stdout)
    assert "## Batch 4 (8 through the unet)" in proc.stdout
    assert "## Batch 16 (32 through the unet)" in proc.stdout
    assert len(tables) == 2  # the default batch sizes, 4 and 16
    for rows in tables:
        assert [r[0] for r in rows] == [
            "DDIMScheduler",
            "BDIAScheduler (gamma 0.96)",
            "unet alone (no step)",
        ]
        assert rows[0][5] == "1.000"
        for _, runs, median, per_step, host, ratio in rows:
            assert runs == "2" and float(median) > 0 and float(ratio) > 0
            # The host's part of a run is part of it (on the CPU, nothing is queued: all).
            assert 0 < float(host) <= float(per_step)


def test_scheduler_speed_smoke_needs_its_own_out(capsys):
    speed = benchmark_module("scheduler_speed")
    with pytest.raises(SystemExit) as exit_:
        speed.main(["--smoke"])
    assert exit_.value.code == 2
    assert "--smoke needs --out: the default is docs/benchmarks/scheduler_speed.md" in (
        capsys.readouterr().err
    )


def test_scheduler_speed_loops_step_as_the_pipeline_and_the_unet_alone_does_not():
    """The BDIA loop is the scheduler's own run (its final pair ends at the latents it
    returns), and the loop with no step leaves the noise as it was."""
    speed = benchmark_module("scheduler_speed")
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from bdia.integrations.diffusers import BDIAScheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**speed.TINY_UNET).eval()
    noise = torch.randn(2, 4, 8, 8)
    text = torch.randn(4, speed.TEXT_TOKENS, 8)
    ddim = DDIMScheduler(**speed.SD15_SCHEDULE)
    bdia_scheduler = BDIAScheduler.from_config(ddim.config, gamma=0.96)
    with torch.no_grad():
        assert torch.equal(speed.denoise(None, unet, ddim, noise, text, 4), noise)
        x = speed.denoise(bdia_scheduler, unet, ddim, noise, text, 4)
    assert bdia_scheduler.restarts == []
    assert torch.equal(bdia_scheduler.final_pair.later.to(x.dtype), x)
