"""Split an export request into parts that each serialize to at most max_bytes (Kafka message.max.bytes).

The request is serialized once and split by slicing that wire form: protobuf has no public API to take a
message's fields apart without building objects, and our first version, measuring with ByteSize() (dearer
than serializing under upb) and copying submessages at every level, was several times slower
(loadtest/bench_codec.py measures it). Only the length-delimited
framing of the levels being split is read; items (spans, log records, data points) are never decoded.
Field order within a message does not matter to protobuf parsers, so a part is the container's other
fields followed by the chosen children.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_svc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_svc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_svc
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from kotel.otlp.signals import OtlpSizeError, Signal

_LEN = 2  # wire type of length-delimited fields
Chunks = list[bytes | memoryview]


@dataclass(frozen=True, slots=True)
class _Level:
    """A nesting level: the field number of its children, its JSON name for messages, the next level."""

    number: int
    json: str
    child: _Level | None  # None: the children are indivisible items
    nested: bool = False  # children sit inside the metric's data oneof (gauge/sum/...)


def _level(cls: type[Message], field: str, child: _Level | None, nested: bool = False) -> _Level:
    fd = cls.DESCRIPTOR.fields_by_name[field]
    assert fd.number < 16, "sizes below assume 1-byte tags"
    return _Level(fd.number, fd.json_name, child, nested)


_METRIC_KINDS: dict[int, str] = {
    fd.number: fd.json_name for fd in metrics_pb2.Metric.DESCRIPTOR.oneofs_by_name["data"].fields
}
_LEVELS: dict[Signal, _Level] = {
    Signal.TRACES: _level(trace_svc.ExportTraceServiceRequest, "resource_spans", _level(
        trace_pb2.ResourceSpans, "scope_spans", _level(trace_pb2.ScopeSpans, "spans", None))),
    Signal.METRICS: _level(metrics_svc.ExportMetricsServiceRequest, "resource_metrics", _level(
        metrics_pb2.ResourceMetrics, "scope_metrics", _level(metrics_pb2.ScopeMetrics, "metrics", _level(
            metrics_pb2.Gauge, "data_points", None, nested=True)))),
    Signal.LOGS: _level(logs_svc.ExportLogsServiceRequest, "resource_logs", _level(
        logs_pb2.ResourceLogs, "scope_logs", _level(logs_pb2.ScopeLogs, "log_records", None))),
}


def split_to_max_bytes(signal: Signal, request: Message, max_bytes: int) -> list[Message]:
    """Parts whose serialized size is each <= max_bytes, together holding every item exactly once.

    Splits by resource entries, then by scope groups, then by items (metrics: by data points, each part
    keeping the metric's name, unit and temporality); every part keeps its resource and scope and items
    keep their order. A request that fits is returned as is. OtlpSizeError when one item cannot fit even
    alone with its resource and scope.
    """
    wire = _serialize_checked(signal, request, max_bytes)
    if len(wire) <= max_bytes:
        return [request]
    cls = type(request)
    return [cls.FromString(part) for part in _split_wire(Signal(signal), wire, max_bytes)]


def split_serialized(signal: Signal, request: Message, max_bytes: int) -> list[bytes]:
    """Like split_to_max_bytes, but the parts as protobuf bytes, ready for a producer (no re-encoding)."""
    wire = _serialize_checked(signal, request, max_bytes)
    if len(wire) <= max_bytes:
        return [wire]
    return _split_wire(Signal(signal), wire, max_bytes)


def split_wire(signal: Signal, wire: bytes, max_bytes: int) -> list[bytes]:
    """Split an already serialized request (for example joined resource entries) into parts <= max_bytes."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if len(wire) <= max_bytes:
        return [wire]
    return _split_wire(Signal(signal), wire, max_bytes)


def _serialize_checked(signal: Signal, request: Message, max_bytes: int) -> bytes:
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    expected = Signal(signal).request_class
    if type(request) is not expected:
        raise TypeError(f"expected a {expected.__name__}, got {type(request).__name__}")
    return request.SerializeToString()


def _split_wire(sig: Signal, wire: bytes, max_bytes: int) -> list[bytes]:
    splitter = _Splitter(memoryview(wire), max_bytes, sig.item_name)
    pieces = splitter.split(0, len(wire), _LEVELS[sig], _identity, "")
    return [b"".join(chunks) for _, chunks in pieces]


def _identity(n: int) -> int:
    return n


def _max_payload(part_size: Callable[[int], int], max_bytes: int) -> int:
    """Largest children payload p with part_size(p) <= max_bytes (-1 if none), found once per container.

    part_size is monotonic and part_size(p) >= p, so a binary search over [0, max_bytes] finds it; the
    packing loop then compares plain integers instead of calling the size chain for every child.
    """
    if part_size(0) > max_bytes:
        return -1
    low, high = 0, max_bytes
    while low < high:
        mid = (low + high + 1) // 2
        if part_size(mid) <= max_bytes:
            low = mid
        else:
            high = mid - 1
    return low


def encode_varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _entry(size: int) -> int:
    """Bytes a length-delimited field with this payload size takes (1-byte tag)."""
    return 1 + ((size.bit_length() + 6) // 7 or 1) + size


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (protobuf wire walking without parsing)."""
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(buf: memoryview, pos: int, wire_type: int, number: int) -> int:
    """Position after a field's value (groups only ever appear as unknown fields from old producers)."""
    if wire_type == 0:
        return read_varint(buf, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    if wire_type == _LEN:
        length, pos = read_varint(buf, pos)
        return pos + length
    if wire_type == 3:
        while True:
            key, pos = read_varint(buf, pos)
            if key & 7 == 4:
                if key >> 3 != number:
                    raise ValueError(f"mismatched protobuf group end for field {number}")
                return pos
            pos = _skip(buf, pos, key & 7, key >> 3)
    raise ValueError(f"unexpected protobuf wire type {wire_type}")


def _scan(buf: memoryview, pos: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """Top-level fields of buf[pos:end] as (number, wire type, field start, payload start, field end)."""
    fields = []
    while pos < end:
        start = pos
        key = buf[pos]  # one-byte keys and lengths are the common case: skip the call
        if key < 0x80:
            pos += 1
        else:
            key, pos = read_varint(buf, pos)
        wire_type = key & 7
        if wire_type == _LEN:
            length = buf[pos]
            if length < 0x80:
                pos += 1
            elif buf[pos + 1] < 0x80:  # items of 128 B .. 16 KiB
                length = (length & 0x7F) | (buf[pos + 1] << 7)
                pos += 2
            else:
                length, pos = read_varint(buf, pos)
            payload = pos
            pos += length
        else:
            payload = pos
            pos = _skip(buf, pos, wire_type, key >> 3)
        fields.append((key >> 3, wire_type, start, payload, pos))
    return fields


_Piece = tuple[int, Chunks]  # (serialized size of a container copy, its chunks)


class _Splitter:
    def __init__(self, buf: memoryview, max_bytes: int, item: str) -> None:
        self.buf = buf
        self.max_bytes = max_bytes
        self.item = item

    def split(
        self, start: int, end: int, level: _Level, wrap: Callable[[int], int], path: str
    ) -> list[_Piece]:
        """Pack the children of the container at buf[start:end] greedily into copies of it.

        wrap(n) is the size of the whole part when the copy of this container is n bytes long.
        """
        buf, max_bytes = self.buf, self.max_bytes
        fields = _scan(buf, start, end)
        if level.nested:
            holder = next((f for f in reversed(fields) if f[0] in _METRIC_KINDS and f[1] == _LEN), None)
            if holder is None:
                raise OtlpSizeError(
                    f"metric at {path} needs {wrap(end - start)} bytes with its resource and scope and has "
                    f"no data points to split, more than max_bytes={max_bytes}"
                )
            outer: Chunks = [buf[f[2]:f[4]] for f in fields if f is not holder]
            fields = _scan(buf, holder[3], holder[4])
            holder_tag = bytes([holder[0] << 3 | _LEN])
            json_field = f"{_METRIC_KINDS[holder[0]]}.{level.json}"
        else:
            outer, holder_tag, json_field = [], b"", level.json
        shell: Chunks = [buf[f[2]:f[4]] for f in fields if f[0] != level.number or f[1] != _LEN]
        children = [(f[3], f[4]) for f in fields if f[0] == level.number and f[1] == _LEN]
        outer_size = sum(len(c) for c in outer)
        shell_size = sum(len(c) for c in shell)

        def size(payload: int) -> int:
            """Serialized size of a copy of this container holding children of this total entry size."""
            if level.nested:
                return outer_size + _entry(shell_size + payload)
            return shell_size + payload

        def child_wrap(n: int) -> int:
            return wrap(size(_entry(n)))

        limit = _max_payload(lambda p: wrap(size(p)), max_bytes)
        if limit < 0:
            raise OtlpSizeError(
                f"{path or 'the request'} needs {wrap(size(0))} bytes even without its items, "
                f"more than max_bytes={max_bytes}"
            )
        tag = bytes([level.number << 3 | _LEN])
        groups: list[tuple[int, Chunks]] = []  # (total entry size of the children, their chunks)
        chunks: Chunks = []
        payload = 0
        for i, (p_start, p_end) in enumerate(children):
            length = p_end - p_start
            entry = _entry(length)
            if payload + entry <= limit:
                chunks += (tag, encode_varint(length), buf[p_start:p_end])
                payload += entry
                continue
            if chunks:
                groups.append((payload, chunks))
            if entry <= limit:
                chunks, payload = [tag, encode_varint(length), buf[p_start:p_end]], entry
                continue
            child_path = f"{path}.{json_field}[{i}]" if path else f"{json_field}[{i}]"
            if level.child is None:
                raise OtlpSizeError(
                    f"{self.item} at {child_path} needs {wrap(size(entry))} bytes with its resource and "
                    f"scope, more than max_bytes={max_bytes}"
                )
            pieces = self.split(p_start, p_end, level.child, child_wrap, child_path)
            for n, piece in pieces[:-1]:
                groups.append((_entry(n), [tag, encode_varint(n), *piece]))
            n, piece = pieces[-1]
            chunks, payload = [tag, encode_varint(n), *piece], _entry(n)
        if chunks or not groups:
            groups.append((payload, chunks))

        if level.nested:
            return [
                (size(p), [*outer, holder_tag, encode_varint(shell_size + p), *shell, *c]) for p, c in groups
            ]
        return [(size(p), [*shell, *c]) for p, c in groups]
