"""OTLP/JSON (the OTLP spec's "JSON Protobuf Encoding") on top of google.protobuf.json_format.

json_format does the bulk. What OTLP/JSON changes we do ourselves: trace and span ids are hex, not
base64 (only spans, links, log records and exemplars carry them, so a targeted walk converts them), and
receivers must ignore unknown fields. Unknown fields are rare, so the fast path parses strictly; only when
that fails do we strip unknown keys and, if it still fails, descend to the failing value so the error can
name its JSON path (json_format's own messages lack array indexes).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kotel.otlp.signals import OtlpDecodeError, Signal, signal_of

# --- id fields: where they are and how long -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """Where id fields live below one JSON object kind: id keys, arrays of objects, single objects."""

    ids: tuple[tuple[str, int], ...] = ()
    arrays: tuple[tuple[str, _Node], ...] = ()
    objects: tuple[tuple[str, _Node], ...] = ()


def _both(camel: str, snake: str, node: _Node) -> tuple[tuple[str, _Node], ...]:
    # protobuf's JSON parser accepts the original field names too, so the walk must follow both.
    return ((camel, node),) if camel == snake else ((camel, node), (snake, node))


_TRACE_ID = (("traceId", 16), ("trace_id", 16))
_SPAN_ID = (("spanId", 8), ("span_id", 8))
_LINK = _Node(ids=_TRACE_ID + _SPAN_ID)
_SPAN = _Node(
    ids=(*_TRACE_ID, *_SPAN_ID, ("parentSpanId", 8), ("parent_span_id", 8)),
    arrays=_both("links", "links", _LINK),
)
_DATA_POINTS = _Node(arrays=_both("exemplars", "exemplars", _Node(ids=_TRACE_ID + _SPAN_ID)))
_WITH_POINTS = _Node(arrays=_both("dataPoints", "data_points", _DATA_POINTS))
_METRIC = _Node(
    objects=(
        ("gauge", _WITH_POINTS),
        ("sum", _WITH_POINTS),
        ("histogram", _WITH_POINTS),
        ("exponentialHistogram", _WITH_POINTS),
        ("exponential_histogram", _WITH_POINTS),
    )
)
_LOG = _Node(ids=_TRACE_ID + _SPAN_ID)


def _root(res: tuple[str, str], scope: tuple[str, str], items: tuple[str, str], leaf: _Node) -> _Node:
    return _Node(arrays=_both(*res, _Node(arrays=_both(*scope, _Node(arrays=_both(*items, leaf))))))


_ROOTS: dict[Signal, _Node] = {
    Signal.TRACES: _root(("resourceSpans", "resource_spans"), ("scopeSpans", "scope_spans"),
                         ("spans", "spans"), _SPAN),
    Signal.METRICS: _root(("resourceMetrics", "resource_metrics"), ("scopeMetrics", "scope_metrics"),
                          ("metrics", "metrics"), _METRIC),
    Signal.LOGS: _root(("resourceLogs", "resource_logs"), ("scopeLogs", "scope_logs"),
                       ("logRecords", "log_records"), _LOG),
}


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class _PathError(Exception):
    """Raised deep in a walk; each level adds its path segment on the way up (free when not raised)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.parts: list[str] = []

    @property
    def path(self) -> str:
        return ".".join(reversed(self.parts))


def _walk(node: _Node, obj: dict[str, Any], convert: Callable[[Any, int], Any]) -> None:
    """Convert the id values below obj in place; shapes that are wrong are left for json_format."""
    for key, size in node.ids:
        value = obj.get(key)
        if value is not None:
            try:
                obj[key] = convert(value, size)
            except _PathError as exc:
                exc.parts.append(key)
                raise
    for key, child in node.arrays:
        items = obj.get(key)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    try:
                        _walk(child, item, convert)
                    except _PathError as exc:
                        exc.parts.append(f"{key}[{i}]")
                        raise
    for key, child in node.objects:
        sub = obj.get(key)
        if isinstance(sub, dict):
            try:
                _walk(child, sub, convert)
            except _PathError as exc:
                exc.parts.append(key)
                raise


def _hex_to_b64(value: Any, size: int) -> str:
    if not isinstance(value, str):
        raise _PathError(f"expected a hex string, got {_json_type(value)}")
    if not value:
        return value  # empty means unset; validation decides whether that is allowed
    if len(value) != 2 * size:
        hint = " (OTLP/JSON ids are hex, not base64)" if len(value) == 4 * ((size + 2) // 3) else ""
        raise _PathError(f"expected {2 * size} hex characters, got {len(value)}{hint}")
    try:
        raw = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        pos, char = next((i, c) for i, c in enumerate(value) if c not in _HEX_DIGITS)
        raise _PathError(f"expected hex characters only, got {char!r} at position {pos}") from None
    return base64.b64encode(raw).decode("ascii")



def _b64_to_hex(value: str, size: int) -> str:
    return base64.b64decode(value).hex()


# --- decode ----------------------------------------------------------------------------------------


def decode_json(signal: Signal, data: bytes | bytearray | memoryview | str) -> Message:
    """Parse an OTLP/JSON export request; OtlpDecodeError names the JSON path of the first problem."""
    sig = Signal(signal)
    cls = sig.request_class
    name = cls.__name__

    def fail(reason: str, path: str = "") -> OtlpDecodeError:
        where = f" at {path}" if path else ""
        return OtlpDecodeError(f"invalid OTLP/JSON {name}{where}: {reason}")

    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise fail("not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object at the top level, got {_json_type(obj)}")
    try:
        _walk(_ROOTS[sig], obj, _hex_to_b64)
    except _PathError as exc:
        raise fail(exc.reason, exc.path) from None

    try:
        return json_format.ParseDict(obj, cls())
    except (*_PARSE_ERRORS, RecursionError):
        pass  # slow path below: unknown fields, or a real error to locate
    try:
        _strip_unknown(cls.DESCRIPTOR, obj)
        return json_format.ParseDict(obj, cls())
    except RecursionError:
        raise fail("nested too deeply") from None
    except _PARSE_ERRORS:
        path, reason = _locate(cls.DESCRIPTOR, obj, "")
        raise fail(reason, path) from None


# json_format wraps most failures in ParseError, but a wrong type in some spots escapes as TypeError.
_PARSE_ERRORS = (json_format.ParseError, TypeError, ValueError, AttributeError)


@functools.cache
def _fields(desc: Descriptor) -> dict[str, FieldDescriptor]:
    out: dict[str, FieldDescriptor] = {}
    for fd in desc.fields:
        out[fd.name] = fd
        out[fd.json_name] = fd
    return out


@functools.cache
def _class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def _strip_unknown(desc: Descriptor, obj: Any) -> None:
    """Drop keys the message does not define (the spec says receivers MUST ignore them)."""
    if not isinstance(obj, dict):
        return
    fields = _fields(desc)
    for key in [k for k in obj if k not in fields]:
        del obj[key]
    for key, value in obj.items():
        sub = fields[key].message_type
        if sub is None:
            continue
        if isinstance(value, list):
            for item in value:
                _strip_unknown(sub, item)
        else:
            _strip_unknown(sub, value)


def _parse_error(desc: Descriptor, obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_type(obj)}"
    try:
        json_format.ParseDict(obj, _class(desc)())
    except _PARSE_ERRORS as exc:
        return str(exc)
    return None


def _locate(desc: Descriptor, obj: Any, path: str) -> tuple[str, str]:
    """Descend to the innermost value that json_format rejects: (JSON path, reason)."""
    if not isinstance(obj, dict):
        return path, f"expected a JSON object, got {_json_type(obj)}"
    fields = _fields(desc)
    for key, value in obj.items():
        fd = fields[key]
        sub_path = f"{path}.{key}" if path else key
        if fd.message_type is not None and value is not None:
            if fd.is_repeated:
                if not isinstance(value, list):
                    return sub_path, f"expected an array, got {_json_type(value)}"
                for i, item in enumerate(value):
                    if _parse_error(fd.message_type, item) is not None:
                        return _locate(fd.message_type, item, f"{sub_path}[{i}]")
            elif _parse_error(fd.message_type, value) is not None:
                return _locate(fd.message_type, value, sub_path)
        elif fd.message_type is None:
            error = _parse_error(desc, {key: value})
            if error is None:
                continue
            if not fd.is_repeated:
                return sub_path, _scalar_reason(fd, value, error)
            if not isinstance(value, list):
                return sub_path, f"expected an array, got {_json_type(value)}"
            for i, item in enumerate(value):
                error = _parse_error(desc, {key: [item]})
                if error is not None:
                    return f"{sub_path}[{i}]", _scalar_reason(fd, item, error)
    return path, _clean(_parse_error(desc, obj) or "rejected by the protobuf JSON parser")


_INT_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
})


def _scalar_reason(fd: FieldDescriptor, value: Any, error: str) -> str:
    """Say it in JSON terms: json_format's messages are Python's ("invalid literal for int()")."""
    got = _show(value)
    if fd.enum_type is not None:
        if isinstance(value, str):
            return f"unknown {fd.enum_type.name} name {value!r}"
        if isinstance(value, int) and not isinstance(value, bool):
            return _clean(error)
        return f"expected a {fd.enum_type.name} name or integer, got {got}"
    if fd.type in _INT_TYPES:
        if "out of range" in error.lower():
            return _clean(error)
        return f"expected an integer (a JSON number or a decimal string), got {got}"
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return f'expected a number, "NaN", "Infinity" or "-Infinity", got {got}'
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return f"expected true or false, got {got}"
    if fd.type == FieldDescriptor.TYPE_STRING:
        return f"expected a string, got {got}"
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return f"expected a base64 string, got {got}"
    return _clean(error)


_PREFIX = re.compile(r"^(?:Failed to parse \w+ field: )+")
_SUFFIX = re.compile(r' at "?[\w.\[\]]+"?$')


def _clean(error: str) -> str:
    text = _PREFIX.sub("", error).rstrip(".")
    return _SUFFIX.sub("", text).rstrip(".")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    return _json_type(value)


# --- encode ----------------------------------------------------------------------------------------


def encode_json(request: Message) -> bytes:
    """OTLP/JSON bytes: lowerCamelCase keys, hex ids, enums as integers (as the spec requires)."""
    obj = json_format.MessageToDict(request, use_integers_for_enums=True)
    _walk(_ROOTS[signal_of(request)], obj, _b64_to_hex)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
