"""Context parallelism: one attention over a sequence sharded across ranks.

    cp = attncc.distributed.context_parallel(kernel, layout="zigzag")
    o_local = cp(q=q_local, k=k_local, v=v_local, doc=doc_local)

Each rank holds a slice of the queries and of the keys (`pieces` says which positions).
A rank computes its queries against every key shard that can matter to them with the
kernel's *shard form* (`passes/shard.py`: global token positions through offset params)
and merges the partial (output, log-sum-exp) pairs exactly (partial outputs add up for a
plain sum over the keys, as in `sigmoid`). Linear attention (`lightning`, `linear_elu`)
moves no keys: each rank passes its pieces' carried `D x E` states (`LinearState`). Shard
pairs that the mask provably leaves empty are neither sent nor computed: symbolically from
the mask analysis (causal, windows, prefixes), or from the data of the mask's token inputs
(document ids), see `ShardPlanner`. Key/value shards go point to point, each straight to
the ranks that need it, in ring order (step t: send to rank r + t, receive from rank r - t),
the next step's transfer posted before the current pair is computed. The backward
recomputes each pair, sends the key-side gradients back to their owners and sums replicated
inputs' gradients over the ranks. docs/distributed.md has the details and the limits.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
import sympy
import torch
import torch.distributed as dist

from . import ir
from .api import Kernel, choose_backend
from .binding import bind
from .errors import ArgumentError, ShapeError
from .reference import Reference, align
from attncc.passes.mask_analysis import MaskTooComplex, evaluate
from attncc.passes.mask_sympy import NotAffineExtents, analyse_masks
from attncc.passes.linear import causal_only, decay_factor, linear_weight, mask_free
from attncc.passes.row_stream import NotRowStreamable, plan_row_stream
from attncc.passes.shard import Merge, NotShardable, ShardForm, Side, shard_form

__all__ = ["Layout", "context_parallel", "ContextParallel", "LinearState", "pieces", "shard", "unshard"]


class Layout(enum.Enum):
    CONTIGUOUS = "contiguous"  # rank r: the r-th of W contiguous chunks
    ZIGZAG = "zigzag"  # rank r: chunks r and 2W-1-r of 2W (balanced work under a causal mask)


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, length) of `parts` near-equal chunks, the longer ones first (as torch.tensor_split)."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for p in range(parts):
        n = base + (p < extra)
        out.append((start, n))
        start += n
    return out


def pieces(total: int, world: int, rank: int, layout: Layout | str = Layout.CONTIGUOUS) -> list[tuple[int, int]]:
    """The (global start, length) runs of positions rank `rank` holds, in the order its local
    tensor concatenates them."""
    layout = Layout(layout)
    if layout == Layout.CONTIGUOUS:
        return [_split(total, world)[rank]]
    chunks = _split(total, 2 * world)
    return [chunks[rank], chunks[2 * world - 1 - rank]]


def shard(x: torch.Tensor, dim: int, world: int, rank: int, layout: Layout | str = Layout.CONTIGUOUS):
    """Rank `rank`'s local slice of a whole tensor `x` along its token dim `dim`."""
    return torch.cat([x.narrow(dim, s, n) for s, n in pieces(x.shape[dim], world, rank, layout)], dim)


def unshard(parts: list[torch.Tensor], dim: int, layout: Layout | str = Layout.CONTIGUOUS) -> torch.Tensor:
    """The whole tensor from every rank's local slice (`parts[r]` from rank r)."""
    world, total = len(parts), sum(p.shape[dim] for p in parts)
    out = [None] * (2 * world if Layout(layout) == Layout.ZIGZAG else world)
    for r, part in enumerate(parts):
        at = 0
        for s, n in pieces(total, world, r, layout):
            index = next(k for k, (s2, _) in enumerate(_split(total, len(out))) if s2 == s and out[k] is None)
            out[index] = part.narrow(dim, at, n)
            at += n
    return torch.cat(out, dim)


def layout_pieces(layout: Layout, lens: list[int], rank: int, what: str) -> list[tuple[int, int]]:
    """Rank `rank`'s runs given every rank's local length `lens`: contiguous shards may have any
    lengths (each starts where the ones before end); zigzag shards must be the ones its cut gives."""
    if layout == Layout.CONTIGUOUS:
        return [(sum(lens[:rank]), lens[rank])]
    total = sum(lens)
    runs = pieces(total, len(lens), rank, layout)
    if sum(n for _, n in runs) != lens[rank]:
        raise ShapeError(f"rank {rank} holds {lens[rank]} {what} positions, but the zigzag layout of "
                         f"{total} over {len(lens)} ranks gives it {sum(n for _, n in runs)} "
                         "(attncc.distributed.shard makes the slices)")
    return runs


def context_parallel(kernel: Kernel, group=None, layout: Layout | str = "contiguous",
                     query_axis: str | None = None) -> "ContextParallel":
    """A callable with `kernel`'s keyword convention that takes each rank's local shards of the
    token-indexed inputs (whole tensors for the others) and returns the rank's output shard
    (and log-sum-exp shard with `return_lse=True`). Every rank of `group` calls it together."""
    return ContextParallel(kernel, group, Layout(layout), query_axis)


@dataclasses.dataclass
class _Pair:
    """One (query piece, key piece) product a rank computes."""

    source: int  # the rank holding the key piece
    qpiece: int  # the index of the query piece among the rank's pieces
    kpiece: int  # ... and of the key piece among the source's


class ContextParallel:
    """See `context_parallel`. `last_run` holds what the latest call did (pairs computed and
    skipped, bytes sent and received; `last_backward` the same for its backward)."""

    def __init__(self, kernel: Kernel, group, layout: Layout, query_axis: str | None):
        self.kernel, self.group, self.layout = kernel, group, layout
        self.last_run: dict | None = None
        self.last_backward: dict | None = None
        program = kernel.program
        softmax = any(isinstance(n, ir.Normalize) and n.op == "softmax" for n in program.nodes())
        # linear attention passes its carried state; other programs rotate key/value shards
        self.state, refused = None, None
        if not softmax:
            try:
                self.state, self.form = LinearState(program), None
                return
            except NotShardable as why:
                refused = why
        try:
            self.form: ShardForm = shard_form(program, query_axis)
        except NotShardable as why:
            if refused is None:
                raise
            raise NotShardable(f"{refused.message}; nor can it rotate key/value shards: {why.message}",
                               refused.source, refused.loc) from None
        ran, generated = choose_backend(self.form.program, kernel.backend)
        self.shard_kernel = Kernel(self.form.program, ran, kernel.reference_block, generated)
        self.shard_kernel.deterministic = kernel.deterministic
        self.planner = ShardPlanner(program, self.form)

    def __repr__(self):
        return f"<attncc.distributed.ContextParallel {self.kernel.name} layout={self.layout.value}>"

    def __call__(self, *, return_lse: bool = False, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("context_parallel needs torch.distributed initialised (init_process_group)")
        program = self.kernel.program
        for name in kwargs:
            if name not in program.inputs and name not in program.params:
                raise ArgumentError(f"{program.name}() got an unknown argument '{name}'")
        if return_lse and (self.state is not None or self.form.merge == Merge.SUM):
            raise ArgumentError(f"{program.name}() has no softmax, so no log-sum-exp to return")
        tensors = {n: kwargs[n] for n in program.inputs if kwargs.get(n) is not None}
        scalars = {n: kwargs[n] for n in program.params if n in kwargs}
        if self.state is not None:
            o = self.state(self, tensors, scalars)
            self.last_run, self.last_backward = self.state.last_run, None
            return o
        run = _Run(self, tensors, scalars)
        names = tuple(tensors)
        results = _RingAttention.apply(run, return_lse, names, *tensors.values())
        self.last_run = run.stats
        return results if return_lse else results[0]


class _Run:
    """One call: the ranks' pieces, which pairs each rank computes, and the shard calls."""

    def __init__(self, cp: ContextParallel, tensors: dict, scalars: dict):
        self.cp, self.form, self.scalars = cp, cp.form, scalars
        self.group = cp.group
        self.world = dist.get_world_size(cp.group)
        self.rank = dist.get_rank(cp.group)
        self.tensors = tensors
        form = self.form
        missing = [s.original for s in form.inputs.values() if s.side != Side.REPLICATED
                   and s.original not in tensors]
        if missing:
            raise ArgumentError(f"{cp.kernel.name}(): context parallelism needs the token input "
                                f"'{missing[0]}' (optional token inputs are not defaulted per shard)")
        self.device = next(iter(tensors.values())).device
        nq = self._local_length(Side.QUERY)
        nk = self._local_length(Side.KEY)
        lengths = torch.tensor([nq, nk], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(lengths) for _ in range(self.world)]
        dist.all_gather(gathered, lengths, group=self.group)
        self.lens = lens = [tuple(int(x) for x in g.cpu()) for g in gathered]
        self.totals = {Side.QUERY: sum(n for n, _ in lens), Side.KEY: sum(m for _, m in lens)}
        self.pieces = {side: [layout_pieces(cp.layout, [ln[k] for ln in lens], r, side.value)
                              for r in range(self.world)] for k, side in enumerate((Side.QUERY, Side.KEY))}
        self.globals = {name: self.totals[side] for name, side in form.global_dims.items()}
        self.global_scalars = self._bind_globally()
        self.gathered_bytes = 0  # the key-side mask inputs all-gathered to skip pairs by data
        need = cp.planner.row(self)  # this rank's pairs, and how each skipped one was proven empty
        self.pairs, self.proofs = need
        row = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        for p in self.pairs:
            row[p.source] |= 1 << p.kpiece
        rows = [torch.empty_like(row) for _ in range(self.world)]
        dist.all_gather(rows, row, group=self.group)
        # needs[r][s]: the key pieces of rank s that rank r computes with (a bit each; 0: none)
        self.needs = [[int(x) for x in r.cpu()] for r in rows]
        self.stats = {"backend": cp.shard_kernel.backend, "layout": cp.layout.value, "world": self.world,
                      "rank": self.rank, "pairs_computed": len(self.pairs),
                      "pairs_total": len(self.pieces[Side.QUERY][self.rank]) * sum(
                          len(p) for p in self.pieces[Side.KEY]),
                      "sources": sorted({p.source for p in self.pairs}), "skipped_by": dict(self.proofs),
                      "pairs": [(*self.pieces[Side.QUERY][self.rank][p.qpiece], *self.pieces[Side.KEY][p.source][p.kpiece])
                                for p in self.pairs],  # (query start, length, key start, length)
                      "bytes_sent": 0, "bytes_received": 0, "bytes_gathered_for_masks": self.gathered_bytes}
        self.stats["pairs_skipped"] = self.stats["pairs_total"] - len(self.pairs)

    def _bind_globally(self) -> dict:
        """The dims and params of the whole (unsharded) call, its requirements checked as one
        device would check them: the shapes with every token dim at its global length."""
        sides = {s.original: s for s in self.form.inputs.values() if s.side != Side.REPLICATED}
        meta = {}
        for name, t in self.tensors.items():
            shape = list(t.shape)
            if name in sides:
                shape[sides[name].token_dim] = self.totals[sides[name].side]
            meta[name] = torch.empty(shape, dtype=t.dtype, device="meta")
        return bind(self.cp.kernel.program, {**meta, **self.scalars}, data=False).scalars

    def _local_length(self, side: Side) -> int:
        sizes = {self.tensors[s.original].shape[s.token_dim] for s in self.form.inputs.values() if s.side == side}
        if len(sizes) != 1:
            raise ShapeError(f"the local {side.value} shards have different lengths: {sorted(sizes)}")
        return sizes.pop()

    def held(self, source: int) -> int:
        """The key pieces of `source` this rank holds during the ring (a bit each): all of its own,
        the ones it needs of others' (only those are sent)."""
        return (1 << len(self.pieces[Side.KEY][source])) - 1 if source == self.rank else self.needs[self.rank][source]

    def key_offsets(self, owner: int, pieces: int) -> dict[int, int]:
        """Where each of `owner`'s key pieces in the bit set `pieces` starts in a tensor holding
        just those pieces, in order."""
        at, out = 0, {}
        for kp, (_, n) in enumerate(self.pieces[Side.KEY][owner]):
            if pieces >> kp & 1:
                out[kp], at = at, at + n
        return out

    def key_length(self, owner: int, pieces: int) -> int:
        return sum(n for kp, (_, n) in enumerate(self.pieces[Side.KEY][owner]) if pieces >> kp & 1)

    def select_keys(self, t: torch.Tensor, dim: int, pieces: int) -> torch.Tensor:
        """This rank's key-side tensor `t` cut down to the pieces in `pieces`."""
        if pieces == self.held(self.rank):
            return t
        return torch.cat([t.narrow(dim, at, self.pieces[Side.KEY][self.rank][kp][1])
                          for kp, at in self.key_offsets(self.rank, self.held(self.rank)).items() if pieces >> kp & 1],
                         dim)

    def shard_args(self, qpiece: int, source: int, kpiece: int, local: dict, remote: dict,
                   held: int | None = None) -> dict:
        """The shard-form call of one pair: `local` the rank's tensors, `remote` the source's key side
        holding the pieces in `held` (all of them when None)."""
        qs, qn = self.pieces[Side.QUERY][self.rank][qpiece]
        ks, kn = self.pieces[Side.KEY][source][kpiece]
        qat = sum(n for _, n in self.pieces[Side.QUERY][self.rank][:qpiece])
        all_pieces = (1 << len(self.pieces[Side.KEY][source])) - 1
        kat = self.key_offsets(source, all_pieces if held is None else held)[kpiece]
        args = dict(self.scalars)
        for name, s in self.form.inputs.items():
            if s.side == Side.KEY and s.original in remote:
                args[name] = remote[s.original].narrow(s.token_dim, kat, kn)
            elif s.side != Side.KEY and s.original in local:
                args[name] = local[s.original] if s.side == Side.REPLICATED else \
                    local[s.original].narrow(s.token_dim, qat, qn)
        args.update(self.globals)
        args[self.form.q_offset], args[self.form.k_offset] = qs, ks
        return args

    def key_side(self) -> list[str]:
        """The original inputs whose key-side slice travels with the keys (k, v, doc ...)."""
        return sorted({s.original for s in self.form.inputs.values() if s.side == Side.KEY})

    def peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def pair_scalars(self, qpiece: int, source: int, kpiece: int) -> dict:
        """Every dim and param of the shard form for one pair (for evaluating its masks)."""
        qs, qn = self.pieces[Side.QUERY][self.rank][qpiece]
        ks, kn = self.pieces[Side.KEY][source][kpiece]
        local = {name: n for name, n in zip(self.form.local_dims, (qn, kn))}
        return {**self.global_scalars, **self.globals, **local,
                self.form.q_offset: qs, self.form.k_offset: ks}

    # ------------------------------------------------------------------ communication
    def exchange(self, step: int, send: list[torch.Tensor], like: list[torch.Tensor], dims: list[int],
                 reverse: bool = False):
        """Post step `step` of the ring: send `send` to rank r + step when it needs this rank's keys,
        and receive tensors shaped like `like` (at the source's key length along `dims`) from rank
        r - step when this rank needs its keys. `reverse`: the gradients' way back, from the rank that computed
        with a key shard to its owner. Returns (the pending works, the receive buffers or None)."""
        ahead, behind = (self.rank + step) % self.world, (self.rank - step) % self.world
        if reverse:
            dst, src, sending, receiving = behind, ahead, self.needs[self.rank][behind], self.needs[ahead][self.rank]
        else:
            dst, src, sending, receiving = ahead, behind, self.needs[ahead][self.rank], self.needs[self.rank][behind]
            send = [self.select_keys(t, d, sending) for t, d in zip(send, dims)] if sending else send
        tag = len(like) if reverse else 0  # the two directions never share a tag
        ops, buffers = [], None
        if sending:
            for k, t in enumerate(send):
                ops.append(dist.P2POp(dist.isend, t.contiguous(), self.peer(dst), self.group, tag + k))
                self.stats["bytes_sent"] += t.numel() * t.element_size()
        if receiving:
            owner = self.rank if reverse else src
            buffers = []
            for k, t in enumerate(like):
                shape = list(t.shape)
                shape[dims[k]] = self.key_length(owner, receiving)
                buffers.append(torch.empty(shape, dtype=t.dtype, device=t.device))
                ops.append(dist.P2POp(dist.irecv, buffers[-1], self.peer(src), self.group, tag + k))
                self.stats["bytes_received"] += buffers[-1].numel() * buffers[-1].element_size()
        return (dist.batch_isend_irecv(ops) if ops else []), buffers, receiving

    def ring(self, keys: dict[str, torch.Tensor], compute, grads: list[str] | None = None):
        """Call `compute(source, key_tensors)` for each rank whose keys this rank needs, in ring
        order (its own first), the next transfer posted before the current compute runs.
        With `grads` (key-side input names), `compute` returns those inputs' gradients for the
        source's keys; they go back to the source, and the sum over ranks of the gradients of
        this rank's own keys is returned."""
        names = list(keys)
        dims = [self._key_token_dim(n) for n in names]
        grad_dims = [self._key_token_dim(n) for n in grads or ()]
        tensors = [keys[n] for n in names]
        pending = {}
        back, own = [], None
        for step in range(self.world):
            if step + 1 < self.world:
                pending[step + 1] = self.exchange(step + 1, tensors, tensors, dims)
            works, buffers, _ = pending.pop(step, ([], None, 0))
            for w in works:
                w.wait()
            source = (self.rank - step) % self.world
            found = None
            if self.needs[self.rank][source]:
                found = compute(source, keys if step == 0 else dict(zip(names, buffers)))
            if grads is None:
                continue
            if step == 0:
                own = found
                continue
            back.append(self.exchange(step, [found[n] for n in grads] if found else [],
                                      [keys[n] for n in grads], grad_dims, reverse=True))
        if grads is None:
            return None
        total = {n: (own[n].clone() if own else torch.zeros_like(keys[n])) for n in grads}
        for works, buffers, pieces in back:
            for w in works:
                w.wait()
            offsets = self.key_offsets(self.rank, pieces)
            full = self.key_offsets(self.rank, self.held(self.rank))
            for n, d, b in zip(grads, grad_dims, buffers or ()):
                for kp, at in offsets.items():  # the pieces the peer held, back at their own place
                    n_kp = self.pieces[Side.KEY][self.rank][kp][1]
                    total[n].narrow(d, full[kp], n_kp).add_(b.narrow(d, at, n_kp))
        return total

    def _key_token_dim(self, original: str) -> int:
        return next(s.token_dim for s in self.form.inputs.values() if s.original == original and s.side == Side.KEY)

    # ------------------------------------------------------------------ forward and backward
    def query_slice(self, t: torch.Tensor, axes: tuple[str, ...], qpiece: int) -> torch.Tensor:
        """The part of a local result (over `axes`) that belongs to one query piece."""
        at = sum(n for _, n in self.pieces[Side.QUERY][self.rank][:qpiece])
        n = self.pieces[Side.QUERY][self.rank][qpiece][1]
        return t.narrow(axes.index(self.form.query_axis), at, n)

    def pairs_with(self, source: int) -> list[_Pair]:
        return [p for p in self.pairs if p.source == source]

    def forward(self, local: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's output and log-sum-exp: each pair's partial results, merged by their LSE."""
        parts: dict[int, list] = {k: [] for k in range(len(self.pieces[Side.QUERY][self.rank]))}
        kernel, softmax = self.cp.shard_kernel, self.form.merge == Merge.LSE

        def compute(source, remote):
            for p in self.pairs_with(source):
                found = kernel(**self.shard_args(p.qpiece, source, p.kpiece, local, remote, self.held(source)),
                               return_lse=softmax)
                parts[p.qpiece].append(found if softmax else (found, None))
                self.stats["backend"] = kernel.last_run["backend"]

        self.ring({n: local[n] for n in self.key_side()}, compute)
        merged = [self._nothing(qp) if not ps else _merge(ps, self.out_axes, self.form.lse_axes) if softmax
                  else (sum(o for o, _ in ps), None) for qp, ps in parts.items()]
        o = torch.cat([o for o, _ in merged], self.out_axes.index(self.form.query_axis))
        if not softmax:
            return o, None
        return o, torch.cat([lse for _, lse in merged], self.form.lse_axes.index(self.form.query_axis))

    def _nothing(self, qpiece: int):
        """A query piece no key can reach: output 0 and log-sum-exp -inf, as on one device."""
        sizes = self.form.program.sizes(self.pair_scalars(qpiece, self.rank, 0))
        like = next(t for t in self.tensors.values() if t.is_floating_point())
        o = like.new_zeros([sizes[ax] for ax in self.out_axes])
        if self.form.merge == Merge.SUM:
            return o, None
        return o, like.new_full([sizes[ax] for ax in self.form.lse_axes], -math.inf)

    @property
    def out_axes(self) -> tuple[str, ...]:
        return self.form.program.outputs[0].axes

    def _pulled_back(self, found_p, qpiece: int, o, lse, go_q, grad_lse) -> list[torch.Tensor]:
        """The gradients of one pair's (o_p, lse_p) from those of the merged (o, lse):
        dO_p = w dO and dlse_p = w (rowsum(dO * (o_p - o)) + dLSE), w = exp(lse_p - lse)."""
        form, out_axes = self.form, self.out_axes
        o_p, lse_p = (t.detach() for t in found_p)
        o_q, lse_q = self.query_slice(o, out_axes, qpiece), self.query_slice(lse, form.lse_axes, qpiece)
        w = _weight(lse_p, lse_q)
        summed = tuple(k for k, ax in enumerate(out_axes) if ax not in form.lse_axes)
        kept = tuple(ax for ax in out_axes if ax in form.lse_axes)
        delta = go_q * (o_p - o_q)
        delta = delta.sum(dim=summed) if summed else delta
        g_lse = w * align(delta, kept, form.lse_axes).reshape(w.shape)
        if grad_lse is not None:
            g_lse = g_lse + w * self.query_slice(grad_lse, form.lse_axes, qpiece)
        return [align(w, form.lse_axes, out_axes) * go_q, g_lse]

    def backward(self, local: dict, o, lse, grad_o, grad_lse, wanted: set[str]) -> dict:
        """The gradients of this rank's inputs: every pair recomputed under autograd, its share of
        the merged output's gradient pulled back through the kernel's own backward."""
        kernel, form = self.cp.shard_kernel, self.form
        floats = {n for n, t in local.items() if t.is_floating_point()}
        key_grads = [n for n in self.key_side() if n in floats]
        query = {s.original for s in form.inputs.values() if s.side == Side.QUERY} & floats
        replicated = {s.original for s in form.inputs.values() if s.side == Side.REPLICATED} & floats
        found = {n: torch.zeros_like(local[n]) for n in query | replicated}
        grad_o = torch.zeros_like(o) if grad_o is None else grad_o

        def compute(source, remote):
            remote_grads = {n: torch.zeros_like(remote[n]) for n in key_grads}
            for p in self.pairs_with(source):
                args = self.shard_args(p.qpiece, source, p.kpiece, local, remote, self.held(source))
                leaves = {n: args[n].detach().requires_grad_() for n, s in form.inputs.items()
                          if s.original in floats and n in args}
                go_q = self.query_slice(grad_o, self.out_axes, p.qpiece)
                with torch.enable_grad():
                    found_p = kernel(**{**args, **leaves}, return_lse=form.merge == Merge.LSE)
                if form.merge == Merge.LSE:
                    outs, seeds = found_p, self._pulled_back(found_p, p.qpiece, o, lse, go_q, grad_lse)
                else:  # a plain sum: each pair's output gets the whole incoming gradient
                    outs, seeds = [found_p], [go_q]
                names = list(leaves)
                gs = torch.autograd.grad(outs, [leaves[n] for n in names], seeds, allow_unused=True)
                for n, g in zip(names, gs):
                    if g is None:
                        continue
                    s = form.inputs[n]
                    if s.side == Side.QUERY:
                        self.query_slice(found[s.original], _dims(found[s.original], s.token_dim, form.query_axis),
                                         p.qpiece).add_(g)
                    elif s.side == Side.KEY:
                        at = self.key_offsets(source, self.held(source))[p.kpiece]
                        remote_grads[s.original].narrow(s.token_dim, at, g.shape[s.token_dim]).add_(g)
                    else:
                        found[s.original].add_(g)
            return remote_grads

        keys = self.ring({n: local[n] for n in self.key_side()}, compute, key_grads)
        for n in sorted(replicated):  # each rank summed over its own queries
            dist.all_reduce(found[n], group=self.group)
        for n, g in keys.items():
            found[n] = found[n] + g if n in found else g
        self.stats["backward"] = kernel.last_run.get("backward") if kernel.last_run else None
        return {n: g for n, g in found.items() if n in wanted}


def _dims(t: torch.Tensor, token_dim: int, axis: str) -> tuple[str, ...]:
    """Placeholder axis names for a tensor whose dim `token_dim` is the query axis."""
    return tuple(axis if k == token_dim else f"#{k}" for k in range(t.dim()))


def _weight(lse_p: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(lse_p - lse): a pair's share of the merged softmax (0 where the pair saw no key)."""
    lse_p, lse = lse_p.float() if lse_p.dtype in (torch.float16, torch.bfloat16) else lse_p, lse.to(lse_p.dtype)
    w = torch.exp(lse_p - lse)
    return torch.where(torch.isneginf(lse_p), torch.zeros_like(w), w)


def _merge(parts: list, out_axes, lse_axes) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact softmax result over the union of the pairs' keys from their (output, LSE)."""
    dtype = parts[0][0].dtype
    lses = torch.stack([lse.float() if lse.dtype in (torch.float16, torch.bfloat16) else lse for _, lse in parts])
    lse = torch.logsumexp(lses, 0)
    o = sum(align(_weight(lp, lse), lse_axes, out_axes) * op for (op, _), lp in zip(parts, lses))
    return o.to(dtype), lse.to(dtype)


class _RingAttention(torch.autograd.Function):
    """The context-parallel forward; its backward recomputes each pair (`_Run.backward`)."""

    @staticmethod
    def forward(ctx, run, return_lse, names, *tensors):
        ctx.set_materialize_grads(False)
        local = dict(zip(names, tensors))
        o, lse = run.forward(local)
        ctx.run, ctx.names, ctx.return_lse = run, names, return_lse
        ctx.save_for_backward(*tensors, o, lse)
        return (o, lse) if return_lse else (o,)

    @staticmethod
    def backward(ctx, *grads):
        *tensors, o, lse = ctx.saved_tensors
        wanted = {n for k, n in enumerate(ctx.names) if ctx.needs_input_grad[3 + k]}
        run = ctx.run
        run.stats = {**run.stats, "bytes_sent": 0, "bytes_received": 0}
        found = run.backward(dict(zip(ctx.names, tensors)), o, lse, grads[0],
                             grads[1] if ctx.return_lse else None, wanted)
        run.cp.last_backward = run.stats
        return (None, None, None, *(found.get(n) for n in ctx.names))


class ShardPlanner:
    """Which shard pairs can hold an allowed (query, key) entry, and how an empty one is proven.

    Symbolically: the mask analysis (`passes/mask_analysis.py`) of the original program bounds,
    per query run `[a, a + n)`, the keys any conjunct allows; a key run outside every bound is
    empty for every batch and head (`skipped_by["symbolic"]`). Values read once per batch
    (`prefix[b]`) are evaluated on the replicated inputs. A mask with opaque atoms (reads of
    token inputs such as document ids, or too complex to bound) is then evaluated exactly on the
    pair's own token data, the key-side mask inputs being all-gathered first: a few ints per token,
    against the keys and values (`skipped_by["data"]`)."""

    def __init__(self, program: ir.Program, form: ShardForm):
        self.program, self.form = program, form
        q, k = form.query_axis, form.key_axis
        self.outer = tuple(ix for ix in program.extent if ix not in (q, k))
        self.plan, self.symbols = None, {}
        exact = not program.masks
        if program.masks:
            try:
                self.plan, self.symbols, _ = analyse_masks(program, program.masks, q, k, self.outer)
                exact = self.plan.exact
            except (NotAffineExtents, MaskTooComplex):
                self.plan = None
        self.by_data = not exact and bool(program.masks)
        reads = set()
        for m in form.program.masks:
            reads |= {n.name for n in ir.build_graph([m.pred]) if isinstance(n, ir.Input)}
        self.mask_inputs = sorted(reads)  # shard-form inputs the masks read

    def row(self, run: _Run) -> tuple[list[_Pair], dict[str, int]]:
        """This rank's pairs in ring order, and how many pairs each proof skipped."""
        env = {**run.global_scalars, **self._loaded(run)}
        remote = self._gathered(run) if self.by_data else None
        pairs, proofs = [], {"empty": 0, "symbolic": 0, "data": 0}
        for step in range(run.world):
            source = (run.rank - step) % run.world
            for qp, (a, n) in enumerate(run.pieces[Side.QUERY][run.rank]):
                for kp, (c, m) in enumerate(run.pieces[Side.KEY][source]):
                    if n == 0 or m == 0:
                        proofs["empty"] += 1
                    elif not self._bounds_allow(env, a, n, c, m):
                        proofs["symbolic"] += 1
                    elif self.by_data and not self._data_allows(run, qp, source, kp, remote):
                        proofs["data"] += 1
                    else:
                        pairs.append(_Pair(source, qp, kp))
        return pairs, proofs

    def _loaded(self, run: _Run) -> dict:
        """The values of the per-batch symbols the mask plan names (`prefix[b]`), as arrays over the
        outer indices."""
        if not self.symbols:
            return {}
        ref = Reference(self.program, {n: t for n, t in run.tensors.items()
                                       if self.form.inputs.get(n, None) is None
                                       or self.form.inputs[n].side == Side.REPLICATED},
                        run.global_scalars)
        return {name: align(ref.full(node), node.indices, self.outer).cpu().numpy()
                for name, node in self.symbols.items()}

    def _bounds_allow(self, env: dict, a: int, n: int, c: int, m: int) -> bool:
        plan = self.plan
        if plan is None:
            return True
        tile = {**env, plan.i0.name: a, plan.i1.name: a + n - 1}
        for conj in plan.conjuncts:
            if not all(_guard(g, env) for g in conj.guards):
                continue
            r0 = np.maximum(a, evaluate(conj.row_lo, tile))
            r1 = np.minimum(a + n - 1, evaluate(conj.row_hi, tile))
            lo = np.maximum(evaluate(conj.lo, tile), c)
            hi = np.minimum(evaluate(conj.hi, tile), c + m - 1)
            if np.any((r0 <= r1) & (lo <= hi)):
                return True
        return False

    def _gathered(self, run: _Run) -> list[dict]:
        """Every rank's key-side mask inputs (padded to the longest key shard for all_gather)."""
        names = sorted({self.form.inputs[n].original for n in self.mask_inputs
                        if self.form.inputs[n].side == Side.KEY})
        longest = max(m for _, m in run.lens)
        out = [dict() for _ in range(run.world)]
        for name in names:
            dim = run._key_token_dim(name)
            t = run.tensors[name]
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            padded = torch.cat([t, t.new_zeros(pad)], dim).contiguous()
            parts = [torch.empty_like(padded) for _ in range(run.world)]
            dist.all_gather(parts, padded, group=run.group)
            run.gathered_bytes += padded.numel() * padded.element_size() * (run.world - 1)
            for r, part in enumerate(parts):
                out[r][name] = part.narrow(dim, 0, run.lens[r][1])
        return out

    def _data_allows(self, run: _Run, qp: int, source: int, kp: int, remote: list[dict]) -> bool:
        """Whether any (query, key) entry of the pair passes every mask, on the pair's data."""
        args = run.shard_args(qp, source, kp, run.tensors, remote[source])
        tensors = {n: args[n] for n in self.mask_inputs}
        ref = Reference(self.form.program, tensors, run.pair_scalars(qp, source, kp))
        preds = [m.pred for m in self.form.program.masks]
        space = ir.union_indices(preds)
        allowed = None
        for pred in preds:
            value = align(ref.full(pred).to(torch.bool), pred.indices, space)
            allowed = value if allowed is None else allowed & value
        return bool(allowed.any())


def _guard(cond, env: dict) -> bool:
    """A guard of the mask plan for scalar values; one it cannot decide counts as holding."""
    values = {s: env.get(s.name) for s in cond.free_symbols}
    if not all(isinstance(v, (int, bool, float)) for v in values.values()):  # unknown, or per batch
        return True
    return cond.xreplace({s: sympy.sympify(v) for s, v in values.items()}) != sympy.false


class LinearState:
    """Linear attention (`f(q_i) . f(k_j)`, times a decay `lam ** (i - j)`, divided by the row
    sums when normalised) passes its carried state across ranks instead of key/value shards.

    Each rank's queries and keys cover the same positions: one run `[a, a + n)` (contiguous) or
    two (zigzag: chunks r and 2W-1-r). Every piece `p` sums its keys into
    `S_p = sum_j lam^(a_p + n_p - 1 - j) f(k_j) v_j^T` (`D x E` per batch and head; with a
    normaliser also `z_p = sum_j lam^(...) f(k_j)`), all pieces' states are all-gathered, and a
    causal piece starts its scan from the prefix `P_p = sum_{q before p} lam^(a_p - a_q - n_q) S_q`
    (decays composed across the gaps; in zigzag, chunk r gets the first chunks of the ranks
    before r, chunk 2W-1-r every first chunk and the second chunks of the ranks after r):
    its queries add `lam^(i - a_p + 1) f(q_i) P_p` to the piece's own causal part. Without a
    mask every piece's state counts. The all-gather is differentiable (`_GatherStates`), so the
    backward (the reverse scan) is autograd's. The feature maps, the decay base and the scale
    are read off the row-streaming plan (`passes/linear.py`) and evaluated by the reference
    executor."""

    def __init__(self, program: ir.Program):
        try:
            plan = plan_row_stream(program)
        except NotRowStreamable as why:
            raise NotShardable(f"linear attention runs context-parallel by passing its carried state, which needs "
                               f"the weights f(q) . f(k) (times lam ** (i - j)) contracted with the values: {why}",
                               program.source, program.outputs[0].loc) from None
        term = linear_weight(plan)
        if term is None or len(term.qk_factors) > 1 or (term.qk_factors and decay_factor(plan) is None):
            raise NotShardable("linear attention passes its carried state only for weights f(q) . f(k), optionally "
                               "times one decay `lam ** (i - j)` (no other factor of the scores)",
                               program.source, program.outputs[0].loc)
        self.plan, self.term = plan, term
        self.decay = decay_factor(plan) if term.qk_factors else None
        self.program = program
        self.last_run: dict | None = None
        self.chunk = 64  # tokens per step of the PyTorch scan over a piece (tests take small ones)

    def _features(self, tensors: dict, scalars: dict) -> tuple:
        """(f(q) times the scale, f(k), v over `(outer..., token, feature)`, and the decay base
        over `(outer..., 1, 1)` or None) of one piece, evaluated by the reference executor."""
        plan, outer = self.plan, self.plan.outer
        ref = Reference(self.program, tensors, scalars)

        def feature(op, want):
            node = op.transform if op.transform is not None else op.access
            return align(ref.full(node), node.indices, want)

        fq = feature(self.term.q, (*outer, plan.i, plan.d))
        for s in self.term.scale:
            fq = fq * ref.full(s)
        lam = None
        if self.decay is not None:
            lam = align(ref.full(self.decay.args[0]), self.decay.args[0].indices, outer)[..., None, None]
        return fq, feature(self.term.k, (*outer, plan.j, plan.d)), feature(self.plan.v, (*outer, plan.j, plan.e)), lam

    def _token_dims(self) -> dict[str, int]:
        """Per input, its token dim (the one whose extent is the query or key count)."""
        tokens = {self.program.extent[self.plan.i], self.program.extent[self.plan.j]}
        return {n: next(p for p, d in enumerate(node.dims) if d in tokens)
                for n, node in self.program.inputs.items() if any(d in tokens for d in node.dims)}

    def _causal(self, whole: dict) -> bool:
        """Whether the call (its global dims and params) is causal, or has no mask; refuses others."""
        plan, program = self.plan, self.program
        sizes = program.sizes(whole)
        if plan.mask_plan is None or mask_free(plan, sizes, whole):
            causal = False
        elif causal_only(plan, sizes, whole):
            causal = True
        else:
            raise NotShardable("passing the carried state handles the causal mask `j <= i` (N == M) or none; "
                               "this call's mask is another", program.source, plan.masks[0].loc)
        if self.decay is not None and not causal:
            raise NotShardable("a decay without the causal mask grows as lam ** (i - j) for keys after the query; "
                               "its state cannot be carried", program.source, self.decay.loc)
        return causal

    def __call__(self, cp: "ContextParallel", tensors: dict, scalars: dict) -> torch.Tensor:
        plan, program, group = self.plan, self.program, cp.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        token = self._token_dims()
        missing = [n for n in token if n not in tensors and program.inputs[n].default is None]
        if missing:
            raise ArgumentError(f"{program.name}(): context parallelism needs the token input '{missing[0]}'")
        lengths = {tensors[n].shape[d] for n, d in token.items() if n in tensors}
        if len(lengths) != 1:
            raise ShapeError(f"{program.name}(): passing the carried state needs each rank's query and key "
                             f"shards to cover the same positions; the local token lengths are {sorted(lengths)}")
        n = lengths.pop()
        device = next(iter(tensors.values())).device
        gathered = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([n], device=device), group=group)
        lens = [int(g) for g in gathered]
        runs = [layout_pieces(cp.layout, lens, r, "token") for r in range(world)]  # every rank's pieces
        meta = {}
        for name, t in tensors.items():
            shape = list(t.shape)
            if name in token:
                shape[token[name]] = sum(lens)
            meta[name] = torch.empty(shape, dtype=t.dtype, device="meta")
        whole = bind(program, {**meta, **scalars}, data=False).scalars
        causal = self._causal(whole)
        # replicated inputs (lam): one device's gradient sums over every rank's queries
        tensors = {name: _SumGradients.apply(group, t) if name not in token and t.is_floating_point() else t
                   for name, t in tensors.items()}
        mine, at = runs[rank], 0
        pieces_in, features, states = [], [], []
        for _, m in mine:  # each piece's tensors, features and state (keys decayed to the piece's end)
            piece = {name: t.narrow(token[name], at, m) if name in token else t for name, t in tensors.items()}
            at += m
            fq, fk, v, lam = self._features(piece, self._sizes(whole, m))
            pieces_in.append(piece)
            features.append((fq, fk, v, lam))
            states.append(self._state(fk, v, lam if causal else None))
        stacked = torch.stack(states).contiguous()
        every = _GatherStates.apply(group, stacked)  # every[s][k]: rank s's piece k
        scan = self._kernel_scan(cp, causal)
        outs = []
        for k, ((a, m), piece, (fq, fk, v, lam)) in enumerate(zip(mine, pieces_in, features)):
            # every gathered state enters the sum (times 0 where it does not count): each rank's
            # autograd then reaches the all-gather, whose backward is a collective all must join
            if not causal:  # every piece's keys, this one's included: o = f(q) (sum_p S_p)
                outs.append(self._finish(fq @ sum(every[s][q] for s in range(world) for q in range(len(runs[s])))))
                continue
            carried = sum(every[s][q] * (_power(lam, a - c - l) if c + l <= a and (s, q) != (rank, k) else 0.0)
                          for s in range(world) for q, (c, l) in enumerate(runs[s]))
            if scan is None or m == 0:
                outs.append(self._causal_piece(fq, fk, v, lam, carried))
            else:
                outs.append(self._scanned(scan, piece, scalars, whole, m, carried))
        out = torch.cat(outs, -2)
        sent = stacked.numel() * stacked.element_size() * (world - 1)
        local = "torch" if scan is None else "triton"
        self.last_run = {"backend": f"state passing ({local})", "layout": cp.layout.value, "world": world,
                         "rank": rank, "causal": causal, "state_shape": list(stacked.shape),
                         "backward": "torch" if scan is None else "torch (recomputed)",
                         "pairs": [(a, m, a, m) for a, m in mine if m],  # the local blocks computed
                         "bytes_sent": sent, "bytes_received": sent,
                         "bytes_kv_rotation": self._rotation_bytes(tensors, token, runs, rank, causal)}
        return align(out, (*plan.outer, plan.i, plan.e), program.outputs[0].axes).contiguous()

    def _sizes(self, whole: dict, m: int) -> dict:
        """The call's dims and params with the token lengths of one piece."""
        return {**whole, self.program.extent[self.plan.i].name: m, self.program.extent[self.plan.j].name: m}

    def _kernel_scan(self, cp: "ContextParallel", causal: bool):
        """The generated kernel's launcher when it has the chunked scan that can start from the
        carried state (a causal call on the triton backend), else None (the pieces run in PyTorch)."""
        generated = cp.kernel.generated
        if not causal or cp.kernel.backend != "triton" or generated.source.chunked is None:
            return None
        return generated.launcher

    def _scanned(self, launcher, piece: dict, scalars: dict, whole: dict, m: int, carried: torch.Tensor):
        """A causal piece's output from the generated chunked scan, started from `carried`; its
        backward recomputes the piece in PyTorch (`_KernelScan`)."""
        plan, program = self.plan, self.program
        floats = [n for n, t in piece.items() if t.is_floating_point()]
        fixed = {n: t for n, t in piece.items() if n not in floats}
        outer = plan.outer
        # params whose defaults the dims compute take the whole sequence's values, not the piece's
        computed = {name: whole[name] for name, node in program.params.items() if name not in scalars
                    and node.default is not None and not isinstance(node.default, ir.Const)}

        def run(c, *ts):
            call = bind(program, {**dict(zip(floats, ts)), **fixed, **scalars, **computed})
            c = c.float()
            z = c[..., -1] if plan.row_sum else None
            o = launcher.chunked_from(call, c[..., :-1] if plan.row_sum else c, z)
            return align(o, program.outputs[0].axes, (*outer, plan.i, plan.e))

        def recompute(c, *ts):
            fq, fk, v, lam = self._features({**dict(zip(floats, ts)), **fixed}, self._sizes(whole, m))
            return self._causal_piece(fq, fk, v, lam, c)

        return _KernelScan.apply(run, recompute, carried, *(piece[n] for n in floats))

    def _finish(self, both: torch.Tensor) -> torch.Tensor:
        """The output from the numerator and (normalised) the denominator in its last column."""
        return both[..., :-1] / both[..., -1:] if self.plan.row_sum else both

    def _state(self, fk, v, lam) -> torch.Tensor:
        """The state of a run of keys, each decayed to the run's last position (`lam` None: no
        decay): `[..., D, E]`, with the key sum `z` as a last column when normalised."""
        m = fk.shape[-2]
        keys = fk * _power(lam, (m - 1 - torch.arange(m, device=fk.device))[:, None])
        state = keys.transpose(-1, -2) @ v
        return torch.cat([state, keys.sum(-2)[..., None]], -1) if self.plan.row_sum else state

    def _causal_piece(self, fq, fk, v, lam, carried) -> torch.Tensor:
        """One piece's causal output in PyTorch, a scan over chunks of `chunk` tokens from the
        carried state (linear in the piece's length): each chunk's own causal block (decays are
        translation-invariant, so local positions do) plus the state of everything before it."""
        outs, state = [], carried
        for c0 in range(0, fq.shape[-2], self.chunk):
            fq_c, fk_c, v_c = (t[..., c0:c0 + self.chunk, :] for t in (fq, fk, v))
            n = fq_c.shape[-2]
            pos = torch.arange(n, device=fq.device)
            gap = pos[:, None] - pos[None, :]
            w = fq_c @ fk_c.transpose(-1, -2)
            w = torch.where(gap >= 0, w * _power(lam, gap.clamp(min=0)), torch.zeros_like(w))
            own = torch.cat([w @ v_c, w.sum(-1, keepdim=True)], -1) if self.plan.row_sum else w @ v_c
            outs.append(own + (fq_c * _power(lam, (pos + 1)[:, None])) @ state)
            state = state * _power(lam, n) + self._state(fk_c, v_c, lam)
        return self._finish(torch.cat(outs, -2)) if outs else self._finish(fq @ carried)

    def _rotation_bytes(self, tensors: dict, token: dict, runs: list, rank: int, causal: bool) -> int:
        """What K/V rotation would send from this rank: each of its key pieces to every other rank
        holding a query the piece's keys reach (a later position, when causal)."""
        names = (self.term.k.input.name, self.plan.v.input.name)
        per_token = sum(tensors[x].numel() // max(tensors[x].shape[token[x]], 1) * tensors[x].element_size()
                        for x in names)
        total = 0
        for s in range(len(runs)):
            if s == rank:
                continue
            last = max((a + m - 1 for a, m in runs[s] if m), default=-1)  # the peer's latest query
            total += sum(m for c, m in runs[rank] if m and (not causal or c <= last)) * per_token
        return total


def _power(lam: torch.Tensor | None, exponent):
    """lam ** exponent (1 without a decay)."""
    if lam is None:
        return 1.0
    return lam ** (exponent.to(lam.dtype) if torch.is_tensor(exponent) else float(exponent))


class _KernelScan(torch.autograd.Function):
    """A causal piece's output from the generated chunked scan started from the carried state;
    backward: autograd through the piece's PyTorch formulation, recomputed (the chunked
    backward kernels take no initial state)."""

    @staticmethod
    def forward(ctx, run, recompute, carried, *inputs):
        ctx.recompute = recompute
        ctx.save_for_backward(carried, *inputs)
        return run(carried, *inputs)

    @staticmethod
    def backward(ctx, grad):
        saved = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        wanted = [t for t in saved if t.requires_grad]
        with torch.enable_grad():
            out = ctx.recompute(*saved)
        found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *(next(found) if t.requires_grad else None for t in saved))


class _GatherStates(torch.autograd.Function):
    """Every rank's state; backward: the sum over ranks of the gradients of this rank's state
    (an all-reduce of the stacked gradients: states are small, and gloo has no reduce-scatter;
    torch.distributed.nn's all_gather backward fails on subgroups)."""

    @staticmethod
    def forward(ctx, group, state):
        ctx.group = group
        parts = [torch.empty_like(state) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, state, group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads).contiguous()
        dist.all_reduce(stacked, group=ctx.group)
        return None, stacked[dist.get_rank(ctx.group)]


class _SumGradients(torch.autograd.Function):
    """The identity; backward: the gradient summed over the ranks (for a replicated input)."""

    @staticmethod
    def forward(ctx, group, t):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad
