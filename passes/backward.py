"""Planning the generated backward of a row-streaming plan with one softmax over the keys.

A plan with one softmax over the keys (`RowStreamPlan.has_lse`) has a FlashAttention-
style backward derived from it: the forward saves O and the log-sum-exp, a preprocessing
kernel computes `delta = rowsum(dO * O) - dLSE`, and two kernels recompute the scores tile
by tile (the forward's score modifications and masks), `P = exp(S - LSE)`, and accumulate
`dV += P^T dO`, `dS = P * (dO V^T - delta) * dS/dQK`, `dK += dS^T Q` (one program per key
tile) and `dQ += dS K` (one program per query tile). `dS/dQK` is the derivative of the
score expression with respect to its Q K^T contraction, built here as IR from the score's
own nodes (forward mode, one rule per elementwise op) so that the tile emitter prints it
next to the score.

Pointwise weights (`sigmoid(s + bias)`, `q.k * lam ** (i - j)`) are the same kernels with the
weight itself as P and `dS = dP * d weight / d QK` (the weight is the term's "score"): no
log-sum-exp and no delta.

Weights that are a sum of terms (`softmax(s1, j) - lam * softmax(s2, j)`, each with its own
Q K^T and a coefficient per row or head) are differentiated term by term: `o = sum_t c_t W_t V`,
so term t's backward is that of the plan of the term alone (`term_plan`), with `c_t * dO` as
its output gradient (`BackwardPlan.parts`); the launcher recomputes each term's output and
log-sum-exp with that plan's forward kernel (O(N) memory), and a coefficient's gradient is
`rowsum(dO * O_t)`. Heads mixed by coefficients (mixture-of-heads: the output sums over `h`)
are such a sum whose term keeps `h` as an outer index of its own plan (`term_plan`), with the
coefficient as the plan's `row_weight`: query tiles it does not weigh are skipped.

A softmax along another axis (`exp(s - lse_i(s))`, over the queries) is a pointwise weight
reading a precomputed log-sum-exp: that read is one more score read (its gradient a row or
column sum), which enters the statistics pass's scores as `P * dLSE`, the softmax backward of
the statistics plan itself with no values (`BackwardPlan.statistics`).

A softmax with a sink logit (`softmax1`'s 0, `softmax(s, j, sinks[h])`) needs nothing more in
the kernels: the stored log-sum-exp includes the sink, so `P = exp(S - LSE)` are the real keys'
probabilities, and the sink's value is 0, so `delta` is unchanged. The sink's own gradient,
`d loss / d sink = -sum over rows of exp(sink - LSE) * delta`, is a sum over the rows of
O(B*H*N) values that the launcher takes on the host (`BackwardPlan.sink`).

This module decides, as data:

- whether a plan has a generated backward at all, and if not why (`plan_backward` raises
  `NoGeneratedBackward` naming the reason);
- for one call, whether the inputs that require grad are all ones the generated backward
  differentiates (`call_reason`): q, k, v and whatever the precomputed operands are computed
  from (their gradients are chained through the reference's torch ops, which are small),
  and every float tensor the score reads besides Q K^T (ALiBi slopes, a bias table, a gate)
  whose reads `score_reads` could differentiate;
- for each such read `t[args]` of the score (`ReadGradient`), its derivative
  `d score / d t[args]` as IR (the same forward-mode rules, with Q K^T held constant; a read
  among Q K^T's per-pair factors goes through the raw dot, `BackwardPlan.raw`), and how its
  gradient `sum over the tile of dS * d score / d t[args]` is accumulated (`ReadMode`: row
  sums, column sums, one slot per pair, or a scatter for gathered reads);
- which query tiles the dK/dV kernel visits (`BackwardPlan.dkdv_mode`, from the mask analysed
  with the roles of queries and keys swapped, or the forward's block map transposed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from attncc import ir
from attncc.passes.kinds import LaunchPath, MaskMode, ReadMode, WeightKind
from attncc.passes.linear import (backward_path, chunked_backward, linear_only_backward, linear_plan,
                                  reassociable)
from attncc.passes.mask_analysis import MaskPlan, MaskTooComplex
from attncc.passes.mask_sympy import NotAffineExtents, analyse_masks
from attncc.passes.row_stream import RowStreamPlan


class NoGeneratedBackward(Exception):
    """The plan (or the call) needs a gradient the generated kernels do not compute yet."""


@dataclass
class ReadGradient:
    """One read of a float tensor in the score (`slopes[h]`, `table[h, clamp(j - i, -R, R) + R]`,
    a precomputed intermediate): the backward accumulates `sum of dS * derivative` into a
    gradient of that tensor's shape, at the read's indices."""

    node: ir.Node                # the read in the score: an Access, or a precomputed node read whole
    name: str                    # the tensor: an input's name, or a precomputed one's (`<pre0>`)
    args: tuple                  # its index expressions, one per dim of the tensor (IR, integer)
    derivative: ir.Node | None   # d score / d read, over the score tile; None: 0 (piecewise constant)
    mode: ReadMode
    tile_dims: tuple = ()        # the dims whose index depends on the query or key index

    @property
    def outer_dims(self) -> tuple:
        """The dims indexed by batch and head indices only (one value per program)."""
        return tuple(k for k in range(len(self.args)) if k not in self.tile_dims)


@dataclass
class BackwardPlan:
    plan: RowStreamPlan
    derivative: ir.Node | None  # d score / d (its Q K^T node), elementwise; None: the score is Q K^T
    grad_inputs: frozenset      # float inputs whose gradients the generated backward gives
    score_inputs: frozenset     # float inputs the score reads besides Q K^T
    chained: tuple              # operand names that are precomputed (gradients chained through torch)
    key_masks: MaskPlan | None = None  # the mask analysed with the roles of i and j swapped
    key_mask_symbols: dict = field(default_factory=dict)  # its loaded scalars (as RowStreamPlan.mask_symbols)
    reads: tuple = ()           # ReadGradient of every float read in the score (and Q K^T's factors)
    read_reasons: dict = field(default_factory=dict)  # score input -> why its gradient is not generated
    raw: ir.Node | None = None  # the scaled Q K^T dot before its per-pair factors (what `qk` holds in a tile)
    sink: ir.Node | None = None  # the softmax's sink logit when float inputs flow into it (their gradient)
    parts: tuple = ()           # several terms: (BackwardPlan of the term alone, its coefficient or None) each
    statistics: dict = field(default_factory=dict)  # precomputed log-sum-exp node -> its statistics pass's BackwardPlan
    linear_only: bool = False   # generated for the linear-time paths only (`passes.linear.linear_only_backward`)

    @property
    def pointwise(self) -> bool:
        """Pointwise weights (`sigmoid(s + bias)`, decayed linear attention): P is the weight
        itself, recomputed per tile, and dS = dP * d weight / d QK: no LSE, no delta."""
        return self.plan.terms[0].kind == WeightKind.POINTWISE

    def reads_in(self, kernel: str) -> list[tuple[int, ReadGradient]]:
        """(number, read) of the reads a backward kernel accumulates: column sums need a
        program per key tile (`"dkdv"`); the others are accumulated by the dQ kernel (`"dq"`),
        which holds one fp32 accumulator where dK/dV holds two (a scatter there spills on sm_90)."""
        return [(r, rd) for r, rd in enumerate(self.reads)
                if (rd.mode == ReadMode.COLS) == (kernel == "dkdv") and rd.derivative is not None]

    @property
    def dkdv_mode(self) -> MaskMode:
        """How the dK/dV kernel finds the query tiles of a key tile: the forward's block map
        transposed (per key tile, its non-empty query tiles, full ones first), symbolic query
        ranges from the mask analysed with the roles swapped (`key_masks`), or every query tile
        (no mask, or a transposed analysis that did not give exact ranges)."""
        if self.plan.mask_mode == MaskMode.BLOCK_MAP:
            return MaskMode.BLOCK_MAP
        if self.key_masks is not None and not self.key_masks.needs_block_map:
            return MaskMode.AFFINE
        return MaskMode.NONE


def plan_backward(plan: RowStreamPlan) -> BackwardPlan:
    """The backward plan of a row-streaming plan, or `NoGeneratedBackward` saying why not."""
    term = plan.terms[0]
    if len(plan.terms) > 1 or term.coef is not None or plan.summed_outer:  # o = sum_t c_t W_t V: term by term
        return _terms_backward(plan)
    linear_only = term.kind == WeightKind.POINTWISE and linear_only_backward(plan)
    if linear_only and not (reassociable(plan) or chunked_backward(plan)):
        raise NoGeneratedBackward("pointwise weights divided by their row sums (normalised linear attention) or "
                                  "passed through feature maps: their backward is generated on the linear-time "
                                  "paths only, which this plan does not take (a score modification, or a mask "
                                  "other than a causal switch)")
    if linear_only:  # the kernels' plan: per-query and per-key factors folded into the operands' maps
        plan = linear_plan(plan)
        term = plan.terms[0]
    for op, role in ((term.q, "queries"), (term.k, "keys"), (plan.v, "values")):
        if op is not None and op.transform is not None and not linear_only:
            raise NoGeneratedBackward(f"the {role} pass through a feature map (line "
                                      f"{op.transform.loc.line if op.transform.loc else '?'}): its gradient "
                                      "is not generated yet")
    materialized = set(plan.precomputed.inputs) if plan.precomputed else set()
    statistics = statistics_backward(plan, term.qk, materialized)
    derivative = None  # None: the score is Q K^T itself (the derivative is 1)
    if term.score is not term.qk:
        derivative = Tangent(term.qk, materialized).of(term.score)
        if derivative is None:  # the score does not change with Q K^T (floor, sign, ...): 0, not 1
            derivative = ir.Const(value=0.0, dtype=ir.FLOAT)
    synthetic = {inp.name: node for node, inp in plan.precomputed.inputs.items()} if plan.precomputed else {}
    operands = []
    chained = []
    for op in (term.q, term.k, *([plan.v] if plan.v is not None else [])):  # a statistics pass has no values
        node = synthetic.get(op.input.name)
        if node is not None:
            chained.append(op.input.name)
        operands.append(node if node is not None else op.transform or op.access)
    grad_inputs = float_reads(operands)
    score_inputs = float_reads([term.score, *term.qk_factors], stop={term.qk})
    raw = ir.Contract(factors=(term.q.access, term.k.access), indices=term.qk.indices, dtype=ir.FLOAT,
                      loc=term.qk.loc) if term.qk_factors else None
    reads, reasons = score_reads(plan, derivative, raw)
    grad_inputs |= score_inputs - set(reasons)
    sink_inputs = float_reads([term.sink]) if term.sink is not None else set()
    grad_inputs |= sink_inputs
    for stats in statistics.values():
        grad_inputs |= stats.grad_inputs
        for name, why in stats.read_reasons.items():
            reasons.setdefault(name, why)
    key_masks, key_symbols = transposed_masks(plan)
    return BackwardPlan(plan, derivative, frozenset(grad_inputs - set(reasons)), frozenset(score_inputs),
                        tuple(chained), key_masks, key_symbols, tuple(reads), reasons, raw,
                        term.sink if sink_inputs else None, statistics=statistics,
                        linear_only=linear_only)


def statistics_backward(plan: RowStreamPlan, qk: ir.Node, materialized) -> dict:
    """The backward plans of the statistics passes whose log-sum-exp the weights read (softmax
    over queries: `exp(s - lse_i(s))`), by precomputed node. The read is one more score read
    (its gradient `dlse`, a row or column sum of `dS * -W`), and `dlse` enters the statistics
    pass's scores as `P * dlse` (`d lse / d s = P`): that pass's own softmax backward with no
    values (delta = -dlse), so Q and K get their gradients from generated kernels and nothing
    score-sized is kept. A precomputed value that depends on Q K^T otherwise (a statistic the
    generated passes do not compute) would need the reference's score-sized autograd: refused."""
    found = {}
    tangent = Tangent(qk)
    for node in materialized:
        if not tangent.depends_on(node):
            continue
        stats = plan.statistics.get(node)
        if stats is None or stats.needs_block_map:
            what = "whose mask needs a block map" if stats is not None else "that no generated pass computes"
            raise NoGeneratedBackward(f"the weights read a statistic of the scores {what} (line {_line(node)}): "
                                      "its backward is not generated yet")
        found[node] = plan_backward(stats)
    return found


def term_plan(plan: RowStreamPlan, t: int) -> RowStreamPlan:
    """The plan of weight term t alone, without its coefficient: what the backward of a sum
    of terms recomputes and differentiates for that term. When the output sums over heads
    (mixture-of-heads), the term's output keeps them: they become outer indices of its own
    grid, its output is one per head, and its coefficient becomes the plan's `row_weight`, so
    query tiles that no row weighs (heads the router did not choose) are skipped."""
    term = plan.terms[t]
    heads = plan.summed_outer
    output = plan.output
    if heads:
        axes = (*plan.outer, *heads, plan.i, plan.e)
        output = ir.Output(output.name, output.node, axes, tuple(plan.program.extent[ix] for ix in axes), output.loc)
    return dataclasses.replace(plan, terms=[dataclasses.replace(term, coef=None)], group=None,
                               outer=(*plan.outer, *heads), summed_outer=(), output=output,
                               row_weight=term.coef if heads else None)


def _terms_backward(plan: RowStreamPlan) -> BackwardPlan:
    """The backward plan of weights that are a sum of terms: one part per term."""
    parts = []
    for t, term in enumerate(plan.terms):
        try:
            part = plan_backward(term_plan(plan, t))
        except NoGeneratedBackward as why:
            raise NoGeneratedBackward(f"term {t} of the weights: {why}") from None
        parts.append((part, term.coef))
    coefs = [c for _, c in parts if c is not None]
    reasons: dict = {}
    for part, _ in parts:
        for name, why in part.read_reasons.items():
            reasons.setdefault(name, why)
    grad_inputs = set().union(*(p.grad_inputs for p, _ in parts)) | float_reads(coefs)
    score_inputs = set().union(*(p.score_inputs for p, _ in parts))
    return BackwardPlan(plan, None, frozenset(grad_inputs - set(reasons)), frozenset(score_inputs), (),
                        read_reasons=reasons, parts=tuple(parts))


def score_reads(plan: RowStreamPlan, dscore_dqk: ir.Node | None, raw: ir.Node | None
                ) -> tuple[list[ReadGradient], dict[str, str]]:
    """Every read of a float tensor in the score and in Q K^T's per-pair factors, with its
    derivative and accumulation mode; and, per float input whose gradient cannot be generated
    this way, why (a read inside a sum over another index, a defined tensor read at other
    indices, an index the tile does not have, a function without a derivative rule).

    The score is walked through elementwise maps and reads of defined tensors at their own
    indices (what the tile emitter computes inline); precomputed intermediates are reads of
    their own (the backward chains their gradient through the reference's torch ops); reads in
    index expressions are reads too, with a zero derivative (integer, piecewise constant)."""
    term = plan.terms[0]
    materialized = dict(plan.precomputed.inputs) if plan.precomputed else {}
    found: list[tuple[ir.Node, str, tuple]] = []
    reasons: dict[str, str] = {}
    seen, stack = set(), [term.score, *term.qk_factors]
    while stack:
        node = stack.pop()
        if node in seen or node is term.qk:
            continue
        seen.add(node)
        if node in materialized:
            if node.dtype == ir.FLOAT:
                args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in node.indices)
                found.append((node, materialized[node].name, args))
            continue
        if isinstance(node, ir.Access) and node.array in materialized:
            if node.dtype == ir.FLOAT:
                found.append((node, materialized[node.array].name, node.args))
            stack.extend(node.args)
            continue
        if isinstance(node, ir.Access) and isinstance(node.array, ir.Input):
            if node.array.dtype == ir.FLOAT:
                found.append((node, node.array.name, node.args))
            stack.extend(node.args)
            continue
        identity = isinstance(node, ir.Access) and all(isinstance(a, ir.Index) and a.name == ax
                                                        for a, ax in zip(node.args, node.axes))
        if isinstance(node, ir.Map) or identity:
            stack.extend(node.operands())
            continue
        if isinstance(node, (ir.Index, ir.Const, ir.Scalar, ir.Input)):
            continue
        what = {ir.Contract: "a sum", ir.Reduce: "a reduction", ir.Normalize: "a normalisation",
                ir.Select: "a selection"}.get(type(node), "a defined tensor read at other indices")
        for name in float_reads([node], stop=set(materialized)):
            reasons.setdefault(name, f"the score reads it inside {what} (line {_line(node)}): its gradient "
                                     "is not generated yet")
    reads = []
    constants = {term.qk, *materialized}
    for node, name, args in found:
        try:
            mode, tile_dims = read_mode(plan, node, args)
            derivative = read_derivative(term, node, dscore_dqk, raw, constants)
        except NoGeneratedBackward as why:
            reasons.setdefault(name, str(why))
            continue
        reads.append(ReadGradient(node, name, tuple(args), derivative, mode, tile_dims))
    reads = [rd for rd in reads if rd.name not in reasons]
    for name in list(reasons):  # a precomputed tensor's reason is its inputs' reason
        if name in {inp.name for inp in materialized.values()}:
            node = next(n for n, inp in materialized.items() if inp.name == name)
            for inner in float_reads([node]):
                reasons.setdefault(inner, reasons[name])
            del reasons[name]
    return reads, reasons


def read_mode(plan: RowStreamPlan, node: ir.Node, args) -> tuple[ReadMode, tuple[int, ...]]:
    """How the gradient of a read is accumulated, from what its index expressions depend on,
    and which of its dims depend on the query or key index."""
    i, j = plan.i, plan.j
    tile = {i, j}
    for a in args:
        extra = set(a.indices) - tile - set(plan.outer)
        if extra:
            raise NoGeneratedBackward(f"line {_line(node)} reads a float tensor at '{sorted(extra)[0]}', which is "
                                      "no index of the score tile: its gradient is not generated yet")
    deps = [set(a.indices) & tile for a in args]
    tile_dims = tuple(k for k, d in enumerate(deps) if d)
    if not any(j in d for d in deps):
        return ReadMode.ROWS, tile_dims
    if not any(i in d for d in deps):
        return ReadMode.COLS, tile_dims
    bare = {a.name: k for k, a in enumerate(args) if isinstance(a, ir.Index) and a.name in tile}
    if set(bare) == tile and set(tile_dims) == set(bare.values()):
        return ReadMode.TILE, tile_dims
    return ReadMode.SCATTER, tile_dims


def read_derivative(term, read: ir.Node, dscore_dqk: ir.Node | None, raw: ir.Node | None,
                    constants) -> ir.Node | None:
    """d score / d read: through the score with Q K^T (and precomputed values) held constant,
    plus, for a read among Q K^T's per-pair factors, `d score / d QK * d (raw * factors) / d read`
    (`raw`: the scaled dot, which the tile holds as `qk`)."""
    direct = Tangent(read, constants)
    result = direct.of(term.score)
    if term.qk_factors:
        product = raw
        for f in term.qk_factors:
            product = direct.map("*", product, f, loc=f.loc)
        via = Tangent(read, {*constants, raw}).of(product)
        outer = _const(1.0) if term.score is term.qk else dscore_dqk  # None: d score / d QK is 0
        result = direct.add(result, direct.mul(outer, via, read.loc), read.loc)
    return result


def _line(node: ir.Node) -> str:
    return str(node.loc.line) if node.loc else "?"


def transposed_masks(plan: RowStreamPlan) -> tuple[MaskPlan | None, dict]:
    """The plan's affine masks analysed with the keys as the tile rows: per key tile, the range
    of query rows with an allowed pair and the range where every pair is allowed (what the
    dK/dV kernel visits). (None, {}) without masks, with a block map, or when the transposed
    analysis fails (then every query tile is visited)."""
    if plan.mask_mode != MaskMode.AFFINE:
        return None, {}
    try:
        key_masks, symbols, opaque = analyse_masks(plan.program, plan.masks, plan.j, plan.i, plan.outer)
    except (NotAffineExtents, MaskTooComplex):
        return None, {}
    if key_masks is None or opaque or key_masks.needs_block_map:
        return None, {}
    return key_masks, symbols


def general_plan_reason(why: str) -> str:
    """Why a spec that the general streaming planner took has no generated backward: what
    `passes.stream_backward` does not differentiate yet."""
    return f"the general streaming plan's backward is not generated: {why}"


def call_reason(bplan: BackwardPlan, requires_grad, sizes: dict | None = None,
                scalars: dict | None = None) -> str | None:
    """Why a call whose inputs `requires_grad` (names) cannot take the generated backward,
    or None when it can. `sizes` (every index's extent) and `scalars` (dims and params): the
    call's, which decide whether a plan with a linear-time backward only takes it."""
    missing = sorted(n for n in requires_grad if n in bplan.read_reasons)
    if missing:
        return "; ".join(f"{n}: {bplan.read_reasons[n]}" for n in missing)
    plan = bplan.plan
    if getattr(bplan, "linear_only", False) and sizes is not None and \
            backward_path(plan, sizes, scalars) == LaunchPath.ROW_STREAMING:
        return (f"normalised linear attention (or feature maps): the backward is generated for the linear-time "
                f"paths only (no active mask, or exactly causal on a square score), and this call "
                f"({plan.i}={sizes[plan.i]}, {plan.j}={sizes[plan.j]}) streams rows")
    return None


def float_reads(roots, stop=()) -> set[str]:
    """The float input tensors a set of nodes reads (through anything but the `stop` nodes)."""
    found, seen, stack = set(), set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if isinstance(node, ir.Input):
            if node.dtype == ir.FLOAT:
                found.add(node.name)
            continue
        stack.extend(node.operands())
    return found


def _post_order(root: ir.Node, memo: dict, children, compute):
    """`memo[root] = compute(root)`, the children first, each node once: iterative, since score
    chains (`s += ...` repeated) may be deeper than Python's recursion allows."""
    stack = [root]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        pending = [o for o in children(n) if o not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[n] = compute(n)
        stack.pop()
    return memo[root]


def _const(value: float) -> ir.Const:
    return ir.Const(value=float(value), dtype=ir.FLOAT)


def _is_const(node: ir.Node | None, value: float) -> bool:
    return isinstance(node, ir.Const) and node.value == value


class Tangent:
    """Forward-mode derivatives of elementwise IR with respect to one node (`wrt`).

    `of(node)` is an IR node for d node / d wrt, or None where it is zero (the node does not
    depend on `wrt`, or is piecewise constant in it: comparisons, floor, integer results).
    The result reuses `node`'s own subexpressions, so the tile emitter (memoised by node)
    prints each of them once, next to the score."""

    def __init__(self, wrt: ir.Node, constants=()):
        self.wrt = wrt
        self.constants = set(constants) - {wrt}  # nodes held constant (Q K^T, precomputed values)
        self.memo: dict = {}
        self.depends: dict = {}

    def depends_on(self, node: ir.Node) -> bool:
        return _post_order(node, self.depends,
                           lambda n: () if n is self.wrt or n in self.constants else n.operands(),
                           lambda n: n is self.wrt or (n not in self.constants
                                                       and any(self.depends[o] for o in n.operands())))

    def of(self, node: ir.Node) -> ir.Node | None:
        return _post_order(node, self.memo, self.operands_needed, self.rule)

    def operands_needed(self, node: ir.Node):
        if node is self.wrt or node.dtype != ir.FLOAT or not self.depends_on(node):
            return ()
        if isinstance(node, ir.Map):
            return node.args
        if isinstance(node, ir.Access) and not isinstance(node.array, ir.Input):
            return (node.array,)
        return ()

    # ------------------------------------------------------------------ building IR
    def map(self, op: str, *args: ir.Node, loc=None, dtype=ir.FLOAT) -> ir.Node:
        ordered = sorted(args, key=lambda a: -len(a.indices))
        return ir.Map(op=op, args=tuple(args), indices=ir.union_indices(ordered), dtype=dtype, loc=loc)

    def add(self, a, b, loc):
        if a is None:
            return b
        if b is None:
            return a
        return self.map("+", a, b, loc=loc)

    def neg(self, a, loc):
        return None if a is None else self.map("neg", a, loc=loc)

    def mul(self, a, b, loc):
        if a is None or b is None:
            return None
        if _is_const(a, 1.0):
            return b
        if _is_const(b, 1.0):
            return a
        return self.map("*", a, b, loc=loc)

    def select(self, cond, a, loc):
        """`a` where `cond` holds, 0 elsewhere (None stays zero)."""
        return None if a is None else self.map("where", cond, a, _const(0.0), loc=loc)

    # ------------------------------------------------------------------ rules
    def rule(self, node: ir.Node) -> ir.Node | None:
        if node is self.wrt:
            return _const(1.0)
        if node.dtype != ir.FLOAT or not self.depends_on(node):
            return None
        loc = node.loc
        if isinstance(node, ir.Access) and not isinstance(node.array, ir.Input):
            if all(isinstance(a, ir.Index) and a.name == ax for a, ax in zip(node.args, node.axes)):
                return self.memo[node.array]
            raise NoGeneratedBackward(f"line {loc.line if loc else '?'} reads the scores at other indices: "
                                      "its gradient is not generated yet")
        if isinstance(node, ir.Access):  # another read of an input: its integer indices are piecewise constant
            return None
        if not isinstance(node, ir.Map):
            raise NoGeneratedBackward(f"the score depends on a {type(node).__name__.lower()} of Q K^T (line "
                                      f"{loc.line if loc else '?'}): its gradient is not generated yet")
        op, args = node.op, node.args
        d = [self.memo.get(a) if a.dtype == ir.FLOAT else None for a in args]
        m = self.map
        if op == "+":
            return self.add(d[0], d[1], loc)
        if op == "-":
            return self.add(d[0], self.neg(d[1], loc), loc)
        if op == "neg":
            return self.neg(d[0], loc)
        if op == "*":
            if any(a.dtype == ir.BOOL for a in args):  # `cond * y`: y where cond holds, else 0
                cond = next(a for a in args if a.dtype == ir.BOOL)
                k = 1 if args[0] is cond else 0
                return self.select(cond, d[k], loc)
            return self.add(self.mul(d[0], args[1], loc), self.mul(args[0], d[1], loc), loc)
        if op == "/":
            first = None if d[0] is None else m("/", d[0], args[1], loc=loc)
            second = None if d[1] is None else m("/", self.mul(node, d[1], loc), args[1], loc=loc)
            return self.add(first, self.neg(second, loc), loc)
        if op == "**":
            base, exponent = args
            first = second = None
            if d[0] is not None:
                lower = _const(exponent.value - 1) if isinstance(exponent, ir.Const) else \
                    m("-", exponent, _const(1.0), loc=loc)
                first = self.mul(d[0], m("*", exponent, m("**", base, lower, loc=loc), loc=loc), loc)
            if d[1] is not None:
                second = self.mul(d[1], m("*", node, m("log", base, loc=loc), loc=loc), loc)
            return self.add(first, second, loc)
        if op == "where":
            if d[1] is None and d[2] is None:
                return None
            return m("where", args[0], d[1] or _const(0.0), d[2] or _const(0.0), loc=loc)
        if op in ("min", "max"):
            if d[0] is None and d[1] is None:
                return None
            first_wins = m("<=" if op == "min" else ">=", args[0], args[1], loc=loc, dtype=ir.BOOL)
            return m("where", first_wins, d[0] or _const(0.0), d[1] or _const(0.0), loc=loc)
        if op == "clamp":
            x, lo, hi = args
            inside = m("and", m(">=", x, lo, loc=loc, dtype=ir.BOOL), m("<=", x, hi, loc=loc, dtype=ir.BOOL),
                       loc=loc, dtype=ir.BOOL)
            result = self.select(inside, d[0], loc)
            if d[1] is not None:
                result = self.add(result, self.select(m("<", x, lo, loc=loc, dtype=ir.BOOL), d[1], loc), loc)
            if d[2] is not None:
                result = self.add(result, self.select(m(">", x, hi, loc=loc, dtype=ir.BOOL), d[2], loc), loc)
            return result
        if op in ("floor", "ceil", "sign", "//", "%"):
            return None  # piecewise constant
        if len(args) == 1:
            factor = self.unary_factor(op, args[0], node, loc)
            return self.mul(d[0], factor, loc)
        raise NoGeneratedBackward(f"the score applies '{op}' to Q K^T (line {loc.line if loc else '?'}): its "
                                  "derivative is not generated yet")

    def unary_factor(self, op: str, x: ir.Node, y: ir.Node, loc) -> ir.Node:
        """dy/dx for y = op(x), built from x and y themselves."""
        m, one = self.map, _const(1.0)
        if op == "exp":
            return y
        if op == "expm1":
            return m("exp", x, loc=loc)
        if op == "log":
            return m("/", one, x, loc=loc)
        if op == "log1p":
            return m("/", one, m("+", one, x, loc=loc), loc=loc)
        if op == "sqrt":
            return m("/", _const(0.5), y, loc=loc)
        if op == "rsqrt":
            return m("*", _const(-0.5), m("/", y, x, loc=loc), loc=loc)
        if op == "tanh":
            return m("-", one, m("*", y, y, loc=loc), loc=loc)
        if op == "sigmoid":
            return m("*", y, m("-", one, y, loc=loc), loc=loc)
        if op == "sin":
            return m("cos", x, loc=loc)
        if op == "cos":
            return m("neg", m("sin", x, loc=loc), loc=loc)
        if op == "abs":
            return m("sign", x, loc=loc)
        if op == "relu":
            return m("where", m(">", x, _const(0.0), loc=loc, dtype=ir.BOOL), one, _const(0.0), loc=loc)
        if op == "elu":
            return m("where", m(">", x, _const(0.0), loc=loc, dtype=ir.BOOL), one, m("exp", x, loc=loc), loc=loc)
        if op == "silu":
            s = m("sigmoid", x, loc=loc)
            return m("*", s, m("+", one, m("*", x, m("-", one, s, loc=loc), loc=loc), loc=loc), loc=loc)
        if op == "gelu":  # Phi(x) + x phi(x), with Phi(x) = gelu(x) / x (1/2 at 0)
            phi = m("*", _const(0.3989422804014327), m("exp", m("*", _const(-0.5), m("*", x, x, loc=loc), loc=loc),
                                                         loc=loc), loc=loc)
            zero = m("==", x, _const(0.0), loc=loc, dtype=ir.BOOL)
            cdf = m("where", zero, _const(0.5), m("/", y, m("where", zero, _const(1.0), x, loc=loc), loc=loc), loc=loc)
            return m("+", cdf, m("*", x, phi, loc=loc), loc=loc)
        raise NoGeneratedBackward(f"the score applies '{op}' to Q K^T (line {loc.line if loc else '?'}): its "
                                  "derivative is not generated yet")
