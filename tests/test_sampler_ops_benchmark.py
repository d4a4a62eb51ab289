"""benchmarks/sampler_ops.py: the counts it reports hold what the library promises of its loop,
and a run writes the page it prints."""

import pytest
from conftest import benchmark_module, run_child


def test_heun_makes_no_operation_beyond_the_loops_but_its_checks():
    """`bdia.sample(heun)` under EDM() against EDM's loop written out, outside the network:
    beyond each step's NaN check (read a step late) and the start state's, nothing the loop
    does not make. A division of the state by alpha = 1, or any other pass the loop does
    without, shows here as a positive count."""
    ops = benchmark_module("sampler_ops")
    result = ops.measure(steps=3, reversible_runs=False)  # the page's 18 steps in the slow pass
    (_, loop_nfe, loop), (_, nfe, library) = result["rows"]
    assert loop_nfe == nfe == 5
    extra = ops.beyond_checks(result)
    assert all(n <= 0 for n in extra.values()), extra
    assert loop[ops.HOST_READ] == 0
    assert library[ops.HOST_READ] == 3 + 1  # each step's flag and the start's count


@pytest.mark.slow  # another process, and BDIA's runs
def test_a_run_writes_the_page_it_prints(tmp_path):
    out = tmp_path / "ops.md"
    proc = run_child(["benchmarks/sampler_ops.py", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.strip() == proc.stdout.strip()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split("|")[2].strip() for r in rows] == ["35", "35", "52", "50"]  # NFE
    assert f"Written by `python benchmarks/sampler_ops.py --out {out}`." in text
