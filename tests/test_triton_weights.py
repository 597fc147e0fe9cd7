"""Row-streaming kernels beyond one softmax: softmax1, pointwise weights (sigmoid, decayed
linear attention) and a difference of two softmaxes, generated and run in the interpreter."""
import pytest
import torch

import attncc
from oracles.inputs import SQUARE, make_inputs

CASES = {
    "softmax_one": dict(N=37, M=45),
    "sigmoid": dict(N=37, M=45),
    "differential": dict(N=37, M=45),
    "lightning": dict(N=37, M=45),
}


@pytest.mark.parametrize("name", list(CASES))
def test_generated_weights_match_reference(name):
    shape = dict(CASES[name])
    if name in SQUARE:
        shape["M"] = None
    kwargs = make_inputs(name, B=2, H=2, D=24, E=12, dtype=torch.float32, **shape)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    out = kernel(**kwargs)
    assert kernel.last_run["backend"] == "triton"
    want = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    scale = want.abs().max().clamp(min=1)
    torch.testing.assert_close(out / scale, want / scale, rtol=1e-4, atol=1e-5)


def test_terms_are_planned_as_expected():
    kinds = {name: [t.kind for t in attncc.compile(f"examples/{name}.attn", backend="triton").generated.plan.terms]
             for name in CASES}
    assert kinds == {"softmax_one": ["softmax1"], "sigmoid": ["pointwise"],
                     "differential": ["softmax", "softmax"], "lightning": ["pointwise"]}


def test_lse_is_refused_where_there_is_no_single_softmax():
    kernel = attncc.compile("examples/differential.attn", backend="triton")
    with pytest.raises(attncc.SpecError, match="exactly one softmax"):
        kernel(**make_inputs("differential", dtype=torch.float32), return_lse=True)


def test_sigmoid_bias_param_reaches_the_kernel():
    kwargs = make_inputs("sigmoid", dtype=torch.float32)
    kernel = attncc.compile("examples/sigmoid.attn", backend="triton")
    reference = attncc.compile("examples/sigmoid.attn", backend="reference")
    torch.testing.assert_close(kernel(**kwargs, bias=1.5), reference(**kwargs, bias=1.5), rtol=1e-4, atol=1e-5)
