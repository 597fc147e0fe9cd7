"""Linear-attention plans: when a row-streaming plan also gets linear-time kernels, and
which kernels each call runs.

A plan whose weights are the plain product `f(q_i) . f(k_j)` (a pointwise term, no
softmax, no score modification) can sum over the keys first (*reassociated*:
`o = f(Q) (f(K)^T V)`, `codegen/reassociate.py`); one whose weights are that product times
a decay `base ** (i - j)` under a causal mask can walk the sequence in chunks with a
carried `D x E` state (the *chunked scan*, `codegen/chunked.py`). The module then holds
those kernels next to the row-streaming one, and `choose_path` picks per call, from the
call's sizes and scalars: a mask switched off by a param (`causal=False`) reassociates, a
mask that is exactly `j <= i` on a square score takes the chunked scan, anything else
(and every call that wants the log-sum-exp or counts tiles) streams rows.
"""
from __future__ import annotations

from attncc import ir
from attncc.passes.kinds import LaunchPath, WeightKind
from attncc.passes.mask_analysis import active_conjuncts
from attncc.passes.row_stream import RowStreamPlan, Term

__all__ = ["LaunchPath", "linear_weight", "reassociable", "decay_factor", "chunkable", "chunked_backward",
           "linear_only_backward", "decay_read", "mask_free", "causal_only", "choose_path", "backward_path"]


def linear_weight(plan: RowStreamPlan) -> Term | None:
    """The one term of a linear-attention plan: a single pointwise weight `f(q) . f(k)` (times
    factors of Q K^T only), no coefficient, head sum, packing or precomputed input, and masks
    decidable from dims and params; None otherwise."""
    if len(plan.terms) != 1 or plan.summed_outer or plan.group is not None or plan.statistics_only:
        return None
    term = plan.terms[0]
    ok = (term.kind == WeightKind.POINTWISE and term.coef is None and term.score is term.qk
          and not (plan.precomputed and plan.precomputed.inputs) and not plan.needs_block_map
          and not plan.mask_symbols)
    return term if ok else None


def reassociable(plan: RowStreamPlan) -> bool:
    """The unmodified weight `f(q) . f(k)`: the sum over keys can go first."""
    term = linear_weight(plan)
    return term is not None and not term.qk_factors


def decay_factor(plan: RowStreamPlan) -> ir.Map | None:
    """The spec's `base ** (i - j)` factor of Q K^T (base per head or constant), or None."""
    factors = plan.terms[0].qk_factors
    if len(factors) != 1:
        return None
    f = factors[0]
    if not (isinstance(f, ir.Map) and f.op == "**" and set(f.args[0].indices) <= set(plan.outer)):
        return None
    e = f.args[1]
    ok = isinstance(e, ir.Map) and e.op == "-" and all(isinstance(a, ir.Index) for a in e.args) \
        and (e.args[0].name, e.args[1].name) == (plan.i, plan.j)
    return f if ok else None


def chunkable(plan: RowStreamPlan) -> bool:
    """A linear-attention weight (times a decay `base ** (i - j)`) under a mask."""
    term = linear_weight(plan)
    return term is not None and plan.mask_plan is not None and \
        (not term.qk_factors or decay_factor(plan) is not None)


def chunked_backward(plan: RowStreamPlan) -> bool:
    """Whether a chunkable plan also gets the linear-time backward (`codegen/chunked.py`): a
    decay base that is constant over the call or a plain read `lam[h]` of an input at outer
    indices (whose gradient the launcher takes from the kernels' per-row sums). Feature maps
    and a row-sum normaliser are part of it (`linear_only_backward`)."""
    if not chunkable(plan):
        return False
    factor = decay_factor(plan)
    return factor is None or not _reads_inputs(factor.args[0]) or decay_read(plan) is not None


def linear_only_backward(plan: RowStreamPlan) -> bool:
    """Whether the plan's backward exists on the linear-time paths only: a row-sum normaliser
    (normalised linear attention) or a feature map of q, k or v, which the row-streaming
    backward kernels do not differentiate."""
    term = plan.terms[0]
    return plan.row_sum or any(op.transform is not None for op in (term.q, term.k, plan.v))


def decay_read(plan: RowStreamPlan) -> ir.Access | None:
    """The decay base when it is a plain read of an input at bare outer indices (`lam[h]`)."""
    factor = decay_factor(plan)
    base = factor.args[0] if factor is not None else None
    ok = isinstance(base, ir.Access) and isinstance(base.array, ir.Input) and \
        all(isinstance(a, ir.Index) and a.name in plan.outer for a in base.args) and \
        len({a.name for a in base.args}) == len(base.args)
    return base if ok else None


def _reads_inputs(node: ir.Node) -> bool:
    if isinstance(node, ir.Access) and isinstance(node.array, ir.Input):
        return True
    return any(_reads_inputs(a) for a in node.operands() if a is not None)


def mask_free(plan: RowStreamPlan, sizes: dict, scalars: dict) -> bool:
    """Whether no mask restricts a call's pairs (no mask, or one switched off by a param
    such as `causal=False`), so reassociated linear attention applies. `sizes`: every
    index's extent for the call; `scalars`: its dims and params by name."""
    mp = plan.mask_plan
    if mp is None:
        return True
    active = active_conjuncts(mp, sizes[plan.i], sizes[plan.j], scalars)
    return any(not c.planes and not c.opaque for c in active)


def causal_only(plan: RowStreamPlan, sizes: dict, scalars: dict) -> bool:
    """Whether a call's mask is exactly `j <= i` over a square score (the chunked scan's case)."""
    if sizes[plan.i] != sizes[plan.j]:
        return False
    active = active_conjuncts(plan.mask_plan, sizes[plan.i], sizes[plan.j], scalars)
    return len(active) == 1 and not active[0].opaque and \
        [(h.a, h.b, h.rhs) for h in active[0].planes] == [(1, -1, 0)]


def choose_path(plan: RowStreamPlan, sizes: dict, scalars: dict, return_lse: bool = False,
                count_tiles: bool = False) -> LaunchPath:
    """The kernels one call runs: reassociated when the plan allows it and no mask applies to
    this call, the chunked scan when the plan allows it and the call's mask is exactly causal
    on a square score, row streaming otherwise. The linear paths give neither the log-sum-exp
    (`return_lse`) nor tile counts (`count_tiles`), so such calls stream rows."""
    if not (return_lse or count_tiles):
        if reassociable(plan) and mask_free(plan, sizes, scalars):
            return LaunchPath.REASSOCIATED
        if chunkable(plan) and causal_only(plan, sizes, scalars):
            return LaunchPath.CHUNKED
    return LaunchPath.ROW_STREAMING


def backward_path(plan: RowStreamPlan, sizes: dict, scalars: dict) -> LaunchPath:
    """The backward kernels one call runs: the linear-time ones of the path the forward takes
    (reassociated without an active mask, the chunked scans when exactly causal on a square
    score and the plan has them), row streaming otherwise."""
    path = choose_path(plan, sizes, scalars)
    if path == LaunchPath.CHUNKED and not chunked_backward(plan):
        return LaunchPath.ROW_STREAMING
    return path
