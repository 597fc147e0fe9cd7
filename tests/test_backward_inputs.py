"""Generated gradients of the float tensors a score reads besides Q K^T, in Triton's interpreter.

`passes/backward.py` derives, for each read `t[args]` of the score, `d score / d t[args]` from the
spec and how its gradient is accumulated (`ReadMode`): row sums (`slopes[h]`, a gate `tau[h]`,
a per-query bias), column sums (a per-key bias), one slot per (query, key) pair (a full bias
`pb[b,h,i,j]`), or a scatter for gathered reads (a relative-position table, a block bias),
with atomics or, with `deterministic=True`, a fixed-order reduction. Each is checked against the
float64 reference's autograd on odd shapes (N != M, 16x16 tiles that divide neither), the
deterministic backward is run twice and compared bit for bit, and calls whose reads the
generated backward cannot differentiate still say "reference" and why.
"""
import ast

import pytest
import torch

import attncc
from attncc.passes.backward import plan_backward
from attncc.passes.kinds import ReadMode
from attncc.passes.row_stream import plan_row_stream
from attncc.row_backward import scatter_sum
from oracles.inputs import make_inputs

BIASES = """
attention biases(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], kb[B,M], pb[B,H,N,M], tau[H]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s = s * tau[h] + kb[b,j] + pb[b,h,i,j]
  mask j <= i + (M - N)
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""

GATED = """
attention gated(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], tau[H], rb[B,N], blk[H,P,Q]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * tau[h] * D ** -0.5
  s = 3.0 * tanh((s + rb[b,i]) / 3.0) + blk[h, i // 4, j // 4] * tau[h]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""

POOLED = """
attention pooled(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], w[H,C], z[C]) -> o[B,H,N,E] {
  t[h] = w[h,c] * z[c]
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += t[h] * (j - i)
  mask j <= i + (M - N)
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""

DOCS = """
attention docs(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], doc_q[B,N]: int, doc_k[B,M]: int, kb[B,M],
               table[H,W]) -> o[B,H,N,E] {
  let R = (W - 1) // 2
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += kb[b,j] + table[h, clamp(j - i, -R, R) + R]
  mask doc_q[b,i] == doc_k[b,j]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""

SHIFTED = """
attention shifted(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], table[H,W]) -> o[B,H,N,E] {
  u[h,x] = table[h,x] * 2.0
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s += u[h, clamp(j - i, 0, W - 1)]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


def tensors(seed=0, B=2, H=2, N=29, M=37, D=12, E=10, **extra):
    g = torch.Generator().manual_seed(seed)
    out = {"q": torch.randn(B, H, N, D, generator=g), "k": torch.randn(B, H, M, D, generator=g),
           "v": torch.randn(B, H, M, E, generator=g)}
    for name, shape in extra.items():
        out[name] = torch.randn(*shape, generator=g)
    return out


def gradients(spec, backend, base, wanted, dtype, deterministic=False, return_lse=True):
    """(kernel, gradients of `wanted`) of loss = <o, wo> + <lse, wl> (rows without keys left out)."""
    kernel = attncc.compile(spec, backend=backend, deterministic=deterministic)
    args = {n: (t.to(dtype).requires_grad_(n in wanted) if t.is_floating_point() else t) for n, t in base.items()}
    out = kernel(**args, return_lse=return_lse)
    o, lse = out if return_lse else (out, None)
    g = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    if lse is not None:
        finite = torch.isfinite(lse)
        wl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(dtype)
        loss = loss + (torch.where(finite, lse, 0.0) * torch.where(finite, wl, 0.0)).sum()
    return kernel, dict(zip(wanted, torch.autograd.grad(loss, [args[n] for n in wanted])))


def check(spec, base, wanted, rel=2e-4, deterministic=False, return_lse=True):
    kernel, got = gradients(spec, "triton", base, wanted, torch.float32, deterministic, return_lse)
    assert kernel.last_run["backend"] == "triton" and kernel.last_run["backward"] == "triton", kernel.last_run
    assert "backward_reason" not in kernel.last_run
    _, want = gradients(spec, "reference", base, wanted, torch.float64, return_lse=return_lse)
    for n in wanted:
        assert got[n].shape == want[n].shape and got[n].dtype == torch.float32, n
        err = (got[n].double() - want[n]).abs().max().item()
        scale = want[n].abs().max().item()
        assert scale > 0 and err <= rel * scale, f"d{n}: max error {err:.3g} against gradient scale {scale:.3g}"
    return kernel, got


def modes(spec):
    bplan = plan_backward(plan_row_stream(attncc.load(spec)))
    return {(rd.name, rd.mode) for rd in bplan.reads}, bplan


@pytest.mark.parametrize("deterministic", [False, True])
def test_alibi_slopes(deterministic):
    kwargs = make_inputs("alibi", dtype=torch.float32, B=2, H=3, N=29, M=37, D=12, E=10)
    check("examples/alibi.attn", kwargs, ("q", "k", "v", "slopes"), deterministic=deterministic)
    assert modes("examples/alibi.attn")[0] == {("slopes", ReadMode.ROWS)}


@pytest.mark.parametrize("deterministic", [False, True])
def test_relative_bias_table_gathered_with_duplicates(deterministic):
    """`table[h, clamp(j - i, -R, R) + R]`: many pairs of a tile read one entry (every pair past
    the clamp reads the last one), so the gathered gradient must add duplicates."""
    kwargs = make_inputs("relative_bias", dtype=torch.float32, B=1, H=2, N=29, M=37, D=12, E=10)
    kwargs["table"] = torch.randn(2, 9)  # R = 4: most pairs clamp
    check("examples/relative_bias.attn", kwargs, ("q", "k", "v", "table"), deterministic=deterministic)
    assert modes("examples/relative_bias.attn")[0] == {("table", ReadMode.SCATTER)}


def test_additive_biases_and_a_temperature():
    """A per-key bias (column sums), a full bias (one slot per pair), a temperature multiplying
    the score (row sums), under a bottom-right causal mask with N != M."""
    base = tensors(kb=(2, 37), pb=(2, 2, 29, 37), tau=(2,))
    base["tau"] = base["tau"].abs() + 0.5
    check(BIASES, base, ("q", "k", "v", "kb", "pb", "tau"))
    assert modes(BIASES)[0] == {("kb", ReadMode.COLS), ("pb", ReadMode.TILE), ("tau", ReadMode.ROWS)}


def test_gate_inside_q_k_and_a_block_bias_through_a_nonlinearity():
    """`tau[h]` among Q K^T's factors and again outside it, a per-query bias inside tanh, a
    block bias gathered at `(i // 4, j // 4)` (a scatter over two dims); deterministic."""
    base = tensors(tau=(2,), rb=(2, 29), blk=(2, 8, 10))
    found, bplan = modes(GATED)
    assert found == {("tau", ReadMode.ROWS), ("rb", ReadMode.ROWS), ("blk", ReadMode.SCATTER)}
    assert bplan.raw is not None and sum(rd.name == "tau" for rd in bplan.reads) == 2
    check(GATED, base, ("q", "k", "v", "tau", "rb", "blk"), deterministic=True)


def test_reads_under_a_block_map_mask():
    """A mask on document ids (a runtime block map: dQ walks the forward's lists, dK/dV the
    transposed ones): a per-key bias and a relative table, rows without any allowed key."""
    base = tensors(B=2, N=29, M=37, kb=(2, 37), table=(2, 7))
    base["doc_q"] = torch.arange(29).repeat(2, 1) // 10
    base["doc_k"] = torch.arange(37).repeat(2, 1) // 12 + torch.tensor([[0], [1]])  # batch 1: doc 0 has no key
    kernel, _ = check(DOCS, base, ("q", "k", "v", "kb", "table"), deterministic=True)
    assert kernel.backward_plan().dkdv_mode == "block_map"


def test_a_precomputed_score_input_chains_to_its_inputs():
    """`t[h] = w[h, c] z[c]` is computed before the launch; the kernels give its gradient, and
    torch autograd of the reference's ops takes it on to w and z."""
    base = tensors(w=(2, 20), z=(20,))
    base["w"], base["z"] = base["w"] * 0.1, base["z"] * 0.1
    check(POOLED, base, ("q", "v", "w", "z"))


def test_deterministic_gradients_are_bitwise_identical_run_to_run():
    kwargs = make_inputs("relative_bias", dtype=torch.float32, B=1, H=2, N=37, M=37, D=8, E=8)
    wanted = ("q", "k", "v", "table")
    runs = [gradients("examples/relative_bias.attn", "triton", kwargs, wanted, torch.float32, True)[1]
            for _ in range(2)]
    for n in wanted:
        assert torch.equal(runs[0][n], runs[1][n]), n
    kernel = attncc.compile("examples/relative_bias.attn", backend="triton", deterministic=True)
    assert kernel.deterministic
    kernel.deterministic = False  # a kernel attribute: the next call's backward uses atomics
    _, atomics = gradients("examples/relative_bias.attn", "triton", kwargs, wanted, torch.float32)
    torch.testing.assert_close(atomics["table"], runs[0]["table"], rtol=1e-5, atol=1e-5)


def test_deterministic_kernels_launch_no_atomics():
    """Every `tl.atomic_add` of the backward module sits in the `else` of `if DETERMINISTIC:`,
    and a deterministic call launches both kernels with DETERMINISTIC set."""
    kernel = attncc.compile(GATED, backend="triton", deterministic=True)
    launcher = kernel.backward_launcher()
    tree = ast.parse(launcher.src.source)
    atomics = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "DETERMINISTIC":
            body = [n for stmt in node.body for n in ast.walk(stmt)]
            assert not any(isinstance(n, ast.Attribute) and n.attr.startswith("atomic") for n in body)
            atomics += sum(isinstance(n, ast.Attribute) and n.attr == "atomic_add"
                           for stmt in node.orelse for n in ast.walk(stmt))
    assert atomics == sum(isinstance(n, ast.Attribute) and n.attr.startswith("atomic") for n in ast.walk(tree)) == 1
    from attncc.aot import static_call
    launches = launcher.launches(static_call(kernel, 16, 16, n=64), deterministic=True)
    assert all(k.constexprs["DETERMINISTIC"] for k in launches if "bwd_d" in k.kernel.__name__)


def test_scatter_sum_adds_duplicates_in_a_fixed_order():
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.zeros(50, dtype=torch.int64), torch.randint(0, 40, (300,), generator=g)])
    values = torch.randn(350, generator=g, dtype=torch.float64)
    want = torch.zeros(45, dtype=torch.float64).index_add_(0, positions, values)
    got = scatter_sum(values, positions, 45)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(scatter_sum(values.float(), positions, 45), scatter_sum(values.float(), positions, 45))
    assert scatter_sum(values[:0], positions[:0], 3).eq(0).all()


def test_reads_the_backward_cannot_differentiate_keep_the_reference_and_say_why():
    """A defined tensor read at other indices than its own (`u[h, clamp(j - i, 0, W - 1)]`): the
    tile computes it inline, but its gradient is not generated, so a call where `table` requires
    grad takes the reference backward; with only q, k, v requiring grad it is generated."""
    base = tensors(B=1, N=13, M=17, table=(2, 9))
    _, bplan = modes(SHIFTED)
    assert "table" in bplan.read_reasons and "other indices" in bplan.read_reasons["table"]
    kernel, got = gradients(SHIFTED, "triton", base, ("q", "table"), torch.float32)
    assert kernel.last_run["backward"] == "reference"
    assert "table" in kernel.last_run["backward_reason"]
    _, want = gradients(SHIFTED, "reference", base, ("q", "table"), torch.float64)
    torch.testing.assert_close(got["table"].double(), want["table"], rtol=1e-4, atol=1e-5)
    kernel, _ = gradients(SHIFTED, "triton", base, ("q", "k", "v"), torch.float32)
    assert kernel.last_run["backward"] == "triton"


def _eager_alibi(q, k, v, slopes):
    """ALiBi as an eager PyTorch composition (what a user would write), in the inputs' dtypes:
    bf16 scores, promoted to fp32 by the fp32 slopes, bf16 probabilities times bf16 values."""
    n, m = q.shape[-2], k.shape[-2]
    dist = (torch.arange(m)[None, :] - torch.arange(n)[:, None] - (m - n)).to(slopes.dtype)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + slopes[:, None, None] * dist
    s = s.masked_fill(dist > 0, float("-inf"))
    return torch.softmax(s, -1).to(v.dtype) @ v


def test_alibi_slopes_gradient_in_bfloat16_is_as_accurate_as_eager():
    """bf16 q, k, v and fp32 slopes (a parameter, as mixed-precision training keeps it): the
    slopes' gradient sums dS * (j - i - (M - N)) over each row, a factor far from zero on
    average, so an inconsistent delta (from the bf16-rounded O, off by ~2^-9 |dO| |O| per row)
    is multiplied by the mean distance instead of cancelling. Against the fp64 oracle on the
    same (bf16-rounded) inputs, the generated slopes gradient must be no worse than eager bf16
    autograd's (q, k, v: within 25 %, both end in a bf16 rounding): delta from the bf16 O made
    it 0.27 against eager's 0.10 here (scale 57); with the row sums consistent with the
    kernel's own fp32 P and dP (`read_stores` in codegen/row_backward.py) it is 1.4e-5."""
    base = tensors(seed=3, B=2, H=3, N=29, M=37, D=12, E=16)
    base = {n: t.to(torch.bfloat16) for n, t in base.items()}
    base["slopes"] = 2.0 ** -torch.arange(1, 4.0)
    grad_o = torch.randn(2, 3, 29, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)

    def grads(fn, dtype):
        args = {n: t.to(dtype if n != "slopes" or dtype == torch.float64 else torch.float32).clone()
                .requires_grad_() for n, t in base.items()}
        o = fn(**args)
        return dict(zip(args, torch.autograd.grad(o, list(args.values()), grad_o.to(o.dtype))))

    kernel = attncc.compile("examples/alibi.attn", backend="triton")
    got = grads(kernel, torch.bfloat16)
    assert kernel.last_run["backward"] == "triton" and got["slopes"].dtype == torch.float32
    want = grads(attncc.compile("examples/alibi.attn", backend="reference"), torch.float64)
    eager = grads(_eager_alibi, torch.bfloat16)
    for n in ("q", "k", "v", "slopes"):
        err = (got[n].double() - want[n]).abs().max().item()
        eager_err = (eager[n].double() - want[n]).abs().max().item()
        bound = eager_err if n == "slopes" else 1.25 * eager_err
        assert err <= bound, f"d{n}: max error {err:.3g}, eager bf16 autograd's {eager_err:.3g}"
