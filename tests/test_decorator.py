"""`@attncc.attention`: specs written as Python functions (docs/python.md).

- every gallery example, rewritten as a decorated function (the Python text is generated here
  from the example's syntax tree, written to a module file and imported, so `inspect` reads it
  as it reads any file), gives the example's syntax tree, `.attn` text and results;
- hand-written decorated functions (causal, ALiBi with params, several outputs, an int
  input, blocked reductions) run on the triton backend (Triton's interpreter on a CPU) and
  match the reference;
- errors name the Python file's own line and column, with a caret, for constructs the
  language lacks and for mistakes the frontend and extent inference find;
- compilation is lazy and cached: decorating the same source again (a loop, a reload, a
  notebook cell run twice) gives the same kernel back, compiled once;
- `attncc show --stage STAGE module:function` on the command line.

Run with TRITON_INTERPRET=1 on a machine without a GPU (as `make test` does).
"""
# ruff: noqa: F821, F722  (the decorated functions are attncc specs: their names are not Python's)
from __future__ import annotations

import copy
import importlib.util
import inspect
import linecache
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attncc
from attncc import syntax
from attncc.cli import main
from attncc.decorator import AttentionFunction
from attncc.printer import format_attn, format_expr
from attncc.random_inputs import random_arguments
from oracles.inputs import make_inputs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
TRIALS = sorted((ROOT / "tests" / "trials").glob("*.attn"))
NAMES = [p.stem for p in EXAMPLES]

needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="generated kernels on CPU tensors need TRITON_INTERPRET=1")
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


# ----------------------------------------------------------------------------- hand-written specs
# Defined here, in a real file, as a user would: decorating only translates them; each is
# compiled on its first call.

@attncc.attention(backend="triton")
def causal(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
    """Causal attention, bottom-right aligned (examples/causal.attn)."""
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
    mask(j <= i + (M - N))
    p = softmax(s, j)
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
    return o


@attncc.attention(backend="triton")
def alibi_window(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", slopes: "H", *,
                 window: int = 256, scale: float = "D ** -0.5", bias: bool = False) -> "B,H,N,E":
    require(N == M)
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * scale
    s += slopes[h] * (j - i) if bias else 0.0
    s += slopes[h] * (j - i)      # ALiBi: a per-head linear penalty on the distance
    mask(j <= i and i - j < window)
    p = softmax(s, j)
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
    return o


@attncc.attention(backend="triton")
def with_lse(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> ("B,H,N,E", "B,H,N"):
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
    mask(j <= i + (M - N))
    p = softmax(s, j)
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
    m = logsumexp(s, j)
    return o, m


@attncc.attention(backend="triton")
def document(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", doc: "B,N: int") -> "B,H,N,E":
    require(N == M)
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
    mask(doc[b, i] == doc[b, j] and j <= i)
    p = softmax(s, j)
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
    return o


@attncc.attention(backend="triton")
def block_topk(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", *, block: int = 8, topk: int = 2) -> "B,H,N,E":
    require(N == M)
    qp[b, h, qb, d] = mean(q[b, h, i, d], by(i, block))     # the block index named by the left side
    kp = mean(k[b, h, j, d], by(j, block, kb))              # ... or by the third argument
    sb[b, h, qb, kb] = qp[b, h, qb, d] * kp[b, h, kb, d]
    mask(kb <= qb)
    keep[b, h, qb, kb] = topk_mask(-inf if kb == qb else sb, topk, kb) or kb == qb
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
    mask(j <= i and keep[b, h, i // block, j // block])
    p = softmax(s, j)
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
    return o


def qkv(B=1, H=2, N=24, M=24, D=16, E=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*shape, generator=gen) for n, shape in
            (("q", (B, H, N, D)), ("k", (B, H, M, D)), ("v", (B, H, M, E)))}


def assert_same(got, want, atol=2e-5):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=atol, rtol=atol, equal_nan=True)


# ----------------------------------------------------------------------------- the gallery in Python

def _python_names(e):
    """The tree with `i by size as kb` spelled `by(i, size, kb)` and true/false as True/False, so
    that the printer's expression text is the Python spelling (operators and their precedence
    are the same in both languages)."""
    if isinstance(e, syntax.BlockedAxis):
        args = [syntax.Name(e.index), _python_names(e.size)] + ([syntax.Name(e.alias)] if e.alias else [])
        return syntax.Call("by", args)
    if isinstance(e, syntax.Name) and e.id in ("true", "false"):
        return syntax.Name(e.id.capitalize())
    e = copy.copy(e)
    for field in ("args", "left", "right", "operand", "cond", "then", "other", "size"):
        value = getattr(e, field, None)
        if isinstance(value, list):
            setattr(e, field, [_python_names(a) for a in value])
        elif isinstance(value, syntax.Expr):
            setattr(e, field, _python_names(value))
    return e


def py(e) -> str:
    return format_expr(_python_names(e))


def _literal(e) -> bool:
    """A default Python can evaluate when the `def` runs: a number, its negation, a bool."""
    if isinstance(e, syntax.Unary) and e.op == "neg":
        e = e.operand
    return isinstance(e, syntax.Num) or (isinstance(e, syntax.Name) and e.id in ("true", "false"))


def python_text(program: syntax.Program) -> str:
    """The Python spelling of a spec's syntax tree (docs/python.md)."""
    def dims(d):
        return ",".join(f"{x}?" if k in d.broadcast else format_expr(x) if isinstance(x, syntax.Expr) else str(x)
                        for k, x in enumerate(d.dims)) + (f": {d.dtype}" if d.dtype != "float" else "")

    def value(e):
        return py(e) if _literal(e) else f'"{format_expr(e)}"'

    kinds = (syntax.Param, syntax.TupleParam, syntax.EnumParam)
    params = [st for st in program.body if isinstance(st, kinds)]
    body = [st for st in program.body if not isinstance(st, kinds)]
    assert program.body[:len(params)] == params, "params come first in the gallery"
    header = [f'{d.name}: "{dims(d)}"' + ("" if d.default is None else f" = {py(d.default)}") for d in program.inputs]
    if params:
        header.append("*")
    for p in params:
        if isinstance(p, syntax.EnumParam):  # `{a, b} = a` is `{"a", "b"} = "a"`
            choices = ", ".join(f'"{c}"' for c in p.choices)
            header.append(f"{p.name}: {{{choices}}}" + ("" if p.default is None else f' = "{p.default}"'))
            continue
        if isinstance(p, syntax.TupleParam):  # `int[3]` is `(int, int, int)`
            dtype = f"({', '.join(p.dtypes)}{',' if len(p.dtypes) == 1 else ''})"
        else:
            dtype = p.dtype
        if isinstance(p.default, list):
            default = f" = ({', '.join(value(e) for e in p.default)})"
        else:
            default = "" if p.default is None else f" = {value(p.default)}"
        header.append(f"{p.name}: {dtype}{default}")
    outs = [f'"{dims(d)}"' for d in program.outputs]
    returns = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    lines = ["@attncc.attention(backend='reference')",
             f"def {program.name}({', '.join(header)}) -> {returns}:"]
    for st in body:
        if isinstance(st, syntax.Let):
            lines.append(f"    {st.name} = let({py(st.value)})")
        elif isinstance(st, syntax.Require):
            lines.append(f"    require({py(st.cond)})")
        elif isinstance(st, syntax.Mask):
            lines.append(f"    mask({py(st.cond)})")
        elif isinstance(st, syntax.MultiAssign):
            lines.append(f"    {', '.join(st.names)} = {py(st.value)}")
        else:
            target = st.name if st.indices is None else f"{st.name}[{', '.join(st.indices)}]"
            lines.append(f"    {target} {st.op} {py(st.value)}")
    lines.append(f"    return {', '.join(d.name for d in program.outputs)}")
    return "\n".join(lines) + "\n"


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Every example and trial spec as a decorated function of one module file."""
    trees = {p.stem: syntax.parse(p.read_text(), str(p)) for p in EXAMPLES + TRIALS}
    text = "import attncc\n\n\n" + "\n\n".join(python_text(t) for t in trees.values())
    path = tmp_path_factory.mktemp("gallery") / "gallery_as_python.py"
    path.write_text(text)
    return trees, import_file(path, "gallery_as_python")


@pytest.mark.parametrize("name", [p.stem for p in EXAMPLES + TRIALS])
def test_same_syntax_tree_as_the_attn_file(gallery, name):
    trees, module = gallery
    fn = getattr(module, name)
    assert isinstance(fn, AttentionFunction) and isinstance(fn, attncc.Kernel)
    assert fn.spec == trees[name]  # positions aside (they are not compared)
    # the .attn text of the decorated function parses back to the same tree
    assert syntax.parse(fn.show("ast")) == trees[name]
    assert format_attn(trees[name]) == fn.show("ast")
    # positions are the Python file's: the line of `def` and of each statement
    lines = Path(fn.spec.source.filename).read_text().split("\n")
    assert lines[fn.spec.inputs[0].loc.line - 1].startswith(f"def {name}(")
    for st in fn.spec.body:
        if isinstance(st, syntax.Assign):
            assert lines[st.loc.line - 1][st.loc.column - 1:].startswith(st.name)


@pytest.mark.parametrize("name", NAMES)
def test_same_results_as_the_attn_file(gallery, name):
    _, module = gallery
    fn = getattr(module, name)
    assert not fn.compiled
    try:
        kwargs = make_inputs(name, B=1, H=2, N=20, D=8, E=4, dtype=torch.float32)
    except KeyError:  # an example newer than the oracles' input makers
        program = attncc.load(ROOT / "examples" / f"{name}.attn")
        shape = {d: n for d, n in dict(B=1, H=2, N=20, M=20, D=8, E=4).items() if d in program.dims}
        try:
            kwargs = random_arguments(program, shape)
        except ValueError as why:
            pytest.skip(f"no inputs for {name}: {why}")
    want = attncc.compile(str(ROOT / "examples" / f"{name}.attn"), backend="reference")(**kwargs)
    got = fn(**kwargs)
    assert fn.compiled and fn.backend == "reference" and fn.last_run["backend"] == "reference"
    assert_same(got, want, atol=1e-6)  # the same IR; summation order may differ by a rounding


# ----------------------------------------------------------------------------- hand-written, generated

@needs_triton
def test_causal_on_the_triton_backend():
    assert not causal.compiled  # decorating only translated it
    kwargs = qkv(N=20, M=28)
    got = causal(**kwargs, return_lse=True)
    assert causal.compiled and causal.backend == "triton" and causal.last_run["backend"] == "triton"
    assert causal.last_run["interpreted"] == (kwargs["q"].device.type == "cpu")
    assert_same(got, attncc.compile(ROOT / "examples" / "causal.attn", backend="reference")(**kwargs, return_lse=True))
    assert causal.__doc__.startswith("Causal attention")
    assert causal.name == "causal" and causal.outputs == ["o"]
    # the generated source names the Python file and quotes its lines
    text = Path(causal.last_run["source"]).read_text()
    assert "test_decorator.py" in text and "mask(j <= i + (M - N))" in text


@needs_triton
def test_params_with_defaults_on_the_triton_backend():
    sig = alibi_window.signature
    assert list(sig.parameters) == ["q", "k", "v", "slopes", "window", "scale", "bias", "return_lse"]
    assert alibi_window.params == {"window": 256, "scale": None, "bias": False}  # scale: from D
    kwargs = {**qkv(N=24, M=24), "slopes": torch.tensor([0.5, 0.25])}
    reference = attncc.compile(alibi_window, backend="reference")
    for params in ({}, {"window": 5}, {"window": 7, "scale": 0.3, "bias": True}):
        assert_same(alibi_window(**kwargs, **params), reference(**kwargs, **params))
    assert alibi_window.last_run["backend"] == "triton"


@needs_triton
def test_several_outputs_on_the_triton_backend():
    kwargs = qkv(N=16, M=24)
    o, m = with_lse(**kwargs)
    assert with_lse.outputs == ["o", "m"] and with_lse.backend == "triton"
    want_o, want_lse = attncc.compile(ROOT / "examples" / "causal.attn", backend="reference")(**kwargs,
                                                                                              return_lse=True)
    assert_same((o, m), (want_o, want_lse))


@needs_triton
def test_an_int_input_on_the_triton_backend():
    kwargs = {**qkv(N=24, M=24), "doc": torch.tensor([[0] * 7 + [1] * 10 + [2] * 7])}
    assert document.inputs["doc"] == "int tensor [B, N]"
    assert_same(document(**kwargs), attncc.compile(document, backend="reference")(**kwargs))
    with pytest.raises(attncc.ArgumentError):  # float ids: the element type is checked
        document(**{**kwargs, "doc": kwargs["doc"].float()})


@needs_triton
def test_blocked_reductions_on_the_triton_backend():
    kwargs = qkv(N=32, M=32)
    want = attncc.compile(ROOT / "examples" / "topk_blocks.attn", backend="reference")(**kwargs, block=8, topk=2)
    assert_same(block_topk(**kwargs), want)
    assert block_topk.backend == "triton"


# ----------------------------------------------------------------------------- errors

def decorate(tmp_path, text: str, name: str = "f"):
    """Import `text` as a module file and return its function `name` (errors propagate)."""
    path = tmp_path / f"spec_{abs(hash(text)) % 10 ** 12}.py"
    path.write_text("import attncc\n" + textwrap.dedent(text))
    return getattr(import_file(path, path.stem), name), path


HEADER = '''
@attncc.attention
def f(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
'''


def spec_error(tmp_path, body: str, header: str = HEADER) -> tuple[attncc.SpecError, Path]:
    """The SpecError of a function, raised when decorating it or when it is first used."""
    with pytest.raises(attncc.SpecError) as info:
        fn, _ = decorate(tmp_path, header + textwrap.indent(textwrap.dedent(body), "    "))
        fn.program
    return info.value, Path(info.value.source.filename)


def test_a_for_loop_is_reported_at_its_line_with_a_caret(tmp_path):
    err, path = spec_error(tmp_path, """\
        s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]
        for t in range(3):
            s += 1.0
        return s
        """)
    assert str(err) == (f"{path}:6:5: error: a `for` loop is not part of the attncc language\n"
                        "      for t in range(3):\n"
                        "      ^^^\n"
                        "  expected einsum statements: an index on the right but not on the left is summed "
                        "(`o[i] = x[i, j]` sums over j); `for _ in repeat(3):` repeats assignments")
    assert (err.line, err.column) == (6, 5)


@pytest.mark.parametrize("body, line, column, width, message", [
    ("p = lambda x: x\nreturn p", 5, 9, 11, "a lambda is not part of the attncc language"),
    ("if N > 1:\n    mask(j <= i)\nreturn o", 5, 5, 2, "an `if` statement is not part of"),
    ("while True:\n    pass\nreturn o", 5, 5, 5, "a `while` loop is not part of"),
    ("s = torch.exp(q[b, h, i, d])\nreturn s", 5, 9, 9, "'torch.exp' is not a function"),
    ("s[b, h, i, j] = q[b, h, i, d] @ k[b, h, j, d]\nreturn s", 5, 35, 1, "`@` is not part"),
    ("mask(0 <= j < i)\nreturn o", 5, 10, 10, "comparisons do not chain"),
    ("mask((j <= i) & (i < N))\nreturn o", 5, 19, 1, "`&` is not part"),
    ("p = softmax(s, dim=j)\nreturn p", 5, 20, 5, "take no keyword arguments"),
    ("mask = j <= i\nreturn o", 5, 5, 4, "'mask' is a reserved word"),
    ("s[b, h, i + 1, j] = q[b, h, i, d]\nreturn s", 5, 13, 5, "the indices on the left"),
    ("s = q[:, h, i, d]\nreturn s", 5, 11, 1, "a slice is not part"),
    ("x = by(i, 4)\nreturn x", 5, 9, 8, "'by' cannot be used here"),
    ("R = let(N, M)\nreturn o", 5, 9, 9, "let(...) takes one expression"),
    ("s = q[b, h, i, d]\nreturn s * 2", 6, 12, 5, "`return` names the output tensors"),
    ("s = q[b, h, i, d]\nreturn s\ns = s", 7, 5, 5, "a statement after `return`"),
    ("s = q[b, h, i, d]", 5, 5, 17, "'f' has no `return`"),
    ("s = q[b, h, i, d] + 99999999999999999999\nreturn s", 5, 25, 20, "integer literal 99999999999999999999 is out"),
    ("s: int = 3\nreturn s", 5, 5, 10, "an annotated assignment is not part"),
])
def test_unsupported_python_is_located(tmp_path, body, line, column, width, message):
    err, path = spec_error(tmp_path, body)
    assert message in err.message
    assert (err.line, err.column) == (line, column), str(err)
    rendered = str(err).split("\n")
    assert rendered[0].startswith(f"{path}:{line}:{column}: error: ")
    assert rendered[1] == "  " + path.read_text().split("\n")[line - 1]
    assert rendered[2] == "  " + " " * (column - 1) + "^" * width
    assert rendered[3].startswith("  expected ")


@pytest.mark.parametrize("header, line, column, message", [
    ('def f(q, k: "B,H,M,D") -> "B,H,N,E":', 4, 7, "input 'q' has no dims"),
    ('def f(q: "B,H,N,D", window: int) -> "B,H,N,E":', 4, 21, "params are keyword-only"),
    ('def f(q: "B,H,N,D", *, window) -> "B,H,N,E":', 4, 24, "param 'window' has no type"),
    ('def f(q: "B,H,N,D", *, window: "B") -> "B,H,N,E":', 4, 32, "so it is a param"),
    ('def f(q: "B,H,N,D", *args) -> "B,H,N,E":', 4, 22, "`*args` is not part"),
    ('def f(q: "B,H,N,D: double") -> "B,H,N,E":', 4, 20, "unknown element type 'double'"),
    ('def f(q: "B,H,N D") -> "B,H,N,E":', 4, 15, "the dim 'N D' is not a name"),
    ('def f(q: "B,H,N,D"):', 4, 5, "'f' has no return annotation"),
    ('def f(q: "B,H,N,D") -> ("B,H,N,E", "B,H,N"):', 8, 5, "`return` names 1 output but"),
    ('def f(q: "B,H,N,D", *, bias: float = "-log(M"):', 4, 43, "'(' was never closed"),
    ('def f(q: "B,H,N,D", *, bias: float = None) -> "B,H,N,E":', 4, 38, "None is not a param default"),
    ('def mask(q: "B,H,N,D") -> "B,H,N,E":', 4, 5, "'mask' is a reserved word"),
])
def test_header_errors_are_located(tmp_path, header, line, column, message):
    err, _ = spec_error(tmp_path, "s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]\np = softmax(s, j)\n"
                                  "o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]\nreturn o",
                        header="\n@attncc.attention\n" + header + "\n")
    assert message in err.message, str(err)
    assert (err.line, err.column) == (line, column), str(err)


def test_frontend_errors_point_at_the_python_file(tmp_path):
    """Errors found after the translation (frontend, extent inference) are at the file's
    lines too; they come on first use, when the spec is checked."""
    fn, path = decorate(tmp_path, '''
        class Specs:
            @attncc.attention
            def bad(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
                s[b, h, i, j] = q[b, h, i, d] * kk[b, h, j, d] * D ** -0.5
                p = softmax(s, j)
                o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
                return o
        ''', "Specs")
    with pytest.raises(attncc.SpecError) as info:
        fn.bad(**qkv())
    assert str(info.value) == (
        f"{path}:6:41: error: unknown tensor 'kk'\n"
        "          s[b, h, i, j] = q[b, h, i, d] * kk[b, h, j, d] * D ** -0.5\n"
        "                                          ^^^^^^^^^^^^^^\n"
        "  expected one of: q, k, v")

    fn, path = decorate(tmp_path, '''
        @attncc.attention
        def t(x: "N", y: "M") -> "N":
            o[i] = x[i] + y[i]
            return o
        ''', "t")
    with pytest.raises(attncc.SpecError) as info:
        fn.program
    err = info.value
    assert (err.line, err.column) == (5, 14) and "index 'i' ranges over M" in err.message
    assert str(err).split("\n")[1:3] == ["      o[i] = x[i] + y[i]", "               ^"]

    fn, path = decorate(tmp_path, '''
        @attncc.attention
        def w(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", *, window: int = 2.5) -> "B,H,N,E":
            s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]
            p = softmax(s, j)
            o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
            return o
        ''', "w")
    with pytest.raises(attncc.SpecError, match=r"spec_\d+\.py:4:66: error: param 'window: int' has a default"):
        fn(**qkv())


def test_columns_count_characters_and_limits_hold(tmp_path):
    """`ast` counts columns in UTF-8 bytes; errors count characters, as the .attn parser does."""
    fn, path = decorate(tmp_path, '''
        @attncc.attention
        def f(x: "N") -> "N": "Größe: é"; o[i] = xx[i]; return o
        ''', "f")
    with pytest.raises(attncc.SpecError, match="unknown tensor 'xx'") as info:
        fn.program
    line = path.read_text().split("\n")[3]
    assert (info.value.line, info.value.column) == (4, line.index("xx[") + 1)
    assert str(info.value).split("\n")[2] == "  " + " " * line.index("xx[") + "^^^^^"
    # the nesting limit of .attn specs, counted the same way (a level per operator)
    err, _ = spec_error(tmp_path, "o[b, h, i, e] = " + " + ".join(["v[b, h, i, e]"] * 150) + "\nreturn o")
    assert "nested too deeply: more than 100 levels" in err.message


def test_a_failed_require_names_the_python_line(tmp_path):
    fn, _ = decorate(tmp_path, '''
        @attncc.attention(backend="reference")
        def square(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
            require(N == M)
            s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]
            p = softmax(s, j)
            o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
            return o
        ''', "square")
    with pytest.raises(attncc.ShapeError, match=r"requirement `require\(N == M\)` \(line 5\) does not hold"):
        fn(**qkv(N=4, M=6))


def test_errors_inside_a_string_default_point_into_the_string(tmp_path):
    err, path = spec_error(tmp_path, "s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * bias\n"
                                     "p = softmax(s, j)\no[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]\nreturn o",
                           header='\n@attncc.attention\n'
                                  'def f(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", *, bias: float = "-log(K)") '
                                  '-> "B,H,N,E":\n')
    column = path.read_text().split("\n")[3].index("K)") + 1
    assert err.message == "unknown name 'K'" and (err.line, err.column) == (4, column)
    assert str(err).split("\n")[2] == "  " + " " * (column - 1) + "^"


def test_a_function_without_source_says_so():
    namespace = {"attncc": attncc}
    code = 'def f(q: "N") -> "N":\n    o[i] = q[i]\n    return o\n'
    exec(compile(code, "<no file>", "exec"), namespace)
    with pytest.raises(attncc.SpecError, match="the source of 'f' is not available") as info:
        attncc.attention(namespace["f"])
    assert "notebook cell" in str(info.value) and "attncc.compile" in str(info.value)
    with pytest.raises(attncc.SpecError, match="decorates a function"):
        attncc.attention("reference")
    with pytest.raises(attncc.BackendError, match="unknown backend 'cuda'"):
        attncc.attention(backend="cuda")


# ----------------------------------------------------------------------------- lazy compilation, caching

def test_compiled_on_first_use_and_once_per_source(tmp_path, monkeypatch):
    made = []
    real = attncc.decorator.choose_backend
    monkeypatch.setattr(attncc.decorator, "choose_backend", lambda *a: made.append(a) or real(*a))
    fn, path = decorate(tmp_path, '''
        kernels = []
        for scale in (1.0, 2.0, 3.0):        # the same source three times: one kernel
            @attncc.attention(backend="reference")
            def looped(x: "N,D") -> "N":
                o[i] = sum(x[i, d] * x[i, d], d)
                return o
            kernels.append(looped)
        ''', "kernels")
    assert fn[0] is fn[1] is fn[2] and not fn[0].compiled and not made
    assert repr(fn[0]).startswith("<attncc.attention looped from ") and fn[0].last_run is None
    x = torch.randn(5, 3)
    torch.testing.assert_close(fn[0](x=x), (x * x).sum(1))
    assert fn[0].compiled and len(made) == 1 and fn[0].last_run == {"backend": "reference", "backward": None}
    torch.testing.assert_close(fn[2](x=2 * x), (4 * x * x).sum(1))
    again = import_file(path, path.stem + "_again")  # the file run again: the same, compiled kernel
    assert again.kernels[0] is fn[0] and len(made) == 1
    # another backend is another kernel; another function body is another spec
    other = attncc.attention(backend="auto")(inspect.unwrap(fn[0]))
    assert other is not fn[0] and not other.compiled and other.spec == fn[0].spec


@needs_triton
def test_generated_once_for_a_source_decorated_twice(tmp_path, monkeypatch):
    generated = []
    real = attncc.api.generate
    monkeypatch.setattr(attncc.api, "generate", lambda p: generated.append(p) or real(p))
    text = '''
        @attncc.attention(backend="triton")
        def twice(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
            s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
            p = softmax(s, j)
            o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
            return o
        '''
    first, path = decorate(tmp_path, text, "twice")
    assert not generated
    kwargs = qkv(N=8, M=8)
    out = first(**kwargs)
    assert len(generated) == 1
    again = attncc.attention(backend="triton")(inspect.unwrap(first))
    assert again is first
    assert_same(again(**qkv(B=2, N=16, M=16, seed=1)), attncc.compile(first, "reference")(**qkv(B=2, N=16, M=16, seed=1)))
    assert len(generated) == 1 and again.last_run["backend"] == "triton"
    assert_same(out, attncc.compile(first, "reference")(**kwargs))


def test_a_notebook_cell(monkeypatch):
    """IPython keeps each cell's text in `linecache` under a file name of its own; running the
    same cell again decorates the same source: the same kernel comes back."""
    cell = textwrap.dedent('''
        @attncc.attention(backend="reference")
        def cell_spec(x: "N,D", w: "D") -> "N":
            o[i] = sum(x[i, d] * w[d], d)
            return o
        ''')
    filename = "/tmp/ipykernel_0/attncc_test_cell.py"
    monkeypatch.setitem(linecache.cache, filename, (len(cell), None, cell.splitlines(True), filename))
    kernels = []
    for _ in range(2):
        namespace = {"attncc": attncc}
        exec(compile(cell, filename, "exec"), namespace)
        kernels.append(namespace["cell_spec"])
    assert kernels[0] is kernels[1] and kernels[0].spec.source.filename == filename
    x, w = torch.randn(4, 3), torch.randn(3)
    torch.testing.assert_close(kernels[0](x=x, w=w), x @ w)


def test_kernel_api(tmp_path):
    fn, _ = decorate(tmp_path, '''
        @attncc.attention
        def api_spec(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":
            s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
            p = softmax(s, j)
            o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
            return o
        ''', "api_spec")
    assert fn.name == "api_spec" and not fn.compiled
    assert str(inspect.signature(fn)) == ("(*, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, "
                                          "return_lse: bool = False)")
    assert fn.compiled  # looking at the signature checked the spec
    assert fn.backend == ("triton" if torch.cuda.is_available() else "reference")
    assert fn.program.name == "api_spec" and list(fn.program.inputs) == ["q", "k", "v"]
    with pytest.raises(attncc.ArgumentError, match="keyword arguments only"):
        fn(*qkv().values())
    with pytest.raises(attncc.ArgumentError, match="missing"):
        fn(q=qkv()["q"])
    with pytest.raises(attncc.BackendError, match="only the triton backend has configs to tune"):
        attncc.compile(fn, "reference").tune(**qkv())
    o, lse = fn(**qkv(), return_lse=True)
    assert lse.shape == (1, 2, 24)
    assert "%3 s = contract" in " ".join(fn.show("ir").split())
    assert inspect.getsource(fn).lstrip().startswith("@attncc.attention")


# ----------------------------------------------------------------------------- the command line

def test_show_module_function(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_specs.py").write_text(textwrap.dedent('''
        import attncc

        @attncc.attention
        def sig(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", *, bias: float = "-log(M)") -> "B,H,N,E":
            s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
            p = sigmoid(s + bias)
            o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]
            return o

        not_a_spec = 3
        '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["show", "--stage", "ast", "my_specs:sig"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attention sig(q[B, H, N, D], k[B, H, M, D], v[B, H, M, E]) -> o[B, H, N, E] {\n"
                          "  param bias: float = -log(M)\n")
    sigmoid = syntax.parse((ROOT / "examples" / "sigmoid.attn").read_text())
    assert syntax.parse(out).body == sigmoid.body
    assert main(["show", "--stage", "ir", "my_specs.py:sig"]) == 0
    out = capsys.readouterr().out
    assert "my_specs.py" in out and "# line 7: p = sigmoid(s + bias)" in out
    assert main(["check", "my_specs:sig", "--backend", "reference", "--shape", "N=8,M=8"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["show", "my_specs:not_a_spec"]) == 2
    assert "not a function decorated with @attncc.attention" in capsys.readouterr().err
    assert main(["show", "my_specs:missing"]) == 2
    assert "has no attribute 'missing'" in capsys.readouterr().err
    assert main(["show", "no_such_module:f"]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err


@needs_triton
def test_show_triton_of_a_module_function(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = Path(__file__)
    assert main(["show", "--stage", "triton", f"{path}:causal"]) == 0
    assert "@triton.jit" in capsys.readouterr().out
    assert causal.show("plan").startswith("plan causal  # ")
    assert main(["compile", f"{path}:causal", "-o", str(tmp_path)]) == 2
    assert "`attncc show --stage ast" in capsys.readouterr().err
