"""Index extents and shape checks: the first pass after the frontend.

Every index variable gets one program-wide extent, read from the tensor axes it
indexes directly (`q[b,h,i,d]` gives `i` the extent of q's third dim) and from
block reductions (`i by 64 as qb` gives `qb` the extent `ceiling(N / 64)`). Two
uses that disagree are an error unless a `require` makes the dims equal.
"""
from __future__ import annotations

import networkx as nx
import sympy

from attncc import ir
from attncc.errors import SpecError
from attncc.syntax import INT_MAX

# How many operations deep a value may be computed, counting through the statements and
# lets it reads. Later passes walk the graph recursively; each spec expression is already
# at most `syntax.MAX_DEPTH` deep, and this bounds chains of statements (`s += 1` repeated).
MAX_IR_DEPTH = 200
# `N ** 99999999`: the host would compute the exact integer power; past this magnitude of
# constant exponent an integer base of 2 or more overflows a float (or underflows) anyway.
MAX_INT_EXPONENT = 1024

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
    """A sympy expression of a node built from scalars, indices, constants and arithmetic.

    Iterative and memoised by node: lets that reuse each other (`let a2 = a1 + a1`) form a
    DAG, which a plain recursive walk would expand exponentially."""
    memo: dict[ir.Node, sympy.Expr] = {}
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        if isinstance(n, ir.Map):
            pending = [a for a in n.args if a not in memo]
            if pending:
                stack.extend(pending)
                continue
        memo[n] = _sympy_of(n, memo)
        stack.pop()
    return memo[node]


def host_evaluable(node: ir.Node) -> bool:
    """Whether the launcher can evaluate a scalar node from dims and params (a sympy form);
    other scalars (a read `w[2]`, a full reduction `sum(w[a], a)`) are loaded or precomputed."""
    try:
        to_sympy(node)
    except NotImplementedError:
        return False
    return True


def _sympy_of(node: ir.Node, memo) -> sympy.Expr:
    """One node's sympy form, its operands already in `memo`."""
    if isinstance(node, ir.Scalar):
        if node.role == "dim":
            return sympy.Symbol(node.name, integer=True, positive=True)
        return symbol(node.name, node.dtype)
    if isinstance(node, ir.Index):
        return sympy.Symbol(node.name, integer=True, nonnegative=True)
    if isinstance(node, ir.Const):
        return sympy.sympify(node.value)
    if isinstance(node, ir.Map):
        args = [memo[a] for a in node.args]
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
    check_depth(program)
    check_constants(program)
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


def check_depth(program: ir.Program):
    """Reject a mask that depends on what it masks, and a graph deeper than `MAX_IR_DEPTH`.

    A node under a mask also depends on the mask's predicate (the reference evaluates the
    predicate to evaluate the node), so both checks run on the operand graph plus an edge
    from each mask's predicate to each node it applies to, without recursion, so that no
    later recursive walk can loop forever or reach Python's recursion limit."""
    graph = program.graph.copy()
    masked_by: dict[tuple[ir.Node, ir.Node], ir.Mask] = {}
    for node in program.graph:
        for m in program.masks_on(node):
            masked_by.setdefault((m.pred, node), m)
            graph.add_edge(m.pred, node)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = []
    for edge in cycle:
        m = masked_by.get(edge[:2])
        if m is not None:
            target = edge[1]
            what = f"{getattr(target, 'op', type(target).__name__.lower())} along '{ir.reduced_axes(target)[0]}'"
            line = f" at line {target.loc.line}" if target.loc else ""
            raise SpecError(f"this mask depends on what it masks: it reads the {what}{line}, which the mask "
                            "itself restricts", program.source, m.loc,
                            "a mask that does not read the scores it applies to; select over other index "
                            "names (e.g. blocks `qb`, `kb` as in examples/topk_blocks.attn)")
    depth: dict[ir.Node, int] = {}
    for node in nx.topological_sort(graph):
        depth[node] = 1 + max((depth[op] for op in graph.predecessors(node)), default=0)
        if depth[node] > MAX_IR_DEPTH:
            raise SpecError(f"this value is computed through more than {MAX_IR_DEPTH} nested operations, "
                            "counting through the statements, lets and masks it reads", program.source,
                            node.loc, f"at most {MAX_IR_DEPTH} levels; fewer chained updates of the same tensor")


_INT_FOLD = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "min": min, "max": max, "neg": lambda a: -a, "abs": abs,
    "clamp": lambda x, lo, hi: min(max(x, lo), hi), "sign": lambda a: (a > 0) - (a < 0),
    "//": lambda a, b: a // b if b else None, "%": lambda a, b: a % b if b else None,
}


def check_constants(program: ir.Program):
    """Integer constant expressions must stay in int64 (what torch and Triton hold), and
    are decided here exactly, before sympy would compute a power like `3 ** 99999999`
    digit by digit. Every folded intermediate is at most 64 bits, so this is cheap; a
    power is judged by the size of its result before it is computed."""
    value: dict[ir.Node, int] = {}
    for node in program.nodes():
        if isinstance(node, ir.Const) and node.dtype == ir.INT:
            value[node] = node.value
        elif isinstance(node, ir.Map) and node.op == "**" and node.args[1] in value \
                and node.args[0].dtype == ir.INT and abs(value[node.args[1]]) > MAX_INT_EXPONENT:
            raise SpecError(f"the exponent {value[node.args[1]]} of an integer is out of range", program.source,
                            node.loc, f"an exponent between -{MAX_INT_EXPONENT} and {MAX_INT_EXPONENT} (beyond "
                            "them an integer power of 2 or more overflows a float), or a float base")
        elif isinstance(node, ir.Map) and node.op in ("//", "%") and node.dtype == ir.INT \
                and _is_zero(node.args[1], value):
            raise SpecError(f"integer '{node.op}' by zero", program.source, node.loc,
                            "a divisor that is not 0")
        elif isinstance(node, ir.Map) and node.args and all(a in value for a in node.args):
            args = [value[a] for a in node.args]
            if node.op == "**":
                _check_power(program, node, *args)
                continue
            fold = _INT_FOLD.get(node.op)
            result = fold(*args) if fold is not None and node.dtype == ir.INT else None
            if result is None:
                continue
            if abs(result) > INT_MAX:
                raise SpecError("this integer constant expression is out of range: its value needs more "
                                "than 64 bits", program.source, node.loc,
                                f"integers between -{INT_MAX} and {INT_MAX} (or a float, such as 2.0 ** 70)")
            value[node] = result


def _check_power(program, node, base: int, exponent: int):
    """`base ** exponent` of two integer constants (a float in the language): sympy keeps it
    exact, so one whose integer power needs more than 64 bits is refused before it is computed."""
    if abs(base) >= 2 and (abs(exponent) * (abs(base).bit_length() - 1) >= 63
                           or abs(base) ** abs(exponent) > INT_MAX):
        raise SpecError(f"the integer power {base} ** {exponent} is out of range: it needs more than 64 bits",
                        program.source, node.loc,
                        "a smaller exponent, or a float base such as 2.0 (which overflows to inf)")


def _is_zero(node: ir.Node, value: dict) -> bool:
    """Whether a divisor is 0 for every call: a constant 0, or a scalar such as `N - N`."""
    if node in value:
        return value[node] == 0
    if node.indices:
        return False
    try:
        return bool(to_sympy(node).is_zero)
    except NotImplementedError:
        return False
