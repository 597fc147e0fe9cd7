"""The PyTorch implementations attncc is timed against, each built as a zero-argument
callable over one call's inputs (so that building, mask creation and compilation stay
outside the timed region):

- `sdpa:<backend>`: `scaled_dot_product_attention` pinned to one backend (flash,
  efficient, cudnn, math), for the variants it expresses (dense, causal aligned
  bottom-right, GQA);
- `flex`: `torch.compile(flex_attention)` with a block mask built on the device (learned
  sinks: its output times sigmoid(lse - sink), the same function, compiled with it);
- `eager`: the materialising composition of `attncc.bench_mods.eager_attention`, or for
  specs without a FlexAttention formulation the spec's own cascade of torch ops with every
  intermediate materialised;
- `compiled`: `torch.compile` of that composition.

Each callable returns the output; inputs that require grad make it differentiable (every
competitor above is, except FlexAttention on the CPU). Without compilation (CPU smoke runs)
`flex` runs eagerly and `compiled` is skipped.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .bench_mods import Formulation, eager_attention

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
COMPETITORS = ("attncc", "sdpa", "flex", "eager", "compiled")


class Skip(Exception):
    """A competitor that cannot run this variant or shape; the message says why."""


def expand(names) -> list[str]:
    """Competitor names with `sdpa` standing for one entry per SDPA backend."""
    out = []
    for name in sorted(names, key=lambda n: n != "attncc"):  # attncc first: the others are compared with it
        if name == "sdpa":
            out += [f"sdpa:{b}" for b in SDPA_BACKENDS]
        elif name in COMPETITORS or name.removeprefix("sdpa:") in SDPA_BACKENDS:
            out.append(name)
        else:
            raise ValueError(f"unknown competitor '{name}'; choose from {', '.join(COMPETITORS)} "
                             f"or sdpa:{'|'.join(SDPA_BACKENDS)}")
    return out


def build(name: str, args: dict, scalars: dict, formulation: Formulation | None, compile: bool,
          program=None) -> Callable:
    """A callable running competitor `name` on the call's inputs (raises Skip)."""
    if formulation is None:
        if name == "compiled" and not compile:
            raise Skip("torch.compile is not run in smoke mode")
        if name in ("eager", "compiled") and program is not None:
            return _ir_composition(program, args, scalars, name == "compiled")
        raise Skip("no PyTorch formulation of this spec (attncc.bench_mods.FORMULATIONS)")
    q, k, v = args["q"], args["k"], args["v"]
    if name.startswith("sdpa:"):
        return _sdpa(SDPA_BACKENDS[name.removeprefix("sdpa:")], q, k, v, formulation.sdpa)
    mods = formulation.build({n: t for n, t in args.items() if torch.is_tensor(t)}, scalars)
    if name == "flex":
        return _flex(q, k, v, mods, compile)
    if name == "eager":
        return lambda: eager_attention(q, k, v, mods)
    if not compile:
        raise Skip("torch.compile is not run in smoke mode")
    compiled = torch.compile(eager_attention)
    return lambda: compiled(q, k, v, mods)


def _ir_composition(program, args: dict, scalars: dict, compile: bool) -> Callable:
    """For specs FlexAttention cannot express, the eager PyTorch composition is the spec's own
    cascade of torch ops (einsum, softmax, where, ...) with every intermediate materialised:
    the reference executor with one block spanning the whole streamed index."""
    from .reference import Reference

    tensors = {n: t for n, t in args.items() if torch.is_tensor(t)}
    ref = Reference(program, tensors, scalars, block=1 << 30)

    def run():
        ref.shared, ref.local = {}, {}
        return ref.run()[0]

    if not compile:
        return run
    return torch.compile(run)


def _sdpa(backend: SDPBackend, q, k, v, form: str | None) -> Callable:
    if form is None:
        raise Skip("scaled_dot_product_attention expresses dense and causal masks only")
    n, m = q.shape[2], k.shape[2]
    causal = form == "causal"
    # Bottom-right causal: is_causal where N == M; otherwise an explicit mask (which the
    # flash backend declines; torch's causal_lower_right would import triton, upsetting
    # the CPU interpreter of smoke runs, and is not taken by flash either).
    bottom_right = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n) if causal and n != m else None
    options = {"attn_mask": bottom_right, "is_causal": causal and n == m, "enable_gqa": k.shape[1] != q.shape[1]}

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **options)

    with warnings.catch_warnings(record=True) as caught:  # the backend says why it declines
        warnings.simplefilter("always")
        try:
            run()
        except RuntimeError as err:
            reasons = [str(w.message).strip() for w in caught] or [str(err).partition("\n")[0]]
            raise Skip("; ".join(dict.fromkeys(reasons))) from None
    return run


def _flex(q, k, v, mods, compile: bool) -> Callable:
    if q.device.type == "cpu" and q.requires_grad:
        raise Skip("FlexAttention has no backward on the CPU")
    block_mask = None
    if mods.mask_mod is not None:  # no example's mask depends on the head
        block_mask = create_block_mask(mods.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    options = dict(score_mod=mods.score_mod, block_mask=block_mask, scale=q.shape[-1] ** -0.5,
                   enable_gqa=k.shape[1] != q.shape[1])
    attend = flex_attention if mods.sinks is None else _with_sinks
    if mods.sinks is not None:
        options["sinks"] = mods.sinks
    if compile:
        compiled = torch.compile(attend)
        return lambda: compiled(q, k, v, **options)

    def run_eagerly():
        with warnings.catch_warnings():  # eager flex warns that it is slow; smoke runs know
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return attend(q, k, v, **options)
    return run_eagerly


def _with_sinks(q, k, v, sinks, **options):
    """Softmax with one more key of logit sinks[h] and value 0: FlexAttention's output over the
    real keys times their share of the mass, exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink)
    (differentiable: FlexAttention's backward takes the LSE's gradient)."""
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **options)
    share = torch.sigmoid(aux.lse - sinks.view(1, -1, 1))
    return (out * share.unsqueeze(-1)).to(out.dtype)
