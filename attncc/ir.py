"""The intermediate representation: a DAG of typed nodes over named index spaces.

A spec's statements become nodes. Each value node lives over an ordered tuple of
index names (`indices`); its extent along each index is the program-wide extent of
that index name (`Program.extent`), a sympy expression of the dims and params. A
statement's left-hand side names a *tensor*: a node plus the order of its axes.

Masks are program-wide restrictions of the index domain: `mask j <= i` removes the
pairs (i, j) where the predicate is false from every reduction, normalisation and
selection over `j` or `i` whose operand has both indices. Masked entries are
"absent": softmax gives them weight 0, sums skip them, selections never pick them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import networkx as nx
import sympy

from .errors import Loc, Source

FLOAT, INT, BOOL = "float", "int", "bool"

_ids = itertools.count()


@dataclass(eq=False)
class Node:
    """A value over an index space. `loc` points at the spec text that made it."""

    indices: tuple[str, ...] = field(default=(), kw_only=True)
    dtype: str = field(default=FLOAT, kw_only=True)
    loc: Loc | None = field(default=None, kw_only=True, repr=False)
    id: int = field(default_factory=lambda: next(_ids), kw_only=True, repr=False)

    def operands(self) -> tuple["Node", ...]:
        return ()

    @property
    def is_scalar(self) -> bool:
        return not self.indices


@dataclass(eq=False)
class Input(Node):
    """A tensor argument; an array that accesses read, not a value over indices."""

    name: str = ""
    dims: tuple[sympy.Expr, ...] = ()
    default: "Const | None" = None  # an optional input: its value everywhere when a call leaves it out
    broadcast: tuple[int, ...] = ()  # dims a call may pass with size 1: broadcast (stride 0)
    derived: dict[int, str] = field(default_factory=dict)  # dims computed from others: position -> spec text


@dataclass(eq=False)
class Scalar(Node):
    """A dim bound from input shapes, or a param passed at call time (with a default)."""

    name: str = ""
    role: str = "dim"  # "dim" or "param"
    default: Node | None = None

    def operands(self):
        return (self.default,) if self.default is not None else ()


@dataclass(eq=False)
class ParamGroup:
    """A param that a call passes as one argument but the program holds as int, float or bool
    scalar params, so no later stage needs to know it: a tuple param (`kernel: int[3]`, one
    scalar per entry, a single value broadcast to all) or an enum param (`mode: {shift, cut}`,
    one int scalar: the position of the chosen name)."""

    name: str
    scalars: tuple[Scalar, ...]
    choices: tuple[str, ...] = ()  # an enum param's names; empty for a tuple param
    loc: Loc | None = None

    @property
    def is_enum(self) -> bool:
        return bool(self.choices)

    def label(self, scalar: Scalar) -> str:
        """How messages name one of its scalars: `kernel[1]`, or the enum's own name."""
        return self.name if self.is_enum else f"{self.name}[{self.scalars.index(scalar)}]"

    def describe(self) -> str:
        if self.is_enum:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return "(" + ", ".join(s.dtype for s in self.scalars) + ")"


@dataclass(eq=False)
class Const(Node):
    value: int | float | bool = 0


@dataclass(eq=False)
class Index(Node):
    """The integer value of an index variable, e.g. `i` in `j - i`."""

    name: str = ""


@dataclass(eq=False)
class Access(Node):
    """`array[arg0, arg1, ...]`: a read at integer index expressions (a view or a gather)."""

    array: Node = None
    args: tuple[Node, ...] = ()
    axes: tuple[str, ...] = ()  # the axis names of `array` when it is a defined tensor

    def operands(self):
        return (self.array, *self.args)


@dataclass(eq=False)
class Map(Node):
    """An elementwise operation; operands broadcast over the union of their indices."""

    op: str = ""
    args: tuple[Node, ...] = ()

    def operands(self):
        return self.args


@dataclass(eq=False)
class Contract(Node):
    """`sum over (union of factor indices - indices) of the product of factors` (an einsum)."""

    factors: tuple[Node, ...] = ()

    def operands(self):
        return self.factors

    @property
    def summed(self) -> tuple[str, ...]:
        return tuple(ix for ix in union_indices(self.factors) if ix not in self.indices)


@dataclass(eq=False)
class Block:
    """Reduce `index` within consecutive blocks of `size`; the block number is index `name`."""

    index: str
    size: Node
    name: str


@dataclass(eq=False)
class Reduce(Node):
    """sum / mean / amax / amin / logsumexp of `arg` over `axes` (or within blocks)."""

    op: str = "sum"
    arg: Node = None
    axes: tuple[str, ...] = ()
    block: Block | None = None

    def operands(self):
        return (self.arg, self.block.size) if self.block else (self.arg,)


@dataclass(eq=False)
class Normalize(Node):
    """softmax (or softmax1: with a virtual zero logit) of `arg` along `axis`; `sink`: the
    logit of one more virtual entry (a learned attention sink), not over `axis`; `joint`:
    the other key sets (operand, axis) of a joint softmax (`p, ps = softmax(s, j, ss, c)`),
    whose entries share this one's denominator. Each set applies its own masks."""

    op: str = "softmax"
    arg: Node = None
    axis: str = ""
    sink: Node | None = None
    joint: tuple[tuple[Node, str], ...] = ()

    def operands(self):
        return (self.arg, *(x for x, _ in self.joint), *((self.sink,) if self.sink is not None else ()))

    def key_sets(self) -> tuple[tuple[Node, str], ...]:
        """Every (operand, axis) the denominator sums over, this node's own set first."""
        return ((self.arg, self.axis), *self.joint)


@dataclass(eq=False)
class Select(Node):
    """topk (values, zero elsewhere), topk_mask and topp_mask (booleans) along `axis`."""

    op: str = "topk"
    arg: Node = None
    amount: Node = None
    axis: str = ""

    def operands(self):
        return (self.arg, self.amount)


@dataclass(eq=False)
class Mask:
    """A program-wide domain restriction: entries where `pred` is false are absent."""

    pred: Node
    loc: Loc | None = None


@dataclass(eq=False)
class Output:
    name: str
    node: Node
    axes: tuple[str, ...]
    dims: tuple[sympy.Expr, ...]
    loc: Loc | None = None
    normalizer: Node | None = None  # a log-sum-exp side output: the softmax whose denominator it is


@dataclass(eq=False)
class Require:
    cond: Node
    text: str
    loc: Loc | None = None


@dataclass(eq=False)
class Program:
    """A checked spec: inputs, params, requirements, masks, outputs and the node graph."""

    name: str
    source: Source
    inputs: dict[str, Input]
    dims: dict[str, Scalar]
    params: dict[str, Scalar]
    requires: list[Require]
    masks: list[Mask]
    outputs: list[Output]
    extent: dict[str, sympy.Expr] = field(default_factory=dict)
    graph: nx.DiGraph = field(default_factory=nx.DiGraph, repr=False)
    groups: dict[str, ParamGroup] = field(default_factory=dict)  # tuple and enum params, by name

    def call_params(self) -> dict[str, "Scalar | ParamGroup"]:
        """The params as a call passes them, in declaration order: a tuple or enum param is
        one argument (its group), every other param its scalar."""
        owner = {s.name: g for g in self.groups.values() for s in g.scalars}
        out: dict[str, Scalar | ParamGroup] = {}
        for name, node in self.params.items():
            group = owner.get(name)
            out.setdefault(group.name if group else name, group or node)
        return out

    def param_label(self, name: str) -> str:
        """How messages name a scalar param: `kernel[1]` for an entry of a tuple param."""
        for group in self.groups.values():
            for s in group.scalars:
                if s.name == name:
                    return group.label(s)
        return name

    def nodes(self) -> list[Node]:
        """Every node in an order where operands come first."""
        return list(nx.topological_sort(self.graph))

    def masks_on(self, node: Node) -> list[Mask]:
        """The masks a reduction-like node applies: those over its operand's space that
        involve an axis it reduces, normalises or selects along."""
        along = reduced_axes(node)
        if not along:
            return []
        if isinstance(node, Normalize):  # its own key set only: each joint set has its masks
            return self.set_masks(node.arg, node.axis)
        space = set(union_indices(node.operands()))
        return [m for m in self.masks
                if set(m.pred.indices) <= space and set(m.pred.indices) & set(along)]

    def set_masks(self, arg: Node, axis: str) -> list[Mask]:
        """The masks of one key set of a softmax: those over its operand's space that
        involve its axis."""
        return [m for m in self.masks if set(m.pred.indices) <= set(arg.indices) and axis in m.pred.indices]

    def shape(self, node: Node) -> tuple[sympy.Expr, ...]:
        return tuple(self.extent[ix] for ix in node.indices)

    def sizes(self, scalars: dict) -> dict[str, int]:
        """Every index extent for the given dims and params (symbols match by name,
        whatever assumptions sympy attached to them)."""
        return {ix: int(e.xreplace({s: scalars[s.name] for s in e.free_symbols}))
                for ix, e in self.extent.items()}


def reduced_axes(node: Node) -> tuple[str, ...]:
    """The axes along which a node combines entries (where masks take effect)."""
    if isinstance(node, Contract):
        return node.summed
    if isinstance(node, Reduce):
        return node.axes
    if isinstance(node, (Normalize, Select)):
        return (node.axis,)
    return ()


def logaddexp(*terms: Node, loc: Loc | None = None) -> Node:
    """`log(sum_k exp(t_k))` of per-row values as elementwise nodes, stable (shifted by the
    largest) and -inf, not nan, when every term is -inf (a row with nothing allowed)."""
    def m(op, *args, dtype=FLOAT):
        ordered = sorted(args, key=lambda x: -len(x.indices))
        return Map(op=op, args=args, indices=union_indices(ordered), dtype=dtype, loc=loc)
    top = terms[0]
    for t in terms[1:]:
        top = m("max", top, t)
    shift = m("where", m("==", top, Const(value=-float("inf")), dtype=BOOL), Const(value=0.0), top)
    total = None
    for t in terms:
        e = m("exp", m("-", t, shift))
        total = e if total is None else m("+", total, e)
    return m("+", shift, m("log", total))


def union_indices(nodes) -> tuple[str, ...]:
    """The indices of several nodes, in order of first appearance."""
    seen: dict[str, None] = {}
    for n in nodes:
        for ix in n.indices:
            seen.setdefault(ix, None)
    return tuple(seen)


def build_graph(roots) -> nx.DiGraph:
    """The DAG of everything the roots depend on; edges run operand -> user."""
    graph = nx.DiGraph()
    stack, seen = list(roots), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        graph.add_node(node)
        for op in node.operands():
            stack.append(op)
            graph.add_edge(op, node)
    return graph
