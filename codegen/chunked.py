"""Chunked causal linear attention: a `D x E` state carried across chunks of the sequence.

For causal weights `f(q_i) . f(k_j) * lam ** (i - j)` (lam = 1 without decay; Lightning
Attention, TransNormer, causal linear attention), one program per (batch, head) walks the
sequence in chunks of C tokens:

    inside a chunk:  o_c  = (Q_c K_c^T * decay * causal) V_c            (a C x C tile)
    across chunks:   o_c += (Q_c * lam^(i - c0 + 1)) S
    state update:    S    = lam^C S + (K_c * lam^(c0 + C - 1 - j))^T V_c

so the work is linear in the sequence length. The decays come from the spec's own decay
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
from attncc.passes.linear import decay_factor
from attncc.passes.row_stream import RowStreamPlan


class ChunkedCodegen(RowStreamCodegen):
    """The chunked-scan kernel of a chunkable plan."""

    def __init__(self, plan: RowStreamPlan, name: str):
        super().__init__(plan, name)
        self.name = f"{name}_chunked"

    def decay(self, env_i: Val, env_j: Val) -> tuple[list[str], str]:
        """Code of the decay factor at the given query and key index values ('1.0' without decay)."""
        factor = decay_factor(self.plan)
        if factor is None:
            return [], "1.0"
        em = self.em
        env = {**em.env, self.plan.i: env_i, self.plan.j: env_j}
        saved, em.prologue, em.body = (em.prologue, em.body), [], []
        val = em.emit(factor, env)
        lines = [*em.prologue, *em.body]
        em.prologue, em.body = saved
        return lines, val.code

    def generate_text(self) -> tuple[str, list[str], list[str], dict]:
        p, em = self.plan, self.em
        term = p.terms[0]
        qn, kn, vn = term.q.input.name, term.k.input.name, p.v.input.name
        q_off, k_off, v_off = self.operand_offset(term.q), self.operand_offset(term.k), self.operand_offset(p.v)
        rows_m = Val("rows[:, None]", frozenset("m"), ir.INT)
        rows_n = Val("rows[None, :]", frozenset("n"), ir.INT)
        before = Val("(c0 - 1)", frozenset(), ir.INT)
        last = Val("(c0 + BLOCK_C - 1)", frozenset(), ir.INT)
        intra_lines, intra = self.decay(rows_m, rows_n)
        row_lines, row_decay = self.decay(rows_m, before)
        col_lines, col_decay = self.decay(last, rows_n)
        chunk_lines, chunk_decay = self.decay(last, before)
        q_env = {**em.env, p.i: rows_m}
        k_env = {**em.env, p.j: rows_n}
        v_env = {**em.env, p.j: rows_m}
        q_map = self.feature_map(term.q, "q", q_env, p.d, "offs_d[None, :]", "n_feat")
        k_map = self.feature_map(term.k, "k", k_env, p.d, "offs_d[:, None]", "n_feat")
        v_map = self.feature_map(p.v, "v", v_env, p.e, "offs_e[None, :]", "n_vfeat")
        tensors = list(em.tensors)
        scalars = self.scalar_arg_names()
        strides, dims = tensor_args(em.tensors)
        out_axes = p.output.axes
        o_strides = [f"o_s{k}" for k in range(len(out_axes))]
        o_off = " + ".join(f"rows[:, None] * {st}" if ax == p.i else f"offs_e[None, :] * {st}" if ax == p.e
                           else f"{names.user('idx', ax)} * {st}" for ax, st in zip(out_axes, o_strides))
        args = ([names.tensor("ptr", t) for t in tensors] + ["o_ptr"] + strides + dims + o_strides
                + [names.user("size", ix) for ix in p.outer] + ["n_rows", "n_cols", "n_feat", "n_vfeat"] + scalars)
        decode = ["pid_o = tl.program_id(0).to(tl.int64)"]
        for ix in reversed(p.outer):
            size = names.user("size", ix)
            decode += [f"{names.user('idx', ix)} = pid_o % {size}", f"pid_o = pid_o // {size}"]
        body = [
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
            "v = tl.where(in_seq[:, None], v.to(tl.float32), 0.0)",
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
            "BLOCK_E: tl.constexpr, ROW_SUM: tl.constexpr):",
            '    """One (batch, head): chunks of BLOCK_C tokens in order, a D x E state carried across."""',
            *_indent(decode),
            "    offs_c = tl.arange(0, BLOCK_C)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            *_indent(list(em.prologue)),
            f"    q_base = {names.tensor('ptr', qn)} + {q_off}",
            f"    k_base = {names.tensor('ptr', kn)} + {k_off}",
            f"    v_base = {names.tensor('ptr', vn)} + {v_off}",
            "    S = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
            "    z = tl.zeros([BLOCK_D], dtype=tl.float32)",
            "    for c0 in range(0, n_rows, BLOCK_C):",
            *_indent(body, 2),
        ]
        return "\n".join(src) + "\n", tensors, scalars, dict(em.host_scalars)
