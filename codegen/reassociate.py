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

    def generate_text(self) -> tuple[str, list[str], list[str], dict]:
        p, em = self.plan, self.em
        term = p.terms[0]
        kn, vn = term.k.input.name, p.v.input.name
        k_off = self.operand_offset(term.k, self.kv_env)
        v_off = self.operand_offset(p.v, self.kv_env)
        key_env = {**self.kv_env, p.j: Val("offs_n[None, :]", frozenset("n"), ir.INT)}
        k_map = self.feature_map(term.k, "k", key_env, p.d, "offs_d[:, None]", "n_feat")
        v_env = {**self.kv_env, p.j: Val("offs_n[:, None]", frozenset("n"), ir.INT)}
        v_map = self.feature_map(p.v, "v", v_env, p.e, "offs_e[None, :]", "n_vfeat")
        qn, q_off = term.q.input.name, self.operand_offset(term.q)
        em.prologue = []
        queries = [f"q = tl.load({names.tensor('ptr', qn)} + {q_off} + offs_m[:, None] * "
                   f"{names.tensor('st', qn, term.q.row)} + offs_d[None, :] * {names.tensor('st', qn, term.q.feature)}, "
                   "mask=row_ok[:, None] & (offs_d[None, :] < n_feat), other=0.0)",
                   *self.feature_map(term.q, "q", em.env, p.d, "offs_d[None, :]", "n_feat"),
                   "q = tl.where(offs_d[None, :] < n_feat, q.to(tl.float32), 0.0) * qk_scale"]
        q_prologue = list(em.prologue)
        tensors = list(em.tensors)
        scalars = self.scalar_arg_names()
        strides, dims = tensor_args(em.tensors)
        outer = [names.user("size", ix) for ix in p.outer]
        common = ([names.tensor("ptr", t) for t in tensors] + ["state_ptr", "z_ptr"] + strides + dims + outer
                  + ["n_rows", "n_cols", "n_feat", "n_vfeat"])
        constexprs = "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, " \
                     "ROW_SUM: tl.constexpr"
        decode = ["pid_o = tl.program_id(1).to(tl.int64)", "combo = pid_o"]
        for ix in reversed(p.outer):
            size = names.user("size", ix)
            decode += [f"{names.user('idx', ix)} = pid_o % {size}", f"pid_o = pid_o // {size}"]
        state_at = "combo * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :]"
        out_axes = p.output.axes
        o_strides = [f"o_s{k}" for k in range(len(out_axes))]
        o_off = " + ".join(f"offs_m[:, None] * {st}" if ax == p.i else f"offs_e[None, :] * {st}" if ax == p.e
                           else f"{names.user('idx', ax)} * {st}" for ax, st in zip(out_axes, o_strides))
        state = [
            "@triton.jit",
            f"def {self.name}_state({', '.join(common + scalars)}, {constexprs}):",
            '    """Per (batch, head): S = sum_j f(k_j)^T v_j and z = sum_j f(k_j), in fp32."""',
            *_indent(decode),
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            f"    k_base = {names.tensor('ptr', kn)} + {k_off}",
            f"    v_base = {names.tensor('ptr', vn)} + {v_off}",
            "    S = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)",
            "    z = tl.zeros([BLOCK_D], dtype=tl.float32)",
            "    for start_n in range(0, n_cols, BLOCK_N):",
            "        offs_n = start_n + tl.arange(0, BLOCK_N)",
            "        k_ok = (offs_n[None, :] < n_cols) & (offs_d[:, None] < n_feat)",
            f"        k = tl.load(k_base + offs_d[:, None] * {names.tensor('st', kn, term.k.feature)} + offs_n[None, :] * "
            f"{names.tensor('st', kn, term.k.row)}, mask=k_ok, other=0.0)",
            *_indent(k_map, 2),
            "        k = tl.where(k_ok, k.to(tl.float32), 0.0)  # padded keys and features add nothing",
            "        v_ok = (offs_n[:, None] < n_cols) & (offs_e[None, :] < n_vfeat)",
            f"        v = tl.load(v_base + offs_n[:, None] * {names.tensor('st', vn, p.v.row)} + offs_e[None, :] * "
            f"{names.tensor('st', vn, p.v.feature)}, "
            "mask=v_ok, other=0.0)",
            *_indent(v_map, 2),
            "        v = tl.where(v_ok, v.to(tl.float32), 0.0)",
            "        S += tl.dot(k, v, input_precision='ieee')",
            "        z += tl.sum(k, 1)",
            f"    tl.store(state_ptr + {state_at}, S)",
            "    tl.store(z_ptr + combo * BLOCK_D + offs_d, z)",
        ]
        apply = [
            "@triton.jit",
            f"def {self.name}_apply({', '.join(common + ['o_ptr'] + o_strides + scalars)}, {constexprs}):",
            '    """Per query tile: o = f(q) S, divided by f(q) . z for normalised linear attention."""',
            "    pid_m = tl.program_id(0)",
            *_indent(decode),
            "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            "    row_ok = offs_m < n_rows",
            *_indent(q_prologue),
            *_indent(queries),
            f"    S = tl.load(state_ptr + {state_at})",
            "    z = tl.load(z_ptr + combo * BLOCK_D + offs_d)",
            "    out = tl.dot(q, S, input_precision='ieee')",
            "    if ROW_SUM:",
            "        out = out / tl.sum(q * z[None, :], 1)[:, None]",
            f"    tl.store(o_ptr + {o_off}, out.to(o_ptr.dtype.element_ty), "
            "mask=row_ok[:, None] & (offs_e[None, :] < n_vfeat))",
        ]
        return "\n".join(state) + "\n\n\n" + "\n".join(apply) + "\n", tensors, scalars, dict(em.host_scalars)
