"""Chunked causal linear attention: a `D x E` state carried across chunks of the sequence.

For causal weights `f(q_i) . f(k_j) * lam ** (i - j)` (lam = 1 without decay; Lightning
Attention, TransNormer, causal linear attention), one program per (batch, head) walks the
sequence in chunks of C tokens:

    inside a chunk:  o_c  = (Q_c K_c^T * decay * causal) V_c            (a C x C tile)
    across chunks:   o_c += (Q_c * lam^(i - c0 + 1)) S
    state update:    S    = lam^C S + (K_c * lam^(c0 + C - 1 - j))^T V_c

so the work is linear in the sequence length. With `INIT_STATE` the scan starts from a given
state (S, z) instead of zeros (`state_ptr`, `z_ptr`: fp32, `[programs, BLOCK_D, BLOCK_E]` and
`[programs, BLOCK_D]`, the keys before the sequence decayed to the position before it):
context parallelism (`attncc/distributed.py`) starts each rank's piece from the prefix of
the other ranks' states. The decays come from the spec's own decay
factor, evaluated at the indices each term needs. This is DESIGN.md's chunked-scan
skeleton; the row-streaming kernel of the same spec stays for calls it does not fit.
Which plans get this kernel (`chunkable`, `decay_factor`) and which calls run it
(`choose_path`) is decided in `passes/linear.py`.
"""
from __future__ import annotations

from attncc import ir
from attncc.codegen import names
from attncc.codegen.row_stream import RowStreamCodegen, _indent, tensor_args
from attncc.codegen.tile_expr import Val
from attncc.passes.linear import linear_decay
from attncc.passes.row_stream import RowStreamPlan


ROWS_M = Val("rows[:, None]", frozenset("m"), ir.INT)  # the chunk's rows as query indices
ROWS_N = Val("rows[None, :]", frozenset("n"), ir.INT)  # ... as key indices
CHUNK_BEFORE = Val("(c0 - 1)", frozenset(), ir.INT)  # the key before the chunk
CHUNK_LAST = Val("(c0 + BLOCK_C - 1)", frozenset(), ir.INT)  # the chunk's last index


class ChunkedCodegen(RowStreamCodegen):
    """The chunked-scan kernel of a chunkable plan."""

    def __init__(self, plan: RowStreamPlan, name: str):
        super().__init__(plan, name)
        self.name = f"{name}_chunked"

    def chunk_decays(self) -> list[tuple[list[str], str]]:
        """The decays a chunk step needs, within the chunk (query to key), query to the chunk's
        start, key to its end, and across the whole chunk: shared by the forward and backward scans."""
        return [self.decay(ROWS_M, ROWS_N), self.decay(ROWS_M, CHUNK_BEFORE),
                self.decay(CHUNK_LAST, ROWS_N), self.decay(CHUNK_LAST, CHUNK_BEFORE)]

    def decay(self, env_i: Val, env_j: Val) -> tuple[list[str], str]:
        """Code of the decay factor at the given query and key index values ('1.0' without decay)."""
        decay = linear_decay(self.plan)
        if decay is None:
            return [], "1.0"
        em = self.em
        env = {**em.env, self.plan.i: env_i, self.plan.j: env_j}
        saved = (em.prologue, em.body, em.memo)
        em.prologue, em.body = [], []
        em.memo = dict(em.memo)  # self-contained lines: the scans use the decays in different subsets
        val = em.emit(decay.factor, env)
        lines = [*em.prologue, *em.body]
        em.prologue, em.body, em.memo = saved
        return lines, val.code

    def loads(self) -> list[str]:
        """The chunk's rows (`rows = c0 + offs_c`), q (times qk_scale, [C, D]), k ([D, C]) and v
        ([C, E]) in fp32, feature maps applied, zero past the sequence and the features."""
        p, em = self.plan, self.em
        term = p.terms[0]
        qn, kn, vn = term.q.input.name, term.k.input.name, p.v.input.name
        q_map = self.feature_map(term.q, "q", {**em.env, p.i: ROWS_M}, p.d, "offs_d[None, :]", "n_feat")
        k_map = self.feature_map(term.k, "k", {**em.env, p.j: ROWS_N}, p.d, "offs_d[:, None]", "n_feat")
        v_map = self.feature_map(p.v, "v", {**em.env, p.j: ROWS_M}, p.e, "offs_e[None, :]", "n_vfeat")
        return [
            "rows = c0 + offs_c",
            "in_seq = rows < n_rows",
            f"q = tl.load(q_base + rows[:, None] * {names.tensor('st', qn, term.q.row)} + offs_d[None, :] * "
            f"{names.tensor('st', qn, term.q.feature)}, "
            "mask=in_seq[:, None] & (offs_d[None, :] < n_feat), other=0.0)",
            *q_map,
            "q = tl.where(in_seq[:, None] & (offs_d[None, :] < n_feat), q.to(tl.float32), 0.0) * qk_scale",
            f"k = tl.load(k_base + rows[None, :] * {names.tensor('st', kn, term.k.row)} + offs_d[:, None] * "
            f"{names.tensor('st', kn, term.k.feature)}, "
            "mask=in_seq[None, :] & (offs_d[:, None] < n_feat), other=0.0)",
            *k_map,
            "k = tl.where(in_seq[None, :] & (offs_d[:, None] < n_feat), k.to(tl.float32), 0.0)",
            f"v = tl.load(v_base + rows[:, None] * {names.tensor('st', vn, p.v.row)} + offs_e[None, :] * "
            f"{names.tensor('st', vn, p.v.feature)}, "
            "mask=in_seq[:, None] & (offs_e[None, :] < n_vfeat), other=0.0)",
            *v_map,
            "v = tl.where(in_seq[:, None], v.to(tl.float32), 0.0)"]

    def decode(self) -> list[str]:
        """This program's (batch, head) indices, from its program id."""
        lines = ["pid_o = tl.program_id(0).to(tl.int64)"]
        for ix in reversed(self.plan.outer):
            size = names.user("size", ix)
            lines += [f"{names.user('idx', ix)} = pid_o % {size}", f"pid_o = pid_o // {size}"]
        return lines

    def bases(self) -> list[str]:
        term, p = self.plan.terms[0], self.plan
        return [f"q_base = {names.tensor('ptr', term.q.input.name)} + {self.operand_offset(term.q)}",
                f"k_base = {names.tensor('ptr', term.k.input.name)} + {self.operand_offset(term.k)}",
                f"v_base = {names.tensor('ptr', p.v.input.name)} + {self.operand_offset(p.v)}"]

    def generate_text(self) -> tuple[str, list[str], list[str], dict]:
        p, em = self.plan, self.em
        bases = self.bases()  # first: they register q, k and v as the first tensors
        (intra_lines, intra), (row_lines, row_decay), (col_lines, col_decay), (chunk_lines, chunk_decay) = \
            self.chunk_decays()
        loads = self.loads()
        tensors = list(em.tensors)
        scalars = self.scalar_arg_names()
        strides, dims = tensor_args(em.tensors)
        out_axes = p.output.axes
        o_strides = [f"o_s{k}" for k in range(len(out_axes))]
        o_off = " + ".join(f"rows[:, None] * {st}" if ax == p.i else f"offs_e[None, :] * {st}" if ax == p.e
                           else f"{names.user('idx', ax)} * {st}" for ax, st in zip(out_axes, o_strides))
        args = ([names.tensor("ptr", t) for t in tensors] + ["o_ptr", "state_ptr", "z_ptr"] + strides + dims
                + o_strides + [names.user("size", ix) for ix in p.outer] + ["n_rows", "n_cols", "n_feat", "n_vfeat"]
                + scalars)
        body = [
            *loads,
            "# inside the chunk: causal, decayed weights",
            *intra_lines,
            f"a = tl.where(rows[None, :] <= rows[:, None], tl.dot(q, k, input_precision='ieee') * {intra}, 0.0)",
            "# across chunks: the carried state, decayed to each row",
            *row_lines,
            f"q_past = q * {row_decay}",
            "out = tl.dot(a, v, input_precision='ieee') + tl.dot(q_past, S, input_precision='ieee')",
            "if ROW_SUM:",
            "    out = out / tl.where(in_seq, tl.sum(a, 1) + tl.sum(q_past * z[None, :], 1), 1.0)[:, None]",
            f"tl.store(o_ptr + {o_off}, out.to(o_ptr.dtype.element_ty), "
            "mask=in_seq[:, None] & (offs_e[None, :] < n_vfeat))",
            "# the state after this chunk",
            *col_lines, *chunk_lines,
            f"k_to_end = k * {col_decay}",
            f"S = S * {chunk_decay} + tl.dot(k_to_end, v, input_precision='ieee')",
            f"z = z * {chunk_decay} + tl.sum(k_to_end, 1)",
        ]
        src = [
            "@triton.jit",
            f"def {self.name}({', '.join(args)}, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, "
            "BLOCK_E: tl.constexpr, ROW_SUM: tl.constexpr, INIT_STATE: tl.constexpr):",
            '    """One (batch, head): chunks of BLOCK_C tokens in order, a D x E state carried across."""',
            *_indent(self.decode()),
            "    offs_c = tl.arange(0, BLOCK_C)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            *_indent(list(em.prologue)),
            *_indent(bases),
            "    S = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
            "    z = tl.zeros([BLOCK_D], dtype=tl.float32)",
            "    if INIT_STATE:  # the keys before the sequence (another rank's), decayed to its start",
            "        combo = tl.program_id(0).to(tl.int64)",
            "        S = tl.load(state_ptr + (combo * BLOCK_D + offs_d[:, None]) * BLOCK_E + offs_e[None, :])",
            "        S = S.to(tl.float32)",
            "        z = tl.load(z_ptr + combo * BLOCK_D + offs_d).to(tl.float32)",
            "    for c0 in range(0, n_rows, BLOCK_C):",
            *_indent(body, 2),
        ]
        return "\n".join(src) + "\n", tensors, scalars, dict(em.host_scalars)


class ChunkedBackwardCodegen(ChunkedCodegen):
    """The linear-time backward of a chunked plan (`passes.linear.chunked_backward`): with
    `w_ij = lam^(i - j) [j <= i]` and `S_c`, `R_c` the states carried forwards and backwards,

        dQ_c = (dO_c V_c^T * w) K_c + (dO_c * lam^(i - c0 + 1)) S^T       (forward, with O in fp32)
        dV_c = (Q_c K_c^T * w)^T dO_c + (K_c * lam^(c0 + C - j)) R          (backward, chunks reversed)
        dK_c = (dO_c V_c^T * w)^T Q_c + (V_c * lam^(c0 + C - j)) R^T
        R    = lam^C R + (Q_c * lam^(i - c0))^T dO_c

    and the decay base's gradient from `sum (i - j) lam^(i - j - 1) w'_ij` = `(sum_t t (dO_t . O_t) -
    sum_t t (V_t . dV_t)) / lam` per (batch, head): each kernel stores its term per row (`rs`),
    the launcher subtracts, sums and divides. Both kernels share one argument list. The reverse
    scan gives dK (`DK`), dV (`DV`) or both: on a GPU it runs twice, once for each, so that each
    run holds one output tile and its products (fewer registers: no spill at D = E = 64).

    With a row-sum normaliser (`ROW_SUM`: `o = num / den`, `den_i = sum_j w'_ij`) the values
    get a column of ones: the forward scan also carries `z = K^T 1` to recompute `den`, and
    stores `g = dO / den` and `gs = -rowsum(dO * o) / den` (the ones column's output gradient);
    the reverse scan runs on `g` and carries `r = Q^T gs` next to `R`. The ones column adds
    `gs z^T` to dQ, `r` to dK and its own `dV` to the decay's sum (`g . num + gs den` is 0, so the
    forward scan's term vanishes). Feature maps are applied in the loads: the gradients are
    those of the mapped operands, chained through the maps on the host."""

    def __init__(self, plan: RowStreamPlan, name: str):
        super().__init__(plan, name)
        self.name = f"{name}_chunked_bwd"

    def generate_text(self) -> tuple[str, list[str], list[str], dict]:
        p, em = self.plan, self.em
        bases = self.bases()
        first = Val("c0", frozenset(), ir.INT)
        end = Val("(c0 + BLOCK_C)", frozenset(), ir.INT)
        (intra_lines, intra), (row_lines, row_decay), (col_lines, col_decay), (chunk_lines, chunk_decay) = \
            self.chunk_decays()
        to_end_lines, to_end = self.decay(end, ROWS_M)      # lam^(c0 + C - j), keys as a column
        from_lines, from_start = self.decay(ROWS_M, first)  # lam^(i - c0)
        loads = self.loads()
        tensors = list(em.tensors)
        scalars = self.scalar_arg_names()
        strides, dims = tensor_args(em.tensors)
        outer = [names.user("size", ix) for ix in p.outer]
        do_strides = [f"do_s{k}" for k in range(len(p.outer))] + ["do_si", "do_se"]
        do_off = " + ".join(f"{names.user('idx', ix)} * do_s{k}" for k, ix in enumerate(p.outer)) or "0"
        args = ([names.tensor("ptr", t) for t in tensors] + ["do_ptr", "g1_ptr", "g2_ptr", "rs_ptr", "gn_ptr", "gs_ptr"]
                + strides + dims + do_strides + outer + ["n_rows", "n_cols", "n_feat", "n_vfeat"] + scalars)
        g_off = "(flat_o * n_rows + rows[:, None]) * "
        e_ok = "in_seq[:, None] & (offs_e[None, :] < n_vfeat)"
        load_do = ("do = tl.load(do_base + rows[:, None] * do_si + offs_e[None, :] * do_se, "
                   f"mask={e_ok}, other=0.0).to(tl.float32)")
        common = [
            *loads,
            *intra_lines,
            f"w = tl.where(rows[None, :] <= rows[:, None], {intra}, 0.0)  # lam^(i - j), causal",
            "a = tl.dot(q, k, input_precision='ieee') * w"]
        dpw = ["dpw = tl.dot(do, tl.trans(v), input_precision='ieee')  # dO_i . v_j",
               "if ROW_SUM:",
               "    dpw += gs[:, None]  # the ones column's",
               "dpw = dpw * w"]
        fwd = [
            *common,
            load_do,
            *row_lines,
            f"q_past = q * {row_decay}",
            "out = tl.dot(a, v, input_precision='ieee') + tl.dot(q_past, S, input_precision='ieee')",
            "if ROW_SUM:  # o = num / den: the values' gradient dO / den, the ones column's -rowsum(dO * o) / den",
            "    den = tl.where(in_seq, tl.sum(a, 1) + tl.sum(q_past * z[None, :], 1), 1.0)",
            "    out = out / den[:, None]",
            "    gs = -tl.sum(out * do, 1) / den",
            "    do = do / den[:, None]",
            f"    tl.store(gn_ptr + {g_off}n_vfeat + offs_e[None, :], do, mask={e_ok})",
            "    tl.store(gs_ptr + flat_o * n_rows + rows, gs, mask=in_seq)",
            "    tl.store(rs_ptr + flat_o * n_rows + rows, gs * 0.0, mask=in_seq)  # g . num + gs den = 0",
            "else:",
            "    tl.store(rs_ptr + flat_o * n_rows + rows, rows.to(tl.float32) * tl.sum(out * do, 1), mask=in_seq)",
            *dpw,
            f"dq = tl.dot(dpw, tl.trans(k), input_precision='ieee') + "
            f"tl.dot(do * {row_decay}, tl.trans(S), input_precision='ieee')",
            "if ROW_SUM:",
            f"    dq += (gs[:, None] * {row_decay}) * z[None, :]",
            "dq = dq * qk_scale",
            f"tl.store(g1_ptr + {g_off}n_feat + offs_d[None, :], dq, mask=in_seq[:, None] & (offs_d[None, :] < n_feat))",
            *col_lines, *chunk_lines,
            f"k_to_end = k * {col_decay}",
            f"S = S * {chunk_decay} + tl.dot(k_to_end, v, input_precision='ieee')",
            "if ROW_SUM:",
            f"    z = z * {chunk_decay} + tl.sum(k_to_end, 1)"]
        rev = [
            "c0 = (n_chunks - 1 - t_rev) * BLOCK_C",
            *common,
            "if ROW_SUM:  # the forward scan's dO / den and -rowsum(dO * o) / den",
            f"    do = tl.load(gn_ptr + {g_off}n_vfeat + offs_e[None, :], mask={e_ok}, other=0.0)",
            "    gs = tl.load(gs_ptr + flat_o * n_rows + rows, mask=in_seq, other=0.0)",
            "else:",
            "    " + load_do,
            *dpw,
            *to_end_lines,
            "if DV:",
            f"    k_end = tl.trans(k) * {to_end}",
            "    dv = tl.dot(tl.trans(a), do, input_precision='ieee') + tl.dot(k_end, R, input_precision='ieee')",
            "    vdv = tl.sum(v * dv, 1)",
            "    if ROW_SUM:  # the ones column's dV in the decay's sum",
            "        vdv += tl.sum(a * gs[:, None], 0) + tl.sum(k_end * r[None, :], 1)",
            "    tl.store(rs_ptr + flat_o * n_rows + rows, rows.to(tl.float32) * vdv, mask=in_seq)",
            f"    tl.store(g2_ptr + {g_off}n_vfeat + offs_e[None, :], dv, mask={e_ok})",
            "if DK:",
            f"    dk = tl.dot(tl.trans(dpw), q, input_precision='ieee') + "
            f"tl.dot(v * {to_end}, tl.trans(R), input_precision='ieee')",
            "    if ROW_SUM:  # the ones column's key gradient",
            f"        dk += {to_end} * r[None, :]",
            f"    tl.store(g1_ptr + {g_off}n_feat + offs_d[None, :], dk, mask=in_seq[:, None] & (offs_d[None, :] < n_feat))",
            *from_lines, *chunk_lines,
            f"q_start = q * {from_start}",
            f"R = R * {chunk_decay} + tl.dot(tl.trans(q_start), do, input_precision='ieee')",
            "if ROW_SUM:",
            f"    r = r * {chunk_decay} + tl.sum(q_start * gs[:, None], 0)"]
        head = [*_indent(self.decode()),
                "    flat_o = tl.program_id(0).to(tl.int64)",
                "    offs_c = tl.arange(0, BLOCK_C)",
                "    offs_d = tl.arange(0, BLOCK_D)",
                "    offs_e = tl.arange(0, BLOCK_E)",
                *_indent(list(em.prologue)),
                *_indent(bases),
                f"    do_base = do_ptr + {do_off}"]
        sig = (f"{', '.join(args)}, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, "
               "ROW_SUM: tl.constexpr")
        src = ["@triton.jit", f"def {self.name}_fwd({sig}):",
               '    """dQ and t (dO . O) of one (batch, head): chunks in order, the state S carried."""',
               *head,
               "    S = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
               "    z = tl.zeros([BLOCK_D], dtype=tl.float32)",
               "    for c0 in range(0, n_rows, BLOCK_C):", *_indent(fwd, 2),
               "", "",
               "@triton.jit", f"def {self.name}_rev({sig}, DK: tl.constexpr, DV: tl.constexpr):",
               '    """dK (DK), dV and t (V . dV) (DV) of one (batch, head): chunks in reverse, the state R carried."""',
               *head,
               "    R = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
               "    r = tl.zeros([BLOCK_D], dtype=tl.float32)",
               "    n_chunks = tl.cdiv(n_rows, BLOCK_C)",
               "    for t_rev in range(0, n_chunks):", *_indent(rev, 2)]
        return "\n".join(src) + "\n", tensors, scalars, dict(em.host_scalars)
