"""Triton source of the generated backward of a row-streaming plan with one softmax.

(A softmax with a sink logit takes the same kernels: the stored LSE includes the sink, whose
value is 0, so P and delta need nothing more; the sink's gradient is taken by the launcher.
Pointwise weights take them too, with P the weight itself and `dS = dP * d weight / d QK`: no
LSE, no delta. A sum of terms runs one set per term: `passes/backward.py`. A statistics pass
(no values) takes them with `dP = 0` and no dV: delta is `-dLSE`, computed on the host. A plan
with a `row_weight` skips the query tiles where it is 0 on every row.)

Three kernels, all derived from the plan (`passes/backward.py` says which plans have them):

- `{name}_bwd_pre`: per query row, `delta = rowsum(dO * O) - dLSE` (fp32), and `rowsum(dO * O)`.
- `{name}_bwd_dkdv`: one program per key tile of one (batch, head). It loads its keys and
  values once, streams the query tiles holding an allowed pair (symbolic ranges of the mask
  analysed with keys as rows, or the forward's block map transposed; every tile without a
  mask), recomputes the scores exactly as the forward does
  (the same tile emitter, the same score modifications and mask predicates, with the query
  tile as the loop index), `P = exp2(S - LSE * log2(e))`, and accumulates `dV += P^T dO` and
  `dK += dS^T Q`, where `dS = P * (dO V^T - delta) * dscore/dQK * scale`.
- `{name}_bwd_dq`: one program per query tile, streaming the very key tiles the forward
  visits (its symbolic ranges or its runtime block map), accumulating `dQ += dS K`.

dK and dV are written per query head (a K/V head shared by a GQA group gets one partial per
query head, summed by the launcher: no atomics). Every tensor is fp32 in the kernels.

With `USE_TMA` (Hopper; the forward's rules, `RowStreamLauncher.use_tma`) q, k, v and dO are
loaded as TMA boxes of their [rows, features] views and dQ, dK, dV stored through descriptors
(zero-filled past the edges on load, clipped on store); otherwise by masked pointers.

Float tensors the score reads (`passes.backward.ReadGradient`) get `g = dS * d score / d read`
per tile entry, `dS = P * (dP - delta)` being the gradient of the score itself, accumulated by
`ReadMode`: row sums carried along the dQ kernel's key loop (one slot per query row), column
sums along the dK/dV kernel's query loop, the tile itself stored at its (query, key) slots, or,
for gathered reads, a scatter: `tl.atomic_add` at the read's positions, or with `DETERMINISTIC`
a per-program reduction over the distinct positions of each tile (a fixed order, no atomics)
into the program's own slots, summed by the launcher.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from attncc import ir
from attncc.codegen import names
from attncc.codegen.pytext import comment, docstring
from attncc.codegen.row_stream import (LOG2E, LinearSource, RowStreamCodegen, _free_names, _indent, scalar_args,
                                       tensor_args, tma_descriptor)
from attncc.codegen.tile_expr import Val
from attncc.passes.backward import BackwardPlan
from attncc.passes.kinds import MaskMode, ReadMode
from attncc.passes.linear import chunked_backward, linear_plan, reassociable
from attncc.passes.row_stream import map_outer


@dataclass
class BackwardKernel:
    """One backward kernel's name and the arguments the launcher passes besides its fixed ones."""

    name: str
    tensor_inputs: list[str]          # input names passed as pointers (with strides and sizes), in order
    scalar_args: list[str]            # dims, params, host scalars, then qk_scale and ds_scale
    host_scalars: dict
    reads: list = dataclasses.field(default_factory=list)  # numbers of the reads whose gradient it accumulates


@dataclass
class BackwardSource:
    name: str
    source: str
    dq: BackwardKernel | None         # None (and dkdv, pre): a plan whose backward is linear-time only
    dkdv: BackwardKernel | None
    pre: str | None                   # the delta kernel's name
    chunked: LinearSource | None = None  # the linear-time backward of a chunked plan (codegen/chunked.py)
    reassociated: LinearSource | None = None  # ... of a reassociable plan (codegen/reassociate.py)


_TILE_CONSTEXPRS = ["MASKED", "BLOCK_M", "BLOCK_N", "PRECISION", "UPCAST_DOT", "DETERMINISTIC", "USE_TMA"]


class _BackwardCodegen(RowStreamCodegen):
    """The pieces shared by the dQ and dK/dV kernels: operand loads, the recomputed score,
    its derivative, the mask, P and dS."""

    def __init__(self, bplan: BackwardPlan, prefix: str, loop_axis: str, kernel: str):
        super().__init__(bplan.plan, prefix)
        self.bplan = bplan
        self.em.key_axis = loop_axis  # what changes along the loop goes into the tile function
        self.reads = bplan.reads_in(kernel)  # (number, ReadGradient) accumulated by this kernel

    def outer_decode(self) -> list[str]:
        lines = ["pid_o = tl.program_id(1).to(tl.int64)",
                 "flat_o = pid_o  # this (batch, head)'s row of lse, delta, dq, dk, dv"]
        for ix in reversed(self.plan.outer):
            lines += [f"{names.user('idx', ix)} = pid_o % {names.user('size', ix)}",
                      f"pid_o = pid_o // {names.user('size', ix)}"]
        return lines

    def do_offset(self) -> str:
        """This program's offset into dO, laid out (outer..., rows, value features)."""
        parts = [f"{names.user('idx', ix)} * do_s{k}" for k, ix in enumerate(self.plan.outer)]
        return " + ".join(parts) or "0"

    def bases(self) -> list[str]:
        """Base pointers of this program's q, k, v and dO (their outer offsets), and with
        `USE_TMA` their TMA descriptors: [rows, features] views, boxes of one tile."""
        p = self.plan
        q, k, v = p.q, p.k, p.v
        st = names.tensor
        descs = {"q_desc": ("q_base", "n_rows", "n_feat", st("st", q.input.name, q.row), "BLOCK_M", "BLOCK_D"),
                 "k_desc": ("k_base", "n_cols", "n_feat", st("st", k.input.name, k.row), "BLOCK_N", "BLOCK_D")}
        values = []
        if v is not None:  # a statistics pass has no values and no dO
            descs["v_desc"] = ("v_base", "n_cols", "n_vfeat", st("st", v.input.name, v.row), "BLOCK_N", "BLOCK_E")
            descs["do_desc"] = ("do_base", "n_rows", "n_vfeat", "do_si", "BLOCK_M", "BLOCK_E")
            values = [f"v_base = {names.tensor('ptr', v.input.name)} + {self.operand_offset(v, self.kv_env)}"]
        return [f"q_base = {names.tensor('ptr', q.input.name)} + {self.operand_offset(q)}",
                f"k_base = {names.tensor('ptr', k.input.name)} + {self.operand_offset(k, self.kv_env)}",
                *values, f"do_base = do_ptr + {self.do_offset()}",
                "if USE_TMA:  # the launcher checked strides and alignment (runtime.tma_layout_ok)",
                *(f"    {d} = {tma_descriptor(*a)}" for d, a in descs.items()),
                "else:  # the pointer path",
                *(f"    {d} = None" for d in descs)]

    def load_rows(self, start: str) -> list[str]:
        """Queries, dO, LSE and delta of the query tile `offs_m` from row `start` (zero / no
        weight past the last row); pointwise weights need no LSE and no delta, a statistics
        pass no dO."""
        q = self.plan.q
        qn = q.input.name
        grad_out = [] if self.plan.v is None else [
            "    do = tl.load(do_base + offs_m[:, None] * do_si + offs_e[None, :] * do_se, "
            "mask=row_ok[:, None] & (offs_e[None, :] < n_vfeat), other=0.0)"]
        stats = [] if self.bplan.pointwise else [
            "lse = tl.load(lse_ptr + flat_o * n_rows + offs_m, mask=row_ok, other=float('-inf'))",
            "# base 2; a row with no allowed key (lse = -inf) or past the last row gets p = 0",
            f"lse2 = tl.where(lse == float('-inf'), float('inf'), lse * {LOG2E})",
            "delta = tl.load(delta_ptr + flat_o * n_rows + offs_m, mask=row_ok, other=0.0)"]
        return [
            "row_ok = offs_m < n_rows",
            "if USE_TMA:  # boxes of [queries, features]: zero past the last row and feature",
            f"    q = q_desc.load([tl.cast({start}, tl.int32), 0])",
            *([f"    do = do_desc.load([tl.cast({start}, tl.int32), 0])"] if grad_out else []),
            "else:",
            f"    q = tl.load(q_base + offs_m[:, None] * {names.tensor('st', qn, q.row)} + offs_d[None, :] * "
            f"{names.tensor('st', qn, q.feature)}, mask=row_ok[:, None] & (offs_d[None, :] < n_feat), other=0.0)",
            *grad_out,
            "if UPCAST_DOT:  # Triton's interpreter mishandles bfloat16 dots; compiled kernels never set it",
            "    q = q.to(tl.float32)",
            *(["    do = do.to(tl.float32)"] if grad_out else []),
            *stats]

    def load_cols(self, start: str) -> list[str]:
        """Keys (as [features, keys], like the forward) and values of the key tile `offs_n`
        from key `start`."""
        k, v = self.plan.k, self.plan.v
        kn = k.input.name
        values = [] if v is None else [
            f"    v = tl.load(v_base + offs_n[:, None] * {names.tensor('st', v.input.name, v.row)} + offs_e[None, :] * "
            f"{names.tensor('st', v.input.name, v.feature)}, mask=col_ok[:, None] & (offs_e[None, :] < n_vfeat), "
            "other=0.0)"]
        return [
            "col_ok = offs_n < n_cols",
            "if USE_TMA:  # boxes of [keys, features]: zero past the last key and feature",
            f"    k = tl.trans(k_desc.load([tl.cast({start}, tl.int32), 0]))",
            *([f"    v = v_desc.load([tl.cast({start}, tl.int32), 0])"] if values else []),
            "else:",
            f"    k = tl.load(k_base + offs_d[:, None] * {names.tensor('st', kn, k.feature)} + offs_n[None, :] * "
            f"{names.tensor('st', kn, k.row)}, mask=col_ok[None, :] & (offs_d[:, None] < n_feat), other=0.0)",
            *values,
            "if UPCAST_DOT:",
            "    k = k.to(tl.float32)",
            *(["    v = v.to(tl.float32)"] if values else [])]

    def scores(self) -> list[str]:
        """The tile's scores in base 2 (`s`, exactly as the forward computes them) and `dsdqk`,
        the derivative of the score with respect to the scaled Q K^T value (when not 1)."""
        term, em = self.plan.terms[0], self.em
        lines = ["qk = tl.dot(q, k, input_precision=PRECISION)"]
        if term.folds_log2e:
            return lines + ["s = qk * qk_scale  # the score scale and log2(e), applied to the fp32 scores"]
        lines += self.score_lines(0)
        if self.bplan.derivative is not None:
            em.body = []
            deriv = em.emit(self.bplan.derivative)
            lines += ["# the derivative of the score with respect to Q K^T (passes/backward.py)", *em.body,
                      f"dsdqk = {deriv.code}"]
        if self.bplan.raw is not None:  # `qk` holds the scaled dot before its per-pair factors
            em.bind(self.bplan.raw, Val("qk", frozenset("mn"), ir.FLOAT))
        if term.qk_factors:
            factors = " * ".join(em.emit(f).code for f in term.qk_factors)
            lines.append(f"dsdqk = {'dsdqk * ' if self.bplan.derivative is not None else ''}{factors}"
                         "  # Q K^T's per-pair factors")
        return lines

    def has_dsdqk(self) -> bool:
        term = self.plan.terms[0]
        return not term.folds_log2e and (self.bplan.derivative is not None or bool(term.qk_factors))

    def row_weight_skip(self, lines: list[str]) -> list[str]:
        """`lines` run only for a query tile where the plan's `row_weight` (a per-head plan's
        mixture coefficient) is nonzero on some row: elsewhere the output gradient `w * dO` and
        the recomputed output are 0, so the tile adds nothing to any gradient."""
        if self.plan.row_weight is None:
            return lines
        return [*self.row_weight_live(), "if live:  # some row of the query tile weighs this head",
                *_indent(lines)]

    def predicate(self) -> list[str]:
        """The spec's masks per element (`allowed`), in the tile function's `if MASKED:`."""
        em = self.em
        em.body = []
        preds = [em.emit(m.pred) for m in self.plan.masks]
        allowed = " & ".join(f"({v.code})" for v in preds)
        return [*em.body, f"allowed = allowed & {allowed}" if allowed else "allowed = allowed"]

    def gradient_of_scores(self) -> list[str]:
        """P, dP = dO V^T and dS (with respect to the raw Q K^T dot), masked entries 0; with
        reads to differentiate, `dsc`: the gradient of the score itself (of the weight, for
        pointwise weights: P is the weight, dS = dP times its derivative)."""
        factor = " * dsdqk" if self.has_dsdqk() else ""
        dscore = "dp" if self.bplan.pointwise else "p * (dp - delta[:, None])"
        dp = "dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)" if self.plan.v is not None else \
            "dp = 0.0  # a statistics pass: no values; the loss reaches its scores through the LSE (delta = -dLSE)"
        lines = [*([] if self.bplan.pointwise else ["p = tl.exp2(s - lse2[:, None])"]),
                 "p = tl.where(allowed, p, 0.0)", dp]
        if self.reads:
            lines += [f"dsc = {dscore}  # d loss / d score", f"ds = dsc{factor}"]
        else:
            lines.append(f"ds = {dscore}{factor}")
        return lines + ["ds = tl.where(allowed, ds * ds_scale, 0.0)  # the chain rule through Q K^T's scale"]

    # ------------------------------------------------------------------ float reads of the score
    def read_flags(self) -> list[str]:
        """One constexpr per read: whether this launch wants its gradient (its tensor requires
        grad); a call that wants none runs the kernels of a plain q, k, v backward."""
        return [f"GRAD{r}" for r, _ in self.reads]

    def tile_call(self) -> str:
        """The constexpr keyword arguments of a tile function's call, after MASKED."""
        flags = "".join(f", {f}={f}" for f in self.read_flags())
        return ("BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=PRECISION, UPCAST_DOT=UPCAST_DOT, "
                f"DETERMINISTIC=DETERMINISTIC, USE_TMA=USE_TMA{flags})")

    def kernel_constexprs(self) -> str:
        return _KERNEL_CONSTEXPRS + "".join(f", {f}: tl.constexpr" for f in self.read_flags())

    def consistent_rows(self) -> list[int]:
        """The row-sum reads whose sums are made consistent with this kernel's own P and dP
        (`read_stores`): every row-sum read of a softmax (pointwise weights have no delta)."""
        return [] if self.bplan.pointwise else [r for r, rd in self.reads if rd.mode == ReadMode.ROWS]

    def read_state(self) -> list[str]:
        """Loop-carried accumulators of the row and column sums; for the consistent row sums,
        `pf<r> = rowsum(P * d score / d read)` per read and `pdp = rowsum(P * dP)`."""
        rows = self.consistent_rows()
        return ([f"{_ACC[rd.mode]}{r}" for r, rd in self.reads if rd.mode in _ACC]
                + [f"pf{r}" for r in rows] + (["pdp"] if rows else []))

    def read_init(self) -> list[str]:
        size = {ReadMode.ROWS: "BLOCK_M", ReadMode.COLS: "BLOCK_N"}
        lines = [f"{_ACC[rd.mode]}{r} = tl.zeros([{size[rd.mode]}], dtype=tl.float32)"
                 for r, rd in self.reads if rd.mode in _ACC]
        rows = self.consistent_rows()
        lines += [f"{acc} = tl.zeros([BLOCK_M], dtype=tl.float32)"
                  for acc in [f"pf{r}" for r in rows] + (["pdp"] if rows else [])]
        for r, rd in self.reads:
            if rd.mode == ReadMode.SCATTER:
                lines += ["if DETERMINISTIC:  # this program's own slots of the read's tile dims",
                          f"    gs{r}_base = gs{r}_ptr + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + "
                          f"flat_o) * gs{r}_len",
                          "else:  # the gradient itself, in the tensor's contiguous layout",
                          f"    gs{r}_base = gs{r}_ptr"]
        return lines

    def read_stores(self, rows: str, cols: str) -> list[str]:
        """The row and column sums stored. A row sum is first corrected to the delta of this
        kernel's fp32 P and dP: delta = rowsum(dO * O) - dLSE reads the output in its own dtype,
        and in bf16 its rounding error, times a factor far from zero on average over the row
        (ALiBi's distance j - i), dominates the sum; with `C = rowsum(P * dP)` the consistent
        delta is `C - dLSE`, so the sum gains `(rowsum(dO * O) - C) * rowsum(P * factor)`."""
        lines = []
        consistent = self.consistent_rows()
        if consistent:
            lines += [f"if {' or '.join(f'GRAD{r}' for r in consistent)}:",
                      "    odo = tl.load(odo_ptr + flat_o * n_rows + offs_m, mask=row_ok, other=0.0)  # rowsum(dO * O)"]
        for r, rd in self.reads:
            if rd.mode == ReadMode.ROWS:
                fix = [f"    gr{r} += (odo - pdp) * pf{r}"] if r in consistent else []
                lines += [f"if GRAD{r}:", *fix,
                          f"    tl.store(gr{r}_ptr + flat_o * n_rows + offs_m, gr{r}, mask={rows})"]
            elif rd.mode == ReadMode.COLS:
                lines += [f"if GRAD{r}:", f"    tl.store(gc{r}_ptr + flat_o * n_cols + offs_n, gc{r}, mask={cols})"]
        return lines

    def read_pointer_args(self) -> list[str]:
        return [f"{_BUF[rd.mode]}{r}_ptr" for r, rd in self.reads]

    def read_len_args(self) -> list[str]:
        return [f"gs{r}_len" for r, rd in self.reads if rd.mode == ReadMode.SCATTER]

    def read_lines(self, live: str) -> list[str]:
        """Per tile: each read's `g = dS * d score / d read` (entries outside `live` 0), and
        its accumulation."""
        em, lines = self.em, []
        consistent = self.consistent_rows()
        if consistent:
            lines += [f"if {' or '.join(f'GRAD{r}' for r in consistent)}:  # for the consistent row sums",
                      "    pdp += tl.sum(p * dp, 1)"]
        for r, rd in self.reads:
            em.body = []
            deriv = em.emit(rd.derivative)
            name = "a precomputed value" if names.is_synthetic(rd.name) else rd.name
            factor = "" if deriv.const == 1 else f" * {deriv.code}"
            inner = [*em.body, f"g{r} = tl.where({live}, dsc{factor}, 0.0)"]
            if rd.mode == ReadMode.ROWS:
                inner.append(f"gr{r} += tl.sum(g{r}, 1)")
                if r in consistent:
                    inner.append(f"pf{r} += tl.sum(tl.where({live}, p{factor}, 0.0), 1)")
            elif rd.mode == ReadMode.COLS:
                inner.append(f"gc{r} += tl.sum(g{r}, 0)")
            elif rd.mode == ReadMode.TILE:
                inner.append(f"tl.store(gt{r}_ptr + (flat_o * n_rows + offs_m[:, None]) * n_cols + offs_n[None, :], "
                             f"g{r}, mask=({live}) != 0)")  # (a mask of ints on some paths: a bool here)
            else:
                inner += self.scatter_lines(r, rd, live)
            lines += [comment(f"the gradient of the score's read of {name} (read {r}, {rd.mode}; passes/backward.py)"),
                      f"if GRAD{r}:", *_indent(inner)]
        return lines

    def scatter_lines(self, r: int, rd, live: str) -> list[str]:
        """A gathered read's gradient: atomics at its positions in the whole tensor, or, with
        DETERMINISTIC, one pass per distinct position of the tile (in increasing order), each
        summing the tile's entries there into this program's slot (no other program writes it)."""
        em = self.em
        em.body = []
        vals = [em.emit(a) for a in rd.args]
        sizes = [names.tensor("sz", rd.name, k) for k in range(len(rd.args))]
        checks = [f"({v.code} >= 0) & ({v.code} < {sizes[k]})" for k, v in enumerate(vals) if k in rd.tile_dims]
        outer = [f"({v.code} >= 0) & ({v.code} < {sizes[k]})" for k, v in enumerate(vals)
                 if k not in rd.tile_dims and v.const is None]

        def position(dims):
            pos = None
            for k in dims:
                v = vals[k].code if vals[k].const is not None else f"{vals[k].code}.to(tl.int64)"
                pos = v if pos is None else f"({pos}) * {sizes[k]} + {v}"
            return pos or "0"

        return [*em.body,
                f"ok{r} = (({live}) != 0)" + "".join(f" & {c}" for c in checks) + "  # a bool mask for the atomics",
                *([f"ok{r} = tl.where({' & '.join(outer)}, ok{r}, False)  # its batch / head indices in range"]
                  if outer else []),
                "if DETERMINISTIC:",
                f"    pos{r} = tl.where(ok{r}, {position(rd.tile_dims)}, gs{r}_len)",
                f"    w{r} = tl.min(tl.min(pos{r}, 1), 0)",
                f"    while w{r} < gs{r}_len:  # the distinct positions of this tile, smallest first",
                f"        hit = pos{r} == w{r}",
                f"        tl.store(gs{r}_base + w{r}, tl.load(gs{r}_base + w{r}) + "
                f"tl.sum(tl.sum(tl.where(hit, g{r}, 0.0), 1), 0))",
                f"        pos{r} = tl.where(hit, gs{r}_len, pos{r})",
                f"        w{r} = tl.min(tl.min(pos{r}, 1), 0)",
                "    tl.debug_barrier()  # the slots written here are read again by the next tile",
                "else:",
                f"    tl.atomic_add(gs{r}_base + {position(range(len(rd.args)))}, g{r}, mask=ok{r})"]

    def tile_function(self, fname: str, state: list[str], loop_var: str, body: list[str]):
        constexprs = [*_TILE_CONSTEXPRS, *self.read_flags()]
        bound = {loop_var, *constexprs}
        inner = [a for a in _free_names(body, bound) if a not in (*state, loop_var)]
        sig = ", ".join([*state, loop_var, *inner]) + ", " + ", ".join(f"{c}: tl.constexpr" for c in constexprs)
        text = ["@triton.jit", f"def {fname}({sig}):", *_indent(body), "    return " + ", ".join(state)]
        return text, ", ".join([*state, loop_var, *inner])

    def kernel_args(self, fixed: list[str], extra: list[str]) -> tuple[list[str], list[str], list[str]]:
        em = self.em
        tensors = list(em.tensors)
        strides, sizes = tensor_args(em.tensors)
        scalars = scalar_args(self.plan.program, em.host_scalars) + ["qk_scale", "ds_scale"]
        outer = [names.user("size", ix) for ix in self.plan.outer]
        do_strides = [f"do_s{k}" for k in range(len(self.plan.outer))] + ["do_si", "do_se"]
        args = ([names.tensor("ptr", t) for t in tensors] + fixed + strides + sizes + do_strides + outer
                + ["n_rows", "n_cols", "n_feat", "n_vfeat"] + extra + scalars)
        return args, tensors, scalars


_KERNEL_CONSTEXPRS = ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, "
                      "BLOCK_E: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EVEN_N: tl.constexpr, "
                      "DETERMINISTIC: tl.constexpr, USE_TMA: tl.constexpr")
_ACC = {ReadMode.ROWS: "gr", ReadMode.COLS: "gc"}  # the loop-carried sums of a read
_BUF = {ReadMode.ROWS: "gr", ReadMode.COLS: "gc", ReadMode.TILE: "gt", ReadMode.SCATTER: "gs"}

class DqCodegen(_BackwardCodegen):
    """dQ: one program per query tile; the key tiles the forward visits, in its order."""

    def __init__(self, bplan: BackwardPlan, prefix: str):
        super().__init__(bplan, prefix, "n", "dq")
        self.tile_name = f"{prefix}_bwd_dq_tile"

    def visit(self, masked, call):  # the forward's tile ranges call this for every key tile
        state = ", ".join(["dq", *self.read_state()])
        return [f"    {state} = {self.tile_name}({call}, MASKED={masked}, {self.tile_call()}"]

    def generate(self) -> tuple[str, BackwardKernel]:
        p, em = self.plan, self.em
        bases = self.bases()
        rows = self.load_rows("pid_m * BLOCK_M")
        scores = self.scores()
        skip = self.row_weight_skip  # emitted before the prologue is taken: its loads may be hoisted
        body = ["offs_n = start_n + tl.arange(0, BLOCK_N)", *self.load_cols("start_n"), *scores,
                "allowed = col_ok[None, :]",
                "if MASKED:", *_indent(self.predicate()),
                *self.gradient_of_scores(),
                "dq += tl.dot(ds.to(k.dtype), tl.trans(k), input_precision=PRECISION)",
                *self.read_lines("allowed & row_ok[:, None]")]
        ranges = self.range_lines()
        tile, call = self.tile_function(self.tile_name, ["dq", *self.read_state()], "start_n", body)
        loop = skip(ranges(call))
        prologue = list(em.prologue)
        map_args = ["kv_list_ptr", "kv_full_ptr", "kv_count_ptr", "n_qtiles", "n_ktiles"] \
            if p.mask_mode == MaskMode.BLOCK_MAP else []
        args, tensors, scalars = self.kernel_args(["do_ptr", "lse_ptr", "delta_ptr", "odo_ptr", "dq_ptr",
                                                   *self.read_pointer_args()], map_args + self.read_len_args())
        name = f"{self.name}_bwd_dq"
        src = [*tile, "", "",
               "@triton.jit",
               f"def {name}({', '.join(args)}, {self.kernel_constexprs()}):",
               '    """dQ of one query tile: the key tiles the forward visits, dQ += dS K."""',
               "    pid_m = tl.program_id(0)",
               *_indent(self.outer_decode()),
               "    split_lo = 0  # no key splits in the backward",
               "    split_hi = n_cols + BLOCK_N",
               "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
               "    offs_d = tl.arange(0, BLOCK_D)",
               "    offs_e = tl.arange(0, BLOCK_E)",
               *_indent(["# values that do not change along the key loop", *prologue, *bases, *rows,
                         "dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)",
                         *self.read_init(),
                         *loop]),
               *_indent(_store("dq", "n_rows", "n_feat", "pid_m * BLOCK_M", "BLOCK_M", "BLOCK_D", "offs_m",
                               "offs_d", "row_ok")),
               *_indent(self.read_stores("row_ok", ""))]
        return "\n".join(src), BackwardKernel(name, tensors, scalars, dict(em.host_scalars),
                                               [r for r, _ in self.reads])


class DkdvCodegen(_BackwardCodegen):
    """dK and dV: one program per key tile; the query tiles streamed (the transposed dataflow)."""

    def __init__(self, bplan: BackwardPlan, prefix: str):
        super().__init__(bplan, prefix, "m", "dkdv")
        self.tile_name = f"{prefix}_bwd_dkdv_tile"

    def generate(self) -> tuple[str, BackwardKernel]:
        p, em = self.plan, self.em
        bases = self.bases()
        cols = self.load_cols("pid_n * BLOCK_N")
        rows = self.load_rows("start_m")
        scores = self.scores()
        values = [] if p.v is None else ["dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)"]
        body = ["offs_m = start_m + tl.arange(0, BLOCK_M)", *rows,
                *self.row_weight_skip([
                    *scores,
                    "allowed = row_ok[:, None] & col_ok[None, :]  # padded rows and keys take no part",
                    "if MASKED:", *_indent(self.predicate()),
                    *self.gradient_of_scores(),
                    *values,
                    "dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)",
                    *self.read_lines("allowed")])]
        state = ["dk", *(["dv"] if p.v is not None else []), *self.read_state()]
        tile, call = self.tile_function(self.tile_name, state, "start_m", body)

        def visit(masked):
            return [f"    {', '.join(state)} = {self.tile_name}({call}, MASKED={masked}, {self.tile_call()}"]

        mode = self.bplan.dkdv_mode
        if mode == MaskMode.AFFINE:
            loop = self.query_ranges(visit)
            map_args = []
        elif mode == MaskMode.BLOCK_MAP:
            outer = map_outer(p)
            flat = " + ".join(f"{names.user('idx', ix)} * {_stride(outer, k)}" for k, ix in enumerate(outer)) or "0"
            loop = ["# query tiles listed by the forward's block map, transposed: full tiles first",
                    f"map_row = {flat}",
                    "list_base = q_list_ptr + (map_row * n_ktiles + pid_n) * n_qtiles",
                    "n_full_tiles = tl.load(q_full_ptr + map_row * n_ktiles + pid_n)",
                    "n_tiles = tl.load(q_count_ptr + map_row * n_ktiles + pid_n)",
                    "for t in range(0, n_full_tiles):",
                    "    start_m = tl.load(list_base + t) * BLOCK_M",
                    *visit(False),
                    "for t in range(n_full_tiles, n_tiles):",
                    "    start_m = tl.load(list_base + t) * BLOCK_M",
                    *visit(True)]
            map_args = ["q_list_ptr", "q_full_ptr", "q_count_ptr", "n_qtiles", "n_ktiles"]
        else:
            loop = ["# every query tile, masked", "for start_m in range(0, n_rows, BLOCK_M):", *visit(True)]
            map_args = []
        prologue = list(em.prologue)
        args, tensors, scalars = self.kernel_args(["do_ptr", "lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr",
                                                   *self.read_pointer_args()], map_args + self.read_len_args())
        name = f"{self.name}_bwd_dkdv"
        src = [*tile, "", "",
               "@triton.jit",
               f"def {name}({', '.join(args)}, {self.kernel_constexprs()}):",
               '    """dK and dV of one key tile (for one query head): dV += P^T dO, dK += dS^T Q."""',
               "    pid_n = tl.program_id(0)",
               *_indent(self.outer_decode()),
               "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
               "    offs_d = tl.arange(0, BLOCK_D)",
               "    offs_e = tl.arange(0, BLOCK_E)",
               *_indent(["# values that do not change along the query loop", *prologue, *bases, *cols,
                         "dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)",
                         *([] if p.v is None else ["dv = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)"]),
                         *self.read_init(),
                         *loop]),
               *_indent(_store("dk", "n_cols", "n_feat", "pid_n * BLOCK_N", "BLOCK_N", "BLOCK_D", "offs_n",
                               "offs_d", "col_ok")),
               *([] if p.v is None else _indent(_store("dv", "n_cols", "n_vfeat", "pid_n * BLOCK_N", "BLOCK_N",
                                                       "BLOCK_E", "offs_n", "offs_e", "col_ok"))),
               *_indent(self.read_stores("", "col_ok"))]
        return "\n".join(src), BackwardKernel(name, tensors, scalars, dict(em.host_scalars),
                                               [r for r, _ in self.reads])


    def query_ranges(self, visit) -> list[str]:
        """The query tiles of this key tile from the mask analysed with the roles swapped
        (`BackwardPlan.key_masks`): the forward's range code (`affine_ranges`) over the
        transposed plan, its tile names swapped (the key tile `pid_n` is the tile whose rows
        bound the range, the query tiles `start_m` are the ones visited), then the visits."""
        saved, self.visit = self.plan, lambda masked, call: [f"    @VISIT{int(masked)}@"]
        self.plan = dataclasses.replace(saved, mask_plan=self.bplan.key_masks,
                                        mask_symbols=self.bplan.key_mask_symbols)
        try:
            lines = self.affine_ranges("")
        finally:
            self.plan = saved
            del self.visit
        swap = {"pid_m": "pid_n", "BLOCK_M": "BLOCK_N", "BLOCK_N": "BLOCK_M", "n_rows": "n_cols",
                "n_cols": "n_rows", "start_n": "start_m", "split_lo": "0", "split_hi": "n_rows + BLOCK_M"}
        pattern = re.compile(r"\b(" + "|".join(swap) + r")\b")
        out = []
        for line in lines:
            line = pattern.sub(lambda m: swap[m.group(1)], line)
            if line.strip().startswith("@VISIT"):
                out += visit(line.strip() == "@VISIT1@")
            else:
                out.append(line.replace("key-tile ranges", "query-tile ranges (keys as rows)"))
        return out


def _store(grad: str, rows: str, feats: str, start: str, block_rows: str, block_feats: str, offs_rows: str,
           offs_feats: str, ok: str) -> list[str]:
    """The store of one fp32 gradient tile, laid out (batch x head, rows, features) contiguous:
    with `USE_TMA` through a descriptor (clipped at the edges), else through masked pointers."""
    base = f"{grad}_ptr + flat_o * {rows} * {feats}"
    return ["if USE_TMA:",
            f"    {grad}_out = {tma_descriptor(base, rows, feats, feats, block_rows, block_feats)}",
            f"    {grad}_out.store([tl.cast({start}, tl.int32), 0], {grad})",
            "else:",
            f"    tl.store({grad}_ptr + (flat_o * {rows} + {offs_rows}[:, None]) * {feats} + {offs_feats}[None, :], "
            f"{grad}, mask={ok}[:, None] & ({offs_feats}[None, :] < {feats}))"]


def _stride(outer, k):
    rest = outer[k + 1:]
    return " * ".join(names.user("size", ix) for ix in rest) or "1"


def pre_kernel(plan, prefix: str) -> tuple[str, str]:
    """`delta = rowsum(dO * O) - dLSE` per query row, O and dO laid out (outer..., rows, features);
    `rowsum(dO * O)` stored as well (`odo`), for the row sums of score reads (`read_stores`)."""
    outer = plan.outer
    name = f"{prefix}_bwd_pre"
    o_strides = [f"o_s{k}" for k in range(len(outer))] + ["o_si", "o_se"]
    do_strides = [f"do_s{k}" for k in range(len(outer))] + ["do_si", "do_se"]
    sizes = [names.user("size", ix) for ix in outer]
    decode = ["pid_o = tl.program_id(1).to(tl.int64)", "flat_o = pid_o"]
    for ix in reversed(outer):
        decode += [f"{names.user('idx', ix)} = pid_o % {names.user('size', ix)}",
                   f"pid_o = pid_o // {names.user('size', ix)}"]
    o_off = " + ".join([f"{names.user('idx', ix)} * o_s{k}" for k, ix in enumerate(outer)]) or "0"
    do_off = " + ".join([f"{names.user('idx', ix)} * do_s{k}" for k, ix in enumerate(outer)]) or "0"
    args = ["o_ptr", "do_ptr", "dlse_ptr", "delta_ptr", "odo_ptr", *o_strides, *do_strides, *sizes, "n_rows", "n_vfeat"]
    src = ["@triton.jit",
           f"def {name}({', '.join(args)}, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, HAS_DLSE: tl.constexpr):",
           '    """delta = rowsum(dO * O) - dLSE for one query tile, in fp32."""',
           "    pid_m = tl.program_id(0)",
           *_indent(decode),
           "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
           "    offs_e = tl.arange(0, BLOCK_E)",
           "    row_ok = offs_m < n_rows",
           "    ok = row_ok[:, None] & (offs_e[None, :] < n_vfeat)",
           f"    o = tl.load(o_ptr + {o_off} + offs_m[:, None] * o_si + offs_e[None, :] * o_se, mask=ok, other=0.0)",
           f"    do = tl.load(do_ptr + {do_off} + offs_m[:, None] * do_si + offs_e[None, :] * do_se, mask=ok, "
           "other=0.0)",
           "    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)",
           "    tl.store(odo_ptr + flat_o * n_rows + offs_m, delta, mask=row_ok)  # for the dQ kernel's row sums",
           "    if HAS_DLSE:  # d lse / d s = p: the returned LSE's gradient enters dS as p * dLSE",
           "        delta -= tl.load(dlse_ptr + flat_o * n_rows + offs_m, mask=row_ok, other=0.0)",
           "    tl.store(delta_ptr + flat_o * n_rows + offs_m, delta, mask=row_ok)"]
    return "\n".join(src), name


def generate_backward(bplan: BackwardPlan, name: str) -> BackwardSource:
    """The backward module of one spec: the delta, dK/dV and dQ kernels (not for a plan whose
    backward is linear-time only), and the linear-time kernels of the plan's linear paths.
    Kernel names start with `names.kernel(name)`; the module is separate from the forward's."""
    prefix = names.kernel(name)
    plan = bplan.plan
    texts, dq, dkdv, pre_name, chunked, reassociated = [], None, None, None, None, None
    if not bplan.linear_only:
        pre_text, pre_name = pre_kernel(plan, prefix) if plan.v is not None else ("", "")  # statistics: delta = -dLSE
        dkdv_text, dkdv = DkdvCodegen(bplan, prefix).generate()
        dq_text, dq = DqCodegen(bplan, prefix).generate()
        texts += [t for t in (pre_text, dkdv_text, dq_text) if t]
    if bplan.pointwise and chunked_backward(plan):
        from attncc.codegen.chunked import ChunkedBackwardCodegen

        text, tensors, scalars, hosts = ChunkedBackwardCodegen(linear_plan(plan), prefix).generate_text()
        texts.append(text)
        chunked = LinearSource(f"{prefix}_chunked_bwd", tensors, scalars, hosts)
    if bplan.pointwise and reassociable(plan):
        from attncc.codegen.reassociate import ReassociatedBackwardCodegen

        text, tensors, scalars, hosts = ReassociatedBackwardCodegen(linear_plan(plan), prefix).generate_text()
        texts.append(text)
        reassociated = LinearSource(f"{prefix}_linear_bwd", tensors, scalars, hosts)
    doc = (f"Generated by attncc from {os.path.basename(plan.program.source.filename)}: do not edit; "
           "regenerate instead.\n\nThe backward of a row-streaming plan with one softmax or pointwise weight over "
           "the keys: delta, then dK/dV (per key tile), then dQ (per query tile); and the linear-time kernels of "
           "linear attention.\n")
    header = [docstring(doc), "import triton", "import triton.language as tl", "", ""]
    source = "\n".join(header) + "\n\n\n".join(texts) + "\n"
    return BackwardSource(f"{prefix}_bwd", source, dq, dkdv, pre_name, chunked, reassociated)
