"""Hostile sizes: deep nesting, long chains, shared subexpressions, huge numbers and masks
that read what they mask. Each must either run on every stage or stop with a located
`SpecError` naming the limit, never a RecursionError, a hang or a wrong number.

Cases that could hang run in a child process under a timeout (`_run_child`), so a
regression fails instead of stalling the suite. Shapes are tiny.
"""
import json
import subprocess
import sys
import textwrap

import pytest

import attncc
from attncc import SpecError
from attncc.passes.infer import MAX_IR_DEPTH
from attncc.syntax import MAX_DECLS, MAX_DEPTH, MAX_STATEMENTS

HEAD = "attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {\n"
SCORES = "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n"
TAIL = "  p = softmax(s, j)\n  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n}\n"


def body(*lines: str) -> str:
    return HEAD + SCORES + "".join(f"  {ln}\n" for ln in lines) + TAIL


def nested(kind: str, n: int) -> str:
    """A spec whose one expression is `n` levels deep (the leaf counts as a level)."""
    if kind == "neg":
        return body("s = " + "-" * (n - 1) + "s")
    if kind == "call":
        return body("s = " + "exp(" * (n - 1) + "s" + ")" * (n - 1))
    if kind == "sum":
        return body("s = " + " + ".join(["s"] * n))
    if kind == "product":
        return body("s = " + " * ".join(["s"] * n))
    if kind == "power":  # right-associative
        return body("s = " + " ** ".join(["s"] * n))
    if kind == "ifelse":  # the innermost condition's comparison adds two levels
        return body("s = " + "s if j <= i else " * (n - 2) + "s")
    if kind == "not":  # mask: the comparison and its two operands take two levels
        return body("mask " + "not " * (n - 2) + "j <= i")
    if kind == "minmax":  # nested min/max in a mask: sympy splits each into cases
        inner = "j"
        for k in range(n - 3):
            inner = f"{'max' if k % 2 else 'min'}({inner}, i + {k})"
        return body(f"mask {inner} <= i + 1")
    if kind == "index":  # nested integer arithmetic inside an access
        return body("s = s + q[b, h, " + "(" * (n - 3) + "i" + " + 0)" * (n - 3) + ", 0]")
    raise ValueError(kind)


KINDS = ["neg", "call", "sum", "product", "power", "ifelse", "not", "minmax", "index"]

# The child: for each spec, every stage a user can reach, reported as JSON. The recursion
# limit is lowered to leave headroom for callers whose stack is already deep.
_CHILD = textwrap.dedent("""
    import json, sys, torch
    import attncc
    from attncc import api
    from attncc.printer import format_ast, format_ir
    from attncc.syntax import parse
    from attncc.passes.row_stream import NotRowStreamable
    from attncc.codegen.tile_expr import Unsupported
    sys.setrecursionlimit(sys.getrecursionlimit() - 200)
    specs, run_triton = json.loads(sys.stdin.read())
    out = []
    for text in specs:
        stage = "parse"
        try:
            format_ast(parse(text))
            stage = "load"
            program = api.load(text)
            stage = "ir"
            format_ir(program)
            stage = "reference"
            kernel = attncc.compile(text, backend="reference")
            torch.manual_seed(0)
            args = dict(q=torch.randn(1, 1, 5, 4), k=torch.randn(1, 1, 6, 4), v=torch.randn(1, 1, 6, 4))
            ref = kernel(**args)
            stage = "triton"
            try:
                api.generate(program)
            except (NotRowStreamable, Unsupported):
                out.append(["ok", "not generated"])
                continue
            if run_triton:
                got = attncc.compile(text, backend="triton")(**args)
                same = bool(torch.allclose(got, ref, atol=1e-4, equal_nan=True))
                out.append(["ok" if same else "mismatch", stage])
                continue
            out.append(["ok", stage])
        except attncc.SpecError as e:
            out.append(["SpecError", e.message, e.line, e.column])
        except BaseException as e:
            out.append(["crash", stage, type(e).__name__, str(e)[:300]])
    print(json.dumps(out))
""")


def _run_child(specs: list[str], timeout: float = 240, run_triton: bool = False) -> list:
    """Run every stage on each spec in a child process; a hang is a test failure."""
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([specs, run_triton]),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: {len(specs)} specs did not finish within {timeout} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _located(text: str, needle_line: int | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        attncc.load(text)
    err = info.value
    assert err.line is not None and err.column is not None, str(err)
    if needle_line is not None:
        assert err.line == needle_line, str(err)
    return err


# ----------------------------------------------------------------------------- nesting
@pytest.mark.parametrize("kind", KINDS)
def test_nesting_past_the_limit_is_a_located_error(kind):
    for n in (MAX_DEPTH + 1, 1000):
        err = _located(nested(kind, n))
        assert f"more than {MAX_DEPTH}" in err.message and "nested too deeply" in err.message
        assert err.line == 3


def test_nesting_at_the_limit_runs_on_every_stage():
    """The deepest accepted expressions: parse, printers, reference (compiled and called)
    and Triton generation, with 200 frames of headroom below Python's recursion limit."""
    results = _run_child([nested(kind, MAX_DEPTH) for kind in KINDS])
    for kind, result in zip(KINDS, results):
        assert result[0] == "ok", (kind, result)


def test_parentheses_do_not_nest():
    """Parentheses make no node: 1000 of them are fine everywhere."""
    [result] = _run_child([body("s = " + "(" * 1000 + "s" + ")" * 1000)])
    assert result[0] == "ok", result


def test_statement_chains_are_bounded_by_graph_depth():
    """`s += 1.0` repeated: each statement is shallow, the value is not. Past the limit the
    error points at the statement that crosses it; at the limit every stage runs."""
    chain = MAX_IR_DEPTH - 6  # the scores, the softmax and the output add a few levels
    ok = [body(*["s += 1.0"] * chain), body(*["s = where(j <= i, s, s * 0.5)"] * (chain // 2))]
    assert [r[0] for r in _run_child(ok)] == ["ok", "ok"], _run_child(ok)
    err = _located(body(*["s += 1.0"] * 500))
    assert f"more than {MAX_IR_DEPTH}" in err.message
    assert 4 <= err.line < 504


def test_counts_are_limited():
    decls = ", ".join(f"x{k}[N]" for k in range(MAX_DECLS + 5))
    err = _located(f"attention t({decls}) -> o[N] {{\n  o[i] = x0[i]\n}}\n", 1)
    assert f"limit is {MAX_DECLS}" in err.message and err.column == 1 + (
        f"attention t({decls}) -> o[N]".index(f"x{MAX_DECLS}["))
    err = _located(body(*["let c = 1"] * (MAX_STATEMENTS + 1)))
    assert f"limit is {MAX_STATEMENTS}" in err.message and err.line == MAX_STATEMENTS + 2


def test_many_inputs_within_the_limit_run():
    n = MAX_DECLS - 4  # q, k, v and o
    decls = "".join(f", x{k}[B,H,N,D]" for k in range(n))
    text = (f"attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]{decls}) -> o[B,H,N,E] {{\n"
            + "".join(f"  q{k}[b,h,i,d] = x{k}[b,h,i,d] * 0.0\n" for k in range(n))
            + SCORES + TAIL)
    program = attncc.load(text)
    assert len(program.inputs) == MAX_DECLS - 1


# ----------------------------------------------------------------------------- exponential work
def test_shared_subexpressions_take_linear_time():
    """Each statement uses the previous value several times: a tree walk would take 2**60
    or 3**60 steps, a walk by node identity takes 60."""
    lets = "".join(f"let a{k + 1} = a{k} + a{k} - a{k}\n  " for k in range(60))
    specs = [
        body(*["s = (s + s) * 0.5"] * 60),
        body("mk = j <= i", *["mk = mk and mk"] * 60, "mask mk"),
        body("t = j - i", *["t = (t + t) // 2"] * 60, "mask t <= 0"),
        HEAD + "  let a0 = D\n  " + lets + "param w: int = a60\n" + SCORES
        + "  s = s * a60\n  mask j <= i + w - D\n" + TAIL,
        HEAD + SCORES + "  w = softmax(s, j)\n" + "".join(["  w = (w + w) * 0.5\n"] * 60)  # weight terms
        + "  o[b,h,i,e] = w[b,h,i,j] * v[b,h,j,e]\n}\n",
        HEAD + SCORES + "  w = softmax(s, i)\n" + "".join(["  w = (w + w) * 0.5\n"] * 60)  # off-axis rewrite
        + "  o[b,h,i,e] = w[b,h,i,j] * v[b,h,j,e]\n}\n",
    ]
    results = _run_child(specs, timeout=120, run_triton=True)
    assert [r[0] for r in results] == ["ok"] * len(specs), results


def test_masks_with_many_alternatives_fall_back_to_opaque_and_stay_right():
    """An `and` of 20 `or`s has 2**20 conjuncts; nested abs terms split into as many cases.
    Both are analysed as opaque masks (per-element masking, a runtime block map) and the
    generated kernel agrees with the reference."""
    clauses = " and ".join(f"(j <= i + {k} or j >= i + {k + 3})" for k in range(20))
    kinks = " + ".join(f"abs(j - i - {k})" for k in range(30))
    specs = [body(f"mask {clauses}"), body(f"mask {kinks} <= 500")]
    results = _run_child(specs, timeout=300, run_triton=True)
    assert [r[0] for r in results] == ["ok", "ok"], results


def test_mask_analysis_caps_the_dnf_before_expanding():
    import sympy as sp
    from attncc.passes.mask_analysis import MAX_CONJUNCTS, MaskTooComplex, analyse_mask

    i, j = sp.symbols("i j", integer=True)
    pred = sp.And(*(sp.Or(j <= i + k, j >= i + k + 3) for k in range(40)))
    with pytest.raises(MaskTooComplex, match=str(MAX_CONJUNCTS)):
        analyse_mask(pred, i, j)


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("literal", ["1" + "0" * 5000, "123456789012345678901234567890",
                                     "9223372036854775808"])
def test_integer_literals_past_int64_are_located_errors(literal):
    text = body(f"s = s * {literal}")
    err = _located(text, 3)
    assert err.column == text.splitlines()[2].index(literal) + 1
    assert "out of range" in err.message
    with pytest.raises(SpecError):  # the AST printer's path too (it never reaches inference)
        attncc.syntax.parse(text)


def test_dims_past_int64_are_located_errors():
    err = _located("attention t(x[99999999999999999999]) -> o[N] {\n  o[i] = x[i]\n}\n", 1)
    assert err.column == 15


def test_integer_constant_expressions_out_of_range():
    """Refused at load, before sympy (or the host) computes 3 ** 99999999 digit by digit."""
    cases = [("mask j <= i + 2 ** 99999999", "out of range"),
             ("mask j // (3 ** 99999999) <= i", "out of range"),
             ("mask j <= i + 3 ** 40", "out of range"),
             ("mask j <= i + 4611686018427387904 * 2", "out of range"),
             ("mask j <= i + N ** 99999999", "out of range"),
             ("mask j // 0 <= i", "by zero"),
             ("mask j % (N - N) <= i", "by zero")]
    results = _run_child([body(expr) for expr, _ in cases], timeout=120)
    for (expr, what), result in zip(cases, results):
        assert result[0] == "SpecError" and what in result[1] and result[2] == 3, (expr, result)
    attncc.load(body("s = s * 3 ** 39 + 2 ** 62"))  # the largest in range load


def test_int64_constants_and_infinities_agree_on_both_backends():
    """In range but past int32: the kernel takes them as int64 arguments (and masks with
    them are opaque), so both backends give the same numbers. `1e999` is a float infinity."""
    specs = [body("s = s * (j < 9223372036854775807)"), body("mask j <= i + 9223372036854775807"),
             body("mask j - 9223372036854775807 <= i"), body("s = max(s, -1e999)"),
             body("mask s > -1e999 * 0.5")]
    results = _run_child(specs, timeout=300, run_triton=True)
    assert [r[0] for r in results] == ["ok"] * len(specs), results


# ----------------------------------------------------------------------------- masks reading what they mask
@pytest.mark.parametrize("lines, culprit", [
    (["keep = topk_mask(s, 2, j)", "mask keep"], "topk_mask"),
    (["keep = topk_mask(s * 2.0, 2, j)", "mask keep and j <= i"], "topk_mask"),
    (["w = softmax(s, j)", "mask w > 0.1"], "softmax"),
    (["mx = amax(s, j)", "mask s >= mx - 1.0"], "amax"),
])
def test_a_mask_that_reads_what_it_masks_is_a_located_error(lines, culprit):
    text = body(*lines)
    err = _located(text, 4)
    assert "depends on what it masks" in err.message and culprit in err.message
    assert err.column == 3
