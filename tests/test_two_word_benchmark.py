"""benchmarks/two_word.py: its perturbations do what the page says they do, and a smoke run
writes the page's tables with exact float64 round trips."""

import types

import pytest
import torch
from conftest import benchmark_module, run_child

import bdia


def _two_word():
    return benchmark_module("two_word")


def _pair():
    gen = torch.Generator().manual_seed(0)
    earlier = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    later = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    low = torch.ldexp(torch.rand(3, 4, generator=gen, dtype=torch.float64) - 0.5, torch.tensor(-53))
    return bdia.StatePair(earlier, later, low * earlier.abs(), low * later.abs())


@pytest.mark.parametrize("direction", [0, 1])
def test_a_model_input_change_moves_the_high_word_and_keeps_the_two_word_value(direction):
    tw = _two_word()
    pair, direction = _pair(), tw.DIRECTIONS[direction]
    changed, size = tw.perturbed(pair, direction, "model", 4, torch.Generator().manual_seed(1))
    # The word the next move evaluates the model at: later when sampling, earlier inverting.
    seen, kept = ("later", "earlier") if direction == tw.DIRECTIONS[0] else ("earlier", "later")
    assert (getattr(changed, seen) != getattr(pair, seen)).all()
    assert torch.equal(getattr(changed, kept), getattr(pair, kept))
    value = tw.value_difference(
        (getattr(changed, seen), getattr(changed, f"{seen}_low")),
        (getattr(pair, seen), getattr(pair, f"{seen}_low")),
    )
    # The low word takes the change back to its own rounding: the new low word (at most 4.5
    # ulps, 9 u of the element) is rounded to u of itself, 9 u^2 of the element.
    bound = 9 * 2.0**-106 * getattr(pair, seen).abs()
    assert (value.abs() <= bound).all()
    assert 2 * 2.0**-53 <= size <= 4 * 2.0**-52


def test_the_digits_model_input_change_moves_what_the_network_sees_by_one_float32_ulp():
    # The network rounds a float64 state to float32: a flip of a float32 high word is one
    # float32 ulp, and half of one (2^28 float64 ulps) would move only the elements it
    # carried across a rounding midpoint, about half of them.
    tw = _two_word()
    problem = tw.digits_problem(1)
    pair = _pair()
    changed, _ = tw.perturbed(
        pair, tw.DIRECTIONS[0], "model", problem.model_ulps[0], torch.Generator().manual_seed(1)
    )
    before, after = pair.later.float(), changed.later.float()
    up = changed.later > pair.later
    neighbour = torch.nextafter(before, torch.where(up, torch.inf, -torch.inf))
    # Exact: the change is a multiple of the float32 spacing at each element (none of these
    # values lies within a float32 ulp of a power of two, where the spacing changes).
    assert torch.equal(after, neighbour)


def test_the_model_input_prose_gives_the_sizes_and_the_response_the_run_measured():
    tw = _two_word()

    def problem(name, ulps):
        return types.SimpleNamespace(name=name, model_ulps=(ulps, 16 * ulps))

    def row(name, size, linearity):
        return {"problem": name, "model": {"sizes": (size, 16 * size), "linearity": linearity}}

    problems = [problem("mixture", 2**20), problem("digits", 2**29)]
    rows = [row("mixture", 1.7e-10, 1.0), row("digits", 4.4e-8, 0.88), row("digits", 4.8e-8, 0.2)]
    text = tw.model_sizes(problems, rows)
    assert "2^20 ulps (1.7e-10 to 1.7e-10 relative)" in text
    assert "2^29 float64 ulps, one float32 ulp" in text
    assert "(4.4e-08 to 4.8e-08 relative)" in text
    assert "its response is not linear (linear 0.20 to 0.88)." in text
    rows = [row("mixture", 1.7e-10, 1.0), row("digits", 4.4e-8, 0.98)]
    problems[-1] = problem("digits", 2**28)
    text = tw.model_sizes(problems, rows)
    assert "2^28 float64 ulps, 0.5 float32 ulps" in text
    assert "its response is linear." in text


def test_a_low_word_change_leaves_the_high_words_and_has_the_size_asked():
    tw = _two_word()
    pair = _pair()
    changed, size = tw.perturbed(pair, tw.DIRECTIONS[0], "low", 1e-28, torch.Generator())
    assert torch.equal(changed.earlier, pair.earlier) and torch.equal(changed.later, pair.later)
    for word in ("earlier", "later"):
        d = getattr(changed, f"{word}_low") - getattr(pair, f"{word}_low")
        ratio = d.abs() / getattr(pair, word).abs()
        # 1e-28 of an element is about 1e4 u^2 of it, added to a low word of about u.
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1e-28), rtol=1e-3, atol=0)
    assert size == 1e-28


@pytest.mark.slow
def test_smoke_run_writes_the_tables_with_exact_float64_round_trips(tmp_path):
    out = tmp_path / "two_word.md"
    proc = run_child(["benchmarks/two_word.py", "--smoke", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    for heading in ("## Growth", "## Round trips", "## High-word flips"):
        assert heading in text
    trips = text.split("## Round trips")[1].split("## High-word flips")[0]
    rows = [ln for ln in trips.splitlines() if ln.startswith("| ") and "bdia(" in ln]
    assert len(rows) == 4  # one mixture and the digits, both directions, euler
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # float64 state with a float32 network: exact to a few hundred u^2 at most.
        assert float(cells[4].split(" / ")[0]) < 1e-29, row
