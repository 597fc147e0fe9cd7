"""Symbolic analysis of attention masks: which tiles to visit, which need masking.

A mask is a sympy boolean predicate over the query index ``i``, the key index
``j`` and scalar parameters (dims, integer params, runtime per-batch scalars,
boolean switches).  :func:`analyse_mask` rewrites it into a disjunction of
:class:`Conjunct` s.  Each conjunct holds

* half-planes ``a*i + b*j >= rhs`` (coprime integers ``a, b``; ``rhs`` an
  integer-valued expression of the parameters),
* guards: conditions on parameters only (``causal``, ``window >= 1``),
* opaque atoms: conditions on ``i, j`` that are not affine (``doc(i) == doc(j)``,
  ``Mod(i, w) < 3``, tensor lookups); they may be true or false anywhere.

From the half-planes each conjunct derives, as sympy integer expressions, the
rows it allows, the key interval of one row, and for a query tile
``[i0, i1]`` (inclusive, in bounds) a key range containing every allowed key
and a key range in which every key is allowed.  All of them are clipped to the
index domain ``0 <= i < N``, ``0 <= j < M`` so they are finite and printable.

Symbols in the plan are re-created by name with ``integer=True`` (sympy then
knows ``ceiling(i - w + 1) == i - w + 1``); refer to them by name.  The dims
default to ``N`` and ``M``; the tile bounds are ``plan.i0`` and ``plan.i1`` (named ``i0``
and ``i1`` unless the predicate has symbols of these names).

Tile classification counts only in-bounds points (``i < N``, ``j < M``): a tile
that sticks out of the matrix can be FULL, the kernel masks bounds separately.

This module is analysis only: the plan is data (sympy expressions), evaluated here with
integer arithmetic (:func:`evaluate`); ``codegen/mask_code.py`` prints it as Triton.
Per call, :func:`active_conjuncts` says which conjuncts the runtime values switch on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, reduce
from math import gcd, lcm

import numpy as np
import sympy as sp
from sympy.core.relational import Relational
from sympy.logic.boolalg import BooleanFunction, to_dnf, to_nnf
from sympy.polys.polyerrors import PolynomialError

EMPTY, PARTIAL, FULL = 0, 1, 2

# Bounds on the symbolic work of one mask. Expanding `and`s of `or`s into a disjunction
# can grow exponentially (20 clauses `(a or b)` give 2**20 conjuncts), and so can splitting
# nested `min`/`max`/`abs`; past these sizes `analyse_mask` raises `MaskTooComplex` and the
# caller treats the mask as opaque (evaluated per element, tiles found by a block map).
MAX_CONJUNCTS = 32
MAX_LITERALS = 256
# Tile bounds are int32 arithmetic in the kernel (and rearranging `j - C <= i` into
# `j <= i + C` can overflow even int64): a mask with a larger constant is opaque too.
MAX_BOUND_CONSTANT = 2 ** 30


class MaskTooComplex(ValueError):
    """The mask's disjunctive normal form would exceed `MAX_CONJUNCTS` conjuncts or
    `MAX_LITERALS` literals; a caller falls back to an opaque mask."""


@dataclass(frozen=True)
class HalfPlane:
    """The integer constraint ``a*i + b*j >= rhs``."""

    a: int
    b: int
    rhs: sp.Expr

    def negated(self) -> HalfPlane:
        """Over integers ``not (x >= r)`` is ``-x >= 1 - r``, again a half-plane."""
        return HalfPlane(-self.a, -self.b, 1 - self.rhs)

    def at(self, i: sp.Expr) -> sp.Expr:
        """The key bound this plane puts on row ``i`` (lower if ``b > 0``, upper if ``b < 0``)."""
        if self.b > 0:
            return sp.ceiling((self.rhs - self.a * i) / self.b)
        return sp.floor((self.a * i - self.rhs) / -self.b)

    @property
    def rising(self) -> bool:
        """Whether the key bound is non-decreasing in ``i``; picks the extreme row of a tile."""
        return self.a * self.b <= 0


@dataclass(frozen=True)
class _Guard:
    """A condition on parameters only, decided once the runtime values are known."""

    cond: sp.Basic

    def negated(self) -> _Guard:
        return _Guard(sp.Not(self.cond))


@dataclass(frozen=True)
class _Opaque:
    """A non-affine condition on ``i, j``: unknown at analysis time."""

    cond: sp.Basic

    def negated(self) -> _Opaque:
        return _Opaque(sp.Not(self.cond))


def _half_plane(a, b, c, strict: bool) -> HalfPlane:
    """``a*i + b*j + c > 0`` (or ``>= 0``) with rational slopes, tightened to integers."""
    scale = lcm(sp.Rational(a).q, sp.Rational(b).q)
    a, b, c = int(a * scale), int(b * scale), c * scale
    bound = sp.floor(-c) + 1 if strict else sp.ceiling(-c)  # a*i + b*j is an integer
    g = gcd(a, b)
    return HalfPlane(a // g, b // g, sp.ceiling(bound / g))


class _Normaliser:
    """Turns a predicate into a formula over fresh boolean symbols, one per literal.

    Keeping literals behind symbols lets sympy's ``to_dnf`` do the boolean work
    without touching (or re-canonicalising) the arithmetic inside them.
    """

    def __init__(self, symbols: dict[str, sp.Symbol], i: sp.Symbol, j: sp.Symbol):
        self.symbols, self.i, self.j = symbols, i, j
        self.literals: dict[sp.Symbol, HalfPlane | _Guard | _Opaque] = {}

    def literal(self, lit) -> sp.Symbol:
        if len(self.literals) >= MAX_LITERALS:
            raise MaskTooComplex(f"the mask has more than {MAX_LITERALS} comparisons once min, max and abs "
                                 "are expanded")
        sym = sp.Dummy("lit")
        self.literals[sym] = lit
        return sym

    def guard(self, cond: sp.Basic) -> sp.Basic:
        return cond if cond in (sp.true, sp.false) else self.literal(_Guard(cond))

    def integer(self, e: sp.Basic) -> sp.Basic:
        names = {s: self.symbols.get(s.name, sp.Symbol(s.name, integer=True)) for s in e.free_symbols}
        return e.xreplace(names)

    def formula(self, e: sp.Basic) -> sp.Basic:
        if e in (sp.true, sp.false):
            return e
        if isinstance(e, (sp.And, sp.Or, sp.Not)):
            return e.func(*map(self.formula, e.args))
        if isinstance(e, BooleanFunction):  # Implies, Xor, ITE, ...
            return self.formula(e.to_nnf(simplify=False))
        if isinstance(e, Relational):
            e = self.integer(e)  # may decide it, e.g. i < i + 1
        if e in (sp.true, sp.false) or not e.has(self.i, self.j):
            return self.guard(e)
        if isinstance(e, Relational):
            return self.relational(e)
        return self.literal(_Opaque(e))

    def relational(self, rel: Relational) -> sp.Basic:
        e = rel.lhs - rel.rhs
        if not self.kinks(e) and self.affine(e) is None:
            return self.literal(_Opaque(rel))
        op = rel.rel_op
        if op == "==":
            return sp.And(self.positive(e, False), self.positive(-e, False))
        if op == "!=":
            return sp.Or(self.positive(e, True), self.positive(-e, True))
        return self.positive(e if op[0] == ">" else -e, strict=len(op) == 1)

    def kinks(self, e: sp.Expr) -> list[sp.Expr]:
        """Outermost Max/Min/Abs terms that depend on ``i`` or ``j``."""
        found = [t for t in e.atoms(sp.Max, sp.Min, sp.Abs) if t.has(self.i, self.j)]
        return [t for t in found if not any(u != t and u.has(t) for u in found)]

    def affine(self, e: sp.Expr):
        """``(a, b, c)`` with ``e = a*i + b*j + c`` and rational ``a, b``, else None."""
        try:
            p = sp.Poly(e, self.i, self.j)
        except PolynomialError:
            return None
        a, b = p.coeff_monomial(self.i), p.coeff_monomial(self.j)
        if p.total_degree() > 1 or not (a.is_Rational and b.is_Rational):
            return None
        return a, b, p.coeff_monomial(1)

    def positive(self, e: sp.Expr, strict: bool) -> sp.Basic:
        """Formula for ``e > 0`` (strict) or ``e >= 0``."""
        kinks = self.kinks(e)
        if kinks:
            return self.split(e, kinks[0], strict)
        coeffs = self.affine(e)
        if coeffs is None:
            return self.literal(_Opaque(e > 0 if strict else e >= 0))
        a, b, c = coeffs
        if a == b == 0:
            return self.guard(c > 0 if strict else c >= 0)
        return self.literal(_half_plane(a, b, c, strict))

    def split(self, e: sp.Expr, t: sp.Expr, strict: bool) -> sp.Basic:
        """Expand a Max/Min/Abs that ``e`` depends on linearly into an Or/And of
        its arguments; anywhere else (under floor, times a parameter) it is opaque."""
        x = sp.Dummy("x")
        linear = e.xreplace({t: x})
        k = linear.diff(x)
        if not (k.is_Rational and k != 0 and not (linear - k * x).has(x)):
            return self.literal(_Opaque(e > 0 if strict else e >= 0))
        args = (t.args[0], -t.args[0]) if isinstance(t, sp.Abs) else t.args
        # e is monotone in t: a large Max needs one argument, a large Min all of them
        combine = sp.Or if (k > 0) == (not isinstance(t, sp.Min)) else sp.And
        return combine(*(self.positive(linear.xreplace({x: u}), strict) for u in args))

    def conjuncts(self, formula: sp.Basic) -> list[list]:
        """Literal lists of the DNF of ``formula`` (its size is bounded before it is built)."""
        formula = to_nnf(formula, simplify=False)
        size = _dnf_size(formula)
        if size > MAX_CONJUNCTS:
            raise MaskTooComplex(f"the mask expands to {size} alternatives (the limit is {MAX_CONJUNCTS})")
        dnf = to_dnf(formula, simplify=False)
        if dnf == sp.false:
            return []
        terms = dnf.args if isinstance(dnf, sp.Or) else (dnf,)
        ordered = sorted((sorted((lit for lit in sp.And.make_args(term) if lit != sp.true), key=self.order)
                          for term in terms), key=lambda lits: [self.order(lit) for lit in lits])
        return [[self.resolve(lit) for lit in lits] for lits in ordered]

    @staticmethod
    def order(lit: sp.Basic) -> tuple[int, bool]:
        """Literals in the order they were made: sympy orders Dummy symbols by hash, which
        changes between runs, and generated code (and its cache key) must not."""
        negated = isinstance(lit, sp.Not)
        return ((lit.args[0] if negated else lit).dummy_index, negated)

    def resolve(self, lit: sp.Basic):
        if isinstance(lit, sp.Not):
            return self.literals[lit.args[0]].negated()
        return self.literals[lit]


def _dnf_size(formula: sp.Basic) -> int:
    """An upper bound on the number of conjuncts in the DNF of a negation normal form:
    sums over `Or`, products over `And`, computed bottom-up without recursion and capped
    just past `MAX_CONJUNCTS` so the numbers stay small."""
    size: dict = {}
    stack = [formula]
    while stack:
        e = stack[-1]
        if e in size:
            stack.pop()
            continue
        if isinstance(e, (sp.And, sp.Or)):
            pending = [a for a in e.args if a not in size]
            if pending:
                stack.extend(pending)
                continue
            parts = [size[a] for a in e.args]
            total = sum(parts) if isinstance(e, sp.Or) else reduce(lambda x, y: x * y, parts, 1)
            size[e] = min(total, MAX_CONJUNCTS + 1)
        else:
            size[e] = 0 if e == sp.false else 1
        stack.pop()
    return size[formula]


@dataclass(frozen=True)
class Conjunct:
    """One DNF term with its key bounds; all expressions are clipped to the domain.

    For row ``i`` (the plan's ``i`` symbol) the allowed keys are exactly
    ``[key_lo, key_hi]`` when ``row_lo <= i <= row_hi`` and all guards hold
    (none otherwise), up to the opaque atoms, which can only remove keys.
    For the query tile ``[i0, i1]`` (``i1`` clipped to ``N - 1``): no key is
    allowed unless ``max(i0, row_lo) <= min(i1, row_hi)``, and then every
    allowed key lies in ``[lo, hi]`` (a superset, tight when the key bounds are
    monotone in ``i``). If ``row_lo <= i0``, ``i1 <= row_hi`` and there are no
    opaque atoms, every key in ``[flo, fhi]`` is allowed for every row of the
    tile (a subset, tight for a single conjunct with monotone key bounds).
    """

    planes: tuple[HalfPlane, ...]
    guards: tuple[sp.Basic, ...]
    opaque: tuple[sp.Basic, ...]
    row_lo: sp.Expr
    row_hi: sp.Expr
    key_lo: sp.Expr
    key_hi: sp.Expr
    lo: sp.Expr
    hi: sp.Expr
    flo: sp.Expr
    fhi: sp.Expr


@dataclass(frozen=True)
class MaskPlan:
    """The analysed mask: a disjunction of conjuncts and the symbols they use."""

    conjuncts: tuple[Conjunct, ...]
    opaque: tuple[sp.Basic, ...]
    i: sp.Symbol
    j: sp.Symbol
    n: sp.Symbol
    m: sp.Symbol
    i0: sp.Symbol
    i1: sp.Symbol

    @property
    def exact(self) -> bool:
        """Whether the bounds decide every tile without evaluating the mask."""
        return not self.opaque

    @property
    def needs_block_map(self) -> bool:
        """Opaque atoms leave tile emptiness to a runtime block map."""
        return not self.exact


def _eliminate_j(planes: list[HalfPlane]) -> tuple[list[HalfPlane], list[sp.Basic]]:
    """Fourier-Motzkin: each lower/upper key-bound pair implies a constraint on ``i``.

    The constraints hold over the reals, hence over the integers, so adding
    them is sound; they mark rows (or parameter values) with no key at all.
    """
    rows, guards = [], []
    for lower in (p for p in planes if p.b > 0):
        for upper in (p for p in planes if p.b < 0):
            # b_l*j >= r_l - a_l*i and |b_u|*j <= a_u*i - r_u
            a = lower.b * upper.a - upper.b * lower.a
            r = -upper.b * lower.rhs + lower.b * upper.rhs
            if a == 0:
                guards.append(sp.Le(r, 0))
            else:
                rows.append(_half_plane(a, 0, -r, strict=False))
    return rows, guards


def _conjunct(literals: list, plan: MaskPlan) -> Conjunct | None:
    """Bounds of one DNF term, or None if it can never hold."""
    i, n, m, i0, i1 = plan.i, plan.n, plan.m, plan.i0, plan.i1
    planes = [p for p in literals if isinstance(p, HalfPlane)]
    domain = [HalfPlane(1, 0, 0), HalfPlane(-1, 0, 1 - n), HalfPlane(0, 1, 0), HalfPlane(0, -1, 1 - m)]
    implied_rows, implied_guards = _eliminate_j(planes + domain)
    guards = [g.cond for g in literals if isinstance(g, _Guard)] + implied_guards
    if sp.false in guards:
        return None
    guards = [g for g in dict.fromkeys(guards) if g != sp.true]
    rows = [p for p in planes + domain + implied_rows if p.b == 0]
    lower = [p for p in planes + domain if p.b > 0]
    upper = [p for p in planes + domain if p.b < 0]
    row_lo = sp.Max(*(p.rhs for p in rows if p.a > 0))
    row_hi = sp.Min(*(-p.rhs for p in rows if p.a < 0))
    r0, r1 = sp.Max(i0, row_lo), sp.Min(i1, row_hi)
    return Conjunct(
        planes=tuple(planes),
        guards=tuple(guards),
        opaque=tuple(o.cond for o in literals if isinstance(o, _Opaque)),
        row_lo=row_lo,
        row_hi=row_hi,
        key_lo=sp.Max(*(p.at(i) for p in lower)),
        key_hi=sp.Min(*(p.at(i) for p in upper)),
        lo=sp.Max(*(p.at(r0 if p.rising else r1) for p in lower)),
        hi=sp.Min(*(p.at(r1 if p.rising else r0) for p in upper)),
        flo=sp.Max(*(p.at(i1 if p.rising else i0) for p in lower)),
        fhi=sp.Min(*(p.at(i0 if p.rising else i1) for p in upper)),
    )


def analyse_mask(pred, i, j, n="N", m="M") -> MaskPlan:
    """Analyse ``pred`` over query index ``i`` and key index ``j``; ``n, m`` name the dims."""
    names = {str(s) for s in (i, j, n, m)}
    pred = sp.sympify(pred)
    taken = {s.name for s in pred.free_symbols} | names
    # the tile bounds are named i0 and i1 unless the predicate uses those names itself
    # (a dim called i0): then a fresh name, since a user's symbol must not become a bound
    i0, i1 = (next(b + "_" * k for k in range(len(taken) + 1) if b + "_" * k not in taken) for b in ("i0", "i1"))
    dims = {str(d): sp.Symbol(str(d), integer=True, positive=True) for d in (n, m)}
    idx = {str(s): sp.Symbol(str(s), integer=True) for s in (i, j)}
    plan = MaskPlan((), (), idx[str(i)], idx[str(j)], dims[str(n)], dims[str(m)],
                    sp.Symbol(i0, integer=True), sp.Symbol(i1, integer=True))
    big = [r for r in pred.atoms(sp.Rational) if max(abs(r.p), r.q) > MAX_BOUND_CONSTANT]
    if big:
        raise MaskTooComplex(f"the constant {big[0]} is too large for the kernel's int32 tile bounds")
    norm = _Normaliser({**dims, **idx}, plan.i, plan.j)
    terms = norm.conjuncts(norm.formula(pred))
    conjuncts = tuple(c for c in (_conjunct(t, plan) for t in terms) if c is not None)
    opaque = tuple(dict.fromkeys(o for c in conjuncts for o in c.opaque))
    return replace(plan, conjuncts=conjuncts, opaque=opaque)


# ---------------------------------------------------------------- evaluation

def integer_fraction(x: sp.Expr) -> tuple[sp.Expr, int]:
    """``x`` as ``num / den`` with integer coefficients in ``num`` (``floor(x)`` is then the
    integer division ``num // den``)."""
    x = sp.expand(x)
    den = lcm(*(sp.Rational(t.as_coeff_Mul()[0]).q for t in sp.Add.make_args(x)))
    return sp.expand(x * den), den


@lru_cache(maxsize=None)
def _numeric(e: sp.Expr):
    """An integer-valued plan expression as a function of its symbols' values (a dict by
    name; Python ints or numpy int arrays). Integer arithmetic only: ``floor`` and
    ``ceiling`` of rationals are floor divisions, ``Max``/``Min`` numpy's elementwise ones.
    The expressions ``codegen.mask_code.to_triton`` prints: anything else is a TypeError."""
    if e.is_Integer:
        value = int(e)
        return lambda env: value
    if e.is_Symbol:
        name = e.name
        return lambda env: env[name]
    if isinstance(e, (sp.Max, sp.Min)):
        fn = np.maximum if isinstance(e, sp.Max) else np.minimum
        first, *rest = (_numeric(a) for a in e.args)
        return lambda env: reduce(lambda acc, f: fn(acc, f(env)), rest, first(env))
    if isinstance(e, sp.Abs):
        return _numeric(sp.Max(e.args[0], -e.args[0], evaluate=False))
    if isinstance(e, (sp.floor, sp.ceiling)):
        num, den = integer_fraction(e.args[0])
        f = _numeric(num)
        if isinstance(e, sp.floor):
            return lambda env: f(env) // den
        return lambda env: -(-f(env) // den)
    if e.is_Add:
        first, *rest = (_numeric(a) for a in e.args)
        return lambda env: reduce(lambda acc, f: acc + f(env), rest, first(env))
    if e.is_Mul:
        coeff, factors = e.as_coeff_mul()
        if coeff.is_Integer:
            c, parts = int(coeff), [_numeric(f) for f in factors]
            return lambda env: reduce(lambda acc, f: acc * f(env), parts, c)
    raise TypeError(f"cannot evaluate {e} as integer arithmetic")


def evaluate(expr, values: dict):
    """Value of a plan expression for Python ints or numpy int arrays; ``values`` maps
    symbols (or their names) to values."""
    return _numeric(sp.sympify(expr))(_by_name(values))


# ---------------------------------------------------------------- tiles

def _by_name(values: dict) -> dict:
    """Plan symbols differ from the caller's in assumptions only, so values go by name."""
    return {str(k): v for k, v in values.items()}


def _holds(cond: sp.Basic, values: dict) -> bool:
    """Decide a guard; an undecided one would make every later answer a guess."""
    out = cond.xreplace({s: sp.sympify(values[s.name]) for s in cond.free_symbols})
    if out not in (sp.true, sp.false):
        raise ValueError(f"guard {cond} is not decided by the given values")
    return bool(out)


def _active(plan: MaskPlan, N: int, M: int, values) -> tuple[dict, list[Conjunct]]:
    """Named runtime values (dims included) and the conjuncts whose guards hold."""
    env = {**_by_name(values or {}), plan.n.name: N, plan.m.name: M}
    return env, [c for c in plan.conjuncts if all(_holds(g, env) for g in c.guards)]


def active_conjuncts(plan: MaskPlan, N: int, M: int, values=None) -> list[Conjunct]:
    """The conjuncts of the mask that can hold for one call: those whose guards (conditions
    on parameters only, such as `causal` or `window >= 1`) hold for these values.

    ``N`` and ``M`` are the call's query and key extents; ``values`` maps every other
    parameter a guard names (dims, params, by name or symbol) to its int or bool. A guard
    these values do not decide is a ValueError. The launcher picks a call's kernels from
    the result (``passes.linear.choose_path``): no active conjunct restricting the pairs
    means no mask applies, a single ``j <= i`` means a plain causal mask."""
    return _active(plan, N, M, values)[1]


def _row_intervals(c: Conjunct, plan: MaskPlan, env: dict, j0, j1):
    """Per (row, key tile): the conjunct's allowed keys inside the tile, as ``lo, hi``
    arrays (``lo > hi`` when there are none)."""
    rows = np.arange(env[plan.n.name])
    at_row = {**env, plan.i.name: rows}
    key_lo = np.broadcast_to(evaluate(c.key_lo, at_row), rows.shape)
    key_hi = np.broadcast_to(evaluate(c.key_hi, at_row), rows.shape)
    valid = (rows >= evaluate(c.row_lo, env)) & (rows <= evaluate(c.row_hi, env))
    lo = np.maximum(key_lo[:, None], j0[None, :])
    hi = np.minimum(key_hi[:, None], j1[None, :])
    return lo, np.where(valid[:, None], hi, lo - 1)


def _covered(intervals: list, j0, j1):
    """Whether the union of the intervals covers ``[j0, j1]``, per (row, key tile)."""
    lo = np.stack([iv[0] for iv in intervals])
    hi = np.stack([iv[1] for iv in intervals])
    order = np.argsort(lo, axis=0)
    lo, hi = np.take_along_axis(lo, order, 0), np.take_along_axis(hi, order, 0)
    reach = np.broadcast_to(j0 - 1, lo.shape[1:])
    for k in range(len(lo)):
        reach = np.where(lo[k] <= reach + 1, np.maximum(reach, hi[k]), reach)
    return reach >= j1


def classify_tiles(plan: MaskPlan, N: int, M: int, BM: int, BN: int, values=None) -> np.ndarray:
    """EMPTY/PARTIAL/FULL per (query tile, key tile), over in-bounds points only.

    ``values`` maps parameter names (or symbols) to ints / bools; the dims
    come from ``N`` and ``M``.

    Exact for affine masks: every row's allowed keys form one interval per
    conjunct, so emptiness and full coverage are checked row by row. Conjuncts
    with opaque atoms may hold anywhere in their affine part and never make a
    tile FULL.
    """
    env, active = _active(plan, N, M, values)
    j0 = np.arange(0, M, BN)
    j1 = np.minimum(j0 + BN, M) - 1
    hit = np.zeros((N, len(j0)), bool)
    exact = []
    for c in active:
        lo, hi = _row_intervals(c, plan, env, j0, j1)
        hit |= lo <= hi
        if not c.opaque:
            exact.append((lo, hi))
    starts = np.arange(0, N, BM)
    nonempty = np.logical_or.reduceat(hit, starts, axis=0)
    full = np.logical_and.reduceat(_covered(exact, j0, j1), starts, axis=0) if exact else False
    return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of ``[start, stop)`` spans; touching spans join so the loop runs once."""
    merged = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def key_ranges(plan: MaskPlan, N: int, M: int, BM: int, BN: int, values=None) -> list[list[tuple[int, int]]]:
    """Per query tile, the key-tile intervals ``[start, stop)`` the kernel loop visits.

    Uses the per-tile bounds ``lo, hi`` the generated kernel computes, so it
    covers every non-empty tile and may include empty ones when a conjunct's
    key bounds are not monotone in ``i``.
    """
    env, active = _active(plan, N, M, values)
    i0 = np.arange(0, N, BM)
    tile = {**env, plan.i0.name: i0, plan.i1.name: np.minimum(i0 + BM, N) - 1}
    spans = [[] for _ in i0]
    for c in active:
        r0, r1 = (np.broadcast_to(evaluate(e, tile), i0.shape)
                  for e in (sp.Max(plan.i0, c.row_lo), sp.Min(plan.i1, c.row_hi)))
        lo, hi = (np.broadcast_to(evaluate(e, tile), i0.shape) for e in (c.lo, c.hi))
        for t in np.flatnonzero((r0 <= r1) & (lo <= hi)):
            spans[t].append((int(lo[t]) // BN, int(hi[t]) // BN + 1))
    return [_merge(s) for s in spans]


# ---------------------------------------------------------------- scheduling

def longest_first(mask_plan: MaskPlan | None) -> bool:
    """Whether later query tiles visit at least as many key tiles as earlier ones, and some
    more: every conjunct's first key does not depend on the tile's rows (i0, i1) and its
    last key does not decrease with them, and some last key grows with them (causal,
    prefix-LM; not sliding windows, whose ranges move along)."""
    if mask_plan is None or not mask_plan.conjuncts:
        return False
    rows = {mask_plan.i0, mask_plan.i1}
    grows = False
    for c in mask_plan.conjuncts:
        lo, hi = sp.sympify(c.lo), sp.sympify(c.hi)
        if rows & lo.free_symbols:
            return False
        if not all(_nondecreasing(hi, r) for r in rows):
            return False
        grows = grows or bool(rows & hi.free_symbols)
    return grows


def _nondecreasing(expr, x) -> bool:
    """A sufficient syntactic test that `expr` does not decrease as symbol `x` grows."""
    if x not in expr.free_symbols:
        return True
    if expr == x:
        return True
    if isinstance(expr, (sp.Add, sp.Min, sp.Max)):
        return all(_nondecreasing(a, x) for a in expr.args)
    if isinstance(expr, sp.Mul):
        consts = [a for a in expr.args if x not in a.free_symbols]
        rest = [a for a in expr.args if x in a.free_symbols]
        coef = sp.Mul(*consts)
        return len(rest) == 1 and coef.is_positive is True and _nondecreasing(rest[0], x)
    return False
