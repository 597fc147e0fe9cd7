"""Call-time checks: keyword arguments against a program's inputs, params and requirements.

Every problem is reported before any kernel runs, naming the argument and what the
spec expected, so a wrong call never becomes a wrong result or a crash deep in a
backend.
"""
from __future__ import annotations

import difflib
import functools
import math
import numbers
from dataclasses import dataclass

import sympy
import torch

from . import ir
from .call_params import expand
from .errors import ArgumentError, ShapeError
from .read_check import check_reads
from .reference import _scalar_function, evaluate_scalar

# The element types both backends take. Other floats (float8) and unsigned ints wider than
# 8 bits have no arithmetic in every torch op the reference uses nor loads in every kernel.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_DTYPES = {ir.FLOAT: FLOAT_DTYPES, ir.INT: INT_DTYPES, ir.BOOL: (torch.bool,)}

# Int params reach generated kernels as 32-bit ints when they fit (Triton's specialisation)
# and meet 32-bit index arithmetic there (`i + window`): 2**31 - 1 wraps around silently.
# Bounding params by 2**30 keeps a sum of a param and an index within int32.
INT_PARAM_LIMIT = 2 ** 30


class IndexRangeError(ShapeError, IndexError):
    """An int tensor argument holds an index outside the dim it indexes: a `ShapeError` like
    every bad value of a call, and an `IndexError` like the reference executor's own check."""


@dataclass
class BoundCall:
    """Checked arguments: tensors by name, in the spec's order of its inputs (left-out optional
    inputs filled in at their place: code that pairs them with the spec's inputs by position,
    such as the torch.library operators, relies on it), and every dim and param by name."""

    tensors: dict[str, torch.Tensor]
    scalars: dict[str, int | float | bool]
    device: torch.device
    out_dtype: torch.dtype
    sizes: dict[str, int] | None = None  # every index extent, computed (and checked) once per call


def describe_input(node: ir.Input) -> str:
    optional = f", optional (default {node.default.value})" if node.default is not None else ""
    dims = ", ".join(f"{d}?" if k in node.broadcast else str(d) for k, d in enumerate(node.dims))
    return f"{node.dtype} tensor [{dims}]{optional}"


def _broadcast(node: ir.Input, t: torch.Tensor, scalars: dict) -> torch.Tensor:
    """An input passed with size 1 along dims declared `H?`, viewed at the full size (stride
    0, nothing copied); a dim that no other input binds is 1."""
    shape = list(t.shape)
    for k in node.broadcast:
        if t.shape[k] == 1:
            shape[k] = scalars.setdefault(node.dims[k].name, 1)
    return t.expand(shape) if shape != list(t.shape) else t


def _default_tensor(program: ir.Program, node: ir.Input, tensors: dict, scalars: dict, device) -> torch.Tensor:
    """An optional input left out of a call: its default everywhere, as one value expanded
    (stride 0) to its declared shape, so nothing is materialised. Each of its dims must be
    bound by another input or derived (`2 * kernel[0] - 1`); floats take the type of the
    call's float tensors."""
    shape = []
    for k, dim in enumerate(node.dims):
        if dim.is_Integer:
            shape.append(int(dim))
        elif k in node.derived:
            shape.append(_derived_size(program, node, k, scalars))
        elif dim.name in scalars:
            shape.append(scalars[dim.name])
        else:
            raise ArgumentError(f"{program.name}(): the optional input '{node.name}' was left out, but its dim "
                                f"{dim.name} is not given by any other input; pass '{node.name}'")
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    dtype = {ir.INT: torch.int64, ir.BOOL: torch.bool}.get(node.dtype, floats[0] if floats else torch.float32)
    return torch.tensor(node.default.value, dtype=dtype, device=device or "cpu").expand(shape)


def _derived_size(program: ir.Program, node: ir.Input, k: int, scalars: dict) -> int:
    """The size of a derived dim (`ceil(N / q_block)`) for this call's dims and params."""
    dim = node.dims[k]
    values = ", ".join(f"{program.param_label(s.name)} = {scalars[s.name]}"
                       for s in sorted(dim.free_symbols, key=lambda s: s.name))
    value = dim.xreplace({s: scalars[s.name] for s in dim.free_symbols})
    if not (value.is_finite and value.is_integer):
        raise ShapeError(f"{program.name}: dim {k} of input '{node.name}' (`{node.derived[k]}`) has no integer "
                         f"value for this call ({value}): {values}")
    size = int(value)
    if size < 0:
        raise ShapeError(f"{program.name}: dim {k} of input '{node.name}' (`{node.derived[k]}`) is {size} for "
                         f"this call: {values}")
    return size


def _check_derived(program: ir.Program, name: str, node: ir.Input, t: torch.Tensor, scalars: dict):
    """A passed tensor's derived dims against their expressions."""
    for k in node.derived:
        want = _derived_size(program, node, k, scalars)
        if t.shape[k] != want:
            values = ", ".join(f"{program.param_label(s.name)} = {scalars[s.name]}"
                               for s in sorted(node.dims[k].free_symbols, key=lambda s: s.name))
            raise ShapeError(f"argument '{name}' must have size {want} in dim {k} (`{node.derived[k]}` with "
                             f"{values}), got shape {tuple(t.shape)}")


def bind(program: ir.Program, kwargs: dict, *, data: bool = True, expanded: bool = False) -> BoundCall:
    """Check a call's keyword arguments and bind every dim and param to a value.
    `data=False` binds tensors without data (meta tensors) for static analysis (what a
    launch would compile, `attncc.aot`): the checks that read values, and the call-time
    check of reads that may leave their tensor (`read_check`), are skipped.
    `expanded`: tuple and enum params are already given as their scalars (`call_params`)."""
    if not expanded:
        kwargs = expand(program, kwargs)
    expected = list(program.inputs) + list(program.params)
    for name in kwargs:
        if name not in program.inputs and name not in program.params:
            close = difflib.get_close_matches(name, expected + ["return_lse"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ArgumentError(f"{program.name}() got an unknown argument '{name}'{hint}; "
                                f"it takes: {', '.join(expected)}, return_lse")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, int | float | bool] = {}
    bound_by: dict[str, str] = {}
    device = None
    left_out = []  # optional inputs the call leaves out: their default, once the dims are bound
    for name, node in program.inputs.items():
        if kwargs.get(name) is None and node.default is not None:
            left_out.append(node)
            continue
        if name not in kwargs:
            raise ArgumentError(f"{program.name}() is missing the argument '{name}' ({describe_input(node)})")
        t = kwargs[name]
        _check_tensor(name, node, t)
        if device is None:
            device = t.device
        elif t.device != device:
            first = next(iter(tensors))
            raise ShapeError(f"argument '{name}' is on {t.device} but '{first}' is on {device}; "
                             "all tensors must be on one device")
        if t.device.type == "meta" and data:
            raise ShapeError(f"argument '{name}' is a meta tensor: it has a shape but no data, and a kernel "
                             "reads data (move it to the CPU or a GPU)")
        if t.dim() != len(node.dims):
            raise ShapeError(f"argument '{name}' must have {len(node.dims)} dims "
                             f"[{', '.join(str(d) for d in node.dims)}], got shape {tuple(t.shape)}")
        for k, (dim, size) in enumerate(zip(node.dims, t.shape)):
            if size == 1 and k in node.broadcast:  # `H?`: broadcast along it below, once H is bound
                continue
            if k in node.derived:  # checked once the params are bound
                continue
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
    for name, node in program.inputs.items():
        if node.broadcast and name in tensors:
            tensors[name] = _broadcast(node, tensors[name], scalars)
    for name, node in program.params.items():
        scalars[name] = _param_value(program, node, kwargs.get(name), scalars)
    for name, node in program.inputs.items():
        if node.derived and name in tensors:
            _check_derived(program, name, node, tensors[name], scalars)
    for node in left_out:
        tensors[node.name] = _default_tensor(program, node, tensors, scalars, device)
    tensors = {name: tensors[name] for name in program.inputs}
    for req in program.requires:
        names = sorted({s for s in _scalar_names(req.cond)})
        values = ", ".join(f"{program.param_label(n)} = {scalars[n]}" for n in names if n in scalars)
        where = f" (line {req.loc.line})" if req.loc else ""
        try:
            holds = evaluate_scalar(req.cond, scalars)
        except (ArithmeticError, ValueError) as err:  # `N % agents == 0` with agents = 0: the call is wrong, not attncc
            raise ShapeError(f"{program.name}: requirement `{req.text}`{where} cannot be evaluated "
                             f"({err}): {values}") from None
        if not holds:
            raise ShapeError(f"{program.name}: requirement `{req.text}`{where} does not hold: {values}")
    sizes = _check_sizes(program, scalars)
    if data:
        check_reads(program, scalars, tensors)
        _check_index_ranges(program, tensors, sizes)
    floats = [t for n, t in tensors.items() if t.is_floating_point()]
    out_dtype = floats[0].dtype if floats else torch.float32
    return BoundCall(tensors, scalars, device or torch.device("cpu"), out_dtype, sizes)


def _check_tensor(name: str, node: ir.Input, t):
    """Type, layout and device kind of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"argument '{name}' must be a torch.Tensor ({describe_input(node)}), "
                            f"got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise ArgumentError(f"argument '{name}' must be a dense (strided) tensor, got layout {t.layout}"
                            f"{' (nested)' if t.is_nested else ''}; convert it with .to_dense()")
    ok = _DTYPES[node.dtype]
    if t.dtype not in ok:
        article = "an" if node.dtype == ir.INT else "a"
        raise ArgumentError(f"argument '{name}' must be {article} {node.dtype} tensor, got {t.dtype} "
                            f"(it takes {', '.join(str(d).replace('torch.', '') for d in ok)})")


def _check_sizes(program: ir.Program, scalars: dict) -> dict[str, int]:
    """Block sizes, the scalar expressions the kernels evaluate on the host (`D ** -0.5`)
    and every index extent, evaluated for this call: a value the spec's arithmetic cannot
    take (a block of 0, D = 0 under `D ** -0.5`) is the call's error, named here, instead of
    a `ZeroDivisionError` in one backend and a `nan` or a silent 0 in the other."""
    blocks, exprs, divisors = _host_expressions(program)
    for node, block in blocks:
        size = evaluate_scalar(block.size, scalars)
        if size < 1:
            raise ShapeError(f"{program.name}: the block size of `{node.op}(..., {block.index} by ...)`"
                             f"{_at(node)}{_text(program, node)} must be at least 1, got {size} "
                             f"({_values(block.size, scalars)})")
    for node in exprs:
        try:
            fn, names = _scalar_function(node)
            value = fn(*(scalars[n] for n in names))
            bad = isinstance(value, float) and math.isnan(value)
            why = "it is nan"
        except OverflowError:  # past the double range: inf, as torch computes it (evaluate_scalar)
            bad = False
        except (ArithmeticError, ValueError, TypeError) as err:
            bad, why = True, str(err) or type(err).__name__
        if bad:
            raise ShapeError(f"{program.name}: a scalar expression{_at(node)}{_text(program, node)} "
                             f"cannot be evaluated for this call ({why}): {_values(node, scalars)}")
    for node in divisors:  # `j // (N - M)`: integer division by a call's zero has no value on any backend
        if evaluate_scalar(node.args[1], scalars) == 0:
            raise ShapeError(f"{program.name}: the divisor of `{node.op}`{_at(node)}{_text(program, node)} is 0 "
                             f"for this call: {_values(node.args[1], scalars)}")
    plain, computed = _extent_functions(program)
    sizes = {ix: scalars[name] for ix, name in plain}
    try:
        for ix, fn, names in computed:
            sizes[ix] = int(fn(*[scalars[n] for n in names]))
    except (ArithmeticError, ValueError, TypeError, OverflowError) as err:
        raise ShapeError(f"{program.name}: index extents cannot be computed for this call ({err}): "
                         f"{', '.join(f'{k} = {v}' for k, v in scalars.items())}") from None
    for ix, n in sizes.items():
        if n < 0:
            raise ShapeError(f"{program.name}: index '{ix}' would have a negative extent ({n}) for this call: "
                             f"{_values_of(program.extent[ix].free_symbols, scalars)}")
    return sizes


@functools.lru_cache(maxsize=64)
def _extent_functions(program: ir.Program) -> dict:
    """Each index extent as a compiled Python function of dims and params (`Program.sizes`
    substitutes into sympy, about ten times slower: this runs on every call)."""
    plain, computed = [], []
    for ix, expr in program.extent.items():
        if isinstance(expr, sympy.Symbol):  # most extents are a dim: a look-up
            plain.append((ix, expr.name))
            continue
        symbols = sorted(expr.free_symbols, key=lambda s: s.name)
        computed.append((ix, sympy.lambdify(symbols, expr, modules="math"), tuple(s.name for s in symbols)))
    return tuple(plain), tuple(computed)


@functools.lru_cache(maxsize=64)
def _host_expressions(program: ir.Program):
    """(block reductions, maximal scalar-only expressions, integer `//` and `%` by a scalar
    divisor) of the nodes a call evaluates:
    those under outputs and masks, not param defaults (used only when a param is omitted)
    nor requires (checked on their own)."""
    seen: set = set()
    stack = [o.node for o in program.outputs] + [m.pred for m in program.masks]
    order = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        if not isinstance(node, ir.Scalar):
            stack.extend(node.operands())

    memo: dict = {}  # by node: lets reusing lets (`let a2 = a1 + a1`) share operands

    def scalar_only(node) -> bool:
        if node not in memo:
            memo[node] = isinstance(node, (ir.Scalar, ir.Const)) or (
                isinstance(node, ir.Map) and not node.indices and all(scalar_only(a) for a in node.args))
        return memo[node]

    inner = {a for n in order if scalar_only(n) and isinstance(n, ir.Map) for a in n.args}
    exprs = []
    for n in order:
        if isinstance(n, ir.Map) and n not in inner and scalar_only(n):
            try:
                _scalar_function(n)
            except Exception:  # no symbolic form: the kernels do not evaluate it on the host either
                continue
            exprs.append(n)
    blocks = [(n, n.block) for n in order if isinstance(n, ir.Reduce) and n.block is not None]
    divisors = [n for n in order if isinstance(n, ir.Map) and n.op in ("//", "%") and n.dtype == ir.INT
                and n.indices and scalar_only(n.args[1])]
    return blocks, exprs, divisors


def _check_index_ranges(program: ir.Program, tensors: dict, sizes: dict):
    """Int tensors used as indices (`allow[label_q[b,i], ...]`, `k[b,h,perm[b,h,j],d]`) must
    hold positions inside the indexed dim: the reference raises on them, a generated kernel
    would read outside the tensor. One min/max per such tensor (a device sync on a GPU)."""
    for access, k, index in _index_reads(program):
        t = tensors[index.array.name]
        if t.numel() == 0:
            continue
        if isinstance(access.array, ir.Input):
            extent = tensors[access.array.name].shape[k]
        else:
            extent = sizes[access.axes[k]]
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= extent:
            bad = lo if lo < 0 else hi
            target = access.array.name if isinstance(access.array, ir.Input) else "the indexed tensor"
            line = f" in the access at line {access.loc.line} of the spec" if access.loc else ""
            raise IndexRangeError(f"index {bad} is out of range for dim {k} of '{target}' (size {extent}){line}: "
                                  f"argument '{index.array.name}' holds it")


@functools.lru_cache(maxsize=64)
def _index_reads(program: ir.Program):
    """(access, position, int-input read) for every index argument that is a plain read of
    an int input tensor."""
    out = []
    for node in program.graph.nodes:
        if isinstance(node, ir.Access):
            for k, a in enumerate(node.args):
                if isinstance(a, ir.Access) and isinstance(a.array, ir.Input) and a.array.dtype == ir.INT:
                    out.append((node, k, a))
    return tuple(out)


def _at(node) -> str:
    loc = getattr(node, "loc", None)
    return f" (line {loc.line})" if loc else ""


def _text(program: ir.Program, node) -> str:
    loc = getattr(node, "loc", None)
    text = program.source.line(loc.line).strip() if loc else ""
    return f" in `{text}`" if text else ""


def _values(node, scalars) -> str:
    return _values_of({n for n in _scalar_names(node)}, scalars)


def _values_of(names, scalars) -> str:
    names = sorted(str(getattr(n, "name", n)) for n in names)
    return ", ".join(f"{n} = {scalars[n]}" for n in names if n in scalars) or "no dims or params"


def _param_value(program, node: ir.Scalar, value, scalars):
    name = program.param_label(node.name)
    if value is None:
        if node.default is None:
            raise ArgumentError(f"{program.name}() is missing the argument '{name}' ({node.dtype} param)")
        try:
            default = evaluate_scalar(node.default, scalars)
        except (ArithmeticError, ValueError) as err:  # sigmoid's bias = -log(M) with M = 0
            raise ShapeError(f"the default of param '{name}' cannot be evaluated for this call ({err}): "
                             f"{_values(node.default, scalars)}; pass '{name}' explicitly") from None
        return _check_param(name, node.dtype, default)
    value = _plain_scalar(name, value)
    if node.dtype == ir.BOOL:
        if not isinstance(value, bool):
            raise ArgumentError(f"param '{name}' must be a bool, got {type(value).__name__}")
        return value
    kind = "an int" if node.dtype == ir.INT else "a float"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"param '{name}' must be {kind}, got {type(value).__name__}")
    if node.dtype == ir.INT:
        if not isinstance(value, numbers.Integral):
            raise ArgumentError(f"param '{name}' must be an int, got {value!r}")
        return _check_param(name, ir.INT, int(value))
    return _check_param(name, ir.FLOAT, float(value))


def _plain_scalar(name: str, value):
    """A Python number from a param value given as a number, a numpy scalar or 0-d array,
    or a 0-d tensor. A tensor that requires grad is refused: its value would be read once as
    a number, and its gradient silently lost."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ArgumentError(f"param '{name}' must be a number or a 0-d tensor, got a tensor of shape "
                                f"{tuple(value.shape)}")
        if value.requires_grad and torch.is_grad_enabled():
            raise ArgumentError(f"param '{name}' is a tensor that requires grad, but params are not "
                                "differentiable (the value is read as a number); declare it as an input "
                                "tensor of the spec to differentiate it, or pass a plain number")
        if value.device.type == "meta":
            raise ArgumentError(f"param '{name}' is a meta tensor, which has no value")
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()  # np.int64(3), np.bool_(True), np.array(2.5)
    return value


def _check_param(name: str, dtype: str, value):
    if dtype == ir.INT and abs(value) > INT_PARAM_LIMIT:
        raise ShapeError(f"param '{name}' = {value} is out of range: int params must lie within "
                         f"+-2**30 ({INT_PARAM_LIMIT}), so kernels' 32-bit index arithmetic cannot overflow "
                         "(a window or block longer than the sequence already means 'no limit')")
    if dtype == ir.FLOAT and not math.isfinite(value):
        # the compiler's algebra (sympy, `real=True`) takes params as finite numbers: `cap < inf`
        # simplifies to true, `cap * tanh(s / cap)` is nan at inf on one backend and not the other
        raise ShapeError(f"param '{name}' is {value}: float params must be finite numbers")
    return value


def _scalar_names(node: ir.Node):
    if isinstance(node, ir.Scalar):
        yield node.name
    for op in node.operands():
        yield from _scalar_names(op)
