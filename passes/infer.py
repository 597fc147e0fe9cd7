"""Index extents and shape checks: the first pass after the frontend.

Every index variable gets one program-wide extent, read from the tensor axes it
indexes directly (`q[b,h,i,d]` gives `i` the extent of q's third dim) and from
block reductions (`i by 64 as qb` gives `qb` the extent `ceiling(N / 64)`). Two
uses that disagree are an error unless a `require` makes the dims equal.
"""
from __future__ import annotations

import sympy

from attncc import ir
from attncc.errors import SpecError

_SYMPY_BINARY = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b, "//": lambda a, b: sympy.floor(a / b), "%": sympy.Mod,
    "**": lambda a, b: a ** b, "min": sympy.Min, "max": sympy.Max,
    "==": sympy.Eq, "!=": sympy.Ne, "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge,
    "and": sympy.And, "or": sympy.Or,
}
_SYMPY_UNARY = {"neg": lambda a: -a, "not": sympy.Not, "abs": sympy.Abs, "exp": sympy.exp,
                "log": sympy.log, "sqrt": sympy.sqrt}


def symbol(name: str, dtype: str = ir.INT) -> sympy.Symbol:
    """The sympy symbol of a dim, param or index (integers are marked so for sympy's algebra)."""
    if dtype == ir.INT:
        return sympy.Symbol(name, integer=True)
    return sympy.Symbol(name, real=True)


def to_sympy(node: ir.Node) -> sympy.Expr:
    """A sympy expression of a node built from scalars, indices, constants and arithmetic."""
    if isinstance(node, ir.Scalar):
        if node.role == "dim":
            return sympy.Symbol(node.name, integer=True, positive=True)
        return symbol(node.name, node.dtype)
    if isinstance(node, ir.Index):
        return sympy.Symbol(node.name, integer=True, nonnegative=True)
    if isinstance(node, ir.Const):
        return sympy.sympify(node.value)
    if isinstance(node, ir.Map):
        args = [to_sympy(a) for a in node.args]
        if node.op in _SYMPY_BINARY and len(args) == 2:
            return _SYMPY_BINARY[node.op](*args)
        if node.op in _SYMPY_UNARY and len(args) == 1:
            return _SYMPY_UNARY[node.op](*args)
        if node.op == "clamp":
            return sympy.Min(sympy.Max(args[0], args[1]), args[2])
        if node.op == "where":
            return sympy.Piecewise((args[1], args[0]), (args[2], True))
    raise NotImplementedError(f"no symbolic form for {type(node).__name__} {getattr(node, 'op', '')}")


def dim_equalities(program: ir.Program) -> dict[sympy.Symbol, sympy.Symbol]:
    """`require N == M` (alone or inside `and`) lets M stand for N in shape checks."""
    subs: dict[sympy.Symbol, sympy.Symbol] = {}

    def visit(cond):
        if isinstance(cond, ir.Map) and cond.op == "and":
            for a in cond.args:
                visit(a)
        elif isinstance(cond, ir.Map) and cond.op == "==" and \
                all(isinstance(a, ir.Scalar) and a.role == "dim" for a in cond.args):
            a, b = (to_sympy(x).xreplace(subs) for x in cond.args)
            if a != b:
                subs[b] = a
                for k, v in list(subs.items()):
                    subs[k] = v.xreplace({b: a})

    for req in program.requires:
        visit(req.cond)
    return subs


def _same(a: sympy.Expr, b: sympy.Expr, subs) -> bool:
    return sympy.simplify(a.xreplace(subs) - b.xreplace(subs)) == 0


def infer_extents(program: ir.Program) -> ir.Program:
    """Fill `program.extent` and check outputs against their declared dims."""
    subs = dim_equalities(program)
    origin: dict[str, str] = {}
    extent = program.extent
    nodes = program.nodes()
    changed = True
    while changed:
        changed = False
        for node in nodes:
            for name, ext, where, loc in _extent_facts(node, extent):
                if name not in extent:
                    extent[name], origin[name] = ext, where
                    changed = True
                elif not _same(extent[name], ext, subs):
                    raise SpecError(
                        f"index '{name}' ranges over {extent[name]} ({origin[name]}) but over {ext} here "
                        f"({where})", program.source, loc,
                        f"the same range, or `require {extent[name]} == {ext}` if they are equal")
    for node in nodes:
        for ix in node.indices:
            if ix not in extent:
                raise SpecError(f"index '{ix}' never indexes a tensor, so its range is unknown",
                                program.source, _index_loc(node, ix),
                                "an input or defined tensor accessed with it, e.g. `q[b, h, " + ix + ", d]`")
    _check_masks_apply(program)
    for out in program.outputs:
        for axis, dim in zip(out.axes, out.dims):
            if not _same(extent[axis], dim, subs):
                raise SpecError(f"output '{out.name}' is declared with dim {dim} where its index '{axis}' "
                                f"ranges over {extent[axis]}", program.source, out.loc,
                                f"{extent[axis]} in the output declaration")
    return program


def _check_masks_apply(program: ir.Program):
    """A mask that no reduction, normalisation or selection sees is almost surely a
    mistake (index names that do not match those of the scores)."""
    applied = {id(m) for node in program.graph for m in program.masks_on(node)}
    for m in program.masks:
        if id(m) not in applied:
            raise SpecError(f"this mask over ({', '.join(m.pred.indices)}) applies to nothing: no softmax, "
                            "sum or selection runs along these indices over a tensor that has them all",
                            program.source, m.loc, "a mask over the indices of the scores, e.g. `mask j <= i`")


def _extent_facts(node: ir.Node, extent):
    """(index, extent, description, location) facts a node states about its indices."""
    if isinstance(node, ir.Access):
        array = node.array
        for k, arg in enumerate(node.args):
            if not isinstance(arg, ir.Index):
                continue
            if isinstance(array, ir.Input):
                yield arg.name, array.dims[k], f"dim {k} of input '{array.name}'", arg.loc
            elif node.axes[k] in extent:
                yield arg.name, extent[node.axes[k]], f"axis '{node.axes[k]}' of a defined tensor", arg.loc
    elif isinstance(node, ir.Reduce) and node.block is not None and node.block.index in extent:
        size = to_sympy(node.block.size)
        yield node.block.name, sympy.ceiling(extent[node.block.index] / size), \
            f"blocks of {size} along '{node.block.index}'", node.loc


def _index_loc(node: ir.Node, name: str):
    if isinstance(node, ir.Index):
        return node.loc
    for op in node.operands():
        if name in op.indices:
            return _index_loc(op, name)
    return node.loc
