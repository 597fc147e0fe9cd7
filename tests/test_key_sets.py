"""One softmax over several key sets (`p, ps = softmax(s, j, ss, c)`): the gallery's
`window_summary` and `epipolar_views` against float64 oracles written here from the
contracts' text (VARIANTS.md section 3), on both backends (generated kernels in the
interpreter), a generic joint-softmax spec, gradients, and the errors of the syntax."""
import math
import os

import pytest
import torch

import attncc
from attncc.binding import bind
from attncc.codegen.stream_kernel import generate_streams
from attncc.reference import Reference

BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def close(x, want, what, tol=1e-4):
    assert x.shape == want.shape, f"{what}: shape {tuple(x.shape)} != {tuple(want.shape)}"
    err = float((x.double() - want).abs().max()) if want.numel() else 0.0
    assert err <= tol * max(1.0, float(want.abs().max()) if want.numel() else 1.0), f"{what}: off by {err:.3g}"


def close_lse(lse, want, what="lse"):
    assert torch.equal(lse.isneginf(), want.isneginf()), f"{what}: empty rows differ"
    close(lse.nan_to_num(neginf=0.0), want.nan_to_num(neginf=0.0), what)


def joint(sets, values):
    """One softmax over the concatenated key sets: `sets` are (scores [B,H,N,K], allowed
    broadcastable to it), `values` [B,H,K,E]. A row with nothing allowed gets o = 0 and
    lse = -inf."""
    logits = torch.cat([s.double().masked_fill(~a, -math.inf) for s, a in sets], dim=-1)
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - lse[..., None].nan_to_num(neginf=0.0)).nan_to_num(0.0)
    return torch.einsum("bhik,bhke->bhie", p, torch.cat([v.double() for v in values], dim=-2)), lse


def heads(t, h):
    """Key/value heads [B,G,...] as query heads [B,H,...]: head h reads h // (H // G)."""
    return t.repeat_interleave(h // t.shape[1], dim=1)


def scores(q, k):
    return torch.einsum("bhid,bhjd->bhij", q.double(), heads(k, q.shape[1]).double()) * q.shape[-1] ** -0.5


# ------------------------------------------------------------------------- window_summary
def window_summary_oracle(q, k, v, ks, vs, ks_end, window=256, sinks=0, ks_bias=None):
    """The contract: i' = i + M - N; e(i) the largest ks_end[b,c] <= i' - window (-1 if none);
    summary c allowed iff ks_end[b,c] <= e(i), logit q . ks * scale + ks_bias; raw key j
    allowed iff j <= i' and (j > e(i) or j < sinks)."""
    B, H, N, _ = q.shape
    M, C = k.shape[2], ks.shape[2]
    ip = torch.arange(N) + M - N
    e = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        for i in range(N):
            ends = [int(x) for x in ks_end[b] if int(x) <= ip[i] - window]
            e[b, i] = max(ends) if ends else -1
    summary_ok = ks_end[:, None, :] <= e[:, :, None]                    # [B,N,C]
    j = torch.arange(M)
    raw_ok = (j[None, None, :] <= ip[None, :, None]) & ((j > e[:, :, None]) | (j < sinks))
    ss = scores(q, ks)
    if ks_bias is not None:
        ss = ss + heads(ks_bias, H).double()[:, :, None, :]
    return joint([(scores(q, k), raw_ok[:, None]), (ss, summary_ok[:, None])], [heads(v, H), heads(vs, H)])


def window_inputs(B=2, H=4, G=2, N=13, M=29, C=5, D=8, E=6, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = dict(q=torch.randn(B, H, N, D, generator=g), k=torch.randn(B, G, M, D, generator=g),
             v=torch.randn(B, G, M, E, generator=g), ks=torch.randn(B, G, C, D, generator=g),
             vs=torch.randn(B, G, C, E, generator=g))
    # increasing summary ends, different per batch
    ends = torch.sort(torch.randperm(M, generator=g)[:C * B].reshape(B, C) % M, dim=1).values
    x["ks_end"] = ends + torch.arange(C)  # strictly increasing
    if bias:
        x["ks_bias"] = torch.randn(B, G, C, generator=g)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,window,sinks", [
    (dict(), 6, 0),                        # GQA (H=4, G=2), N < M: some, none and all summaries
    (dict(H=3, G=1, N=17, M=17), 4, 2),    # MQA, N == M, sinks
    (dict(N=21, M=25, C=3, D=16, E=5), 30, 1),  # a window longer than M: no summary, causal raw keys
    (dict(N=9, M=33, C=4), 0, 3),          # window 0: every summary ending at or before i'
])
def test_window_summary(backend, shape, window, sinks):
    x = window_inputs(**shape)
    kernel = attncc.compile("examples/window_summary.attn", backend=backend)
    o, lse = kernel(**x, window=window, sinks=sinks, return_lse=True)
    want_o, want_lse = window_summary_oracle(**x, window=window, sinks=sinks)
    close(o, want_o, "o")
    close_lse(lse, want_lse)
    assert kernel.last_run["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sinks", [0, 2])
def test_window_summary_long_rows_skip_summarised_tiles(backend, sinks):
    """N = M = 70 with a short window: the raw-key pass starts each row tile after the
    smallest `last` of its rows (a bound read from data), and must still be exact."""
    x = window_inputs(B=1, H=2, G=1, N=70, M=70, C=6, D=8, E=4, seed=9)
    x["ks_end"] = torch.tensor([[7, 15, 23, 31, 47, 55]])
    kernel = attncc.compile("examples/window_summary.attn", backend=backend)
    o, lse = kernel(**x, window=8, sinks=sinks, return_lse=True)
    want_o, want_lse = window_summary_oracle(**x, window=8, sinks=sinks)
    close(o, want_o, "o")
    close_lse(lse, want_lse)
    if backend == "triton":
        assert "a bound read from the rows' data" in kernel.generated.source.source


@pytest.mark.parametrize("shape", [dict(B=1, H=1, G=1, N=1, M=40, C=5, E=1), dict(N=13, M=29, C=7)])
def test_window_summary_reference_in_stream_chunks(shape):
    """The reference executor streams one index in chunks: the query rows, or for a single
    query (decoding) a key set's own axis, whose log-sum-exp is then folded over the chunks."""
    x = window_inputs(**shape, seed=11)
    program = attncc.load("examples/window_summary.attn")
    call = bind(program, {**x, "window": 6, "sinks": 1})
    assert Reference(program, call.tensors, call.scalars, 5).chunk_index == ("j" if shape["N"] == 1 else "i")
    kernel = attncc.compile("examples/window_summary.attn", backend="reference", reference_block=5)
    o, lse = kernel(**x, window=6, sinks=1, return_lse=True)
    want_o, want_lse = window_summary_oracle(**x, window=6, sinks=1)
    close(o, want_o, "o")
    close_lse(lse, want_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_summary_counts_of_allowed_summaries(backend):
    """Rows that see no summary, some, and all of them, checked to occur."""
    x = window_inputs(N=16, M=16, C=3, bias=False)
    x["ks_end"] = torch.tensor([[1, 4, 7], [0, 2, 9]])
    window = 3
    kernel = attncc.compile("examples/window_summary.attn", backend=backend)
    o = kernel(**x, window=window)
    close(o, window_summary_oracle(**x, window=window)[0], "o")
    seen = {sum(int(e) <= i - window for e in x["ks_end"][0]) for i in range(16)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_summary_without_summaries(backend):
    """C == 0: only the causal raw keys (empty tensors bind and run)."""
    x = window_inputs(C=0, bias=False)
    kernel = attncc.compile("examples/window_summary.attn", backend=backend)
    o, lse = kernel(**x, window=4, return_lse=True)
    want_o, want_lse = window_summary_oracle(**x, window=4)
    close(o, want_o, "o")
    close_lse(lse, want_lse)
    assert kernel.last_run["backend"] == backend


@pytest.mark.parametrize("name,streams", [("window_summary", ["j", "c"]), ("epipolar_views", ["t", "j"])])
def test_the_general_plan_streams_the_key_sets_in_one_pass(name, streams):
    """One pass kernel streams both key sets one after another with ONE online normaliser:
    the first set's log-sum-exp accumulator is joint (the later set is a part of it that
    updates the same running maximum and sum), both value sums are online with it, and the
    torch epilogue reads no log-sum-exp (no merge); the outputs add the sets' value sums, so
    the second set's continues the first's accumulator; the printable plan and the kernel's
    comments say so, and the raw-key stream of window_summary visits only the causal hull."""
    from attncc.passes.streams import Reduction, _walk, plan_streams, torch_form
    plan = plan_streams(attncc.load(f"examples/{name}.attn"))
    assert len(plan.passes) == 1 and not plan.apart
    (p,) = plan.passes
    assert [seg.stream for seg in p.segments()] == streams
    lses = []
    for seg in p.segments():
        kinds = sorted(a.kind.name for a in seg.accumulators)
        assert kinds == ["DOT", "LSE"], kinds
        lses.append(next(a for a in seg.accumulators if a.kind is Reduction.LSE))
    head, part = lses
    assert head.parts == [part] and part.joint is head and head.joint is None
    dots = [next(a for a in seg.accumulators if a.kind is Reduction.DOT) for seg in p.segments()]
    assert all(a.online is head for a in dots)
    assert dots[1].into is dots[0] and dots[1].node not in plan.results  # o = a + b: one sum
    assert part.node not in plan.results or part.node is head.node  # one stored log-sum-exp
    stored = plan.results[head.node]
    for _, node in plan.outputs:  # the epilogue only adds the normalised sums: no merge by LSE
        assert not any(getattr(n, "array", None) is stored for n in _walk(torch_form(plan, node, {}), lambda n: False))
    text = plan.describe()
    assert "1 generated pass(es)" in text and "one online normaliser" in text
    assert f"joint over '{streams[0]}', '{streams[1]}'" in text
    assert f"streams '{streams[0]}', then '{streams[1]}'" in text
    if name == "window_summary":
        assert p.mask_plan is not None  # the causal bound of the raw keys
    source = generate_streams(plan, name).source
    assert source.count("for start_n in range(") == 2 and source.count("@triton.jit") == 1
    assert "one online normaliser for the key sets" in source and "added into acc0" in source


# ------------------------------------------------------------------------- epipolar_views
def epipolar_views_oracle(q, k, v, F, kr, vr, views, height, width, stride=8.0, tau=4.0, same_view=False,
                          offset=-0.5):
    """The contract: pixel x = ((col+0.5)*stride + offset, (row+0.5)*stride + offset, 1);
    a cross-view pair is allowed iff the key pixel is within tau of the line l = F x_i
    (|l . x_j| / sqrt(l0^2 + l1^2) < tau; l0 = l1 = 0 allows nothing); a same-view pair iff
    `same_view`; the R register keys come first and are always allowed. The predicate is
    computed in F's dtype (fp32), as a kernel does."""
    H = q.shape[1]
    P = height * width
    n = torch.arange(views * P)
    view, row, col = n // P, n % P // width, n % width
    x = torch.stack([(col + 0.5) * stride + offset, (row + 0.5) * stride + offset, torch.ones(len(n))], -1).to(F.dtype)
    line = torch.einsum("bijxy,iy->bijx", F[:, view][:, :, view], x)          # [B,N,M,3]
    dist_num = torch.einsum("bijx,jx->bij", line, x).abs()
    norm = torch.sqrt(line[..., 0] ** 2 + line[..., 1] ** 2)
    cross = (view[:, None] != view[None, :]) & (norm > 0) & (dist_num < tau * norm)
    same = (view[:, None] == view[None, :]) & same_view
    allowed = (cross | same)[:, None]
    s = scores(q, k)
    registers = torch.ones(s.shape[:-1] + (kr.shape[2],), dtype=torch.bool)
    return joint([(scores(q, kr), registers), (s, allowed)], [heads(vr, H), heads(v, H)])


def epipolar_inputs(B=2, H=2, G=2, views=3, height=2, width=3, R=2, D=8, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = views * height * width
    F = torch.randn(B, views, views, 3, 3, generator=g)
    if views > 1:
        F[0, 0, 1] = 0.0  # a degenerate line: view 0 sees nothing of view 1 in batch 0
    return dict(q=torch.randn(B, H, N, D, generator=g), k=torch.randn(B, G, N, D, generator=g),
                v=torch.randn(B, G, N, E, generator=g), F=F * 0.05, kr=torch.randn(B, G, R, D, generator=g),
                vr=torch.randn(B, G, R, E, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,params", [
    (dict(), dict(tau=6.0)),                                           # R > 0, cross-view only
    (dict(H=4, G=2, R=3), dict(same_view=True, offset=0.0)),           # GQA, same view allowed
    (dict(H=3, G=1, R=0, views=2), dict(tau=20.0, stride=4.0)),        # MQA, no registers
    (dict(R=0, views=1, height=3, width=4), dict()),                   # one view, no registers: empty rows
])
def test_epipolar_views(backend, shape, params):
    x = epipolar_inputs(**shape)
    geometry = dict(views=shape.get("views", 3), height=shape.get("height", 2), width=shape.get("width", 3))
    kernel = attncc.compile("examples/epipolar_views.attn", backend=backend)
    o, lse = kernel(**x, **geometry, **params, return_lse=True)
    want_o, want_lse = epipolar_views_oracle(**x, **geometry, **params)
    close(o, want_o, "o")
    close_lse(lse, want_lse)
    assert kernel.last_run["backend"] == backend


# ------------------------------------------------------------------------- a generic joint softmax
GENERIC = """attention joint3(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], ks[B,H,C,D], vs[B,H,C,E], sinks[H]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  ss[b,h,i,c] = q[b,h,i,d] * ks[b,h,c,d] * 0.25
  mask j <= i + (M - N)
  mask c % 2 == i % 2
  p, ps = softmax(s, j, ss, c, sinks[h])
  o1[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  o2[b,h,i,e] = ps[b,h,i,c] * vs[b,h,c,e]
  o = o1 - 0.5 * o2
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_joint_softmax_with_a_sink(backend, tmp_path):
    """Two key sets with their own masks, a sink logit, and sets' outputs combined with a
    coefficient: each set's weights share one denominator."""
    path = tmp_path / "joint3.attn"
    path.write_text(GENERIC)
    g = torch.Generator().manual_seed(3)
    B, H, N, M, C, D, E = 2, 3, 11, 14, 7, 8, 5
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, M, D, generator=g), \
        torch.randn(B, H, M, E, generator=g)
    ks, vs, sinks = torch.randn(B, H, C, D, generator=g), torch.randn(B, H, C, E, generator=g), \
        torch.randn(H, generator=g)
    kernel = attncc.compile(path, backend=backend)
    o, lse = kernel(q=q, k=k, v=v, ks=ks, vs=vs, sinks=sinks, return_lse=True)
    i = torch.arange(N)[:, None]
    raw_ok = torch.arange(M)[None, :] <= i + (M - N)
    sum_ok = torch.arange(C)[None, :] % 2 == i % 2
    ss = torch.einsum("bhid,bhcd->bhic", q.double(), ks.double()) * 0.25
    sink = sinks.double()[None, :, None, None].expand(B, H, N, 1)
    _, want_lse = joint([(scores(q, k), raw_ok), (ss, sum_ok), (sink, torch.ones(1, dtype=torch.bool))],
                        [v, vs, torch.zeros(B, H, 1, E)])
    w = lambda s, ok: torch.exp(s.masked_fill(~ok, -math.inf) - want_lse[..., None])  # noqa: E731
    want_o = w(scores(q, k), raw_ok) @ v.double() - 0.5 * w(ss, sum_ok) @ vs.double()
    close(o, want_o, "o")
    close_lse(lse, want_lse)


RESCALE = """attention rescale(q[B,H,N,D], k[B,G,M,D], v[B,G,M,E], ks[B,G,C,D], vs[B,G,C,E]) -> o[B,H,N,E] {
  param boost: float = 1.0
  require H % G == 0
  let R = H // G
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // R,j,d] * D ** -0.5
  ss[b,h,i,c] = q[b,h,i,d] * ks[b,h // R,c,d] * D ** -0.5
  ss += boost
  mask j < i - 2
  mask c < i % 4
  p, ps = softmax(s, j, ss, c)
  o1[b,h,i,e] = p[b,h,i,j] * v[b,h // R,j,e]
  o2[b,h,i,e] = ps[b,h,i,c] * vs[b,h // R,c,e]
  o = o1 + OTHER
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("boost", [12.0, -12.0, 0.0])
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_joint_normaliser_rescales_in_the_second_set(backend, boost, weight):
    """GQA, N != M, D != E, rows with no key in either set (o = 0, lse = -inf), rows with
    only raw keys and rows with only summaries; a boost of 12 makes the summaries' logits the row
    maxima (the running maximum rises in the second stream, so the first set's finished sum
    is rescaled), -12 keeps the maximum in the first set. o and the joint lse against the
    float64 oracle of one softmax over the concatenated sets. `o = o1 + o2` shares one value
    accumulator (the second set continues the first's); `o = o1 + 0.5 * o2` keeps two, the
    first rescaled at the end."""
    from attncc.passes.streams import plan_streams
    spec = RESCALE.replace("OTHER", "o2" if weight == 1.0 else f"{weight} * o2")
    (p,) = plan_streams(attncc.load(spec)).passes
    kept = [a for a in p.all_accumulators() if a.value is not None and a.into is None]
    assert len(kept) == (1 if weight == 1.0 else 2)
    g = torch.Generator().manual_seed(21)
    B, H, G, N, M, C, D, E = 1, 4, 2, 23, 19, 5, 8, 6
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, G, M, D, generator=g), \
        torch.randn(B, G, M, E, generator=g)
    ks, vs = torch.randn(B, G, C, D, generator=g), torch.randn(B, G, C, E, generator=g)
    i = torch.arange(N)[:, None]
    raw_ok, sum_ok = torch.arange(M)[None, :] < i - 2, torch.arange(C)[None, :] < i % 4
    ss = scores(q, ks) + boost
    want_o, want_lse = joint([(scores(q, k), raw_ok), (ss, sum_ok)], [heads(v, H), weight * heads(vs, H)])
    empty = ~(raw_ok.any(-1) | sum_ok.any(-1))
    assert empty.any() and (raw_ok.any(-1) & ~sum_ok.any(-1)).any() and (sum_ok.any(-1) & ~raw_ok.any(-1)).any()
    top_raw = scores(q, k).masked_fill(~raw_ok, -math.inf).amax(-1)
    top_sum = ss.masked_fill(~sum_ok, -math.inf).amax(-1)
    both = raw_ok.any(-1) & sum_ok.any(-1)
    rises = (top_sum > top_raw)[..., both]
    assert bool(rises.all()) if boost > 0 else not bool(rises.any()) if boost < 0 else True
    kernel = attncc.compile(spec, backend=backend)
    o, lse = kernel(q=q, k=k, v=v, ks=ks, vs=vs, boost=boost, return_lse=True)
    close(o, want_o, "o")
    close_lse(lse, want_lse)
    assert float(o[..., empty, :].abs().max()) == 0.0
    assert kernel.last_run["backend"] == backend


APART = """attention apart(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], ks[B,H,C,D], vs[B,H,C,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  top[b,h,i] = amax(s, j)
  ss[b,h,i,c] = q[b,h,i,d] * ks[b,h,c,d] * 0.25
  ss -= top[b,h,i]
  p, ps = softmax(s, j, ss, c)
  o1[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  o2[b,h,i,e] = ps[b,h,i,c] * vs[b,h,c,e]
  o = o1 + o2
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_sets_reading_a_statistic_of_a_set_share_a_later_pass(backend, tmp_path):
    """A key set whose scores read a row statistic of the other set (`amax(s, j)`): the
    statistic is a pass of its own, and the joint normaliser streams both sets a level later,
    matching the float64 oracle."""
    from attncc.passes.streams import plan_streams
    path = tmp_path / "apart.attn"
    path.write_text(APART)
    plan = plan_streams(attncc.load(path))
    assert [(p.level, p.stream, [s.stream for s in p.then]) for p in plan.passes] == [(0, "j", []), (1, "j", ["c"])]
    assert not plan.apart
    g = torch.Generator().manual_seed(5)
    B, H, N, M, C, D, E = 1, 2, 9, 12, 5, 8, 3
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, M, D, generator=g), \
        torch.randn(B, H, M, E, generator=g)
    ks, vs = torch.randn(B, H, C, D, generator=g), torch.randn(B, H, C, E, generator=g)
    o = attncc.compile(path, backend=backend)(q=q, k=k, v=v, ks=ks, vs=vs)
    s = scores(q, k)
    ss = torch.einsum("bhid,bhcd->bhic", q.double(), ks.double()) * 0.25 - s.amax(-1, keepdim=True)
    everything = torch.ones(1, dtype=torch.bool)
    want_o, _ = joint([(s, everything), (ss, everything)], [v, vs])
    close(o, want_o, "o")


# ------------------------------------------------------------------------- learned sinks still work
@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_sinks_is_a_one_key_special_case(backend, tmp_path):
    """`softmax(s, j, sinks[h])` equals a joint softmax with a one-entry key set of logit
    sinks[h] and value 0."""
    g = torch.Generator().manual_seed(4)
    B, H, N, M, D, E = 1, 2, 9, 12, 8, 4
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, M, D, generator=g), \
        torch.randn(B, H, M, E, generator=g)
    sinks = torch.randn(H, generator=g)
    spec = tmp_path / "as_sets.attn"
    spec.write_text("""attention as_sets(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], sinks[H,Z]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  one[b,h,i,z] = sinks[h,z] + 0.0 * q[b,h,i,0]
  mask j <= i + (M - N)
  p, p0 = softmax(s, j, one, z)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
""")
    from attncc.passes.streams import plan_streams
    plan = plan_streams(attncc.load(spec))  # the one-entry set has no tile dot: planned apart, merged by torch
    assert plan.apart == ["the key sets of line 5: `p, p0 = softmax(s, j, one, z)`: a set's scores hold no tile dot"]
    want = attncc.compile("examples/learned_sinks.attn", backend="reference")(q=q, k=k, v=v, sinks=sinks)
    got = attncc.compile(spec, backend=backend)(q=q, k=k, v=v, sinks=sinks[:, None])
    close(got, want.double(), "sets")
    close(attncc.compile("examples/learned_sinks.attn", backend=backend)(q=q, k=k, v=v, sinks=sinks),
          want.double(), "learned_sinks")


# ------------------------------------------------------------------------- gradients
def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_summary_gradients(backend):
    x = window_inputs(N=11, M=19, C=4, seed=5)
    names = ["q", "k", "v", "ks", "vs", "ks_bias"]
    x64 = {n: (t.double().requires_grad_() if n in names else t) for n, t in x.items()}
    x32 = {n: (t.clone().requires_grad_() if n in names else t) for n, t in x.items()}
    w = torch.randn(2, 4, 11, 6, generator=torch.Generator().manual_seed(6))
    kernel = attncc.compile("examples/window_summary.attn", backend=backend)
    (kernel(**x32, window=5, sinks=1) * w).sum().backward()
    want_o, _ = window_summary_oracle(**x64, window=5, sinks=1)
    want = _grads((want_o * w.double()).sum(), [x64[n] for n in names])
    for n, gw in zip(names, want):
        close(x32[n].grad, gw, f"d{n}")
    assert kernel.last_run["backward"] == ("triton" if backend == "triton" else "reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_epipolar_views_gradients(backend):
    x = epipolar_inputs(H=4, G=2, R=2, seed=7)
    geometry = dict(views=3, height=2, width=3, tau=6.0)
    names = ["q", "k", "v", "kr", "vr"]
    x64 = {n: (t.double().requires_grad_() if n in names else t) for n, t in x.items()}
    x32 = {n: (t.clone().requires_grad_() if n in names else t) for n, t in x.items()}
    w = torch.randn(2, 4, 18, 5, generator=torch.Generator().manual_seed(8))
    kernel = attncc.compile("examples/epipolar_views.attn", backend=backend)
    (kernel(**x32, **geometry) * w).sum().backward()
    want_o, _ = epipolar_views_oracle(**x64, **geometry)
    want = _grads((want_o * w.double()).sum(), [x64[n] for n in names])
    for n, gw in zip(names, want):
        close(x32[n].grad, gw, f"d{n}")
    assert kernel.last_run["backward"] == ("triton" if backend == "triton" else "reference")


# ------------------------------------------------------------------------- errors
HEAD = "attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], ks[B,H,C,D], w[B,N,C]) -> o[B,H,N,E] {\n" \
       "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n  ss[b,h,i,c] = q[b,h,i,d] * ks[b,h,c,d]\n"
TAIL = "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e] + 0.0 * w[b,i,0]\n}\n"


@pytest.mark.parametrize("line,why,caret", [
    ("  p, ps = softmax(s, j, ss, x)", "'softmax' along 'x', which is not an index of its operand", "x)"),
    ("  p, ps, pt = softmax(s, j, ss, c)", "3 names on the left, but this softmax has 2 key sets", "softmax"),
    ("  p = softmax(s, j, ss, c)", "this softmax over 2 key sets makes 2 tensors", "softmax"),
    ("  p, ps = softmax(s, j, w[b,i,c], c)", "key set 2 has the row indices (b, i) besides its axis 'c'", "w[b,i,c], c"),
    ("  p, ps = softmax(s, j, ss, c, ss)", "the sink logit depends on 'c'", "ss)"),
    ("  p, ps = softmax(s, j, s, j)", "the same key set twice", "s, j)"),
    ("  p, ps = amax(s, j)", "2 names on the left need a softmax over 2 key sets", "amax"),
    ("  p, p = softmax(s, j, ss, c)", "'p' cannot name a key set's weights", "p ="),
    ("  p = softmax(s, j, ss)", "the sink logit has index 'c', which the scores lack", "ss)"),
])
def test_key_set_errors_are_located(line, why, caret):
    text = HEAD + line + "\n" + TAIL
    with pytest.raises(attncc.SpecError) as err:
        attncc.compile(text, backend="reference")
    message = str(err.value)
    assert why in message, message
    lines = message.splitlines()
    shown = next(k for k, ln in enumerate(lines) if ln.strip() == line.strip())
    col = lines[shown + 1].index("^")
    assert lines[shown][col:].startswith(caret), message


def test_row_data_bounds_read_from_mask_atoms():
    """The atoms that cut a row tile's streamed range at the extreme of a per-row integer
    (`j > last[b,i]`), with the side, sign and inclusive offset; others are left alone."""
    import sympy
    from attncc.codegen.stream_kernel import _row_data_bound
    i, j = sympy.Symbol("i", integer=True), sympy.Symbol("j", integer=True)
    f = sympy.Function("opaque0")(i)
    rows = {"opaque0": "last"}
    assert _row_data_bound(sympy.StrictGreaterThan(j - f, 0), j, rows, "i") == ("lo", "last", 1, 1)
    assert _row_data_bound(sympy.GreaterThan(j, f + 2), j, rows, "i") == ("lo", "last", 1, 2)
    assert _row_data_bound(sympy.StrictLessThan(j, 3 - f), j, rows, "i") == ("hi", "last", -1, 2)
    assert _row_data_bound(sympy.GreaterThan(f - j, 0), j, rows, "i") == ("hi", "last", 1, 0)
    assert _row_data_bound(sympy.StrictGreaterThan(j - f - i, 0), j, rows, "i") is None  # also the row index
    assert _row_data_bound(sympy.StrictGreaterThan(2 * j - f, 0), j, rows, "i") is None   # not unit in j
    assert _row_data_bound(sympy.StrictGreaterThan(j - sympy.Function("opaque1")(i), 0), j, rows, "i") is None
