"""The gallery contracts of VARIANTS.md section 3 that the language says today: `prob_columns`
and `label_causal`, against float64 oracles written here from the contracts' text (dense
softmax over the allowed keys), on both backends (generated kernels in the interpreter)."""
import math
import os

import pytest
import torch

import attncc

B, H, N, M, D, E = 2, 3, 19, 23, 12, 10
BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g), torch.randn(B, H, M, D, generator=g),
            torch.randn(B, H, M, E, generator=g))


def dense(q, k, v, allowed):
    """p = softmax over the allowed keys (a row with none: 0), o = p v, and the LSE."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * D ** -0.5
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None].nan_to_num(neginf=0.0)).nan_to_num(0.0)
    return p, torch.einsum("bhij,bhje->bhie", p, v.double()), lse


def close(x, want, what):
    err = float((x.double() - want).abs().max())
    assert err <= 1e-4 * max(1.0, float(want.abs().max())), f"{what}: off by {err:.3g}"


CAUSAL = torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_prob_columns(backend, causal):
    q, k, v = qkv(1)
    cols = torch.randint(0, M, (B, 5), generator=torch.Generator().manual_seed(2))
    cols[0, 0] = M - 1  # a column the causal mask hides from the first rows
    kernel = attncc.compile("examples/prob_columns.attn", backend=backend)
    o, pm = kernel(q=q, k=k, v=v, cols=cols, causal=causal)
    p, want_o, _ = dense(q, k, v, CAUSAL if causal else torch.ones(N, M, dtype=torch.bool))
    want_pm = torch.stack([p[b][:, :, cols[b]] for b in range(B)])
    close(o, want_o, "o")
    close(pm, want_pm, "pm")
    if causal:  # masked columns give 0
        assert float(pm[0, :, 0, 0].abs().max()) == 0.0
    assert kernel.last_run["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_prob_columns_is_differentiable_through_pm(backend):
    q, k, v = (t.double().requires_grad_() for t in qkv(3))
    cols = torch.tensor([[0, 4, 4], [M - 1, 2, 7]])
    kernel = attncc.compile("examples/prob_columns.attn", backend=backend)
    _, pm = kernel(q=q.float(), k=k.float(), v=v.float(), cols=cols, causal=True)
    pm.square().sum().backward()
    p, _, _ = dense(q, k, v, CAUSAL)
    want = torch.stack([p[b][:, :, cols[b]] for b in range(B)])
    gq, = torch.autograd.grad(want.square().sum(), q)
    close(q.grad, gq, "dq")


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_causal(backend):
    q, k, v = qkv(4)
    g = torch.Generator().manual_seed(5)
    labels = 3
    label_q, label_k = torch.randint(0, labels, (B, N), generator=g), torch.randint(0, labels, (B, M), generator=g)
    rule = torch.tensor([[1, 0, 2], [2, 1, 0], [0, 0, 1]], dtype=torch.int8)
    label_k[0] %= 2  # no key of label 2 in batch 0: a query of label 2 there has no key at all
    label_q[0, 3] = 2
    kernel = attncc.compile("examples/label_causal.attn", backend=backend)
    o, lse = kernel(q=q, k=k, v=v, label_q=label_q, label_k=label_k, rule=rule, return_lse=True)
    r = rule.long()[label_q[:, :, None], label_k[:, None, :]]
    allowed = ((r == 2) | ((r == 1) & CAUSAL))[:, None]
    _, want_o, want_lse = dense(q, k, v, allowed)
    close(o, want_o, "o")
    assert torch.equal(lse.isinf(), want_lse.isinf())
    close(lse.nan_to_num(neginf=0.0), want_lse.nan_to_num(neginf=0.0), "lse")
    assert bool(want_lse.isinf().any()), "the rule should leave some row with no key"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_column_mass(backend, causal):
    q, k, v = qkv(6)
    rows = torch.rand(B, N, generator=torch.Generator().manual_seed(7)) > 0.4
    kernel = attncc.compile("examples/column_mass.attn", backend=backend)
    allowed = CAUSAL if causal else torch.ones(N, M, dtype=torch.bool)
    p, want_o, _ = dense(q, k, v, allowed)
    for given in (rows, None):  # `rows` is optional: every row when left out
        o, colsum = kernel(q=q, k=k, v=v, causal=causal, **({"rows": given} if given is not None else {}))
        chosen = given if given is not None else torch.ones(B, N, dtype=torch.bool)
        close(o, want_o, "o")
        close(colsum, (p * chosen[:, None, :, None]).sum(2), "colsum")
    assert kernel.signature.parameters["rows"].default is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,normalize", [(False, True), (True, True), (True, False)])
def test_linear_kernel(backend, causal, normalize):
    g = torch.Generator().manual_seed(8)
    heads, groups = 4, 2
    q = torch.rand(B, heads, M, D, generator=g)  # featurised (positive) queries and keys: den > 0
    k = torch.rand(B, groups, M, D, generator=g)
    v = torch.randn(B, groups, M, E, generator=g)
    lam = 0.5 + 0.5 * torch.rand(heads, generator=g)
    kw = torch.rand(B, groups, M, generator=g)
    kernel = attncc.compile("examples/linear_kernel.attn", backend=backend)
    for extra in ({}, {"lam": lam, "kw": kw}):
        got = kernel(q=q, k=k, v=v, causal=causal, normalize=normalize, **extra)
        lam_, kw_ = extra.get("lam", torch.ones(heads)), extra.get("kw", torch.ones(B, groups, M))
        kx, vx, kwx = (t.repeat_interleave(heads // groups, dim=1).double() for t in (k, v, kw_))
        i, j = torch.arange(M)[:, None], torch.arange(M)[None, :]
        decay = lam_.double()[:, None, None] ** (i - j) if causal else torch.ones(heads, M, M, dtype=torch.double)
        w = kwx[:, :, None, :] * decay * torch.einsum("bhid,bhjd->bhij", q.double(), kx)
        if causal:
            w = w * (j <= i)
        o = torch.einsum("bhij,bhje->bhie", w, vx)
        if normalize:
            o = o / w.sum(-1, keepdim=True)
        close(got, o, f"o {extra and 'with lam, kw' or 'defaults'}")


@pytest.mark.parametrize("decl,why", [
    ("rows[B,N]: bool = 1.5", "the default of input 'rows' must be a constant of its type"),
    ("rows[B,N]: int = 0.5", "the default of input 'rows' must be a constant of its type"),
    ("rows[B,N] = N", "the default of input 'rows' must be a constant of its type"),
])
def test_optional_input_defaults_are_constants_of_the_input_type(decl, why):
    spec = (f"attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], {decl}) -> o[B,H,N,E] {{\n"
            "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * rows[b,i]\n  p = softmax(s, j)\n"
            "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n}")
    with pytest.raises(attncc.SpecError, match=why) as err:
        attncc.load(spec)
    assert ":1:" in str(err.value) and "^" in str(err.value)


def test_an_optional_input_needs_its_dims_from_other_inputs():
    spec = ("attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], w[T] = 1.0) -> o[B,H,N,E] {\n"
            "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n  p = softmax(s, j)\n"
            "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e] * w[0]\n}")
    kernel = attncc.compile(spec, backend="reference")
    q, k, v = qkv(9)
    with pytest.raises(attncc.ArgumentError, match="its dim T is not given by any other input"):
        kernel(q=q, k=k, v=v)
    kernel(q=q, k=k, v=v, w=torch.ones(3))


def test_outputs_have_no_default():
    spec = ("attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] = 0.0 {\n"
            "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n  p = softmax(s, j)\n"
            "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n}")
    with pytest.raises(attncc.SpecError, match="only inputs can be optional"):
        attncc.load(spec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_sinks(backend):
    """p = exp(s) / (exp(sinks[h]) + sum_j exp(s)) over the causal keys; lse = log(exp(sinks[h]) +
    sum_j exp(s)), sinks[h] for an empty row (N > M leaves the first rows without keys);
    differentiable in sinks."""
    g = torch.Generator().manual_seed(10)
    n, m = 23, 19
    q, k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, m, D, generator=g), \
        torch.randn(B, H, m, E, generator=g)
    sinks = torch.randn(H, generator=g).requires_grad_()
    kernel = attncc.compile("examples/learned_sinks.attn", backend=backend)
    o, lse = kernel(q=q, k=k, v=v, sinks=sinks, return_lse=True)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * D ** -0.5
    causal = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    s = s.masked_fill(~causal, -math.inf)
    sink64 = sinks.detach().double().requires_grad_()
    want_lse = torch.logaddexp(torch.logsumexp(s, -1), sink64[None, :, None].expand(B, H, n))
    want_o = torch.einsum("bhij,bhje->bhie", torch.exp(s - want_lse[..., None]), v.double())
    close(o, want_o, "o")
    close(lse, want_lse, "lse")
    assert torch.equal(lse[:, :, 0].double(), sink64.detach()[None, :].expand(B, H).to(lse.dtype).double())
    (o.square().sum() + lse.sum()).backward()
    gs, = torch.autograd.grad(want_o.square().sum() + want_lse.sum(), sink64)
    close(sinks.grad, gs, "dsinks")


def test_a_sink_logit_cannot_depend_on_the_normalised_axis():
    spec = ("attention x(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], bias[B,M]) -> o[B,H,N,E] {\n"
            "  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n  p = softmax(s, j, bias[b,j])\n"
            "  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n}")
    with pytest.raises(attncc.SpecError, match="the sink logit depends on 'j'") as err:
        attncc.load(spec)
    assert ":3:" in str(err.value) and "^" in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(B, H, N, M), (1, H, 1, M), (B, 1, N, 1), (1, 1, 1, 1)])
def test_bias_tensor(backend, shape):
    """s += bias, bias [B,H,N,M] or any of those dims of size 1 (broadcast, never copied);
    the gradient of bias is dS summed over the broadcast dims."""
    q, k, v = qkv(11)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(12)).requires_grad_()
    kernel = attncc.compile("examples/bias_tensor.attn", backend=backend)
    o = kernel(q=q, k=k, v=v, bias=bias)
    b64 = bias.detach().double().requires_grad_()
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * D ** -0.5 + b64
    want = torch.einsum("bhij,bhje->bhie", torch.softmax(s.masked_fill(~CAUSAL, -math.inf), -1), v.double())
    close(o, want, "o")
    o.square().sum().backward()
    gb, = torch.autograd.grad(want.square().sum(), b64)
    assert bias.grad.shape == bias.shape
    close(bias.grad, gb, "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads_of_sets", [H, 1])
def test_class_redistribute(backend, heads_of_sets):
    q, k, v = qkv(13)
    g = torch.Generator().manual_seed(14)
    sink = torch.rand(B, heads_of_sets, M, generator=g) < 0.3
    recv = torch.rand(B, heads_of_sets, M, generator=g) < 0.4
    recv[0, 0, :] = False  # no receiver for some rows: the ratio is 0 there
    p = torch.tensor([0.5, 0.0, 0.9])
    rows = torch.rand(B, N, generator=g) < 0.7
    kernel = attncc.compile("examples/class_redistribute.attn", backend=backend)
    a, _, _ = dense(q, k, v, CAUSAL)
    sk, rc = sink.expand(B, H, M)[:, :, None, :], recv.expand(B, H, M)[:, :, None, :]
    rc_only = rc & ~sk
    m_sink, m_recv = (a * sk).sum(-1, keepdim=True), (a * rc_only).sum(-1, keepdim=True)
    ratio = torch.where(m_recv > 0, m_sink / m_recv.clamp_min(1e-300), torch.zeros(()))
    ph = p.double()[None, :, None, None]
    moved = (p[None, :, None, None] > 0) & rows[:, None, :, None]
    scale = torch.where(sk, 1 - ph, torch.where(rc_only, 1 + ph * ratio, torch.ones(())))
    want = torch.einsum("bhij,bhje->bhie", a * torch.where(moved, scale, torch.ones(())), v.double())
    for given in ({"rows": rows}, {}):
        got = kernel(q=q, k=k, v=v, sink=sink, recv=recv, p=p, **given)
        if not given:  # every row
            moved_all = (p[None, :, None, None] > 0).expand(B, H, N, 1)
            want_all = torch.einsum("bhij,bhje->bhie", a * torch.where(moved_all, scale, torch.ones(())),
                                    v.double())
            close(got, want_all, "o (every row)")
        else:
            close(got, want, "o")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_block,k_block,causal", [(8, 4, False), (8, 4, True), (1, 1, False)])
def test_block_lists(backend, q_block, k_block, causal):
    """Key j allowed for query i iff j // k_block is listed in kidx[b, h // (H // G), i // q_block, :]
    (-1 unused, duplicates once) and, when causal, j <= i + (M - N)."""
    heads, groups, slots = 4, 2, 3
    g = torch.Generator().manual_seed(15)
    q, k, v = torch.randn(B, heads, N, D, generator=g), torch.randn(B, groups, M, D, generator=g), \
        torch.randn(B, groups, M, E, generator=g)
    n_qb, n_kb = -(-N // q_block), -(-M // k_block)
    kidx = torch.randint(-1, n_kb, (B, groups, n_qb, slots), generator=g)
    kidx[0, 0, 0] = torch.tensor([1, 1, -1])  # a duplicate and an unused slot
    kernel = attncc.compile("examples/block_lists.attn", backend=backend)
    o = kernel(q=q, k=k, v=v, kidx=kidx, q_block=q_block, k_block=k_block, causal=causal)
    rep = heads // groups
    lists = kidx.repeat_interleave(rep, dim=1)  # [B, heads, QB, K]
    qb = torch.arange(N) // q_block
    kb = torch.arange(M) // k_block
    allowed = (lists[:, :, qb, :, None] == kb[None, None, None, None, :]).any(3)  # [B, heads, N, M]
    if causal:
        allowed = allowed & CAUSAL
    _, want, _ = dense(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), allowed)
    close(o, want, "o")


def test_compile_finds_gallery_examples_by_name(tmp_path, monkeypatch):
    """`attncc.compile("causal")` resolves the installed gallery, as the CLI does, from any
    working directory; a file of that name in the working directory comes first."""
    monkeypatch.chdir(tmp_path)
    kernel = attncc.compile("causal", backend="reference")
    assert kernel.name == "causal" and kernel.program.source.filename.endswith("causal.attn")
    (tmp_path / "causal").write_text(open(kernel.program.source.filename).read().replace(
        "attention causal(", "attention local_copy("))
    assert attncc.compile("causal", backend="reference").name == "local_copy"
