"""The abstract syntax of a spec: what `grammar/attn.lark` parses, as plain dataclasses.

The AST keeps the spec's shape and every node's position; meaning (which names are
tensors, which are indices, what is summed) is decided later by the frontend.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources

import lark

from .errors import Loc, Source, SpecError



# ----------------------------------------------------------------------------- expressions
@dataclass
class Expr:
    loc: Loc | None = field(default=None, kw_only=True, compare=False, repr=False)


@dataclass
class Num(Expr):
    value: int | float


@dataclass
class Name(Expr):
    id: str


@dataclass
class Access(Expr):
    name: str
    args: list[Expr]


@dataclass
class BlockedAxis(Expr):
    """`i by 64 as qb` inside a reduction: reduce `i` within consecutive blocks."""

    index: str
    size: Expr
    alias: str | None


@dataclass
class Call(Expr):
    func: str
    args: list[Expr]


@dataclass
class BinOp(Expr):
    op: str  # + - * / // % ** == != < <= > >= and or
    left: Expr
    right: Expr


@dataclass
class Unary(Expr):
    op: str  # neg, not
    operand: Expr


@dataclass
class Member(Expr):
    """`x in t[b, g, :]`: whether some entry of `t` along the `:` axis (None in `args`) equals `x`."""

    value: Expr
    name: str
    args: list[Expr | None]
    name_loc: Loc | None = field(default=None, compare=False, repr=False)


@dataclass
class IfElse(Expr):
    cond: Expr
    then: Expr
    other: Expr


# ----------------------------------------------------------------------------- statements
@dataclass
class Decl:
    name: str
    dims: list[str | int | Expr]  # a dim name, a fixed size, or an expression deriving it (`2 * R + 1`)
    dtype: str
    loc: Loc | None = field(default=None, compare=False, repr=False)
    default: Expr | None = field(default=None, kw_only=True)  # an optional input's value when left out
    broadcast: tuple[int, ...] = field(default=(), kw_only=True)  # positions of dims written `H?` (may be 1)


class _Broadcast(str):
    """A dim written `H?` while the grammar is being transformed."""


@dataclass
class Stmt:
    loc: Loc | None = field(default=None, kw_only=True, compare=False, repr=False)


@dataclass
class Param(Stmt):
    name: str
    dtype: str
    default: Expr | None


@dataclass
class TupleParam(Stmt):
    """`param kernel: int[3] = 7` or `param shape: (int, int, int)`: one call argument with
    an entry per type; `default` is one expression for every entry or one per entry."""

    name: str
    dtypes: tuple[str, ...]
    default: Expr | list[Expr] | None


@dataclass
class EnumParam(Stmt):
    """`param mode: {shift, cut} = shift`: one of the listed names at call time."""

    name: str
    choices: list[str]
    default: str | None
    choice_locs: list[Loc] = field(default_factory=list, compare=False, repr=False)
    default_loc: Loc | None = field(default=None, compare=False, repr=False)


@dataclass
class Let(Stmt):
    name: str
    value: Expr


@dataclass
class Require(Stmt):
    cond: Expr


@dataclass
class Mask(Stmt):
    cond: Expr


@dataclass
class Assign(Stmt):
    name: str
    indices: list[str] | None
    op: str  # = += -= *= /=
    value: Expr
    index_locs: list[Loc | None] = field(default_factory=list, compare=False, repr=False)


@dataclass
class MultiAssign(Stmt):
    """`p, ps = softmax(s, j, ss, c)`: one tensor per name, from a call that makes several."""
    names: list[str]
    value: Expr
    name_locs: list[Loc | None] = field(default_factory=list, compare=False, repr=False)


@dataclass
class Repeat(Stmt):
    """`repeat 3 { ... }`: the body's statements, unrolled `count` times by the frontend."""

    count: Expr
    body: list[Stmt]


@dataclass
class Program:
    name: str
    inputs: list[Decl]
    outputs: list[Decl]
    body: list[Stmt]
    source: Source = field(compare=False, repr=False)


# ----------------------------------------------------------------------------- limits
# Every later stage (frontend, extent inference, sympy, planner, code generation, the
# reference executor, the printers) walks expressions recursively, so nesting is bounded
# here, before anything recursive runs; sizes are bounded so that work stays small.
MAX_DEPTH = 100        # operators, calls, accesses and conditionals inside one another
MAX_DECLS = 100        # inputs plus outputs
MAX_STATEMENTS = 1000  # statements in a body
MAX_TEXT = 1_000_000   # characters in a spec
MAX_TUPLE = 16         # entries of a tuple param
INT_MAX = 2 ** 63 - 1  # integer literals (and integer constant expressions) fit in int64

_EXPRESSIONS = {"number", "name", "access", "call", "blocked_axis", "binop", "comparison", "or_",
                "and_", "not_", "neg", "ifelse", "membership"}


# ----------------------------------------------------------------------------- parsing
@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("attncc.grammar").joinpath("attn.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


def _tok_loc(tok: lark.Token) -> Loc:
    return Loc(tok.line, tok.column, tok.end_line, tok.end_column)


class _ToAst(lark.Transformer):
    """Turns lark's parse tree into the dataclasses above, keeping positions."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    # expressions
    def number(self, items):
        tok = items[0]
        text = str(tok)
        value = float(text) if any(c in text for c in ".eE") else int(text)
        return Num(value, loc=_tok_loc(tok))

    def name(self, items):
        return Name(str(items[0]), loc=_tok_loc(items[0]))

    @lark.v_args(meta=True)
    def access(self, meta, items):
        args = [a for a in items[1:] if a is not None]
        return Access(str(items[0]), args, loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def call(self, meta, items):
        args = [a for a in items[1:] if a is not None]
        return Call(str(items[0]), args, loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def blocked_axis(self, meta, items):
        index, size, alias = items
        return BlockedAxis(str(index), size, str(alias) if alias is not None else None, loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def binop(self, meta, items):
        left, op, right = items
        return BinOp(str(op), left, right, loc=Loc.of(meta))

    comparison = binop

    @lark.v_args(meta=True)
    def membership(self, meta, items):
        value, name, *args = items
        return Member(value, str(name), args, loc=Loc.of(meta), name_loc=_tok_loc(name))

    def member_arg(self, items):
        return items[0]

    def searched_axis(self, items):
        return None

    @lark.v_args(meta=True)
    def or_(self, meta, items):
        return BinOp("or", items[0], items[1], loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def and_(self, meta, items):
        return BinOp("and", items[0], items[1], loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def not_(self, meta, items):
        return Unary("not", items[0], loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def neg(self, meta, items):
        return Unary("neg", items[0], loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def ifelse(self, meta, items):
        then, cond, other = items
        return IfElse(cond, then, other, loc=Loc.of(meta))

    # declarations and statements
    def dim(self, items):
        """A dim name, a fixed size, or (any other expression) a derived dim."""
        e = items[0]
        if isinstance(e, Name):
            return e.id
        if isinstance(e, Num) and isinstance(e.value, int):
            return e.value
        return e

    def broadcast_dim(self, items):
        return _Broadcast(str(items[0]))

    @lark.v_args(meta=True)
    def decl(self, meta, items):
        name, *dims, dtype, default = items
        dims = [d for d in dims if d is not None]
        return Decl(str(name), [str(d) if isinstance(d, _Broadcast) else d for d in dims],
                    str(dtype) if dtype else "float", loc=_tok_loc(name), default=default,
                    broadcast=tuple(k for k, d in enumerate(dims) if isinstance(d, _Broadcast)))

    def one_output(self, items):
        return [items[0]]

    def many_outputs(self, items):
        return list(items)

    @lark.v_args(meta=True)
    def param(self, meta, items):
        name, dtype, default = items
        return Param(str(name), str(dtype), default, loc=_tok_loc(name))

    def repeated_type(self, items):
        dtype, count = items
        if not 1 <= int(count) <= MAX_TUPLE:
            raise SpecError(f"a tuple param has {count} entries", self.source, _tok_loc(count),
                            f"between 1 and {MAX_TUPLE} entries")
        return (str(dtype),) * int(count)

    def listed_types(self, items):
        if len(items) > MAX_TUPLE:
            raise SpecError(f"a tuple param has {len(items)} entries", self.source, _tok_loc(items[MAX_TUPLE]),
                            f"at most {MAX_TUPLE} entries")
        return tuple(str(t) for t in items)

    def broadcast_value(self, items):
        return items[0]

    def listed_values(self, items):
        return list(items)

    @lark.v_args(meta=True)
    def tuple_param(self, meta, items):
        name, dtypes, default = items
        return TupleParam(str(name), dtypes, default, loc=_tok_loc(name))

    @lark.v_args(meta=True)
    def enum_param(self, meta, items):
        name, *choices, default = items
        return EnumParam(str(name), [str(c) for c in choices], str(default) if default is not None else None,
                         choice_locs=[_tok_loc(c) for c in choices],
                         default_loc=_tok_loc(default) if default is not None else None, loc=_tok_loc(name))

    @lark.v_args(meta=True)
    def let(self, meta, items):
        return Let(str(items[0]), items[1], loc=_tok_loc(items[0]))

    @lark.v_args(meta=True)
    def require(self, meta, items):
        return Require(items[0], loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def mask(self, meta, items):
        return Mask(items[0], loc=Loc.of(meta))

    @lark.v_args(meta=True)
    def repeat(self, meta, items):
        count, *body = items
        return Repeat(count, [st for st in body if st is not None], loc=Loc.of(meta))

    def target(self, items):
        name, *indices = items
        return name, indices

    @lark.v_args(meta=True)
    def assign(self, meta, items):
        (name, indices), op, value = items
        if indices == [None]:
            idx = None
        else:
            idx = [str(t) for t in indices if t is not None]
        locs = [_tok_loc(t) for t in indices if t is not None] if idx is not None else []
        return Assign(str(name), idx, str(op), value, index_locs=locs, loc=_tok_loc(name))

    @lark.v_args(meta=True)
    def multi_assign(self, meta, items):
        *names, value = items
        return MultiAssign([str(n) for n in names], value, name_locs=[_tok_loc(n) for n in names],
                           loc=_tok_loc(names[0]))

    def program(self, items):
        name, *rest = items
        body_start = next(k for k, x in enumerate(rest) if isinstance(x, list))
        inputs = [d for d in rest[:body_start] if d is not None]
        outputs = rest[body_start]
        body = list(rest[body_start + 1:])
        return Program(str(name), inputs, outputs, body, self.source)

    def start(self, items):
        return items[0]


_TOKEN_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "TYPE": "a type (float, int or bool)",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "COLON": "':'", "ASSIGN_OP": "'=' or an update like '+='", "COMP_OP": "a comparison",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'", "POW_OP": "'**'", "MINUS": "'-'", "PLUS": "'+'",
    "__ANON_0": "'->'", "ATTENTION": "'attention'", "PARAM": "'param'", "LET": "'let'",
    "REQUIRE": "'require'", "MASK": "'mask'", "REPEAT": "'repeat'", "IN": "'in'",
    "IF": "'if'", "ELSE": "'else'", "AND": "'and'", "OR": "'or'",
    "NOT": "'not'", "BY": "'by'", "AS": "'as'", "$END": "the end of the file",
}


_CLOSERS = ("RBRACE", "RPAR", "RSQB", "COMMA")
_GROUPS = (({"ADD_OP", "MUL_OP", "POW_OP", "COMP_OP", "IN", "AND", "OR", "IF"}, "an operator"),
           ({"PARAM", "LET", "REQUIRE", "MASK", "REPEAT", "NAME"}, "another statement"))


def _describe_expected(expected) -> str:
    """Closing brackets first and operators or statement keywords as one word each, so that
    a missing `}` or `)` (the likeliest fix) is never cut from a long list."""
    rest = set(expected)
    words = [_TOKEN_WORDS[t] for t in _CLOSERS if t in rest]
    rest -= set(_CLOSERS)
    for group, word in _GROUPS:
        if group <= rest:
            words.append(word)
            rest -= group
    words += sorted({_TOKEN_WORDS.get(t, t.lower()) for t in rest})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return "one of: " + ", ".join(words) if len(words) > 1 else (words[0] if words else "something else")


def _expected(err, fallback) -> set[str]:
    """The tokens that can really come next: LALR's own sets merge lookaheads from other
    contexts (a stray ')' or ']' offered where no bracket is open)."""
    parser = getattr(err, "interactive_parser", None)
    if parser is not None:
        try:
            return parser.accepts() or set(fallback)
        except Exception:  # noqa: BLE001 - the raw set is still a fair answer
            pass
    return set(fallback)


def parse(text: str, filename: str = "<string>") -> Program:
    """Parse spec text into an AST; syntax errors become `SpecError` with position and caret."""
    source = Source(text, filename)
    if len(text) > MAX_TEXT:
        raise SpecError(f"the spec is too long: {len(text)} characters (the limit is {MAX_TEXT})", source,
                        None, f"at most {MAX_TEXT} characters")
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedToken as err:
        tok = err.token
        if tok.type == "$END":
            loc = source.end()
            what = "unexpected end of file"
        else:
            loc = _tok_loc(tok)
            what = f"unexpected {tok.type == 'NAME' and 'name' or 'token'} '{tok}'"
        raise SpecError(what, source, loc, _describe_expected(_expected(err, err.expected))) from None
    except lark.UnexpectedCharacters as err:
        raise SpecError(f"unexpected character '{text[err.pos_in_stream]}'", source,
                        Loc(err.line, err.column),
                        _describe_expected(_expected(err, err.allowed))) from None
    except lark.UnexpectedEOF as err:
        raise SpecError("unexpected end of file", source, source.end(),
                        _describe_expected(err.expected)) from None
    _check_limits(tree, source)
    try:
        return _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as err:  # a SpecError raised while building the tree
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise


def _first_token(tree) -> lark.Token | None:
    """The first token under a tree, found without recursion."""
    while isinstance(tree, lark.Tree):
        children = [c for c in tree.children if c is not None]
        if not children:
            return None
        tree = children[0]
    return tree


def _tree_loc(tree) -> Loc | None:
    if isinstance(tree, lark.Token):
        return _tok_loc(tree)
    loc = Loc.of(tree.meta) if not tree.meta.empty else None
    tok = _first_token(tree)
    return loc or (_tok_loc(tok) if tok is not None else None)


def _check_limits(tree: lark.Tree, source: Source):
    """Nesting depth, counts and integer literals, checked on lark's tree with an explicit
    stack: a spec past a limit gets a located error before any recursive stage sees it."""
    program = tree.children[0]
    decls = [c for c in program.children if isinstance(c, lark.Tree) and c.data == "decl"]
    outputs = next(c for c in program.children if isinstance(c, lark.Tree) and c.data in ("one_output", "many_outputs"))
    decls += list(outputs.children)
    if len(decls) > MAX_DECLS:
        raise SpecError(f"too many inputs and outputs: {len(decls)} (the limit is {MAX_DECLS})", source,
                        _tree_loc(decls[MAX_DECLS]), f"at most {MAX_DECLS} tensors in the header")
    body = program.children[program.children.index(outputs) + 1:]
    if len(body) > MAX_STATEMENTS:
        raise SpecError(f"too many statements: {len(body)} (the limit is {MAX_STATEMENTS})", source,
                        _tree_loc(body[MAX_STATEMENTS]), f"at most {MAX_STATEMENTS} statements in a body")
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, lark.Token):
            if node.type in ("NUMBER", "INT"):
                _check_int_literal(node, source)
            continue
        if node is None:
            continue
        if node.data in _EXPRESSIONS:
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"expression nested too deeply: more than {MAX_DEPTH} levels of operators, "
                                "calls, accesses or conditionals inside one another", source, _tree_loc(node),
                                f"at most {MAX_DEPTH} levels; name parts of it in separate statements")
        stack.extend((child, depth) for child in reversed(node.children))


def _check_int_literal(tok: lark.Token, source: Source):
    """Integer literals must fit in int64: torch and Triton cannot hold more, and Python
    refuses to convert integers of more than 4300 digits to and from text."""
    text = str(tok)
    if any(c in text for c in ".eE"):
        return  # a float: too large is inf, as in Python's float('1e999')
    digits = text.lstrip("0")
    if len(digits) > len(str(INT_MAX)) or (digits and int(digits) > INT_MAX):
        shown = text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({len(text)} digits)"
        raise SpecError(f"integer literal {shown} is out of range", source, _tok_loc(tok),
                        f"an integer of at most {INT_MAX} (2**63 - 1), or a float such as 1e30")
