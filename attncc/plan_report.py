"""`attncc show --stage plan`: the Triton kernel plan of a spec, as text a person can check.

The report says how the spec was matched onto the row-streaming skeleton (which tensors
are Q, K and V, which indices are queries, keys, features and grid), which weights
(softmax, softmax1, pointwise) the scores feed and how the scores are computed, how the
masks were analysed (the symbolic key ranges the kernel computes, or why it needs a
runtime block map), and how many (query tile, key tile) pairs a launch visits against a
dense kernel and against the brute-force minimum. Everything printed is
derived from the plan, in a fixed order, so the text can serve as a snapshot.
"""
from __future__ import annotations

import math
import textwrap

import sympy

from . import ir
from .binding import bind
from .call_params import collapse
from .printer import _ASSIGNMENT, _INFIX, _IrPrinter, _columns, _leaf
from .random_inputs import random_arguments
from .runtime import default_config, split_count
from .work import mask_tile_work
from attncc.passes.kinds import MaskMode, WeightKind
from attncc.passes.mask_sympy import GENERATED, code_name
from attncc.passes.row_stream import RowStreamPlan, map_outer
from attncc.passes.streams import StreamPlan

_LEAVES = (ir.Const, ir.Index, ir.Scalar, ir.Input)
_WIDTH = 92
_H100_SMS = 132  # the SM count the decoding note assumes (the plan is printed without a GPU)

_KINDS = {
    WeightKind.SOFTMAX: "softmax along {j}: an online softmax (running max and sum per query row)",
    WeightKind.SOFTMAX1: "softmax1 along {j}: an online softmax with a virtual zero logit",
    WeightKind.POINTWISE: "pointwise: the weight is the score itself, nothing normalises along {j}",
}
_MASK_MODES = {
    MaskMode.NONE: "every key tile is visited; only a ragged last key tile is masked (key bounds)",
    MaskMode.AFFINE: "each query tile computes its key-tile range from the symbolic bounds below; "
              "tiles inside the full range run without evaluating the mask",
    MaskMode.BLOCK_MAP: "a classification kernel evaluates the masks on every (query tile, key tile) "
                 "pair at run time; each query tile walks its list of non-empty key tiles, "
                 "full ones without evaluating the mask",
}


def format_plan(kernel, shape: dict | None = None, params: dict | None = None,
                block_m: int = 64, block_n: int = 64) -> str:
    """The plan of a kernel compiled with backend='triton', and the tile work of one call
    with sizes from `shape` and `params` (the rest: `random_arguments`' small defaults)."""
    if isinstance(kernel.generated.plan, StreamPlan):  # the general planner's passes
        plan = kernel.generated.plan
        skipping = sum(p.mask_plan is not None for p in plan.passes)
        return (f"plan {kernel.program.name}  # {kernel.program.source.filename}\n"
                f"skeleton: general streaming (passes of accumulators; docs/codegen.md section 9)\n"
                f"{plan.describe()}\n"
                f"work: {len(plan.passes)} pass(es), each over its grid x row tiles, streaming its index in tiles; "
                f"{skipping} of them skip the tiles their masks rule out (the hull of the sympy key ranges)\n")
    return _PlanText(kernel).render(shape, params, block_m, block_n)


class _PlanText:
    """The report's sections; `names` lets nodes that a statement names print as that name."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.plan: RowStreamPlan = kernel.generated.plan
        self.program = kernel.program
        self.names = self.statement_names()

    def render(self, shape, params, block_m, block_n) -> str:
        p = self.plan
        out = [f"plan {self.program.name}  # {self.program.source.filename}", "skeleton: row streaming",
               *_wrap(f"a FlashAttention-style forward: one program per query tile (along {p.i}) and per "
                      f"({', '.join(p.outer) or 'nothing else'}) loads its queries once and streams key "
                      f"tiles (along {p.j}), accumulating weights times values (an online softmax for "
                      "softmax weights)")]
        out += self.roles() + self.weights() + self.masks() + self.work(shape, params, block_m, block_n)
        return "\n".join(out) + "\n"

    # ------------------------------------------------------------------------- sections
    def roles(self) -> list[str]:
        p, ext = self.plan, self.program.extent
        tensors = []
        for n, t in enumerate(p.terms):
            term = f" (term {n})" if len(p.terms) > 1 else ""
            tensors += [[f"queries{term}", self.text(t.q.access), f"rows {p.i}, features {p.d}"],
                        [f"keys{term}", self.text(t.k.access), f"rows {p.j}, features {p.d}"]]
        tensors += [["values", self.text(p.v.access), f"rows {p.j}, features {p.e}"],
                    ["output", f"{p.output.name}[{', '.join(p.output.axes)}]", f"rows {p.i}, features {p.e}"]]
        indices = [["query", p.i, str(ext[p.i]), "rows of a tile: grid axis 0"],
                   ["key", p.j, str(ext[p.j]), "streamed in tiles: the axis the weights sum over"],
                   ["feature", p.d, str(ext[p.d]), "summed by Q K^T"],
                   ["value feature", p.e, str(ext[p.e]), "columns of V and of the output"]]
        if p.outer:
            indices.append(["outer", ", ".join(p.outer), ", ".join(str(ext[ix]) for ix in p.outer),
                            "one program per combination: grid axis 1"])
        out = ["roles:", *_columns(tensors), "indices:", *_columns(indices)]
        if p.group:
            h, heads = p.group
            out += _wrap(f"grouped heads: query head {h} reads K/V head {h} // {self.text(heads)}; for few "
                         f"queries (decoding) the {self.text(heads)} heads sharing a K/V head are packed "
                         "into the rows of one tile, so each K/V tile is loaded once for all of them")
        return out

    def weights(self) -> list[str]:
        p = self.plan
        count = "1 term" if len(p.terms) == 1 else f"{len(p.terms)} terms"
        out = [f"weights: {count}, each `coefficient * weight(score)` times the values, summed"]
        for n, t in enumerate(p.terms):
            out.append(f"  term {n}: {_KINDS[t.kind].format(j=p.j)}")
            if t.coef is not None:
                out.append(f"    coefficient: {self.text(t.coef)}")
            if t.sink is not None and t.kind == WeightKind.SOFTMAX:
                out.append(f"    sink logit {self.text(t.sink)}: a virtual key of value 0; the running max and sum "
                           "start from it, the log-sum-exp includes it")
            log2e = " (times log2(e), for exp2)" if t.folds_log2e else ""
            scale = " * ".join(self.text(f) for f in t.scale)
            out.append(f"    Q K^T over {p.d}; " + (f"the scale {scale} is folded into the queries once{log2e}"
                                                       if scale else f"no scalar factor to fold{log2e}"))
            if t.qk_factors:
                out.append("    non-scalar factors of Q K^T, multiplied per tile:")
                out += self.spec_lines(self.computing(t.qk_factors), indent=6)
            mods = self.computing([t.score]) - self.computing([t.qk])
            if mods:
                out.append("    modifications, computed per tile before the masks:")
                out += self.spec_lines(mods, indent=6)
            elif not t.qk_factors:
                out.append("    modifications: none")
            graph = self.program.graph
            norms = [u for u in graph.successors(t.score) if isinstance(u, ir.Normalize)] if t.score in graph else []
            if t.kind != WeightKind.POINTWISE and norms:
                out += self.spec_lines(norms, indent=4)
        lse = "yes" if p.has_lse else "no, it needs one plain softmax"
        out.append(f"  log-sum-exp output (return_lse): {lse}")
        if p.summed_outer:
            out += _wrap(f"  summed over {', '.join(p.summed_outer)} inside each program (a loop in the epilogue); "
                         "an index value whose coefficient is 0 on every row of a tile skips its key loop")
        if p.row_sum:
            switch = p.row_sum_switch
            when = "" if switch is None else f", when `{getattr(switch, 'name', 'its scalar condition')}` holds"
            out.append(f"  divided by the row sums of the weights, kept next to the accumulator{when}")
        return out + self.precomputed()

    def precomputed(self) -> list[str]:
        """What the kernel reads but does not compute, and how it is computed first."""
        pre = self.plan.precomputed
        if pre is None or not pre.inputs:
            return []
        stats = self.kernel.generated.source.statistics
        out = ["computed before the launch, read by the kernel as tensors:"]
        for node, synthetic in pre.inputs.items():
            axes = ", ".join(pre.axes[node])
            how = (f"a generated statistics pass, {stats[node][1].name}_fwd (streams {node.axes[0]}, keeps the "
                   "log-sum-exp only)" if node in stats else "the reference executor's torch ops")
            what = self.text(node) if node in self.program.graph else f"the log-sum-exp of the scores along {node.axes[0]}"
            out += _wrap(f"{synthetic.name}[{axes}] = {what}, by {how}")
        return out

    def masks(self) -> list[str]:
        p, mp = self.plan, self.plan.mask_plan
        mode = self.kernel.generated.source.mask_mode
        out = [f"masks: mode {mode}", *_wrap(_MASK_MODES[mode])]
        if not p.masks:
            return out
        out += self.spec_lines(p.masks)
        out += [f"  {code_name(name)} = {self.text(node)}  (loaded once per program)"
                for name, node in p.mask_symbols.items()]
        out += [f"  {name} = {text}" for name, text in self.opaque_names().items()]
        if mode == MaskMode.AFFINE:
            out += _wrap(f"per query tile {mp.i0} <= {mp.i} <= {mp.i1}, each conjunct of the mask's DNF gives "
                         "the keys the kernel visits (lo .. hi) and those it runs without the mask "
                         "(flo .. fhi); guards switch a conjunct on or off:")
        else:
            out.append("  the mask's DNF (the block map, not these bounds, picks the key tiles):")
        # sorted: the analysis' DNF order depends on Python's hash seed, this text must not
        for n, (head, rows) in enumerate(sorted(self.conjunct(c) for c in mp.conjuncts)):
            out += [f"  conjunct {n}: {head}", *("  " + line for line in _columns(rows))]
        if not mp.conjuncts:
            out.append("  no conjunct can hold: the mask allows nothing")
        if mp.opaque:
            per = f"one per ({', '.join(map_outer(p))})" if map_outer(p) else "one for the whole launch"
            out += _wrap(f"opaque atoms are not affine in {mp.i}, {mp.j}: they leave tiles undecided, so a "
                         f"runtime block map is built ({per})")
        return out

    def conjunct(self, c) -> tuple[str, list[list[str]]]:
        """A conjunct's half-planes, and its guards, row range, key ranges and opaque atoms."""
        mp = self.plan.mask_plan
        planes = sorted(_shown(sympy.Ge(h.a * mp.i + h.b * mp.j, h.rhs)) for h in c.planes)
        rows = [["guards", ", ".join(sorted(map(_shown, c.guards))) or "none"],
                ["rows", f"{_shown(c.row_lo)} .. {_shown(c.row_hi)}"],
                ["lo .. hi", f"{_shown(c.lo)} .. {_shown(c.hi)}"],
                ["flo .. fhi", f"{_shown(c.flo)} .. {_shown(c.fhi)}" if not c.opaque else "none: opaque atoms"]]
        rows += [["opaque" if k == 0 else "", atom] for k, atom in enumerate(sorted(map(_shown, c.opaque)))]
        return " and ".join(planes) or "no affine constraint", rows

    def work(self, shape, params, block_m: int, block_n: int) -> list[str]:
        p, program = self.plan, self.program
        try:
            call = bind(program, random_arguments(program, shape, params))
        except ValueError as why:
            if shape or params:
                raise
            return ["work: not counted with the default sizes", *_wrap(str(why))]
        w = mask_tile_work(p, call, block_m, block_n)
        size = self.kernel.program.sizes(call.scalars)
        values = {**{name: call.scalars[name] for name in program.dims}, **collapse(program, call.scalars)}
        bound = " ".join(f"{name}={value}".replace(" ", "") for name, value in values.items())
        gpu, interp = (default_config(on, size[p.d], size[p.e]) for on in (False, True))
        header = ["dense", "minimum", "full", "visited", "visited/minimum", "visited/dense"]
        cells = [w.dense, w.minimum, w.full, w.visited, _ratio(w.visited, w.minimum), _ratio(w.visited, w.dense)]
        programs = math.prod(size[ix] for ix in p.outer) * -(-size[p.i] // gpu["BLOCK_M"])
        splits = split_count(size[p.i], size[p.j], programs, gpu["BLOCK_N"], _H100_SMS) if p.has_lse else 1
        decoding = (_wrap(f"decoding: {size[p.i]} queries and {size[p.j]} keys: on a GPU with {_H100_SMS} SMs "
                          f"(an H100) the keys are split into {splits} parts run in parallel and merged by "
                          "log-sum-exp (split-KV)") if splits > 1 else [])
        return [f"work: {bound}",
                f"  tiles {block_m}x{block_n} (BLOCK_M x BLOCK_N), summed over "
                f"{math.prod(size[ix] for ix in p.outer)} ({', '.join(p.outer)}) combination(s)",
                *_columns([header, [str(c).rjust(len(h)) for c, h in zip(cells, header)]]),
                *_wrap("counts of (query tile, key tile) pairs: dense = all of them; minimum = those "
                       "with an allowed entry; full = those with every entry allowed; visited = those "
                       f"the kernel walks. Launches default to {gpu['BLOCK_M']}x{gpu['BLOCK_N']} tiles on "
                       f"a GPU for these head dims, {interp['BLOCK_M']}x{interp['BLOCK_N']} in the "
                       "interpreter"), *decoding]

    # ------------------------------------------------------------------------- helpers
    def statement_names(self) -> dict[ir.Node, str]:
        """Nodes a statement names (`lx[b,i,j] = ...`, `let R = ...`): printed by name."""
        printer = _IrPrinter(self.program)
        names = {}
        for node in printer.statement_roots():
            named = _ASSIGNMENT.match(printer.source(node.loc.line)) if node.loc else None
            if named:
                names[node] = named.group(1)
        return names

    def text(self, node: ir.Node, nested: bool = False) -> str:
        """A node in the spec's syntax: `k[b, h // R, j, d]`, `D ** -0.5`, `doc[b, i]`."""
        if node in self.names:
            return self.names[node]
        if isinstance(node, ir.Access):
            return f"{self.text(node.array)}[{', '.join(self.text(a) for a in node.args)}]"
        if isinstance(node, ir.Const):
            return _leaf(node)
        if isinstance(node, _LEAVES):
            return node.name
        if isinstance(node, ir.Map):
            args = [self.text(a, nested=True) for a in node.args]
            if node.op in _INFIX and len(args) == 2:
                return f"({args[0]} {node.op} {args[1]})" if nested else f"{args[0]} {node.op} {args[1]}"
            if node.op in ("neg", "not"):
                return ("-" if node.op == "neg" else "not ") + args[0]
            return f"{node.op}({', '.join(args)})"
        return f"<{type(node).__name__} on line {node.loc.line}>" if node.loc else f"<{type(node).__name__}>"

    def opaque_names(self) -> dict[str, str]:
        """What the analysis' opaque functions (`opaque0(i)`) stand for."""
        return {code_name(name): self.text(node) for name, node in self.plan.opaque.items()}

    def computing(self, nodes) -> set[ir.Node]:
        """The non-leaf nodes that compute `nodes` (themselves included); param defaults,
        behind their leaf, are not part of it."""
        found, stack = set(), list(nodes)
        while stack:
            node = stack.pop()
            if node not in found and not isinstance(node, _LEAVES):
                found.add(node)
                stack.extend(node.operands())
        return found

    def spec_lines(self, items, indent: int = 4) -> list[str]:
        """The spec lines that made `items` (nodes or masks), in order, without comments."""
        return [f"{' ' * indent}line {n}: {self.program.source.line(n).split('#')[0].strip()}"
                for n in sorted({x.loc.line for x in items if x.loc})]


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent="  ", subsequent_indent="  ")


def _shown(expr) -> str:
    """A plan expression as text, the symbols the analysis made up under their kernel names."""
    return str(expr).replace(GENERATED, "")
