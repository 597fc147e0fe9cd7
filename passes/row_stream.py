"""Planning a spec onto the row-streaming skeleton (a FlashAttention forward).

The skeleton fits specs whose first output is `softmax_j(S) @ V`, where the score
S is one `Q K^T` contraction followed by any elementwise score modifications, and
masks restrict (i, j). This pass finds those pieces in the IR (by structure, not by
tensor names), folds the scalar factors of `Q K^T` into one scale, and analyses the
masks with sympy: affine predicates give per-query-tile key ranges and full tiles;
anything else (tensor lookups, div/mod neighbourhoods, geometry) needs a runtime
block map. When the spec does not fit, `NotRowStreamable` says which part does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from attncc import ir
from attncc.passes.infer import host_evaluable, to_sympy
from attncc.passes.kinds import MaskMode, WeightKind
from attncc.passes.mask_analysis import MaskPlan, longest_first
from attncc.passes.mask_sympy import NotAffineExtents, analyse_masks
from attncc.passes.precompute import Precomputed, TooLarge, scan_for_precompute, small_indices


class NotRowStreamable(Exception):
    """The spec has a part the row-streaming skeleton cannot express."""


@dataclass
class Operand:
    """A tensor read by the kernel's main loads: which arg holds the tile axis
    (`row`), which the feature axis (`feature`), and the other (outer) arguments."""

    access: ir.Access
    row: int
    feature: int
    transform: ir.Node | None = None  # an elementwise feature map of the read (`elu(q) + 1`)

    @property
    def input(self) -> ir.Input:
        return self.access.array

    def outer_args(self):
        return [(k, a) for k, a in enumerate(self.access.args) if k not in (self.row, self.feature)]


@dataclass
class Term:
    """One weight matrix of the output: `coef * norm_j(score)` contracted with the values.
    `kind` is `WeightKind.SOFTMAX` (online max and sum), `SOFTMAX1` (the same with a virtual
    zero logit) or `POINTWISE` (an elementwise weight such as a sigmoid: no normaliser).
    `sink`: the logit of a virtual key with value 0 that the softmax also normalises over
    (`softmax(s, j, sinks[h])`; the constant 0 for softmax1), None without one: the online
    max and sum start from it, so the log-sum-exp includes it."""

    kind: WeightKind
    coef: ir.Node | None      # a factor that does not depend on the key index (None: 1)
    score: ir.Node            # the normaliser's argument, or the pointwise weight itself
    qk: ir.Contract           # its Q K^T contraction
    q: Operand
    k: Operand
    scale: tuple[ir.Node, ...]       # scalar factors of Q K^T, one multiply of the fp32 scores
    qk_factors: tuple[ir.Node, ...]  # non-scalar extra factors of Q K^T (e.g. decays)
    sink: ir.Node | None = None      # the sink logit, over batch, head and query indices only

    @property
    def has_score_mods(self) -> bool:
        return self.score is not self.qk or bool(self.qk_factors)

    @property
    def folds_log2e(self) -> bool:
        """Plain softmax scores can carry log2(e) in the score scale and feed exp2 directly."""
        return self.kind != WeightKind.POINTWISE and not self.has_score_mods


@dataclass
class RowStreamPlan:
    program: ir.Program
    output: ir.Output
    i: str                    # query index (rows of a tile)
    j: str                    # key index (columns of a tile; the softmax axis)
    d: str                    # the Q K^T contraction index
    e: str                    # the value feature index
    outer: tuple[str, ...]    # indices of the grid besides query tiles (batch, head)
    terms: list[Term]         # the weight matrices summed into the output
    v: Operand
    masks: list[ir.Mask]
    mask_plan: MaskPlan | None
    mask_symbols: dict        # sympy symbol name -> IR node it stands for (loaded scalars)
    group: tuple[str, ir.Node] | None = None  # GQA: (head index, heads per K/V head)
    opaque: dict = field(default_factory=dict)  # opaque function name -> IR node it stands for
    precomputed: Precomputed | None = None  # intermediates computed before the launch
    summed_outer: tuple[str, ...] = ()  # indices summed in the epilogue (heads in mixture-of-heads)
    row_sum: bool = False     # divide by the row sums of the (pointwise) weights
    row_sum_switch: ir.Node | None = None  # the scalar condition under which it divides (None: always)
    statistics: dict = field(default_factory=dict)  # precomputed node -> the plan of its statistics pass
    row_weight: ir.Node | None = None  # a factor of each row's output (a mixture-of-heads coefficient, in the
    #   backward's per-head plans): where it is 0 on every row of a query tile, the tile skips its key loop

    @property
    def statistics_only(self) -> bool:
        """A plan with no values: it computes the log-sum-exp of its scores only."""
        return self.v is None

    # the first term's pieces, for the common single-softmax case
    @property
    def q(self) -> Operand:
        return self.terms[0].q

    @property
    def k(self) -> Operand:
        return self.terms[0].k

    @property
    def scale(self):
        return self.terms[0].scale

    @property
    def score(self) -> ir.Node:
        return self.terms[0].score

    @property
    def has_score_mods(self) -> bool:
        return self.terms[0].has_score_mods

    @property
    def lse_axes(self) -> tuple[str, ...]:
        return tuple(ix for ix in self.score.indices if ix != self.j and ix not in self.summed_outer)

    @property
    def has_lse(self) -> bool:
        """The log-sum-exp side output exists for a single softmax (with a sink logit or not:
        the log-sum-exp then includes the sink's exp)."""
        return len(self.terms) == 1 and self.terms[0].kind != WeightKind.POINTWISE and self.terms[0].coef is None \
            and not self.summed_outer

    @property
    def needs_block_map(self) -> bool:
        return self.mask_plan is not None and self.mask_plan.needs_block_map

    @property
    def mask_mode(self) -> MaskMode:
        """How the kernel finds a query tile's key tiles: all of them (no mask), symbolic
        ranges (affine masks) or a runtime block map (masks with opaque atoms)."""
        if self.mask_plan is None:
            return MaskMode.NONE
        return MaskMode.BLOCK_MAP if self.needs_block_map else MaskMode.AFFINE

    @property
    def longest_first(self) -> bool:
        """Whether programs take query tiles in decreasing work order: the symbolic ranges say
        later query tiles visit more key tiles (`mask_analysis.longest_first`)."""
        return longest_first(self.mask_plan) and not self.needs_block_map


def map_outer(plan: RowStreamPlan) -> tuple[str, ...]:
    """The outer indices (batch, head) the masks depend on: a block map needs one map per
    value of them."""
    used = set().union(*(set(m.pred.indices) for m in plan.masks))
    return tuple(ix for ix in plan.outer if ix in used)


def _bare(arg: ir.Node, name: str) -> bool:
    return isinstance(arg, ir.Index) and arg.name == name


def _plain_read(node: ir.Node, row: str, feature: str) -> bool:
    return isinstance(node, ir.Access) and isinstance(node.array, ir.Input) \
        and _has_direct(node, row) and _has_direct(node, feature)


def _mapped_read(node: ir.Node, row: str, feature: str) -> ir.Access | None:
    """The one input read inside an elementwise feature map of it (`elu(q[b,h,i,d]) + 1`),
    which tiles can apply right after loading; None for anything else."""
    if not isinstance(node, ir.Map):
        return None
    reads, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ir.Map):
            stack.extend(n.args)
        elif _plain_read(n, row, feature) and n.indices == node.indices:
            reads.append(n)
        elif not n.is_scalar:
            return None
    same = {(id(r.array), tuple(a.name if isinstance(a, ir.Index) else id(a) for a in r.args)) for r in reads}
    return reads[0] if len(same) == 1 else None


def _statement(program: ir.Program, node: ir.Node) -> str:
    """`line N: <the spec's line>`, for messages that name where a node comes from."""
    if node.loc is None:
        return "the spec"
    return f"line {node.loc.line}: `{program.source.line(node.loc.line).strip()}`"


def _operand(access: ir.Node, row: str, feature: str, role: str, pre: Precomputed, other: str | None = None,
             ) -> Operand:
    """The tile operand of `access`: a (feature-mapped, or precomputed) read indexed by the
    tile index `row` and `feature`, and otherwise by program-wide indices only. `other` is the
    other tile index (the query for keys and values): a q/k/v tile depends on one tile index
    only, so an operand that depends on both (a value chosen per (query, key) pair) is refused,
    since its tile would be score-sized."""
    if other is not None and other in access.indices:
        raise NotRowStreamable(f"{role} depend on '{other}' as well as on '{row}' ({_statement(pre.program, access)}); "
                               "the kernel reads one tile of them per key tile, shared by every query row")
    read = _mapped_read(access, row, feature)
    if read is not None:
        op = _operand(read, row, feature, role, pre, other)
        op.transform = access
        return op
    if not _plain_read(access, row, feature):
        if not {row, feature} <= set(access.indices):
            raise NotRowStreamable(f"{role} are not indexed by '{row}' and '{feature}'")
        access = pre.operand_access(access)
    rows = [k for k, a in enumerate(access.args) if _bare(a, row)]
    feats = [k for k, a in enumerate(access.args) if _bare(a, feature)]
    if len(rows) != 1 or len(feats) != 1:
        raise NotRowStreamable(f"{role} ('{access.array.name}') must be indexed by '{row}' and '{feature}' "
                               "directly")
    op = Operand(access, rows[0], feats[0])
    for _, a in op.outer_args():
        if {row, feature} & set(a.indices):
            raise NotRowStreamable(f"{role} ('{access.array.name}') mixes '{row}' or '{feature}' into "
                                   "another index")
    return op


def _minus_one() -> ir.Node:
    return ir.Const(value=-1.0, dtype=ir.FLOAT)


def _off_axis_normalisers(node: ir.Node, j: str, memo: dict | None = None) -> ir.Node:
    """A softmax along another axis than the streamed one (over queries, or the rows of
    reversed attention) is `exp(s - lse)` with `lse` its log-sum-exp along that axis: a
    pointwise weight once `lse` is precomputed (a statistics pass before the kernel).
    Shared operands are rewritten once (`memo`), so the rewrite stays linear in the DAG."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    result = node
    if isinstance(node, ir.Normalize) and node.axis != j and node.op == "softmax" and node.sink is None \
            and not node.joint:
        x = node.arg
        rest = tuple(ix for ix in x.indices if ix != node.axis)
        lse = ir.Reduce(op="logsumexp", arg=x, axes=(node.axis,), indices=rest, dtype=ir.FLOAT, loc=node.loc)
        diff = ir.Map(op="-", args=(x, lse), indices=x.indices, dtype=ir.FLOAT, loc=node.loc)
        result = ir.Map(op="exp", args=(diff,), indices=x.indices, dtype=ir.FLOAT, loc=node.loc)
    elif isinstance(node, ir.Map):
        args = tuple(_off_axis_normalisers(a, j, memo) for a in node.args)
        if any(a is not b for a, b in zip(args, node.args)):
            ordered = sorted(args, key=lambda a: -len(a.indices))
            result = ir.Map(op=node.op, args=args, indices=ir.union_indices(ordered), dtype=node.dtype,
                            loc=node.loc)
    memo[node] = result
    return result


def _weight_terms(node: ir.Node, j: str, memo: dict | None = None
                  ) -> list[tuple[WeightKind, ir.Node | None, ir.Node, ir.Node | None]]:
    """Split the weights contracted with the values into (kind, coefficient, score, sink) terms:
    `softmax(s1, j) - lam * softmax(s2, j)` gives two softmax terms, `sigmoid(s + bias)` one
    pointwise term. Terms of one score merge (their coefficients add) and shared operands
    are split once (`memo`), so `p = (p + p) * 0.5` repeated gives one term, not 2 ** n."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    if isinstance(node, ir.Normalize):
        if node.joint:
            raise NotRowStreamable("a softmax over several key sets (the general planner's)")
        if node.axis != j:
            raise NotRowStreamable(f"a {node.op} along '{node.axis}', not along the keys '{j}'")
        sink = ir.Const(value=0.0, dtype=ir.FLOAT) if node.op == "softmax1" else node.sink
        if node.op == "softmax1" and node.sink is not None:
            raise NotRowStreamable("a softmax1 with a sink logit as well (two virtual keys)")
        terms = [(WeightKind(node.op), None, node.arg, sink)]
    elif isinstance(node, ir.Map) and node.op in ("+", "-"):
        right = _weight_terms(node.args[1], j, memo)
        if node.op == "-":
            right = [(kind, _times(_minus_one(), c), score, sink) for kind, c, score, sink in right]
        terms = _merge_terms(_weight_terms(node.args[0], j, memo) + right)
    elif isinstance(node, ir.Map) and node.op == "neg":
        terms = [(kind, _times(_minus_one(), c), score, sink)
                 for kind, c, score, sink in _weight_terms(node.args[0], j, memo)]
    elif isinstance(node, ir.Map) and node.op == "*" and any(j not in a.indices for a in node.args):
        a, b = node.args
        c, t = (a, b) if j not in a.indices else (b, a)  # a coefficient per row or per head
        terms = [(kind, _times(c, tc), score, sink) for kind, tc, score, sink in _weight_terms(t, j, memo)]
    elif j in node.indices and not _has_normalize(node):
        terms = [(WeightKind.POINTWISE, None, node, None)]
    else:
        raise NotRowStreamable("the weights are not a sum of softmaxes and elementwise terms over the keys")
    memo[node] = terms
    return terms


def _times(coef: ir.Node | None, factor: ir.Node | None) -> ir.Node | None:
    """`coef * factor`, where None stands for 1."""
    if factor is None:
        return coef
    if coef is None:
        return factor
    return ir.Map(op="*", args=(coef, factor), indices=ir.union_indices((coef, factor)), dtype=ir.FLOAT)


def _merge_terms(terms: list) -> list:
    """One term per (kind, score, sink), its coefficients summed (None stands for 1)."""
    merged: dict = {}
    for kind, coef, score, sink in terms:
        key = (kind, score, sink)
        if key not in merged:
            merged[key] = coef
            continue
        a, b = (x if x is not None else ir.Const(value=1.0, dtype=ir.FLOAT) for x in (merged[key], coef))
        merged[key] = ir.Map(op="+", args=(a, b), indices=ir.union_indices((a, b)), dtype=ir.FLOAT)
    return [(kind, coef, score, sink) for (kind, score, sink), coef in merged.items()]


def _has_normalize(node: ir.Node) -> bool:
    return any(isinstance(n, ir.Normalize) for n in _score_nodes(None, node))


def _term(program, kind: WeightKind, coef, score, j, pre: Precomputed, i_hint=None, sink=None
          ) -> tuple[Term, str, str]:
    """A term's Q K^T contraction and operands; returns the term, its query index and d."""
    contracts = [n for n in _score_nodes(program, score) if isinstance(n, ir.Contract)
                 and len(n.summed) == 1 and j in n.indices and n.summed[0] not in small_indices(program)]
    if len(contracts) != 1:
        raise NotRowStreamable(f"the scores need exactly one Q K^T contraction, found {len(contracts)}")
    qk = contracts[0]
    d = qk.summed[0]
    tiles = [f for f in qk.factors if d in f.indices]
    if len(tiles) != 2:
        raise NotRowStreamable("Q K^T must multiply exactly two tensors over the contracted index")
    k_access = next((f for f in tiles if j in f.indices), None)
    q_access = next((f for f in tiles if f is not k_access), None)
    rows = [ix for ix in (q_access.indices if q_access is not None else ())
            if ix != d and k_access is not None and ix not in k_access.indices]
    if k_access is None or len(rows) != 1 or (i_hint is not None and rows[0] != i_hint):
        raise NotRowStreamable("cannot tell queries from keys in Q K^T")
    i = rows[0]
    extra = [f for f in qk.factors if f not in tiles]
    # scalar factors the launcher can evaluate fold into the score scale; others (a full
    # reduction `sum(w[a], a)`) stay per-tile factors, read precomputed
    folded = [f for f in extra if f.is_scalar and host_evaluable(f)]
    term = Term(kind, coef, score, qk, _operand(q_access, i, d, "the queries", pre, j),
                _operand(k_access, j, d, "the keys", pre, i),
                tuple(folded), tuple(f for f in extra if f not in folded), sink)
    return term, i, d


def plan_row_stream(program: ir.Program, switches: bool = False) -> RowStreamPlan:
    """Match the first output against `sum_k coef_k * norm_k(S_k) @ V` (possibly divided by
    the row sums of a pointwise weight, possibly summed over heads) and analyse the masks.
    `switches`: also take a normaliser switched by a scalar (`where(normalize, num / den,
    num)`, `RowStreamPlan.row_sum_switch`); callers that read `row_sum` as always on leave it off."""
    out = program.outputs[0]
    pv, row_sum, switch = _divided_by_row_sum(out.node)
    if switch is not None and not switches:
        pv, row_sum, switch = out.node, None, None
    if not isinstance(pv, ir.Contract):
        raise NotRowStreamable("the output is not a contraction of weights with values")
    j, qk = _streamed_index(program, pv, out)
    v_access, e = _values(pv, out, qk)
    factors = [f for f in pv.factors if f is not v_access]
    weights = factors[0]
    for f in factors[1:]:
        weights = _times(weights, f)
    weights = _off_axis_normalisers(weights, j)
    if row_sum is not None and not (row_sum.arg in factors and len(factors) == 1):
        raise NotRowStreamable("the output divides by the row sums of something other than its weights")
    pre = Precomputed(program)
    raw_terms = _weight_terms(weights, j)
    if len(raw_terms) > 2:
        raise NotRowStreamable("more than two weight terms")
    terms, i, d = [], None, None
    for kind, coef, score, sink in raw_terms:
        term, i, d_term = _term(program, kind, coef, score, j, pre, i, sink)
        if d is not None and program.extent[d_term] != program.extent[d]:
            raise NotRowStreamable("the terms' Q K^T contract over different extents")
        d = d or d_term
        terms.append(term)
    v = _operand(v_access, j, e, "the values", pre, i)
    if i not in out.axes:
        raise NotRowStreamable("the output is not indexed by the queries")
    if row_sum is not None and row_sum.axes != (j,):
        raise NotRowStreamable(f"the output divides by a sum along '{row_sum.axes[0]}', not along the keys '{j}'")
    if row_sum is not None and (len(terms) != 1 or terms[0].kind != WeightKind.POINTWISE):
        raise NotRowStreamable("a row-sum normaliser needs one pointwise weight")
    outer = tuple(ix for ix in out.axes if ix not in (i, e))
    summed_outer = tuple(ix for ix in pv.summed if ix != j)
    for op, role in [*((t.q, "the queries") for t in terms), *((t.k, "the keys") for t in terms), (v, "the values")]:
        extra = {ix for _, a in op.outer_args() for ix in a.indices} - {*outer, *summed_outer}
        if extra:  # an operand's base offset is one per program (or per summed head)
            raise NotRowStreamable(f"{role} are read at '{sorted(extra)[0]}', which is no batch or head index "
                                   f"of the program ({_statement(program, op.access)})")
    for t in terms:
        if set(t.score.indices) - {i, j, *outer, *summed_outer} or \
                (t.coef is not None and set(t.coef.indices) - {i, *outer, *summed_outer}):
            raise NotRowStreamable("the scores have indices that the output does not keep")
        if t.sink is not None and set(t.sink.indices) - {i, *outer}:
            raise NotRowStreamable(f"the sink logit depends on '{sorted(set(t.sink.indices) - {i, *outer})[0]}', "
                                   "no query, batch or head index of the program")
    masks = list(dict.fromkeys(m for node in (pv, *(t.score for t in terms)) for m in _masks_of(program, node, pv)))
    for m in masks:
        if set(m.pred.indices) - {i, j, *outer, *summed_outer}:
            raise NotRowStreamable("a mask depends on indices outside the score tile")
    try:
        for node in [*(t.score for t in terms), *(t.coef for t in terms if t.coef is not None),
                     *(t.sink for t in terms if t.sink is not None),
                     *(f for t in terms for f in t.qk_factors), *(m.pred for m in masks)]:
            scan_for_precompute(node, {t.qk for t in terms}, pre, i, j)
        mask_plan, symbols, opaque = analyse_masks(program, masks, i, j, (*outer, *summed_outer))
    except (TooLarge, NotAffineExtents) as why:
        raise NotRowStreamable(str(why)) from None
    group = None if summed_outer else _gqa_group(terms, v, masks)
    plan = RowStreamPlan(program, out, i, j, d, e, outer, terms, v, masks, mask_plan, symbols,
                         group, opaque, pre, summed_outer, row_sum is not None, switch)
    for node in pre.inputs:
        stats = plan_statistics(program, node)
        if stats is not None:
            plan.statistics[node] = stats
    return plan


def plan_statistics(program: ir.Program, node: ir.Node) -> RowStreamPlan | None:
    """The statistics pass of a softmax along another axis: its log-sum-exp, computed by a
    row-streaming kernel with the normalised axis streamed and no values (the first of the
    two passes of softmax over queries and of reversed attention). None when the statistic
    is not a plain log-sum-exp of `Q K^T` scores (then the reference's torch ops compute it)."""
    if not (isinstance(node, ir.Reduce) and node.op == "logsumexp" and node.block is None
            and len(node.axes) == 1):
        return None
    stream = node.axes[0]
    pre = Precomputed(program)
    try:
        term, row, d = _term(program, WeightKind.SOFTMAX, None, node.arg, stream, pre)
        masks = program.masks_on(node)
        outer = tuple(ix for ix in node.indices if ix != row)
        for n in [node.arg, *term.qk_factors, *(m.pred for m in masks)]:
            scan_for_precompute(n, {term.qk}, pre, row, stream)
        if pre.inputs or any(set(m.pred.indices) - {row, stream, *outer} for m in masks):
            return None
        mask_plan, symbols, opaque = analyse_masks(program, masks, row, stream, outer)
    except (NotRowStreamable, TooLarge, NotAffineExtents):
        return None
    output = ir.Output("lse", node, node.indices, tuple(program.extent[ix] for ix in node.indices), node.loc)
    return RowStreamPlan(program, output, row, stream, d, None, outer, [term], None, masks, mask_plan, symbols,
                         None, opaque, pre)


def _divided_by_row_sum(node: ir.Node):
    """(numerator, row sum, switch): `num[b,h,i,e] / den[b,h,i]` with `den = sum(w, j)`
    (normalised linear attention), or `where(c, num / den, num)` with a scalar `c` (a
    normaliser switched by a param); (node, None, None) otherwise."""
    if isinstance(node, ir.Map) and node.op == "where" and not node.args[0].indices:
        num, den, _ = _divided_by_row_sum(node.args[1])
        if den is not None and num == node.args[2]:
            return num, den, node.args[0]
    if isinstance(node, ir.Map) and node.op == "/" and isinstance(node.args[1], ir.Reduce) \
            and node.args[1].op == "sum" and node.args[1].block is None and len(node.args[1].axes) == 1:
        return node.args[0], node.args[1], None
    return node, None, None


def _streamed_index(program: ir.Program, pv: ir.Contract, out: ir.Output) -> tuple[str, ir.Contract]:
    """The summed index the kernel streams over, and its Q K^T: the index is on the key
    side only (heads, summed in mixture-of-heads, sit on both sides), and the query side
    carries an output index (the rows)."""
    for ix in pv.summed:
        for f in pv.factors:
            for n in _score_nodes(program, f):
                if not _is_qk(n, program, ix):
                    continue
                tiles = [t for t in n.factors if n.summed[0] in t.indices]
                keys = [t for t in tiles if ix in t.indices]
                if len(tiles) == 2 and len(keys) == 1:
                    query = next(t for t in tiles if t is not keys[0])
                    if any(r in out.axes for r in query.indices if r not in keys[0].indices):
                        return ix, n
    raise NotRowStreamable("the output does not contract attention weights (no Q K^T) with values")


def _values(pv: ir.Contract, out: ir.Output, qk: ir.Contract) -> tuple[ir.Node, str]:
    """The value factor: the one carrying an output index that no other factor has and
    that the scores do not have (the value feature)."""
    for f in pv.factors:
        others = set().union(*(g.indices for g in pv.factors if g is not f))
        own = [ix for ix in f.indices if ix in out.axes and ix not in others and ix not in qk.indices]
        if len(own) == 1:
            return f, own[0]
    raise NotRowStreamable("the values must have exactly one feature index")


def _is_qk(node: ir.Node, program: ir.Program, j: str) -> bool:
    return isinstance(node, ir.Contract) and len(node.summed) == 1 and j in node.indices \
        and node.summed[0] not in small_indices(program)


def _has_direct(access: ir.Access, ix: str) -> bool:
    return any(_bare(a, ix) for a in access.args)


def _masks_of(program, node, pv):
    """The masks that restrict the keys of the output's contraction (and its normalisers)."""
    users = [pv] + [n for n in _score_nodes(program, node) if isinstance(n, ir.Normalize)]
    return [m for u in users for m in program.masks_on(u)]


def _gqa_group(terms: list[Term], v: Operand, masks):
    """Grouped-query attention: query head `h` reads K/V head `h // R` (R a scalar). Such
    heads can share one program, packed into the rows of a tile, loading K/V once."""
    q, k = terms[0].q, terms[0].k
    if len(terms) > 1:
        return None
    for pos, arg in q.outer_args():
        if not isinstance(arg, ir.Index) or any(arg.name in m.pred.indices for m in masks):
            continue
        h = arg.name
        ks = [a for op in (k, v) for _, a in op.outer_args() if h in a.indices]
        if len(ks) == 2 and all(isinstance(a, ir.Map) and a.op == "//" and _bare(a.args[0], h)
                                and a.args[1].is_scalar for a in ks) and _same_scalar(ks[0].args[1], ks[1].args[1]):
            return h, ks[0].args[1]
    return None


def _same_scalar(a: ir.Node, b: ir.Node) -> bool:
    """Whether two scalar expressions are the same (packing K and V heads by one group size)."""
    if a is b:
        return True
    try:
        return to_sympy(a) == to_sympy(b)
    except NotImplementedError:
        return False


def _score_nodes(program: ir.Program, score: ir.Node) -> set[ir.Node]:
    """A node and everything it is computed from (the planner builds nodes that the
    program's graph does not hold, so this walks operands)."""
    seen, stack = set(), [score]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.operands())
    return seen
