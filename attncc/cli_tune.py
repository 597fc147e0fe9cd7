"""`attncc tune`: autotune a spec for one shape on this GPU and store the best config.

Registered by `attncc.cli` through `add_parser(subparsers)`; `run(args)` returns the
exit status (0 tuned, 2 an error, including having no CUDA device to time on).
"""
from __future__ import annotations

import sys

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .api import compile as compile_spec
from .autotune.cache import TuningCache
from .autotune.measure import NoDeviceError, require_cuda
from .autotune.tuner import TuneResult
from .check import DTYPES
from .random_inputs import random_arguments

DESCRIPTION = """\
Search the launch configs of a spec's Triton kernel (tile sizes BLOCK_M x BLOCK_N,
warps, pipeline stages, and key splits when there are at most 16 queries) for one
shape on this GPU, with an optuna TPE search. Each config is timed by
triton.testing.do_bench (L2 cleared before every run; the benchmarks time the same
way). The untuned default is measured first; configs whose first run is over 3x the
best so far are cut short; configs that fail to compile or launch are recorded and
skipped.

Every trial is kept in optuna's journal storage (default:
$ATTNCC_CACHE_DIR/tuning.journal, else ~/.cache/attncc/tuning.journal; beside
--cache PATH otherwise), one study per spec content hash, shape bucket (dims above
16 rounded up to a power of two), dtype, GPU and Triton version. Tuning the same key again resumes its study: configs already
measured are not measured again (--fresh starts over). `optuna-dashboard FILE.journal`
shows the studies.

The best config goes to the tuning cache index (default: $ATTNCC_CACHE_DIR/tuning.json,
else ~/.cache/attncc/tuning.json), the only file calls read: every later call of the
kernel in that bucket, from any process, runs with it.

Inputs are random, shaped by --shape and --param as in `attncc check`. Needs a CUDA
device: timings in the interpreter mean nothing, so without one it exits with 2."""

EXAMPLES = """\
  attncc tune causal --shape B=4,H=16,N=4096,M=4096,D=128,E=128
  attncc tune examples/sliding_window.attn --shape B=1,H=32,N=8192,M=8192,D=64,E=64 \\
      --param window=512 --trials 60
  attncc tune causal --shape B=64,H=32,N=1,M=8192,D=128,E=128 --timeout 120   (decoding: key splits)
  attncc tune my_variant.attn --shape N=2048,M=2048 --dtype float16 --cache ./tuning.json
"""

TOP = 8


def add_parser(subparsers):
    from .cli import _size_options, _subparser  # here, not above: attncc.cli imports this module

    p = _subparser(subparsers, "tune", "autotune a spec's kernel for a shape on this GPU",
                   DESCRIPTION, EXAMPLES)
    p.add_argument("spec", metavar="FILE", help="a .attn file, or the name of a gallery example")
    _size_options(p, "to tune for")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="input dtype (default: bfloat16)")
    p.add_argument("--trials", type=int, default=30,
                   help="configs to measure in this run at most; those a resumed study measured "
                        "before do not count (default: 30)")
    p.add_argument("--timeout", type=float, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--cache", metavar="PATH",
                   help="tuning cache index file; its trials go to PATH with the suffix .journal "
                        "(default: the user cache)")
    p.add_argument("--fresh", action="store_true",
                   help="start this key's study over instead of resuming its earlier trials")
    p.set_defaults(run=run)
    return p


def run(args, console: Console | None = None) -> int:
    from .cli import _assignments, resolve_spec

    console = console or Console(highlight=False)
    spec = resolve_spec(args.spec)
    try:
        require_cuda()
    except NoDeviceError as err:
        print(f"attncc tune: error: {err}; `attncc check {args.spec}` tests the kernel in the "
              "interpreter instead", file=sys.stderr)
        return 2
    kernel = compile_spec(spec, backend="triton")
    inputs = random_arguments(kernel.program, _assignments(args.shape, int),
                              _assignments(args.param, str), dtype=DTYPES[args.dtype], device="cuda")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"tuning {escape(kernel.name)}", total=args.trials, best="-")

        def progress(trial, result: TuneResult):
            bar.update(task, completed=result.measured_now, best=_time(result.best_time))

        store = TuningCache(args.cache)
        result = kernel.tune(trials=args.trials, timeout_s=args.timeout, cache=store,
                             progress=progress, fresh=args.fresh, **inputs)
    console.print(result_table(result))
    pruned = sum(t.status == "pruned" for t in result.trials)
    failed = [t for t in result.trials if t.status == "failed"]
    resumed = len(result.trials) - result.measured_now
    earlier = f", {resumed} of them from earlier runs" if resumed else ""
    console.print(f"{len(result.trials)} configs{earlier}; {result.measured_now} measured in {result.elapsed_s:.1f} s "
                  f"({pruned} cut short, {len(failed)} failed); stored in {escape(str(store.path))}", soft_wrap=True)
    if store.studies_kept:
        console.print(f"[dim]trials: {escape(str(store.journal))} (optuna-dashboard opens it)[/]", soft_wrap=True)
    for t in failed[:3]:
        console.print(f"[dim]failed {escape(_config(t.config))}: {escape(str(t.reason))}[/]", soft_wrap=True)
    return 0


def result_table(result: TuneResult, n: int = TOP) -> Table:
    """The fastest configs with their median times and speed-ups over the default."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="fastest configs", title_justify="left")
    names = list(result.best_config or {})
    for column in ("#", *names, "time", "vs default"):
        table.add_column(column, justify="right", no_wrap=True)
    for rank, t in enumerate(result.top(n), 1):
        speedup = f"{result.default_time / t.time:.2f}x" if result.default_time else "-"
        mark = " (default)" if t.config == result.default else ""
        table.add_row(str(rank), *(str(t.config[k]) for k in names), _time(t.time), speedup + mark)
    return table


def _time(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f} us"


def _config(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())
