"""Work accounting: key tiles a kernel visits against what a dense kernel and the mask need.

For given inputs and tile sizes it reports, summed over batch and heads:
- `dense`: every (query tile, key tile) pair, what a kernel without mask analysis visits;
- `minimum`: the pairs holding at least one allowed (query, key), from a brute-force
  evaluation of the spec's masks (the reference executor, one query tile at a time);
- `full`: the pairs where every in-bounds pair is allowed;
- `visited`: what the generated kernel visits, from the mask plan's symbolic bounds
  (affine masks) or the block map (other masks), or counted by the kernel itself.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .binding import BoundCall
from .reference import Chunk, Reference, align
from attncc.passes.mask_analysis import key_ranges
from attncc.passes.row_stream import RowStreamPlan


@dataclass
class TileWork:
    dense: int
    minimum: int
    full: int
    visited: int
    block_m: int
    block_n: int


def tile_states(plan: RowStreamPlan, call: BoundCall, block_m: int, block_n: int) -> np.ndarray:
    """Brute-force tile states (0 empty, 1 partial, 2 full) per outer combination:
    an array [outer combinations, query tiles, key tiles]."""
    ref = Reference(plan.program, call.tensors, call.scalars, block=block_m)
    ref.chunk_index = plan.i
    n, m = ref.size[plan.i], ref.size[plan.j]
    outer = plan.outer
    space = (*outer, plan.i, plan.j)
    n_k = math.ceil(m / block_n)
    pad = n_k * block_n - m
    states = []
    for start in range(0, n, block_m):
        ref.chunk, ref.local = Chunk(start, min(start + block_m, n)), {}
        allowed = torch.ones([1] * len(space), dtype=torch.bool)
        for mask in plan.masks:
            allowed = allowed & align(ref.value(mask.pred), mask.pred.indices, space).to(torch.bool)
        shape = [ref.size[ix] for ix in outer] + [ref.chunk.stop - ref.chunk.start, m]
        allowed = allowed.expand(shape).reshape(-1, shape[-2], m)
        inside = torch.ones_like(allowed)
        allowed = torch.nn.functional.pad(allowed, (0, pad)).reshape(allowed.shape[0], -1, n_k, block_n)
        inside = torch.nn.functional.pad(inside, (0, pad)).reshape(allowed.shape)
        any_ = allowed.any(-1).any(1)
        all_ = (allowed | ~inside).all(-1).all(1)
        states.append(torch.where(any_, torch.where(all_, 2, 1), 0))
    return torch.stack(states, dim=1).numpy()


def mask_tile_work(plan: RowStreamPlan, call: BoundCall, block_m: int, block_n: int) -> TileWork:
    """Work of a masked plan for these arguments (no kernel runs)."""
    ref = Reference(plan.program, call.tensors, call.scalars)
    n, m = ref.size[plan.i], ref.size[plan.j]
    n_q, n_k = math.ceil(n / block_m), math.ceil(m / block_n)
    combos = math.prod(ref.size[ix] for ix in plan.outer)
    dense = combos * n_q * n_k
    if plan.mask_plan is None:
        return TileWork(dense, dense, combos * n_q * (m // block_n), dense, block_m, block_n)
    states = tile_states(plan, call, block_m, block_n)
    minimum = int((states > 0).sum())
    full = int((states == 2).sum())
    if plan.needs_block_map:
        return TileWork(dense, minimum, full, minimum, block_m, block_n)
    visited = 0
    values = dict(call.scalars)
    symbol_values = {name: ref.full(node) if node.indices else ref.value(node)
                     for name, node in plan.mask_symbols.items()}
    for combo in itertools.product(*(range(ref.size[ix]) for ix in plan.outer)):
        at = dict(zip(plan.outer, combo))
        for name, node in plan.mask_symbols.items():
            v = symbol_values[name]
            values[name] = int(v[tuple(at[ix] for ix in node.indices)]) if node.indices else int(v)
        values[str(plan.mask_plan.n)], values[str(plan.mask_plan.m)] = n, m
        spans = key_ranges(plan.mask_plan, n, m, block_m, block_n, values)
        visited += sum(min(stop, n_k) - start for tile in spans for start, stop in tile if start < n_k)
    return TileWork(dense, minimum, full, visited, block_m, block_n)


def measured_tile_work(kernel, kwargs: dict, block_m: int, block_n: int) -> TileWork:
    """Work counted by the generated kernel itself (COUNT_TILES), next to the brute force."""
    from .binding import bind

    call = bind(kernel.program, kwargs)
    launcher = kernel.generated.launcher
    launcher(call, False, {"BLOCK_M": block_m, "BLOCK_N": block_n}, count_tiles=True)
    counted = launcher.last_tile_counts
    analysed = mask_tile_work(kernel.generated.plan, call, block_m, block_n)
    analysed.visited = counted["full"] + counted["partial"]
    return analysed

