"""The general streaming planner (passes/streams.py, codegen/stream_kernel.py,
attncc/stream_runtime.py) end to end: specs the fused FlashAttention skeleton rejects
(several outputs, column sums, guarded normalisers, post-softmax weights, chosen entries,
Sinkhorn, content-relative logits) are generated, run in Triton's interpreter on the CPU
and compared with the reference executor on float64 copies of the same inputs.

Every test asserts that the kernel's plan is a `StreamPlan`, so a spec that the fused
skeleton took would not pass silently. Shapes are small and odd (partial tiles, N != M,
D != E). Run with TRITON_INTERPRET=1 set before triton is imported (or on a GPU).
"""
import os
import sys

import pytest
import torch

import attncc
from attncc.errors import BackendError
from attncc.passes.streams import PassKind, Reduction, StreamPlan
from attncc.random_inputs import random_arguments

sys.path.insert(0, os.path.dirname(__file__))
from oracles.inputs import EXAMPLES as GALLERY, make_inputs  # noqa: E402

CAN_RUN = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

SHAPE = {"B": 2, "H": 3, "N": 19, "M": 23, "D": 12, "E": 10}
# float32 inputs: max |x - ref64| <= RTOL * max(1, max |ref64|) per output
RTOL_F32, RTOL_BF16 = 1e-4, 2e-2


def _generated(spec: str):
    """The triton kernel of `spec`, checked to come from the general planner."""
    kernel = attncc.compile(spec, backend="triton")
    assert kernel.backend == "triton"
    plan = kernel.generated.plan
    assert isinstance(plan, StreamPlan), f"not the general planner: {type(plan).__name__}"
    return kernel, plan


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _run(spec: str, shape=None, dtype=torch.float32, seed=0, rtol=None, params=None):
    """Run the generated kernel and the float64 reference on the same inputs and compare
    every output; returns (kernel, plan, inputs, outputs, reference outputs)."""
    if not CAN_RUN:
        pytest.skip("generated kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    kernel, plan = _generated(spec)
    shape = {k: v for k, v in {**SHAPE, **(shape or {})}.items() if k in kernel.program.dims}
    torch.manual_seed(seed)
    args = random_arguments(kernel.program, shape, params=params, dtype=dtype, seed=seed)
    with torch.no_grad():
        got = _as_tuple(kernel(**args))
    assert kernel.last_run["backend"] == "triton", kernel.last_run
    reference = attncc.compile(spec, backend="reference")
    want = _as_tuple(reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                  for k, v in args.items()}))
    assert len(got) == len(want) == len(kernel.outputs)
    rtol = rtol if rtol is not None else (RTOL_F32 if dtype == torch.float32 else RTOL_BF16)
    for name, x, ref in zip(kernel.outputs, got, want):
        _compare(name, x, ref, dtype, rtol)
    return kernel, plan, args, got, want


def _compare(name, x, ref, dtype, rtol):
    assert x.shape == ref.shape, f"'{name}': shape {tuple(x.shape)}, reference {tuple(ref.shape)}"
    assert x.dtype == dtype, f"'{name}': dtype {x.dtype}, expected {dtype}"
    x = x.double()
    assert not bool(ref.isnan().any()), f"'{name}': the reference has nan (a bad test input)"
    assert not bool(x.isnan().any()), f"'{name}': nan at {x.isnan().nonzero()[:4].tolist()}"
    # infinities (log-sum-exp and amax of rows with nothing allowed) must match exactly
    inf = ref.isinf()
    assert torch.equal(x.isinf(), inf), f"'{name}': infinities differ from the reference"
    assert torch.equal(x[inf], ref[inf]), f"'{name}': infinities of the wrong sign"
    finite = ~inf
    if not bool(finite.any()):
        return
    err = float((x[finite] - ref[finite]).abs().max())
    tol = rtol * max(1.0, float(ref[finite].abs().max()))
    assert err <= tol, f"'{name}': off by {err:.3g} (tolerance {tol:.3g})"


def _kinds(p):
    return [a.kind for a in p.accumulators]


# ----------------------------------------------------------------------------- several outputs
CAUSAL_STATS = """
attention causal_stats(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], smax[B,H,N], lse[B,H,N], recv[B,H,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask j <= i + (M - N)
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  smax = amax(s, j)
  lse = logsumexp(s, j)
  recv = sum(p, i)
}
"""


def test_several_outputs_causal():
    _, plan, _, got, want = _run(CAUSAL_STATS)
    assert len(plan.passes) >= 2  # the column sums read the row log-sum-exp: a later pass
    # bottom-right aligned: the last key is seen by the last query only
    assert float(want[3][..., -1].abs().max()) > 0


def test_several_outputs_key_padding():
    spec = """
attention padded(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], valid[B,M]: bool) -> (o[B,H,N,E], smax[B,H,N], lse[B,H,N], recv[B,H,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask valid[b,j]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  smax = amax(s, j)
  lse = logsumexp(s, j)
  recv = sum(p, i)
}
"""
    _, _, args, got, _ = _run(spec, seed=1)
    invalid = ~args["valid"]
    assert bool(invalid.any()) and bool(args["valid"].any(dim=1).all())
    # padded keys receive nothing
    recv = got[3]
    assert float(recv.permute(0, 2, 1)[invalid].abs().max()) == 0.0


def test_several_outputs_document_mask():
    spec = """
attention packed(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], qdoc[B,N]: int, kdoc[B,M]: int) -> (o[B,H,N,E], lse[B,H,N], recv[B,H,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask qdoc[b,i] == kdoc[b,j]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  lse = logsumexp(s, j)
  recv = sum(p, i)
}
"""
    _, _, args, _, _ = _run(spec, seed=2)
    same = args["qdoc"][:, :, None] == args["kdoc"][:, None, :]
    assert bool(same.any()) and not bool(same.all()), "the document mask masks nothing or everything"


def test_document_causal_within_documents():
    spec = """
attention doc_causal(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], doc[B,N]: int) -> (o[B,H,N,E], lse[B,H,N], recv[B,H,N]) {
  require N == M
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask doc[b,i] == doc[b,j] and j <= i
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  lse = logsumexp(s, j)
  recv = sum(p, i)
}
"""
    _run(spec, shape={"M": 19}, seed=3)


# ----------------------------------------------------------------------------- GQA
GQA_STATS = """
attention gqa_stats(q[B,H,N,D], k[B,G,M,D], v[B,G,M,E]) -> (o[B,H,N,E], smax[B,H,N], lse[B,H,N]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // (H // G),j,d] * D ** -0.5
  mask j <= i + (M - N)
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h // (H // G),j,e]
  smax = amax(s, j)
  lse = logsumexp(s, j)
}
"""


def test_gqa_several_outputs():
    _, _, args, _, _ = _run(GQA_STATS, shape={"H": 6, "G": 2}, seed=4)
    assert args["k"].shape[1] == 2 and args["q"].shape[1] == 6


def test_gqa_column_sum():
    spec = """
attention gqa_columns(q[B,H,N,D], k[B,G,M,D]) -> r[B,H,M] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // (H // G),j,d]
  r = sum(s, i)
}
"""
    _run(spec, shape={"H": 6, "G": 2}, seed=5)


# ----------------------------------------------------------------------------- guarded normalisers
def test_linear_elu_eps_causal():
    spec = """
attention linear_elu(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  fq = elu(q[b,h,i,d]) + 1
  fk = elu(k[b,h,j,d]) + 1
  a[b,h,i,j] = fq[b,h,i,d] * fk[b,h,j,d]
  mask j <= i + (M - N)
  num[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
  den[b,h,i] = sum(a, j)
  o[b,h,i,e] = num[b,h,i,e] / (den[b,h,i] + 1e-6)
}
"""
    _run(spec, seed=6)


def test_linear_relu_max_eps_causal():
    spec = """
attention linear_relu(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], den[B,H,N]) {
  param eps: float = 1e-6
  fq = relu(q[b,h,i,d])
  fk = relu(k[b,h,j,d])
  a[b,h,i,j] = fq[b,h,i,d] * fk[b,h,j,d]
  mask j <= i + (M - N)
  num[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
  den[b,h,i] = sum(a, j)
  o[b,h,i,e] = num[b,h,i,e] / max(den[b,h,i], eps)
}
"""
    _run(spec, seed=7)
    _run(spec, seed=7, params={"eps": 0.5})  # a guard that bites


# ----------------------------------------------------------------------------- post-softmax weights, means
def test_numerator_weights_and_mean_masked():
    spec = """
attention toeplitz_weights(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], c[H,L], valid[B,M]: bool) -> (o[B,H,N,E], ms[B,H,N], mt[B,H,N]) {
  require L == N + M - 1
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask j <= i + (M - N) and valid[b,j]
  p = softmax(s, j)
  w = p[b,h,i,j] * c[h, j - i + N - 1]
  o[b,h,i,e] = w[b,h,i,j] * v[b,h,j,e]
  ms = mean(s, j)
  mt = mean(tanh(s), j)
}
"""
    _run(spec, shape={"L": SHAPE["N"] + SHAPE["M"] - 1}, seed=8)


# ----------------------------------------------------------------------------- chosen entries
def test_chosen_entries():
    spec = """
attention chosen(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], cols[B,C]: int) -> (o[B,H,N,E], first[B,H,N], pm[B,H,N,C]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  first[b,h,i] = p[b,h,i,0]
  pm[b,h,i,c] = p[b, h, i, cols[b,c]]
}
"""
    _, _, args, got, _ = _run(spec, shape={"C": 3}, seed=9)
    assert float(got[1].min()) > 0 and float(got[2].min()) > 0  # real probabilities, not zeros


def test_chosen_entries_masked():
    spec = """
attention chosen_masked(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], valid[B,M]: bool) -> (o[B,H,N,E], first[B,H,N], last[B,H,N]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask valid[b,j]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  first[b,h,i] = p[b,h,i,0]
  last[b,h,i] = p[b,h,i,M - 1]
}
"""
    _run(spec, seed=10)


# ----------------------------------------------------------------------------- chained reductions
@pytest.mark.parametrize("mask", ["", "mask j <= i + (M - N)"], ids=["dense", "causal"])
def test_sinkhorn_chain(mask):
    spec = """
attention sinkhorn(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  MASK
  p1 = softmax(s, j)
  p2 = p1 / sum(p1, i)
  p3 = p2 / sum(p2, j)
  o[b,h,i,e] = p3[b,h,i,j] * v[b,h,j,e]
}
""".replace("MASK", mask)
    _, plan, _, _, _ = _run(spec, seed=11)
    assert len(plan.passes) >= 3, plan.describe()
    assert any(p.kind is PassKind.COLUMN for p in plan.passes), plan.describe()


# ----------------------------------------------------------------------------- content-relative logits
def test_content_relative_logits():
    spec = """
attention content_relative(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], r[H,W,D]) -> (o[B,H,N,E], lse[B,H,N]) {
  let R = (W - 1) // 2
  s[b,h,i,j] = (q[b,h,i,d] * k[b,h,j,d] + q[b,h,i,d] * r[h, clamp(j - i, -R, R) + R, d]) * D ** -0.5
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  lse = logsumexp(s, j)
}
"""
    _run(spec, shape={"W": 7}, seed=12)


# ----------------------------------------------------------------------------- bf16
def test_bf16_several_outputs():
    _, _, _, got, _ = _run(CAUSAL_STATS, dtype=torch.bfloat16, seed=13)
    assert all(x.dtype == torch.bfloat16 for x in got)


# ----------------------------------------------------------------------------- empty rows
def test_rows_with_every_key_masked():
    spec = """
attention strict(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], lse[B,H,N], smax[B,H,N], recv[B,H,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask j < i
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  lse = logsumexp(s, j)
  smax = amax(s, j)
  recv = sum(p, i)
}
"""
    _, _, _, got, _ = _run(spec, seed=14)
    o, lse, smax, recv = got
    assert float(o[:, :, 0].abs().max()) == 0.0  # row 0 sees no key
    assert bool((lse[:, :, 0] == -float("inf")).all()) and bool((smax[:, :, 0] == -float("inf")).all())
    assert bool(lse[:, :, 1:].isfinite().all())
    n = SHAPE["N"]
    assert float(recv[..., n - 1:].abs().max()) == 0.0  # keys j >= N - 1 have no query i > j


def test_softmax1_rows_with_every_key_masked():
    spec = """
attention strict_one(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], recv[B,H,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask j < i
  p = softmax1(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  recv = sum(p, i)
}
"""
    _, _, _, got, _ = _run(spec, seed=16)
    assert float(got[0][:, :, 0].abs().max()) == 0.0


def test_linear_rows_with_every_key_masked():
    spec = """
attention strict_linear(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  fq = relu(q[b,h,i,d])
  fk = relu(k[b,h,j,d])
  a[b,h,i,j] = fq[b,h,i,d] * fk[b,h,j,d]
  mask j < i
  num[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
  den[b,h,i] = sum(a, j)
  o[b,h,i,e] = num[b,h,i,e] / max(den[b,h,i], 1e-6)
}
"""
    _, _, _, got, _ = _run(spec, seed=15)
    assert float(got[0][:, :, 0].abs().max()) == 0.0


# ----------------------------------------------------------------------------- plan shapes
def test_plan_online_fusion():
    """A softmax-weighted sum and its log-sum-exp are one pass, the sum online (rescaled by
    the running maximum)."""
    _, plan = _generated(CAUSAL_STATS)
    first = plan.passes[0]
    assert first.kind is PassKind.ROW and (first.row, first.stream) == ("i", "j")
    kinds = _kinds(first)
    assert Reduction.LSE in kinds and Reduction.DOT in kinds and Reduction.MAX in kinds, plan.describe()
    dot = next(a for a in first.accumulators if a.kind is Reduction.DOT)
    assert dot.online is not None and dot.online.kind is Reduction.LSE, plan.describe()
    assert dot.online in first.accumulators


def test_plan_column_pass():
    _, plan = _generated(CAUSAL_STATS)
    columns = [p for p in plan.passes if p.kind is PassKind.COLUMN]
    assert len(columns) == 1, plan.describe()
    col = columns[0]
    assert (col.row, col.stream) == ("j", "i")
    assert col.level > plan.passes[0].level  # it reads the row pass's log-sum-exp
    assert Reduction.SUM in _kinds(col), plan.describe()


def test_plan_linear_attention_has_no_online_sum():
    spec = """
attention linear_plan(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], den[B,H,N]) {
  fq = relu(q[b,h,i,d])
  fk = relu(k[b,h,j,d])
  a[b,h,i,j] = fq[b,h,i,d] * fk[b,h,j,d]
  mask j <= i + (M - N)
  num[b,h,i,e] = a[b,h,i,j] * v[b,h,j,e]
  den[b,h,i] = sum(a, j)
  o[b,h,i,e] = num[b,h,i,e] / (den[b,h,i] + 1e-6)
}
"""
    _, plan = _generated(spec)
    assert len(plan.passes) == 1, plan.describe()  # numerator and denominator in one pass
    kinds = _kinds(plan.passes[0])
    assert Reduction.DOT in kinds and Reduction.SUM in kinds and Reduction.LSE not in kinds
    assert all(a.online is None for a in plan.passes[0].accumulators)


# ----------------------------------------------------------------------------- rejections
def test_score_sized_output_is_rejected():
    spec = """attention weights_out(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> (o[B,H,N,E], p[B,H,N,M]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""
    with pytest.raises(BackendError) as err:
        attncc.compile(spec, backend="triton")
    message = str(err.value)
    assert "'p'" in message and "line 3" in message, message
    assert attncc.compile(spec, backend="reference").backend == "reference"


# ----------------------------------------------------------------------------- return_lse
def test_return_lse_of_a_general_plan():
    """`return_lse=True` plans the log-sum-exp as one more output, sharing the softmax's own
    accumulator (the spec's `lse = logsumexp(s, j)` output is that same accumulator too)."""
    if not CAN_RUN:
        pytest.skip("generated kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    kernel, _ = _generated(CAUSAL_STATS)
    args = random_arguments(kernel.program, {k: v for k, v in SHAPE.items() if k in kernel.program.dims}, seed=3)
    with torch.no_grad():
        got = kernel(**args, return_lse=True)
    reference = attncc.compile(CAUSAL_STATS, backend="reference")
    want = reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                        for k, v in args.items()}, return_lse=True)
    assert len(got) == len(want) == len(kernel.outputs) + 1
    for name, x, ref in zip([*kernel.outputs, "return_lse"], got, want):
        _compare(name, x, ref, torch.float32, RTOL_F32)
    lse_plan = kernel.generated.launcher.lse_launcher.plan
    assert sum(a.kind is Reduction.LSE for p in lse_plan.passes for a in p.accumulators) == 1


def test_integer_reductions_stay_integers():
    """Integer sums and maxima accumulate in fp32 in the kernel and come back as integers."""
    spec = """attention counts(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], doc[B,N]: int, kdoc[B,M]: int)
        -> (o[B,H,N,E], n[B,H,N]: int, far[B,H,N]: int) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  mask doc[b,i] == kdoc[b,j]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  n[b,h,i] = where(s[b,h,i,j] > 0, 1, 0)
  far = amax(where(s > 0, j - i, -100), j)
}"""
    if not CAN_RUN:
        pytest.skip("generated kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    kernel, _ = _generated(spec)
    args = random_arguments(kernel.program, {k: v for k, v in SHAPE.items() if k in kernel.program.dims}, seed=5)
    with torch.no_grad():
        got = kernel(**args)
    want = attncc.compile(spec, backend="reference")(**args)
    for x, ref in zip(got[1:], want[1:]):
        assert x.dtype == ref.dtype == torch.int64 and torch.equal(x, ref)
    assert int(got[1].max()) > 0


# ----------------------------------------------------------------------------- the gallery, derived
# The fused skeleton plans the gallery; the general planner must derive a correct plan for it
# too (its plans are the algebra's, the fused kernel is one rule on top). Block-sparse
# selections over pooled blocks read at (i // block, j // block) and top-p selections are taken
# by the fused skeleton's precompute rule; the general planner refuses them, saying why.
GENERAL_REFUSES = {"topk_blocks", "permuted_blocks"}


@pytest.mark.parametrize("name", [n for n in GALLERY if n not in GENERAL_REFUSES])
def test_gallery_through_the_general_planner(name):
    if not CAN_RUN:
        pytest.skip("generated kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    from attncc.binding import bind
    from attncc.codegen.stream_kernel import generate_streams
    from attncc.passes.streams import plan_streams
    from attncc.stream_runtime import StreamLauncher

    reference = attncc.compile(f"examples/{name}.attn", backend="reference")
    plan = plan_streams(reference.program)
    launcher = StreamLauncher(plan, generate_streams(plan, name))
    kwargs = make_inputs(name, B=1, H=2, N=19, D=12, E=10, dtype=torch.float32)
    got = launcher(bind(reference.program, kwargs), False)
    want = _as_tuple(reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                  for k, v in kwargs.items()}))
    for out, x, ref in zip(reference.outputs, got, want):
        _compare(out, x, ref, torch.float32, RTOL_F32)


@pytest.mark.parametrize("name,why", [("topk_blocks", "read at other indices"), ("permuted_blocks", "topp_mask")])
def test_gallery_block_selections_are_refused_by_the_general_planner(name, why):
    from attncc.passes.row_stream import NotRowStreamable
    from attncc.passes.streams import plan_streams

    with pytest.raises(NotRowStreamable, match=why):
        plan_streams(attncc.load(f"examples/{name}.attn"))


def test_a_sum_whose_term_lists_its_indices_in_another_order():
    """`a[b,h,i] = where(keep[b,j] and j <= i + shift[h], 1.0, 0.0)` sums a term over (i, h, j, b):
    the result keeps the statement's order on both backends (the reference returned it in the
    term's order, and a permuting read of it kept the array's order)."""
    spec = """attention counts(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], keep[B,M]: bool, shift[H]: int)
        -> (o[B,H,N,E], a[B,H,N]) {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  a[b,h,i] = where(keep[b,j] and j <= i + shift[h], 1.0, 0.0)
}"""
    b, h, n, m = 2, 3, 5, 7
    keep = torch.rand(b, m, generator=torch.Generator().manual_seed(0)) > 0.3
    shift = torch.tensor([0, 1, -1])
    want = (keep[:, None, None, :] & (torch.arange(m)[None, None, None, :] <= torch.arange(n)[None, None, :, None]
                                      + shift[None, :, None, None])).float().sum(-1)
    for backend in ["reference"] + (["triton"] if CAN_RUN else []):
        kernel = attncc.compile(spec, backend=backend)
        _, a = kernel(q=torch.randn(b, h, n, 4), k=torch.randn(b, h, m, 4), v=torch.randn(b, h, m, 2), keep=keep,
                      shift=shift)
        assert a.shape == (b, h, n) and torch.equal(a, want), backend
