"""Intermediates a tile kernel reads but cannot compute, computed before the launch.

Selections over blocks (topk_blocks' kept blocks), gathered or pooled operands (permuted
keys, agent tokens) and the statistics of a softmax along another axis are computed by the
reference executor's torch ops on the call's device, then read by the kernel as tensors.
They never span both the query and the key index, so they stay small.
"""
from __future__ import annotations

from attncc import ir
from attncc.passes.infer import host_evaluable


class TooLarge(ValueError):
    """An intermediate would span both the query and the key index (score-sized)."""


def small_indices(program: ir.Program) -> set[str]:
    """Indices with a small constant extent (unrolled inside tiles, never streamed)."""
    return {ix for ix, ext in program.extent.items() if ext.is_Integer and int(ext) <= 16}


class Precomputed:
    """The intermediates of one plan, each with the synthetic input the kernel reads it as."""

    def __init__(self, program: ir.Program):
        self.program = program
        self.inputs: dict[ir.Node, ir.Input] = {}
        self.axes: dict[ir.Node, tuple[str, ...]] = {}

    def input_for(self, node: ir.Node, axes: tuple[str, ...]) -> ir.Input:
        if node not in self.inputs:
            # a name no input can have: the launcher adds the value to the call's tensors
            self.inputs[node] = ir.Input(name=f"<pre{len(self.inputs)}>", dtype=node.dtype, loc=node.loc,
                                         dims=tuple(self.program.extent[ix] for ix in axes))
            self.axes[node] = axes
        return self.inputs[node]

    def operand_access(self, node: ir.Node) -> ir.Access:
        """A q/k/v operand that is not a plain input read, as a read of a precomputed tensor."""
        if isinstance(node, ir.Access) and not isinstance(node.array, ir.Input) and \
                all(isinstance(a, ir.Index) for a in node.args):
            array = self.input_for(node.array, node.axes)
            return ir.Access(array=array, args=node.args, indices=node.indices, dtype=node.dtype, loc=node.loc)
        array = self.input_for(node, node.indices)
        args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in node.indices)
        return ir.Access(array=array, args=args, indices=node.indices, dtype=node.dtype, loc=node.loc)


def inline(node: ir.Node, program: ir.Program, memo: dict | None = None) -> bool:
    """Whether a tile kernel computes this node itself (elementwise math, reads,
    sums over tiny constant axes) rather than reading it precomputed. `memo` (by node)
    keeps a DAG with shared operands linear instead of exponential."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    if isinstance(node, (ir.Index, ir.Const, ir.Scalar, ir.Input)):
        result = True
    elif isinstance(node, ir.Access):
        result = all(inline(a, program, memo) for a in node.args) and \
            (isinstance(node.array, ir.Input) or inline(node.array, program, memo))
    elif isinstance(node, ir.Map):
        result = all(inline(a, program, memo) for a in node.args)
    elif isinstance(node, ir.Contract):
        result = set(node.summed) <= small_indices(program) and \
            all(inline(f, program, memo) for f in node.factors)
    else:
        result = False
    memo[node] = result
    return result


def tile_loop(node: ir.Node, i: str, j: str) -> bool:
    """Whether a tile computes `node` with a loop inside it: a sum, max or min over one index
    that no tile streams, of values over both tile indices (a membership test per pair,
    `j // kb in kidx[i // qb, :]`), which precomputed would be score-sized (rule: a
    reduction over a list, per (query, key) pair, is a loop over the list in the tile)."""
    return isinstance(node, ir.Reduce) and node.op in ("sum", "amax", "amin") and node.block is None and \
        len(node.axes) == 1 and node.axes[0] not in (i, j) and {i, j} <= set(node.indices)


def scan_for_precompute(node, stop, pre: Precomputed, i, j, seen: set | None = None, memo: dict | None = None):
    """Mark what a score, coefficient or mask reads but a tile cannot compute (selections,
    pooled blocks) as precomputed; such values must not span both query and key. `seen`
    (the nodes this scan visited) and `memo` (`inline`'s) visit each shared node once."""
    program = pre.program
    seen, memo = (set() if seen is None else seen), ({} if memo is None else memo)
    if node in seen:
        return
    seen.add(node)
    if node in stop or (node.is_scalar and host_evaluable(node)) or inline(node, program, memo):
        if isinstance(node, (ir.Map, ir.Access)) and node not in stop:
            for op in node.operands():
                scan_for_precompute(op, stop, pre, i, j, seen, memo)
        return
    if isinstance(node, ir.Map):
        for op in node.args:
            scan_for_precompute(op, stop, pre, i, j, seen, memo)
        return
    target, axes = (node.array, node.axes) if isinstance(node, ir.Access) else (node, node.indices)
    if isinstance(node, ir.Access):
        for a in node.args:
            scan_for_precompute(a, stop, pre, i, j, seen, memo)
    if tile_loop(node, i, j):  # the tile computes it, reading what its term reads
        scan_for_precompute(node.arg, stop, pre, i, j, seen, memo)
        return
    bare = {a.name for a in node.args if isinstance(a, ir.Index)} if isinstance(node, ir.Access) else set()
    if {i, j} <= set(target.indices) | bare:  # read at (i, j): a whole score, whatever its own index names
        raise TooLarge(f"line {target.loc.line if target.loc else '?'} needs a whole score-sized "
                       "intermediate before the attention")
    pre.input_for(target, axes)
