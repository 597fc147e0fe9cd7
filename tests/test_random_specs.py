"""Randomly composed specs: generated kernels against the reference executor.

Each case draws a score modification, one or two masks, a weight (softmax over keys or
over queries, softmax1, sigmoid), a head layout (plain or grouped) and odd sizes, writes the spec text, and checks the Triton kernel (in the interpreter)
against the reference. The pieces cover the paths of the planner and code generator:
affine masks with one or several conjuncts, masks that need a runtime block map, masks
mixing both, tensor-valued biases, gathers, params, GQA packing and split-KV.
"""
import random

import pytest
import torch

import attncc
from attncc.binding import bind

MODS = [
    "",
    "  s += slopes[h] * (j - i)\n",
    "  s = cap * tanh(s / cap)\n",
    "  s += table[h, clamp(j - i, -R, R) + R]\n",
    "  s += bias[b, j] * 0.5\n",
]
MASKS = [
    "j <= i",
    "j <= i + (M - N)",
    "i - j < window and j <= i",
    "j <= i and (i - j < window or j < sinks)",
    "abs(i - j) <= window",
    "doc[b, i] == doc_k[b, j]",
    "valid[b, j]",
    "i % 3 == j % 3 or j < sinks",
    "j >= i - window or valid[b, j]",
]
HEADS = {"plain": "h", "grouped": "h // (H // G)"}
WEIGHTS = ["softmax(s, j)", "softmax(s, j)", "softmax1(s, j)", "sigmoid(s)", "softmax(s, i)"]


EXTRA_INPUTS = {"slopes": "slopes[H]", "table": "table[H,W]", "bias": "bias[B,M]", "doc": "doc[B,N]: int",
                "doc_k": "doc_k[B,M]: int", "valid": "valid[B,M]: bool"}


def spec(mod: str, masks: list[str], heads: str, weights: str = "softmax(s, j)") -> str:
    kv = "G" if heads == "grouped" else "H"
    body = [f"  s[b,h,i,j] = q[b,h,i,d] * k[b,{HEADS[heads]},j,d] * D ** -0.5", mod.rstrip("\n"),
            *(f"  mask {m}" for m in masks), f"  p = {weights}",
            f"  o[b,h,i,e] = p[b,h,i,j] * v[b,{HEADS[heads]},j,e]"]
    used = [decl for name, decl in EXTRA_INPUTS.items() if any(f"{name}[" in line for line in body)]
    head = [f"attention random_case(q[B,H,N,D], k[B,{kv},M,D], v[B,{kv},M,E]"
            + "".join(", " + d for d in used) + ") -> o[B,H,N,E] {",
            "  param window: int = 5", "  param sinks: int = 2", "  param cap: float = 3.0"]
    if "table[" in mod:
        head.append("  let R = (W - 1) // 2")
    return "\n".join(line for line in [*head, *body, "}"] if line) + "\n"


def inputs(rng: random.Random, heads: str):
    B, H, G = 2, 4, 2
    N = rng.choice([9, 23, 37, 50])
    M = N if rng.random() < 0.5 else rng.choice([N, 17, 45])
    D, E = rng.choice([(16, 16), (24, 12), (8, 40)])
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    kvh = G if heads == "grouped" else H
    ids = torch.sort(torch.randint(0, 3, (B, max(N, M)), generator=g), dim=1).values
    return dict(q=torch.randn(B, H, N, D, generator=g), k=torch.randn(B, kvh, M, D, generator=g),
                v=torch.randn(B, kvh, M, E, generator=g), slopes=torch.rand(H, generator=g),
                table=torch.randn(H, 7, generator=g), bias=torch.randn(B, M, generator=g),
                doc=ids[:, :N], doc_k=ids[:, :M], valid=torch.rand(B, M, generator=g) < 0.7,
                window=rng.choice([1, 4, 9]), sinks=rng.choice([0, 1, 3]))


@pytest.mark.parametrize("seed", range(32))
def test_random_spec(seed):
    rng = random.Random(seed)
    heads = rng.choice(list(HEADS))
    masks = rng.sample(MASKS, rng.choice([1, 1, 2]))
    kwargs = inputs(rng, heads)
    weights = rng.choice(WEIGHTS)
    text = spec(rng.choice(MODS), masks, heads, weights)
    kernel = attncc.compile(text, backend="triton")
    kwargs = {k: v for k, v in kwargs.items() if k in kernel.program.inputs or k in kernel.program.params}
    config = {"SPLIT_KV": rng.choice([1, 1, 2])}
    with_lse = weights == "softmax(s, j)"
    got = kernel.generated.launcher(bind(kernel.program, kwargs), with_lse, config)
    want = attncc.compile(text, backend="reference")(**kwargs, return_lse=with_lse)
    for x, ref in zip(got, want if with_lse else [want]):
        torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{m}\n{text}")


FEATURE_MAPS = ["elu({x}) + 1", "relu({x})", "{x} * {x}", "sigmoid({x})"]


@pytest.mark.parametrize("seed", range(12))
def test_random_linear_spec(seed):
    """Linear attention with random feature maps, decay, mask and normalisation: whichever plan
    runs (reassociated, chunked scan or row streaming), it matches the reference."""
    rng = random.Random(1000 + seed)
    fq, fk = (rng.choice(FEATURE_MAPS) for _ in range(2))
    decay = rng.random() < 0.5
    masked = rng.choice(["", "  mask j <= i", "  mask i - j < 6 and j <= i"])
    normalised = rng.random() < 0.5 and not decay
    N = rng.choice([17, 40])
    M = N if masked or rng.random() < 0.5 else 29
    lines = ["attention linear_case(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]" + (", lam[H]" if decay else "")
             + ") -> o[B,H,N,E] {",
             f"  fq[b,h,i,d] = {fq.format(x='q[b,h,i,d]')}",
             f"  fk[b,h,j,d] = {fk.format(x='k[b,h,j,d]')}",
             "  a[b,h,i,j] = fq[b,h,i,d] * fk[b,h,j,d]" + (" * lam[h] ** (i - j)" if decay else ""),
             masked,
             "  num[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]"]
    if normalised:
        lines += ["  den[b,h,i] = sum(a, j)", "  o[b,h,i,e] = num[b,h,i,e] / den[b,h,i]"]
    else:
        lines[-1] = "  o[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]"
    text = "\n".join(line for line in [*lines, "}"] if line.strip()) + "\n"
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(q=torch.randn(1, 2, N, 16, generator=g) * 0.5, k=torch.randn(1, 2, M, 16, generator=g) * 0.5,
                  v=torch.randn(1, 2, M, 8, generator=g))
    if decay:
        kwargs["lam"] = torch.rand(2, generator=g) * 0.5 + 0.5
    kernel = attncc.compile(text, backend="triton")
    got = kernel(**kwargs)
    want = attncc.compile(text, backend="reference")(**kwargs)
    scale = want.abs().max().clamp(min=1)
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"{m}\n{kernel.generated.launcher.last_path}\n{text}")
