"""From the AST to the IR: name resolution, einsum summation, type rules and their errors.

The frontend decides what each name is (input tensor, defined tensor, dim, param,
let, or index variable), turns each assignment into a node (summing the indices
that appear on the right but not on the left), and reports every mistake at the
spec's line and column. Index extents are inferred afterwards by `passes.infer`.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from . import ir
from . import syntax as ast
from .errors import SpecError, Source
from .frontend_extensions import MembershipTests, NestedSumWarnings, RepeatStatements
from .passes.infer import to_sympy

UNARY = {"exp", "log", "tanh", "sigmoid", "elu", "relu", "abs", "sqrt", "sin", "cos", "floor", "ceil",
         "log1p", "expm1", "rsqrt", "gelu", "silu", "sign"}
BINARY = {"min", "max", "atan2"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "logsumexp"}
NORMALIZERS = {"softmax", "softmax1"}
SELECTIONS = {"topk": ir.FLOAT, "topk_mask": ir.BOOL, "topp_mask": ir.BOOL}
CONSTANTS = {"inf": (float("inf"), ir.FLOAT), "pi": (3.141592653589793, ir.FLOAT),
             "true": (True, ir.BOOL), "false": (False, ir.BOOL)}
FUNCTION_HELP = ("elementwise: " + ", ".join(sorted(UNARY | BINARY | {"clamp", "where"}))
                 + "; reductions: " + ", ".join(sorted(REDUCTIONS))
                 + "; normalisations: softmax, softmax1; selections: " + ", ".join(SELECTIONS))
CALL_OPTIONS = {"return_lse"}  # keyword arguments a kernel call takes besides inputs and params
COMPARE = {"==", "!=", "<", "<=", ">", ">="}


@dataclass
class _Tensor:
    node: ir.Node
    axes: tuple[str, ...] | None  # None for inputs (read positionally by their dims)


@dataclass
class _Scalar:
    node: ir.Node


@dataclass
class _Group(_Scalar):
    """A tuple or enum param, read only as `kernel[0]` or in `mode == shift` (`entry` None);
    or the name of entry `entry` of a tuple param, reserved so that nothing else takes it."""

    group: ir.ParamGroup
    entry: int | None = None


def _promote(*dtypes: str) -> str:
    if ir.FLOAT in dtypes:
        return ir.FLOAT
    if ir.INT in dtypes:
        return ir.INT
    return ir.BOOL


class Frontend(RepeatStatements, MembershipTests, NestedSumWarnings):
    """Builds an `ir.Program` from an `ast.Program`, one statement at a time."""

    def __init__(self, program: ast.Program):
        self.ast = program
        self.source: Source = program.source
        self.env: dict[str, _Tensor | _Scalar] = {}
        self.inputs: dict[str, ir.Input] = {}
        self.dims: dict[str, ir.Scalar] = {}
        self.params: dict[str, ir.Scalar] = {}
        self.requires: list[ir.Require] = []
        self.masks: list[ir.Mask] = []
        self.groups: dict[str, ir.ParamGroup] = {}
        self.derived: list[tuple[ir.Input, int, ast.Expr]] = []  # dims given by expressions, resolved last
        self.used: set[str] = set()

    def error(self, message, loc, expected=None):
        return SpecError(message, self.source, loc, expected)

    # ------------------------------------------------------------------ program
    def build(self) -> ir.Program:
        for decl in self.ast.inputs:
            self.declare_input(decl)
        for stmt in self.ast.body:
            getattr(self, "stmt_" + type(stmt).__name__.lower())(stmt)
        for node, k, e in self.derived:
            self.derive_dim(node, k, e)
        outputs = [self.output(decl) for decl in self.ast.outputs]
        for name, inp in self.inputs.items():
            if name not in self.used:
                raise self.error(f"input '{name}' is never used", inp.loc,
                                 "every declared input to be read by some statement")
        program = ir.Program(self.ast.name, self.source, self.inputs, self.dims, self.params,
                             self.requires, self.masks, outputs, groups=self.groups)
        roots = [o.node for o in outputs] + [m.pred for m in self.masks] + [r.cond for r in self.requires]
        program.graph = ir.build_graph(roots)
        return program

    def declare_input(self, decl: ast.Decl):
        if decl.name in self.env:
            raise self.error(f"input '{decl.name}' is declared twice", decl.loc)
        self.check_call_keyword(decl.name, decl.loc)
        dims, derived = [], []
        for k, d in enumerate(decl.dims):
            if isinstance(d, int):
                dims.append(sympy.Integer(d))
                continue
            if isinstance(d, ast.Expr):  # derived: may use params declared in the body, so resolved last
                dims.append(None)
                derived.append((k, d))
                continue
            if d not in self.dims:
                if d in self.env:
                    raise self.error(f"'{d}' is a tensor, not a dim", decl.loc)
                sym = ir.Scalar(name=d, role="dim", dtype=ir.INT, loc=decl.loc)
                self.dims[d] = sym
                self.env[d] = _Scalar(sym)
            dims.append(sympy.Symbol(d, integer=True, positive=True))
        for k in decl.broadcast:
            if isinstance(decl.dims[k], int):
                raise self.error(f"dim {k} of input '{decl.name}' is a fixed size; only named dims take `?`",
                                 decl.loc)
        node = ir.Input(name=decl.name, dims=tuple(dims), dtype=decl.dtype, loc=decl.loc,
                        default=self.input_default(decl), broadcast=tuple(decl.broadcast))
        self.inputs[decl.name] = node
        self.env[decl.name] = _Tensor(node, None)
        self.derived += [(node, k, e) for k, e in derived]

    def derive_dim(self, node: ir.Input, k: int, e: ast.Expr):
        """`rpb[H, 2 * kernel[0] - 1]`, `kidx[B, ceil(N / q_block)]`: a dim computed from dims
        and params, which a call's tensor must match (and an absent optional input takes)."""
        what = f"dim {k} of input '{node.name}'"
        value = self.scalar_expr(e, what)
        rounded = isinstance(value, ir.Map) and value.op in ("ceil", "floor")
        if value.dtype != ir.INT and not rounded:
            raise self.error(f"{what} is a {value.dtype} expression", e.loc,
                             "an integer expression of dims and params (`//`, or `ceil(...)` / `floor(...)` "
                             "around a division)")
        try:
            expr = to_sympy(value.args[0] if rounded else value)
        except NotImplementedError:
            raise self.error(f"{what} cannot be computed before the call", e.loc,
                             "arithmetic of dims, params and numbers") from None
        if rounded:
            expr = (sympy.ceiling if value.op == "ceil" else sympy.floor)(expr)
        node.dims = tuple(expr if j == k else d for j, d in enumerate(node.dims))
        node.derived = {**node.derived, k: self.source_text(e.loc)}

    def source_text(self, loc) -> str:
        """The spec text of a span on one line (a derived dim, for call-time messages)."""
        line = self.source.line(loc.line)
        end = loc.end_column if loc.end_line == loc.line and loc.end_column else len(line) + 1
        return line[loc.column - 1:end - 1].strip()

    def input_default(self, decl: ast.Decl) -> ir.Const | None:
        """The constant an optional input holds everywhere when a call leaves it out
        (`rows[B,N]: bool = true`, `lam[H] = 1.0`): a number or true/false of its type."""
        if decl.default is None:
            return None
        value = self.expr(decl.default)
        ok = {ir.FLOAT: (ir.FLOAT, ir.INT), ir.INT: (ir.INT,), ir.BOOL: (ir.BOOL,)}[decl.dtype]
        if not isinstance(value, ir.Const) or value.dtype not in ok:
            kind = {ir.FLOAT: "a number", ir.INT: "an integer", ir.BOOL: "true or false"}[decl.dtype]
            raise self.error(f"the default of input '{decl.name}' must be a constant of its type", decl.default.loc,
                             kind)
        return ir.Const(value=float(value.value) if decl.dtype == ir.FLOAT else value.value, dtype=decl.dtype,
                        loc=value.loc)

    def output(self, decl: ast.Decl) -> ir.Output:
        if decl.default is not None:
            raise self.error(f"output '{decl.name}' has a default; only inputs can be optional", decl.default.loc,
                             "no `= value` after an output")
        if decl.broadcast:
            raise self.error(f"output '{decl.name}' has a dim with `?`; only inputs broadcast", decl.loc)
        binding = self.env.get(decl.name)
        if binding is None:
            raise self.error(f"output '{decl.name}' is never assigned", decl.loc,
                             f"a statement `{decl.name}[...] = ...` in the body")
        if not isinstance(binding, _Tensor) or binding.axes is None:
            kind = "an input" if isinstance(binding, _Tensor) else "a scalar"
            raise self.error(f"output '{decl.name}' is {kind}, not a tensor computed by the body", decl.loc)
        if len(binding.axes) != len(decl.dims):
            raise self.error(f"output '{decl.name}' is declared with {len(decl.dims)} dims but computed with "
                             f"{len(binding.axes)} indices [{', '.join(binding.axes)}]", decl.loc)
        dims = []
        for d in decl.dims:
            if isinstance(d, int):
                dims.append(sympy.Integer(d))
            elif d in self.dims:
                dims.append(sympy.Symbol(d, integer=True, positive=True))
            else:
                raise self.error(f"output '{decl.name}' uses dim '{d}', which no input declares", decl.loc,
                                 "one of the input dims: " + ", ".join(self.dims))
        return ir.Output(decl.name, binding.node, binding.axes, tuple(dims), decl.loc)

    # ------------------------------------------------------------------ statements
    def stmt_param(self, st: ast.Param):
        self.check_new_name(st.name, st.loc)
        self.check_call_keyword(st.name, st.loc)
        default = None if st.default is None else self.param_default(st.name, st.dtype, st.default)
        node = ir.Scalar(name=st.name, role="param", dtype=st.dtype, default=default, loc=st.loc)
        self.params[st.name] = node
        self.env[st.name] = _Scalar(node)

    def stmt_tupleparam(self, st: ast.TupleParam):
        """`param kernel: int[3] = 7`: one scalar param per entry, named `kernel_0` ... inside
        the program (names reserved here), read in the spec as `kernel[0]` ..."""
        self.check_new_name(st.name, st.loc)
        self.check_call_keyword(st.name, st.loc)
        n = len(st.dtypes)
        if isinstance(st.default, list) and len(st.default) != n:
            raise self.error(f"tuple param '{st.name}' has {n} entries but its default lists {len(st.default)}",
                             st.default[0].loc, f"{n} values, or one value for every entry")
        defaults = st.default if isinstance(st.default, list) else [st.default] * n
        scalars = []
        for k, (dtype, default) in enumerate(zip(st.dtypes, defaults)):
            name = f"{st.name}_{k}"
            if name in self.env:
                raise self.error(f"entry {k} of tuple param '{st.name}' is held as '{name}', which is already "
                                 "defined", st.loc, "another name for the param or for that definition")
            value = None if default is None else self.param_default(f"{st.name}[{k}]", dtype, default)
            scalars.append(ir.Scalar(name=name, role="param", dtype=dtype, default=value, loc=st.loc))
        group = ir.ParamGroup(st.name, tuple(scalars), loc=st.loc)
        self.groups[st.name] = group
        self.env[st.name] = _Group(None, group)
        for k, node in enumerate(scalars):
            self.params[node.name] = node
            self.env[node.name] = _Group(None, group, k)

    def stmt_enumparam(self, st: ast.EnumParam):
        """`param mode: {shift, cut} = shift`: an int param holding the position of the name a
        call passes; the spec compares it (`mode == cut`), never computes with it."""
        self.check_new_name(st.name, st.loc)
        self.check_call_keyword(st.name, st.loc)
        for k, (choice, loc) in enumerate(zip(st.choices, st.choice_locs)):
            if choice in st.choices[:k]:
                raise self.error(f"enum param '{st.name}' lists '{choice}' twice", loc, "distinct names")
        default = None
        if st.default is not None:
            if st.default not in st.choices:
                raise self.error(f"the default of enum param '{st.name}' is '{st.default}', not one of its "
                                 "choices", st.default_loc, "one of: " + ", ".join(st.choices))
            default = ir.Const(value=st.choices.index(st.default), dtype=ir.INT, loc=st.default_loc)
        node = ir.Scalar(name=st.name, role="param", dtype=ir.INT, default=default, loc=st.loc)
        group = ir.ParamGroup(st.name, (node,), tuple(st.choices), loc=st.loc)
        self.groups[st.name] = group
        self.params[st.name] = node
        self.env[st.name] = _Group(node, group)

    def param_default(self, label: str, dtype: str, e: ast.Expr) -> ir.Node:
        """A param's default: a scalar expression of its type (an int is a fine float)."""
        default = self.scalar_expr(e, f"the default of param '{label}'")
        ok = {ir.INT: {ir.INT}, ir.FLOAT: {ir.INT, ir.FLOAT}, ir.BOOL: {ir.BOOL}}[dtype]
        if default.dtype not in ok:
            article = "an" if dtype == ir.INT else "a"
            raise self.error(f"param '{label}: {dtype}' has a default of type {default.dtype}",
                             e.loc, f"{article} {dtype} default")
        return default

    def stmt_let(self, st: ast.Let):
        self.check_new_name(st.name, st.loc)
        self.env[st.name] = _Scalar(self.scalar_expr(st.value, f"let '{st.name}'"))

    def stmt_require(self, st: ast.Require):
        cond = self.scalar_expr(st.cond, "a require")
        if cond.dtype != ir.BOOL:
            raise self.error("require needs a condition", st.cond.loc, "a comparison such as `N == M`")
        text = self.source.line(st.loc.line).strip() if st.loc else "require"
        self.requires.append(ir.Require(cond, text, st.loc))

    def stmt_mask(self, st: ast.Mask):
        pred = self.expr(st.cond)
        if pred.dtype != ir.BOOL:
            raise self.error("a mask needs a boolean predicate", st.cond.loc,
                             "a comparison or a boolean tensor such as `j <= i` or `valid[b, j]`")
        if not pred.indices:
            raise self.error("this mask depends on no index", st.cond.loc,
                             "a predicate over indices such as `j <= i`")
        self.masks.append(ir.Mask(pred, st.loc))

    def stmt_assign(self, st: ast.Assign):
        previous = self.env.get(st.name)
        if isinstance(previous, _Tensor) and previous.axes is None:
            raise self.error(f"cannot assign to input '{st.name}'", st.loc, "a new name for the result")
        if isinstance(previous, _Scalar):
            raise self.error(f"cannot assign to scalar '{st.name}'", st.loc, "a new name for the tensor")
        if st.indices is not None:
            self.check_lhs_indices(st)
        if st.op == "=":
            node, axes = self.define(st)
        else:
            node, axes = self.update(st, previous)
        self.env[st.name] = _Tensor(node, axes)

    def stmt_multiassign(self, st: ast.MultiAssign):
        """`p, ps = softmax(s, j, ss, c)`: the weights of each key set, in order."""
        call = st.value
        if not (isinstance(call, ast.Call) and call.func == "softmax"):
            raise self.error(f"{len(st.names)} names on the left need a softmax over {len(st.names)} key sets",
                             call.loc, f"`{', '.join(st.names)} = softmax(s, j, ss, c, ...)`")
        for k, (name, loc) in enumerate(zip(st.names, st.name_locs)):
            previous = self.env.get(name)
            if isinstance(previous, _Scalar) or (isinstance(previous, _Tensor) and previous.axes is None) \
                    or name in st.names[:k]:
                raise self.error(f"'{name}' cannot name a key set's weights", loc, "a new tensor name")
        nodes = self.normalizers(call)
        if len(nodes) != len(st.names):
            raise self.error(f"{len(st.names)} names on the left, but this softmax has {len(nodes)} key "
                             f"set{'s' if len(nodes) > 1 else ''}", call.loc,
                             "one name per key set (an operand and its axis each)")
        for name, node in zip(st.names, nodes):
            self.env[name] = _Tensor(node, node.indices)

    # ------------------------------------------------------------------ assignment helpers
    def check_new_name(self, name, loc):
        if name in self.env:
            raise self.error(f"'{name}' is already defined", loc, "a new name")
        if name in CONSTANTS:
            raise self.error(f"'{name}' is a built-in constant", loc, "another name")

    def check_call_keyword(self, name, loc):
        """Inputs and params are keyword arguments of the kernel, beside its own options."""
        if name in CALL_OPTIONS:
            raise self.error(f"'{name}' is a keyword argument of every kernel call, not free for an input "
                             "or param", loc, "another name")

    def check_lhs_indices(self, st: ast.Assign):
        seen = set()
        for ix, loc in zip(st.indices, st.index_locs):
            if ix in seen:
                raise self.error(f"index '{ix}' appears twice on the left", loc, "distinct indices")
            binding = self.env.get(ix)
            if binding is not None or ix in CONSTANTS:
                raise self.error(f"'{ix}' is a {'tensor' if isinstance(binding, _Tensor) else 'scalar'} "
                                 "name, not an index", loc, "an index variable such as i or j")
            seen.add(ix)

    def define(self, st: ast.Assign):
        value = self.expr(st.value)
        if st.indices is not None:
            value = self.name_block_axis(st, value)
        if None in value.indices:
            raise self.error("a block axis without a name", st.value.loc,
                             "`index by size as NAME` in the reduction")
        if st.indices is None:
            if value.is_scalar:
                raise self.error(f"'{st.name}' has no index; scalars are defined with `let`", st.loc,
                                 f"`let {st.name} = ...` or indices on the left")
            return value, value.indices
        lhs = tuple(st.indices)
        for ix, loc in zip(lhs, st.index_locs):
            if ix not in value.indices:
                raise self.error(f"index '{ix}' is on the left but not on the right", loc,
                                 "every index on the left to appear on the right")
        summed = tuple(ix for ix in value.indices if ix not in lhs)
        if not summed:
            return value, lhs
        self.check_summed_terms(st, summed)
        self.warn_summed_through(st, summed)
        factors = self.factors(st.value) if isinstance(st.value, ast.BinOp) and st.value.op == "*" else None
        if factors is not None:
            nodes = tuple(self.expr(f) for f in factors)
            node = ir.Contract(factors=nodes, indices=lhs, dtype=_promote(*(n.dtype for n in nodes)),
                               loc=st.loc)
        else:
            node = ir.Reduce(op="sum", arg=value, axes=summed, indices=lhs, dtype=value.dtype, loc=st.loc)
        return node, lhs

    def name_block_axis(self, st: ast.Assign, value: ir.Node) -> ir.Node:
        """`qp[b,h,qb,d] = mean(q[b,h,i,d], i by 64)`: the block axis takes the one new
        index on the left (write `i by 64 as qb` to name it explicitly)."""
        if not (isinstance(value, ir.Reduce) and value.block and value.block.name is None):
            return value
        new = [ix for ix in st.indices if ix not in value.indices]
        if len(new) != 1:
            raise self.error("cannot tell which index on the left numbers the blocks", st.loc,
                             f"`{value.block.index} by ... as NAME` in the reduction")
        name = new[0]
        value.block.name = name
        value.indices = tuple(name if ix is None else ix for ix in value.indices)
        return value

    def factors(self, e: ast.Expr) -> list[ast.Expr]:
        if isinstance(e, ast.BinOp) and e.op == "*":
            return self.factors(e.left) + self.factors(e.right)
        return [e]

    def check_summed_terms(self, st: ast.Assign, summed):
        """Each additive term must carry every summed index: `sum_j (a[i,j] + b[i])` adds
        `M * b[i]`, which is never what a spec means. Terms are those of the right side
        with products, quotients, negations and where/if-else branches distributed over its
        sums, so parentheses (`(a[i,j] + b[i]) * 2`) do not hide a term."""
        for missing, term in self.terms_lacking(st.value, frozenset(summed)):
            ix = sorted(missing, key=summed.index)[0]
            lhs = ",".join(st.indices)
            raise self.error(
                f"index '{ix}' is summed but this term does not use it (it would be added "
                f"{ix}-extent times)", term.loc,
                f"each sum in its own statement (e.g. `{st.name}1[{lhs}] = ...` and "
                f"`{st.name}2[{lhs}] = ...`, then `{st.name} = {st.name}1 + {st.name}2`), "
                "or the index on the left")

    def terms_lacking(self, e: ast.Expr, summed: frozenset):
        """(missing summed indices, AST node to blame) for each distributed term of `e`
        that lacks some summed index."""
        terms, _ = self.distributed_terms(e, summed)
        return [(summed - ixs, blame) for ixs, blame, _ in terms if summed - ixs]

    def distributed_terms(self, e: ast.Expr, summed: frozenset):
        """(terms, carried): the additive terms of `e` once products, quotients, negations
        and where/if-else branches are distributed over the sums inside it, each as (the
        summed indices it carries, the AST node to blame, whether a sum was split to get
        it), and the summed indices `e` carries as a whole.

        A factor that carries an index carries it into every term it multiplies, whole:
        `(q[i,d] - mu[i]) * (q[i,d] - mu[i])` is a sum over `d` of a product that depends
        on `d`, like `(q[i,d] - mu[i]) ** 2`, while `(x[i,c] + y[i,r]) * 2.0` adds `x` once
        per `r`. A denominator and a where-condition carry their indices the same way.
        Functions, powers and comparisons are single terms. A literal 0 is no term.
        Terms with the same indices merge, so there are at most 2 ** len(summed)."""
        def merge(terms):
            seen = {}
            for ixs, blame, split in terms:
                seen.setdefault(ixs, (ixs, blame, split))
            return list(seen.values())

        def widen(terms, extra, whole):
            return [(ixs | extra, blame if split else whole, split) for ixs, blame, split in terms]

        if isinstance(e, ast.BinOp) and e.op in ("+", "-"):
            (lt, lc), (rt, rc) = (self.distributed_terms(x, summed) for x in (e.left, e.right))
            return merge([(ixs, blame, True) for ixs, blame, _ in lt + rt]), lc | rc
        if isinstance(e, ast.BinOp) and e.op in ("*", "/"):
            (lt, lc), (rt, rc) = (self.distributed_terms(x, summed) for x in (e.left, e.right))
            if not lt or (e.op == "*" and not rt):  # a product with a literal 0
                return [], lc | rc
            if e.op == "/":  # the numerator's sum distributes; the denominator stays whole
                return merge(widen(lt, rc, e)), lc | rc
            return merge(widen(lt, rc, e) + widen(rt, lc, e)), lc | rc
        if isinstance(e, ast.Unary) and e.op == "neg":
            terms, carried = self.distributed_terms(e.operand, summed)
            return widen(terms, frozenset(), e), carried
        branches = None
        if isinstance(e, ast.IfElse):
            branches = (e.cond, e.then, e.other)
        elif isinstance(e, ast.Call) and e.func == "where" and len(e.args) == 3:
            branches = tuple(e.args)
        if branches is not None:  # each branch is a term, selected by the condition
            cond = frozenset(self.expr(branches[0]).indices) & summed
            (at, ac), (bt, bc) = (self.distributed_terms(x, summed) for x in branches[1:])
            return merge([(ixs | cond, blame, True) for ixs, blame, _ in at + bt]), cond | ac | bc
        if isinstance(e, ast.Num) and e.value == 0:  # `where(c, x[i,j], 0)`: adding 0 is harmless
            return [], frozenset()
        carried = frozenset(self.expr(e).indices) & summed
        return [(carried, e, False)], carried

    def update(self, st: ast.Assign, previous):
        if previous is None:
            raise self.error(f"'{st.name}' is updated with '{st.op}' before it is defined", st.loc,
                             f"`{st.name}[...] = ...` first")
        if st.indices is not None and tuple(st.indices) != previous.axes:
            raise self.error(f"'{st.name}' has indices [{', '.join(previous.axes)}]", st.loc,
                             f"`{st.name}[{', '.join(previous.axes)}] {st.op} ...` or `{st.name} {st.op} ...`")
        value = self.expr(st.value)
        extra = [ix for ix in value.indices if ix not in previous.axes]
        if extra:
            raise self.error(f"index '{extra[0]}' is not an index of '{st.name}' "
                             f"[{', '.join(previous.axes)}]", st.value.loc,
                             "a separate statement to sum over it")
        node = self.arith(st.op[0], previous.node, value, st.loc)
        return node, previous.axes

    # ------------------------------------------------------------------ expressions
    def scalar_expr(self, e: ast.Expr, what: str) -> ir.Node:
        node = self.expr(e)
        if not node.is_scalar:
            raise self.error(f"{what} must be a scalar, but it depends on index "
                             f"'{node.indices[0]}'", e.loc, "an expression of dims, params and numbers")
        return node

    def expr(self, e: ast.Expr) -> ir.Node:
        return getattr(self, "expr_" + type(e).__name__.lower())(e)

    def expr_num(self, e: ast.Num):
        return ir.Const(value=e.value, dtype=ir.INT if isinstance(e.value, int) else ir.FLOAT, loc=e.loc)

    def expr_name(self, e: ast.Name):
        binding = self.env.get(e.id)
        if isinstance(binding, _Group):
            raise self.group_misuse(e.id, binding, e.loc)
        if isinstance(binding, _Scalar):
            self.used.add(e.id)
            return binding.node
        if isinstance(binding, _Tensor):
            self.used.add(e.id)
            if binding.axes is None:
                node = binding.node
                if node.dims:
                    raise self.error(f"input '{e.id}' needs indices", e.loc,
                                     f"`{e.id}[{', '.join(str(d).lower() for d in node.dims)}]`")
                return ir.Access(array=node, args=(), dtype=node.dtype, loc=e.loc)
            return self.in_declared_order(binding, e.loc)
        if e.id in CONSTANTS:
            value, dtype = CONSTANTS[e.id]
            return ir.Const(value=value, dtype=dtype, loc=e.loc)
        if e.id[0].isupper():
            raise self.error(f"unknown name '{e.id}'", e.loc,
                             "a dim, param or let (dims: " + (", ".join(self.dims) or "none") + ")")
        return ir.Index(name=e.id, indices=(e.id,), dtype=ir.INT, loc=e.loc)

    def expr_access(self, e: ast.Access):
        binding = self.env.get(e.name)
        if binding is None:
            raise self.unknown_tensor(e.name, e.loc)
        if isinstance(binding, _Group) and binding.entry is None and not binding.group.is_enum:
            return self.tuple_entry(binding.group, e)
        if isinstance(binding, _Group):
            raise self.group_misuse(e.name, binding, e.loc)
        if isinstance(binding, _Scalar):
            raise self.error(f"'{e.name}' is a scalar and takes no indices", e.loc, f"`{e.name}`")
        self.used.add(e.name)
        array = binding.node
        rank = len(array.dims) if binding.axes is None else len(binding.axes)
        if len(e.args) != rank:
            raise self.error(f"'{e.name}' has {rank} dims but is indexed with {len(e.args)}", e.loc,
                             f"{rank} indices")
        args = []
        for a in e.args:
            node = self.expr(a)
            if node.dtype != ir.INT:
                raise self.error(f"an index into '{e.name}' must be an integer, not {node.dtype}", a.loc,
                                 "an integer expression of indices, dims and params")
            args.append(node)
        if binding.axes is not None and all(isinstance(a, ir.Index) for a in args) \
                and tuple(a.name for a in args) == binding.axes:
            return array
        indices = ir.union_indices(args)
        return ir.Access(array=array, args=tuple(args), axes=binding.axes or (), indices=indices,
                         dtype=array.dtype, loc=e.loc)

    def tuple_entry(self, group: ir.ParamGroup, e: ast.Access) -> ir.Node:
        """`kernel[1]`: one entry of a tuple param, at a constant position."""
        n = len(group.scalars)
        expected = f"a constant position from 0 to {n - 1}"
        if len(e.args) != 1:
            raise self.error(f"tuple param '{group.name}' is read one entry at a time", e.loc, expected)
        k = self.expr(e.args[0])
        if not (isinstance(k, ir.Const) and k.dtype == ir.INT and 0 <= k.value < n):
            raise self.error(f"tuple param '{group.name}' has {n} entries", e.args[0].loc, expected)
        self.used.add(group.name)
        return group.scalars[k.value]

    def group_misuse(self, name: str, binding: _Group, loc) -> SpecError:
        group = binding.group
        if binding.entry is not None:
            return self.error(f"'{name}' is entry {binding.entry} of tuple param '{group.name}'", loc,
                              f"`{group.name}[{binding.entry}]`")
        if group.is_enum:
            return self.error(f"enum param '{name}' is only compared with one of its choices", loc,
                              f"`{name} == {group.choices[0]}` or `{name} != {group.choices[0]}`")
        last = len(group.scalars) - 1
        return self.error(f"tuple param '{name}' is read one entry at a time", loc,
                          f"`{name}[0]`" + (f" ... `{name}[{last}]`" if last else ""))

    def enum_comparison(self, e: ast.BinOp) -> ir.Node | None:
        """`mode == cut`: the enum's int against the position of the name (the name is a
        choice of that enum, whatever else it may name in the spec); None if no side is an enum."""
        sides = [(side, self.env.get(side.id)) if isinstance(side, ast.Name) else (side, None)
                 for side in (e.left, e.right)]
        enums = [(side, b) for side, b in sides if isinstance(b, _Group) and b.group.is_enum]
        if not enums:
            return None
        mine, binding = enums[0]
        group = binding.group
        other = e.right if mine is e.left else e.left
        if e.op not in ("==", "!="):
            raise self.error(f"enum param '{group.name}' is compared with '{e.op}'", e.loc,
                             "`==` or `!=` (its choices have no order)")
        if not isinstance(other, ast.Name) or other.id not in group.choices:
            raise self.error(f"enum param '{group.name}' is compared with something other than one of its "
                             "choices", other.loc, "one of: " + ", ".join(group.choices))
        choice = ir.Const(value=group.choices.index(other.id), dtype=ir.INT, loc=other.loc)
        args = (binding.node, choice) if mine is e.left else (choice, binding.node)
        return self.node_map(e.op, args, ir.BOOL, e.loc)

    def in_declared_order(self, binding: _Tensor, loc) -> ir.Node:
        """A defined tensor used by name carries its declared index order: after
        `xt[c,a] = x[a,c]`, `xt` is over (c, a) even though the node computing it is over
        (a, c). A node in another order is read through an `Access` that only permutes."""
        node = binding.node
        if node.indices == binding.axes:
            return node
        args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT, loc=loc) for ix in binding.axes)
        return ir.Access(array=node, args=args, axes=binding.axes, indices=binding.axes,
                         dtype=node.dtype, loc=loc)

    def unknown_tensor(self, name, loc):
        tensors = [n for n, b in self.env.items() if isinstance(b, _Tensor)]
        return self.error(f"unknown tensor '{name}'", loc, "one of: " + ", ".join(tensors))

    def operand(self, e: ast.Expr) -> ir.Node:
        """The tensor a softmax, reduction or selection runs over. A bare unknown name there is
        a misspelt tensor, not an index: `softmax(sx, j)` would otherwise blame the axis `j`."""
        if isinstance(e, ast.Name) and e.id not in self.env and e.id not in CONSTANTS:
            raise self.unknown_tensor(e.id, e.loc)
        return self.expr(e)

    def expr_binop(self, e: ast.BinOp):
        if e.op in COMPARE:
            enum = self.enum_comparison(e)
            if enum is not None:
                return enum
        left, right = self.expr(e.left), self.expr(e.right)
        if e.op in ("and", "or"):
            for side, node in ((e.left, left), (e.right, right)):
                if node.dtype != ir.BOOL:
                    raise self.error(f"'{e.op}' needs booleans on both sides", side.loc, "a comparison")
            return self.node_map(e.op, (left, right), ir.BOOL, e.loc)
        if e.op in COMPARE:
            return self.node_map(e.op, (left, right), ir.BOOL, e.loc)
        return self.arith(e.op, left, right, e.loc)

    def arith(self, op, left, right, loc):
        if ir.BOOL in (left.dtype, right.dtype) and op != "*":
            raise self.error(f"'{op}' on a boolean", loc, "numbers (use `where(cond, a, b)` to select)")
        if op == "*" and ir.BOOL in (left.dtype, right.dtype):
            return self.select_by(left, right, loc)
        dtype = ir.FLOAT if op in ("/", "**") else _promote(left.dtype, right.dtype)
        if op == "**" and left.dtype == ir.INT and right.dtype == ir.INT:
            dtype = ir.FLOAT
        return self.node_map(op, (left, right), dtype, loc)

    def select_by(self, left, right, loc):
        """`(cond) * y` is y where cond holds and 0 elsewhere, even where y is infinite or nan
        (a product would give 0 * inf = nan): it lowers to `where(cond, y, 0)`, and a product
        of two booleans to `and`."""
        if left.dtype == ir.BOOL and right.dtype == ir.BOOL:
            return self.node_map("and", (left, right), ir.BOOL, loc)
        cond, y = (left, right) if left.dtype == ir.BOOL else (right, left)
        zero = ir.Const(value=0.0 if y.dtype == ir.FLOAT else 0, dtype=y.dtype, loc=loc)
        return self.node_map("where", (cond, y, zero), y.dtype, loc)

    def node_map(self, op, args, dtype, loc):
        """An elementwise node; its index order follows its widest operand (`where(kb == qb,
        -inf, sb)` keeps the order of `sb`)."""
        ordered = sorted(args, key=lambda a: -len(a.indices))
        return ir.Map(op=op, args=tuple(args), indices=ir.union_indices(ordered), dtype=dtype, loc=loc)

    def expr_unary(self, e: ast.Unary):
        x = self.expr(e.operand)
        if e.op == "not":
            if x.dtype != ir.BOOL:
                raise self.error("'not' needs a boolean", e.operand.loc, "a comparison")
            return self.node_map("not", (x,), ir.BOOL, e.loc)
        if x.dtype == ir.BOOL:
            raise self.error("'-' on a boolean", e.loc, "a number (use `not` to negate a condition)")
        if isinstance(x, ir.Const):
            return ir.Const(value=-x.value, dtype=x.dtype, loc=e.loc)
        return self.node_map("neg", (x,), x.dtype, e.loc)

    def expr_ifelse(self, e: ast.IfElse):
        cond, a, b = self.expr(e.cond), self.expr(e.then), self.expr(e.other)
        return self.where(cond, a, b, e)

    def where(self, cond, a, b, e):
        if cond.dtype != ir.BOOL:
            raise self.error("the condition must be boolean", e.loc, "a comparison")
        return self.node_map("where", (cond, a, b), _promote(a.dtype, b.dtype), e.loc)

    def expr_blockedaxis(self, e: ast.BlockedAxis):
        raise self.error("`by` only goes inside a reduction", e.loc, "e.g. `mean(q[b,h,i,d], i by 64)`")

    def expr_call(self, e: ast.Call):
        f = e.func
        if f in UNARY | BINARY or f in ("clamp", "where"):
            arity = 1 if f in UNARY else 2 if f in BINARY else 3
            self.check_arity(e, arity)
            args = [self.expr(a) for a in e.args]
            if f == "where":
                return self.where(args[0], args[1], args[2], e)
            dtype = _promote(*(a.dtype for a in args)) if f in BINARY | {"clamp", "abs", "sign"} else ir.FLOAT
            return self.node_map(f, args, dtype, e.loc)
        if f in REDUCTIONS:
            return self.reduction(e)
        if f in NORMALIZERS:
            nodes = self.normalizers(e)
            if len(nodes) > 1:
                raise self.error(f"this softmax over {len(nodes)} key sets makes {len(nodes)} tensors, one per set",
                                 e.loc, f"{len(nodes)} names on the left, e.g. `p, ps = softmax(s, j, ss, c)`")
            return nodes[0]
        if f in SELECTIONS:
            self.check_arity(e, 3)
            x = self.operand(e.args[0])
            amount = self.scalar_expr(e.args[1], f"the amount of {f}")
            return ir.Select(op=f, arg=x, amount=amount, axis=self.axis(e.args[2], x, e),
                             indices=x.indices, dtype=SELECTIONS[f], loc=e.loc)
        raise self.error(f"unknown function '{f}'", e.loc, FUNCTION_HELP)

    def normalizers(self, e: ast.Call) -> list[ir.Normalize]:
        """`softmax(s, j)`, with a sink logit `softmax(s, j, sinks[h])`, or one softmax over
        several key sets `softmax(s, j, ss, c[, sink])`: one weight tensor per set, all
        divided by one denominator (the sum over every set, and the sink)."""
        if e.func != "softmax" or len(e.args) < 3:
            self.check_arity(e, 2)
        else:
            self.check_arity(e, len(e.args))
        pairs = [(self.operand(x), a) for x, a in zip(e.args[0:len(e.args) - 1:2], e.args[1::2])]
        sets = [(x, self.axis(a, x, e)) for x, a in pairs]
        sink = self.sink_logit(e.args[-1], sets) if len(e.args) % 2 else None
        self.check_key_sets(sets, e)
        return [ir.Normalize(op=e.func, arg=x, axis=axis, indices=x.indices, dtype=ir.FLOAT, loc=e.loc, sink=sink,
                             joint=tuple(other for other in sets if other[0] is not x or other[1] != axis))
                for x, axis in sets]

    def check_key_sets(self, sets, e: ast.Call):
        """The sets of a joint softmax share their row indices (all but each set's axis), so
        the one denominator is a value per row, and a set's axis is no row index of another."""
        rows0 = set(sets[0][0].indices) - {sets[0][1]}
        for k, (x, axis) in enumerate(sets[1:], 1):
            arg = e.args[2 * k]
            if x.dtype == ir.BOOL:
                raise self.error("a key set's scores are numbers, not booleans", arg.loc)
            rows = set(x.indices) - {axis}
            if rows != rows0:
                show = ", ".join(sorted(rows0))
                raise self.error(f"key set {k + 1} has the row indices ({', '.join(sorted(rows))}) besides its axis "
                                 f"'{axis}', the first set ({show})", arg.loc,
                                 f"scores over ({show}) and the set's own axis")
            if any(x is y and axis == b for y, b in sets[:k]):
                raise self.error("the same key set twice in one softmax", arg.loc, "distinct key sets")

    def sink_logit(self, arg: ast.Expr, sets) -> ir.Node:
        """`softmax(s, j, sinks[h])`: the logit of one more virtual key (value 0), per row, so
        `p = exp(s) / (exp(sink) + sum_j exp(s))`; it cannot depend on the normalised axis."""
        node = self.expr(arg)
        for _, axis in sets:
            if axis in node.indices:
                raise self.error(f"the sink logit depends on '{axis}', the axis the softmax normalises", arg.loc,
                                 f"a value per row, without '{axis}' (e.g. `sinks[h]`)")
        x, axis = sets[0]
        extra = [ix for ix in node.indices if ix not in x.indices]
        if extra:
            raise self.error(f"the sink logit has index '{extra[0]}', which the scores lack", arg.loc,
                             f"a value per row, over indices of the scores besides '{axis}' (e.g. `sinks[h]`)")
        if node.dtype == ir.BOOL:
            raise self.error("the sink logit is a number, not a boolean", arg.loc)
        return node

    def check_arity(self, e: ast.Call, n):
        """A `by` axis outside a reduction is its own error (counting it, the arity looks right)."""
        for a in e.args:
            if isinstance(a, ast.BlockedAxis):
                self.expr_blockedaxis(a)
        if len(e.args) != n:
            raise self.error(f"'{e.func}' takes {n} argument{'s' if n > 1 else ''}, got {len(e.args)}",
                             e.loc)

    def axis(self, arg: ast.Expr, x: ir.Node, call: ast.Call) -> str:
        if not isinstance(arg, ast.Name) or arg.id in self.env:
            raise self.error(f"the axis of '{call.func}' must be an index name", arg.loc,
                             "one of: " + ", ".join(x.indices))
        if arg.id not in x.indices:
            raise self.error(f"'{call.func}' along '{arg.id}', which is not an index of its operand",
                             arg.loc, "one of: " + (", ".join(x.indices) or "(no indices)"))
        return arg.id

    def reduction(self, e: ast.Call) -> ir.Node:
        if len(e.args) < 2:
            raise self.error(f"'{e.func}' needs an operand and at least one axis", e.loc,
                             f"e.g. `{e.func}(x, j)`")
        x = self.operand(e.args[0])
        blocked = [a for a in e.args[1:] if isinstance(a, ast.BlockedAxis)]
        if blocked:
            if len(e.args) != 2:
                raise self.error("a blocked reduction takes one `index by size` axis", e.loc)
            return self.blocked_reduction(e, x, blocked[0])
        axes = tuple(self.axis(a, x, e) for a in e.args[1:])
        indices = tuple(ix for ix in x.indices if ix not in axes)
        dtype = ir.FLOAT if e.func in ("mean", "logsumexp") else x.dtype
        return ir.Reduce(op=e.func, arg=x, axes=axes, indices=indices, dtype=dtype, loc=e.loc)

    def blocked_reduction(self, e: ast.Call, x: ir.Node, b: ast.BlockedAxis) -> ir.Node:
        if b.index not in x.indices:
            raise self.error(f"'{e.func}' in blocks of '{b.index}', which is not an index of its operand",
                             b.loc, "one of: " + ", ".join(x.indices))
        size = self.scalar_expr(b.size, "a block size")
        if size.dtype != ir.INT:
            raise self.error("a block size must be an integer", b.size.loc)
        name = b.alias  # None: named by the assignment's left side (`name_block_axis`)
        indices = tuple(name if ix == b.index else ix for ix in x.indices)
        dtype = ir.FLOAT if e.func in ("mean", "logsumexp") else x.dtype
        return ir.Reduce(op=e.func, arg=x, axes=(b.index,), block=ir.Block(b.index, size, name),
                         indices=indices, dtype=dtype, loc=e.loc)


def lower(program: ast.Program) -> ir.Program:
    """Check an AST and build its IR (extents are inferred by `passes.infer`)."""
    return Frontend(program).build()
