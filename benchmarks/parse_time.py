"""Time from spec text to checked IR for every example: parsing, lowering and extent
inference (`attncc.load`), best of 5 after one warm-up. Prints a table and the total;
writes nothing. The parse and lower columns are timed separately; infer is what is
left of load, so small values are noisy.

    .venv/bin/python benchmarks/parse_time.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import attncc
from attncc.syntax import parse
from attncc.frontend import lower

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up (also fills lark's parser cache)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per example (best is kept)")
    args = ap.parse_args(argv)

    table = Table(title="attncc.load: spec text -> checked IR (best of %d, ms)" % args.repeat)
    for col in ("example", "lines", "nodes", "parse", "lower", "infer", "load"):
        table.add_column(col, justify="left" if col == "example" else "right")

    paths = sorted(EXAMPLES.glob("*.attn"))
    start = time.perf_counter()
    attncc.load(paths[0])  # the first load also builds lark's LALR parser from the grammar
    cold = time.perf_counter() - start

    total = 0.0
    for path in paths:
        text = path.read_text()
        name = str(path)
        t_load = best_of(lambda: attncc.load(path), args.repeat)
        t_parse = best_of(lambda: parse(text, name), args.repeat)
        t_lower = best_of(lambda: lower(parse(text, name)), args.repeat) - t_parse
        t_infer = max(0.0, t_load - t_parse - t_lower)
        nodes = attncc.load(path).graph.number_of_nodes()
        total += t_load
        table.add_row(path.stem, str(len(text.splitlines())), str(nodes),
                      *(f"{t * 1e3:.2f}" for t in (t_parse, max(t_lower, 0.0), t_infer, t_load)))
    table.add_section()
    table.add_row("total", "", "", "", "", "", f"{total * 1e3:.1f}")

    console = Console()
    console.print(table)
    console.print(f"{len(paths)} examples, total {total * 1e3:.1f} ms warm; the first load in a "
                  f"process ({paths[0].stem}, building the parser) took {cold * 1e3:.1f} ms "
                  f"(Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
