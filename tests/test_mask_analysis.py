"""Mask analysis against brute force over every (i, j) of small attention matrices."""
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import pytest
import sympy as sp
from sympy.utilities.lambdify import implemented_function

from attncc.codegen.mask_code import evaluate_printed, to_triton
from attncc.passes.mask_analysis import (
    EMPTY, FULL, PARTIAL, analyse_mask, classify_tiles, evaluate, key_ranges,
)

i, j, N, M = sp.symbols("i j N M")
w, s, p = sp.symbols("window sinks prefix")
causal = sp.Symbol("causal")
doc = implemented_function("doc", lambda x: x // 13)

# name -> (predicate, values as a function of (N, M))
AFFINE = {
    "causal": (j <= i + (M - N), lambda n, m: {}),
    "causal_square": (j <= i, lambda n, m: {}),
    "window_0": (sp.And(j <= i, i - j < w), lambda n, m: {"window": 0}),
    "window_1": (sp.And(j <= i, i - j < w), lambda n, m: {"window": 1}),
    "window_5": (sp.And(j <= i, i - j < w), lambda n, m: {"window": 5}),
    "window_40": (sp.And(j <= i, i - j < w), lambda n, m: {"window": 40}),
    "window_huge": (sp.And(j <= i, i - j < w), lambda n, m: {"window": 10 * n}),
    "window_offset": (sp.And(j <= i + M - N, i + M - N - j < w), lambda n, m: {"window": 33}),
    "sink_0": (sp.And(j <= i, sp.Or(i - j < w, j < s)), lambda n, m: {"window": 20, "sinks": 0}),
    "sink_4": (sp.And(j <= i, sp.Or(i - j < w, j < s)), lambda n, m: {"window": 8, "sinks": 4}),
    "sink_wide": (sp.And(j <= i, sp.Or(i - j < w, j < s)), lambda n, m: {"window": 50, "sinks": 20}),
    "sink_tiny": (sp.And(j <= i, sp.Or(i - j < w, j < s)), lambda n, m: {"window": 1, "sinks": 1}),
    "prefix_0": (sp.Or(j <= i, j < p), lambda n, m: {"prefix": 0}),
    "prefix_17": (sp.Or(j <= i, j < p), lambda n, m: {"prefix": 17}),
    "prefix_N": (sp.Or(j <= i, j < p), lambda n, m: {"prefix": n}),
    "band": (sp.Abs(i - j) <= w, lambda n, m: {"window": 7}),
    "band_offset": (sp.Abs(i - j + M - N) < w, lambda n, m: {"window": 20}),
    "not_band": (sp.Abs(i - j) > w, lambda n, m: {"window": 9}),
    "not_window": (sp.Not(sp.And(j <= i, i - j < w)), lambda n, m: {"window": 30}),
    "switch_on": (sp.Or(sp.Not(causal), j <= i), lambda n, m: {"causal": True}),
    "switch_off": (sp.Or(sp.Not(causal), j <= i), lambda n, m: {"causal": False}),
    "implies": (sp.Implies(causal, j <= i), lambda n, m: {"causal": True}),
    "diagonal": (sp.Eq(i, j), lambda n, m: {}),
    "off_diagonal": (sp.Ne(i, j), lambda n, m: {}),
    "max_prefix": (j <= sp.Max(i, p), lambda n, m: {"prefix": 40}),
    "min_window": (sp.And(j <= i, j >= sp.Min(i, p) - w), lambda n, m: {"prefix": 60, "window": 10}),
    "v_shape": (j >= sp.Abs(i - 50) + 3, lambda n, m: {}),
    "anti_diagonal": (sp.And(j >= N - 1 - i, j <= i), lambda n, m: {}),
    "half_slope": (j <= i / 2 + w / 2, lambda n, m: {"window": 3}),
    "steep": (3 * j < 2 * i + 5, lambda n, m: {}),
    "xor": (sp.Xor(j <= i, j < p), lambda n, m: {"prefix": 30}),
    "param_min": (j <= i - sp.Min(w, 4), lambda n, m: {"window": 9}),
}
OPAQUE = {
    "document": (sp.And(j <= i, sp.Eq(doc(i), doc(j))), lambda n, m: {}),
    "dilated": (sp.And(j <= i, sp.Eq(sp.Mod(i - j, 4), 0)), lambda n, m: {}),
    "doc_or_sink": (sp.Or(sp.Eq(doc(i), doc(j)), j < s), lambda n, m: {"sinks": 10}),
    "halved_max": (sp.And(sp.floor(sp.Max(i, j) / 2) <= 40, j <= i + 20), lambda n, m: {}),
}
# masks whose key bounds are monotone in i: the kernel's key ranges are exact
MONOTONE = {"causal", "causal_square", "window_0", "window_1", "window_5", "window_40", "window_huge",
            "window_offset", "sink_0", "sink_4", "sink_wide", "sink_tiny", "prefix_0", "prefix_17",
            "prefix_N", "band", "band_offset", "switch_on", "switch_off", "diagonal"}
SHAPES = [  # N, M, BM, BN
    (64, 64, 16, 16), (100, 37, 16, 32), (37, 100, 32, 16), (200, 129, 64, 16),
    (128, 200, 16, 64), (1, 50, 16, 16), (50, 1, 16, 16), (97, 97, 32, 32),
]
CASES = {**AFFINE, **OPAQUE}


@lru_cache(maxsize=None)
def plan_of(name):
    return analyse_mask(CASES[name][0], i, j)


def brute(name, n, m):
    """The mask over the whole matrix, every symbol given as a full array."""
    pred, values = CASES[name]
    env = {"N": n, "M": m, **values(n, m)}
    grid = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
    syms = [i, j] + sorted(pred.free_symbols - {i, j}, key=str)
    args = [*grid] + [np.full(grid[0].shape, env[str(x)]) for x in syms[2:]]
    out = sp.lambdify(syms, pred, "numpy")(*args)
    return np.broadcast_to(out, grid[0].shape)


def brute_tiles(mask, BM, BN):
    tiles = np.full((-(-mask.shape[0] // BM), -(-mask.shape[1] // BN)), PARTIAL, np.int8)
    for (ti, tj), _ in np.ndenumerate(tiles):
        block = mask[ti * BM:(ti + 1) * BM, tj * BN:(tj + 1) * BN]
        tiles[ti, tj] = FULL if block.all() else PARTIAL if block.any() else EMPTY
    return tiles


def classify(name, n, m, BM, BN):
    return classify_tiles(plan_of(name), n, m, BM, BN, CASES[name][1](n, m))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(AFFINE))
def test_affine_classification_is_exact(name, shape):
    n, m, BM, BN = shape
    assert plan_of(name).exact
    np.testing.assert_array_equal(classify(name, n, m, BM, BN), brute_tiles(brute(name, n, m), BM, BN))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(OPAQUE))
def test_opaque_classification_is_sound(name, shape):
    n, m, BM, BN = shape
    got, want = classify(name, n, m, BM, BN), brute_tiles(brute(name, n, m), BM, BN)
    assert not np.any((got == EMPTY) & (want != EMPTY))
    assert not np.any((got == FULL) & (want != FULL))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_key_ranges_cover_nonempty_tiles(name, shape):
    n, m, BM, BN = shape
    visited = np.zeros_like(brute_tiles(brute(name, n, m), BM, BN), bool)
    for t, spans in enumerate(key_ranges(plan_of(name), n, m, BM, BN, CASES[name][1](n, m))):
        assert spans == sorted(spans) and all(a < b for a, b in spans)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:])), "merged"
        for a, b in spans:
            assert 0 <= a and b <= visited.shape[1]
            visited[t, a:b] = True
    nonempty = brute_tiles(brute(name, n, m), BM, BN) != EMPTY
    assert not np.any(nonempty & ~visited)
    if name in MONOTONE:
        np.testing.assert_array_equal(visited, nonempty)


def kernel_full(plan, n, m, BM, BN, values):
    """Tiles the kernel's fast path treats as unmasked: one conjunct's [flo, fhi]
    covers the tile's in-bounds keys for all its rows (bounds computed by their printed
    Triton text, as the kernel computes them)."""
    out = np.zeros((-(-n // BM), -(-m // BN)), bool)
    env = {"N": n, "M": m, **values}
    for c in plan.conjuncts:
        if c.opaque or not all(bool(g.subs({x: env[x.name] for x in g.free_symbols})) for g in c.guards):
            continue
        for ti, tj in np.ndindex(out.shape):
            i0, j0 = ti * BM, tj * BN
            at = {**env, "i0": i0, "i1": min(i0 + BM, n) - 1}
            rows = evaluate_printed(c.row_lo, at) <= i0 and at["i1"] <= evaluate_printed(c.row_hi, at)
            keys = evaluate_printed(c.flo, at) <= j0 and min(j0 + BN, m) - 1 <= evaluate_printed(c.fhi, at)
            out[ti, tj] |= rows and keys
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_full_ranges_are_sound(name, shape):
    n, m, BM, BN = shape
    got = kernel_full(plan_of(name), n, m, BM, BN, CASES[name][1](n, m))
    want = brute_tiles(brute(name, n, m), BM, BN) == FULL
    assert not np.any(got & ~want)
    if len(plan_of(name).conjuncts) == 1 and name in MONOTONE:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_printed_bounds_evaluate_like_the_analysis(name):
    """Every bound of every conjunct, printed as Triton (`codegen.mask_code`) and run, equals
    the analysis' own evaluation, which the tile classification and key ranges above use."""
    plan = plan_of(name)
    for n, m, BM, _ in SHAPES:
        i0 = np.arange(0, n, BM)
        env = {"N": n, "M": m, **CASES[name][1](n, m), plan.i0.name: i0, plan.i1.name: np.minimum(i0 + BM, n) - 1,
               plan.i.name: np.arange(n)}
        for c in plan.conjuncts:
            for e in (c.row_lo, c.row_hi, c.key_lo, c.key_hi, c.lo, c.hi, c.flo, c.fhi):
                np.testing.assert_array_equal(evaluate_printed(e, env), evaluate(e, env))


def test_opaque_atoms_are_reported_and_never_full():
    plan = plan_of("document")
    assert not plan.exact and plan.needs_block_map
    assert [str(a) for a in plan.opaque] == ["Eq(doc(i), doc(j))"]
    tiles = classify("document", 128, 128, 16, 16)
    assert not np.any(tiles == FULL)
    np.testing.assert_array_equal(tiles == EMPTY, np.triu(np.ones((8, 8), bool), 1))
    assert "Mod" in str(plan_of("dilated").opaque[0])
    assert not plan_of("halved_max").exact


def test_sympy_rewrites_dims_to_integers():
    plan = analyse_mask(sp.And(j <= i, i - j < w), i, j)
    (conj,) = plan.conjuncts
    assert [str(g) for g in conj.guards] == ["1 - window <= 0"]
    assert conj.key_lo == sp.Max(0, plan.i - sp.Symbol("window", integer=True) + 1)
    assert analyse_mask(sp.false, i, j).conjuncts == ()
    assert len(analyse_mask(sp.true, i, j).conjuncts) == 1
    # a symbol named like a tile bound stays a symbol: the bounds take other names
    user_i0 = sp.Symbol("i0", integer=True)
    plan = analyse_mask(j <= user_i0, i, j)
    assert plan.i0.name not in ("i0", "i1") and plan.i1.name != "i0"
    assert plan.conjuncts[0].key_hi == sp.Min(plan.m - 1, user_i0)


PY_TL = SimpleNamespace(maximum=max, minimum=min)


def run_printed(expr, **values):
    return eval(to_triton(expr), {"tl": PY_TL}, values)


def test_to_triton_text():
    a, b, x = sp.symbols("i0 window x", integer=True)
    assert to_triton(sp.Max(a, 3) - b + 1) == "(1 + tl.maximum(3, i0) - window)"
    assert to_triton(sp.Min(a, b, x)) == "tl.minimum(tl.minimum(i0, window), x)"
    assert to_triton(sp.floor(a / 4)) == "((i0 - (i0 % 4 + 4) % 4) // 4)"
    assert to_triton(sp.ceiling(a / 2)).startswith("(-(")
    with pytest.raises(TypeError):
        to_triton(a / 2)


@pytest.mark.parametrize("expr", ["floor((i0 - window) / 3)", "ceiling((2*i0 + window) / 5)",
                                  "Max(i0 - 7, ceiling(window / 4)) + Min(i0, 2*window - 1)",
                                  "floor(Min(i0, window) / 2) - 3*ceiling(i0 / 3)"])
def test_to_triton_evaluates_like_sympy(expr):
    a_, b_ = sp.symbols("i0 window", integer=True)
    e = sp.sympify(expr, locals={"i0": a_, "window": b_})
    for a in range(-9, 10):
        for b in (-5, 0, 3, 8):
            want = int(e.subs({a_: a, b_: b}))
            assert run_printed(e, i0=a, window=b) == want
            assert evaluate(e, {"i0": a, "window": b}) == want


class CInt(int):
    """An int with C (Triton) semantics: // and % truncate toward zero."""

    def __floordiv__(self, o):
        q = abs(int(self)) // abs(int(o))
        return CInt(q if (self < 0) == (o < 0) else -q)

    def __mod__(self, o):
        return CInt(int(self) - int(o) * int(self // o))

    def __add__(self, o):
        return CInt(int(self) + int(o))

    def __sub__(self, o):
        return CInt(int(self) - int(o))

    def __rsub__(self, o):
        return CInt(int(o) - int(self))

    def __neg__(self):
        return CInt(-int(self))

    __radd__ = __add__


@pytest.mark.parametrize("expr", ["floor(x / 3)", "ceiling(x / 4)", "floor((2*x - 1) / 6)"])
def test_to_triton_division_is_independent_of_semantics(expr):
    """Triton's integer // and % truncate; the printed floor must not care."""
    x_ = sp.Symbol("x", integer=True)
    e = sp.sympify(expr, locals={"x": x_})
    assert CInt(-7) // 2 == -3 and CInt(-7) % 2 == -1
    for x in range(-13, 14):
        assert eval(to_triton(e), {}, {"x": CInt(x)}) == int(e.subs(x_, x))
