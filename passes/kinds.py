"""The kinds the planner decides between, as enums: one place lists each choice.

Each is a `str`-valued enum whose value is what users see (`kernel.last_run`, `attncc show
--stage plan`, the generated module's docstring, the static report), and a member prints as
that value (`f"{MaskMode.BLOCK_MAP}"` is `block_map`) and equals it (`LaunchPath.CHUNKED ==
"chunked"`), so text shown before these enums existed reads the same.

- `WeightKind`: how a weight term of a row-streaming plan normalises (`Term.kind`).
- `MaskMode`: how a row-streaming kernel finds the key tiles of a query tile
  (`RowStreamPlan.mask_mode`, `KernelSource.mask_mode`).
- `LaunchPath`: which kernels a call of a row-streaming plan runs
  (`passes.linear.choose_path`, `RowStreamLauncher.last_path`).
- `KernelRole`: what one kernel launch of a call does (`runtime.KernelLaunch.role`).
- `ReadMode`: how the generated backward accumulates the gradient of a float tensor the score
  reads (`passes.backward.ReadGradient.mode`).

Adding a skeleton (a new kernel kind) adds its members here; see docs/contributing.md.
"""
from __future__ import annotations

import enum


class ShownEnum(str, enum.Enum):
    """A string enum that prints as its value (what `enum.StrEnum` does from Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class WeightKind(ShownEnum):
    """A weight term's normaliser along the keys."""

    SOFTMAX = "softmax"      # an online softmax: running max and sum per row
    SOFTMAX1 = "softmax1"    # the same with a virtual zero logit (max starts at 0, sum at 1)
    POINTWISE = "pointwise"  # an elementwise weight (a sigmoid, linear attention): no normaliser


class MaskMode(ShownEnum):
    """How a row-streaming kernel finds the key tiles a query tile visits."""

    NONE = "none"            # no mask: every key tile, only a ragged last one is masked
    AFFINE = "affine"        # symbolic per-tile key ranges from the mask analysis
    BLOCK_MAP = "block_map"  # a runtime block map lists each query tile's non-empty key tiles


class LaunchPath(ShownEnum):
    """The kernels one call of a row-streaming plan runs."""

    ROW_STREAMING = "row streaming"  # the row-streaming kernel (any plan, any call)
    REASSOCIATED = "reassociated"    # linear attention f(Q) (f(K)^T V): state, then apply kernel
    CHUNKED = "chunked"              # causal linear attention: the chunked scan with a carried state
    GENERAL = "general streaming"    # the passes of a general streaming plan (passes/streams.py)


class KernelRole(ShownEnum):
    """What one kernel launch does."""

    MAIN = "main"                  # the row-streaming kernel
    PACKED = "packed"              # its GQA-packed variant
    STATS = "stats"                # a statistics pass (log-sum-exp of a softmax along another axis)
    CLASSIFY = "classify"          # the block-map classifier
    LINEAR_STATE = "linear_state"  # reassociated linear attention: the per-(batch, head) state
    LINEAR_APPLY = "linear_apply"  # reassociated linear attention: o = f(q) S
    CHUNKED = "chunked"            # the chunked causal scan
    STREAM_PASS = "stream pass"    # one pass of a general streaming plan
    BWD_PRE = "bwd_pre"            # backward: delta = rowsum(dO * O) - dLSE per query row
    BWD_DKDV = "bwd_dkdv"          # backward: dK and dV, one program per key tile
    BWD_DQ = "bwd_dq"              # backward: dQ, one program per query tile
    BWD_ROWS = "bwd_rows"          # general plan backward: a pass's gradients over its rows, one program per row tile
    BWD_STREAM = "bwd_stream"      # general plan backward: a pass's gradients over its streamed index, per streamed tile


class ReadMode(ShownEnum):
    """How the generated backward accumulates the gradient of one float read in the score
    (`passes.backward.ReadGradient.mode`): by what the read's index expressions depend on."""

    ROWS = "rows"        # not on the key index: summed along each query row (dQ kernel), one slot per row
    COLS = "cols"        # not on the query index: summed along each key column (dK/dV kernel)
    TILE = "tile"        # at the bare query and key index: one slot per (query, key) pair (dQ kernel)
    SCATTER = "scatter"  # gathered at expressions of both (a relative-position table): scattered (dQ kernel)
