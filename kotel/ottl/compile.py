"""AST -> one Python closure per condition: all name lookups, enum values, regexes and type dispatch on
literals happen here, once, so evaluating a span is a handful of closure calls and protobuf reads.

Comparison semantics follow the Collector's OTTL rules: values of incompatible types are never equal
(``==`` false, ``!=`` true, ordering false); ints and floats compare numerically; nil equals only nil and
never orders; strings and bytes order lexicographically; bools, maps and lists support only ``==``/``!=``.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

from kotel.ottl.functions import FUNCTIONS, Operand
from kotel.ottl.parser import And, BoolExpr, Call, Compare, EnumRef, Not, Or, OttlError, PathRef, Value, parse
from kotel.ottl.parser import Literal as Lit
from kotel.ottl.paths import CONTEXTS, Getter, resolve_enum, resolve_path
from kotel.ottl.values import Const, index

Context = Literal["span", "datapoint", "log", "metric"]


class Condition(Protocol):
    """``cond(item, scope, resource, metric=None) -> bool``; ``metric`` is read by the datapoint context."""

    def __call__(self, item: Any, scope: Any, resource: Any, metric: Any = None, /) -> bool: ...


def compile_condition(text: str, context: Context) -> Condition:
    """Compile one OTTL condition for ``context``; raises OttlError (a ValueError) with line and column."""
    if context not in CONTEXTS:
        raise ValueError(f"unknown OTTL context {context!r}; expected one of {', '.join(CONTEXTS)}")
    return _as_condition(_Compiler(text, context).boolean(parse(text)))


def compile_conditions(texts: Iterable[str], context: Context) -> Condition:
    """OR of several conditions (the filterprocessor's "drop if ANY matches"); empty -> never matches.

    An OttlError raised here carries ``.index``, the position of the bad condition in ``texts``.
    """
    conditions: list[Condition] = []
    for position, text in enumerate(texts):
        try:
            conditions.append(compile_condition(text, context))
        except OttlError as exc:
            exc.index = position
            raise
    if not conditions:
        return _as_condition(Const(False))
    if len(conditions) == 1:
        return conditions[0]
    return _any_of(conditions)


def _as_condition(operand: Operand) -> Condition:
    if isinstance(operand, Const):
        value = bool(operand.value)
        return lambda i, s, r, m=None: value
    return operand


def _any_of(parts: Sequence[Getter]) -> Getter:
    if len(parts) == 2:
        a, b = parts
        return lambda i, s, r, m=None: a(i, s, r, m) or b(i, s, r, m)

    def run(i: Any, s: Any, r: Any, m: Any = None) -> bool:
        return any(part(i, s, r, m) for part in parts)

    return run


def _all_of(parts: Sequence[Getter]) -> Getter:
    if len(parts) == 2:
        a, b = parts
        return lambda i, s, r, m=None: a(i, s, r, m) and b(i, s, r, m)

    def run(i: Any, s: Any, r: Any, m: Any = None) -> bool:
        return all(part(i, s, r, m) for part in parts)

    return run


# --- comparisons ----------------------------------------------------------------------------------------

_NUMS = frozenset({int, float})
_ORDERED = frozenset({int, float, str, bytes})
_ORDER_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}  # fmt: skip
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}


def _equal(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    return (ta is tb or (ta in _NUMS and tb in _NUMS)) and a == b


def compare(op: str, a: Any, b: Any) -> bool:
    """Reference semantics for two runtime values (also used when neither side is a constant)."""
    if op == "==":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    ta, tb = type(a), type(b)
    if (ta is tb and ta in _ORDERED) or (ta in _NUMS and tb in _NUMS):
        return _ORDER_OPS[op](a, b)
    return False


def _against_const(op: str, g: Getter, c: Any) -> Operand:
    """``g() op c`` specialised on the constant's type: the common case is a path against a literal."""
    kind = type(c)
    if c is None or kind is bool:  # nil and bools only support == and !=; identity is exact for both
        if op == "==":
            return lambda i, s, r, m=None: g(i, s, r, m) is c
        if op == "!=":
            return lambda i, s, r, m=None: g(i, s, r, m) is not c
        return Const(False)
    if kind is str or kind is bytes:  # no other type ever equals a str or bytes
        if op == "==":
            return lambda i, s, r, m=None: g(i, s, r, m) == c
        if op == "!=":
            return lambda i, s, r, m=None: g(i, s, r, m) != c
        order = _ORDER_OPS[op]
        return lambda i, s, r, m=None: type(v := g(i, s, r, m)) is kind and order(v, c)
    if kind in _NUMS:  # Python's True == 1 must not leak: bools never equal numbers in OTTL
        if op == "==":
            return lambda i, s, r, m=None: (v := g(i, s, r, m)) == c and type(v) is not bool
        if op == "!=":
            return lambda i, s, r, m=None: not ((v := g(i, s, r, m)) == c and type(v) is not bool)
        order = _ORDER_OPS[op]
        return lambda i, s, r, m=None: type(v := g(i, s, r, m)) in _NUMS and order(v, c)
    return lambda i, s, r, m=None: compare(op, g(i, s, r, m), c)


def _compare(op: str, left: Operand, right: Operand) -> Operand:
    if isinstance(left, Const) and isinstance(right, Const):
        return Const(compare(op, left.value, right.value))
    if isinstance(right, Const):
        assert not isinstance(left, Const)
        return _against_const(op, left, right.value)
    if isinstance(left, Const):
        return _against_const(_FLIPPED[op], right, left.value)
    return lambda i, s, r, m=None: compare(op, left(i, s, r, m), right(i, s, r, m))


# --- the compiler ---------------------------------------------------------------------------------------


class _Compiler:
    def __init__(self, text: str, context: str) -> None:
        self.text = text
        self.context = context

    def fail(self, reason: str, node: Value) -> OttlError:
        return OttlError(self.text, reason, node.line, node.column)

    def boolean(self, node: BoolExpr) -> Operand:
        if isinstance(node, Or | And):
            parts = [self.boolean(p) for p in node.operands]
            decisive = isinstance(node, Or)  # the constant that settles the whole expression
            if any(isinstance(p, Const) and bool(p.value) is decisive for p in parts):
                return Const(decisive)
            live = [p for p in parts if not isinstance(p, Const)]
            if not live:
                return Const(not decisive)
            if len(live) == 1:
                return live[0]
            return _any_of(live) if decisive else _all_of(live)
        if isinstance(node, Not):
            inner = self.boolean(node.operand)
            if isinstance(inner, Const):
                return Const(not inner.value)
            return lambda i, s, r, m=None: not inner(i, s, r, m)
        if isinstance(node, Compare):
            return _compare(node.op, self.value(node.left), self.value(node.right))
        return self.standalone(node)

    def standalone(self, node: Value) -> Operand:
        """A value used as a whole condition: only true/false and boolean converters qualify."""
        if isinstance(node, Lit) and isinstance(node.value, bool):
            return Const(node.value)
        if isinstance(node, Call):
            operand = self.value(node)
            spec = FUNCTIONS[node.name]
            if spec.returns_bool and not node.keys:
                return operand
            what = f"{node.name}(...) returns a value, not a boolean,"
        elif isinstance(node, PathRef):
            what = f"path '{node.dotted}' is not a condition by itself"
        elif isinstance(node, EnumRef):
            what = f"enum constant '{node.name}' is not a condition by itself"
        else:
            what = f"the literal {_show(node.value)} is not a condition by itself"
        raise self.fail(f"{what} at {{where}}; compare it with ==, !=, <, <=, > or >=", node)

    def value(self, node: Value) -> Operand:
        if isinstance(node, Lit):
            return Const(node.value)
        if isinstance(node, EnumRef):
            return Const(resolve_enum(node.name, self.context, self.text, node.line, node.column))
        if isinstance(node, PathRef):
            return resolve_path(node, self.context, self.text)
        return self.call(node)

    def call(self, node: Call) -> Operand:
        spec = FUNCTIONS.get(node.name)
        if spec is None:
            close = difflib.get_close_matches(node.name, list(FUNCTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known functions: {', '.join(FUNCTIONS)}"
            raise self.fail(f"unknown function '{node.name}' at {{where}}{hint}", node)
        if spec.span_only and self.context != "span":
            raise self.fail(f"{node.name} is only available in the span context, at {{where}}", node)
        if len(node.args) != len(spec.params):
            wanted = f"{len(spec.params)} argument{'s' if len(spec.params) != 1 else ''}"
            if spec.params:
                wanted += f" ({', '.join(spec.params)})"
            else:
                wanted = "no arguments"
            raise self.fail(f"{node.name} takes {wanted}, got {len(node.args)} at {{where}}", node)
        args = [self.value(a) for a in node.args]
        result = spec.build(args, node.args, self.fail)
        keys = node.keys
        if not keys:
            return result
        if isinstance(result, Const):
            return Const(index(result.value, keys))
        inner = result
        return lambda i, s, r, m=None: index(inner(i, s, r, m), keys)


def _show(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
