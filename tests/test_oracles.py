"""Tests of the test oracles themselves (tests/oracles), before anything is compared to them.

Two independent routes must agree on the 15 softmax-family examples (dense formulas vs
FlexAttention closures) on awkward shapes, and every other example is checked against a
different formulation of the same contract (recurrences, reassociation, compositions of
plain attention, limiting parameter values). CPU only, float64, a few seconds.
"""

import math

import pytest
import torch

from oracles import dense as dn
from oracles.dense import DENSE
from oracles.flex import FLEX
from oracles.flex import _natten_axis_allowed
from oracles.inputs import EXAMPLES, SOFTMAX_FAMILY, make_inputs

ATOL = 1e-10


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def inputs(name, **overrides):
    """make_inputs with shape keywords routed to it and parameter overrides applied after."""
    shape_keys = {"B", "H", "G", "N", "M", "D", "E", "seed", "empty_rows", "small_params"}
    kw = make_inputs(name, **{k: v for k, v in overrides.items() if k in shape_keys})
    kw.update({k: v for k, v in overrides.items() if k not in shape_keys})
    return kw


# --------------------------------------------------------------- dense vs flex

CASES = [(name, {}) for name in SOFTMAX_FAMILY] + [
    ("dense", {"M": 23}),
    ("dense", {"M": 53, "G": 2}),
    ("causal", {"M": 23}),  # N > M: the first N - M rows are empty
    ("causal", {"M": 53}),
    ("gqa_causal", {"M": 45, "G": 1}),
    ("gqa_causal", {"N": 5, "M": 61}),  # decode-like: few queries, bottom-right aligned
    ("sliding_window", {"window": 1}),
    ("sink_window", {"window": 5, "sinks": 0}),
    ("alibi", {"M": 29, "G": 2}),
    ("alibi", {"M": 50}),
    ("softcap", {"M": 50}),
    ("relative_bias", {"M": 29}),
    ("relative_bias", {"M": 50}),
    ("key_padding", {"M": 29}),
    ("key_padding", {"empty_rows": True}),
    ("label_table", {"M": 45}),
    ("label_table", {"empty_rows": True}),
    ("neighborhood_2d", {"N": 120, "kernel": 5, "dilation": 2}),  # 10 x 12 grid
    ("neighborhood_2d", {"N": 120, "kernel": 7, "dilation": 3}),  # groups shorter than kernel
    ("neighborhood_2d", {"N": 120, "kernel": 4, "dilation": 1}),  # even kernel
    ("criss_cross", {"N": 60}),
    ("epipolar", {"N": 60}),
]


@pytest.mark.parametrize("name,over", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_dense_matches_flex(name, over):
    kw = inputs(name, **over)
    o_d, lse_d = DENSE[name](**kw, return_lse=True)
    o_f, lse_f = FLEX[name](**kw, return_lse=True)
    B, H, N, _ = kw["q"].shape
    assert o_d.shape == (B, H, N, kw["v"].shape[-1]) and lse_d.shape == (B, H, N)
    close(o_d, o_f)
    close(lse_d, lse_f)
    close(DENSE[name](**kw), o_d)  # return_lse=False gives the same output alone


def test_registries_cover_the_contracts():
    assert len(EXAMPLES) == 27 and len(set(EXAMPLES)) == 27
    assert list(DENSE) == EXAMPLES
    assert list(FLEX) == SOFTMAX_FAMILY
    for name in EXAMPLES:
        out = DENSE[name](**make_inputs(name, B=1, H=2, N=16))
        assert torch.isfinite(out).all(), name


# ------------------------------------------------------------------ empty rows


@pytest.mark.parametrize("name,over,rows", [
    ("key_padding", {"empty_rows": True}, (0, slice(None))),
    ("causal", {"M": 23}, (slice(None), slice(0, 37 - 23))),
])
def test_empty_rows_give_zero_and_neg_inf(name, over, rows):
    kw = inputs(name, **over)
    b, i = rows
    for fn in (DENSE[name], FLEX[name]):
        o, lse = fn(**kw, return_lse=True)
        assert torch.isneginf(lse[b, :, i]).all()
        assert (o[b, :, i] == 0).all()
        assert torch.isfinite(o).all()
        assert torch.isfinite(lse).sum() > 0


def test_label_table_empty_rows():
    kw = inputs("label_table", empty_rows=True)
    o, lse = DENSE["label_table"](**kw, return_lse=True)
    empty = kw["label_q"] == 0  # label 0 may see nothing
    assert empty.any()
    assert torch.isneginf(lse.transpose(1, 2)[empty]).all()
    assert (o.transpose(1, 2)[empty] == 0).all()
    assert torch.isfinite(lse.transpose(1, 2)[~empty]).all()


# ------------------------------------------------ softmax family: limiting cases


def test_masks_reduce_to_simpler_ones():
    kw = make_inputs("causal")
    q, k, v = kw["q"], kw["k"], kw["v"]
    causal, full = dn.dense_causal(q, k, v), dn.dense_dense(q, k, v)
    N = q.shape[2]
    close(dn.dense_sliding_window(q, k, v, window=N), causal)
    close(dn.dense_sliding_window(q, k, v), causal)  # default window 256 > N
    close(dn.dense_sink_window(q, k, v, window=6, sinks=0), dn.dense_sliding_window(q, k, v, window=6))
    close(dn.dense_alibi(q, k, v, slopes=torch.zeros(4, dtype=q.dtype)), causal)
    close(dn.dense_relative_bias(q, k, v, table=torch.zeros(4, 7, dtype=q.dtype)), full)
    close(dn.dense_softcap(q, k, v, cap=1e9), causal, atol=1e-8)
    close(dn.dense_document(q, k, v, doc=torch.zeros(2, N, dtype=torch.long)), causal)
    close(dn.dense_prefix_lm(q, k, v, prefix=torch.tensor([0, 0])), causal)
    close(dn.dense_prefix_lm(q, k, v, prefix=torch.tensor([N, N])), full)
    close(dn.dense_key_padding(q, k, v, valid=torch.ones(2, N, dtype=torch.bool)), full)
    assert not torch.allclose(dn.dense_sliding_window(q, k, v, window=8), causal)


def test_alibi_bias_is_relative_to_bottom_right():
    """With N != M, alibi's bias is slopes * (j - i - (M - N)): zero on the aligned diagonal."""
    kw = make_inputs("alibi", N=5, M=9, H=2)
    q, k, v, slopes = kw["q"], kw["k"], kw["v"], kw["slopes"]
    _, lse = dn.dense_alibi(q, k, v, slopes=slopes, return_lse=True)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 16 ** -0.5
    i, j = torch.arange(5).view(5, 1), torch.arange(9).view(1, 9)
    s = s + slopes.view(1, 2, 1, 1) * (j - (i + 4))
    s = s.masked_fill(j > i + 4, float("-inf"))
    close(lse, torch.logsumexp(s, -1))


# ------------------------------------------------------------------- grid masks


def test_natten_closed_form_matches_enumeration():
    for L in range(1, 13):
        x = torch.arange(L).view(L, 1).expand(L, L)
        y = torch.arange(L).view(1, L).expand(L, L)
        for kernel in range(1, 8):
            for dilation in range(1, 5):
                closed = _natten_axis_allowed(x, y, L, kernel, dilation)
                assert torch.equal(closed, dn._natten_axis(L, kernel, dilation)), (L, kernel, dilation)


def test_natten_known_windows():
    ax = dn._natten_axis(7, 3, 2)  # groups [0,2,4,6] and [1,3,5]
    assert ax[0].nonzero().flatten().tolist() == [0, 2, 4]
    assert ax[6].nonzero().flatten().tolist() == [2, 4, 6]
    assert ax[4].nonzero().flatten().tolist() == [2, 4, 6]
    assert ax[1].nonzero().flatten().tolist() == [1, 3, 5]
    ax = dn._natten_axis(6, 3, 1)
    assert ax[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert ax[3].nonzero().flatten().tolist() == [2, 3, 4]
    assert ax[5].nonzero().flatten().tolist() == [3, 4, 5]
    # every query sees exactly kernel**2 keys when the groups are long enough
    mask = dn.neighborhood_2d_mask(10, 12, kernel=3, dilation=2)
    assert (mask.sum(-1) == 9).all()
    assert torch.equal(dn.neighborhood_2d_mask(4, 5, kernel=7), torch.ones(20, 20, dtype=torch.bool))


def test_criss_cross_counts():
    mask = dn.criss_cross_mask(5, 7)
    assert (mask.sum(-1) == 5 + 7 - 1).all()
    assert mask[0, 6] and mask[0, 28] and not mask[0, 8]  # same row, same column, diagonal


def test_epipolar_mask_geometry():
    kw = make_inputs("epipolar")
    views, h, w = kw["views"], kw["height"], kw["width"]
    mask = dn.epipolar_mask(kw["F"], views, h, w)
    P = h * w
    assert mask[:, :P, :P].all() and mask[:, P:, P:].all()  # same view is always allowed
    cross = mask[:, :P, P:].double().mean().item()
    assert 0.05 < cross < 0.6  # the generated cameras give a useful mix
    # degenerate lines (F = 0 across views) allow nothing across views
    zero = dn.epipolar_mask(torch.zeros_like(kw["F"]), views, h, w)
    assert not zero[:, :P, P:].any() and zero[:, :P, :P].all()


def test_epipolar_point_on_line_is_allowed():
    """A key exactly on the line (distance 0) is allowed, one 5 px away is not (tau = 4)."""
    F = torch.zeros(1, 2, 2, 3, 3, dtype=torch.float64)
    # line in view 1 for query pixel x: l = (0, 1, -x_row) -> the key row equal to the query row
    F[0, 0, 1] = torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    mask = dn.epipolar_mask(F, 2, 3, 4, stride=5.0, tau=4.0)
    P = 12
    rows = torch.arange(P) // 4
    assert torch.equal(mask[0, :P, P:], rows.view(-1, 1) == rows.view(1, -1))
    assert not mask[0, P:, :P].any()  # F[0, 1, 0] = 0: degenerate


# ------------------------------------------------------- beyond softmax over keys


def test_softmax_one_is_a_zero_logit_key():
    kw = make_inputs("softmax_one", N=20, M=26)
    q, k, v = kw["q"], kw["k"], kw["v"]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 16 ** -0.5
    i, j = torch.arange(20).view(20, 1), torch.arange(26).view(1, 26)
    s = s.masked_fill(j > i + 6, float("-inf"))
    s = torch.cat([s, torch.zeros_like(s[..., :1])], dim=-1)  # the virtual key, value 0
    p = torch.softmax(s, -1)[..., :-1]
    close(dn.dense_softmax_one(q, k, v), p @ v)
    big = dn.dense_softmax_one(q * 1e3, k, v)  # no overflow with huge logits
    assert torch.isfinite(big).all()
    empty = dn.dense_softmax_one(q, k[:, :, :10], v[:, :, :10])  # N > M: empty rows
    assert (empty[:, :, :10] == 0).all()


def test_sigmoid_default_bias():
    kw = make_inputs("sigmoid", M=29)
    base = dn.dense_sigmoid(**kw)
    close(base, dn.dense_sigmoid(**kw, bias=-math.log(29)))
    assert not torch.allclose(base, dn.dense_sigmoid(**kw, bias=0.0))


def test_query_softmax_is_transposed_key_softmax():
    kw = make_inputs("query_softmax", M=29)
    q, k, v = kw["q"], kw["k"], kw["v"]
    N = q.shape[2]
    eye = torch.eye(N, dtype=q.dtype).expand(2, 4, N, N)
    p_t = dn.dense_dense(k, q, eye)  # rows j: softmax over i of the same scaled scores
    close(dn.dense_query_softmax(q, k, v), torch.einsum("bhji,bhje->bhie", p_t, v))
    ones = dn.dense_query_softmax(q, k, torch.ones_like(v))
    close(ones.sum(2), torch.full_like(ones[:, :, 0], 29.0))


def test_reversed_spreads_children_over_parents():
    kw = make_inputs("reversed")
    q, k, v, gate = kw["q"], kw["k"], kw["v"], kw["gate"]
    N = q.shape[2]
    a = dn.dense_dense(q, k, torch.eye(N, dtype=q.dtype).expand(2, 4, N, N))  # a[i, j]
    expected = torch.einsum("bhij,bhie->bhje", a, gate.unsqueeze(-1) * v)
    close(dn.dense_reversed(**kw), expected)
    mass = dn.dense_reversed(q, k, torch.ones_like(v), gate=torch.ones_like(gate))
    close(mass.sum(2), torch.full_like(mass[:, :, 0], float(N)))  # every child spreads mass 1


def test_linear_elu_reassociation():
    kw = make_inputs("linear_elu")
    q, k, v = kw["q"], kw["k"], kw["v"]
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    kv = torch.einsum("bhjd,bhje->bhde", fk, v)  # f(K)^T V first
    expected = torch.einsum("bhid,bhde->bhie", fq, kv) / (fq @ fk.sum(2).unsqueeze(-1))
    close(dn.dense_linear_elu(q, k, v), expected)
    # causal: prefix sums of the states, one per query
    kv_c = torch.cumsum(torch.einsum("bhjd,bhje->bhjde", fk, v), dim=2)
    z_c = torch.cumsum(fk, dim=2)
    expected = torch.einsum("bhid,bhide->bhie", fq, kv_c) / (fq * z_c).sum(-1, keepdim=True)
    out = dn.dense_linear_elu(q, k, v, causal=True)
    close(out, expected)
    close(out[:, :, 0], v[:, :, 0])


def test_lightning_matches_recurrence():
    for lam_value in (None, 1.0):
        kw = make_inputs("lightning", N=23)
        q, k, v, lam = kw["q"], kw["k"], kw["v"], kw["lam"]
        if lam_value is not None:
            lam = torch.full_like(lam, lam_value)
        state = torch.zeros(2, 4, 16, 12, dtype=q.dtype)
        outs = []
        for t in range(q.shape[2]):
            state = lam.view(1, 4, 1, 1) * state + torch.einsum("bhd,bhe->bhde", k[:, :, t], v[:, :, t])
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
        close(dn.dense_lightning(q, k, v, lam=lam), torch.stack(outs, dim=2), atol=1e-9)


def test_channel_is_attention_over_transposed_tokens():
    kw = make_inputs("channel")
    q, k, v = kw["q"], kw["k"], kw["v"]
    # transposing makes channels the tokens and N the width, so SDPA's scale is N ** -0.5
    expected = dn.dense_dense(q.mT, k.mT, v.mT).mT
    close(dn.dense_channel(q, k, v), expected)
    close(dn.dense_channel(q, k, torch.ones_like(v)), torch.ones_like(v))


# ------------------------------------------------------------ cascades, routing


def test_differential_limits():
    kw = make_inputs("differential", M=45)
    q, k, v = kw["q"], kw["k"], kw["v"]
    close(dn.dense_differential(**{**kw, "lam": 0.0}), dn.dense_causal(q, k, v))
    close(dn.dense_differential(q, k, v, q2=q, k2=k, lam=1.0), torch.zeros_like(dn.dense_causal(q, k, v)))
    expected = dn.dense_causal(q, k, v) - 0.5 * dn.dense_causal(kw["q2"], kw["k2"], v)
    close(dn.dense_differential(**kw), expected)


def test_moh_routing():
    kw = make_inputs("moh")
    q, k, v, router = kw["q"], kw["k"], kw["v"], kw["router"]
    out = dn.dense_moh(**kw)
    assert out.shape == (2, 37, 12)
    per_head = dn.dense_causal(q, k, v)  # [B, H, N, E]
    # all heads with a flat router: the plain mean over heads
    close(dn.dense_moh(q, k, v, router=torch.zeros_like(router), topk=4), per_head.mean(1))
    # top-1: the best head only, weighted by its (not renormalised) softmax weight
    w = torch.softmax(router, -1)
    best = w.argmax(-1)  # [B, N]
    picked = per_head.permute(0, 2, 1, 3).gather(2, best[..., None, None].expand(-1, -1, 1, 12))[:, :, 0]
    close(dn.dense_moh(q, k, v, router=router, topk=1), w.amax(-1, keepdim=True) * picked)
    # ties go to the lower head index: a flat router with topk=1 keeps head 0 with weight 1/H
    close(dn.dense_moh(q, k, v, router=torch.zeros_like(router), topk=1), per_head[:, 0] / 4)


def test_topk_blocks_limits():
    kw = make_inputs("topk_blocks")  # N = 37, block 8: 5 blocks, the last holds 5 tokens
    q, k, v = kw["q"], kw["k"], kw["v"]
    causal = dn.dense_causal(q, k, v)
    close(dn.dense_topk_blocks(q, k, v, block=8, topk=4), causal)
    assert not torch.allclose(dn.dense_topk_blocks(**kw), causal)
    # topk = 0: only the diagonal block, i.e. causal attention inside each block
    blk = torch.arange(37) // 8
    diag = dn.dense_document(q, k, v, doc=blk.expand(2, 37))
    close(dn.dense_topk_blocks(q, k, v, block=8, topk=0), diag)


def test_topk_blocks_selects_by_block_means():
    """Make block 1 stand out for query block 3: it must be the one kept with topk=1."""
    B, H, N, D = 1, 1, 32, 4
    q = torch.zeros(B, H, N, D, dtype=torch.float64)
    k = torch.zeros(B, H, N, D, dtype=torch.float64)
    q[..., 24:32, 0] = 1.0
    k[..., 8:16, 0] = 1.0  # only block 1 has a positive block score with query block 3
    v = torch.randn(B, H, N, 3, dtype=torch.float64)
    out = dn.dense_topk_blocks(q, k, v, block=8, topk=1)
    blk = torch.arange(N) // 8
    doc = torch.where(blk == 1, torch.tensor(3), blk)  # query block 3 sees blocks 1 and 3
    allowed = ((doc.view(-1, 1) == doc.view(1, -1)) | (blk.view(-1, 1) == blk.view(1, -1)))
    i, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * D ** -0.5
    expected = dn._masked_softmax_attention(s, allowed & (j <= i), v, False)
    close(out[..., 24:, :], expected[..., 24:, :])


def test_permuted_blocks_full_mass_is_causal():
    kw = make_inputs("permuted_blocks")
    q, k, v, perm = kw["q"], kw["k"], kw["v"], kw["perm"]
    causal = dn.dense_causal(q, k, v)
    ident = torch.arange(37).expand(2, 4, 37)
    close(dn.dense_permuted_blocks(q, k, v, perm=ident, block=8, tau=1.0), causal)
    # the gather makes the permutation invisible once every candidate block is kept
    close(dn.dense_permuted_blocks(q, k, v, perm=perm, block=8, tau=1.0), causal)
    # tau = 0 keeps only the blocks holding the query block's own keys; with the identity
    # permutation that is the diagonal block, as topk_blocks with topk = 0
    close(dn.dense_permuted_blocks(q, k, v, perm=ident, block=8, tau=0.0),
          dn.dense_topk_blocks(q, k, v, block=8, topk=0))
    assert not torch.allclose(dn.dense_permuted_blocks(**kw), causal)


def test_agent_is_two_chained_attentions():
    kw = make_inputs("agent")  # N = 40, 4 agents of 10 tokens
    q, k, v = kw["q"], kw["k"], kw["v"]
    a = torch.stack([q[:, :, g * 10:(g + 1) * 10].mean(2) for g in range(4)], dim=2)
    expected = dn.dense_dense(q, a, dn.dense_dense(a, k, v))
    close(dn.dense_agent(**kw), expected)
    one = dn.dense_agent(q, k, v, agents=1)
    close(one, one[:, :, :1].expand_as(one))  # one agent: every row gets the same output
