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

from dataclasses import dataclass

import networkx as nx
import sympy

from attncc import ir
from attncc.passes.infer import to_sympy
from attncc.passes.mask_analysis import MaskPlan, analyse_mask


class NotRowStreamable(Exception):
    """The spec has a part the row-streaming skeleton cannot express."""


@dataclass
class Operand:
    """A tensor read by the kernel's main loads: which arg holds the tile axis
    (`row`), which the feature axis (`feature`), and the other (outer) arguments."""

    access: ir.Access
    row: int
    feature: int

    @property
    def input(self) -> ir.Input:
        return self.access.array

    def outer_args(self):
        return [(k, a) for k, a in enumerate(self.access.args) if k not in (self.row, self.feature)]


@dataclass
class RowStreamPlan:
    program: ir.Program
    output: ir.Output
    i: str                    # query index (rows of a tile)
    j: str                    # key index (columns of a tile; the softmax axis)
    d: str                    # the Q K^T contraction index
    e: str                    # the value feature index
    outer: tuple[str, ...]    # indices of the grid besides query tiles (batch, head)
    q: Operand
    k: Operand
    v: Operand
    qk: ir.Contract           # the score contraction
    scale: tuple[ir.Node, ...]     # scalar factors of Q K^T, folded into Q
    qk_factors: tuple[ir.Node, ...]  # non-scalar extra factors of Q K^T (e.g. decays)
    score: ir.Node            # S: the softmax argument (Q K^T plus modifications)
    softmax: ir.Normalize
    masks: list[ir.Mask]
    mask_plan: MaskPlan | None
    mask_symbols: dict        # sympy symbol name -> IR node it stands for (loaded scalars)
    group: tuple[str, ir.Node] | None = None  # GQA: (head index, heads per K/V head)

    @property
    def has_score_mods(self) -> bool:
        return self.score is not self.qk or bool(self.qk_factors)

    @property
    def needs_block_map(self) -> bool:
        return self.mask_plan is not None and self.mask_plan.needs_block_map


def _bare(arg: ir.Node, name: str) -> bool:
    return isinstance(arg, ir.Index) and arg.name == name


def _operand(access: ir.Node, row: str, feature: str, role: str) -> Operand:
    if not (isinstance(access, ir.Access) and isinstance(access.array, ir.Input)):
        raise NotRowStreamable(f"{role} must be read directly from an input tensor")
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


def plan_row_stream(program: ir.Program) -> RowStreamPlan:
    """Match the first output against `softmax_j(S) @ V` and analyse the masks."""
    out = program.outputs[0]
    pv = out.node
    if not isinstance(pv, ir.Contract) or len(pv.factors) != 2 or len(pv.summed) != 1:
        raise NotRowStreamable("the output is not a single contraction of probabilities with values")
    j = pv.summed[0]
    sm = next((f for f in pv.factors if isinstance(f, ir.Normalize)), None)
    if sm is None or sm.op != "softmax" or sm.axis != j:
        raise NotRowStreamable(f"the output does not contract a softmax over '{j}' with values")
    v_access = next(f for f in pv.factors if f is not sm)
    e_candidates = [ix for ix in v_access.indices if ix not in sm.indices]
    if len(e_candidates) != 1:
        raise NotRowStreamable("the values must have exactly one feature index")
    e = e_candidates[0]
    v = _operand(v_access, j, e, "the values")
    score = sm.arg
    contracts = [n for n in _score_nodes(program, score) if isinstance(n, ir.Contract)
                 and len(n.summed) == 1 and j in n.indices and n.summed[0] not in _small(program)]
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
    i = rows[0] if len(rows) == 1 else None
    if k_access is None or i is None or i not in out.axes:
        raise NotRowStreamable("cannot tell queries from keys in Q K^T")
    q = _operand(q_access, i, d, "the queries")
    k = _operand(k_access, j, d, "the keys")
    extra = [f for f in qk.factors if f not in tiles]
    scale = tuple(f for f in extra if f.is_scalar)
    qk_factors = tuple(f for f in extra if not f.is_scalar)
    outer = tuple(ix for ix in out.axes if ix not in (i, e))
    if set(out.axes) != {i, e, *outer} or set(score.indices) - {i, j, *outer}:
        raise NotRowStreamable("the scores have indices that the output does not keep")
    masks = program.masks_on(sm)
    for m in masks:
        if set(m.pred.indices) - {i, j, *outer}:
            raise NotRowStreamable("a mask depends on indices outside the score tile")
    mask_plan, symbols = analyse_masks(program, masks, i, j, outer)
    return RowStreamPlan(program, out, i, j, d, e, outer, q, k, v, qk, scale, qk_factors, score, sm,
                         masks, mask_plan, symbols, _gqa_group(q, k, v, masks))


def _gqa_group(q: Operand, k: Operand, v: Operand, masks):
    """Grouped-query attention: query head `h` reads K/V head `h // R` (R a scalar). Such
    heads can share one program, packed into the rows of a tile, loading K/V once."""
    for pos, arg in q.outer_args():
        if not isinstance(arg, ir.Index) or any(arg.name in m.pred.indices for m in masks):
            continue
        h = arg.name
        ks = [a for op in (k, v) for _, a in op.outer_args() if h in a.indices]
        if len(ks) == 2 and all(isinstance(a, ir.Map) and a.op == "//" and _bare(a.args[0], h)
                                and a.args[1].is_scalar for a in ks):
            return h, ks[0].args[1]
    return None


def _small(program: ir.Program) -> set[str]:
    """Indices with a small constant extent (unrolled inside tiles, never streamed)."""
    return {ix for ix, ext in program.extent.items() if ext.is_Integer and int(ext) <= 16}


def _score_nodes(program: ir.Program, score: ir.Node):
    return nx.ancestors(program.graph, score) | {score}


# ---------------------------------------------------------------------- masks
_SYMPY_BOOL = {"and": sympy.And, "or": sympy.Or, "not": sympy.Not, "==": sympy.Eq, "!=": sympy.Ne,
               "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}
_SYMPY_INT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
              "min": sympy.Min, "max": sympy.Max, "neg": lambda a: -a, "abs": sympy.Abs,
              "clamp": lambda x, lo, hi: sympy.Min(sympy.Max(x, lo), hi),
              "//": lambda a, b: sympy.floor(a / b), "%": sympy.Mod}


class _MaskToSympy:
    """Mask predicates as sympy: integer arithmetic of the tile indices and scalars
    stays symbolic; a read that depends only on the outer indices (`prefix[b]`)
    becomes a symbol the kernel loads once; everything else is an opaque function."""

    def __init__(self, program, i, j, outer):
        self.program, self.i, self.j, self.outer = program, i, j, set(outer)
        self.symbols: dict[str, ir.Node] = {}
        self.opaque: dict[ir.Node, str] = {}

    def __call__(self, node: ir.Node):
        if isinstance(node, ir.Index):
            if node.name in (self.i, self.j):
                return sympy.Symbol(node.name, integer=True)
            return self.loaded(node)
        if isinstance(node, (ir.Scalar, ir.Const)) or (node.is_scalar and not isinstance(node, ir.Access)):
            if node.dtype == ir.FLOAT and not isinstance(node, ir.Const):
                return self.opaque_of(node)
            try:
                return to_sympy(node)
            except NotImplementedError:
                return self.opaque_of(node)
        if isinstance(node, ir.Map) and node.op in _SYMPY_BOOL:
            return _SYMPY_BOOL[node.op](*(self(a) for a in node.args))
        if isinstance(node, ir.Map) and node.op in _SYMPY_INT and node.dtype == ir.INT:
            return _SYMPY_INT[node.op](*(self(a) for a in node.args))
        if not ({self.i, self.j} & set(node.indices)) and node.dtype != ir.FLOAT:
            return self.loaded(node)
        return self.opaque_of(node)

    def loaded(self, node: ir.Node):
        """A value fixed for the whole program (depends on batch/head only)."""
        name = f"mask_scalar{len(self.symbols)}"
        for known, n in self.symbols.items():
            if n is node:
                return sympy.Symbol(known, integer=True)
        self.symbols[name] = node
        return sympy.Symbol(name, integer=True) if node.dtype == ir.INT else sympy.Symbol(name)

    def opaque_of(self, node: ir.Node):
        name = self.opaque.setdefault(node, f"opaque{len(self.opaque)}")
        args = [sympy.Symbol(ix, integer=True) for ix in node.indices if ix in (self.i, self.j)]
        value = sympy.Function(name)(*args) if args else sympy.Symbol(name)
        return sympy.Eq(value, 1) if node.dtype == ir.BOOL else value


def analyse_masks(program: ir.Program, masks, i, j, outer):
    """The sympy mask plan of the conjunction of `masks` (None without masks)."""
    if not masks:
        return None, {}
    convert = _MaskToSympy(program, i, j, outer)
    pred = sympy.And(*(convert(m.pred) for m in masks))
    n, m = program.extent[i], program.extent[j]
    if not (n.is_Symbol and m.is_Symbol):
        raise NotRowStreamable("query and key extents must be dims")
    return analyse_mask(pred, i, j, n=str(n), m=str(m)), convert.symbols
