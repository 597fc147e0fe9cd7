"""A FlexAttention-compatible drop-in (docs/flex.md).

    from attncc import flex_attention, create_block_mask

takes the same `score_mod(score, b, h, q_idx, kv_idx)` and `mask_mod(b, h, q_idx, kv_idx)`
functions as `torch.nn.attention.flex_attention`. The functions are never run on real data:
they are called once with proxy objects that record what they compute, the record is
printed as attncc spec text (captured tensors become extra inputs `cap0`, `cap1`, ...), and
that spec is compiled by `attncc.compile` (once per spec text and backend).
"""
from __future__ import annotations

import math
import numbers

import torch

from .errors import ArgumentError, SpecError

__all__ = ["flex_attention", "create_block_mask", "BlockMask"]


class BlockMask:
    """A symbolic block mask: only `mask_mod` and the sizes are kept; attncc derives the
    block structure from the traced mask when it compiles the kernel."""

    def __init__(self, mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=128):
        if not callable(mask_mod):
            raise ArgumentError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
        self.mask_mod = mask_mod
        self.B, self.H, self.Q_LEN, self.KV_LEN = B, H, Q_LEN, KV_LEN
        self.device = device
        self.BLOCK_SIZE = BLOCK_SIZE

    @property
    def shape(self):
        return (self.B, self.H, self.Q_LEN, self.KV_LEN)

    def __repr__(self):
        return (f"BlockMask(mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)!r}, "
                f"shape={self.shape}, symbolic)")


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=128, **_ignored):
    """FlexAttention's `create_block_mask`, symbolic: nothing is materialised."""
    return BlockMask(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE)


# ---------------------------------------------------------------------------------------------
# Tracing

class TraceError(SpecError):
    pass


class _Tracer:
    """Collects the tensors a traced function captures."""

    def __init__(self, sizes=None):
        self.captures: list[torch.Tensor] = []
        self._ids: dict[int, int] = {}
        # index letter -> (dim name, size): a captured axis of that size read by the bare
        # index shares the dim name (attncc needs an index's ranges to agree)
        self.sizes = sizes or {}
        self.axis_dims: dict[tuple[int, int], str] = {}

    def axis_index(self, t: torch.Tensor, axis: int, p: "_Proxy") -> str:
        if p.text in self.sizes:
            dim, size = self.sizes[p.text]
            n = self._ids[id(t)]
            if t.shape[axis] == size and self.axis_dims.setdefault((n, axis), dim) == dim:
                return p.text
            return f"({p.text} + 0)"  # an index expression, checked per element
        return p.text

    def capture(self, t: torch.Tensor) -> str:
        key = id(t)
        if key not in self._ids:
            self._ids[key] = len(self.captures)
            self.captures.append(t)
        return f"cap{self._ids[key]}"

    def declarations(self) -> list[str]:
        out = []
        for n, t in enumerate(self.captures):
            dims = ", ".join(self.axis_dims.get((n, a), f"C{n}_{a}") for a in range(t.dim()))
            out.append(f"cap{n}[{dims}]{': ' + _kind_of_dtype(t.dtype) if _kind_of_dtype(t.dtype) != 'float' else ''}")
        return out


def _kind_of_dtype(dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        raise TraceError(f"captured complex tensors are not supported ({dtype})")
    return "int"


_ORDER = {"bool": 0, "int": 1, "float": 2}


def _promote(*kinds):
    return max(kinds, key=lambda k: _ORDER[k])


class _Proxy:
    """A traced value: `text` is an attncc expression (always parenthesised when compound),
    `kind` its element type."""

    def __init__(self, tracer: _Tracer, text: str, kind: str):
        self._tracer, self.text, self.kind = tracer, text, kind

    # -- helpers --
    def _wrap(self, x) -> "_Proxy":
        return _lift(self._tracer, x)

    def _bin(self, other, op, kind=None, swap=False):
        o = self._wrap(other)
        a, b = (o, self) if swap else (self, o)
        return _Proxy(self._tracer, f"({a.text} {op} {b.text})", kind or _promote(a.kind, b.kind))

    def __bool__(self):
        raise TraceError("a traced score_mod/mask_mod used a traced value in Python control flow "
                         "(if/while/and/or/not on an index); use torch.where, &, | and ~ instead")

    def __index__(self):
        raise TraceError("a traced index was used as a Python int; index captured tensors "
                         "with the traced indices directly")

    __int__ = __float__ = __index__

    def __iter__(self):
        raise TraceError("traced values cannot be iterated")

    def __len__(self):
        raise TraceError("traced values have no length")

    # -- arithmetic --
    def __add__(self, o): return self._bin(o, "+")
    def __radd__(self, o): return self._bin(o, "+", swap=True)
    def __sub__(self, o): return self._bin(o, "-")
    def __rsub__(self, o): return self._bin(o, "-", swap=True)
    def __mul__(self, o): return self._bin(o, "*")
    def __rmul__(self, o): return self._bin(o, "*", swap=True)
    def __truediv__(self, o): return self._bin(o, "/", kind="float")
    def __rtruediv__(self, o): return self._bin(o, "/", kind="float", swap=True)
    def __floordiv__(self, o): return self._bin(o, "//")
    def __rfloordiv__(self, o): return self._bin(o, "//", swap=True)
    def __mod__(self, o): return self._bin(o, "%")
    def __rmod__(self, o): return self._bin(o, "%", swap=True)

    def __pow__(self, o):
        return self._bin(o, "**", kind=_promote(self.kind, self._wrap(o).kind, "int"))

    def __rpow__(self, o):
        return self._bin(o, "**", kind=_promote(self.kind, self._wrap(o).kind, "int"), swap=True)

    def __neg__(self): return _Proxy(self._tracer, f"(-{self.text})", _promote(self.kind, "int"))
    def __pos__(self): return self
    def __abs__(self): return _call(self._tracer, "abs", self)

    # -- comparisons --
    def __eq__(self, o): return self._bin(o, "==", kind="bool")  # type: ignore[override]
    def __ne__(self, o): return self._bin(o, "!=", kind="bool")  # type: ignore[override]
    def __lt__(self, o): return self._bin(o, "<", kind="bool")
    def __le__(self, o): return self._bin(o, "<=", kind="bool")
    def __gt__(self, o): return self._bin(o, ">", kind="bool")
    def __ge__(self, o): return self._bin(o, ">=", kind="bool")
    __hash__ = object.__hash__

    # -- logic --
    def _logic(self, o, op, swap=False):
        o = self._wrap(o)
        for x in (self, o):
            if x.kind != "bool":
                raise TraceError(f"'{op}' of a non-boolean traced value is not supported "
                                 f"(bitwise integer operations have no attncc spelling)")
        a, b = (o, self) if swap else (self, o)
        neutral = "true" if op == "and" else "false"
        if a.text == neutral:
            return b
        if b.text == neutral:
            return a
        return _Proxy(self._tracer, f"({a.text} {op} {b.text})", "bool")

    def __and__(self, o): return self._logic(o, "and")
    def __rand__(self, o): return self._logic(o, "and", swap=True)
    def __or__(self, o): return self._logic(o, "or")
    def __ror__(self, o): return self._logic(o, "or", swap=True)

    def __invert__(self):
        if self.kind != "bool":
            raise TraceError("'~' of a non-boolean traced value is not supported")
        return _Proxy(self._tracer, f"(not {self.text})", "bool")

    def logical_not(self): return ~self
    def logical_and(self, o): return self & o
    def logical_or(self, o): return self | o

    # -- tensor-like methods --
    def tanh(self): return _call(self._tracer, "tanh", self)
    def exp(self): return _call(self._tracer, "exp", self)
    def log(self): return _call(self._tracer, "log", self)
    def sigmoid(self): return _call(self._tracer, "sigmoid", self)
    def sqrt(self): return _call(self._tracer, "sqrt", self)
    def abs(self): return _call(self._tracer, "abs", self)
    def sign(self): return _call(self._tracer, "sign", self)
    def clamp(self, min=None, max=None): return _clamp(self._tracer, self, min, max)
    clip = clamp

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
        return self if dtype is None else _cast(self, dtype)

    def new_ones(self, *args, dtype=None, **kwargs):
        return _lift(self._tracer, True if dtype == torch.bool else 1)

    def new_zeros(self, *args, dtype=None, **kwargs):
        return _lift(self._tracer, False if dtype == torch.bool else 0)

    def bool(self): return _cast(self, torch.bool)
    def float(self): return _cast(self, torch.float32)
    def long(self): return _cast(self, torch.int64)
    def int(self): return _cast(self, torch.int32)

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return {"bool": torch.bool, "int": torch.int64, "float": torch.float32}[self.kind]

    # -- torch functions --
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = next(a._tracer for a in _flatten((args, kwargs)) if isinstance(a, _Proxy))
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__":
            return _index(tracer, *args)
        handler = _TORCH_FUNCTIONS.get(name)
        if handler is None:
            raise TraceError(f"torch function '{name}' is not supported in a traced "
                             f"score_mod/mask_mod (docs/flex.md lists what is)")
        return handler(tracer, *args, **kwargs)


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def _number_text(x) -> tuple[str, str]:
    if isinstance(x, bool):
        return ("true" if x else "false"), "bool"
    if isinstance(x, numbers.Integral):
        x = int(x)
        return (str(x) if x >= 0 else f"(-{-x})"), "int"
    if isinstance(x, numbers.Real):
        x = float(x)
        if math.isnan(x):
            raise TraceError("nan literals are not supported in traced functions")
        if math.isinf(x):
            return ("inf" if x > 0 else "(-inf)"), "float"
        text = repr(abs(x))
        if "." not in text and "e" not in text:
            text += ".0"
        return (text if x >= 0 and not text.startswith("-") else f"(-{text})"), "float"
    raise TraceError(f"cannot use a {type(x).__name__} in a traced score_mod/mask_mod")


def _lift(tracer, x) -> _Proxy:
    if isinstance(x, _Proxy):
        return x
    if isinstance(x, torch.Tensor):
        name = tracer.capture(x)
        if x.dim() == 0:
            return _Proxy(tracer, name, _kind_of_dtype(x.dtype))
        raise TraceError(f"a captured tensor of shape {tuple(x.shape)} was used without indexing; "
                         f"index it with the traced b, h, q_idx, kv_idx")
    text, kind = _number_text(x)
    return _Proxy(tracer, text, kind)


def _index(tracer, tensor, index):
    if not isinstance(tensor, torch.Tensor):
        raise TraceError("only captured tensors can be indexed in a traced function")
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) != tensor.dim():
        raise TraceError(f"a captured tensor of shape {tuple(tensor.shape)} must be indexed with "
                         f"{tensor.dim()} indices, got {len(index)} (slices are not supported)")
    parts = []
    name = tracer.capture(tensor)
    for axis, a in enumerate(index):
        if isinstance(a, (slice, type(Ellipsis))) or a is None:
            raise TraceError("slices, None and ... are not supported when indexing captured tensors")
        p = _lift(tracer, a)
        if p.kind != "int":
            raise TraceError("captured tensors must be indexed with integer expressions")
        parts.append(tracer.axis_index(tensor, axis, p))
    return _Proxy(tracer, f"{name}[{', '.join(parts)}]", _kind_of_dtype(tensor.dtype))


_FLOAT_FUNCS = ("exp", "log", "tanh", "sigmoid", "sqrt", "rsqrt", "sin", "cos", "log1p", "expm1",
                "floor", "ceil", "relu", "elu", "gelu", "silu")


def _call(tracer, fname, *args):
    ps = [_lift(tracer, a) for a in args]
    kind = "float" if fname in _FLOAT_FUNCS else _promote(*(p.kind for p in ps))
    return _Proxy(tracer, f"{fname}({', '.join(p.text for p in ps)})", kind)


def _clamp(tracer, x, lo=None, hi=None):
    if lo is not None and hi is not None:
        return _call(tracer, "clamp", x, lo, hi)
    if lo is not None:
        return _call(tracer, "max", x, lo)
    if hi is not None:
        return _call(tracer, "min", x, hi)
    return _lift(tracer, x)


def _cast(p: _Proxy, dtype) -> _Proxy:
    kind = _kind_of_dtype(dtype)
    if kind == p.kind:
        return p
    t = p._tracer
    if kind == "bool":
        return p != 0
    if kind == "float":
        if p.kind == "bool":
            return _Proxy(t, f"where({p.text}, 1.0, 0.0)", "float")
        return _Proxy(t, f"({p.text} * 1.0)", "float")
    if p.kind == "bool":
        return _Proxy(t, f"where({p.text}, 1, 0)", "int")
    raise TraceError("casting a float traced value to an integer is not supported")


def _where(tracer, cond, x=None, y=None):
    if x is None or y is None:
        raise TraceError("torch.where needs three arguments in a traced function")
    c = _lift(tracer, cond)
    if c.kind != "bool":
        raise TraceError("torch.where's condition must be boolean")
    return _call(tracer, "where", c, x, y)


def _min_max(fname):
    def f(tracer, a, b=None, *rest, **kw):
        if b is None or isinstance(b, _Proxy) is False and not isinstance(b, (numbers.Real, torch.Tensor)):
            raise TraceError(f"torch.{fname} as a reduction is not supported in a traced function")
        return _call(tracer, fname, a, b)
    return f


def _binop(op):
    def f(tracer, a, b, **kw):
        return getattr(_lift(tracer, a), op)(b)
    return f


def _rbinop(op):  # Tensor.__rsub__(tensor, other) means other - tensor
    def f(tracer, a, b, **kw):
        return getattr(_lift(tracer, b), op)(a)
    return f


def _unary(fname):
    return lambda tracer, a, **kw: _call(tracer, fname, a)


_TORCH_FUNCTIONS = {
    "where": _where,
    "clamp": lambda t, x, min=None, max=None: _clamp(t, x, min, max),
    "clip": lambda t, x, min=None, max=None: _clamp(t, x, min, max),
    "minimum": _min_max("min"), "min": _min_max("min"), "fmin": _min_max("min"),
    "maximum": _min_max("max"), "max": _min_max("max"), "fmax": _min_max("max"),
    "abs": _unary("abs"), "sign": _unary("sign"),
    "logical_not": lambda t, a: ~_lift(t, a),
    "logical_and": lambda t, a, b: _lift(t, a) & b,
    "logical_or": lambda t, a, b: _lift(t, a) | b,
    "bitwise_not": lambda t, a: ~_lift(t, a),
    "__invert__": lambda t, a: ~_lift(t, a),
    "neg": lambda t, a: -_lift(t, a), "__neg__": lambda t, a: -_lift(t, a),
}
for _f in _FLOAT_FUNCS:
    _TORCH_FUNCTIONS[_f] = _unary(_f)
for _names, _op in ((("add", "__add__"), "__add__"), (("sub", "__sub__"), "__sub__"),
                    (("mul", "__mul__"), "__mul__"), (("div", "true_divide", "__truediv__"), "__truediv__"),
                    (("floor_divide", "__floordiv__"), "__floordiv__"),
                    (("remainder", "fmod", "__mod__"), "__mod__"), (("pow", "__pow__"), "__pow__"),
                    (("eq", "__eq__"), "__eq__"), (("ne", "__ne__"), "__ne__"),
                    (("lt", "__lt__", "less"), "__lt__"), (("le", "__le__"), "__le__"),
                    (("gt", "__gt__", "greater"), "__gt__"), (("ge", "__ge__"), "__ge__"),
                    (("__and__", "bitwise_and"), "__and__"), (("__or__", "bitwise_or"), "__or__")):
    for _n in _names:
        _TORCH_FUNCTIONS[_n] = _binop(_op)
for _n, _op in (("__radd__", "__add__"), ("__rsub__", "__sub__"), ("__rmul__", "__mul__"),
                ("__rtruediv__", "__truediv__"), ("__rdiv__", "__truediv__"),
                ("__rfloordiv__", "__floordiv__"), ("__rmod__", "__mod__"), ("__rpow__", "__pow__"),
                ("__rand__", "__and__"), ("__ror__", "__or__")):
    _TORCH_FUNCTIONS[_n] = _rbinop(_op)
# fmod takes the dividend's sign, unlike Python's %; only non-negative operands agree.
del _TORCH_FUNCTIONS["fmod"]


# ---------------------------------------------------------------------------------------------
# Spec generation and the drop-in

_KERNELS: dict[tuple[str, str], object] = {}


def _trace(score_mod, mask_mod, sizes=None):
    tracer = _Tracer(sizes)
    b, h, i, j = (_Proxy(tracer, n, "int") for n in ("b", "h", "i", "j"))
    score_text = mask_text = None
    if score_mod is not None:
        out = _lift(tracer, score_mod(_Proxy(tracer, "s", "float"), b, h, i, j))
        if out.text != "s":
            score_text = out.text
    if mask_mod is not None:
        out = _lift(tracer, mask_mod(b, h, i, j))
        if out.kind != "bool":
            raise TraceError("mask_mod must return a boolean")
        if out.text != "true":
            mask_text = out.text
    return tracer, score_text, mask_text


def build_spec(score_mod=None, mask_mod=None, enable_gqa=False, shape=None):
    """The attncc spec text for a FlexAttention call, and the captured tensors (in the order
    of the inputs `cap0`, `cap1`, ...). `shape` is the call's (B, H, N, M)."""
    sizes = {} if shape is None else dict(zip("bhij", zip("BHNM", shape)))
    tracer, score_text, mask_text = _trace(score_mod, mask_mod, sizes)
    inputs = ["q[B,H,N,D]", "k[B,G,M,D]" if enable_gqa else "k[B,H,M,D]",
              "v[B,G,M,E]" if enable_gqa else "v[B,H,M,E]"] + tracer.declarations()
    kh = "h // R" if enable_gqa else "h"
    lines = [f"attention flex({', '.join(inputs)}) -> o[B,H,N,E] {{", "  param scale: float"]
    if enable_gqa:
        lines += ["  require H % G == 0", "  let R = H // G"]
    lines.append(f"  s[b,h,i,j] = q[b,h,i,d] * k[b,{kh},j,d] * scale")
    if score_text is not None:
        lines.append(f"  s = {score_text}")
    if mask_text is not None:
        if mask_text == "false":
            mask_text = "j < 0"
        lines.append(f"  mask {mask_text}")
    lines += ["  p = softmax(s, j)", f"  o[b,h,i,e] = p[b,h,i,j] * v[b,{kh},j,e]", "}"]
    return "\n".join(lines) + "\n", tracer.captures


def _kernel(text, backend):
    key = (text, backend)
    kern = _KERNELS.get(key)
    if kern is None:
        from .api import compile as _compile
        kern = _KERNELS[key] = _compile(text, backend=backend)
    return kern


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False, backend="auto", **_ignored):
    """`torch.nn.attention.flex_attention.flex_attention`, compiled by attncc."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ArgumentError(f"{name} must be a 4-D tensor [B, H, N, D]")
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        mask_mod = getattr(block_mask, "mask_mod", None)
        if mask_mod is None:
            raise ArgumentError("block_mask must come from attncc.create_block_mask")
    else:
        mask_mod = block_mask.mask_mod if block_mask is not None else None
    if block_mask is not None:
        q_len, kv_len = getattr(block_mask, "Q_LEN", None), getattr(block_mask, "KV_LEN", None)
        if isinstance(block_mask, BlockMask) and (
                (q_len is not None and q_len != query.shape[2]) or
                (kv_len is not None and kv_len != key.shape[2])):
            raise ArgumentError(f"block_mask was created for Q_LEN={q_len}, KV_LEN={kv_len} but "
                                f"the call has {query.shape[2]} queries and {key.shape[2]} keys")
    gqa = bool(enable_gqa) and key.shape[1] != query.shape[1]
    if scale is None:
        scale = query.shape[-1] ** -0.5
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    text, captures = build_spec(score_mod, mask_mod, gqa, shape)
    kern = _kernel(text, backend)
    kwargs = {f"cap{n}": t for n, t in enumerate(captures)}
    return kern(q=query, k=key, v=value, scale=float(scale), return_lse=bool(return_lse), **kwargs)
