"""Triton text of the general streaming plan: one kernel per pass (passes/streams.py).

A pass kernel takes a block of rows (`offs_m`) of one (batch, head) and walks the streamed
index in tiles (`offs_n`); a joint softmax's pass walks its key sets' indices one after
another, a loop each. Per tile it computes each tile dot with one `tl.dot`, evaluates
the accumulators' expressions with the tile emitter, and updates the accumulators:

    sum     acc += sum_n where(allowed, x, 0)
    max     acc = max(acc, max_n where(allowed, x, -inf))            (min alike)
    lse     running max m and sum l of exp(x - m), rescaled when m grows
    online  acc = acc * alpha + sum_n (x with exp(s - L) := exp(s - m))  (FlashAttention)
    values  acc += where(allowed, w, 0) @ v                           ([rows, features])

A joint log-sum-exp (one softmax over several key sets) keeps one m and l per row across its
sets' loops: each set's loop updates them with its own scores and masks, and a sum finished in
an earlier loop is rescaled once at the end by exp(m at the end of its loop - final m). A
later set's value sum that the outputs only add to an earlier one's (`into`) continues that
accumulator in its own loop.

and stores each accumulator's final value (a small tensor over batch, head, rows and
maybe features) for the passes, torch epilogues and outputs that read it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import sympy

from attncc import ir
from attncc.codegen import names
from attncc.codegen.mask_code import guard_code, printed
from attncc.codegen.pytext import comment, docstring
from attncc.codegen.row_stream import _indent, scalar_args, tensor_args
from attncc.codegen.tile_expr import TileEmitter, Unsupported, Val
from attncc.passes.mask_sympy import code_name
from attncc.passes.streams import Accumulator, Chosen, Reduction, StreamPass, StreamPlan, _product

_NEG_INF = "float('-inf')"
_POS_INF = "float('inf')"


@dataclass
class PassSource:
    """One pass kernel and what its launcher passes it."""

    kernel: str
    tensor_inputs: list            # input names (synthetic ones included) passed as pointers
    scalar_args: list
    host_scalars: dict
    results: list                  # accumulator nodes stored, in argument order
    features: dict                 # constexpr name -> the index whose extent it pads (BLOCK_D0, BLOCK_E1)
    extents: dict                  # scalar argument -> the index whose size it is (n_0, n_1)
    topk: dict                     # constexpr buffer width (KP0) -> the amount it must hold


@dataclass
class StreamSource:
    name: str
    source: str
    passes: list = field(default_factory=list)


class StreamEmitter(TileEmitter):
    """The tile emitter, plus the selections of the general plan, which carry state along the
    streamed index (how many ties at the threshold were chosen in earlier tiles)."""

    def __init__(self, *args, owner=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_init: list[str] = []
        self.owner = owner           # the PassCodegen: extents and operand tiles
        self.inner: dict = {}        # inner sums -> the index each loops over
        self.lazy: dict = {}         # tile dots computed where an inner sum's loop needs them

    def emit_contract(self, node: ir.Contract, env) -> Val:
        if node in self.inner:
            return self.inner_sum(node, env)
        if node in self.lazy:
            return self.owner.lazy_dot(self.lazy[node], env)
        return super().emit_contract(node, env)

    def emit_reduce(self, node: ir.Reduce, env) -> Val:
        if node in self.inner:
            return self.inner_sum(node, env)
        raise Unsupported(f"a reduction at line {node.loc.line if node.loc else '?'} inside a tile expression")

    def inner_sum(self, node: ir.Node, env) -> Val:
        """`sum_g term` over a whole tile: a loop over `g` inside the tile, with the tile dots
        its terms need computed in the loop."""
        g = self.inner[node]
        term = _product(list(node.factors)) if isinstance(node, ir.Contract) else node.arg
        return self.loop_reduce(node, g, self.owner.extent_arg(g), term, env)

    def emit_chosen(self, node: Chosen, env) -> Val:
        x, t, above = (self.emit(n, env) for n in (node.x, node.threshold, node.above))
        amount = self.emit(node.amount, env)
        allowed = "allowed"
        for pred in node.masks:
            allowed = f"({allowed} & {self.emit(pred, env).code})"
        c = self.counter
        self.counter += 1
        self.state_init.append(f"seen{c} = tl.zeros([BLOCK_M], tl.int32)  # ties at the threshold chosen so far")
        self.body += [
            f"eq{c} = ({allowed} & ({x.code} == {t.code})).to(tl.int32)",
            f"tie_rank{c} = seen{c}[:, None] + tl.cumsum(eq{c}, 1) - eq{c}  # ties: the lower index first",
            f"chosen{c} = {allowed} & ({x.code} != {_NEG_INF}) & (({x.code} > {t.code}) | "
            f"((eq{c} != 0) & (tie_rank{c} < {amount.code} - {above.code})))",
            f"seen{c} += tl.sum(eq{c}, 1)"]
        return Val(f"chosen{c}", frozenset("mn"), ir.BOOL)


class PassCodegen:
    def __init__(self, plan: StreamPlan, p: StreamPass, name: str):
        self.plan, self.p, self.name = plan, p, name
        self.seg, self.n_cols = p, "n_cols"  # the stream being written (a joint pass walks several)
        self.accs = p.all_accumulators()     # every stream's, numbered across the kernel
        streams = [seg.stream for seg in p.segments()]
        env = {p.row: Val("offs_m[:, None]", frozenset("m"), ir.INT),
               **{t: Val("offs_n[None, :]", frozenset("n"), ir.INT) for t in streams}}
        for ix in p.outer:
            env[ix] = Val(names.user("idx", ix), frozenset(), ir.INT)
        self.em = StreamEmitter(plan.program, env, owner=self)
        self.em.inner = dict(plan.planner.inner)
        self.em.lazy = {dot.node: dot for seg in p.segments() for dot in seg.lazy_dots}
        self.em.in_bounds = {p.row, *streams}
        mine = {a.node for a in self.accs}
        self.em.materialized = {**plan.precomputed.inputs,
                                **{n: a for n, a in plan.results.items() if n not in mine}}
        self.features: dict = {}
        self.extents: dict = {}  # scalar argument -> index whose size it is
        self.topk: dict = {}     # constexpr buffer width -> the selection's amount
        self.after: dict = {}    # stream -> lines after its loop (running maxima kept for a rescale)

    # ------------------------------------------------------------------ operands
    def operand_tile(self, op, tile: str, tile_code: str, feature: str, block: str, env=None) -> tuple[list[str], Val]:
        """Load an operand's [tile, feature] block (zero outside), apply its feature map."""
        em = self.em
        env = em.env if env is None else env
        em.tensors[op.input.name] = op.input
        n_feat = self.extent_arg(feature)
        offs = f"tl.arange(0, {block})"
        fcode = f"{offs}[None, :]"
        base = []
        for k, arg in op.outer_args():
            val = em.emit(arg, env)
            if val.const != 0:
                base.append(f"{val.code} * {names.tensor('st', op.input.name, k)}")
        ok_tile = "row_ok[:, None]" if tile == "m" else f"(offs_n[:, None] < {self.n_cols})"
        pointer = " + ".join([names.tensor("ptr", op.input.name), *base,
                              f"{tile_code}[:, None] * {names.tensor('st', op.input.name, op.row)}",
                              f"{fcode} * {names.tensor('st', op.input.name, op.feature)}"])
        var = f"{'a' if tile == 'm' else 'b'}{self.counter()}"
        lines = [f"{var} = tl.load({pointer}, mask={ok_tile} & ({fcode} < {n_feat}), other=0.0)"]
        axes = frozenset((tile, "f"))
        if op.transform is None:
            return lines, Val(var, axes)
        env = {**env, op.access.args[op.row].name: Val(f"{tile_code}[:, None]", frozenset(tile), ir.INT),
               feature: Val(fcode, frozenset("f"), ir.INT)}
        em.bind(op.access, Val(f"{var}.to(tl.float32)", axes), env)
        saved = (em.prologue, em.body)
        em.prologue, em.body = [], []
        val = em.emit(op.transform, env)
        lines += em.prologue + em.body
        em.prologue, em.body = saved
        ptr = names.tensor("ptr", op.input.name)
        lines.append(f"{var} = tl.where({fcode} < {n_feat}, {val.code}, 0.0).to({ptr}.dtype.element_ty)"
                     "  # padded features add nothing; back to the input type for the tensor cores")
        return lines, Val(var, axes)

    def lazy_dot(self, dot, env) -> Val:
        """A tile dot inside an inner sum's loop: both tiles loaded for this iteration."""
        sp, em = self.seg, self.em
        c = self.counter()
        block = f"BLOCK_D{c}"
        self.features[block] = dot.d
        a_lines, a = self.operand_tile(dot.sides[sp.row], "m", "offs_m", dot.d, block, env)
        b_lines, b = self.operand_tile(dot.sides[sp.stream], "n", "offs_n", dot.d, block, env)
        em.body += a_lines + b_lines + [
            "if UPCAST_DOT:",
            f"    sl{c} = tl.dot({a.code}.to(tl.float32), tl.trans({b.code}.to(tl.float32)), input_precision=PRECISION)",
            "else:",
            f"    sl{c} = tl.dot({a.code}, tl.trans({b.code}), input_precision=PRECISION)"]
        product = " * ".join([f"sl{c}", *(em.emit(f, env).code for f in dot.factors)])
        return Val(f"({product})" if dot.factors else product, frozenset("mn"))

    def counter(self) -> int:
        self.em.counter += 1
        return self.em.counter

    def extent_arg(self, index: str) -> str:
        name = f"n_{len(self.extents)}"
        for arg, ix in self.extents.items():
            if ix == index:
                return arg
        self.extents[name] = index
        return name

    # ------------------------------------------------------------------ the kernel
    def generate(self) -> tuple[str, PassSource]:
        p, em = self.plan, self.em
        sp = self.p
        final, stores, results, loops = [], [], [], []
        t = 0
        for s, seg in enumerate(sp.segments()):  # one loop per stream, one after another
            self.seg, self.n_cols = seg, "n_cols" if s == 0 else self.extent_arg(seg.stream)
            em.body, row_loads, init, dot_lines, update = [], [], [], [], []
            for dot in seg.dots:
                block = f"BLOCK_D{t}"
                self.features[block] = dot.d
                a_lines, a = self.operand_tile(dot.sides[sp.row], "m", "offs_m", dot.d, block)
                b_lines, b = self.operand_tile(dot.sides[seg.stream], "n", "offs_n", dot.d, block)
                row_loads += a_lines
                dot_lines += b_lines + [
                    "if UPCAST_DOT:  # the interpreter's bf16 dot: compute in fp32",
                    f"    s{t} = tl.dot({a.code}.to(tl.float32), tl.trans({b.code}.to(tl.float32)), "
                    "input_precision=PRECISION)",
                    "else:",
                    f"    s{t} = tl.dot({a.code}, tl.trans({b.code}), input_precision=PRECISION)"]
                # the dot's other factors (scales, decays) multiply it where it is read
                product = " * ".join([f"s{t}", *(em.emit(f).code for f in dot.factors)])
                em.bind(dot.node, Val(f"({product})" if dot.factors else product, frozenset("mn")))
                t += 1
            for acc in sorted(seg.accumulators, key=lambda a: a.kind is Reduction.TOPK_ABOVE):
                if acc.online is not None:
                    continue
                self.accumulate(self.accs.index(acc), acc, init, update, final)
                for other in seg.accumulators:
                    if other.online is (acc.joint or acc):
                        self.accumulate(self.accs.index(other), other, init, update, final)
            # its row tiles and accumulators just before its loop (shorter live ranges); the range
            # before the arguments and prologue are written out: it may load scalars
            loops += [*([comment(f"stream {s}: {seg.stream!r}")] if sp.then else []), *row_loads, *init,
                      *self.stream_range(seg), "for start_n in range(lo, hi, BLOCK_N):",
                      "    offs_n = start_n + tl.arange(0, BLOCK_N)",
                      "    allowed = row_ok[:, None] & (offs_n[None, :] < hi)",
                      *_indent(dot_lines), *_indent(em.body), *_indent(update), *self.after.get(s, [])]
        em.body = []
        stored = [acc for acc in self.accs if acc.joint is None and acc.into is None]  # parts: held by others
        for r, acc in enumerate(stored):
            results.append(acc.node)
            stores.append(self.store(r, self.accs.index(acc), acc))
        tensors = list(em.tensors)
        scalars = scalar_args(p.program, em.host_scalars)
        strides, dims = tensor_args(em.tensors)
        res_args = [f"res{r}_ptr" for r in range(len(results))] + \
            [f"res{r}_s{a}" for r, acc in enumerate(stored) for a in range(len(acc.node.indices))]
        outer = [names.user("size", ix) for ix in sp.outer]
        sig = ([names.tensor("ptr", t) for t in tensors] + res_args + strides + dims + outer
               + ["n_rows", "n_cols", *self.extents] + scalars)
        constexprs = ["BLOCK_M", "BLOCK_N", *self.features, *self.topk, "PRECISION", "UPCAST_DOT"]
        decode = ["pid_o = tl.program_id(1).to(tl.int64)"]
        for ix in reversed(sp.outer):
            decode += [f"{names.user('idx', ix)} = pid_o % {names.user('size', ix)}",
                       f"pid_o = pid_o // {names.user('size', ix)}"]
        kinds = ", ".join(a.kind.value + (" (online)" if a.online else " (joint)" if a.parts else "")
                          for a in stored)
        streamed = " then ".join(repr(seg.stream) for seg in sp.segments())
        body = [
            "@triton.jit",
            f"def {self.name}({', '.join(sig)}, {', '.join(c + ': tl.constexpr' for c in constexprs)}):",
            f"    {docstring(f'{sp.kind.value}: rows {sp.row!r}, streamed {streamed}; accumulators: {kinds}.')}",
            "    pid_m = tl.program_id(0)",
            *_indent(decode),
            "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
            "    row_ok = offs_m < n_rows",
            *_indent(em.prologue),
            *_indent(em.state_init),
            *_indent(loops),
            *_indent(final),
            *_indent(stores),
        ]
        src = PassSource(self.name, tensors, scalars, dict(em.host_scalars), results, dict(self.features),
                         dict(self.extents), dict(self.topk))
        return "\n".join(body), src

    def stream_range(self, seg: StreamPass, analysis=None, tile=("pid_m", "BLOCK_M", "n_rows")) -> list[str]:
        """The range of one stream: everything, or the block of a blocked reduction's pass, cut
        to the hull of the keys the masks allow this row tile (bounds derived with sympy).
        `analysis` (mask plan, loaded scalars, row-data bounds) replaces the pass's own, and
        `tile` names the program's tile (its id, size and extent): the backward's kernel over
        streamed tiles walks the rows their transposed analysis allows."""
        block, n_cols = seg.block, self.n_cols
        if block is None:
            lines = ["lo = 0", f"hi = {n_cols}"]
        else:
            size = self.em.emit(block.size).code
            lines = [comment(f"one block of {block.index!r}"), f"lo = {names.user('idx', block.name)} * {size}",
                     f"hi = tl.minimum(lo + {size}, {n_cols})"]
        plan, symbols, opaque = analysis or (seg.mask_plan, seg.mask_symbols, seg.mask_opaque)
        if plan is None:
            return lines
        codes = {node.name: names.scalar(node) for node in (*self.plan.program.dims.values(),
                                                              *self.plan.program.params.values())}
        codes.update({name: code_name(name) for name in symbols})
        codes[plan.i0.name], codes[plan.i1.name] = "i0", "i1"
        pid, size, n_rows = tile
        lines += ["# the streamed range the masks allow this row tile (attncc.passes.mask_analysis)",
                  f"i0 = {pid} * {size}", f"i1 = tl.minimum(i0 + {size}, {n_rows}) - 1", f"mask_lo = {n_cols}",
                  "mask_hi = 0"]
        lines += [f"{code_name(name)} = {self.em.emit(node).code}" for name, node in symbols.items()]
        for n, c in enumerate(plan.conjuncts):
            ok = [f"({guard_code(g, codes)})" for g in c.guards]
            ok.append(f"({printed(sympy.Max(plan.i0, c.row_lo), codes)} <= {printed(sympy.Min(plan.i1, c.row_hi), codes)})")
            lo, hi = printed(c.lo, codes), printed(c.hi, codes)
            for t, atom in enumerate(c.opaque):
                bound = _row_data_bound(atom, plan.j, opaque, seg.row)
                if bound is None:
                    continue
                side, node, sign, rest = bound
                f = self.em.emit(node).code
                # its extreme over the tile's rows, clipped to int32 (keys are smaller; an empty
                # amax's int64 minimum must not overflow when negated; a loop bound is an int)
                pick, far = ("min", "2147483647") if (side == "lo") == (sign > 0) else ("max", "-2147483647")
                f = f"tl.minimum(tl.maximum({f}, -2147483647), 2147483647).to(tl.int32) + tl.zeros([BLOCK_M, 1], tl.int32)"
                extreme = f"tl.{pick}(tl.where(row_ok[:, None], {f}, {far}))"
                value = f"{'-' if sign < 0 else ''}rb{n}_{t} + ({printed(rest, codes)})"
                lines += [comment(f"a bound read from the rows' data: {atom}"), f"rb{n}_{t} = {extreme}"]
                lo, hi = (f"tl.maximum({lo}, {value})", hi) if side == "lo" else (lo, f"tl.minimum({hi}, {value})")
            lines += [f"ok{n} = " + " & ".join(ok),
                      f"mask_lo = tl.where(ok{n} != 0, tl.minimum(mask_lo, {lo}), mask_lo)",
                      f"mask_hi = tl.where(ok{n} != 0, tl.maximum(mask_hi, {hi} + 1), mask_hi)"]
        return lines + ["lo = tl.maximum(lo, mask_lo)", "hi = tl.minimum(hi, mask_hi)"]

    def accumulate(self, k: int, acc: Accumulator, init, update, final):
        """The lines that start, update (after the tile's expressions) and finish one accumulator."""
        em = self.em
        saved_body, em.body = em.body, []
        allowed = "allowed"
        for pred in acc.masks:
            v = em.emit(pred)
            allowed = f"({allowed} & {v.code})"
        update_lines = []
        if acc.kind is Reduction.LSE:
            head = acc.joint or acc  # a key set of a joint log-sum-exp updates the running state of its head
            h = self.accs.index(head)
            x = em.emit(acc.arg)
            if acc.joint is not None:
                update_lines.append(comment(f"key set {acc.stream!r}: the joint running maximum m{h} and sum l{h} (an "
                                            "earlier set's sum no later loop continues is rescaled once, at the end)"))
            update_lines += [
                f"x{k} = tl.where({allowed}, {x.code}, {_NEG_INF})",
                f"m_new{h} = tl.maximum(m{h}, tl.max(x{k}, 1))",
                f"m_safe{h} = tl.where(m_new{h} == {_NEG_INF}, 0.0, m_new{h})",
                f"alpha{h} = tl.exp(m{h} - m_safe{h})",
                f"p{k} = tl.exp(x{k} - m_safe{h}[:, None])",
                f"l{h} = l{h} * alpha{h} + tl.sum(p{k}, 1)",
                f"m{h} = m_new{h}"]
            if acc.joint is None:
                init += self.lse_init(h, acc)
                final += [f"acc{k} = tl.where(l{k} > 0, m{k} + tl.log(tl.where(l{k} > 0, l{k}, 1.0)), {_NEG_INF})"]
            em.body.extend(update_lines)
            update_lines = []
            for other in self.seg.accumulators:
                if other.online is head:
                    em.bind(other.weight, Val(f"p{k}", frozenset("mn")))
        elif acc.kind is Reduction.TOPK:
            update_lines += self.topk_lines(k, acc, allowed, init, final)
        elif acc.kind is Reduction.TOPK_ABOVE:
            t = next(j for j, a in enumerate(self.accs) if a.kind is Reduction.TOPK
                     and a.arg is acc.arg and a.node.amount is acc.node.amount)
            amount = em.emit(acc.node.amount).code
            final.append(f"acc{k} = tl.sum(((buf{t} > acc{t}[:, None]) & (kcols{t}[None, :] < {amount}))"
                         ".to(tl.float32), 1)")
        elif acc.kind in (Reduction.MAX, Reduction.MIN):
            x = em.emit(acc.arg)
            big, fn = (_NEG_INF, "max") if acc.kind is Reduction.MAX else (_POS_INF, "min")
            init.append(f"acc{k} = tl.full([BLOCK_M], {big}, tl.float32)")
            update_lines.append(f"acc{k} = tl.{fn}imum(acc{k}, tl.{fn}(tl.where({allowed}, {x.code}, {big}), 1))")
        else:
            x = em.emit(acc.arg)
            rescale = ""
            if acc.online is not None:
                lse = self.accs.index(acc.online)
                rescale = f" * alpha{lse}" + ("[:, None]" if acc.kind is Reduction.DOT else "")
            if acc.kind is Reduction.DOT:
                a = k if acc.into is None else self.accs.index(acc.into)  # the accumulator it adds into
                block = f"BLOCK_E{a}"
                self.features[block] = acc.feature
                v_lines, v = self.operand_tile(acc.value, "n", "offs_n", acc.feature, block)
                if acc.into is None:
                    init.append(f"acc{k} = tl.zeros([BLOCK_M, {block}], tl.float32)")
                else:
                    update_lines.append(comment(f"added into acc{a} (the outputs only read their sum)"))
                w = f"tl.where({allowed}, {x.code}, 0.0)"
                update_lines += v_lines + [
                    "if UPCAST_DOT:",
                    f"    acc{a} = acc{a}{rescale} + tl.dot({w}, {v.code}.to(tl.float32), input_precision=PRECISION)",
                    "else:",
                    f"    acc{a} = acc{a}{rescale} + tl.dot({w}.to({v.code}.dtype), {v.code}, "
                    "input_precision=PRECISION)"]
            else:
                init.append(f"acc{k} = tl.zeros([BLOCK_M], tl.float32)")
                update_lines.append(f"acc{k} = acc{k}{rescale} + tl.sum(tl.where({allowed}, {x.code}, 0.0), 1)")
            if acc.online is not None and acc.into is None:
                lse = self.accs.index(acc.online)
                rows = "[:, None]" if acc.kind is Reduction.DOT else ""
                last = max(s for s, seg in enumerate(self.p.segments())
                           if any(a is acc or a.into is acc for a in seg.accumulators))
                if last < self.last_stream(acc.online):  # a later key set may still raise the maximum
                    end = f"m{lse}_end{last}"
                    after = self.after.setdefault(last, [])
                    if f"{end} = m{lse}" not in after:
                        after.append(f"{end} = m{lse}")
                    final.append(f"acc{k} = acc{k} * tl.where({end} > {_NEG_INF}, tl.exp({end} - m{lse}), 0.0){rows}"
                                 "  # to the final maximum of the joint normaliser")
                norm = f"tl.where(l{lse} > 0, l{lse}, 1.0)"
                final.append(f"acc{k} = acc{k} / {norm}{rows}")
        em.body = saved_body + em.body + update_lines

    def lse_init(self, h: int, acc: Accumulator) -> list[str]:
        """The running maximum and sum of a log-sum-exp before its first tile: empty, or for a
        joint one with a sink logit, that one entry."""
        if acc.parts:
            streams = ", ".join(repr(a.stream) for a in (acc, *acc.parts))
            lines = [comment(f"one online normaliser for the key sets {streams}: one running maximum m{h} and "
                             f"sum l{h} per row shared by their loops")]
        else:
            lines = []
        if acc.sink is None:
            return lines + [f"m{h} = tl.full([BLOCK_M], {_NEG_INF}, tl.float32)",
                            f"l{h} = tl.zeros([BLOCK_M], tl.float32)"]
        sink = self.em.emit(acc.sink).code
        return lines + [f"m{h} = tl.max(tl.zeros([BLOCK_M, 1], tl.float32) + {sink}, 1)  # the sink logit: one entry",
                        f"l{h} = tl.where(m{h} > {_NEG_INF}, 1.0, 0.0)"]

    def last_stream(self, head: Accumulator) -> int:
        """The index of the last stream of this kernel that updates a log-sum-exp."""
        return max(s for s, seg in enumerate(self.p.segments())
                   if any(a is head or a.joint is head for a in seg.accumulators))

    def topk_lines(self, k: int, acc: Accumulator, allowed: str, init: list, final: list) -> list[str]:
        """A buffer of each row's `amount` largest entries so far (descending), merged with
        every tile by picking the larger head of the two, `amount` times; the threshold is
        the buffer's last entry (+inf when nothing is to be kept)."""
        em = self.em
        x = em.emit(acc.arg)
        amount = em.emit(acc.node.amount).code
        block = f"KP{k}"
        self.topk[block] = acc.node.amount
        init += [f"buf{k} = tl.full([BLOCK_M, {block}], {_NEG_INF}, tl.float32)",
                 f"kcols{k} = tl.arange(0, {block})"]
        final.append(f"acc{k} = tl.where({amount} > 0, tl.max(tl.where(kcols{k}[None, :] == {amount} - 1, buf{k}, "
                     f"{_NEG_INF}), 1), {_POS_INF})")
        return [
            f"xt{k} = tl.where({allowed}, {x.code}, {_NEG_INF})",
            f"old{k} = buf{k}",
            f"buf{k} = tl.full([BLOCK_M, {block}], {_NEG_INF}, tl.float32)",
            f"for r{k} in range(0, {amount}):",
            f"    head_x{k} = tl.max(xt{k}, 1)",
            f"    head_b{k} = tl.max(old{k}, 1)",
            f"    from_x{k} = head_x{k} >= head_b{k}",
            f"    at_x{k} = tl.argmax(xt{k}, 1)",
            f"    at_b{k} = tl.argmax(old{k}, 1)",
            f"    xt{k} = tl.where(from_x{k}[:, None] & (tl.arange(0, BLOCK_N)[None, :] == at_x{k}[:, None]), "
            f"{_NEG_INF}, xt{k})",
            f"    old{k} = tl.where((from_x{k} == 0)[:, None] & (kcols{k}[None, :] == at_b{k}[:, None]), "
            f"{_NEG_INF}, old{k})",
            f"    buf{k} = tl.where(kcols{k}[None, :] == r{k}, tl.where(from_x{k}, head_x{k}, head_b{k})[:, None], "
            f"buf{k})"]

    def store(self, r: int, k: int, acc: Accumulator) -> str:
        """Store accumulator `k` as the kernel's result `r`."""
        parts, ok = [], "row_ok"
        for a, ix in enumerate(acc.node.indices):
            if ix == self.p.row:
                parts.append(f"offs_m{'[:, None]' if acc.kind is Reduction.DOT else ''} * res{r}_s{a}")
            elif ix == acc.feature:
                parts.append(f"tl.arange(0, BLOCK_E{k})[None, :] * res{r}_s{a}")
                ok = f"row_ok[:, None] & (tl.arange(0, BLOCK_E{k})[None, :] < {self.extent_arg(ix)})"
            else:
                parts.append(f"{names.user('idx', ix)} * res{r}_s{a}")
        return f"tl.store(res{r}_ptr + {' + '.join(parts) or '0'}, acc{k}, mask={ok})"


def _row_data_bound(atom, j, opaque: dict, row: str) -> tuple | None:
    """An opaque mask atom that bounds the streamed index by an integer value per row,
    `j > f[b,i] + r` (or `>=`, `<`, `<=`; f read from a tensor, r free of the row): ("lo" or
    "hi", f's node, the sign of f in the inclusive bound, r adjusted to inclusive), so a row
    tile's range is cut at the extreme of f over its rows (window_summary: the raw keys
    after the last summarised one). None for any other atom."""
    if not isinstance(atom, (sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan)):
        return None
    expr = sympy.expand(atom.lhs - atom.rhs)  # the atom is `expr OP 0`
    symbols = {s.name: s for s in expr.free_symbols}
    js = symbols.get(str(j))
    calls = list(expr.atoms(sympy.core.function.AppliedUndef))
    if js is None or len(calls) != 1 or str(calls[0].func) not in opaque:
        return None
    cj = sympy.diff(expr, js)
    if cj not in (1, -1):
        return None
    node = opaque[str(calls[0].func)]
    greater = isinstance(atom, (sympy.StrictGreaterThan, sympy.GreaterThan))
    strict = isinstance(atom, (sympy.StrictGreaterThan, sympy.StrictLessThan))
    if cj == -1:  # -j + ... OP 0 is j OP' ...
        expr, greater = -expr, not greater
    cf = sympy.diff(expr, calls[0])
    rest = -(expr - js - cf * calls[0])  # j OP (-cf) * f + rest
    if cf not in (1, -1) or {s.name for s in rest.free_symbols} & {js.name, row} or \
            rest.atoms(sympy.core.function.AppliedUndef):
        return None
    if strict:
        rest = rest + (1 if greater else -1)
    return ("lo" if greater else "hi"), node, int(-cf), rest


def generate_streams(plan: StreamPlan, name: str) -> StreamSource:
    """The module of a general plan: one kernel per pass."""
    prefix = names.kernel(name)
    texts, sources = [], []
    for k, sp in enumerate(plan.passes):
        text, src = PassCodegen(plan, sp, f"{prefix}_pass{k}").generate()
        texts.append(text)
        sources.append(src)
    doc = (f"Generated by attncc from {os.path.basename(plan.program.source.filename)}: do not edit; "
           f"regenerate instead.\n\nSkeleton: the general streaming plan.\n\n{plan.describe()}\n")
    header = [docstring(doc), "import triton", "import triton.language as tl", "", ""]
    return StreamSource(prefix, "\n".join(header) + "\n\n\n".join(texts) + "\n", sources)
