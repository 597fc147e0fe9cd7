"""Readable text forms of a spec's AST and IR, for `attncc show` and for snapshot tests.

Both forms are deterministic (same spec, same text) and point back at the spec: every
statement and node carries its line number, so a reader can follow a spec through the
stages of the compiler.
"""
from __future__ import annotations

import math
import re

import networkx as nx

from . import ir
from . import syntax as ast
from attncc.passes.infer import to_sympy

# ----------------------------------------------------------------------------- AST

# Binding strength of each operator, as in grammar/attn.lark (higher binds tighter).
_TERNARY, _OR, _AND, _NOT, _COMPARE, _SUM, _PRODUCT, _UNARY, _POWER, _POSTFIX = range(10)
_BINARY_PREC = {"or": _OR, "and": _AND, "+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT,
                "//": _PRODUCT, "%": _PRODUCT, "**": _POWER}
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}


def format_expr(e: ast.Expr, context: int = _TERNARY) -> str:
    """Source-like text of an expression, with parentheses only where the grammar needs them."""
    text, prec = _expr(e)
    return f"({text})" if prec < context else text


def _expr(e: ast.Expr) -> tuple[str, int]:
    if isinstance(e, ast.Num):
        return repr(e.value), _POSTFIX
    if isinstance(e, ast.Name):
        return e.id, _POSTFIX
    if isinstance(e, ast.Access):
        return f"{e.name}[{', '.join(format_expr(a) for a in e.args)}]", _POSTFIX
    if isinstance(e, ast.Call):
        return f"{e.func}({', '.join(format_expr(a) for a in e.args)})", _POSTFIX
    if isinstance(e, ast.BlockedAxis):
        alias = f" as {e.alias}" if e.alias else ""
        return f"{e.index} by {format_expr(e.size)}{alias}", _TERNARY
    if isinstance(e, ast.Unary):
        if e.op == "not":
            return f"not {format_expr(e.operand, _NOT)}", _NOT
        return f"-{format_expr(e.operand, _UNARY)}", _UNARY
    if isinstance(e, ast.IfElse):
        return (f"{format_expr(e.then, _OR)} if {format_expr(e.cond, _OR)} else "
                f"{format_expr(e.other, _TERNARY)}"), _TERNARY
    if isinstance(e, ast.Member):
        args = ", ".join(":" if a is None else format_expr(a) for a in e.args)
        return f"{format_expr(e.value, _SUM)} in {e.name}[{args}]", _COMPARE
    if isinstance(e, ast.BinOp):
        if e.op in _COMPARISONS:  # not associative: `a < b < c` does not parse
            return f"{format_expr(e.left, _SUM)} {e.op} {format_expr(e.right, _SUM)}", _COMPARE
        if e.op == "**":  # right-associative; the exponent may be a unary minus
            return f"{format_expr(e.left, _POSTFIX)} ** {format_expr(e.right, _UNARY)}", _POWER
        prec = _BINARY_PREC[e.op]
        return f"{format_expr(e.left, prec)} {e.op} {format_expr(e.right, prec + 1)}", prec
    raise TypeError(f"no text form for {type(e).__name__}")


def _dim(x) -> str:
    """A header dim: a name, a size, or the expression of a derived dim."""
    return format_expr(x) if isinstance(x, ast.Expr) else str(x)


def _decl(d: ast.Decl) -> str:
    return f"{d.name}[{', '.join(_dim(x) for x in d.dims)}]: {d.dtype}"


def _statement(st: ast.Stmt) -> str:
    if isinstance(st, ast.Param):
        default = f" = {format_expr(st.default)}" if st.default is not None else ""
        return f"{st.name}: {st.dtype}{default}"
    if isinstance(st, ast.TupleParam):
        default = st.default
        if isinstance(default, list):
            default = f" = ({', '.join(format_expr(e) for e in default)})"
        else:
            default = f" = {format_expr(default)}" if default is not None else ""
        return f"{st.name}: ({', '.join(st.dtypes)}){default}"
    if isinstance(st, ast.EnumParam):
        default = f" = {st.default}" if st.default is not None else ""
        return f"{st.name}: {{{', '.join(st.choices)}}}{default}"
    if isinstance(st, ast.Let):
        return f"{st.name} = {format_expr(st.value)}"
    if isinstance(st, (ast.Require, ast.Mask)):
        return format_expr(st.cond)
    if isinstance(st, ast.Assign):
        target = st.name if st.indices is None else f"{st.name}[{', '.join(st.indices)}]"
        return f"{target} {st.op} {format_expr(st.value)}"
    if isinstance(st, ast.MultiAssign):
        return f"{', '.join(st.names)} = {format_expr(st.value)}"
    if isinstance(st, ast.Repeat):  # one line: `repeat 3 { a = ...  b = ... }`
        body = "  ".join(("repeat " if isinstance(s, ast.Repeat) else "") + _statement(s) for s in st.body)
        return f"{format_expr(st.count)} {{ {body} }}"
    raise TypeError(f"no text form for {type(st).__name__}")


_KIND_WIDTH = max(len(kind.__name__) for kind in (ast.Param, ast.Let, ast.Require, ast.Mask, ast.Assign))


def format_ast(program: ast.Program) -> str:
    """The AST as an indented tree: one line per declaration and statement, with its line."""
    def line(loc) -> str:
        return f"{loc.line:>4}" if loc else "   ?"

    out = [f"attention {program.name}  # {program.source.filename}"]
    for title, decls in (("inputs", program.inputs), ("outputs", program.outputs)):
        out.append(f"  {title}")
        out.extend(f"  {line(d.loc)}  {_decl(d)}" for d in decls)
    out.append("  body")
    out.extend(f"  {line(st.loc)}  {type(st).__name__:<{_KIND_WIDTH}}  {_statement(st)}"
               for st in program.body)
    return "\n".join(out) + "\n"


def format_attn(program: ast.Program) -> str:
    """The AST as `.attn` text that parses back to an equal tree (positions aside): the spec of
    a function decorated with `@attncc.attention`, as `attncc show --stage ast` prints it."""
    def decl(d: ast.Decl) -> str:
        dims = ", ".join(f"{x}?" if k in d.broadcast else _dim(x) for k, x in enumerate(d.dims))
        return f"{d.name}[{dims}]" + (f": {d.dtype}" if d.dtype != "float" else "") \
            + (f" = {format_expr(d.default)}" if d.default is not None else "")

    outputs = ", ".join(decl(d) for d in program.outputs)
    if len(program.outputs) != 1:
        outputs = f"({outputs})"
    keyword = {ast.Param: "param ", ast.TupleParam: "param ", ast.EnumParam: "param ", ast.Let: "let ",
               ast.Require: "require ", ast.Mask: "mask ", ast.Repeat: "repeat "}
    out = [f"attention {program.name}({', '.join(decl(d) for d in program.inputs)}) -> {outputs} {{"]
    for st in program.body:
        out.append(f"  {keyword.get(type(st), '')}{_statement(st)}")
    out.append("}")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- IR

_LEAVES = (ir.Const, ir.Index, ir.Scalar, ir.Input)  # printed inline where they are used
_INFIX = {"+", "-", "*", "/", "//", "%", "**", "==", "!=", "<", "<=", ">", ">=", "and", "or"}
# `name[...] = `, `name += `, `let name = `: the statement binds its result to `name`.
_ASSIGNMENT = re.compile(r"\s*(?:let\s+)?([A-Za-z_]\w*)\s*(\[[^\]]*\])?\s*(=|\+=|-=|\*=|/=)(?!=)")


def listed_nodes(program: ir.Program) -> list[ir.Node]:
    """The nodes `format_ir` numbers: everything outputs and masks compute, except leaves
    (constants, indices, dims, params, inputs), in topological order, ties broken by
    position in the spec so the listing reads like the spec."""
    keep, stack = set(), [o.node for o in program.outputs] + [m.pred for m in program.masks]
    while stack:
        node = stack.pop()
        if node in keep or isinstance(node, _LEAVES):
            continue
        keep.add(node)
        stack.extend(node.operands())

    def position(node):
        return (node.loc.line, node.loc.column, node.id) if node.loc else (math.inf, 0, node.id)

    return list(nx.lexicographical_topological_sort(program.graph.subgraph(keep), key=position))


def _leaf(node: ir.Node) -> str:
    if isinstance(node, ir.Const):
        if isinstance(node.value, bool):
            return "true" if node.value else "false"
        if isinstance(node.value, float) and math.isinf(node.value):
            return "inf" if node.value > 0 else "-inf"
        return repr(node.value)
    return node.name


class _IrPrinter:
    def __init__(self, program: ir.Program):
        self.p = program
        self.nodes = listed_nodes(program)
        self.ref = {node: f"%{k}" for k, node in enumerate(self.nodes)}
        self.mask_ref = {id(m): f"#{k}" for k, m in enumerate(program.masks)}

    def arg(self, node: ir.Node) -> str:
        return self.ref[node] if node in self.ref else _leaf(node)

    def operation(self, node: ir.Node) -> str:
        """The node kind with its operands and attributes, e.g. `normalize softmax(%4) along j`."""
        if isinstance(node, ir.Access):
            return f"access {self.arg(node.array)}[{', '.join(self.arg(a) for a in node.args)}]"
        if isinstance(node, ir.Map):
            args = [self.arg(a) for a in node.args]
            if node.op in _INFIX and len(args) == 2:
                return f"map {args[0]} {node.op} {args[1]}"
            if node.op == "neg":
                return f"map -{args[0]}"
            if node.op == "not":
                return f"map not {args[0]}"
            return f"map {node.op}({', '.join(args)})"
        if isinstance(node, ir.Contract):
            return f"contract({', '.join(self.arg(f) for f in node.factors)}) over {','.join(node.summed)}"
        if isinstance(node, ir.Reduce):
            if node.block:
                b = node.block
                return (f"reduce {node.op}({self.arg(node.arg)}) over {b.index} by {self.arg(b.size)} "
                        f"as {b.name}")
            return f"reduce {node.op}({self.arg(node.arg)}) over {','.join(node.axes)}"
        if isinstance(node, ir.Normalize):
            sets = "".join(f", {self.arg(x)} along {axis}" for x, axis in node.joint)
            return f"normalize {node.op}({self.arg(node.arg)}) along {node.axis}{sets}"
        if isinstance(node, ir.Select):
            return f"select {node.op}({self.arg(node.arg)}, {self.arg(node.amount)}) along {node.axis}"
        raise TypeError(f"no text form for {type(node).__name__}")

    def statement_roots(self) -> set[ir.Node]:
        """Per spec line, the nodes no other node of that line uses: the statement's result."""
        roots = set()
        for node in self.nodes:
            line = node.loc.line if node.loc else None
            users = self.p.graph.successors(node)
            if not any(u in self.ref and u.loc and u.loc.line == line for u in users):
                roots.add(node)
        return roots

    def source(self, line: int) -> str:
        """A spec line without its comment."""
        return self.p.source.line(line).split("#")[0].strip()

    def node_rows(self) -> list[list[str]]:
        roots = self.statement_roots()
        names = {}
        for node in roots:
            named = _ASSIGNMENT.match(self.source(node.loc.line)) if node.loc else None
            if named:
                names[node] = named.group(1)
        name_width = max(map(len, names.values()), default=0)
        rows = []
        for node in self.nodes:
            text = self.source(node.loc.line) if node.loc else ""
            masks = [self.mask_ref[id(m)] for m in self.p.masks_on(node)]
            where = f"# line {node.loc.line}" if node.loc else "#"
            rows.append([self.ref[node], f"{names.get(node, ''):<{name_width}} = {self.operation(node)}",
                         f"[{','.join(node.indices)}]", node.dtype,
                         f"masks: {', '.join(masks)}" if masks else "",
                         f"{where}: {text}" if node in roots and text else where])
        return rows

    def render(self) -> str:
        p = self.p
        out = [f"attention {p.name}  # {p.source.filename}", "inputs:"]
        out += [f"  {n}[{', '.join(str(d) for d in i.dims)}]: {i.dtype}" for n, i in p.inputs.items()]
        if p.params:
            out.append("params:")
            for name, s in p.params.items():
                default = f" = {_scalar_text(s.default)}" if s.default is not None else "  (no default)"
                group = next((g for g in p.groups.values() if s in g.scalars), None)
                note = f"  # {group.label(s)}: {group.describe()}" if group else ""
                out.append(f"  {name}: {s.dtype}{default}{note}")
        if p.requires:
            out.append("requires:")
            out += [f"  {r.text}" + (f"  # line {r.loc.line}" if r.loc else "") for r in p.requires]
        out.append("extents:")
        width = max(len(ix) for ix in p.extent) if p.extent else 0
        out += [f"  {ix:<{width}}  {p.extent[ix]}" for ix in self.index_order()]
        out.append("nodes:")
        out += _columns(self.node_rows())
        if p.masks:
            out.append("masks:")
            out += _columns([[self.mask_ref[id(m)], self.ref[m.pred], f"[{','.join(m.pred.indices)}]",
                              f"# line {m.loc.line}: {self.source(m.loc.line)}" if m.loc else "#"]
                             for m in p.masks])
        out.append("outputs:")
        out += _columns([[f"{o.name}[{','.join(o.axes)}]", "=", self.ref.get(o.node, self.arg(o.node)),
                          f"[{', '.join(str(d) for d in o.dims)}]", o.node.dtype] for o in p.outputs])
        return "\n".join(out) + "\n"

    def index_order(self) -> list[str]:
        """Indices in order of first use in the listing, then any others."""
        seen = dict.fromkeys(ix for node in self.nodes for ix in node.indices if ix in self.p.extent)
        return list(seen) + [ix for ix in self.p.extent if ix not in seen]


def _scalar_text(node: ir.Node) -> str:
    """A param default as an expression of dims and params (`-log(M)`)."""
    if isinstance(node, ir.Const):
        return _leaf(node)
    try:
        return str(to_sympy(node))
    except NotImplementedError:
        return f"<{type(node).__name__}>"


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells, each column padded to its widest cell, indented by two spaces."""
    if not rows:
        return []
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths) if w]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def format_ir(program: ir.Program) -> str:
    """The IR as text: header (inputs, params, requires, extents), numbered nodes in
    topological order with kind, attributes, indices, dtype, masks and spec line, then
    the masks and the outputs."""
    return _IrPrinter(program).render()
