"""The two namespaces of generated Triton source: names from the spec, and names of our own.

A spec may call its tensors, dims, params, indices or itself anything an identifier can
spell: `acc`, `c1`, `tl`, `lambda`, `BLOCK_M`. Such a name must never meet a name the
generator chose (`acc` the accumulator, `tl` the module, a constexpr keyword argument) nor
another user name. So every identifier derived from a user name is built here, and only
here, as `{role}_{name}`: `role` is a fixed token without underscore saying what the
identifier is (`ptr_q`: q's base pointer, `st2_q`: its stride along axis 2, `dim_N`,
`par_window`, `idx_b`). Splitting at the first underscore gives back the role and the name,
so the scheme is injective; and no generated name starts with `{role}_` (checked by
`is_generated`, and in the tests over every generated module), so the two sets never meet.
A user name always has text before it, so it can be no keyword and no builtin either.

Intermediates computed before the launch (precomputed inputs) are named by the planner,
not by the user: their names are not identifiers (`<pre0>`, so they cannot collide with an
input's name in a call's tensors either), and their kernel identifiers are generated ones
(`pre0_ptr`, `pre0_st2`).
"""
from __future__ import annotations

import re

# role token -> what the identifier holds
ROLES = {
    "ptr": "base pointer of an input tensor",
    "st": "stride of an input tensor along one axis (`st{axis}`)",
    "sz": "size of an input tensor along one axis (`sz{axis}`)",
    "kbase": "base pointer of a key tensor's tiles for this program",
    "kdesc": "TMA tensor descriptor of a key tensor's [keys, features] view for this program",
    "ktile": "a key tensor's tile, when several terms read different keys",
    "dim": "a dim of the spec, passed as a scalar argument",
    "par": "a param of the spec, passed as a scalar argument",
    "idx": "the value of an outer (batch, head) index in this program",
    "size": "the extent of an outer index",
    "grp": "the K/V group of a packed (GQA) head index",
    "attn": "a kernel function of the spec (`attn_{spec}_fwd`, ...)",
}
_AXIS_ROLES = ("st", "sz")
ROLE_PREFIX = re.compile(r"(?:ptr|kbase|kdesc|ktile|dim|par|idx|size|grp|attn|st\d+|sz\d+)_")


def user(role: str, name: str, axis: int | None = None) -> str:
    """The identifier of user name `name` in role `role` (with an axis number for strides
    and sizes). The only way generated code spells a user-derived identifier."""
    if role not in ROLES or (axis is None) == (role in _AXIS_ROLES):
        raise ValueError(f"unknown role {role!r} (axis {axis})")
    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a user name")
    return f"{role}{'' if axis is None else axis}_{name}"


def split(ident: str) -> tuple[str, str] | None:
    """(role token, user name) of a user-derived identifier; None for a generated one."""
    m = ROLE_PREFIX.match(ident)
    return (ident[:m.end() - 1], ident[m.end():]) if m else None


def is_generated(ident: str) -> bool:
    """Whether a generated (not user-derived) identifier stays out of the user namespace."""
    return ROLE_PREFIX.match(ident) is None


def synthetic(k: int) -> str:
    """The name of the planner's k-th precomputed input: never a user's tensor name."""
    return f"<pre{k}>"


def is_synthetic(name: str) -> bool:
    return name.startswith("<") and name.endswith(">")


def tensor(kind: str, name: str, axis: int | None = None) -> str:
    """The identifier of an input tensor's pointer (`ptr`), stride (`st`), size (`sz`),
    key base (`kbase`), key descriptor (`kdesc`) or key tile (`ktile`): user-derived for the spec's inputs,
    generated (`pre0_ptr`) for precomputed ones."""
    if is_synthetic(name):
        ident = f"{name[1:-1]}_{kind}{'' if axis is None else axis}"
        assert is_generated(ident), ident
        return ident
    return user(kind, name, axis)


def kernel(spec: str, suffix: str = "") -> str:
    """A kernel function's name: the spec's name in the `attn` role, then what it does."""
    return user("attn", spec) + suffix


def scalar(node) -> str:
    """The argument of a dim or param (an `ir.Scalar`)."""
    return user("dim" if node.role == "dim" else "par", node.name)
