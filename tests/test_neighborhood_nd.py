"""examples/neighborhood_nd.attn against an independent float64 oracle of its contract
(VARIANTS.md section 3), on both backends; FlexAttention (eager, CPU) where it can express
the case; gradients of q, k, v and rpb; block skipping of the generated kernel.

The oracle below is written from the contract text, axis by axis with plain Python loops,
and shares nothing with the .attn file (it shifts a window instead of clamping its start).
Run with TRITON_INTERPRET=1 for the generated-kernel cases (skipped otherwise without a GPU).
"""
import os

import pytest
import torch

import attncc
from attncc import ArgumentError, ShapeError
from attncc.work import measured_tile_work

SPEC = "examples/neighborhood_nd.attn"
needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="generated kernels on CPU tensors need TRITON_INTERPRET=1")
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


# ----------------------------------------------------------------------------- the oracle
def per_axis(value, n=3):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def axis_allows(length, kernel, dilation, stride, causal, truncate, xq, xk) -> bool:
    """The contract on one axis: same dilation group, then the stride group's leader's window."""
    if xq % dilation != xk % dilation:
        return False
    group = len(range(xq % dilation, length, dilation))  # Lg: positions of the query's group
    a, b = xq // dilation, xk // dilation
    first = a - a % stride
    if causal:
        lead = min(first + stride - 1, group - 1)
        return lead - kernel + 1 <= b <= a
    lead = min(first + stride // 2, group - 1)
    lo, hi = lead - kernel // 2, lead + kernel - 1 - kernel // 2
    if truncate:
        lo, hi = max(lo, 0), min(hi, group - 1)
    elif group < kernel:
        lo, hi = 0, group - 1
    elif lo < 0:
        lo, hi = 0, hi - lo
    elif hi > group - 1:
        lo, hi = lo - (hi - group + 1), group - 1
    return lo <= b <= hi


def oracle(q, k, v, *, shape, kernel=7, dilation=1, stride=1, causal=False, truncate=False, rpb=None,
           scale=None, return_lse=False):
    """float64 softmax attention over the allowed keys, with the relative position bias."""
    kernel, dilation, stride, causal = map(per_axis, (kernel, dilation, stride, causal))
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    assert N == shape[0] * shape[1] * shape[2] == k.shape[2]
    coords = [(n // (shape[1] * shape[2]), n // shape[2] % shape[1], n % shape[2]) for n in range(N)]
    allowed = torch.zeros(N, N, dtype=torch.bool)
    bias = torch.zeros(H, N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            allowed[i, j] = all(axis_allows(shape[a], kernel[a], dilation[a], stride[a], causal[a], truncate,
                                            coords[i][a], coords[j][a]) for a in range(3))
            if allowed[i, j] and rpb is not None:
                at = [(coords[j][a] - coords[i][a]) // dilation[a] + kernel[a] - 1 for a in range(3)]
                bias[:, i, j] = rpb[:, at[0], at[1], at[2]].double()
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (D ** -0.5 if scale is None else scale) + bias
    s = s.masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhij,bhje->bhie", torch.softmax(s, -1), v)
    return (o, torch.logsumexp(s, -1)) if return_lse else o


def test_oracle_counts_natten_windows():
    """The oracle itself: a 1-D row of 9 with kernel 3 gives each query 3 keys (2 at no
    border: shifted inward), dilation 2 splits it into groups of 5 and 4, causal keeps <= x."""
    def keys(xq, **kw):
        opts = {**dict(kernel=3, dilation=1, stride=1, causal=False, truncate=False), **kw}
        return [xk for xk in range(9) if axis_allows(9, opts["kernel"], opts["dilation"], opts["stride"],
                                                     opts["causal"], opts["truncate"], xq, xk)]
    assert keys(0) == [0, 1, 2] and keys(4) == [3, 4, 5] and keys(8) == [6, 7, 8]
    assert keys(0, truncate=True) == [0, 1]
    assert keys(8, dilation=2) == [4, 6, 8] and keys(1, dilation=2) == [1, 3, 5]
    assert keys(4, causal=True) == [2, 3, 4]
    assert keys(3, stride=3) == keys(4, stride=3) == keys(5, stride=3) == [3, 4, 5]  # led by 4
    assert keys(3, stride=3, causal=True) == [3]  # led by 5: [3, 5], cut at the query
    assert keys(2, kernel=5, dilation=3) == [2, 5, 8]  # a group of 3 < kernel: all of it


# ----------------------------------------------------------------------------- cases
def inputs(grid, *, B=1, H=2, D=8, E=5, rpb_kernel=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    out = {"q": torch.randn(B, H, n, D, generator=g, dtype=dtype), "k": torch.randn(B, H, n, D, generator=g, dtype=dtype),
           "v": torch.randn(B, H, n, E, generator=g, dtype=dtype)}
    if rpb_kernel is not None:
        kk = per_axis(rpb_kernel)
        out["rpb"] = torch.randn(H, 2 * kk[0] - 1, 2 * kk[1] - 1, 2 * kk[2] - 1, generator=g, dtype=dtype)
    return out


# (grid, params, with rpb): 1-D, 2-D and 3-D grids, tuples and broadcast ints, odd sizes
CASES = {
    "1d": ((1, 1, 23), dict(kernel=5), False),
    "1d_causal_stride": ((1, 1, 23), dict(kernel=5, stride=2, causal=True), True),
    "2d": ((1, 5, 7), dict(kernel=3), True),
    "2d_tuple_dilated": ((1, 6, 7), dict(kernel=(1, 3, 5), dilation=(1, 2, 1)), True),
    "2d_group_shorter_than_kernel": ((1, 5, 7), dict(kernel=(1, 5, 5), dilation=(1, 2, 3)), True),
    "2d_gna_stride": ((1, 7, 6), dict(kernel=(1, 5, 3), stride=(1, 3, 2)), True),
    "2d_causal_one_axis": ((1, 5, 7), dict(kernel=3, causal=(False, True, False)), True),
    "2d_truncate": ((1, 6, 7), dict(kernel=(1, 5, 3), truncate=True, stride=(1, 2, 1)), True),
    "3d": ((3, 3, 4), dict(kernel=(3, 3, 3)), True),
    "3d_mixed": ((3, 4, 3), dict(kernel=(3, 3, 2), dilation=(1, 2, 1), stride=(2, 1, 2),
                                 causal=(True, False, False)), True),
    "3d_truncate_causal": ((2, 4, 5), dict(kernel=(2, 3, 3), stride=(1, 3, 1), causal=(False, False, True),
                                           truncate=True), False),
}
TRITON_CASES = ["1d_causal_stride", "2d_tuple_dilated", "2d_group_shorter_than_kernel", "2d_gna_stride",
                "2d_truncate", "3d_mixed"]


def case(name, dtype=torch.float64):
    grid, params, with_rpb = CASES[name]
    kernel = params.get("kernel", 7)
    args = inputs(grid, rpb_kernel=kernel if with_rpb else None, dtype=dtype)
    return args, {"shape": grid, **params}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_the_oracle(name):
    args, params = case(name)
    got, lse = attncc.compile(SPEC, backend="reference")(**args, **params, return_lse=True)
    want, want_lse = oracle(**args, **params, return_lse=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


@needs_triton
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_matches_the_oracle(name):
    args, params = case(name, torch.float32)
    kernel = attncc.compile(SPEC, backend="triton")
    got, lse = kernel(**args, **params, return_lse=True)
    assert kernel.last_run["backend"] == "triton"
    want, want_lse = oracle(**args, **params, return_lse=True)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_scale_override_and_absent_rpb(backend):
    """`scale` replaces D ** -0.5; an absent rpb is zero (its shape comes from `kernel`)."""
    args, params = case("2d", torch.float32)
    del args["rpb"]
    got = attncc.compile(SPEC, backend=backend)(**args, **params, scale=0.3)
    torch.testing.assert_close(got.double(), oracle(**args, **params, scale=0.3), rtol=2e-5, atol=2e-5)


def test_every_key_when_the_kernel_covers_the_grid():
    """kernel >= the grid on every axis (not truncated): dense attention."""
    args = inputs((2, 3, 4))
    got = attncc.compile(SPEC, backend="reference")(**args, shape=(2, 3, 4), kernel=7)
    dense = torch.softmax(torch.einsum("bhid,bhjd->bhij", args["q"], args["k"]) * 8 ** -0.5, -1) @ args["v"]
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- FlexAttention
def flex_natten_mask(shape, kernel, dilation):
    """Non-causal NATTEN (stride 1, not truncated) in closed form on index tensors, as a
    FlexAttention mask_mod: the window start is the query's clamped to [0, Lg - K]."""
    def axis(c_q, c_k, length, kk, dil):
        group = (length - c_q % dil + dil - 1) // dil
        x = c_q // dil
        start = torch.where(group >= kk, (x - kk // 2).clamp(min=0), torch.zeros_like(x))
        start = torch.minimum(start, (group - kk).clamp(min=0))
        return (c_q % dil == c_k % dil) & (start <= c_k // dil) & (c_k // dil < start + kk)

    def coords(n):
        return n // (shape[1] * shape[2]), n // shape[2] % shape[1], n % shape[2]

    def mask_mod(b, h, q_idx, kv_idx):
        cq, ck = coords(q_idx), coords(kv_idx)
        ok = axis(cq[0], ck[0], shape[0], kernel[0], dilation[0])
        for a in (1, 2):
            ok = ok & axis(cq[a], ck[a], shape[a], kernel[a], dilation[a])
        return ok
    return mask_mod


@pytest.mark.parametrize("grid,kernel,dilation", [((1, 5, 7), (1, 3, 3), (1, 1, 1)),
                                                  ((3, 4, 5), (3, 3, 5), (1, 2, 1)),
                                                  ((1, 6, 7), (1, 5, 5), (1, 2, 3))])
def test_matches_flex_attention(grid, kernel, dilation):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    args = inputs(grid, dtype=torch.float32, rpb_kernel=kernel)
    rpb = args["rpb"]

    def score_mod(score, b, h, q_idx, kv_idx):
        d = [((kv_idx // s) % n - (q_idx // s) % n) // dil + kk - 1
             for s, n, dil, kk in zip((grid[1] * grid[2], grid[2], 1), grid, dilation, kernel)]
        return score + rpb[h, d[0].clamp(0, 2 * kernel[0] - 2), d[1].clamp(0, 2 * kernel[1] - 2),
                           d[2].clamp(0, 2 * kernel[2] - 2)]

    n = grid[0] * grid[1] * grid[2]
    block_mask = fa.create_block_mask(flex_natten_mask(grid, kernel, dilation), None, None, n, n, device="cpu")
    want = fa.flex_attention(args["q"], args["k"], args["v"], score_mod=score_mod, block_mask=block_mask)
    got = attncc.compile(SPEC, backend="reference")(**args, shape=grid, kernel=kernel, dilation=dilation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gradients
@needs_triton
def test_gradients_against_float64_reference_autograd():
    args, params = case("2d_gna_stride", torch.float32)
    leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    kernel = attncc.compile(SPEC, backend="triton")
    o = kernel(**leaves, **params)
    do = torch.randn_like(o)
    o.backward(do)
    ran = kernel.last_run
    assert ran["backend"] == "triton" and ran["backward"] == "triton"  # generated, rpb's gradient included
    ref = {n: t.double().requires_grad_(True) for n, t in args.items()}
    want = attncc.compile(SPEC, backend="reference")(**ref, **params)
    want.backward(do.double())
    for n in ("q", "k", "v", "rpb"):
        torch.testing.assert_close(leaves[n].grad.double(), ref[n].grad, rtol=1e-4, atol=1e-4, msg=n)
    # and the float64 reference's own gradients against the independent oracle's
    orc = {n: t.double().requires_grad_(True) for n, t in args.items()}
    oracle(**orc, **params).backward(do.double())
    for n in ("q", "k", "v", "rpb"):
        torch.testing.assert_close(ref[n].grad, orc[n].grad, rtol=1e-10, atol=1e-10, msg=n)


# ----------------------------------------------------------------------------- block skipping
@needs_triton
def test_generated_kernel_skips_empty_tiles():
    """A 1 x 6 x 30 grid with 3 x 3 windows: most 16 x 16 tiles are empty, and the kernel
    visits exactly the non-empty ones."""
    kernel = attncc.compile(SPEC, backend="triton")
    args = inputs((1, 6, 30), H=1, D=8, E=8, dtype=torch.float32)
    work = measured_tile_work(kernel, {**args, "shape": (1, 6, 30), "kernel": 3}, 16, 16)
    assert work.minimum < work.dense / 2
    assert work.visited == work.minimum


# ----------------------------------------------------------------------------- calls
def test_call_checks():
    kernel = attncc.compile(SPEC, backend="reference")
    args = inputs((1, 5, 7))
    with pytest.raises(ShapeError, match=r"requirement `require N == M and N == shape\[0\] \* shape\[1\] \* "
                                         r"shape\[2\]`.*shape\[0\] = 1, shape\[1\] = 5, shape\[2\] = 6"):
        kernel(**args, shape=(1, 5, 6))
    with pytest.raises(ShapeError, match=r"stride\[2\] <= kernel\[2\]"):
        kernel(**args, shape=(1, 5, 7), kernel=3, stride=(1, 1, 4))
    with pytest.raises(ShapeError, match=r"argument 'rpb' must have size 5 in dim 2 \(`2 \* kernel\[1\] - 1` "
                                         r"with kernel\[1\] = 3\)"):
        kernel(**args, shape=(1, 5, 7), kernel=(1, 3, 3), rpb=torch.zeros(2, 1, 3, 5, dtype=torch.float64))
    with pytest.raises(ArgumentError, match=r"param 'kernel' takes 3 entries \(int, int, int\)"):
        kernel(**args, shape=(1, 5, 7), kernel=(3, 3))
    with pytest.raises(ArgumentError, match=r"missing the argument 'shape' \(\(int, int, int\) param\)"):
        kernel(**args)
    assert kernel.params["kernel"] == (7, 7, 7) and kernel.params["causal"] == (False, False, False)
