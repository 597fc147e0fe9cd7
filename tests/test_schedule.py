"""Longest-first scheduling: when the mask plan says later query rows visit more key tiles
(causal, prefix-LM), the kernel hands out query tiles last-first across all (batch, head)
pairs, so the longest programs start in the first wave and short ones fill the tail. The
mapping is a permutation of the grid: outputs are unchanged (checked in the interpreter)."""
import pytest
import torch

import attncc
from attncc.binding import bind
from attncc.passes.mask_analysis import longest_first
from oracles.inputs import SQUARE, make_inputs


@pytest.mark.parametrize("name,expected", [
    ("causal", True), ("gqa_causal", True), ("prefix_lm", True), ("alibi", True),
    ("dense", False), ("sliding_window", False), ("sink_window", False), ("reversed", False),
])
def test_which_masks_run_longest_first(name, expected):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    plan, source = kernel.generated.plan, kernel.generated.source
    assert longest_first(plan.mask_plan) is expected
    assert ("pid_m = n_qt - 1 - pid_x % n_qt" in source.source) is expected


def test_block_map_kernels_keep_the_grid_order():
    kernel = attncc.compile("examples/document.attn", backend="triton")
    assert "pid_m = n_qt - 1" not in kernel.generated.source.source


@pytest.mark.parametrize("name,shape,config", [
    ("causal", dict(N=45, M=37), {}),
    ("causal", dict(N=37, M=45), {"USE_TMA": True}),
    ("prefix_lm", dict(N=45), {}),
    ("gqa_causal", dict(N=37, M=45, H=8, G=2), {"GQA_PACK": True, "BLOCK_M": 32}),
    ("causal", dict(N=5, M=90), {"SPLIT_KV": 3}),
])
def test_longest_first_matches_reference(name, shape, config):
    s = {"B": 2, "H": 3, "D": 16, "E": 12, **shape}
    if name in SQUARE:
        s["M"] = None
    kwargs = make_inputs(name, dtype=torch.float32, **s)
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    ref = attncc.compile(f"examples/{name}.attn", backend="reference")
    launcher = kernel.generated.launcher
    o, lse = launcher(bind(kernel.program, kwargs), True, config, count_tiles=True)
    ro, rlse = ref(**kwargs, return_lse=True)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=1e-5)
