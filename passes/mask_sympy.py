"""Attention masks as sympy predicates, for the symbolic mask analysis.

Integer arithmetic of the tile indices, dims and params stays symbolic; a read that depends
only on the outer indices (`prefix[b]`) becomes a symbol the kernel loads once per program;
anything else (tensor lookups that depend on the tile indices, div/mod neighbourhoods,
geometry) becomes an opaque function, which the analysis treats as unknown.
"""
from __future__ import annotations

import sympy

from attncc import ir
from attncc.passes.infer import to_sympy
from attncc.passes.mask_analysis import MaskTooComplex, analyse_mask



GENERATED = "$"  # starts the sympy names attncc makes up: no spec name can, so none can equal a user's


def generated_symbol(name: str) -> str:
    """The sympy name of a symbol the analysis makes up (a loaded scalar, an opaque atom).
    Sympy identifies symbols by name and assumptions, so a plain `mask_scalar0` would be the
    very symbol of a user's int param `mask_scalar0`; `code_name` gives its kernel identifier."""
    return GENERATED + name


def code_name(symbol_name: str) -> str:
    """The identifier generated code uses for a made-up symbol (its name without the marker)."""
    return symbol_name.removeprefix(GENERATED)

class NotAffineExtents(ValueError):
    """The query and key extents are not plain dims, which the analysis needs."""


_SYMPY_BOOL = {"and": sympy.And, "or": sympy.Or, "not": sympy.Not, "==": sympy.Eq, "!=": sympy.Ne,
               "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}
_SYMPY_INT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
              "min": sympy.Min, "max": sympy.Max, "neg": lambda a: -a, "abs": sympy.Abs,
              "clamp": lambda x, lo, hi: sympy.Min(sympy.Max(x, lo), hi),
              "//": lambda a, b: sympy.floor(a / b), "%": sympy.Mod}


class _MaskToSympy:
    """Mask predicates as sympy: integer arithmetic of the tile indices and scalars
    stays symbolic; a read that depends only on the outer indices (`prefix[b]`)
    becomes a symbol the kernel loads once; everything else is an opaque function."""

    def __init__(self, program, i, j, outer):
        self.program, self.i, self.j, self.outer = program, i, j, set(outer)
        self.symbols: dict[str, ir.Node] = {}
        self.opaque: dict[ir.Node, str] = {}
        self.memo: dict[ir.Node, sympy.Basic] = {}

    def __call__(self, node: ir.Node):
        """Memoised by node: a mask built from shared parts (`mk = mk and mk`) is a DAG."""
        if node not in self.memo:
            self.memo[node] = self.convert(node)
        return self.memo[node]

    def convert(self, node: ir.Node):
        if isinstance(node, ir.Index):
            if node.name in (self.i, self.j):
                return sympy.Symbol(node.name, integer=True)
            return self.loaded(node)
        if isinstance(node, (ir.Scalar, ir.Const)) or (node.is_scalar and not isinstance(node, ir.Access)):
            if node.dtype == ir.FLOAT and not isinstance(node, ir.Const):
                return self.opaque_of(node)
            try:
                return to_sympy(node)
            except NotImplementedError:
                return self.opaque_of(node)
        if isinstance(node, ir.Map) and node.op in _SYMPY_BOOL:
            return _SYMPY_BOOL[node.op](*(self(a) for a in node.args))
        if isinstance(node, ir.Map) and node.op in _SYMPY_INT and node.dtype == ir.INT:
            return _SYMPY_INT[node.op](*(self(a) for a in node.args))
        if not ({self.i, self.j} & set(node.indices)) and node.dtype != ir.FLOAT:
            return self.loaded(node)
        return self.opaque_of(node)

    def loaded(self, node: ir.Node):
        """A value fixed for the whole program (depends on batch/head only)."""
        name = generated_symbol(f"mask_scalar{len(self.symbols)}")
        for known, n in self.symbols.items():
            if n is node:
                return sympy.Symbol(known, integer=True)
        self.symbols[name] = node
        return sympy.Symbol(name, integer=True) if node.dtype == ir.INT else sympy.Symbol(name)

    def opaque_of(self, node: ir.Node):
        name = self.opaque.setdefault(node, generated_symbol(f"opaque{len(self.opaque)}"))
        args = [sympy.Symbol(ix, integer=True) for ix in node.indices if ix in (self.i, self.j)]
        value = sympy.Function(name)(*args) if args else sympy.Symbol(name)
        return sympy.Eq(value, 1) if node.dtype == ir.BOOL else value


# Each min, max, clamp or abs splits the symbolic analysis in cases, and sympy's own
# Min/Max canonicalisation slows down sharply when they nest; past this many the masks
# are treated as opaque (per-element masking and a runtime block map).
MAX_KINKS = 8


def _kinks(masks) -> int:
    """The number of distinct min/max/clamp/abs nodes under the masks (no recursion)."""
    seen, stack, count = set(), [m.pred for m in masks], 0
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        count += isinstance(node, ir.Map) and node.op in ("min", "max", "clamp", "abs")
        stack.extend(node.operands())
    return count


def analyse_masks(program: ir.Program, masks, i, j, outer):
    """The sympy mask plan of the conjunction of `masks` (None without masks), the loaded
    scalars and the opaque functions it names."""
    if not masks:
        return None, {}, {}
    n, m = program.extent[i], program.extent[j]
    if not (n.is_Symbol and m.is_Symbol):
        raise NotAffineExtents("query and key extents must be dims")
    convert = _MaskToSympy(program, i, j, outer)
    try:
        if _kinks(masks) > MAX_KINKS:
            raise MaskTooComplex(f"more than {MAX_KINKS} min, max, clamp or abs in the masks")
        plan = analyse_mask(sympy.And(*(convert(mk.pred) for mk in masks)), i, j, n=str(n), m=str(m))
    except MaskTooComplex:
        # Too many alternatives to bound symbolically: each mask becomes one opaque atom, so
        # every tile is visited and masked per element, and a runtime block map skips the
        # empty ones. Slower, never wrong.
        convert = _MaskToSympy(program, i, j, outer)
        plan = analyse_mask(sympy.And(*(convert.opaque_of(mk.pred) for mk in masks)), i, j,
                            n=str(n), m=str(m))
    opaque = {name: node for node, name in convert.opaque.items()}
    return plan, convert.symbols, opaque
