"""Which specs the Triton backend generates, and whether what it generates is right.

For every `.attn` spec in a folder (default `tests/trials`; `examples` works too):

1. run the reference backend on small, odd-sized seeded random inputs
   (`attncc.random_inputs.random_arguments`), in float32 and on float64 copies;
2. try `attncc.compile(spec, backend="triton")`: generated, rejected (the
   `BackendError` reason), or crashed (any other exception: a bug, not a rejection);
3. if generated, run the kernel on the float32 CPU tensors (in Triton's interpreter, unless
   `--device cuda`) and compare every output with the float64 reference: an output passes
   when max |x - ref| <= atol * max(|ref|) (NaN where the reference has NaN counts as equal).

Prints a table and "generated and correct: X of Y (Z%)"; `--json` and `--markdown` write
the results. Exits 1 when a generated kernel is wrong or fails, planning crashes, or the
reference cannot run a spec (rejections alone exit 0).

    .venv/bin/python benchmarks/coverage.py                      # tests/trials
    .venv/bin/python benchmarks/coverage.py examples --json cov.json --markdown cov.md
    .venv/bin/python benchmarks/coverage.py tests/trials/urpe.attn tests/trials/sinkhorn.attn
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Small odd sizes: tiles are partial, N != M, D != E. Dims a spec does not have are ignored;
# a spec whose requires pin a dim (N == M, N == height * width) gets it solved instead.
SHAPE = {"B": 2, "H": 2, "N": 19, "M": 23, "D": 12, "E": 10}
# The order in which dims are left to the spec's requires when the given sizes break them.
RELEASE_ORDER = ("M", "E", "N", "D", "H", "B")
# Values for params that have no default (examples/neighborhood_2d.attn's height and width).
PARAM_GUESSES = {"int": (4, 3, 2, 1, 5, 6, 7, 8), "float": (1.0,), "bool": (False,)}


@dataclass
class OutputError:
    name: str
    max_abs: float      # max |x - ref64|
    scale: float        # max |ref64| over finite entries
    ref32_abs: float    # max |ref32 - ref64|: the error of a float32 computation of the same thing
    passed: bool


@dataclass
class Result:
    name: str
    path: str
    reference: str = "-"         # "ok", or "error: ..."
    triton: str = "-"            # "generated", "rejected", "crashed", "spec error"
    plan: str = ""
    plan_text: str = ""          # the plan's own description, when it has one
    correct: str = "-"           # "yes", "NO", "error", "fallback", "-"
    reason: str = ""
    shape: dict = field(default_factory=dict)
    outputs: list[OutputError] = field(default_factory=list)
    seconds: float = 0.0         # the generated kernel's call

    @property
    def good(self) -> bool:
        return self.triton == "generated" and self.correct == "yes"


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=["tests/trials"],
                    help="folders of .attn files, or .attn files (default: tests/trials)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    ap.add_argument("--shape", default="", help="dims to override, e.g. N=33,M=41")
    ap.add_argument("--atol", type=float, default=2e-3,
                    help="tolerance relative to each output's largest |value| (default 2e-3)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per generated run (default 120)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu runs generated kernels in Triton's interpreter (default)")
    ap.add_argument("--only", default="", help="comma-separated spec names to run")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by attncc)

    shape = dict(SHAPE)
    for item in filter(None, args.shape.split(",")):
        name, _, value = item.partition("=")
        shape[name.strip()] = int(value)
    paths = spec_paths(args.specs)
    if args.only:
        wanted = set(args.only.split(","))
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        print("no .attn specs found", file=sys.stderr)
        return 2

    results = []
    for path in paths:
        start = time.perf_counter()
        result = measure(path, shape, args.seed, args.atol, args.timeout, args.device)
        results.append(result)
        print(f"  {result.name}: {result.triton} {result.correct} ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr, flush=True)

    print_table(results)
    good = sum(r.good for r in results)
    summary = f"generated and correct: {good} of {len(results)} ({100 * good / len(results):.0f}%)"
    generated = sum(r.triton == "generated" for r in results)
    torch_only = sum(r.plan.endswith("[0 passes]") or "[0 passes," in r.plan for r in results)
    print(f"{summary}; generated: {generated} ({torch_only} of them with no generated pass: all in torch); "
          f"rejected: {sum(r.triton == 'rejected' for r in results)}; "
          f"crashed: {sum(r.triton == 'crashed' for r in results)}; "
          f"reference failures: {sum(r.reference != 'ok' for r in results)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "seed": args.seed, "atol": args.atol,
                                               "device": args.device,
                                               "results": [asdict(r) for r in results]}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results) + f"\n{summary}\n")
    # rejections are the measure, not a failure; a wrong, crashing or unrunnable spec is
    return 1 if any(r.correct in ("NO", "error") or r.triton == "crashed" or r.reference != "ok"
                    for r in results) else 0


def spec_paths(items: list[str]) -> list[Path]:
    paths = []
    for item in items:
        p = Path(item)
        if not p.exists() and not p.is_absolute():
            p = ROOT / item
        paths += sorted(p.glob("*.attn")) if p.is_dir() else [p]
    return paths


# ----------------------------------------------------------------------------- one spec

def measure(path: Path, shape: dict, seed: int, atol: float, timeout: int, device: str) -> Result:
    import torch

    import attncc

    result = Result(name=path.stem, path=str(path))
    try:
        reference = attncc.compile(path, backend="reference")
        result.name = reference.name
        kwargs = inputs_for(reference.program, shape, seed, device)
        result.shape = {k: v for k, v in _scalars(reference.program, kwargs).items()}
        ref32 = _as_tuple(reference(**kwargs))
        ref64 = _as_tuple(reference(**{k: _upcast(v) for k, v in kwargs.items()}))
        result.reference = "ok"
    except Exception as why:  # noqa: BLE001 - any failure is the finding
        result.reference = f"error: {type(why).__name__}: {_one_line(why)}"
        ref32 = ref64 = None

    try:
        kernel = attncc.compile(path, backend="triton")
    except attncc.BackendError as why:
        result.triton, result.reason = "rejected", rejection_reason(str(why))
        return result
    except attncc.SpecError as why:  # the spec itself is wrong: no backend's business
        result.triton, result.reason = "spec error", _one_line(why)
        return result
    except Exception as why:  # noqa: BLE001 - a crash while planning is a bug, not a rejection
        result.triton, result.reason = "crashed", f"{type(why).__name__}: {_one_line(why)}"
        return result
    result.triton = "generated"
    plan = getattr(kernel.generated, "plan", None)
    result.plan = describe_plan(plan)
    try:
        result.plan_text = plan.describe() if hasattr(plan, "describe") else ""
    except Exception as why:  # noqa: BLE001 - only for the record
        result.plan_text = f"describe() failed: {why}"
    if ref64 is None:
        result.reason = f"no reference to compare with ({result.reference})"
        return result

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            got = _as_tuple(kernel(**kwargs))
    except Timeout:
        result.correct, result.reason = "error", f"generated run took over {timeout} s"
        return result
    except Exception as why:  # noqa: BLE001
        result.correct, result.reason = "error", f"run: {type(why).__name__}: {_one_line(why)}"
        return result
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    result.seconds = time.perf_counter() - start
    ran = (kernel.last_run or {}).get("backend")
    if ran != "triton":
        result.correct, result.reason = "fallback", f"the call ran on {ran}: {kernel.last_run}"
        return result
    result.outputs = [compare(name, x, r32, r64, atol)
                      for name, x, r32, r64 in zip(kernel.outputs, got, ref32, ref64)]
    bad = [o for o in result.outputs if not o.passed]
    result.correct = "NO" if bad else "yes"
    if bad:
        result.reason = "; ".join(f"{o.name}: max err {o.max_abs:.3g} vs scale {o.scale:.3g}" for o in bad)
    return result


def inputs_for(program, shape: dict, seed: int, device: str = "cpu") -> dict:
    """Seeded float32 keyword arguments. Dims the spec's requires pin (N == M) are dropped
    from `shape` until the requires hold; params without a default get small guesses."""
    from attncc.random_inputs import random_arguments

    wanted = {k: v for k, v in shape.items() if k in program.dims}
    attempts = [wanted]
    for dim in RELEASE_ORDER:  # let the requires solve M, then E, ... (N == M, D == E)
        if dim in attempts[-1]:
            attempts.append({k: v for k, v in attempts[-1].items() if k != dim})
    free = [n for n, p in program.params.items() if p.default is None]
    guesses = [dict(zip(free, combo)) for combo in _param_combos(program, free)] if free else [{}]
    last = None
    for params in guesses:
        for dims in attempts:
            try:
                return random_arguments(program, dims, params, seed=seed, device=device)
            except ValueError as why:
                last = why
    raise last


def _param_combos(program, free: list[str]):
    import itertools

    choices = [PARAM_GUESSES.get(str(program.params[n].dtype), (1,)) for n in free]
    return itertools.islice(itertools.product(*choices), 64)


def compare(name: str, x, r32, r64, atol: float) -> OutputError:
    import torch

    a, want, w32 = x.detach().double().cpu(), r64.detach().double().cpu(), r32.detach().double().cpu()
    if a.shape != want.shape:
        return OutputError(name, float("inf"), 0.0, 0.0, False)
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0

    def err(t):
        same = (t == want) | (t.isnan() & want.isnan())
        e = torch.where(same, 0.0, (t - want).abs().nan_to_num(nan=float("inf")))
        return float(e.max()) if e.numel() else 0.0

    max_abs = err(a)
    return OutputError(name, max_abs, scale, err(w32), max_abs <= atol * max(scale, 1e-6))


def rejection_reason(message: str) -> str:
    """The why of "<file>: the triton backend cannot generate 'x' yet: WHY; backend='reference' runs it"."""
    head, sep, rest = message.partition(" yet: ")
    reason = rest if sep else message
    return reason.removesuffix("; backend='reference' runs it")


def describe_plan(plan) -> str:
    if plan is None:
        return ""
    text = type(plan).__name__
    terms = getattr(plan, "terms", None)
    if terms:
        kinds = [str(getattr(t.kind, "value", t.kind)) for t in terms]
        text += f"[{'+'.join(kinds)}]"
    passes = getattr(plan, "passes", None)
    if passes is not None:
        notes = getattr(plan, "notes", None) or []
        text += f"[{len(passes)} pass{'es' if len(passes) != 1 else ''}"
        text += f", {len(notes)} in torch]" if notes else "]"
    if getattr(plan, "row_sum", False):
        text += " /rowsum"
    return text


def _scalars(program, kwargs: dict) -> dict:
    from attncc.binding import bind

    try:
        scalars = bind(program, kwargs).scalars
    except Exception:  # noqa: BLE001 - only for display
        return {}
    return {k: v for k, v in scalars.items() if k in program.dims or k in program.params}


def _upcast(v):
    import torch

    return v.double() if torch.is_tensor(v) and v.is_floating_point() else v


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _one_line(why: Exception) -> str:
    lines = [line.strip() for line in str(why).splitlines() if line.strip()]
    return " | ".join(lines[:3])[:300]


# ----------------------------------------------------------------------------- output

def _row(r: Result) -> list[str]:
    err = max((o.max_abs / max(o.scale, 1e-6) for o in r.outputs), default=None)
    return [r.name, r.reference if r.reference == "ok" else "FAIL", r.triton, r.plan or "-",
            r.correct, "-" if err is None else f"{err:.1e}", r.reason or r.reference.removeprefix("ok")]


HEADERS = ["spec", "reference", "triton", "plan", "correct", "rel err", "reason"]


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Triton backend coverage", show_lines=False)
    for h in HEADERS:
        table.add_column(h, overflow="fold", no_wrap=h not in ("reason", "plan"))
    colour = {"yes": "green", "NO": "bold red", "error": "bold red", "fallback": "yellow"}
    for r in results:
        row = [escape(c) for c in _row(r)]  # plans read "RowStreamPlan[softmax]": not markup
        row[4] = f"[{colour[r.correct]}]{row[4]}[/]" if r.correct in colour else row[4]
        table.add_row(*row)
    Console(width=200).print(table)


def markdown_table(results: list[Result]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell(c) for c in _row(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
