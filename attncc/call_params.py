"""Tuple and enum params as a call passes them, and as the program's scalar params hold them.

A call passes `kernel=(3, 5, 7)` or `kernel=7` (every entry) for `param kernel: int[3]`,
and `mode="cut"` for `param mode: {shift, cut}`; the program holds int, float and bool
scalars (`kernel_0` ..., `mode` = the position of the name), so that binding, the
reference and the kernels only ever see scalars. `expand` goes from the first form to
the second, `collapse` back (for random arguments and reports).
"""
from __future__ import annotations

import difflib

import torch

from . import ir
from .errors import ArgumentError

_SEQUENCES = (tuple, list, torch.Size)


def expand(program: ir.Program, kwargs: dict) -> dict:
    """A call's keyword arguments with each tuple or enum param replaced by its scalars.
    Unknown names, a tuple of the wrong length, an unknown choice and a missing param
    without default are errors naming the argument as the call spelt it."""
    params = program.call_params()
    expected = list(program.inputs) + list(params)
    for name in kwargs:
        if name not in program.inputs and name not in params:
            close = difflib.get_close_matches(name, expected + ["return_lse"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ArgumentError(f"{program.name}() got an unknown argument '{name}'{hint}; "
                                f"it takes: {', '.join(expected)}, return_lse")
    out = {name: value for name, value in kwargs.items() if name not in program.groups}
    for name, group in program.groups.items():
        value = kwargs.get(name)
        if value is None:
            if any(s.default is None for s in group.scalars):
                raise ArgumentError(f"{program.name}() is missing the argument '{name}' "
                                    f"({group.describe()} param)")
            continue
        if group.is_enum:
            out[group.scalars[0].name] = _choice(group, value)
        else:
            out.update(zip((s.name for s in group.scalars), _entries(group, value)))
    return out


def _choice(group: ir.ParamGroup, value) -> int:
    if not isinstance(value, str) or value not in group.choices:
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise ArgumentError(f"param '{group.name}' must be {group.describe()}, got {shown}")
    return group.choices.index(value)


def _entries(group: ir.ParamGroup, value) -> list:
    """One value per entry: a sequence of the right length (a tuple, a list, a `torch.Size`, a
    1-D numpy array or tensor), or one value for every entry (its type is checked per entry by
    `bind`, which names the entry)."""
    n = len(group.scalars)
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):  # a 1-D numpy array or tensor
        value = tuple(value.tolist())
    if isinstance(value, _SEQUENCES):
        if len(value) != n:
            raise ArgumentError(f"param '{group.name}' takes {n} entries {group.describe()} (or one value for "
                                f"every entry), got {len(value)}: {tuple(value)!r}")
        return list(value)
    if isinstance(value, (str, bytes, dict, set)):
        raise ArgumentError(f"param '{group.name}' must be a tuple {group.describe()} or one value for every "
                            f"entry, got {type(value).__name__}")
    return [value] * n


def collapse(program: ir.Program, scalars: dict) -> dict:
    """Param values by the names a call uses: a tuple per tuple param, the chosen name per
    enum param (the inverse of `expand`), for the scalars present in `scalars`."""
    out = {}
    for name, param in program.call_params().items():
        if isinstance(param, ir.ParamGroup):
            values = [scalars.get(s.name) for s in param.scalars]
            if any(v is None for v in values):
                continue
            out[name] = param.choices[values[0]] if param.is_enum else tuple(values)
        elif name in scalars:
            out[name] = scalars[name]
    return out
