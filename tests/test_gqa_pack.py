"""GQA packing: the query heads that share a K/V head run in one program, K/V loaded once."""
import pytest
import torch

import attncc
from attncc.binding import bind
from oracles.inputs import make_inputs

GQA_DOCUMENT = """
attention gqa_document(q[B,H,N,D], k[B,G,N,D], v[B,G,N,E], doc[B,N]: int) -> o[B,H,N,E] {
  require H % G == 0
  s[b,h,i,j] = q[b,h,i,d] * k[b,h // (H // G),j,d] * D ** -0.5
  s += slopes_free(h) if false else 0.0
  mask doc[b,i] == doc[b,j] and j <= i
  p = softmax(s, j)
  o[b,h,i,e] = p[b,h,i,j] * v[b,h // (H // G),j,e]
}
"""


def run(spec, kwargs, config):
    kernel = attncc.compile(spec, backend="triton")
    launcher = kernel.generated.launcher
    o, lse = launcher(bind(kernel.program, kwargs), True, config)
    ref = attncc.compile(spec, backend="reference")(**kwargs, return_lse=True)
    return (o, lse), ref, launcher


@pytest.mark.parametrize("shape,config", [
    (dict(N=3, M=70), {}),                                    # decoding: packed by default
    (dict(N=37, M=45), {"GQA_PACK": True, "BLOCK_M": 32}),    # prefill, packing forced
    (dict(N=5, M=90), {"GQA_PACK": True, "SPLIT_KV": 3}),     # packing and split-KV together
])
def test_packed_gqa_matches_reference(shape, config):
    kwargs = make_inputs("gqa_causal", B=2, H=8, G=2, D=16, E=8, dtype=torch.float32, **shape)
    (o, lse), (ro, rlse), launcher = run("examples/gqa_causal.attn", kwargs, config)
    assert launcher.last_group == 4
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)


def test_packing_can_be_turned_off():
    kwargs = make_inputs("gqa_causal", B=1, H=4, G=2, N=3, M=40, D=16, E=8, dtype=torch.float32)
    _, _, launcher = run("examples/gqa_causal.attn", kwargs, {"GQA_PACK": False})
    assert launcher.last_group == 1


def test_packed_gqa_with_a_block_map():
    spec = GQA_DOCUMENT.replace("  s += slopes_free(h) if false else 0.0\n", "")
    base = make_inputs("document", B=2, H=4, N=40, D=16, E=8, dtype=torch.float32)
    kwargs = dict(base, k=base["k"][:, :2].contiguous(), v=base["v"][:, :2].contiguous())
    (o, lse), (ro, rlse), launcher = run(spec, kwargs, {"GQA_PACK": True, "BLOCK_M": 32})
    assert launcher.last_group == 2
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)
