"""Tuple params, enum params and derived header dims (docs/language.md): what they compute on
both backends, how calls pass them, and the located errors for their misuse.

Run with TRITON_INTERPRET=1 for the generated-kernel cases (skipped otherwise without a GPU).
"""
import importlib.util
import inspect
import os

import pytest
import torch

import attncc
from attncc import ArgumentError, ShapeError, SpecError
from attncc.printer import format_attn
from attncc.syntax import parse

needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="generated kernels on CPU tensors need TRITON_INTERPRET=1")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]

HEAD = "attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {\n"
SCORES = "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n"
TAIL = "  p = softmax(s, j)\n  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n}\n"

# a band |j - i| <= reach[0] plus a bias reach[1] * (j > i): a tuple param read entry by entry
TUPLE = HEAD + "  param reach: (int, float) = (2, 0.5)\n" + SCORES + \
    "  s += reach[1] * (j > i)\n  mask j - i <= reach[0] and i - j <= reach[0]\n" + TAIL
# causal, a sliding window or neither, by name
ENUM = HEAD + "  param mode: {full, causal, window} = causal\n" + SCORES + \
    "  mask mode == full or (j <= i and (mode != window or i - j < 4))\n" + TAIL
# a learned table per head and per block of keys, `ceil(M / blk)` blocks; optional
DERIVED = ("attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], tab[H, ceil(M / blk)] = 0.0, "
           "band[H, 2 * w[0] + 1]: float = 0.0) -> o[B,H,N,E] {\n"
           "  param blk: int = 4\n  param w: int[2] = 3\n" + SCORES +
           "  s += tab[h, j // blk] + band[h, clamp(j - i, -w[0], w[0]) + w[0]]\n" + TAIL)


def qkv(n=11, m=13, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(1, 2, n, 8, generator=g, dtype=dtype), "k": torch.randn(1, 2, m, 8, generator=g, dtype=dtype),
            "v": torch.randn(1, 2, m, 5, generator=g, dtype=dtype)}


def attend(s, allowed, v):
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def scores(a):
    return a["q"] @ a["k"].transpose(-1, -2)


def grid(n, m):
    return torch.arange(n)[:, None], torch.arange(m)[None, :]


# ----------------------------------------------------------------------------- tuple params
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reach", [None, (1, -2.0), [3, 1.0]])
def test_tuple_param_entries(backend, reach):
    a = qkv(dtype=torch.float32)
    kernel = attncc.compile(TUPLE, backend=backend)
    got = kernel(**a, reach=reach)
    w, bias = reach or (2, 0.5)
    i, j = grid(11, 13)
    want = attend(scores(a).double() + bias * (j > i), (j - i).abs() <= w, a["v"].double())
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    assert kernel.last_run["backend"] == backend


def test_one_value_is_broadcast_to_every_entry():
    a = qkv()
    spec = TUPLE.replace("(int, float) = (2, 0.5)", "float[2] = 1").replace("reach[0]", "2")
    kernel = attncc.compile(spec, backend="reference")
    torch.testing.assert_close(kernel(**a, reach=1.5), kernel(**a, reach=(1.5, 1.5)))
    assert kernel.params == {"reach": (1.0, 1.0)}


def test_tuple_param_in_signature_and_params():
    kernel = attncc.compile(TUPLE, backend="reference")
    assert kernel.params == {"reach": (2, 0.5)}
    param = kernel.signature.parameters["reach"]
    assert param.default == (2, 0.5) and param.annotation is tuple
    assert list(kernel.program.params) == ["reach_0", "reach_1"]  # the scalars every backend sees
    need = attncc.compile(TUPLE.replace(" = (2, 0.5)", ""), backend="reference")
    assert need.params == {"reach": inspect.Parameter.empty}


@pytest.mark.parametrize("value,error,message", [
    ((1, 2.0, 3), ArgumentError, r"param 'reach' takes 2 entries \(int, float\) \(or one value for every "
                                 r"entry\), got 3: \(1, 2.0, 3\)"),
    ((1.5, 2.0), ArgumentError, r"param 'reach\[0\]' must be an int, got 1.5"),
    ("2", ArgumentError, r"param 'reach' must be a tuple \(int, float\) or one value for every entry, got str"),
    ((2 ** 31, 1.0), ShapeError, r"param 'reach\[0\]' = 2147483648 is out of range"),
])
def test_bad_tuple_values(value, error, message):
    with pytest.raises(error, match=message):
        attncc.compile(TUPLE, backend="reference")(**qkv(), reach=value)


def test_tuple_param_calls_by_its_own_name_only():
    kernel = attncc.compile(TUPLE.replace(" = (2, 0.5)", ""), backend="reference")
    with pytest.raises(ArgumentError, match=r"missing the argument 'reach' \(\(int, float\) param\)"):
        kernel(**qkv())
    with pytest.raises(ArgumentError, match=r"unknown argument 'reach_0' \(did you mean 'reach'\?\)"):
        kernel(**qkv(), reach_0=1, reach_1=1.0)


def test_requirement_messages_name_entries():
    spec = TUPLE.replace(SCORES, "  require reach[0] >= 0\n" + SCORES)
    with pytest.raises(ShapeError, match=r"`require reach\[0\] >= 0` .*does not hold: reach\[0\] = -1"):
        attncc.compile(spec, backend="reference")(**qkv(), reach=(-1, 0.0))


# ----------------------------------------------------------------------------- enum params
@pytest.mark.parametrize("backend", BACKENDS)
def test_enum_param_choices(backend):
    a = qkv(n=13, dtype=torch.float32)
    kernel = attncc.compile(ENUM, backend=backend)
    i, j = grid(13, 13)
    s, v = scores(a).double(), a["v"].double()
    for mode, allowed in [("full", torch.ones(13, 13, dtype=torch.bool)), ("causal", j <= i),
                          ("window", (j <= i) & (i - j < 4)), (None, j <= i)]:
        got = kernel(**a, mode=mode)
        torch.testing.assert_close(got.double(), attend(s, allowed, v), rtol=2e-5, atol=2e-5, msg=mode)


def test_enum_param_in_signature_and_bad_values():
    kernel = attncc.compile(ENUM, backend="reference")
    assert kernel.params == {"mode": "causal"}
    assert kernel.signature.parameters["mode"].annotation is str
    with pytest.raises(ArgumentError, match=r"param 'mode' must be one of 'full', 'causal', 'window', "
                                            r"got 'Causal'"):
        kernel(**qkv(13, 13), mode="Causal")
    with pytest.raises(ArgumentError, match=r"param 'mode' must be one of .*, got int"):
        kernel(**qkv(13, 13), mode=1)


@pytest.mark.parametrize("spec,kwargs", [(ENUM, dict(mode="window")), (TUPLE, dict(reach=(1, -2.0)))])
def test_traced_calls_take_tuple_and_enum_params(spec, kwargs):
    """Under torch.compile(fullgraph=True) a call reaches the kernel's operator with the scalars."""
    kernel = attncc.compile(spec, backend="reference")
    a = qkv(13, 13, dtype=torch.float32)
    traced = torch.compile(lambda q, k, v: kernel(q=q, k=k, v=v, **kwargs), fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(a["q"], a["k"], a["v"]), kernel(**a, **kwargs))


# ----------------------------------------------------------------------------- derived dims
@pytest.mark.parametrize("backend", BACKENDS)
def test_derived_dims(backend):
    a = qkv(dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    tab, band = torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)  # ceil(13 / 4), 2 * 2 + 1
    kernel = attncc.compile(DERIVED, backend=backend)
    i, j = grid(11, 13)
    bias = tab[:, j // 4].double() + band[:, (j - i).clamp(-2, 2) + 2].double()
    got = kernel(**a, tab=tab, band=band, w=(2, 9))
    want = attend(scores(a).double() + bias, torch.ones(11, 13, dtype=torch.bool), a["v"].double())
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    # absent optional inputs take their shapes from the expressions
    plain = attend(scores(a).double(), torch.ones(11, 13, dtype=torch.bool), a["v"].double())
    torch.testing.assert_close(kernel(**a, blk=5).double(), plain, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_ranges_over_a_derived_dim(backend):
    """`tot[h] = tab[h, c]` sums over `c`, whose range is `ceil(M / blk)`."""
    spec = DERIVED.replace("  s += tab[h, j // blk]", "  tot[h] = tab[h, c]\n  s += tot[h] * tab[h, j // blk]")
    a = qkv(dtype=torch.float32)
    tab = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))  # ceil(13 / 5)
    got = attncc.compile(spec, backend=backend)(**a, tab=tab, blk=5)
    j = torch.arange(13)
    bias = (tab.sum(1)[:, None] * tab[:, j // 5]).double()[:, None, :]
    want = attend(scores(a).double() + bias, torch.ones(11, 13, dtype=torch.bool), a["v"].double())
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tab=torch.zeros(2, 3)), r"argument 'tab' must have size 4 in dim 1 \(`ceil\(M / blk\)` with M = 13, "
                                  r"blk = 4\), got shape \(2, 3\)"),
    (dict(band=torch.zeros(2, 5), w=3), r"argument 'band' must have size 7 in dim 1 \(`2 \* w\[0\] \+ 1` with "
                                        r"w\[0\] = 3\), got shape \(2, 5\)"),
    (dict(blk=0), r"dim 1 of input 'tab' \(`ceil\(M / blk\)`\) has no integer value for this call \(zoo\): "
                  r"M = 13, blk = 0"),
    (dict(w=-4), r"dim 1 of input 'band' \(`2 \* w\[0\] \+ 1`\) is -7 for this call: w\[0\] = -4"),
])
def test_derived_dim_mismatch(kwargs, message):
    with pytest.raises(ShapeError, match=message):
        attncc.compile(DERIVED, backend="reference")(**qkv(dtype=torch.float32), **kwargs)


def test_text_forms_round_trip():
    """`show --stage ast`'s text of the new forms parses back to the same tree."""
    for text in (TUPLE, ENUM, DERIVED):
        tree = parse(text)
        assert parse(format_attn(tree)) == tree


# ----------------------------------------------------------------------------- located errors
def spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        attncc.load(text)
    return info.value


def pos(text: str, needle: str, nth: int = 1) -> tuple[int, int]:
    start = -1
    for _ in range(nth):
        start = text.index(needle, start + 1)
    return text.count("\n", 0, start) + 1, start - (text.rfind("\n", 0, start) + 1) + 1


def assert_located(text, message, needle, nth=1, expected=None):
    err = spec_error(text)
    assert err.message == message
    assert (err.line, err.column) == pos(text, needle, nth)
    header, shown, caret = str(err).splitlines()[:3]
    assert shown == "  " + text.splitlines()[err.line - 1] and caret.index("^") == 1 + err.column
    if expected is not None:
        assert err.expected == expected


def with_body(params: str, extra: str = "") -> str:
    return HEAD + params + SCORES + extra + TAIL


@pytest.mark.parametrize("text,message,needle,nth,expected", [
    (with_body("  param r: int[2] = 1\n", "  s += r\n"), "tuple param 'r' is read one entry at a time", "r\n", 1,
     "`r[0]` ... `r[1]`"),
    (with_body("  param r: int[2] = 1\n", "  s += r[2]\n"), "tuple param 'r' has 2 entries", "2]", 2,
     "a constant position from 0 to 1"),
    (with_body("  param r: int[2] = 1\n", "  s += r[i]\n"), "tuple param 'r' has 2 entries", "i]\n", 1, None),
    (with_body("  param r: int[2] = 1\n", "  s += r[0, 1]\n"), "tuple param 'r' is read one entry at a time",
     "r[0, 1]", 1, None),
    (with_body("  param r: int[2] = (1, 2, 3)\n"), "tuple param 'r' has 2 entries but its default lists 3",
     "1, 2, 3", 1, "2 values, or one value for every entry"),
    (with_body("  param r: (int, bool) = (1, 2)\n"), "param 'r[1]: bool' has a default of type int", "2)", 1,
     "a bool default"),
    (with_body("  param r: int[2] = 1.5\n"), "param 'r[0]: int' has a default of type float", "1.5", 1, None),
    (with_body("  param r_1: int = 0\n  param r: int[2] = 1\n"),
     "entry 1 of tuple param 'r' is held as 'r_1', which is already defined", "r:", 1, None),
    (with_body("  param r: int[2] = 1\n  let r_0 = 3\n"), "'r_0' is already defined", "r_0", 1, None),
    (with_body("  param r: int[2] = 1\n", "  s += r_1\n"), "'r_1' is entry 1 of tuple param 'r'", "r_1", 1,
     "`r[1]`"),
    (with_body("  param r: int[0]\n"), "a tuple param has 0 entries", "0]", 1, "between 1 and 16 entries"),
    (with_body("  param m: {a, b, a} = a\n"), "enum param 'm' lists 'a' twice", "a}", 1, "distinct names"),
    (with_body("  param m: {a, b} = c\n"), "the default of enum param 'm' is 'c', not one of its choices",
     "c\n", 1, "one of: a, b"),
    (with_body("  param m: {a, b} = a\n", "  mask m < b or j <= i\n"), "enum param 'm' is compared with '<'",
     "m < b", 1, "`==` or `!=` (its choices have no order)"),
    (with_body("  param m: {a, b} = a\n", "  mask m == c or j <= i\n"),
     "enum param 'm' is compared with something other than one of its choices", "c or", 1, "one of: a, b"),
    (with_body("  param m: {a, b} = a\n", "  mask m == 1 or j <= i\n"),
     "enum param 'm' is compared with something other than one of its choices", "1 or", 1, None),
    (with_body("  param m: {a, b} = a\n", "  s += m\n"), "enum param 'm' is only compared with one of its choices",
     "m\n", 1, "`m == a` or `m != a`"),
    (HEAD.replace("v[B,H,M,E]", "v[B,H,M,E], t[H, N / 2] = 0.0") + SCORES + "  s += t[h, 0]\n" + TAIL,
     "dim 1 of input 't' is a float expression", "N / 2", 1, None),
    (HEAD.replace("v[B,H,M,E]", "v[B,H,M,E], t[H, Q + 1] = 0.0") + SCORES + "  s += t[h, 0]\n" + TAIL,
     "unknown name 'Q'", "Q + 1", 1, None),
    (HEAD.replace("v[B,H,M,E]", "v[B,H,M,E], t[H, x + 1] = 0.0") + SCORES + "  s += t[h, 0]\n" + TAIL,
     "dim 1 of input 't' must be a scalar, but it depends on index 'x'", "x + 1", 1, None),
])
def test_located_errors(text, message, needle, nth, expected):
    assert_located(text, message, needle, nth, expected)


# ----------------------------------------------------------------------------- the Python spelling
@attncc.attention(backend="reference")
def py_derived(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", tab: "H, ceil(M / blk)" = 0.0,
               band: "H, 2 * w[0] + 1: float" = 0.0, *, blk: int = 4, w: (int, int) = 3) -> "B,H,N,E":
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]  # noqa: F821
    s += tab[h, j // blk] + band[h, clamp(j - i, -w[0], w[0]) + w[0]]  # noqa: F821
    p = softmax(s, j)  # noqa: F821
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]  # noqa: F821
    return o  # noqa: F821


@attncc.attention(backend="reference")
def py_enum(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", *, mode: {"full", "causal", "window"} = "causal") \
        -> "B,H,N,E":
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]  # noqa: F821
    mask(mode == full or (j <= i and (mode != window or i - j < 4)))  # noqa: F821
    p = softmax(s, j)  # noqa: F821
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]  # noqa: F821
    return o  # noqa: F821


@pytest.mark.parametrize("fn,text", [(py_derived, DERIVED.replace("int[2]", "(int, int)")), (py_enum, ENUM)])
def test_python_spelling_is_the_same_tree(fn, text):
    fn.spec.name = "t"
    want = parse(text)
    assert fn.spec.inputs == want.inputs and fn.spec.body == want.body
    a = qkv(13, 13)
    torch.testing.assert_close(fn(**a), attncc.compile(text, backend="reference")(**a))


@pytest.mark.parametrize("header,message,needle", [
    ('*, mode: {"a", 1} = "a"', "a choice of enum param 'mode' must be a name in quotes", "1}"),
    ('*, mode: {"a", "b"} = "c"', "the default of enum param 'mode' is 'c', not one of its choices", 'c"'),
    ("*, w: (int, str) = 1", "an entry type of tuple param 'w' must be int, float or bool", "str"),
    ('t: "H, 2 * w[0] +" = 0.0, *, w: (int,) = 1', "the dim '2 * w[0] +' is not a name, a size or an expression (input 't'", "2 * w"),
])
def test_python_spelling_errors(tmp_path, header, message, needle):
    text = ("import attncc\n\n@attncc.attention\n"
            f'def f(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", {header}) -> "B,H,N,E":\n'
            "    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d]\n    p = softmax(s, j)\n"
            "    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]\n    return o\n")
    path = tmp_path / "spec_with_error.py"
    path.write_text(text)
    module_spec = importlib.util.spec_from_file_location("spec_with_error", path)
    with pytest.raises(SpecError) as info:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        module.f.program
    assert info.value.message.startswith(message)
    assert (info.value.line, info.value.column) == pos(text, needle)
