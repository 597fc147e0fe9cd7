"""Reassociated linear attention: `o = f(Q) (f(K)^T V)` instead of `(f(Q) f(K)^T) V`.

When the weights are the plain product `f(q_i) . f(k_j)` (no softmax, no score
modification) and no mask restricts the pairs at run time, the sum over keys can be taken
first: a *state* kernel reduces `S = sum_j f(k_j)^T v_j` (D x E) and `z = sum_j f(k_j)`
per (batch, head), and an *apply* kernel computes `o_i = f(q_i) S` (divided by
`f(q_i) . z` for normalised linear attention). The work is linear in the sequence length
instead of quadratic. This is DESIGN.md's reduce-then-apply skeleton; the row-streaming
kernel of the same spec stays in the module for calls where a mask applies (a causal
switch that is on). Which plans get these kernels (`reassociable`) and which calls run
them (`choose_path`) is decided in `passes/linear.py`.
"""
from __future__ import annotations

from attncc import ir
from attncc.codegen import names
from attncc.codegen.row_stream import RowStreamCodegen, _indent, tensor_args
from attncc.codegen.tile_expr import Val
from attncc.passes.row_stream import RowStreamPlan


class ReassociatedCodegen(RowStreamCodegen):
    """The state and apply kernels of a reassociable plan."""

    def __init__(self, plan: RowStreamPlan, name: str):
        super().__init__(plan, name)
        self.name = f"{name}_linear"
        p, em = self.plan, self.em
        term = p.terms[0]
        self.decode = ["pid_o = tl.program_id(1).to(tl.int64)", "combo = pid_o"]  # then the operands' offsets
        for ix in reversed(p.outer):
            size = names.user("size", ix)
            self.decode += [f"{names.user('idx', ix)} = pid_o % {size}", f"pid_o = pid_o // {size}"]
        em.prologue = []
        qn, q_off = term.q.input.name, self.operand_offset(term.q)
        self.k_off = self.operand_offset(term.k, self.kv_env)
        self.v_off = self.operand_offset(p.v, self.kv_env)
        self.decode += list(em.prologue)  # the operands' offsets (a GQA group's K/V head)
        em.prologue = []
        self.queries = [  # a query tile (offs_m, row_ok) in fp32, feature-mapped, times qk_scale
            f"q = tl.load({names.tensor('ptr', qn)} + {q_off} + offs_m[:, None] * "
            f"{names.tensor('st', qn, term.q.row)} + offs_d[None, :] * {names.tensor('st', qn, term.q.feature)}, "
            "mask=row_ok[:, None] & (offs_d[None, :] < n_feat), other=0.0)",
            *self.feature_map(term.q, "q", em.env, p.d, "offs_d[None, :]", "n_feat"),
            "q = tl.where(offs_d[None, :] < n_feat, q.to(tl.float32), 0.0) * qk_scale"]
        self.q_prologue = list(em.prologue)
        self.keys = self.key_loads()
        self.tensors = list(em.tensors)
        self.scalars = self.scalar_arg_names()
        strides, dims = tensor_args(em.tensors)
        self.common = ([names.tensor("ptr", t) for t in self.tensors] + ["state_ptr", "z_ptr"] + strides + dims
                       + [names.user("size", ix) for ix in p.outer] + ["n_rows", "n_cols", "n_feat", "n_vfeat"])
        self.constexprs = "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, " \
                          "BLOCK_E: tl.constexpr, ROW_SUM: tl.constexpr"

    def key_loads(self) -> list[str]:
        """A key block (offs_n): k ([D, BLOCK_N]) and v ([BLOCK_N, E]) in fp32, feature-mapped,
        zero past the keys and the features."""
        p, term = self.plan, self.plan.terms[0]
        kn, vn = term.k.input.name, p.v.input.name
        key_env = {**self.kv_env, p.j: Val("offs_n[None, :]", frozenset("n"), ir.INT)}
        v_env = {**self.kv_env, p.j: Val("offs_n[:, None]", frozenset("n"), ir.INT)}
        return [
            "k_ok = (offs_n[None, :] < n_cols) & (offs_d[:, None] < n_feat)",
            f"k = tl.load(k_base + offs_d[:, None] * {names.tensor('st', kn, term.k.feature)} + offs_n[None, :] * "
            f"{names.tensor('st', kn, term.k.row)}, mask=k_ok, other=0.0)",
            *self.feature_map(term.k, "k", key_env, p.d, "offs_d[:, None]", "n_feat"),
            "k = tl.where(k_ok, k.to(tl.float32), 0.0)  # padded keys and features add nothing",
            "v_ok = (offs_n[:, None] < n_cols) & (offs_e[None, :] < n_vfeat)",
            f"v = tl.load(v_base + offs_n[:, None] * {names.tensor('st', vn, p.v.row)} + offs_e[None, :] * "
            f"{names.tensor('st', vn, p.v.feature)}, mask=v_ok, other=0.0)",
            *self.feature_map(p.v, "v", v_env, p.e, "offs_e[None, :]", "n_vfeat"),
            "v = tl.where(v_ok, v.to(tl.float32), 0.0)"]

    def kv_bases(self) -> list[str]:
        term, p = self.plan.terms[0], self.plan
        return [f"k_base = {names.tensor('ptr', term.k.input.name)} + {self.k_off}",
                f"v_base = {names.tensor('ptr', p.v.input.name)} + {self.v_off}"]

    def state_kernel(self) -> list[str]:
        """Per (batch, head): S = sum_j f(k_j)^T v_j and z = sum_j f(k_j)."""
        return [
            "@triton.jit",
            f"def {self.name}_state({', '.join(self.common + self.scalars)}, {self.constexprs}):",
            '    """Per (batch, head): S = sum_j f(k_j)^T v_j and z = sum_j f(k_j), in fp32."""',
            *_indent(self.decode),
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            *_indent(self.kv_bases()),
            "    S = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
            "    z = tl.zeros([BLOCK_D], dtype=tl.float32)",
            "    for start_n in range(0, n_cols, BLOCK_N):",
            "        offs_n = start_n + tl.arange(0, BLOCK_N)",
            *_indent(self.keys, 2),
            "        S += tl.dot(k, v, input_precision='ieee')",
            "        z += tl.sum(k, 1)",
            f"    tl.store(state_ptr + {STATE_AT}, S)",
            f"    tl.store(z_ptr + {Z_AT}, z)",
        ]

    def query_head(self) -> list[str]:
        """The start of a kernel per query tile: its indices, its tile of q and the state."""
        return [
            "    pid_m = tl.program_id(0)",
            *_indent(self.decode),
            "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            "    row_ok = offs_m < n_rows",
            *_indent(self.q_prologue),
            *_indent(self.queries),
            f"    S = tl.load(state_ptr + {STATE_AT})",
            f"    z = tl.load(z_ptr + {Z_AT})"]

    def generate_text(self) -> tuple[str, list[str], list[str], dict]:
        p = self.plan
        out_axes = p.output.axes
        o_strides = [f"o_s{k}" for k in range(len(out_axes))]
        o_off = " + ".join(f"offs_m[:, None] * {st}" if ax == p.i else f"offs_e[None, :] * {st}" if ax == p.e
                           else f"{names.user('idx', ax)} * {st}" for ax, st in zip(out_axes, o_strides))
        apply = [
            "@triton.jit",
            f"def {self.name}_apply({', '.join(self.common + ['o_ptr'] + o_strides + self.scalars)}, "
            f"{self.constexprs}):",
            '    """Per query tile: o = f(q) S, divided by f(q) . z for normalised linear attention."""',
            *self.query_head(),
            "    out = tl.dot(q, S, input_precision='ieee')",
            "    if ROW_SUM:",
            "        out = out / tl.sum(q * z[None, :], 1)[:, None]",
            f"    tl.store(o_ptr + {o_off}, out.to(o_ptr.dtype.element_ty), "
            "mask=row_ok[:, None] & (offs_e[None, :] < n_vfeat))",
        ]
        text = "\n".join(self.state_kernel()) + "\n\n\n" + "\n".join(apply) + "\n"
        return text, self.tensors, self.scalars, dict(self.em.host_scalars)


STATE_AT = "combo * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :]"  # a (D, E) state's slot
Z_AT = "combo * BLOCK_D + offs_d"  # a D-vector's slot


class ReassociatedBackwardCodegen(ReassociatedCodegen):
    """The linear-time backward of a reassociable plan, for calls without an active mask:
    the forward's state kernel (S = K^T V, z = K^T 1), then per query tile

        dQ = g S^T + gs z^T     (g = dO / den, gs = -rowsum(dO * o) / den with a row-sum
                                 normaliser den = q . z, stored for the next kernel; g = dO, gs = 0 without)

    then per (batch, head) the reverse states `U = Q^T g` (D x E) and `u = Q^T gs`, and per key
    tile `dV = K U`, `dK = V U^T + u` (the ones column the normaliser adds to the values). The
    gradients are those of the feature-mapped operands (the launcher chains them through the maps)."""

    def __init__(self, plan: RowStreamPlan, name: str):
        super().__init__(plan, name)
        self.name = f"{name}_linear_bwd"

    def generate_text(self) -> tuple[str, list[str], list[str], dict]:
        p = self.plan
        rows = [f"do_s{k}" for k in range(len(p.outer))] + ["do_si", "do_se"]
        do_off = " + ".join(f"{names.user('idx', ix)} * do_s{k}" for k, ix in enumerate(p.outer)) or "0"
        args = ", ".join(self.common + ["do_ptr", "gn_ptr", "gs_ptr", "g1_ptr", "g2_ptr", "u_ptr", "uz_ptr"]
                         + rows + self.scalars)
        e_ok = "row_ok[:, None] & (offs_e[None, :] < n_vfeat)"
        g_at = "(combo * n_rows + offs_m[:, None]) * n_vfeat + offs_e[None, :]"
        dq = [
            "@triton.jit",
            f"def {self.name}_dq({args}, {self.constexprs}):",
            '    """Per query tile: dQ = g S^T + gs z^T; with a row-sum normaliser g and gs stored."""',
            *self.query_head(),
            f"    do = tl.load(do_ptr + {do_off} + offs_m[:, None] * do_si + offs_e[None, :] * do_se, "
            f"mask={e_ok}, other=0.0).to(tl.float32)",
            "    dq = tl.dot(do, tl.trans(S), input_precision='ieee')",
            "    if ROW_SUM:  # o = num / den: dnum = dO / den, dden = -rowsum(dO * o) / den",
            "        den = tl.where(row_ok, tl.sum(q * z[None, :], 1), 1.0)",
            "        out = tl.dot(q, S, input_precision='ieee') / den[:, None]",
            "        gs = -tl.sum(out * do, 1) / den",
            "        do = do / den[:, None]",
            "        dq = dq / den[:, None] + gs[:, None] * z[None, :]",
            f"        tl.store(gn_ptr + {g_at}, do, mask={e_ok})",
            "        tl.store(gs_ptr + combo * n_rows + offs_m, gs, mask=row_ok)",
            "    tl.store(g1_ptr + (combo * n_rows + offs_m[:, None]) * n_feat + offs_d[None, :], dq * qk_scale, "
            "mask=row_ok[:, None] & (offs_d[None, :] < n_feat))",
        ]
        reverse = [
            "@triton.jit",
            f"def {self.name}_rev_state({args}, {self.constexprs}):",
            '    """Per (batch, head): U = sum_i f(q_i)^T g_i and u = sum_i f(q_i) gs_i, in fp32."""',
            *_indent(self.decode),
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            *_indent(self.q_prologue),
            "    U = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
            "    u = tl.zeros([BLOCK_D], dtype=tl.float32)",
            "    for start_m in range(0, n_rows, BLOCK_M):",
            "        offs_m = start_m + tl.arange(0, BLOCK_M)",
            "        row_ok = offs_m < n_rows",
            *_indent(self.queries, 2),
            "        q = tl.where(row_ok[:, None], q, 0.0)",
            "        if ROW_SUM:",
            f"            g = tl.load(gn_ptr + {g_at}, mask={e_ok}, other=0.0)",
            "            u += tl.sum(q * tl.load(gs_ptr + combo * n_rows + offs_m, mask=row_ok, other=0.0)[:, None], 0)",
            "        else:",
            f"            g = tl.load(do_ptr + {do_off} + offs_m[:, None] * do_si + offs_e[None, :] * do_se, "
            f"mask={e_ok}, other=0.0).to(tl.float32)",
            "        U += tl.dot(tl.trans(q), g, input_precision='ieee')",
            f"    tl.store(u_ptr + {STATE_AT}, U)",
            f"    tl.store(uz_ptr + {Z_AT}, u)",
        ]
        keys = [
            "@triton.jit",
            f"def {self.name}_dkdv({args}, {self.constexprs}):",
            '    """Per key tile: dV = f(K) U, dK = V U^T + u."""',
            "    pid_n = tl.program_id(0)",
            *_indent(self.decode),
            "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            *_indent(self.kv_bases()),
            *_indent(self.keys),
            f"    U = tl.load(u_ptr + {STATE_AT})",
            "    dk = tl.dot(v, tl.trans(U), input_precision='ieee')",
            "    if ROW_SUM:",
            f"        dk += tl.load(uz_ptr + {Z_AT})[None, :]",
            "    dv = tl.dot(tl.trans(k), U, input_precision='ieee')",
            "    key_ok = offs_n[:, None] < n_cols",
            "    tl.store(g1_ptr + (combo * n_cols + offs_n[:, None]) * n_feat + offs_d[None, :], dk, "
            "mask=key_ok & (offs_d[None, :] < n_feat))",
            "    tl.store(g2_ptr + (combo * n_cols + offs_n[:, None]) * n_vfeat + offs_e[None, :], dv, "
            "mask=key_ok & (offs_e[None, :] < n_vfeat))",
        ]
        text = "\n\n\n".join("\n".join(k) for k in (self.state_kernel(), dq, reverse, keys)) + "\n"
        return text, self.tensors, self.scalars, dict(self.em.host_scalars)
