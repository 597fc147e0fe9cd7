"""The reference executor: runs any checked IR with PyTorch, in bounded memory.

It is the oracle every generated kernel is tested against, and the explicit CPU
backend (`backend="reference"`). Memory stays bounded by streaming one index, the
*chunk index* (usually the query index `i`): every value over that index is
computed one block of it at a time, so a score tensor never exists beyond
`B*H*block*M` entries. Values that combine entries along the chunk index
(sums, maxima, block means, the statistics of a softmax over queries) are
accumulated across blocks, the way a streaming kernel would.
"""
from __future__ import annotations

import functools
import math
import string
from dataclasses import dataclass

import sympy
import torch

from . import ir
from .errors import SpecError
from attncc.passes.infer import to_sympy
from attncc.passes.read_guards import checked_reads

_EINSUM_LETTERS = string.ascii_letters


@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int


_MAP_OPS = {
    "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.true_divide,
    "//": torch.floor_divide, "%": torch.remainder, "**": torch.pow,
    "==": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge,
    "and": torch.logical_and, "or": torch.logical_or, "not": torch.logical_not, "neg": torch.neg,
    "exp": torch.exp, "log": torch.log, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "elu": torch.nn.functional.elu, "relu": torch.relu, "abs": torch.abs, "sqrt": torch.sqrt,
    "sin": torch.sin, "cos": torch.cos, "floor": torch.floor, "ceil": torch.ceil, "log1p": torch.log1p,
    "expm1": torch.expm1, "rsqrt": torch.rsqrt, "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu, "sign": torch.sign, "min": torch.minimum, "max": torch.maximum,
    "atan2": torch.atan2, "where": torch.where,
    "clamp": lambda x, lo, hi: torch.clamp(x, lo, hi),
}


def align(t: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...]) -> torch.Tensor:
    """View `t` (dims named `have`) with dims ordered as `want`, size 1 where absent."""
    order = [have.index(ix) for ix in want if ix in have]
    t = t.permute(order) if order != list(range(len(order))) else t
    shape, k = [], 0
    for ix in want:
        if ix in have:
            shape.append(t.shape[k])
            k += 1
        else:
            shape.append(1)
    return t.reshape(shape)


class Reference:
    """Evaluates one program for one set of arguments."""

    def __init__(self, program: ir.Program, tensors: dict[str, torch.Tensor], scalars: dict,
                 block: int = 256):
        self.p = program
        self.tensors = tensors
        self.scalars = scalars
        floats = [t for t in tensors.values() if t.is_floating_point()]
        self.fdtype = torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32
        self.device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        self.size = program.sizes(scalars)
        self.chunk_index = self.pick_chunk_index()
        self.block = max(1, block)
        self.shared: dict[ir.Node, torch.Tensor] = {}
        self.local: dict[ir.Node, torch.Tensor] = {}
        self.chunk: Chunk | None = None
        # (read, argument) pairs that may leave the tensor where masks exclude the point: read as 0 there
        self.guarded = {(r.access, r.dim) for r in checked_reads(program) if r.guards}

    # ------------------------------------------------------------------ planning
    def pick_chunk_index(self) -> str | None:
        """Stream the index that shrinks the largest intermediate most, preferring
        an index of the first output (the query axis in attention)."""
        nodes = [n for n in self.p.nodes() if n.indices]
        if not nodes:
            return None
        biggest = max(nodes, key=lambda n: math.prod(self.size[ix] for ix in n.indices))
        first_out = self.p.outputs[0].axes
        return max(biggest.indices, key=lambda ix: (self.size[ix] > 1, ix in first_out, self.size[ix]))

    def chunks(self):
        n = self.size[self.chunk_index]
        return [Chunk(s, min(s + self.block, n)) for s in range(0, n, self.block)]

    # ------------------------------------------------------------------ driver
    def run(self, extra_outputs=()) -> list[torch.Tensor]:
        from .read_check import check_reads  # it evaluates index expressions with this executor

        check_reads(self.p, self.scalars, self.tensors)
        results = []
        for out in [*self.p.outputs, *extra_outputs]:
            value = align(self.full(out.node), out.node.indices, out.axes)
            results.append(value)
        return results

    def full(self, node: ir.Node) -> torch.Tensor:
        """A node's whole value (concatenating chunks along the chunk index)."""
        c = self.chunk_index
        if c not in node.indices:
            return self.value(node)
        saved = (self.chunk, self.local)
        parts = []
        for chunk in self.chunks():
            self.chunk, self.local = chunk, {}
            parts.append(self.value(node))
        self.chunk, self.local = saved
        return torch.cat(parts, dim=node.indices.index(c))

    def memo(self, node: ir.Node) -> dict:
        return self.local if self.chunk_index in node.indices else self.shared

    def whole(self, node: ir.Node) -> torch.Tensor:
        """`full(node)`, kept once built: a gathering or transposing read of a streamed tensor
        needs all of it in every stream block, and rebuilding it per block would make a chain
        of such reads (`s[i,j] = s[j,i]`, again and again) cost blocks ** length."""
        key = ("whole", node)
        if key not in self.shared:
            self.shared[key] = self.full(node)
        return self.shared[key]

    def value(self, node: ir.Node) -> torch.Tensor:
        memo = self.memo(node)
        if node not in memo:
            self.prefetch(node)
            memo[node] = getattr(self, "eval_" + type(node).__name__.lower())(node)
        return memo[node]

    def prefetch(self, root: ir.Node):
        """Evaluate, deepest first and with an explicit stack, the operands that `root`'s
        evaluation reads in the current stream block: a chain of a thousand `s += ...`
        updates is a chain of a thousand nodes, which plain recursion cannot walk."""
        stack, entered = [root], set()
        while stack:
            node = stack[-1]
            if node not in entered:
                entered.add(node)
                stack.extend(op for op in self.same_block_operands(node)
                             if op not in self.memo(op) and op not in entered)
                continue
            stack.pop()
            if node is not root and node not in self.memo(node):
                self.memo(node)[node] = getattr(self, "eval_" + type(node).__name__.lower())(node)

    def same_block_operands(self, node: ir.Node) -> tuple[ir.Node, ...]:
        """The operands a node's evaluation reads through `value` in the current stream
        block (not those it streams over, rebuilds whole, or reads in another block)."""
        preds = tuple(m.pred for m in self.p.masks_on(node))
        if isinstance(node, ir.Map):
            return node.args
        if isinstance(node, ir.Access):
            array = node.array
            whole = not isinstance(array, ir.Input) and self.chunk_index in array.indices \
                and (not self.reads_in_place(node) or self.fixes_chunk_index(node))
            return node.args if whole else (array, *node.args)
        if isinstance(node, ir.Contract):
            return () if self.streams(node, node.summed) else (*node.factors, *preds)
        if isinstance(node, ir.Reduce):
            return () if node.block is not None or self.streams(node, node.axes) else (node.arg, *preds)
        if isinstance(node, ir.Normalize):
            sets = node.key_sets()
            if any(axis == self.chunk_index for _, axis in sets):
                return ()
            return (*node.operands(), *(m.pred for x, axis in sets for m in self.p.set_masks(x, axis)))
        if isinstance(node, ir.Select):
            return () if node.axis == self.chunk_index else (*node.operands(), *preds)
        return ()

    def over_chunks(self, node: ir.Node, combine):
        """Fold `combine(acc, chunk)` over every chunk of the chunk index, with a fresh
        per-chunk memo each time (so nested streams do not keep each other's blocks)."""
        saved = (self.chunk, self.local)
        acc = None
        for chunk in self.chunks():
            self.chunk, self.local = chunk, {}
            acc = combine(acc, chunk)
        self.chunk, self.local = saved
        return acc

    def streams(self, node: ir.Node, axes) -> bool:
        """Whether `node` combines entries along the chunk index while not being over it."""
        return self.chunk_index in axes and self.chunk_index not in node.indices

    # ------------------------------------------------------------------ leaves
    def const(self, value, dtype):
        tdtype = {ir.FLOAT: self.fdtype, ir.INT: torch.int64, ir.BOOL: torch.bool}[dtype]
        return torch.tensor(value, dtype=tdtype, device=self.device)

    def eval_scalar(self, node: ir.Scalar):
        return self.const(self.scalars[node.name], node.dtype)

    def eval_const(self, node: ir.Const):
        return self.const(node.value, node.dtype)

    def eval_index(self, node: ir.Index):
        if node.name == self.chunk_index:
            return torch.arange(self.chunk.start, self.chunk.stop, device=self.device)
        return torch.arange(self.size[node.name], device=self.device)

    def eval_input(self, node: ir.Input):
        t = self.tensors[node.name]
        return t.to(self.fdtype) if t.is_floating_point() else t

    def eval_access(self, node: ir.Access):
        if isinstance(node.array, ir.Input):
            array = self.value(node.array)
        elif self.reads_in_place(node) and not self.fixes_chunk_index(node):
            return self.constant_slice(node)
        else:
            array = align(self.whole(node.array), node.array.indices, node.axes)
        if not node.args:
            return array.reshape(())
        args = [align(self.value(a), a.indices, node.indices) for a in node.args]
        inside = None  # where the guarded arguments are in range (checked by `read_check` per call)
        for k, a in enumerate(args):
            if (node, k) in self.guarded:
                ok = (a >= 0) & (a < array.shape[k])
                inside = ok if inside is None else inside & ok
                args[k] = a.clamp(0, array.shape[k] - 1)
            elif a.numel() and (int(a.min()) < 0 or int(a.max()) >= array.shape[k]):
                bad = int(a.min()) if int(a.min()) < 0 else int(a.max())
                where = SpecError(f"index {bad} is out of range for dim {k} (size {array.shape[k]}) of this read",
                                  self.p.source, node.loc, "indices inside the tensor (clamp them, or "
                                  "let a where() pick another value)")
                raise IndexError(where.render())
        if inside is None:
            return array[tuple(args)]
        return torch.where(inside, array[tuple(args)], torch.zeros((), dtype=array.dtype, device=array.device))

    @staticmethod
    def reads_in_place(node: ir.Access) -> bool:
        """`l[b,i,j,0]`: every argument is the axis's own index or a constant, so the
        tensor can be read in the current stream block instead of rebuilt whole."""
        return all((isinstance(a, ir.Index) and a.name == ax) or isinstance(a, ir.Const)
                   for a, ax in zip(node.args, node.axes))

    def fixes_chunk_index(self, node: ir.Access) -> bool:
        """Whether the read takes one entry along the streamed index (`p[b,h,i,0]` while `j`
        streams): outside that index's blocks, so the tensor is built whole first."""
        return any(ax == self.chunk_index and isinstance(a, ir.Const) for a, ax in zip(node.args, node.axes))

    def constant_slice(self, node: ir.Access):
        t = align(self.value(node.array), node.array.indices, node.axes)
        index = tuple(a.value if isinstance(a, ir.Const) else slice(None) for a in node.args)
        kept = tuple(ax for a, ax in zip(node.args, node.axes) if not isinstance(a, ir.Const))
        return align(t[index], kept, node.indices)  # a read may permute the axes (`x[c,a]` of `x[a,c]`)

    # ------------------------------------------------------------------ elementwise
    def eval_map(self, node: ir.Map):
        args = [self.cast(align(self.value(a), a.indices, node.indices), a.dtype, node) for a in node.args]
        if node.op == "where":
            args[0] = args[0].to(torch.bool)
        return _MAP_OPS[node.op](*args)

    def cast(self, t, dtype, node):
        """Promote operands as the spec's type rules say (ints meet floats as floats)."""
        if node.dtype == ir.FLOAT and dtype != ir.FLOAT and node.op not in ("where",):
            return t.to(self.fdtype)
        if node.op == "where" and node.dtype == ir.FLOAT and dtype != ir.BOOL:
            return t.to(self.fdtype)
        return t

    # ------------------------------------------------------------------ masks
    def valid(self, node: ir.Node, space: tuple[str, ...]) -> torch.Tensor | None:
        """The conjunction of the masks `node` applies, laid out over `space`."""
        result = None
        for m in self.p.masks_on(node):
            v = align(self.value(m.pred), m.pred.indices, space).to(torch.bool)
            result = v if result is None else result & v
        return result

    # ------------------------------------------------------------------ contractions and reductions
    def eval_contract(self, node: ir.Contract):
        if self.streams(node, node.summed):
            return self.over_chunks(node, lambda acc, _: self.contract_once(node) if acc is None
                                    else acc + self.contract_once(node))
        return self.contract_once(node)

    def contract_once(self, node: ir.Contract):
        """One einsum over the factors. Masks and boolean factors (`(cond) * y` in a sum)
        select rather than multiply: where they are false the product is 0, even where
        another factor is infinite or nan. When the factors that stay multiplied hold no such
        value this is an einsum with one factor zeroed (or a 0/1 factor); otherwise the
        product is formed and selected entry by entry."""
        space = ir.union_indices(node.factors)
        terms, gates = [], []
        for f in node.factors:
            gate = f.dtype == ir.BOOL and node.dtype != ir.BOOL
            (gates if gate else terms).append((self.value(f), f.indices))
        valid = self.valid(node, space)
        gated = {ix for m in self.p.masks_on(node) for ix in m.pred.indices}
        for g, ixs in gates:
            g = align(g, ixs, space)
            valid = g if valid is None else valid & g
            gated |= set(ixs)
        if valid is not None:
            cover = next((k for k, (_, ixs) in enumerate(terms) if gated <= set(ixs)), None)
            others = [t for k, (t, _) in enumerate(terms) if k != cover]
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in others):
                return self.contract_selected(node, space, terms, valid)
            if cover is None:
                terms.append((valid, space))
            else:  # absent entries are zeroed, not multiplied by 0 (an inf there would give nan)
                t, ixs = terms[cover]
                kept = tuple(ix for ix in space if ix in ixs)  # other axes of `valid` are broadcast (size 1)
                keep = align(valid.reshape([valid.shape[space.index(ix)] for ix in kept]), kept, ixs)
                terms[cover] = (torch.where(keep, t, torch.zeros((), dtype=t.dtype)), ixs)
        if node.dtype != ir.FLOAT:  # integer einsum is not supported everywhere: multiply and sum
            prod = math.prod(align(t, ixs, space) for t, ixs in terms)
            dims = [space.index(ix) for ix in space if ix not in node.indices]
            summed = prod.sum(dim=dims) if dims else prod
            return align(summed, tuple(ix for ix in space if ix in node.indices), node.indices)
        letters = {ix: _EINSUM_LETTERS[k] for k, ix in enumerate(space)}
        operands, specs = [], []
        for t, ixs in terms:
            if t is valid:  # drop the broadcast (size-1) axes of the mask for einsum
                ixs = tuple(ix for ix, n in zip(space, t.shape) if n != 1 or self.size[ix] == 1)
                t = t.reshape([self.size_in_chunk(ix) for ix in ixs])
            operands.append(t.to(self.fdtype))
            specs.append("".join(letters[ix] for ix in ixs))
        out = "".join(letters[ix] for ix in node.indices)
        return torch.einsum(",".join(specs) + "->" + out, *operands)

    def contract_selected(self, node: ir.Contract, space, terms, valid):
        """The product over the whole space, 0 where `valid` is false, summed: exact for
        infinite and nan factors, at the memory cost of the whole space (only used then)."""
        prod = math.prod(align(t, ixs, space).to(self.fdtype) for t, ixs in terms)
        prod = torch.where(valid, prod, torch.zeros((), dtype=self.fdtype))
        dims = [k for k, ix in enumerate(space) if ix not in node.indices]
        summed = prod.sum(dim=dims) if dims else prod
        return align(summed, tuple(ix for ix in space if ix in node.indices), node.indices)

    def size_in_chunk(self, ix: str) -> int:
        if ix == self.chunk_index and self.chunk is not None:
            return self.chunk.stop - self.chunk.start
        return self.size[ix]

    def eval_reduce(self, node: ir.Reduce):
        if node.block is not None:
            return self.blocked(node)
        if self.streams(node, node.axes):
            parts = self.over_chunks(node, lambda acc, _: self.reduce_parts(node) if acc is None
                                     else self.combine(node.op, acc, self.reduce_parts(node)))
        else:
            parts = self.reduce_parts(node)
        value = self.finish(node.op, parts)
        return value.to(torch.bool) if node.dtype == ir.BOOL else value

    def reduce_parts(self, node: ir.Reduce):
        """Partial results of a reduction on the current chunk: (value, count)."""
        x = self.value(node.arg)
        if node.op in ("mean", "sum", "logsumexp") and x.dtype != self.fdtype and node.dtype == ir.FLOAT:
            x = x.to(self.fdtype)
        valid = self.valid(node, node.arg.indices)
        dims = [node.arg.indices.index(ix) for ix in node.axes]
        fill = {"sum": 0, "mean": 0, "amax": -math.inf, "amin": math.inf, "logsumexp": -math.inf}[node.op]
        if not x.is_floating_point():  # an int reduction stays int: its extremes stand for -inf / inf
            x = x.to(torch.int64)
            fill = {-math.inf: torch.iinfo(torch.int64).min, math.inf: torch.iinfo(torch.int64).max}.get(fill, fill)
        if valid is not None:
            x = torch.where(valid, x, torch.tensor(fill, dtype=x.dtype, device=x.device))
            count = valid.expand(x.shape).sum(dim=dims)
        else:
            count = torch.tensor(math.prod(x.shape[d] for d in dims))
        if x.numel() == 0 and node.op in ("amax", "amin"):  # an empty axis (C = 0): nothing, like all masked
            x = torch.full([n if d not in dims else 1 for d, n in enumerate(x.shape)], fill, dtype=x.dtype,
                           device=x.device)
        if node.op in ("sum", "mean"):
            value = x.sum(dim=dims)
        elif node.op == "amax":
            value = x.amax(dim=dims)
        elif node.op == "amin":
            value = x.amin(dim=dims)
        else:
            value = torch.logsumexp(x, dim=dims)
        # the result's dims in the reduction's own index order, which need not be its operand's
        kept = tuple(ix for ix in node.arg.indices if ix not in node.axes)
        if kept != node.indices:
            value = align(value, kept, node.indices)
            count = align(count, kept, node.indices) if count.dim() else count
        return value, count

    @staticmethod
    def combine(op, a, b):
        (va, ca), (vb, cb) = a, b
        merged = {"sum": torch.add, "mean": torch.add, "amax": torch.maximum, "amin": torch.minimum,
                  "logsumexp": torch.logaddexp}[op](va, vb)
        return merged, ca + cb

    @staticmethod
    def finish(op, parts):
        value, count = parts
        if op == "mean":
            return torch.where(count > 0, value / count.clamp(min=1), torch.zeros_like(value))
        return value

    def blocked(self, node: ir.Reduce):
        """Reduce within consecutive blocks (the last may be short), accumulating by
        block number so stream chunks need not align with blocks. `logsumexp` keeps a
        running maximum and a rescaled sum of exponentials per block, as a streaming
        softmax does."""
        b = node.block
        if self.p.masks_on(node):
            raise NotImplementedError(f"a mask over '{b.index}' inside a block reduction (line "
                                      f"{node.loc.line if node.loc else '?'}) is not supported yet")
        size = int(self.value(b.size))
        nblocks = self.size[b.name]
        out_shape = [nblocks if ix == b.name else self.size_in_chunk(ix) for ix in node.indices]
        dtype = self.fdtype if node.dtype == ir.FLOAT else torch.int64
        dim = node.indices.index(b.name)
        op = node.op
        if op in ("amax", "logsumexp"):
            low = -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min
            acc = torch.full(out_shape, low, dtype=dtype, device=self.device)
        elif op == "amin":
            high = math.inf if dtype.is_floating_point else torch.iinfo(dtype).max
            acc = torch.full(out_shape, high, dtype=dtype, device=self.device)
        else:
            acc = torch.zeros(out_shape, dtype=dtype, device=self.device)
        total = torch.zeros(out_shape, dtype=dtype, device=self.device)  # logsumexp: sum of exp(x - shift)
        count = torch.zeros(nblocks, dtype=self.fdtype, device=self.device)
        shape = [1] * len(out_shape)
        shape[dim] = -1

        def shift_of(m):
            return torch.where(torch.isfinite(m), m, 0)

        def add(_acc, _chunk):
            nonlocal acc, total
            x = align(self.value(node.arg), node.arg.indices,
                      tuple(b.index if ix == b.name else ix for ix in node.indices)).to(dtype)
            pos = self.eval_index(ir.Index(name=b.index, indices=(b.index,)))
            ids = torch.div(pos, size, rounding_mode="floor")
            spread = ids.reshape(shape).expand(x.shape)
            if op in ("sum", "mean"):
                acc.index_add_(dim, ids, x)
            elif op in ("amax", "amin"):
                acc.scatter_reduce_(dim, spread, x, op)
            else:
                new = acc.scatter_reduce(dim, spread, x, "amax")  # nan propagates
                old_shift, new_shift = shift_of(acc), shift_of(new)
                # rescale the sums so far (none where the maximum was -inf: they are 0, and
                # exp(0 - new_shift) could overflow)
                total = torch.where(torch.isfinite(acc), total * torch.exp(old_shift - new_shift), 0)
                total.scatter_add_(dim, spread, torch.exp(x - new_shift.gather(dim, spread)))
                acc = new
            count.index_add_(0, ids, torch.ones_like(ids, dtype=self.fdtype))
            return None

        if b.index == self.chunk_index:
            self.over_chunks(node, add)
        else:
            add(None, None)
        if op == "mean":
            acc = acc / count.clamp(min=1).reshape(shape)
        elif op == "logsumexp":  # a max of -inf, +inf or nan is the block's result as it is
            acc = torch.where(torch.isfinite(acc), torch.log(total) + shift_of(acc), acc)
        return acc.to(torch.bool) if node.dtype == ir.BOOL else acc

    # ------------------------------------------------------------------ normalisations and selections
    def eval_normalize(self, node: ir.Normalize):
        """exp(x - L), L the log-sum-exp of the denominator: this node's key set, the other
        sets of a joint softmax (each under its own masks) and the sink or softmax1's zero."""
        x = self.masked(node.arg, self.p.masks_on(node))
        lse = self.set_lse(node, node.arg, node.axis)
        for arg, axis in node.joint:
            lse = torch.logaddexp(lse, align(self.set_lse(node, arg, axis), arg.indices, node.arg.indices))
        if node.op == "softmax1":
            lse = torch.logaddexp(lse, torch.zeros((), dtype=self.fdtype))
        if node.sink is not None:  # one more virtual entry with this logit
            lse = torch.logaddexp(lse, align(self.value(node.sink), node.sink.indices, node.arg.indices)
                                  .to(self.fdtype))
        return self.normalized(x, lse)

    def masked(self, arg: ir.Node, masks) -> torch.Tensor:
        """A key set's scores, -inf where its masks remove an entry."""
        x = self.value(arg).to(self.fdtype)
        for m in masks:
            x = torch.where(align(self.value(m.pred), m.pred.indices, arg.indices).to(torch.bool), x,
                            torch.tensor(-math.inf, dtype=self.fdtype))
        return x

    def set_lse(self, node: ir.Normalize, arg: ir.Node, axis: str) -> torch.Tensor:
        """The log-sum-exp of one key set along its axis (kept, size 1) under its masks; over
        the stream chunks when the axis is the chunk index (once per set, then shared)."""
        masks = self.p.set_masks(arg, axis)
        dim = arg.indices.index(axis)
        if axis != self.chunk_index:
            return torch.logsumexp(self.masked(arg, masks), dim=dim, keepdim=True)
        key = ("lse", arg, axis)
        if key not in self.shared:
            self.shared[key] = self.over_chunks(node, lambda acc, _: self.chunk_lse(arg, masks, dim, acc))
        return self.shared[key]

    def chunk_lse(self, arg, masks, dim, acc):
        part = torch.logsumexp(self.masked(arg, masks), dim=dim, keepdim=True)
        return part if acc is None else torch.logaddexp(acc, part)

    @staticmethod
    def normalized(x, lse):
        """exp(x - lse), with torch.softmax's treatment of non-finite slices: a slice holding
        a nan or a +inf is all nan (as eager torch gives), and only a slice with nothing
        allowed (lse = -inf: every entry masked or -inf) gives 0 instead of nan."""
        empty = lse == -math.inf
        out = torch.exp(x - torch.where(empty, 0, lse))
        return torch.where(torch.isnan(lse) | (lse == math.inf), math.nan, torch.where(empty, 0, out))

    def eval_select(self, node: ir.Select):
        if node.axis == self.chunk_index:  # needs the whole axis: select once, then slice
            key = ("select", node)
            if key not in self.shared:  # evaluate the whole axis without streaming
                saved = self.chunk_index
                self.chunk_index = None
                try:
                    self.shared[key] = self.select_once(node)
                finally:
                    self.chunk_index = saved
            dim = node.indices.index(node.axis)
            return self.shared[key].narrow(dim, self.chunk.start, self.chunk.stop - self.chunk.start)
        return self.select_once(node)

    def select_once(self, node: ir.Select):
        x = self.value(node.arg).to(self.fdtype)
        valid = self.valid(node, node.arg.indices)
        allowed = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.expand(x.shape)
        dim = node.arg.indices.index(node.axis)
        ranked = torch.where(allowed, x, torch.tensor(-math.inf, dtype=self.fdtype))
        order = torch.sort(ranked, dim=dim, descending=True, stable=True).indices  # ties: lower index first
        positions = torch.arange(x.shape[dim], device=self.device).reshape(
            [-1 if d == dim else 1 for d in range(x.dim())]).expand(x.shape).contiguous()
        rank = torch.empty_like(order).scatter_(dim, order, positions)
        amount = self.value(node.amount)
        if node.op in ("topk", "topk_mask"):
            chosen = (rank < int(amount)) & (ranked != -math.inf)  # nan ranks first, as in torch.topk
        else:  # topp_mask: the fewest largest entries whose sum reaches `amount`
            sorted_x = torch.gather(torch.where(allowed, x, 0), dim, order)
            before = torch.cumsum(sorted_x, dim=dim) - sorted_x
            chosen = torch.gather(before < amount, dim, rank) & allowed
        return torch.where(chosen, x, 0) if node.op == "topk" else chosen


def evaluate_scalar(node: ir.Node, scalars: dict):
    """The value of a scalar expression (a param default, a require, a host-side kernel
    argument) given dims and params. Each expression is turned into a Python function once:
    this runs on every call of a kernel, where sympy substitution would cost ~0.1 ms."""
    fn, names = _scalar_function(node)
    args = [scalars[n] for n in names]
    try:
        value = fn(*args)
    except OverflowError:  # math.exp(1000): exact arithmetic instead, saturated to inf below as torch does
        expr = to_sympy(node)
        value = expr.xreplace({s: sympy.sympify(scalars[s.name]) for s in expr.free_symbols}).evalf()
    if node.dtype == ir.BOOL or isinstance(value, bool):
        return bool(value)
    if node.dtype == ir.INT:
        return int(value)
    try:
        return float(value)
    except OverflowError:  # a float beyond the double range (3 ** 1000 computed exactly) is infinite
        return math.inf if value > 0 else -math.inf


@functools.lru_cache(maxsize=None)
def _scalar_function(node: ir.Node):
    expr = to_sympy(node)
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    return sympy.lambdify(symbols, expr, modules="math"), tuple(s.name for s in symbols)
