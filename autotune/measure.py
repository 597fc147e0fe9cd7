"""Timing launches on a GPU: warm up (which also compiles), then time each repetition
with CUDA events and take the median, which shrugs off the odd preempted launch.

Interpreted runs (CPU tensors) are refused: their times measure Python, not the
kernel, and tuning on them would store configs that are wrong for every GPU.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from attncc.errors import BackendError

REFUSAL = "timings in the interpreter mean nothing; tuning needs a CUDA device"


class NoDeviceError(BackendError):
    """Timing was asked for where no kernel runs on a GPU."""


def require_cuda(device: torch.device | str | None = None):
    """Raise `NoDeviceError` unless `device` (default: the current one) is a usable CUDA device."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available():
        raise NoDeviceError(f"{REFUSAL} (none is available here)")
    if device is not None and device.type != "cuda":
        raise NoDeviceError(f"{REFUSAL} (the inputs are on {device})")


def cuda_time(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of `fn()` on `device` over `reps` event-timed runs after `warmup` runs."""
    require_cuda(device)
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def launch_objective(launcher, call, warmup: int = 3, reps: int = 10) -> Callable[[dict], float]:
    """`objective(config) -> seconds` for one bound call of a launcher (refused off CUDA)."""
    require_cuda(call.device)
    return lambda config: cuda_time(lambda: launcher(call, False, config), call.device, warmup, reps)
