"""Launching the generated backward of a row-streaming plan (one softmax over the keys).

The forward runs with its log-sum-exp stored and saves O and the LSE (O(N) beyond the
inputs). The backward launches three generated kernels (`codegen/row_backward.py`): delta,
dK/dV per key tile, dQ per query tile. They give the gradients of the *operands* the tiles
read, laid out (outer indices..., rows, features) and per query head; this module maps them
onto the inputs: a plain read of an input is a permute (and a sum over the query heads of a
GQA group, or over an outer index the operand does not have); any other read, and the
precomputed operands (pooled agents, permuted keys), goes through torch autograd of the
reference's (small) torch ops for that read.

Float tensors the score reads (`passes.backward.ReadGradient`) come back from the kernels as
fp32 partials over (batch, head, rows / columns / pairs), or, for gathered reads, scattered by
atomics into the tensor's layout, or with `deterministic` as per-program slots summed here.
`onto_tensor` puts the partials at the read's indices (evaluated by the reference executor),
adding duplicates with `scatter_sum` (sorted, then summed pairwise: a fixed order, no
atomics), so that every step but the non-deterministic atomics gives the same bits every run.
A sink logit's gradient (`sink_gradient`) is a row sum of the saved LSE and delta, on the host.
A log-sum-exp computed by a statistics pass (softmax over queries) is recomputed by that pass,
and its gradient (a read's partial) goes into the pass's own generated backward as dLSE
(`statistics_gradients`).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import ir, runtime
from attncc.codegen import names
from .binding import BoundCall
from .reference import Reference, align, evaluate_scalar
from .runtime import (KernelLaunch, check_device, launch, launch_tma_or_pointers, load_module, pow2,
                      promote_operands, tma_layout_ok, triton_cdiv)
from attncc.codegen import block_map
from attncc.codegen.row_backward import generate_backward
from attncc.passes.backward import BackwardPlan, NoGeneratedBackward
from attncc.passes.kinds import KernelRole, LaunchPath, MaskMode, ReadMode
from attncc.passes.linear import backward_path, decay_on, decay_read, row_sum_on
from attncc.passes.row_stream import map_outer


_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def default_backward_config(interpret: bool, d: int, e: int, dq_reads: int = 0) -> dict:
    """Tiles of the backward kernels (BLOCK_M x BLOCK_N, queries x keys), per kernel: `"dkdv"`
    and `"dq"` (the delta kernel takes dQ's BLOCK_M), and `USE_TMA` (None: Hopper's default,
    `RowStreamLauncher.use_tma`). Small in the interpreter. On a GPU, 4 warps, chosen from the
    static report (`benchmarks/static_resources.py --backward`: sm_90, bf16, TMA loads; every
    dot a wgmma needs 64-row tiles): up to head dim 64, dK/dV 64x64 (causal 204 registers, 2
    CTAs/SM; 32x64 took 241) and dQ 64x32 (91 registers, 5 CTAs/SM; 32x64 took 174, 2 CTAs,
    no wgmma); up to 128, 64x32 for both (dK/dV with 1 stage: 226 registers, where 2 stages
    took 246 and spilled 8-72 B for four gallery masks; dQ 122; a 64-key dK/dV tile spills
    with 4 warps), except a dQ kernel that accumulates the gradients of more than one score read
    (`dq_reads`): 64x16, fewer [queries, keys] tiles live per thread with the query tile still
    a wgmma's 64 rows (a spec with a tile bias and a temperature spilled 32 B at 64x32 and
    264 B at 32x32, one with a tanh and a deterministic block-bias scatter 824 B at 64x32;
    neither spills at 64x16); above 128, 32x32. Not timed: no GPU has run them."""
    if interpret:
        tiles = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        return {"dkdv": dict(tiles), "dq": dict(tiles), "USE_TMA": None}
    if max(d, e) > 128:
        dkdv = dq = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    elif max(d, e) > 64:
        dkdv = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        dq = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
        if dq_reads > 1:
            dq = {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
    else:
        dkdv = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        dq = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"dkdv": dict(dkdv), "dq": dict(dq), "USE_TMA": None}


def backward_config(interpret: bool, d: int, e: int, config: dict | None = None, dq_reads: int = 0) -> dict:
    """The default backward config updated by `config`: its `"dkdv"` and `"dq"` dicts update
    those kernels' tiles, a tile key at its top level (`BLOCK_M`, `num_warps`, ...) both
    kernels', `USE_TMA` the load path."""
    cfg = default_backward_config(interpret, d, e, dq_reads)
    for key, value in (config or {}).items():
        if key in ("dkdv", "dq"):
            cfg[key].update(value)
        elif key in _TILE_KEYS:
            cfg["dkdv"][key] = cfg["dq"][key] = value
        else:
            cfg[key] = value
    return cfg


# The chunked scans' warps on a GPU, with chunks of 16 and the reverse scan split into its dK and
# dV runs: at D = E = 64 on sm_90 (bf16, `attncc.aot`) this spills nothing for lightning's dQ scan
# and its dK and dV runs, where 4 warps and one reverse run spilled 440 and 584 B (chunks of 32 or
# 64 spill KBs); untimed, no GPU has run them.
CHUNKED_BACKWARD_WARPS = 8
# The reverse scan's runs (its DK and DV constexprs), by whether the call is interpreted: one for
# dK and one for dV on a GPU (each holds one output and its products), both at once in the
# interpreter (half the work; tests/test_linear_backward.py also runs the split there).
CHUNKED_REVERSE_RUNS = {False: (dict(DK=True, DV=False), dict(DK=False, DV=True)), True: (dict(DK=True, DV=True),)}


def make_backward(bplan: BackwardPlan, forward) -> "RowStreamBackward | TermsBackward":
    """The launcher of a kernel's generated backward: one set of kernels, or one per weight term."""
    return TermsBackward(bplan) if bplan.parts else RowStreamBackward(bplan, forward)


class TermsBackward:
    """The backward of weights that are a sum of terms, `o = sum_t c_t W_t V` (a difference of
    softmaxes): per term, the forward kernel of the term alone recomputes its output O_t and
    log-sum-exp (O(N) memory), and that term's generated backward runs with `c_t * dO`; the
    gradients add up. A coefficient that reads float inputs gets `d loss / d c_t = rowsum(dO * O_t)`,
    chained into them through the reference's torch ops for the coefficient."""

    def __init__(self, bplan: BackwardPlan):
        from attncc.codegen.row_stream import generate_module

        self.bplan = bplan
        self.plan = bplan.plan
        self.parts = []
        for t, (part, coef) in enumerate(bplan.parts):
            name = f"{self.plan.program.name}_term{t}"
            forward = runtime.RowStreamLauncher(part.plan, generate_module(part.plan, name))
            self.parts.append((RowStreamBackward(part, forward, name), coef))

    @property
    def last_tma_fallback(self) -> str | None:
        """Why a term's last backward kernels took pointers after their TMA form failed to build."""
        return next((part.last_tma_fallback for part, _ in self.parts if part.last_tma_fallback), None)

    def gradients(self, call: BoundCall, o, lse, grad_o, grad_lse, wanted, config: dict | None = None,
                  deterministic: bool = False) -> dict:
        """Gradients of the inputs named in `wanted` (`o`, `lse`, `grad_lse`: unused, the terms
        have their own)."""
        p = self.plan
        found: dict[str, torch.Tensor] = {}
        if grad_o is None:
            return found
        leaves = {n: t.detach().requires_grad_(n in wanted and t.is_floating_point()) for n, t in call.tensors.items()}
        pairs = []
        for part, coef in self.parts:
            o_t, *lse_t = part.forward(call, part.plan.has_lse)
            lse_t = lse_t[0] if lse_t else None
            axes = part.plan.output.axes  # the output's, and the heads it sums over (mixture-of-heads)
            g = align(grad_o, p.output.axes, axes)
            if coef is not None:
                with torch.enable_grad():
                    c = Reference(p.program, leaves, call.scalars).full(coef)
                g_c = g * align(c.detach().to(grad_o.dtype), coef.indices, axes)
                if c.requires_grad:
                    dc = g.float() * o_t.float()
                    extra = [k for k, ix in enumerate(axes) if ix not in coef.indices]
                    dc = dc.sum(extra) if extra else dc
                    kept = tuple(ix for ix in axes if ix in coef.indices)
                    pairs.append((c, align(dc, kept, coef.indices).to(c.dtype)))
                g = g_c
            g = g.expand([o_t.shape[k] for k in range(o_t.dim())])
            for n, grad in part.gradients(call, o_t, lse_t, g, None, wanted, config, deterministic).items():
                found[n] = grad.float() if n not in found else found[n] + grad.float()
        chain_through_torch(pairs, wanted, leaves, found)
        return {n: g.to(call.tensors[n].dtype) for n, g in found.items()}

    def launches(self, call: BoundCall, return_lse: bool = False, config: dict | None = None,
                 deterministic: bool = False) -> list[KernelLaunch]:
        """Each term's recomputing forward launches, then its backward launches, recorded."""
        out = []
        for part, _ in self.parts:
            out += part.forward.launches(call, part.plan.has_lse)
            out += part.launches(call, False, config, deterministic)
        return out


class RowStreamBackward:
    """The generated backward of one kernel; `forward` is its `RowStreamLauncher` (block maps,
    scalar arguments and the score scale come from it)."""

    def __init__(self, bplan: BackwardPlan, forward, name: str | None = None):
        """`name`: what the kernels' names start with (the spec's name by default)."""
        self.bplan = bplan
        self.plan = bplan.plan
        self.forward = forward
        name = name or self.plan.program.name
        self.src = generate_backward(bplan, name)
        # the statistics passes the weights read (softmax over queries): their own backward kernels
        self.statistics = {node: RowStreamBackward(stats, forward.statistics_launcher(node), f"{name}_stats{k}")
                           for k, (node, stats) in enumerate(bplan.statistics.items())}
        self.modules: dict[bool, object] = {}
        self.last_tiles: dict | None = None  # the grids of the last backward launches
        self.last_path: LaunchPath | None = None  # row streaming, or the chunked scans (linear time)
        self.last_tma = False  # whether the last dK/dV and dQ launches loaded through TMA descriptors
        self.tma_failures: dict = {}  # kernel variant -> why its TMA form did not build (it uses pointers)
        self.last_tma_fallback: str | None = None

    # ------------------------------------------------------------------ kernels
    def operand_gradients(self, call: BoundCall, o, lse, grad_o, grad_lse, config: dict | None = None,
                          deterministic: bool = False, reads=None):
        """dQ, dK, dV of the operand tiles (fp32), each laid out (outer..., rows, features) with
        one slice per (batch, query head), for a call whose tensors hold every operand (the
        precomputed ones included), and the partials of the score's float reads (read number
        -> fp32 tensor, see `read_buffers`), and delta (fp32, (batch x head, rows)). `o`: the
        forward's output; `lse`: its fp32 log-sum-exp (pointwise weights: none, and no delta);
        `grad_o`, `grad_lse`: the incoming gradients (None: zero). `reads`: the
        numbers of the reads whose gradients are wanted (None: all); the kernels skip the others.
        `deterministic`: gathered reads reduced per program in a fixed order, no atomics."""
        p = self.plan
        interpret = check_device(call)
        operands = {op.input.name for op in self.operands()}
        call = promote_operands(call, operands)
        module = self.modules.get(interpret) or self.modules.setdefault(interpret, load_module(self.src, interpret))
        sizes = call.sizes or p.program.sizes(call.scalars)
        n_rows, n_cols, n_feat = sizes[p.i], sizes[p.j], sizes[p.d]
        n_vfeat = sizes[p.e] if p.v is not None else 1
        outer_sizes = [sizes[ix] for ix in p.outer]
        combos = math.prod(outer_sizes)
        device = call.device
        cfg = backward_config(interpret, n_feat, n_vfeat, config, len(self.src.dq.reads))
        tiles = {KernelRole.BWD_DKDV: cfg["dkdv"], KernelRole.BWD_DQ: cfg["dq"]}
        rows_axes, out_axes = (*p.outer, p.i), (*p.outer, p.i, p.e)
        if p.v is None:  # a statistics pass: no output, only its log-sum-exp's gradient (a placeholder dO)
            o = grad_o = torch.zeros([1] * len(out_axes), dtype=torch.float32, device=device)
        else:
            o = align(o, p.output.axes, out_axes)
            grad_o = torch.zeros_like(o) if grad_o is None else align(grad_o, p.output.axes, out_axes)
        upcast = interpret and call.tensors[p.q.input.name].dtype == torch.bfloat16

        def options(role):
            t = tiles.get(role, cfg["dq"])  # the delta kernel: dQ's
            return {} if interpret else {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}

        block_d, block_e = pow2(n_feat), pow2(n_vfeat)
        dq = torch.empty((*outer_sizes, n_rows, n_feat), dtype=torch.float32, device=device)
        dk = torch.empty((*outer_sizes, n_cols, n_feat), dtype=torch.float32, device=device)
        dv = torch.empty((*outer_sizes, n_cols, n_vfeat) if p.v is not None else (1,), dtype=torch.float32,
                         device=device)  # a statistics pass has no values
        # TMA boxes for q, k, v and dO (made contiguous: autograd's may be a broadcast or a strided
        # view) and the gradients' stores, where each layout allows them
        use_tma = self.forward.use_tma(call, cfg, interpret) and all(_rows_ok(t) for t in (dq, dk, dv)[:len(self.operands())])
        if use_tma and not _rows_ok(grad_o):
            grad_o = grad_o.contiguous()
            use_tma = _rows_ok(grad_o)
        if self.bplan.pointwise:  # P is the weight itself: the kernels read no LSE and no delta
            lse = delta = odo = torch.zeros(1, dtype=torch.float32, device=device)
        elif p.v is None:  # delta = rowsum(dO * O) - dLSE = -dLSE: no kernel needed
            lse = align(lse.float(), p.lse_axes, rows_axes).expand(*outer_sizes, n_rows).contiguous()
            delta = -align(grad_lse.float(), p.lse_axes, rows_axes).expand(*outer_sizes, n_rows).reshape(combos, n_rows)
            odo = torch.zeros_like(delta)
        else:
            lse = align(lse.float(), p.lse_axes, rows_axes).expand(*outer_sizes, n_rows).contiguous()
            dlse = None if grad_lse is None else \
                align(grad_lse.float(), p.lse_axes, rows_axes).expand(*outer_sizes, n_rows).contiguous()
            delta = torch.empty((combos, n_rows), dtype=torch.float32, device=device)
            odo = torch.empty_like(delta)  # rowsum(dO * O), for the dQ kernel's row sums of score reads
            bm = cfg["dq"]["BLOCK_M"]
            launch(KernelLaunch(getattr(module, self.src.pre), (triton_cdiv(n_rows, bm), combos),
                                [o, grad_o, dlse if dlse is not None else delta, delta, odo, *o.stride(),
                                 *grad_o.stride(), *outer_sizes, n_rows, n_vfeat],
                                dict(BLOCK_M=bm, BLOCK_E=block_e, HAS_DLSE=dlse is not None),
                                options(KernelRole.BWD_PRE), interpret, KernelRole.BWD_PRE))
        fixed = [n_rows, n_cols, n_feat, n_vfeat]
        bufs = self.read_buffers(call, combos, n_rows, n_cols, triton_cdiv(n_rows, cfg["dq"]["BLOCK_M"]),
                                 deterministic, reads)
        dummy = torch.zeros(1, dtype=torch.float32, device=device)  # the buffer of a read not wanted

        def flags(kernel, role):
            bm, bn = tiles[role]["BLOCK_M"], tiles[role]["BLOCK_N"]
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_E=block_e, PRECISION="ieee",
                        UPCAST_DOT=upcast, EVEN_N=n_cols % bn == 0, DETERMINISTIC=bool(deterministic),
                        USE_TMA=use_tma, **{f"GRAD{r}": r in bufs for r in kernel.reads})

        def common(kernel, outputs, map_args):
            tensors = [call.tensors[n] for n in kernel.tensor_inputs]
            scalars = self.forward.scalar_values(call, kernel.scalar_args[:-1], kernel.host_scalars)
            lens = [bufs.get(r, dummy).shape[-1] for r in kernel.reads
                    if self.bplan.reads[r].mode == ReadMode.SCATTER]
            return [*tensors, grad_o, lse, delta, *outputs, *(bufs.get(r, dummy) for r in kernel.reads),
                    *(x for t in tensors for x in t.stride()), *(x for t in tensors for x in t.shape),
                    *grad_o.stride(), *outer_sizes, *fixed, *map_args, *lens, *scalars, self.ds_scale(call)]

        def map_lists(role):  # the forward's block map at this kernel's tiles: per query tile or per key tile
            if self.bplan.dkdv_mode != MaskMode.BLOCK_MAP:
                return []
            fwd_module = self.forward.modules.get(interpret) or self.forward.modules.setdefault(
                interpret, load_module(self.forward.module_src, interpret))
            kv_lists = self.forward.block_map_lists(call, tiles[role]["BLOCK_M"], tiles[role]["BLOCK_N"], sizes,
                                                    fwd_module, interpret)
            if role == KernelRole.BWD_DQ:
                return kv_lists
            if runtime._RECORDING.get() is None:
                state = self.forward.last_block_map[3]
            else:  # a recording has no map: a placeholder of its shape
                lists = math.prod(sizes[ix] for ix in map_outer(p))
                state = torch.zeros((lists, kv_lists[3], kv_lists[4]), dtype=torch.int8, device=device)
            return [*block_map.tile_lists(state.transpose(1, 2)), kv_lists[3], kv_lists[4]]

        self.last_tma_fallback = None
        for role, kernel, outputs, programs in (
                (KernelRole.BWD_DKDV, self.src.dkdv, [dk, dv], triton_cdiv(n_cols, cfg["dkdv"]["BLOCK_N"])),
                (KernelRole.BWD_DQ, self.src.dq, [odo, dq], triton_cdiv(n_rows, cfg["dq"]["BLOCK_M"]))):
            k = KernelLaunch(getattr(module, kernel.name), (programs, combos),
                             common(kernel, outputs, map_lists(role)), flags(kernel, role), options(role), interpret,
                             role)
            key = (role, interpret, *sorted(k.options.items()), *sorted((n, v) for n, v in k.constexprs.items()))
            self.last_tma_fallback = launch_tma_or_pointers(k, key, self.tma_failures) or self.last_tma_fallback
            use_tma = use_tma and k.constexprs["USE_TMA"]
        self.last_tiles = {"dkdv": dict(cfg["dkdv"]), "dq": dict(cfg["dq"])}
        self.last_tma = use_tma
        return (dq, dk, dv)[:len(self.operands())], bufs, delta

    def operands(self) -> list:
        """The operands whose gradients the kernels give: q, k and v (a statistics pass: q, k)."""
        p = self.plan
        return [p.q, p.k, *([p.v] if p.v is not None else [])]

    def linear_gradients(self, call: BoundCall, grad_o, sizes: dict, reads: set):
        """(dQ, dK, dV of the operands, {read: row partial}) from the linear-time kernels of the
        path this call's backward takes (`passes.linear.backward_path`), or None when it streams
        rows instead (or the chunked scans cannot give a wanted read's gradient)."""
        p = self.plan
        path = backward_path(p, sizes, call.scalars)
        if path == LaunchPath.ROW_STREAMING:
            return None
        if not decay_on(p, call.scalars):  # a decay switched off: its base's reads get no gradient
            base = decay_read(p)
            if any(base is None or self.bplan.reads[r].name != base.array.name for r in reads):
                return None
            rows = (math.prod(sizes[ix] for ix in p.outer), sizes[p.i])
            zeros = {r: torch.zeros(rows, dtype=torch.float32, device=call.device) for r in reads}
            grads = self.chunked_gradients(call, grad_o, sizes, set()) if path == LaunchPath.CHUNKED else \
                self.reassociated_gradients(call, grad_o, sizes)
            return grads[0], zeros
        if path == LaunchPath.CHUNKED:
            return self.chunked_gradients(call, grad_o, sizes, reads)
        return None if reads else self.reassociated_gradients(call, grad_o, sizes)

    def _linear_setup(self, call: BoundCall, grad_o, sizes: dict):
        """(call with promoted operands, interpret, module, outer sizes, combos, dO laid out
        (outer..., rows, features), the buffers g = dO / den and gs of a row-sum normaliser
        (a 1-element dummy each without one))."""
        p = self.plan
        interpret = check_device(call)
        call = promote_operands(call, {op.input.name for op in (p.q, p.k, p.v)})
        outer_sizes = [sizes[ix] for ix in p.outer]
        combos, n_rows, n_vfeat = math.prod(outer_sizes), sizes[p.i], sizes[p.e]
        device = call.device
        out_axes = (*p.outer, p.i, p.e)
        grad_o = torch.zeros([sizes[ax] for ax in out_axes], dtype=call.out_dtype, device=device) \
            if grad_o is None else align(grad_o, p.output.axes, out_axes)
        module = self.modules.get(interpret) or self.modules.setdefault(interpret, load_module(self.src, interpret))
        if row_sum_on(p, call.scalars):
            gn = torch.empty((combos, n_rows, n_vfeat), dtype=torch.float32, device=device)
            gs = torch.empty((combos, n_rows), dtype=torch.float32, device=device)
        else:
            gn = gs = torch.zeros(1, dtype=torch.float32, device=device)
        return call, interpret, module, outer_sizes, combos, grad_o, gn, gs

    def chunked_gradients(self, call: BoundCall, grad_o, sizes: dict, reads: set):
        """(dQ, dK, dV of the operands, {read: row partial}) from the linear-time chunked
        kernels (`codegen/chunked.py`: a scan forwards for dQ, one backwards for dK and dV), or
        None when a wanted read is not the decay base `lam[h]`, or the base is 0 somewhere (its
        gradient divides by it). The base's row partials are `(t (dO . O) - t (V . dV)) / lam`
        per row t, which sum to `sum (i - j) lam^(i - j - 1) (q_i . k_j)(dO_i . v_j)`."""
        p, src = self.plan, self.src.chunked
        base = decay_read(p)
        if any(base is None or self.bplan.reads[r].name != base.array.name for r in reads):
            return None
        lam = None
        if reads:
            outer_sizes = [sizes[ix] for ix in p.outer]
            lam = align(Reference(p.program, call.tensors, call.scalars).full(base).float(), base.indices,
                        tuple(p.outer)).expand(*outer_sizes).reshape(math.prod(outer_sizes), 1)
            if (lam == 0).any():
                return None
        call, interpret, module, outer_sizes, combos, grad_o, gn, gs = self._linear_setup(call, grad_o, sizes)
        n_rows, n_feat, n_vfeat = sizes[p.i], sizes[p.d], sizes[p.e]
        device = call.device
        dq = torch.empty((*outer_sizes, n_rows, n_feat), dtype=torch.float32, device=device)
        dk = torch.empty_like(dq)
        dv = torch.empty((*outer_sizes, n_rows, n_vfeat), dtype=torch.float32, device=device)
        rs_o, rs_v = (torch.empty((combos, n_rows), dtype=torch.float32, device=device) for _ in range(2))
        tensors = [call.tensors[n] for n in src.tensor_inputs]
        scalars = self.forward.scalar_values(call, src.scalar_args, src.host_scalars)
        meta = dict(BLOCK_C=16, BLOCK_D=pow2(n_feat), BLOCK_E=pow2(n_vfeat), ROW_SUM=row_sum_on(p, call.scalars))
        options = {} if interpret else {"num_warps": CHUNKED_BACKWARD_WARPS}
        revs = CHUNKED_REVERSE_RUNS[interpret]
        for kernel, outputs, extra in (("fwd", (dq, dq, rs_o), {}), *(("rev", (dk, dv, rs_v), r) for r in revs)):
            args = [*tensors, grad_o, *outputs, gn, gs, *(x for t in tensors for x in t.stride()),
                    *(x for t in tensors for x in t.shape), *grad_o.stride(), *outer_sizes,
                    n_rows, sizes[p.j], n_feat, n_vfeat, *scalars]
            launch(KernelLaunch(getattr(module, f"{src.name}_{kernel}"), (combos,), args, {**meta, **extra}, options,
                                interpret, KernelRole.CHUNKED))
        self.last_path = LaunchPath.CHUNKED
        bufs = {r: (rs_o - rs_v) / lam for r in reads}
        return (dq, dk, dv), bufs

    def reassociated_gradients(self, call: BoundCall, grad_o, sizes: dict):
        """(dQ, dK, dV of the operands, {}) from the linear-time kernels of a call without an
        active mask (`codegen/reassociate.py`): the states S, z per (batch, head), dQ per query
        tile, the reverse states U, u, then dK and dV per key tile."""
        p, src = self.plan, self.src.reassociated
        call, interpret, module, outer_sizes, combos, grad_o, gn, gs = self._linear_setup(call, grad_o, sizes)
        n_rows, n_cols, n_feat, n_vfeat = sizes[p.i], sizes[p.j], sizes[p.d], sizes[p.e]
        block_d, block_e = pow2(n_feat), pow2(n_vfeat)
        device = call.device
        bm = bn = 16  # at D = E = 64 on sm_90 (4 warps): no spill; 32 x 64 tiles spill 176 B (dQ) and 7 KB (dK/dV)
        state, u_state = (torch.empty((combos, block_d, block_e), dtype=torch.float32, device=device)
                          for _ in range(2))
        z, u = (torch.empty((combos, block_d), dtype=torch.float32, device=device) for _ in range(2))
        dq = torch.empty((*outer_sizes, n_rows, n_feat), dtype=torch.float32, device=device)
        dk = torch.empty((*outer_sizes, n_cols, n_feat), dtype=torch.float32, device=device)
        dv = torch.empty((*outer_sizes, n_cols, n_vfeat), dtype=torch.float32, device=device)
        tensors = [call.tensors[n] for n in src.tensor_inputs]
        common = [*tensors, state, z, *(x for t in tensors for x in t.stride()),
                  *(x for t in tensors for x in t.shape), *outer_sizes, n_rows, n_cols, n_feat, n_vfeat]
        scalars = self.forward.scalar_values(call, src.scalar_args, src.host_scalars)
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_E=block_e, ROW_SUM=row_sum_on(p, call.scalars))
        options = {} if interpret else {"num_warps": 4}
        launch(KernelLaunch(getattr(module, f"{src.name}_state"), (1, combos), [*common, *scalars], meta, options,
                            interpret, KernelRole.LINEAR_STATE))
        for kernel, grid, outputs in (("dq", (triton_cdiv(n_rows, bm), combos), (dq, dq)),
                                      ("rev_state", (1, combos), (dq, dq)),
                                      ("dkdv", (triton_cdiv(n_cols, bn), combos), (dk, dv))):
            args = [*common, grad_o, gn, gs, *outputs, u_state, u, *grad_o.stride(), *scalars]
            launch(KernelLaunch(getattr(module, f"{src.name}_{kernel}"), grid, args, meta, options, interpret,
                                KernelRole.LINEAR_STATE if kernel == "rev_state" else KernelRole.LINEAR_APPLY))
        self.last_path = LaunchPath.REASSOCIATED
        return (dq, dk, dv), {}

    def read_buffers(self, call: BoundCall, combos: int, n_rows: int, n_cols: int, n_qtiles: int,
                     deterministic: bool, reads=None) -> dict:
        """The zeroed fp32 partials of the score's reads, by read number: row sums (one per
        (batch, head) and query row), column sums (per key), the pairs (per query and key), or
        for a gathered read the tensor's own layout (atomics), or with `deterministic` one slot
        per (dQ program's query tile, batch x head, entry of the read's tile dims)."""
        device, bufs = call.device, {}
        for r, rd in enumerate(self.bplan.reads):
            if rd.derivative is None or (reads is not None and r not in reads):
                continue
            shape = call.tensors[rd.name].shape
            if rd.mode == ReadMode.ROWS:
                size = (combos, n_rows)
            elif rd.mode == ReadMode.COLS:
                size = (combos, n_cols)
            elif rd.mode == ReadMode.TILE:
                size = (combos, n_rows, n_cols)
            elif deterministic:
                size = (n_qtiles, combos, math.prod(shape[k] for k in rd.tile_dims))
            else:
                size = (math.prod(shape),)
            bufs[r] = torch.zeros(size, dtype=torch.float32, device=device)
        return bufs

    def launches(self, call: BoundCall, return_lse: bool = False, config: dict | None = None,
                 deterministic: bool = False) -> list[KernelLaunch]:
        """The backward kernel launches of a call, recorded rather than run (the call's
        tensors may be meta tensors), every score read's gradient wanted (on a linear-time
        path: none, the decay base's needs the data): what `attncc.aot` compiles for a GPU
        this machine lacks."""
        p = self.plan
        sizes = call.sizes or p.program.sizes(call.scalars)
        like = call.tensors[p.q.input.name]
        o = torch.empty([sizes[ax] for ax in p.output.axes], dtype=call.out_dtype, device=like.device)
        lse = torch.empty([sizes[ax] for ax in p.lse_axes], dtype=torch.float32, device=like.device)
        token = runtime._RECORDING.set([])
        try:
            call = self.forward.with_precomputed(call)  # placeholders of the precomputed operands' layout
            if not return_lse and self.linear_gradients(call, torch.empty_like(o), sizes, set()) is not None:
                return runtime._RECORDING.get()
            self.operand_gradients(call, o, lse, torch.empty_like(o),
                                   torch.empty_like(lse) if return_lse or p.v is None else None, config, deterministic)
            recorded = runtime._RECORDING.get()
            for stats in self.statistics.values():
                recorded += stats.launches(call, False, config, deterministic)
            return recorded
        finally:
            runtime._RECORDING.reset(token)

    def ds_scale(self, call: BoundCall) -> float:
        """d (Q K^T node) / d (raw dot): the score's scalar factors, without log2(e)."""
        return float(math.prod(evaluate_scalar(f, call.scalars) for f in self.plan.terms[0].scale))

    # ------------------------------------------------------------------ onto the inputs
    def gradients(self, call: BoundCall, o, lse, grad_o, grad_lse, wanted, config: dict | None = None,
                  deterministic: bool = False) -> dict:
        """Gradients of the inputs named in `wanted`, from the generated kernels. `call`'s
        tensors are the saved inputs (no graph); precomputed operands are recomputed here with
        the reference's torch ops under autograd, so their inputs' gradients chain through them.
        `deterministic`: no atomics (the same bits every run)."""
        p, bplan = self.plan, self.bplan
        pre = p.precomputed
        leaves = {n: t.detach().requires_grad_(n in wanted and t.is_floating_point())
                  for n, t in call.tensors.items()}
        graphed = dict(leaves)
        stats_lse, stats_of = {}, {}  # statistics passes: their fp32 log-sum-exp; synthetic name -> node
        if pre is not None and pre.inputs:
            with torch.enable_grad():
                ref = Reference(p.program, leaves, call.scalars)
                for node, synthetic in pre.inputs.items():
                    if node in self.statistics:  # its own generated pass, no graph: its backward is generated too
                        stats_lse[node] = self.forward.statistics_launcher(node)(call, True)[-1]
                        stats_of[synthetic.name] = node
                        value = stats_lse[node]
                    else:
                        value = ref.full(node)
                    value = align(value, node.indices, pre.axes[node]).contiguous()
                    graphed[synthetic.name] = value.to(call.out_dtype) if value.is_floating_point() else value
        kernel_call = dataclasses.replace(call, tensors={n: t.detach() for n, t in graphed.items()})

        def wants(name):
            if name in stats_of:
                return bool(self.statistics[stats_of[name]].bplan.grad_inputs & set(wanted))
            return graphed[name].requires_grad if names.is_synthetic(name) else name in wanted

        reads = {r for r, rd in enumerate(bplan.reads) if wants(rd.name)}
        sizes = call.sizes or p.program.sizes(call.scalars)
        self.last_tma_fallback = None  # the linear-time kernels load by pointers: nothing fell back
        linear = self.linear_gradients(kernel_call, grad_o, sizes, reads)
        if linear is not None:
            (partials, bufs), delta = linear, None
        elif bplan.linear_only:
            raise NoGeneratedBackward(f"{p.program.name}: normalised linear attention (or feature maps) has its backward "
                               "on the linear-time kernels only, and they cannot run this call (a mask other than "
                               "exactly causal on a square score, or the decay base's gradient at a base of 0)")
        else:
            partials, bufs, delta = self.operand_gradients(kernel_call, o, lse, grad_o, grad_lse, config,
                                                           deterministic, reads)
            self.last_path = LaunchPath.ROW_STREAMING
        found: dict[str, torch.Tensor] = {}
        pairs = []
        if bplan.sink is not None:
            sink = self.sink_gradient(graphed, call.scalars, lse, delta, sizes)
            if sink is not None:
                pairs.append(sink)
        for r in sorted(reads):
            rd = bplan.reads[r]
            if r not in bufs:  # a piecewise-constant read: no gradient flows through it
                grad = torch.zeros(kernel_call.tensors[rd.name].shape, dtype=torch.float32, device=call.device)
            else:
                grad = self.read_gradient(rd, bufs[r], kernel_call, sizes, deterministic)
            if rd.name in stats_of:
                self.statistics_gradients(stats_of[rd.name], call, stats_lse, grad, sizes, wanted, config,
                                          deterministic, found)
            elif names.is_synthetic(rd.name):
                pairs.append((graphed[rd.name], grad.to(graphed[rd.name].dtype)))
            else:
                found[rd.name] = grad if rd.name not in found else found[rd.name] + grad
        for op, part, row, feat in zip(self.operands(), partials, (p.i, p.j, p.j), (p.d, p.d, p.e)):
            name = op.input.name
            have = (*p.outer, row, feat)
            if name not in bplan.chained and op.transform is None and name not in wanted:
                continue
            direct = None if name in bplan.chained or op.transform is not None else \
                _plain_read(part, have, op.access, sizes, p.group, call.scalars, call.tensors[name].shape)
            if direct is not None:
                found[name] = direct if name not in found else found[name] + direct
                continue
            node = op.transform or op.access  # the kernels' gradient is the feature-mapped operand's
            with torch.enable_grad():
                value = Reference(p.program, graphed, call.scalars).full(node)
            extra = [k for k, ix in enumerate(have) if ix not in node.indices]
            part = part.sum(extra) if extra else part
            kept = tuple(ix for ix in have if ix in node.indices)
            if value.requires_grad:
                pairs.append((value, align(part, kept, node.indices).to(value.dtype)))
        chain_through_torch(pairs, wanted, leaves, found)
        return {n: g.to(call.tensors[n].dtype) for n, g in found.items()}

    def statistics_gradients(self, node, call: BoundCall, stats_lse: dict, grad: torch.Tensor, sizes: dict, wanted,
                             config, deterministic: bool, found: dict) -> None:
        """Add into `found` the gradients that reach the inputs through a statistics pass's
        log-sum-exp (`node`), given `grad`, the gradient of its precomputed tensor: that pass's
        generated backward with dLSE = grad (the loss reaches its scores only through the LSE)."""
        pre, stats = self.plan.precomputed, self.statistics[node]
        have = pre.axes[node]
        kept = tuple(ix for ix in have if ix in node.indices)
        grad = align(grad.reshape([sizes[ix] for ix in kept]), kept, stats.plan.lse_axes)
        lse = align(stats_lse[node], node.indices, stats.plan.lse_axes)
        for n, g in stats.gradients(call, None, lse, None, grad, wanted, config, deterministic).items():
            found[n] = g.float() if n not in found else found[n] + g.float()

    def sink_gradient(self, graphed: dict, scalars: dict, lse, delta, sizes: dict):
        """(the sink logit, recomputed by the reference's torch ops from the inputs under
        autograd; d loss / d sink), or None when no input it reads requires grad. The sink is
        one more key of value 0: its probability is `exp(sink - LSE)` and its gradient
        `-exp(sink - LSE) * delta` per query row (rows with LSE = -inf: 0), summed over the
        rows and the batch / head indices the sink does not have by `torch.sum` (a fixed order,
        no atomics: deterministic)."""
        p, node = self.plan, self.bplan.sink
        with torch.enable_grad():
            value = Reference(p.program, graphed, scalars).full(node)
        if not value.requires_grad:
            return None
        rows_axes = (*p.outer, p.i)
        shape = [sizes[ix] for ix in rows_axes]
        lse = align(lse.float(), p.lse_axes, rows_axes).expand(shape)
        logit = align(value.detach().float(), node.indices, rows_axes)
        prob = torch.where(lse == -math.inf, 0.0, torch.exp(logit - torch.where(lse == -math.inf, 0.0, lse)))
        grad = -prob * delta.view(shape)
        extra = [k for k, ix in enumerate(rows_axes) if ix not in node.indices]
        grad = grad.sum(extra) if extra else grad
        kept = tuple(ix for ix in rows_axes if ix in node.indices)
        return value, align(grad, kept, node.indices).to(value.dtype)

    def read_gradient(self, rd, buf: torch.Tensor, call: BoundCall, sizes: dict, deterministic: bool):
        """The fp32 gradient of the tensor a score read reads, from the kernels' partial."""
        p = self.plan
        shape = tuple(call.tensors[rd.name].shape)
        if rd.mode == ReadMode.SCATTER and not deterministic:  # atomics wrote the tensor's layout
            return buf.view(shape)
        outer = tuple(p.outer)
        lead = [sizes[ix] for ix in outer]
        args = list(rd.args)
        if rd.mode == ReadMode.SCATTER:  # per-program slots: summed over programs, then the tile dims as axes
            region = [f"<dim{k}>" for k in rd.tile_dims]
            part = buf.sum(0).view(*lead, *(shape[k] for k in rd.tile_dims))
            axes = (*outer, *region)
            for k, name in zip(rd.tile_dims, region):
                args[k] = name
        else:
            tile = {ReadMode.ROWS: (p.i,), ReadMode.COLS: (p.j,), ReadMode.TILE: (p.i, p.j)}[rd.mode]
            part = buf.view(*lead, *(sizes[ix] for ix in tile))
            axes = (*outer, *tile)
        ref = Reference(p.program, call.tensors, call.scalars)
        return onto_tensor(part, axes, args, shape, ref.full)


def _rows_ok(t: torch.Tensor) -> bool:
    """Whether a tensor laid out (outer..., rows, features) takes TMA boxes of [rows, features]."""
    return tma_layout_ok(t, t.dim() - 1)


def _plain_read(part: torch.Tensor, have: tuple, access: ir.Access, sizes: dict, group, scalars: dict, shape):
    """The gradient of an input from its operand gradient `part` (dims named `have`), when the
    operand reads the input at bare indices (a permute, and a sum over the indices it does not
    read) or at `h // R` for a GQA group (the query heads of a group summed); None otherwise."""
    t, axes, want = part, list(have), []
    for arg in access.args:
        if isinstance(arg, ir.Index) and arg.name in axes and arg.name not in want:
            want.append(arg.name)
            continue
        h = group[0] if group is not None else None
        if isinstance(arg, ir.Map) and arg.op == "//" and isinstance(arg.args[0], ir.Index) \
                and arg.args[0].name == h and h in axes and arg.args[1].is_scalar:
            try:
                r = int(evaluate_scalar(arg.args[1], scalars))
            except (KeyError, NotImplementedError, TypeError, ValueError):
                return None
            pos = axes.index(h)
            if r < 1 or sizes[h] % r:
                return None
            t = t.unflatten(pos, (sizes[h] // r, r)).sum(pos + 1)  # the query heads of one K/V head
            axes[pos] = f"{h}//"
            want.append(axes[pos])
            continue
        return None
    extra = [k for k, ix in enumerate(axes) if ix not in want]
    if extra:
        t = t.sum(extra)
        axes = [ix for ix in axes if ix in want]
    t = t.permute([axes.index(ix) for ix in want])
    return t if tuple(t.shape) == tuple(shape) else None


def onto_tensor(part: torch.Tensor, axes: tuple, args, shape: tuple, evaluate) -> torch.Tensor:
    """`part` (dims named `axes`) added into a tensor of `shape` at the positions `args` give:
    per dim of the tensor, an axis name of `part` (its own index) or an integer IR node that
    `evaluate` gives as a torch tensor over its indices (a subset of `axes`). Entries whose
    position is out of the tensor's range are dropped (the kernels read 0 there). Bare, distinct
    axes are a sum over the others and a permute; anything else goes through `scatter_sum`."""
    names_ = [a.name if isinstance(a, ir.Index) and a.name in axes else a for a in args]
    plain = all(isinstance(a, str) for a in names_) and len(set(names_)) == len(names_) and \
        all(part.shape[axes.index(a)] == shape[k] for k, a in enumerate(names_))
    if plain:
        extra = [k for k, ix in enumerate(axes) if ix not in names_]
        t = part.sum(extra) if extra else part
        kept = [ix for ix in axes if ix in names_]
        return t.permute([kept.index(a) for a in names_]).contiguous()
    flat = torch.zeros((), dtype=torch.int64, device=part.device)
    ok = torch.ones((), dtype=torch.bool, device=part.device)
    for k, a in enumerate(names_):
        if isinstance(a, str):
            pos = align(torch.arange(part.shape[axes.index(a)], device=part.device), (a,), axes)
        else:
            pos = align(evaluate(a).to(torch.int64), a.indices, axes)
        ok = ok & (pos >= 0) & (pos < shape[k])
        flat = flat * shape[k] + pos
    flat, ok = flat.expand(part.shape), ok.expand(part.shape)
    return scatter_sum(part[ok], flat[ok], math.prod(shape)).view(shape)


def scatter_sum(values: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """A deterministic scatter-add: `out[positions[n]] += values[n]` into zeros of `size`, in a
    fixed order on every device (a stable sort by position, then the entries of each position
    summed pairwise in rounds: entry 2r + 1 into entry 2r, until one is left), where torch's
    `index_add_` may use atomics."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    if positions.numel() == 0:
        return out
    order = torch.argsort(positions, stable=True)
    pos, val = positions[order], values[order]
    first = torch.ones_like(pos, dtype=torch.bool)
    first[1:] = pos[1:] != pos[:-1]
    starts = torch.nonzero(first).squeeze(1)
    rank = torch.arange(len(pos), device=pos.device) - starts[torch.cumsum(first, 0) - 1]
    while len(pos) > len(starts):  # some position still has more than one entry
        odd = torch.nonzero(rank % 2 == 1).squeeze(1)
        val = val.clone()
        val[odd - 1] = val[odd - 1] + val[odd]  # distinct targets: no accumulation order to decide
        keep = rank % 2 == 0
        pos, val, rank = pos[keep], val[keep], rank[keep] // 2
    out[pos] = val
    return out


def chain_through_torch(pairs: list, wanted, leaves: dict, found: dict) -> None:
    """Add into `found` the gradients that flow through torch ops (coefficients, precomputed
    operands): autograd of each (value, gradient of value) pair onto the inputs' leaves."""
    if not pairs:
        return
    targets = [n for n in wanted if leaves[n].requires_grad]
    with torch.enable_grad():
        chained = torch.autograd.grad([v for v, _ in pairs], [leaves[n] for n in targets],
                                      [g for _, g in pairs], allow_unused=True)
    for n, grad in zip(targets, chained):
        if grad is not None:
            found[n] = grad.float() if n not in found else found[n] + grad.float()
