"""Context parallelism under torchrun: every rank's output and gradients against one device.

On GPUs (NCCL, the generated Triton kernels, float32), one process per GPU:

    PYTHONPATH=. torchrun --standalone --nproc-per-node 4 benchmarks/context_parallel_check.py [--length 4096]

On CPUs (gloo, the reference executor, float64), the same script, for trying it anywhere:

    PYTHONPATH=. torchrun --standalone --nproc-per-node 2 benchmarks/context_parallel_check.py --cpu --length 96

Each rank builds the same whole inputs (seeded), runs the kernel on them as one device would,
then its own shard through `context_parallel` in both layouts, and compares its output slice
and the gradients of its q, k, v slices and of the replicated inputs (lam, table). Rank 0
prints the largest relative error over the ranks per case and what ran; the exit status is 1
when one exceeds the tolerance (1e-9 on the CPU, 2e-3 on GPUs: float32 partial sums in
another order).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import attncc
from attncc import distributed as D

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from context_parallel import PARAMS, TOKEN_DIM, inputs  # noqa: E402  (the benchmark's inputs)

EXAMPLES = ("causal", "document", "sliding_window", "relative_bias", "lightning", "linear_elu")


def check(name: str, layout: D.Layout, n: int, backend: str, device, dtype) -> tuple[float, str]:
    """(the largest relative error of this rank, the backend the call reports)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    kernel = attncc.compile(name, backend=backend)
    a = {k: (t.to(device, dtype) if t.is_floating_point() else t.to(device)) for k, t in inputs(name, n).items()}
    floats = [k for k, t in a.items() if t.is_floating_point()]
    params = PARAMS.get(name, {})
    go = torch.randn(a["q"].shape[:3] + a["v"].shape[3:], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = {k: t.detach().requires_grad_(k in floats) for k, t in a.items()}
    o = kernel(**leaves, **params)
    whole = torch.autograd.grad((o * go).sum(), [leaves[k] for k in floats])

    def local(key, t):
        return D.shard(t, TOKEN_DIM[key], world, rank, layout) if key in TOKEN_DIM else t

    mine = {k: local(k, t).detach().requires_grad_(k in floats) for k, t in a.items()}
    cp = D.context_parallel(kernel, layout=layout)
    o_r = cp(**mine, **params)
    grads = torch.autograd.grad((o_r * local("q", go)).sum(), [mine[k] for k in floats])
    worst = ((o_r - local("q", o)).abs().max() / o.abs().max().clamp(min=1)).item()
    for k, got, want in zip(floats, grads, whole):
        worst = max(worst, ((got - local(k, want)).abs().max() / want.abs().max().clamp(min=1)).item())
    return worst, cp.last_run["backend"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096, help="the sequence length N = M")
    parser.add_argument("--cpu", action="store_true", help="gloo and the reference executor")
    args = parser.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        device, backend, dtype, tol = torch.device("cpu"), "reference", torch.float64, 1e-9
    else:  # one GPU per process: NCCL needs the device set before the first collective
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend, dtype, tol = "triton", torch.float32, 2e-3
    dist.init_process_group("gloo" if cpu else "nccl")
    failed = False
    for name in EXAMPLES:
        for layout in D.Layout:
            error, ran = check(name, layout, args.length, backend, device, dtype)
            worst = torch.tensor([error], dtype=torch.float64, device=device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            failed |= not worst.item() <= tol
            if dist.get_rank() == 0:
                print(f"{name:>15} {layout.value:>10}: largest relative error {worst.item():.2e} "
                      f"({ran}, {dist.get_world_size()} ranks, {dist.get_backend()})", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
