"""attncc.flex_attention / attncc.create_block_mask against PyTorch's FlexAttention run
eagerly on CPU: values, log-sum-exps and gradients, for attention-gym style mods.

Run with TRITON_INTERPRET=1 for the generated-kernel cases (skipped otherwise without a GPU).
"""
import os

import pytest
import torch

import attncc
from attncc.flex import TraceError, build_spec

fa = pytest.importorskip("torch.nn.attention.flex_attention")
if not hasattr(fa, "flex_attention"):
    pytest.skip("torch has no flex_attention", allow_module_level=True)

pytestmark = [pytest.mark.filterwarnings("ignore:return_lse is deprecated"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="generated kernels on CPU tensors need TRITON_INTERPRET=1")

B, H, G, D = 2, 4, 2, 16
gen = torch.Generator().manual_seed(0)
DOC = torch.tensor([[0] * 10 + [1] * 15 + [2] * 12, [0] * 20 + [1] * 17])  # [2, 37]
SLOPES = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32))
TABLE = torch.randn(H, 17, generator=gen)
T5 = torch.randn(H, 9, generator=gen)
Q_LEN = torch.tensor([30, 37])
KV_LEN = torch.tensor([25, 11])
BIAS = torch.randn(B, H, 37, 29, generator=gen)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx <= 8


def sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 8)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 10) | (q_idx >= kv_idx)


def document(b, h, q_idx, kv_idx):
    return (DOC[b, q_idx] == DOC[b, kv_idx]) & (q_idx >= kv_idx)


def padding(b, h, q_idx, kv_idx):  # some query rows see no key at all
    return (q_idx < Q_LEN[b]) & (kv_idx < KV_LEN[b])


def not_diag(b, h, q_idx, kv_idx):
    return ~(q_idx == kv_idx) | (q_idx == 0)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


def relative(score, b, h, q_idx, kv_idx):
    return score + TABLE[h, torch.clamp(kv_idx - q_idx, -8, 8) + 8]


def t5_bucket(score, b, h, q_idx, kv_idx):
    bucket = torch.clamp(kv_idx - q_idx, -16, 16) // 4 + 4
    return score + T5[h, bucket]


def where_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


def bias_tensor(score, b, h, q_idx, kv_idx):
    return score + BIAS[b, h, q_idx, kv_idx]


def mixed(score, b, h, q_idx, kv_idx):
    dist = torch.abs(q_idx - kv_idx)
    return torch.clamp(score, min=-1.0) - 0.1 * torch.sigmoid(score) * dist + torch.exp(-dist * 0.5)


TEMP = torch.tensor(0.7)


def scalar_and_casts(score, b, h, q_idx, kv_idx):
    near = (torch.abs(q_idx - kv_idx) < 5).to(torch.float32)
    return score * TEMP + near.tanh() + (h % 2).float() * 0.25


CASES = {
    "scalar_and_casts": (scalar_and_casts, None, 37, 29),
    "causal": (None, causal, 37, 37),
    "sliding_window": (None, sliding, 37, 37),
    "prefix_lm": (None, prefix_lm, 37, 37),
    "document": (None, document, 37, 37),
    "padding": (None, padding, 37, 29),
    "not_diag": (None, not_diag, 37, 37),
    "and_masks": (None, fa.and_masks(causal, window) if hasattr(fa, "and_masks") else sliding, 37, 37),
    "or_masks": (None, fa.or_masks(lambda b, h, q, kv: kv < 10, causal) if hasattr(fa, "or_masks") else prefix_lm,
                 37, 37),
    "alibi_causal": (alibi, causal, 37, 37),
    "softcap": (softcap, None, 37, 29),
    "relative_table": (relative, None, 37, 29),
    "t5_bucket": (t5_bucket, causal, 37, 37),
    "where_score": (where_causal, None, 37, 37),
    "bias_tensor": (bias_tensor, padding, 37, 29),
    "mixed": (mixed, None, 23, 31),
}


def inputs(n, m, g=H, requires_grad=False):
    g_ = torch.Generator().manual_seed(n * 1000 + m + g)
    q = torch.randn(B, H, n, D, generator=g_)
    k = torch.randn(B, g, m, D, generator=g_)
    v = torch.randn(B, g, m, D + 3, generator=g_)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def torch_flex(q, k, v, score_mod, mask_mod, **kw):
    bm = None
    if mask_mod is not None:
        bm = fa.create_block_mask(mask_mod, B, q.shape[1], q.shape[2], k.shape[2], device="cpu")
    return fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, **kw)


def ours(q, k, v, score_mod, mask_mod, backend="reference", **kw):
    bm = None
    if mask_mod is not None:
        bm = attncc.create_block_mask(mask_mod, B, q.shape[1], q.shape[2], k.shape[2], device="cpu")
    return attncc.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, backend=backend, **kw)


def dense(q, k, v, score_mod, mask_mod, enable_gqa=False, scale=None):
    """A broadcasting dense oracle (FlexAttention has no backward on CPU)."""
    if enable_gqa:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    b = torch.arange(q.shape[0])[:, None, None, None]
    h = torch.arange(q.shape[1])[None, :, None, None]
    i = torch.arange(q.shape[2])[None, None, :, None]
    j = torch.arange(k.shape[2])[None, None, None, :]
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, i, j).expand(s.shape), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def close(a, b, atol=2e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def close_lse(a, b):
    # FlexAttention gives -inf for empty rows; compare finite entries and the -inf pattern
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    fin = torch.isfinite(b)
    close(a[fin], b[fin])


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_lse(name):
    score_mod, mask_mod, n, m = CASES[name]
    q, k, v = inputs(n, m)
    want, want_lse = torch_flex(q, k, v, score_mod, mask_mod, return_lse=True)
    got, got_lse = ours(q, k, v, score_mod, mask_mod, return_lse=True)
    close(got, want)
    close_lse(got_lse, want_lse)


def test_plain_output_and_scale():
    q, k, v = inputs(37, 29)
    close(ours(q, k, v, None, None, scale=0.3), torch_flex(q, k, v, None, None, scale=0.3))
    close(ours(q, k, v, softcap, causal, scale=1.0), torch_flex(q, k, v, softcap, causal, scale=1.0))


def test_empty_rows_are_zero_and_lse_minus_inf():
    q, k, v = inputs(37, 29)
    out, lse = ours(q, k, v, None, padding, return_lse=True)
    assert torch.all(out[0, :, 30:] == 0) and torch.all(torch.isneginf(lse[0, :, 30:]))


@pytest.mark.parametrize("name", ["causal", "document", "alibi_causal", "softcap"])
def test_gqa(name):
    score_mod, mask_mod, n, m = CASES[name]
    q, k, v = inputs(n, m, g=G)
    want, want_lse = torch_flex(q, k, v, score_mod, mask_mod, enable_gqa=True, return_lse=True)
    got, got_lse = ours(q, k, v, score_mod, mask_mod, enable_gqa=True, return_lse=True)
    close(got, want)
    close_lse(got_lse, want_lse)


def test_dense_oracle_matches_flex():
    q, k, v = inputs(37, 37)
    close(dense(q, k, v, alibi, document), torch_flex(q, k, v, alibi, document))


def test_gradients_to_qkv_and_captured_slopes():
    slopes = SLOPES.clone().requires_grad_(True)

    def alibi_learned(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    q, k, v = inputs(37, 37, requires_grad=True)
    grads = []
    for fn in (dense, ours):
        out = fn(q, k, v, alibi_learned, document)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        grads.append(torch.autograd.grad((out * w).sum(), (q, k, v, slopes)))
    for a, b in zip(*grads):
        close(b, a, atol=1e-4)


def test_gradients_gqa_table():
    table = TABLE.clone().requires_grad_(True)

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[h, torch.clamp(kv_idx - q_idx, -8, 8) + 8]

    q, k, v = inputs(37, 29, g=G, requires_grad=True)
    grads = []
    for fn in (dense, ours):
        out = fn(q, k, v, rel, None, enable_gqa=True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        grads.append(torch.autograd.grad((out * w).sum(), (q, k, v, table)))
    for a, b in zip(*grads):
        close(b, a, atol=1e-4)


def test_spec_text_and_cache():
    text, caps = build_spec(alibi, document, enable_gqa=True, shape=(B, H, 37, 37))
    assert "cap0[H]" in text and "cap1[B, N]: int" in text and "cap1[b, (j + 0)]" in text
    assert caps[0] is SLOPES and caps[1] is DOC
    assert "k[b,h // R,j,d]" in text and "mask" in text
    q, k, v = inputs(37, 37)
    ours(q, k, v, alibi, causal)
    n = len(attncc.flex._KERNELS)
    ours(q, k, v, alibi, causal)
    assert len(attncc.flex._KERNELS) == n
    bm = attncc.create_block_mask(causal, B, H, 37, 37)
    assert isinstance(bm, attncc.flex.BlockMask) and bm.shape == (B, H, 37, 37)


def test_untraceable_functions_raise():
    q, k, v = inputs(8, 8)

    def control_flow(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx if q_idx > 3 else q_idx == kv_idx

    with pytest.raises(TraceError, match="control flow"):
        ours(q, k, v, None, control_flow)

    def unsupported(score, b, h, q_idx, kv_idx):
        return torch.erf(score)

    with pytest.raises(TraceError, match="erf"):
        ours(q, k, v, unsupported, None)

    def int_mask(b, h, q_idx, kv_idx):
        return q_idx - kv_idx

    with pytest.raises(TraceError, match="boolean"):
        ours(q, k, v, None, int_mask)
    with pytest.raises(attncc.ArgumentError):
        attncc.flex_attention(q, k, v, block_mask=object(), backend="reference")


@needs_triton
@pytest.mark.parametrize("name", ["causal", "document", "alibi_causal", "softcap"])
def test_triton_values(name):
    score_mod, mask_mod, n, m = CASES[name]
    q, k, v = inputs(n, m)
    want = torch_flex(q, k, v, score_mod, mask_mod)
    got = ours(q, k, v, score_mod, mask_mod, backend="triton")
    close(got, want, atol=1e-4)
