"""Timing one callable on one device: warm-up, peak memory, then the median of timed reps.

On CUDA the reps are timed by the autotuner's own timer (`attncc.autotune.measure.
bench_times`, built on `triton.testing.do_bench`: the L2 cache is cleared before each
rep, each rep sits between two CUDA events), so a benchmark and a tuning run measure a
config the same way. On a CPU the same steps use the wall clock; the benchmark marks
those numbers meaningless. Slow callables get fewer reps (at least 3) so that one
measurement stays near `budget_s`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn: Callable, device: torch.device) -> float:
    """Milliseconds of one synchronous call, host launch included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _peak_memory(fn: Callable, device: torch.device) -> int:
    """Bytes allocated at the peak of one call beyond what was allocated before."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _reps_cuda(fn: Callable, device: torch.device, n: int, wall_ms: float) -> list[float]:
    """Milliseconds of about `n` reps: do_bench takes a time budget, so ask for `n` calls'
    worth of the synchronous call time (its own estimate, without the host's
    synchronisation, may fit a few more reps in)."""
    from attncc.autotune.measure import bench_times

    return [t * 1e3 for t in bench_times(fn, device, warmup_ms=0, rep_ms=n * wall_ms)]


def measure(fn: Callable, device: torch.device, warmup: int = 3, reps: int = 20, budget_s: float = 1.0):
    """(output of one call, {"ms": median per call, "reps", "first_call_ms": the first call,
    compilation included, "wall_ms": mean synchronous call after it, "peak_mem_bytes"}).
    At least 3 reps unless fewer are asked for (CPU smoke tests)."""
    outputs = []
    walls = [_wall(lambda: outputs.append(fn()), device) for _ in range(max(warmup, 2))]
    out = outputs[-1]
    del outputs[:-1]
    peak = _peak_memory(fn, device) if device.type == "cuda" else None
    wall_ms = statistics.mean(walls[1:])
    n = max(min(reps, 3), min(reps, int(budget_s * 1e3 / max(wall_ms, 1e-3))))
    times = _reps_cuda(fn, device, n, wall_ms) if device.type == "cuda" else [_wall(fn, device) for _ in range(n)]
    return out, {"ms": statistics.median(times), "reps": len(times), "first_call_ms": walls[0], "wall_ms": wall_ms,
                 "peak_mem_bytes": peak}
