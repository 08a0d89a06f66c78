"""The converters conditions may call, each checked and specialised at compile time.

A converter whose arguments are all constants is folded to a constant; regexes and literal arguments
are validated here so a bad config fails at load, not on the first span.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kotel.ottl.parser import Value
from kotel.ottl.paths import Getter
from kotel.ottl.values import Const

Operand = Const | Getter
Fail = Callable[[str, Value], Exception]  # (reason with {where}, node) -> error to raise
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True, slots=True)
class Spec:
    params: tuple[str, ...]
    returns_bool: bool
    build: Callable[[Sequence[Operand], Sequence[Value], Fail], Operand]
    span_only: bool = False


def _unary(fn: Callable[[Any], Any]) -> Callable[[Sequence[Operand], Sequence[Value], Fail], Operand]:
    def build(args: Sequence[Operand], nodes: Sequence[Value], fail: Fail) -> Operand:
        (arg,) = args
        if isinstance(arg, Const):
            return Const(fn(arg.value))
        return lambda i, s, r, m=None: fn(arg(i, s, r, m))

    return build


def _string_literal(
    name: str, test: Callable[[str, str], bool]
) -> Callable[[Sequence[Operand], Sequence[Value], Fail], Operand]:
    """``F(target, "literal")`` -> bool; a non-string target is false."""

    def build(args: Sequence[Operand], nodes: Sequence[Value], fail: Fail) -> Operand:
        target, lit = args
        if not isinstance(lit, Const) or not isinstance(lit.value, str):
            raise fail(f"the second argument of {name} must be a string literal, at {{where}}", nodes[1])
        text = lit.value
        if isinstance(target, Const):
            return Const(isinstance(target.value, str) and test(target.value, text))
        return lambda i, s, r, m=None: type(v := target(i, s, r, m)) is str and test(v, text)

    return build


def _is_match(args: Sequence[Operand], nodes: Sequence[Value], fail: Fail) -> Operand:
    target, pattern = args
    if not isinstance(pattern, Const) or not isinstance(pattern.value, str):
        raise fail("the pattern of IsMatch must be a string literal, at {where}", nodes[1])
    try:
        search = re.compile(pattern.value).search
    except re.error as exc:
        raise fail(f"invalid regular expression in IsMatch at {{where}}: {exc}", nodes[1]) from None
    if isinstance(target, Const):
        return Const(isinstance(target.value, str) and search(target.value) is not None)
    # The Collector matches unanchored (Go's MatchString), which is re.search, not re.match.
    return lambda i, s, r, m=None: type(v := target(i, s, r, m)) is str and search(v) is not None


def _id_literal(name: str, size: int) -> Callable[[Sequence[Operand], Sequence[Value], Fail], Operand]:
    def build(args: Sequence[Operand], nodes: Sequence[Value], fail: Fail) -> Operand:
        (arg,) = args
        if not isinstance(arg, Const) or not isinstance(arg.value, bytes) or len(arg.value) != size:
            raise fail(f"{name} takes a {size}-byte literal such as 0x{'01' * size}, at {{where}}", nodes[0])
        return arg

    return build


def _is_root_span(args: Sequence[Operand], nodes: Sequence[Value], fail: Fail) -> Operand:
    return lambda i, s, r, m=None: not i.parent_span_id.strip(b"\x00")


def _len(v: Any) -> int | None:
    return len(v) if type(v) in (str, bytes, list, dict) else None


def _to_int(v: Any) -> int | None:
    kind = type(v)
    if kind is int:
        return v
    if kind is bool:
        return int(v)
    if kind is float:
        return int(v) if math.isfinite(v) else None
    if kind is str and _INT_TEXT.fullmatch(v):
        return int(v)
    return None


def _to_double(v: Any) -> float | None:
    kind = type(v)
    if kind is float:
        return v
    if kind is int or kind is bool:
        return float(v)
    if kind is str and "_" not in v:
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _json_default(v: Any) -> str:
    return base64.b64encode(v).decode() if isinstance(v, bytes) else str(v)


def _to_string(v: Any) -> str | None:
    """Spelled as the Collector's String(): Go's shortest float form, hex bytes, JSON maps and lists."""
    kind = type(v)
    if kind is str or v is None:
        return v
    if kind is bool:
        return "true" if v else "false"
    if kind is int:
        return str(v)
    if kind is float:
        if not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
        text = format(Decimal(repr(v)), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    if kind is bytes:
        return v.hex()
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=_json_default)


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda v: type(v) is kind


FUNCTIONS: dict[str, Spec] = {
    "IsMatch": Spec(("target", "pattern"), True, _is_match),
    "HasPrefix": Spec(("target", "prefix"), True, _string_literal("HasPrefix", str.startswith)),
    "HasSuffix": Spec(("target", "suffix"), True, _string_literal("HasSuffix", str.endswith)),
    "IsString": Spec(("value",), True, _unary(_is(str))),
    "IsInt": Spec(("value",), True, _unary(_is(int))),
    "IsDouble": Spec(("value",), True, _unary(_is(float))),
    "IsBool": Spec(("value",), True, _unary(_is(bool))),
    "IsMap": Spec(("value",), True, _unary(_is(dict))),
    "IsList": Spec(("value",), True, _unary(_is(list))),
    "IsRootSpan": Spec((), True, _is_root_span, span_only=True),
    "Len": Spec(("value",), False, _unary(_len)),
    "Int": Spec(("value",), False, _unary(_to_int)),
    "Double": Spec(("value",), False, _unary(_to_double)),
    "String": Spec(("value",), False, _unary(_to_string)),
    "ToLowerCase": Spec(("target",), False, _unary(lambda v: v.lower() if type(v) is str else None)),
    "ToUpperCase": Spec(("target",), False, _unary(lambda v: v.upper() if type(v) is str else None)),
    "TraceID": Spec(("bytes",), False, _id_literal("TraceID", 16)),
    "SpanID": Spec(("bytes",), False, _id_literal("SpanID", 8)),
}
