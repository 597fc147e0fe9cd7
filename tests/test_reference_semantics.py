"""Semantics of the reference executor and the frontend at the edges of the language.

nan and infinities propagate as eager torch propagates them (only a slice with nothing
allowed gives 0), `(cond) * y` selects, every reduction is right in blocked form, a defined
tensor keeps its declared index order, the summed-index rule sees through parentheses, and
long chains of updates run. Shapes are small and odd; computations are in float64.
"""
import inspect
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf

import attncc
from attncc import ir
from attncc.reference import Reference

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAN, INF = math.nan, math.inf
B, H, N, M, D, E = 2, 3, 5, 7, 4, 3


def reference(spec, block=256):
    kernel = attncc.compile(spec, backend="reference", reference_block=block)
    assert kernel.backend == "reference"
    return kernel


def example(name, block=256):
    return reference(EXAMPLES / f"{name}.attn", block)


def qkv(n=N, m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, m, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, m, E, generator=g, dtype=torch.float64))


def causal_allowed(n=N, m=M):
    i = torch.arange(n).view(n, 1)
    j = torch.arange(m).view(1, m)
    return j <= i + (m - n)


def torch_attention(q, k, v, allowed=None, scores=lambda s: s):
    """softmax(masked_fill(scores)) @ v with torch.softmax: nan and inf propagate as in torch."""
    s = scores(torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5)
    if allowed is not None:
        s = s.masked_fill(~allowed, -INF)
    return torch.softmax(s, dim=-1) @ v


def same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, equal_nan=True)


# --------------------------------------------------------------------------- nan and inf

@pytest.mark.parametrize("block", [2, 256])
def test_nan_in_q_makes_its_row_nan_as_sdpa_does(block):
    q, k, v = qkv(m=N)
    q[0, 1, 2, 0] = NAN
    got = example("dense", block)(q=q, k=k, v=v)
    same(got, nnf.scaled_dot_product_attention(q, k, v))
    assert got[0, 1, 2].isnan().all()
    assert torch.isfinite(got[0, 1, [0, 1, 3, 4]]).all() and torch.isfinite(got[1]).all()


@pytest.mark.parametrize("block", [3, 256])
def test_nan_in_k_reaches_exactly_the_rows_that_see_it(block):
    q, k, v = qkv()
    k[1, 2, 4, 1] = NAN  # key 4 is seen by queries i with 4 <= i + (M - N), i.e. i >= 2
    got = example("causal", block)(q=q, k=k, v=v)
    same(got, torch_attention(q, k, v, causal_allowed()))
    assert got[1, 2, 2:].isnan().all()
    assert torch.isfinite(got[1, 2, :2]).all() and torch.isfinite(got[0]).all()


def test_dense_nan_in_k_reaches_every_row_as_sdpa_does():
    q, k, v = qkv()
    k[0, 0, 6, 3] = NAN
    got = example("dense")(q=q, k=k, v=v)
    same(got, nnf.scaled_dot_product_attention(q, k, v))
    assert got[0, 0].isnan().all()


def test_infinite_scores_follow_torch_softmax():
    q, k, v = qkv()
    q[0, 0, 1, 2] = INF  # scores +inf and -inf in one row: torch.softmax gives nan
    q[1, 1, 3] = 0.0
    k[1, 1, 5] = 0.0
    q[1, 1, 3, 0] = k[1, 1, 5, 0] = 1e200  # one score overflows to +inf: nan too
    got = example("dense")(q=q, k=k, v=v)
    same(got, torch_attention(q, k, v))
    assert got[0, 0, 1].isnan().all() and got[1, 1, 3].isnan().all()


def test_softcap_with_a_nan_cap_is_nan_not_zero():
    """`cap = nan` (which the binding now refuses) reaches the executor through Reference."""
    program = attncc.load(EXAMPLES / "softcap.attn")
    q, k, v = qkv()
    scalars = dict(B=B, H=H, N=N, M=M, D=D, E=E, cap=NAN)
    got = Reference(program, {"q": q, "k": k, "v": v}, scalars, block=2).run()[0]
    assert got.isnan().all()


def test_softcap_with_a_nan_query_is_nan_in_its_row():
    q, k, v = qkv()
    q[0, 2, 3, 1] = NAN
    got = example("softcap", 2)(q=q, k=k, v=v, cap=1.5)
    want = torch_attention(q, k, v, causal_allowed(), scores=lambda s: 1.5 * torch.tanh(s / 1.5))
    same(got, want)
    assert got[0, 2, 3].isnan().all() and torch.isfinite(got[0, 2, :3]).all()


def test_lse_is_nan_for_nan_rows_and_minus_inf_only_for_empty_rows():
    q, k, v = qkv()
    q[0, 0, 0, 0] = NAN
    valid = torch.ones(B, M, dtype=torch.bool)
    valid[1] = False  # batch 1 has no allowed key
    o, lse = example("key_padding", 3)(q=q, k=k, v=v, valid=valid, return_lse=True)
    assert o[0, 0, 0].isnan().all() and lse[0, 0, 0].isnan()
    assert (o[1] == 0).all() and (lse[1] == -INF).all()
    s = torch.einsum("bhid,bhjd->bhij", q, k) * D ** -0.5
    same(lse[0], torch.logsumexp(s[0], dim=-1))


@pytest.mark.parametrize("block", [2, 256])
def test_softmax_over_queries_propagates_nan_along_its_column(block):
    """A softmax along the streamed query axis (statistics pass, then aggregation)."""
    q, k, v = qkv()
    q[1, 0, 3, 2] = NAN  # every column of (1, 0) gets a nan, so every output row does
    got = example("query_softmax", block)(q=q, k=k, v=v)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * D ** -0.5
    same(got, torch.softmax(s, dim=-2) @ v)
    assert got[1, 0].isnan().all() and torch.isfinite(got[0]).all()


def test_masked_nan_stays_out_of_reductions_and_sums():
    """Masked entries are absent: a nan there reaches no row that does not see it, whether
    it is in the reduced operand or in a factor the mask does not cover (v[j, e])."""
    spec = """attention t(x[N,M], v[M,E]) -> (m[N], o[N,E]) {
      mask j <= i
      m = amax(x[i,j], j)
      o[i,e] = x[i,j] * v[j,e]
    }"""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 5, generator=g, dtype=torch.float64)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x[0, 3] = NAN   # masked for row 0
    v[2, 1] = INF   # seen by rows 2..4 only
    for block in (2, 256):
        m, o = reference(spec, block)(x=x, v=v)
        allowed = causal_allowed(5, 5)
        same(m, x.masked_fill(~allowed, -INF).amax(dim=1))
        want = torch.where(allowed[:, :, None], x[:, :, None] * v[None], 0.0).sum(dim=1)
        same(o, want)
        assert torch.isfinite(m).all() and torch.isfinite(o[:2]).all() and o[2:, 1].isinf().all()


def nan_scores_spec(fn):
    return f"""attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], y[B,H,N,M]) -> o[B,H,N,E] {{
      s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
      s = {fn}
      p = softmax(s, j)
      o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
    }}"""


@pytest.mark.parametrize("fn, torch_fn", [
    ("max(s, y[b,h,i,j])", lambda s, y: torch.maximum(s, y)),
    ("min(s, y[b,h,i,j])", lambda s, y: torch.minimum(s, y)),
    ("clamp(s, -1.0, y[b,h,i,j])", lambda s, y: torch.clamp(s, torch.tensor(-1.0, dtype=s.dtype), y)),
    ("clamp(y[b,h,i,j], -1.0, 1.0)", lambda s, y: torch.clamp(y, -1.0, 1.0) + 0 * s),
    ("where(y[b,h,i,j] > 0, s, y[b,h,i,j])", lambda s, y: torch.where(y > 0, s, y)),
    ("where(y[b,h,i,j] > 0, y[b,h,i,j], s)", lambda s, y: torch.where(y > 0, y, s)),
])
def test_nan_and_inf_through_max_min_clamp_where_reach_the_softmax_as_in_torch(fn, torch_fn):
    q, k, v = qkv()
    y = torch.randn(B, H, N, M, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y[0, 0, 1, 2] = NAN
    y[0, 1, 2, 3] = INF
    y[1, 2, 4, 0] = -INF
    got = reference(nan_scores_spec(fn), 2)(q=q, k=k, v=v, y=y)
    same(got, torch_attention(q, k, v, scores=lambda s: torch_fn(s, y)))


def test_elementwise_max_min_clamp_where_match_torch_on_nan_and_inf():
    spec = """attention t(x[N], y[N]) -> (a[N], b[N], c[N], d[N]) {
      a = max(x[i], y[i])
      b = min(x[i], y[i])
      c = clamp(x[i], -1.0, y[i])
      d = where(x[i] > 0, x[i], y[i])
    }"""
    x = torch.tensor([NAN, 1.0, INF, -INF, 0.5, 2.0], dtype=torch.float64)
    y = torch.tensor([0.0, NAN, 1.0, NAN, -INF, INF], dtype=torch.float64)
    a, b, c, d = reference(spec)(x=x, y=y)
    same(a, torch.maximum(x, y))
    same(b, torch.minimum(x, y))
    same(c, torch.clamp(x, torch.tensor(-1.0, dtype=x.dtype), y))
    same(d, torch.where(x > 0, x, y))


# --------------------------------------------------------------------------- (cond) * y

def causal_by(statement):
    return f"""attention t(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {{
      s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
      {statement}
      p = softmax(s, j)
      o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
    }}"""


@pytest.mark.parametrize("statement", [
    "s += (j > i + (M - N)) * -inf",
    "s -= inf * (j > i + (M - N))",
    "s = where(j > i + (M - N), -inf, s)",
    "s = -inf if j > i + (M - N) else s",
])
@pytest.mark.parametrize("block", [2, 256])
def test_infinite_penalties_work_as_a_causal_mask(statement, block):
    q, k, v = qkv()
    kernel = reference(causal_by(statement), block)
    o, lse = kernel(q=q, k=k, v=v, return_lse=True)
    o_causal, lse_causal = example("causal")(q=q, k=k, v=v, return_lse=True)
    same(o, o_causal)
    same(lse, lse_causal)
    same(o, torch_attention(q, k, v, causal_allowed()))


def test_bool_times_y_lowers_to_where_and_bool_times_bool_to_and():
    program = attncc.load("""attention t(x[N], c[N]: bool) -> (o[N], p[N]) {
      o = (x[i] > 0) * x[i]
      p = c[i] * (i > 1)
    }""")
    o, p = (out.node for out in program.outputs)
    assert isinstance(o, ir.Map) and o.op == "where" and o.dtype == ir.FLOAT
    assert o.args[1].indices == ("i",) and isinstance(o.args[2], ir.Const) and o.args[2].value == 0
    assert isinstance(p, ir.Map) and p.op == "and" and p.dtype == ir.BOOL


def test_bool_times_y_is_zero_where_false_even_for_inf_and_nan():
    spec = """attention t(x[N], y[N]) -> (o[N], u[N]) {
      o = (x[i] > 0) * y[i]
      u = y[i] * (x[i] > 0) * 2
    }"""
    x = torch.tensor([1.0, -1.0, -2.0, 3.0, -0.5], dtype=torch.float64)
    y = torch.tensor([2.0, INF, NAN, -INF, -INF], dtype=torch.float64)
    o, u = reference(spec)(x=x, y=y)
    same(o, torch.where(x > 0, y, 0.0))
    same(u, torch.where(x > 0, 2 * y, 0.0))


@pytest.mark.parametrize("block", [2, 256])
def test_bool_factor_in_a_sum_selects(block):
    """`o[i] = (j <= i) * x[i,j]` sums the lower triangle, even with infinities above it;
    with a mask too, and with the infinity in a factor that the condition does not cover."""
    spec = """attention t(x[N,N], w[N], v[N,E]) -> (o[N], r[N,E]) {
      o[i] = (j <= i) * x[i,j]
      r[i,e] = (j <= i) * w[j] * v[j,e]
    }"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x[1, 4] = INF
    x[0, 5] = NAN
    w = torch.randn(6, generator=g, dtype=torch.float64)
    v = torch.randn(6, 2, generator=g, dtype=torch.float64)
    v[3, 0] = NAN  # reaches rows 3..5 only
    o, r = reference(spec, block)(x=x, w=w, v=v)
    lower = causal_allowed(6, 6)
    same(o, torch.where(lower, x, 0.0).sum(dim=1))
    same(r, torch.where(lower[:, :, None], w[None, :, None] * v[None], 0.0).sum(dim=1))
    assert torch.isfinite(r[:3]).all() and r[3:, 0].isnan().all()


# --------------------------------------------------------------------------- reductions

TORCH_REDUCE = {
    "sum": lambda t, d: t.sum(d), "mean": lambda t, d: t.mean(d), "amax": lambda t, d: t.amax(d),
    "amin": lambda t, d: t.amin(d), "logsumexp": lambda t, d: torch.logsumexp(t, d),
}


def reduce_input(rows):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 11, generator=g, dtype=torch.float64) * 3
    x[0, :4] = torch.tensor([-1000.0, -1001.0, -999.5, -1002.0])  # underflows a naive exp
    x[1, 2] = NAN
    x[2, 5] = INF
    x[3, 8:] = -INF  # a whole (short) block of -inf
    x[4, 4:8] = torch.tensor([700.0, 710.0, 705.0, 1.0])  # overflows a naive exp
    return x


@pytest.mark.parametrize("op", list(TORCH_REDUCE))
@pytest.mark.parametrize("block", [1, 3, 256])
def test_blocked_reductions_match_torch_per_block(op, block):
    x = reduce_input(5)
    spec = f"attention t(x[A,11]) -> o[A,3] {{\n  o[a,z] = {op}(x[a,j], j by 4)\n}}"
    got = reference(spec, block)(x=x)
    want = torch.stack([TORCH_REDUCE[op](x[:, 4 * z:4 * z + 4], 1) for z in range(3)], dim=1)
    same(got, want)


@pytest.mark.parametrize("op", list(TORCH_REDUCE))
def test_blocked_reductions_streamed_along_the_blocked_index(op):
    """With one row, the executor streams the blocked index itself: the stream blocks (of
    3 or 5) cut across the reduction blocks (of 4)."""
    x = reduce_input(5)
    program = attncc.load(f"attention t(x[A,11]) -> o[A,3] {{\n  o[a,z] = {op}(x[a,j], j by 4)\n}}")
    for row in range(5):
        for block in (3, 5):
            run = Reference(program, {"x": x[row:row + 1]}, {"A": 1}, block=block)
            assert run.chunk_index == "j"
            want = torch.stack([TORCH_REDUCE[op](x[row:row + 1, 4 * z:4 * z + 4], 1) for z in range(3)], 1)
            same(run.run()[0], want)


@pytest.mark.parametrize("op", ["sum", "amax", "amin"])
def test_blocked_integer_reductions_stay_integers(op):
    x = torch.tensor([[3, -2, 7, 1, 0, 5, -9]])
    got = reference(f"attention t(x[A,7]: int) -> o[A,2] {{\n  o[a,z] = {op}(x[a,j], j by 4)\n}}")(x=x)
    assert got.dtype == torch.int64
    assert got.tolist() == [[TORCH_REDUCE[op](x[:, :4], 1).item(), TORCH_REDUCE[op](x[:, 4:], 1).item()]]


@pytest.mark.parametrize("op", list(TORCH_REDUCE))
@pytest.mark.parametrize("block", [2, 256])
def test_reductions_match_torch_streamed_and_masked(op, block):
    """The executor streams the query index: `r` (along it) merges partial results across
    stream blocks, `o` (across it) does not; both skip masked entries."""
    x = reduce_input(6)[:, :6]
    spec = f"""attention t(x[N,6]) -> (o[N], r[6]) {{
      mask j <= i
      o = {op}(x[i,j], j)
      r = {op}(x[i,j], i)
    }}"""
    o, r = reference(spec, block)(x=x)
    allowed = causal_allowed(6, 6)
    if op == "mean":  # every row and column has an allowed entry
        masked = x.masked_fill(~allowed, 0.0)
        same(o, masked.sum(1) / allowed.sum(1))
        same(r, masked.sum(0) / allowed.sum(0))
    else:
        fill = {"sum": 0.0, "amax": -INF, "amin": INF, "logsumexp": -INF}[op]
        masked = x.masked_fill(~allowed, fill)
        same(o, TORCH_REDUCE[op](masked, 1))
        same(r, TORCH_REDUCE[op](masked, 0))


# --------------------------------------------------------------------------- declared index order

def test_a_tensor_used_by_name_keeps_its_declared_index_order():
    spec = """attention t(x[A,C]) -> (y[C,A], z[C,A], w[C,A]) {
      xt[c,a] = x[a,c] * 2
      p = xt
      y[c,a] = p[c,a]
      z = softmax(xt, a)
      w = p
    }"""
    x = torch.randn(3, 5, dtype=torch.float64)
    y, z, w = reference(spec)(x=x)
    same(y, 2 * x.T)
    same(z, torch.softmax(2 * x.T, dim=1))
    same(w, 2 * x.T)


def test_declared_order_in_reductions_and_updates_by_name():
    spec = """attention t(x[A,C], u[C]) -> (s[C], y[C,A]) {
      xt[c,a] = x[a,c] + 1
      s = sum(xt, a)
      xt += u[c]
      y = xt
    }"""
    x = torch.randn(4, 3, dtype=torch.float64)
    u = torch.randn(3, dtype=torch.float64)
    s, y = reference(spec)(x=x, u=u)
    same(s, (x.T + 1).sum(dim=1))
    same(y, x.T + 1 + u[:, None])


# --------------------------------------------------------------------------- summed-index rule

RULE_SPEC = "attention t(x[A,C], y[A,R]) -> o[A] {{\n  {}\n}}"


@pytest.mark.parametrize("statement, culprit", [
    ("o[i] = x[i,c] * x[i,c] + y[i,r] * y[i,r]", "x[i,c] * x[i,c]"),
    ("o[i] = (x[i,c] * x[i,c] + y[i,r] * y[i,r]) * 1.0", "x[i,c] * x[i,c]"),
    ("o[i] = 2.0 * (x[i,c] * y[i,r] + x[i,c])", "x[i,c]"),
    ("o[i] = -(y[i,r] + x[i,c]) / 2", "y[i,r]"),
    ("o[i] = (x[i,c] - y[i,r]) / 3.0 * 1.0", "x[i,c]"),
    ("o[i] = where(i > 0, x[i,c], y[i,r])", "x[i,c]"),
    ("o[i] = x[i,c] * y[i,r] if i > 0 else y[i,r]", "y[i,r]"),
    ("o[i] = ((x[i,c] * y[i,r]) + (1.0))", "1.0"),
    ("o[i] = (x[i,c] * x[i,c] + y[i,r]) * x[i,c]", "x[i,c] * x[i,c]"),
    ("o[i] = 0 * y[i,r] + x[i,c] * (y[i,r] + 2.0 * x[i,c])", "2.0 * x[i,c]"),
])
def test_summed_index_rule_sees_through_parentheses_and_distributing_operators(statement, culprit):
    text = RULE_SPEC.format(statement)
    with pytest.raises(attncc.SpecError) as info:
        attncc.load(text)
    err = info.value
    assert "is summed but this term does not use it" in err.message
    assert "its own statement" in err.expected
    assert err.line == 2
    line = text.splitlines()[1]
    assert line[err.column - 1:].startswith(culprit), (line, err.column)
    assert "^" * len(culprit) in str(err)


def test_content_plus_positional_score_is_rejected_with_a_way_out():
    text = """attention t(q[B,H,N,D], k[B,H,M,D], qr[B,H,N,P], kr[B,H,M,P], v[B,H,M,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = (q[b,h,i,d] * k[b,h,j,d] + qr[b,h,i,r] * kr[b,h,j,r]) * D ** -0.5
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""
    with pytest.raises(attncc.SpecError) as info:
        attncc.load(text)
    assert (info.value.line, info.value.column) == (2, 17)
    assert "`s1[b,h,i,j] = ...`" in info.value.expected and "s = s1 + s2" in info.value.expected


def test_content_plus_positional_score_written_as_two_sums_works():
    spec = """attention t(q[B,H,N,D], k[B,H,M,D], qr[B,H,N,P], kr[B,H,M,P], v[B,H,M,E]) -> o[B,H,N,E] {
      s1[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]
      s2[b,h,i,j] = qr[b,h,i,r] * kr[b,h,j,r]
      s = (s1 + s2) * D ** -0.5
      p = softmax(s, j)
      o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
    }"""
    q, k, v = qkv()
    qr, kr = torch.randn(B, H, N, 2, dtype=torch.float64), torch.randn(B, H, M, 2, dtype=torch.float64)
    got = reference(spec, 2)(q=q, k=k, qr=qr, kr=kr, v=v)
    s = (q @ k.transpose(-1, -2) + qr @ kr.transpose(-1, -2)) * D ** -0.5
    same(got, torch.softmax(s, dim=-1) @ v)


@pytest.mark.parametrize("statement, want", [
    ("o[i] = (x[i,c] + 2.0 * x[i,c]) * 0.5", lambda x, w: (1.5 * x).sum(1)),
    ("o[i] = -(x[i,c] - w[c]) / 2", lambda x, w: (-(x - w) / 2).sum(1)),
    ("o[i] = (x[i,c] + 1.0) / w[c]", lambda x, w: ((x + 1) / w).sum(1)),
    ("o[i] = where(i > 0, x[i,c], 0.0)", lambda x, w: torch.where(torch.arange(3)[:, None] > 0, x, 0.0).sum(1)),
    ("o[i] = where(c > 1, x[i,c], 1.0)", lambda x, w: torch.where(torch.arange(4) > 1, x, 1.0).sum(1)),
    ("o[i] = exp(x[i,c] + 1.0) * (x[i,c] + w[c])", lambda x, w: (torch.exp(x + 1) * (x + w)).sum(1)),
    # a factor that depends on c carries c into every term it multiplies, as `** 2` would
    ("o[i] = (x[i,c] - x[i,0]) * (x[i,c] - x[i,0])", lambda x, w: ((x - x[:, :1]) ** 2).sum(1)),
    ("o[i] = (x[i,c] + 1.0) * w[c] - 0 * x[i,0]", lambda x, w: ((x + 1) * w).sum(1)),
])
def test_terms_that_all_carry_the_summed_index_are_accepted(statement, want):
    x = torch.randn(3, 4, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    got = reference(f"attention t(x[A,C], w[C]) -> o[A] {{\n  {statement} + 0.0 * w[c]\n}}")(x=x, w=w)
    same(got, want(x, w))


# --------------------------------------------------------------------------- long chains

@pytest.mark.parametrize("block", [2, 256])
def test_chained_updates_need_no_recursion_per_update(block):
    """A chain of updates is a chain of nodes, each reading the last: the executor walks it
    with an explicit stack. Run under a recursion limit only 100 frames above the caller's,
    150 updates (deep as the front end allows, which is more than that) would otherwise fail."""
    lines = [f"  s += 0.001 * (j - i) * {n % 3}" for n in range(150)]
    spec = causal_by("\n".join(lines)).replace("-> o[B,H,N,E] {", "-> o[B,H,N,E] {\n  mask j <= i + (M - N)")
    kernel = reference(spec, block)
    q, k, v = qkv()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 100)
    try:
        got = kernel(q=q, k=k, v=v)
    finally:
        sys.setrecursionlimit(limit)
    bias = 0.001 * 150 * (torch.arange(M)[None, :] - torch.arange(N)[:, None]).to(torch.float64)
    same(got, torch_attention(q, k, v, causal_allowed(), scores=lambda s: s + bias))


def test_topk_ranks_nan_first_as_torch_topk_does():
    spec = """attention t(x[A,6]) -> (o[A,6], c[A,6]) {
      o = topk(x[a,j], 2, j)
      c = topk_mask(x[a,j], 2, j)
    }"""
    x = torch.tensor([[1.0, NAN, 3.0, 2.0, -INF, 0.0], [-INF, -INF, -INF, 1.0, NAN, NAN]], dtype=torch.float64)
    o, c = reference(spec)(x=x)
    chosen = torch.zeros_like(c)
    chosen.scatter_(1, torch.topk(x, 2, dim=1).indices, True)
    assert c.tolist() == chosen.tolist()
    same(o, torch.where(chosen, x, 0.0))


def test_chained_transposing_reads_build_each_tensor_once(monkeypatch):
    """`s[b,h,i,j] = s[b,h,j,i]` reads the whole streamed `s` in every stream block; each
    whole tensor is built once, not once per block of each reader (blocks ** chain length)."""
    spec = causal_by("\n".join(["  s[b,h,i,j] = s[b,h,j,i] * 1.0"] * 4)).replace(
        "-> o[B,H,N,E] {", "-> o[B,H,N,E] {\n  require N == M")
    kernel = reference(spec, 1)
    calls = []
    full = Reference.full
    monkeypatch.setattr(Reference, "full", lambda self, node: calls.append(node) or full(self, node))
    q, k, v = qkv(m=N)
    same(kernel(q=q, k=k, v=v), torch_attention(q, k, v))  # four transposes are none
    assert len(calls) <= 8, len(calls)


@pytest.mark.parametrize("block", [2, 256])
def test_masked_integer_and_boolean_reductions_keep_their_type(block):
    spec = """attention t(n[N,N]: int, c[N,N]: bool) -> (o[N], s[N], m[N], a[N]) {
      mask j <= i
      o = amax(n[i,j], j)
      s = sum(n[i,j], j)
      m = amin(n[i,j], i)
      a = amax(c[i,j], j)
    }"""
    n = torch.randint(-5, 5, (5, 5), generator=torch.Generator().manual_seed(5))
    c = n > 0
    o, s, m, a = reference(spec, block)(n=n, c=c)
    lower = causal_allowed(5, 5)
    assert o.dtype == s.dtype == m.dtype == torch.int64 and a.dtype == torch.bool
    big = torch.iinfo(torch.int64)
    assert o.tolist() == n.masked_fill(~lower, big.min).amax(1).tolist()
    assert s.tolist() == n.masked_fill(~lower, 0).sum(1).tolist()
    assert m.tolist() == n.masked_fill(~lower, big.max).amin(0).tolist()
    assert a.tolist() == (c & lower).any(1).tolist()
