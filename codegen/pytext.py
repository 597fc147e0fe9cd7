"""Spec-derived text in generated Python: only as comments or string literals that cannot break out.

A spec's lines, its file name and its description are data. Written into Python source
as they are, a newline (or a lone CR) ends a comment early, three double quotes end a
docstring, and a NUL byte makes the module unparseable: what follows would run as code.
Every piece of such text goes through one of the functions below.
"""
from __future__ import annotations


def escape_text(text: str) -> str:
    """`text` on one line of printable characters: every character that is not printable
    (line and paragraph separators, CR, NUL, other controls, bidi overrides, ...) becomes
    its backslash escape, as `repr` would write it. Safe inside a comment."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def comment(text: str) -> str:
    """A `# ...` comment holding `text` on a single line."""
    return "# " + escape_text(text)


def docstring(text: str) -> str:
    """A triple-quoted string literal whose value reads as `text`: its lines are kept,
    backslashes and double quotes are escaped (no run of quotes can end it early), and
    each line is escaped as by `escape_text` (the literal has as many lines as `text`)."""
    lines = (escape_text(line.replace("\\", "\\\\").replace('"', '\\"')) for line in text.split("\n"))
    return '"""' + "\n".join(lines) + '"""'
