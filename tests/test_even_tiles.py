"""Whole tiles: when BLOCK_N divides the key count (EVEN_N) and BLOCK_M the query count
(EVEN_M), the generated kernels drop the key-bound masks of partial tiles, the ragged last
tile of mask-free kernels and the row masks of the q load; plain softmax scores drop the
fully-masked-row guard on full tiles. The interpreter's tiles are 16 wide, so these shapes
(multiples of 16) take those paths; the odd shapes of the other tests take the masked ones.
"""
import pytest
import torch

import attncc
from oracles.inputs import SQUARE, make_inputs


@pytest.mark.parametrize("name,shape", [
    ("dense", dict(N=32, M=48)), ("causal", dict(N=48, M=32)), ("causal", dict(N=32, M=64)),
    ("sliding_window", dict(N=64)), ("document", dict(N=48)), ("alibi", dict(N=32, M=32)),
    ("gqa_causal", dict(N=32, M=32, H=4, G=2)), ("softmax_one", dict(N=32, M=48)), ("sigmoid", dict(N=32, M=32)),
    ("differential", dict(N=32, M=32)), ("query_softmax", dict(N=32, M=32)), ("prefix_lm", dict(N=48)),
])
def test_whole_tiles_match_reference(name, shape):
    s = {"B": 2, "H": 2, "D": 16, "E": 16, **shape}
    if name in SQUARE:
        s["M"] = None
    kwargs = make_inputs(name, dtype=torch.float32, **s)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    ref = attncc.compile(f"examples/{name}.attn", backend="reference")
    lse = kernel.generated.plan.has_lse and not kernel.generated.plan.statistics_only
    out = kernel(**kwargs, return_lse=lse)
    assert kernel.last_run["backend"] == "triton"
    expected = ref(**kwargs, return_lse=lse)
    for a, b in zip(out if lse else [out], expected if lse else [expected]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
