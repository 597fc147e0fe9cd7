"""The call-time check of guarded reads (`passes.read_guards`), shared by both backends.

A read whose index sympy cannot keep inside its tensor is evaluated exactly over its
index space for the call's dims and params: where it leaves the tensor, some guarding
mask must exclude the point, else the call is an error naming the input, the index
value, the point and the spec line (with a caret). The guards read no tensor, so for an
index that reads none either one check per program and set of scalars suffices; an index
computed from a tensor is checked on every call. `bind` runs the check for every backend
and the reference executor runs it again (free for the cached part) for direct use.
"""
from __future__ import annotations

import weakref

import torch

from . import ir
from .errors import ShapeError, SpecError
from .reference import Reference, align
from attncc.passes.read_guards import CheckedRead, checked_reads

_MAX_REMEMBERED = 256  # sets of scalars remembered per program as checked
_PASSED: "weakref.WeakKeyDictionary[ir.Program, set]" = weakref.WeakKeyDictionary()


class GuardedReadError(ShapeError, IndexError):
    """A read leaves its tensor, for this call's dims and params, at a point no mask excludes."""


def check_reads(program: ir.Program, scalars: dict, tensors: dict | None = None):
    """Raise `GuardedReadError` when a checked read leaves its tensor at an allowed point.
    Reads whose index reads a tensor are checked only when `tensors` are given."""
    reads = checked_reads(program)
    fixed = [r for r in reads if not r.data]
    key = tuple(sorted(scalars.items()))
    passed = _PASSED.setdefault(program, set())
    if fixed and key not in passed:
        _check_all(Reference(program, {}, scalars), fixed)
        if len(passed) >= _MAX_REMEMBERED:
            passed.clear()
        passed.add(key)
    varying = [r for r in reads if r.data]
    if varying and tensors is not None:
        _check_all(Reference(program, tensors, scalars), varying)


def _check_all(ref, reads):
    ref.chunk_index = None  # the indices' values are evaluated whole, without streaming
    with torch.no_grad():
        for read in reads:
            _check(ref, read)


def _check(ref, read: CheckedRead):
    arg = read.arg
    size = _value(read.size, ref.scalars)
    if read.bounds is not None:  # the interval bounds for this call's scalars: no grid when they suffice
        lo, hi = (_value(b, ref.scalars) for b in read.bounds)
        if 0 <= lo and hi < size:
            return
    value = ref.value(arg)
    outside = (value < 0) | (value >= size)
    if not bool(outside.any()):
        return
    space = ir.union_indices([arg, *(m.pred for m in read.guards)])
    outside = align(outside, arg.indices, space)
    for m in read.guards:
        outside = outside & align(ref.value(m.pred).to(torch.bool), m.pred.indices, space)
    if not bool(outside.any()):
        return
    point = [int(x) for x in torch.nonzero(outside)[0]]
    at = dict(zip(space, point))
    bad = int(align(value, arg.indices, space).expand(outside.shape)[tuple(point)])
    where = " at " + ", ".join(f"{ix} = {v}" for ix, v in at.items()) if at else ""
    masked = "no mask excludes it" if read.guards else "no mask over these indices guards this read"
    name = read.access.array.name
    raise GuardedReadError(SpecError(
        f"index {bad} is out of range for dim {read.dim} of '{name}' (size {size}){where}, and {masked}",
        ref.p.source, read.access.loc,
        "indices inside the tensor wherever the masks allow the point (clamp them, or add a mask that "
        "excludes these points)").render())


def _value(expr, scalars: dict) -> int:
    return int(expr.xreplace({s: scalars[s.name] for s in expr.free_symbols}))
