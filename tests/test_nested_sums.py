"""A statement's einsum sum that passes through a non-linear call written inside it
(`mean(amax(x[a,i,d] * y[c,j,d], j), i)` sums `d` after the amax) is a located `SpecWarning`
naming the index and both places; writing the sum inside, or the index on the left, says
what is meant and is silent. The meaning itself is unchanged (checked against an oracle)."""
import warnings
from pathlib import Path

import pytest
import torch

import attncc
from attncc.errors import SpecWarning

ROOT = Path(__file__).resolve().parent.parent
NESTED = """attention nested(x[A,I,D], y[C,J,D]) -> score[A,C] {
  score[a,c] = mean(amax(x[a,i,d] * y[c,j,d], j), i)
}"""


def load_quietly(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        return attncc.load(spec)


def test_the_outside_sum_is_a_located_warning():
    with pytest.warns(SpecWarning) as record:
        attncc.load(NESTED)
    (w,) = record
    text = str(w.message)
    assert text.startswith("<string>:2:21: warning: index 'd' passes through amax(...) and is summed outside "
                           "it, by the statement (line 2): `score[a, c]` lacks it"), text
    assert "\n" + " " * 22 + "^^^^" in text  # under `amax(`, column 21 after the two-space indent
    assert "expected `sum(..., d)` inside amax(...) where the sum is meant, or 'd' on the left" in text


@pytest.mark.parametrize("line", [
    "score[a,c] = mean(amax(sum(x[a,i,d] * y[c,j,d], d), j), i)",  # the sum written where it is meant
    "score[a,c] = mean(sum(x[a,i,d], d), i) * mean(sum(y[c,j,d], d), j)",  # linear calls commute with it
])
def test_explicit_sums_are_silent(line):
    load_quietly(NESTED.replace("score[a,c] = mean(amax(x[a,i,d] * y[c,j,d], j), i)", line))


def test_an_index_on_the_left_is_silent():
    load_quietly(NESTED.replace("-> score[A,C]", "-> score[A,C,D]").replace("score[a,c] =", "score[a,c,d] ="))


@pytest.mark.parametrize("func", ["softmax(x[a,i,d], i)", "logsumexp(x[a,i,d], i)", "amin(x[a,i,d], i)"])
def test_other_non_linear_calls_warn(func):
    spec = f"""attention t(x[A,I,D]) -> o[A] {{
  o[a] = {func} * 1.0
}}"""  # softmax keeps i, its own axis, which the statement may sum; d passes through all three
    with pytest.warns(SpecWarning, match="index 'd' passes through"):
        attncc.load(spec)


def test_the_normalised_axis_summed_outside_is_silent():
    """`softmax(s, j) * v[j, e]` summed over j is attention itself."""
    load_quietly("""attention t(q[N,D], k[M,D], v[M,E]) -> o[N,E] {
  s[i,j] = q[i,d] * k[j,d]
  o[i,e] = softmax(s, j) * v[j,e]
}""")


def test_the_gallery_and_trials_are_silent():
    for path in sorted((ROOT / "examples").glob("*.attn")) + sorted((ROOT / "tests" / "trials").glob("*.attn")):
        load_quietly(path)


def test_the_meaning_is_the_einsum_rule():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    with pytest.warns(SpecWarning):
        kernel = attncc.compile(NESTED, backend="reference")
    prod = x.double()[:, :, None, None, :] * y.double()[None, None, :, :, :]  # [a, i, c, j, d]
    want = prod.amax(3).mean(1).sum(-1)
    torch.testing.assert_close(kernel(x=x, y=y).double(), want, rtol=1e-5, atol=1e-5)
