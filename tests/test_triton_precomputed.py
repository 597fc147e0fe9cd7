"""Kernels that read precomputed intermediates: routed block sparsity and chained attention.

What a tile cannot compute itself (the kept blocks of topk_blocks, the permuted keys of
permuted_blocks, agent attention's pooled agents and their values) is computed before the
launch by the reference executor on the same device and read by the kernel as a tensor.
"""
import pytest
import torch

import attncc
from attncc.work import measured_tile_work
from oracles.inputs import make_inputs


@pytest.mark.parametrize("name", ["topk_blocks", "permuted_blocks", "agent"])
def test_generated_kernel_matches_reference(name):
    kwargs = make_inputs(name, B=2, H=2, N=48, D=24, E=12, dtype=torch.float32)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    assert kernel.generated.plan.precomputed.inputs, "the plan should read a precomputed intermediate"
    out = kernel(**kwargs)
    assert kernel.last_run["backend"] == "triton"
    want = attncc.compile(f"examples/{name}.attn", backend="reference")(**kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_routed_sparsity_visits_only_the_kept_blocks():
    """topk_blocks with 2 of up to 7 earlier blocks kept: the kernel walks the kept tiles only."""
    kwargs = make_inputs("topk_blocks", B=1, H=2, N=128, D=16, E=16, dtype=torch.float32)
    kwargs.update(block=16, topk=2)
    kernel = attncc.compile("examples/topk_blocks.attn", backend="triton")
    work = measured_tile_work(kernel, kwargs, 16, 16)
    assert work.visited == work.minimum
    causal_tiles = 2 * (8 * 9 // 2)
    assert work.visited <= 2 * 8 * 3 < causal_tiles  # diagonal + 2 per query block


def test_precomputed_selection_follows_the_inputs():
    """The kept blocks are recomputed for new inputs (not cached from a previous call)."""
    kernel = attncc.compile("examples/topk_blocks.attn", backend="triton")
    reference = attncc.compile("examples/topk_blocks.attn", backend="reference")
    for seed in (0, 1):
        kwargs = make_inputs("topk_blocks", B=1, H=2, N=40, D=16, E=8, dtype=torch.float32, seed=seed)
        torch.testing.assert_close(kernel(**kwargs), reference(**kwargs), rtol=1e-4, atol=1e-5)
