"""Gradients: the triton backend differentiates, never silently.

A generated forward used to return outputs without a `grad_fn`, so a loss mixing the output
with any other differentiable term left q, k and v without gradient and raised nothing. Now
the triton backend's outputs carry a backward: generated kernels for plans with one plain
softmax (tests/test_backward.py and tests/test_backward_inputs.py check those in detail),
otherwise the forward recomputed on the reference executor under autograd. These tests check its gradients equal the reference backend's (on odd shapes, in
Triton's interpreter), that the reference's own gradients are right (a dense formula, float64
gradcheck), and that no path of the launcher hands back a detached output.
"""
import pytest
import torch

import attncc
from oracles import dense
from oracles.inputs import EXAMPLES, SQUARE, make_inputs

SHAPE = dict(B=1, H=2, N=37, M=45, D=16, E=12)


def inputs(name, dtype=torch.float32, grad=True, **shape):
    s = {**SHAPE, **shape}
    if name in SQUARE:
        s["M"] = None
    if name == "gqa_causal":
        s.update(H=4, G=2)
    kwargs = make_inputs(name, dtype=dtype, **s)
    if grad:
        for t in kwargs.values():
            if torch.is_tensor(t) and t.is_floating_point():
                t.requires_grad_(True)
    return kwargs


def float_inputs(kwargs):
    return {n: t for n, t in kwargs.items() if torch.is_tensor(t) and t.is_floating_point()}


def grads(name, backend, kwargs, return_lse=False, weights=None):
    """Gradients of a loss that mixes the output (and lse) with another differentiable term."""
    kernel = attncc.compile(f"examples/{name}.attn", backend=backend)
    out = kernel(**kwargs, return_lse=return_lse)
    o, lse = out if return_lse else (out, None)
    assert o.grad_fn is not None
    torch.manual_seed(1)
    loss = (o * torch.randn(o.shape, dtype=o.dtype)).sum() + 0.1 * (kwargs["q"] ** 2).sum()
    if lse is not None:
        assert lse.grad_fn is not None
        loss = loss + (lse * torch.randn(lse.shape, dtype=lse.dtype)).sum()
    named = float_inputs(kwargs)
    return kernel, dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))


@pytest.mark.parametrize("name", ["causal", "alibi", "relative_bias", "gqa_causal", "softcap"])
def test_triton_gradients_equal_the_reference_backends(name):
    kwargs = inputs(name)
    kernel, got = grads(name, "triton", kwargs, return_lse=True)
    # slopes and table require grad too: their gradients are generated as well
    assert kernel.last_run["backend"] == "triton" and kernel.last_run["backward"] == "triton"
    _, want = grads(name, "reference", kwargs, return_lse=True)
    assert set(got) == set(want) and len(got) >= 3  # q, k, v and slopes / table
    for n in want:
        assert got[n] is not None and got[n].dtype == kwargs[n].dtype, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)
        assert got[n].abs().sum() > 0, n


def test_backward_loss_mixing_output_with_another_term_reaches_every_input():
    """The reported case: loss = f(o) + g(q). Before, q got only g's gradient and k, v none."""
    kwargs = inputs("causal")
    o = attncc.compile("examples/causal.attn", backend="triton")(**kwargs)
    (o.sum() + kwargs["q"].sum()).backward()
    for n in ("q", "k", "v"):
        assert kwargs[n].grad is not None and kwargs[n].grad.abs().sum() > 0, n
    only_q = kwargs["q"].grad - 1.0  # what q would have got with a detached output
    assert only_q.abs().max() > 1e-3


def test_requires_grad_on_some_inputs_only():
    kwargs = inputs("alibi", grad=False)
    kwargs["v"].requires_grad_(True)
    kwargs["slopes"].requires_grad_(True)
    o = attncc.compile("examples/alibi.attn", backend="triton")(**kwargs)
    gv, gs = torch.autograd.grad(o.square().sum(), [kwargs["v"], kwargs["slopes"]])
    ro = attncc.compile("examples/alibi.attn", backend="reference")(**kwargs)
    wv, ws = torch.autograd.grad(ro.square().sum(), [kwargs["v"], kwargs["slopes"]])
    torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gs, ws, rtol=1e-4, atol=1e-5)
    assert kwargs["q"].grad is None and kwargs["k"].grad is None


def test_no_grad_and_inputs_without_grad_record_no_graph():
    kwargs = inputs("causal")
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    with torch.no_grad():
        o = kernel(**kwargs)
    assert o.grad_fn is None and not o.requires_grad
    assert kernel.last_run["backend"] == "triton" and kernel.last_run["backward"] is None
    o = kernel(**{n: t.detach() if torch.is_tensor(t) else t for n, t in kwargs.items()})
    assert o.grad_fn is None and kernel.last_run["backward"] is None


def test_second_derivatives_equal_the_reference_backends():
    """backward(create_graph=True): the reference recompute runs on the saved inputs with their
    history, so gradients of gradients are right too (not silently zero)."""
    kwargs = inputs("causal", N=5, M=7)
    q, k = kwargs["q"], kwargs["k"]
    results = []
    for backend in ("triton", "reference"):
        o = attncc.compile("examples/causal.attn", backend=backend)(**kwargs)
        (g,) = torch.autograd.grad(o.square().sum(), [q], create_graph=True)
        results.append(torch.autograd.grad(g.square().sum() + q.sum(), [q, k]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert results[0][1].abs().sum() > 0


def test_inputs_modified_in_place_after_the_forward_are_caught():
    kwargs = inputs("causal", N=5, M=5, grad=False)
    k = kwargs["k"].clone().requires_grad_(True)
    k_used = k * 1.0  # a non-leaf input, modified in place below
    o = attncc.compile("examples/causal.attn", backend="triton")(**{**kwargs, "k": k_used})
    with torch.no_grad():
        k_used.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()


def _assert_same_grads(name, kwargs, setup=None, want_path=None):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    if setup:
        setup(kernel, kwargs)
    o = kernel(**kwargs)
    assert o.grad_fn is not None, "detached output"
    if want_path:
        assert kernel.generated.launcher.last_path == want_path
    named = float_inputs(kwargs)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    got = torch.autograd.grad((o * w).sum(), list(named.values()), allow_unused=True)
    ro = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    want = torch.autograd.grad((ro * w).sum(), list(named.values()), allow_unused=True)
    tol = dict(rtol=1e-4, atol=1e-5) if o.dtype == torch.float32 else dict(rtol=0, atol=0)
    for n, g, r in zip(named, got, want):
        assert (g is None) == (r is None), n
        if g is not None:
            torch.testing.assert_close(g, r, **tol, msg=n)


@pytest.mark.parametrize("name,causal,path", [("linear_elu", False, "reassociated"),
                                               ("linear_elu", True, "chunked"),
                                               ("lightning", None, "chunked")])
def test_linear_paths_are_not_detached(name, causal, path):
    kwargs = inputs(name, N=20, M=20)
    if causal is not None:
        kwargs["causal"] = causal
    _assert_same_grads(name, kwargs, want_path=path)


def test_precomputed_intermediates_are_not_detached():
    """topk_blocks: the block selection is computed before the launch (reference ops)."""
    _assert_same_grads("topk_blocks", inputs("topk_blocks", N=24))


def test_split_kv_merge_is_not_detached():
    """Few queries, keys split and merged by LSE after the kernel (forced: off a GPU it never splits)."""
    def force_splits(kernel, kwargs):
        call = attncc.binding.bind(kernel.program, kwargs)
        kernel._configs[attncc.api.tuning_key(kernel.program, call)] = {"SPLIT_KV": 3, "BLOCK_M": 16,
                                                                        "BLOCK_N": 16}

    kwargs = inputs("causal", N=4, M=77)
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    force_splits(kernel, kwargs)
    kernel(**kwargs)
    assert kernel.generated.launcher.last_splits == 3
    _assert_same_grads("causal", kwargs, setup=force_splits)


def test_half_precision_output_cast_is_not_detached():
    kwargs = inputs("causal", dtype=torch.float16, N=9, M=13)
    kernel = attncc.compile("examples/causal.attn", backend="triton")
    o = kernel(**kwargs)
    assert o.dtype == torch.float16 and o.grad_fn is not None
    g = torch.autograd.grad(o.float().sum(), [kwargs["q"], kwargs["k"], kwargs["v"]])
    ro = attncc.compile("examples/causal.attn", backend="reference")(**kwargs)
    want = torch.autograd.grad(ro.float().sum(), [kwargs["q"], kwargs["k"], kwargs["v"]])
    assert kernel.last_run["backward"] == "triton"
    for a, b in zip(g, want):  # generated kernels, float16 operands in their dots (as the forward's)
        assert a.dtype == torch.float16
        assert (a.float() - b.float()).abs().max() <= 5e-3 * b.float().abs().max()


# ---------------------------------------------------------------------- the reference's own gradients

def test_reference_gradients_match_a_dense_formula():
    kwargs = inputs("alibi", dtype=torch.float64)
    o = attncc.compile("examples/alibi.attn", backend="reference")(**kwargs)
    want_o = dense.dense_alibi(**kwargs)
    named = float_inputs(kwargs)
    got = torch.autograd.grad(o.square().sum(), list(named.values()))
    want = torch.autograd.grad(want_o.square().sum(), list(named.values()))
    for n, g, w in zip(named, got, want):
        torch.testing.assert_close(g, w, msg=n)


@pytest.mark.parametrize("name", ["causal", "alibi", "relative_bias", "softcap"])
def test_reference_gradcheck_float64(name):
    kwargs = inputs(name, dtype=torch.float64, H=1, N=4, M=5, D=3, E=2)
    kernel = attncc.compile(f"examples/{name}.attn", backend="reference", reference_block=2)  # several blocks
    named = float_inputs(kwargs)
    rest = {n: v for n, v in kwargs.items() if n not in named}

    def f(*tensors):
        return kernel(**dict(zip(named, tensors)), **rest, return_lse=True)

    assert torch.autograd.gradcheck(f, tuple(named.values()))


@pytest.mark.parametrize("name", EXAMPLES)
def test_reference_outputs_carry_a_graph_for_every_example(name):
    kwargs = inputs(name, N=16, M=16, D=4, E=4, B=1, H=2)
    o = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    assert o.grad_fn is not None
    named = float_inputs(kwargs)
    got = torch.autograd.grad(o.sum(), list(named.values()), allow_unused=True)
    assert got[0] is not None and torch.isfinite(got[0]).all()  # q always reaches the output
