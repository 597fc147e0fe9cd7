"""Split-KV decoding (flash-decoding): partial results per key split merged by LSE."""
import pytest
import torch

import attncc
from attncc.runtime import merge_splits
from oracles.inputs import SQUARE, make_inputs


def test_merge_of_splits_equals_a_single_pass():
    """Attention over all keys equals the LSE-weighted merge of attention over key chunks."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 6)
    s = q @ k.transpose(-1, -2)
    s[..., 0, :] = float("-inf")          # a row with no allowed key at all
    s[..., 1, 20:40] = float("-inf")      # a split with nothing allowed for one row
    bounds = [(0, 20), (20, 40), (40, 50)]
    parts, lses = [], []
    for lo, hi in bounds:
        chunk = s[..., lo:hi]
        lse = torch.logsumexp(chunk, -1)
        p = torch.exp(chunk - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1)).nan_to_num(0)
        parts.append(p @ v[..., lo:hi, :])
        lses.append(lse)
    o, lse = merge_splits(torch.stack(parts), torch.stack(lses))
    full_lse = torch.logsumexp(s, -1)
    want = (torch.exp(s - torch.where(torch.isfinite(full_lse), full_lse, 0).unsqueeze(-1)).nan_to_num(0)) @ v
    torch.testing.assert_close(o, want)
    torch.testing.assert_close(lse, full_lse)
    assert (o[..., 0, :] == 0).all() and torch.isinf(lse[..., 0]).all()


@pytest.mark.parametrize("name", ["dense", "causal", "gqa_causal", "alibi", "key_padding", "sliding_window"])
@pytest.mark.parametrize("splits", [2, 3])
def test_split_kv_kernel_matches_reference(name, splits):
    shape = dict(B=1, H=2, N=4, M=77, D=16, E=8)
    if name == "gqa_causal":
        shape.update(H=4, G=2)
    if name in SQUARE:
        shape.update(N=40, M=None)
    kwargs = make_inputs(name, dtype=torch.float32, **shape)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    call = attncc.binding.bind(kernel.program, kwargs)
    o, lse = kernel.generated.launcher(call, True, {"SPLIT_KV": splits, "BLOCK_M": 16, "BLOCK_N": 16})
    assert kernel.generated.launcher.last_splits == splits
    ro, rlse = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs, return_lse=True)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)
