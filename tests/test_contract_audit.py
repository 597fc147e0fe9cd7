"""Discrepancies found by the contract audit of the gallery (VARIANTS.md sections 1 and 3),
each pinned by the call that exposed it, against float64 oracles written here from the
contract text (or against the eager call, for the torch.library path).

- `bind` kept a call's keyword order and appended left-out optional inputs at the end, while
  the torch.library operators pair the bound tensors with the spec's inputs by position:
  under torch.compile, `linear_kernel` called without `lam` got `lam`'s gradient in `kw`'s slot.
- an input passed with size-1 broadcast dims (`bias_tensor`'s `bias[B?,H?,N?,M?]`) got, under
  torch.compile, a gradient of the broadcast shape (eager autograd sums it; an operator's
  backward must), and its double backward ran the reference on the unbroadcast tensor.
- under torch.compile, `agent` (a cascade whose generated plan is its last stage) failed in its
  fake implementation, which asked the program rather than the plan for the saved log-sum-exp.
- a tuple param given as a 1-D numpy array or tensor was refused with a misleading message.
"""
import os

import pytest
import torch

import attncc
from attncc.binding import bind

BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def rand(*shape, seed=0, positive=False):
    t = torch.rand if positive else torch.randn
    return t(*shape, generator=torch.Generator().manual_seed(seed))


def compiled(kernel):
    torch._dynamo.reset()
    return torch.compile(lambda **kw: kernel(**kw), backend="eager", fullgraph=True)


def grads(fn, inputs, wanted, weight_seed=7):
    leaves = {n: t.detach().clone().requires_grad_(n in wanted) for n, t in inputs.items()}
    out = fn(**leaves)
    loss = (out * rand(*out.shape, seed=weight_seed)).sum()
    return out, dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted])))


# ------------------------------------------------------------ optional inputs left out


def test_bound_tensors_follow_the_spec_order_with_optional_inputs_left_out():
    program = attncc.compile("examples/linear_kernel.attn", backend="reference").program
    B, H, G, N, M, D, E = 1, 2, 1, 3, 4, 2, 2
    call = bind(program, dict(kw=rand(B, G, M), v=rand(B, G, M, E), q=rand(B, H, N, D), k=rand(B, G, M, D)))
    assert list(call.tensors) == list(program.inputs) == ["q", "k", "v", "lam", "kw"]


def linear_kernel_oracle(q, k, v, kw, causal):
    """linear_kernel with lam left out (1): w = kw[b,g,j] (q_i . k_j), causal bottom-right."""
    H, G, N, M = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v, kw = (x.repeat_interleave(H // G, dim=1) for x in (k, v, kw))
    w = torch.einsum("bhid,bhjd->bhij", q, k) * kw[:, :, None, :]
    if causal:
        w = w * (torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N))
    return torch.einsum("bhij,bhje->bhie", w, v) / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_call_leaving_out_an_optional_input_gets_each_gradient_in_its_slot(backend):
    B, H, G, N, M, D, E = 2, 4, 2, 5, 7, 4, 3
    inputs = dict(q=rand(B, H, N, D, seed=1, positive=True), k=rand(B, G, M, D, seed=2, positive=True),
                  v=rand(B, G, M, E, seed=3), kw=rand(B, G, M, seed=4, positive=True) + 0.5)
    kernel = attncc.compile("examples/linear_kernel.attn", backend=backend)
    fn = compiled(kernel)
    out, found = grads(lambda **kw: fn(**kw, causal=True), inputs, ("q", "kw", "v"))
    want, want_grads = grads(lambda **kw: linear_kernel_oracle(**{n: t.double() for n, t in kw.items()}, causal=True),
                             inputs, ("q", "kw", "v"))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for name, g in found.items():
        torch.testing.assert_close(g.double(), want_grads[name].double(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ broadcast inputs


def bias_oracle(q, k, v, bias):
    """bias_tensor, causal (the default): softmax_j(q.k * D^-0.5 + bias) v, bottom-right."""
    N, M = q.shape[2], k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5 + bias
    s = s.masked_fill(~(torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N)), -torch.inf)
    return torch.einsum("bhij,bhje->bhie", torch.softmax(s, -1), v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 6), (2, 1, 5, 1)])
def test_compiled_call_sums_a_broadcast_input_gradient_over_its_size_1_dims(backend, shape):
    B, H, N, M, D, E = 2, 3, 5, 6, 4, 3
    inputs = dict(q=rand(B, H, N, D, seed=1), k=rand(B, H, M, D, seed=2), v=rand(B, H, M, E, seed=3),
                  bias=rand(*shape, seed=4))
    fn = compiled(attncc.compile("examples/bias_tensor.attn", backend=backend))
    out, found = grads(fn, inputs, ("q", "bias"))
    want, want_grads = grads(lambda **kw: bias_oracle(**{n: t.double() for n, t in kw.items()}), inputs, ("q", "bias"))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert found["bias"].shape == shape
    for name, g in found.items():
        torch.testing.assert_close(g.double(), want_grads[name].double(), atol=1e-4, rtol=1e-4)


def test_compiled_double_backward_through_a_broadcast_input():
    B, H, N, M, D, E = 2, 2, 5, 4, 3, 2
    leaves = dict(q=rand(B, H, N, D, seed=1).double(), k=rand(B, H, M, D, seed=2).double(),
                  v=rand(B, H, M, E, seed=3).double(), bias=rand(1, H, 1, M, seed=4).double())
    kernel = attncc.compile("examples/bias_tensor.attn", backend="reference")
    found = []
    for fn in (compiled(kernel), bias_oracle):
        x = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        gb, = torch.autograd.grad(fn(**x).pow(2).sum(), [x["bias"]], create_graph=True)
        weight = torch.arange(gb.numel(), dtype=gb.dtype).view(gb.shape)
        found.append(torch.autograd.grad((gb * weight).sum(), [x["q"]])[0])
    torch.testing.assert_close(found[0], found[1])


# ------------------------------------------------------------ tuple params


def test_a_tuple_param_takes_a_1d_array_or_tensor_as_its_entries():
    """`shape=np.array([1, 3, 3])` was one value for every entry, then refused as
    "param 'shape[0]' must be an int, got ndarray"."""
    np = pytest.importorskip("numpy")
    kernel = attncc.compile("examples/neighborhood_nd.attn", backend="reference")
    q, k, v = rand(1, 2, 9, 4, seed=1), rand(1, 2, 9, 4, seed=2), rand(1, 2, 9, 3, seed=3)
    want = kernel(q=q, k=k, v=v, shape=(1, 3, 3), kernel=(1, 3, 1))
    for shape, kern in ((np.array([1, 3, 3]), np.array([1, 3, 1])), (torch.tensor([1, 3, 3]), torch.tensor([1, 3, 1]))):
        torch.testing.assert_close(kernel(q=q, k=k, v=v, shape=shape, kernel=kern), want)
    with pytest.raises(attncc.ArgumentError, match="takes 3 entries"):
        kernel(q=q, k=k, v=v, shape=np.array([3, 3]))


# ------------------------------------------------------------ saved statistic of a cascade


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend needs TRITON_INTERPRET=1 here")
def test_compiled_cascade_with_a_generated_backward_traces_its_saved_statistic():
    """agent: the generated plan is the last stage (its softmax over the agents), the earlier one
    precomputed; the fake implementation asked the whole program for its log-sum-exp
    ("return_lse needs exactly one softmax ..., found 2") instead of the plan."""
    B, H, N, D, E = 1, 2, 8, 4, 3
    inputs = dict(q=rand(B, H, N, D, seed=1), k=rand(B, H, N, D, seed=2), v=rand(B, H, N, E, seed=3))
    kernel = attncc.compile("examples/agent.attn", backend="triton")
    eager, want = grads(lambda **kw: kernel(**kw, agents=2), inputs, ("q", "k", "v"))
    fn = compiled(kernel)
    out, found = grads(lambda **kw: fn(**kw, agents=2), inputs, ("q", "k", "v"))
    assert kernel.last_run["backward"] == "triton"
    torch.testing.assert_close(out, eager)
    for name, g in found.items():
        torch.testing.assert_close(g, want[name])
