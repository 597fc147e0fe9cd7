"""Reads that may leave their tensor, and the masks that guard them.

A relative-position table read `c[h, j - i + W]` indexes past the table at pairs
(i, j) far apart; a window mask excludes exactly those pairs. Such a read is
*guarded*: wherever its index leaves the tensor, one of the program's index masks
(a mask that reads no tensor, over indices of the read, sharing one with the index)
excludes the point. Both backends then read it as 0 there (the reference with the
index made safe, Triton under a bounds-masked load), so they agree, and the masks
keep those entries out of every softmax and sum.

This pass finds, for every input read, the index expressions that sympy cannot
prove in range over the whole index box, with their guarding masks. An index that
is provably out of range at some point and has no guard is a located `SpecError`
here; the rest are checked exactly per call (`attncc.read_check`): once per set of
dims and params when the index reads no tensor, on every call when it does
(`c[h, lab[b, j] + 1]`). A plain read of an int tensor as the index
(`allow[label_q[b, i], ...]`) is left to `binding._check_index_ranges`, which checks
the index tensor's range directly.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import networkx as nx
import sympy

from attncc import ir
from attncc.errors import SpecError
from attncc.passes.infer import dim_equalities, to_sympy


@dataclass(frozen=True, eq=False)
class CheckedRead:
    """Argument `dim` of the input read `access`, which sympy cannot keep inside the
    tensor's `size`; `guards` are the index masks that may exclude where it leaves."""

    access: ir.Access
    dim: int
    size: sympy.Expr
    guards: tuple[ir.Mask, ...]
    data: bool  # the index reads a tensor: checked on every call, with the call's tensors
    bounds: tuple[sympy.Expr, sympy.Expr] | None = None  # interval bounds over the box, when sympy has them

    @property
    def arg(self) -> ir.Node:
        return self.access.args[self.dim]


_CACHE: "weakref.WeakKeyDictionary[ir.Program, tuple[CheckedRead, ...]]" = weakref.WeakKeyDictionary()


def checked_reads(program: ir.Program) -> tuple[CheckedRead, ...]:
    """Every index-only read argument not provably in range, operands first (an inner
    read is checked before an outer one that depends on it). Computed once per program."""
    if program not in _CACHE:
        _CACHE[program] = tuple(_find(program))
    return _CACHE[program]


def check_static(program: ir.Program) -> ir.Program:
    """A located error for a read that leaves its tensor at some point no mask can exclude
    (`k[b, h, j + 1, d]`: j + 1 reaches M). Runs in the `ir` stage."""
    for read in checked_reads(program):
        if read.guards or read.data:
            continue
        bounds = _exact_bounds(program, read.arg)
        if bounds is None:
            continue
        lo, hi = bounds
        size = read.size.xreplace(dim_equalities(program))
        if (hi - (size - 1)).is_positive or lo.is_negative:
            name = read.access.array.name
            reach = hi if (hi - (size - 1)).is_positive else lo
            raise SpecError(f"dim {read.dim} of this read of '{name}' reaches index {reach} (size {size}), outside "
                            "the tensor, and no mask excludes those points", program.source, read.access.loc,
                            "an index inside the tensor (clamp it), or a mask over the read's indices "
                            "that excludes where it leaves")
    return program


def _find(program: ir.Program):
    subs = dim_equalities(program)
    index_masks = [m for m in program.masks if _index_only(program, m.pred)]
    for node in program.nodes():
        if not (isinstance(node, ir.Access) and isinstance(node.array, ir.Input)):
            continue
        for k, arg in enumerate(node.args):
            size = node.array.dims[k]
            if isinstance(arg, ir.Index) or _int_tensor_read(arg):
                continue
            data = not _index_only(program, arg)
            bounds = None if data else _bounds(program, arg)
            if bounds is not None and _in_range(bounds, size, subs):
                continue
            guards = tuple(m for m in index_masks if set(m.pred.indices) <= set(node.indices)
                           and set(m.pred.indices) & set(arg.indices))
            yield CheckedRead(node, k, size, guards, data, bounds)


def _int_tensor_read(arg: ir.Node) -> bool:
    """`label_q[b, i]` as an index: the binding checks the range of the int tensor itself."""
    return isinstance(arg, ir.Access) and isinstance(arg.array, ir.Input) and arg.array.dtype == ir.INT


def _index_only(program: ir.Program, node: ir.Node) -> bool:
    """Whether a value depends on indices, dims, params and constants only (no tensor data),
    also through the masks its reductions apply."""
    nodes = nx.ancestors(program.graph, node) | {node}
    if any(isinstance(n, ir.Input) for n in nodes):
        return False
    masks = {id(m): m for n in nodes for m in program.masks_on(n)}
    return all(_index_only(program, m.pred) for m in masks.values())


def _symbols(program: ir.Program, expr: sympy.Expr) -> dict[sympy.Symbol, sympy.Expr]:
    """The index symbols of `expr` (as `infer.to_sympy` makes them) and their extents."""
    return {s: program.extent[s.name] for s in expr.free_symbols
            if s.name in program.extent and s.is_nonnegative and not s.is_positive}


def _bounds(program: ir.Program, arg: ir.Node) -> tuple[sympy.Expr, sympy.Expr] | None:
    """Interval bounds of an index expression over the whole index box, or None."""
    try:
        expr = to_sympy(arg)
    except NotImplementedError:
        return None
    return _interval(expr, _symbols(program, expr))


def _in_range(bounds, size: sympy.Expr, subs) -> bool:
    """Whether sympy proves 0 <= lo and hi < size for every dim and param."""
    lo, hi = (b.xreplace(subs) for b in bounds)
    return bool(lo.is_nonnegative) and bool((size.xreplace(subs) - 1 - hi).is_nonnegative)


def _interval(expr: sympy.Expr, box: dict) -> tuple[sympy.Expr, sympy.Expr] | None:
    """Bounds of `expr` over the index box by interval arithmetic (sums, constant multiples,
    min, max); None when it has another form."""
    if expr in box:
        return sympy.Integer(0), box[expr] - 1
    if not (expr.free_symbols & set(box)):
        return expr, expr
    if expr.is_Add:
        parts = [_interval(a, box) for a in expr.args]
        if any(p is None for p in parts):
            return None
        return sympy.Add(*(p[0] for p in parts)), sympy.Add(*(p[1] for p in parts))
    if isinstance(expr, (sympy.Min, sympy.Max)):
        # Max(x, a) >= a and Min(x, b) <= b: a bound that reads no index, when there is one,
        # is the simpler (looser) one, and lets sympy decide `clamp(j - i, -2, 2) + 2 >= 0`
        parts = [_interval(a, box) for a in expr.args]
        if any(p is None for p in parts):
            return None
        f, side = (sympy.Max, 0) if isinstance(expr, sympy.Max) else (sympy.Min, 1)
        fixed = [p[side] for a, p in zip(expr.args, parts) if not (a.free_symbols & set(box))]
        both = [f(*(p[0] for p in parts)), f(*(p[1] for p in parts))]
        if fixed:
            both[side] = f(*fixed)
        return both[0], both[1]
    if expr.is_Mul:
        coeff, rest = expr.as_independent(*box)
        inner = _interval(rest, box) if coeff.is_number and rest != expr else None
        if inner is None:
            return None
        lo, hi = coeff * inner[0], coeff * inner[1]
        return (lo, hi) if coeff >= 0 else (hi, lo)
    return None


def _exact_bounds(program: ir.Program, arg: ir.Node) -> tuple[sympy.Expr, sympy.Expr] | None:
    """The minimum and maximum of an affine index expression (numeric coefficients, so
    attained at a corner of the box), or None."""
    try:
        expr = to_sympy(arg)
    except NotImplementedError:
        return None
    box = _symbols(program, expr)
    if not box or not expr.is_polynomial(*box):
        return None
    lo = hi = expr.xreplace({s: sympy.Integer(0) for s in box})
    for s, extent in box.items():
        c = sympy.diff(expr, s)
        if not c.is_number:
            return None
        if c >= 0:
            hi += c * (extent - 1)
        else:
            lo += c * (extent - 1)
    return lo, hi
