"""benchmarks/reversible.py: a smoke run writes the page, and the notes under its tables
quote the figures of those tables, not figures of another run."""

import pytest
from conftest import benchmark_module, run_child


def _table(text: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table after ``heading`` (header and rule left out), by their
    first cell."""
    section = text.split(heading, 1)[1].split("\n\n#", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")][2:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {r[0]: r[1:] for r in rows}


@pytest.mark.slow
def test_smoke_run_notes_quote_its_own_tables(tmp_path):
    rv = benchmark_module("reversible")
    out = tmp_path / "reversible.md"
    proc = run_child(["benchmarks/reversible.py", "--smoke", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    notes = text.split("## Reading the tables", 1)[1]
    bullets = notes.split("\n- ")[1:]

    def bullet(start: str) -> str:
        return next(b for b in bullets if b.startswith(start))

    # The toy table's order and median order columns, and the order note quoting them.
    # The header's cells after "solver", as _table gives a row's cells after its label.
    header = text.split("### mixture", 1)[1].split("\n| solver |", 1)[1].split("\n", 1)[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[-5:] == [
        "order",
        "median order",
        "parasitic",
        "round trip float32",
        "round trip float64",
    ]
    toy = _table(text, "### mixture")
    edict_order = toy["edict(euler, 0.93)"][columns.index("order")]
    assert f"edict(euler, 0.93) {edict_order}" in bullet("The order column")

    # Many steps: `FDD / accuracy % (steps, NFE) max |x|` for edict(euler, 0.93) and euler.
    many = _table(text, "### Many steps")
    assert set(many) == {"edict(euler, 0.93)", "euler"}
    edict = bullet("EDICT's own error")
    fdd, rest = many["edict(euler, 0.93)"][0].split(" / ")
    assert f"of edict(euler, 0.93) give FDD {fdd} and {rest.split()[0]}% accuracy" in edict
    fdd, rest = many["euler"][0].split(" / ")
    assert f", euler {fdd} and {rest.split()[0]}%" in edict
    assert "1.37" not in edict and "1.21" not in edict  # another run's figures

    # Round trips: the inverted noise of coupling 0.5, and EDICT's, as the notes quote them.
    trips = _table(text, "### Round trips of held-out digits")
    stability = bullet("Stability")
    damped = float(trips["reversible(euler, 0.5)"][4])
    assert f"standard deviation of {rv._n(damped)} (euler)" in stability
    assert f"std {float(trips['edict(euler, 0.93)'][4]):.2f} of sigma_max" in stability
    # The largest budget's cell of reversible(euler, 0.5) and of euler.
    sampled = _table(text, "## Digits model")
    fdd = sampled["reversible(euler, 0.5)"][-1].split(" / ")[0]
    assert f"reversible(euler, 0.5) samples the digits at FDD {fdd} and" in stability
    assert f"(euler: {sampled['euler'][-1].split(' / ')[0]} and" in stability
