"""Seeded mutations of spec text and the judge of what a compiler may do with them.

A careless or hostile user hands attncc mangled specs. Every outcome must be one of:
a `SpecError` that names file, line and column; a kernel whose generated code matches the
reference executor on random inputs; or an honest refusal of the Triton backend
(`BackendError`) with the reference still running. Crashes deep in the stack, hangs and
wrong numbers are failures. Shared by the fuzz test and by manual longer runs
(`python tests/fuzzing.py SEEDS`).
"""
from __future__ import annotations

import random
import re
import signal
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import attncc
from attncc.check import _compare
from attncc.errors import ArgumentError, BackendError, ShapeError, SpecError
from attncc.random_inputs import random_arguments

GALLERY = Path(attncc.__file__).resolve().parent.parent / "examples"
TOKEN = re.compile(r"\*\*|//|[<>=!]=|[-+*/]=|[A-Za-z_][A-Za-z_0-9]*|\d+\.\d*(?:[eE][-+]?\d+)?|\d+|\S")

# Names that a generated module also uses, Python keywords and builtins: user names
# must live in their own namespace, so each of these has to behave like any other name.
HOSTILE_NAMES = ["c1", "acc", "m_i", "l_i", "qk", "offs_m", "start_n", "i0", "hi0", "MASKED", "pid_m", "tl",
                 "float", "range", "triton", "o", "lse", "count", "n_rows", "BLOCK_M", "lambda", "None",
                 "True", "class", "def", "return", "import", "torch", "self", "kernel", "__init__", "_"]
HOSTILE_NUMBERS = ["0", "1", "-1", "1e999", "0.0", "10000000000000000000000000000000", "2 ** 62",
                   "3 ** 99999999", "9" * 400, "1e-300", "(0 - 0)"]
HOSTILE_TEXT = ['"""', "'''", "\\", "\x00", "\r", "\u2028", "\t", "é", "{", "}", "[", "]", "(", ")", ",",
                "#", "\n", "not ", "-", "if ", "by ", "mask ", "=", "+=", "**"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**", "<", "<=", "==", "!=", "and", "or"]


def tokens(text: str) -> list[tuple[int, int]]:
    """Spans of the spec's tokens (identifiers, numbers, operators), comments skipped."""
    spans = []
    for line in re.finditer(r"[^\n]*\n?", text):
        code = line.group().split("#", 1)[0]
        for m in TOKEN.finditer(code):
            spans.append((line.start() + m.start(), line.start() + m.end()))
    return spans


def mutate(text: str, rng: random.Random, steps: int = 1) -> str:
    """`steps` random edits of a spec: token deletions, duplications, swaps and
    replacements by hostile names, numbers, operators or characters, deep nesting."""
    for _ in range(steps):
        spans = tokens(text)
        if not spans:
            return text
        a, b = rng.choice(spans)
        word = text[a:b]
        kind = rng.randrange(9)
        if kind == 0:
            new = ""
        elif kind == 1:
            new = word + " " + word
        elif kind == 2:
            c, d = rng.choice(spans)
            if c < a:
                a, b, c, d = c, d, a, b
            if c >= b:
                text = text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
            continue
        elif kind == 3 and re.fullmatch(r"[A-Za-z_]\w*", word):
            new = rng.choice(HOSTILE_NAMES)
        elif kind == 4 and re.fullmatch(r"[A-Za-z_]\w*", word):
            idents = sorted({text[c:d] for c, d in spans if re.fullmatch(r"[A-Za-z_]\w*", text[c:d])})
            new = rng.choice(idents)
        elif kind == 5:
            new = rng.choice(HOSTILE_NUMBERS) if re.fullmatch(r"[\d.]+", word) else rng.choice(OPERATORS)
        elif kind == 6:
            new = rng.choice(HOSTILE_TEXT)
        elif kind == 7:
            depth = rng.choice([3, 50, 400])
            new = rng.choice(["(" * depth + word + ")" * depth, "-" * depth + word, "not " * depth + word])
        else:
            line_start = text.rfind("\n", 0, a) + 1
            line_end = text.find("\n", a)
            line = text[line_start:line_end]
            text = text[:line_end] + "\n" + line * rng.choice([1, 2]) + text[line_end:]
            continue
        text = text[:a] + new + text[b:]
    return text


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise `Hang` in the main thread after `seconds` (SIGALRM): a guard against endless work."""
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    kind: str  # "spec error", "no inputs", "reference only", "match", or a failure kind
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind.startswith("FAIL")


SMALL_DIMS = {"B": 1, "H": 2, "G": 1, "N": 11, "M": 13, "D": 8, "E": 6}


def judge(text: str, run_triton: bool = True, seconds: float = 20.0) -> Outcome:
    """What attncc does with one spec text, classified; failures carry a traceback."""
    try:
        with time_limit(seconds):
            return _judge(text, run_triton)
    except Hang as why:
        return Outcome("FAIL hang", str(why))
    except SpecError as err:
        if err.loc is None or not re.match(r"<string>:\d+:\d+: ", str(err)):
            return Outcome("FAIL unlocated spec error", str(err))
        return Outcome("spec error", str(err).splitlines()[0])
    except Exception:  # anything else escaping attncc is a crash
        return Outcome("FAIL crash", traceback.format_exc(limit=-6))


def _judge(text: str, run_triton: bool) -> Outcome:
    program = attncc.load(text)
    shape = {d: SMALL_DIMS[d] for d in program.dims if d in SMALL_DIMS}
    try:
        args = random_arguments(program, shape, seed=1)
    except (ValueError, TypeError, ArgumentError, ShapeError) as why:  # no valid call exists
        return Outcome("no inputs", str(why).splitlines()[0])
    reference = attncc.compile(text, backend="reference")
    upcast = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in args.items()}
    try:
        want = reference(**upcast)
    except (ArgumentError, ShapeError) as why:  # a call-time requirement the inputs do not meet
        return Outcome("no inputs", str(why).splitlines()[0])
    except IndexError as why:  # the spec reads a tensor out of its range: said at the spec's line and column
        if not re.match(r"<string>:\d+:\d+: error: ", str(why)):
            raise
        return Outcome("out-of-range read", str(why).splitlines()[0])
    if not run_triton:
        return Outcome("reference only")
    try:
        kernel = attncc.compile(text, backend="triton")
    except BackendError as why:
        return Outcome("reference only", str(why).splitlines()[0][-120:])
    try:
        got = kernel(**args)
    except BackendError as why:  # a call the generated kernel cannot take, said so
        return Outcome("reference only", str(why).splitlines()[0][-120:])
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for name, x, ref in zip(kernel.outputs, got, want):
        verdict = _compare(name, x, ref, 2e-4, 2e-4)
        if not verdict.passed:
            return Outcome("FAIL mismatch", f"output {name}: max abs err {verdict.max_abs:.3g}")
    return Outcome("match")


def gallery_texts() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(GALLERY.glob("*.attn"))}


def cases(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (label, mutated text) pairs drawn from the gallery, reproducible by seed."""
    rng = random.Random(seed)
    texts = gallery_texts()
    names = sorted(texts)
    out = []
    for n in range(count):
        name = rng.choice(names)
        steps = rng.choice([1, 1, 1, 2, 3])
        out.append((f"{name}#{seed}.{n}", mutate(texts[name], rng, steps)))
    return out


if __name__ == "__main__":  # python tests/fuzzing.py [COUNT [SEED]]: a longer run, failures printed
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    tally: dict[str, int] = {}
    for label, text in cases(count, seed):
        outcome = judge(text)
        tally[outcome.kind] = tally.get(outcome.kind, 0) + 1
        if outcome.failed:
            print(f"=== {label}: {outcome.kind}\n{text}\n{outcome.detail}\n", flush=True)
    print(tally)
