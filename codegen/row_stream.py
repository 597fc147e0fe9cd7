"""Triton source for the row-streaming skeleton: a FlashAttention-style forward kernel.

One program owns one query tile of one (batch, head): it loads its queries once, walks
the key tiles the mask allows, and keeps an online softmax in fp32 (running max and sum,
in base 2: the score scale and log2(e) multiply the fp32 scores, q stays as loaded). Key
tiles come in two kinds: *full* tiles, where every (query, key) pair is allowed and no
predicate is evaluated, and *partial* tiles, where the spec's mask runs per element. Which tiles are which comes from
the sympy mask analysis (loop bounds computed in the kernel) or, for masks that
depend on tensors or are not affine, from a runtime block map: per query tile, a
list of key tiles with the full ones first.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

import sympy

from attncc import ir
from attncc.codegen import block_map, names
from attncc.codegen.pytext import docstring
from attncc.codegen.mask_code import guard_code, printed
from attncc.codegen.tile_expr import TileEmitter, Val, as_float
from attncc.passes.kinds import MaskMode, WeightKind
from attncc.passes.linear import chunkable, linear_plan, reassociable
from attncc.passes.mask_sympy import code_name
from attncc.passes.row_stream import RowStreamPlan, map_outer

LOG2E = 1.4426950408889634


@dataclass
class KernelSource:
    """Generated source plus everything the launcher needs to call it."""

    name: str
    source: str
    tensor_inputs: list[str]          # input names passed as pointers, in order
    scalar_args: list[str]            # dims, params and host-evaluated scalars, in order
    host_scalars: dict[str, ir.Node]  # name -> scalar expression evaluated at launch
    mask_mode: MaskMode               # none, affine or block_map: how key tiles are found
    block_map: "block_map.BlockMapSource | None" = None
    packed: "KernelSource | None" = None  # the GQA-packed variant, in the same module
    statistics: dict = field(default_factory=dict)  # node -> (plan, source) of its statistics pass
    reassociated: "LinearSource | None" = None  # f(Q) (f(K)^T V) kernels, for mask-free calls
    chunked: "LinearSource | None" = None  # the chunked causal scan, for causal calls


@dataclass
class LinearSource:
    """Kernels of the linear-attention plans (reassociated, chunked) and their arguments."""

    name: str
    tensor_inputs: list[str]
    scalar_args: list[str]
    host_scalars: dict


def _indent(lines, n=1):
    pad = "    " * n
    return [pad + ln if ln else ln for ln in lines]


def _free_names(lines: list[str], bound: set[str]) -> list[str]:
    """Names a block of code reads but does not assign (the inner function's arguments)."""
    tree = ast.parse("\n".join(lines) or "pass")
    assigned, used = set(bound), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in assigned \
                and node.id not in used and node.id not in ("tl", "float", "triton", "range"):
            used.append(node.id)
    return sorted(used)


class RowStreamCodegen:
    """Fills the row-streaming skeleton with the expressions of one plan."""

    def __init__(self, plan: RowStreamPlan, name: str, packed: bool = False):
        """`packed`: the GQA variant, where a tile's rows are (query, head) pairs of the
        query heads sharing one K/V head, so each K/V tile is loaded once for all of them."""
        self.plan = plan
        self.packed = packed
        self.name = name + ("_packed" if packed else "")
        p = plan
        self.row = "i_rows" if packed else "offs_m"
        env = {p.i: Val(f"{self.row}[:, None]", frozenset("m"), ir.INT),
               p.j: Val("offs_n[None, :]", frozenset("n"), ir.INT)}
        for ix in (*p.outer, *p.summed_outer):
            env[ix] = Val(names.user("idx", ix), frozenset(), ir.INT)
        self.kv_env = dict(env)
        if packed:
            h = p.group[0]
            env[h] = Val("h_rows[:, None]", frozenset("m"), ir.INT)
            self.kv_env[h] = Val(f"({names.user('grp', h)} * group)", frozenset(), ir.INT)
        self.coefs: list[str] = []  # the code of each term's coefficient (after combine_lines)
        self.em = TileEmitter(p.program, env)
        self.em.in_bounds = {p.i, p.j}
        self.em.materialized = dict(p.precomputed.inputs) if p.precomputed else {}

    # ------------------------------------------------------------------ pieces
    def operand_offset(self, op, env=None) -> str:
        """Base offset of a q/k/v tile: the outer arguments times their strides."""
        parts = []
        for k, arg in op.outer_args():
            val = self.em.emit(arg, env)
            if val.const == 0:
                continue
            parts.append(f"{val.code} * {names.tensor('st', op.input.name, k)}")
        self.em.tensors[op.input.name] = op.input
        return " + ".join(parts) if parts else "0"

    # ------------------------------------------------------------------ per-term names
    def sfx(self, t: int) -> str:
        """Suffix of a term's variables: none for the common single-term kernel."""
        return "" if len(self.plan.terms) == 1 else str(t)

    def state(self, t: int) -> list[str]:
        """The loop-carried state of a term: an accumulator, plus max and sum for softmaxes."""
        x = self.sfx(t)
        if self.plan.statistics_only:
            return [f"m_i{x}", f"l_i{x}"]
        if self.plan.terms[t].kind == WeightKind.POINTWISE:
            return [f"acc{x}", f"l_i{x}"] if self.plan.row_sum else [f"acc{x}"]
        return [f"acc{x}", f"m_i{x}", f"l_i{x}"]

    def states(self) -> list[str]:
        return [v for t in range(len(self.plan.terms)) for v in self.state(t)]

    # ------------------------------------------------------------------ tile body
    def score_lines(self, t: int) -> list[str]:
        """Per-tile code of a term's weights: the score `s` in base-2 units for softmaxes,
        the weight `p` itself for pointwise terms."""
        term, em, x = self.plan.terms[t], self.em, self.sfx(t)
        em.body = []
        qk = Val(f"qk{x}", frozenset("mn"), ir.FLOAT)
        if term.folds_log2e:  # a plain softmax: the scores in base 2 are one multiply away
            return ["if FOLD_SCALE:  # a positive scale: it goes into the max and the exp2 argument (one FFMA)",
                    f"    s{x} = qk{x}",
                    "else:",
                    f"    s{x} = qk{x} * qk_scale{x}  # the score scale and log2(e), applied to the fp32 scores"]
        scaled = [f"qk{x} = qk{x} * qk_scale{x}  # the score's scalar factors, applied to the fp32 scores"] \
            if term.scale else []
        if term.qk_factors:
            extra = [em.emit(f) for f in term.qk_factors]
            qk = em.assign(f"qk{x} * " + " * ".join(f.code for f in extra), frozenset("mn"), ir.FLOAT, term.qk)
        em.bind(term.qk, qk)
        s = em.emit(term.score)
        lines = scaled + list(em.body)
        if term.kind == WeightKind.POINTWISE:
            lines.append(f"p{x} = {s.code}  # an elementwise weight: no normaliser")
        else:
            lines.append(f"s{x} = {s.code} * {LOG2E}  # to base-2 units for exp2")
        return lines

    def mask_lines(self) -> list[str]:
        """Per-tile code for partial tiles: the spec's masks per element, applied to every term."""
        p, em = self.plan, self.em
        em.body = []
        preds = [em.emit(m.pred) for m in p.masks]
        lines = list(em.body)
        allowed = " & ".join(f"({v.code})" for v in preds)
        apply = []
        for t, term in enumerate(p.terms):
            x = self.sfx(t)
            if term.kind == WeightKind.POINTWISE:
                apply.append(f"p{x} = tl.where(allowed, p{x}, 0.0)")
            else:
                apply.append(f"s{x} = tl.where(allowed, s{x}, float('-inf'))")
        if not allowed:  # only the key bound: nothing to do on whole key tiles (EVEN_N)
            return lines + ["if KEY_MASK:", "    allowed = offs_n[None, :] < n_cols", *_indent(apply)]
        return lines + [f"allowed = {allowed}",
                        "if KEY_MASK:  # a tile that may run past the last key",
                        "    allowed = allowed & (offs_n[None, :] < n_cols)", *apply]

    def key_loads(self) -> tuple[list[str], dict[str, str]]:
        """Load each distinct key tensor's tile once per key tile."""
        lines, tiles = [], {}
        for term in self.plan.terms:
            k = term.k
            if k.input.name in tiles:
                continue
            var = names.tensor("ktile", k.input.name) if len(self.plan.terms) > 1 else "k"
            tiles[k.input.name] = var
            kn = k.input.name
            # pointers built per tile from a scalar base: a pointer tile held across the loop
            # would cost BLOCK_D * BLOCK_N registers' worth of 64-bit addresses (and spills)
            ptr = (f"{names.tensor('kbase', kn)} + offs_d[:, None] * {names.tensor('st', kn, k.feature)} "
                   f"+ offs_n[None, :] * {names.tensor('st', kn, k.row)}")
            lines += ["if USE_TMA:  # a TMA box of [keys, features]: zero past the last key and feature",
                      f"    {var} = tl.trans({names.tensor('kdesc', kn)}.load([tl.cast(start_n, tl.int32), 0]))",
                      "elif KEY_MASK:  # a tile that may run past the last key",
                      f"    {var} = tl.load({ptr}, mask=(offs_n[None, :] < n_cols) & (offs_d[:, None] < n_feat), "
                      "other=0.0)",
                      "elif EVEN_D:  # whole key tiles, no padded features: no mask at all",
                      f"    {var} = tl.load({ptr})",
                      "else:",
                      f"    {var} = tl.load({ptr}, mask=offs_d[:, None] < n_feat, other=0.0)",
                      *self.feature_map(k, var, self.kv_env, self.plan.d, "offs_d[:, None]", "n_feat"),
                      "if UPCAST_DOT:  # Triton's interpreter mishandles bfloat16 dots; compiled kernels never set it",
                      f"    {var} = {var}.to(tl.float32)"]
        return lines, tiles

    def feature_map(self, op, value: str, env: dict, feature: str, offsets: str, extent: str) -> list[str]:
        """An operand's elementwise feature map (`elu(q) + 1`), applied to its tile right
        after loading; padded features are zeroed again (the map need not keep 0 at 0)."""
        if op.transform is None:
            return []
        em = self.em
        env = {**env, feature: Val(offsets, frozenset("d"), ir.INT)}
        for read in _reads_of(op.transform, op.access):  # the textually repeated reads too
            em.bind(read, Val(f"{value}_f32", frozenset(), ir.FLOAT), env)
        saved, em.prologue, em.body = (em.prologue, em.body), [], []
        mapped = em.emit(op.transform, env)
        lines = [f"{value}_f32 = {value}.to(tl.float32)", *em.prologue, *em.body]
        em.prologue, em.body = saved
        return lines + [f"{value} = tl.where({offsets} < {extent}, {mapped.code}, 0.0).to({value}.dtype)"
                        "  # feature map, padding kept at 0"]

    def update_lines(self, t: int) -> list[str]:
        """The accumulator update of a term (online softmax, or a plain sum)."""
        term, x = self.plan.terms[t], self.sfx(t)
        if term.kind == WeightKind.POINTWISE:
            row_sum = [f"l_i{x} += tl.sum(p{x}, 1)  # the row sums the output is divided by"] if self.plan.row_sum else []
            return [*row_sum, f"acc{x} += tl.dot(p{x}.to(v.dtype), v, input_precision=PRECISION)"]
        if term.folds_log2e:  # plain scores are finite wherever a tile allows every pair
            guard = ["if MASKED:",
                     "    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with no allowed key yet",
                     "else:",
                     "    m_safe = m_new"]
        else:
            guard = ["m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with no finite score yet"]
        if term.folds_log2e:  # with FOLD_SCALE, s is the raw score and qk_scale > 0 scales it here
            row_max = ["if FOLD_SCALE:  # max(s) * scale == max(s * scale) for a positive scale",
                       f"    m_new = tl.maximum(m_i{x}, tl.max(s{x}, 1) * qk_scale{x})",
                       "else:",
                       f"    m_new = tl.maximum(m_i{x}, tl.max(s{x}, 1))"]
            exp = ["if FOLD_SCALE:",
                   f"    p = tl.exp2(s{x} * qk_scale{x} - m_safe[:, None])  # one FFMA per score",
                   "else:",
                   f"    p = tl.exp2(s{x} - m_safe[:, None])"]
        else:
            row_max = [f"m_new = tl.maximum(m_i{x}, tl.max(s{x}, 1))"]
            exp = [f"p = tl.exp2(s{x} - m_safe[:, None])"]
        return [f"# online softmax: running max m_i{x} and sum l_i{x} per query row (base 2)",
                *row_max,
                *guard,
                *exp,
                f"alpha = tl.exp2(m_i{x} - m_safe)",
                f"l_i{x} = l_i{x} * alpha + tl.sum(p, 1)",
                *([] if self.plan.statistics_only else
                  [f"acc{x} = acc{x} * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)"]),
                f"m_i{x} = m_new"]

    def tile_body(self) -> list[str]:
        p = self.plan
        loads, knames = self.key_loads()
        body = ["offs_n = start_n + tl.arange(0, BLOCK_N)", *loads]
        for t, term in enumerate(p.terms):
            x = self.sfx(t)
            body.append(f"qk{x} = tl.dot(q{x}, {knames[term.k.input.name]}, input_precision=PRECISION)")
            body += self.score_lines(t)
        body += ["if MASKED:", *_indent(self.mask_lines())]
        if p.statistics_only:  # the statistics pass: log-sum-exp only, no values
            return body + self.update_lines(0)
        vn = p.v.input.name
        v_ptr = (f"v_base + offs_n[:, None] * {names.tensor('st', vn, p.v.row)} "
                 f"+ offs_e[None, :] * {names.tensor('st', vn, p.v.feature)}")
        body += ["if USE_TMA:  # a TMA box of [keys, features]: zero past the last key and feature",
                 "    v = v_desc.load([tl.cast(start_n, tl.int32), 0])",
                 "elif KEY_MASK:",
                 f"    v = tl.load({v_ptr}, mask=(offs_n[:, None] < n_cols) & (offs_e[None, :] < n_vfeat), other=0.0)",
                 "elif EVEN_E:",
                 f"    v = tl.load({v_ptr})",
                 "else:",
                 f"    v = tl.load({v_ptr}, mask=offs_e[None, :] < n_vfeat, other=0.0)",
                 *self.feature_map(p.v, "v", {**self.kv_env, p.j: Val("offs_n[:, None]", frozenset("n"), ir.INT)},
                                   p.e, "offs_e[None, :]", "n_vfeat"),
                 "if UPCAST_DOT:",
                 "    v = v.to(tl.float32)"]
        for t in range(len(p.terms)):
            body += self.update_lines(t)
        return body

    # ------------------------------------------------------------------ prologue and epilogue
    def query_loads(self, row: str) -> list[str]:
        """Each term's queries, loaded once as they are (the score scale is applied to the
        fp32 scores, so q keeps its precision and the QK^T dot can read it from shared
        memory), and the base pointers of each distinct key tensor."""
        lines = []
        for t, term in enumerate(self.plan.terms):
            x, qn = self.sfx(t), term.q.input.name
            off = self.operand_offset(term.q)
            base = f"{names.tensor('ptr', qn)} + {off}"
            tma = [] if self.packed else [  # packed rows interleave heads: no 2-D box, pointers only
                "if USE_TMA:  # one TMA box of [queries, features], zero past the last row and feature",
                f"    q_desc{x} = "
                + tma_descriptor(base, "n_rows", "n_feat", names.tensor("st", qn, term.q.row), "BLOCK_M", "BLOCK_D"),
                f"    q{x} = q_desc{x}.load([pid_m * BLOCK_M, 0])",
                "else:"]
            lines += [*tma, *_indent([
                      f"q_ptrs{x} = {base} + {row}[:, None] * "
                      f"{names.tensor('st', qn, term.q.row)} + offs_d[None, :] * {names.tensor('st', qn, term.q.feature)}",
                      "if EVEN_M:  # whole query tiles",
                      "    if EVEN_D:",
                      f"        q{x} = tl.load(q_ptrs{x})",
                      "    else:",
                      f"        q{x} = tl.load(q_ptrs{x}, mask=offs_d[None, :] < n_feat, other=0.0)",
                      "else:",
                      f"    q{x} = tl.load(q_ptrs{x}, mask=row_ok[:, None] & (offs_d[None, :] < n_feat), other=0.0)"],
                      1 if tma else 0),
                      *self.feature_map(term.q, f"q{x}", self.em.env, self.plan.d, "offs_d[None, :]", "n_feat"),
                      "if UPCAST_DOT:",
                      f"    q{x} = q{x}.to(tl.float32)"]
        seen = set()
        for term in self.plan.terms:
            k = term.k
            if k.input.name in seen:
                continue
            seen.add(k.input.name)
            off = self.operand_offset(k, self.kv_env)
            kbase, kdesc = names.tensor('kbase', k.input.name), names.tensor('kdesc', k.input.name)
            lines += [f"{kbase} = {names.tensor('ptr', k.input.name)} + {off}",
                      "if USE_TMA:  # the [keys, features] view of this program's keys (the launcher checked "
                      "strides and alignment)",
                      f"    {kdesc} = " + tma_descriptor(kbase, "n_cols", "n_feat", names.tensor("st", k.input.name, k.row),
                                                     "BLOCK_N", "BLOCK_D"),
                      "else:",
                      f"    {kdesc} = None  # the pointer path"]
        return lines

    def value_base(self, v_off: str) -> list[str]:
        """The base pointer of this program's values, and their TMA descriptor."""
        vn = self.plan.v.input.name
        return [f"v_base = {names.tensor('ptr', vn)} + {v_off}",
                "if USE_TMA:",
                "    v_desc = " + tma_descriptor("v_base", "n_cols", "n_vfeat", names.tensor("st", vn, self.plan.v.row),
                                            "BLOCK_N", "BLOCK_E"),
                "else:",
                "    v_desc = None  # the pointer path"]

    def initial_state(self) -> list[str]:
        lines = []
        for t, term in enumerate(self.plan.terms):
            x = self.sfx(t)
            if not self.plan.statistics_only:
                lines.append(f"acc{x} = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)")
            if term.kind == WeightKind.POINTWISE and self.plan.row_sum:
                lines.append(f"l_i{x} = tl.zeros([BLOCK_M], dtype=tl.float32)")
            if term.kind == WeightKind.POINTWISE:
                continue
            if term.sink is None:
                lines += [f"m_i{x} = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)",
                          f"l_i{x} = tl.zeros([BLOCK_M], dtype=tl.float32)"]
                continue
            sink = self.em.emit(term.sink)  # in the prologue: a scalar, or a column over the rows
            lines += ["# the sink logit: a virtual key with value 0 that the max and sum start from (base 2)",
                      f"sink{x} = tl.max(tl.zeros([BLOCK_M, 1], dtype=tl.float32) + {as_float(sink)}, 1)",
                      f"m_i{x} = sink{x} * {LOG2E}",
                      f"l_i{x} = tl.full([BLOCK_M], 1.0, dtype=tl.float32)",
                      "if SPLIT:  # the sink counts once, in the first key split",
                      f"    m_i{x} = tl.where(pid_split == 0, m_i{x}, float('-inf'))",
                      f"    l_i{x} = tl.where(pid_split == 0, l_i{x}, 0.0)"]
        return lines

    def combine_lines(self) -> list[str]:
        """The output: each term normalised and weighed by its coefficient, then summed."""
        if self.plan.statistics_only:
            return ["l_safe = tl.where(l_i == 0.0, 1.0, l_i)"]
        lines, parts = [], []
        for t, term in enumerate(self.plan.terms):
            x = self.sfx(t)
            if term.kind == WeightKind.POINTWISE:
                part = f"acc{x} / tl.where(row_ok, l_i{x}, 1.0)[:, None]" if self.plan.row_sum else f"acc{x}"
                if self.plan.row_sum_switch is not None:  # `where(normalize, num / den, num)`
                    self.em.body = []
                    switch = self.em.emit(self.plan.row_sum_switch)
                    lines += self.em.body
                    part = f"tl.where({switch.code}, {part}, acc{x})"
            else:
                lines.append(f"l_safe{x} = tl.where(l_i{x} == 0.0, 1.0, l_i{x})")
                part = f"acc{x} / l_safe{x}[:, None]"
            if term.coef is not None:
                self.em.body = []
                coef = self.em.emit(term.coef)
                lines += self.em.body
                part = f"{coef.code} * ({part})"
                self.coefs.append(coef.code)
            parts.append(part)
        return lines + ["out = " + " + ".join(parts)]

    def lse_lines(self) -> list[str]:
        """The log-sum-exp of a row from its max and sum; where the max is still the sink's
        (no key scored higher: a row with no allowed key among them) it is `sink + log(l_i)`,
        so an empty row's is the sink logit exactly."""
        lse = f"m_i / {LOG2E} + tl.log(l_safe)"
        if self.plan.terms[0].sink is not None:
            lse = f"tl.where(m_i == sink * {LOG2E}, sink + tl.log(l_safe), {lse})"
        return [f"lse = tl.where(l_i == 0.0, float('-inf'), {lse})"]

    def skip_dead_heads(self, lines: list[str], live: list[str]) -> list[str]:
        """With a sum over heads, a head whose coefficients are 0 on every row of the tile
        (not chosen by a mixture-of-heads router) needs no key loop at all; so does a tile whose
        `row_weight` (the coefficient of a backward's per-head plan) is 0 on every row (`live`:
        `row_weight_live`'s lines, emitted before the prologue is taken)."""
        if self.plan.row_weight is not None:
            return [*live, "if live:  # some row of the tile weighs this head", *_indent(lines)]
        if not (self.plan.summed_outer and len(self.coefs) == len(self.plan.terms)):
            return lines
        live = " | ".join(f"(tl.max(tl.abs({c})) != 0)" for c in self.coefs)
        return [f"if {live}:  # some row of the tile weighs this head", *_indent(lines)]

    def row_weight_live(self) -> list[str]:
        """`live`: whether the plan's `row_weight` is nonzero on some row of the query tile."""
        self.em.body = []
        weight = self.em.emit(self.plan.row_weight)
        if weight.const is not None:
            return [f"live = {weight.const != 0}"]
        return [*self.em.body, f"live = tl.max(tl.abs({as_float(weight)})) != 0"]

    def summed_outer_loop(self, body: list[str]) -> list[str]:
        """The per-program work, once per value of the indices the output sums over
        (heads in mixture-of-heads); a head whose weights vanish on the whole tile is skipped."""
        p = self.plan
        if not p.summed_outer:
            return _indent(body)
        lines = ["out_sum = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)"]
        depth = 0
        for ix in p.summed_outer:
            lines.append("    " * depth + f"for {names.user('idx', ix)} in range(0, {names.user('size', ix)}):"
                         "  # summed by the output")
            depth += 1
        lines += _indent(body, depth) + ["    " * depth + "out_sum += out"]
        return _indent(lines + ["out = out_sum"])

    def scalar_arg_names(self) -> list[str]:
        """Every dim and param (bounds and guards refer to them), then the host-evaluated
        constants, then the score scale of each term. Every name but the scales is a key of
        `em.host_scalars`, whose node the launcher evaluates."""
        return scalar_args(self.plan.program, self.em.host_scalars) + \
            [f"qk_scale{self.sfx(t)}" for t in range(len(self.plan.terms))]

    # ------------------------------------------------------------------ symbolic bounds
    def symbols(self) -> dict[str, str]:
        """The code of each symbol of the mask plan, by its sympy name: dims and params by
        their user-derived argument names, the tile bounds and loaded scalars by ours."""
        prog, codes = self.plan.program, {}
        for node in (*prog.dims.values(), *prog.params.values()):
            codes[node.name] = names.scalar(node)
        codes.update({name: code_name(name) for name in self.plan.mask_symbols})
        mp = self.plan.mask_plan
        if mp is not None:
            codes[mp.i0.name], codes[mp.i1.name] = "i0", "i1"
        return codes

    def sym(self, expr) -> str:
        """Triton code of an integer expression of the mask plan."""
        return printed(expr, self.symbols())

    def guard(self, g) -> str:
        return guard_code(g, self.symbols())

    # ------------------------------------------------------------------ kernel text
    def generate(self) -> KernelSource:
        p, em = self.plan, self.em
        v_off = self.operand_offset(p.v, self.kv_env) if p.v else None
        queries = self.query_loads(self.row)
        tile_body = self.tile_body()
        combine = self.combine_lines()
        range_lines = self.range_lines()
        initial = self.initial_state()  # (a sink logit's loads go to the prologue)
        live = self.row_weight_live() if p.row_weight is not None else []  # (so may the row weight's)
        prologue = list(em.prologue)
        state = self.states()
        constexprs = ["MASKED", "KEY_MASK", "BLOCK_N", "PRECISION", "UPCAST_DOT", "EVEN_D", "EVEN_E", "USE_TMA",
                      "FOLD_SCALE"]
        inner_args = _free_names(tile_body, {"start_n"} | set(constexprs))
        inner_args = [a for a in inner_args if a not in (*state, "start_n")]
        sig_tile = ", ".join([*state, "start_n", *inner_args]) + \
            ", MASKED: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, " \
            "UPCAST_DOT: tl.constexpr, " \
            "EVEN_D: tl.constexpr, EVEN_E: tl.constexpr, USE_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr"
        call_args = ", ".join([*state, "start_n", *inner_args])

        tensors = list(em.tensors)
        scalar_args = self.scalar_arg_names()
        pointer_args = [names.tensor("ptr", t) for t in tensors] + ["o_ptr", "lse_ptr", "count_ptr"]
        stride_args, dim_args = tensor_args(em.tensors)
        out_axes = p.output.axes
        o_strides = [f"o_s{k}" for k in range(len(out_axes))]
        lse_axes = p.lse_axes
        lse_strides = [f"lse_s{k}" for k in range(len(lse_axes))]
        outer_sizes = [names.user("size", ix) for ix in (*p.outer, *p.summed_outer)]
        map_args = ["kv_list_ptr", "kv_full_ptr", "kv_count_ptr", "n_qtiles", "n_ktiles"] \
            if p.mask_mode == MaskMode.BLOCK_MAP else []
        args = (pointer_args + stride_args + dim_args + o_strides + lse_strides + outer_sizes
                + ["n_rows", "n_cols", "n_feat", "n_vfeat", "split_len", "o_split_stride", "lse_split_stride"]
                + (["group"] if self.packed else []) + map_args + scalar_args)
        kernel_sig = ", ".join(args) + (", BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, "
                                        "BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, "
                                        "STORE_LSE: tl.constexpr, COUNT_TILES: tl.constexpr, "
                                        "SPLIT: tl.constexpr, PRECISION: tl.constexpr, "
                                        "UPCAST_DOT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_E: tl.constexpr, "
                                        "FULL_MASKED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, "
                                        "USE_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr")

        decode = ["pid_o = pid_o.to(tl.int64)"]
        for ix in reversed(p.outer):
            var = names.user("grp" if self.packed and ix == p.group[0] else "idx", ix)
            decode.append(f"{var} = pid_o % {names.user('size', ix)}")
            decode.append(f"pid_o = pid_o // {names.user('size', ix)}")
        if self.packed:
            h = p.group[0]
            rows = ["# GQA packing: row r of the tile is query r // group of head grp * group + r % group",
                    "i_rows = offs_m // group",
                    f"h_rows = {names.user('grp', h)} * group + offs_m % group",
                    "row_ok = offs_m < n_rows * group"]
        else:
            rows = ["row_ok = offs_m < n_rows"]
        row, h_name = self.row, p.group[0] if self.packed else None

        def axis_offset(axes, strides, column: bool):
            parts = []
            for ax, st in zip(axes, strides):
                if ax == p.i or ax == h_name:
                    code = row if ax == p.i else "h_rows"
                    parts.append(f"{code}[:, None] * {st}" if column else f"{code} * {st}")
                elif ax == p.e and column:
                    parts.append(f"offs_e[None, :] * {st}")
                else:
                    parts.append(f"{names.user('idx', ax)} * {st}")
            return " + ".join(parts)

        src = [
            "@triton.jit",
            f"def {self.name}_tile({sig_tile}):",
            '    """One key tile: scores, modifications, (masks), and the accumulator updates."""',
            *_indent(tile_body),
            "    return " + ", ".join(state),
            "",
            "",
            "@triton.jit",
            f"def {self.name}_fwd({kernel_sig}):",
            "    # grid axis 0: query tiles, times key splits when decoding (split-KV); axis 1: batch x heads",
            f"    n_qt = tl.cdiv(n_rows{' * group' if self.packed else ''}, BLOCK_M)",
            *_indent(self.schedule_lines()),
            "    split_lo = pid_split * split_len",
            "    split_hi = split_lo + split_len",
            *_indent(decode),
            "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
            "    offs_d = tl.arange(0, BLOCK_D)",
            "    offs_e = tl.arange(0, BLOCK_E)",
            *_indent(rows),
            *self.summed_outer_loop([
                "# values that do not change along the key loop",
                *prologue,
                *queries,
                *(self.value_base(v_off) if p.v else []),
                *initial,
                *self.skip_dead_heads(range_lines(call_args), live),
                "# epilogue: normalise; rows with no allowed key give 0 and lse = -inf",
                *combine]),
            "    if SPLIT:  # a partial result per key split, merged by log-sum-exp afterwards",
            "        o_ptr += pid_split * o_split_stride",
            "        lse_ptr += pid_split * lse_split_stride",
            *([] if p.statistics_only else
              [f"    o_ptrs = o_ptr + {axis_offset(out_axes, o_strides, True)}",
               "    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < n_vfeat))"]),
            *(["    if STORE_LSE:",
               *_indent(self.lse_lines(), 2),
               f"        tl.store(lse_ptr + {axis_offset(lse_axes, lse_strides, False)}, lse, mask=row_ok)"]
              if p.has_lse else []),
            "",
        ]
        return KernelSource(self.name, "\n".join(src), tensors, scalar_args, dict(em.host_scalars),
                            p.mask_mode)

    def schedule_lines(self) -> list[str]:
        """Which query tile (`pid_m`), key split and (batch, head) (`pid_o`) this program
        takes. In order when every tile costs about the same; longest first when the mask
        plan says later query rows visit more key tiles (`longest_first`)."""
        if not self.plan.longest_first:
            return ["pid_x = tl.program_id(0)",
                    "pid_o = tl.program_id(1)",
                    "pid_m = pid_x % n_qt",
                    "pid_split = pid_x // n_qt"]
        return ["# longest first: later query tiles visit more key tiles (a triangular mask). The GPU",
                "# starts programs in the order program_id(1) * num_programs(0) + program_id(0): hand out",
                "# the last query tile of every (batch, head) first, then the ones before it",
                "flat = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)",
                "pid_x = flat // tl.num_programs(1)",
                "pid_o = flat % tl.num_programs(1)",
                "pid_m = n_qt - 1 - pid_x % n_qt",
                "pid_split = pid_x // n_qt"]

    # ------------------------------------------------------------------ key-tile ranges
    def range_lines(self):
        mode = self.plan.mask_mode
        if mode == MaskMode.NONE:
            return lambda call: ["# no mask: every key tile is full except a ragged last one",
                                 "n_full = (n_cols // BLOCK_N) * BLOCK_N",
                                 *self.loop("0", "n_full", False, call),
                                 "if not EVEN_N:  # a ragged last key tile",
                                 *_indent(self.loop("n_full", "n_cols", True, call))]
        if mode == MaskMode.BLOCK_MAP:
            return self.block_map_ranges
        return self.affine_ranges

    def loop(self, lo, hi, masked, call):
        kind = "partial tiles: per-element mask" if masked else "full tiles: no mask"
        return [f"for start_n in range(tl.maximum({lo}, split_lo), tl.minimum({hi}, split_hi), BLOCK_N):"
                f"  # {kind}", *self.visit(masked, call)]

    def visit(self, masked, call):
        """One key tile; with COUNT_TILES the kernel also counts what it visits (work accounting)."""
        flag = "True" if masked else "FULL_MASKED"  # FULL_MASKED: a plan choice, full tiles masked too
        # full tiles are whole key tiles; a partial one may run past n_cols unless BLOCK_N divides it
        key_mask = "not EVEN_N" if masked else "False"
        return [f"    {', '.join(self.states())} = {self.name}_tile({call}, MASKED={flag}, KEY_MASK={key_mask}, "
                "BLOCK_N=BLOCK_N, "
                "PRECISION=PRECISION, UPCAST_DOT=UPCAST_DOT, EVEN_D=EVEN_D, EVEN_E=EVEN_E, USE_TMA=USE_TMA, "
                "FOLD_SCALE=FOLD_SCALE)",
                "    if COUNT_TILES:",
                f"        tl.atomic_add(count_ptr + {int(masked)}, 1)"]

    def affine_ranges(self, call):
        """Loop bounds from the sympy mask plan: per conjunct of the mask's DNF, the key
        range of this query tile and, inside it, the range of full tiles."""
        plan = self.plan.mask_plan
        lines = ["# key-tile ranges derived symbolically from the mask (attncc.passes.mask_analysis)",
                 *(["i0 = (pid_m * BLOCK_M) // group",
                     "i1 = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group, n_rows - 1)"] if self.packed else
                   ["i0 = pid_m * BLOCK_M",
                    "i1 = tl.minimum(i0 + BLOCK_M, n_rows) - 1"])]
        for name, node in self.plan.mask_symbols.items():
            lines.append(f"{code_name(name)} = {self.em.emit(node).code}")
        conj = plan.conjuncts
        if not conj:
            return lines + ["# the mask allows nothing: no key tile is visited"]
        if len(conj) > 2:  # visit the hull, masking every tile
            lo = sympy.Min(*(c.lo for c in conj))
            hi = sympy.Max(*(c.hi for c in conj))
            return lines + [f"lo = ({self.sym(lo)} // BLOCK_N) * BLOCK_N",
                            f"hi = {self.sym(hi)} + 1", *self.loop("lo", "hi", True, call)]
        prev = None
        for n, c in enumerate(conj):
            lines += self.conjunct_bounds(n, c, plan)
            if prev is None:
                lines += self.piece(f"lo{n}", f"hi{n}", n, call)
            else:  # the part of this range the previous one did not visit
                lines += [f"cut_lo = tl.minimum(hi{n}, lo{prev})", f"cut_hi = tl.maximum(lo{n}, end{prev})"]
                lines += self.piece(f"lo{n}", "cut_lo", n, call)
                lines += self.piece("cut_hi", f"hi{n}", n, call)
            prev = n
        return lines

    def conjunct_bounds(self, n, c, plan):
        i0, i1 = plan.i0, plan.i1
        ok = [f"({self.guard(g)})" for g in c.guards]
        ok.append(f"({self.sym(sympy.Max(i0, c.row_lo))} <= {self.sym(sympy.Min(i1, c.row_hi))})")
        full_ok = ok + [f"({self.sym(c.row_lo)} <= i0)", f"(i1 <= {self.sym(c.row_hi)})"]
        lines = [f"# conjunct {n}: " + " and ".join(f"{p.a}*i + {p.b}*j >= {p.rhs}" for p in c.planes)
                 + ("; opaque: " + ", ".join(str(o) for o in c.opaque) if c.opaque else ""),
                 f"ok{n} = " + " & ".join(ok),
                 f"lo{n} = " + _tile_start(self.sym(c.lo), "floor"),
                 f"hi{n} = tl.where(ok{n} != 0, {self.sym(c.hi)} + 1, lo{n})",
                 f"end{n} = tl.cdiv(hi{n}, BLOCK_N) * BLOCK_N"]
        if c.opaque:
            lines += [f"flo{n} = lo{n}", f"fhi{n} = lo{n}  # opaque atoms: no tile is known to be full"]
        else:
            lines += [f"full_ok{n} = " + " & ".join(full_ok),
                      f"flo{n} = " + _tile_start(self.sym(c.flo), "ceil"),
                      f"fhi{n} = tl.minimum((({self.sym(c.fhi)} + 1) // BLOCK_N) * BLOCK_N, "
                      "(n_cols // BLOCK_N) * BLOCK_N)",
                      f"fhi{n} = tl.where(full_ok{n} != 0, fhi{n}, flo{n})"]
        return lines

    def piece(self, lo, hi, n, call):
        """Visit [lo, hi): partial tiles before the full range, full tiles, partial after."""
        return [f"fs = tl.minimum(tl.maximum(flo{n}, {lo}), tl.maximum({hi}, {lo}))",
                f"fe = tl.minimum(tl.maximum(fhi{n}, fs), tl.maximum({hi}, {lo}))",
                *self.loop(lo, "fs", True, call),
                *self.loop("fs", "fe", False, call),
                *self.loop("fe", hi, True, call)]

    def block_map_ranges(self, call):
        outer = map_outer(self.plan)
        flat = " + ".join(f"{names.user('idx', ix)} * {block_map._stride(outer, k)}"
                          for k, ix in enumerate(outer)) or "0"
        return ["# key tiles listed by the runtime block map: full tiles first, then partial ones",
                f"map_row = {flat}  # this program's map",
                "list_base = kv_list_ptr + (map_row * n_qtiles + pid_m) * n_ktiles",
                "n_full_tiles = tl.load(kv_full_ptr + map_row * n_qtiles + pid_m)",
                "n_tiles = tl.load(kv_count_ptr + map_row * n_qtiles + pid_m)",
                "for t in range(0, n_full_tiles):",
                "    start_n = tl.load(list_base + t) * BLOCK_N",
                "    if (start_n >= split_lo) & (start_n < split_hi):",
                *_indent(self.visit(False, call)),
                "for t in range(n_full_tiles, n_tiles):",
                "    start_n = tl.load(list_base + t) * BLOCK_N",
                "    if (start_n >= split_lo) & (start_n < split_hi):",
                *_indent(self.visit(True, call))]


def generate_module(plan: RowStreamPlan, name: str) -> KernelSource:
    """The module of one spec: the row-streaming kernel, its GQA-packed variant when
    query heads share K/V heads, and the block-map classifier when masks need one. Every
    kernel's name starts with `names.kernel(name)`, also the `name` of the result."""
    prefix = names.kernel(name)
    main = RowStreamCodegen(plan, prefix).generate()
    parts = [main.source]
    if plan.group is not None:
        main.packed = RowStreamCodegen(plan, prefix, packed=True).generate()
        parts.append(main.packed.source)
    if main.mask_mode == MaskMode.BLOCK_MAP:
        text, map_tensors, map_hosts, map_scalars = block_map.generate(plan, prefix)
        parts.append(text)
        main.block_map = block_map.BlockMapSource(map_tensors, map_scalars, map_hosts)
    from attncc.codegen.chunked import ChunkedCodegen
    from attncc.codegen.reassociate import ReassociatedCodegen

    if reassociable(plan):  # on the plan with per-query and per-key factors folded into the operands
        text, tensors, scalars, hosts = ReassociatedCodegen(linear_plan(plan), prefix).generate_text()
        parts.append(text)
        main.reassociated = LinearSource(f"{prefix}_linear", tensors, scalars, hosts)
    if chunkable(plan):
        text, tensors, scalars, hosts = ChunkedCodegen(linear_plan(plan), prefix).generate_text()
        parts.append(text)
        main.chunked = LinearSource(f"{prefix}_chunked", tensors, scalars, hosts)
    for k, (node, stats) in enumerate(plan.statistics.items()):
        if stats.needs_block_map:  # the classifier of a statistics pass: left to the reference
            continue
        source = RowStreamCodegen(stats, f"{prefix}_stats{k}").generate()
        parts.append(source.source)
        main.statistics[node] = (stats, source)
    doc = (f"Generated by attncc from {os.path.basename(plan.program.source.filename)}: do not edit; "
           f"regenerate instead.\n\nSkeleton: row streaming (online softmax over key tiles); "
           f"mask mode: {main.mask_mode}.\n")
    header = [docstring(doc), "import triton", "import triton.language as tl", "", ""]  # the file name is data
    main.source = "\n".join(header) + "\n\n\n".join(parts) + "\n"
    return main


def tma_descriptor(base: str, rows: str, cols: str, row_stride: str, block_rows: str, block_cols: str) -> str:
    """A TMA tensor descriptor of the [rows, cols] view at `base` (features contiguous; the
    launcher checked strides and alignment, `runtime.tma_layout_ok`): its boxes of
    [block_rows, block_cols] load zero-filled, and store clipped, past the view's edges."""
    return (f"tl.make_tensor_descriptor({base}, shape=[{rows}, {cols}], strides=[{row_stride}, 1], "
            f"block_shape=[{block_rows}, {block_cols}])")


def _reads_of(transform: ir.Node, read: ir.Access) -> list[ir.Node]:
    """The reads inside a feature map that read the same elements as `read`."""
    found, stack = [], [transform]
    while stack:
        n = stack.pop()
        if isinstance(n, ir.Access) and n.array is read.array and \
                [getattr(a, "name", None) for a in n.args] == [getattr(a, "name", None) for a in read.args]:
            found.append(n)
        stack.extend(n.operands() if isinstance(n, ir.Map) else ())
    return found


def _tile_start(code: str, rounding: str) -> str:
    """A key index (code) rounded down (or up) to a tile boundary, plainly 0 when it is 0."""
    if code == "0":
        return "0"
    if rounding == "floor":
        return f"({code} // BLOCK_N) * BLOCK_N"
    return f"tl.cdiv({code}, BLOCK_N) * BLOCK_N"


def scalar_args(program: ir.Program, host_scalars: dict) -> list[str]:
    """The scalar arguments of a kernel: every dim and param (by its user-derived name),
    then the host-evaluated expressions; all of them are added to `host_scalars`."""
    out = []
    for node in (*program.dims.values(), *program.params.values()):
        host_scalars.setdefault(names.scalar(node), node)
        out.append(names.scalar(node))
    return out + [n for n in host_scalars if n not in out]


def tensor_args(tensors: dict) -> tuple[list[str], list[str]]:
    """The stride and size arguments of the input tensors a kernel reads."""
    strides = [names.tensor("st", t, k) for t in tensors for k in range(len(tensors[t].dims))]
    sizes = [names.tensor("sz", t, k) for t in tensors for k in range(len(tensors[t].dims))]
    return strides, sizes
