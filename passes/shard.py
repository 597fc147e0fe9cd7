"""The shard form of a softmax attention program, for context parallelism.

Context parallelism gives each rank a slice of the queries and of the keys. A kernel that
computes one (query shard, key shard) pair must still see *global* token positions: a
causal mask compares global `i` and `j`, ALiBi's bias is a global distance, `N` and `M`
are the whole sequence's lengths. The shard form is the same program rewritten so that:

- the query axis `i` and the key axis `j` range over the shard's local extents (new dims);
- every use of `i` or `j` as a value (masks, score modifications, lets, subscripts of
  non-token dims such as `table[h, clamp(j - i, -R, R) + R]`) becomes `i + q_offset`
  (`j + k_offset`), with the offsets new int params;
- the dims that are token lengths (`N`, `M`) become int params holding the global lengths,
  so `mask j <= i + (M - N)` and `require N == M` keep their meaning;
- a subscript at the token dim of an input (`q[b,h,i,d]`, `doc[b,j]`) keeps the local
  index: those inputs are sharded and each rank passes its own slice. An input read at its
  token dim with both `i` and `j` (`doc[b,i] == doc[b,j]`) becomes two inputs, a query-side
  one and a key-side one (which travels with the key/value shard).

The shard form compiles with the normal pipeline, so every backend runs it unchanged.
Only programs whose one output is `softmax(s, j)` contracted over `j` (partial (output,
log-sum-exp) pairs merge exactly) or a plain sum over `j` without a softmax (`lightning`:
partial outputs add up) are sharded (`attncc/distributed.py`).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import sympy

from attncc import ir
from attncc.api import lse_output
from attncc.errors import SpecError
from attncc.passes.infer import dim_equalities


class Side(enum.Enum):
    """Which shard of a rank an input of the shard form comes from."""

    QUERY = "query"  # sharded like the queries: the rank's own slice
    KEY = "key"  # sharded like the keys: travels with the key/value shard
    REPLICATED = "replicated"  # no token dim: every rank passes the whole tensor


class NotShardable(SpecError):
    """The program cannot run context-parallel; the message says why and where."""


@dataclass(frozen=True)
class ShardInput:
    original: str  # the input of the original program it is a slice (or copy) of
    side: Side
    token_dim: int | None  # the dim sliced along (None when replicated)


@dataclass(frozen=True)
class ShardForm:
    """A program's shard form and how to feed it."""

    program: ir.Program
    query_axis: str
    key_axis: str
    inputs: dict[str, ShardInput]  # shard-form input name -> where its tensor comes from
    q_offset: str  # the param names of the shard's first query / key position
    k_offset: str
    global_dims: dict[str, Side]  # each token-length dim, now a param: the global query or key count
    merge: Merge
    lse_axes: tuple[str, ...]  # the indices of the log-sum-exp output (none for Merge.SUM)
    local_dims: tuple[str, str]  # the dims of the shard's query and key lengths


def _fresh(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name


class Merge(enum.Enum):
    """How the partial results of key shards combine into the output."""

    LSE = "lse"  # softmax outputs, weighted by exp(lse_p - lse)
    SUM = "sum"  # a plain sum over the keys (linear attention without a normaliser): added


def _merged_output(program: ir.Program):
    """(the key axis, how key shards merge, the node whose indices hold the scores, the LSE axes),
    checking that the first and only output is the softmax weights (or plain weights) contracted
    over the key axis."""
    out = program.outputs[0]
    if len(program.outputs) != 1:
        raise NotShardable(f"context parallelism shards one output; '{program.name}' has "
                           f"{len(program.outputs)}", program.source, program.outputs[1].loc)
    if not any(isinstance(n, ir.Normalize) and n.op == "softmax" for n in program.nodes()):
        if isinstance(out.node, ir.Contract) and len(out.node.summed) == 1:  # o = sum_j a[i,j] v[j]
            return out.node.summed[0], Merge.SUM, out.node, ()
        raise NotShardable(f"'{program.name}' has no softmax over the keys and its output is not one sum over "
                           "them: linear attention with a normaliser has no shard form (context_parallel "
                           "passes its carried state instead, with the contiguous layout)",
                           program.source, out.loc)
    try:  # exactly one softmax over the summed axis feeding the first output
        lse = lse_output(program)
    except SpecError as why:
        raise NotShardable(f"context parallelism merges one softmax by its log-sum-exp: {why.message}",
                           program.source, why.loc) from None
    sm = next(n for n in program.nodes() if isinstance(n, ir.Normalize) and n.op == "softmax"
              and n.axis not in out.node.indices)
    if sm.sink is not None:
        raise NotShardable("a softmax with a sink logit: the sink would be counted once per key shard",
                           program.source, sm.loc)
    if not (isinstance(out.node, ir.Contract) and out.node.summed == (sm.axis,) and sm in out.node.factors):
        raise NotShardable(f"the output must be the softmax weights contracted over '{sm.axis}' "
                           f"(p[...,{sm.axis}] * v[...,{sm.axis},...]) for key shards to merge by their "
                           f"log-sum-exp", program.source, out.loc)
    return sm.axis, Merge.LSE, sm.arg, lse.axes


def _query_axis(program: ir.Program, scores: ir.Node, query_axis: str | None) -> str:
    out = program.outputs[0]
    candidates = [ix for ix in out.axes if ix in ir.union_indices((scores, *scores.operands()))
                  and program.extent[ix].is_Symbol]
    if query_axis is not None:
        if query_axis not in candidates:
            raise NotShardable(f"query_axis '{query_axis}' is not an index of both the output and the "
                               f"scores; one of: {', '.join(candidates)}", program.source, out.loc)
        return query_axis
    named = [ix for ix in candidates if str(program.extent[ix]) == "N"]
    if len(named) == 1:
        return named[0]
    raise NotShardable("cannot tell the query axis (no single output index ranges over N); pass "
                       f"query_axis= one of: {', '.join(candidates)}", program.source, out.loc)


def _token_positions(program: ir.Program, q: str, k: str, token_dims: set) -> dict[str, dict[int, set[str]]]:
    """Per input, the dims read with the plain query or key index, and with which. A token
    dim read with anything else (`x[b, i + 1]`) has no local meaning: an error."""
    found: dict[str, dict[int, set[str]]] = {}
    for node in program.nodes():
        if not isinstance(node, ir.Access):
            continue
        if isinstance(node.array, ir.Input):
            dims = node.array.dims
            for pos, arg in enumerate(node.args):
                if isinstance(arg, ir.Index) and arg.name in (q, k):
                    found.setdefault(node.array.name, {}).setdefault(pos, set()).add(arg.name)
                elif dims[pos] in token_dims:
                    raise NotShardable(f"dim {pos} of '{node.array.name}' is a token dim ({dims[pos]}) read "
                                       f"with an expression, not the plain '{q}' or '{k}': its shard "
                                       "cannot be sliced", program.source, node.loc or arg.loc)
        else:
            for ax, arg in zip(node.axes, node.args):
                if ax in (q, k) and not (isinstance(arg, ir.Index) and arg.name == ax):
                    raise NotShardable(f"a read of a defined tensor along '{ax}' at another position than its "
                                       f"own (a transpose or a shift) needs the whole sequence",
                                       program.source, node.loc or arg.loc)
    for name, positions in found.items():
        if len(positions) > 1:
            raise NotShardable(f"input '{name}' has two token dims; context parallelism slices one",
                               program.source, program.inputs[name].loc)
    return found


def shard_form(program: ir.Program, query_axis: str | None = None) -> ShardForm:
    """The shard form of `program` (see the module docstring); `NotShardable` says why not."""
    k, merge, scores, lse_axes = _merged_output(program)
    q = _query_axis(program, scores, query_axis)
    for node in program.nodes():
        along = set(ir.reduced_axes(node)) & {q, k}
        softmax = isinstance(node, ir.Normalize) and merge == Merge.LSE and node.arg is scores
        if along and not softmax and node is not program.outputs[0].node:
            raise NotShardable(f"'{type(node).__name__.lower()}' along '{', '.join(sorted(along))}' combines "
                               "entries of the whole sequence; only the softmax over the keys (or "
                               "the output's own sum over them) merges across shards", program.source, node.loc)
    equal = dim_equalities(program)
    qdim, kdim = program.extent[q], program.extent[k]
    token_dims = {qdim, kdim}  # and the dims a `require` equates with them
    token_dims |= {a for a, b in equal.items() if b in token_dims} | {b for a, b in equal.items() if a in token_dims}
    reads = _token_positions(program, q, k, token_dims)

    taken = set(program.inputs) | set(program.dims) | set(program.params) | set(program.extent)
    qloc = sympy.Symbol(_fresh("cp_query_len", taken), integer=True, positive=True)
    kloc = sympy.Symbol(_fresh("cp_key_len", taken), integer=True, positive=True)
    q_off, k_off = _fresh("cp_query_offset", taken), _fresh("cp_key_offset", taken)
    local = {q: qloc, k: kloc}

    # the token-length dims become params holding the global lengths
    global_dims: dict[str, Side] = {}
    for name, positions in reads.items():
        (pos, axes), = positions.items()
        dim = program.inputs[name].dims[pos]
        if dim.is_Symbol:
            global_dims.setdefault(dim.name, Side.QUERY if q in axes else Side.KEY)
    for ix, side in ((q, Side.QUERY), (k, Side.KEY)):
        global_dims.setdefault(program.extent[ix].name, side)

    def int_param(name):
        return ir.Scalar(name=name, role="param", dtype=ir.INT)

    params = {n: int_param(n) for n in global_dims}
    params[q_off], params[k_off] = int_param(q_off), int_param(k_off)
    dims = {n: d for n, d in program.dims.items() if n not in global_dims}
    dims[qloc.name] = ir.Scalar(name=qloc.name, role="dim", dtype=ir.INT)
    dims[kloc.name] = ir.Scalar(name=kloc.name, role="dim", dtype=ir.INT)

    # the inputs: token-read ones sliced per side (two inputs when read with both indices)
    inputs: dict[str, ir.Input] = {}
    feeds: dict[str, ShardInput] = {}
    by_side: dict[tuple[str, str], ir.Input] = {}
    for name, node in program.inputs.items():
        if name not in reads:
            inputs[name] = dataclasses.replace(node)
            feeds[name] = ShardInput(name, Side.REPLICATED, None)
            by_side[name, ""] = inputs[name]
            continue
        (pos, axes), = reads[name].items()
        for ax in sorted(axes, key=lambda a: a != q):  # the query side (or the only side) keeps the name
            new_name = _fresh(f"{name}_kv", taken) if ax == k and q in axes else name
            dims_ = tuple(local[ax] if p == pos else d for p, d in enumerate(node.dims))
            inputs[new_name] = dataclasses.replace(node, name=new_name, dims=dims_)
            feeds[new_name] = ShardInput(name, Side.QUERY if ax == q else Side.KEY, pos)
            by_side[name, ax] = inputs[new_name]

    offsets = {q: params[q_off], k: params[k_off]}
    memo: dict[ir.Node, ir.Node] = {}

    def local_index(node: ir.Index) -> ir.Index:
        return ir.Index(name=node.name, indices=node.indices, dtype=ir.INT, loc=node.loc)

    def clone(node: ir.Node | None):
        if node is None:
            return None
        if node not in memo:
            memo[node] = rewrite(node)
        return memo[node]

    def rewrite(node: ir.Node) -> ir.Node:
        if isinstance(node, ir.Index) and node.name in offsets:  # a global position
            return ir.Map(op="+", args=(local_index(node), offsets[node.name]), indices=node.indices,
                          dtype=ir.INT, loc=node.loc)
        if isinstance(node, ir.Scalar) and node.role == "dim":
            return params[node.name] if node.name in params else dims[node.name]
        if isinstance(node, ir.Scalar):
            return dataclasses.replace(node, default=clone(node.default))
        if isinstance(node, ir.Input):
            return by_side[node.name, ""]
        if isinstance(node, ir.Access):
            if isinstance(node.array, ir.Input):
                pos_axes = reads.get(node.array.name)
                pos = next(iter(pos_axes)) if pos_axes else None
                array = by_side[node.array.name, node.args[pos].name] if pos is not None \
                    else by_side[node.array.name, ""]
                args = tuple(local_index(a) if p == pos else clone(a) for p, a in enumerate(node.args))
            else:
                array = clone(node.array)
                args = tuple(local_index(a) if ax in offsets else clone(a) for ax, a in zip(node.axes, node.args))
            return dataclasses.replace(node, array=array, args=args)
        if isinstance(node, ir.Map):
            return dataclasses.replace(node, args=tuple(clone(a) for a in node.args))
        if isinstance(node, ir.Contract):
            return dataclasses.replace(node, factors=tuple(clone(a) for a in node.factors))
        if isinstance(node, ir.Reduce):
            block = node.block and ir.Block(node.block.index, clone(node.block.size), node.block.name)
            return dataclasses.replace(node, arg=clone(node.arg), block=block)
        if isinstance(node, ir.Normalize):
            return dataclasses.replace(node, arg=clone(node.arg), sink=clone(node.sink))
        if isinstance(node, ir.Select):
            return dataclasses.replace(node, arg=clone(node.arg), amount=clone(node.amount))
        return dataclasses.replace(node)  # Const

    for name, node in program.params.items():
        params[name] = dataclasses.replace(node, default=clone(node.default))
    out = program.outputs[0]
    outputs = [ir.Output(out.name, clone(out.node), out.axes,
                         tuple(local.get(ax, d) for ax, d in zip(out.axes, out.dims)), out.loc)]
    masks = [ir.Mask(clone(m.pred), m.loc) for m in program.masks]
    requires = [ir.Require(clone(r.cond), r.text, r.loc) for r in program.requires]
    extent = {ix: local.get(ix, e) for ix, e in program.extent.items()}
    shard = ir.Program(program.name, program.source, inputs, dims, params, requires, masks, outputs, extent)
    shard.graph = ir.build_graph([o.node for o in outputs] + [m.pred for m in masks] + [r.cond for r in requires])
    return ShardForm(shard, q, k, feeds, q_off, k_off, global_dims, merge, lse_axes, (qloc.name, kloc.name))
