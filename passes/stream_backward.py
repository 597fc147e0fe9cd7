"""Planning the generated backward of a general streaming plan (passes/streams.py).

A general plan is passes of accumulators over tiles of (rows r, streamed index t), then torch
on small tensors. Its backward, derived for any such plan rather than per spec:

1. The forward saves the inputs and every accumulator's value (small: B*H*N*E at most).
2. Torch differentiates the epilogue (and the small ops between levels) on the saved values:
   the gradient dA of every accumulator the outputs read, and of inputs read only there.
3. Each pass, in reverse level order, is the vector-Jacobian product of its accumulators, a
   reduction over the other axis of the same tiles. With an accumulator's per-tile cotangent
   `c(r, t)` (a SUM's `dA[r]`, a DOT's `dA[r, :] . v[t, :]`, an LSE's `g[r] exp(x - L)`), every
   tile value X its expression reads gets `dX = sum_k c_k * d arg_k / d X` (forward-mode
   derivative IR, `passes.backward.Tangent`, the stored statistics held constant); the tile
   dots' `dS` become operand gradients (`dA_row += dS B`, `dB += dS^T A_row`), a DOT's values
   get `dV += arg^T dA`, and small reads (an earlier level's statistic, a bias over keys) a row
   or column sum. One kernel per side: programs over the pass's rows (what is indexed by the
   rows) and over its streamed tiles (what is indexed by the streamed index).
4. Sums online with a log-sum-exp L of the same pass (`sum_t exp(x - L) f`) read L: with L
   held constant in the tiles, its total gradient is `g = dL - sum_k <dA_k, A_k>` (torch, small),
   FlashAttention's delta generalised; then L's own VJP is `dx = exp(x - L) g`.
5. The gradients of the reads (an operand `k[b, h // R, j, d]`, a stored statistic, a
   precomputed tensor) reach the inputs, and the earlier levels' statistics, through torch
   autograd of the small read itself (GQA groups summed, precomputed operands chained).

Selections (max, min, top-k statistics) are piecewise constant in what they select but their
value's gradient is not generated: such plans take the reference backward, saying so.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from attncc import ir
from attncc.passes.backward import NoGeneratedBackward, Tangent, float_reads
from attncc.passes.mask_analysis import MaskTooComplex
from attncc.passes.mask_sympy import NotAffineExtents, analyse_masks
from attncc.passes.row_stream import Operand
from attncc.passes.streams import Accumulator, Reduction, StreamPass, StreamPlan, _walk
from attncc.passes.row_stream import _statement as statement


class Side(enum.Enum):
    """Which backward kernel of a pass reduces a gradient: the one whose programs are the
    pass's row tiles (what is indexed by the rows), or its streamed tiles."""

    ROWS = "rows"
    STREAM = "stream"


@dataclass(eq=False)
class ReadGrad:
    """A value the tiles read whose gradient a backward kernel accumulates: a tile-dot or
    value operand (`operand`: a [tile, feature] block, summed with `tl.dot`) or a small read
    (a stored statistic, a precomputed tensor, an input read at row or streamed indices: a sum
    of `dX` along the other tile axis). The partial is laid out [outer..., tile(, feature)];
    the launcher sums it to the read's indices and chains it through torch autograd."""

    node: ir.Node
    side: Side
    operand: Operand | None = None
    feature: str | None = None


@dataclass(eq=False)
class AccGrad:
    """One accumulator's backward: its derivative with respect to each tile dot and each
    small read (IR over the tile, None where zero)."""

    acc: Accumulator
    dots: dict                  # TileDot -> d arg / d dot (its full product: raw dot times factors)
    reads: dict                 # ReadGrad (small reads only) -> d arg / d read


@dataclass(eq=False)
class PassBackward:
    """The backward of one stream of a pass (a joint softmax's key sets each get their own)."""

    seg: StreamPass
    row: str
    outer: tuple
    accs: list                  # AccGrad, in the pass's order
    reads: list                 # ReadGrad: operands first, then small reads
    stream_masks: object = None  # the masks analysed with the streamed index as the tile rows (None: all)
    stream_symbols: dict = field(default_factory=dict)

    def online(self, lse: Accumulator) -> list[Accumulator]:
        return [a.acc for a in self.accs if a.acc.online is lse]


@dataclass(eq=False)
class StreamBackwardPlan:
    plan: StreamPlan
    passes: list                 # PassBackward, in reverse level order (the order they run)
    read_reasons: dict = field(default_factory=dict)  # as BackwardPlan: none (every float input differentiates)


_NOT_DIFFERENTIATED = {
    Reduction.MAX: "a maximum", Reduction.MIN: "a minimum", Reduction.TOPK: "a top-k threshold",
    Reduction.TOPK_ABOVE: "a top-k count",
}


def plan_stream_backward(plan: StreamPlan) -> StreamBackwardPlan:
    """The backward plan of a general streaming plan, or `NoGeneratedBackward` saying why not."""
    passes = []
    for sp in plan.passes:
        for seg in sp.segments():
            passes.append(_pass_backward(plan, sp, seg))
    passes.reverse()  # later levels first: their reads of earlier statistics add to those's gradients
    return StreamBackwardPlan(plan, passes)


def _pass_backward(plan: StreamPlan, sp: StreamPass, seg: StreamPass) -> PassBackward:
    program = plan.program
    where = f"pass over '{seg.stream}'"
    if seg.block is not None:
        raise NoGeneratedBackward(f"the {where} streams within blocks: its backward is not generated yet")
    if seg.lazy_dots or any(n in plan.planner.inner for a in seg.accumulators for n in _walk(a.arg, lambda m: False)):
        raise NoGeneratedBackward(f"the {where} sums over another index inside its tiles: its backward is "
                                  "not generated yet")
    for acc in seg.accumulators:
        if acc.kind in _NOT_DIFFERENTIATED:
            raise NoGeneratedBackward(f"{_NOT_DIFFERENTIATED[acc.kind]} over '{acc.stream}' "
                                      f"({statement(program, acc.node)}) is a selection: its gradient is not "
                                      "generated (the reference's autograd gives its subgradient)")
    operands = []
    for dot in seg.dots:
        for tile, op in dot.sides.items():
            operands.append(_operand_grad(program, op, Side.ROWS if tile == sp.row else Side.STREAM, dot.d))
        if float_reads(list(dot.factors)):
            raise NoGeneratedBackward(f"a factor of the tile dot {statement(program, dot.node)} reads a float "
                                      "input: its gradient is not generated yet")
    for acc in seg.accumulators:
        if acc.kind is Reduction.DOT:
            operands.append(_operand_grad(program, acc.value, Side.STREAM, acc.feature))
    materialized = {*plan.results, *plan.precomputed.inputs}
    small = _small_reads(plan, sp, seg, materialized)
    dot_nodes = {dot.node for dot in seg.dots}
    accs = []
    for acc in seg.accumulators:
        held = materialized | dot_nodes | {r.node for r in small}
        try:
            dots = {dot: Tangent(dot.node, held).of(acc.arg) for dot in seg.dots}
            reads = {r: Tangent(r.node, held).of(acc.arg) for r in small}
        except NoGeneratedBackward as why:
            raise NoGeneratedBackward(f"{statement(program, acc.node)}: {why}") from None
        accs.append(AccGrad(acc, dots, reads))
    stream_masks, symbols = _stream_ranges(program, sp, seg)
    return PassBackward(seg, sp.row, sp.outer, accs, operands + small, stream_masks, symbols)


def _operand_grad(program: ir.Program, op: Operand, side: Side, feature: str) -> ReadGrad:
    if op.transform is not None:
        raise NoGeneratedBackward(f"an operand passes through a feature map ({statement(program, op.transform)}): "
                                  "its gradient is not generated yet")
    return ReadGrad(op.access, side, op, feature)


def _small_reads(plan: StreamPlan, sp: StreamPass, seg: StreamPass, materialized: set) -> list[ReadGrad]:
    """The float values the accumulators' expressions read besides the tile dots: stored
    statistics, precomputed tensors and inputs, each indexed by the rows or by the streamed
    index (and the grid), never both (a score-sized gradient)."""
    dots = {dot.node for dot in seg.dots}
    # the pass's own log-sum-exps are held constant in its tiles: their online sums' share of
    # their gradient is `-<dA_k, A_k>` (torch), not a read
    own = {a.node for a in seg.accumulators if a.kind is Reduction.LSE}

    def leaf(n):
        return n in materialized or n in dots or (isinstance(n, ir.Access) and
                                                  (isinstance(n.array, ir.Input) or n.array in materialized))
    found: dict = {}
    for acc in seg.accumulators:
        # (predicates and index expressions are piecewise constant: nothing under them is a read)
        for n in _walk(acc.arg, lambda m: leaf(m) or m.dtype != ir.FLOAT, enter_root=False):
            if not leaf(n) or n in dots or n in own or n.dtype != ir.FLOAT or n in found:
                continue
            if isinstance(n, ir.Access) and isinstance(n.array, ir.Input) and n.array.dtype != ir.FLOAT:
                continue
            tiles = {sp.row, seg.stream} & set(n.indices)
            extra = set(n.indices) - {sp.row, seg.stream, *sp.outer}
            if len(tiles) > 1 or extra:
                raise NoGeneratedBackward(f"{statement(plan.program, n)} is read in the tiles of the pass over "
                                          f"'{seg.stream}' at indices {', '.join(n.indices)}: its gradient is not "
                                          "generated yet")
            found[n] = ReadGrad(n, Side.STREAM if seg.stream in tiles else Side.ROWS)
    return list(found.values())


def _stream_ranges(program: ir.Program, sp: StreamPass, seg: StreamPass):
    """The masks of a pass analysed with its streamed index as the tile rows: per streamed
    tile, the range of rows with an allowed pair (what the stream-side kernel visits). Bounds
    read from a row's data are left out (the range is then a hull, still exact per element);
    (None, {}) without masks or when the analysis fails: every row tile."""
    if seg.mask_plan is None:
        return None, {}
    masks = next(iter({tuple(a.spec_masks) for a in seg.accumulators}))
    try:
        plan, symbols, _ = analyse_masks(program, list(masks), seg.stream, sp.row, sp.outer)
    except (NotAffineExtents, MaskTooComplex, NotImplementedError):
        return None, {}
    if plan is None or plan.needs_block_map:
        return None, {}
    return plan, symbols
