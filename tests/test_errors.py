"""Error reporting: bad specs point at the right line and column with a clear message,
bad calls raise the expected exception type naming the argument.

Spec locations are checked against `pos(spec, needle)`, the 1-based (line, column) of a
piece of text in the spec, so each test states exactly which character the error must
point at. Nothing here measures time.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import attncc
from attncc import ArgumentError, BackendError, ShapeError, SpecError
from attncc.syntax import parse

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

HEAD = "attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {\n"
SCORES = "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n"
SOFTMAX = "  p = softmax(s, j)\n"
VALUES = "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n"
GOOD = HEAD + SCORES + SOFTMAX + VALUES + "}\n"


def pos(text: str, needle: str, nth: int = 1) -> tuple[int, int]:
    """The 1-based (line, column) of the nth occurrence of `needle` in `text`."""
    start = -1
    for _ in range(nth):
        start = text.index(needle, start + 1)
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return line, column


def spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        attncc.load(text)
    return info.value


def where(err: SpecError) -> tuple[int, int]:
    return err.line, err.column


def assert_caret(err: SpecError, text: str):
    """The rendered error shows `file:line:col: error: msg`, the source line, and a caret
    under the reported column."""
    line, column = where(err)
    header, shown, caret = str(err).splitlines()[:3]
    assert header == f"<string>:{line}:{column}: error: {err.message}"
    assert shown == "  " + text.splitlines()[line - 1]
    assert caret.index("^") == 2 + column - 1
    assert caret[:2 + column - 1].strip() == ""


def test_good_spec_loads():
    """The base spec the error cases are edits of is itself correct."""
    program = attncc.load(GOOD)
    assert [o.name for o in program.outputs] == ["o"]


# ----------------------------------------------------------------------------- syntax
def test_missing_paren():
    text = GOOD.replace("v[B,H,M,E])", "v[B,H,M,E]")
    err = spec_error(text)
    assert err.message == "unexpected token '->'"
    assert where(err) == pos(text, "->")
    assert "')'" in err.expected
    assert_caret(err, text)


def test_stray_character():
    text = HEAD + SCORES.replace("k[b,h,j,d]", "k[b,h,j,d] $") + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "unexpected character '$'"
    assert where(err) == pos(text, "$") == (2, 40)
    # after a complete statement: an operator, a new statement or the closing brace
    assert "'}'" in err.expected and "an operator" in err.expected and "another statement" in err.expected
    assert "']'" not in err.expected  # no bracket is open there
    assert_caret(err, text)


def test_unexpected_end_of_file_missing_brace():
    text = HEAD + SCORES + SOFTMAX + VALUES
    err = spec_error(text)
    assert err.message == "unexpected end of file"
    last = VALUES.rstrip("\n")
    assert where(err) == (4, len(last) + 1)
    assert "'}'" in err.expected
    assert_caret(err, text)


def test_unexpected_end_of_file_inside_expression():
    text = HEAD + "  s[b,h,i,j] = q[b,h,i,d] *"
    err = spec_error(text)
    assert err.message == "unexpected end of file"
    assert where(err) == (2, len("  s[b,h,i,j] = q[b,h,i,d] *") + 1)
    assert "a name" in err.expected and "a number" in err.expected


def test_empty_spec():
    err = spec_error("")
    assert err.message == "unexpected end of file"
    assert where(err) == (1, 1)
    assert err.expected == "'attention'"


def test_bad_token_on_line_3_has_caret_under_it():
    text = HEAD + SCORES + "  p = softmax(s, j))\n" + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "unexpected token ')'"
    assert where(err) == (3, 20) == pos(text, ")\n")
    rendered = str(err).splitlines()
    assert rendered[0].startswith("<string>:3:20: error: unexpected token ')'")
    assert rendered[1] == "    p = softmax(s, j))"
    assert rendered[2] == "  " + " " * 19 + "^"
    assert rendered[1][rendered[2].index("^")] == ")"


def test_unclosed_bracket_on_the_left():
    text = GOOD.replace("s[b,h,i,j] =", "s[b,h,i,j =")
    err = spec_error(text)
    assert err.message == "unexpected token '='"
    assert where(err) == pos(text, "= q")
    assert "']'" in err.expected
    assert_caret(err, text)


def test_bad_element_type():
    text = GOOD.replace("q[B,H,N,D]", "q[B,H,N,D]: double")
    err = spec_error(text)
    assert err.message == "unexpected name 'double'"
    assert where(err) == pos(text, "double")
    assert "float, int or bool" in err.expected


def test_keyword_as_tensor_name():
    text = GOOD.replace("k[B,H,M,D]", "mask[B,H,M,D]")
    err = spec_error(text)
    assert err.message == "unexpected token 'mask'"
    assert where(err) == pos(text, "mask")


def test_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.attn"
    path.write_text(HEAD + SCORES + "  p = softmax(s, j))\n" + VALUES + "}\n")
    with pytest.raises(SpecError) as info:
        attncc.compile(path)
    assert str(info.value).startswith(f"{path}:3:20: error: unexpected token ')'")


# ----------------------------------------------------------------------------- names
def test_unknown_tensor_lists_known_tensors():
    text = GOOD.replace("k[b,h,j,d]", "kk[b,h,j,d]")
    err = spec_error(text)
    assert err.message == "unknown tensor 'kk'"
    assert where(err) == pos(text, "kk[")
    assert err.expected == "one of: q, k, v"
    assert_caret(err, text)


def test_unknown_tensor_as_bare_softmax_operand():
    """A misspelt tensor without indices is reported as such, not as a bad softmax axis."""
    text = GOOD.replace("softmax(s, j)", "softmax(sx, j)")
    err = spec_error(text)
    assert err.message == "unknown tensor 'sx'"
    assert where(err) == pos(text, "sx")
    assert err.expected == "one of: q, k, v, s"


def test_unknown_dim_lists_dims():
    text = GOOD.replace("k[b,h,j,d]\n", "k[b,h,j,d] * Q\n")
    err = spec_error(text)
    assert err.message == "unknown name 'Q'"
    assert where(err) == pos(text, "Q")
    assert "B, H, N, D, M, E" in err.expected


def test_uppercase_index():
    text = GOOD.replace("k[b,h,j,d]", "k[b,h,J,d]")
    err = spec_error(text)
    assert err.message == "unknown name 'J'"
    assert where(err) == pos(text, "J")


def test_dim_used_as_left_index():
    text = GOOD.replace("s[b,h,i,j] =", "s[b,h,N,j] =")
    err = spec_error(text)
    assert "'N'" in err.message and "not an index" in err.message
    assert where(err) == pos(text, "N,j]")


def test_scalar_with_indices():
    text = HEAD + "  let R = 2\n" + SCORES.replace("k[b,h,j,d]", "k[b,h,j,d] * R[i]") + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "'R' is a scalar and takes no indices"
    assert where(err) == pos(text, "R[i]")


def test_duplicate_param():
    text = HEAD + "  param w: int = 1\n  param w: int = 2\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "'w' is already defined"
    assert where(err) == pos(text, "w", 2)


# ----------------------------------------------------------------------------- accesses and einsums
def test_wrong_number_of_indices_on_input():
    text = GOOD.replace("k[b,h,j,d]", "k[b,j,d]")
    err = spec_error(text)
    assert err.message == "'k' has 4 dims but is indexed with 3"
    assert where(err) == pos(text, "k[b,j,d]")
    assert err.expected == "4 indices"


def test_rank_mismatch_on_defined_tensor():
    text = GOOD.replace("p[b,h,i,j] *", "p[b,h,i] *")
    err = spec_error(text)
    assert err.message == "'p' has 4 dims but is indexed with 3"
    assert where(err) == pos(text, "p[b,h,i]")


def test_left_index_not_on_right():
    text = GOOD.replace("s[b,h,i,j] =", "s[b,h,i,j,x] =")
    err = spec_error(text)
    assert err.message == "index 'x' is on the left but not on the right"
    assert where(err) == pos(text, "x")
    assert_caret(err, text)


def test_index_summed_on_one_side_only():
    text = ("attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], bias[B,H,N,E]) -> o[B,H,N,E] {\n"
            + SCORES + SOFTMAX + "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e] + bias[b,h,i,e]\n}\n")
    err = spec_error(text)
    assert "index 'j' is summed but this term does not use it" in err.message
    assert where(err) == pos(text, "bias[b,h,i,e]")
    assert_caret(err, text)
    assert "^" * len("bias[b,h,i,e]") in str(err)


def test_duplicate_left_index():
    text = GOOD.replace("s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]", "s[b,h,i,i] = q[b,h,i,d] * k[b,h,i,d]")
    err = spec_error(text)
    assert err.message == "index 'i' appears twice on the left"
    assert where(err) == pos(text, "i]")


def test_assignment_to_input():
    text = HEAD + "  q[b,h,i,d] = q[b,h,i,d] * 2\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "cannot assign to input 'q'"
    assert where(err) == (2, 3)


def test_update_before_definition():
    text = HEAD + "  s += 1\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "'s' is updated with '+=' before it is defined"
    assert where(err) == (2, 3)
    assert "s[...] = ..." in err.expected


def test_update_adding_a_new_index():
    text = HEAD + SCORES + "  s += v[b,h,j,e]\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "index 'e' is not an index of 's' [b, h, i, j]"
    assert where(err) == pos(text, "v[b,h,j,e]")


def test_update_with_other_indices():
    text = HEAD + SCORES + "  s[b,h,j,i] += 1\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "'s' has indices [b, h, i, j]"
    assert where(err) == (3, 3)


def test_float_used_as_index():
    text = GOOD.replace("q[b,h,i,d]", "q[b,h,i / 2,d]")
    err = spec_error(text)
    assert err.message == "an index into 'q' must be an integer, not float"
    assert where(err) == pos(text, "i / 2")


def test_float_literal_as_index():
    text = GOOD.replace("q[b,h,i,d]", "q[b,h,1.5,d]")
    err = spec_error(text)
    assert err.message == "an index into 'q' must be an integer, not float"
    assert where(err) == pos(text, "1.5")


def test_arithmetic_on_boolean():
    text = GOOD.replace("k[b,h,j,d]\n", "k[b,h,j,d] + (j <= i)\n")
    err = spec_error(text)
    assert err.message == "'+' on a boolean"
    assert where(err) == pos(text, "q[b,h,i,d] *")
    assert "where(" in err.expected


def test_minus_on_boolean():
    text = GOOD.replace("k[b,h,j,d]\n", "k[b,h,j,d] * -(j <= i)\n")
    err = spec_error(text)
    assert err.message == "'-' on a boolean"
    assert where(err) == pos(text, "-(j <= i)")
    assert "not" in err.expected


# ----------------------------------------------------------------------------- let, param, require
def test_let_depending_on_an_index():
    text = HEAD + "  let R = i + 1\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "let 'R' must be a scalar, but it depends on index 'i'"
    assert where(err) == pos(text, "i + 1")


def test_int_param_with_float_default():
    text = HEAD + "  param w: int = 1.5\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "param 'w: int' has a default of type float"
    assert where(err) == pos(text, "1.5")
    assert err.expected == "an int default"


def test_bool_param_with_int_default():
    text = HEAD + "  param causal: bool = 1\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "param 'causal: bool' has a default of type int"
    assert where(err) == pos(text, "1\n")
    assert err.expected == "a bool default"


def test_float_param_with_int_default_is_fine():
    text = HEAD + "  param w: float = 1\n" + SCORES.replace("k[b,h,j,d]\n", "k[b,h,j,d] * w\n") + SOFTMAX \
        + VALUES + "}\n"
    assert attncc.load(text).params["w"].dtype == "float"


def test_require_not_boolean():
    text = HEAD + "  require N - M\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "require needs a condition"
    assert where(err) == pos(text, "N - M")
    assert "N == M" in err.expected


def test_require_on_an_index():
    text = HEAD + "  require i < N\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "a require must be a scalar, but it depends on index 'i'"
    assert where(err) == pos(text, "i < N")


# ----------------------------------------------------------------------------- masks
def test_mask_on_an_index_that_does_not_exist():
    text = HEAD + SCORES + "  mask x <= i\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "index 'x' never indexes a tensor, so its range is unknown"
    assert where(err) == pos(text, "x <= i")


def test_mask_that_applies_to_nothing():
    text = HEAD + SCORES + "  mask e <= i\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert "this mask over (e, i) applies to nothing" in err.message
    assert where(err) == pos(text, "mask")
    assert "mask j <= i" in err.expected


def test_mask_not_boolean():
    text = HEAD + SCORES + "  mask j - i\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "a mask needs a boolean predicate"
    assert where(err) == pos(text, "j - i")


def test_mask_without_index():
    text = HEAD + SCORES + "  mask N <= M\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "this mask depends on no index"
    assert where(err) == pos(text, "N <= M")


def test_and_on_non_boolean():
    text = HEAD + SCORES + "  mask j <= i and i\n" + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "'and' needs booleans on both sides"
    line, column = pos(text, "and i")
    assert where(err) == (line, column + len("and "))


# ----------------------------------------------------------------------------- functions
def test_softmax_along_missing_axis():
    text = GOOD.replace("softmax(s, j)", "softmax(s, d)")
    err = spec_error(text)
    assert err.message == "'softmax' along 'd', which is not an index of its operand"
    assert where(err) == pos(text, "d)")
    assert err.expected == "one of: b, h, i, j"


def test_softmax_axis_is_a_tensor():
    text = GOOD.replace("softmax(s, j)", "softmax(s, q)")
    err = spec_error(text)
    assert err.message == "the axis of 'softmax' must be an index name"
    assert where(err) == pos(text, "q)")


def test_unknown_function_lists_functions():
    text = GOOD.replace("softmax(s, j)", "softmaks(s, j)")
    err = spec_error(text)
    assert err.message == "unknown function 'softmaks'"
    assert where(err) == pos(text, "softmaks")
    for f in ("softmax", "softmax1", "exp", "logsumexp", "topk_mask", "where"):
        assert f in err.expected


def test_wrong_arity_softmax():
    text = GOOD.replace("softmax(s, j)", "softmax(s)")
    err = spec_error(text)
    assert err.message == "'softmax' takes 2 arguments, got 1"
    assert where(err) == pos(text, "softmax")


def test_wrong_arity_exp():
    text = GOOD.replace("q[b,h,i,d] *", "exp(q[b,h,i,d], 2) *")
    err = spec_error(text)
    assert err.message == "'exp' takes 1 argument, got 2"
    assert where(err) == pos(text, "exp(")


def test_reduction_without_axis():
    text = GOOD.replace("softmax(s, j)", "sum(s)")
    err = spec_error(text)
    assert err.message == "'sum' needs an operand and at least one axis"
    assert where(err) == pos(text, "sum(")


def test_by_outside_a_reduction():
    """`softmax(s, j by 4)` has two arguments; the problem is the `by`, not the count."""
    text = GOOD.replace("softmax(s, j)", "softmax(s, j by 4)")
    err = spec_error(text)
    assert err.message == "`by` only goes inside a reduction"
    assert where(err) == pos(text, "j by 4")


def test_blocked_reduction_without_nameable_axis():
    text = HEAD + "  a[b,h,t,u,d] = mean(q[b,h,i,d], i by 4)\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "cannot tell which index on the left numbers the blocks"
    assert where(err) == (2, 3)
    assert err.expected == "`i by ... as NAME` in the reduction"


def test_blocked_reduction_without_left_indices():
    text = HEAD + "  a = mean(q[b,h,i,d], i by 4)\n" + SCORES + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "a block axis without a name"
    assert where(err) == pos(text, "mean(")


def test_block_size_must_be_integer():
    text = HEAD + "  a[b,h,t,d] = mean(q[b,h,i,d], i by 2.5)\n" \
        + SCORES.replace("k[b,h,j,d]\n", "k[b,h,j,d] + a[b,h,i,d]\n") + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message == "a block size must be an integer"
    assert where(err) == pos(text, "2.5")


# ----------------------------------------------------------------------------- extents
RANGE_CONFLICT = SCORES.replace("k[b,h,j,d]\n", "k[b,h,j,d] + q[b,h,j,d]\n")


def test_index_range_conflict():
    text = HEAD + RANGE_CONFLICT + SOFTMAX + VALUES + "}\n"
    err = spec_error(text)
    assert err.message.startswith("index 'j' ranges over M (")
    assert "but over N here (dim 2 of input 'q')" in err.message
    assert where(err) == pos(text, "j,d]\n")
    assert "require M == N" in err.expected
    assert_caret(err, text)


def test_require_equal_dims_resolves_range_conflict():
    text = HEAD + "  require N == M\n" + RANGE_CONFLICT + SOFTMAX + VALUES + "}\n"
    program = attncc.load(text)
    assert str(program.extent["j"]) in ("N", "M")


# ----------------------------------------------------------------------------- outputs and inputs
def test_output_never_assigned():
    text = GOOD.replace("  o[b,h,i,e] =", "  out[b,h,i,e] =")
    err = spec_error(text)
    assert err.message == "output 'o' is never assigned"
    assert where(err) == pos(text, "o[B,H,N,E]")
    assert "o[...] = ..." in err.expected


def test_output_declared_with_wrong_rank():
    text = GOOD.replace("-> o[B,H,N,E]", "-> o[B,N,E]")
    err = spec_error(text)
    assert err.message == "output 'o' is declared with 3 dims but computed with 4 indices [b, h, i, e]"
    assert where(err) == pos(text, "o[B,N,E]")


def test_output_dim_mismatch():
    text = GOOD.replace("-> o[B,H,N,E]", "-> o[B,H,M,E]")
    err = spec_error(text)
    assert err.message == "output 'o' is declared with dim M where its index 'i' ranges over N"
    assert where(err) == pos(text, "o[B,H,M,E]")
    assert err.expected == "N in the output declaration"


def test_output_with_undeclared_dim():
    text = GOOD.replace("-> o[B,H,N,E]", "-> o[B,H,N,F]")
    err = spec_error(text)
    assert err.message == "output 'o' uses dim 'F', which no input declares"
    assert where(err) == pos(text, "o[B,H,N,F]")


def test_output_is_an_input():
    text = HEAD.replace("-> o[B,H,N,E]", "-> q[B,H,N,D]") + SCORES.replace("k[b,h,j,d]", "k[b,h,j,d] * v[b,h,j,d]") \
        + "}\n"
    err = spec_error(text)
    assert err.message == "output 'q' is an input, not a tensor computed by the body"
    assert where(err) == pos(text, "q[B,H,N,D] {")


def test_unused_input():
    text = GOOD.replace("v[B,H,M,E])", "v[B,H,M,E], w[H])")
    err = spec_error(text)
    assert err.message == "input 'w' is never used"
    assert where(err) == pos(text, "w[H]")
    assert_caret(err, text)


def test_input_declared_twice():
    text = GOOD.replace("k[B,H,M,D]", "q[B,H,M,D]")
    err = spec_error(text)
    assert err.message == "input 'q' is declared twice"
    assert where(err) == pos(text, "q", 2)


# ----------------------------------------------------------------------------- examples
def test_all_examples_parse_and_check():
    """Correctness only; how fast this is belongs to a benchmark."""
    files = sorted(EXAMPLES_DIR.glob("*.attn"))
    assert len(files) == 38
    for path in files:
        program = parse(path.read_text(), str(path))
        assert program.name == path.stem
        checked = attncc.load(path)
        assert checked.outputs, path.name


# ----------------------------------------------------------------------------- calls
def rand(*shape, dtype=torch.float32, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype, device=device)
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.fixture(scope="module")
def dense():
    return attncc.compile(EXAMPLES_DIR / "dense.attn", backend="reference")


@pytest.fixture
def qkv():
    return {"q": rand(2, 3, 5, 8), "k": rand(2, 3, 7, 8), "v": rand(2, 3, 7, 4)}


def example(name):
    return attncc.compile(EXAMPLES_DIR / f"{name}.attn", backend="reference")


def test_good_call_runs(dense, qkv):
    assert dense(**qkv).shape == (2, 3, 5, 4)


def test_missing_tensor_argument(dense, qkv):
    del qkv["v"]
    with pytest.raises(ArgumentError, match=r"dense\(\) is missing the argument 'v' \(float tensor \[B, H, M, E\]\)"):
        dense(**qkv)


def test_unknown_keyword(dense, qkv):
    with pytest.raises(ArgumentError, match=r"unknown argument 'scale'; it takes: q, k, v"):
        dense(**qkv, scale=0.5)


def test_dim_is_not_an_argument(dense, qkv):
    with pytest.raises(ArgumentError, match="unknown argument 'D'"):
        dense(**qkv, D=8)


def test_positional_arguments(dense, qkv):
    with pytest.raises(ArgumentError, match="keyword arguments only"):
        dense(qkv["q"], qkv["k"], qkv["v"])


@pytest.mark.parametrize("value,kind", [(np.zeros((2, 3, 7, 4)), "ndarray"), ([1.0, 2.0], "list"), (None, "NoneType")])
def test_non_tensor_argument(dense, qkv, value, kind):
    qkv["v"] = value
    with pytest.raises(ArgumentError, match=rf"argument 'v' must be a torch.Tensor .*got {kind}"):
        dense(**qkv)


def test_int_tensor_for_float_input(dense, qkv):
    qkv["k"] = qkv["k"].long()
    with pytest.raises(ArgumentError, match=r"argument 'k' must be a float tensor, got torch.int64"):
        dense(**qkv)


def test_float_tensor_for_int_input(qkv):
    doc = example("document")
    q = rand(1, 2, 6, 8)
    with pytest.raises(ArgumentError, match=r"argument 'doc' must be an int tensor, got torch.float32"):
        doc(q=q, k=q, v=q, doc=torch.zeros(1, 6))


def test_int_tensor_for_bool_input(qkv):
    kp = example("key_padding")
    with pytest.raises(ArgumentError, match=r"argument 'valid' must be a bool tensor, got torch.int64"):
        kp(**qkv, valid=torch.ones(2, 7, dtype=torch.int64))


def test_wrong_rank(dense, qkv):
    qkv["q"] = qkv["q"][0]
    with pytest.raises(ShapeError, match=r"argument 'q' must have 4 dims \[B, H, N, D\], got shape \(3, 5, 8\)"):
        dense(**qkv)


def test_inconsistent_dim_between_q_and_k(dense, qkv):
    qkv["k"] = rand(2, 3, 7, 6)
    with pytest.raises(ShapeError) as info:
        dense(**qkv)
    msg = str(info.value)
    assert "argument 'k' has D = 6" in msg and "'q' has D = 8" in msg


def test_inconsistent_dim_between_k_and_v(dense, qkv):
    qkv["v"] = rand(2, 3, 6, 4)
    with pytest.raises(ShapeError, match=r"argument 'v' has M = 6 .* but 'k' has M = 7"):
        dense(**qkv)


def test_fixed_dim_size():
    kernel = attncc.compile("attention f(q[B,4], k[B,4]) -> o[B] {\n  o[b] = q[b,d] * k[b,d]\n}\n")
    with pytest.raises(ShapeError, match=r"argument 'q' must have size 4 in dim 1, got shape \(2, 5\)"):
        kernel(q=rand(2, 5), k=rand(2, 4))


def test_tensors_on_different_devices(dense, qkv):
    qkv["k"] = qkv["k"].to("meta")
    with pytest.raises(ShapeError, match=r"argument 'k' is on meta but 'q' is on cpu"):
        dense(**qkv)


def agent_inputs(n=8):
    return {"q": rand(1, 2, n, 8), "k": rand(1, 2, n, 8), "v": rand(1, 2, n, 4)}


@pytest.mark.parametrize("value,message", [
    (2.0, r"param 'agents' must be an int, got 2.0"),
    (True, r"param 'agents' must be an int, got bool"),
    ("2", r"param 'agents' must be an int, got str"),
])
def test_int_param_of_wrong_type(value, message):
    with pytest.raises(ArgumentError, match=message):
        example("agent")(**agent_inputs(), agents=value)


def test_int_param_accepts_numpy_integer():
    out = example("agent")(**agent_inputs(), agents=np.int64(2))
    assert out.shape == (1, 2, 8, 4)


def test_bool_param_of_wrong_type(qkv):
    with pytest.raises(ArgumentError, match=r"param 'causal' must be a bool, got int"):
        example("linear_elu")(**qkv, causal=1)


def test_float_param_of_wrong_type(qkv):
    with pytest.raises(ArgumentError, match=r"param 'cap' must be a float, got str"):
        example("softcap")(**qkv, cap="20")


def test_param_without_default_missing():
    with pytest.raises(ArgumentError, match=r"criss_cross\(\) is missing the argument 'width' \(int param\)"):
        example("criss_cross")(**agent_inputs(6), height=2)


def test_failing_require_shows_text_and_values():
    with pytest.raises(ShapeError) as info:
        example("criss_cross")(**agent_inputs(6), height=2, width=2)
    msg = str(info.value)
    assert "requirement `require N == M and N == height * width` (line 6) does not hold" in msg
    assert "N = 6" in msg and "height = 2" in msg and "width = 2" in msg


def test_require_that_divides_by_zero():
    """`N % agents == 0` with agents = 0 is a bad call, not a crash."""
    with pytest.raises(ShapeError) as info:
        example("agent")(**agent_inputs(), agents=0)
    msg = str(info.value)
    assert "requirement `require N == M and N % agents == 0`" in msg
    assert "cannot be evaluated" in msg and "agents = 0" in msg


def test_unknown_backend():
    with pytest.raises(BackendError, match=r"unknown backend 'cuda'; available: auto, triton, reference"):
        attncc.compile(EXAMPLES_DIR / "dense.attn", backend="cuda")


def test_call_errors_are_standard_python_exceptions(dense, qkv):
    with pytest.raises(TypeError):
        dense(q=qkv["q"], k=qkv["k"])
    with pytest.raises(ValueError):
        dense(q=qkv["q"], k=qkv["k"], v=rand(2, 3, 6, 4))
