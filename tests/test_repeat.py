"""`repeat` (bounded iteration, unrolled by the frontend into SSA statements): Sinkhorn's
alternating normalisations against a float64 oracle on both backends, a param count with a
bound, and the located errors of its misuses."""
import math
import os

import pytest
import torch

import attncc
from attncc.errors import ShapeError, SpecError

BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

SINKHORN = """attention sinkhorn(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  a = softmax(s, j)
  repeat 3 {
    a = a / sum(a, i)
    a = a / sum(a, j)
  }
  o[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
}"""

BOUNDED = """attention sinkhorn_n(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  param steps: int = 2
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  a = softmax(s, j)
  repeat steps <= 3 { a = a / sum(a, i)  a = a / sum(a, j) }
  o[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
}"""


def qkv(b=1, h=2, n=7, m=11, d=6, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, e, generator=g))


def sinkhorn(q, k, v, steps):
    a = torch.softmax(torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * q.shape[-1] ** -0.5, -1)
    for _ in range(steps):
        a = a / a.sum(2, keepdim=True)
        a = a / a.sum(3, keepdim=True)
    return a @ v.double()


def close(got, want):
    err = float((got.double() - want).abs().max())
    assert err <= 1e-4 * max(1.0, float(want.abs().max())), f"off by {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_three_passes(backend):
    q, k, v = qkv()
    kernel = attncc.compile(SINKHORN, backend=backend)
    close(kernel(q=q, k=k, v=v), sinkhorn(q, k, v, 3))
    assert kernel.last_run["backend"] == backend


def test_repeat_unrolls_into_statements():
    """Three passes of two statements: six normalisations, each reading the previous one."""
    from attncc import ir

    program = attncc.load(SINKHORN)
    divisions = [n for n in program.nodes() if isinstance(n, ir.Map) and n.op == "/"]
    assert len(divisions) == 6
    assert program.nodes() and attncc.load(SINKHORN.replace("repeat 3", "repeat 0")).outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_a_param_count_bounded_by_a_limit(backend, steps):
    q, k, v = qkv(n=9, m=5, seed=1)
    kernel = attncc.compile(BOUNDED, backend=backend)
    close(kernel(q=q, k=k, v=v, steps=steps), sinkhorn(q, k, v, steps))


def test_a_param_count_past_its_limit_is_a_call_error():
    q, k, v = qkv()
    with pytest.raises(ShapeError, match=r"requirement `steps <= 3 \(a repeat's bound\)` \(line 5\) does not "
                                         r"hold: steps = 4"):
        attncc.compile(BOUNDED, backend="reference")(q=q, k=k, v=v, steps=4)


def test_constant_count_from_a_let():
    spec = SINKHORN.replace("  s[b,h,i,j]", "  let K = 1\n  s[b,h,i,j]").replace("repeat 3", "repeat 2 * K + 1")
    q, k, v = qkv(seed=2)
    close(attncc.compile(spec, backend="reference")(q=q, k=k, v=v), sinkhorn(q, k, v, 3))


@pytest.mark.parametrize("body,message,where", [
    ("repeat N { a = a / sum(a, i) }", "the count of a repeat must be a constant integer", "5:10"),
    ("repeat 65 { a = a / sum(a, i) }", "a repeat of 65 passes", "5:10"),
    ("repeat 2 { let z = 1 }", "a `let` inside a repeat", "5:18"),
    ("repeat 2 { mask j <= i }", "a `mask` inside a repeat", "5:14"),
    ("repeat D <= 3 { a = a / sum(a, i) }", "a repeat bounded by `<=` needs an int param on the left", "5:10"),
    ("repeat n <= 3 { fresh = a / sum(a, i) }", "'fresh' is first assigned inside a repeat with a param count",
     "5:19"),
    ("repeat n <= 3 { a[b,h,j,i] = a[b,h,i,j] }", "'a' changes its indices inside a repeat with a param count",
     "5:3"),
])
def test_misuses_are_located(body, message, where):
    spec = f"""attention bad(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {{
  param n: int = 1
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  a = softmax(s, j)
  {body}
  o[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
}}"""
    with pytest.raises(SpecError) as err:
        attncc.load(spec)
    text = str(err.value)
    assert message in text, text
    assert text.startswith(f"<string>:{where}: error:"), text
    assert "^" in text


@pytest.mark.parametrize("word", ["repeat", "in"])
def test_repeat_and_in_are_keywords(word):
    with pytest.raises(SpecError, match=r"<string>:2:\d+: error: unexpected token"):
        attncc.load(f"attention t(x[N]) -> y[N] {{\n  {word}[i] = x[i]\n  y[i] = x[i]\n}}")


@attncc.attention(backend="reference")
def py_sinkhorn(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E") -> "B,H,N,E":  # noqa: F821
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5  # noqa: F821
    a = softmax(s, j)  # noqa: F821
    for _ in repeat(3):  # noqa: F821
        a = a / sum(a, i)  # noqa: F821
        a = a / sum(a, j)  # noqa: F821
    o[b, h, i, e] = a[b, h, i, j] * v[b, h, j, e]  # noqa: F821
    return o  # noqa: F821


@attncc.attention(backend="reference")
def py_sinkhorn_n(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", *, steps: int = 2) -> "B,H,N,E":  # noqa: F821
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5  # noqa: F821
    a = softmax(s, j)  # noqa: F821
    for _ in repeat(steps <= 3):  # noqa: F821
        a = a / sum(a, i)  # noqa: F821
        a = a / sum(a, j)  # noqa: F821
    o[b, h, i, e] = a[b, h, i, j] * v[b, h, j, e]  # noqa: F821
    return o  # noqa: F821


def test_the_python_spelling_is_the_same_tree():
    """`for _ in repeat(3):` in an `@attncc.attention` function is the .attn `repeat 3 { ... }`."""
    from attncc import syntax

    assert py_sinkhorn.spec == syntax.parse(SINKHORN.replace("attention sinkhorn(", "attention py_sinkhorn("))
    assert py_sinkhorn_n.spec == syntax.parse(BOUNDED.replace("attention sinkhorn_n(", "attention py_sinkhorn_n("))
    q, k, v = qkv(seed=3)
    close(py_sinkhorn_n(q=q, k=k, v=v, steps=1), sinkhorn(q, k, v, 1))
