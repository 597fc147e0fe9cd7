"""Generated backward of softmaxes along another axis and of mixture-of-heads, in Triton's interpreter.

`query_softmax` and `reversed` read a precomputed log-sum-exp of the scores along the queries
(a statistics pass): its gradient is a column sum of the weights' backward, and it enters the
statistics pass's scores as `P * dLSE`, through that pass's own generated kernels (a softmax
backward with no values). `moh` is differentiated head by head: each head's softmax backward
with `w * dO`, `dw = dO . O_h` chained into `router` by torch, query tiles that no row weighs
skipped. Each is checked against the float64 reference's autograd on odd shapes (N != M, D != E,
tiles that divide neither).
"""
import math

import pytest
import torch
from compiled_steps import compiled_and_eager_gradients

import attncc
from attncc.passes.backward import plan_backward

CAUSAL_QS = """
attention causal_qs(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], slopes[H]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += slopes[h] * (j - i)
  mask j <= i + (M - N)
  p = softmax(s, i)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


def spec(name):
    return CAUSAL_QS if name == "causal_qs" else f"examples/{name}.attn"


def tensors(name, seed=0, B=1, H=2, N=37, M=45, D=12, E=10):
    g = torch.Generator().manual_seed(seed)
    if name == "reversed":
        M = N
    out = {"q": torch.randn(B, H, N, D, generator=g), "k": torch.randn(B, H, M, D, generator=g),
           "v": torch.randn(B, H, M, E, generator=g)}
    if name == "reversed":
        out["gate"] = torch.randn(B, H, N, generator=g)
    if name == "causal_qs":
        out["slopes"] = torch.rand(H, generator=g) * 0.2
    if name == "moh":
        out["router"] = torch.randn(B, N, H, generator=g)
    return out


def gradients(name, backend, kwargs, wanted, dtype=None, seed=5, **params):
    kernel = attncc.compile(spec(name), backend=backend)
    args = {n: (t.to(dtype) if dtype else t).detach().requires_grad_(n in wanted) for n, t in kwargs.items()}
    o = kernel(**args, **params)
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.dtype)
    grads = torch.autograd.grad(o, [args[n] for n in wanted], g)
    return kernel, o, dict(zip(wanted, grads))


def assert_close_to_scale(got, want, rel=2e-5, what=""):
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("name,wanted", [
    ("query_softmax", ("q", "k", "v")),
    ("reversed", ("q", "k", "v", "gate")),
    ("causal_qs", ("q", "k", "v", "slopes")),
])
def test_softmax_along_another_axis_matches_the_float64_reference(name, wanted):
    kwargs = tensors(name)
    kernel, o, got = gradients(name, "triton", kwargs, wanted)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run
    assert kernel.backward_launcher().statistics, "the statistics pass has its own backward kernels"
    _, o64, want = gradients(name, "reference", kwargs, wanted, dtype=torch.float64)
    assert_close_to_scale(o, o64, what="o")
    for n in wanted:
        assert_close_to_scale(got[n], want[n], what=f"d{n}")


def test_statistics_backward_is_a_softmax_backward_without_values():
    """The statistics pass's backward plan: a softmax (its LSE), no values, no score-sized tensor."""
    kernel = attncc.compile("examples/query_softmax.attn", backend="triton")
    bplan = plan_backward(kernel.generated.plan)
    (node, stats), = bplan.statistics.items()
    assert stats.plan.v is None and not stats.pointwise and stats.plan.i == "j" and stats.plan.j == "i"
    pre = [rd for rd in bplan.reads if rd.node is node]
    assert len(pre) == 1 and pre[0].mode.name == "COLS"  # d loss / d lse[j]: a column sum
    text = kernel.backward_launcher().statistics[node].src.source
    assert "dv +=" not in text and "v_base" not in text and "do = tl.load" not in text and "dp = 0.0" in text


def test_softmax_over_queries_keeps_no_score_sized_tensor(monkeypatch):
    """The backward's launches: the statistics pass recomputed by its forward kernel, the
    weights' dK/dV and dQ, the statistics pass's own dK/dV and dQ; no argument holds B·H·N·M
    values (the statistic is not recomputed by the reference's score-sized torch ops)."""
    from attncc import reference, row_backward, runtime

    launched = []
    for module in (row_backward, runtime):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda kl, real=real: launched.append(kl) or real(kl))
    full = reference.Reference.full

    def no_statistic(self, node):
        assert getattr(node, "op", None) != "logsumexp", "the reference computed the statistic"
        return full(self, node)

    monkeypatch.setattr(reference.Reference, "full", no_statistic)
    B, H, N, M = 1, 2, 37, 45
    kwargs = tensors("query_softmax", B=B, H=H, N=N, M=M)
    kernel, _, _ = gradients("query_softmax", "triton", kwargs, ("q", "k", "v"))
    assert kernel.last_run["backward"] == "triton"
    names = [kl.kernel.__name__.removeprefix("attn_query_softmax_") for kl in launched]
    assert names == ["stats0_fwd", "fwd", "stats0_fwd", "bwd_dkdv", "bwd_dq", "stats0_bwd_dkdv", "stats0_bwd_dq"]
    assert all(a.numel() < B * H * N * M for kl in launched for a in kl.args if torch.is_tensor(a))


def test_mixture_of_heads_matches_the_float64_reference(topk=2):
    """Top-2 here; top-1 in the test below (one head per token)."""
    kwargs = tensors("moh", H=3)
    wanted = ("q", "k", "v", "router")
    kernel, o, got = gradients("moh", "triton", kwargs, wanted, topk=topk)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run
    _, o64, want = gradients("moh", "reference", kwargs, wanted, dtype=torch.float64, topk=topk)
    assert_close_to_scale(o, o64, what="o")
    for n in wanted:
        assert_close_to_scale(got[n], want[n], what=f"d{n}")


def test_mixture_of_heads_skips_query_tiles_no_row_weighs():
    """Head 0 is chosen by no row of the first query tile (16 rows in the interpreter): its
    queries there are NaN. Were any backward kernel (or the per-head recompute) to visit that
    tile, the NaN would reach dK and dV (0 * NaN); skipped, every gradient equals the reference's
    with clean queries (where those rows' dq is exactly 0)."""
    kwargs = tensors("moh", H=3)
    kwargs["router"][:, :16, 0] = -30.0
    poisoned = dict(kwargs, q=kwargs["q"].clone())
    poisoned["q"][:, 0, :16] = math.nan
    wanted = ("q", "k", "v", "router")
    kernel, o, got = gradients("moh", "triton", poisoned, wanted, topk=1)
    assert kernel.last_run["backward"] == "triton"
    assert kernel.backward_launcher().parts[0][0].src.dq.name  # the per-head kernels ran
    _, o64, want = gradients("moh", "reference", kwargs, wanted, dtype=torch.float64, topk=1)
    assert torch.isfinite(o).all()
    for n in wanted:
        assert torch.isfinite(got[n]).all(), f"d{n} saw a skipped tile"
        assert_close_to_scale(got[n], want[n], what=f"d{n}")
    assert (got["q"][:, 0, :16] == 0).all()


@pytest.mark.parametrize("name", ["query_softmax", "moh"])
def test_bfloat16_smoke(name):
    kwargs = tensors(name, N=21, M=27)
    wanted = tuple(n for n in kwargs)
    kernel, o, got = gradients(name, "triton", kwargs, wanted, dtype=torch.bfloat16)
    assert kernel.last_run["backward"] == "triton"
    _, _, want = gradients(name, "reference", kwargs, wanted, dtype=torch.float64)
    for n in wanted:
        assert got[n].dtype == torch.bfloat16
        assert_close_to_scale(got[n].float(), want[n], rel=5e-2, what=f"d{n}")


def test_compile_fullgraph_mixture_of_heads():
    """moh traced by torch.compile: one graph, the generated backward inside the backward
    operator (router included), eager's gradients."""
    kernel = attncc.compile("examples/moh.attn", backend="triton")
    kwargs = {n: t.requires_grad_(True) for n, t in tensors("moh", N=9, M=11, D=8, E=6).items()}
    floats = list(kwargs.values())

    def step(**kw):
        return (kernel(**kw) * 0.5).square().sum()

    got, want = compiled_and_eager_gradients(kernel, step, kwargs, floats)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


DOC_QS = """
attention doc_qs(q[B,H,N,D], k[B,H,N,D], v[B,H,N,E], doc[B,N]: int) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask doc[b,i] == doc[b,j]
  p = softmax(s, i)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


def test_a_statistic_no_generated_pass_computes_takes_the_reference_and_says_why():
    """A softmax over queries whose mask needs a block map: its statistics pass runs on the
    reference's torch ops, so its gradient would need score-sized autograd: refused, said."""
    kernel = attncc.compile(DOC_QS, backend="triton")
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    o = kernel(q=q, k=torch.randn(1, 2, 9, 4), v=torch.randn(1, 2, 9, 4),
               doc=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]]))
    assert kernel.last_run["backward"] == "reference"
    assert "statistic of the scores whose mask needs a block map" in kernel.last_run["backward_reason"]
    o.sum().backward()
    assert torch.isfinite(q.grad).all()


COMPILE = """
import attncc
from attncc.aot import compile_launch, resources, static_call
for name, kernels in (("query_softmax", ("stats0_bwd_dkdv", "stats0_bwd_dq")), ("moh", ("term0_bwd_dkdv", "term0_bwd_dq"))):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    for k in kernel.backward_launcher().launches(static_call(kernel, 64, 64)):
        if k.kernel.__name__.endswith(kernels):
            r = resources(k.kernel.__name__, compile_launch(k), k.options.get("num_warps"))
            print("ok", k.kernel.__name__, r.registers, r.spill_bytes, flush=True)
"""


def test_new_backward_kernels_compile_for_sm90_without_spills():
    """The interpreter is permissive: the statistics pass's kernels without values and the
    per-head kernels that skip unweighed query tiles (`if live:` around a loop and around a tile
    body with loop-carried state) also compile for sm_90 (bf16, head dim 64, default tiles), in
    a process not in interpreter mode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).parent.parent)
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert out.returncode == 0 and len(rows) == 4, out.stdout[-2000:] + out.stderr[-4000:]
    assert all(int(r[3]) == 0 for r in rows), out.stdout  # no spill stack
