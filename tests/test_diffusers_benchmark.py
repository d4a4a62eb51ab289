"""benchmarks/diffusers_parity.py, run as a subprocess: it writes the page that
docs/benchmarks/diffusers.md publishes (the same rows) and the page's claims hold.

The bounds are the page's own: DDIM computes in the float64 table's dtype, so it agrees with
diffusers to float64 rounding (1e-14 leaves room for a few ulps over 10 steps); the other
schedulers keep their sigmas in float32, so they agree to float32 rounding (1e-6); every
round trip is exact.
"""

import re

import pytest
from conftest import REPO, benchmark_module, run_child


def _rows(text: str) -> list[list[str]]:
    """The cells of every table's body rows (the header, above a "|---" line, left out)."""
    lines = text.splitlines()
    body = [
        line
        for line, below in zip(lines, [*lines[1:], ""])
        if line.startswith("|") and not line.startswith("|---") and not below.startswith("|---")
    ]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body]


@pytest.mark.slow
def test_the_script_writes_the_published_page_and_its_claims_hold(tmp_path):
    out = tmp_path / "diffusers.md"
    proc = run_child(["benchmarks/diffusers_parity.py", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    published = (REPO / "docs" / "benchmarks" / "diffusers.md").read_text()
    rows = _rows(text)
    assert [r[:3] for r in rows] == [r[:3] for r in _rows(published)]

    parity = [r for r in rows if r[0].startswith("`")]
    assert len(parity) == 10
    for solver, _, settings, difference in parity:
        bound = 1e-14 if solver == "`ddim`" else 1e-6
        assert float(difference) <= bound, f"{solver} {settings}: {difference}"

    editing = [r for r in rows if r[0] in ("float64", "float32")]
    assert [r[0] for r in editing] == ["float64", "float32"]
    for _, unet_round_trip, vae, reconstruction in editing:
        assert float(unet_round_trip) == 0.0 and vae == reconstruction

    exact = re.findall(r"(?:relative error|at most|max abs error) ([0-9.e+-]+?)\.?(?:\s|;|$)", text)
    assert len(exact) == 3 and all(float(x) == 0.0 for x in exact)


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
