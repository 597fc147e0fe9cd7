"""The last four gallery examples as generated kernels: a softmax over another axis than the
streamed one becomes exp(s - lse) with the log-sum-exp computed first by a generated
statistics pass (softmax over queries, reversed attention), a weighted sum over heads runs a head loop in the epilogue
(mixture-of-heads), and normalised linear attention divides by row sums kept in the kernel."""
import pytest
import torch

import attncc
from oracles.inputs import SQUARE, make_inputs


@pytest.mark.parametrize("name,causal", [("query_softmax", None), ("reversed", None), ("moh", None),
                                         ("linear_elu", False), ("linear_elu", True)])
def test_generated_kernel_matches_reference(name, causal):
    kwargs = make_inputs(name, B=2, H=4, N=37, M=None if name in SQUARE else 45, D=24, E=12,
                         dtype=torch.float32)
    if causal is not None:
        kwargs["causal"] = causal
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    out = kernel(**kwargs)
    assert kernel.last_run["backend"] == "triton"
    want = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_plans():
    plans = {n: attncc.compile(f"examples/{n}.attn", backend="triton").generated.plan
             for n in ("query_softmax", "reversed", "moh", "linear_elu")}
    assert plans["moh"].summed_outer == ("h",) and plans["moh"].outer == ("b",)
    assert plans["reversed"].i == "j" and plans["reversed"].j == "i", "reversed streams over the children i"
    assert plans["linear_elu"].row_sum
    for name in ("query_softmax", "reversed"):
        assert plans[name].terms[0].kind == "pointwise" and plans[name].precomputed.inputs
        assert len(plans[name].statistics) == 1, "the log-sum-exp comes from a generated statistics pass"


@pytest.mark.parametrize("name", ["query_softmax", "reversed"])
def test_statistics_pass_runs_as_a_generated_kernel(name):
    kwargs = make_inputs(name, B=1, H=2, N=40, D=16, E=8, dtype=torch.float32)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    out = kernel(**kwargs)
    launcher = kernel.generated.launcher
    assert len(launcher.statistics) == 1 and "_stats0" in next(iter(launcher.statistics.values())).src.name
    want = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_every_gallery_example_generates():
    from oracles.inputs import EXAMPLES

    for name in EXAMPLES:
        assert attncc.compile(f"examples/{name}.attn", backend="triton").backend == "triton", name


def test_heads_the_router_does_not_choose_are_skipped():
    """moh with every token routed to head 0 only: the kernel walks head 0's tiles alone."""
    kwargs = make_inputs("moh", B=1, H=4, N=32, D=16, E=8, dtype=torch.float32)
    kwargs["router"] = torch.zeros_like(kwargs["router"])
    kwargs["router"][..., 0] = 10.0
    kwargs["topk"] = 1
    kernel = attncc.compile("examples/moh.attn", backend="triton")
    launcher = kernel.generated.launcher
    out = launcher(attncc.binding.bind(kernel.program, kwargs), False, {"BLOCK_M": 16, "BLOCK_N": 16},
                   count_tiles=True)[0]
    counts = launcher.last_tile_counts
    assert counts["full"] + counts["partial"] == 3  # causal 32x32 in 16x16 tiles, one head
    want = attncc.compile("examples/moh.attn", backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_feature_maps_are_applied_to_tiles():
    """Elementwise feature maps of q, k and v run on the loaded tiles (no precomputed copies),
    and keep padded features (D = 24 in 32-wide tiles) at zero."""
    spec = """attention mapped(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
      fq[b,h,i,d] = elu(q[b,h,i,d]) + 1
      fk[b,h,j,d] = relu(k[b,h,j,d]) * 2 + 0.5
      fv[b,h,j,e] = v[b,h,j,e] * v[b,h,j,e]
      s[b,h,i,j] = fq[b,h,i,d] * fk[b,h,j,d] * D ** -0.5
      mask j <= i + (M - N)
      p = softmax(s, j)
      o[b,h,i,e] = p[b,h,i,j] * fv[b,h,j,e]
    }"""
    kernel = attncc.compile(spec, backend="triton")
    plan = kernel.generated.plan
    assert plan.q.transform is not None and plan.k.transform is not None and plan.v.transform is not None
    assert not plan.precomputed.inputs
    g = torch.Generator().manual_seed(3)
    kwargs = dict(q=torch.randn(2, 2, 37, 24, generator=g), k=torch.randn(2, 2, 45, 24, generator=g),
                  v=torch.randn(2, 2, 45, 12, generator=g))
    out = kernel(**kwargs)
    want = attncc.compile(spec, backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal,path", [(False, "reassociated"), (True, "row streaming")])
def test_linear_attention_is_reassociated_when_no_mask_applies(causal, path):
    """Without a causal mask, f(Q) (f(K)^T V) runs (linear in N); with it, row streaming."""
    kwargs = make_inputs("linear_elu", B=2, H=2, N=37, M=45, D=24, E=12, dtype=torch.float32)
    kwargs["causal"] = causal
    kernel = attncc.compile("examples/linear_elu.attn", backend="triton")
    out = kernel(**kwargs)
    assert kernel.generated.launcher.last_path == path
    want = attncc.compile("examples/linear_elu.attn", backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_unnormalised_linear_attention_is_reassociated():
    spec = """attention plain_linear(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
      a[b,h,i,j] = relu(q[b,h,i,d]) * relu(k[b,h,j,d])
      o[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
    }"""
    g = torch.Generator().manual_seed(1)
    kwargs = dict(q=torch.randn(1, 2, 33, 16, generator=g), k=torch.randn(1, 2, 50, 16, generator=g),
                  v=torch.randn(1, 2, 50, 8, generator=g))
    kernel = attncc.compile(spec, backend="triton")
    out = kernel(**kwargs)
    assert kernel.generated.launcher.last_path == "reassociated"
    torch.testing.assert_close(out, attncc.compile(spec, backend="reference")(**kwargs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,extra", [("lightning", {}), ("lightning", {"lam": torch.tensor([-0.7, 0.9])}),
                                        ("linear_elu", {"causal": True})])
def test_causal_linear_attention_runs_as_a_chunked_scan(name, extra):
    """Causal linear attention, with or without a decay (of either sign), carries a D x E
    state across chunks: linear work in N, same result."""
    kwargs = make_inputs(name, B=2, H=2, N=45, M=None, D=24, E=12, dtype=torch.float32)
    kwargs.update(extra)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    out = kernel(**kwargs)
    assert kernel.generated.launcher.last_path == "chunked"
    want = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    scale = want.abs().max().clamp(min=1)
    torch.testing.assert_close(out / scale, want / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,extra", [("lightning", {}), ("linear_elu", {"causal": True})])
def test_chunked_scan_starts_from_a_carried_state(name, extra):
    """The chunked scan started from the state of the keys before the sequence (what context
    parallelism passes between ranks) gives the tail of the whole sequence's output: the state
    is formed here in float64, independently of the kernel (the sum over the first `cut` keys,
    decayed to the position before the tail)."""
    from attncc.binding import bind

    n, cut = 29, 11  # the tail's 18 rows: one full chunk of 16 and a partial one
    kwargs = make_inputs(name, B=1, H=2, N=n, M=None, D=5, E=3, dtype=torch.float32)
    kwargs.update(extra)
    want = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    k, v = kwargs["k"][:, :, :cut].double(), kwargs["v"][:, :, :cut].double()
    if name == "linear_elu":
        k = torch.nn.functional.elu(k) + 1
    if "lam" in kwargs:  # each key decayed to the last position before the tail
        k = k * kwargs["lam"].double()[None, :, None, None] ** (cut - 1 - torch.arange(cut))[:, None].double()
    state, z = k.transpose(-1, -2) @ v, k.sum(-2)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    tail = {x: t[:, :, cut:] if x in ("q", "k", "v") else t for x, t in kwargs.items()}
    out = kernel.generated.launcher.chunked_from(bind(kernel.program, tail), state.float(), z.float())
    torch.testing.assert_close(out, want[:, :, cut:], rtol=1e-4, atol=1e-5)
    with pytest.raises(attncc.BackendError, match="exactly `j <= i`"):  # N != M: no chunked scan
        kernel.generated.launcher.chunked_from(bind(kernel.program, {**tail, "k": kwargs["k"], "v": kwargs["v"]}),
                                               state.float(), z.float())


def test_non_square_causal_linear_attention_streams_rows():
    kwargs = make_inputs("lightning", B=1, H=2, N=30, M=45, D=16, E=8, dtype=torch.float32)
    kernel = attncc.compile("examples/lightning.attn", backend="triton")
    out = kernel(**kwargs)
    assert kernel.generated.launcher.last_path == "row streaming"
    want = attncc.compile("examples/lightning.attn", backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
