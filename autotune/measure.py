"""Timing launches on a GPU, one way for the tuner and the benchmarks:
`triton.testing.do_bench`, which clears the L2 cache before every timed run (a kernel
tuned on warm-L2 timings can win only because its inputs stayed cached), sizes warm-up
and repetitions by time budgets, and times each run with CUDA events. We take the
median of its per-run times, which shrugs off the odd preempted launch.

Interpreted runs (CPU tensors) are refused: their times measure Python, not the
kernel, and tuning on them would store configs that are wrong for every GPU.
"""
from __future__ import annotations

import functools
import inspect
import statistics
from typing import Callable

import torch

from attncc.errors import BackendError

REFUSAL = "timings in the interpreter mean nothing; tuning needs a CUDA device"
WARMUP_MS = 25  # do_bench's own defaults: time budgets, not counts
REP_MS = 100


class NoDeviceError(BackendError):
    """Timing was asked for where no kernel runs on a GPU."""


def require_cuda(device: torch.device | str | None = None):
    """Raise `NoDeviceError` unless `device` (default: the current one) is a usable CUDA device."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available():
        raise NoDeviceError(f"{REFUSAL} (none is available here)")
    if device is not None and device.type != "cuda":
        raise NoDeviceError(f"{REFUSAL} (the inputs are on {device})")


def _do_bench():
    """Looked up at every call, not imported once, so that a test can replace it."""
    import triton.testing

    return triton.testing.do_bench


@functools.lru_cache(maxsize=None)
def _mode(do_bench) -> str:
    """How this Triton's do_bench gives per-run times: `return_mode="all"` (Triton 3.x,
    3.6 to 3.9 included), else `quantiles=[0.5]` (the median only), else its mean."""
    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        return "all"
    return "quantiles" if "quantiles" in params else "plain"


def bench_times(fn: Callable[[], object], device: torch.device, warmup_ms: float = WARMUP_MS,
                rep_ms: float = REP_MS) -> list[float]:
    """Seconds of each timed run of `fn()` on `device` by `triton.testing.do_bench` (L2
    cleared before each run; about `warmup_ms` of warm-up, then about `rep_ms` of timed
    runs, at least one). Where do_bench only gives a summary, a one-element list."""
    require_cuda(device)
    do_bench = _do_bench()
    mode = _mode(do_bench)
    with torch.cuda.device(device):
        if mode == "all":
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        elif mode == "quantiles":
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
        else:
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms)
    ms = list(ms) if isinstance(ms, (list, tuple)) else [ms]
    return [float(t) / 1e3 for t in ms]


def cuda_time(fn: Callable[[], object], device: torch.device, warmup_ms: float = WARMUP_MS,
              rep_ms: float = REP_MS) -> float:
    """Median seconds of `fn()` on `device` (see `bench_times`)."""
    return statistics.median(bench_times(fn, device, warmup_ms, rep_ms))


def launch_objective(launcher, call, warmup_ms: float = WARMUP_MS,
                     rep_ms: float = REP_MS) -> Callable[[dict], float]:
    """`objective(config) -> seconds` for one bound call of a launcher (refused off CUDA)."""
    require_cuda(call.device)
    return lambda config: cuda_time(lambda: launcher(call, False, config), call.device, warmup_ms, rep_ms)
