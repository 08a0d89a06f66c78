"""Text -> small AST for the OTTL condition subset, with errors phrased for a person editing YAML.

lark does the lexing and LALR parsing; this module turns its tree into frozen dataclasses (so the compiler
never sees lark) and its exceptions into :class:`OttlError` with a 1-based line/column and the expected
input described in OTTL words rather than terminal names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path as _FsPath

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class OttlError(ValueError):
    """A condition that cannot be compiled; ``str()`` quotes the condition and says where and why."""

    def __init__(self, text: str, reason: str, line: int, column: int, index: int | None = None) -> None:
        # ``reason`` may hold ``{where}``, filled with "column C" (or "line L, column C" when multi-line).
        where = f"line {line}, column {column}" if "\n" in text.strip() else f"column {column}"
        self.text = text
        self.reason = reason.replace("{where}", where)
        self.line = line
        self.column = column
        self.index = index  # position in the list given to compile_conditions, if any
        super().__init__(f"invalid OTTL condition '{text}': {self.reason}")


# --- AST ------------------------------------------------------------------------------------------------

Scalar = None | bool | int | float | str | bytes


@dataclass(frozen=True, slots=True)
class Literal:
    value: Scalar
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class EnumRef:
    name: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class PathRef:
    names: tuple[str, ...]
    keys: tuple[str | int, ...]
    line: int
    column: int

    @property
    def dotted(self) -> str:
        return ".".join(self.names)


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Value, ...]
    keys: tuple[str | int, ...]
    line: int
    column: int


Value = Literal | EnumRef | PathRef | Call


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Value
    right: Value
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Not:
    operand: BoolExpr


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[BoolExpr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[BoolExpr, ...]


BoolExpr = Compare | Not | And | Or | Value


# --- parsing --------------------------------------------------------------------------------------------


@cache
def _lark() -> lark.Lark:
    grammar = (_FsPath(__file__).parent / "grammar.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", maybe_placeholders=True)


def parse(text: str) -> BoolExpr:
    """Parse one condition; raises OttlError for any syntax or literal problem."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(text, exc) from None
    return _Builder(text).bool_expr(tree.children[0])


class _Builder:
    """lark tree -> AST; literal decoding errors need the text, hence a class rather than a Transformer."""

    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, reason: str, line: int, column: int) -> OttlError:
        return OttlError(self.text, reason, line, column)

    def bool_expr(self, node: lark.Tree | lark.Token) -> BoolExpr:
        if isinstance(node, lark.Tree):
            kind = node.data
            if kind == "or_expr":
                return Or(tuple(self.bool_expr(c) for c in node.children))
            if kind == "and_expr":
                return And(tuple(self.bool_expr(c) for c in node.children))
            if kind == "negation":
                return Not(self.bool_expr(node.children[1]))
            if kind == "comparison":
                left, op, right = node.children
                assert isinstance(op, lark.Token)
                return Compare(str(op), self.value(left), self.value(right), op.line or 1, op.column or 1)
        return self.value(node)

    def value(self, node: lark.Tree | lark.Token) -> Value:
        assert isinstance(node, lark.Tree)
        kind = node.data
        if kind == "path":
            names = [c for c in node.children if isinstance(c, lark.Token)]
            keys = tuple(self.key(c) for c in node.children if isinstance(c, lark.Tree))
            first = names[0]
            return PathRef(tuple(str(n) for n in names), keys, first.line or 1, first.column or 1)
        if kind == "call":
            name, *rest = node.children
            assert isinstance(name, lark.Token)
            args = tuple(self.value(c) for c in rest if isinstance(c, lark.Tree) and c.data != "key")
            keys = tuple(self.key(c) for c in rest if isinstance(c, lark.Tree) and c.data == "key")
            return Call(str(name), args, keys, name.line or 1, name.column or 1)
        token = node.children[0]
        assert isinstance(token, lark.Token)
        line, column = token.line or 1, token.column or 1
        if kind == "enum":
            return EnumRef(str(token), line, column)
        return Literal(self.literal(kind, token), line, column)

    def key(self, node: lark.Tree) -> str | int:
        token = node.children[0]
        assert isinstance(token, lark.Token)
        return self.literal("string" if token.type == "STRING" else "int", token)

    def literal(self, kind: str, token: lark.Token) -> Scalar:
        raw = str(token)
        line, column = token.line or 1, token.column or 1
        if kind == "string":
            return self.unquote(raw, line, column)
        if kind == "int":
            number = int(raw)
            if not _INT64_MIN <= number <= _INT64_MAX:
                raise self.fail(f"integer {raw} at {{where}} does not fit in 64 bits", line, column)
            return number
        if kind == "float":
            return float(raw)
        if kind == "bytes":
            if len(raw) % 2:
                reason = f"bytes literal {raw} at {{where}} has an odd number of hex digits"
                raise self.fail(reason, line, column)
            return bytes.fromhex(raw[2:])
        return {"true": True, "false": False, "nil": None}[kind]

    def unquote(self, raw: str, line: int, column: int) -> str:
        def one(match: re.Match[str]) -> str:
            esc = match.group(1)
            if esc in _SIMPLE_ESCAPES:
                return _SIMPLE_ESCAPES[esc]
            if esc[0] in "xuU" and len(esc) > 1:
                return chr(int(esc[1:], 16))
            if esc.isdigit() and len(esc) == 3:
                return chr(int(esc, 8))
            offset = match.start() + 1  # the match is in raw[1:-1]
            at_line = line + raw.count("\n", 0, offset)
            at_col = offset - raw.rfind("\n", 0, offset) if at_line != line else column + offset
            hint = f"write \\\\{esc[0]} for a literal backslash, e.g. in a regex"
            raise self.fail(f"invalid escape '\\{esc[0]}' in string at {{where}} ({hint})", at_line, at_col)

        return _ESCAPE.sub(one, raw[1:-1])


_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"', "'": "'",
}  # fmt: skip
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)", re.DOTALL)


# --- syntax errors --------------------------------------------------------------------------------------

_VALUE_START = {"STRING", "NAME", "INT"}
_PHRASES = {
    "COMP_OP": "a comparison operator (==, !=, <, <=, >, >=)",
    "_AND": "'and'",
    "_OR": "'or'",
    "_COMMA": "','",
    "_RPAR": "')'",
    "_RSQB": "']'",
    "$END": "end of input",
}
_VALUE = "a value (string, number, bool, nil, path or function call)"
_CONDITION = "a condition (comparison, true/false, function call, 'not' or '(')"


def _describe_expected(accepts: set[str]) -> str:
    if accepts >= _VALUE_START:
        return _CONDITION if "NOT" in accepts else _VALUE
    if accepts and accepts <= {"STRING", "INT"}:
        return "a string or integer key"
    if accepts == {"NAME"}:
        return "a field name"
    if accepts == {"_LPAR"}:
        return "'('"
    parts = [phrase for term, phrase in _PHRASES.items() if term in accepts]
    if not parts:  # only path continuations ('.', '[', '(') are left
        return "'.', '[' or '('"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _accepts(prefix: str) -> set[str]:
    """Exactly which terminals may follow ``prefix`` (lark's own expected sets include LALR look-aheads)."""
    interactive = _lark().parse_interactive(prefix)
    interactive.exhaust_lexer()
    return set(interactive.accepts())


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _syntax_error(text: str, exc: UnexpectedInput) -> OttlError:
    if not text.strip():
        return OttlError(text, "the condition is empty", 1, 1)
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        pos = len(text.rstrip())
        line, column = _line_col(text, pos)
        return OttlError(
            text, f"unexpected end of input at {{where}}, expected {_describe_expected(_accepts(text))}",
            line, column,
        )  # fmt: skip
    if isinstance(exc, UnexpectedToken):
        pos = exc.token.start_pos if exc.token.start_pos is not None else 0
        what = f"'{exc.token}'"
    else:
        assert isinstance(exc, UnexpectedCharacters)
        pos = exc.pos_in_stream
        if text[pos] == '"':
            line, column = _line_col(text, pos)
            return OttlError(text, "unterminated string starting at {where}", line, column)
        what = f"character '{text[pos]}'"
    line, column = _line_col(text, pos)
    try:
        expected = _describe_expected(_accepts(text[:pos]))
    except UnexpectedInput:  # cannot happen for a prefix that lexed and parsed up to pos; stay robust
        return OttlError(text, f"unexpected {what} at {{where}}", line, column)
    return OttlError(text, f"unexpected {what} at {{where}}, expected {expected}", line, column)
