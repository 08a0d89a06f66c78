"""OTLP AnyValue/KeyValue -> the Python values conditions compare (None, bool, int, float, str, bytes,
dict, list). Lookups scan the KeyValue list: attribute lists are short, and building a dict per item
would cost more than the scan for the one or two keys a condition reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True, slots=True)
class Const:
    """A value known at compile time (literal, enum, folded call); the compiler specialises on it."""

    value: Any


_SCALARS = frozenset({"string_value", "bool_value", "int_value", "double_value", "bytes_value"})


def to_python(value: AnyValue) -> Any:
    """One AnyValue as a Python value; an empty AnyValue is nil, as the Collector treats ValueTypeEmpty."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind in _SCALARS:
        return getattr(value, kind)
    if kind == "array_value":
        return [to_python(v) for v in value.array_value.values]
    return {kv.key: to_python(kv.value) for kv in value.kvlist_value.values}


def map_to_python(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: to_python(kv.value) for kv in kvs}


def find(kvs: Iterable[KeyValue], key: str) -> Any:
    """``attributes["key"]``: the value, or None when the key is missing."""
    for kv in kvs:
        if kv.key == key:
            return to_python(kv.value)
    return None


def _find_raw(kvs: Iterable[KeyValue], key: str) -> AnyValue | None:
    for kv in kvs:
        if kv.key == key:
            return kv.value
    return None


def descend(value: AnyValue | None, keys: Sequence[str | int]) -> Any:
    """Follow ``["a"][0]...`` through nested AnyValues without converting the parts not visited."""
    for key in keys:
        if value is None:
            return None
        kind = value.WhichOneof("value")
        if isinstance(key, str):
            value = _find_raw(value.kvlist_value.values, key) if kind == "kvlist_value" else None
        elif kind == "array_value":
            items = value.array_value.values
            value = items[key] if -len(items) <= key < len(items) else None
        else:
            value = None
    return None if value is None else to_python(value)


def find_nested(kvs: Iterable[KeyValue], keys: Sequence[str | int]) -> Any:
    """``attributes["a"]["b"]``; the first key of a map is always a string (checked at compile time)."""
    first = keys[0]
    assert isinstance(first, str)
    return descend(_find_raw(kvs, first), keys[1:])


def index(value: Any, keys: Sequence[str | int]) -> Any:
    """Index a converter's Python result; a key that does not fit the value gives nil, not an error."""
    for key in keys:
        if isinstance(value, dict) and isinstance(key, str):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def trace_state_entry(trace_state: str, key: str) -> str | None:
    """One W3C tracestate member (``k1=v1,k2=v2``), as the Collector's ``trace_state["k"]``."""
    for member in trace_state.split(","):
        name, sep, val = member.strip().partition("=")
        if sep and name == key:
            return val
    return None


def id_hex(raw: bytes) -> str:
    """pdata prints an all-zero (unset) trace or span id as the empty string."""
    return raw.hex() if raw.strip(b"\x00") else ""
