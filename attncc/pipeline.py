"""The compilation pipeline, as one list of named stages.

    ast ──> ir ──> plan ──> triton

`attncc.load` runs the first two, `attncc.compile` all four, `attncc show --stage NAME` stops
at NAME and prints its result, and tests call the stages by name. Each stage is a plain
function of the previous stage's result:

- `ast`: `syntax.parse` (lark), a spec's text to its syntax tree with positions;
- `ir`: `frontend.lower` then `passes.infer.infer_extents`, the checked `ir.Program`;
- `plan`: the first rule that plans the program: the fused row-streaming skeleton
  (`passes.row_stream`, one FlashAttention-style kernel), else the general streaming planner
  (`passes.streams`, passes of typed accumulators); `NotRowStreamable` says why neither did;
- `triton`: the Triton module's text for the plan (`codegen.row_stream` or
  `codegen.stream_kernel`), with what its launcher needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import ir
from .frontend import lower
from .syntax import parse
from attncc.codegen.tile_expr import Unsupported
from attncc.passes.infer import infer_extents
from attncc.passes.read_guards import check_static
from attncc.passes.row_stream import NotRowStreamable, RowStreamPlan, plan_row_stream


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable
    what: str


def checked_program(tree) -> ir.Program:
    return check_static(infer_extents(lower(tree)))


def plan(program: ir.Program):
    """The plan of a program: the fused skeleton when it takes the program, else the general
    streaming plan."""
    from attncc.passes.streams import plan_streams

    try:
        if len(program.outputs) > 1:
            raise NotRowStreamable("several outputs")
        return plan_row_stream(program, switches=True)
    except NotRowStreamable as fused_why:
        try:
            return plan_streams(program)
        except NotRowStreamable as why:
            raise NotRowStreamable(f"{why} (and the fused skeleton: {fused_why})") from None


def triton_source(plan):
    """The generated module of a plan (`KernelSource` or `StreamSource`)."""
    from attncc.codegen.row_stream import generate_module
    from attncc.codegen.stream_kernel import generate_streams

    if isinstance(plan, RowStreamPlan):
        return generate_module(plan, plan.program.name)
    try:
        return generate_streams(plan, plan.program.name)
    except Unsupported as why:
        raise NotRowStreamable(str(why)) from None


def launcher(plan, source):
    """What runs a plan's kernels for a bound call."""
    from .runtime import RowStreamLauncher
    from .stream_runtime import StreamLauncher

    return RowStreamLauncher(plan, source) if isinstance(plan, RowStreamPlan) else StreamLauncher(plan, source)


STAGES = (
    Stage("ast", lambda text_and_name: parse(*text_and_name), "the syntax tree (lark)"),
    Stage("ir", checked_program, "the checked IR program, every extent inferred"),
    Stage("plan", plan, "the plan: fused row streaming, or the general streaming passes"),
    Stage("triton", triton_source, "the generated Triton module"),
)
NAMES = tuple(s.name for s in STAGES)


def run(text: str, filename: str, until: str = "triton"):
    """The result of every stage up to `until`, by stage name."""
    if until not in NAMES:
        raise ValueError(f"unknown stage '{until}'; the stages are {', '.join(NAMES)}")
    results, value = {}, (text, filename)
    for stage in STAGES:
        value = stage.run(value)
        results[stage.name] = value
        if stage.name == until:
            break
    return results
