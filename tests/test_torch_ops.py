"""PyTorch operators: every kernel registered through torch.library (attncc/torch_ops.py).

`torch.library.opcheck` on gallery specs (its schema, fake-tensor, autograd-registration and
AOT-dispatch tests, the last with dynamic shapes), on the reference backend and on the triton
backend in Triton's interpreter; `torch.compile(fullgraph=True)` training steps of a small
module calling a kernel, whose loss and gradients equal eager's, with no graph break; what the
operators are named and what their schemas hold (no user text). torch.compile runs with the
`aot_eager` backend: Dynamo and AOTAutograd (the parts that read the fake implementation and
the autograd formula) trace exactly as with Inductor, which only adds C++ code generation for
the module's own layers (about 40 s on this CPU; the last test runs it once).
"""
import copy
import gc
import os
import re

import pytest
import torch
from compiled_steps import compiled_and_eager_gradients

import attncc
from attncc import torch_ops
from oracles.inputs import make_inputs

SEVERAL = """
attention several(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E], keep[B,M]: bool, shift[H]: int) -> (o[B,H,N,E], top[B,H,N], n[B,H,N]) {
  param cap: float = 5.0
  param window: int = 1000
  param causal: bool = false
  r[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d] * D ** -0.5
  s = cap * tanh(r / cap) + shift[h]
  mask keep[b,j] and (not causal or j <= i + (M - N)) and j + window >= i
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]
  top = amax(s, j)
  w[b,h,i,j] = where(s[b,h,i,j] > 0.0, 1, 0)
  n[b,h,i] = w[b,h,i,j]
}
"""

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="the triton backend needs a GPU or TRITON_INTERPRET=1")


def gallery_inputs(name, grad=("q", "k", "v")):
    square = name in ("document",)
    kwargs = make_inputs(name, B=1, H=2, N=9, M=None if square else 11, D=8, E=6, dtype=torch.float32)
    for n in grad:
        kwargs[n].requires_grad_(True)
    return kwargs


def several_inputs():
    torch.manual_seed(0)
    B, H, N, M, D, E = 2, 2, 7, 9, 8, 6
    return dict(q=torch.randn(B, H, N, D, requires_grad=True), k=torch.randn(B, H, M, D, requires_grad=True),
                v=torch.randn(B, H, M, E, requires_grad=True), keep=torch.rand(B, M) > 0.2,
                shift=torch.tensor([1, -2]), cap=3, window=4, causal=True)


def compile_spec(spec, backend):
    return attncc.compile(spec if "\n" in spec else f"examples/{spec}.attn", backend=backend)


# ---------------------------------------------------------------------------- opcheck
CASES = {
    "causal, return_lse": ("causal", lambda: gallery_inputs("causal"), True),
    "alibi, slopes require grad": ("alibi", lambda: gallery_inputs("alibi", ("q", "k", "v", "slopes")), False),
    "document, int input": ("document", lambda: gallery_inputs("document"), False),
    "three outputs (one int), float/int/bool params, bool and int inputs": (SEVERAL, several_inputs, False),
    "column_mass, its optional input left out (Tensor?)": ("column_mass", lambda: {
        n: t for n, t in gallery_inputs("causal").items()}, False),
    "sigmoid, a pointwise weight": ("sigmoid", lambda: gallery_inputs("sigmoid"), False),
    "lightning, lam requires grad": ("lightning", lambda: gallery_inputs("lightning", ("q", "k", "v", "lam")), False),
    "differential, a sum of two softmaxes": ("differential", lambda: gallery_inputs(
        "differential", ("q", "k", "v", "q2", "k2")), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_reference(case):
    spec, make, return_lse = CASES[case]
    kernel = compile_spec(spec, "reference")
    args = torch_ops.arguments(kernel, return_lse=return_lse, **make())
    assert args[-2] == torch_ops.REFERENCE  # inputs require grad: the reference recomputes the backward
    torch.library.opcheck(kernel.op, args)


@interpreted
@pytest.mark.parametrize("case", ["causal, return_lse", "three outputs (one int), float/int/bool params, bool and int inputs"])
def test_opcheck_triton(case):
    spec, make, return_lse = CASES[case]
    kernel = compile_spec(spec, "triton")
    args = torch_ops.arguments(kernel, return_lse=return_lse, **make())
    # causal's generated backward (the forward op also returns the fp32 LSE it saves); the
    # general planner's plan has none: the reference recomputes
    assert args[-2] == (torch_ops.GENERATED if spec == "causal" else torch_ops.REFERENCE)
    torch.library.opcheck(kernel.op, args)


@interpreted
@pytest.mark.parametrize("case", ["sigmoid, a pointwise weight", "lightning, lam requires grad",
                                  "differential, a sum of two softmaxes"])
def test_opcheck_triton_weights_without_a_log_sum_exp(case):
    """Pointwise weights and sums of terms take the generated backward through the operator
    too: the forward op's saved statistic is an empty fp32 tensor (they recompute what they
    need), and the backward op's gradients are the eager call's."""
    spec, make, return_lse = CASES[case]
    kernel = compile_spec(spec, "triton")
    kwargs = make()
    args = torch_ops.arguments(kernel, return_lse=return_lse, **kwargs)
    assert args[-2] == torch_ops.GENERATED and args[-1] is None
    results = kernel.op(*args)
    assert len(results) == 2 and results[1].shape == (0,) and results[1].dtype == torch.float32
    assert kernel.last_run["backward"] == "triton"
    floats = [t for t in kwargs.values() if torch.is_tensor(t) and t.requires_grad]
    grad = torch.randn_like(results[0])
    got = torch.autograd.grad(results[0], floats, grad)
    want = torch.autograd.grad(kernel(**kwargs), floats, grad)
    assert kernel.last_run["backward"] == "triton"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.library.opcheck(kernel.op, args)


def test_operator_results_and_gradients_equal_the_eager_call():
    kernel = compile_spec(SEVERAL, "reference")
    kwargs = several_inputs()
    eager = kernel(**kwargs)
    run = kernel.last_run
    results = kernel.op(*torch_ops.arguments(kernel, **kwargs))
    assert len(results) == 3 and results[2].dtype == torch.int64
    for a, b in zip(eager, results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    eager, results = eager[:2], results[:2]
    grads = [torch.randn_like(r) for r in results]
    floats = [kwargs[n] for n in ("q", "k", "v")]
    want = torch.autograd.grad(eager, floats, grads)
    got = torch.autograd.grad(results, floats, grads)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
    assert run["backward"] == kernel.last_run["backward"] == "reference"
    # second derivatives through the operator: the formula recomputes on the reference with a graph
    g, = torch.autograd.grad((kernel.op(*torch_ops.arguments(kernel, **kwargs))[0] ** 2).sum(), kwargs["v"],
                             create_graph=True)
    gg, = torch.autograd.grad(g.sum(), kwargs["q"])
    g0, = torch.autograd.grad((kernel(**kwargs)[0] ** 2).sum(), kwargs["v"], create_graph=True)
    torch.testing.assert_close(gg, torch.autograd.grad(g0.sum(), kwargs["q"])[0])


# ---------------------------------------------------------------------------- names and schemas
def test_operator_names_are_safe_identifiers_with_a_hash():
    body = "(q[B,H,N,D], k[B,H,M,D], v[B,H,M,E]) -> o[B,H,N,E] {\n  s[b,h,i,j] = q[b,h,i,d] * k[b,h,j,d]\n" \
           "  p = softmax(s, j)\n  o[b,h,i,e] = p[b,h,i,j] * v[b,h,j,e]\n}"
    for spec_name, want in (("__9_lives__", "spec_9_lives"), ("x" * 300, "x" * 48)):
        kernel = compile_spec(f"attention {spec_name}{body}", "reference")
        namespace, name = kernel.op._schema.name.split("::")
        assert namespace == "attncc"
        assert re.fullmatch(want + r"_reference_[0-9a-f]{12}", name), name
    # a program's name need not be ASCII (a decorated Python function's is not checked by the grammar)
    kernel.program.name = "Ünïcode_ätt"
    kernel._torch_op = None
    assert re.fullmatch(r"attncc::n_code_tt_reference_[0-9a-f]{12}", kernel.op._schema.name)
    op = kernel.op
    schema = str(op._schema)
    # positional argument names only: no input, param or spec name is spelled in the schema
    assert re.findall(r"Tensor (\w+)", schema) == ["x0", "x1", "x2"]
    assert "bool return_lse, int backward, str? backward_reason) -> Tensor[]" in schema
    params = compile_spec(SEVERAL, "reference").op._schema
    assert [a.name for a in params.arguments][5:8] == ["p0", "p1", "p2"]
    assert [str(a.type) for a in params.arguments][5:8] == ["Optional[float]", "Optional[int]", "Optional[bool]"]


def test_same_spec_different_text_different_operator():
    a = compile_spec("causal", "reference")
    b = compile_spec(open("examples/causal.attn").read().replace("D ** -0.5", "D ** -0.25"), "reference")
    c = compile_spec("causal", "triton" if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                     else "reference")
    names = {k.op._schema.name for k in (a, b, c)}
    assert len(names) == 3


def test_a_live_kernel_keeps_its_operator_a_freed_one_hands_it_on():
    first = compile_spec("causal", "reference")
    name = first.op._schema.name
    second = compile_spec("causal", "reference")
    assert second.op._schema.name == name + "_2"  # the first is alive: a new operator
    assert copy.copy(second).op._schema.name == name + "_3"  # a copy runs itself, not the original
    kwargs = gallery_inputs("causal", grad=())
    op = first.op
    del first
    gc.collect()
    with pytest.raises(RuntimeError, match="was freed"):
        op(*torch_ops.arguments(second, **kwargs))
    third = compile_spec("causal", "reference")
    assert third.op._schema.name == name  # the freed kernel's registration is reused
    torch.testing.assert_close(op(*torch_ops.arguments(third, **kwargs))[0], third(**kwargs))


# ---------------------------------------------------------------------------- torch.compile
class Block(torch.nn.Module):
    """A projection to q, k, v, an ALiBi kernel with learnable slopes, an output projection."""

    def __init__(self, kernel, heads=2, dim=8):
        super().__init__()
        self.kernel, self.heads, self.dim = kernel, heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.slopes = torch.nn.Parameter(torch.linspace(0.1, 0.5, heads))
        self.out = torch.nn.Linear(heads * dim, heads * dim)

    def forward(self, x, return_lse=False):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        o = self.kernel(q=q, k=k, v=v, slopes=self.slopes, return_lse=return_lse)
        if return_lse:
            o, lse = o
            o = o + lse.unsqueeze(-1) * 0.1
        return self.out(o.transpose(1, 2).reshape(B, N, -1))


def train_step(model, module, x, return_lse=False):
    module.zero_grad(set_to_none=True)
    loss = model(x, return_lse).square().mean()
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def check_compiled_training(backend, compiler="aot_eager", want_backward="reference"):
    torch.manual_seed(0)
    kernel = compile_spec("alibi", backend)
    module = Block(kernel)
    compiled = torch.compile(module, fullgraph=True, backend=compiler)  # a graph break raises
    for N, return_lse in ((13, False), (13, True), (21, False)):  # another length: a recompile
        x = torch.randn(2, N, 16)
        want_loss, want = train_step(module, module, x, return_lse)
        eager_run = kernel.last_run
        got_loss, got = train_step(compiled, module, x, return_lse)
        torch.testing.assert_close(got_loss, want_loss)
        for n in want:
            torch.testing.assert_close(got[n], want[n], msg=lambda m: f"{n}: {m}")
        assert kernel.last_run["backend"] == eager_run["backend"] == backend
        assert kernel.last_run["backward"] == eager_run["backward"] == want_backward
    module.slopes.requires_grad_(False)  # another requires_grad pattern: a recompile
    want_loss, want = train_step(module, module, x)
    got_loss, got = train_step(compiled, module, x)
    torch.testing.assert_close(got_loss, want_loss)
    assert got["slopes"] is None and want["slopes"] is None
    torch.testing.assert_close(got["qkv.weight"], want["qkv.weight"])
    with torch.no_grad():  # no graph: the operator is told so, and says so
        torch.testing.assert_close(compiled(x), module(x))
        assert kernel.last_run["backward"] is None
    return kernel, module


def test_compile_fullgraph_trains_reference_backend():
    kernel, module = check_compiled_training("reference")
    assert "recomputes" in kernel.last_run.get("backward_reason", "") or kernel.last_run["backward"] is None
    explanation = torch._dynamo.explain(module)(torch.randn(2, 13, 16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@interpreted
def test_compile_fullgraph_trains_triton_backend():
    # the generated forward and backward run inside the operators: torch.compile sees only their
    # fake implementations, so the interpreter needs nothing from it
    mode, _ = torch_ops.backward_choice(compile_spec("alibi", "triton"), ("q", "k", "v", "slopes"), True)
    check_compiled_training("triton", want_backward="triton" if mode == torch_ops.GENERATED else "reference")


@interpreted
@pytest.mark.parametrize("name, grad", [("lightning", ("q", "k", "v", "lam")),
                                        ("differential", ("q", "k", "v", "q2", "k2"))])
def test_compile_fullgraph_generated_backward_without_a_log_sum_exp(name, grad):
    """A pointwise weight (lightning, `lam` learnable) and a sum of two softmaxes traced by
    torch.compile: one graph, the generated backward inside the backward operator, eager's
    gradients."""
    kernel = compile_spec(name, "triton")
    kwargs = gallery_inputs(name, grad)
    floats = [kwargs[n] for n in grad]

    def step(**kw):
        return (kernel(**kw) * 0.5).square().sum()

    got, want = compiled_and_eager_gradients(kernel, step, kwargs, floats)
    for n, a, b in zip(grad, got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{n}: {m}")


def test_errors_under_compile_name_the_argument():
    kernel = compile_spec("causal", "reference")
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(Exception, match="unknown argument 'vv'"):
        torch.compile(lambda q: kernel(q=q, k=q, vv=q), fullgraph=True, backend="aot_eager")(q)
    with pytest.raises(Exception, match="argument 'k' has H = 1"):
        torch.compile(lambda q: kernel(q=q, k=q[:, :1], v=q), fullgraph=True, backend="aot_eager")(q)
    softcap = compile_spec("softcap", "reference")
    with pytest.raises(Exception, match="param 'cap' must be a Python float"):
        torch.compile(lambda q: softcap(q=q, k=q, v=q, cap="2"), fullgraph=True, backend="aot_eager")(q)


def test_compile_with_inductor():
    torch.manual_seed(0)
    kernel = compile_spec("causal", "reference")
    lin = torch.nn.Linear(8, 8)

    def step(x):
        q = lin(x).view(1, 5, 2, 4).transpose(1, 2)
        return kernel(q=q, k=q, v=q).square().mean()

    x = torch.randn(1, 5, 8)
    want = torch.autograd.grad(step(x), lin.weight)[0]
    got = torch.autograd.grad(torch.compile(step, fullgraph=True)(x), lin.weight)[0]
    torch.testing.assert_close(got, want)


@attncc.attention(backend="reference")
def alibi_window(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", slopes: "H", *, window: int = 256) -> "B,H,N,E":
    s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5  # noqa: F821 (the attncc language)
    s += slopes[h] * (j - i)  # noqa: F821
    mask(j <= i and i - j < window)  # noqa: F821
    p = softmax(s, j)  # noqa: F821
    o[b, h, i, e] = p[b, h, i, j] * v[b, h, j, e]  # noqa: F821
    return o  # noqa: F821


def test_compile_a_decorated_function_compiled_on_first_use():
    assert not alibi_window.compiled  # the first traced call compiles it, outside the graph
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    slopes = torch.rand(2, requires_grad=True)
    step = torch.compile(lambda q, s: alibi_window(q=q, k=q, v=q, slopes=s, window=3).square().sum(),
                         fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(step(q, slopes), (q, slopes))
    want = torch.autograd.grad(alibi_window(q=q, k=q, v=q, slopes=slopes, window=3).square().sum(), (q, slopes))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert alibi_window.op._schema.name.startswith("attncc::alibi_window_reference_")
