"""The generated backward of the general streaming planner's plans (passes/stream_backward.py):
gradients of every float input against the float64 reference's autograd in Triton's
interpreter (odd shapes, N != M, D != E, causal on and off, empty rows, GQA via
tests/test_key_sets.py), a bf16 smoke test, no score-sized launch argument, the operator path
(opcheck, torch.compile), and the reason a plan with a selection takes the reference."""
from __future__ import annotations

import os

import pytest
import torch
from compiled_steps import compiled_and_eager_gradients

import attncc
from attncc import runtime, torch_ops

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the triton backend needs a GPU or TRITON_INTERPRET=1")

B, H, N, M, D, E = 1, 2, 37, 45, 8, 12


def _inputs(name, n=N, m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(q=torch.randn(B, H, n, D, generator=g), k=torch.randn(B, H, m, D, generator=g),
             v=torch.randn(B, H, m, E, generator=g))
    if name == "prob_columns":
        x["cols"] = torch.tensor([[0, 7, m - 1]])
    if name == "column_mass":
        x["rows"] = torch.rand(B, n, generator=g) > 0.3
    if name == "class_redistribute":
        x.update(sink=torch.rand(B, H, m, generator=g) > 0.7, recv=torch.rand(B, 1, m, generator=g) > 0.5,
                 p=torch.tensor([0.3, -0.2]), rows=torch.rand(B, n, generator=g) > 0.3)
    return x


def _gradients(name, backend, x, dtype, params, seed=1):
    """(kernel, outputs, {name: gradient}) of sum(out * w) over every output (and the
    log-sum-exp with `return_lse`)."""
    kernel = attncc.compile(f"examples/{name}.attn", backend=backend)
    args = {n: (t.to(dtype).requires_grad_() if t.is_floating_point() else t) for n, t in x.items()}
    outs = kernel(**args, **params)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    floats = [n for n, t in args.items() if t.is_floating_point()]
    grads = torch.autograd.grad(loss, [args[n] for n in floats], allow_unused=True)
    return kernel, outs, dict(zip(floats, grads))


def _close(got, want, what, tol=2e-5):
    assert got is not None and torch.isfinite(got).all(), what
    err = float((got.double() - want).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), f"{what}: off by {err:.3g}"


@pytest.mark.parametrize("name,params,n,m", [
    ("prob_columns", dict(causal=False, return_lse=True), N, M),  # the LSE's gradient joins the softmax's
    ("prob_columns", dict(causal=True), 41, 23),     # N > M, causal: the first 18 rows have no key (empty rows)
    ("column_mass", dict(causal=True), N, M),        # a column pass at level 1 (colsum over the chosen rows)
    ("class_redistribute", dict(), N, M),            # three online value sums, two online sums; p[H] too
])
def test_gradients_match_the_float64_reference(name, params, n, m):
    x = _inputs(name, n, m)
    kernel, outs, got = _gradients(name, "triton", x, torch.float32, params)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run, kernel.last_run
    _, want_outs, want = _gradients(name, "reference", x, torch.float64, params)
    for o, w in zip(outs, want_outs):
        _close(o, w, "forward")
    assert set(got) == set(want) and len(got) >= 3
    for g in got:
        _close(got[g], want[g], f"{name} d{g}")
    if n > m and params.get("causal"):  # rows before the first key: nothing allowed, no gradient
        assert got["q"][:, :, :n - m].abs().max() == 0


def test_bf16_smoke():
    x = _inputs("column_mass", 19, 21)
    kernel, _, got = _gradients("column_mass", "triton", x, torch.bfloat16, dict(causal=True))
    assert kernel.last_run["backward"] == "triton"
    _, _, want = _gradients("column_mass", "reference", x, torch.float64, dict(causal=True))
    for g in got:
        assert got[g].dtype == torch.bfloat16
        _close(got[g], want[g], f"bf16 d{g}", tol=5e-2)


@pytest.mark.parametrize("name", ["class_redistribute"])
def test_backward_launches_hold_no_score_sized_tensor(name):
    """Every tensor a backward kernel reads or writes is O(B*H*(N+M)*features): the saved
    accumulators, their gradients and the partial gradients, never B*H*N*M."""
    x = _inputs(name)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    args = {n: (t.requires_grad_() if t.is_floating_point() else t) for n, t in x.items()}
    outs = kernel(**args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    token = runtime._RECORDING.set([])
    try:
        torch.autograd.grad(sum(o.sum() for o in outs), [args["q"], args["k"], args["v"]], allow_unused=True)
        launches = runtime._RECORDING.get()
    finally:
        runtime._RECORDING.reset(token)
    assert {launch.role for launch in launches} >= {runtime.KernelRole.BWD_ROWS, runtime.KernelRole.BWD_STREAM}
    for launch in launches:
        for a in launch.args:
            if torch.is_tensor(a):
                assert a.numel() < B * H * N * M, (launch.kernel, tuple(a.shape))


def test_a_selection_takes_the_reference_and_says_why():
    spec = """attention top(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], m[B,H,N]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  m = amax(s, j)
}"""
    kernel = attncc.compile(spec, backend="triton")
    x = {n: t.requires_grad_() for n, t in _inputs("dense", 9, 11).items()}
    o, m = kernel(**x)
    assert kernel.last_run["backward"] == "reference" and "selection" in kernel.last_run["backward_reason"]
    assert o.grad_fn is not None and m.grad_fn is not None


def test_operator_path_opcheck_and_compiled_training_step():
    """The forward operator returns the packed accumulators as its saved statistic; the backward
    operator runs the generated kernels: opcheck passes, and a torch.compile(fullgraph=True) step
    gives the eager gradients."""
    kernel = attncc.compile("examples/column_mass.attn", backend="triton")
    x = {n: (t.requires_grad_() if t.is_floating_point() else t) for n, t in _inputs("column_mass", 9, 11).items()}
    args = torch_ops.arguments(kernel, **x)
    assert args[-2] == torch_ops.GENERATED
    torch.library.opcheck(kernel.op, args)
    floats = [x[n] for n in ("q", "k", "v")]

    def step(**kw):
        o, colsum = kernel(**kw)
        return o.square().sum() + (colsum * 0.5).sum()

    got, want = compiled_and_eager_gradients(kernel, step, x, floats)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [13, 24])  # three outputs each: attention, statistics, column sums, ...
def test_random_general_specs_gradients(seed):
    """Randomly composed specs of tests/test_random_streams.py on the general plan: every float
    input's gradient equals the float64 reference's."""
    from attncc.random_inputs import random_arguments
    from test_random_streams import generate

    case = generate(seed)
    grads = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        kernel = attncc.compile(case.text, backend=backend)
        kwargs = random_arguments(kernel.program, {k: v for k, v in case.shape.items() if k in kernel.program.dims},
                                  {k: v for k, v in case.params.items() if k in kernel.program.params}, seed=seed)
        floats = [n for n, t in kwargs.items() if torch.is_tensor(t) and t.is_floating_point()]
        x = {n: (t.to(dtype).requires_grad_() if n in floats else t) for n, t in kwargs.items()}
        outs = kernel(**x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if backend == "triton":
            assert kernel.last_run["backward"] == "triton", kernel.last_run
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
        grads.append(torch.autograd.grad(loss, [x[n] for n in floats], allow_unused=True))
    for n, a, b in zip(floats, *grads):
        if b is not None:
            _close(a, b, f"seed {seed} d{n}", tol=1e-4)
