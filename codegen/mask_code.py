"""Triton text of the mask plan: its integer expressions and guards, as generated code.

`passes/mask_analysis.py` leaves a mask as data (per conjunct, sympy expressions of the
tile bounds, dims and params, and guards on parameters). This module prints them: `Max`
and `Min` become `tl.maximum` and `tl.minimum`, `floor` and `ceiling` of rationals integer
division in a form that is right under both Python's flooring and Triton's truncating
`//` and `%`. The text is also valid Python, and `evaluate_printed` runs it (with numpy
standing in for `tl`), which is how the tests check the printer against the analysis'
own evaluation.
"""
from __future__ import annotations

from functools import lru_cache, reduce
from types import SimpleNamespace

import numpy as np
import sympy as sp

from attncc.passes.mask_analysis import integer_fraction


def _floordiv(num: sp.Expr, den: int) -> str:
    """``floor(num / den)`` that is right under both Python's flooring and
    Triton's truncating integer ``//`` and ``%``: the dividend is first made
    an exact multiple of ``den``."""
    if den == 1:
        return to_triton(num)
    p = to_triton(num)
    return f"(({p} - ({p} % {den} + {den}) % {den}) // {den})"


def to_triton(expr) -> str:
    """Triton source (also valid Python) for an integer-valued plan expression.

    ``Max``/``Min`` become ``tl.maximum``/``tl.minimum``, ``floor``/``ceiling`` of
    rationals become integer division, symbols print by name.
    """
    e = sp.sympify(expr)
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, (sp.Max, sp.Min)):
        fn = "tl.maximum" if isinstance(e, sp.Max) else "tl.minimum"
        return reduce(lambda acc, x: f"{fn}({acc}, {to_triton(x)})", e.args[1:], to_triton(e.args[0]))
    if isinstance(e, sp.Abs):
        return to_triton(sp.Max(e.args[0], -e.args[0], evaluate=False))
    if isinstance(e, sp.floor):
        return _floordiv(*integer_fraction(e.args[0]))
    if isinstance(e, sp.ceiling):
        num, den = integer_fraction(e.args[0])
        return f"(-{_floordiv(-num, den)})" if den != 1 else to_triton(num)
    if e.is_Add:
        terms = sorted(e.args, key=lambda t: t.could_extract_minus_sign())
        out = to_triton(terms[0])
        for t in terms[1:]:
            out += f" - {to_triton(-t)}" if t.could_extract_minus_sign() else f" + {to_triton(t)}"
        return f"({out})"
    if e.is_Mul:
        coeff, factors = e.as_coeff_mul()
        if coeff.is_Integer:
            body = " * ".join(to_triton(f) for f in factors)
            return {1: f"({body})", -1: f"(-{body})"}.get(int(coeff), f"({int(coeff)} * {body})")
    raise TypeError(f"cannot print {e} as integer code")


def printed(expr, codes: dict[str, str]) -> str:
    """Triton code of a sympy integer expression whose symbols are spelled as `codes` says
    (by sympy name): user names never reach the kernel as they are."""
    expr = sp.sympify(expr)
    missing = {s.name for s in expr.free_symbols} - set(codes)
    if missing:
        raise ValueError(f"no code for symbols {sorted(missing)}")
    subs = {s: sp.Symbol(codes[s.name], **s.assumptions0) for s in expr.free_symbols}
    return to_triton(expr.xreplace(subs))


def guard_code(g, codes: dict[str, str]) -> str:
    """Triton code for a guard (a condition on scalars only)."""
    if isinstance(g, sp.Symbol):
        return f"({codes[g.name]} != 0)"
    if isinstance(g, sp.Not):
        return f"({guard_code(g.args[0], codes)} == 0)"
    if isinstance(g, (sp.And, sp.Or)):
        op = " & " if isinstance(g, sp.And) else " | "
        return "(" + op.join(guard_code(a, codes) for a in g.args) + ")"
    if isinstance(g, sp.core.relational.Relational):
        return f"({printed(g.lhs, codes)} {g.rel_op} {printed(g.rhs, codes)})"
    if g in (sp.true, sp.false):
        return str(bool(g))
    raise TypeError(f"cannot print guard {g}")


_NUMPY_TL = SimpleNamespace(maximum=np.maximum, minimum=np.minimum)


@lru_cache(maxsize=None)
def _compiled(expr: sp.Expr):
    """The printed expression, compiled with its symbols renamed `arg0, arg1, ...` (a user
    dim may be called `tl`, and made-up symbols are no identifiers), and the original names."""
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    safe = {s: sp.Symbol(f"arg{k}", **s.assumptions0) for k, s in enumerate(symbols)}
    return compile(to_triton(expr.xreplace(safe)), "<mask bound>", "eval"), tuple(s.name for s in symbols)


def evaluate_printed(expr, values: dict):
    """Value of a plan expression for Python ints or numpy int arrays, computed by running
    its printed source (``tl`` as numpy): a check of ``to_triton`` against
    ``mask_analysis.evaluate``. ``values`` maps symbols (or their names) to values."""
    code, names = _compiled(sp.sympify(expr))
    by_name = {str(k): v for k, v in values.items()}
    return eval(code, {"tl": _NUMPY_TL}, {f"arg{k}": by_name[n] for k, n in enumerate(names)})
