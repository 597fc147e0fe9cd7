"""Generated backward kernels (plans with one softmax over the keys), in Triton's interpreter.

Every gallery example whose row-streaming plan has a log-sum-exp (`RowStreamPlan.has_lse`)
differentiates q, k and v through the generated delta, dK/dV and dQ kernels; the gradients
are checked against the float64 reference's autograd on odd shapes (N != M where the spec
allows, D != E, 16x16 tiles that do not divide N or M, GQA), with the returned LSE's gradient
(dLSE) in the loss where the spec has one. Calls the generated backward does not take say
"reference" and why. (Gradients of the other float tensors a score reads: test_backward_inputs.py;
sinks, pointwise weights and sums of terms: test_backward_weights.py.)
"""
import ast

import numpy as np
import pytest
import torch

import attncc
from attncc.codegen import names
from attncc.passes.backward import NoGeneratedBackward, plan_backward
from attncc.passes.kinds import MaskMode
from attncc.passes.mask_analysis import EMPTY, classify_tiles, key_ranges
from attncc.passes.row_stream import plan_row_stream
from oracles.inputs import EXAMPLES, SQUARE, make_inputs

SHAPE = dict(B=1, H=2, N=29, M=37, D=12, E=10)


def _plan(name):
    return plan_row_stream(attncc.load(f"examples/{name}.attn"))


def _has_lse(name):
    try:
        return _plan(name).has_lse
    except Exception:  # not the fused skeleton (the general planner's specs)
        return False


HAS_LSE = [name for name in EXAMPLES if _has_lse(name)]


def inputs(name, dtype=torch.float32, **shape):
    s = {**SHAPE, **shape}
    if name in SQUARE:
        s["M"] = None
    if name == "gqa_causal" and "G" not in shape:
        s.update(H=4, G=2)
    return make_inputs(name, dtype=dtype, **s)


def loss_weights(o, lse, seed=3):
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64)
    wl = None if lse is None else torch.randn(lse.shape, generator=g, dtype=torch.float64)
    return wo, wl


def loss_of(o, lse, wo, wl):
    loss = (o * wo.to(o.dtype)).sum() if wo is not None else 0.0
    if lse is not None:  # rows with no allowed key have lse = -inf: left out of the loss
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse, 0.0) * torch.where(finite, wl.to(lse.dtype), 0.0)).sum()
    return loss


def run(name, backend, kwargs, wanted=("q", "k", "v"), return_lse=True, dtype=None, weights=None, use_o=True):
    """(kernel, gradients of `wanted`, weights) for loss = <o, wo> + <lse, wl>."""
    dtype = dtype or next(t.dtype for t in kwargs.values() if torch.is_tensor(t) and t.is_floating_point())
    args = {n: (t.detach().to(dtype).requires_grad_(n in wanted) if torch.is_tensor(t) and t.is_floating_point()
                else t) for n, t in kwargs.items()}
    kernel = attncc.compile(f"examples/{name}.attn", backend=backend)
    out = kernel(**args, return_lse=return_lse)
    o, lse = out if return_lse else (out, None)
    wo, wl = weights or loss_weights(o, lse)
    loss = loss_of(o, lse, wo if use_o else None, wl)
    grads = torch.autograd.grad(loss, [args[n] for n in wanted], allow_unused=True)
    return kernel, dict(zip(wanted, grads)), (wo, wl)


def assert_close_to_scale(got, want, rel=1e-4, what=""):
    """max |got - want| within `rel` of the gradient's scale (max |want|)."""
    assert got is not None and want is not None, what
    assert got.shape == want.shape, what
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert scale > 0, what
    assert err <= rel * scale, f"{what}: max error {err:.3g} against gradient scale {scale:.3g}"


def test_every_gallery_plan_with_a_log_sum_exp_has_a_generated_backward():
    assert len(HAS_LSE) >= 19 and {"causal", "gqa_causal", "document", "agent", "channel"} <= set(HAS_LSE)
    for name in HAS_LSE:
        plan_backward(_plan(name))  # no NoGeneratedBackward


@pytest.mark.parametrize("name", HAS_LSE)
def test_generated_gradients_match_the_float64_reference(name):
    kwargs = inputs(name)
    has_lse_output = name != "agent"  # two chained softmaxes: no single log-sum-exp
    kernel, got, weights = run(name, "triton", kwargs, return_lse=has_lse_output)
    assert kernel.last_run["backend"] == "triton" and kernel.last_run["backward"] == "triton", kernel.last_run
    assert "backward_reason" not in kernel.last_run
    _, want, _ = run(name, "reference", kwargs, return_lse=has_lse_output, dtype=torch.float64, weights=weights)
    for n in ("q", "k", "v"):
        assert got[n].dtype == torch.float32
        assert_close_to_scale(got[n], want[n], what=f"{name} d{n}")


SCORE_MODS = """
attention mods(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  a = where(s > 0, s, 0.1 * s) + 0.5 * relu(s) + sqrt(abs(s) + 1) + exp(-s * s) + log1p(s * s) + floor(s) + sign(s)
  c = min(s, 0.5) + max(s, -0.5) + clamp(s, -1, 1) + sigmoid(s) + silu(s) + elu(s) + sin(s) * cos(s)
  w = s ** 3 * 0.1 + 2.0 ** s + rsqrt(s * s + 1) + log(s * s + 1) + expm1(s * 0.1) + gelu(s) + tanh(s) / (1 + s * s)
  t = (a + c + w) * 0.3 + (j < i) * s
  mask j <= i + (M - N)
  p = softmax(t, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


def test_every_derivative_rule_of_the_score():
    """A score through every elementwise function: dscore/dQK built by passes/backward.py, printed
    by the tile emitter, against the float64 reference's autograd."""
    g = torch.Generator().manual_seed(0)
    base = {"q": torch.randn(1, 2, 21, 8, generator=g), "k": torch.randn(1, 2, 26, 8, generator=g),
            "v": torch.randn(1, 2, 26, 6, generator=g)}
    grads = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        kernel = attncc.compile(SCORE_MODS, backend=backend)
        args = {n: t.to(dtype).requires_grad_(True) for n, t in base.items()}
        o, lse = kernel(**args, return_lse=True)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        grads.append(torch.autograd.grad((o * w).sum() + lse.sum(), list(args.values())))
        assert kernel.last_run["backward"] == ("triton" if backend == "triton" else "reference")
    for n, a, b in zip(base, *grads):
        assert_close_to_scale(a, b, what=f"d{n}")


@pytest.mark.parametrize("name,params", [("causal", {}), ("gqa_causal", {}), ("alibi", {}),
                                         ("sliding_window", {"window": 8}),
                                         ("sink_window", {"window": 8, "sinks": 3}), ("prefix_lm", {}),
                                         ("learned_sinks", {}), ("softmax_one", {})])
def test_dkdv_visits_exactly_the_query_tiles_with_an_allowed_pair(name, params):
    """The mask analysed with keys as rows gives each key tile the query tiles the dK/dV kernel
    walks: every tile holding an allowed pair (the forward's classification, transposed), no
    other (on IR alone: the tile ranges as the analysis evaluates them)."""
    plan = _plan(name)
    bplan = plan_backward(plan)
    assert bplan.dkdv_mode == MaskMode.AFFINE
    square = name in SQUARE
    for N, M in [(37, 37), (29, 37), (64, 48), (5, 40)]:
        if square and N != M:
            continue
        for BM, BN in [(16, 16), (16, 8), (8, 32)]:
            for prefix in ([0, 7, N] if bplan.key_mask_symbols else [None]):
                values = {**params, **{k: prefix for k in bplan.key_mask_symbols}}
                need = classify_tiles(plan.mask_plan, N, M, BM, BN, values) != EMPTY
                visited = np.zeros_like(need)
                for kt, spans in enumerate(key_ranges(bplan.key_masks, M, N, BN, BM, values)):
                    for start, stop in spans:
                        visited[start:stop, kt] = True
                assert (visited == need).all(), (N, M, BM, BN, prefix)


def test_lse_gradient_alone():
    """Only the returned LSE enters the loss (no gradient reaches o): dS = P * dLSE."""
    kwargs = inputs("causal")
    kernel, got, weights = run("causal", "triton", kwargs, use_o=False)
    assert kernel.last_run["backward"] == "triton"
    _, want, _ = run("causal", "reference", kwargs, dtype=torch.float64, weights=weights, use_o=False)
    assert got["v"] is None or got["v"].abs().max() == 0  # v does not reach the LSE
    for n in ("q", "k"):
        assert_close_to_scale(got[n], want[n], what=f"d{n}")


def test_rows_without_allowed_keys_get_zero_gradient():
    kwargs = make_inputs("key_padding", dtype=torch.float32, B=2, H=2, N=21, M=19, D=8, E=6, empty_rows=True)
    kernel, got, weights = run("key_padding", "triton", kwargs)
    assert kernel.last_run["backward"] == "triton"
    _, want, _ = run("key_padding", "reference", kwargs, dtype=torch.float64, weights=weights)
    for n in ("q", "k", "v"):
        assert torch.isfinite(got[n]).all()
        assert_close_to_scale(got[n], want[n], what=f"d{n}")
    assert got["q"][0].abs().max() == 0  # batch 0 allows no key: nothing depends on its queries


@pytest.mark.parametrize("H,G", [(3, 1), (6, 2)])
def test_gqa_groups_that_are_no_power_of_two(H, G):
    """dK and dV of a K/V head sum over the query heads of its group (MQA: all of them)."""
    kwargs = inputs("gqa_causal", H=H, G=G, N=19, M=23)
    kernel, got, weights = run("gqa_causal", "triton", kwargs)
    _, want, _ = run("gqa_causal", "reference", kwargs, dtype=torch.float64, weights=weights)
    for n in ("q", "k", "v"):
        assert_close_to_scale(got[n], want[n], what=f"d{n}")


def test_some_inputs_only():
    kwargs = inputs("sliding_window", N=21)
    kernel, got, weights = run("sliding_window", "triton", kwargs, wanted=("v", "k"))
    assert kernel.last_run["backward"] == "triton"
    _, want, _ = run("sliding_window", "reference", kwargs, wanted=("v", "k"), dtype=torch.float64, weights=weights)
    for n in ("v", "k"):
        assert_close_to_scale(got[n], want[n], what=f"d{n}")


def test_bfloat16_inputs():
    kwargs = inputs("causal", N=21, M=27)
    kernel, got, weights = run("causal", "triton", kwargs, dtype=torch.bfloat16)
    _, want, _ = run("causal", "reference", kwargs, dtype=torch.float64, weights=weights)
    for n in ("q", "k", "v"):
        assert got[n].dtype == torch.bfloat16
        assert_close_to_scale(got[n], want[n], rel=3e-2, what=f"d{n}")


def test_the_forward_saves_inputs_output_and_lse_only():
    """O(N) memory between forward and backward: the graph holds the inputs, O and the LSE."""
    kwargs = {n: t.requires_grad_(True) if n in "qkv" else t for n, t in inputs("document").items()}
    kernel = attncc.compile("examples/document.attn", backend="triton")
    o = kernel(**kwargs)
    saved = o.grad_fn.saved_tensors
    tensors = [t for t in kwargs.values() if torch.is_tensor(t)]
    n_rows = kwargs["q"].shape[:3].numel()
    assert sum(t.numel() for t in saved) == sum(t.numel() for t in tensors) + o.numel() + n_rows
    assert saved[-1].dtype == torch.float32 and saved[-1].numel() == n_rows  # the LSE


def test_learnable_score_inputs_are_generated_too():
    """slopes requiring grad: the generated kernels give its gradient (tests/test_backward_inputs.py
    covers tables, biases, gates and determinism)."""
    kwargs = inputs("alibi", N=13, M=17)
    kernel, got, weights = run("alibi", "triton", kwargs, wanted=("q", "k", "v", "slopes"))
    assert kernel.last_run["backward"] == "triton" and "backward_reason" not in kernel.last_run
    _, want, _ = run("alibi", "reference", kwargs, wanted=("q", "k", "v", "slopes"), dtype=torch.float64,
                     weights=weights)
    for n in ("q", "k", "v", "slopes"):
        assert_close_to_scale(got[n], want[n], what=f"d{n}")


FEATURE_MAPPED_SOFTMAX = """
attention fm(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  fq[b,h,i,d] = elu(q[b,h,i,d]) + 1
  s[b,h,i,j] = fq[b,h,i,d] * k[b,h,j,d]
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}
"""


def test_plans_without_a_generated_backward_say_reference_and_why(tmp_path):
    """A softmax over feature-mapped queries: the maps' gradient is not generated (every
    gallery row-streaming plan now has one), so the call says reference, and why."""
    path = tmp_path / "fm.attn"
    path.write_text(FEATURE_MAPPED_SOFTMAX)
    why = "feature map"
    with pytest.raises(NoGeneratedBackward, match=why):
        plan_backward(plan_row_stream(attncc.load(str(path))))
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    kernel = attncc.compile(str(path), backend="triton")
    o = kernel(q=q, k=k, v=v)
    assert kernel.last_run["backward"] == "reference" and why in kernel.last_run["backward_reason"]
    assert o.grad_fn is not None


def test_no_graph_no_backward():
    kwargs = inputs("causal", N=9, M=9)
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    kernel(**kwargs)
    assert kernel.last_run["backward"] is None and "backward_reason" not in kernel.last_run


HOSTILE = """
attention do(dq[B,H,N,D], dk[B,H,M,D], delta[B,H,M,E], lse[H]) -> p[B,H,N,E] {
  ds[b,h,i,j] = dq[b,h,i,d] * dk[b,h,j,d] * D ** -0.5
  ds += lse[h] * (j - i)
  mask j <= i + (M - N)
  dp = softmax(ds, j)
  p[b,h,i,e] = dp[b,h,i,j] * delta[b,h,j,e]
}
"""


def test_spec_names_like_the_backward_kernels_own():
    """A spec whose tensors are called do, dq, dk, delta, lse: user names stay in their namespace."""
    kernel = attncc.compile(HOSTILE, backend="triton")
    ref = attncc.compile(HOSTILE, backend="reference")
    g = torch.Generator().manual_seed(0)
    base = {"dq": torch.randn(1, 2, 11, 6, generator=g), "dk": torch.randn(1, 2, 13, 6, generator=g),
            "delta": torch.randn(1, 2, 13, 5, generator=g), "lse": torch.tensor([0.1, -0.2])}
    grads = []
    for k, dtype in ((kernel, torch.float32), (ref, torch.float64)):
        args = {n: t.to(dtype).requires_grad_(n != "lse") for n, t in base.items()}
        o = k(**args)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        grads.append(torch.autograd.grad((o * w).sum(), [args["dq"], args["dk"], args["delta"]]))
    assert kernel.last_run["backward"] == "triton"
    for a, b in zip(*grads):
        assert_close_to_scale(a, b)
    source = kernel.backward_launcher().src.source
    user = {*base, "do", "B", "H", "N", "M", "D", "E", "b", "h", "i", "j", "d", "e"}
    for node in ast.walk(ast.parse(source)):
        idents = [node.id] if isinstance(node, ast.Name) else [node.arg] if isinstance(node, ast.arg) else \
            [node.name] if isinstance(node, ast.FunctionDef) else []
        for ident in idents:
            split = names.split(ident)
            if split is not None and split[0] == "attn":  # a kernel: the spec's name, then what it does
                assert split[1].startswith("do_bwd_"), ident
            else:
                assert split is None or split[1] in user, ident  # user-derived: a name of the spec, with its role


COMPILE = """
import sys
import attncc
from attncc.aot import compile_launch, resources, static_call
for arg in sys.argv[1:]:
    name, d = arg.split(":")
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    for d in [int(d)]:
        for k in kernel.backward_launcher().launches(static_call(kernel, d, d), return_lse=True):
            if "_bwd_" in k.kernel.__name__:
                r = resources(k.kernel.__name__, compile_launch(k), k.options.get("num_warps"))
                print("ok", name, d, k.kernel.__name__, r.registers, r.spill_bytes, flush=True)
"""


def test_backward_kernels_compile_for_sm90_without_spills():
    """The interpreter is permissive: the delta, dK/dV and dQ kernels also compile for sm_90 (bf16,
    the launcher's default tiles at head dims 64 and 128), in a process not in interpreter mode.
    (`epipolar`'s heavy mask predicate does spill at these tiles.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    runs = ["causal:64", "causal:128", "document:128"]  # symbolic ranges; block map and transposed lists
    out = subprocess.run([sys.executable, "-c", COMPILE, *runs], env=env, capture_output=True, text=True,
                         timeout=900, cwd=Path(__file__).parent.parent)
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("ok ")]
    assert out.returncode == 0 and len(rows) == 3 * len(runs), out.stdout[-2000:] + out.stderr[-4000:]
    assert all(int(r[5]) == 0 for r in rows), out.stdout  # no spill stack


def test_a_piecewise_constant_score_has_no_gradient_in_q_and_k():
    """`floor(q . k)` does not change with q and k: their gradients are 0 (the derivative of
    the score is 0, not the 1 of a plain score), while v's is not."""
    spec = """attention steps(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {
  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  t = floor(s * 4.0) * 0.25
  p = softmax(t, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
}"""
    kernel = attncc.compile(spec, backend="triton")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g).requires_grad_() for n, d in ((19, 8), (23, 8), (23, 6)))
    kernel(q=q, k=k, v=v).square().sum().backward()
    assert kernel.last_run["backward"] == "triton"
    assert float(q.grad.abs().max()) == 0.0 and float(k.grad.abs().max()) == 0.0
    assert float(v.grad.abs().max()) > 0.0


def test_backward_config_per_kernel():
    """dK/dV and dQ have their own tiles: a `"dkdv"` or `"dq"` dict updates one kernel, a tile
    key at the top level both, `USE_TMA` the load path; the defaults are not changed."""
    from attncc.row_backward import backward_config, default_backward_config

    default = default_backward_config(False, 64, 64)
    assert default["dkdv"]["BLOCK_N"] == 64 and default["dq"]["BLOCK_M"] == 64 and default["USE_TMA"] is None
    cfg = backward_config(False, 64, 64, {"dq": {"BLOCK_N": 16}, "num_warps": 8, "USE_TMA": False})
    assert cfg["dq"] == {**default["dq"], "BLOCK_N": 16, "num_warps": 8}
    assert cfg["dkdv"] == {**default["dkdv"], "num_warps": 8} and cfg["USE_TMA"] is False
    assert default_backward_config(False, 64, 64) == default
    assert backward_config(True, 64, 64)["dkdv"]["BLOCK_M"] == 16  # the interpreter's small tiles
    # above head dim 64, a dQ kernel with more than one score read's gradient takes narrower key tiles
    assert default_backward_config(False, 128, 128, dq_reads=2)["dq"]["BLOCK_N"] == 16
    assert default_backward_config(False, 128, 128, dq_reads=1)["dq"]["BLOCK_N"] == 32
