"""The general streaming planner: a spec as a DAG of reductions over streamed axes.

The fused row-streaming skeleton (passes/row_stream.py) takes the specs whose output is
`sum_k coef_k * norm_k(S_k) @ V`. Everything else the reference runs goes through this
planner, which derives a plan instead of matching one:

1. **Normal form.** `softmax(x, t)` becomes `exp(x - L)` with `L = logsumexp(x, t)` (0 where
   its masks leave nothing), `softmax1` the same times `exp(L - log(1 + e^L))`, a `mean` a
   sum divided by a count. What is left is elementwise math, *tile dots* (a `Q K^T`-like
   contraction over a feature index of a row operand and a column operand) and
   *reductions* over one index (sum, max, min, log-sum-exp, and sums contracted with values).
2. **Linearity.** A sum over `t` is split into terms; factors that do not depend on `t`
   leave the sum (`sum_t c * A = c * sum_t A`). Each term is one accumulator.
3. **Passes.** A reduction over `t` of an expression that holds a tile dot pairing `t` with a
   row index `r` is an accumulator of the pass that streams `t` for blocks of `r`: a row pass
   (keys streamed for query tiles) or a column pass (the transposed dataflow). Its level is
   one more than that of the reductions its expression reads, which are materialised as
   small tensors over (batch, head, row); a sum linear in `exp(x - L)` with `L` an accumulator
   of the same pass is instead *online* in that pass (FlashAttention's rescaling by the
   running maximum). Accumulators of one level, row index and streamed index share a pass.
4. **The rest** (reductions of small tensors, pointwise epilogues, operands that are not plain
   reads) is computed by the reference executor's torch ops on tensors that never span a tile
   pair; a plan that would need a score-sized value there is rejected, naming the statement.

The backward of every accumulator is again a reduction over the other axis of the same
tiles, which is what the training work builds on (docs/contributing.md).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

from attncc import ir
from attncc.passes.mask_sympy import NotAffineExtents, analyse_masks
from attncc.passes.precompute import Precomputed, small_indices, tile_loop
from attncc.passes.row_stream import NotRowStreamable, Operand
from attncc.passes.row_stream import _operand as operand, _statement as statement


class Reduction(enum.Enum):
    """What an accumulator combines along the streamed index."""

    SUM = "sum"
    MAX = "amax"
    MIN = "amin"
    LSE = "logsumexp"
    TOPK = "topk_threshold"     # the k-th largest entry (a buffer of the k largest, merged per tile)
    TOPK_ABOVE = "topk_above"   # how many entries exceed that threshold (from the same buffer)
    DOT = "sum with values"  # a [rows, features] sum of weights times a value tile (tl.dot)


@dataclass(eq=False)
class TopkThreshold(ir.Reduce):
    """Per row, the `amount`-th largest allowed entry along the streamed index (`above`:
    how many entries exceed it): the statistics a top-k selection needs, from a running
    buffer of the largest entries."""

    amount: ir.Node = None
    above: bool = False


@dataclass(eq=False)
class Chosen(ir.Node):
    """`topk_mask(x, amount, t)` given its row statistics: entries above the threshold, and
    of those equal to it the first ones in index order (ties go to the lower index)."""

    x: ir.Node = None
    threshold: ir.Node = None
    above: ir.Node = None
    amount: ir.Node = None
    masks: tuple = ()

    def operands(self):
        return (self.x, self.threshold, self.above, *self.masks)


@dataclass(eq=False)
class JointLSE(ir.Reduce):
    """The log-sum-exp of one softmax over several key sets, `log(sum_k sum_{t_k} exp(x_k) +
    exp(sink))`: one accumulator whose running maximum and sum the sets' streams share (rule:
    a joint normaliser is one online normaliser over several key streams). `arg` and `axes`
    are the first set's."""

    sets: tuple = ()         # (x, axis, spec masks) per key set, in the spec's order
    sink: ir.Node | None = None  # the logit of a one-entry set (a learned sink), per row


class KeySetsApart(Exception):
    """The key sets of a joint softmax cannot share one pass: they are planned apart, each
    set its own log-sum-exp, merged by torch (the message says why)."""


class PassKind(enum.Enum):
    ROW = "row streaming"      # the streamed index is the key side of its tile dots
    COLUMN = "column streaming"  # the transposed dataflow: queries streamed for key tiles


@dataclass(eq=False)
class TileDot:
    """`sum_d a[.., r, d] * b[.., t, d]` (times factors without `d`): one `tl.dot` per tile."""

    node: ir.Contract
    d: str
    sides: dict            # tile index -> Operand read along it
    factors: tuple         # the other factors of the contraction (scales, decays)


@dataclass(eq=False)
class Accumulator:
    """One reduction computed by a pass; `node` is the value it stands for in the plan."""

    node: ir.Node
    kind: Reduction
    arg: ir.Node                  # the tile expression reduced (the weights, for DOT)
    stream: str
    row: str
    masks: tuple                  # the predicates of the masks it applies
    value: Operand | None = None  # DOT: the value read along (stream, feature)
    feature: str | None = None
    reads: tuple = ()             # every expression it evaluates (arg, value factor, mask predicates)
    online: "Accumulator | None" = None  # the LSE whose running maximum rescales this sum
    weight: ir.Node | None = None  # the `exp(x - L)` node that the running weights replace
    level: int = 0
    block: ir.Block | None = None  # a reduction within blocks: its pass streams one block's range
    spec_masks: tuple = ()         # the spec's masks it applies (ir.Mask), for the pass's tile range
    parts: list = field(default_factory=list)  # a joint LSE: the later key sets' streams of it
    joint: "Accumulator | None" = None  # a later key set's part: the joint LSE whose running state it updates
    sink: ir.Node | None = None    # a joint LSE: the sink logit its running state starts from
    into: "Accumulator | None" = None  # a later key set's value sum added into an earlier set's (stored as one)


@dataclass(eq=False)
class StreamPass:
    kind: PassKind
    row: str
    stream: str
    outer: tuple
    level: int
    accumulators: list
    dots: list = field(default_factory=list)
    block: ir.Block | None = None  # stream only the block `block.name` of the streamed index
    lazy_dots: list = field(default_factory=list)  # tile dots inside inner sums: computed in their loops
    mask_plan: object = None       # the sympy plan of the masks every accumulator applies: tile ranges
    mask_symbols: dict = field(default_factory=dict)  # its loaded scalars (sympy name -> IR node)
    mask_opaque: dict = field(default_factory=dict)   # its opaque row values (sympy name -> IR node)
    then: list = field(default_factory=list)  # later streams of the same kernel (the other key sets of a joint softmax)

    def segments(self) -> list["StreamPass"]:
        """The streams this pass's kernel walks, in order: itself, then the passes joined to it
        (each with its own streamed index, accumulators, tile dots and tile range)."""
        return [self, *self.then]

    def all_accumulators(self) -> list[Accumulator]:
        return [a for seg in self.segments() for a in seg.accumulators]


@dataclass(eq=False)
class StreamPlan:
    program: ir.Program
    passes: list
    outputs: list                   # (ir.Output, the node computing it in normal form)
    precomputed: Precomputed        # small intermediates computed by torch before a pass reads them
    results: dict                   # accumulator node -> synthetic ir.Input it is stored as
    notes: list = field(default_factory=list)  # (node, why) for the reductions torch computes
    apart: list = field(default_factory=list)  # why the key sets of a joint softmax stream in separate kernels
    planner: "Planner | None" = field(default=None, repr=False)

    @property
    def joint(self) -> bool:
        """Some key sets of a joint softmax share one pass's online normaliser."""
        return any(a.parts or a.joint is not None or a.into is not None
                   for p in self.passes for a in p.all_accumulators())

    def describe(self) -> str:
        """The plan in words: each pass, its accumulators (and the statements they come
        from), and what torch computes around the passes."""
        lines = [f"general streaming plan: {len(self.passes)} generated pass(es)"]
        for k, p in enumerate(self.passes):
            then = "".join(f", then '{s.stream}'" for s in p.then)
            dots = sum(len(s.dots) for s in p.segments())
            lazy = sum(len(s.lazy_dots) for s in p.segments())
            lines.append(f"  pass {k} (level {p.level}, {p.kind.value}): rows '{p.row}', streams '{p.stream}'{then}, "
                         f"grid over {', '.join(p.outer) or 'nothing'} x row tiles, {dots} tile dot(s)"
                         + (f" (+{lazy} in inner sums)" if lazy else ""))
            if p.then:
                lines.append("    one online normaliser over the key sets of a joint softmax, streamed one after "
                             "another: one running maximum and sum per row, a later set's larger maximum rescales "
                             "the earlier sets' sums; the stored log-sum-exp is the joint one")
            for a in p.all_accumulators():
                if a.joint is not None:
                    lines.append(f"    key set '{a.stream}' of the joint log-sum-exp: its scores and masks update the "
                                 "same running maximum and sum")
                    continue
                if a.into is not None:
                    lines.append(f"    sum with values over '{a.stream}' ({statement(self.program, a.node)}): added "
                                 f"into the sum over '{a.into.stream}', which the outputs only read added to it: one "
                                 "accumulator")
                    continue
                how = f"online with the log-sum-exp of {statement(self.program, a.online.node)}" if a.online \
                    else ""
                if a.parts:
                    how = "joint over " + ", ".join(f"'{s.stream}'" for s in (a, *a.parts)) + \
                        (" and the sink logit" if a.sink is not None else "")
                size = " x ".join(str(self.program.extent[ix]) for ix in a.node.indices)
                lines.append(f"    {a.kind.value} over '{a.stream}' -> [{', '.join(a.node.indices)}] = [{size}] "
                             f"({statement(self.program, a.node)}){'; ' + how if how else ''}")
        for n, g in self.planner.inner.items():
            if n.loc is not None:
                op = n.op if isinstance(n, ir.Reduce) and n.op != "sum" else "sum"
                lines.append(f"  inner {op} over '{g}' (a loop inside each tile): {statement(self.program, n)}")
        for n in self.precomputed.inputs:
            size = " x ".join(str(self.program.extent[ax]) for ax in self.precomputed.axes[n])
            lines.append(f"  torch, before the pass that reads it: {statement(self.program, n)} -> [{size}]")
        epilogue = {f"  torch, in the epilogue: {statement(self.program, n)} ({why})": None for n, why in self.notes
                    if n not in self.precomputed.inputs}
        lines += list(epilogue)
        lines += [f"  separate kernels: {why}" for why in self.apart]
        lines.append("  torch epilogue: " + "; ".join(f"'{out.name}' from the accumulators" for out, _ in self.outputs))
        return "\n".join(lines)


# ---------------------------------------------------------------------------- building nodes
def _map(op: str, *args: ir.Node, dtype=ir.FLOAT, loc=None) -> ir.Map:
    ordered = sorted(args, key=lambda a: -len(a.indices))
    return ir.Map(op=op, args=tuple(args), indices=ir.union_indices(ordered), dtype=dtype, loc=loc)


def _const(value, dtype=ir.FLOAT) -> ir.Const:
    return ir.Const(value=value, dtype=dtype)




class Lowering:
    """Rewrites a program's nodes into the normal form (step 1), remembering the masks of
    each reduction it makes and the `exp(x - L)` factors of each normalisation."""

    def __init__(self, program: ir.Program, joint: bool = True):
        self.program = program
        self.joint = joint          # a joint softmax's sets share one log-sum-exp (else: per set, merged)
        self.small = small_indices(program)
        self.memo: dict = {}
        self.hoisted: set = set()   # small contractions made by hoisting a gather: torch computes them
        self.lses: dict = {}        # (x, axis, masks) -> its one log-sum-exp node
        self.masks: dict = {}       # reduction node -> the masks it applies (from the spec's node)
        self.softmax: dict = {}     # exp(x - L) node -> L
        self.joint_lses: dict = {}  # the (operand, axis) pairs of a joint softmax -> its JointLSE

    def __call__(self, node: ir.Node) -> ir.Node:
        stack = [node]
        while stack:  # operands first, without recursion (long chains of `s += ...`)
            n = stack[-1]
            todo = [op for op in self.children(n) if op not in self.memo]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            if n not in self.memo:
                self.memo[n] = self.rewrite(n)
        return self.memo[node]

    def conjunction(self, masks) -> ir.Node:
        """The lowered predicates of `masks`, and-ed."""
        pred = None
        for m in masks:
            p = self(m.pred)
            pred = p if pred is None else _map("and", pred, p, dtype=ir.BOOL)
        return pred

    @staticmethod
    def children(n: ir.Node):
        if isinstance(n, JointLSE):
            return (*(x for x, _, _ in n.sets), *((n.sink,) if n.sink is not None else ()))
        if isinstance(n, ir.Access):
            return (n.array, *n.args) if not isinstance(n.array, ir.Input) else n.args
        if isinstance(n, (ir.Map, ir.Contract, ir.Reduce, ir.Normalize)):
            return n.operands() if not isinstance(n, ir.Reduce) else (n.arg,)
        if isinstance(n, ir.Select):
            return (n.arg, n.amount)
        if isinstance(n, Chosen):
            return n.operands()
        return ()

    def rewrite(self, n: ir.Node) -> ir.Node:
        m = self.memo
        if isinstance(n, ir.Map):
            args = tuple(m[a] for a in n.args)
            return n if all(a is b for a, b in zip(args, n.args)) else \
                ir.Map(op=n.op, args=args, indices=n.indices, dtype=n.dtype, loc=n.loc)
        if isinstance(n, ir.Access):
            array = n.array if isinstance(n.array, ir.Input) else m[n.array]
            args = tuple(m[a] for a in n.args)
            chosen = None if isinstance(array, ir.Input) else self.chosen_entries(n, array, args)
            return chosen or ir.Access(array=array, args=args, axes=n.axes, indices=n.indices, dtype=n.dtype,
                                       loc=n.loc)
        if isinstance(n, ir.Contract):
            factors = tuple(m[f] for f in n.factors)
            masks = tuple(self.program.masks_on(n))
            summed = [ix for ix in n.summed if ix not in self.small]
            if len(summed) == 1 and n.dtype == ir.FLOAT:
                product = factors[0]
                for f in factors[1:]:
                    product = _map("*", product, f)
                terms = self.expand(product, summed[0])
                if terms is not None and len(terms) > 1:
                    return self.sum_of_contracts(terms, n, masks)
            return self.contract(factors, n.indices, n.dtype, n.loc, masks)
        if isinstance(n, ir.Reduce):
            return self.reduce(n, m[n.arg])
        if isinstance(n, ir.Normalize):
            return self.normalize(n, m[n.arg])
        if isinstance(n, ir.Select):
            return self.select(n, m[n.arg], m[n.amount])
        return n

    def select(self, n: ir.Select, x: ir.Node, amount: ir.Node) -> ir.Node:
        """topk_mask / topk along `t`: a pass finds each row's threshold (rule: a selection
        is a threshold statistic plus a comparison), the next pass compares against it."""
        if not self.holds_scores(x):  # a selection among small values (router logits): torch's
            return ir.Select(op=n.op, arg=x, amount=amount, axis=n.axis, indices=n.indices, dtype=n.dtype, loc=n.loc)
        if n.op not in ("topk_mask", "topk") or not amount.is_scalar:
            raise NotRowStreamable(f"{n.op} along '{n.axis}' ({statement(self.program, n)}) is not generated by "
                                   "the general planner yet")
        masks = tuple(self.program.masks_on(n))
        rest = tuple(ix for ix in x.indices if ix != n.axis)
        stats = []
        for above in (False, True):
            red = TopkThreshold(op="topk_above" if above else "topk_threshold", arg=x, axes=(n.axis,),
                                indices=rest, loc=n.loc, amount=amount, above=above)
            self.masks[red] = masks
            stats.append(red)
        chosen = Chosen(x=x, threshold=stats[0], above=stats[1], amount=amount, indices=x.indices,
                        dtype=ir.BOOL, loc=n.loc, masks=tuple(self(m.pred) for m in masks))
        return chosen if n.op == "topk_mask" else _map("where", chosen, x, _const(0.0), loc=n.loc)

    def chosen_entries(self, n: ir.Access, array: ir.Node, args) -> ir.Node | None:
        """A read of scores (or weights) at a chosen key, `p[b,h,i,0]` or `p[b,h,i,cols[b,c]]`:
        a sum over that axis of the entries where it equals the chosen one, so the scores are
        never stored (rule: chosen entries are a masked sum)."""
        moved = [k for k, (axis, a) in enumerate(zip(n.axes, args))
                 if not (isinstance(a, ir.Index) and a.name == axis)]
        if len(moved) != 1 or not self.holds_scores(array) or _is_reduction(array, self.program):
            return None  # (a reduction's result is small: read it where it is stored)
        k = moved[0]
        t = n.axes[k]
        if t in self.small or t in args[k].indices or t in n.indices or n.dtype != ir.FLOAT:
            return None
        if isinstance(args[k], ir.Index):  # a renamed read: the emitter re-reads it with its axes renamed
            return None
        if args[k].indices and not (isinstance(args[k], ir.Access) and isinstance(args[k].array, ir.Input)):
            # an index expression (`pg[b,h,i,j // block]`): the scores evaluated there instead
            out = self.substitute(array, t, args[k], {})
            return out if out.indices == n.indices else self.reorder(out, n.indices)
        index = ir.Index(name=t, indices=(t,), dtype=ir.INT)
        body = _map("where", _map("==", index, args[k], dtype=ir.BOOL), array, _const(0.0), loc=n.loc)
        rest = tuple(ix for ix in body.indices if ix != t)
        red = ir.Reduce(op="sum", arg=body, axes=(t,), indices=rest, loc=n.loc)
        self.masks[red] = ()
        return red if rest == n.indices else self.reorder(red, n.indices)

    def substitute(self, node: ir.Node, t: str, expr: ir.Node, memo: dict) -> ir.Node:
        """`node` with index `t` replaced by the index expression `expr` (through everything
        over `t`; a reduction along `t` is left alone). Contractions are rebuilt through
        `contract`, so a gather this creates in one is hoisted."""
        if t not in node.indices:
            return node
        if node in memo:
            return memo[node]
        bound = set(node.summed) if isinstance(node, ir.Contract) else set(node.axes) \
            if isinstance(node, ir.Reduce) else set()
        if bound & set(expr.indices):  # the expression's index is summed inside: it would be captured
            raise NotRowStreamable(f"{statement(self.program, node)} is read at an index expression over "
                                   f"'{sorted(bound & set(expr.indices))[0]}', which it sums over")

        def indices(old):
            out = []
            for ix in old:
                for new in ((ix,) if ix != t else expr.indices):
                    if new not in out:
                        out.append(new)
            return tuple(out)

        def sub(x):
            return self.substitute(x, t, expr, memo)

        if isinstance(node, ir.Index):
            out = expr
        elif isinstance(node, ir.Map):
            out = ir.Map(op=node.op, args=tuple(sub(a) for a in node.args), indices=indices(node.indices),
                         dtype=node.dtype, loc=node.loc)
        elif isinstance(node, ir.Access):
            out = ir.Access(array=node.array, args=tuple(sub(a) for a in node.args), axes=node.axes,
                            indices=indices(node.indices), dtype=node.dtype, loc=node.loc)
        elif isinstance(node, ir.Contract):
            out = self.contract(tuple(sub(f) for f in node.factors), indices(node.indices), node.dtype, node.loc,
                                self.masks.get(node, ()))
        elif isinstance(node, ir.Reduce) and node.block is None:
            out = ir.Reduce(op=node.op, arg=sub(node.arg), axes=node.axes, indices=indices(node.indices),
                            dtype=node.dtype, loc=node.loc)
            self.masks[out] = self.masks.get(node, ())
        else:
            raise NotRowStreamable(f"{statement(self.program, node)} is read at an index expression, which "
                                   "the general planner cannot substitute into it")
        memo[node] = out
        return out

    def holds_scores(self, node: ir.Node) -> bool:
        return any(isinstance(x, ir.Contract) and not set(x.summed) <= self.small
                   for x in _walk(node, lambda x: False))

    def contract(self, factors, indices, dtype, loc, masks) -> ir.Node:
        """A contraction, with a gather that spans both tile indices hoisted out of it:
        `sum_d q[i,d] * r[clamp(j - i) + R, d]` is `qr[i, clamp(j - i) + R]` with the small
        `qr[i, w] = sum_d q[i,d] * r[w,d]` (rule: hoist a gather out of a contraction)."""
        out = ir.Contract(factors=factors, indices=indices, dtype=dtype, loc=loc)
        self.masks[out] = masks
        summed = [ix for ix in out.summed if ix not in self.small]
        if len(summed) != 1 or masks:
            return out
        for f in factors:
            if not (isinstance(f, ir.Access) and isinstance(f.array, ir.Input)):
                continue
            gathers = [k for k, a in enumerate(f.args) if not isinstance(a, ir.Index)]
            others = set(ir.union_indices([g for g in factors if g is not f]))
            bare = {a.name for a in f.args if isinstance(a, ir.Index)}
            if len(gathers) != 1 or not set(f.args[gathers[0]].indices) - others - bare:
                continue
            k = gathers[0]
            w = f"${len(self.program.extent)}"  # a generated index: no spec index starts with $
            self.program.extent[w] = f.array.dims[k]
            wi = ir.Index(name=w, indices=(w,), dtype=ir.INT)
            read = ir.Access(array=f.array, args=tuple(wi if q == k else a for q, a in enumerate(f.args)),
                             indices=ir.union_indices([wi if q == k else a for q, a in enumerate(f.args)]),
                             dtype=f.dtype, loc=f.loc)
            kept = tuple(ix for ix in ir.union_indices([*(g for g in factors if g is not f), read])
                         if ix not in summed)
            small = ir.Contract(factors=tuple(read if g is f else g for g in factors), indices=kept, dtype=dtype,
                                loc=loc)
            self.masks[small] = ()
            self.hoisted.add(small)
            args = tuple(f.args[k] if ix == w else ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in kept)
            gathered = ir.Access(array=small, args=args, axes=kept, indices=ir.union_indices(args), dtype=dtype,
                                 loc=loc)
            return gathered if set(gathered.indices) == set(indices) and gathered.indices == tuple(indices) \
                else self.reorder(gathered, indices)
        return out

    def expand(self, node: ir.Node, axis: str, limit: int = 8) -> list | None:
        """`node` as a sum of products [(sign, factors)], distributing products and quotients
        by factors without `axis` over sums; None past `limit` terms."""
        if isinstance(node, ir.Map) and node.dtype == ir.FLOAT:
            a = node.args
            if node.op in ("+", "-") and all(axis in x.indices for x in a):
                left, right = self.expand(a[0], axis, limit), self.expand(a[1], axis, limit)
                if left is None or right is None or len(left) + len(right) > limit:
                    return None
                return left + [((-sign if node.op == "-" else sign), fs) for sign, fs in right]
            if node.op == "neg":
                inner = self.expand(a[0], axis, limit)
                return None if inner is None else [(-sign, fs) for sign, fs in inner]
            if node.op == "*" and all(x.dtype == ir.FLOAT for x in a):
                left, right = self.expand(a[0], axis, limit), self.expand(a[1], axis, limit)
                if left is None or right is None or len(left) * len(right) > limit:
                    return None
                return [(s1 * s2, f1 + f2) for s1, f1 in left for s2, f2 in right]
            if node.op == "/" and axis not in a[1].indices:
                left = self.expand(a[0], axis, limit)
                return None if left is None else [(sign, fs + [_map("/", _const(1.0), a[1])]) for sign, fs in left]
        return [(1, [node])]

    def sum_of_contracts(self, terms, n: ir.Node, masks) -> ir.Node:
        """`sum_t sum_k sign_k prod(factors_k)` as a sum of contractions, one per term."""
        total = None
        for sign, fs in terms:
            part = self.contract(tuple(fs if sign > 0 else [*fs, _const(-1.0)]), n.indices, n.dtype, n.loc, masks)
            total = part if total is None else _map("+", total, part)
        return total

    def blocked(self, n: ir.Reduce, arg: ir.Node) -> ir.Node:
        """A reduction within consecutive blocks of the streamed index: an accumulator whose
        pass also runs over the block number, streaming only that block's range."""
        op = "sum" if n.op == "mean" else n.op
        red = ir.Reduce(op=op, arg=arg, axes=n.axes, block=n.block, indices=n.indices,
                        dtype=ir.FLOAT if op == "logsumexp" else n.dtype, loc=n.loc)
        self.masks[red] = ()
        if n.op != "mean":
            return red
        axis = n.axes[0]
        ones = _map("where", _map(">=", ir.Index(name=axis, indices=(axis,), dtype=ir.INT), _const(0, ir.INT),
                                  dtype=ir.BOOL), _const(1.0), _const(0.0))
        count = ir.Reduce(op="sum", arg=ones, axes=n.axes, block=n.block, indices=(n.block.name,), loc=n.loc)
        self.masks[count] = ()
        return _map("/", red, count, loc=n.loc)

    def reduce(self, n: ir.Reduce, arg: ir.Node) -> ir.Node:
        if n.block is not None:
            return self.blocked(n, arg)
        if n.op == "sum" and n.block is None and len(n.axes) == 1:  # a sum of products: contractions
            terms = self.expand(arg, n.axes[0])
            if terms is not None and any(len(fs) > 1 for _, fs in terms):
                return self.sum_of_contracts(terms, n, tuple(self.program.masks_on(n)))
        masks = tuple(self.program.masks_on(n))
        node = arg
        for k, axis in enumerate(n.axes):  # one axis at a time, innermost last
            rest = tuple(ix for ix in node.indices if ix != axis)
            op = "sum" if n.op == "mean" else n.op
            axis_masks = tuple(mk for mk in masks if axis in mk.pred.indices)
            if op == "logsumexp":  # one accumulator per log-sum-exp, written or made by a softmax
                red = self.logsumexp(node, axis, axis_masks, n.loc)
            else:
                red = ir.Reduce(op=op, arg=node, axes=(axis,), indices=rest, dtype=n.dtype, loc=n.loc)
                self.masks[red] = axis_masks
            if n.op == "logsumexp" and k < len(n.axes) - 1:
                raise NotRowStreamable(f"a log-sum-exp over several axes ({statement(self.program, n)})")
            node = red
        if n.op == "mean":  # nothing allowed: a mean of 0 (the count is clamped to 1), as the reference says
            node = _map("/", node, _map("max", self.count(n, arg, masks), _const(1.0)), loc=n.loc)
        if tuple(node.indices) != tuple(n.indices):
            node = self.reorder(node, n.indices)
        return node

    def count(self, n: ir.Reduce, arg: ir.Node, masks) -> ir.Node:
        """The number of entries a mean averages: the allowed ones under its masks."""
        one = _map("where", self.conjunction(masks), _const(1.0), _const(0.0)) if masks else None
        node = one
        for axis in n.axes:
            if node is None or axis not in node.indices:  # unmasked axis: its extent, as a sum of ones
                ones = _map("where", _map(">=", ir.Index(name=axis, indices=(axis,), dtype=ir.INT), _const(0, ir.INT),
                                          dtype=ir.BOOL), _const(1.0), _const(0.0))
                node = ones if node is None else _map("*", node, ones)
        for axis in n.axes:
            rest = tuple(ix for ix in node.indices if ix != axis)
            red = ir.Reduce(op="sum", arg=node, axes=(axis,), indices=rest, loc=n.loc)
            self.masks[red] = tuple(mk for mk in masks if axis in mk.pred.indices)
            node = red
        return node

    @staticmethod
    def reorder(node: ir.Node, indices) -> ir.Node:
        """`node` read with its indices in the order `indices` (the arguments follow the
        node's own axes; the read's indices are the wanted order)."""
        args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in node.indices)
        return ir.Access(array=node, args=args, axes=node.indices, indices=tuple(indices), dtype=node.dtype,
                         loc=node.loc)

    def logsumexp(self, x: ir.Node, axis: str, masks, loc) -> ir.Reduce:
        """The log-sum-exp of `x` along `axis` under `masks`: one node however often it is
        needed (a softmax and a `logsumexp(s, j)` output of the same scores share it)."""
        key = (x, axis, frozenset(masks))
        if key not in self.lses:
            rest = tuple(ix for ix in x.indices if ix != axis)
            self.lses[key] = ir.Reduce(op="logsumexp", arg=x, axes=(axis,), indices=rest, loc=loc)
            self.masks[self.lses[key]] = tuple(masks)
        return self.lses[key]

    def normalize(self, n: ir.Normalize, x: ir.Node) -> ir.Node:
        """`exp(x - L)` with `L` the joint log-sum-exp of all key sets (and the sink) of a joint
        softmax, online in its one pass; otherwise `exp(x - L_x) * exp(L_x - L)`: the first
        factor online in the log-sum-exp pass of this key set, the second a value per row; `L`
        adds the other key sets' log-sum-exps (planned apart), softmax1's zero logit or the
        sink (rule: a normaliser's extra logits are one-entry sets merged by log-sum-exp)."""
        masks = tuple(self.program.masks_on(n))
        if n.joint and self.joint:
            lse = self.joint_lse(n)
            weight = _map("exp", _map("-", x, _finite(lse), loc=n.loc), loc=n.loc)
            self.softmax[weight] = lse
            return _map("where", self.conjunction(masks), weight, _const(0.0), loc=n.loc) if masks else weight
        lse = self.logsumexp(x, n.axis, masks, n.loc)
        safe = _finite(lse)  # nothing allowed: weights 0, not nan
        weight = _map("exp", _map("-", x, safe, loc=n.loc), loc=n.loc)
        self.softmax[weight] = lse
        if masks:
            weight = _map("where", self.conjunction(masks), weight, _const(0.0), loc=n.loc)
        others = [self.logsumexp(self(arg), axis, tuple(self.program.set_masks(arg, axis)), n.loc)
                  for arg, axis in n.joint]
        if n.op == "softmax1":
            others.append(_const(0.0))
        if n.sink is not None:
            others.append(self(n.sink))
        if others:
            total = _finite(ir.logaddexp(lse, *others, loc=n.loc))
            weight = _map("*", weight, _map("exp", _map("-", safe, total)), loc=n.loc)
        return weight

    def joint_lse(self, n: ir.Normalize) -> JointLSE:
        """The one log-sum-exp of a joint softmax, shared by its sets' weights and by
        `return_lse`; its sets in the spec's order (that of the softmax's first weights)."""
        group = frozenset((x.id, axis) for x, axis in n.key_sets())
        if group not in self.joint_lses:
            first = min((m for m in self.program.graph if isinstance(m, ir.Normalize)
                         and frozenset((x.id, axis) for x, axis in m.key_sets()) == group), key=lambda m: m.id,
                        default=n)
            sets = tuple((self(x), axis, tuple(self.program.set_masks(x, axis))) for x, axis in first.key_sets())
            x0, axis0, masks0 = sets[0]
            lse = JointLSE(op="logsumexp", arg=x0, axes=(axis0,), indices=tuple(ix for ix in x0.indices if ix != axis0),
                           loc=n.loc, sets=sets, sink=None if n.sink is None else self(n.sink))
            self.masks[lse] = masks0
            self.joint_lses[group] = lse
        return self.joint_lses[group]

    def side_output(self, out: ir.Output) -> ir.Node:
        """An output in normal form; `return_lse`'s log-sum-exp of a joint softmax is its one
        joint accumulator (not the log-add-exp of per-set ones)."""
        sm = out.normalizer
        if sm is None or not sm.joint or not self.joint:
            return self(out.node)
        lse = self.joint_lse(sm)
        return lse if lse.indices == out.axes else self.reorder(lse, out.axes)


def _finite(lse: ir.Node) -> ir.Node:
    """A log-sum-exp with -inf (nothing allowed) read as 0, so `exp(x - L)` is 0, not nan."""
    return _map("where", _map("==", lse, _const(-math.inf), dtype=ir.BOOL), _const(0.0), lse)


# ---------------------------------------------------------------------------- analysis helpers
def _walk(node: ir.Node, stop, enter_root: bool = True) -> list[ir.Node]:
    """`node` and what it is computed from, not entering nodes for which `stop` holds
    (the root is entered anyway unless `enter_root` is false)."""
    seen, order, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        if (n is node and enter_root) or not stop(n):
            stack.extend(Lowering.children(n) if not isinstance(n, ir.Scalar) else ())
    return order


def _is_reduction(n: ir.Node, program: ir.Program) -> bool:
    return isinstance(n, ir.Reduce) or (isinstance(n, ir.Contract) and bool(n.summed)
                                        and not set(n.summed) <= small_indices(program))


class Planner:
    def __init__(self, program: ir.Program, joint: bool = True):
        # a copy whose extents can take the indices that rules introduce (`$5`)
        program = dataclasses.replace(program, extent=dict(program.extent))
        self.program = program
        self.small = small_indices(program)
        self.lower = Lowering(program, joint)
        self.pre = Precomputed(program)
        self.dots: dict = {}          # Contract -> TileDot
        self.accs: dict = {}          # reduction node -> Accumulator
        self.replaced: dict = {}      # reduction node -> the sum of coefficient * term accumulators
        self.levels: dict = {}
        self.notes: list = []
        self.value_nodes: dict = {}   # sum with values -> its value factor
        self.inner: dict = {}         # sum over a non-tile index of tile-level values -> that index
        self.pairs: list = []         # the passes, once formed (what is score-sized)

    # ------------------------------------------------------------------ tile dots
    def tile_dot(self, n: ir.Node) -> TileDot | None:
        """A contraction over one large feature index of exactly two factors that carry it,
        each with one index the other lacks (its tile index)."""
        if not isinstance(n, ir.Contract) or n in self.dots or n in self.lower.hoisted:
            return self.dots.get(n)
        summed = n.summed
        if len(summed) != 1 or summed[0] in self.small:
            return None
        d = summed[0]
        tiles = [f for f in n.factors if d in f.indices]
        if len(tiles) != 2:
            return None
        a, b = tiles
        # each side's tile index: the last large index the other side lacks (a [.., N, D] layout);
        # its other own indices (a batch of images against a batch of texts) join the grid
        own_a = [ix for ix in a.indices if ix != d and ix not in b.indices and ix not in self.small]
        own_b = [ix for ix in b.indices if ix != d and ix not in a.indices and ix not in self.small]
        if not own_a or len(own_a) != len(own_b):  # (a feature projection w[f,d] q[b,h,i,d] is no score)
            return None
        own_a, own_b = own_a[-1:], own_b[-1:]
        extra = tuple(f for f in n.factors if f not in tiles)
        if any(d in f.indices for f in extra):
            return None
        if any(self.tile_dot(m) is not None for f in tiles for m in _walk(f, lambda m: False)
               if isinstance(m, ir.Contract)):
            return None  # a factor holds scores: this is a sum over their index (weights @ values)
        try:
            sides = {own_a[0]: operand(a, own_a[0], d, "a tile operand", self.pre, own_b[0]),
                     own_b[0]: operand(b, own_b[0], d, "a tile operand", self.pre, own_a[0])}
        except NotRowStreamable:
            return None
        self.dots[n] = TileDot(n, d, sides, extra)
        return self.dots[n]

    def dots_in(self, node: ir.Node) -> list[TileDot]:
        """The tile dots an expression computes (not those inside the reductions it reads,
        but those of the inner sums it holds)."""
        nodes = _walk(node, lambda n: (_is_reduction(n, self.program) or isinstance(n, ir.Contract))
                      and n not in self.inner, enter_root=False)
        return [t for t in (self.tile_dot(n) for n in nodes) if t is not None]

    def classify_inner(self, red: ir.Node):
        """A sum over an index `g` that no tile dot pairs, of values over a whole tile pair
        (`sum_g wl[h,g] * s0[b,g,i,j]`, talking heads): not an accumulator but a tile value,
        a loop over `g` inside each tile (rule: a sum over a non-tile index stays in the tile)."""
        if isinstance(red, ir.Reduce):
            if red.op != "sum" or red.block is not None or len(red.axes) != 1:
                return
            g, parts = red.axes[0], (red.arg,)
        else:
            large = [ix for ix in red.summed if ix not in self.small]
            if len(large) != 1 or len(red.summed) != 1:
                return
            g, parts = large[0], red.factors
        dots = [t for f in parts for t in self.dots_in(f)]
        if dots and red.dtype == ir.FLOAT and not self.lower.masks.get(red) and \
                all(g not in t.sides for t in dots) and any(set(t.sides) <= set(red.indices) for t in dots):
            self.inner[red] = g

    def reductions_in(self, node: ir.Node, inside: bool = False) -> list[ir.Node]:
        """The reductions an expression reads (through tile dots, not into reductions);
        `inside`: those that the reduction `node` itself reads."""
        def reduction(n):
            return _is_reduction(n, self.program) and self.tile_dot(n) is None and n not in self.inner
        return [n for n in _walk(node, reduction, enter_root=inside) if reduction(n) and not (inside and n is node)]

    # ------------------------------------------------------------------ classification
    def tile_of(self, arg: ir.Node, stream: str) -> str | None:
        """The row index paired with `stream` by the tile dots of a reduction's expression."""
        rows = {r for t in self.dots_in(arg) if stream in t.sides for r in t.sides if r != stream}
        if len(rows) > 1:
            raise NotRowStreamable(f"the scores reduced over '{stream}' pair it with several indices "
                                   f"({', '.join(sorted(rows))})")
        return rows.pop() if rows else None

    def plan_reduction(self, red: ir.Node):
        """Make the accumulators of one reduction (or leave it to torch when no tile dot
        pairs its axis with a row index: then nothing it reads is score-sized)."""
        if red in self.accs or red in self.replaced:
            return
        if isinstance(red, JointLSE):
            self.joint_accumulator(red)
            return
        if isinstance(red, ir.Reduce):
            stream, arg, kind = red.axes[0], red.arg, Reduction(red.op)
            value, feature = None, None
        else:
            large = [ix for ix in red.summed if ix not in self.small]
            if len(large) > 1:
                self.nested_sum(red, large)
                return
            stream = large[0]
            value, feature, weights = self.values(red, stream)
            arg = _product(weights)
            self.value_nodes[red] = [f for f in red.factors if f not in weights]
            kind = Reduction.DOT if value is not None else Reduction.SUM
            if set(red.summed) - {stream}:
                raise NotRowStreamable(f"a sum over '{stream}' and a small index at {statement(self.program, red)}")
        row = self.tile_of(arg, stream)
        if row is None and self.dots_in(arg):
            raise NotRowStreamable(f"{statement(self.program, red)}: a sum over '{stream}' of scores (mixing them "
                                   f"across '{stream}') needs every '{stream}' slice of the scores in each tile; "
                                   "not generated yet")
        if row is None and isinstance(red, TopkThreshold):
            raise NotRowStreamable(f"a selection along '{stream}' ({statement(self.program, red)}) of values that "
                                   "no tile dot streams")
        if row is None:
            self.torch(red, "a reduction with no tile dot (nothing score-sized)")
            return
        masks = tuple(self.lower(m.pred) for m in self.lower.masks.get(red, ()))
        if kind in (Reduction.SUM, Reduction.DOT):
            terms = self.split(arg, stream)
            if len(terms) > 1 or terms[0][0] is not None:
                total = None
                for coef, body in terms:
                    sub = self.accumulator(red, kind, body, stream, row, masks, value, feature, fresh=True)
                    part = sub.node if coef is None else _map("*", coef, sub.node)
                    total = part if total is None else _map("+", total, part)
                self.replaced[red] = total
                return
        self.accumulator(red, kind, arg, stream, row, masks, value, feature, node=red)

    def joint_accumulator(self, red: JointLSE):
        """One log-sum-exp over several key streams: the first set's accumulator is the head
        (its running maximum and sum, started at the sink logit, and its final value); each
        later set is a part of it streamed in its own pass, with its own scores and masks,
        updating the head's running state (joined into one kernel by `_join_key_sets`)."""
        rows = {self.tile_of(x, axis) for x, axis, _ in red.sets}
        if None in rows or len(rows) != 1:
            raise KeySetsApart(f"the key sets of {statement(self.program, red)}: "
                               + ("a set's scores hold no tile dot" if None in rows
                                  else "their scores pair the key axes with different row indices"))
        parts = []
        for x, axis, masks in red.sets:
            acc = Accumulator(red, Reduction.LSE, x, axis, next(iter(rows)), tuple(self.lower(m.pred) for m in masks))
            acc.reads, acc.spec_masks = (x, *acc.masks), masks
            parts.append(acc)
        head = parts[0]
        head.parts, head.sink = parts[1:], red.sink
        for part in head.parts:
            part.joint = head
        head.reads = (*(r for a in parts for r in a.reads), *((red.sink,) if red.sink is not None else ()))
        self.accs[red] = head

    def nested_sum(self, red: ir.Contract, large: list):
        """A sum over several large indices (`o[b,i,e] = w[b,i,h] * a[b,h,i,j] * v[b,h,j,e]`,
        mixture of heads): the sum over the streamed one is an accumulator that keeps the
        others (rows per head), and torch sums those afterwards (small: no tile pair)."""
        product = _product(list(red.factors))
        streamed = [t for t in large if self.tile_of(product, t) is not None]
        masks = self.lower.masks.get(red, ())
        if len(streamed) != 1 or any(set(m.pred.indices) & (set(large) - set(streamed)) for m in masks):
            raise NotRowStreamable(f"a sum over several large indices ({', '.join(large)}) at "
                                   f"{statement(self.program, red)}")
        t = streamed[0]
        kept = tuple(ix for ix in ir.union_indices(red.factors) if ix in red.indices or (ix in large and ix != t))
        part = ir.Contract(factors=red.factors, indices=kept, dtype=red.dtype, loc=red.loc)
        self.lower.masks[part] = masks
        rest = tuple(ix for ix in large if ix != t)
        outer = ir.Reduce(op="sum", arg=part, axes=rest, indices=tuple(ix for ix in kept if ix not in rest),
                          dtype=red.dtype, loc=red.loc)
        self.replaced[red] = outer if outer.indices == red.indices else self.lower.reorder(outer, red.indices)
        self.torch(outer, f"the sum over {', '.join(rest)} of the accumulator over '{t}'")
        self.plan_reduction(part)

    def accumulator(self, red, kind, arg, stream, row, masks, value, feature, fresh=False, node=None):
        if fresh:  # a term of a split sum: a node of its own, over the reduction's indices
            node = ir.Reduce(op="sum", arg=arg, axes=(stream,), indices=red.indices, loc=red.loc)
        acc = Accumulator(node, kind, arg, stream, row, masks, value, feature,
                          block=getattr(red, "block", None))
        acc.reads = (arg, *self.value_nodes.get(red, ()), *masks)
        acc.spec_masks = tuple(self.lower.masks.get(red, ()))
        if node.dtype == ir.BOOL or (node.dtype == ir.INT and kind not in (Reduction.SUM, Reduction.MAX,
                                                                            Reduction.MIN)):
            raise NotRowStreamable(f"a boolean reduction ({statement(self.program, red)}) is not generated by the "
                                   "general planner yet")
        self.accs[node] = acc
        return acc

    def values(self, red: ir.Contract, stream: str):
        """The value factor of a sum over `stream`: the one factor carrying a large index that
        no other factor carries and the result keeps (the value feature)."""
        for f in red.factors:
            others = set().union(*(g.indices for g in red.factors if g is not f))
            own = [ix for ix in f.indices if ix in red.indices and ix not in others and ix not in self.small]
            if len(own) == 1 and stream in f.indices and not self.dots_in(f):
                rest = [g for g in red.factors if g is not f]
                rows = {r for g in rest for t in self.dots_in(g) if stream in t.sides for r in t.sides if r != stream}
                try:  # values read per (query, key) would be score-sized: refused, naming the statement
                    op = operand(f, stream, own[0], "the values", self.pre, next(iter(rows)) if rows else None)
                except NotRowStreamable:
                    if rows & set(f.indices):
                        raise
                    continue
                return op, own[0], rest
        return None, None, list(red.factors)

    def split(self, node: ir.Node, stream: str) -> list:
        """(coefficient or None, term) pairs with `node = sum coef * term`; coefficients do
        not depend on `stream`."""
        if isinstance(node, ir.Map) and node.op in ("+", "-") and all(stream in a.indices for a in node.args):
            left, right = self.split(node.args[0], stream), self.split(node.args[1], stream)
            if node.op == "-":
                right = [(_times(_const(-1.0), c), t) for c, t in right]
            return left + right
        if isinstance(node, ir.Map) and node.op == "neg":
            return [(_times(_const(-1.0), c), t) for c, t in self.split(node.args[0], stream)]
        if isinstance(node, ir.Map) and node.op == "*" and node.dtype == ir.FLOAT and \
                all(a.dtype == ir.FLOAT for a in node.args):
            free = [a for a in node.args if stream not in a.indices]
            bound = [a for a in node.args if stream in a.indices]
            if free and len(bound) == 1:
                return [(_times(free[0], c), t) for c, t in self.split(bound[0], stream)]
        return [(None, node)]

    def torch(self, node: ir.Node, why: str):
        self.replaced.setdefault(node, node)
        self.notes.append((node, why))

    # ------------------------------------------------------------------ levels and fusion
    def level(self, acc: Accumulator) -> int:
        if acc.node in self.levels:
            return self.levels[acc.node]
        self.levels[acc.node] = 0  # cycles cannot happen in a DAG; this guards re-entry
        deps = [d for r in acc.reads for d in self.dependencies(r)]
        fused, weight = self.online_lse(acc, deps)
        others = [self.dep_level(d) + 1 for d in deps if fused is None or d is not fused.node]
        if fused is not None and max(others, default=0) > self.level(fused):
            fused, weight = None, None  # it reads something a later pass than its LSE's makes
        if fused is not None:
            level = max([self.level(fused), *others])
        else:
            level = max((self.dep_level(d) + 1 for d in deps), default=0)
        acc.online, acc.weight = fused, weight
        acc.level = level
        self.levels[acc.node] = level
        return level

    def dep_level(self, dep: ir.Node) -> int:
        """The level of a value an expression reads: an accumulator's, or for a value torch
        computes, the highest level of the accumulators it reads."""
        if dep in self.accs:
            return self.level(self.accs[dep])
        return max((self.dep_level(d) for d in self.dependencies(dep, inside=True)), default=-1)

    def dependencies(self, node: ir.Node, inside: bool = False) -> list[ir.Node]:
        """The accumulators (and torch-computed values) an expression reads directly."""
        out = []
        for red in self.reductions_in(node, inside):
            target = self.replaced.get(red, red)
            if target is red:
                out.append(red)
            else:
                out += [n for n in _walk(target, lambda n: n in self.accs) if n in self.accs] or [red]
        return out

    # ------------------------------------------------------------------ the forms that run
    def kernel_form(self, node: ir.Node, memo: dict) -> ir.Node:
        """`node` as a pass kernel evaluates it: split sums become their accumulator terms;
        reductions left to torch become precomputed inputs (loaded, never score-sized), or
        loops inside the tile (`in_tile`)."""
        def leaf(n):
            if n in self.accs or n in self.dots or n in self.inner:
                return None if n in self.inner else n
            target = self.replaced.get(n)
            if target is n and self.in_tile(n):
                return None
            if target is n:
                self.check_small(n)
                self.pre.input_for(n, n.indices)
                return n
            return None if target is None else self.kernel_form(target, memo)
        out = rebuild(node, leaf, memo)
        for old, new in list(memo.items()):
            if old in self.inner and new is not old:
                self.inner[new] = self.inner[old]
        return out

    def in_tile(self, node: ir.Node) -> bool:
        """Whether a reduction left to torch is a loop inside the tile instead: a sum, max or
        min over an index that no tile dot pairs, of values over a pass's tile pair with no
        tile dot in them (a membership test per pair, `c // 2 in lists[i // 4, :]`), which
        torch could only compute score-sized (rule: a reduction over a list, per pair, is a
        loop in the tile). Then it becomes an inner sum of the tile."""
        if self.dots_in(node.arg if isinstance(node, ir.Reduce) else node) or \
                not any(tile_loop(node, p.row, p.stream) for p in self.pairs):
            return False
        self.inner[node] = node.axes[0]
        self.notes = [(n, why) for n, why in self.notes if n is not node]
        return True

    def check_small(self, node: ir.Node):
        if any({p.row, p.stream} <= set(node.indices) for p in self.pairs):
            raise NotRowStreamable(f"{statement(self.program, node)} needs a score-sized intermediate")

    def online_lse(self, acc: Accumulator, deps) -> tuple:
        """(the LSE accumulator this sum can be online with, its weight node): the sum's
        expression is linear in one `exp(x - L)` factor, L an accumulator over the same rows,
        streamed index and grid, and reads L nowhere else; (None, None) when there is none."""
        if acc.kind not in (Reduction.SUM, Reduction.DOT):
            return None, None
        for dep in deps:
            lse = self.accs.get(dep)
            if lse is None or lse.kind is not Reduction.LSE or lse.row != acc.row or _outer(lse) != _outer(acc) \
                    or acc.stream not in {s.stream for s in (lse, *lse.parts)}:
                continue
            for weight in (w for w, L in self.lower.softmax.items() if L is dep):
                if _linear(acc.arg, weight, dep):
                    return lse, weight
        return None, None


def _outer(acc: Accumulator) -> tuple:
    """The indices of an accumulator's pass grid besides row tiles (batch, head, ...)."""
    return tuple(ix for ix in acc.node.indices if ix not in (acc.row, acc.feature))


def _times(coef: ir.Node | None, factor: ir.Node | None) -> ir.Node | None:
    if factor is None:
        return coef
    if coef is None:
        return factor
    return _map("*", coef, factor)


def _product(factors) -> ir.Node:
    node = factors[0]
    for f in factors[1:]:
        node = _map("*", node, f, dtype=ir.FLOAT if ir.FLOAT in (node.dtype, f.dtype) else node.dtype)
    return node


def _linear(node: ir.Node, weight: ir.Node, lse: ir.Node, memo: dict | None = None) -> bool:
    """Whether `node` is `weight` times something that reads neither `weight` nor `lse`
    (sums of such terms included): then its sum rescales with the running maximum."""
    def free(n):
        return all(x is not weight and x is not lse for x in _walk(n, lambda m: m is weight or m is lse))

    if node is weight:
        return True
    if isinstance(node, ir.Map):
        a = node.args
        if node.op == "*":
            hits = [x for x in a if not free(x)]
            return len(hits) == 1 and _linear(hits[0], weight, lse)
        if node.op == "/":
            return free(a[1]) and _linear(a[0], weight, lse)
        if node.op in ("+", "-"):
            return all(_linear(x, weight, lse) for x in a)
        if node.op == "neg":
            return _linear(a[0], weight, lse)
        if node.op == "where":
            zero = isinstance(a[2], ir.Const) and a[2].value == 0
            return free(a[0]) and _linear(a[1], weight, lse) and (zero or _linear(a[2], weight, lse))
    return False


def plan_streams(program: ir.Program, extra_outputs=(), joint: bool = True) -> StreamPlan:
    """The general plan of a program (and of `extra_outputs`, such as the log-sum-exp that
    `return_lse` asks for), or `NotRowStreamable` naming the statement that needs a
    score-sized intermediate or a construct not generated yet. The key sets of a joint
    softmax share one online normaliser when they can share one pass (and `joint`);
    otherwise each set has its own log-sum-exp, merged by torch, and the plan says why
    (`apart`)."""
    if not joint:
        plan = _plan(program, extra_outputs, joint=False)
        plan.apart.append("the key sets were asked to be planned apart (the generated backward's form)")
        return plan
    try:
        return _plan(program, extra_outputs, joint=True)
    except KeySetsApart as why:
        plan = _plan(program, extra_outputs, joint=False)
        plan.apart.append(str(why))
        return plan


def _plan(program: ir.Program, extra_outputs, joint: bool) -> StreamPlan:
    planner = Planner(program, joint)
    program = planner.program
    outputs = [(out, planner.lower.side_output(out)) for out in (*program.outputs, *extra_outputs)]
    # every reduction reachable from the outputs, operands first
    pending = []
    for _, node in outputs:
        for n in reversed(_walk(node, lambda n: False)):
            if _is_reduction(n, program) and planner.tile_dot(n) is None and n not in pending:
                pending.append(n)
    for red in pending:
        planner.classify_inner(red)
    for red in pending:
        if red not in planner.inner:
            planner.plan_reduction(red)
    for acc in list(planner.accs.values()):
        planner.level(acc)
    parts = [part for acc in planner.accs.values() for part in acc.parts]
    for part in parts:
        part.level = part.joint.level
    passes: dict = {}
    for acc in [*planner.accs.values(), *parts]:
        outer = _outer(acc)
        key = (acc.level, acc.row, acc.stream, outer, acc.block and acc.block.name)
        if key not in passes:
            kind = PassKind.ROW if _row_major(program, acc.row, acc.stream) else PassKind.COLUMN
            passes[key] = StreamPass(kind, acc.row, acc.stream, outer, acc.level, [], block=acc.block)
        passes[key].accumulators.append(acc)
    plan_passes = sorted(passes.values(), key=lambda p: p.level)
    planner.pairs = plan_passes
    memo: dict = {}
    for acc in [*planner.accs.values(), *parts]:  # what the kernels evaluate
        weight = acc.weight
        acc.arg = planner.kernel_form(acc.arg, memo)
        acc.masks = tuple(planner.kernel_form(m, memo) for m in acc.masks)
        acc.weight = memo.get(weight, weight) if weight is not None else None
        acc.sink = None if acc.sink is None else planner.kernel_form(acc.sink, memo)
    for dot in planner.dots.values():
        dot.factors = tuple(planner.kernel_form(f, memo) for f in dot.factors)
    for p in plan_passes:
        seen = {}
        for acc in p.accumulators:
            for t in planner.dots_in(acc.arg):
                if set(t.sides) != {p.row, p.stream}:  # e.g. scores read at renamed indices
                    raise NotRowStreamable(f"{statement(program, t.node)} is read at other indices than its own "
                                           f"inside {statement(program, acc.node)}: a whole score-sized intermediate")
                seen.setdefault(t.node, t)
        inside = {m for n in planner.inner for m in _walk(n, lambda x: False) if m is not n}
        p.dots = [t for t in seen.values() if t.node not in inside]
        p.lazy_dots = [t for t in seen.values() if t.node in inside]
        p.mask_plan, p.mask_symbols, p.mask_opaque = _tile_ranges(planner, p)
        for acc in p.accumulators:
            if acc.online is not None and not any(a is acc.online or a.joint is acc.online for a in p.accumulators):
                raise NotRowStreamable("an online sum lost its log-sum-exp pass (planner error)")
    plan_passes = _join_key_sets(planner, plan_passes)
    _share_value_sums(planner, plan_passes, outputs)
    results = {}
    for k, acc in enumerate(planner.accs.values()):
        if acc.into is not None:
            continue  # stored as part of the sum it is added into
        # integer sums and extrema accumulate in fp32 (exact to 2 ** 24) and are stored as integers
        results[acc.node] = ir.Input(name=f"<acc{k}>", dtype=acc.node.dtype, loc=acc.node.loc,
                                     dims=tuple(program.extent[ix] for ix in acc.node.indices))
    if not plan_passes:
        raise NotRowStreamable("no reduction streams over scores (nothing pairs a row index with a streamed one "
                               "through a contraction), so there is no kernel to generate")
    plan = StreamPlan(program, plan_passes, outputs, planner.pre, results, planner.notes, [], planner)
    _check_small(plan)
    return plan


def _join_key_sets(planner: Planner, passes: list) -> list:
    """The passes with each joint log-sum-exp's key sets joined into one kernel: the passes of
    its later sets become further streams of the first set's (rule: one online normaliser
    over several key streams). `KeySetsApart` when they cannot be (then the sets are planned
    apart, merged by torch)."""
    out = list(passes)
    for first in passes:
        for head in [a for a in first.accumulators if a.parts]:
            owners = [first, *(next(q for q in passes if part in q.accumulators) for part in head.parts)]
            if len({id(q) for q in owners}) != len(owners):
                why = "two of them stream the same index"
            elif any(q.kind is not PassKind.ROW or q.block is not None for q in owners):
                why = "a key set streams in a column or blocked pass"
            elif any(q.then or q not in out for q in owners):
                why = "a key set's pass already streams another normaliser's sets"
            else:
                first.then = owners[1:]
                out = [q for q in out if q not in first.then]
                continue
            raise KeySetsApart(f"the key sets of {statement(planner.program, head.node)}: {why}")
    return out


def _share_value_sums(planner: Planner, passes: list, outputs: list):
    """One [rows, features] accumulator for the value sums of two key sets of one joint
    normaliser that only the outputs read, and only added (`o = raw + summary`, value features
    of one extent): the later set's sum is added into the earlier set's (`into`), whose
    stored value then stands for the sum (rule: added sums over one normaliser share an
    accumulator)."""
    where = {a: (p, s) for p in passes for s, seg in enumerate(p.segments()) for a in seg.accumulators}

    def reached(roots, uses):
        seen, stack = set(), list(roots)
        for r in roots:
            uses[r] = uses.get(r, 0) + 1
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            target = planner.replaced.get(n)
            kids = (target,) if target is not None and target is not n else \
                () if n in planner.accs else Lowering.children(n)
            for kid in kids:
                uses[kid] = uses.get(kid, 0) + 1
                stack.append(kid)
        return seen

    accs = list(where)
    kernel_side = reached([*(r for a in accs for r in (a.arg, *a.masks, *((a.sink,) if a.sink is not None else ()))),
                           *(f for p in passes for seg in p.segments() for t in seg.dots for f in t.factors),
                           *planner.pre.inputs], {})
    uses: dict = {}
    for n in reached([node for _, node in outputs], uses):
        if not (isinstance(n, ir.Map) and n.op == "+" and all(x in planner.accs for x in n.args)) or n in kernel_side:
            continue
        a, b = sorted((planner.accs[x] for x in n.args), key=lambda x: where.get(x, (None, -1))[1])
        if a.kind is not Reduction.DOT or b.kind is not Reduction.DOT or a.online is None or a.online is not b.online \
                or not a.online.parts or a is b or a.into or b.into or any(x.node in kernel_side for x in (a, b)) \
                or uses.get(a.node) != 1 or uses.get(b.node) != 1 or a.node.indices != b.node.indices \
                or where[a][0] is not where[b][0] or where[a][1] == where[b][1] \
                or planner.program.extent[a.feature] != planner.program.extent[b.feature]:
            continue
        b.into = a
        planner.replaced[n] = a.node


def _tile_ranges(planner: Planner, p: StreamPass):
    """The mask plan that bounds the streamed range of a pass's row tiles (rule: skip the
    tiles every accumulator masks): when all accumulators apply the same masks and no
    selection counts ties across tiles. (None, {}, {}) when every tile is visited."""
    masks = {tuple(a.spec_masks) for a in p.accumulators}
    if len(masks) != 1 or not next(iter(masks)) or \
            any(isinstance(n, Chosen) for a in p.accumulators for n in _walk(a.arg, lambda n: False)):
        return None, {}, {}
    try:
        plan, symbols, opaque = analyse_masks(planner.program, list(next(iter(masks))), p.row, p.stream, p.outer)
    except (NotAffineExtents, NotImplementedError):
        return None, {}, {}
    # integer values per row (`last[b,i]`) can bound a row tile's range from its rows' data:
    # kept in the form the kernel evaluates (reductions read from torch's precomputed tensors)
    rows = {name: planner.kernel_form(planner.lower(node), {}) for name, node in opaque.items()
            if node.dtype == ir.INT and set(node.indices) <= {p.row, *p.outer}}
    return plan, symbols, rows


def _row_major(program: ir.Program, row: str, stream: str) -> bool:
    """Whether a pass streams the key side: the first output is laid out over its rows."""
    axes = program.outputs[0].axes
    return row in axes or stream not in axes


def _check_small(plan: StreamPlan):
    """Reject what would leave a score-sized value to torch: an output, an operand or a value
    read by a pass that spans a tile pair (rows and streamed index of some pass)."""
    planner = plan.planner
    pairs = {frozenset((s.row, s.stream)) for p in plan.passes for s in p.segments()}
    stop = (lambda n: n in plan.results or n in planner.dots or n in planner.replaced)
    for out, node in plan.outputs:
        if any(pair <= set(out.axes) for pair in pairs):
            raise NotRowStreamable(f"the output '{out.name}' is score-sized ([{', '.join(out.axes)}], "
                                   f"{statement(plan.program, out.node)}): the general planner stores no N x M "
                                   "tensor")
        for n in _walk(node, stop, enter_root=False):
            if n in planner.dots or n in plan.results:
                if n in planner.dots:
                    raise NotRowStreamable(f"the output '{out.name}' reads the scores themselves "
                                           f"({statement(plan.program, n)}): a score-sized result")
                continue
            if any(pair <= set(n.indices) for pair in pairs):
                raise NotRowStreamable(f"the output '{out.name}' needs a score-sized value "
                                       f"({statement(plan.program, n)})")


def rebuild(node: ir.Node, leaf, memo: dict) -> ir.Node:
    """`node` with every sub-node `n` for which `leaf(n)` is not None replaced by it, and
    the nodes above rebuilt (shared operands once, via `memo`)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        new = leaf(n)
        if new is not None:
            memo[n] = new
            stack.pop()
            continue
        kids = Lowering.children(n) if isinstance(n, (ir.Map, ir.Access, ir.Contract, ir.Reduce, Chosen)) else ()
        todo = [k for k in kids if k not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        memo[n] = _with_children(n, memo)
    return memo[node]


def _with_children(n: ir.Node, memo: dict) -> ir.Node:
    if isinstance(n, ir.Map):
        args = tuple(memo[a] for a in n.args)
        if all(a is b for a, b in zip(args, n.args)):
            return n
        return ir.Map(op=n.op, args=args, indices=n.indices, dtype=n.dtype, loc=n.loc)
    if isinstance(n, ir.Access):
        array = memo.get(n.array, n.array)
        args = tuple(memo[a] for a in n.args)
        if array is n.array and all(a is b for a, b in zip(args, n.args)):
            return n
        return ir.Access(array=array, args=args, axes=n.axes, indices=n.indices, dtype=n.dtype, loc=n.loc)
    if isinstance(n, ir.Contract):
        factors = tuple(memo[f] for f in n.factors)
        if all(a is b for a, b in zip(factors, n.factors)):
            return n
        return ir.Contract(factors=factors, indices=n.indices, dtype=n.dtype, loc=n.loc)
    if isinstance(n, Chosen):
        kids = [memo[k] for k in n.operands()]
        if all(a is b for a, b in zip(kids, n.operands())):
            return n
        return Chosen(x=kids[0], threshold=kids[1], above=kids[2], amount=n.amount, masks=tuple(kids[3:]),
                      indices=n.indices, dtype=n.dtype, loc=n.loc)
    if isinstance(n, TopkThreshold):
        arg = memo[n.arg]
        return n if arg is n.arg else dataclasses.replace(n, arg=arg, id=next(ir._ids))
    if isinstance(n, ir.Reduce):
        arg = memo[n.arg]
        if arg is n.arg:
            return n
        return ir.Reduce(op=n.op, arg=arg, axes=n.axes, block=n.block, indices=n.indices, dtype=n.dtype, loc=n.loc)
    return n


def stored(node: ir.Node, array: ir.Input) -> ir.Access:
    """A read of `node`'s value stored as `array` (laid out over `node.indices`)."""
    args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in node.indices)
    return ir.Access(array=array, args=args, indices=node.indices, dtype=node.dtype, loc=node.loc)


def torch_form(plan: StreamPlan, node: ir.Node, memo: dict) -> ir.Node:
    """`node` as torch evaluates it after the passes: accumulators read from their stored
    results, split sums as the sums of their terms."""
    planner = plan.planner

    def leaf(n):
        if n in plan.results:
            return stored(n, plan.results[n])
        target = planner.replaced.get(n)
        if target is not None and target is not n:
            return torch_form(plan, target, memo)
        return None
    return rebuild(node, leaf, memo)
