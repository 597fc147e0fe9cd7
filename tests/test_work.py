"""Work accounting: the generated kernels visit exactly the key tiles the mask needs.

The kernels count the tiles they visit (COUNT_TILES) while running in the interpreter;
the minimum comes from a brute-force evaluation of the masks. For masks with symbolic
bounds (causal, windows, sinks, prefix) and for runtime block maps, visited == minimum.
"""
import pytest
import torch

import attncc
from attncc.binding import bind
from attncc.work import mask_tile_work, measured_tile_work
from oracles.inputs import SQUARE, make_inputs

CASES = [
    ("causal", dict(N=70, M=90), 16, 16),
    ("causal", dict(N=90, M=50), 16, 32),
    ("sliding_window", dict(N=100), 16, 16),
    ("sink_window", dict(N=100), 16, 16),
    ("sink_window", dict(N=96), 32, 16),
    ("prefix_lm", dict(N=80), 16, 16),
    ("gqa_causal", dict(N=50, M=50, H=4, G=2), 16, 16),
    ("document", dict(N=80), 16, 16),
    ("neighborhood_2d", dict(N=80), 16, 16),
    ("key_padding", dict(N=40, M=70), 16, 16),
]


def inputs(name, shape):
    shape = dict(shape)
    if name in SQUARE:
        shape["M"] = None
    extra = {"empty_rows": True} if name == "key_padding" else {}  # a fully padded batch row
    return make_inputs(name, B=2, D=16, E=16, dtype=torch.float32, **{"H": 2, **shape}, **extra)


@pytest.mark.parametrize("name,shape,bm,bn", CASES)
def test_visited_tiles_equal_the_minimum(name, shape, bm, bn):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    work = measured_tile_work(kernel, inputs(name, shape), bm, bn)
    assert work.minimum < work.dense, "the case should have empty tiles to skip"
    assert work.visited == work.minimum


@pytest.mark.parametrize("name,shape,bm,bn", CASES)
def test_analytic_count_matches_the_kernel(name, shape, bm, bn):
    kernel = attncc.compile(f"examples/{name}.attn", backend="triton")
    kwargs = inputs(name, shape)
    measured = measured_tile_work(kernel, kwargs, bm, bn)
    analytic = mask_tile_work(kernel.generated.plan, bind(kernel.program, kwargs), bm, bn)
    assert analytic.visited == measured.visited


def test_dense_visits_every_tile():
    kernel = attncc.compile("examples/dense.attn", backend="triton")
    work = measured_tile_work(kernel, inputs("dense", dict(N=40, M=50)), 16, 16)
    assert work.visited == work.dense == 2 * 2 * 3 * 4
