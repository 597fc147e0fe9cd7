"""Linear-attention plans: when a row-streaming plan also gets linear-time kernels, and
which kernels each call runs.

A plan whose one pointwise weight is `f(q_i) . f(k_j)` times factors of the query alone, of
the key alone, and at most one decay `base ** (i - j + s)` (base per head or constant, `s` a
scalar such as `M - N`, the decay possibly switched by a param: `where(causal, lam[h] **
(i + M - N - j), 1.0)`) is linear attention: `linear_plan` folds the per-query and per-key
factors into the operands' feature maps (`kw[b, g, j] * k[b, g, j, d]`), leaving `f(q) . f(k)`
times the decay. Without an active decay it can sum over the keys first (*reassociated*:
`o = f(Q) (f(K)^T V)`, `codegen/reassociate.py`); under a causal mask it can walk the
sequence in chunks with a carried `D x E` state (the *chunked scan*, `codegen/chunked.py`).
The module then holds those kernels next to the row-streaming one, and `choose_path` picks
per call, from the call's sizes and scalars: a mask switched off by a param (`causal=False`)
with the decay off reassociates, a mask that is exactly `j <= i` on a square score (and the
decay's offset `s` 0) takes the chunked scan, anything else (and every call that wants the
log-sum-exp or counts tiles) streams rows.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import sympy

from attncc import ir
from attncc.passes.kinds import LaunchPath, WeightKind
from attncc.passes.mask_analysis import active_conjuncts
from attncc.passes.row_stream import Operand, RowStreamPlan, Term

__all__ = ["LaunchPath", "linear_weight", "linear_plan", "Decay", "linear_decay", "reassociable", "decay_factor",
           "chunkable", "chunked_backward", "linear_only_backward", "decay_read", "mask_free", "causal_only",
           "row_sum_on", "decay_on", "choose_path", "backward_path"]


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


_LINEAR: dict = {}  # id(plan) -> (weak reference to the plan, its linear_plan): launchers ask per call


def linear_plan(plan: RowStreamPlan) -> RowStreamPlan | None:
    """The plan as linear attention: one pointwise weight, no coefficient, head sum or
    precomputed input, masks decidable from dims and params, and a weight that is Q K^T times
    factors of the query alone, of the key alone and at most one decay (`Decay`). The result
    has those per-query and per-key factors folded into the q and k operands' feature maps, the
    weight Q K^T itself and the decay as its one factor; None when the plan is no such thing."""
    hit = _LINEAR.get(id(plan))
    if hit is not None and hit[0]() is plan:
        return hit[1]
    found = _linear_plan(plan)
    _LINEAR[id(plan)] = (weakref.ref(plan, lambda _, key=id(plan): _LINEAR.pop(key, None)), found)
    return found


def _linear_plan(plan: RowStreamPlan) -> RowStreamPlan | None:
    if len(plan.terms) != 1 or plan.summed_outer or plan.statistics_only or plan.needs_block_map \
            or plan.mask_symbols or (plan.precomputed and plan.precomputed.inputs):
        return None
    term = plan.terms[0]
    if term.kind != WeightKind.POINTWISE or term.coef is not None:
        return None
    leaves = _product_leaves(term.score)
    if sum(leaf is term.qk for leaf in leaves) != 1:
        return None
    q_side, k_side, decays = [], [], []
    for f in [leaf for leaf in leaves if leaf is not term.qk] + list(term.qk_factors):
        ix = set(f.indices)
        if plan.j not in ix and ix <= {*plan.outer, plan.i}:
            q_side.append(f)
        elif plan.i not in ix and ix <= {*plan.outer, plan.j}:
            k_side.append(f)
        elif _decay(f, plan) is not None:
            decays.append(f)
        else:
            return None
    if len(decays) > 1:
        return None
    folded = dataclasses.replace(term, score=term.qk, q=_folded(term.q, q_side), k=_folded(term.k, k_side),
                                 qk_factors=tuple(decays))
    return dataclasses.replace(plan, terms=[folded])


def _product_leaves(node: ir.Node) -> list[ir.Node]:
    if isinstance(node, ir.Map) and node.op == "*":
        return [leaf for a in node.args for leaf in _product_leaves(a)]
    return [node]


def _folded(op: Operand, factors: list[ir.Node]) -> Operand:
    """The operand with `factors` multiplied into its feature map."""
    node = op.transform or op.access
    for f in factors:
        node = ir.Map(op="*", args=(f, node), indices=ir.union_indices((f, node)), dtype=ir.FLOAT, loc=f.loc)
    return dataclasses.replace(op, transform=node) if factors else op


@dataclass(frozen=True)
class Decay:
    """A decay factor `base ** (i - j + sum(offset))`, or `where(switch, that, 1.0)`."""

    factor: ir.Node            # the factor as written (what the kernels evaluate)
    base: ir.Node              # over outer indices only
    switch: ir.Node | None     # the scalar condition that turns it on (None: always on)
    offset: tuple              # (sign, scalar node) pairs: the exponent's terms besides i - j


def _decay(f: ir.Node, plan: RowStreamPlan) -> Decay | None:
    switch, power = None, f
    if isinstance(f, ir.Map) and f.op == "where" and not f.args[0].indices and \
            isinstance(f.args[2], ir.Const) and f.args[2].value == 1:
        switch, power = f.args[0], f.args[1]
    if not (isinstance(power, ir.Map) and power.op == "**" and set(power.args[0].indices) <= set(plan.outer)):
        return None
    e = power.args[1]
    if not (isinstance(e, ir.Map) and e.op == "-" and isinstance(e.args[1], ir.Index) and e.args[1].name == plan.j):
        return None
    offset = _row_offset(e.args[0], plan.i)
    return None if offset is None else Decay(f, power.args[0], switch, tuple(offset))


def _row_offset(x: ir.Node, i: str) -> list | None:
    """`x` as `i + sum(sign * scalar)`: the (sign, scalar) pairs, or None."""
    if isinstance(x, ir.Index) and x.name == i:
        return []
    if isinstance(x, ir.Map) and x.op in ("+", "-") and len(x.args) == 2:
        a, b = x.args
        if i in a.indices and not b.indices:
            rest = _row_offset(a, i)
            return None if rest is None else rest + [(1 if x.op == "+" else -1, b)]
        if x.op == "+" and i in b.indices and not a.indices:
            rest = _row_offset(b, i)
            return None if rest is None else rest + [(1, a)]
    return None


def linear_decay(plan: RowStreamPlan) -> Decay | None:
    """The decay of a linear plan (`linear_plan`'s result or a plan it leaves as it is)."""
    lin = linear_plan(plan)
    return _decay(lin.terms[0].qk_factors[0], lin) if lin is not None and lin.terms[0].qk_factors else None


def reassociable(plan: RowStreamPlan) -> bool:
    """Linear attention whose decay (if any) a param can switch off: the sum over keys can go
    first in the calls where it is off."""
    decay = linear_decay(plan)
    return linear_plan(plan) is not None and (decay is None or decay.switch is not None)


def decay_factor(plan: RowStreamPlan) -> ir.Map | None:
    """The spec's `base ** (i - j)` factor of Q K^T (base per head or constant), or None: the
    strict form context parallelism's state passing composes (the kernels take `linear_decay`)."""
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
    """Linear attention (times a decay) under a mask."""
    return linear_plan(plan) is not None and plan.mask_plan is not None


def chunked_backward(plan: RowStreamPlan) -> bool:
    """Whether a chunkable plan also gets the linear-time backward (`codegen/chunked.py`): a
    decay base that is constant over the call or a plain read `lam[h]` of an input at outer
    indices (whose gradient the launcher takes from the kernels' per-row sums). Feature maps
    and a row-sum normaliser are part of it (`linear_only_backward`)."""
    if not chunkable(plan):
        return False
    decay = linear_decay(plan)
    return decay is None or not _reads_inputs(decay.base) or decay_read(plan) is not None


def linear_only_backward(plan: RowStreamPlan) -> bool:
    """Whether the plan's backward exists on the linear-time paths only: a row-sum normaliser
    (normalised linear attention) or a feature map of q, k or v (folded factors included),
    which the row-streaming backward kernels do not differentiate."""
    lin = linear_plan(plan) or plan
    term = lin.terms[0]
    return plan.row_sum or any(op.transform is not None for op in (term.q, term.k, lin.v))


def decay_read(plan: RowStreamPlan) -> ir.Access | None:
    """The decay base when it is a plain read of an input at bare outer indices (`lam[h]`)."""
    decay = linear_decay(plan)
    base = decay.base if decay is not None else None
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
        [(h.a, h.b, _value(h.rhs, scalars)) for h in active[0].planes] == [(1, -1, 0)]


def _value(x, scalars: dict):
    """A plane's offset (an int, or a sympy expression of dims such as `M - N`) in one call."""
    if isinstance(x, int):
        return x
    fn, names = _offset_function(sympy.sympify(x))
    return fn(*(scalars[n] for n in names))


@functools.lru_cache(maxsize=None)
def _offset_function(expr):
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    return sympy.lambdify(symbols, expr, modules="math"), tuple(s.name for s in symbols)


def row_sum_on(plan: RowStreamPlan, scalars: dict) -> bool:
    """Whether a call divides by the row sums (a normaliser, switched on for this call)."""
    from attncc.reference import evaluate_scalar

    return plan.row_sum and (plan.row_sum_switch is None or bool(evaluate_scalar(plan.row_sum_switch, scalars)))


def decay_on(plan: RowStreamPlan, scalars: dict) -> bool:
    """Whether a call's weights carry a decay (the plan has one, switched on for this call)."""
    decay = linear_decay(plan)
    return decay is not None and _decay_on(decay, scalars)


def _decay_on(decay: Decay, scalars: dict) -> bool:
    from attncc.reference import evaluate_scalar

    return decay.switch is None or bool(evaluate_scalar(decay.switch, scalars))


def _offset_zero(decay: Decay | None, scalars: dict) -> bool:
    """Whether the decay's exponent is `i - j` in this call (the chunked scan's decays compose)."""
    from attncc.reference import evaluate_scalar

    return decay is None or sum(sign * evaluate_scalar(x, scalars) for sign, x in decay.offset) == 0


def choose_path(plan: RowStreamPlan, sizes: dict, scalars: dict, return_lse: bool = False,
                count_tiles: bool = False) -> LaunchPath:
    """The kernels one call runs: reassociated when the plan allows it and neither a mask nor
    the decay applies to this call, the chunked scan when the plan allows it and the call's
    mask is exactly causal on a square score (the decay's offset 0), row streaming otherwise.
    The linear paths give neither the log-sum-exp (`return_lse`) nor tile counts
    (`count_tiles`), so such calls stream rows."""
    if not (return_lse or count_tiles) and linear_plan(plan) is not None:
        decay = linear_decay(plan)
        if reassociable(plan) and mask_free(plan, sizes, scalars) and (decay is None or not _decay_on(decay, scalars)):
            return LaunchPath.REASSOCIATED
        if chunkable(plan) and causal_only(plan, sizes, scalars) and \
                (decay is None or not _decay_on(decay, scalars) or _offset_zero(decay, scalars)):
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
