"""The reference executor against hand-written dense formulas (and FlexAttention).

Every example of VARIANTS.md runs through `backend="reference"` in float64 on odd shapes
(N = 37 is no multiple of any block size, N != M where the contract allows it, D != E,
GQA), with a small streaming block so that the chunked paths of the executor are used.
"""
import pytest
import torch

import attncc
from oracles.dense import DENSE
from oracles.flex import FLEX
from oracles.inputs import EXAMPLES, SOFTMAX_FAMILY, SQUARE, make_inputs

# Shapes per case: (B, H, N, M, D, E); M is forced to N for square-only examples.
SHAPES = {"odd": (2, 4, 37, 45, 16, 12), "decode": (1, 2, 5, 29, 8, 8)}


def run_both(name, shape, block, **overrides):
    B, H, N, M, D, E = shape
    kwargs = make_inputs(name, B=B, H=H, N=N, M=None if name in SQUARE else M, D=D, E=E)
    kwargs.update(overrides)
    kernel = attncc.compile(f"examples/{name}.attn", backend="reference", reference_block=block)
    assert kernel.backend == "reference"
    return kernel(**kwargs), DENSE[name](**kwargs), kwargs


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("block", [7, 256])
def test_reference_matches_dense_formula(name, block):
    got, want, _ = run_both(name, SHAPES["odd"], block)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["dense", "causal", "gqa_causal", "alibi", "softcap", "key_padding",
                                  "label_table", "relative_bias", "sigmoid", "query_softmax",
                                  "differential", "moh", "softmax_one", "linear_elu"])
def test_reference_decode_shape(name):
    got, want, _ = run_both(name, SHAPES["decode"], 4)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_reference_matches_flex_attention_with_lse(name):
    B, H, N, M, D, E = SHAPES["odd"]
    kwargs = make_inputs(name, B=B, H=H, N=N, M=None if name in SQUARE else M, D=D, E=E)
    kernel = attncc.compile(f"examples/{name}.attn", backend="reference", reference_block=8)
    o, lse = kernel(**kwargs, return_lse=True)
    fo, flse = FLEX[name](**kwargs, return_lse=True)
    torch.testing.assert_close(o, fo, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lse, flse, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["key_padding", "label_table"])
def test_empty_rows_give_zero_and_minus_inf(name):
    kwargs = make_inputs(name, empty_rows=True)
    o, lse = attncc.compile(f"examples/{name}.attn", reference_block=5)(**kwargs, return_lse=True)
    empty = torch.isinf(lse)
    assert empty.any(), "the inputs were meant to contain an empty row"
    assert (o[empty] == 0).all() and (lse[empty] < 0).all()


def test_half_precision_inputs_give_half_outputs():
    kwargs = make_inputs("causal", dtype=torch.bfloat16)
    out = attncc.compile("examples/causal.attn")(**kwargs)
    want = DENSE["causal"](**{k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_streaming_keeps_memory_bounded():
    """With block 16 the largest score block is B*H*16*M; the whole score matrix never exists."""
    import attncc.reference as ref

    sizes = []
    real_einsum = torch.einsum

    def spy(eq, *ops):
        out = real_einsum(eq, *ops)
        sizes.append(out.numel())
        return out

    kwargs = make_inputs("causal", B=1, H=2, N=200, M=200)
    ref.torch.einsum = spy
    try:
        attncc.compile("examples/causal.attn", reference_block=16)(**kwargs)
    finally:
        ref.torch.einsum = real_einsum
    assert max(sizes) <= 1 * 2 * 16 * 200


def test_masked_infinities_do_not_leak_into_sums():
    """lightning's lam ** (i - j) overflows where j > i; those pairs are masked and must
    contribute nothing (not inf * 0 = nan)."""
    kwargs = make_inputs("lightning", B=1, H=2, N=300, dtype=torch.float32)
    kwargs["lam"] = torch.full((2,), 0.5)
    out = attncc.compile("examples/lightning.attn", reference_block=64)(**kwargs)
    assert torch.isfinite(out).all()


def test_streaming_over_heads_with_a_block_reduction():
    kwargs = make_inputs("agent", B=1, H=4, N=32)
    got = attncc.compile("examples/agent.attn", reference_block=2)(**kwargs)
    torch.testing.assert_close(got, DENSE["agent"](**kwargs), rtol=1e-9, atol=1e-10)


def test_negative_gather_index_is_an_error_not_a_wraparound():
    kwargs = make_inputs("label_table")
    kwargs["label_q"] = kwargs["label_q"].clone()
    kwargs["label_q"][0, 3] = -1
    with pytest.raises(IndexError, match=r"index -1 is out of range .* line 7"):
        attncc.compile("examples/label_table.attn")(**kwargs)
