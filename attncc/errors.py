"""Errors that point at the spec: file, line, column, the line itself and a caret.

Every problem found in a spec (syntax or meaning) is a `SpecError`; every problem
with the arguments of a call is an `ArgumentError` (a `TypeError`) or a
`ShapeError` (a `ValueError`) naming the argument, so callers can catch them
with the exception types Python users expect.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loc:
    """A span in a spec, 1-based like editors show it."""

    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    @classmethod
    def of(cls, meta) -> "Loc | None":
        """The span of a lark tree or token, or None when lark has no position."""
        line = getattr(meta, "line", None)
        if line is None:
            return None
        return cls(line, meta.column, getattr(meta, "end_line", None), getattr(meta, "end_column", None))


@dataclass(frozen=True)
class Source:
    """The text of a spec and the name to report it under."""

    text: str
    filename: str = "<string>"

    def line(self, number: int) -> str:
        """Line `number` as the parser counts lines: only `\\n` ends one (lark's rule;
        `str.splitlines` would also split at a lone CR, U+2028, form feeds ...)."""
        lines = self.text.split("\n")
        return lines[number - 1].removesuffix("\r") if 0 < number <= len(lines) else ""

    def end(self) -> "Loc":
        """Just past the last non-empty line, counted the same way (where EOF errors point)."""
        lines = self.text.rstrip("\r\n").split("\n")
        return Loc(len(lines), len(lines[-1].removesuffix("\r")) + 1)


class SpecError(Exception):
    """A problem in a spec, reported as `file:line:col: error: ...` with the line and a caret."""

    def __init__(self, message: str, source: Source | None = None, loc: Loc | None = None,
                 expected: str | None = None):
        self.message = message
        self.source = source
        self.loc = loc
        self.expected = expected
        super().__init__(self.render())

    @property
    def line(self) -> int | None:
        return self.loc.line if self.loc else None

    @property
    def column(self) -> int | None:
        return self.loc.column if self.loc else None

    def render(self) -> str:
        return render(self.message, self.source, self.loc, self.expected)


class SpecWarning(UserWarning):
    """A spec that is valid but almost surely not what was meant; its text is located like
    a `SpecError`'s (`file:line:col: warning: ...`, the line, a caret)."""


def render(message: str, source: Source | None, loc: Loc | None, expected: str | None,
           label: str = "error") -> str:
    """`file:line:col: LABEL: message`, the line, a caret under the span, what was expected."""
    filename = source.filename if source else "<spec>"
    if loc is None:
        head = f"{filename}: {label}: {message}"
        return head + (f"\n  expected {expected}" if expected else "")
    text = source.line(loc.line) if source else ""
    width = 1
    if loc.end_line == loc.line and loc.end_column:
        width = max(1, loc.end_column - loc.column)
    # Characters that would move the cursor or end the line on a terminal (CR, NUL,
    # U+2028 ...) are shown as one visible character each, so the caret stays under its
    # column; tabs are kept, and copied into the caret's indent.
    text = "".join(c if c.isprintable() or c == "\t" else "\ufffd" for c in text)
    caret = "".join("\t" if c == "\t" else " " for c in text[:loc.column - 1])
    caret = caret.ljust(loc.column - 1) + "^" * width
    parts = [f"{filename}:{loc.line}:{loc.column}: {label}: {message}", f"  {text}", f"  {caret}"]
    if expected:
        parts.append(f"  expected {expected}")
    return "\n".join(parts)


class ArgumentError(TypeError):
    """A call passed a missing, unknown or wrongly typed argument."""


class ShapeError(ValueError):
    """A call passed tensors whose shapes, devices or values break the spec's contract."""


class CacheError(OSError):
    """A cache folder or file attncc needs cannot be created, read or written; the message
    names it and says where the cache dir comes from (`ATTNCC_CACHE_DIR`)."""


class BackendError(RuntimeError):
    """The backend asked for cannot run here; attncc never substitutes another silently."""
