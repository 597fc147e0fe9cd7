"""Reads guarded by masks (`passes/read_guards.py`, `attncc/read_check.py`): a relative table
indexed past its ends only at pairs the masks exclude needs no clamp, and both backends give
the same result as a float64 oracle; a read that leaves its tensor at an allowed pair is a
located error on both backends (at call time), or at compile time when sympy proves it."""
import math
import os

import pytest
import torch

import attncc
from attncc.errors import SpecError
from attncc.read_check import GuardedReadError

BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])

WINDOW_1D = """attention rel1d(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], c[H,T]) -> o[B,H,N,E] {
  param W: int = 3
  require T == 2 * W + 1
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += c[h, j - i + W]
  mask j - i <= W and i - j <= W
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""

GRID_2D = """attention rpb2d(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], rpb[H,R,R]) -> o[B,H,N,E] {
  param width: int
  param K: int = 1
  require N == M and R == 2 * K + 1
  yq[i] = i // width
  xq[i] = i % width
  yk[j] = j // width
  xk[j] = j % width
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += rpb[h, yk - yq + K, xk - xq + K]
  mask abs(yk - yq) <= K and abs(xk - xq) <= K
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def oracle(q, k, v, bias, allowed):
    """Dense float64 softmax over the allowed keys with an additive bias [H, N, M]."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * q.shape[-1] ** -0.5 + bias.double()
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhij,bhje->bhie", p, v.double())


def close(got, want):
    err = float((got.double() - want).abs().max())
    assert err <= 1e-4 * max(1.0, float(want.abs().max())), f"off by {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,w", [(13, 17, 3), (9, 5, 2)])
def test_relative_table_under_a_window(backend, n, m, w):
    B, H, D, E = 2, 3, 8, 5
    q, k, v = rand(B, H, n, D, seed=1), rand(B, H, m, D, seed=2), rand(B, H, m, E, seed=3)
    c = rand(H, 2 * w + 1, seed=4)
    kernel = attncc.compile(WINDOW_1D, backend=backend)
    got = kernel(q=q, k=k, v=v, c=c, W=w)
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    allowed = (j - i).abs() <= w
    bias = c.double()[:, (j - i + w).clamp(0, 2 * w)]  # the oracle clamps; the spec need not
    close(got, oracle(q, k, v, bias, allowed))
    assert kernel.last_run["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height,width,kk", [(3, 5, 1), (4, 3, 2)])
def test_relative_position_bias_on_a_grid(backend, height, width, kk):
    B, H, D, E = 1, 2, 6, 7
    n = height * width
    q, k, v = rand(B, H, n, D, seed=5), rand(B, H, n, D, seed=6), rand(B, H, n, E, seed=7)
    rpb = rand(H, 2 * kk + 1, 2 * kk + 1, seed=8)
    kernel = attncc.compile(GRID_2D, backend=backend)
    got = kernel(q=q, k=k, v=v, rpb=rpb, width=width, K=kk)
    pos = torch.arange(n)
    y, x = pos // width, pos % width
    dy, dx = y[None, :] - y[:, None], x[None, :] - x[:, None]
    allowed = (dy.abs() <= kk) & (dx.abs() <= kk)
    bias = rpb.double()[:, (dy + kk).clamp(0, 2 * kk), (dx + kk).clamp(0, 2 * kk)]
    close(got, oracle(q, k, v, bias, allowed))


def test_guarded_read_is_zero_where_the_mask_excludes_it():
    """An output over (i, j) shows the guarded read itself: 0 where the index leaves the
    table (masked pairs), the table's entry elsewhere (the Triton loads' `other=0`; this
    two-output spec is not planned for Triton: the general planner fails on it)."""
    backend = "reference"
    spec = """attention show(q[N,D], k[M,D], c[T]) -> (s[N,M], r[N]) {
  param W: int = 1
  t[i,j] = q[i,d] * k[j,d]
  s[i,j] = c[j - i + W] + 0.0 * t[i,j]
  mask j - i <= W and i - j <= W
  r[i] = sum(s[i,j], j)
}"""
    n, m, w = 5, 6, 1
    c = torch.arange(1.0, 2 * w + 2)
    kernel = attncc.compile(spec, backend=backend)
    s, r = kernel(q=torch.ones(n, 2), k=torch.ones(m, 2), c=c, W=w)
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    inside = (j - i + w >= 0) & (j - i + w <= 2 * w)
    want = torch.where(inside, c[(j - i + w).clamp(0, 2 * w)], 0.0)
    assert torch.equal(s, want)
    close(r, want.sum(1).double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_out_of_range_at_an_allowed_pair_is_a_located_error(backend):
    """Only one side of the window is masked: j - i + W < 0 happens at allowed pairs."""
    spec = WINDOW_1D.replace("mask j - i <= W and i - j <= W", "mask j - i <= W")
    kernel = attncc.compile(spec, backend=backend)
    q, k, v = rand(1, 1, 6, 4, seed=1), rand(1, 1, 6, 4, seed=2), rand(1, 1, 6, 3, seed=3)
    with pytest.raises(GuardedReadError, match=r"<string>:5:8: error: index -1 is out of range for dim 1 of "
                                               r"'c' \(size 5\) at j = 0, i = 3, and no mask excludes it"
                                               r"[\s\S]*\^\^\^"):
        kernel(q=q, k=k, v=v, c=rand(1, 5, seed=4), W=2)
    # a window wide enough for every pair: nothing leaves the table
    kernel(q=q, k=k, v=v, c=rand(1, 11, seed=4), W=5)


def test_the_error_is_an_index_error_and_a_shape_error():
    assert issubclass(GuardedReadError, IndexError) and issubclass(GuardedReadError, ValueError)


def test_a_read_provably_outside_with_no_mask_is_a_compile_error():
    spec = """attention shift(q[N,D], k[M,D], v[M,E]) -> o[N,E] {
  s[i,j] = q[i,d] * k[j + 1,d]
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}"""
    with pytest.raises(SpecError, match=r"<string>:2:21: error: dim 0 of this read of 'k' reaches index M "
                                        r"\(size M\), outside the tensor, and no mask excludes"):
        attncc.compile(spec, backend="reference")
    with pytest.raises(SpecError, match=r"dim 0 of this read of 'c' reaches index -1 \(size 4\)"):
        attncc.load(spec.replace("v[M,E])", "v[M,E], c[4])").replace("k[j + 1,d]", "k[j,d] * c[i - 1]"))


def test_reads_sympy_proves_in_range_are_not_checked():
    """`c[h, clamp(j - i, -2, 2) + 2]` into a table of 5 and bare indices need no call-time
    check (with a param W for 2 they do: sympy cannot know W >= 0)."""
    from attncc.passes.read_guards import checked_reads

    spec = WINDOW_1D.replace("c[h, j - i + W]", "c[h, clamp(j - i, -2, 2) + 2]").replace("c[H,T]", "c[H,5]") \
        .replace("require T == 2 * W + 1", "")
    assert checked_reads(attncc.load(spec)) == ()
    reads = checked_reads(attncc.load(WINDOW_1D))
    assert [(r.access.array.name, r.dim, len(r.guards)) for r in reads] == [("c", 1, 1)]


def test_unguarded_data_free_read_checked_once_per_scalars():
    """The check depends only on dims and params: a second call with the same ones skips it."""
    from attncc import read_check

    kernel = attncc.compile(WINDOW_1D, backend="reference")
    args = dict(q=rand(1, 1, 4, 4, seed=1), k=rand(1, 1, 4, 4, seed=2), v=rand(1, 1, 4, 2, seed=3),
                c=rand(1, 5, seed=4), W=2)
    kernel(**args)
    assert len(read_check._PASSED[kernel.program]) == 1
    kernel(**args)
    assert len(read_check._PASSED[kernel.program]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_index_out_of_range_is_a_call_error(backend):
    """`c[h, W]` reads one column chosen by a param: in range for W < T, an error past it."""
    spec = WINDOW_1D.replace("c[h, j - i + W]", "c[h, W]").replace("require T == 2 * W + 1", "")
    kernel = attncc.compile(spec, backend=backend)
    q, k, v = rand(1, 1, 3, 4, seed=1), rand(1, 1, 4, 4, seed=2), rand(1, 1, 4, 3, seed=3)
    c = rand(1, 5, seed=4)
    kernel(q=q, k=k, v=v, c=c, W=4)
    with pytest.raises(GuardedReadError, match=r"index 5 is out of range for dim 1 of 'c' \(size 5\), and no mask "
                                               r"over these indices guards this read"):
        kernel(q=q, k=k, v=v, c=c, W=5)


POSITIONS = """attention relpos(q[B,H,N,D], k[B,H,N,D], v[B,H,N,E], c[H,T], pos[B,N]: int) -> o[B,H,N,E] {
  param W: int = 2
  require T == 2 * W + 1
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += c[h, pos[b, j] - pos[b, i] + W]
  mask j - i <= W and i - j <= W
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_computed_from_a_tensor_is_checked_on_every_call(backend):
    """`c[h, pos[b, j] - pos[b, i] + W]`: with pos[b, i] = i + offset it leaves the table only
    at masked pairs (guarded: both backends equal the oracle); a pos that stretches one
    allowed pair past the table is the located error, on the call that passes it."""
    B, H, n, D, E, w = 2, 2, 9, 4, 3, 2
    q, k, v = rand(B, H, n, D, seed=1), rand(B, H, n, D, seed=2), rand(B, H, n, E, seed=3)
    c = rand(H, 2 * w + 1, seed=4)
    pos = torch.arange(n).repeat(B, 1) + torch.tensor([[0], [7]])
    kernel = attncc.compile(POSITIONS, backend=backend)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    bias = c.double()[:, (j - i + w).clamp(0, 2 * w)]
    close(kernel(q=q, k=k, v=v, c=c, pos=pos, W=w), oracle(q, k, v, bias, (j - i).abs() <= w))
    bad = pos.clone()
    bad[1, 4] += 1  # pos[1, 2] - pos[1, 4] + W = -1: outside the table at an allowed pair (the first)
    with pytest.raises(GuardedReadError, match=r"<string>:5:8: error: index -1 is out of range for dim 1 of 'c' "
                                               r"\(size 5\) at b = 1, j = 2, i = 4, and no mask excludes it"):
        kernel(q=q, k=k, v=v, c=c, pos=bad, W=w)


def test_interval_bounds_spare_the_grid():
    """relative_bias's `table[h, clamp(j - i, -R, R) + R]` with R = (W - 1) // 2: sympy cannot
    prove it in range for every W, but its interval bounds for the call's W can, without
    evaluating the N x M grid of indices (10**12 entries here)."""
    from attncc import read_check

    program = attncc.load("examples/relative_bias.attn")
    (read,) = [r for r in read_check.checked_reads(program) if r.access.array.name == "table"]
    assert read.bounds is not None
    big = dict(B=1, H=1, N=10 ** 6, M=10 ** 6, D=8, E=8, W=9)
    read_check.check_reads(program, big)
    assert tuple(sorted(big.items())) in read_check._PASSED[program]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_a_guarded_table(backend):
    """The table's gradient (a scatter at the read's positions, none where the index leaves it)
    and those of q, k, v equal the float64 oracle's (on Triton: the generated backward)."""
    B, H, n, m, D, E, w = 1, 2, 9, 11, 4, 3, 2
    dtype = torch.float64 if backend == "reference" else torch.float32
    base = [rand(B, H, n, D, seed=1), rand(B, H, m, D, seed=2), rand(B, H, m, E, seed=3), rand(H, 2 * w + 1, seed=4)]
    got = [t.detach().to(dtype).clone().requires_grad_() for t in base]
    kernel = attncc.compile(WINDOW_1D, backend=backend)
    kernel(q=got[0], k=got[1], v=got[2], c=got[3], W=w).sum().backward()
    want = [t.detach().double().requires_grad_() for t in base]
    i, j = torch.arange(n)[:, None], torch.arange(m)[None, :]
    oracle(*want[:3], want[3][:, (j - i + w).clamp(0, 2 * w)], (j - i).abs() <= w).sum().backward()
    for name, a, b in zip("qkvc", got, want):
        err = float((a.grad.double() - b.grad).abs().max())
        assert err <= 1e-4 * max(1.0, float(b.grad.abs().max())), f"d{name} off by {err:.3g}"
    if backend == "triton":
        assert kernel.last_run["backward"] == "triton"


def test_an_index_that_simplifies_to_a_bare_index_loads():
    """`c[j * 1]` is `j` to sympy (a bound of plain 0 once substituted); c has N entries where
    j ranges over M: not provable either way, so it is checked per call, not refused."""
    attncc.load("""attention t(q[N,D], k[M,D], v[M,E], c[N]) -> o[N,E] {
  s[i,j] = q[i,d] * k[j,d]
  s += c[j * 1]
  p = softmax(s, j)
  o[i,e] = p[i,j] * v[j,e]
}""")
