"""Scalar expressions of dims and params that leave the double range saturate to inf, as torch does."""
import math

import torch

import attncc
from attncc import ir
from attncc.reference import evaluate_scalar

SPEC = """attention big(q[N,D], k[M,D], v[M,E]) -> o[N,E] {
  s[i,j] = q[i,d] * k[j,d] * min(N ** 1000, 2.0) * min(exp(1000.0 * D), 0.5)
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}"""


def test_host_scalars_overflow_to_inf():
    program = attncc.load(SPEC)
    values = {n.op: evaluate_scalar(n, {"N": 3, "D": 4, "M": 5, "E": 2})
              for n in program.graph if isinstance(n, ir.Map) and not n.indices and n.op in ("**", "exp")}
    assert values == {"**": math.inf, "exp": math.inf}


def test_both_backends_agree_past_the_double_range():
    gen = torch.Generator().manual_seed(0)
    args = {"q": torch.randn(7, 4, generator=gen), "k": torch.randn(9, 4, generator=gen),
            "v": torch.randn(9, 3, generator=gen)}
    want = torch.softmax(args["q"] @ args["k"].T, -1) @ args["v"]  # the scale is 2 * 0.5
    for backend in ("reference", "triton"):
        kernel = attncc.compile(SPEC, backend=backend)
        torch.testing.assert_close(kernel(**args), want, atol=1e-5, rtol=1e-5)
