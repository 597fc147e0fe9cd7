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
