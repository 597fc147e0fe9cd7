"""The Python spelling of the attncc language: a function's source to the syntax tree of a spec.

`@attncc.attention` (attncc/decorator.py) reads a decorated function's source with `inspect`
and hands it here. The source is parsed with Python's own `ast` module and translated, node
by node, into the dataclasses of `attncc.syntax`: the same tree a `.attn` file with the same
meaning parses to, so everything after the parser (frontend, extent inference, planning,
code generation, the reference executor) is shared. The function is never executed.

    def alibi(q: "B,H,N,D", k: "B,H,M,D", v: "B,H,M,E", slopes: "H") -> "B,H,N,E":
        s[b, h, i, j] = q[b, h, i, d] * k[b, h, j, d] * D ** -0.5
        ...
        return o

Positions are the Python file's own: the `Source` of the tree is the file's text from its
first line down to the function (lines above it blank), so every `SpecError`, from this
translation or from any later stage, names the file, its real line and column, and shows that
line with a caret. docs/python.md lists the spelling of every construct.
"""
from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass

from . import syntax
from .errors import Loc, Source, SpecError

# Words the .attn grammar reserves: a tensor, index, dim, param or let may not take them, so that
# every tree built here also has a `.attn` text (attncc.printer.format_attn). Python's own
# keywords (if, else, and, or, not, as) cannot be names anyway.
RESERVED = frozenset({"attention", "param", "let", "require", "mask", "repeat", "if", "else", "and", "or", "not",
                      "in", "by", "as"})
TYPES = ("float", "int", "bool")
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_INT = re.compile(r"[0-9]+")

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**"}
_UPDATES = {ast.Add: "+=", ast.Sub: "-=", ast.Mult: "*=", ast.Div: "/="}
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
# Python operators the language lacks, with what to write instead.
_OTHER_BINARY = {ast.MatMult: ("@", "an einsum: `o[i, e] = p[i, j] * v[j, e]` sums over j"),
                 ast.BitAnd: ("&", "`and`"), ast.BitOr: ("|", "`or`"), ast.BitXor: ("^", "`!=` on booleans"),
                 ast.LShift: ("<<", "`*` by a power of 2"), ast.RShift: (">>", "`//` by a power of 2")}
_OTHER_COMPARE = {ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}

STATEMENTS = ("an assignment `t[i, j] = ...` or `t = ...`, an update `t += ...`, `NAME = let(...)`, "
              "`require(...)`, `mask(...)`, or the final `return`")
EXPRESSIONS = ("numbers, names, accesses `t[i, j]`, calls of the language's functions, the operators "
               "+ - * / // % ** == != < <= > >= and or not, and `x if c else y`")
LOOPS = ("einsum statements: an index on the right but not on the left is summed (`o[i] = x[i, j]` sums over j); "
         "`for _ in repeat(3):` repeats assignments")
def _is_call_of(node, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


_STATEMENT_KINDS = {  # Python statement -> (its keyword, how to say it, what to write instead)
    "For": ("for", "a `for` loop", LOOPS), "AsyncFor": ("async", "an `async for` loop", LOOPS),
    "While": ("while", "a `while` loop", LOOPS),
    "If": ("if", "an `if` statement", "`x if c else y` or `where(c, x, y)` inside an expression, or "
                                      "`mask(c)` to restrict the index domain"),
    "With": ("with", "a `with` block", STATEMENTS), "AsyncWith": ("async", "an `async with` block", STATEMENTS),
    "Try": ("try", "a `try` block", STATEMENTS), "TryStar": ("try", "a `try` block", STATEMENTS),
    "Match": ("match", "a `match` statement", "`x if c else y` or `where(c, x, y)`"),
    "FunctionDef": ("def", "a nested function", "the language's functions (docs/language.md, section 4)"),
    "AsyncFunctionDef": ("async", "a nested function", "the language's functions (docs/language.md, section 4)"),
    "ClassDef": ("class", "a class", STATEMENTS), "Import": ("import", "an import", STATEMENTS),
    "ImportFrom": ("from", "an import", STATEMENTS), "Global": ("global", "a `global` declaration", STATEMENTS),
    "Nonlocal": ("nonlocal", "a `nonlocal` declaration", STATEMENTS), "Delete": ("del", "`del`", STATEMENTS),
    "Assert": ("assert", "an `assert`", "`require(...)`, checked when the kernel is called"),
    "Raise": ("raise", "`raise`", STATEMENTS), "Pass": ("pass", "`pass`", STATEMENTS),
    "Break": ("break", "`break`", STATEMENTS), "Continue": ("continue", "`continue`", STATEMENTS),
    "AnnAssign": (None, "an annotated assignment", "`t = ...`, or `NAME = let(...)` for a scalar"),
    "TypeAlias": ("type", "a type alias", STATEMENTS),
}
_EXPRESSION_KINDS = {
    "Lambda": ("a lambda", "the language's functions (docs/language.md, section 4), or a statement "
                           "that names the value"),
    "Attribute": ("an attribute access", "the language's functions by their own names (`exp(x)`, not "
                                         "`torch.exp(x)`)"),
    "List": ("a list", EXPRESSIONS), "Tuple": ("a tuple", EXPRESSIONS), "Set": ("a set", EXPRESSIONS),
    "Dict": ("a dict", EXPRESSIONS), "ListComp": ("a list comprehension", LOOPS),
    "SetComp": ("a set comprehension", LOOPS), "DictComp": ("a dict comprehension", LOOPS),
    "GeneratorExp": ("a generator expression", LOOPS), "JoinedStr": ("an f-string", EXPRESSIONS),
    "NamedExpr": ("`:=`", "a statement `t = ...`"), "Starred": ("`*` unpacking", EXPRESSIONS),
    "Await": ("`await`", EXPRESSIONS), "Yield": ("`yield`", EXPRESSIONS),
    "YieldFrom": ("`yield from`", EXPRESSIONS), "Slice": ("a slice", "one index expression per dim: `t[b, i]`"),
}


@dataclass(frozen=True)
class FunctionSource:
    """A function's source as `inspect` finds it: the lines from its first decorator on,
    as they are in the file (indentation kept), and where they start."""

    text: str
    filename: str
    first_line: int  # the 1-based line of `text`'s first line in the file

    def source(self) -> Source:
        """The `Source` errors are reported in: the file's lines, those above the function blank."""
        return Source("\n" * (self.first_line - 1) + self.text, self.filename)


def function_source(fn) -> FunctionSource:
    """The source of a function (`inspect.getsourcelines`, as `triton.jit` reads it): a file,
    a notebook cell, any code whose text is in `linecache`. A `SpecError` that says so when
    Python has none (`python -c`, the plain REPL, `exec` of a string)."""
    code = getattr(fn, "__code__", None)
    filename = code.co_filename if code is not None else "<unknown>"
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    if not inspect.isfunction(fn):
        raise SpecError(f"@attncc.attention decorates a function (def ...), not {type(fn).__name__} "
                        f"{name!r}", Source("", filename), None,
                        "a function whose body is written in the attncc language (docs/python.md)")
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as err:
        raise SpecError(f"the source of '{name}' is not available ({err}): @attncc.attention reads a "
                        "function's text, which Python keeps for files and notebook cells but not for "
                        "code typed into the plain interpreter or passed to exec() as a string",
                        Source("", filename), None,
                        "the function in a .py file or a notebook cell, or its spec as .attn text "
                        "given to attncc.compile") from None
    return FunctionSource("".join(lines), filename, max(first, 1))


def translate(fn_source: FunctionSource) -> syntax.Program:
    """The syntax tree of the function in `fn_source`; `SpecError` at the culprit otherwise."""
    return _Translator(fn_source).program()


def _top_level_split(text: str) -> list[str]:
    """Split at the commas outside brackets: `"H, clamp(W, 1, 9)"` has two pieces."""
    pieces, depth, start = [], 0, 0
    for k, c in enumerate(text):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            pieces.append(text[start:k])
            start = k + 1
    return pieces + [text[start:]]


def _char_column(line: str, byte_offset: int) -> int:
    """A 0-based character column from the UTF-8 byte offset `ast` gives."""
    if line.isascii():
        return byte_offset
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="replace"))


class _Translator:
    def __init__(self, fn_source: FunctionSource):
        self.fs = fn_source
        self.source = fn_source.source()
        self.shift = fn_source.first_line - 1  # add to a line of the parsed text to get the file's
        self.inner = None  # (text, line, column) while translating a string default's expression

    # ------------------------------------------------------------------ positions and errors
    def loc(self, node) -> Loc | None:
        if getattr(node, "lineno", None) is None:
            return None
        if self.inner is not None:
            return self.inner_loc(node)
        line, end_line = node.lineno + self.shift, (node.end_lineno or node.lineno) + self.shift
        col = _char_column(self.source.line(line), node.col_offset) + 1
        end = node.end_col_offset
        end_col = _char_column(self.source.line(end_line), end) + 1 if end is not None else None
        return Loc(line, col, end_line, end_col)

    def inner_loc(self, node) -> Loc:
        """Inside a string default: the place in the file when the string is a plain one-line
        literal (its characters are the file's), else the whole string."""
        text, where = self.inner
        if where is None or node.lineno != 1 or node.end_lineno != 1:
            return where or self.inner_whole
        line, start = where
        col = _char_column(text, node.col_offset)
        end = _char_column(text, node.end_col_offset)
        return Loc(line, start + col, line, start + end)

    def keyword_loc(self, node, word: str | None) -> Loc:
        """The span of a statement's leading keyword (`for`, `if`, ...), or of its first line."""
        loc = self.loc(node)
        if word is None or not self.source.line(loc.line)[loc.column - 1:].startswith(word):
            return loc
        return Loc(loc.line, loc.column, loc.line, loc.column + len(word))

    def error(self, message: str, where, expected: str | None = None) -> SpecError:
        loc = where if isinstance(where, Loc) or where is None else self.loc(where)
        return SpecError(message, self.source, loc, expected)

    # ------------------------------------------------------------------ the function
    def parse(self) -> ast.FunctionDef:
        text = self.fs.text
        indented = text[:1] in (" ", "\t")
        if indented:  # a method or a nested function: parsed as the body of an `if`, columns kept
            text = "if 1:\n" + text
            self.shift -= 1
        try:
            module = ast.parse(text, filename=self.fs.filename)
        except SyntaxError as err:
            line = (err.lineno or 1) + self.shift
            column = max(_char_column(self.source.line(line), (err.offset or 1) - 1) + 1, 1)
            raise self.error(f"Python cannot parse the function: {err.msg}", Loc(line, column)) from None
        body = module.body[0].body if indented else module.body
        node = body[0] if body else None
        if isinstance(node, ast.AsyncFunctionDef):
            raise self.error("an `async def` is not an attention spec", self.keyword_loc(node, "async"),
                             "a plain `def`")
        if not isinstance(node, ast.FunctionDef):
            raise self.error("@attncc.attention decorates a function", self.loc(node) if node else None,
                             "a `def` whose body is written in the attncc language")
        return node

    def program(self) -> syntax.Program:
        if len(self.fs.text) > syntax.MAX_TEXT:
            raise self.error(f"the function is too long: {len(self.fs.text)} characters (the limit is "
                             f"{syntax.MAX_TEXT})", None, f"at most {syntax.MAX_TEXT} characters")
        fn = self.parse()
        name_loc = self.def_name_loc(fn)
        self.check_name(fn.name, name_loc, "the attention's name")
        inputs = self.inputs(fn.args)
        params = self.params(fn.args)
        output_dims = self.output_dims(fn, name_loc)
        body, returned = self.body(fn)
        if len(returned) != len(output_dims):
            raise self.error(f"`return` names {len(returned)} output{'s' * (len(returned) != 1)} but the "
                             f"return annotation declares {len(output_dims)}", fn.body[-1],
                             "one name per string of dims in `-> ...`")
        outputs = [syntax.Decl(name, dims, dtype, loc=self.loc(node), broadcast=broadcast)
                   for (name, node), (dims, dtype, broadcast) in zip(returned, output_dims)]
        decls = inputs + outputs
        if len(decls) > syntax.MAX_DECLS:
            raise self.error(f"too many inputs and outputs: {len(decls)} (the limit is {syntax.MAX_DECLS})",
                             decls[syntax.MAX_DECLS].loc, f"at most {syntax.MAX_DECLS} tensors")
        statements = params + body
        if len(statements) > syntax.MAX_STATEMENTS:
            raise self.error(f"too many statements: {len(statements)} (the limit is {syntax.MAX_STATEMENTS})",
                             statements[syntax.MAX_STATEMENTS].loc,
                             f"at most {syntax.MAX_STATEMENTS} statements in a body")
        return syntax.Program(fn.name, inputs, outputs, statements, self.source)

    def def_name_loc(self, fn: ast.FunctionDef) -> Loc:
        loc = self.keyword_loc(fn, "def")
        line = self.source.line(loc.line)
        found = re.compile(r"def\s+(" + re.escape(fn.name) + r")\b").match(line, loc.column - 1)
        if not found:
            return loc
        return Loc(loc.line, found.start(1) + 1, loc.line, found.end(1) + 1)

    def check_name(self, name: str, where, what: str):
        if not _NAME.fullmatch(name):
            raise self.error(f"{what} '{name}' is not a name of the attncc language", where,
                             "ASCII letters, digits and underscores, not starting with a digit")
        if name in RESERVED:
            raise self.error(f"'{name}' is a reserved word of the attncc language", where, "another name")

    # ------------------------------------------------------------------ the header
    def inputs(self, args: ast.arguments) -> list[syntax.Decl]:
        if args.vararg is not None:
            raise self.error(f"`*{args.vararg.arg}` is not part of an attention's header", args.vararg,
                             "one parameter per input, then `*` and the params")
        if args.kwarg is not None:
            raise self.error(f"`**{args.kwarg.arg}` is not part of an attention's header", args.kwarg,
                             "one keyword-only argument per param after `*`")
        positional = args.posonlyargs + args.args
        # defaults belong to the last inputs: an optional input (`rows: "B,N: bool" = True`)
        defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
        decls = []
        for arg, default in zip(positional, defaults):
            where = self.arg_loc(arg)
            self.check_name(arg.arg, where, "the input")
            ann = arg.annotation
            if ann is None:
                raise self.error(f"input '{arg.arg}' has no dims", where,
                                 f"its dims as a string: `{arg.arg}: \"B,H,N,D\"`")
            if isinstance(ann, ast.Name) and ann.id in TYPES:
                raise self.error(f"'{arg.arg}: {ann.id}' is a param, and params are keyword-only arguments",
                                 where, f"the param after `*`: `*, {arg.arg}: {ann.id} = ...`")
            dims, dtype, broadcast = self.dims(ann, f"input '{arg.arg}'")
            value = None if default is None else self.default(default)
            decls.append(syntax.Decl(arg.arg, dims, dtype, loc=where, default=value, broadcast=broadcast))
        return decls

    def arg_loc(self, arg: ast.arg) -> Loc:
        loc = self.loc(arg)
        return Loc(loc.line, loc.column, loc.line, loc.column + len(arg.arg))

    def params(self, args: ast.arguments) -> list[syntax.Param]:
        params = []
        for arg, default in zip(args.kwonlyargs, args.kw_defaults):
            where = self.arg_loc(arg)
            self.check_name(arg.arg, where, "the param")
            ann = arg.annotation
            if ann is None:
                raise self.error(f"param '{arg.arg}' has no type", where,
                                 f"`{arg.arg}: int`, `{arg.arg}: float` or `{arg.arg}: bool`")
            if isinstance(ann, ast.Tuple):
                params.append(self.tuple_param(arg, ann, default, where))
                continue
            if isinstance(ann, ast.Set):
                params.append(self.enum_param(arg, ann, default, where))
                continue
            if not (isinstance(ann, ast.Name) and ann.id in TYPES):
                if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
                    raise self.error(f"'{arg.arg}' comes after `*`, so it is a param, and a param's "
                                     "type is int, float or bool", ann,
                                     f"`{arg.arg}: int`, ... for a param, or `{arg.arg}` before `*` "
                                     "for an input")
                raise self.error(f"the type of param '{arg.arg}' must be int, float or bool", ann,
                                 "`int`, `float` or `bool`")
            value = None if default is None else self.default(default)
            params.append(syntax.Param(arg.arg, ann.id, value, loc=where))
        return params

    def tuple_param(self, arg: ast.arg, ann: ast.Tuple, default, where: Loc) -> syntax.TupleParam:
        """`kernel: (int, int, int) = 7` or `= (3, 5, 7)`: a tuple param (`int[3]` in .attn)."""
        for t in ann.elts:
            if not (isinstance(t, ast.Name) and t.id in TYPES):
                raise self.error(f"an entry type of tuple param '{arg.arg}' must be int, float or bool", t,
                                 "`(int, int, int)`")
        if not 1 <= len(ann.elts) <= syntax.MAX_TUPLE:
            raise self.error(f"a tuple param has {len(ann.elts)} entries", ann,
                             f"between 1 and {syntax.MAX_TUPLE} entries")
        if isinstance(default, ast.Tuple):
            value = [self.default(e) for e in default.elts]
        else:
            value = None if default is None else self.default(default)
        return syntax.TupleParam(arg.arg, tuple(t.id for t in ann.elts), value, loc=where)

    def enum_param(self, arg: ast.arg, ann: ast.Set, default, where: Loc) -> syntax.EnumParam:
        """`mode: {"shift", "cut"} = "shift"`: an enum param (`{shift, cut}` in .attn)."""
        choices, locs = [], []
        for c in ann.elts:
            if not (isinstance(c, ast.Constant) and isinstance(c.value, str)):
                raise self.error(f"a choice of enum param '{arg.arg}' must be a name in quotes", c,
                                 '`{"shift", "cut"}`')
            locs.append(self.quoted_loc(c))
            self.check_name(c.value, locs[-1], "the choice")
            choices.append(c.value)
        name, name_loc = None, None
        if default is not None:
            if not (isinstance(default, ast.Constant) and isinstance(default.value, str)):
                raise self.error(f"the default of enum param '{arg.arg}' must be one of its choices, in quotes",
                                 default, "one of: " + ", ".join(f'"{c}"' for c in choices))
            name, name_loc = default.value, self.quoted_loc(default)
        return syntax.EnumParam(arg.arg, choices, name, choice_locs=locs, default_loc=name_loc, loc=where)

    def quoted_loc(self, node: ast.Constant) -> Loc:
        """The characters of a string constant without its quotes when they are the file's."""
        whole = self.loc(node)
        return self.string_part(node)(0, len(node.value)) if self.plain_string(node) else whole

    def default(self, node) -> syntax.Expr:
        """A param's default, read from the source: Python evaluates defaults when the `def` runs,
        so one that reads dims or functions (`-log(M)`) is written as a string, `"-log(M)"`."""
        if isinstance(node, ast.Constant) and node.value is None:
            raise self.error("None is not a param default", node,
                             "no default for a param every call must pass (`window: int`), or a value")
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            return self.expr(node)
        text = node.value
        stripped = text.strip()
        whole = self.loc(node)
        quote = self.plain_string(node)
        where = None
        if quote is not None and "\n" not in text:  # a place in the file for each character
            where = (quote.line, quote.column + 1 + len(text) - len(text.lstrip()))
        try:
            tree = ast.parse(stripped, mode="eval")
        except SyntaxError as err:
            loc = whole
            if where is not None and err.offset:
                loc = Loc(where[0], where[1] + _char_column(stripped, err.offset - 1))
            raise self.error(f"the default {text!r} is not an expression: {err.msg}", loc,
                             "an expression of dims, earlier params and numbers, such as \"-log(M)\"") from None
        self.inner, self.inner_whole = (stripped, where), whole
        try:
            return self.expr(tree.body)
        finally:
            self.inner = None

    def plain_string(self, node: ast.Constant) -> Loc | None:
        """The Loc of a string constant when it is a one-line literal without prefix or escapes
        (so that its characters sit in the file one for one), else None."""
        whole = self.loc(node)
        if whole is None or whole.line != whole.end_line or self.inner is not None:
            return None
        literal = self.source.line(whole.line)[whole.column - 1:whole.end_column - 1]
        if len(literal) >= 2 and literal[0] in "\"'" and literal[-1] == literal[0] and literal[1:-1] == node.value:
            return whole
        return None

    def dims(self, node, what: str) -> tuple[list[str | int], str, tuple[int, ...]]:
        """`"B,H,N,D"`, `"B,N: int"`, `""` (no dims), `"B,H?,M"` (H may be 1): the dims, element
        type and broadcast positions of a tensor."""
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            raise self.error(f"the dims of {what} must be a string", node,
                             "a string of dims such as \"B,H,N,D\", with `: int` or `: bool` for those types")
        text = node.value
        part = self.string_part(node)
        dims_text, colon, rest = text.partition(":")
        dtype = rest.strip() if colon else "float"
        if dtype not in TYPES:
            start = len(dims_text) + 1 + len(rest) - len(rest.lstrip())
            raise self.error(f"unknown element type '{dtype}' in {what}", part(start, start + len(dtype)),
                             "float (the default), int or bool: \"B,N: int\"")
        dims: list[str | int | syntax.Expr] = []
        broadcast: list[int] = []
        if dims_text.strip():
            offset = 0
            for piece in _top_level_split(dims_text):
                dim = piece.strip()
                at = part(offset + len(piece) - len(piece.lstrip()), offset + len(piece.rstrip()))
                offset += len(piece) + 1
                if _INT.fullmatch(dim):
                    if int(dim) > syntax.INT_MAX:
                        raise self.error(f"dim {dim} is out of range", at, f"at most {syntax.INT_MAX}")
                    dims.append(int(dim))
                    continue
                if not dim:
                    raise self.error(f"an empty dim in {what}", at, "names or sizes separated by commas")
                if not _NAME.fullmatch(dim.removesuffix("?").rstrip()):  # derived: `2 * kernel[0] - 1`
                    dims.append(self.dim_expr(dim, node, at, what))
                    continue
                if dim.endswith("?"):  # may be 1: broadcast
                    dim = dim[:-1].rstrip()
                    broadcast.append(len(dims))
                self.check_name(dim, at, "the dim")
                dims.append(dim)
        return dims, dtype, tuple(broadcast)

    def dim_expr(self, text: str, node: ast.Constant, at: Loc, what: str) -> syntax.Expr:
        """A derived dim inside a dims string, translated like a string default."""
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as err:
            raise self.error(f"the dim {text!r} is not a name, a size or an expression ({what}: {err.msg})", at,
                             "a dim name, an integer, or an expression such as \"2 * kernel[0] - 1\"") from None
        where = (at.line, at.column) if self.plain_string(node) is not None else None
        self.inner, self.inner_whole = (text, where), at
        try:
            return self.expr(tree.body)
        finally:
            self.inner = None

    def string_part(self, node: ast.Constant):
        """`part(start, end)`: the Loc of characters start..end of a string constant's value, exact
        when the literal is one line with no escapes, else the whole literal."""
        whole, plain = self.loc(node), self.plain_string(node)

        def part(start: int, end: int) -> Loc:
            if plain is None:
                return whole
            return Loc(whole.line, whole.column + 1 + start, whole.line, whole.column + 1 + max(end, start + 1))
        return part

    def output_dims(self, fn: ast.FunctionDef, name_loc: Loc) -> list[tuple[list[str | int], str]]:
        ann = fn.returns
        if ann is None:
            raise self.error(f"'{fn.name}' has no return annotation: the dims of its outputs", name_loc,
                             "`-> \"B,H,N,E\"`, or `-> (\"B,H,N,E\", \"B,H,N\")` for several outputs")
        items = ann.elts if isinstance(ann, ast.Tuple) else [ann]
        if not items:
            raise self.error("an attention has at least one output", ann, "`-> \"B,H,N,E\"`")
        return [self.dims(item, f"output {k + 1}") for k, item in enumerate(items)]

    # ------------------------------------------------------------------ the body
    def body(self, fn: ast.FunctionDef) -> tuple[list[syntax.Stmt], list[tuple[str, ast.AST]]]:
        statements = list(fn.body)
        if statements and isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant) \
                and isinstance(statements[0].value.value, str):
            statements = statements[1:]  # the docstring
        out: list[syntax.Stmt] = []
        returned = None
        for k, st in enumerate(statements):
            if isinstance(st, ast.Return):
                returned = self.returned(st)
                if k + 1 < len(statements):
                    raise self.error("a statement after `return`", statements[k + 1],
                                     "`return` as the last statement")
                break
            out.append(self.statement(st))
        if returned is None:
            raise self.error(f"'{fn.name}' has no `return`: it names the outputs", self.loc(fn.body[-1]),
                             "`return o` (or `return o, m` for several outputs) as the last statement")
        return out, returned

    def returned(self, st: ast.Return) -> list[tuple[str, ast.AST]]:
        value = st.value
        items = value.elts if isinstance(value, ast.Tuple) else [value] if value is not None else []
        if not items or not all(isinstance(x, ast.Name) for x in items):
            raise self.error("`return` names the output tensors", value or st,
                             "`return o`, or `return o, m` for several outputs")
        for x in items:
            self.check_name(x.id, x, "the output")
        return [(x.id, x) for x in items]

    def statement(self, st) -> syntax.Stmt:
        if isinstance(st, ast.Assign):
            if len(st.targets) != 1:
                raise self.error("a chained assignment `a = b = ...`", st.targets[1], "one target per statement")
            return self.assign(st.targets[0], "=", st.value)
        if isinstance(st, ast.AugAssign):
            op = _UPDATES.get(type(st.op))
            if op is None:
                raise self.error("this update is not part of the attncc language", st,
                                 "`+=`, `-=`, `*=` or `/=`")
            return self.assign(st.target, op, st.value)
        if isinstance(st, ast.Expr):
            call = st.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in ("require", "mask"):
                cond = self.only_argument(call, "condition")
                kind = syntax.Require if call.func.id == "require" else syntax.Mask
                return kind(self.expr(cond), loc=self.loc(call))
            raise self.error("an expression alone is not a statement", st,
                             f"{STATEMENTS}; `require(c)` and `mask(c)` are the statements written as calls")
        if isinstance(st, ast.For) and _is_call_of(st.iter, "repeat"):
            return self.repeat(st)
        kind = _STATEMENT_KINDS.get(type(st).__name__)
        if kind is not None:
            word, what, expected = kind
            raise self.error(f"{what} is not part of the attncc language", self.keyword_loc(st, word), expected)
        raise self.error(f"a `{type(st).__name__}` statement is not part of the attncc language", st, STATEMENTS)

    def repeat(self, st: ast.For) -> syntax.Repeat:
        """`for _ in repeat(3):` (or `repeat(n <= 8)`) over assignments: the .attn `repeat 3 { ... }`."""
        if not isinstance(st.target, ast.Name):
            raise self.error("the loop variable of a repeat is a plain name", st.target, "`for _ in repeat(3):`")
        if st.orelse:
            raise self.error("a repeat has no `else` block", st.orelse[0], "the loop body only")
        count = self.expr(self.only_argument(st.iter, "count"))
        return syntax.Repeat(count, [self.statement(b) for b in st.body], loc=self.loc(st))

    def only_argument(self, call: ast.Call, what: str):
        name = call.func.id
        if call.keywords:
            raise self.error(f"{name}(...) takes no keyword arguments", call.keywords[0], f"`{name}(...)`")
        if len(call.args) != 1 or isinstance(call.args[0], ast.Starred):
            raise self.error(f"{name}(...) takes one {what}, got {len(call.args)} arguments", call,
                             f"`{name}(...)` around one expression")
        return call.args[0]

    def assign(self, target, op: str, value) -> syntax.Stmt:
        if isinstance(target, ast.Tuple) and op == "=" and all(isinstance(t, ast.Name) for t in target.elts):
            for t in target.elts:  # `p, ps = softmax(s, j, ss, c)`: one tensor per key set
                self.check_name(t.id, t, "the tensor")
            return syntax.MultiAssign([t.id for t in target.elts], self.expr(value),
                                      name_locs=[self.loc(t) for t in target.elts], loc=self.loc(target.elts[0]))
        if isinstance(target, ast.Name):
            name, name_node, indices, index_locs = target.id, target, None, []
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            name, name_node = target.value.id, target.value
            items = target.slice.elts if isinstance(target.slice, ast.Tuple) else [target.slice]
            for ix in items:
                if not isinstance(ix, ast.Name):
                    raise self.error("the indices on the left of an assignment are index names", ix,
                                     "`t[b, h, i, j] = ...`; index arithmetic goes on the right")
                self.check_name(ix.id, ix, "the index")
            indices, index_locs = [ix.id for ix in items], [self.loc(ix) for ix in items]
        else:
            raise self.error("an assignment defines one tensor", target,
                             "`t[i, j] = ...` or `t = ...`; one statement per tensor")
        self.check_name(name, name_node, "the tensor")
        where = self.loc(name_node)
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "let":
            if op != "=" or indices is not None:
                raise self.error("a let names a scalar", target if indices is not None else value,
                                 f"`{name} = let(...)`")
            return syntax.Let(name, self.expr(self.only_argument(value, "expression")), loc=where)
        return syntax.Assign(name, indices, op, self.expr(value), index_locs=index_locs, loc=where)

    # ------------------------------------------------------------------ expressions
    def check_depth(self, node):
        """The nesting limit of the .attn parser (`syntax.MAX_DEPTH`), counted the same way (a
        chain `a + b + c` is a level per operator, parentheses none), on Python's tree with an
        explicit stack, before the recursive translation."""
        stack = [(node, 0)]
        while stack:
            n, depth = stack.pop()
            if isinstance(n, ast.BoolOp):
                depth += len(n.values) - 1
            elif isinstance(n, ast.expr) and not isinstance(n, ast.Tuple) and not (
                    isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.UAdd)):
                depth += 1
            if depth > syntax.MAX_DEPTH:
                raise self.error(f"expression nested too deeply: more than {syntax.MAX_DEPTH} levels of "
                                 "operators, calls, accesses or conditionals inside one another", n,
                                 f"at most {syntax.MAX_DEPTH} levels; name parts of it in separate statements")
            stack.extend((child, depth) for child in ast.iter_child_nodes(n) if isinstance(child, ast.expr))

    def expr(self, node) -> syntax.Expr:
        """A whole expression: its depth checked, then translated."""
        self.check_depth(node)
        return self.sub(node)

    def sub(self, node) -> syntax.Expr:
        method = getattr(self, "expr_" + type(node).__name__, None)
        if method is None:
            what, expected = _EXPRESSION_KINDS.get(type(node).__name__, (f"a {type(node).__name__}", EXPRESSIONS))
            raise self.error(f"{what} is not part of the attncc language", node, expected)
        return method(node)

    def expr_Constant(self, node: ast.Constant):
        value = node.value
        if isinstance(value, bool):
            return syntax.Name("true" if value else "false", loc=self.loc(node))
        if isinstance(value, int):
            if value > syntax.INT_MAX:
                text = str(value) if value < 10 ** 30 else f"of {len(str(value))} digits"
                raise self.error(f"integer literal {text} is out of range", node,
                                 f"an integer of at most {syntax.INT_MAX} (2**63 - 1), or a float such as 1e30")
            return syntax.Num(value, loc=self.loc(node))
        if isinstance(value, float):
            return syntax.Num(value, loc=self.loc(node))
        what = {str: "a string", bytes: "a bytes literal", complex: "a complex number",
                type(None): "None", type(...): "`...`"}.get(type(value), repr(value))
        raise self.error(f"{what} is not part of the attncc language", node, EXPRESSIONS)

    def expr_Name(self, node: ast.Name):
        if node.id in ("let", "require", "mask", "by"):
            raise self.misplaced(node.id, node)
        self.check_name(node.id, node, "the name")
        return syntax.Name(node.id, loc=self.loc(node))

    def misplaced(self, word: str, node) -> SpecError:
        expected = {"let": "`NAME = let(expression)` as a statement of its own",
                    "require": "`require(condition)` as a statement of its own",
                    "mask": "`mask(condition)` as a statement of its own",
                    "by": "`by(index, size)` as an axis of a reduction: `mean(q[b, h, i, d], by(i, 64))`"}[word]
        return self.error(f"'{word}' cannot be used here", node, expected)

    def expr_Subscript(self, node: ast.Subscript):
        if not isinstance(node.value, ast.Name):
            raise self.error("only a tensor's name can be indexed", node.value,
                             "`t[i, j]` where t is an input or a defined tensor; name a result before indexing it")
        self.check_name(node.value.id, node.value, "the tensor")
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return syntax.Access(node.value.id, [self.sub(a) for a in items], loc=self.loc(node))

    def expr_Call(self, node: ast.Call):
        func = node.func
        if not isinstance(func, ast.Name):
            if isinstance(func, ast.Attribute):
                raise self.error(f"'{ast.unparse(func)}' is not a function of the attncc language", func,
                                 "the language's functions by their own names (`exp(x)`, not `torch.exp(x)`)")
            raise self.error("only the language's functions can be called", func, "`softmax(s, j)`, `exp(x)`, ...")
        if func.id in ("let", "require", "mask", "by"):
            raise self.misplaced(func.id, node)
        self.check_name(func.id, func, "the function")
        if node.keywords:
            raise self.error("the language's functions take no keyword arguments", node.keywords[0],
                             f"positional arguments: `{func.id}(...)`")
        args = []
        for a in node.args:
            if isinstance(a, ast.Call) and isinstance(a.func, ast.Name) and a.func.id == "by":
                args.append(self.blocked_axis(a))
            else:
                args.append(self.sub(a))
        return syntax.Call(func.id, args, loc=self.loc(node))

    def blocked_axis(self, node: ast.Call) -> syntax.BlockedAxis:
        """`by(i, size)` or `by(i, size, qb)`: the .attn `i by size [as qb]`."""
        shape = "`by(index, size)` or `by(index, size, block_index)`"
        if node.keywords:
            raise self.error("by(...) takes no keyword arguments", node.keywords[0], shape)
        if not 2 <= len(node.args) <= 3:
            raise self.error(f"by(...) takes 2 or 3 arguments, got {len(node.args)}", node, shape)
        index, size, *alias = node.args
        for what, n in (("index", index), *(("block index", a) for a in alias)):
            if not isinstance(n, ast.Name):
                raise self.error(f"the {what} of by(...) must be an index name", n, shape)
            self.check_name(n.id, n, f"the {what}")
        return syntax.BlockedAxis(index.id, self.sub(size), alias[0].id if alias else None, loc=self.loc(node))

    def operator_loc(self, node, left, right, symbol: str) -> Loc:
        """The operator between two operands, when it is on one line; else the whole expression."""
        a, b = self.loc(left), self.loc(right)
        if self.inner is None and a and b and a.end_line == b.line and a.end_column:
            line = self.source.line(b.line)
            at = line.find(symbol, a.end_column - 1, b.column - 1)
            if at >= 0:
                return Loc(b.line, at + 1, b.line, at + 1 + len(symbol))
        return self.loc(node)

    def expr_BinOp(self, node: ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            symbol, expected = _OTHER_BINARY[type(node.op)]
            raise self.error(f"`{symbol}` is not part of the attncc language",
                             self.operator_loc(node, node.left, node.right, symbol), expected)
        return syntax.BinOp(op, self.sub(node.left), self.sub(node.right), loc=self.loc(node))

    def expr_UnaryOp(self, node: ast.UnaryOp):
        if isinstance(node.op, ast.UAdd):  # as the grammar: `+x` is x
            return self.sub(node.operand)
        if isinstance(node.op, ast.Invert):
            raise self.error("`~` is not part of the attncc language", node, "`not`")
        op = "neg" if isinstance(node.op, ast.USub) else "not"
        return syntax.Unary(op, self.sub(node.operand), loc=self.loc(node))

    def expr_BoolOp(self, node: ast.BoolOp):
        op = "and" if isinstance(node.op, ast.And) else "or"
        first = node.values[0]
        result = self.sub(first)
        for value in node.values[1:]:  # left to right, as the grammar groups `a and b and c`
            start, end = self.loc(first), self.loc(value)
            loc = Loc(start.line, start.column, end.end_line, end.end_column) if start and end else None
            result = syntax.BinOp(op, result, self.sub(value), loc=loc)
        return result

    def expr_Compare(self, node: ast.Compare):
        if len(node.ops) > 1:
            raise self.error("comparisons do not chain in the attncc language", node,
                             "`a < b and b < c`")
        if isinstance(node.ops[0], ast.In) and isinstance(node.comparators[0], ast.Subscript):
            return self.membership(node.left, node.comparators[0], node)
        op = _COMPARE.get(type(node.ops[0]))
        if op is None:
            symbol = _OTHER_COMPARE[type(node.ops[0])]
            raise self.error(f"`{symbol}` is not part of the attncc language",
                             self.operator_loc(node, node.left, node.comparators[0], symbol.split()[0]),
                             "`==`, `!=`, `<`, `<=`, `>` or `>=`")
        return syntax.BinOp(op, self.sub(node.left), self.sub(node.comparators[0]), loc=self.loc(node))

    def membership(self, value, table: ast.Subscript, node) -> syntax.Member:
        """`x in t[b, :]`: a bare `:` marks the searched axis, as in the .attn text."""
        if not isinstance(table.value, ast.Name):
            raise self.error("only a tensor's name can be searched", table.value, "`x in t[b, :]`")
        self.check_name(table.value.id, table.value, "the tensor")
        items = table.slice.elts if isinstance(table.slice, ast.Tuple) else [table.slice]
        args = [None if isinstance(a, ast.Slice) and a.lower is None and a.upper is None and a.step is None
                else self.sub(a) for a in items]
        return syntax.Member(self.sub(value), table.value.id, args, loc=self.loc(node),
                             name_loc=self.loc(table.value))

    def expr_IfExp(self, node: ast.IfExp):
        return syntax.IfElse(self.sub(node.test), self.sub(node.body), self.sub(node.orelse), loc=self.loc(node))
