"""Generated backward of softmaxes with a sink logit, in Triton's interpreter.

`softmax1` (a virtual key with logit 0) and `softmax(s, j, sinks[h])` (gpt-oss's learned sinks)
take the fused row-streaming plan: the online max and sum start from the sink logit, so the
stored log-sum-exp includes it, q, k and v get the plain softmax's backward kernels, and the
sink's own gradient `-sum over rows of exp(sink - LSE) * delta` is a row sum on the host. Each is
checked against the float64 reference's autograd on odd shapes (N != M, D != E, 16x16 tiles
that divide neither, GQA groups of 2 and 3, empty rows, dLSE), with the forward's split-KV and
GQA-packed variants, and the sink gradient's determinism.
"""
import pytest
import torch

import attncc
from attncc import pipeline
from attncc.passes.backward import plan_backward
from attncc.passes.kinds import WeightKind
from attncc.passes.row_stream import RowStreamPlan
from attncc.passes.streams import plan_streams

GQA_SINKS = """
attention gqa_sinks(q[B,H,N,D], k[B,G,M,D], v[B,G,M,E], sinks[H], rs[B,N]) -> o[B,H,N,E] {
  require H % G == 0
  let R = H // G
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // R,j,d] * D ** -0.5
  mask j <= i + (M - N)
  p = softmax(s, j, 0.5 * sinks[h] + rs[b,i])
  o[b,h,i,e] = p[b,h,i,j] * v[b,h // R,j,e]
}
"""

SIGMOID_GQA = """
attention sigmoid_gqa(q[B,H,N,D], k[B,G,M,D], v[B,G,M,E], bias[H]) -> o[B,H,N,E] {
  require H % G == 0
  let R = H // G
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // R,j,d] * D ** -0.5
  mask j <= i + (M - N)
  p = sigmoid(s + bias[h])
  o[b,h,i,e] = p[b,h,i,j] * v[b,h // R,j,e]
}
"""

MIXED = """
attention mixed(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], q2[B,H,N,D], lam[H], w[B,N]) -> o[B,H,N,E] {
  s1[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s2[b,h,i,j] = q2[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask j <= i + (M - N)
  p = w[b,i] * softmax(s1, j, lam[h]) - lam[h] * sigmoid(s2 - 1.0)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


def spec(name):
    return {"gqa_sinks": GQA_SINKS, "sigmoid_gqa": SIGMOID_GQA, "mixed": MIXED}.get(name, f"examples/{name}.attn")



def tensors(name, seed=0, B=2, H=3, G=None, N=29, M=37, D=12, E=10):
    g = torch.Generator().manual_seed(seed)
    kv = G or H
    out = {"q": torch.randn(B, H, N, D, generator=g), "k": torch.randn(B, kv, M, D, generator=g),
           "v": torch.randn(B, kv, M, E, generator=g)}
    if name in ("learned_sinks", "gqa_sinks"):
        out["sinks"] = torch.randn(H, generator=g) * 2
    if name == "gqa_sinks":
        out["rs"] = torch.randn(B, N, generator=g)
    if name == "sigmoid_gqa":
        out["bias"] = torch.randn(H, generator=g) - 1.0
    if name == "lightning":
        out["lam"] = torch.rand(H, generator=g) * 0.3 + 0.7
    if name in ("differential", "mixed"):
        out["q2"] = torch.randn(B, H, N, D, generator=g)
    if name == "differential":
        out["k2"] = torch.randn(B, H, M, D, generator=g)
    if name == "mixed":
        out["lam"] = torch.rand(H, generator=g)
        out["w"] = torch.randn(B, N, generator=g)
    return out


def gradients(name, backend, base, dtype, return_lse, seed=1, deterministic=False, **params):
    """(kernel, gradients of every float tensor of `base`) for loss = <o, w> (+ <lse, w'>)."""
    kernel = attncc.compile(spec(name), backend=backend, deterministic=deterministic)
    args = {n: t.to(dtype).requires_grad_() if t.is_floating_point() else t for n, t in base.items()}
    out = kernel(**args, **params, return_lse=return_lse)
    o, lse = out if return_lse else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    if lse is not None:
        loss = loss + (lse * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    floats = [n for n, t in args.items() if t.is_floating_point()]
    return kernel, dict(zip(floats, torch.autograd.grad(loss, [args[n] for n in floats])))


def close(got, want, what, rel=1e-4):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert scale > 0 and err <= rel * scale, f"{what}: max error {err:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("name", ["learned_sinks", "softmax_one"])
def test_sink_softmaxes_take_the_fused_plan_and_the_general_planner_still_plans_them(name):
    program = attncc.load(spec(name))
    plan = pipeline.plan(program)
    assert isinstance(plan, RowStreamPlan) and plan.has_lse
    term = plan.terms[0]
    assert term.kind == (WeightKind.SOFTMAX1 if name == "softmax_one" else WeightKind.SOFTMAX)
    assert term.sink is not None
    assert (plan_backward(plan).sink is None) == (name == "softmax_one")  # a constant sink has no gradient
    plan_streams(program)  # no NotRowStreamable


@pytest.mark.parametrize("name,shape,return_lse", [
    ("learned_sinks", {}, True),
    ("learned_sinks", {"N": 21, "M": 13, "D": 8, "E": 16}, True),   # N > M: the first 8 rows have no key
    ("softmax_one", {}, False),
    ("softmax_one", {}, True),                                      # lse = log(1 + sum exp(s)): dLSE too
    ("softmax_one", {"N": 19, "M": 7}, True),                       # empty rows: lse = 0
    ("gqa_sinks", {"H": 4, "G": 2}, True),
    ("gqa_sinks", {"H": 6, "G": 2, "N": 17, "M": 17}, True),       # groups of 3
])
def test_sink_gradients_match_the_float64_reference(name, shape, return_lse):
    base = tensors(name, **shape)
    kernel, got = gradients(name, "triton", base, torch.float32, return_lse)
    assert kernel.last_run["backend"] == "triton" and kernel.last_run["backward"] == "triton", kernel.last_run
    assert "backward_reason" not in kernel.last_run
    _, want = gradients(name, "reference", base, torch.float64, return_lse)
    for n in got:
        assert got[n].dtype == torch.float32 and torch.isfinite(got[n]).all()
        close(got[n], want[n], f"{name} d{n}")


def gallery_inputs(name, shape, B=2, N=19, M=27, D=12, E=10):
    """Inputs of the new softmax gallery contracts (VARIANTS.md section 3) that take the fused
    plan: bias_tensor with a bias of `shape`, label_causal, block_lists with `shape` = (H, G)."""
    g = torch.Generator().manual_seed(7)
    H, G = shape if name == "block_lists" else (2, 2)
    out = {"q": torch.randn(B, H, N, D, generator=g), "k": torch.randn(B, G, M, D, generator=g),
           "v": torch.randn(B, G, M, E, generator=g)}
    if name == "bias_tensor":
        out["bias"] = torch.randn(*(n if keep else 1 for n, keep in zip((B, H, N, M), shape)), generator=g)
    elif name == "label_causal":
        out["label_q"] = torch.randint(0, 3, (B, N), generator=g)
        out["label_k"] = torch.randint(0, 3, (B, M), generator=g) % torch.tensor([2, 3])[:, None]
        out["label_q"][0, 3] = 2  # batch 0 has no key of label 2: row 3 has no allowed key
        out["rule"] = torch.tensor([[1, 0, 2], [2, 1, 0], [0, 0, 1]])
    else:
        n_qb, n_kb = -(-N // 8), -(-M // 4)
        out["kidx"] = torch.randint(-1, n_kb, (B, G, n_qb, 3), generator=g)
    return out


@pytest.mark.parametrize("name,shape", [
    ("bias_tensor", (1, 1, 1, 1)), ("bias_tensor", (0, 1, 1, 1)), ("bias_tensor", (1, 0, 0, 1)),
    ("bias_tensor", (0, 0, 1, 0)), ("bias_tensor", (0, 0, 0, 0)),   # 0: a broadcast (size-1) dim
    ("label_causal", None), ("block_lists", (4, 2)), ("block_lists", (6, 2)),  # GQA groups of 2 and 3
])
def test_gallery_contracts_on_the_fused_plan_have_generated_gradients(name, shape):
    """q, k, v and a bias of every broadcast pattern (its gradient summed over the broadcast
    dims) through the generated kernels, against the float64 reference's autograd."""
    base = gallery_inputs(name, shape)
    params = {"q_block": 8, "k_block": 4} if name == "block_lists" else {}
    kernel, got = gradients(name, "triton", base, torch.float32, True, **params)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run, kernel.last_run
    _, want = gradients(name, "reference", base, torch.float64, True, **params)
    assert set(got) == {"q", "k", "v", *(["bias"] if name == "bias_tensor" else [])}
    for n in got:
        assert got[n].shape == base[n].shape
        close(got[n], want[n], f"{name} d{n}")


def test_empty_rows_put_their_whole_weight_on_the_sink():
    """A row with no allowed key: o = 0, lse = sinks[h] exactly, and d lse / d sink = 1."""
    base = tensors("learned_sinks", B=1, H=2, N=9, M=4)
    kernel = attncc.compile("examples/learned_sinks.attn", backend="triton")
    sinks = base["sinks"].clone().requires_grad_()
    o, lse = kernel(q=base["q"], k=base["k"], v=base["v"], sinks=sinks, return_lse=True)
    assert torch.equal(lse[0, :, :5], sinks.detach()[:, None].expand(2, 5))
    assert o[0, :, :5].abs().max() == 0
    lse[0, :, :5].sum().backward()
    assert kernel.last_run["backward"] == "triton"
    assert torch.equal(sinks.grad, torch.full((2,), 5.0))


def test_sink_gradient_is_deterministic():
    base = tensors("gqa_sinks", H=4, G=2, N=23, M=19)
    runs = [gradients("gqa_sinks", "triton", base, torch.float32, True, deterministic=True)[1] for _ in range(2)]
    for n in ("sinks", "rs", "q", "k", "v"):
        assert torch.equal(runs[0][n], runs[1][n]), n


def test_sink_only_requiring_grad():
    """Only the sinks require grad: the generated backward runs and gives just their gradient."""
    base = tensors("learned_sinks", N=13, M=17)
    kernel = attncc.compile("examples/learned_sinks.attn", backend="triton")
    sinks = base["sinks"].clone().requires_grad_()
    kernel(q=base["q"], k=base["k"], v=base["v"], sinks=sinks).square().sum().backward()
    assert kernel.last_run["backward"] == "triton"
    want = base["sinks"].double().requires_grad_()
    ref = attncc.compile("examples/learned_sinks.attn", backend="reference")
    ref(q=base["q"].double(), k=base["k"].double(), v=base["v"].double(), sinks=want).square().sum().backward()
    close(sinks.grad, want.grad, "dsinks")


@pytest.mark.parametrize("name", ["learned_sinks", "softmax_one"])
def test_split_kv_counts_the_sink_once(name):
    """Decoding splits the keys: only the first split starts from the sink, so the merged
    output and log-sum-exp equal the unsplit ones."""
    base = tensors(name, N=3, M=45, H=2)
    kernel = attncc.compile(spec(name), backend="triton")
    ref = attncc.compile(spec(name), backend="reference")
    call = attncc.binding.bind(kernel.program, base)
    o, lse = kernel.generated.launcher(call, True, config={"SPLIT_KV": 3})
    assert kernel.generated.launcher.last_splits == 3
    want = ref(**{n: t.double() for n, t in base.items()})
    close(o, want, "o", rel=1e-5)
    o1, lse1 = kernel.generated.launcher(call, True)
    close(lse, lse1, "lse", rel=1e-5)


def test_gqa_packed_decoding_reads_each_rows_sink():
    """Packed GQA rows belong to different query heads: each starts from its own head's sink."""
    base = tensors("gqa_sinks", H=4, G=2, N=2, M=21)
    kernel = attncc.compile(GQA_SINKS, backend="triton")
    o = kernel(**base)
    assert kernel.generated.launcher.last_group == 2
    want = attncc.compile(GQA_SINKS, backend="reference")(**{n: t.double() for n, t in base.items()})
    close(o, want, "o", rel=1e-5)


@pytest.mark.parametrize("name", ["prob_columns", "column_mass", "class_redistribute", "window_summary", "epipolar_views"])
def test_general_plans_have_a_generated_backward(name):
    """The general planner's plans get the backward of passes/stream_backward.py
    (tests/test_general_backward.py checks their gradients)."""
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    assert not isinstance(kernel.backward_plan(), str), kernel.backward_plan()


@pytest.mark.parametrize("name,shape", [
    ("sigmoid", {}),                                                # N != M, D != E, no mask
    ("sigmoid_gqa", {"H": 4, "G": 2}),
    ("sigmoid_gqa", {"H": 6, "G": 2, "N": 33, "M": 21}),           # groups of 3; N > M: empty rows
    ("lightning", {"N": 23, "M": 23}),                              # decay lam[h] ** (i - j), lam's gradient
])
def test_pointwise_weight_gradients_match_the_float64_reference(name, shape):
    """P is the weight itself and dS = dP * d weight / d QK (sigmoid: p (1 - p)): no LSE, no delta."""
    assert plan_backward(pipeline.plan(attncc.load(spec(name)))).pointwise
    base = tensors(name, **shape)
    kernel, got = gradients(name, "triton", base, torch.float32, False)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run, kernel.last_run
    _, want = gradients(name, "reference", base, torch.float64, False)
    for n in got:
        assert torch.isfinite(got[n]).all()
        close(got[n], want[n], f"{name} d{n}")


@pytest.mark.parametrize("shape,wanted", [
    ({"N": 37, "M": 37}, ("q", "k", "v", "lam")),   # three chunks of 16, the last partial; D != E
    ({"N": 16, "M": 16, "B": 1, "H": 2}, ("q", "k", "v", "lam")),  # one full chunk
    ({"N": 37, "M": 37}, ("k", "v")),               # lam and q not wanted
])
def test_lightning_backward_is_the_linear_time_chunked_scan(shape, wanted, monkeypatch):
    """Causal decayed linear attention on a square score: the backward runs the chunked scans
    (dQ forwards, dK and dV backwards, lam's gradient from their per-row sums), O(N) memory
    beyond the inputs (no launch argument holds B·H·N·N values), against the float64
    reference's autograd."""
    from attncc import row_backward
    from attncc.passes.kinds import LaunchPath

    launched = []
    real = row_backward.launch
    monkeypatch.setattr(row_backward, "launch", lambda kl: launched.append(kl) or real(kl))
    base = tensors("lightning", **shape)
    B, H, N = base["q"].shape[:3]
    kernel = attncc.compile(spec("lightning"), backend="triton")
    reference = attncc.compile(spec("lightning"), backend="reference")
    g = torch.randn(B, H, N, base["v"].shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def grads(k, dtype):
        args = {n: t.to(dtype).requires_grad_(n in wanted) for n, t in base.items()}
        o = k(**args)
        return dict(zip(wanted, torch.autograd.grad(o, [args[n] for n in wanted], g.to(dtype))))

    got = grads(kernel, torch.float32)
    assert kernel.last_run["backward"] == "triton"
    assert kernel.backward_launcher().last_path == LaunchPath.CHUNKED
    assert {kl.role for kl in launched} == {"chunked"} and len(launched) == 2
    assert all(a.numel() < B * H * N * N for kl in launched for a in kl.args if torch.is_tensor(a))
    want = grads(reference, torch.float64)
    for n in wanted:
        close(got[n], want[n], f"d{n}")


@pytest.mark.parametrize("case", ["not square", "a zero decay"])
def test_lightning_backward_streams_rows_where_the_scan_does_not_apply(case):
    """N != M (the mask is not exactly causal) and lam = 0 for a head (its gradient would
    divide by it) take the row-streaming backward; off the square, with the same gradients as
    the float64 reference (which itself gives NaN at lam = 0: 0 ** negative powers under the mask)."""
    from attncc.passes.kinds import LaunchPath

    base = tensors("lightning", N=21, M=21 if case == "a zero decay" else 27)
    if case == "a zero decay":
        base["lam"][1] = 0.0
    kernel, got = gradients("lightning", "triton", base, torch.float32, False)
    assert kernel.backward_launcher().last_path == LaunchPath.ROW_STREAMING
    if case == "not square":
        _, want = gradients("lightning", "reference", base, torch.float64, False)
        for n in got:
            close(got[n], want[n], f"d{n}")


@pytest.mark.parametrize("name", ["sigmoid", "differential"])
def test_weights_without_a_log_sum_exp_take_the_generated_backward_through_the_operator(name):
    """The torch.library operator saves an empty statistic for them (tests/test_torch_ops.py
    runs opcheck and torch.compile on it)."""
    from attncc import torch_ops

    kernel = attncc.compile(spec(name), backend="triton")
    assert torch_ops.backward_choice(kernel, {"q"}, True) == (torch_ops.GENERATED, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_softmax1_returns_its_log_sum_exp_with_the_sink(backend):
    """`return_lse=True` for softmax1: log(1 + sum_j exp(s)) over the allowed keys, against an
    independent float64 computation; rows without an allowed key (N > M) get log(1) = 0."""
    base = tensors("softmax_one", N=19, M=7, E=6)
    o, lse = attncc.compile(spec("softmax_one"), backend=backend)(**base, return_lse=True)
    q, k = base["q"].double(), base["k"].double()
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.arange(7)[None, :] > torch.arange(19)[:, None] - 12, float("-inf"))
    want = torch.log1p(torch.exp(s).sum(-1))
    assert lse.shape == want.shape and (lse[..., :12] == 0).all()
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape", [
    ("differential", {}),
    ("differential", {"N": 21, "M": 13}),   # N > M: rows without keys
    ("mixed", {}),                          # a sink softmax weighed per row minus lam[h] times a sigmoid
])
def test_sums_of_weight_terms_are_differentiated_term_by_term(name, shape):
    """o = sum_t c_t W_t V: each term's own forward recomputes O_t and its LSE, its generated
    backward runs with c_t * dO, and coefficients reading inputs (`w[b,i]`, `lam[h]`) get
    rowsum(dO * O_t)."""
    bplan = plan_backward(pipeline.plan(attncc.load(spec(name))))
    assert len(bplan.parts) == 2
    base = tensors(name, **shape)
    kernel, got = gradients(name, "triton", base, torch.float32, False)
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run, kernel.last_run
    _, want = gradients(name, "reference", base, torch.float64, False)
    assert set(got) == set(base)
    for n in got:
        assert torch.isfinite(got[n]).all()
        close(got[n], want[n], f"{name} d{n}")


def test_sink_gradients_in_bfloat16():
    base = tensors("learned_sinks", N=21, M=27)
    kernel, got = gradients("learned_sinks", "triton", base, torch.bfloat16, True)
    assert kernel.last_run["backward"] == "triton"
    _, want = gradients("learned_sinks", "reference", base, torch.float64, True)
    for n in got:
        assert got[n].dtype == torch.bfloat16
        close(got[n], want[n], f"d{n}", rel=3e-2)
