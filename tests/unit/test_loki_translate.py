"""OTLP logs -> Loki push: stream labels, structured metadata, ordering, both encodings, response classes."""

from __future__ import annotations

import gzip
import json
from typing import Any

import cramjam
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from kotel.otlp.attributes import kv
from kotel.topology.exporters import LokiExporterConfig
from streams.sinks.loki_translate import (
    LokiEntry,
    LokiStream,
    LokiTranslator,
    classify_loki_response,
    count_entries,
    encode_push,
    encode_push_json,
    encode_push_protobuf,
    level_of,
    push_headers,
)
from streams.sinks.proto.loki_push_pb2 import PushRequest

RESOURCE = {"service.name": "api", "tenant": "acme", "env": "prod", "host.name": "h1"}
T = 1_700_000_000_123_456_789


def config(**options: Any) -> LokiExporterConfig:
    return LokiExporterConfig(endpoint="http://127.0.0.1:3100/loki/api/v1/push", **options)


def record(body: str | AnyValue = "hello", t: int = T, severity: int = 9, text: str = "INFO",
           observed: int = 0, trace_id: bytes = b"", span_id: bytes = b"",
           attrs: dict[str, Any] | None = None) -> LogRecord:  # fmt: skip
    value = body if isinstance(body, AnyValue) else AnyValue(string_value=body)
    return LogRecord(body=value, time_unix_nano=t, observed_time_unix_nano=observed,
                     severity_number=severity, severity_text=text, trace_id=trace_id,  # type: ignore[arg-type]
                     span_id=span_id, attributes=[kv(k, v) for k, v in (attrs or {}).items()])  # fmt: skip


Group = tuple[dict[str, Any], list[LogRecord]]


def request(*groups: Group, scope: str = "io.lib") -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for attrs, records in groups:
        rl = req.resource_logs.add()
        rl.resource.attributes.extend(kv(k, v) for k, v in attrs.items())
        sl = rl.scope_logs.add()
        sl.scope.name, sl.scope.version = scope, "2.0"
        sl.log_records.extend(records)
    return req


def translate(*records: LogRecord, resource: dict[str, Any] = RESOURCE,
              cfg: LokiExporterConfig | None = None, now_ns: int = 42) -> list[LokiStream]:  # fmt: skip
    return LokiTranslator(cfg or config()).translate(request((resource, list(records))), now_ns=now_ns)


LABELS = (("env", "prod"), ("level", "info"), ("service_name", "api"), ("tenant", "acme"))


def test_stream_labels_are_the_chosen_resource_attributes_and_level() -> None:
    (stream,) = translate(record())
    assert stream.labels == LABELS
    metadata = (("host_name", "h1"), ("scope_name", "io.lib"), ("scope_version", "2.0"),
                ("severity_text", "INFO"))
    assert stream.entries == [LokiEntry(T, "hello", metadata)]


def test_everything_else_is_structured_metadata_and_later_sources_win() -> None:
    attrs = {"http.method": "GET", "host.name": "from-record", "empty": "", "trace_id": "attr"}
    log = record(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, text="", attrs=attrs)
    (stream,) = translate(log, resource={**RESOURCE, "k8s.pod.name": "p-1"})
    assert dict(stream.entries[0].metadata) == {
        "host_name": "from-record", "k8s_pod_name": "p-1", "scope_name": "io.lib", "scope_version": "2.0",
        "http_method": "GET", "trace_id": "01" * 16, "span_id": "02" * 8}  # fmt: skip


@pytest.mark.parametrize(("number", "text", "expected"), [
    (1, "", "trace"), (4, "", "trace"), (5, "", "debug"), (9, "", "info"), (12, "Notice", "info"),
    (13, "", "warn"), (17, "", "error"), (21, "", "fatal"), (24, "", "fatal"), (0, "WARNING", "warn"),
    (0, " Information ", "info"), (0, "crit", "fatal"), (0, "loud", "unknown"), (0, "", "unknown"),
])  # fmt: skip
def test_level_from_severity_number_then_known_text(number: int, text: str, expected: str) -> None:
    assert level_of(record(severity=number, text=text)) == expected


def test_labels_are_configurable_sanitised_and_never_empty() -> None:
    cfg = config(label_resource_attributes=["k8s.namespace.name", "service.name"], severity_label=False)
    (stream,) = translate(record(), resource={"k8s.namespace.name": "web", "service.name": ""}, cfg=cfg)
    assert stream.labels == (("k8s_namespace_name", "web"),)
    (fallback,) = translate(record(), resource={"host.name": "h1"}, cfg=config(severity_label=False))
    assert fallback.labels == (("service_name", "unknown_service"),)


def test_entries_are_grouped_per_label_set_and_ordered_by_time() -> None:
    records = [record("c", t=30), record("a", t=10), record("oops", t=20, severity=17), record("b", t=10),
               record("observed", t=0, observed=25), record("now", t=0)]  # fmt: skip
    both = request((RESOURCE, records[:3]), (RESOURCE, records[3:]))
    streams = LokiTranslator(config()).translate(both, now_ns=42)
    assert [(dict(s.labels)["level"], [(e.time_ns, e.line) for e in s.entries]) for s in streams] == [
        ("info", [(10, "a"), (10, "b"), (25, "observed"), (30, "c"), (42, "now")]),  # equal times keep order
        ("error", [(20, "oops")]),
    ]
    assert count_entries(streams) == 6


@pytest.mark.parametrize(("body", "line"), [
    (AnyValue(string_value="plain text"), "plain text"),
    (AnyValue(kvlist_value=KeyValueList(values=[kv("msg", "hi"), kv("n", 2)])), '{"msg":"hi","n":2}'),
    (AnyValue(int_value=7), "7"), (AnyValue(bool_value=False), "false"), (AnyValue(), ""),
])  # fmt: skip
def test_the_line_is_the_body_with_structured_bodies_as_json(body: AnyValue, line: str) -> None:
    assert translate(record(body))[0].entries[0].line == line


def test_selector_escapes_values() -> None:
    stream = LokiStream((("a", 'x"y\\z\nw'), ("b", "ü")))
    assert stream.selector() == '{a="x\\"y\\\\z\\nw", b="ü"}'


# --- the wire ------------------------------------------------------------------------------------


def test_protobuf_encoding_round_trips_through_snappy() -> None:
    streams = translate(record(trace_id=b"\x01" * 16), record("second", t=T + 1, severity=13))
    parsed = PushRequest.FromString(bytes(cramjam.snappy.decompress_raw(encode_push_protobuf(streams))))
    assert [s.labels for s in parsed.streams] == [
        '{env="prod", level="info", service_name="api", tenant="acme"}',
        '{env="prod", level="warn", service_name="api", tenant="acme"}']  # fmt: skip
    entry = parsed.streams[0].entries[0]
    assert (entry.timestamp.seconds, entry.timestamp.nanos) == (1_700_000_000, 123_456_789)
    assert entry.line == "hello"
    assert [(p.name, p.value) for p in entry.structuredMetadata] == [
        ("host_name", "h1"), ("scope_name", "io.lib"), ("scope_version", "2.0"), ("trace_id", "01" * 16),
        ("severity_text", "INFO")]  # fmt: skip
    assert parsed.streams[1].entries[0].timestamp.ToNanoseconds() == T + 1


def test_json_encoding_is_lokis_push_format() -> None:
    streams = [LokiStream((("service_name", "api"),), [LokiEntry(5, "a", (("k", "v"),)), LokiEntry(6, "b")])]
    values = [["5", "a", {"k": "v"}], ["6", "b"]]
    expected = {"streams": [{"stream": {"service_name": "api"}, "values": values}]}
    assert json.loads(encode_push_json(streams)) == expected
    assert json.loads(gzip.decompress(encode_push_json(streams, compress=True))) == expected


def test_encode_push_follows_the_config() -> None:
    streams = translate(record())
    body, headers = encode_push(streams, config())
    parsed = PushRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert parsed.streams[0].entries[0].line == "hello"
    assert headers == {"Content-Type": "application/x-protobuf", "User-Agent": "kotel/0.1.0"}
    body, headers = encode_push(streams, config(encoding="json", compression="gzip"))
    assert json.loads(gzip.decompress(body))["streams"][0]["values"][0][:2] == [str(T), "hello"]
    assert headers == {"Content-Type": "application/json", "Content-Encoding": "gzip",
                       "User-Agent": "kotel/0.1.0"}  # fmt: skip
    body, headers = encode_push(streams, config(encoding="json", compression="none"))
    assert json.loads(body)["streams"][0]["stream"] == dict(LABELS)
    assert headers == push_headers("json")
    assert headers == {"Content-Type": "application/json", "User-Agent": "kotel/0.1.0"}


@pytest.mark.parametrize(("status", "expected"), [
    (200, "ok"), (204, "ok"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"),
    (400, "permanent"), (401, "permanent"), (404, "permanent"), (413, "permanent"), (301, "permanent"),
])  # fmt: skip
def test_response_classes(status: int, expected: str) -> None:
    assert classify_loki_response(status, "entry too far behind") == expected
