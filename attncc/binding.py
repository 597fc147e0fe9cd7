"""Call-time checks: keyword arguments against a program's inputs, params and requirements.

Every problem is reported before any kernel runs, naming the argument and what the
spec expected, so a wrong call never becomes a wrong result or a crash deep in a
backend.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from . import ir
from .errors import ArgumentError, ShapeError
from .reference import evaluate_scalar

_DTYPE_OK = {
    ir.FLOAT: lambda t: t.is_floating_point(),
    ir.INT: lambda t: not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
    ir.BOOL: lambda t: t.dtype == torch.bool,
}


@dataclass
class BoundCall:
    """Checked arguments: tensors by name, and every dim and param by name."""

    tensors: dict[str, torch.Tensor]
    scalars: dict[str, int | float | bool]
    device: torch.device
    out_dtype: torch.dtype


def describe_input(node: ir.Input) -> str:
    return f"{node.dtype} tensor [{', '.join(str(d) for d in node.dims)}]"


def bind(program: ir.Program, kwargs: dict) -> BoundCall:
    """Check a call's keyword arguments and bind every dim and param to a value."""
    expected = list(program.inputs) + list(program.params)
    for name in kwargs:
        if name not in program.inputs and name not in program.params:
            raise ArgumentError(f"{program.name}() got an unknown argument '{name}'; "
                                f"it takes: {', '.join(expected)}")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, int | float | bool] = {}
    bound_by: dict[str, str] = {}
    device = None
    for name, node in program.inputs.items():
        if name not in kwargs:
            raise ArgumentError(f"{program.name}() is missing the argument '{name}' ({describe_input(node)})")
        t = kwargs[name]
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"argument '{name}' must be a torch.Tensor ({describe_input(node)}), "
                                f"got {type(t).__name__}")
        if not _DTYPE_OK[node.dtype](t):
            article = "an" if node.dtype == ir.INT else "a"
            raise ArgumentError(f"argument '{name}' must be {article} {node.dtype} tensor, got {t.dtype}")
        if device is None:
            device = t.device
        elif t.device != device:
            first = next(iter(tensors))
            raise ShapeError(f"argument '{name}' is on {t.device} but '{first}' is on {device}; "
                             "all tensors must be on one device")
        if t.dim() != len(node.dims):
            raise ShapeError(f"argument '{name}' must have {len(node.dims)} dims "
                             f"[{', '.join(str(d) for d in node.dims)}], got shape {tuple(t.shape)}")
        for k, (dim, size) in enumerate(zip(node.dims, t.shape)):
            if dim.is_Integer:
                if int(dim) != size:
                    raise ShapeError(f"argument '{name}' must have size {dim} in dim {k}, got shape "
                                     f"{tuple(t.shape)}")
                continue
            key = dim.name
            if key in scalars and scalars[key] != size:
                raise ShapeError(f"argument '{name}' has {key} = {size} (dim {k} of shape {tuple(t.shape)}) "
                                 f"but '{bound_by[key]}' has {key} = {scalars[key]}")
            scalars.setdefault(key, size)
            bound_by.setdefault(key, name)
        tensors[name] = t
    for name, node in program.params.items():
        scalars[name] = _param_value(program, node, kwargs.get(name), scalars)
    for req in program.requires:
        names = sorted({s for s in _scalar_names(req.cond)})
        values = ", ".join(f"{n} = {scalars[n]}" for n in names if n in scalars)
        where = f" (line {req.loc.line})" if req.loc else ""
        try:
            holds = evaluate_scalar(req.cond, scalars)
        except ArithmeticError as err:  # `N % agents == 0` with agents = 0: the call is wrong, not attncc
            raise ShapeError(f"{program.name}: requirement `{req.text}`{where} cannot be evaluated "
                             f"({err}): {values}") from None
        if not holds:
            raise ShapeError(f"{program.name}: requirement `{req.text}`{where} does not hold: {values}")
    floats = [t for n, t in tensors.items() if t.is_floating_point()]
    out_dtype = floats[0].dtype if floats else torch.float32
    return BoundCall(tensors, scalars, device or torch.device("cpu"), out_dtype)


def _param_value(program, node: ir.Scalar, value, scalars):
    if value is None:
        if node.default is None:
            raise ArgumentError(f"{program.name}() is missing the argument '{node.name}' ({node.dtype} param)")
        return evaluate_scalar(node.default, scalars)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if node.dtype == ir.BOOL:
        if not isinstance(value, bool):
            raise ArgumentError(f"param '{node.name}' must be a bool, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"param '{node.name}' must be {'an int' if node.dtype == ir.INT else 'a float'}, "
                            f"got {type(value).__name__}")
    if node.dtype == ir.INT:
        if not isinstance(value, numbers.Integral):
            raise ArgumentError(f"param '{node.name}' must be an int, got {value!r}")
        return int(value)
    return float(value)


def _scalar_names(node: ir.Node):
    if isinstance(node, ir.Scalar):
        yield node.name
    for op in node.operands():
        yield from _scalar_names(op)
