"""Timing one callable on one device: warm-up, peak memory, then the median of timed reps.

On CUDA each rep sits between two CUDA events recorded back to back (no synchronisation
between reps, so the host can run ahead as in real use) and the median is reported. On
a CPU the same steps use the wall clock; the benchmark marks those numbers meaningless.
Slow callables get fewer reps (at least 3) so that one measurement stays near `budget_s`.
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


def _peak_memory(fn: Callable, device: torch.device):
    """(output, bytes allocated at the peak of one call beyond what was allocated before)."""
    if device.type != "cuda":
        return fn(), None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - before


def _reps_cuda(fn: Callable, n: int) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def measure(fn: Callable, device: torch.device, warmup: int = 3, reps: int = 20, budget_s: float = 1.0):
    """(output of one call, {"ms": median per call, "reps", "first_call_ms": the first call,
    compilation included, "wall_ms": mean synchronous call after it, "peak_mem_bytes"})."""
    walls = [_wall(fn, device) for _ in range(max(warmup, 2))]
    out, peak = _peak_memory(fn, device)
    wall_ms = statistics.mean(walls[1:])
    n = max(3, min(reps, int(budget_s * 1e3 / max(wall_ms, 1e-3))))
    times = _reps_cuda(fn, n) if device.type == "cuda" else [_wall(fn, device) for _ in range(n)]
    return out, {"ms": statistics.median(times), "reps": n, "first_call_ms": walls[0], "wall_ms": wall_ms,
                 "peak_mem_bytes": peak}
