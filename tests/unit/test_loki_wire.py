"""The Loki wire translator against LokiTranslator + protobuf's PushRequest, byte for byte, on random logs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cramjam
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValueList

from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf, samples
from kotel.otlp.attributes import kv
from kotel.topology.exporters import LokiExporterConfig
from streams.sinks.http_sinks import LokiDeliverer
from streams.sinks.loki_translate import LokiTranslator, push_request
from streams.sinks.loki_wire import LokiWireTranslator
from streams.sinks.proto import otlp_views_pb2 as views
from streams.sinks.proto.loki_push_pb2 import PushRequest

NOW = 1_700_000_000_999_999_999
NAMES = ["service.name", "env", "host.name", "trace_id", "severity_text", "span.id", "scope_name", "x"]
VALUES = st.sampled_from(["", "a", "b", "é ü", 'q"\\'])
BODIES = st.one_of(
    VALUES.map(lambda s: AnyValue(string_value=s)),
    st.just(AnyValue(string_value="l" * 300)),
    st.integers(-5, 5).map(lambda i: AnyValue(int_value=i)),
    st.just(AnyValue()),
    st.just(AnyValue(kvlist_value=KeyValueList(values=[kv("k", "v")]))),
    st.just(AnyValue(array_value=ArrayValue(values=[AnyValue(bool_value=True)]))),
    st.just(AnyValue(bytes_value=b"\x00\x01")),
)
ATTRS = st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=3)


def config(**options: Any) -> LokiExporterConfig:
    return LokiExporterConfig(endpoint="http://127.0.0.1:9/loki/api/v1/push", **options)


@st.composite
def logs_requests(draw: st.DrawFn) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for _ in range(draw(st.integers(1, 3))):
        rl = req.resource_logs.add()
        rl.resource.attributes.extend(kv(k, v) for k, v in draw(ATTRS).items())
        for _ in range(draw(st.integers(1, 2))):
            sl = rl.scope_logs.add()
            sl.scope.name, sl.scope.version = draw(st.sampled_from([("s", ""), ("s", "1"), ("", "")]))
            sl.scope.attributes.extend(kv(k, v) for k, v in draw(ATTRS).items())
            for _ in range(draw(st.integers(0, 6))):
                sl.log_records.add(
                    time_unix_nano=draw(st.sampled_from([0, 5, 10**18, 10**18 + 123])),
                    observed_time_unix_nano=draw(st.sampled_from([0, 7])),
                    severity_number=draw(st.integers(0, 24)),
                    severity_text=draw(st.sampled_from(["", "INFO", "warning", "loud"])),
                    trace_id=draw(st.sampled_from([b"", b"\x01" * 16, b"\x02" * 3])),
                    span_id=draw(st.sampled_from([b"", b"\x03" * 8, b"\x04" * 9])),
                    body=draw(BODIES),
                    attributes=[kv(k, v) for k, v in draw(ATTRS).items()])  # fmt: skip
    return req


def reference(request: ExportLogsServiceRequest, cfg: LokiExporterConfig, max_entries: int) -> bytes:
    """What the sink sent before: LokiTranslator's streams, cut to max_entries, as a protobuf PushRequest."""
    streams = LokiTranslator(cfg).translate(request, now_ns=NOW)
    cut = [replace(s, entries=s.entries[i : i + max_entries]) for s in streams
           for i in range(0, len(s.entries), max_entries)]  # fmt: skip
    return push_request(cut).SerializeToString()


@settings(max_examples=80, deadline=None)
@given(first=logs_requests(), second=logs_requests(), severity_label=st.booleans(), cut=st.integers(1, 4))
def test_wire_bytes_equal_the_reference_with_a_warm_cache(first: Any, second: Any, severity_label: bool,
                                                          cut: int) -> None:  # fmt: skip
    cfg = config(severity_label=severity_label, label_resource_attributes=["service.name", "env"])
    translator = LokiWireTranslator(cfg, max_cached=3)
    for request in (first, second, second):
        pieces = translator.translate_wire(request.SerializeToString(), cut, now_ns=NOW)
        assert b"".join(piece for piece, _ in pieces) == reference(request, cfg, cut)
        assert all(1 <= entries <= cut for _, entries in pieces)


def test_the_sample_load_matches_and_is_cached() -> None:
    request = samples.logs(300, seed=3)
    translator = LokiWireTranslator(config())
    for _ in range(2):
        pieces = translator.translate_wire(request.SerializeToString(), 5000, now_ns=NOW)
        assert b"".join(piece for piece, _ in pieces) == reference(request, config(), 5000)
    assert sum(entries for _, entries in pieces) == 300 and translator.resets == 0


def test_the_sink_sends_wire_bytes_for_protobuf_and_objects_for_json() -> None:
    request = samples.logs(20, seed=1)
    sink = LokiDeliverer("l", config())
    body, headers = sink.encode(sink.translate(request))
    assert headers["Content-Type"] == "application/x-protobuf"
    parsed = PushRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert sum(len(s.entries) for s in parsed.streams) == 20
    assert parsed.streams[0].entries[0].line.startswith("order ")
    json_sink = LokiDeliverer("j", config(encoding="json"))
    assert json_sink.wire is None
    assert json_sink.encode(json_sink.translate(request))[1]["Content-Type"] == "application/json"


def test_the_metadata_cache_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"^max_cached must be at least 1, got 0$"):
        LokiWireTranslator(config(), max_cached=0)
    translator = LokiWireTranslator(config(), max_cached=2)
    translator.translate_wire(samples.logs(40, seed=1).SerializeToString(), 5000)  # 8 attribute sets
    assert translator.resets > 0


@pytest.mark.parametrize("body", [b"\x0a\x02\xff\xfe", b"\x0a\x05ab", b"\x2a\x03\x0a\x01\xff"])
def test_an_invalid_body_fails_like_decode_protobuf(body: bytes) -> None:
    record = views.LogRecordView(time_unix_nano=1, body=body)
    data = views.LogsView(resource_logs=[views.ResourceLogsView(scope_logs=[
        views.ScopeLogsView(log_records=[record])])]).SerializeToString()  # fmt: skip
    with pytest.raises(OtlpDecodeError) as expected:
        decode_protobuf(Signal.LOGS, data)
    with pytest.raises(OtlpDecodeError) as info:
        LokiWireTranslator(config()).translate_wire(data, 10)
    assert str(info.value) == str(expected.value)
