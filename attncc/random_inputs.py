"""Valid random keyword arguments for any program, for `attncc check` and for tests.

Sizes come from the user where given, from small odd defaults otherwise, and from the
spec's `require`s where those pin a dim (`N == M`, `N == height * width`). Integer
inputs get values their uses make meaningful: indices into the axis they index (a
permutation when they cover it), lengths up to the index they are compared with, and
contiguous segment ids otherwise. Float inputs are standard normal, except bases of a
power (`lam[h] ** (i - j)`, a decay), which get values in (0.5, 1]: a base above 1 raised
to a sequence length overflows, and a negative one has no real non-integer powers.
"""
from __future__ import annotations

import sympy
import torch

from . import ir
from .call_params import collapse, expand
from .errors import ArgumentError
from .passes.infer import to_sympy
from .reference import evaluate_scalar

DEFAULT_DIMS = {"B": 2, "H": 4, "N": 37, "M": 45, "D": 16, "E": 12, "G": 2}
OTHER_DIM = 3
_ORDERING = {"<", "<=", ">", ">="}


def random_arguments(program: ir.Program, shape: dict[str, int] | None = None,
                     params: dict | None = None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Keyword arguments (tensors, then the params given) that satisfy the program's contract.

    shape: dims to fix (others default or are solved from requires); params: param values,
    as numbers or as text (`"8"`, `"0.5"`, `"true"`). Raises ValueError naming what is
    missing or which requirement cannot hold, and how to fix it from the command line.
    """
    shape, params = dict(shape or {}), _param_values(program, params or {})
    unknown = sorted(set(shape) - set(program.dims))
    if unknown:
        raise ValueError(f"{program.name} has no dim {', '.join(unknown)}; its dims are "
                         f"{', '.join(program.dims) or 'none'}")
    scalars = _solve_dims(program, shape, params)
    _check_requires(program, scalars)
    gen = torch.Generator().manual_seed(seed)
    sizes = {name: [_value(d, scalars) for d in node.dims] for name, node in program.inputs.items()}
    args = {}
    for name, node in program.inputs.items():
        if node.dtype == ir.FLOAT and _is_power_base(program, node):
            t = (1.0 - 0.5 * torch.rand(sizes[name], generator=gen)).to(dtype)
        elif node.dtype == ir.FLOAT:
            t = torch.randn(sizes[name], generator=gen).to(dtype)
        elif node.dtype == ir.BOOL:
            t = torch.rand(sizes[name], generator=gen) < 0.7
        else:
            t = _integers(program, node, sizes[name], scalars, gen)
        args[name] = t.to(device)
    return {**args, **collapse(program, params)}


# ----------------------------------------------------------------------------- params

def _param_values(program: ir.Program, given: dict) -> dict:
    """The given params (as a call names them) as the program's scalar params."""
    params = program.call_params()
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"{program.name} has no param {', '.join(unknown)}; its params are "
                         f"{', '.join(params) or 'none'}")
    missing = [n for n, p in params.items() if n not in given
               and any(s.default is None for s in (p.scalars if isinstance(p, ir.ParamGroup) else (p,)))]
    if missing:
        how = " ".join(f"--param {n}=VALUE" for n in missing)
        raise ValueError(f"{program.name} needs a value for param {', '.join(missing)} (no default); "
                         f"pass it with {how}")
    parsed = {n: _parse_group(params[n], v) if isinstance(params[n], ir.ParamGroup) else _parse_param(params[n], v)
              for n, v in given.items()}
    try:
        return expand(program, parsed)
    except ArgumentError as err:
        raise ValueError(str(err)) from None


def _parse_group(group: ir.ParamGroup, value):
    """A tuple param from text (`"(1, 5, 7)"`, or `"7"` for every entry) or an enum's name."""
    if not isinstance(value, str) or group.is_enum:
        return value.strip() if isinstance(value, str) else value
    parts = [p for p in value.strip().strip("()").split(",") if p.strip()]
    if len(parts) == 1:
        return _parse_param(group.scalars[0], parts[0])
    if len(parts) != len(group.scalars):
        raise ValueError(f"param '{group.name}' takes {len(group.scalars)} entries, got '{value}'")
    return tuple(_parse_param(s, p) for s, p in zip(group.scalars, parts))


def _parse_param(node: ir.Scalar, value):
    """A param value from the command line's text, typed as the spec declares it."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    try:
        if node.dtype == ir.BOOL:
            if text not in ("true", "false", "1", "0"):
                raise ValueError
            return text in ("true", "1")
        return int(text) if node.dtype == ir.INT else float(text)
    except ValueError:
        raise ValueError(f"param '{node.name}' is {node.dtype}, got '{value}'") from None


# ----------------------------------------------------------------------------- dims

def _solve_dims(program: ir.Program, shape: dict, params: dict) -> dict:
    """Every dim and param by name. Dims the user did not fix are solved from `require`
    equalities where one unknown remains, else take a default, nudged up (e.g. to a
    multiple, `N % agents == 0`) until the requirements that can be decided hold."""
    known = {**shape, **params}
    for name, node in program.params.items():  # defaults that need no dim (`= 256`)
        if name not in known and not _dims_used(node.default):
            known[name] = evaluate_scalar(node.default, known)
    equalities = [to_sympy(c) for r in program.requires for c in _conjuncts(r.cond) if c.op == "=="]
    known = _propagate(equalities, known, program)
    for name in program.dims:
        if name in known:
            continue
        start = DEFAULT_DIMS.get(name, OTHER_DIM)
        trials = (_propagate(equalities, {**known, name: v}, program) for v in range(start, 2 * start + 64))
        known = next((t for t in trials if not _violated(program, t)),
                     _propagate(equalities, {**known, name: start}, program))
    for name, node in program.params.items():  # defaults computed from dims (`= -log(M)`)
        if name not in known:
            known[name] = evaluate_scalar(node.default, known)
    return known


def _dims_used(node: ir.Node) -> set[str]:
    if isinstance(node, ir.Scalar):
        return {node.name} if node.role == "dim" else set()
    return set().union(*(_dims_used(op) for op in node.operands()))


def _conjuncts(cond: ir.Node) -> list[ir.Map]:
    """The parts of `a and b and ...` that are comparisons."""
    if isinstance(cond, ir.Map) and cond.op == "and":
        return [c for a in cond.args for c in _conjuncts(a)]
    return [cond] if isinstance(cond, ir.Map) else []


def _propagate(equalities: list, known: dict, program: ir.Program) -> dict:
    """Solve equalities with exactly one unknown dim for it, until nothing changes."""
    known = dict(known)
    changed = True
    while changed:
        changed = False
        for eq in equalities:
            subs = {s: known[s.name] for s in eq.free_symbols if s.name in known}
            rest = eq.xreplace(subs)
            unknown = [s for s in rest.free_symbols if s.name in program.dims]
            if len(unknown) != 1 or len(rest.free_symbols) != 1:
                continue
            solutions = _positive_integer_solutions(rest, unknown[0])
            if solutions:
                known[unknown[0].name] = solutions[0]
                changed = True
    return known


def _positive_integer_solutions(eq, symbol) -> list[int]:
    try:
        found = sympy.solve(eq, symbol)
    except (NotImplementedError, TypeError, ValueError):
        return []
    return sorted(int(s) for s in found if s.is_integer and s.is_positive)


def _violated(program: ir.Program, known: dict) -> list[ir.Require]:
    """The requirements that every name they use is known for, and that fail."""
    failed = []
    for req in program.requires:
        names = {s.name for s in to_sympy(req.cond).free_symbols}
        if names <= set(known) and not evaluate_scalar(req.cond, known):
            failed.append(req)
    return failed


def _check_requires(program: ir.Program, scalars: dict):
    for req in program.requires:
        if evaluate_scalar(req.cond, scalars):
            continue
        names = sorted(s.name for s in to_sympy(req.cond).free_symbols)
        values = ", ".join(f"{n} = {scalars[n]}" for n in names if n in scalars)
        where = f" (line {req.loc.line})" if req.loc else ""
        dims = [n for n in names if n in program.dims]
        hint = f"--shape {','.join(f'{n}=...' for n in dims)}" if dims else "--param NAME=VALUE"
        raise ValueError(f"{program.name}: cannot satisfy `{req.text}`{where} with {values}; "
                         f"choose sizes that do with {hint}")


def _value(expr: sympy.Expr, scalars: dict) -> int:
    return int(expr.xreplace({s: scalars[s.name] for s in expr.free_symbols}))


# ----------------------------------------------------------------------------- integer inputs

def _integers(program: ir.Program, node: ir.Input, size: list[int], scalars: dict,
              gen: torch.Generator) -> torch.Tensor:
    """Values for an int input, chosen by how the spec uses it (see the module docstring)."""
    targets = _indexed_axes(program, node, scalars)
    if targets:
        extent = min(targets)
        if size and size[-1] == extent:
            return torch.argsort(torch.rand(size, generator=gen), dim=-1)
        return torch.randint(extent, size, generator=gen)
    bound = _compared_extent(program, node, scalars)
    if bound is not None:
        return torch.randint(bound + 1, size, generator=gen)
    segments = max(4, size[-1] // 8) if size else 4
    ids = torch.randint(segments, size, generator=gen)
    return ids.sort(dim=-1).values if size else ids


def _is_power_base(program: ir.Program, array: ir.Input) -> bool:
    """Whether some `x ** y` in the spec has a read of `array` as its base `x`."""
    return any(isinstance(n, ir.Map) and n.op == "**" and _reads(n.args[0], array) for n in program.graph)


def _reads(node: ir.Node, array: ir.Input) -> bool:
    return isinstance(node, ir.Access) and node.array is array


def _indexed_axes(program: ir.Program, array: ir.Input, scalars: dict) -> list[int]:
    """Extents of the axes that `array` directly indexes (`k[b, h, perm[b,h,j], d]`)."""
    extents = []
    for node in program.graph:
        if not isinstance(node, ir.Access):
            continue
        for k, arg in enumerate(node.args):
            if not _reads(arg, array):
                continue
            if isinstance(node.array, ir.Input):
                extents.append(_value(node.array.dims[k], scalars))
            else:
                extents.append(_value(program.extent[node.axes[k]], scalars))
    return extents


def _compared_extent(program: ir.Program, array: ir.Input, scalars: dict) -> int | None:
    """For a length compared with an index (`j < prefix[b]`), the largest such index's extent."""
    bounds = []
    for node in program.graph:
        if not (isinstance(node, ir.Map) and node.op in _ORDERING):
            continue
        sides = [_subtree(a) for a in node.args]
        for mine, other in (sides, sides[::-1]):
            if any(_reads(n, array) for n in mine):
                bounds += [_value(program.extent[n.name], scalars) for n in other
                           if isinstance(n, ir.Index)]
    return max(bounds) if bounds else None


def _subtree(node: ir.Node) -> list[ir.Node]:
    return [node] + [n for op in node.operands() for n in _subtree(op)]
