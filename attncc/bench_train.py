"""Training measurements for `attncc.bench`: what one forward and backward cost, and how far
each competitor's gradients are from the float32 reference's.

A benchmark runs in one `Mode`:

- `fwd`: the forward alone, no input requiring grad (inference; no graph recorded);
- `fwd_bwd`: a forward recording the graph, then `torch.autograd.grad` of the output with a
  fixed random output gradient, for q, k, v and every other float input (ALiBi slopes, a
  relative-bias table, sink logits: learnable, float32 as mixed-precision training keeps
  parameters; q, k, v in the benchmark's dtype);
- `bwd`: the same measurements, reported by the backward's time.

The backward's time is the difference of two medians, forward+backward minus the same forward
alone (recording the graph, as training's forward does), each timed like any forward (do_bench).
Not a retained graph timed on its own: torch.compile's backward with donated buffers refuses
`retain_graph=True` and compiles a different backward for it, so the difference is the one
measurement every competitor takes the same way.
"""
from __future__ import annotations

import enum

import torch

from .bench_mods import wide as wide_dtype
from .bench_report import finite
from .bench_timing import measure

# Above this many score pairs (B*H*N*M) the float32 reference is not differentiated: its
# autograd keeps several score-sized tensors (16 GiB each at B*H = 16, N = M = 16384).
REFERENCE_GRAD_PAIRS = 2 ** 31
QKV = ("q", "k", "v")


class Mode(enum.Enum):
    FWD = "fwd"
    FWD_BWD = "fwd_bwd"
    BWD = "bwd"

    @property
    def training(self) -> bool:
        return self is not Mode.FWD

    @property
    def flops_factor(self) -> float:
        """FlashAttention's count: the backward's five matmuls per pair against the forward's
        two make it 2.5 forwards."""
        return {Mode.FWD: 1.0, Mode.FWD_BWD: 3.5, Mode.BWD: 2.5}[self]

    @property
    def primary(self) -> str:
        """The timing `ms` (and TFLOP/s and speed-ups) stands for."""
        return {Mode.FWD: "fwd_ms", Mode.FWD_BWD: "fwd_bwd_ms", Mode.BWD: "bwd_ms"}[self]


def learnable(args: dict) -> dict:
    """The call's arguments with every float tensor a fresh leaf requiring grad: q, k, v in
    their dtype, the others (slopes, tables, sinks) in at least float32."""
    out = dict(args)
    for name, t in args.items():
        if torch.is_tensor(t) and t.is_floating_point():
            t = t.detach() if name in QKV else t.detach().to(wide_dtype(t.dtype))
            out[name] = t.clone().requires_grad_()
    return out


def leaves(args: dict) -> dict:
    return {n: t for n, t in args.items() if torch.is_tensor(t) and t.requires_grad}


def gradients(out: torch.Tensor, wrt: dict, grad_out: torch.Tensor) -> dict:
    """{name: d<out, grad_out>/d input}; zeros for an input the output does not depend on
    (epipolar's F: only its mask reads it)."""
    found = torch.autograd.grad(out, list(wrt.values()), grad_out.to(out.dtype), allow_unused=True,
                                materialize_grads=True)
    return dict(zip(wrt, found))


def output_gradient(like: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The fixed random dL/dO every competitor gets."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(like.shape, generator=gen).to(dtype=dtype, device=like.device)


def reference(reference_kernel, args: dict, differentiate: bool, grad_out_dtype: torch.dtype, seed: int):
    """(float32 output, the output gradient every competitor gets, {name: float32 gradient}).
    The reference runs on float32 copies of the inputs (float64 ones stay), differentiated
    only if asked."""
    wide = {n: t.detach().to(wide_dtype(t.dtype)) if torch.is_tensor(t) and t.is_floating_point() else t
            for n, t in args.items()}
    if not differentiate:
        with torch.no_grad():
            want = reference_kernel(**wide)
        return want, output_gradient(want, grad_out_dtype, seed), None
    wide = learnable(wide)
    want = reference_kernel(**wide)
    grad_out = output_gradient(want, grad_out_dtype, seed)
    grads = gradients(want, leaves(wide), grad_out)
    return want.detach(), grad_out, {n: g.detach() for n, g in grads.items()}


def reference_gradient_note(pairs: int) -> str | None:
    """Why the reference is not differentiated at this size, or None when it is."""
    if pairs <= REFERENCE_GRAD_PAIRS:
        return None
    return (f"the float32 reference is not differentiated above {REFERENCE_GRAD_PAIRS} score pairs "
            f"(B*H*N*M = {pairs}): its autograd keeps several score-sized tensors")


def measure_training(fn, wrt: dict, grad_out: torch.Tensor, device: torch.device, warmup: int, reps: int):
    """(output, gradients, timings) of a competitor's forward `fn` (a zero-argument callable
    whose output depends on the leaves `wrt`): `fwd_ms` recording the graph, `fwd_bwd_ms`,
    `bwd_ms` their difference; `fwd_first_call_ms` (the forward's compilation), then the
    first call (the backward's compilation), wall time and peak memory of fwd+bwd."""
    def fwd_bwd():
        out = fn()
        return out.detach(), gradients(out, wrt, grad_out)

    # the output kept from the warm-up is detached: its graph (a materialising competitor's
    # score-sized tensors) is freed before the timed reps
    _, fwd = measure(lambda: fn().detach(), device, warmup, reps)
    (out, grads), both = measure(fwd_bwd, device, warmup, reps)
    timing = {**both, "fwd_ms": fwd["ms"], "fwd_bwd_ms": both["ms"], "bwd_ms": both["ms"] - fwd["ms"],
              "fwd_first_call_ms": fwd["first_call_ms"]}
    del timing["ms"]
    return out, grads, timing


def grad_errors(grads: dict, want: dict | None) -> dict | None:
    """Largest absolute error of each gradient against the reference's (None: not computed)."""
    if want is None:
        return None
    return {n: finite(float((g.float() - want[n]).abs().max())) if g.numel() else 0.0 for n, g in grads.items()}


def grad_scale(want: dict | None) -> dict | None:
    """The reference gradients' largest magnitudes: what the errors compare with."""
    if want is None:
        return None
    return {n: finite(float(g.abs().max())) if g.numel() else 0.0 for n, g in want.items()}
