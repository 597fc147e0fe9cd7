"""PyTorch formulations of the softmax-family examples: what attncc is benchmarked against.

Each example maps to a `Formulation` whose `build(tensors, scalars)` returns FlexAttention
`score_mod` / `mask_mod` closures for one call (tensors: the call's inputs; scalars: every
dim and param, defaults included). The mods use tensor operations only, so the same
closures serve FlexAttention, which calls them per element under vmap, and the eager
composition (`eager_attention`), which calls them once on broadcast index grids. Every
example scales scores by `D ** -0.5` and names its inputs q, k, v; keys and values may have
fewer heads than queries (grouped-query attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Mods:
    score_mod: Callable | None = None  # (score, b, h, i, j) -> score
    mask_mod: Callable | None = None   # (b, h, i, j) -> bool
    # Per-query-head sink logits: one more virtual key whose value is 0 (gpt-oss). Not a mod
    # FlexAttention has: its output is rescaled by sigmoid(lse - sink) (`attncc.bench_competitors`).
    sinks: torch.Tensor | None = None


@dataclass(frozen=True)
class Formulation:
    build: Callable[[dict, dict], Mods]
    # Every allowed pair lies in the causal triangle: FlashAttention's FLOP count halves.
    causal: bool = False
    # How scaled_dot_product_attention expresses it: "dense", "causal", or None (it cannot
    # without a materialised bias, which is the eager composition's job).
    sdpa: str | None = None


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Bias tables and geometry in at least float32, as the reference computes them."""
    return t.to(wide(t.dtype)) if t.is_floating_point() else t


def _causal(s: dict) -> Callable:
    """Bottom-right aligned: with M keys and N queries, query i sees keys j <= i + (M - N)."""
    offset = s["M"] - s["N"]
    return lambda b, h, i, j: j <= i + offset


def _sliding_window(t, s):
    window = s["window"]
    return Mods(mask_mod=lambda b, h, i, j: (j <= i) & (i - j < window))


def _sink_window(t, s):
    window, sinks = s["window"], s["sinks"]
    return Mods(mask_mod=lambda b, h, i, j: (j <= i) & ((i - j < window) | (j < sinks)))


def _alibi(t, s):
    slopes, offset = _wide(t["slopes"]), s["M"] - s["N"]
    return Mods(lambda score, b, h, i, j: score + slopes[h] * (j - i - offset), _causal(s))


def _softcap(t, s):
    cap = s["cap"]
    return Mods(lambda score, b, h, i, j: cap * torch.tanh(score / cap), _causal(s))


def _relative_bias(t, s):
    table, r = _wide(t["table"]), (s["W"] - 1) // 2
    return Mods(lambda score, b, h, i, j: score + table[h, torch.clamp(j - i, -r, r) + r])


def _learned_sinks(t, s):
    return Mods(mask_mod=_causal(s), sinks=_wide(t["sinks"]))


def _document(t, s):
    doc = t["doc"]
    return Mods(mask_mod=lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i))


def _prefix_lm(t, s):
    prefix = t["prefix"]
    return Mods(mask_mod=lambda b, h, i, j: (j <= i) | (j < prefix[b]))


def _key_padding(t, s):
    valid = t["valid"]
    return Mods(mask_mod=lambda b, h, i, j: valid[b, j])


def _label_table(t, s):
    allow, label_q, label_k = t["allow"], t["label_q"], t["label_k"]
    return Mods(mask_mod=lambda b, h, i, j: allow[label_q[b, i], label_k[b, j]])


def _natten_axis(x, y, length, kernel, dilation):
    """NATTEN's rule on one axis: y is among the `kernel` members of x's dilation group
    nearest to x (window centred on x, shifted inward at the borders)."""
    group_len = (length - x % dilation + dilation - 1) // dilation
    start = torch.clamp(x // dilation - kernel // 2, min=0)
    start = torch.where(group_len >= kernel, torch.minimum(start, group_len - kernel), torch.zeros_like(start))
    yg = y // dilation
    return (y % dilation == x % dilation) & (start <= yg) & (yg < start + kernel)


def _neighborhood_2d(t, s):
    height, width, kernel, dilation = s["height"], s["width"], s["kernel"], s["dilation"]

    def mask_mod(b, h, i, j):
        return (_natten_axis(i // width, j // width, height, kernel, dilation)
                & _natten_axis(i % width, j % width, width, kernel, dilation))
    return Mods(mask_mod=mask_mod)


def _criss_cross(t, s):
    width = s["width"]
    return Mods(mask_mod=lambda b, h, i, j: (i // width == j // width) | (i % width == j % width))


def _epipolar(t, s):
    fundamental, width, stride, tau = _wide(t["F"]), s["width"], s["stride"], s["tau"]
    per_view = s["height"] * width

    def pixel(n):
        return ((n % width + 0.5) * stride, (n % per_view // width + 0.5) * stride)

    def mask_mod(b, h, i, j):
        f = fundamental[b, i // per_view, j // per_view]  # [..., 3, 3]: query view -> key view
        (xi, yi), (xj, yj) = pixel(i), pixel(j)
        line = [f[..., r, 0] * xi + f[..., r, 1] * yi + f[..., r, 2] for r in range(3)]
        distance = torch.abs(line[0] * xj + line[1] * yj + line[2])
        return (i // per_view == j // per_view) | (distance < tau * torch.sqrt(line[0] ** 2 + line[1] ** 2))
    return Mods(mask_mod=mask_mod)


FORMULATIONS: dict[str, Formulation] = {
    "dense": Formulation(lambda t, s: Mods(), sdpa="dense"),
    "causal": Formulation(lambda t, s: Mods(mask_mod=_causal(s)), causal=True, sdpa="causal"),
    "gqa_causal": Formulation(lambda t, s: Mods(mask_mod=_causal(s)), causal=True, sdpa="causal"),
    "sliding_window": Formulation(_sliding_window, causal=True),
    "sink_window": Formulation(_sink_window, causal=True),
    "alibi": Formulation(_alibi, causal=True),
    "softcap": Formulation(_softcap, causal=True),
    "relative_bias": Formulation(_relative_bias),
    "document": Formulation(_document, causal=True),
    "learned_sinks": Formulation(_learned_sinks, causal=True),
    "prefix_lm": Formulation(_prefix_lm),
    "key_padding": Formulation(_key_padding),
    "label_table": Formulation(_label_table),
    "neighborhood_2d": Formulation(_neighborhood_2d),
    "criss_cross": Formulation(_criss_cross),
    "epipolar": Formulation(_epipolar),
}


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mods: Mods) -> torch.Tensor:
    """The composition a PyTorch user writes: materialise every score, modify and mask
    them, softmax in float32 (over one more column holding the sink logits, if any), multiply
    by v. Rows without an allowed key give 0."""
    heads, groups = q.shape[1], k.shape[1]
    if groups != heads:
        k, v = (x.repeat_interleave(heads // groups, dim=1) for x in (k, v))
    s = torch.einsum("bhid,bhjd->bhij", q, k).to(wide(q.dtype)) * q.shape[-1] ** -0.5
    b, h, i, j = (torch.arange(n, device=s.device).view([-1 if d == axis else 1 for d in range(4)])
                  for axis, n in enumerate(s.shape))
    if mods.score_mod is not None:
        s = mods.score_mod(s, b, h, i, j)
    if mods.mask_mod is not None:
        s = s.masked_fill(~mods.mask_mod(b, h, i, j), float("-inf"))
    if mods.sinks is not None:
        sink = mods.sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, sink.to(s.dtype)], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    if mods.mask_mod is not None:
        p = p.nan_to_num(0.0)
    return torch.einsum("bhij,bhje->bhie", p.to(v.dtype), v)
