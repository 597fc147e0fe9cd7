"""`run_benchmark`: attncc against PyTorch's attention implementations, in one run on one device.

For each shape it draws valid random inputs for the spec, computes the float32 reference
output, then builds, warms up and times every competitor (`attncc.bench_competitors`),
recording each one's largest error against the reference; in a training mode
(`attncc.bench_train.Mode`) it times forward and backward too, and records each gradient's
largest error against the reference's. FLOPs follow FlashAttention,
2*B*H*N*M*(D+E) (that is 4*B*H*N*M*D), halved when every allowed pair is causal, the same
count for every competitor so TFLOP/s compare like speed; attncc's effective TFLOP/s
counts the key tiles its kernel visits, counted by the kernel itself; a backward counts 2.5
forwards. A compile section
times spec -> Triton source, the first call (Triton JIT included) and the per-call host
overhead once cached. The result is a document described in `attncc.bench_report`.

Without CUDA it is a smoke run: attncc in Triton's interpreter, PyTorch on the CPU, no
torch.compile, tiny shapes; the document says `"timings_meaningful": false`.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .api import compile as compile_spec
from .binding import bind
from .call_params import collapse
from .bench_competitors import COMPETITORS, Skip, build, expand
from .bench_mods import FORMULATIONS
from .bench_report import SMOKE_NOTE, document, environment, finite, plot_results, shape_label, utc_now
from .bench_timing import measure
from .bench_train import (Mode, grad_errors, grad_scale, learnable, leaves, measure_training, reference,
                          reference_gradient_note)
from .check import DTYPES
from .random_inputs import random_arguments
from .passes.row_stream import RowStreamPlan
from .runtime import default_config, triton_cdiv

__all__ = ["run_benchmark", "plot_results", "token_sweep", "variant_key", "Mode", "SMOKE_SHAPES", "COMPETITORS"]

def token_sweep(ns=(1024, 2048, 4096, 8192, 16384), tokens: int = 16384, heads: int = 16,
                head_dim: int = 128) -> list[dict]:
    """Shapes with B*N = tokens (as FlashAttention's benchmarks): the same work per token
    budget, sequences from short to long."""
    return [{"B": max(1, tokens // n), "H": heads, "N": n, "M": n, "D": head_dim, "E": head_dim} for n in ns]


SMOKE_SHAPES = token_sweep((32,), tokens=32, heads=2, head_dim=16)  # what Triton's interpreter runs in seconds


def run_benchmark(spec: str | Path, shapes: list[dict], params: dict | None = None, dtype="bfloat16",
                  device=None, competitors=COMPETITORS, warmup: int = 3, reps: int = 20,
                  progress: Callable[[str, int, int], None] | None = None,
                  inputs: Callable = random_arguments, seed: int = 0, mode: Mode | str = Mode.FWD,
                  on_shape: Callable[[dict], None] | None = None) -> dict:
    """Time `spec` and its competitors on each shape; return a results document.

    shapes: dicts of dims (`{"B": 16, "H": 16, "N": 1024, "M": 1024, "D": 64, "E": 64}`),
    which may also set params that depend on the size (`height`, `width`); params: the
    other params, for every shape. competitors: names from `COMPETITORS` (`sdpa` means
    every SDPA backend) or `sdpa:<backend>`. progress(label, done, total) is called before
    each measurement. inputs(program, dims, params, dtype, device, seed) makes the keyword
    arguments, by default `random_arguments`. mode: what is timed (`Mode`: fwd, fwd_bwd,
    bwd). on_shape(document) is called after each shape with the document so far (to write
    it: a run cut short keeps the shapes it finished).
    """
    mode = Mode(mode)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    meaningful = device.type == "cuda"
    if not meaningful:
        _announce_smoke_run()
    start = time.perf_counter()
    kernel = compile_spec(spec, backend="triton")
    dsl_ms = (time.perf_counter() - start) * 1e3
    names = expand(competitors)
    bench = _Bench(kernel, compile_spec(spec, backend="reference"), names, device, torch_dtype,
                   warmup, reps, compile=meaningful, progress=progress, total=len(shapes) * len(names), mode=mode)
    metadata = {**environment(device), "dtype": str(torch_dtype).removeprefix("torch."), "warmup": warmup,
                "reps": reps, "seed": seed, "competitors": names}
    results = []

    def doc() -> dict:
        variant = {"spec": kernel.program.source.filename, "mode": mode.value, "date": metadata["date"],
                   "shapes": shapes, "params": params or {}, "compile": _compile_times(dsl_ms, results),
                   "results": results}
        return document({variant_key(kernel.name, mode): variant}, metadata, meaningful)

    for shape in shapes:
        results.append(bench.shape(shape, params or {}, inputs, seed))
        if on_shape:
            on_shape(doc())
    bench.step("done")
    return doc()


def variant_key(name: str, mode: Mode) -> str:
    """A variant's key in a results document: its name for the forward, `name/mode` for the
    training modes (so one document holds both)."""
    return name if mode is Mode.FWD else f"{name}/{mode.value}"


@functools.cache
def _announce_smoke_run():
    """Loudly, once per process."""
    print(f"\n{'!' * 78}\n{SMOKE_NOTE}\n{'!' * 78}\n", file=sys.stderr)


def _compile_times(dsl_ms: float, results: list[dict]) -> dict:
    """Spec -> Triton source; attncc's first call on the first shape (Triton JIT and block
    maps included; training modes: the first forward + backward, after the forward's own
    first call `fwd_first_call_ms`: the backward kernels' JIT); host time per cached call
    beyond the kernel's own time."""
    first = results[0]["competitors"].get("attncc", {}) if results else {}
    ok = first.get("status") == "ok"
    return {"dsl_to_triton_ms": dsl_ms, "first_call_ms": first["first_call_ms"] if ok else None,
            "call_overhead_ms": first["wall_ms"] - first["ms"] if ok else None}


class _Bench:
    """The state shared by the shapes of one benchmark run."""

    def __init__(self, kernel, reference, names, device, dtype, warmup, reps, compile, progress, total, mode):
        self.kernel, self.reference, self.names, self.mode = kernel, reference, names, mode
        self.formulation = FORMULATIONS.get(kernel.name)
        self.device, self.dtype, self.warmup, self.reps, self.compile = device, dtype, warmup, reps, compile
        self.progress, self.total, self.done = progress, total, 0

    def step(self, label: str):
        """Report the measurement about to start (or "done"), and count it."""
        if self.progress:
            self.progress(label, min(self.done, self.total), self.total)
        self.done += 1

    def shape(self, shape: dict, params: dict, inputs: Callable, seed: int) -> dict:
        program = self.kernel.program
        named = program.call_params()
        dims = {k: v for k, v in shape.items() if k not in named}
        args = inputs(program, dims, {**params, **{k: v for k, v in shape.items() if k in named}},
                      self.dtype, self.device, seed)
        call = bind(program, args)
        geometry = self.geometry(call, args)
        note = reference_gradient_note(geometry[0] if geometry else 0) if self.mode.training else None
        want, grad_out, want_grads = reference(self.reference, args, self.mode.training and note is None,
                                               self.dtype, seed)
        if self.mode.training:
            args = learnable(args)
        if self.compile:
            torch._dynamo.reset()  # fresh compiles per shape: no recompile limit, no dynamic shapes
        competitors = {}
        for name in self.names:
            self.step(f"{shape_label(shape)} {name}")
            competitors[name] = self.competitor(name, args, call.scalars, want, grad_out, want_grads)
        work = self.tile_work(call)
        flops = self.flops(geometry, work)
        for name, r in competitors.items():
            if r["status"] == "ok" and flops:  # a backward's time is a difference: not positive in smoke runs
                r["tflops"] = flops["timed"] / r["ms"] / 1e9 if r["ms"] > 0 else None
                if name == "attncc" and work:
                    r["effective_tflops"] = flops["effective"] * self.mode.flops_factor / r["ms"] / 1e9 \
                        if r["ms"] > 0 else None
        result = {"shape": {d: call.scalars[d] for d in program.dims},
                  "params": collapse(program, call.scalars), "date": utc_now(),
                  "flops": flops, "tile_work": work, "competitors": competitors,
                  "speedup": _speedups(competitors, "ms")}
        if self.mode.training:
            result["speedup_by_phase"] = {phase: _speedups(competitors, f"{phase}_ms")
                                          for phase in ("fwd", "bwd", "fwd_bwd")}
            result["grad_reference"] = {"status": "skipped", "reason": note} if note else \
                {"status": "ok", "max_abs": grad_scale(want_grads)}
        return result

    def competitor(self, name: str, args: dict, scalars: dict, want: torch.Tensor, grad_out: torch.Tensor,
                   want_grads: dict | None) -> dict:
        """Timing and errors of one competitor, or why it did not run."""
        try:
            fn = (lambda: self.kernel(**args)) if name == "attncc" else \
                build(name, args, scalars, self.formulation, self.compile, self.kernel.program)
            if not self.mode.training:
                out, timing = measure(fn, self.device, self.warmup, self.reps)
                return {"status": "ok", **timing, "max_abs_err": _error(out, want)}
            out, grads, timing = measure_training(fn, leaves(args), grad_out, self.device, self.warmup, self.reps)
            entry = {"status": "ok", "ms": timing[self.mode.primary], **timing, "max_abs_err": _error(out, want),
                     "grad_max_abs_err": grad_errors(grads, want_grads)}
            if name == "attncc":  # which backward ran: the generated kernels, or the reference and why
                ran = self.kernel.last_run or {}
                entry.update(backward=ran.get("backward"), backward_reason=ran.get("backward_reason"))
            return entry
        except Skip as why:
            entry = {"status": "skipped", "reason": str(why)}
        except torch.cuda.OutOfMemoryError:
            entry = {"status": "skipped", "reason": "out of memory"}
        except Exception as err:  # noqa: BLE001 -- one failing competitor must not lose the others' numbers
            first_line = str(err).strip().partition("\n")[0]
            entry = {"status": "error", "reason": f"{type(err).__name__}: {first_line}"}
        if self.device.type == "cuda":  # the failed attempt's tensors died with its traceback
            torch.cuda.empty_cache()
        return entry

    def geometry(self, call, args: dict) -> tuple[int, int, int, int] | None:
        """(score pairs B*H*N*M, D, E, Q K^T products per pair) of one call: from the row plan,
        or for the general planner's plans from q, k and v ([..., N, D], [..., M, D], [..., M, E]);
        None for a spec without them."""
        plan = self.kernel.generated.plan
        if isinstance(plan, RowStreamPlan):
            sizes = self.kernel.program.sizes(call.scalars)
            pairs = math.prod(sizes[ix] for ix in plan.outer) * sizes[plan.i] * sizes[plan.j]
            return pairs, sizes[plan.d], sizes[plan.e], len(plan.terms)
        if not {"q", "k", "v"} <= set(args):
            return None
        q, k, v = args["q"], args["k"], args["v"]
        return q.shape[:-1].numel() * k.shape[-2], q.shape[-1], v.shape[-1], 1

    def tile_work(self, call) -> dict | None:
        """Key tiles attncc's kernel visits with the config its calls use (tuned, or the
        default), counted by the kernel itself, against the tiles of a dense pass; None for
        the general planner's kernels, which do not count them."""
        plan, launcher = self.kernel.generated.plan, self.kernel.generated.launcher
        if not isinstance(plan, RowStreamPlan):
            return None
        sizes = self.kernel.program.sizes(call.scalars)
        tuned = self.kernel.tuned_config(call)
        cfg = {**default_config(self.device.type != "cuda", sizes[plan.d], sizes[plan.e]), **(tuned or {})}
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        with torch.no_grad():
            launcher(call, False, tuned, count_tiles=True)
        counts = launcher.last_tile_counts
        dense = math.prod(sizes[ix] for ix in plan.outer) * triton_cdiv(sizes[plan.i], bm) * \
            triton_cdiv(sizes[plan.j], bn)
        visited = counts["full"] + counts["partial"]
        return {"config": cfg, "tuned": tuned is not None, "block_m": bm, "block_n": bn, "visited": visited,
                "full": counts["full"], "partial": counts["partial"], "dense": dense,
                "visited_over_dense": visited / dense if dense else None}

    def flops(self, geometry, work: dict | None) -> dict | None:
        """FlashAttention's count, 2*N*M*(D+E) per batch and head (with one Q K^T per
        weight term of the plan: two for differential attention), dense or over the
        visited tiles; `timed`: what the mode's timing covers (a backward is 2.5 forwards)."""
        if geometry is None:
            return None
        pairs, d, e, terms = geometry
        per_pair = 2 * (terms * d + e)
        halved = self.formulation is not None and self.formulation.causal
        dense = pairs * per_pair
        fa = dense // 2 if halved else dense
        return {"fa": fa, "fa_causal_halved": halved, "timed": fa * self.mode.flops_factor,
                "effective": work["visited"] * work["block_m"] * work["block_n"] * per_pair if work else None}


def _error(out: torch.Tensor, want: torch.Tensor) -> float | str:
    return finite(float((out.float() - want.float()).abs().max()))


def _speedups(competitors: dict, key: str) -> dict:
    """How many times faster attncc is than each competitor that ran, by timing `key`."""
    mine = competitors.get("attncc", {})
    if mine.get("status") != "ok" or not mine[key] > 0:
        return {}
    return {name: r[key] / mine[key] for name, r in competitors.items()
            if name != "attncc" and r["status"] == "ok"}
