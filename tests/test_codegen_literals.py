"""Literals and operator semantics of generated tile code, against the reference and torch.

Infinite literals (`-inf`, `inf`, `1e999`) used to reach the kernel as the bare name `inf`;
`(cond) * -inf` must be an additive mask (y where cond holds, 0 elsewhere, never 0 * inf);
`**` gives floats also for an integer base (`2 ** (-h)` called `tl.log2` on an int); `/` is
a true division, `//` and `%` floor like Python and torch (Triton truncates integers and has
no `//` on floats), and NaN goes through `min`, `max`, `clamp` and `relu` as in torch (a
compiled `tl.maximum` drops it unless asked not to; the interpreter keeps it either way).
"""
import math

import pytest
import torch

import attncc
from attncc.random_inputs import random_arguments
from namespace_check import run_both

SPEC = """attention lit(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {{
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  {mod}
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}}"""
SHAPE = dict(B=1, H=3, N=21, M=29, D=16, E=12)

MASKS = ["s += (j > i + (M - N)) * -inf", "s += -inf * (j > i + (M - N))", "s = where(j > i + (M - N), -inf, s)",
         "s += (j > i + (M - N)) * -1e999", "s = where(j <= i + (M - N), s, -inf)",
         "s += (j > i + (M - N)) * (-inf) + (j > i + (M - N)) * -inf"]


@pytest.mark.parametrize("mod", MASKS)
def test_infinite_literals_mask_like_the_dense_formula(mod):
    kernel = attncc.compile(SPEC.format(mod=mod), backend="triton")
    kw = random_arguments(kernel.program, SHAPE)
    out = kernel(**kw)
    q, k, v = kw["q"], kw["k"], kw["v"]
    n, m = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    dense = torch.softmax(s.masked_fill(j > i + (m - n), -math.inf), -1) @ v
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)


OPERATORS = [
    "s += 2 ** (-h) * (j - i)",                     # integer base, integer exponent per head
    "s += 2 ** (-H) * (j - i) + 3 ** (h + 5) * 1e-4",  # host-evaluated; a constant base, 5th power and up
    "s += (-2) ** (h - 2 * i) * 0.001",             # negative base: sign of odd powers
    "s += i ** 2 * 0.0001 + j ** 5 * 1e-8",         # small integer powers of indices, multiplied out
    "s += 0.5 ** (0.5 * j) + (i + 1) ** 0.5",       # real exponents
    "s += sqrt(j + 1) + exp(-i) + log(j + 1)",      # functions of integer index expressions
    "s += (j - i) / 3 + (i - 20) // 3 + (j - i) % 5",  # true division; floor division of negatives
    "s += (j - i) // (h - 3) + (j - i) % (h - 3)",  # negative divisors
    "s = s // 0.7 + s % 0.7",                       # floor division and modulo of floats
    "s += (s > 0) * (j - i) + (s < 0) * 0.5",       # boolean times int and float
]


@pytest.mark.parametrize("mod", OPERATORS)
def test_operators_match_the_reference(mod):
    out, ref = run_both(SPEC.format(mod=mod), SHAPE)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


NANS = ["s = where(i < 5, sign(sqrt(s)), s)", "s = where(i < 5, max(sqrt(s), 0.5), s)",
        "s = where(i < 5, min(0.5, sqrt(s)), s)", "s = where(i < 5, relu(log(s)), s)",
        "s = where(i < 5, clamp(sqrt(s), -1, 1), s)"]


@pytest.mark.parametrize("mod", NANS)
def test_nan_propagates_like_torch(mod):
    """sqrt of a negative score is NaN; torch carries it through these functions, so a row
    with one is NaN after the softmax (rows 0-4 here; the others not); sign(nan) is 0."""
    out, ref = run_both(SPEC.format(mod=mod), SHAPE)
    assert ref.isnan().any() != ("sign" in mod) and not ref.isnan().all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, equal_nan=True)
