"""The configs worth trying for one launch: tile sizes, warps, pipeline stages and plan
choices: for few queries the number of key splits, for grouped heads whether to pack
them into one tile, for masked specs whether full tiles skip the mask (the full/partial
tile split) or every tile is masked.

Configs that cannot run are pruned before any trial: those whose estimated shared
memory exceeds the GPU's, and tiles larger than the padded extent they tile (a
128-row tile over 4 queries only wastes registers). Pruned configs are never
measured; they are simply not in the space.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

H100_SHARED_MEMORY = 227 * 1024  # opt-in bytes per block (228 KiB per SM less 1 KiB reserved)
TILES = (16, 32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3, 4)
SPLITS = (1, 2, 4, 8, 16)
SPLIT_MAX_ROWS = 16  # splitting keys only pays when query tiles alone cannot fill the GPU


@dataclass(frozen=True)
class Space:
    """Categorical choices per config key, and what decides whether a config fits."""

    choices: dict[str, tuple[int, ...]]
    block_d: int          # padded head dims, as the launcher pads them
    block_e: int
    elem_bytes: int
    smem_limit: int
    default: dict | None = None  # the heuristic config the launcher uses untuned

    def shared_memory(self, config: dict) -> int:
        """Estimated bytes: the Q tile plus one K and one V tile per pipeline stage. The
        sm_90 compile of the dense kernel (`attncc.aot.compile_kernels`, bf16, D = E = 128)
        uses exactly this at 128x64/3, 128x128/2 and 64x64/4 stages; an older estimate
        counted the stages twice and pruned configs that fit, such as 128x128/3."""
        kv = config["BLOCK_N"] * (self.block_d + self.block_e) * config["num_stages"]
        return (config["BLOCK_M"] * self.block_d + kv) * self.elem_bytes

    def fits(self, config: dict) -> bool:
        return (all(config.get(k) in v for k, v in self.choices.items())
                and self.shared_memory(config) <= self.smem_limit)

    def configs(self) -> list[dict]:
        """Every config that fits, in a fixed order."""
        combos = (dict(zip(self.choices, values)) for values in itertools.product(*self.choices.values()))
        return [c for c in combos if self.fits(c)]


def build_space(n_rows: int, n_cols: int, d: int, e: int, dtype: torch.dtype,
                smem_limit: int = H100_SHARED_MEMORY, default: dict | None = None,
                plan_choices: dict | None = None) -> Space:
    """The space for `n_rows` queries, `n_cols` keys and head dims `d`, `e`. The
    default's values join the choices so that the untuned config is always a candidate
    (it is what speed-ups are measured against)."""
    from attncc.runtime import pow2

    choices = {"BLOCK_M": tuple(t for t in TILES if t <= pow2(n_rows)),
               "BLOCK_N": tuple(t for t in TILES if t <= pow2(n_cols)),
               "num_warps": WARPS, "num_stages": STAGES}
    if n_rows <= SPLIT_MAX_ROWS:
        choices["SPLIT_KV"] = SPLITS
    choices.update(plan_choices or {})
    if default is not None:
        default = {k: default.get(k, 1) for k in choices}  # SPLIT_KV absent means no split
        choices = {k: tuple(sorted({*v, default[k]})) for k, v in choices.items()}
    return Space(choices, pow2(d), pow2(e), torch.empty((), dtype=dtype).element_size(), smem_limit, default)


def launcher_space(launcher, call, smem_limit: int = H100_SHARED_MEMORY) -> Space:
    """The space of a row-streaming launcher for one bound call; its default is what
    the launcher runs with no config (the interpreter's tiles on CPU tensors, and the
    split heuristic's choice for few queries)."""
    from attncc.runtime import check_device, choose_splits, default_config, triton_cdiv

    p = launcher.plan
    sizes = p.program.sizes(call.scalars)
    n_rows, n_cols, d, e = sizes[p.i], sizes[p.j], sizes[p.d], sizes[p.e]
    default = default_config(check_device(call), d, e, len(p.terms))
    group = launcher.pack_group(call, default, n_rows)
    plan_choices = {}
    if p.group is not None:
        plan_choices["GQA_PACK"] = (False, True)
        default["GQA_PACK"] = group > 1
    if p.mask_plan is not None:
        plan_choices["FULL_MASKED"] = (False, True)
        default["FULL_MASKED"] = False
    if n_rows <= SPLIT_MAX_ROWS:  # the launcher's programs: query tiles (GQA heads packed) x outer
        programs = math.prod(sizes[ix] for ix in p.outer) // group * triton_cdiv(n_rows * group, default["BLOCK_M"])
        default["SPLIT_KV"] = choose_splits(n_rows, n_cols, programs, default, call.device)
    return build_space(n_rows, n_cols, d, e, call.tensors[p.q.input.name].dtype, smem_limit, default,
                       plan_choices)


def device_shared_memory(device: torch.device) -> int:
    """The opt-in shared memory per block of a CUDA device, else the H100 figure."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", H100_SHARED_MEMORY)
    return H100_SHARED_MEMORY
