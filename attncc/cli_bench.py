"""`attncc bench`: time a spec's generated kernel against PyTorch's attention implementations
(SDPA backends, compiled FlexAttention, the eager composition and its torch.compile) in one
run on one GPU, and print the table; optionally write the JSON document and the plot.

Registered by `attncc.cli` with `add_parser(subparsers)`; `run(args)` returns the exit status.
"""
from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console

DESCRIPTION = """\
Time the spec's generated Triton kernel and its competitors on the same inputs, in one run
on one device: scaled_dot_product_attention with each backend (flash, efficient, cudnn,
math) where SDPA can express the spec (dense, causal, GQA), torch.compile'd FlexAttention,
the eager PyTorch composition (materialised scores) and its torch.compile. SDPA and
FlexAttention forms exist for the 16 softmax-family examples; for the other specs the eager
and compiled competitors are the spec's own cascade of torch ops, fully materialised.

--mode fwd_bwd times a training step's attention instead: a forward recording the graph,
then the gradients of q, k, v and every other float input (ALiBi slopes, a bias table, sink
logits: float32 leaves), with each gradient's error against the float32 reference's; the
backward's time is fwd+bwd minus the forward (--mode bwd reports by it). The table then
says what ran attncc's backward: the generated kernels ('triton') or the reference.

Each row: median time of the reps (triton.testing.do_bench: CUDA events, L2 cleared before
each rep, as `attncc tune` times configs), TFLOP/s counted as FlashAttention does
(4*B*H*N*M*D, halved for causal masks; the same count for every competitor), attncc's
effective TFLOP/s over the key tiles it really visits, peak memory of one call, largest
error against the float32 reference, and how many times faster attncc is.

Each --shape is one shape (repeat it for a sweep) and may also set params that depend on
the size (height=32,width=32). Without --shape: B*N = 16384 tokens, H = 16, D = E = 128,
N = 1024 ... 16384. Without a GPU this is a smoke run on tiny shapes: kernels run in
Triton's interpreter and the timings mean nothing."""

EXAMPLES = """\
  attncc bench causal                                   the default sweep, bfloat16
  attncc bench causal --shape B=4,H=16,N=4096,M=4096,D=128,E=128 --json causal.json
  attncc bench sliding_window --param window=512 --competitors attncc,flex,sdpa:flash
  attncc bench neighborhood_2d --shape B=4,H=16,N=4096,M=4096,D=64,E=64,height=64,width=64
  attncc bench document --plot document.png              TFLOP/s against N, one line per competitor
  attncc bench alibi --mode fwd_bwd --competitors attncc,flex   forward + backward, slopes learnable
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .bench_competitors import COMPETITORS, SDPA_BACKENDS
    from .bench_train import Mode
    from .check import DTYPES

    p = subparsers.add_parser("bench", help="time a kernel against SDPA, FlexAttention and PyTorch",
                              description=DESCRIPTION, epilog="examples:\n" + EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="FILE", help="a .attn file, or the name of a gallery example")
    p.add_argument("--shape", action="append", metavar="DIM=SIZE,...",
                   help="one shape, e.g. B=4,H=16,N=4096,M=4096,D=128,E=128 (repeat for a sweep)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE,...",
                   help="params for every shape, e.g. --param window=512 (repeatable)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="input dtype (default: bfloat16)")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.FWD.value,
                   help="fwd: the forward (default); fwd_bwd: forward + backward of every float input; "
                        "bwd: the same, reported by the backward's time")
    p.add_argument("--competitors", default=",".join(COMPETITORS), metavar="NAME,...",
                   help=f"what to time (default: all): {', '.join(COMPETITORS)}, where sdpa means every "
                        f"backend, or one of sdpa:{{{','.join(SDPA_BACKENDS)}}}")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    p.add_argument("--reps", type=int, default=20, help="about this many timed calls (do_bench's time budget), fewer for slow ones (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default: 0)")
    p.add_argument("--device", help="torch device (default: cuda when available, else a cpu smoke run)")
    p.add_argument("--json", metavar="OUT.json", help="write the results document here")
    p.add_argument("--plot", metavar="OUT.png", help="plot TFLOP/s against N here")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """Exit status 0, or 1 when attncc itself failed on a shape."""
    from .bench import SMOKE_SHAPES, run_benchmark, token_sweep
    from .bench_report import plot_results, print_summary, progress_bar, progress_callback, write_json
    from .cli import _assignments, resolve_spec

    console = console or Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:  # a log: wide enough for the training table's 13 columns
        console.width = max(console.width, 200)
    smoke = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type != "cuda"
    shapes = [_assignments([s], int) for s in args.shape] if args.shape else \
        (SMOKE_SHAPES if smoke else token_sweep())
    spec = resolve_spec(args.spec)
    with progress_bar(console) as bar:
        doc = run_benchmark(spec, shapes, _assignments(args.param, str), dtype=args.dtype, device=args.device,
                            competitors=[c.strip() for c in args.competitors.split(",") if c.strip()],
                            warmup=args.warmup, reps=args.reps, seed=args.seed, mode=args.mode,
                            progress=progress_callback(bar, args.spec))
    print_summary(doc, console)
    if args.json:
        console.print(f"results: {write_json(doc, args.json)}")
    if args.plot:
        console.print(f"plot: {plot_results(doc, args.plot)}")
    failed = [r for v in doc["variants"].values() for r in v["results"]
              if r["competitors"].get("attncc", {}).get("status", "ok") != "ok"]
    return 1 if failed else 0
