"""The `attncc` command line: browse the example gallery, inspect stages, check kernels.

Each subcommand is a small function of parsed arguments that returns an exit status:
0 success, 1 a check found a mismatch, 2 the spec or the call was wrong (reported
without a traceback: spec errors already point at file, line and column).
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .api import BACKENDS, load, read_spec
from .check import DTYPES, check
from .errors import ArgumentError, BackendError, ShapeError, SpecError
from .printer import format_ast, format_ir
from .syntax import parse


def _show_ast(spec: str) -> str:
    return format_ast(parse(*read_spec(spec)))


def _show_ir(spec: str) -> str:
    return format_ir(load(spec))


# Stage name -> a function from a spec path to its text form. Later stages register here.
STAGES: dict[str, Callable[[str], str]] = {"ast": _show_ast, "ir": _show_ir}

_USER_ERRORS = (SpecError, ArgumentError, ShapeError, BackendError, FileNotFoundError, ValueError)


# ----------------------------------------------------------------------------- the gallery

def example_files(directory: str | None = None) -> list[Path]:
    """The `.attn` files of a folder, or of the gallery installed with attncc."""
    folder = Path(directory) if directory else Path(str(resources.files("attncc.examples")))
    return sorted(folder.glob("*.attn"))


def describe(text: str, width: int = 72) -> str:
    """The first sentence of a spec's leading comment, without citations, cut to `width`:
    `# ALiBi (Press et al., ..., 2022): a per-head ... causal.` gives `ALiBi: a per-head ... causal.`"""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    comment = " ".join(lines)
    depth, end = 0, len(comment)
    for k, ch in enumerate(comment):
        depth += (ch == "(") - (ch == ")")
        if ch == "." and depth == 0 and comment[k + 1:k + 2] in ("", " "):
            end = k + 1
            break
    sentence = comment[:end]
    while True:  # drop parenthesised groups that cite a year, innermost first
        shorter = re.sub(r"\s*\([^()]*\d{4}[^()]*\)", "", sentence)
        if shorter == sentence:
            break
        sentence = shorter
    if len(sentence) > width:
        sentence = sentence[:width - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return sentence


def _relative(path: Path) -> str:
    """A path as short as it can be written from here."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def resolve_spec(spec: str) -> str:
    """A spec argument as a path: an existing file, or the name of a gallery example."""
    if Path(spec).is_file():
        return spec
    for path in example_files():
        if path.stem == spec or path.name == spec:
            return str(path)
    raise FileNotFoundError(f"no spec file '{spec}' and no example of that name (see `attncc list`)")


# ----------------------------------------------------------------------------- subcommands

def cmd_list(args, console: Console) -> int:
    files = example_files(args.dir)
    if not files:
        console.print(f"no .attn files in {args.dir}")
        return 2
    table = Table(title=f"{len(files)} attention specs", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column("path", style="dim", overflow="fold")
    for path in files:
        table.add_row(path.stem, Text(describe(path.read_text())), _relative(path))
    console.print(table)
    return 0


def cmd_show(args, console: Console) -> int:
    text = Text(STAGES[args.stage](resolve_spec(args.spec)).rstrip("\n"))
    text.highlight_regex(r"%\d+", "cyan")
    text.highlight_regex(r"#\d+", "magenta")
    text.highlight_regex(r"(?m)#( line)? .*$|#$", "dim")
    text.highlight_regex(r"(?m)^\S.*:$", "bold")
    console.print(text, soft_wrap=True)
    return 0


def cmd_check(args, console: Console) -> int:
    report = check(resolve_spec(args.spec), backend=args.backend, shape=_assignments(args.shape, int),
                   params=_assignments(args.param, str), dtype=args.dtype, seed=args.seed,
                   device=args.device)
    sizes = " ".join(f"{k}={v}" for k, v in report.scalars.items())
    asked = "" if report.requested == report.backend else f" (asked: {report.requested})"
    console.print(f"[bold]{report.name}[/]  backend [bold]{report.backend}[/]{asked}  "
                  f"dtype {report.dtype}  seed {report.seed}  {sizes}", soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("output", "shape", "dtype", "max abs err", "max rel err", "tolerance", "result"):
        table.add_column(column, justify="right" if "err" in column else "left", no_wrap=True)
    for o in report.outputs:
        tolerance = f"{o.atol:.0e}" if o.atol == o.rtol else f"{o.atol:.0e} / {o.rtol:.0e}"
        table.add_row(Text(o.name), "x".join(map(str, o.shape)), str(o.dtype).removeprefix("torch."),
                      f"{o.max_abs:.2e}", f"{o.max_rel:.2e}", tolerance,
                      "[green]pass[/]" if o.passed else "[red]FAIL[/]")
    console.print(table)
    console.print("[dim]an entry passes when |x - ref| <= atol + rtol*|ref|; "
                  "rel err = |x - ref| / max(|ref|, atol)[/]", soft_wrap=True)
    failed = [o.name for o in report.outputs if not o.passed]
    if failed:
        console.print(f"[red bold]FAIL[/]: {', '.join(failed)} differ from the reference")
        return 1
    console.print(f"[green bold]PASS[/]: {len(report.outputs)} output(s) match the reference")
    return 0


def _assignments(items: list[str] | None, convert) -> dict:
    """`["B=2,N=37", "M=45"]` -> {"B": 2, "N": 37, "M": 45}."""
    out = {}
    for item in items or []:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise ValueError(f"expected NAME=VALUE, got '{part}'")
            try:
                out[name.strip()] = convert(value.strip())
            except ValueError:
                raise ValueError(f"'{part}': {value.strip()!r} is not a valid value") from None
    return out


# ----------------------------------------------------------------------------- the parser

def _subparser(subparsers, name: str, summary: str, description: str, examples: str):
    return subparsers.add_parser(name, help=summary, description=description,
                                 epilog="examples:\n" + examples,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attncc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="attncc compiles declarative attention specs (.attn files: a cascade of\n"
                    "einsums with masks, score modifications and normalisations) into kernels,\n"
                    "and checks them against a reference executor.",
        epilog="examples:\n"
               "  attncc list                                  the example gallery\n"
               "  attncc show --stage ir examples/causal.attn  the IR of a spec\n"
               "  attncc check causal                          a kernel vs the reference\n\n"
               "run `attncc COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"attncc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = _subparser(sub, "list", "list the example specs with a one-line description",
                   "List the .attn specs of the example gallery installed with attncc (or of\n"
                   "a folder) with the first sentence of each spec's leading comment. A name\n"
                   "from this list can stand for the file in `show` and `check`.",
                   "  attncc list\n  attncc list --dir my_specs/\n")
    p.add_argument("--dir", help="list the .attn files of this folder instead of the gallery")
    p.set_defaults(run=cmd_list)

    stages = ", ".join(STAGES)
    p = _subparser(sub, "show", f"print a spec at one compiler stage ({stages})",
                   "Print a spec as the compiler sees it at one stage, with the spec's line\n"
                   "numbers: `ast` is the parsed syntax tree, one line per statement; `ir` is\n"
                   "the dataflow graph, one numbered node per line in topological order, with\n"
                   "its indices, dtype, masks and the source line it comes from.",
                   "  attncc show examples/causal.attn              (the IR)\n"
                   "  attncc show --stage ast examples/alibi.attn\n"
                   "  attncc show --stage ir permuted_blocks        (a gallery name)\n")
    p.add_argument("--stage", choices=list(STAGES), default="ir", help="which stage (default: ir)")
    p.add_argument("spec", metavar="FILE", help="a .attn file, or the name of a gallery example")
    p.set_defaults(run=cmd_show)

    p = _subparser(sub, "check", "run a kernel and the reference on random inputs and compare",
                   "Compile a spec, run it and the reference executor on the same random inputs,\n"
                   "and print the largest absolute and relative error of every output (and of\n"
                   "the log-sum-exp when the spec has one softmax over keys). Sizes default to\n"
                   "B=2 H=4 N=37 M=45 D=16 E=12 G=2, others 3, adjusted to the spec's requires.\n"
                   "Exit status: 0 all outputs match, 1 a mismatch, 2 an error in the spec or call.",
                   "  attncc check examples/causal.attn\n"
                   "  attncc check sliding_window --shape N=128,M=128 --param window=16 --dtype float64\n"
                   "  attncc check neighborhood_2d --param height=6,width=7 --seed 3\n")
    p.add_argument("spec", metavar="FILE", help="a .attn file, or the name of a gallery example")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="backend to check (default: auto, the best one available)")
    p.add_argument("--shape", action="append", metavar="DIM=SIZE,...",
                   help="fix dims, e.g. --shape B=1,N=128 (repeatable)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE,...",
                   help="set params, e.g. --param window=8 (repeatable; needed for params "
                        "without a default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="input dtype (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default: 0)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # Not a terminal (a pipe, a log): wide enough that tables never truncate a number.
    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 120)
    try:
        return args.run(args, console)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
    except _USER_ERRORS as err:
        print(f"attncc {args.command}: error: {err}", file=sys.stderr)
    return 2
