"""`run_benchmark`: attncc against PyTorch's attention implementations, in one run on one device.

For each shape it draws valid random inputs for the spec, computes the float32 reference
output, then builds, warms up and times every competitor (`attncc.bench_competitors`),
recording each one's largest error against the reference. FLOPs follow FlashAttention,
2*B*H*N*M*(D+E) (that is 4*B*H*N*M*D), halved when every allowed pair is causal, the same
count for every competitor so TFLOP/s compare like speed; attncc's effective TFLOP/s
counts the key tiles its kernel visits, counted by the kernel itself. A compile section
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
from .bench_report import SMOKE_NOTE, document, environment, finite, plot_results, shape_label
from .bench_timing import measure
from .check import DTYPES
from .random_inputs import random_arguments
from .runtime import default_config, triton_cdiv

__all__ = ["run_benchmark", "plot_results", "token_sweep", "SMOKE_SHAPES", "COMPETITORS"]

def token_sweep(ns=(1024, 2048, 4096, 8192, 16384), tokens: int = 16384, heads: int = 16,
                head_dim: int = 128) -> list[dict]:
    """Shapes with B*N = tokens (as FlashAttention's benchmarks): the same work per token
    budget, sequences from short to long."""
    return [{"B": max(1, tokens // n), "H": heads, "N": n, "M": n, "D": head_dim, "E": head_dim} for n in ns]


SMOKE_SHAPES = token_sweep((32,), tokens=32, heads=2, head_dim=16)  # what Triton's interpreter runs in seconds


def run_benchmark(spec: str | Path, shapes: list[dict], params: dict | None = None, dtype="bfloat16",
                  device=None, competitors=COMPETITORS, warmup: int = 3, reps: int = 20,
                  progress: Callable[[str, int, int], None] | None = None,
                  inputs: Callable = random_arguments, seed: int = 0) -> dict:
    """Time `spec` and its competitors on each shape; return a results document.

    shapes: dicts of dims (`{"B": 16, "H": 16, "N": 1024, "M": 1024, "D": 64, "E": 64}`),
    which may also set params that depend on the size (`height`, `width`); params: the
    other params, for every shape. competitors: names from `COMPETITORS` (`sdpa` means
    every SDPA backend) or `sdpa:<backend>`. progress(label, done, total) is called before
    each measurement. inputs(program, dims, params, dtype, device, seed) makes the keyword
    arguments, by default `random_arguments`.
    """
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
                   warmup, reps, compile=meaningful, progress=progress, total=len(shapes) * len(names))
    metadata = {**environment(device), "dtype": str(torch_dtype).removeprefix("torch."), "warmup": warmup,
                "reps": reps, "seed": seed, "competitors": names}
    results = [bench.shape(shape, params or {}, inputs, seed) for shape in shapes]
    bench.step("done")
    variant = {"spec": kernel.program.source.filename, "date": metadata["date"], "shapes": shapes,
               "params": params or {}, "compile": _compile_times(dsl_ms, results), "results": results}
    return document({kernel.name: variant}, metadata, meaningful)


@functools.cache
def _announce_smoke_run():
    """Loudly, once per process."""
    print(f"\n{'!' * 78}\n{SMOKE_NOTE}\n{'!' * 78}\n", file=sys.stderr)


def _compile_times(dsl_ms: float, results: list[dict]) -> dict:
    """Spec -> Triton source; attncc's first call on the first shape (Triton JIT and block
    maps included); host time per cached call beyond the kernel's own time."""
    first = results[0]["competitors"].get("attncc", {}) if results else {}
    ok = first.get("status") == "ok"
    return {"dsl_to_triton_ms": dsl_ms, "first_call_ms": first["first_call_ms"] if ok else None,
            "call_overhead_ms": first["wall_ms"] - first["ms"] if ok else None}


class _Bench:
    """The state shared by the shapes of one benchmark run."""

    def __init__(self, kernel, reference, names, device, dtype, warmup, reps, compile, progress, total):
        self.kernel, self.reference, self.names = kernel, reference, names
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
        low = (torch.float16, torch.bfloat16)
        want = self.reference(**{k: v.float() if torch.is_tensor(v) and v.dtype in low else v
                                 for k, v in args.items()})
        if self.compile:
            torch._dynamo.reset()  # fresh compiles per shape: no recompile limit, no dynamic shapes
        competitors = {}
        for name in self.names:
            self.step(f"{shape_label(shape)} {name}")
            competitors[name] = self.competitor(name, args, call.scalars, want)
        work = self.tile_work(call)
        flops = self.flops(call, work)
        for name, r in competitors.items():
            if r["status"] == "ok":
                r["tflops"] = flops["fa"] / r["ms"] / 1e9
                if name == "attncc":
                    r["effective_tflops"] = flops["effective"] / r["ms"] / 1e9
        mine = competitors.get("attncc", {})
        speedup = {name: r["ms"] / mine["ms"] for name, r in competitors.items()
                   if name != "attncc" and r["status"] == "ok" and mine.get("status") == "ok"}
        return {"shape": {d: call.scalars[d] for d in program.dims},
                "params": collapse(program, call.scalars),
                "flops": flops, "tile_work": work, "competitors": competitors, "speedup": speedup}

    def competitor(self, name: str, args: dict, scalars: dict, want: torch.Tensor) -> dict:
        """Timing and error of one competitor, or why it did not run."""
        try:
            fn = (lambda: self.kernel(**args)) if name == "attncc" else \
                build(name, args, scalars, self.formulation, self.compile, self.kernel.program)
            out, timing = measure(fn, self.device, self.warmup, self.reps)
            error = float((out.float() - want.float()).abs().max())
            return {"status": "ok", **timing, "max_abs_err": finite(error)}
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

    def tile_work(self, call) -> dict:
        """Key tiles attncc's kernel visits with the config its calls use (tuned, or the
        default), counted by the kernel itself, against the tiles of a dense pass."""
        plan, launcher = self.kernel.generated.plan, self.kernel.generated.launcher
        sizes = self.kernel.program.sizes(call.scalars)
        tuned = self.kernel.tuned_config(call)
        cfg = {**default_config(self.device.type != "cuda", sizes[plan.d], sizes[plan.e]), **(tuned or {})}
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        launcher(call, False, tuned, count_tiles=True)
        counts = launcher.last_tile_counts
        dense = math.prod(sizes[ix] for ix in plan.outer) * triton_cdiv(sizes[plan.i], bm) * \
            triton_cdiv(sizes[plan.j], bn)
        visited = counts["full"] + counts["partial"]
        return {"config": cfg, "tuned": tuned is not None, "block_m": bm, "block_n": bn, "visited": visited,
                "full": counts["full"], "partial": counts["partial"], "dense": dense,
                "visited_over_dense": visited / dense if dense else None}

    def flops(self, call, work: dict) -> dict:
        """FlashAttention's count, 2*N*M*(D+E) per batch and head (with one Q K^T per
        weight term of the plan: two for differential attention), dense or over the
        visited tiles."""
        plan = self.kernel.generated.plan
        sizes = self.kernel.program.sizes(call.scalars)
        n, m, d, e = (sizes[ix] for ix in (plan.i, plan.j, plan.d, plan.e))
        per_pair = 2 * (len(plan.terms) * d + e)
        halved = self.formulation is not None and self.formulation.causal
        dense = math.prod(sizes[ix] for ix in plan.outer) * n * m * per_pair
        return {"fa": dense // 2 if halved else dense, "fa_causal_halved": halved,
                "effective": work["visited"] * work["block_m"] * work["block_n"] * per_pair}
