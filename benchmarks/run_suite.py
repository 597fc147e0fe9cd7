"""The benchmark suite of DESIGN.md's performance goals: attncc against SDPA, compiled
FlexAttention and the eager / torch.compile'd PyTorch compositions, in one run on one GPU.

Main variants (dense, causal, sliding_window, alibi, softcap, document, neighborhood_2d):
bfloat16, B*N = 16384 tokens, H = 16, D = E in {64, 128}, N in {1k, 2k, 4k, 8k, 16k}.
The other softmax-family examples: D = 128, N in {1k, 4k, 16k}. With --mode fwd_bwd (or
bwd): forward + backward, by default of the training variants (causal, alibi with learnable
slopes, relative_bias with a learnable table, document, learned_sinks), the main sweep.
Writes benchmarks/results/<gpu>_<date>.json after every shape (a run cut short keeps what
it finished) and a PNG beside it, then prints the table. See benchmarks/README.md.

    python benchmarks/run_suite.py                         # on a GPU, every forward
    python benchmarks/run_suite.py --variants causal,document --out $OUT/part1.json
    python benchmarks/run_suite.py --mode fwd_bwd --competitors attncc,flex,sdpa:flash
    python benchmarks/run_suite.py --smoke                 # no GPU: tiny shapes, interpreter
    python benchmarks/run_suite.py --merge a.json b.json --out all.json   # collate runs, plot
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from attncc.bench import Mode, run_benchmark, token_sweep
from attncc.bench_competitors import COMPETITORS, expand
from attncc.bench_report import (load, merge, plot_results, print_summary, progress_bar, progress_callback,
                                 results_stem, write_json)
from attncc.check import DTYPES
from attncc.random_inputs import random_arguments

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MAIN = ["dense", "causal", "sliding_window", "alibi", "softcap", "document", "neighborhood_2d"]
OTHERS = ["gqa_causal", "sink_window", "relative_bias", "prefix_lm", "key_padding", "label_table",
          "criss_cross", "epipolar", "learned_sinks"]
TRAINING = ["causal", "alibi", "relative_bias", "document", "learned_sinks"]  # issue 10
SWEEP = {"ns": (1024, 2048, 4096, 8192, 16384), "head_dims": (64, 128)}
SMALL_SWEEP = {"ns": (1024, 4096, 16384), "head_dims": (128,)}
SMOKE_SWEEP = {"ns": (32,), "head_dims": (16,)}
TOKENS, HEADS = 16384, 16
DOCUMENTS = 8  # per packed sequence, of random lengths
VIEWS = 4      # epipolar: images per sequence


def grid(n: int) -> dict:
    """A height x width grid of n tokens, as square as powers of two allow."""
    height = 2 ** (int(math.log2(n)) // 2)
    return {"height": height, "width": n // height}


def shapes(name: str, ns, head_dims, tokens: int, heads: int) -> list[dict]:
    """The sweep's shapes, with the dims and size params this variant needs."""
    out = []
    for d in head_dims:
        for shape in token_sweep(ns, tokens=tokens, heads=heads, head_dim=d):
            n = shape["N"]
            if name in ("neighborhood_2d", "criss_cross"):
                shape.update(grid(n))
            elif name == "epipolar":
                shape.update(views=VIEWS, **grid(n // VIEWS))
            elif name == "gqa_causal":
                shape["G"] = max(1, heads // 4)
            elif name == "relative_bias":
                shape["W"] = 257  # distances -128..128
            out.append(shape)
    return out


def packed_documents(program, shape, params, dtype, device, seed):
    """Random arguments with `DOCUMENTS` documents of random lengths per sequence:
    `random_arguments`' segment ids start a document every ~8 tokens, which leaves
    almost no work at these lengths."""
    args = random_arguments(program, shape, params, dtype, device, seed)
    batch, n = args["doc"].shape
    gen = torch.Generator().manual_seed(seed)
    starts = torch.zeros(batch, n, dtype=torch.long)
    starts.scatter_(1, torch.rand(batch, n - 1, generator=gen).argsort(-1)[:, :DOCUMENTS - 1] + 1, 1)
    args["doc"] = starts.cumsum(-1).to(device)
    return args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--variants", help=f"comma-separated subset (default: all {len(MAIN + OTHERS)}; "
                                       f"training modes: {','.join(TRAINING)})")
    ap.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.FWD.value,
                    help="fwd: the forward (default); fwd_bwd: forward + backward of every float input "
                         "(q, k, v, slopes, tables, sinks); bwd: the same, reported by the backward's time")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU needed: tiny shapes, Triton's interpreter, timings meaningless")
    ap.add_argument("--n", help="comma-separated sequence lengths, instead of each variant's sweep")
    ap.add_argument("--head-dims", help="comma-separated head dims, instead of each variant's sweep")
    ap.add_argument("--competitors", default=",".join(COMPETITORS), help="comma-separated (default: all)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="input dtype (default: bfloat16)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    ap.add_argument("--reps", type=int, default=20, help="about this many timed calls (do_bench's time budget), fewer for slow ones (default: 20)")
    ap.add_argument("--out", help="results JSON (default: benchmarks/results/<gpu>_<date>.json); "
                                  "the PNG goes beside it")
    ap.add_argument("--append", action="store_true",
                    help="keep what --out already holds and add this run's results to it (parts of one session)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG (the GPU session: few files come back)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="collate these results files into --out and "
                                                               "plot them; runs nothing")
    return ap


def chosen_variants(args: argparse.Namespace) -> list[str]:
    return args.variants.split(",") if args.variants else (TRAINING if Mode(args.mode).training else MAIN + OTHERS)


def problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a command line beyond what argparse checks, or None: unknown
    variants or competitors, --append without --out."""
    unknown = sorted(set(chosen_variants(args)) - set(MAIN + OTHERS))
    if unknown:
        return f"unknown variants: {', '.join(unknown)}; choose from {', '.join(MAIN + OTHERS)}"
    try:
        expand(args.competitors.split(","))
    except ValueError as err:
        return str(err)
    if args.append and not args.out:
        return "--append needs --out"
    return None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a log: wide enough for the tables

    if args.merge:
        doc = merge(args.merge)
        out = Path(args.out) if args.out else RESULTS / f"{results_stem(doc)}.json"
        return _finish(doc, write_json(doc, out), console, not args.no_plot)

    if not args.smoke and not torch.cuda.is_available():
        console.print("[red]no CUDA device[/]: run this on a GPU machine, or with --smoke to check the "
                      "suite itself (timings meaningless)")
        return 2
    if problem(args):
        console.print(f"[red]{escape(problem(args))}[/]")
        return 2
    mode, chosen = Mode(args.mode), chosen_variants(args)
    tokens, heads = (32, 2) if args.smoke else (TOKENS, HEADS)
    out = Path(args.out) if args.out else None
    done = [load(out)] if args.append and out.exists() else []

    def save(partial: dict):
        """After every shape: the variants finished so far and this one's shapes."""
        nonlocal out
        doc = merge(done + [partial])
        out = out or RESULTS / f"{results_stem(doc)}.json"
        write_json(doc, out)

    with progress_bar(console) as bar:
        for name in chosen:
            sweep = SMOKE_SWEEP if args.smoke else (SWEEP if name in MAIN or mode.training else SMALL_SWEEP)
            ns = [int(x) for x in args.n.split(",")] if args.n else sweep["ns"]
            head_dims = [int(x) for x in args.head_dims.split(",")] if args.head_dims else sweep["head_dims"]
            done.append(run_benchmark(ROOT / "examples" / f"{name}.attn", shapes(name, ns, head_dims, tokens, heads),
                                      dtype=args.dtype, device=None if not args.smoke else "cpu",
                                      competitors=args.competitors.split(","), warmup=args.warmup,
                                      reps=args.reps, progress=progress_callback(bar, name), mode=mode,
                                      inputs=packed_documents if name == "document" else random_arguments,
                                      on_shape=save))
    return _finish(merge(done), out, console, not args.no_plot)


def _finish(doc: dict, out: Path, console: Console, plot: bool) -> int:
    print_summary(doc, console)
    console.print(f"results: {out}")
    if plot:
        console.print(f"plot: {plot_results(doc, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
