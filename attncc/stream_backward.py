"""Running the generated backward of a general streaming plan (passes/stream_backward.py).

The forward runs the pass kernels and keeps every accumulator's value (packed into one fp32
vector: O(B*H*N*E), never a score-sized tensor). The backward:

1. differentiates the torch epilogue on the saved values (autograd on small tensors): each
   accumulator's gradient, and those of inputs read only there;
2. for each pass, later levels first: an LSE's total gradient `g = dL - sum_k <dA_k, A_k>`
   over the sums online with it (torch), then the pass's two backward kernels, which write
   the partial gradients of every value its tiles read;
3. chains each partial to the inputs and to earlier levels' accumulators through torch
   autograd of the read itself (GQA groups summed, precomputed operands differentiated).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import ir
from .binding import BoundCall
from .reference import Reference, align
from .runtime import KernelLaunch, check_device, launch, load_module, pow2, triton_cdiv
from .stream_runtime import StreamLauncher
from attncc.codegen.stream_backward import generate_stream_backward, grad_name
from attncc.passes.kinds import KernelRole
from attncc.passes.stream_backward import Side, StreamBackwardPlan, plan_stream_backward
from attncc.passes.streams import Reduction, torch_form


class PlanBackward:
    """The backward kernels of one general plan and how to run them."""

    def __init__(self, launcher: StreamLauncher):
        self.launcher = launcher
        self.bplan: StreamBackwardPlan = plan_stream_backward(launcher.plan)
        self.src = generate_stream_backward(self.bplan, launcher.plan.program.name)
        self.modules: dict = {}
        self.forms: dict = {}

    @property
    def plan(self):
        return self.launcher.plan

    def names(self) -> list[str]:
        return [inp.name for inp in self.plan.results.values()]

    def pack(self, kept: dict) -> torch.Tensor:
        """The accumulators' values as one fp32 vector (what the autograd formula saves)."""
        return torch.cat([kept[n].reshape(-1).float() for n in self.names()])

    def unpack(self, packed: torch.Tensor, sizes) -> dict:
        out, at = {}, 0
        for node, inp in self.plan.results.items():
            shape = [sizes[ix] for ix in node.indices]
            n = math.prod(shape)
            value = packed[at:at + n].view(shape)
            out[inp.name] = value.round().to(torch.int64) if node.dtype == ir.INT else value
            at += n
        return out

    def saved_numel(self, sizes) -> int:
        return sum(math.prod(sizes[ix] for ix in node.indices) for node in self.plan.results)

    def gradients(self, call: BoundCall, packed: torch.Tensor, grads, wanted, config=None) -> dict:
        """{input name: gradient} for the inputs in `wanted`, from the saved accumulators and
        the outputs' gradients `grads` (one per output of the plan, None for none)."""
        plan, program = self.plan, self.plan.program
        call = self.launcher.operands(call)
        sizes = program.sizes(call.scalars)
        saved = self.unpack(packed, sizes)
        memo = self.forms
        with torch.enable_grad():
            inputs = {n: t.detach().requires_grad_(n in wanted and t.is_floating_point())
                      for n, t in call.tensors.items()}
            stats = {n: t.detach().requires_grad_(t.is_floating_point()) for n, t in saved.items()}
            tensors = {**inputs, **stats}
            for node, inp in plan.precomputed.inputs.items():  # under autograd: chained like any read
                value = Reference(program, tensors, call.scalars).full(torch_form(plan, node, memo))
                value = align(value, node.indices, plan.precomputed.axes[node]).contiguous()
                tensors[inp.name] = value.to(call.out_dtype) if value.is_floating_point() else value
            targets = {**{n: t for n, t in stats.items() if t.requires_grad},
                       **{n: t for n, t in inputs.items() if t.requires_grad}}
            found: dict = {}  # name -> its gradient so far (absent: nothing reached it)
            outs = [(Reference(program, tensors, call.scalars).full(torch_form(plan, node, memo)), node.indices,
                     tuple(out.axes)) for out, node in plan.outputs]
            _chain([(v, align(g.float(), axes, have)) for (v, have, axes), g in zip(outs, grads) if g is not None],
                   targets, found)
            interpret = check_device(call)
            module = self.modules.get(interpret) or self.modules.setdefault(interpret,
                                                                             load_module(self.src, interpret))
            for pb, kernels in zip(self.bplan.passes, self.src.kernels):
                run = {n: t.detach() for n, t in tensors.items()}
                for a in pb.accs:
                    k = list(plan.results).index(a.acc.node)
                    d = found.get(plan.results[a.acc.node].name)
                    d = torch.zeros(stats[plan.results[a.acc.node].name].shape, device=call.device) \
                        if d is None else d.clone()
                    if a.acc.kind is Reduction.LSE:  # g = dL - sum over its online sums of <dA_k, A_k>
                        for other in pb.online(a.acc):
                            name = plan.results[other.node].name
                            if name not in found:
                                continue
                            prod = found[name] * stats[name].detach()
                            if other.feature is not None:
                                prod = prod.sum(other.node.indices.index(other.feature))
                            rest = tuple(ix for ix in other.node.indices if ix != other.feature)
                            d = d - align(prod, rest, a.acc.node.indices)
                    run[grad_name(k)] = d.float().contiguous()
                partials = {}
                for src in kernels:
                    partials.update(self.launch(src, pb, run, call, sizes, interpret, module, config))
                pairs = []
                for r in pb.reads:
                    value = Reference(program, tensors, call.scalars).full(torch_form(plan, r.node, memo))
                    if not value.requires_grad:
                        continue
                    tile = pb.row if r.side is Side.ROWS else pb.seg.stream
                    axes = (*pb.outer, tile, *([r.feature] if r.operand is not None else []))
                    part = partials[id(r)]
                    gone = [n for n, ix in enumerate(axes) if ix not in r.node.indices]
                    part = part.sum(gone) if gone else part
                    pairs.append((value, align(part, tuple(ix for ix in axes if ix in r.node.indices),
                                               r.node.indices)))
                _chain(pairs, targets, found)
        return {n: found[n].to(call.tensors[n].dtype) for n in wanted if n in found}

    def launch(self, src, pb, tensors, call, sizes, interpret, module, config) -> dict:
        """Run one backward kernel; {id(read): its partial gradient}."""
        tile = pb.row if src.side is Side.ROWS else pb.seg.stream
        partials = {}
        for r in src.partials:
            shape = [sizes[ix] for ix in pb.outer] + [sizes[tile]] + ([sizes[r.feature]] if r.operand else [])
            partials[id(r)] = torch.zeros(shape, dtype=torch.float32, device=call.device)
        cfg = dict(backward_config(interpret))
        cfg.update(config or {})
        args = [tensors[n] for n in src.tensor_inputs] + [partials[id(r)] for r in src.partials]
        args += [st for r in src.partials for st in partials[id(r)].stride()]
        for name in src.tensor_inputs:
            args += list(tensors[name].stride())
        for name in src.tensor_inputs:
            args += list(tensors[name].shape)
        args += [sizes[ix] for ix in pb.outer] + [sizes[pb.row], sizes[pb.seg.stream]]
        args += [sizes[ix] for ix in src.extents.values()]
        args += [StreamLauncher.scalar(call, src.host_scalars[n]) for n in src.scalar_args]
        upcast = interpret and any(t.dtype == torch.bfloat16 for t in args if torch.is_tensor(t))
        constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PRECISION="ieee", UPCAST_DOT=upcast,
                          **{c: pow2(sizes[ix]) for c, ix in src.features.items()})
        options = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        block = cfg["BLOCK_M"] if src.side is Side.ROWS else cfg["BLOCK_N"]
        grid = (triton_cdiv(sizes[tile], block), math.prod(sizes[ix] for ix in pb.outer))
        if grid[0] and grid[1]:
            role = KernelRole.BWD_ROWS if src.side is Side.ROWS else KernelRole.BWD_STREAM
            launch(KernelLaunch(getattr(module, src.kernel), grid, args, constexprs, options, interpret, role))
        return partials


def backward_config(interpret: bool) -> dict:
    """Tiles of the backward kernels: small in the interpreter; on a GPU 64 rows x 32 streamed,
    8 warps, one stage (the static sm_90 report at head dim 64: no spill for a pass without
    value sums, the least for one with them; 64 x 64 at 4 warps spills in every kernel)."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}


def _chain(pairs, targets: dict, found: dict):
    """Add `d (sum of value * cotangent) / d target` to `found` for every target."""
    pairs = [(v, c) for v, c in pairs if v.requires_grad]
    if not pairs or not targets:
        return
    total = sum((v.float() * c).sum() for v, c in pairs)
    names = list(targets)
    grads = torch.autograd.grad(total, [targets[n] for n in names], allow_unused=True, retain_graph=True)
    for n, g in zip(names, grads):
        if g is not None:
            found[n] = found[n] + g.float() if n in found else g.float()


class GeneralBackward:
    """The generated backward of a kernel on the general plan: one `PlanBackward` for plain
    calls and one for `return_lse` calls (whose plan has the log-sum-exp as one more output)."""

    def __init__(self, launcher: StreamLauncher):
        self.launcher = launcher
        self.parts: dict = {False: PlanBackward(_differentiated(launcher))}

    def part(self, return_lse: bool) -> PlanBackward:
        if return_lse not in self.parts:
            self.parts[return_lse] = PlanBackward(_differentiated(self.launcher.with_lse()))
        return self.parts[return_lse]

    def forward(self, call: BoundCall, return_lse: bool, config=None) -> tuple[list, torch.Tensor]:
        """The outputs (and the log-sum-exp with `return_lse`) and the packed accumulators."""
        part = self.part(return_lse)
        kept: dict = {}
        results = part.launcher(call, False, config, keep=kept)
        return results, part.pack(kept)

    def gradients(self, call, packed, grads, wanted, return_lse: bool, config=None) -> dict:
        return self.part(return_lse).gradients(call, packed, grads, wanted, config)


def _differentiated(launcher: StreamLauncher) -> StreamLauncher:
    """The launcher whose plan the backward differentiates: a plan whose key sets share one
    online normaliser runs, in calls that record a graph, with the sets planned apart (each
    its own log-sum-exp, merged by torch), whose accumulators the backward kernels take."""
    return launcher.apart() if launcher.plan.joint else launcher


class GeneralBackwardFunction(torch.autograd.Function):
    """The generated forward of a general plan, with its generated backward (eager calls)."""

    @staticmethod
    def forward(ctx, kernel, call, return_lse, names, *tensors):
        ctx.set_materialize_grads(False)
        ctx.kernel, ctx.call = kernel, dataclasses.replace(call, tensors={})
        ctx.return_lse, ctx.names = return_lse, names
        results, packed = kernel.backward_launcher().forward(call, return_lse, kernel.tuned_config(call))
        results = [kernel._cast(r, call) for r in results]
        ctx.save_for_backward(*tensors, packed)
        ctx.mark_non_differentiable(*[r for r in results if not r.is_floating_point()])
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        from .api import _reference_gradients

        *tensors, packed = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, from the reference
            return (None, None, None, None, *_reference_gradients(ctx, tensors, grads))
        wanted = {ctx.names[k] for k in range(len(tensors)) if ctx.needs_input_grad[4 + k]}
        if all(g is None for g in grads):
            return (None,) * (4 + len(tensors))
        call = dataclasses.replace(ctx.call, tensors=dict(zip(ctx.names, tensors)))
        found = ctx.kernel.backward_launcher().gradients(call, packed, grads, wanted, ctx.return_lse)
        return (None, None, None, None, *(found.get(n) for n in ctx.names))
