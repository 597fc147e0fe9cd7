"""Front-end rules of three language features, kept apart from `frontend.py`'s core:

- `repeat 3 { ... }` (bounded iteration), unrolled into SSA statements;
- `x in t[b, :]` (membership tests), lowered to an `amax` over the searched axis;
- a located warning when an index the statement sums passes through a non-linear
  reduction written inside it (`mean(amax(x[a,i,d] * y[c,j,d], j), i)` sums `d` outside
  both, which the einsum rule allows but nobody writing it means).

Each is a mixin of `frontend.Frontend`: the methods use its `env`, `expr`, `error` and
`node_map`.
"""
from __future__ import annotations

import re
import warnings

import sympy

from . import ir
from . import syntax as ast
from .errors import SpecWarning, render
from attncc.passes.infer import to_sympy

MAX_REPEAT = 64  # passes of one `repeat` (nested repeats multiply; the unrolled total is bounded too)


class RepeatStatements:
    """`repeat COUNT { assignments }`: the body once per pass, each statement rebinding its
    name (SSA), so later statements and passes read the latest value.

    COUNT is a constant integer expression (`3`, `2 * K` with `let K = 2`), or `n <= LIMIT`
    with an int param `n` and a constant LIMIT: then LIMIT passes are unrolled and pass k
    keeps the previous values where `k >= n` (`where(k < n, new, old)`), and every call
    must have `n <= LIMIT` (a requirement added to the program)."""

    unrolled = 0  # statements unrolled so far, bounded by `syntax.MAX_STATEMENTS`

    def stmt_repeat(self, st: ast.Repeat):
        passes, param = self.repeat_count(st.count)
        names = self.repeat_targets(st)
        self.unrolled += passes * len(names)
        if self.unrolled > ast.MAX_STATEMENTS:
            raise self.error(f"repeat unrolls to more than {ast.MAX_STATEMENTS} statements", st.loc,
                             "fewer passes or a smaller body")
        if param is not None:
            for name, loc in names:
                if not self.is_defined_tensor(name):
                    raise self.error(f"'{name}' is first assigned inside a repeat with a param count", loc,
                                     f"`{name}` defined before the repeat (a pass that does not run keeps it)")
        for k in range(passes):
            before = {name: self.env[name] for name, _ in names if name in self.env}
            for stmt in st.body:
                getattr(self, "stmt_" + type(stmt).__name__.lower())(stmt)
            if param is not None:
                self.keep_after_count(k, param, before, st)

    def is_defined_tensor(self, name) -> bool:
        binding = self.env.get(name)
        return binding is not None and getattr(binding, "axes", None) is not None

    def repeat_targets(self, st: ast.Repeat) -> list[tuple[str, object]]:
        """(name, location) of every statement of the body (nested repeats included); only
        assignments and repeats go there."""
        out = []
        for stmt in st.body:
            if isinstance(stmt, ast.Repeat):
                out += self.repeat_targets(stmt)
            elif isinstance(stmt, ast.Assign):
                out.append((stmt.name, stmt.loc))
            else:
                kind = type(stmt).__name__.lower()
                raise self.error(f"a `{kind}` inside a repeat", stmt.loc,
                                 f"assignments only (put the {kind} before the repeat)")
        return out

    def repeat_count(self, e: ast.Expr) -> tuple[int, ir.Scalar | None]:
        """(passes to unroll, the param that counts them or None)."""
        param = None
        if isinstance(e, ast.BinOp) and e.op == "<=":
            binding = self.env.get(e.left.id) if isinstance(e.left, ast.Name) else None
            node = getattr(binding, "node", None)
            if not (isinstance(node, ir.Scalar) and node.role == "param" and node.dtype == ir.INT):
                raise self.error("a repeat bounded by `<=` needs an int param on the left", e.left.loc,
                                 "`repeat n <= 8 { ... }` with `param n: int`")
            param, e = node, e.right
        value = self.scalar_expr(e, "the count of a repeat")
        try:
            count = sympy.sympify(_constant(value))
        except ValueError:
            count = None
        if count is None or not count.is_Integer:
            raise self.error("the count of a repeat must be a constant integer", e.loc,
                             "a number such as `3`, or `n <= 8` with an int param n")
        if not 0 <= int(count) <= MAX_REPEAT:
            raise self.error(f"a repeat of {int(count)} passes", e.loc, f"between 0 and {MAX_REPEAT} passes")
        if param is not None:
            self.used.add(param.name)
            limit = ir.Const(value=int(count), dtype=ir.INT, loc=e.loc)
            cond = self.node_map("<=", (param, limit), ir.BOOL, e.loc)
            self.requires.append(ir.Require(cond, f"{param.name} <= {int(count)} (a repeat's bound)", e.loc))
        return int(count), param

    def keep_after_count(self, k: int, param: ir.Scalar, before: dict, st: ast.Repeat):
        """After pass k of a param-counted repeat: each name is the new value where k < n,
        else the value before the pass."""
        cond = self.node_map("<", (ir.Const(value=k, dtype=ir.INT, loc=st.loc), param), ir.BOOL, st.loc)
        for name, old in before.items():
            new = self.env[name]
            if new.axes != old.axes:
                raise self.error(f"'{name}' changes its indices inside a repeat with a param count "
                                 f"([{', '.join(old.axes)}] before, [{', '.join(new.axes)}] after)", st.loc,
                                 "the same indices in every pass")
            a, b = self.in_declared_order(new, st.loc), self.in_declared_order(old, st.loc)
            dtype = ir.FLOAT if ir.FLOAT in (a.dtype, b.dtype) else a.dtype
            node = self.node_map("where", (cond, a, b), dtype, st.loc)
            self.env[name] = type(new)(node, new.axes)


def _constant(node: ir.Node):
    """The value of a constant scalar node (ValueError when it depends on a dim or param)."""
    value = to_sympy(node)
    if value.free_symbols:
        raise ValueError("not a constant")
    return value


class MembershipTests:
    """`x in t[b, g, qb, :]`: true where some entry of `t` along the `:` axis equals `x`,
    lowered to `amax(where(t[b, g, qb, s] == x, 1, 0), s) > 0` over a fresh index `s` (the
    form the block_lists example writes by hand), so every backend and planner takes it."""

    def expr_member(self, e: ast.Member) -> ir.Node:
        searched = [k for k, a in enumerate(e.args) if a is None]
        if len(searched) != 1:
            raise self.error(f"a membership test searches one axis of '{e.name}', marked `:`; found "
                             f"{len(searched)}", e.loc, f"exactly one `:`, e.g. `x in {e.name}[b, :]`")
        axis = self.fresh_index()
        args = [ast.Name(axis, loc=e.name_loc) if a is None else a for a in e.args]
        table = self.expr_access(ast.Access(e.name, args, loc=e.loc))
        value = self.expr(e.value)
        if (value.dtype == ir.BOOL) != (table.dtype == ir.BOOL):
            raise self.error(f"a {value.dtype} value looked up among the {table.dtype} entries of '{e.name}'",
                             e.loc, "a value of the table's type")
        one, zero = (ir.Const(value=v, dtype=ir.INT, loc=e.loc) for v in (1, 0))
        equal = self.node_map("==", (table, value), ir.BOOL, e.loc)
        hit = self.node_map("where", (equal, one, zero), ir.INT, e.loc)
        found = ir.Reduce(op="amax", arg=hit, axes=(axis,), indices=tuple(ix for ix in hit.indices if ix != axis),
                          dtype=ir.INT, loc=e.loc)
        return self.node_map(">", (found, zero), ir.BOOL, e.loc)

    def fresh_index(self) -> str:
        """An index name that no word of the spec spells (so no user index can meet it)."""
        k = getattr(self, "_fresh", 0)
        while re.search(rf"\b_in{k}\b", self.source.text):
            k += 1
        self._fresh = k + 1
        return f"_in{k}"


class NestedSumWarnings:
    """A statement sums the indices missing on its left over its whole right side, also
    outside the calls written in it: in `score[a,c] = mean(amax(x[a,i,d] * y[c,j,d], j), i)`
    the sum over `d` comes after the `amax`. For a linear call (sum, mean) the order does not
    matter; for amax, amin, logsumexp, softmax and the selections it does, and the result
    is almost never what was meant, so it is a warning naming the index and both places.
    Writing the sum inside (`amax(sum(x * y, d), j)`) or keeping the index on the left
    says what is meant and silences it."""

    NONLINEAR = {"amax", "amin", "logsumexp", "softmax", "softmax1", "topk", "topk_mask", "topp_mask"}

    def warn_summed_through(self, st: ast.Assign, summed):
        stack = [st.value]
        while stack:
            e = stack.pop()
            if isinstance(e, ast.Call) and e.func in self.NONLINEAR:
                node = self.expr(e)
                through = [ix for ix in summed if ix in node.indices and ix not in ir.reduced_axes(node)]
                if through:
                    self.warn_at(e, through[0], st)
                    continue
            stack.extend(reversed([c for c in _children(e) if c is not None]))

    def warn_at(self, call: ast.Call, ix: str, st: ast.Assign):
        lhs = f"{st.name}[{', '.join(st.indices)}]"
        line = f" (line {st.loc.line})" if st.loc else ""
        text = render(f"index '{ix}' passes through {call.func}(...) and is summed outside it, by the "
                      f"statement{line}: `{lhs}` lacks it, so the einsum rule sums it over the whole right side",
                      self.source, call.loc,
                      f"`sum(..., {ix})` inside {call.func}(...) where the sum is meant, or '{ix}' on the left",
                      label="warning")
        warnings.warn(SpecWarning(text), stacklevel=2)


def _children(e: ast.Expr) -> list:
    if isinstance(e, ast.BinOp):
        return [e.left, e.right]
    if isinstance(e, ast.Unary):
        return [e.operand]
    if isinstance(e, ast.IfElse):
        return [e.cond, e.then, e.other]
    if isinstance(e, (ast.Call, ast.Access)):
        return list(e.args)
    if isinstance(e, ast.Member):
        return [e.value, *e.args]
    if isinstance(e, ast.BlockedAxis):
        return [e.size]
    return []
