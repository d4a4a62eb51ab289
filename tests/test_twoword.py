"""bdia.twoword: double-word arithmetic, checked against exact rational arithmetic.

Every result is compared with Python's Fraction: the error-free transformations must be
exact, each double-word operation must stay within the relative error bound its docstring
states, and updates must invert to about u^2. The same checks then run on mutants of the
module, each with one compensation removed, and must catch every one of them. Inputs are
built here, never with the module under test, so that a mutant cannot corrupt them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from unittest import mock

import pytest
import torch
from conftest import REPO, dtypes_made, run_child

import bdia.twoword as twoword

DTYPES = (torch.float32, torch.float64)
BITS = {torch.float32: 24, torch.float64: 53}
# Exponent ranges that keep double words and products clear of overflow and underflow.
SPAN = {torch.float32: 40, torch.float64: 400}
SCALARS = (0.96, 1 / 3, 0.1, 1.0 + 2.0**-20, 1.0 - 2.0**-30, 3.0, -0.7, 1.2345e-6, 1.7e6, 1.0)
UNIT_SCALES = (0.51, 0.7, 0.9, 0.96, 0.999, 1.0)  # s in (1/2, 1]: BDIA's gamma, EDICT's p


def unit(dtype: torch.dtype) -> Fraction:
    return Fraction(1, 2 ** BITS[dtype])


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, computed here (not with the module under test)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


# ------------------------------------------------------------------------------ exact values
def exact(t: torch.Tensor) -> list[Fraction]:
    return [Fraction(v) for v in t.double().flatten().tolist()]


def value(x) -> list[Fraction]:
    """The exact value of a TwoWord (of the module or of a mutant) as Fractions."""
    high = exact(x.high)
    return high if x.low is None else [h + lo for h, lo in zip(high, exact(x.low))]


def normalised(x) -> bool:
    """``high`` is the word nearest ``high + low`` (one rounding in the word dtype)."""
    return x.low is None or bool(torch.equal(x.high + x.low, x.high))


def ratio(err: Fraction, bound: Fraction) -> float:
    if err == 0:
        return 0.0
    return math.inf if bound == 0 else float(err / bound)


@contextlib.contextmanager
def without_float64(tw: types.ModuleType) -> Iterator[None]:
    """The CPU taken for a device without float64 (MPS), where ``.double()`` raises, by
    ``tw`` (the module or a mutant of it)."""
    with mock.patch.object(tw, "_NO_FLOAT64", frozenset({"mps", "cpu"})):
        yield


# -------------------------------------------------------------------------------- inputs
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _magnitudes(n: int, dtype: torch.dtype, seed: int, span: int | None = None) -> torch.Tensor:
    """Random signed numbers: half with exponents in [-4, 4], half in [-span, span]."""
    span = SPAN[dtype] if span is None else span
    g = _gen(seed)
    significand = 1.0 + torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    narrow = torch.randint(-4, 5, (n,), generator=g)
    wide = torch.randint(-span, span + 1, (n,), generator=g)
    exponent = torch.where(torch.arange(n) % 2 == 0, narrow, wide).double()
    return (sign * significand * torch.exp2(exponent)).to(dtype)


def _hard_highs(dtype: torch.dtype) -> torch.Tensor:
    """Powers of two, all-ones significands and their neighbours, of both signs."""
    p = BITS[dtype]
    rows = []
    for k in (-7, 0, 1, 13):
        for m in (1.0, 2.0 - 2.0 ** (1 - p), 1.0 + 2.0 ** (1 - p), 1.5):
            rows += [m * 2.0**k, -m * 2.0**k]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


def plain(n: int, dtype: torch.dtype, seed: int, span: int | None = None) -> torch.Tensor:
    return torch.cat([_magnitudes(n, dtype, seed, span), _hard_highs(dtype)])


def low_words(high: torch.Tensor, seed: int) -> torch.Tensor:
    """Random low words, ``|low| <= |high| 2^-(p+1)``, so that ``(high, low)`` is normalised;
    every fourth one at that largest magnitude, a few zero."""
    p = BITS[high.dtype]
    g = _gen(seed)
    r = 2.0 * torch.rand(high.shape, generator=g, dtype=torch.float64) - 1.0
    r[::4] = torch.sign(r[::4])
    r[3::11] = 0.0
    return (r * high.double().abs() * 2.0 ** -(p + 1)).to(high.dtype)


@dataclass(frozen=True)
class Words:
    high: torch.Tensor
    low: torch.Tensor

    def of(self, tw: types.ModuleType):
        return tw.TwoWord(self.high, self.low)

    def neg(self) -> Words:
        return Words(-self.high, -self.low)


@cache
def words(n: int, dtype: torch.dtype, seed: int, span: int | None = None) -> Words:
    high = plain(n, dtype, seed, span)
    return Words(high, low_words(high, seed + 1))


# ------------------------------------------------------------------------- exactness checks
@dataclass(frozen=True)
class Result:
    """Worst error of a check: against its bound (pass if <= 1) and in units of u^2."""

    worst: float
    in_u2: float = 0.0
    normalised: bool = True

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0 and self.normalised


def summarise(errors, bounds, sizes, u: Fraction, outputs=()) -> Result:
    """``sizes``: the magnitude each error is measured against for ``in_u2`` (the exact
    result for a sum or product, the sum of the terms' magnitudes for a composite)."""
    worst = max((ratio(e, b) for e, b in zip(errors, bounds, strict=True)), default=0.0)
    in_u2 = max(
        (float(e / abs(r) / u**2) for e, r in zip(errors, sizes, strict=True) if r != 0),
        default=0.0,
    )
    return Result(worst, in_u2, all(normalised(o) for o in outputs))


@cache
def eft_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (a, b) for TwoSum: any magnitudes, subnormals, cancellation, powers of two."""
    finfo = torch.finfo(dtype)
    lowest = 2.0 ** (math.log2(finfo.tiny) - (BITS[dtype] - 1))  # smallest subnormal
    top = math.floor(math.log2(finfo.max)) - 2
    g = _gen(11)
    n = 160

    def sig() -> torch.Tensor:
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        return (1.0 + torch.rand(n, generator=g, dtype=torch.float64)) * sign

    def expo(lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi, (n,), generator=g).double()

    bottom = math.floor(math.log2(finfo.tiny)) - BITS[dtype] + 2
    a = sig() * torch.exp2(expo(bottom, top))
    b = sig() * torch.exp2(expo(bottom, top))
    near = sig() * torch.exp2(expo(-10, 10))
    subnormal = torch.randint(-(2**20), 2**20, (n,), generator=g).double() * lowest
    hard = _hard_highs(dtype).double()
    pieces_a = [a, near, near, near, subnormal, subnormal, hard, hard]
    pieces_b = [
        b,
        -near * (1.0 + 2.0**-30),  # cancellation
        -near,  # exact zero
        near * 2.0 ** -(BITS[dtype] + 3),  # just below the last bit
        subnormal.flip(0),
        near * 1e-3,
        -hard * 2.0 ** -(BITS[dtype] + 1),  # half an ulp below a power of two
        hard.flip(0) * 2.0**-60,
    ]
    a = torch.cat(pieces_a).to(dtype)
    b = torch.cat(pieces_b).to(dtype)
    return a, b


@cache
def prod_inputs(dtype: torch.dtype) -> torch.Tensor:
    return plain(150, dtype, 21)


def eft_check(tw, dtype: torch.dtype, name: str) -> Result:
    """Count of results whose two words do not sum to the exact result (must be zero)."""
    if name == "two_prod":
        a = prod_inputs(dtype)
        wrong = 0
        for s in SCALARS:
            s = rounded(s, dtype)
            got = value(tw.two_prod(a, s))
            wrong += sum(g != x * Fraction(s) for g, x in zip(got, exact(a)))
        return Result(float(wrong))
    a, b = eft_inputs(dtype)
    if name == "fast_two_sum":
        a, b = torch.where(a.abs() >= b.abs(), a, b), torch.where(a.abs() >= b.abs(), b, a)
    out = getattr(tw, name)(a, b)
    want = [x + y for x, y in zip(exact(a), exact(b))]
    wrong = sum(g != w for g, w in zip(value(out), want))
    return Result(float(wrong), normalised=normalised(out))


EFTS = ("two_sum", "fast_two_sum", "two_prod")


# ---------------------------------------------------------------- double-word accuracy
def _add_cases(dtype: torch.dtype) -> Iterator[tuple[Words, torch.Tensor]]:
    x = words(80, dtype, 31)
    y = plain(80, dtype, 33)
    yield x, y
    yield x, -x.high  # cancellation: the sum is x.low
    yield x, -x.high * (1.0 + 2.0**-20)
    yield x, x.low * -3.0
    yield x, x.high.flip(0)


def _add_dw_cases(dtype: torch.dtype) -> Iterator[tuple[Words, Words]]:
    x = words(80, dtype, 41)
    y = words(80, dtype, 43)
    yield x, y
    yield x, Words(-x.high, low_words(x.high, 45))  # the highs cancel: the lows remain
    yield x, x.neg()  # exact zero
    yield x, Words(-x.high, -x.low * 0.75)


def check_add(tw, dtype: torch.dtype) -> Result:
    """DWPlusFP (``b`` a tensor): 2 u^2."""
    u = unit(dtype)
    errs, bounds, refs, outs = [], [], [], []
    for x, y in _add_cases(dtype):
        out = tw.add(x.of(tw), y)
        want = [a + b for a, b in zip(value(x), exact(y))]
        errs += [abs(g - w) for g, w in zip(value(out), want)]
        bounds += [2 * u**2 * abs(w) for w in want]
        refs += want
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def check_add_words(tw, dtype: torch.dtype) -> Result:
    """AccurateDWPlusDW (both operands with low words), as ``add`` and ``sub``:
    3 u^2 + 13 u^3."""
    u = unit(dtype)
    errs, bounds, refs, outs = [], [], [], []
    for x, y in _add_dw_cases(dtype):
        for out, want in (
            (tw.add(x.of(tw), y.of(tw)), [a + b for a, b in zip(value(x), value(y))]),
            (tw.sub(x.of(tw), y.neg().of(tw)), [a + b for a, b in zip(value(x), value(y))]),
        ):
            errs += [abs(g - w) for g, w in zip(value(out), want)]
            bounds += [(3 * u**2 + 13 * u**3) * abs(w) for w in want]
            refs += want
            outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def check_mul(tw, dtype: torch.dtype) -> Result:
    """DWTimesFP1: 1.5 u^2 + 4 u^3."""
    u = unit(dtype)
    x = words(40, dtype, 51)
    errs, bounds, refs, outs = [], [], [], []
    for s in SCALARS:
        out = tw.mul(x.of(tw), s)
        want = [v * Fraction(rounded(s, dtype)) for v in value(x)]
        errs += [abs(g - w) for g, w in zip(value(out), want)]
        bounds += [(Fraction(3, 2) * u**2 + 4 * u**3) * abs(w) for w in want]
        refs += want
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def check_div(tw, dtype: torch.dtype) -> Result:
    """DWDivFP3: 3 u^2."""
    u = unit(dtype)
    x = words(40, dtype, 61)
    errs, bounds, refs, outs = [], [], [], []
    for s in SCALARS:
        out = tw.div(x.of(tw), s)
        want = [v / Fraction(rounded(s, dtype)) for v in value(x)]
        errs += [abs(g - w) for g, w in zip(value(out), want)]
        bounds += [3 * u**2 * abs(w) for w in want]
        refs += want
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def _bdia_cases(dtype: torch.dtype, seed: int):
    """(a, minus, plus, scale) with random values and both cancellations of the update."""
    a = words(24, dtype, seed)
    minus = plain(24, dtype, seed + 2)
    plus = plain(24, dtype, seed + 3)
    for s in SCALARS[:7]:
        yield a, minus, plus, s
    for s in (0.96, 0.7):
        g = rounded(s, dtype)
        yield a, a.high, plus, s  # a - minus = a.low
        yield a, minus, (-(a.high.double() - minus.double()) * g).to(dtype), s
        yield a, minus, (-(a.high.double() - minus.double()) / g).to(dtype), s


def check_scaled_difference_plus(tw, dtype: torch.dtype) -> Result:
    """(3.5 u^2 + 5 u^3) |s (a - minus)| + 2 u^2 |result|."""
    u = unit(dtype)
    errs, bounds, refs, outs = [], [], [], []
    for a, minus, plus, s in _bdia_cases(dtype, 71):
        g = Fraction(rounded(s, dtype))
        out = tw.scaled_difference_plus(a.of(tw), minus, s, plus)
        scaled = [g * (x - m) for x, m in zip(value(a), exact(minus))]
        want = [v + p for v, p in zip(scaled, exact(plus))]
        errs += [abs(o - w) for o, w in zip(value(out), want)]
        bounds += [
            (Fraction(7, 2) * u**2 + 5 * u**3) * abs(v) + 2 * u**2 * abs(w)
            for v, w in zip(scaled, want)
        ]
        refs += [abs(v) + abs(p) for v, p in zip(scaled, exact(plus))]
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def check_difference_over_plus(tw, dtype: torch.dtype) -> Result:
    """(5 u^2 + u^3) |(a - minus) / s| + 2 u^2 |result|."""
    u = unit(dtype)
    errs, bounds, refs, outs = [], [], [], []
    for a, minus, plus, s in _bdia_cases(dtype, 81):
        g = Fraction(rounded(s, dtype))
        out = tw.difference_over_plus(a.of(tw), minus, s, plus)
        divided = [(x - m) / g for x, m in zip(value(a), exact(minus))]
        want = [v + p for v, p in zip(divided, exact(plus))]
        errs += [abs(o - w) for o, w in zip(value(out), want)]
        bounds += [(5 * u**2 + u**3) * abs(v) + 2 * u**2 * abs(w) for v, w in zip(divided, want)]
        refs += [abs(v) + abs(p) for v, p in zip(divided, exact(plus))]
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


MIX_PS = (0.93, 0.5, 0.7, 0.999, 1.0, 0.25, 0.1)


def _weights(p: float, dtype: torch.dtype) -> tuple[Fraction, Fraction]:
    pw = rounded(p, dtype)
    return Fraction(pw), Fraction(rounded(1.0 - pw, dtype))


def _mix_cases(dtype: torch.dtype, seed: int):
    a = words(24, dtype, seed)
    b = words(24, dtype, seed + 2)
    for p in MIX_PS:
        yield a, b, p
    pw, qw = _weights(0.93, dtype)
    cancel = (-a.high.double() * float(pw / qw)).to(dtype)  # p a + (1 - p) b ~ 0
    yield a, Words(cancel, low_words(cancel, seed + 4)), 0.93


def check_mix(tw, dtype: torch.dtype) -> Result:
    """(1.5 u^2 + 5 u^3) (|p a| + |q b|) + (3 u^2 + 13 u^3) |result|."""
    u = unit(dtype)
    errs, bounds, refs, outs = [], [], [], []
    for a, b, p in _mix_cases(dtype, 91):
        pw, qw = _weights(p, dtype)
        out = tw.mix(a.of(tw), b.of(tw), p)
        pa = [pw * x for x in value(a)]
        qb = [qw * y for y in value(b)]
        want = [x + y for x, y in zip(pa, qb)]
        errs += [abs(o - w) for o, w in zip(value(out), want)]
        bounds += [
            (Fraction(3, 2) * u**2 + 5 * u**3) * (abs(x) + abs(y)) + (3 * u**2 + 13 * u**3) * abs(w)
            for x, y, w in zip(pa, qb, want)
        ]
        refs += [abs(x) + abs(y) for x, y in zip(pa, qb)]
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def check_unmix(tw, dtype: torch.dtype) -> Result:
    """(6 u^2 + 14 u^3) |result| + (1.5 u^2 + 5 u^3) |q b / p|."""
    u = unit(dtype)
    errs, bounds, refs, outs = [], [], [], []
    for m, b, p in _mix_cases(dtype, 101):
        pw, qw = _weights(p, dtype)
        out = tw.unmix(m.of(tw), b.of(tw), p)
        qb = [qw * y / pw for y in value(b)]
        want = [x / pw - y for x, y in zip(value(m), qb)]
        errs += [abs(o - w) for o, w in zip(value(out), want)]
        bounds += [
            (6 * u**2 + 14 * u**3) * abs(w) + (Fraction(3, 2) * u**2 + 5 * u**3) * abs(y)
            for y, w in zip(qb, want)
        ]
        refs += [abs(w) + abs(y) for y, w in zip(qb, want)]
        outs.append(out)
    return summarise(errs, bounds, refs, u, outs)


def check_to(tw, dtype: torch.dtype) -> Result:
    """float32 -> float64 exactly; float64 -> float32 to (1 + 2^-20) 2^-48 relative."""
    if dtype == torch.float32:
        x = words(100, torch.float32, 111)
        out = x.of(tw).to(torch.float64)
        errs = [abs(o - w) for o, w in zip(value(out), value(x))]
        return summarise(errs, [Fraction(0)] * len(errs), value(x), unit(dtype), [out])
    x = words(100, torch.float64, 113, span=SPAN[torch.float32])  # inside float32's range
    out = x.of(tw).to(torch.float32)
    want = value(x)
    u32 = unit(torch.float32)
    errs = [abs(o - w) for o, w in zip(value(out), want)]
    bounds = [(1 + Fraction(1, 2**20)) * u32**2 * abs(w) for w in want]
    return summarise(errs, bounds, want, u32, [out])


OPS: dict[str, Callable] = {
    "add": check_add,
    "add_words": check_add_words,
    "mul": check_mul,
    "div": check_div,
    "scaled_difference_plus": check_scaled_difference_plus,
    "difference_over_plus": check_difference_over_plus,
    "mix": check_mix,
    "unmix": check_unmix,
    "to": check_to,
}


# ------------------------------------------------------------------------------ round trips
def check_bdia_round_trip(tw, dtype: torch.dtype) -> Result:
    """difference_over_plus(scaled_difference_plus(a, m, s, p), p, s, m) = a to
    12.5 u^2 (|a| + |m| + |p| / s) (13 u^2 here, covering the O(u^3) terms)."""
    u = unit(dtype)
    a = words(60, dtype, 121)
    m = plain(60, dtype, 123)
    p = plain(60, dtype, 125)
    errs, bounds, refs = [], [], []
    for s in UNIT_SCALES:
        g = Fraction(rounded(s, dtype))
        forward = tw.scaled_difference_plus(a.of(tw), m, s, p)
        back = tw.difference_over_plus(forward, p, s, m)
        errs += [abs(b - x) for b, x in zip(value(back), value(a))]
        sizes = [abs(x) + abs(y) + abs(z) / g for x, y, z in zip(value(a), exact(m), exact(p))]
        bounds += [13 * u**2 * size for size in sizes]
        refs += sizes
    return summarise(errs, bounds, refs, u)


def check_mix_round_trip(tw, dtype: torch.dtype) -> Result:
    """unmix(mix(a, b, p), b, p) = a to 10.5 u^2 |a| + 6 u^2 |q b| / p (11 u^2 and
    6.5 u^2 here, covering the O(u^3) terms)."""
    u = unit(dtype)
    a = words(60, dtype, 131)
    b = words(60, dtype, 133)
    errs, bounds, refs = [], [], []
    for p in UNIT_SCALES + (0.93,):
        pw, qw = _weights(p, dtype)
        back = tw.unmix(tw.mix(a.of(tw), b.of(tw), p), b.of(tw), p)
        errs += [abs(r - x) for r, x in zip(value(back), value(a))]
        bounds += [
            11 * u**2 * abs(x) + Fraction(13, 2) * u**2 * abs(qw * y) / pw
            for x, y in zip(value(a), value(b))
        ]
        refs += [abs(x) + abs(qw * y) / pw for x, y in zip(value(a), value(b))]
    return summarise(errs, bounds, refs, u)


STEPS, GAMMA = 50, 0.96


def check_chained_round_trip(tw, dtype: torch.dtype) -> Result:
    """50 BDIA-like updates with gamma = 0.96, then their 50 inverses.

    The inverse multiplies each earlier error by 1/gamma, so the bound is the per-step
    round-trip bound summed with that growth, ``12.5 u^2 M sum_k gamma^-(k-1)`` (about
    260 u^2 M times the amplification (1/0.96)^50 = 7.7), M the largest
    ``|x_k| + |minus_k| + |plus_k| / gamma`` along the way. ``in_u2`` is the error in units
    of ``u^2 M (1/gamma)^50``.
    """
    u = unit(dtype)
    n = 24
    start = words(n, dtype, 141)
    minus = [plain(n, dtype, 1000 + k) for k in range(STEPS)]
    plus = [plain(n, dtype, 2000 + k) for k in range(STEPS)]
    g = Fraction(rounded(GAMMA, dtype))
    states = [start.of(tw)]
    for k in range(STEPS):
        states.append(tw.scaled_difference_plus(states[-1], minus[k], GAMMA, plus[k]))
    back = states[-1]
    for k in reversed(range(STEPS)):
        back = tw.difference_over_plus(back, plus[k], GAMMA, minus[k])
    sizes = [
        [abs(x) + abs(m) + abs(p) / g for x, m, p in zip(value(x), exact(mk), exact(pk))]
        for x, mk, pk in zip(states, minus, plus)
    ]
    scale = [max(column) for column in zip(*sizes)]
    growth = sum(g ** -(k - 1) for k in range(1, STEPS + 1))
    amplification = g**-STEPS
    errs = [abs(b - x) for b, x in zip(value(back), value(start.of(tw)))]
    bounds = [Fraction(25, 2) * u**2 * m * growth for m in scale]
    worst = max(ratio(e, b) for e, b in zip(errs, bounds))
    in_u2 = max(float(e / (u**2 * m * amplification)) for e, m in zip(errs, scale))
    return Result(worst, in_u2)


ROUND_TRIPS: dict[str, Callable] = {
    "bdia": check_bdia_round_trip,
    "mix": check_mix_round_trip,
    "chained": check_chained_round_trip,
}


def failures(tw) -> Iterator[str]:
    """The checks ``tw`` fails, each run on both dtypes, the cheapest first."""
    for name in EFTS:
        for dtype in DTYPES:
            r = eft_check(tw, dtype, name)
            if r.worst != 0 or not r.normalised:
                yield f"{name} {dtype}: {r.worst:g} results inexact"
    checks = {"to": check_to, **ROUND_TRIPS, **OPS}
    for name, check in checks.items():
        for dtype in DTYPES:
            r = check(tw, dtype)
            if not r.ok:
                yield f"{name} {dtype}: {r.worst:.3g} x its bound, normalised {r.normalised}"
    # float32 words on a device without float64 take Dekker's product instead.
    with without_float64(tw):
        r = eft_check(tw, torch.float32, "two_prod")
        if r.worst != 0 or not r.normalised:
            yield f"two_prod float32 without float64: {r.worst:g} results inexact"
        for name in ("mul", "div"):
            r = OPS[name](tw, torch.float32)
            if not r.ok:
                yield f"{name} float32 without float64: {r.worst:.3g} x its bound"


# ------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", EFTS)
def test_error_free_transformations_are_exact(name, dtype):
    r = eft_check(twoword, dtype, name)
    assert r.worst == 0, f"{name}: {r.worst:g} results differ from the exact one"
    assert r.normalised


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_double_word_operations_stay_within_their_bounds(name, dtype):
    r = OPS[name](twoword, dtype)
    assert r.normalised, f"{name} returned a word pair that is not normalised"
    assert r.worst <= 1.0, f"{name}: error {r.worst:.3g} times its bound ({r.in_u2:.3g} u^2)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_updates_invert_to_twice_the_word_precision(name, dtype):
    r = ROUND_TRIPS[name](twoword, dtype)
    assert r.worst <= 1.0, f"{name} round trip: {r.worst:.3g} times its bound"


# Every function that multiplies or divides float32 words by a scalar, on random words.
FLOAT32_PRODUCTS: dict[str, Callable] = {
    "two_prod": lambda x, y: twoword.two_prod(x.high, 0.96),
    "mul": lambda x, y: twoword.mul(x.of(twoword), 1 / 3),
    "div": lambda x, y: twoword.div(x.of(twoword), 0.93),
    "scaled_difference_plus": lambda x, y: twoword.scaled_difference_plus(
        x.of(twoword), y.high, 0.96, y.low
    ),
    "difference_over_plus": lambda x, y: twoword.difference_over_plus(
        x.of(twoword), y.high, 0.96, y.low
    ),
    "mix": lambda x, y: twoword.mix(x.of(twoword), y.of(twoword), 0.93),
    "unmix": lambda x, y: twoword.unmix(x.of(twoword), y.of(twoword), 0.93),
}


@pytest.mark.parametrize("name", FLOAT32_PRODUCTS)
def test_float32_words_on_a_device_without_float64_give_the_same_bits(name):
    """On MPS, which has no float64, the float32 product cannot be formed in float64, and
    every reversible solver failed at its first two-word update there. Dekker's product of
    12-bit halves is exact too, so the results are those of the float64 product bit for
    bit, and no float64 tensor is made."""
    x, y = words(200, torch.float32, 151), words(200, torch.float32, 153)
    expected = FLOAT32_PRODUCTS[name](x, y)
    with without_float64(twoword):
        got, made = dtypes_made(lambda: FLOAT32_PRODUCTS[name](x, y))
    assert torch.float64 not in made and got.dtype == torch.float32
    assert torch.equal(got.high, expected.high) and torch.equal(got.low, expected.low)


def test_chained_round_trip_error_is_u2_times_the_amplification_not_u():
    for dtype in DTYPES:
        r = check_chained_round_trip(twoword, dtype)
        # in units of u^2 M (1/0.96)^50; losing a single word's precision would give ~1/u.
        assert r.in_u2 < 20, (dtype, r)


SOURCE = inspect.getsource(twoword)

# (what is removed, the line that keeps it, the line without it)
MUTANTS = [
    (
        "two_sum error",
        "e = (a - (s - b_virtual)) + (b - b_virtual)",
        "e = torch.zeros_like(s)",
    ),
    (
        "two_sum: error of a (fast_two_sum order)",
        "e = (a - (s - b_virtual)) + (b - b_virtual)",
        "e = b - b_virtual",
    ),
    (
        "fast_two_sum error",
        "e = b - (s - a)",
        "e = torch.zeros_like(s)",
    ),
    (
        "two_prod float32 low word",
        "e = (exact - p.double()).float()",
        "e = torch.zeros_like(p)",
    ),
    (
        "two_prod float64 error",
        "e = ((a_high * b_high - p) + a_high * b_low + a_low * b_high) + a_low * b_low",
        "e = torch.zeros_like(p)",
    ),
    (
        "two_prod float64 low x low term",
        "e = ((a_high * b_high - p) + a_high * b_low + a_low * b_high) + a_low * b_low",
        "e = (a_high * b_high - p) + a_high * b_low + a_low * b_high",
    ),
    (
        "Veltkamp split of the tensor",
        "high = c - (c - a)",
        "high = a",
    ),
    (
        "Veltkamp split of the scalar",
        "high = c - (c - b)",
        "high = b",
    ),
    (
        "Veltkamp split of a float32 scalar",
        "high32 = c32 - (c32 - word)",
        "high32 = word",
    ),
    (
        "float32 splitter",
        "_SPLITTER32 = 4097.0",
        "_SPLITTER32 = _SPLITTER",
    ),
    (
        "add: low word carried",
        "v = xl + sl",
        "v = sl",
    ),
    (
        "add: error of the high sum",
        "v = xl + sl",
        "v = xl",
    ),
    (
        "add words: low words",
        "c = sl + th",
        "c = sl",
    ),
    (
        "add words: error of the high sum",
        "c = sl + th",
        "c = th",
    ),
    (
        "add words: error of the low sum",
        "w = tl + vl",
        "w = vl",
    ),
    (
        "add words: error of the first renormalisation",
        "w = tl + vl",
        "w = tl",
    ),
    (
        "mul: low word carried",
        "cl2 = xl * y",
        "cl2 = torch.zeros_like(xl)",
    ),
    (
        "mul: product error",
        "tl2 = tl1 + cl1",
        "tl2 = tl1",
    ),
    (
        "mul: renormalisation error",
        "tl2 = tl1 + cl1",
        "tl2 = cl1",
    ),
    (
        "div: low word carried",
        "d = dt if xl is None else dt + xl",
        "d = dt",
    ),
    (
        "div: product error in the remainder",
        "dt = dh - pl  #",
        "dt = dh  #",
    ),
    (
        "div: remainder",
        "tl = d / y",
        "tl = torch.zeros_like(d)",
    ),
    (
        "to float32: low word",
        "return TwoWord(*_fast_two_sum(high, rest.float()))",
        "return TwoWord(high)",
    ),
    (
        "to float64: low word",
        "return TwoWord(*_fast_two_sum(high, self.low.double()))",
        "return TwoWord(high)",
    ),
    (
        "scalars rounded to the word dtype",
        "rounded = float(torch.tensor(float(value), dtype=dtype))",
        "rounded = float(value)",
    ),
]


def variant(monkeypatch, old: str | None = None, new: str | None = None) -> types.ModuleType:
    """A fresh copy of bdia.twoword, with the line ``old`` replaced by ``new``."""
    source = SOURCE
    if old is not None:
        assert source.count(old) == 1, f"mutant target {old!r} is not one line of twoword.py"
        source = source.replace(old, new)
    module = types.ModuleType("bdia._twoword_variant")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source, "<twoword variant>", "exec"), module.__dict__)
    return module


def test_the_unmutated_copy_passes_every_check(monkeypatch):
    assert list(failures(variant(monkeypatch))) == []


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("what, old, new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_every_compensation_is_pinned_by_a_check(monkeypatch, what, old, new):
    failed = next(failures(variant(monkeypatch, old, new)), None)
    assert failed is not None, f"removing the {what} goes unnoticed"


# ---------------------------------------------------------------------------- compile guard
GUARDED = {
    "two_sum": lambda t, w: twoword.two_sum(t, t),
    "fast_two_sum": lambda t, w: twoword.fast_two_sum(t, t),
    "two_prod": lambda t, w: twoword.two_prod(t, 0.3),
    "add": lambda t, w: twoword.add(w, t),
    "sub": lambda t, w: twoword.sub(w, t),
    "mul": lambda t, w: twoword.mul(w, 0.3),
    "div": lambda t, w: twoword.div(w, 0.3),
    "scaled_difference_plus": lambda t, w: twoword.scaled_difference_plus(w, t, 0.9, t),
    "difference_over_plus": lambda t, w: twoword.difference_over_plus(w, t, 0.9, t),
    "mix": lambda t, w: twoword.mix(w, w, 0.9),
    "unmix": lambda t, w: twoword.unmix(w, w, 0.9),
    "to": lambda t, w: w.to(torch.float32),
    "wide": lambda t, w: w.wide(),
}


def _raw(fn):
    return fn.__wrapped__


@pytest.mark.parametrize("name", GUARDED)
def test_each_function_with_arithmetic_runs_through_compiler_disable(monkeypatch, name):
    import torch._dynamo  # noqa: F401  (loaded: the guard now wraps every call)

    monkeypatch.setattr(twoword, "_DISABLED", {})
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    GUARDED[name](t, twoword.TwoWord(t, t * 2.0**-60))
    fn = getattr(twoword.TwoWord, name, None) or getattr(twoword, name)
    (wrapped,) = twoword._DISABLED.values()
    assert twoword._DISABLED.keys() == {_raw(fn)}
    assert getattr(wrapped, "_torchdynamo_disable", False) is True


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_torch_compile_leaves_the_arithmetic_out_of_its_graphs(monkeypatch, cache):
    """A compiled caller graph-breaks around the two-word update, which runs eagerly and
    gives the eager bits; the recording backend needs no C++ compiler."""
    import torch._dynamo

    if cache == "cold":  # the guard first made during tracing
        monkeypatch.setattr(twoword, "_DISABLED", {})
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def update(high, low, minus, plus):
        minus = minus * 2.0  # the one op of the caller's own
        out = twoword.scaled_difference_plus(twoword.TwoWord(high, low), minus, 0.96, plus)
        return out.high, out.low

    w = words(30, torch.float64, 151)
    args = (w.high, w.low, plain(30, torch.float64, 153), plain(30, torch.float64, 155))
    torch._dynamo.reset()
    try:
        got = torch.compile(update, backend=recording_backend)(*args)
    finally:
        torch._dynamo.reset()
    want = update(*args)
    assert all(torch.equal(g, e) for g, e in zip(got, want, strict=True))
    calls = [
        n.target
        for gm in graphs
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_method")
    ]
    assert graphs and calls == [operator.mul], calls


@pytest.mark.slow  # another process: its start costs seconds on busy cores
def test_importing_and_using_the_module_loads_neither_dynamo_nor_bdia():
    """The guard imports torch._dynamo only in a process that has it already (seconds
    saved at every start); the module needs torch alone."""
    code = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('tw', 'bdia/twoword.py')\n"
        "tw = importlib.util.module_from_spec(spec); sys.modules['tw'] = tw\n"
        "spec.loader.exec_module(tw)\n"
        "x = tw.TwoWord(torch.ones(3, dtype=torch.float64))\n"
        "y = tw.difference_over_plus(tw.scaled_difference_plus(x, x.high, 0.9, x.high),"
        " x.high, 0.9, x.high)\n"
        "assert torch.equal(y.high, x.high)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'bdia'))))\n"
    )
    done = run_child(["-c", code], timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ the type
def test_two_word_type():
    t = torch.ones(2, 3, dtype=torch.float64)
    w = twoword.TwoWord(t, t * 2.0**-60)
    assert w.shape == (2, 3) and w.dtype == torch.float64 and w.device == t.device
    assert twoword.TwoWord.of(w) is w and twoword.TwoWord.of(t).low is None
    assert torch.equal(twoword.TwoWord.of(t).low_or_zero(), torch.zeros_like(t))
    assert value(-w) == [-v for v in value(w)]
    assert torch.equal(w.wide(), t)  # 1 + 2^-60 rounds to 1 in float64
    w32 = twoword.TwoWord(t.float(), t.float() * 2.0**-30)
    assert torch.equal(w32.wide(), t + 2.0**-30)
    assert w.to(torch.float64) is w
    with pytest.raises(TypeError):
        twoword.TwoWord(t.half())
    with pytest.raises(TypeError):
        twoword.TwoWord(t, 0.0)
    with pytest.raises(ValueError):
        twoword.TwoWord(t, t.float())
    with pytest.raises(ValueError):
        twoword.TwoWord(t, t[0])
    with pytest.raises(TypeError):
        twoword.TwoWord.of(1.0)
    with pytest.raises(TypeError):
        twoword.add(w, t.float())
    with pytest.raises(TypeError):
        twoword.scaled_difference_plus(w, w, 0.9, t)


def test_scalars_are_rounded_to_the_word_dtype_and_checked():
    assert twoword.state_scalar(0.1, torch.float32) == rounded(0.1, torch.float32) != 0.1
    assert twoword.state_scalar(0.1, torch.float64) == 0.1
    assert twoword.unit_roundoff(torch.float32) == 2.0**-24
    t = torch.ones(3)
    with pytest.raises(ValueError):
        twoword.div(t, 1e-50)  # zero in float32
    with pytest.raises(ValueError):
        twoword.difference_over_plus(t, t, 0.0, t)
    with pytest.raises(ValueError):
        twoword.unmix(t, t, 0.0)
    with pytest.raises(ValueError):
        twoword.mul(t, 1e300)  # not finite in float32
    with pytest.raises(TypeError):
        twoword.state_scalar(1.0, torch.float16)
