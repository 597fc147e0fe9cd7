"""What the row-streaming plan assumes about its operands, and what it refuses.

A q/k/v tile depends on one tile index only: a value chosen per (query, key) pair
(`where(i - j < 4, v[b,h,j,e], vc[b,h,e])`) used to be precomputed as a [B,H,N,E,M] tensor
and read with the wrong pointers (silently wrong: 4e25 off the reference), as were values
read at a head that depends on the query (`v[b, (h + i) % 2, j, e]`) or plus a per-query
term. These are refused (`BackendError` naming the statement; the reference runs them),
while a per-query factor of the values (`v * (i + 1)`) is a coefficient and still runs.
GQA packing needs K and V to share one group size; a scalar that only torch can compute
(`let T = sum(w[a], a)`) is precomputed instead of evaluated on the host; an intermediate
read at (i, j) is score-sized whatever its own index names, and refused.
"""
import pytest
import torch

import attncc
from attncc.errors import BackendError
from namespace_check import run_both

SHAPE = dict(B=1, H=2, N=21, M=29, D=16, E=12)
HEAD = "attention x({ins}) -> o[B,H,N,E] {{\n  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5\n  " \
       "p = softmax(s, j)\n  o[b,h,i,e] = {out}\n}}"
QKV = "q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]"


@pytest.mark.parametrize("ins,out,why", [
    (QKV + ", vc[B,H,E]", "p[b,h,i,j] * where(i - j < 4, v[b,h,j,e], vc[b,h,e])", "the values depend on 'i'"),
    (QKV, "p[b,h,i,j] * v[b,(h + i) % 2,j,e]", "the values depend on 'i'"),
    (QKV + ", g[B,H,N]", "p[b,h,i,j] * (v[b,h,j,e] + g[b,h,i])", "the values depend on 'i'"),
])
def test_values_that_depend_on_the_query_are_refused(ins, out, why):
    spec = HEAD.format(ins=ins, out=out)
    with pytest.raises(BackendError, match=why) as err:
        attncc.compile(spec, backend="triton")
    assert "line 4: `o[b,h,i,e] = " in str(err.value)
    kernel = attncc.compile(spec, backend="reference")  # still runs, on the reference
    assert kernel.backend == "reference"


def test_a_per_query_factor_of_the_values_is_a_coefficient():
    out, ref = run_both(HEAD.format(ins=QKV, out="p[b,h,i,j] * (v[b,h,j,e] * (i + 1))"), SHAPE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


GQA_TWO_GROUPS = """attention x(q[B,H,N,D], k[B,G,M,D], v[B,F,M,E]) -> o[B,H,N,E] {
  require H % G == 0 and H % F == 0
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // (H // G),j,d] * D ** -0.5
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h // (H // F),j,e]
}"""


def test_gqa_packing_needs_one_group_size_for_keys_and_values():
    """Three queries: packing would put heads 2g and 2g + 1 in one tile, with one V head."""
    kernel = attncc.compile(GQA_TWO_GROUPS, backend="triton")
    assert kernel.generated.plan.group is None
    out, ref = run_both(GQA_TWO_GROUPS, dict(B=1, H=4, G=2, F=4, N=3, M=29, D=16, E=12))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_a_scalar_reduction_in_the_scores_is_precomputed():
    spec = """attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], w[A]) -> o[B,H,N,E] {
  let T = sum(w[a], a)
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * T
  s += T * (j - i) * 0.01
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""
    out, ref = run_both(spec, {**SHAPE, "A": 5})
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_an_intermediate_read_at_query_and_key_is_score_sized():
    spec = """attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  t[b,h,x,y] = q[b,h,x,d] * k[b,h,y,d]
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]
  s += tanh(t[b,h,i,j])
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""
    with pytest.raises(BackendError, match="line 2 needs a whole score-sized intermediate"):
        attncc.compile(spec, backend="triton")
