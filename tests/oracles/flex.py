"""FlexAttention oracles for the 15 softmax-family examples of VARIANTS.md, section 1.

A second, independent route to the same numbers as `dense`: the masks and score
modifications are written as per-element `mask_mod` / `score_mod` closures (with the index
arithmetic done differently from the dense builders where it matters: NATTEN windows in
closed form, epipolar lines gathered per pair) and run through
`torch.nn.attention.flex_attention` eagerly on CPU. Eager flex materialises the scores, so
this is only meant for small test shapes.
"""

import warnings

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

__all__ = ["FLEX"]


def _run(q, k, v, *, score_mod=None, mask_mod=None, return_lse=False):
    """Call flex eagerly with scale D ** -0.5 and GQA; empty rows normalised to o = 0, lse = -inf."""
    B, H, N, D = q.shape
    M = k.shape[2]
    with warnings.catch_warnings():
        # Eager flex warns that it is unfused; that is exactly what an oracle wants.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        block_mask = None
        if mask_mod is not None:
            # No mask here depends on the head, so one head-broadcast block mask serves them all.
            block_mask = create_block_mask(mask_mod, B, None, N, M, device=q.device)
        o, aux = flex_attention(
            q, k, v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=D ** -0.5,
            enable_gqa=k.shape[1] != H,
            return_aux=AuxRequest(lse=True),
        )
    lse = aux.lse.to(q.dtype)
    empty = torch.isneginf(lse) | torch.isnan(lse)
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    o = torch.where(empty.unsqueeze(-1), torch.zeros_like(o), o)
    return (o, lse) if return_lse else o


def _causal_mod(N, M):
    """Bottom-right aligned causal mask_mod."""
    def mask_mod(b, h, i, j):
        return j <= i + (M - N)
    return mask_mod


def flex_dense(q, k, v, *, return_lse=False):
    return _run(q, k, v, return_lse=return_lse)


def flex_causal(q, k, v, *, return_lse=False):
    return _run(q, k, v, mask_mod=_causal_mod(q.shape[2], k.shape[2]), return_lse=return_lse)


def flex_gqa_causal(q, k, v, *, return_lse=False):
    return flex_causal(q, k, v, return_lse=return_lse)


def flex_sliding_window(q, k, v, *, window=256, return_lse=False):
    N, M = q.shape[2], k.shape[2]

    def mask_mod(b, h, i, j):
        return (j <= i + (M - N)) & (i - j < window)
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_sink_window(q, k, v, *, window=256, sinks=4, return_lse=False):
    N, M = q.shape[2], k.shape[2]

    def mask_mod(b, h, i, j):
        return (j <= i + (M - N)) & ((i - j < window) | (j < sinks))
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_alibi(q, k, v, *, slopes, return_lse=False):
    N, M = q.shape[2], k.shape[2]
    slopes = slopes.to(q.dtype)

    def score_mod(score, b, h, i, j):
        return score + slopes[h] * (j - i - (M - N))
    return _run(q, k, v, score_mod=score_mod, mask_mod=_causal_mod(N, M), return_lse=return_lse)


def flex_softcap(q, k, v, *, cap=20.0, return_lse=False):
    def score_mod(score, b, h, i, j):
        return cap * torch.tanh(score / cap)
    return _run(q, k, v, score_mod=score_mod, mask_mod=_causal_mod(q.shape[2], k.shape[2]),
                return_lse=return_lse)


def flex_relative_bias(q, k, v, *, table, return_lse=False):
    R = (table.shape[-1] - 1) // 2
    table = table.to(q.dtype)

    def score_mod(score, b, h, i, j):
        return score + table[h, torch.clamp(j - i, -R, R) + R]
    return _run(q, k, v, score_mod=score_mod, return_lse=return_lse)


def flex_document(q, k, v, *, doc, return_lse=False):
    def mask_mod(b, h, i, j):
        return (doc[b, i] == doc[b, j]) & (j <= i)
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_prefix_lm(q, k, v, *, prefix, return_lse=False):
    def mask_mod(b, h, i, j):
        return (j <= i) | (j < prefix[b])
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_key_padding(q, k, v, *, valid, return_lse=False):
    valid = valid.bool()

    def mask_mod(b, h, i, j):
        return valid[b, j]
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_label_table(q, k, v, *, label_q, label_k, allow, return_lse=False):
    allow, label_q, label_k = allow.bool(), label_q.long(), label_k.long()

    def mask_mod(b, h, i, j):
        return allow[label_q[b, i], label_k[b, j]]
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def _natten_axis_allowed(x, y, L, kernel, dilation):
    """Closed-form NATTEN rule on one axis of length L (elementwise on index tensors)."""
    r = x % dilation
    group_len = (L - r + dilation - 1) // dilation  # members p < L with p % dilation == r
    xg, yg = x // dilation, y // dilation
    centred = torch.clamp(xg - kernel // 2, min=0)
    start = torch.minimum(centred, group_len - kernel)
    start = torch.where(group_len >= kernel, start, torch.zeros_like(start))
    return (y % dilation == r) & (start <= yg) & (yg < start + kernel)


def flex_neighborhood_2d(q, k, v, *, height, width, kernel=7, dilation=1, return_lse=False):
    def mask_mod(b, h, i, j):
        rows = _natten_axis_allowed(i // width, j // width, height, kernel, dilation)
        cols = _natten_axis_allowed(i % width, j % width, width, kernel, dilation)
        return rows & cols
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_criss_cross(q, k, v, *, height, width, return_lse=False):
    def mask_mod(b, h, i, j):
        return (i // width == j // width) | (i % width == j % width)
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


def flex_epipolar(q, k, v, *, F, views, height, width, stride=8.0, tau=4.0, return_lse=False):
    per_view = height * width

    def pixel(n):
        col = (n % width).to(F.dtype)
        row = ((n % per_view) // width).to(F.dtype)
        return (col + 0.5) * stride, (row + 0.5) * stride

    def mask_mod(b, h, i, j):
        vi, vj = i // per_view, j // per_view
        xi0, xi1 = pixel(i)
        xj0, xj1 = pixel(j)
        Fm = F[b, vi, vj]  # [3, 3] for this (query view, key view) pair
        l0 = Fm[0, 0] * xi0 + Fm[0, 1] * xi1 + Fm[0, 2]
        l1 = Fm[1, 0] * xi0 + Fm[1, 1] * xi1 + Fm[1, 2]
        l2 = Fm[2, 0] * xi0 + Fm[2, 1] * xi1 + Fm[2, 2]
        norm = torch.sqrt(l0 * l0 + l1 * l1)
        ok = norm > 0
        dist = torch.abs(l0 * xj0 + l1 * xj1 + l2) / torch.where(ok, norm, torch.ones_like(norm))
        return (vi == vj) | (ok & (dist < tau))
    return _run(q, k, v, mask_mod=mask_mod, return_lse=return_lse)


FLEX = {
    "dense": flex_dense,
    "causal": flex_causal,
    "gqa_causal": flex_gqa_causal,
    "sliding_window": flex_sliding_window,
    "sink_window": flex_sink_window,
    "alibi": flex_alibi,
    "softcap": flex_softcap,
    "relative_bias": flex_relative_bias,
    "document": flex_document,
    "prefix_lm": flex_prefix_lm,
    "key_padding": flex_key_padding,
    "label_table": flex_label_table,
    "neighborhood_2d": flex_neighborhood_2d,
    "criss_cross": flex_criss_cross,
    "epipolar": flex_epipolar,
}
