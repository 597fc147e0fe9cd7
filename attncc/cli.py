"""The `attncc` command line: browse the example gallery, inspect stages, check and export kernels.

Each subcommand is a small function of parsed arguments that returns an exit status:
0 success, 1 a check found a mismatch, 2 the spec or the call was wrong (reported
without a traceback: spec errors already point at file, line and column).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import Callable

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from . import __version__, cli_bench, cli_tune, pipeline
from .api import BACKENDS, gallery_path, load, read_spec, read_spec_file
from .api import compile as compile_spec
from .codegen.pytext import docstring
from .check import DTYPES, check
from .errors import ArgumentError, BackendError, ShapeError, SpecError
from .plan_report import format_plan
from .printer import format_ast, format_ir


def _show_ast(spec, args) -> str:
    if not isinstance(spec, str):  # a function decorated with @attncc.attention: its .attn text
        return spec.show("ast")
    return format_ast(pipeline.run(*read_spec(spec), until="ast")["ast"])


def _show_ir(spec: str, args) -> str:
    return format_ir(load(spec))


def _show_plan(spec: str, args) -> str:
    return format_plan(compile_spec(spec, "triton"), _assignments(args.shape, int), _assignments(args.param, str),
                       args.block_m or PLAN_TILE, args.block_n or PLAN_TILE)


def _skeleton(kernel) -> str:
    """A few words on what a generated module holds."""
    source = kernel.generated.source
    if hasattr(source, "mask_mode"):
        return f"mask mode {source.mask_mode}"
    return f"the general streaming plan: {len(source.passes)} pass kernel(s)"


def _show_triton(spec: str, args) -> str:
    return compile_spec(spec, "triton").generated.source.source


# Stage name -> a function from a spec path and the parsed options to its text form.
STAGES: dict[str, Callable[[str, argparse.Namespace], str]] = dict(zip(
    pipeline.NAMES, (_show_ast, _show_ir, _show_plan, _show_triton), strict=True))
PLAN_OPTIONS = ("shape", "param", "block_m", "block_n")  # options of `show` that only the plan uses
PLAN_TILE = 64  # the plan's work table: default BLOCK_M and BLOCK_N

# Reported as `attncc COMMAND: error: ...` (exit status 2), never as a traceback. OSError covers
# files that cannot be read or written, and `CacheError` (an unusable cache dir).
_USER_ERRORS = (SpecError, ArgumentError, ShapeError, OSError, ValueError)


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


def resolve_spec(spec: str):
    """A spec argument as a path (an existing file, or the name of a gallery example), or as the
    decorated function that `module:function` or `file.py:function` names (imported)."""
    if os.path.isfile(spec):  # False, not an error, for a name too long or with a NUL
        return spec
    example = gallery_path(spec[:-len(".attn")] if spec.endswith(".attn") else spec)
    if example is not None:
        return str(example)
    if re.fullmatch(r"[^:]+:[A-Za-z_][\w.]*", spec):
        from .decorator import import_function

        return import_function(spec)
    raise FileNotFoundError(f"no spec file '{spec}' and no example of that name (see `attncc list`)")


# ----------------------------------------------------------------------------- subcommands

def cmd_list(args, console: Console) -> int:
    files = example_files(args.dir)
    if not files:
        console.print(f"no .attn files in {args.dir}", markup=False)
        return 2
    table = Table(title=f"{len(files)} attention specs", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column("path", style="dim", overflow="fold")
    for path in files:  # user text (names, comments, paths) as Text: never read as rich markup
        try:
            description = describe(read_spec_file(path))
        except (OSError, SpecError) as err:
            description = f"(unreadable: {err.message if isinstance(err, SpecError) else err})"
        table.add_row(Text(path.stem), Text(description), Text(_relative(path)))
    console.print(table)
    return 0


def cmd_show(args, console: Console) -> int:
    misplaced = [o for o in PLAN_OPTIONS if getattr(args, o) is not None]
    if misplaced and args.stage != "plan":
        names = ", ".join("--" + o.replace("_", "-") for o in misplaced)
        raise ValueError(f"{names}: only --stage plan takes these (they size its work table)")
    source = STAGES[args.stage](resolve_spec(args.spec), args)
    if args.stage == "triton":
        if console.is_terminal:
            console.print(Syntax(source, "python", theme="ansi_dark", word_wrap=False))
        else:  # byte for byte, to save or diff
            console.file.write(source)
        return 0
    text = Text(source.rstrip("\n"))
    text.highlight_regex(r"%\d+", "cyan")
    text.highlight_regex(r"#\d+", "magenta")
    text.highlight_regex(r"(?m)#( line)? .*$|#$", "dim")
    text.highlight_regex(r"(?m)^\S.*:$|^[a-z]+:", "bold")
    console.print(text, soft_wrap=True)
    return 0


def cmd_compile(args, console: Console) -> int:
    spec = resolve_spec(args.spec)
    if not isinstance(spec, str):
        raise ValueError(f"{args.spec}: `attncc compile` takes a .attn file; `attncc show --stage ast "
                         f"{args.spec} > {spec.name}.attn` writes the decorated function's spec as one")
    spec = Path(spec)
    name = compile_spec(spec, "triton").name  # fails before anything is written
    files = compiled_files(name)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    copy = out / files["spec"]
    if not (copy.exists() and copy.resolve() == spec.resolve()):
        copy.write_bytes(spec.read_bytes())  # byte for byte: the module compiles this copy
    # Generated from the copy's absolute path, as the module does: the source names its spec.
    kernel = compile_spec(copy.resolve(), "triton")
    triton_file, module_file = out / files["triton"], out / files["module"]
    triton_file.write_text(kernel.generated.source.source, encoding="utf-8")
    description = textwrap.fill(describe(read_spec_file(copy), width=10**4), 88)
    module_file.write_text(_module_text(kernel, files, description), encoding="utf-8")
    copied = "" if copy.resolve() == spec.resolve() else f" (a copy of {_relative(spec)})"
    module = files["module"].removesuffix(".py")
    written = [(copy, f"the spec{copied}"),
               (triton_file, f"the generated Triton source ({_skeleton(kernel)})"),
               (module_file, f"a module: `from {module} import attention`, then "
                             f"attention({', '.join(f'{n}=...' for n in kernel.program.inputs)})")]
    width = max(len(str(path)) for path, _ in written)
    for path, what in written:
        console.print(f"wrote {str(path):<{width}}  {what}", markup=False, soft_wrap=True)
    return 0


MODULE_PREFIX = "attncc_"  # no module of the standard library, torch or attncc starts so


def compiled_files(name: str) -> dict[str, str]:
    """The names of what `attncc compile` writes for attention `name`: the module is
    `attncc_<name>.py`, an identifier that cannot shadow another module (`kernel`, `torch`,
    `warnings`, ...) nor be a keyword (`import`, `None`); the spec copy and the Triton source
    (`<name>.attn`, `<name>.triton.py`) have dots in their names, so they are not importable
    modules at all and no two specs' files collide."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # the grammar's NAME; checked, not assumed
        raise ValueError(f"{name!r} is not a name attncc can write files for")
    return {"spec": f"{name}.attn", "triton": f"{name}.triton.py", "module": f"{MODULE_PREFIX}{name}.py"}


# The module `attncc compile` writes. Nothing from the spec is code in it: the docstring is
# escaped (codegen.pytext.docstring), file names and versions are repr literals, and its own
# names (`kernel`, `attention`, the underscored imports) are fixed.
_MODULE = '''{docstring}
import warnings as _warnings
from pathlib import Path as _Path

import attncc as _attncc

_HERE = _Path(__file__).resolve().parent
_SPEC, _TRITON, _WRITTEN_BY = {spec!r}, {triton!r}, {version!r}
kernel = _attncc.compile(_HERE / _SPEC, backend="triton")

if kernel.generated.source.source != (_HERE / _TRITON).read_text(encoding="utf-8"):
    _warnings.warn(f"{{kernel.name}}: attncc {{_attncc.__version__}} generates a different Triton source than "
                   f"{{_TRITON}}, saved by attncc {{_WRITTEN_BY}}; run `attncc compile {{_SPEC}} -o .` "
                   f"in {{_HERE}} to refresh it", stacklevel=2)


def attention(**kwargs):
    """Runs `kernel`, the compiled spec: keyword arguments as in the module's docstring."""
    return kernel(**kwargs)


attention.__signature__ = kernel.signature
'''

_DOC = """{name}: the kernel of {spec}, written by `attncc compile` (attncc {version}).

{description}

    from {module} import attention
    {outputs} = attention({call})

attention({signature})

CUDA tensors run the compiled Triton kernel, CPU tensors the same kernel in Triton's
interpreter (slow: for tests); return_lse=True also returns the log-sum-exp. `kernel`
is the attncc.Kernel behind it (signature, plan, generated source).

On import, attncc compiles {spec} (next to this file) again and compares the Triton
source with {triton}, the source saved by `attncc compile`: a warning says when
they differ, i.e. when the installed attncc generates other code than the one that wrote
this folder. `attncc compile {spec} -o .` here refreshes the saved copy.
"""


def _module_text(kernel, files: dict[str, str], description: str) -> str:
    """The importable module `attncc compile` writes next to the spec and the source."""
    inputs = list(kernel.program.inputs)
    params = [f"{n}={v!r}" if v is not inspect.Parameter.empty else n for n, v in kernel.params.items()]
    doc = _DOC.format(name=kernel.name, version=__version__, description=description, spec=files["spec"],
                      triton=files["triton"], module=files["module"].removesuffix(".py"),
                      outputs=", ".join(kernel.outputs), call=", ".join(f"{n}={n}" for n in inputs),
                      signature=", ".join(["*", *inputs, *params, "return_lse=False"]))
    return _MODULE.format(docstring=docstring(doc), spec=files["spec"], triton=files["triton"],
                          version=__version__)


def cmd_check(args, console: Console) -> int:
    report = check(resolve_spec(args.spec), backend=args.backend, shape=_assignments(args.shape, int),
                   params=_assignments(args.param, str), dtype=args.dtype, seed=args.seed,
                   device=args.device)
    sizes = " ".join(f"{k}={v}" for k, v in report.scalars.items())
    asked = "" if report.requested == report.backend else f" (asked: {report.requested})"
    console.print(f"[bold]{escape(report.name)}[/]  backend [bold]{escape(report.backend)}[/]{escape(asked)}  "
                  f"dtype {escape(report.dtype)}  seed {report.seed}  {escape(sizes)}", soft_wrap=True)
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
        console.print(f"[red bold]FAIL[/]: {escape(', '.join(failed))} differ from the reference")
        return 1
    console.print(f"[green bold]PASS[/]: {len(report.outputs)} output(s) match the reference")
    return 0


def _assignments(items: list[str] | None, convert) -> dict:
    """`["B=2,N=37", "M=45"]` -> {"B": 2, "N": 37, "M": 45}; a tuple param's value keeps its
    commas inside parentheses: `shape=(1,5,7),kernel=3`."""
    out = {}
    for item in items or []:
        for part in filter(None, (p.strip() for p in re.split(r",(?![^()]*\))", item))):
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


def _size_options(p, what: str):
    """--shape and --param, shared by `check` and `show --stage plan`."""
    p.add_argument("--shape", action="append", metavar="DIM=SIZE,...",
                   help=f"fix dims {what}, e.g. --shape B=1,N=128 (repeatable)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE,...",
                   help="set params, e.g. --param window=8 (repeatable; needed for params "
                        "without a default)")


def _tile(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a tile size is a positive integer, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attncc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="attncc compiles declarative attention specs (.attn files: a cascade of\n"
                    "einsums with masks, score modifications and normalisations) into fused\n"
                    "Triton kernels, and checks them against a reference executor.",
        epilog="examples:\n"
               "  attncc list                                    the example gallery\n"
               "  attncc show --stage ir examples/causal.attn    the IR of a spec\n"
               "  attncc show --stage plan causal                how its kernel is planned\n"
               "  attncc check causal                            its kernel vs the reference\n"
               "  attncc compile causal -o kernels/              an importable kernel module\n"
               "  attncc tune causal --shape N=4096,M=4096       tile sizes for this GPU\n"
               "  attncc bench causal --shape N=4096,M=4096      beside SDPA and FlexAttention\n\n"
               "run `attncc COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"attncc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = _subparser(sub, "list", "list the example specs with a one-line description",
                   "List the .attn specs of the example gallery installed with attncc (or of\n"
                   "a folder) with the first sentence of each spec's leading comment. A name\n"
                   "from this list can stand for the file in `show`, `check` and `compile`.",
                   "  attncc list\n  attncc list --dir my_specs/\n")
    p.add_argument("--dir", help="list the .attn files of this folder instead of the gallery")
    p.set_defaults(run=cmd_list)

    stages = ", ".join(STAGES)
    p = _subparser(sub, "show", f"print a spec at one compiler stage ({stages})",
                   "Print a spec as the compiler sees it at one stage, with the spec's line\n"
                   "numbers: `ast` is the parsed syntax tree, one line per statement; `ir` is\n"
                   "the dataflow graph, one numbered node per line in topological order, with\n"
                   "its indices, dtype, masks and the source line it comes from.\n"
                   "`plan` is how the Triton backend maps the spec onto its row-streaming\n"
                   "kernel: the tensors playing Q, K and V, the query, key, feature and grid\n"
                   "indices, the folded scale, the score modifications, the mask analysis\n"
                   "(symbolic key ranges per query tile, or a runtime block map) and a work\n"
                   "table: key tiles visited against a dense kernel and against the minimum,\n"
                   "for sizes from --shape/--param (small defaults otherwise) and tiles of\n"
                   "--block-m x --block-n. `triton` is the generated Triton source.\n"
                   "Specs the Triton backend cannot generate have no plan or triton stage:\n"
                   "the reason is printed and the exit status is 2.",
                   "  attncc show examples/causal.attn              (the IR)\n"
                   "  attncc show --stage ast examples/alibi.attn\n"
                   "  attncc show --stage ir permuted_blocks        (a gallery name)\n"
                   "  attncc show --stage plan document\n"
                   "  attncc show --stage plan sliding_window --shape N=1024 --param window=128 \\\n"
                   "              --block-m 128 --block-n 64\n"
                   "  attncc show --stage triton causal > causal_triton.py\n"
                   "  attncc show --stage ast my_specs:alibi          (a decorated Python function)\n")
    p.add_argument("--stage", choices=list(STAGES), default="ir", help="which stage (default: ir)")
    p.add_argument("spec", metavar="FILE", help="a .attn file, the name of a gallery example, or "
                   "MODULE:FUNCTION (or FILE.py:FUNCTION), a function decorated with @attncc.attention "
                   "(imported: its module runs); --stage ast prints its spec as .attn text")
    _size_options(p, "for the plan's work table")
    p.add_argument("--block-m", type=_tile, metavar="ROWS",
                   help=f"query rows per tile in the plan's work table (default: {PLAN_TILE})")
    p.add_argument("--block-n", type=_tile, metavar="KEYS",
                   help=f"keys per tile in the plan's work table (default: {PLAN_TILE})")
    p.set_defaults(run=cmd_show)

    p = _subparser(sub, "check", "run a kernel and the reference on random inputs and compare",
                   "Compile a spec, run it and the reference executor on the same random inputs,\n"
                   "and print the largest absolute and relative error of every output (and of\n"
                   "the log-sum-exp when the spec has one softmax over keys). Sizes default to\n"
                   "B=2 H=4 N=37 M=45 D=16 E=12 G=2, others 3, adjusted to the spec's requires.\n"
                   "The default backend is triton: the generated kernel, compiled on a GPU or run\n"
                   "in Triton's interpreter on the CPU (slow: keep sizes small there). Specs it\n"
                   "cannot generate yet are reported (exit 2); --backend reference checks them.\n"
                   "Exit status: 0 all outputs match, 1 a mismatch, 2 an error in the spec or call.",
                   "  attncc check examples/causal.attn\n"
                   "  attncc check sliding_window --shape N=128,M=128 --param window=16 --dtype float16\n"
                   "  attncc check neighborhood_2d --param height=6,width=7 --seed 3\n"
                   "  attncc check query_softmax --backend reference --dtype float64\n")
    p.add_argument("spec", metavar="FILE", help="a .attn file, or the name of a gallery example")
    p.add_argument("--backend", choices=BACKENDS, default="triton",
                   help="backend to check (default: triton; auto: triton on a GPU when the spec "
                        "can be generated, else reference)")
    _size_options(p, "of the random inputs")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="input dtype (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default: 0)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(run=cmd_check)

    p = _subparser(sub, "compile", "write a spec's Triton kernel and an importable module to a folder",
                   "Generate the Triton kernel of a spec and write three files to DIR, named after\n"
                   "the attention (`attention NAME(...)`):\n"
                   "  NAME.attn         a copy of the spec\n"
                   "  NAME.triton.py    the generated Triton source, to read and diff\n"
                   "  attncc_NAME.py    a module: `from attncc_NAME import attention`, then\n"
                   "                    attention(q=..., k=..., ...)\n"
                   "The module's name has a fixed prefix so that no spec name (`torch`, `kernel`,\n"
                   "`import`) can shadow another module or fail to import. It compiles NAME.attn\n"
                   "with the installed attncc when imported and warns if the source it gets\n"
                   "differs from NAME.triton.py (another attncc version). Specs the Triton\n"
                   "backend cannot generate are reported (exit 2).",
                   "  attncc compile examples/causal.attn -o kernels/\n"
                   "  attncc compile document -o kernels/            (a gallery name)\n"
                   "  cd kernels && python -c 'from attncc_causal import attention; help(attention)'\n")
    p.add_argument("spec", metavar="FILE", help="a .attn file, or the name of a gallery example")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="folder to write to (created if missing; files of the same name are replaced)")
    p.set_defaults(run=cmd_compile)

    cli_tune.add_parser(sub)  # `attncc tune`: defined next to the autotuner
    cli_bench.add_parser(sub)  # `attncc bench`: defined next to the benchmark harness
    return parser


# What to try when the Triton backend cannot run a spec, per subcommand.
_BACKEND_HINTS = {
    "check": "--backend reference checks the spec on the reference executor",
    "show": "--stage ast and --stage ir show any spec; `attncc check --backend reference` runs it",
    "compile": "`attncc check --backend reference` runs the spec on the reference executor",
}


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
    except BackendError as err:
        hint = _BACKEND_HINTS.get(args.command)
        print(f"attncc {args.command}: error: {err}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
    except RecursionError:  # a pathological spec (deep nesting) past the checks that name it
        print(f"attncc {args.command}: error: the spec nests too deeply to process "
              "(Python's recursion limit)", file=sys.stderr)
    except _USER_ERRORS as err:
        print(f"attncc {args.command}: error: {err}", file=sys.stderr)
    return 2
