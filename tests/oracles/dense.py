"""Dense PyTorch oracles for the 27 example contracts of VARIANTS.md, section 1.

Every function materialises the full score matrix in the input dtype and follows the
contract text literally, so it is slow but easy to audit. Shared conventions:

- layout q[B,H,N,D], k[B,G,M,D], v[B,G,M,E]; query head h reads kv head h // (H // G);
- scale = D ** -0.5 unless the contract says otherwise;
- causal is bottom-right aligned: key j is allowed for query i when j <= i + (M - N);
- a softmax over keys only sees allowed keys, and a row with no allowed key gives o = 0
  (and lse = -inf when `return_lse=True`, offered by the 15 softmax-family examples).
"""

import math

import torch
import torch.nn.functional as nnf

__all__ = ["DENSE", "neighborhood_2d_mask", "criss_cross_mask", "epipolar_mask"]


# --------------------------------------------------------------------------- helpers


def _expand_kv(x, H):
    """Repeat kv heads so that query head h reads kv head h // (H // G) (GQA / MQA)."""
    G = x.shape[1]
    if H % G:
        raise ValueError(f"H={H} is not a multiple of G={G}")
    return x.repeat_interleave(H // G, dim=1)


def _scores(q, k, scale=None):
    """s[b,h,i,j] = scale * q[b,h,i,:] . k[b,h//(H//G),j,:], scale defaulting to D ** -0.5."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.einsum("bhid,bhjd->bhij", q, _expand_kv(k, q.shape[1])) * scale


def _positions(N, M, device):
    """Query and key index grids of shapes [N, 1] and [1, M]."""
    i = torch.arange(N, device=device).view(N, 1)
    j = torch.arange(M, device=device).view(1, M)
    return i, j


def _causal(N, M, device):
    """Bottom-right aligned causal mask [N, M]."""
    i, j = _positions(N, M, device)
    return j <= i + (M - N)


def _masked_softmax(s, allowed):
    """Softmax over the last axis restricted to `allowed`.

    Returns (p, lse). A row without allowed entries gets p = 0 and lse = -inf instead of the
    NaNs a plain softmax over -inf would give.
    """
    allowed = allowed.expand_as(s)
    masked = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.where(allowed, torch.exp(masked - shift.unsqueeze(-1)), torch.zeros_like(s))
    return p, lse


def _masked_softmax_attention(s, allowed, v, return_lse):
    """o = softmax_j(s | allowed) v, with v expanded to the query heads; optionally (o, lse)."""
    p, lse = _masked_softmax(s, allowed)
    o = torch.einsum("bhij,bhje->bhie", p, _expand_kv(v, s.shape[1]))
    return (o, lse) if return_lse else o


def _membership(L, block, dtype, device):
    """One-hot matrix [ceil(L / block), L]: row b marks the tokens of block b (last may be short)."""
    nb = -(-L // block)
    ids = torch.arange(L, device=device) // block
    return (torch.arange(nb, device=device).view(nb, 1) == ids.view(1, L)).to(dtype)


def _block_means(x, block):
    """Means of x[B,H,L,D] over consecutive blocks of `block` tokens, over actual members."""
    memb = _membership(x.shape[2], block, x.dtype, x.device)
    return torch.einsum("nl,bhld->bhnd", memb, x) / memb.sum(-1).view(-1, 1)


def _precedes(scores, eligible):
    """before[..., a, c] is True when entry c ranks strictly ahead of entry a.

    Ranking is by score, descending, among `eligible` entries; ties go to the lower index.
    """
    n = scores.shape[-1]
    idx = torch.arange(n, device=scores.device)
    sa = scores.unsqueeze(-1)  # [..., a, 1]
    sc = scores.unsqueeze(-2)  # [..., 1, c]
    ahead = (sc > sa) | ((sc == sa) & (idx.view(1, n) < idx.view(n, 1)))
    return ahead & eligible.unsqueeze(-2)


# ------------------------------------------------------------------ mask builders


def _natten_axis(L, kernel, dilation):
    """Per-axis NATTEN mask [L, L], built by listing group members (no closed form on purpose).

    A query at x only sees keys of its dilation group (same x % dilation). Inside the group
    (positions x // dilation), the window has `kernel` members centred on the query and is
    shifted inward at the borders; a group shorter than the kernel is seen whole.
    """
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for x in range(L):
        group = list(range(x % dilation, L, dilation))
        pos = group.index(x)
        if len(group) >= kernel:
            start = min(max(pos - kernel // 2, 0), len(group) - kernel)
        else:
            start = 0
        for y in group[start:start + kernel]:
            allowed[x, y] = True
    return allowed


def neighborhood_2d_mask(height, width, kernel=7, dilation=1, device=None):
    """Token mask [N, N] for row-major tokens on a height x width grid: both axes must allow."""
    rows = _natten_axis(height, kernel, dilation)
    cols = _natten_axis(width, kernel, dilation)
    mask = rows[:, None, :, None] & cols[None, :, None, :]  # [rq, cq, rk, ck]
    return mask.reshape(height * width, height * width).to(device)


def criss_cross_mask(height, width, device=None):
    """Token mask [N, N]: same row or same column of the row-major grid."""
    n = torch.arange(height * width, device=device)
    row, col = n // width, n % width
    return (row.view(-1, 1) == row.view(1, -1)) | (col.view(-1, 1) == col.view(1, -1))


def epipolar_mask(F, views, height, width, stride=8.0, tau=4.0):
    """Mask [B, N, N]: same view, or key pixel within tau of the epipolar line of the query.

    Computed in F's dtype. A degenerate line (l0 = l1 = 0) allows nothing across views.
    """
    B = F.shape[0]
    if tuple(F.shape) != (B, views, views, 3, 3):
        raise ValueError(f"F must be [B, {views}, {views}, 3, 3], got {tuple(F.shape)}")
    per_view = height * width
    n = torch.arange(views * per_view, device=F.device)
    view, row, col = n // per_view, (n % per_view) // width, n % width
    x = torch.stack(
        [(col.to(F.dtype) + 0.5) * stride, (row.to(F.dtype) + 0.5) * stride,
         torch.ones_like(col, dtype=F.dtype)], dim=-1)  # [N, 3]
    Fij = F[:, view][:, :, view]  # [B, N(query view), N(key view), 3, 3]
    line = torch.einsum("bijxy,iy->bijx", Fij, x)
    num = torch.einsum("bijx,jx->bij", line, x).abs()
    norm = torch.sqrt(line[..., 0] ** 2 + line[..., 1] ** 2)
    ok = norm > 0
    dist = num / torch.where(ok, norm, torch.ones_like(norm))
    same_view = view.view(-1, 1) == view.view(1, -1)
    return same_view | (ok & (dist < tau))


# -------------------------------------------------------------- softmax family


def dense_dense(q, k, v, *, return_lse=False):
    """Plain softmax attention; N != M allowed (cross-attention)."""
    s = _scores(q, k)
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_causal(q, k, v, *, return_lse=False):
    """Bottom-right aligned causal softmax attention."""
    s = _scores(q, k)
    return _masked_softmax_attention(s, _causal(*s.shape[-2:], s.device), v, return_lse)


def dense_gqa_causal(q, k, v, *, return_lse=False):
    """Causal attention where k, v carry G <= H heads (handled by _expand_kv)."""
    return dense_causal(q, k, v, return_lse=return_lse)


def dense_sliding_window(q, k, v, *, window=256, return_lse=False):
    """Causal and i - j < window."""
    s = _scores(q, k)
    N, M = s.shape[-2:]
    i, j = _positions(N, M, s.device)
    allowed = _causal(N, M, s.device) & (i - j < window)
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_sink_window(q, k, v, *, window=256, sinks=4, return_lse=False):
    """Causal and (i - j < window or j < sinks)."""
    s = _scores(q, k)
    N, M = s.shape[-2:]
    i, j = _positions(N, M, s.device)
    allowed = _causal(N, M, s.device) & ((i - j < window) | (j < sinks))
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_alibi(q, k, v, *, slopes, return_lse=False):
    """Causal; s += slopes[h] * (j - i - (M - N))."""
    s = _scores(q, k)
    N, M = s.shape[-2:]
    i, j = _positions(N, M, s.device)
    s = s + slopes.to(s.dtype).view(1, -1, 1, 1) * (j - i - (M - N)).to(s.dtype)
    return _masked_softmax_attention(s, _causal(N, M, s.device), v, return_lse)


def dense_softcap(q, k, v, *, cap=20.0, return_lse=False):
    """Causal; s = cap * tanh(s / cap) applied after scaling (lse is of the capped scores)."""
    s = _scores(q, k)
    s = cap * torch.tanh(s / cap)
    return _masked_softmax_attention(s, _causal(*s.shape[-2:], s.device), v, return_lse)


def dense_relative_bias(q, k, v, *, table, return_lse=False):
    """Non-causal; s += table[h, clamp(j - i, -R, R) + R] with R = (table width - 1) / 2."""
    s = _scores(q, k)
    N, M = s.shape[-2:]
    R = (table.shape[-1] - 1) // 2
    i, j = _positions(N, M, s.device)
    rel = (j - i).clamp(-R, R) + R  # [N, M]
    s = s + table.to(s.dtype)[:, rel].unsqueeze(0)  # table[:, rel] is [H, N, M]
    allowed = torch.ones(N, M, dtype=torch.bool, device=s.device)
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_document(q, k, v, *, doc, return_lse=False):
    """doc[b,i] == doc[b,j] and j <= i (N == M)."""
    s = _scores(q, k)
    N, M = s.shape[-2:]
    i, j = _positions(N, M, s.device)
    same = doc[:, :, None] == doc[:, None, :]  # [B, N, M]
    allowed = (same & (j <= i)).unsqueeze(1)
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_prefix_lm(q, k, v, *, prefix, return_lse=False):
    """j <= i, or j < prefix[b] (bidirectional prefix) (N == M)."""
    s = _scores(q, k)
    N, M = s.shape[-2:]
    i, j = _positions(N, M, s.device)
    allowed = (j <= i) | (j < prefix.view(-1, 1, 1))  # [B, N, M]
    return _masked_softmax_attention(s, allowed.unsqueeze(1), v, return_lse)


def dense_key_padding(q, k, v, *, valid, return_lse=False):
    """Non-causal; key j allowed iff valid[b, j]."""
    s = _scores(q, k)
    allowed = valid.bool()[:, None, None, :]
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_label_table(q, k, v, *, label_q, label_k, allow, return_lse=False):
    """Allowed iff allow[label_q[b,i], label_k[b,j]] (no positional rule)."""
    s = _scores(q, k)
    allowed = allow.bool()[label_q.long()[:, :, None], label_k.long()[:, None, :]]  # [B, N, M]
    return _masked_softmax_attention(s, allowed.unsqueeze(1), v, return_lse)


def dense_neighborhood_2d(q, k, v, *, height, width, kernel=7, dilation=1, return_lse=False):
    """NATTEN 2-D neighbourhood on a row-major height x width grid (N == M == height*width)."""
    s = _scores(q, k)
    if s.shape[-2:] != (height * width, height * width):
        raise ValueError("neighborhood_2d needs N == M == height * width")
    allowed = neighborhood_2d_mask(height, width, kernel, dilation, s.device)
    return _masked_softmax_attention(s, allowed, v, return_lse)


def dense_criss_cross(q, k, v, *, height, width, return_lse=False):
    """Same row or same column of the row-major grid (N == M == height*width)."""
    s = _scores(q, k)
    if s.shape[-2:] != (height * width, height * width):
        raise ValueError("criss_cross needs N == M == height * width")
    return _masked_softmax_attention(s, criss_cross_mask(height, width, s.device), v, return_lse)


def dense_epipolar(q, k, v, *, F, views, height, width, stride=8.0, tau=4.0, return_lse=False):
    """Same view, or key pixel within tau of the query's epipolar line in the key's view."""
    s = _scores(q, k)
    if s.shape[-2:] != (views * height * width,) * 2:
        raise ValueError("epipolar needs N == M == views * height * width")
    allowed = epipolar_mask(F, views, height, width, stride, tau).unsqueeze(1)
    return _masked_softmax_attention(s, allowed, v, return_lse)


# --------------------------------------------------------------- beyond softmax


def dense_softmax_one(q, k, v):
    """Causal off-by-one softmax: p = exp(s) / (1 + sum_j exp(s)), a virtual zero-logit key.

    Stabilised with m = max(0, max_j s) so that exp never overflows; empty rows give 0.
    """
    s = _scores(q, k)
    allowed = _causal(*s.shape[-2:], s.device).expand_as(s)
    masked = s.masked_fill(~allowed, float("-inf"))
    m = masked.amax(dim=-1, keepdim=True).clamp(min=0.0)  # -inf rows clamp to 0 as well
    e = torch.where(allowed, torch.exp(masked - m), torch.zeros_like(s))
    p = e / (torch.exp(-m) + e.sum(-1, keepdim=True))
    return torch.einsum("bhij,bhje->bhie", p, _expand_kv(v, q.shape[1]))


def dense_sigmoid(q, k, v, *, bias=None):
    """Non-causal; p = sigmoid(s + bias), o = sum_j p v; bias None means -log(M)."""
    s = _scores(q, k)
    if bias is None:
        bias = -math.log(s.shape[-1])
    p = torch.sigmoid(s + bias)
    return torch.einsum("bhij,bhje->bhie", p, _expand_kv(v, q.shape[1]))


def dense_query_softmax(q, k, v):
    """Non-causal; softmax over queries i for each key j, then o[i] = sum_j p[i,j] v[j]."""
    s = _scores(q, k)
    p = torch.softmax(s, dim=-2)
    return torch.einsum("bhij,bhje->bhie", p, _expand_kv(v, q.shape[1]))


def dense_reversed(q, k, v, *, gate):
    """DependencyViT: a = softmax_j(s); o[b,h,j] = sum_i a[i,j] gate[b,h,i] v[b,h,i] (N == M).

    Note that v is read at the *query* position i, and the output is indexed by key j.
    """
    s = _scores(q, k)
    if s.shape[-2] != s.shape[-1]:
        raise ValueError("reversed needs N == M")
    a = torch.softmax(s, dim=-1)
    return torch.einsum("bhij,bhi,bhie->bhje", a, gate.to(s.dtype), _expand_kv(v, q.shape[1]))


def dense_linear_elu(q, k, v, *, causal=False):
    """Linear attention with f(x) = elu(x) + 1, no scale, normalised by sum_j f(q_i).f(k_j).

    With causal=True the contract restricts keys to j <= i (top-left, as written).
    """
    fq, fk = nnf.elu(q) + 1, nnf.elu(_expand_kv(k, q.shape[1])) + 1
    a = torch.einsum("bhid,bhjd->bhij", fq, fk)
    if causal:
        i, j = _positions(a.shape[-2], a.shape[-1], a.device)
        a = a * (j <= i).to(a.dtype)
    o = torch.einsum("bhij,bhje->bhie", a, _expand_kv(v, q.shape[1]))
    return o / a.sum(-1, keepdim=True)


def dense_lightning(q, k, v, *, lam):
    """o[i] = sum_{j <= i} lam[h]^(i - j) (q_i . k_j) v_j; no scale, no normalisation."""
    a = torch.einsum("bhid,bhjd->bhij", q, _expand_kv(k, q.shape[1]))
    i, j = _positions(a.shape[-2], a.shape[-1], a.device)
    dist = (i - j).clamp(min=0).to(a.dtype)
    decay = lam.to(a.dtype).view(-1, 1, 1) ** dist  # [H, N, M]
    decay = decay * (j <= i).to(a.dtype)
    return torch.einsum("bhij,bhje->bhie", a * decay, _expand_kv(v, q.shape[1]))


def dense_channel(q, k, v):
    """Transposed attention over channels (D == E, N == M), logits scaled by N ** -0.5."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    N = q.shape[2]
    if k.shape[2] != N or q.shape[-1] != v.shape[-1]:
        raise ValueError("channel needs N == M and D == E")
    a = torch.softmax(torch.einsum("bhnc,bhnd->bhcd", q, k) * N ** -0.5, dim=-1)
    return torch.einsum("bhcd,bhnd->bhnc", a, v)


# ------------------------------------------------------------ cascades, routing


def dense_differential(q, k, v, *, q2, k2, lam=0.5):
    """Causal; o = (softmax_j(s1) - lam * softmax_j(s2)) v, each softmax on its own scores."""
    s1, s2 = _scores(q, k), _scores(q2, k2)
    allowed = _causal(*s1.shape[-2:], s1.device)
    p1, _ = _masked_softmax(s1, allowed)
    p2, _ = _masked_softmax(s2, allowed)
    return torch.einsum("bhij,bhje->bhie", p1 - lam * p2, _expand_kv(v, q.shape[1]))


def dense_moh(q, k, v, *, router, topk=2):
    """Mixture-of-heads: o[b,i] = sum_h w[b,i,h] causal_attn[b,h,i], w = top-k of softmax_h.

    Weights outside the top-k are zeroed without renormalisation; ties keep the lower head.
    """
    w = torch.softmax(router.to(q.dtype), dim=-1)  # [B, N, H]
    rank = _precedes(w, torch.ones_like(w, dtype=torch.bool)).sum(-1)
    w = torch.where(rank < topk, w, torch.zeros_like(w))
    a = dense_causal(q, k, v)  # [B, H, N, E]
    return torch.einsum("bnh,bhne->bne", w, a)


def dense_topk_blocks(q, k, v, *, block=64, topk=4):
    """Estimate-then-compute block sparsity (N == M, causal).

    Block means qp, kp (last block short); sb = qp . kp for kb <= qb; per query block keep the
    diagonal block plus the `topk` best earlier blocks (ties to the lower index); then causal
    attention restricted to the kept blocks. The ranking ignores the (positive) scale.
    """
    H = q.shape[1]
    kf = _expand_kv(k, H)
    N, M = q.shape[2], kf.shape[2]
    if N != M:
        raise ValueError("topk_blocks needs N == M")
    sb = torch.einsum("bhqd,bhkd->bhqk", _block_means(q, block), _block_means(kf, block))
    nb = sb.shape[-1]
    qb = torch.arange(nb, device=q.device).view(nb, 1)
    kb = torch.arange(nb, device=q.device).view(1, nb)
    earlier = (kb < qb).expand_as(sb)
    rank = _precedes(sb, earlier).sum(-1)
    keep = (kb == qb) | (earlier & (rank < topk))  # [B, H, nb, nb]
    blk = torch.arange(N, device=q.device) // block
    keep_tok = keep[:, :, blk][:, :, :, blk]  # [B, H, N, M]
    s = _scores(q, k)
    return _masked_softmax_attention(s, keep_tok & _causal(N, M, s.device), v, False)


def dense_permuted_blocks(q, k, v, *, perm, block=64, tau=0.9):
    """PBS-Attn (N == M): attention over permuted key slots with cumulative-mass block selection.

    Slot j' holds the original key/value perm[b,h,j'] (gathered from k, v); the token rule
    is perm[b,h,j'] <= i. Block score = qp . kp (block means of q and of the permuted keys,
    no scale, as written in the contract), softmax over the candidate key blocks (those with at
    least one allowed pair). Keep the shortest highest-first prefix whose mass reaches tau, plus
    candidates holding a key whose original position is in the query block's range.
    """
    H, D, E = q.shape[1], q.shape[-1], v.shape[-1]
    kf, vf = _expand_kv(k, H), _expand_kv(v, H)
    N, M = q.shape[2], kf.shape[2]
    if N != M:
        raise ValueError("permuted_blocks needs N == M")
    idx = perm.long()
    kp_tok = torch.gather(kf, 2, idx.unsqueeze(-1).expand(-1, -1, -1, D))
    vp_tok = torch.gather(vf, 2, idx.unsqueeze(-1).expand(-1, -1, -1, E))

    i = torch.arange(N, device=q.device).view(1, 1, N, 1)
    tok = idx.unsqueeze(2) <= i  # [B, H, N, M(slots)]

    mq = _membership(N, block, q.dtype, q.device)  # [nbq, N]
    mk = _membership(M, block, q.dtype, q.device)  # [nbk, M]
    cand = torch.einsum("qn,bhnm,km->bhqk", mq, tok.to(q.dtype), mk) > 0
    own_tok = (idx // block).unsqueeze(-1) == torch.arange(mq.shape[0], device=q.device)
    own = torch.einsum("bhmq,km->bhqk", own_tok.to(q.dtype), mk) > 0  # [B, H, nbq, nbk]

    score = torch.einsum("bhqd,bhkd->bhqk", _block_means(q, block), _block_means(kp_tok, block))
    prob, _ = _masked_softmax(score, cand)
    before = _precedes(prob, cand)  # [B, H, nbq, nbk, nbk]
    mass_before = (before.to(prob.dtype) * prob.unsqueeze(-2)).sum(-1)
    keep = cand & ((mass_before < tau) | own)

    qblk = torch.arange(N, device=q.device) // block
    kblk = torch.arange(M, device=q.device) // block
    keep_tok = keep[:, :, qblk][:, :, :, kblk] & tok
    s = torch.einsum("bhid,bhjd->bhij", q, kp_tok) * D ** -0.5
    return _masked_softmax_attention(s, keep_tok, vp_tok, False)


def dense_agent(q, k, v, *, agents=16):
    """Agent attention: agent tokens a = means of q over `agents` consecutive token groups."""
    B, H, N, D = q.shape
    if k.shape[2] != N or N % agents:
        raise ValueError("agent needs N == M and N divisible by agents")
    a = q.reshape(B, H, agents, N // agents, D).mean(dim=3)
    va = torch.softmax(_scores(a, k), dim=-1) @ _expand_kv(v, H)  # [B, H, agents, E]
    return torch.softmax(_scores(q, a), dim=-1) @ va


DENSE = {
    "dense": dense_dense,
    "causal": dense_causal,
    "gqa_causal": dense_gqa_causal,
    "sliding_window": dense_sliding_window,
    "sink_window": dense_sink_window,
    "alibi": dense_alibi,
    "softcap": dense_softcap,
    "relative_bias": dense_relative_bias,
    "document": dense_document,
    "prefix_lm": dense_prefix_lm,
    "key_padding": dense_key_padding,
    "label_table": dense_label_table,
    "neighborhood_2d": dense_neighborhood_2d,
    "criss_cross": dense_criss_cross,
    "epipolar": dense_epipolar,
    "softmax_one": dense_softmax_one,
    "sigmoid": dense_sigmoid,
    "query_softmax": dense_query_softmax,
    "reversed": dense_reversed,
    "linear_elu": dense_linear_elu,
    "lightning": dense_lightning,
    "channel": dense_channel,
    "differential": dense_differential,
    "moh": dense_moh,
    "topk_blocks": dense_topk_blocks,
    "permuted_blocks": dense_permuted_blocks,
    "agent": dense_agent,
}
