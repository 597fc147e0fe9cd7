"""Triton text of the general plan's backward (passes/stream_backward.py): two kernels per pass.

Both recompute the pass's tiles exactly as its forward does (the same tile emitter, tile dots,
masks and ranges) with the stored statistics read back, and build each accumulator's per-tile
cotangent and the derivatives of its expression:

    rows kernel    one program per row tile, streaming the forward's range:
                   dA_row += dS @ B (tile-dot operands along the rows), small reads over rows += sum_t
    stream kernel  one program per streamed tile, walking the rows the transposed masks allow:
                   dB += dS^T @ A_row, dV += W^T @ dAcc (a DOT's values), reads over the stream += sum_r

with `dS = sum_k where(allowed_k, c_k * d arg_k / d S, 0)` and `c_k` a SUM's `dAcc[r]`, a DOT's
`dAcc[r, :] . v[t, :]` (one `tl.dot`) or an LSE's `g[r] * exp(x - L[r])`. Every gradient is a
partial laid out [grid..., tile(, feature)] that the launcher sums and chains to the inputs.
The tile layout is the forward's ([rows, streamed]); only which side a program holds changes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from attncc import ir
from attncc.codegen import names
from attncc.codegen.pytext import comment, docstring
from attncc.codegen.row_stream import _indent, scalar_args, tensor_args
from attncc.codegen.stream_kernel import PassCodegen
from attncc.codegen.tile_expr import Val
from attncc.passes.row_stream import Operand
from attncc.passes.stream_backward import PassBackward, Side, StreamBackwardPlan
from attncc.passes.streams import Reduction, _finite, _map

_NEG_INF = "float('-inf')"


@dataclass
class BackwardKernel:
    """One backward kernel and what its launcher passes it."""

    kernel: str
    side: Side
    tensor_inputs: list    # input names (synthetic ones: stored statistics, their gradients) passed as pointers
    scalar_args: list
    host_scalars: dict
    partials: list         # ReadGrad whose partial this kernel writes, in argument order
    features: dict         # constexpr name -> the index whose extent it pads
    extents: dict          # scalar argument -> the index whose size it is


@dataclass
class StreamBackwardSource:
    name: str
    source: str
    kernels: list          # per PassBackward (in run order): (rows kernel, stream kernel)


def grad_input(k: int, stored: ir.Input) -> ir.Input:
    """The synthetic input holding accumulator k's gradient (an LSE's: its total `g`), laid
    out as its stored value."""
    return ir.Input(name=grad_name(k), dtype=ir.FLOAT, loc=stored.loc, dims=stored.dims)


def grad_name(k: int) -> str:
    return f"<dacc{k}>"


class BackwardCodegen(PassCodegen):
    """One backward kernel of one pass: `side` says which tile its programs hold."""

    def __init__(self, bplan: StreamBackwardPlan, pb: PassBackward, side: Side, name: str):
        super().__init__(bplan.plan, pb.seg, name)
        self.pb, self.side = pb, side
        self.number = {node: k for k, node in enumerate(bplan.plan.results)}  # accumulator k: `<acck>`
        self.p = pb.seg  # (the pass whose rows and grid the codegen reads: the segment, with the pass's row)
        self.em.materialized = {**bplan.plan.precomputed.inputs, **bplan.plan.results}
        if side is Side.STREAM:  # per program a streamed tile: what varies with the rows is the loop's
            self.em.key_axis = "m"
        self.streamed = "n" if side is Side.ROWS else "m"

    def mine(self, op_side: Side) -> bool:
        return op_side is self.side

    def tile_load(self, op: Operand, side: Side, feature: str, block: str) -> tuple[list[str], Val]:
        tile, code = ("m", "offs_m") if side is Side.ROWS else ("n", "offs_n")
        return self.operand_tile(op, tile, code, feature, block)

    def generate(self) -> tuple[str, BackwardKernel]:
        pb, em, seg = self.pb, self.em, self.pb.seg
        held, looped, contrib, init, stores = [], [], [], [], []
        partial = {id(r): f"pg{n}" for n, r in enumerate(pb.reads)}
        mine = [r for r in pb.reads if r.side is self.side]

        def place(side: Side) -> list:
            return held if side is self.side else looped

        # tile dots: both tiles, the dot, and the value its accumulators read
        dot_vals = {}
        for t, dot in enumerate(seg.dots):
            block = f"BLOCK_D{t}"
            self.features[block] = dot.d
            tiles = {}
            for tile_index, op in dot.sides.items():
                side = Side.ROWS if tile_index == pb.row else Side.STREAM
                lines, val = self.tile_load(op, side, dot.d, block)
                place(side).extend(lines)
                tiles[side] = val
            looped += _dot(f"s{t}", tiles[Side.ROWS].code, f"tl.trans({tiles[Side.STREAM].code})",
                           tiles[Side.ROWS].code)
            factors = [em.emit(f).code for f in dot.factors]
            product = " * ".join([f"s{t}", *factors])
            em.bind(dot.node, Val(f"({product})" if factors else product, frozenset("mn")))
            dot_vals[dot] = (tiles, " * ".join(factors) or None, block)
        # per accumulator: its allowed entries and per-tile cotangent
        cot, allowed, dacc_tiles, value_tiles = {}, {}, {}, {}
        for a in pb.accs:
            acc = a.acc
            k = self.number[acc.node]
            ok = "allowed"
            for pred in acc.masks:
                ok = f"({ok} & {em.emit(pred).code})"
            allowed[a] = ok
            dacc = grad_input(k, self.plan.results[acc.node])
            args = tuple(ir.Index(name=ix, indices=(ix,), dtype=ir.INT) for ix in acc.node.indices)
            if acc.kind is Reduction.DOT:
                block = f"BLOCK_E{k}"
                self.features[block] = acc.feature
                fpos = acc.node.indices.index(acc.feature)
                access = ir.Access(array=dacc, args=args, indices=acc.node.indices, dtype=ir.FLOAT)
                lines, dtile = self.tile_load(Operand(access, acc.node.indices.index(pb.row), fpos), Side.ROWS,
                                              acc.feature, block)
                place(Side.ROWS).extend(lines)
                lines, v = self.tile_load(acc.value, Side.STREAM, acc.feature, block)
                place(Side.STREAM).extend(lines)
                looped += [comment("dAcc . v per pair")] + _dot(f"c{k}", dtile.code, f"tl.trans({v.code})", v.code)
                cot[a] = f"c{k}"
                dacc_tiles[a], value_tiles[a] = dtile.code, v.code
            else:
                read = ir.Access(array=dacc, args=args, indices=acc.node.indices, dtype=ir.FLOAT, loc=acc.node.loc)
                if acc.kind is Reduction.LSE:  # its softmax's weights (its online sums': the same exp) times g
                    online = [o.weight for o in pb.online(acc) if o.weight is not None]
                    weight = online[0] if online else _map("exp", _map("-", acc.arg, _finite(acc.node)))
                    read = _map("*", read, weight)
                cot[a] = em.emit(read).code
        # the gradient of each tile dot's scores, and of each small read
        for t, dot in enumerate(seg.dots):
            terms = [f"tl.where({allowed[a]}, {cot[a]} * {em.emit(a.dots[dot]).code}, 0.0)"
                     for a in pb.accs if a.dots.get(dot) is not None]
            tiles, factors, block = dot_vals[dot]
            ds = " + ".join(terms) or "tl.zeros([BLOCK_M, BLOCK_N], tl.float32)"
            em.body.append(f"ds{t} = {ds}" + (f"  # d / d (the raw dot): times {factors}" if factors else ""))
            if factors:
                em.body.append(f"ds{t} = ds{t} * {factors}")
            for r in mine:
                if dot.sides.get(pb.row if self.side is Side.ROWS else seg.stream) is r.operand:
                    other = tiles[Side.STREAM if self.side is Side.ROWS else Side.ROWS].code
                    ds_code = f"ds{t}" if self.side is Side.ROWS else f"tl.trans(ds{t})"
                    contrib += _dot(partial[id(r)], ds_code, other, other, accumulate=True)
        for a in pb.accs:
            if a.acc.kind is not Reduction.DOT or self.side is not Side.STREAM:
                continue
            r = next(r for r in mine if r.operand is a.acc.value)
            w = f"tl.where({allowed[a]}, {em.emit(a.acc.arg).code}, 0.0)"
            contrib += [comment("the values' gradient")] + _dot(partial[id(r)], f"tl.trans({w})", dacc_tiles[a],
                                                                value_tiles[a], accumulate=True)
        for r in mine:
            if r.operand is not None:
                continue
            terms = [f"tl.where({allowed[a]}, {cot[a]} * {em.emit(a.reads[r]).code}, 0.0)"
                     for a in pb.accs if a.reads.get(r) is not None]
            if terms:
                axis = 1 if self.side is Side.ROWS else 0
                contrib.append(f"{partial[id(r)]} += tl.sum({' + '.join(terms)}, {axis})")
        # partials: zeros before the loop, stored after it
        offs, ok = ("offs_m", "row_ok") if self.side is Side.ROWS else ("offs_n", "col_ok")
        for n, r in enumerate(pb.reads):
            if r.side is not self.side:
                continue
            var, stride = partial[id(r)], f"pg{n}_s"
            parts = [f"{names.user('idx', ix)} * {stride}{a}" for a, ix in enumerate(pb.outer)]
            if r.operand is not None:
                block = self.block_of(r)
                init.append(f"{var} = tl.zeros([{'BLOCK_M' if self.side is Side.ROWS else 'BLOCK_N'}, {block}], "
                            "tl.float32)")
                fcols = f"tl.arange(0, {block})[None, :]"
                parts += [f"{offs}[:, None] * {stride}{len(pb.outer)}", f"{fcols} * {stride}{len(pb.outer) + 1}"]
                mask = f"{ok}[:, None] & ({fcols} < {self.extent_arg(r.feature)})"
            else:
                init.append(f"{var} = tl.zeros([{'BLOCK_M' if self.side is Side.ROWS else 'BLOCK_N'}], tl.float32)")
                parts.append(f"{offs} * {stride}{len(pb.outer)}")
                mask = ok
            stores.append(f"tl.store(pg{n}_ptr + {' + '.join(parts)}, {var}, mask={mask})")
        return self.assemble(held, looped, contrib, init, stores, mine, partial)

    def block_of(self, r) -> str:
        for t, dot in enumerate(self.pb.seg.dots):
            if any(op is r.operand for op in dot.sides.values()):
                return f"BLOCK_D{t}"
        k = next(self.number[a.acc.node] for a in self.pb.accs if a.acc.value is r.operand)
        return f"BLOCK_E{k}"

    def assemble(self, held, looped, contrib, init, stores, mine, partial):
        pb, em, seg = self.pb, self.em, self.pb.seg
        rows = self.side is Side.ROWS
        if rows:
            head = ["pid_m = tl.program_id(0)", "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
                    "row_ok = offs_m < n_rows"]
            loop = [*self.stream_range(seg), "for start_n in range(lo, hi, BLOCK_N):",
                    "    offs_n = start_n + tl.arange(0, BLOCK_N)",
                    "    allowed = row_ok[:, None] & (offs_n[None, :] < hi)"]
        else:
            head = ["pid_n = tl.program_id(0)", "offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
                    "col_ok = offs_n < n_cols"]
            self.n_cols = "n_rows"  # the range walks the rows
            ranges = self.stream_range(seg, (pb.stream_masks, pb.stream_symbols, {}), ("pid_n", "BLOCK_N", "n_cols"))
            self.n_cols = "n_cols"
            loop = [*ranges, "for start_m in range(lo, hi, BLOCK_M):",
                    "    offs_m = start_m + tl.arange(0, BLOCK_M)",
                    "    row_ok = offs_m < n_rows",
                    "    allowed = row_ok[:, None] & col_ok[None, :]"]
        parts = {id(r) for r in mine}
        res = [f"pg{n}_ptr" for n, r in enumerate(pb.reads) if id(r) in parts]
        res += [f"pg{n}_s{a}" for n, r in enumerate(pb.reads) if id(r) in parts
                for a in range(len(pb.outer) + 1 + (r.operand is not None))]
        tensors = list(em.tensors)
        scalars = scalar_args(self.plan.program, em.host_scalars)
        strides, dims = tensor_args(em.tensors)
        outer = [names.user("size", ix) for ix in pb.outer]
        sig = ([names.tensor("ptr", t) for t in tensors] + res + strides + dims + outer
               + ["n_rows", "n_cols", *self.extents] + scalars)
        constexprs = ["BLOCK_M", "BLOCK_N", *self.features, "PRECISION", "UPCAST_DOT"]
        decode = ["pid_o = tl.program_id(1).to(tl.int64)"]
        for ix in reversed(pb.outer):
            decode += [f"{names.user('idx', ix)} = pid_o % {names.user('size', ix)}",
                       f"pid_o = pid_o // {names.user('size', ix)}"]
        what = (f"backward of the pass over {seg.stream!r} (rows {pb.row!r}), one program per "
                f"{'row' if rows else 'streamed'} tile: the gradients indexed by "
                f"{pb.row if rows else seg.stream!r}.")
        body = [
            "@triton.jit",
            f"def {self.name}({', '.join(sig)}, {', '.join(c + ': tl.constexpr' for c in constexprs)}):",
            f"    {docstring(what)}",
            *_indent(decode), *_indent(head),
            *_indent(em.prologue), *_indent(held), *_indent(init),
            *_indent(loop), *_indent(looped, 2), *_indent(em.body, 2), *_indent(contrib, 2),
            *_indent(stores),
        ]
        src = BackwardKernel(self.name, self.side, tensors, scalars, dict(em.host_scalars),
                             [r for r in pb.reads if id(r) in parts], dict(self.features), dict(self.extents))
        return "\n".join(body), src


def _dot(out: str, x: str, y: str, like: str, accumulate: bool = False) -> list[str]:
    """`out = x @ y` (or `+=`) with both sides in the type of the operand tile `like` (bf16 on
    the tensor cores, as FlashAttention's backward casts dS and P), in fp32 where the
    interpreter cannot multiply bf16 (`UPCAST_DOT`); the result is fp32 either way."""
    op = "+=" if accumulate else "="
    return ["if UPCAST_DOT:",
            f"    {out} {op} tl.dot({x}.to(tl.float32), {y}.to(tl.float32), input_precision=PRECISION)",
            "else:",
            f"    {out} {op} tl.dot({x}.to({like}.dtype), {y}.to({like}.dtype), input_precision=PRECISION)"]


def generate_stream_backward(bplan: StreamBackwardPlan, name: str) -> StreamBackwardSource:
    """The module of a general plan's backward: two kernels per pass."""
    prefix = names.kernel(name)
    texts, kernels = [], []
    for n, pb in enumerate(bplan.passes):
        pair = []
        for side in (Side.ROWS, Side.STREAM):
            text, src = BackwardCodegen(bplan, pb, side, f"{prefix}_bwd{n}_{side.value}").generate()
            texts.append(text)
            pair.append(src)
        kernels.append(tuple(pair))
    doc = (f"Generated by attncc from {os.path.basename(bplan.plan.program.source.filename)}: do not edit; "
           "regenerate instead.\n\nThe backward of the general streaming plan: per pass, one kernel over its "
           "row tiles and one over its streamed tiles (passes/stream_backward.py).\n")
    header = [docstring(doc), "import triton", "import triton.language as tl", "", ""]
    return StreamBackwardSource(prefix, "\n".join(header) + "\n\n\n".join(texts) + "\n", kernels)
