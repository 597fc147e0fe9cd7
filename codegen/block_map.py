"""Runtime block maps for masks the symbolic analysis cannot decide.

Masks that read tensors (document ids, label tables, padding) or use div/mod and
geometry (neighbourhoods, criss-cross, epipolar lines) are classified at run time:
a generated Triton kernel evaluates the spec's predicate on every (query tile, key
tile) pair and records EMPTY, PARTIAL or FULL; a few torch ops then turn the map
into per-query-tile lists of key tiles, full tiles first. The attention kernel walks
those lists, evaluating the predicate only on partial tiles. Maps are cached and
reused while the tensors they read, the scalars and the tile sizes are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc import ir
from attncc.codegen import names
from attncc.codegen.tile_expr import TileEmitter, Val
from attncc.passes.row_stream import RowStreamPlan, map_outer

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass
class BlockMapSource:
    """What the launcher needs to call `{name}_classify`."""

    tensor_inputs: list[str]
    scalar_args: list[str]
    host_scalars: dict


def generate(plan: RowStreamPlan, name: str):
    """Source of the classification kernel `{name}_classify` (`name`: the module's kernel
    prefix), the input tensors it reads, the host scalars it needs and its scalar argument
    names."""
    from attncc.codegen.row_stream import scalar_args, tensor_args

    env = {plan.i: Val("offs_m[:, None]", frozenset("m"), ir.INT),
           plan.j: Val("offs_n[None, :]", frozenset("n"), ir.INT)}
    outer = map_outer(plan)
    for ix in outer:
        env[ix] = Val(names.user("idx", ix), frozenset(), ir.INT)
    em = TileEmitter(plan.program, env)
    em.in_bounds = {plan.i, plan.j}
    em.materialized = dict(plan.precomputed.inputs) if plan.precomputed else {}
    preds = [em.emit(m.pred) for m in plan.masks]
    tensors = list(em.tensors)
    scalars = scalar_args(plan.program, em.host_scalars)
    strides, sizes = tensor_args(em.tensors)
    args = ([names.tensor("ptr", t) for t in tensors] + ["map_ptr"] + strides + sizes
            + [names.user("size", ix) for ix in outer] + ["n_rows", "n_cols", "n_qtiles", "n_ktiles"] + scalars)
    decode = ["pid_o = tl.program_id(2).to(tl.int64)"]
    for ix in reversed(outer):
        size = names.user("size", ix)
        decode += [f"{names.user('idx', ix)} = pid_o % {size}", f"pid_o = pid_o // {size}"]
    allowed = " & ".join(f"({p.code})" for p in preds)
    lines = [
        "@triton.jit",
        f"def {name}_classify({', '.join(args)}, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        '    """EMPTY (0), PARTIAL (1) or FULL (2) for one (query tile, key tile) pair."""',
        "    pid_m = tl.program_id(0)",
        "    pid_n = tl.program_id(1)",
        *("    " + ln for ln in decode),
        "    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
        "    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
        *("    " + ln for ln in em.prologue + em.body),
        "    inside = (offs_m[:, None] < n_rows) & (offs_n[None, :] < n_cols)",
        f"    allowed = ({allowed}) & inside",
        "    any_allowed = tl.max(allowed.to(tl.int32))",
        "    all_allowed = tl.min((allowed | (inside == 0)).to(tl.int32))",
        "    # a full tile skips all masking, key bounds included: only whole key tiles qualify",
        "    whole = (pid_n + 1) * BLOCK_N <= n_cols",
        "    state = tl.where(any_allowed == 0, 0, tl.where((all_allowed == 1) & whole, 2, 1))",
        "    tl.store(map_ptr + (pid_o_list * n_qtiles + pid_m) * n_ktiles + pid_n, state.to(tl.int8))",
    ]
    flat = " + ".join(f"{names.user('idx', ix)} * {_stride(outer, k)}" for k, ix in enumerate(outer)) or "0"
    lines.insert(len(lines) - 1, f"    pid_o_list = {flat}")
    return "\n".join(lines), tensors, dict(em.host_scalars), scalars


def _stride(outer, k):
    rest = outer[k + 1:]
    return " * ".join(names.user("size", ix) for ix in rest) or "1"


def tile_lists(state: torch.Tensor):
    """Per query tile: key tiles ordered full first, then partial (empty ones last and
    uncounted), with the number of full and of non-empty tiles."""
    n_k = state.shape[-1]
    tiles = torch.arange(n_k, device=state.device, dtype=torch.int32)
    rank = torch.where(state == FULL, 0, torch.where(state == PARTIAL, 1, 2)).to(torch.int32)
    order = torch.argsort(rank * n_k + tiles, dim=-1, stable=True)
    kv_list = order.to(torch.int32).contiguous()
    kv_full = (state == FULL).sum(-1).to(torch.int32).contiguous()
    kv_count = (state != EMPTY).sum(-1).to(torch.int32).contiguous()
    return kv_list, kv_full, kv_count
