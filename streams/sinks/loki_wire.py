"""OTLP logs straight to Loki's protobuf PushRequest bytes, by the rules of `loki_translate`.

`LokiTranslator` builds a Python object per entry and protobuf builds a message per entry and per
metadata pair again; at tens of thousands of records a second that was the sink's whole budget. Here a
record is read through a view (its attributes and body stay bytes), the metadata a record shares with
others of its scope and attribute set is encoded once and cached, and each entry is written as bytes.
tests/unit/test_loki_wire.py holds this equal to `push_request(LokiTranslator.translate(...))`.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from kotel.otlp import Signal
from kotel.topology.exporters import LokiExporterConfig
from streams.sinks.loki_translate import FALLBACK_LABELS, Labels, LokiStream, level_of
from streams.sinks.prom_translate_names import attribute_text, sanitized_labels
from streams.sinks.proto.otlp_views_pb2 import LogsView
from streams.sinks.wire import field as wire_field
from streams.sinks.wire import label_pair, parse_view, raise_invalid, string_field, timestamp, varint

M = TypeVar("M", bound=Message)
_LATE = frozenset({"trace_id", "span_id", "severity_text"})  # metadata a record adds after its attributes
_BY_TIME = itemgetter(0)


@dataclass(slots=True)
class _Stream:
    labels: Labels
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (time, EntryAdapter bytes)


@dataclass(frozen=True, slots=True)
class _Meta:
    """A scope's metadata merged with one attribute set, in insertion order (later sources win)."""

    pairs: dict[str, str]
    encoded: bytes  # the non-empty pairs as EntryAdapter.structuredMetadata fields
    clash: bool  # a pair named like one the record adds later: that record takes the slow path


def _pair(name: str, value: str) -> bytes:
    return wire_field(0x1A, label_pair(name, value))


def _id_head(name: str, size: int) -> bytes:
    """All of a trace_id / span_id metadata pair but its hex text, for ids of the usual size."""
    return _pair(name, "0" * 2 * size)[: -2 * size]


_TRACE_HEAD, _SPAN_HEAD = _id_head("trace_id", 16), _id_head("span_id", 8)


def _parse(cls: type[M], data: bytes, record: bytes) -> M:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise_invalid(Signal.LOGS, record)


def _line(body: bytes, record: bytes) -> bytes:
    """The entry's line as UTF-8: a string body's own bytes, anything else as attribute_text has it."""
    if body[:1] == b"\x0a":  # string_value: copy its bytes when it is the only field
        size, shift, pos = 0, 0, 1
        while pos < len(body) and shift < 35:
            byte = body[pos]
            size |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if byte < 0x80:
                if pos + size == len(body):
                    line = body[pos:]
                    try:
                        line.decode()
                    except UnicodeDecodeError:
                        raise_invalid(Signal.LOGS, record)
                    return line
                break
    if not body:
        return b""
    return attribute_text(_parse(AnyValue, body, record)).encode()


class LokiWireTranslator:
    """Logs requests as Loki push bytes for one sink; caches metadata per scope and attribute set."""

    def __init__(self, config: LokiExporterConfig, max_cached: int = 50_000) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be at least 1, got {max_cached}")
        self.config = config
        self.max_cached = max_cached
        self.resets = 0  # times the metadata cache was full and started afresh
        self._label_keys = frozenset(config.label_resource_attributes)
        self._cached = 0
        self._meta: dict[Hashable, dict[tuple[bytes, ...], _Meta]] = {}
        self._severity: dict[str, bytes] = {}
        self._seconds: dict[int, bytes] = {}  # a Timestamp's seconds field, by second

    def translate_wire(self, record: bytes, max_entries: int,
                       now_ns: int | None = None) -> list[tuple[bytes, int]]:  # fmt: skip
        """PushRequest.streams fields (each at most max_entries entries) and their entry counts."""
        view = parse_view(LogsView, Signal.LOGS, record)
        streams: dict[Labels, _Stream] = {}
        now = time.time_ns() if now_ns is None else now_ns
        for rl in view.resource_logs:
            attributes = _parse(Resource, rl.resource, record).attributes
            resource_labels = sanitized_labels(kv for kv in attributes if kv.key in self._label_keys)
            resource_meta = sanitized_labels(kv for kv in attributes if kv.key not in self._label_keys)
            by_level: dict[str, _Stream] = {}
            for sl in rl.scope_logs:
                scope = _parse(InstrumentationScope, sl.scope, record)
                scope_meta = {**resource_meta, **sanitized_labels(scope.attributes),
                              "scope_name": scope.name, "scope_version": scope.version}  # fmt: skip
                cache = self._context((rl.resource, sl.scope))
                for log in sl.log_records:
                    level = level_of(log) if self.config.severity_label else ""  # type: ignore[arg-type]
                    stream = by_level.get(level)
                    if stream is None:
                        stream = by_level[level] = self._stream(streams, resource_labels, level)
                    key = tuple(log.attributes)
                    meta = cache.get(key) or self._meta_for(cache, key, scope_meta, record)
                    time_ns = log.time_unix_nano or log.observed_time_unix_nano or now
                    stream.entries.append((time_ns, self._entry(log, meta, time_ns, record)))
        return [piece for stream in streams.values() for piece in _pieces(stream, max_entries)]

    def _stream(self, streams: dict[Labels, _Stream], resource_labels: dict[str, str], level: str) -> _Stream:
        labels = dict(resource_labels)
        if level:
            labels["level"] = level
        key = tuple(sorted((k, v) for k, v in labels.items() if v)) or FALLBACK_LABELS
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = _Stream(key)
        return stream

    def _context(self, key: Hashable) -> dict[tuple[bytes, ...], _Meta]:
        cache = self._meta.get(key)
        if cache is None:
            cache = self._meta[key] = {}
        return cache

    def _meta_for(self, cache: dict[tuple[bytes, ...], _Meta], key: tuple[bytes, ...],
                  scope_meta: dict[str, str], record: bytes) -> _Meta:  # fmt: skip
        self._cached += 1
        if self._cached > self.max_cached:
            self.resets += 1
            self._cached = 1
            for entries in self._meta.values():
                entries.clear()  # the caller's dict too: it must not keep the old entries alive
            self._meta.clear()
        pairs = {**scope_meta, **sanitized_labels(_parse(KeyValue, data, record) for data in key)}
        encoded = b"".join(_pair(k, v) for k, v in pairs.items() if v)
        meta = cache[key] = _Meta(pairs, encoded, not _LATE.isdisjoint(pairs))
        return meta

    def _entry(self, log: Any, meta: _Meta, time_ns: int, record: bytes) -> bytes:
        """One EntryAdapter framed as StreamAdapter.entries (field 2)."""
        if meta.clash:
            pairs = dict(meta.pairs)
            if log.trace_id:
                pairs["trace_id"] = log.trace_id.hex()
            if log.span_id:
                pairs["span_id"] = log.span_id.hex()
            pairs["severity_text"] = log.severity_text
            metadata = b"".join(_pair(k, v) for k, v in pairs.items() if v)
        else:
            metadata = meta.encoded
            trace_id, span_id = log.trace_id, log.span_id
            if trace_id:
                metadata += (_TRACE_HEAD + trace_id.hex().encode() if len(trace_id) == 16
                             else _pair("trace_id", trace_id.hex()))  # fmt: skip
            if span_id:
                metadata += (_SPAN_HEAD + span_id.hex().encode() if len(span_id) == 8
                             else _pair("span_id", span_id.hex()))  # fmt: skip
            text = log.severity_text
            if text:
                severity = self._severity.get(text)
                if severity is None:
                    if len(self._severity) > 1024:
                        self._severity.clear()
                    severity = self._severity[text] = _pair("severity_text", text)
                metadata += severity
        seconds, nanos = divmod(time_ns, 1_000_000_000)
        stamp = self._seconds.get(seconds)
        if stamp is None:
            if len(self._seconds) > 4096:
                self._seconds.clear()
            stamp = self._seconds[seconds] = timestamp(seconds * 1_000_000_000)
        if nanos:
            stamp += b"\x10" + varint(nanos)
        line = _line(log.body, record)
        body = bytes((0x0A, len(stamp))) + stamp + (wire_field(0x12, line) if line else b"") + metadata
        return wire_field(0x12, body)


def _pieces(stream: _Stream, max_entries: int) -> list[tuple[bytes, int]]:
    """The stream as StreamAdapters of at most max_entries entries, each a PushRequest.streams field."""
    entries = stream.entries
    entries.sort(key=_BY_TIME)  # stable: equal times keep their order
    selector = string_field(0x0A, LokiStream(stream.labels).selector())
    out = []
    for start in range(0, len(entries), max_entries):
        chunk = entries[start : start + max_entries]
        out.append((wire_field(0x0A, selector + b"".join([entry for _, entry in chunk])), len(chunk)))
    return out
