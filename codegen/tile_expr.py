"""IR expressions as Triton code over a (query tile x key tile) block.

The row-streaming kernel computes scores, score modifications and mask predicates
on a `[BLOCK_M, BLOCK_N]` tile. This module turns an IR expression into lines of
Triton: the query index becomes `offs_m[:, None]`, the key index `offs_n[None, :]`,
batch and head become program-id scalars, small tensors become (gathered) loads,
indices with a small constant extent (the 3 components of a pixel) are unrolled,
and anything that depends on scalars only is computed once on the host and passed
in as an argument. Every value lands in a named temporary whose comment carries the
spec line it comes from, so the generated kernel reads like the spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from attncc import ir
from attncc.codegen import names
from attncc.codegen.mask_code import printed
from attncc.codegen.pytext import comment
from attncc.passes.infer import host_evaluable, to_sympy
from attncc.passes.read_guards import checked_reads

MAX_UNROLL = 16  # largest constant extent of an index unrolled inside a tile
# a reduction looped over inside a tile: its start value (float, int) and its update
_LOOP = {"sum": (("0.0", "0"), "{0} + {1}"),
         "amax": (("float('-inf')", "-2147483648"),
                  "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
         "amin": (("float('inf')", "2147483647"), "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)")}

_UNARY = {
    "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})", "abs": "tl.abs({0})",
    "sigmoid": "tl.sigmoid({0})", "tanh": "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)",
    "relu": "tl.maximum({0}, 0.0, propagate_nan=tl.PropagateNan.ALL)", "elu": "tl.where({0} > 0, {0}, tl.exp({0}) - 1.0)",
    "sin": "tl.sin({0})", "cos": "tl.cos({0})", "floor": "tl.floor({0})", "ceil": "tl.ceil({0})",
    "log1p": "tl.log(1.0 + {0})", "expm1": "(tl.exp({0}) - 1.0)", "rsqrt": "tl.rsqrt({0})",
    "silu": "({0} * tl.sigmoid({0}))", "gelu": "(0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476)))",
    "sign": "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))",  # sign(nan) = 0, as torch.sign
    "neg": "(-{0})", "not": "({0} == 0)",
}
_INFIX = {"+": "+", "-": "-", "*": "*", "/": "/", "==": "==", "!=": "!=", "<": "<", "<=": "<=",
          ">": ">", ">=": ">=", "and": "&", "or": "|"}
# NaN propagates through min and max as in torch (Triton's default drops it on a GPU)
_BINARY = {"min": "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
           "max": "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"}


def literal(value) -> str:
    """Python source of a constant that Triton reads back as the same value: infinities and
    NaN as `float(...)` calls (their repr, `inf`, is no name in a kernel)."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "float('nan')" if math.isnan(value) else ("float('inf')" if value > 0 else "float('-inf')")
    return repr(value)


def as_float(v: "Val") -> str:
    """The code of a value as a float: integer constants become float literals, integer
    tiles and scalars are converted (Triton's math functions take floats only)."""
    if v.const is not None:
        return literal(float(v.const))
    if v.dtype == ir.FLOAT:
        return v.code
    return f"{v.code}.to(tl.float32)"


class Unsupported(Exception):
    """The expression needs something a tile kernel cannot do (yet); the planner says why."""


@dataclass(frozen=True)
class Val:
    """A Triton value: its source text, the tile axes it spans (`m`, `n`), its type,
    and its integer value when it is a compile-time constant (unrolled indices)."""

    code: str
    axes: frozenset = frozenset()
    dtype: str = ir.FLOAT
    const: int | float | None = None


@dataclass
class TileEmitter:
    """Emits the Triton code of IR nodes for one kernel.

    `env` maps index names to values: the query index to the row offsets, the key
    index to the column offsets, batch and head to scalars. Code goes to `prologue`
    (values that do not depend on the key tile, computed once per program) or to
    `body` (per key tile). `host_scalars` collects scalar-only expressions that the
    launcher evaluates and passes in; `tensors` the inputs the kernel reads.
    """

    program: ir.Program
    env: dict[str, Val]
    key_axis: str = "n"
    prologue: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    host_scalars: dict[str, ir.Node] = field(default_factory=dict)
    tensors: dict[str, ir.Input] = field(default_factory=dict)
    in_bounds: set[str] = field(default_factory=set)  # tile indices that run past the tensor (padding)
    materialized: dict = field(default_factory=dict)  # node -> ir.Input: computed before the launch
    memo: dict = field(default_factory=dict)
    counter: int = 0
    last_line: dict = field(default_factory=lambda: {"prologue": None, "body": None})

    # ------------------------------------------------------------------ public
    def emit(self, node: ir.Node, env: dict[str, Val] | None = None) -> Val:
        env = self.env if env is None else env
        key = (node.id, tuple((ix, env[ix].code) for ix in node.indices if ix in env))
        if key not in self.memo:
            self.memo[key] = self._emit(node, env)
        return self.memo[key]

    def assign(self, code: str, axes, dtype, node: ir.Node | None, hint="t") -> Val:
        """Bind `code` to a fresh temporary in the prologue or the loop body."""
        place = "body" if self.key_axis in axes else "prologue"
        lines = self.body if place == "body" else self.prologue
        line = node.loc.line if node is not None and node.loc else None
        if line is not None and line != self.last_line[place]:
            lines.append(comment(f"line {line}: {self.program.source.line(line).strip()}"))
            self.last_line[place] = line
        name = f"{hint}{self.counter}"
        self.counter += 1
        lines.append(f"{name} = {code}")
        return Val(name, frozenset(axes), dtype)

    # ------------------------------------------------------------------ dispatch
    def _emit(self, node, env) -> Val:
        if node in self.materialized:  # read what was computed before the launch
            array = self.materialized[node]
            args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in node.indices)
            return self.load(array, args, env, node)
        if node.indices == () and not isinstance(node, ir.Input) and host_evaluable(node):
            return self.host_scalar(node)
        method = getattr(self, "emit_" + type(node).__name__.lower(), None)
        if method is None:
            raise Unsupported(f"{type(node).__name__} at line {node.loc.line if node.loc else '?'} "
                              "inside a score or mask expression")
        return method(node, env)

    def host_scalar(self, node: ir.Node) -> Val:
        """A value of dims, params and constants: computed on the host, passed as an argument."""
        # an integer literal past int32 would be cast to the tiles' int32 and fail: such a
        # constant goes in as an argument, which Triton types as int64
        if isinstance(node, ir.Const) and not (node.dtype == ir.INT and not -2**31 <= node.value < 2**31):
            value = bool(node.value) if node.dtype == ir.BOOL else node.value
            return Val(literal(value), frozenset(), node.dtype, value)
        if isinstance(node, ir.Scalar):  # a dim or param, by its user name
            name = names.scalar(node)
        else:
            name = f"host{len(self.host_scalars)}"
        self.host_scalars[name] = node
        # booleans arrive as integers: compare, so that they combine with tiles as booleans
        return Val(f"({name} != 0)" if node.dtype == ir.BOOL else name, frozenset(), node.dtype)

    # ------------------------------------------------------------------ leaves
    def emit_index(self, node: ir.Index, env) -> Val:
        if node.name not in env:
            raise Unsupported(f"index '{node.name}' has no place in a tile (line "
                              f"{node.loc.line if node.loc else '?'})")
        return env[node.name]

    def emit_access(self, node: ir.Access, env) -> Val:
        if node.array in self.materialized:
            return self.load(self.materialized[node.array], node.args, env, node)
        if not isinstance(node.array, ir.Input):
            # a defined tensor read at other indices: re-emit it with its axes renamed
            inner = dict(env)
            for axis, arg in zip(node.axes, node.args):
                inner[axis] = self.emit(arg, env)
            return self.emit(node.array, inner)
        return self.load(node.array, node.args, env, node)

    def load(self, array: ir.Input, args, env, node: ir.Node) -> Val:
        """A (gathered) read of an input tensor, bounds-masked where indices can run out
        (0 there: a guarded read, `passes.read_guards`, reads 0 where masks exclude the point,
        as the reference does)."""
        self.tensors[array.name] = array
        guarded = {r.dim for r in checked_reads(self.program) if r.access is node and r.guards}
        offsets, checks, axes = [], [], set()
        for k, arg in enumerate(args):
            a = self.emit(arg, env)
            axes |= a.axes
            if a.const == 0:
                continue
            offsets.append(f"{a.code} * {names.tensor('st', array.name, k)}")
            if (a.axes or k in guarded) and not self.provably_in_range(arg):
                checks.append(f"({a.code} >= 0) & ({a.code} < {names.tensor('sz', array.name, k)})")
        pointer = names.tensor("ptr", array.name) + "".join(f" + {o}" for o in offsets)
        if checks:
            code = f"tl.load({pointer}, mask={' & '.join(checks)}, other=0)"
        else:
            code = f"tl.load({pointer})"
        if array.dtype == ir.FLOAT:
            code += ".to(tl.float32)"
        elif array.dtype == ir.BOOL:
            code = f"({code} != 0)"
        return self.assign(code, axes, array.dtype, node, hint="ld")

    def provably_in_range(self, arg: ir.Node) -> bool:
        """Bare query/key indices stay in range except on padded rows and columns, which
        the kernel masks anyway; other index expressions are checked."""
        return False if not isinstance(arg, ir.Index) else arg.name not in self.in_bounds

    # ------------------------------------------------------------------ arithmetic
    def emit_map(self, node: ir.Map, env) -> Val:
        args = [self.emit(a, env) for a in node.args]
        axes = frozenset().union(*(a.axes for a in args))
        folded = self.fold(node, args)
        if folded is not None:
            return folded
        c = [a.code for a in args]
        op = node.op
        if op in ("//", "%"):
            code = self.integer_division(op, node, args)
        elif op == "**":
            code = self.power(args[0], args[1])
        elif op == "*" and any(a.dtype == ir.BOOL for a in args):
            code = self.select_product(args)
        elif op == "/":  # always a true division, as in Python (integers included)
            code = f"({as_float(args[0])} / {as_float(args[1])})"
        elif op in _INFIX:
            code = f"({c[0]} {_INFIX[op]} {c[1]})"
        elif op in _BINARY:
            code = _BINARY[op].format(*c)
        elif op == "clamp":
            nan = "propagate_nan=tl.PropagateNan.ALL"
            code = f"tl.minimum(tl.maximum({c[0]}, {c[1]}, {nan}), {c[2]}, {nan})"
        elif op == "where":
            code = f"tl.where({c[0]}, {c[1]}, {c[2]})"
        elif op in _UNARY:
            arg = c[0] if op in ("neg", "not", "abs") else as_float(args[0])
            code = _UNARY[op].format(arg)
        else:
            raise Unsupported(f"operation '{op}' in a tile kernel")
        return self.assign(code, axes, node.dtype, node)

    @staticmethod
    def select_product(args) -> str:
        """`cond * y` is y where cond holds and 0 elsewhere, also for an infinite or NaN y
        (a multiply would give 0 * inf = NaN): the way to write an additive mask."""
        conds = [a for a in args if a.dtype == ir.BOOL]
        if len(conds) == 2:
            return f"({args[0].code} & {args[1].code})"
        y = next(a for a in args if a.dtype != ir.BOOL)
        zero = "0.0" if y.dtype == ir.FLOAT else "0"
        return f"tl.where({conds[0].code}, {y.code}, {zero})"

    @staticmethod
    def power(base: Val, exponent: Val) -> str:
        """`**` always gives a float, as in the language (an integer base is converted).
        Small constant integer powers multiply out; others go through exp2/log2 of |base|,
        with the sign of an odd integer power, NaN for a negative base to a fractional
        power, and x ** 0 == 1, as torch.pow does."""
        n = exponent.const
        b = as_float(base)
        if isinstance(n, (int, float)) and not isinstance(n, bool) and float(n).is_integer() and abs(n) <= 4:
            n = int(n)
            product = " * ".join([b] * abs(n)) if n else "1.0"
            return f"({product})" if n >= 0 else f"(1.0 / ({product}))"
        if base.const is not None and float(base.const) > 0:  # a positive constant: no sign to track
            return f"tl.exp2({literal(math.log2(float(base.const)))} * {exponent.code})"
        e = exponent.code
        mag = f"tl.exp2(tl.log2(tl.abs({b})) * {e})"
        if n is not None:  # a constant exponent: its parity is known here
            if not float(n).is_integer():
                return f"tl.where({b} < 0, float('nan'), {mag})"
            return f"tl.where({b} < 0, -{mag}, {mag})" if int(n) % 2 else mag
        if exponent.dtype != ir.FLOAT:
            sign = f"tl.where(({e}) % 2 != 0, tl.where({b} < 0, -1.0, 1.0), 1.0)"
            return f"tl.where({e} == 0, 1.0, {sign} * {mag})"
        whole = f"tl.floor({e}) == {e}"
        odd = f"tl.floor({e} * 0.5) * 2.0 != {e}"
        signed = f"tl.where({whole}, tl.where({odd}, -{mag}, {mag}), float('nan'))"
        return f"tl.where({e} == 0, 1.0, tl.where({b} < 0, {signed}, {mag}))"

    def integer_division(self, op, node: ir.Map, args) -> str:
        """Python's (and torch's) flooring `//` and `%`; Triton truncates integers (and has
        no `//` on floats), which differs only for negative operands, so the exact form is
        used unless sympy proves the dividend non-negative and the divisor positive."""
        if ir.FLOAT in (a.dtype for a in args) or node.dtype == ir.FLOAT:
            x, y = as_float(args[0]), as_float(args[1])
            quotient = f"tl.floor({x} / {y})"
            return quotient if op == "//" else f"({x} - {y} * {quotient})"
        c = [a.code for a in args]
        try:
            num, den = (to_sympy(a) for a in node.args)
            simple = bool(num.is_nonnegative) and bool(den.is_positive)
        except NotImplementedError:
            simple = False
        if simple:
            return f"({c[0]} {op} {c[1]})"
        mod = f"((({c[0]}) % ({c[1]}) + ({c[1]})) % ({c[1]}))"
        return mod if op == "%" else f"((({c[0]}) - {mod}) // ({c[1]}))"

    def fold(self, node: ir.Map, args) -> Val | None:
        """Constant-fold operations on unrolled indices (`where(c == 0, ...)` for a fixed c)."""
        if node.op == "where" and args[0].const is not None:
            return args[1] if args[0].const else args[2]
        if all(a.const is not None for a in args) and node.op == "**":
            try:
                value = float(args[0].const) ** args[1].const
            except ZeroDivisionError:
                value = math.inf
            value = math.nan if isinstance(value, complex) else value
            return Val(literal(value), frozenset(), node.dtype, value)
        if all(a.const is not None for a in args) and node.op in _INFIX | {"//": 0, "%": 0}:
            a, b = args[0].const, args[1].const
            if node.op == "*" and (isinstance(a, bool) or isinstance(b, bool)):  # as select_product
                cond, y = (a, b) if isinstance(a, bool) else (b, a)
                value = (cond and y) if isinstance(y, bool) else (y if cond else type(y)(0))
            else:
                value = {"+": a + b, "-": a - b, "*": a * b, "==": a == b, "!=": a != b, "<": a < b,
                         "<=": a <= b, ">": a > b, ">=": a >= b, "and": a and b, "or": a or b,
                         "/": a / b if b else None, "//": a // b if b else None,
                         "%": a % b if b else None}[node.op]
            if value is not None:
                return Val(literal(value), frozenset(), node.dtype, value)
        return None

    # ------------------------------------------------------------------ small contractions
    def emit_contract(self, node: ir.Contract, env) -> Val:
        """A contraction over small constant axes inside the tile, unrolled."""
        sizes = {}
        for ix in node.summed:
            extent = self.program.extent[ix]
            if not (extent.is_Integer and int(extent) <= MAX_UNROLL):
                raise Unsupported(f"a sum over '{ix}' (extent {extent}) inside a score or mask expression "
                                  f"(line {node.loc.line if node.loc else '?'})")
            sizes[ix] = int(extent)
        terms = []
        for point in _grid(sizes):
            inner = dict(env)
            inner.update({ix: Val(str(v), frozenset(), ir.INT, v) for ix, v in point.items()})
            factors = [self.emit(f, inner) for f in node.factors]
            terms.append(" * ".join(f.code for f in factors))
        axes = frozenset().union(*(self.emit(f, env_with_zero(env, sizes)).axes for f in node.factors))
        return self.assign(" + ".join(f"({t})" for t in terms), axes, node.dtype, node)

    # ------------------------------------------------------------------ loops inside the tile
    def emit_reduce(self, node: ir.Reduce, env) -> Val:
        """A sum, max or min over an index no tile streams, of values over the tile (a
        membership test per pair, `j // kb in kidx[i // qb, :]`: the list read per row, each
        entry compared with the tile's keys): a loop over that index's runtime extent."""
        if node.op not in _LOOP or node.block is not None or len(node.axes) != 1 or node.axes[0] in env:
            raise Unsupported(f"a reduction at line {node.loc.line if node.loc else '?'} inside a tile expression")
        g = node.axes[0]
        codes = {s.name: names.scalar(s) for s in (*self.program.dims.values(), *self.program.params.values())}
        return self.loop_reduce(node, g, printed(self.program.extent[g], codes), node.arg, env)

    def loop_reduce(self, node: ir.Node, g: str, n_g: str, term: ir.Node, env) -> Val:
        """`node`, the sum (or for a reduction its op) over `g` of `term` over a whole tile: a
        loop over `g` (n_g steps) inside the tile, the values of each step (and what they
        load) computed in the loop and forgotten after it."""
        op = node.op if isinstance(node, ir.Reduce) else "sum"
        c = self.counter
        self.counter += 1
        saved, loop = (self.prologue, self.body, self.memo), []
        self.prologue = self.body = loop
        self.memo = dict(self.memo)
        try:
            val = self.emit(term, {**env, g: Val(f"g{c}", frozenset(), ir.INT)})
        finally:
            self.prologue, self.body, self.memo = saved
        (start_float, start_int), update = _LOOP[op]
        dtype = "tl.float32" if node.dtype == ir.FLOAT else "tl.int32"
        start = start_float if node.dtype == ir.FLOAT else start_int
        shape = f"[{'BLOCK_M' if 'm' in val.axes else 1}, {'BLOCK_N' if 'n' in val.axes else 1}]"
        lines = self.body if self.key_axis in val.axes else self.prologue
        lines += [comment(f"line {node.loc.line}: {op} over {g!r} inside the tile") if node.loc else "",
                  f"red{c} = tl.full({shape}, {start}, {dtype})",
                  f"for g{c} in range(0, {n_g}):", *("    " + ln for ln in loop),
                  f"    red{c} = {update.format(f'red{c}', val.code)}"]
        return Val(f"red{c}", val.axes, node.dtype)

    def bind(self, node: ir.Node, val: Val, env: dict | None = None):
        """Make `node` (over `env`, by default the base environment) stand for an already
        computed value."""
        env = self.env if env is None else env
        self.memo[(node.id, tuple((ix, env[ix].code) for ix in node.indices if ix in env))] = val


def env_with_zero(env, sizes):
    inner = dict(env)
    inner.update({ix: Val("0", frozenset(), ir.INT, 0) for ix in sizes})
    return inner


def _grid(sizes: dict[str, int]):
    points = [{}]
    for ix, n in sizes.items():
        points = [{**p, ix: v} for p in points for v in range(n)]
    return points
