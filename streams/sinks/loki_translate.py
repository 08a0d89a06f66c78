"""OTLP logs as Loki push requests: pure translation, protobuf / JSON encoding, response classes.

Loki indexes stream labels, so they stay few and bounded: the configured resource attributes
(`label_resource_attributes`, names sanitised as Prometheus label names: `service.name` ->
`service_name`) and, when enabled, `level` from the severity (one of trace, debug, info, warn, error,
fatal, unknown; never the free-text severity). Everything else goes into structured metadata, which is
stored per entry without indexing: the other resource attributes, the scope's attributes, name and
version (`scope_name`, `scope_version`), the record's attributes, then `trace_id`, `span_id` (hex) and
`severity_text`; on a name clash the later source wins. Empty values are left out. Entries are sorted
by time within a stream (the record's time, else its observed time, else now). The line is the body:
a string as it is, a map or list as JSON.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import cramjam
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from kotel import __version__
from kotel.topology.exporters import LokiExporterConfig
from streams.sinks.prom_translate_names import attribute_text, sanitized_labels
from streams.sinks.proto.loki_push_pb2 import EntryAdapter, LabelPairAdapter, PushRequest, StreamAdapter

Labels = tuple[tuple[str, str], ...]
#: Loki needs at least one label; this is the OpenTelemetry default service name.
FALLBACK_LABELS: Labels = (("service_name", "unknown_service"),)
_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")  # severity numbers 1-4, 5-8, ... 21-24
_LEVEL_TEXT = {
    **{level: level for level in _LEVELS},
    "information": "info", "notice": "info", "warning": "warn", "err": "error",
    "critical": "fatal", "crit": "fatal", "alert": "fatal", "emerg": "fatal", "emergency": "fatal",
    "panic": "fatal",
}  # fmt: skip
_USER_AGENT = f"kotel/{__version__}"


def level_of(record: LogRecord) -> str:
    """The `level` label: from the severity number, else a well-known severity text, else unknown."""
    if 1 <= record.severity_number <= 24:
        return _LEVELS[(record.severity_number - 1) // 4]
    return _LEVEL_TEXT.get(record.severity_text.strip().lower(), "unknown")


@dataclass(slots=True)
class LokiEntry:
    time_ns: int
    line: str
    metadata: Labels = ()


@dataclass(slots=True)
class LokiStream:
    labels: Labels  # sorted by name
    entries: list[LokiEntry] = field(default_factory=list)

    def selector(self) -> str:
        """The label set as Loki's protobuf wants it: {name="value", ...} (JSON escapes are valid here)."""
        pairs = ", ".join(f"{name}={json.dumps(value, ensure_ascii=False)}" for name, value in self.labels)
        return f"{{{pairs}}}"


class LokiTranslator:
    """Translates logs requests for one Loki sink (stateless apart from its configuration)."""

    def __init__(self, config: LokiExporterConfig) -> None:
        self.config = config
        self._label_keys = frozenset(config.label_resource_attributes)

    def translate(self, request: ExportLogsServiceRequest, now_ns: int | None = None) -> list[LokiStream]:
        streams: dict[Labels, LokiStream] = {}
        now = time.time_ns() if now_ns is None else now_ns
        for rl in request.resource_logs:
            attributes = rl.resource.attributes
            resource_labels = sanitized_labels(kv for kv in attributes if kv.key in self._label_keys)
            resource_meta = sanitized_labels(kv for kv in attributes if kv.key not in self._label_keys)
            for sl in rl.scope_logs:
                scope_meta = {**resource_meta, **sanitized_labels(sl.scope.attributes),
                              "scope_name": sl.scope.name, "scope_version": sl.scope.version}  # fmt: skip
                for record in sl.log_records:
                    labels = dict(resource_labels)
                    if self.config.severity_label:
                        labels["level"] = level_of(record)
                    key = tuple(sorted((k, v) for k, v in labels.items() if v)) or FALLBACK_LABELS
                    stream = streams.get(key)
                    if stream is None:
                        stream = streams[key] = LokiStream(key)
                    stream.entries.append(self._entry(record, scope_meta, now))
        for stream in streams.values():
            stream.entries.sort(key=lambda e: e.time_ns)  # stable: equal times keep their order
        return list(streams.values())

    @staticmethod
    def _entry(record: LogRecord, scope_meta: dict[str, str], now_ns: int) -> LokiEntry:
        meta = {**scope_meta, **sanitized_labels(record.attributes)}
        if record.trace_id:
            meta["trace_id"] = record.trace_id.hex()
        if record.span_id:
            meta["span_id"] = record.span_id.hex()
        meta["severity_text"] = record.severity_text
        time_ns = record.time_unix_nano or record.observed_time_unix_nano or now_ns
        return LokiEntry(time_ns, attribute_text(record.body), tuple((k, v) for k, v in meta.items() if v))


def count_entries(streams: Iterable[LokiStream]) -> int:
    return sum(len(s.entries) for s in streams)


# --- the wire ------------------------------------------------------------------------------------


def _timestamp(time_ns: int) -> Timestamp:
    return Timestamp(seconds=time_ns // 1_000_000_000, nanos=time_ns % 1_000_000_000)


def push_request(streams: Iterable[LokiStream]) -> PushRequest:
    return PushRequest(streams=[
        StreamAdapter(labels=s.selector(), entries=[
            EntryAdapter(timestamp=_timestamp(e.time_ns), line=e.line,
                         structuredMetadata=[LabelPairAdapter(name=k, value=v) for k, v in e.metadata])
            for e in s.entries])
        for s in streams])  # fmt: skip


def encode_push_protobuf(streams: Iterable[LokiStream]) -> bytes:
    """A PushRequest, snappy block-compressed: the only compression Loki's protobuf push takes."""
    return bytes(cramjam.snappy.compress_raw(push_request(streams).SerializeToString()))


def encode_push_json(streams: Iterable[LokiStream], compress: bool = False) -> bytes:
    """Loki's JSON push body; each value is [time in ns as a string, line, structured metadata]."""
    body = {"streams": [
        {"stream": dict(s.labels),
         "values": [[str(e.time_ns), e.line, dict(e.metadata)] if e.metadata else [str(e.time_ns), e.line]
                    for e in s.entries]}
        for s in streams]}  # fmt: skip
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return gzip.compress(data, compresslevel=5) if compress else data


def push_headers(encoding: Literal["protobuf", "json"], compress_json: bool = False,
                 user_agent: str = _USER_AGENT) -> dict[str, str]:  # fmt: skip
    """Protobuf bodies carry no Content-Encoding (snappy is part of the format; Promtail sends none)."""
    if encoding == "protobuf":
        return {"Content-Type": "application/x-protobuf", "User-Agent": user_agent}
    headers = {"Content-Type": "application/json", "User-Agent": user_agent}
    if compress_json:
        headers["Content-Encoding"] = "gzip"
    return headers


def encode_push(streams: list[LokiStream], config: LokiExporterConfig) -> tuple[bytes, dict[str, str]]:
    """Body and headers as the config asks: protobuf is always snappy; JSON is gzipped for "gzip" only."""
    if config.encoding == "protobuf":
        return encode_push_protobuf(streams), push_headers("protobuf")
    gzipped = config.compression == "gzip"
    return encode_push_json(streams, gzipped), push_headers("json", gzipped)


def classify_loki_response(status: int, body: str) -> Literal["ok", "retry", "permanent"]:
    """429 and 5xx are retried; any other status is permanent (the body is kept for the dead letter)."""
    del body  # unlike Prometheus' 500s, Loki's status alone tells a retryable failure from a lost cause
    if 200 <= status < 300:
        return "ok"
    return "retry" if status == 429 or status >= 500 else "permanent"

