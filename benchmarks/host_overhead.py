"""Host work per call of a cached kernel, without a GPU: argument checks, scalars and launch
set-up, with the launch itself recorded instead of run (`RowStreamLauncher.launches`).

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/host_overhead.py [examples ...]

Prints the best of several rounds of many calls, per example (B=2, H=4, N=M=256, D=E=64):
bind + launches, then the whole eager call `kernel(**args)` (launches recorded too), with no
input requiring grad and with q, k, v requiring grad (the autograd.Function that saves the
inputs), and a call of the kernel's `torch.library` operator (`kernel.op`, what calls traced
by torch.compile run; docs/training.md) for comparison.
"""
import argparse
import time
from pathlib import Path

import torch

import attncc
from attncc import runtime, torch_ops
from attncc.binding import bind
from attncc.random_inputs import random_arguments

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def per_call(kernel, args, calls=200, rounds=5) -> float:
    """Seconds of host work per call: bind the arguments, then build the call's launches."""
    launcher = kernel.generated.launcher
    config = kernel.tuned_config(bind(kernel.program, args))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            launcher.launches(bind(kernel.program, args), False, config)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def best_of(fn, calls=200, rounds=5) -> float:
    """Seconds per call of `fn()`, launches recorded instead of run."""
    best = float("inf")
    token = runtime._RECORDING.set([])
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            runtime._RECORDING.get().clear()
            best = min(best, (time.perf_counter() - start) / calls)
    finally:
        runtime._RECORDING.reset(token)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="*", default=["causal", "alibi", "document", "gqa_causal"])
    names = parser.parse_args().examples
    for name in names:
        kernel = attncc.compile(EXAMPLES / f"{name}.attn", backend="triton")
        shape = {d: v for d, v in dict(B=2, H=4, N=256, M=256, D=64, E=64, G=2).items() if d in kernel.program.dims}
        args = random_arguments(kernel.program, shape, dtype=torch.float16)
        kernel(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()})
        graph = {k: v.detach().requires_grad_() if k in ("q", "k", "v") else v for k, v in args.items()}
        op_args = torch_ops.arguments(kernel, **args)
        print(f"{name:12s} bind+launches {per_call(kernel, args) * 1e6:7.1f} us | call "
              f"{best_of(lambda: kernel(**args)) * 1e6:7.1f} us, with grad "
              f"{best_of(lambda: kernel(**graph)) * 1e6:7.1f} us | kernel.op "
              f"{best_of(lambda: kernel.op(*op_args)) * 1e6:7.1f} us per call")


if __name__ == "__main__":
    main()
