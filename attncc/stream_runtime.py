"""Running a general streaming plan: its pass kernels in order, then the torch epilogue.

For each pass (in level order) the launcher computes the small intermediates the pass
reads (torch, on the call's device), allocates one fp32 tensor per accumulator, and
launches the pass kernel over (row tiles, batch x heads). The outputs are then evaluated
by the reference executor's torch ops from the stored accumulators: elementwise epilogues
(`num / (den + eps)`) and reductions of small tensors (a mean over queries of a row maximum).
"""
from __future__ import annotations

import math

import torch

from . import ir
from .binding import BoundCall
from .errors import BackendError
from .reference import Reference, align, evaluate_scalar
from .runtime import _RECORDING, KernelLaunch, check_device, launch, load_module, pow2, promote_operands, triton_cdiv
from attncc.passes.kinds import KernelRole, LaunchPath
from attncc.passes.streams import StreamPlan, plan_streams, torch_form


def stream_config(interpret: bool, widest: int, value_sums: int) -> dict:
    """Tiles of the general pass kernels before any tuning: small in the interpreter, and on
    a GPU 64 x 64 with 4 warps, 8 warps when several [rows, features] sums share the registers
    (the static sm_90 report: three of them spill at 4 warps), 32-key tiles above head dim 128."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64 if widest <= 128 else 32, "num_warps": 8 if value_sums > 1 else 4,
            "num_stages": 2}


class StreamLauncher:
    """Launches the passes of a general plan for one bound call."""

    def __init__(self, plan: StreamPlan, src):
        self.plan, self.src = plan, src
        self.modules: dict = {}
        self.last_path = LaunchPath.GENERAL
        self.last_tma_fallback = None
        self.lse_launcher: StreamLauncher | None = None  # the plan with the log-sum-exp as an extra output
        self.forms: dict = {}  # node -> its torch form (torch_form's memo), built on the first call
        self.extra_outputs: tuple = ()  # the outputs planned beyond the program's (the log-sum-exp)
        self.apart_launcher: StreamLauncher | None = None  # the same outputs, key sets planned apart

    def with_lse(self) -> "StreamLauncher":
        """The launcher of the same program planned with `return_lse`'s log-sum-exp as one more
        output (built on first use; it shares the softmax's accumulator)."""
        if self.lse_launcher is None:
            from .api import lse_output

            extra = (lse_output(self.plan.program),)
            self.lse_launcher = _launcher(plan_streams(self.plan.program, extra), extra)
        return self.lse_launcher

    def apart(self) -> "StreamLauncher":
        """The launcher of the same outputs with every key set of a joint softmax in its own
        pass (its own log-sum-exp, merged by torch): the form the generated backward
        differentiates (built on first use)."""
        if self.apart_launcher is None:
            plan = plan_streams(self.plan.program, self.extra_outputs, joint=False)
            self.apart_launcher = _launcher(plan, self.extra_outputs)
        return self.apart_launcher

    def launches(self, call: BoundCall, return_lse: bool = False, config: dict | None = None,
                 count_tiles=False) -> list[KernelLaunch]:
        """The pass launches of a call, in order, built by `__call__` but not run (the static
        report and the sm_90 compile). The call's tensors may be meta tensors: intermediates
        torch would compute get placeholders of their shape."""
        token = _RECORDING.set([])
        try:
            self(call, return_lse, config)
            return _RECORDING.get()
        finally:
            _RECORDING.reset(token)

    def operands(self, call: BoundCall) -> BoundCall:
        """The call with its tile-dot and value operands promoted to one type (`tl.dot`)."""
        p = self.plan
        operands = {op.input.name for sp in p.passes for seg in sp.segments() for dot in seg.dots
                    for op in dot.sides.values() if not op.input.name.startswith("<")}
        operands |= {a.value.input.name for sp in p.passes for a in sp.all_accumulators()
                     if a.value is not None and not a.value.input.name.startswith("<")}
        return promote_operands(call, operands)

    def __call__(self, call: BoundCall, return_lse: bool, config: dict | None = None, count_tiles=False,
                 keep: dict | None = None):
        """The outputs of a call; `keep`, when given, receives every accumulator's stored value
        (by its synthetic name, `<acc0>`): what the generated backward reads."""
        if return_lse:
            return self.with_lse()(call, False, config, keep=keep)
        interpret = check_device(call)
        p = self.plan
        call = self.operands(call)
        module = self.modules.get(interpret) or self.modules.setdefault(interpret, load_module(self.src, interpret))
        sizes = p.program.sizes(call.scalars)  # the plan's program: with the indices its rules made
        tensors = dict(call.tensors)
        memo = self.forms  # the torch forms of the plan's nodes: the same for every call
        device = call.device
        recording = _RECORDING.get() is not None
        for sp, source in zip(p.passes, self.src.passes):
            for name in source.tensor_inputs:  # what this pass reads that torch computes first
                if name not in tensors:
                    node = next(n for n, inp in p.precomputed.inputs.items() if inp.name == name)
                    if recording:  # no data: only its layout
                        tensors[name] = torch.empty([sizes[ix] for ix in p.precomputed.axes[node]],
                                                    dtype=call.out_dtype, device=device)
                        continue
                    value = Reference(p.program, tensors, call.scalars).full(torch_form(p, node, memo))
                    value = align(value, node.indices, p.precomputed.axes[node]).contiguous()
                    tensors[name] = value.to(call.out_dtype) if value.is_floating_point() else value
            widest = max([sizes[ix] for ix in (*source.features.values(),)] or [16])
            if widest > 256:
                raise BackendError(f"feature dims up to 256 are supported, got {widest}")
            cfg = dict(stream_config(interpret, widest, sum(a.value is not None for a in sp.all_accumulators())))
            cfg.update(config or {})
            results = [torch.zeros([sizes[ix] for ix in node.indices], dtype=torch.float32, device=device)
                       for node in source.results]
            args = [tensors[n] for n in source.tensor_inputs] + results
            args += [st for r in results for st in r.stride()]
            for name in source.tensor_inputs:
                args += list(tensors[name].stride())
            for name in source.tensor_inputs:
                args += list(tensors[name].shape)
            args += [sizes[ix] for ix in sp.outer] + [sizes[sp.row], sizes[sp.stream]]
            args += [sizes[ix] for ix in source.extents.values()]
            args += [self.scalar(call, source.host_scalars[n]) for n in source.scalar_args]
            float_in = [tensors[n] for n in source.tensor_inputs if tensors[n].is_floating_point()]
            upcast = interpret and any(t.dtype == torch.bfloat16 for t in float_in)
            constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION="ieee", UPCAST_DOT=upcast,
                              **{c: pow2(sizes[ix]) for c, ix in source.features.items()},
                              **{c: pow2(int(evaluate_scalar(n, call.scalars))) for c, n in source.topk.items()})
            options = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            grid = (triton_cdiv(sizes[sp.row], cfg["BLOCK_M"]), math.prod(sizes[ix] for ix in sp.outer))
            if grid[0] and grid[1]:
                launch(KernelLaunch(getattr(module, source.kernel), grid, args, constexprs, options, interpret,
                                    KernelRole.STREAM_PASS))
            for node, value in zip(source.results, results):  # integer accumulators back to integers
                tensors[p.results[node].name] = value.round().to(torch.int64) if node.dtype == ir.INT else value
                if keep is not None:
                    keep[p.results[node].name] = value
        if recording:
            return []
        outs = []
        for out, node in p.outputs:
            value = Reference(p.program, tensors, call.scalars).full(torch_form(p, node, memo))
            outs.append(align(value, node.indices, out.axes))
        return outs

    @staticmethod
    def scalar(call: BoundCall, node: ir.Node):
        v = evaluate_scalar(node, call.scalars)
        return int(v) if isinstance(v, bool) else v


def _launcher(plan: StreamPlan, extra_outputs: tuple) -> StreamLauncher:
    from attncc.codegen.stream_kernel import generate_streams

    launcher = StreamLauncher(plan, generate_streams(plan, plan.program.name))
    launcher.extra_outputs = extra_outputs
    return launcher
