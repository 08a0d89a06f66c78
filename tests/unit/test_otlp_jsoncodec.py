"""OTLP/JSON: round trips, the spec's encoding rules, and exact error messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from kotel.otlp import OtlpDecodeError, Signal, decode_json, encode_json

TID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SID = bytes.fromhex("eee19b7ec3c1b174")
PID = bytes.fromhex("eee19b7ec3c1b173")
T0 = 1_544_712_660_000_000_000


def _kv(key: str, **value: object) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def trace_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.26.0")
    rs.resource.attributes.extend([_kv("service.name", string_value="cart"), _kv("pid", int_value=42)])
    ss = rs.scope_spans.add()
    ss.scope.name = "my.library"
    span = ss.spans.add(
        trace_id=TID, span_id=SID, parent_span_id=PID, name="GET /cart", trace_state="k=v", flags=0x301,
        kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=T0, end_time_unix_nano=T0 + 10**9,
        dropped_attributes_count=2,
    )
    span.attributes.extend([
        _kv("ok", bool_value=True), _kv("ratio", double_value=0.25), _kv("raw", bytes_value=b"\x00\xff"),
        _kv("big", int_value=2**63 - 1),
    ])
    span.attributes.add(key="list").value.array_value.values.extend([AnyValue(int_value=-1)])
    span.attributes.add(key="map").value.kvlist_value.values.extend([_kv("inner", string_value="é")])
    span.events.add(time_unix_nano=T0 + 5, name="exception").attributes.append(_kv("x", string_value="y"))
    span.links.add(trace_id=TID[::-1], span_id=SID[::-1], trace_state="a=b", flags=1)
    span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
    span.status.message = "boom"
    return req


def metrics_request() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(_kv("service.instance.id", string_value="i-1"))
    sm = rm.scope_metrics.add()
    exemplar = metrics_pb2.Exemplar(trace_id=TID, span_id=SID, time_unix_nano=T0, as_double=1.5)
    gauge = sm.metrics.add(name="temp", unit="Cel").gauge
    gauge.data_points.add(time_unix_nano=T0, as_double=21.5).exemplars.append(exemplar)
    total = sm.metrics.add(name="requests", description="served").sum
    total.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    total.is_monotonic = True
    total.data_points.add(start_time_unix_nano=T0, time_unix_nano=T0 + 1, as_int=-7).exemplars.append(
        exemplar)
    hist = sm.metrics.add(name="latency").histogram
    hist.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
    point = hist.data_points.add(
        count=3, sum=0.5, bucket_counts=[1, 2, 0], explicit_bounds=[0.1, 1.0], min=0.0)
    point.exemplars.append(exemplar)
    exp = sm.metrics.add(name="exp").exponential_histogram.data_points.add(scale=-2, zero_count=1, count=4)
    exp.positive.offset = -3
    exp.positive.bucket_counts.extend([1, 2])
    exp.exemplars.append(metrics_pb2.Exemplar(trace_id=TID, span_id=SID, as_int=9))
    summary = sm.metrics.add(name="q").summary.data_points.add(count=2, sum=3.0)
    summary.quantile_values.add(quantile=0.99, value=2.5)
    return req


def logs_request() -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.append(_kv("service.name", string_value="api"))
    sl = rl.scope_logs.add()
    rec = sl.log_records.add(
        time_unix_nano=T0, observed_time_unix_nano=T0 + 1, severity_number=logs_pb2.SEVERITY_NUMBER_WARN,
        severity_text="WARN", trace_id=TID, span_id=SID, flags=1, event_name="order.failed",
    )
    rec.body.kvlist_value.values.append(_kv("msg", string_value="disk almost full"))
    sl.log_records.add(body=AnyValue(string_value="no ids"))  # ids are optional on logs
    return req


@pytest.mark.parametrize(
    ("signal", "build"),
    [(Signal.TRACES, trace_request), (Signal.METRICS, metrics_request), (Signal.LOGS, logs_request)],
)
def test_round_trip(signal: Signal, build) -> None:  # type: ignore[no-untyped-def]
    req = build()
    data = encode_json(req)
    assert decode_json(signal, data) == req


def test_encoding_follows_the_spec() -> None:
    doc = json.loads(encode_json(trace_request()))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "5b8efff798038103d269b633813fc60c"
    assert span["spanId"] == "eee19b7ec3c1b174"
    assert span["parentSpanId"] == "eee19b7ec3c1b173"
    assert span["links"][0]["traceId"] == TID[::-1].hex()
    assert span["links"][0]["spanId"] == SID[::-1].hex()
    assert span["kind"] == 2  # enums as integers
    assert span["status"]["code"] == 2
    assert span["startTimeUnixNano"] == str(T0)  # 64-bit ints as decimal strings
    assert "dropped_attributes_count" not in span and span["droppedAttributesCount"] == 2
    metrics_doc = json.loads(encode_json(metrics_request()))
    histogram = metrics_doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][2]["histogram"]
    exemplar = histogram["dataPoints"][0]["exemplars"][0]
    assert (exemplar["traceId"], exemplar["spanId"]) == (TID.hex(), SID.hex())
    record = json.loads(encode_json(logs_request()))["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    assert (record["traceId"], record["spanId"], record["severityNumber"]) == (TID.hex(), SID.hex(), 13)


def test_decode_accepts_names_numbers_strings_snake_case_and_ignores_unknown_fields() -> None:
    doc = {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "a", "value": {"intValue": 5, "futureField": 1}}]},
            "scope_spans": [{"spans": [
                {"traceId": TID.hex().upper(), "span_id": SID.hex(), "parentSpanId": "",
                 "kind": "SPAN_KIND_CLIENT", "startTimeUnixNano": str(T0), "end_time_unix_nano": T0 + 1,
                 "status": {"code": 1}, "newerSpanField": {"deep": [1, 2]}},
                {"traceId": TID.hex(), "spanId": SID.hex(), "kind": 3, "links": [
                    {"trace_id": TID.hex(), "spanId": SID.hex(), "linkExtra": True}]},
            ]}],
        }],
        "extraTopLevel": "ignored",
    }
    expected = ExportTraceServiceRequest()
    rs = expected.resource_spans.add()
    rs.resource.attributes.append(_kv("a", int_value=5))
    ss = rs.scope_spans.add()
    ss.spans.add(trace_id=TID, span_id=SID, kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=T0,
                 end_time_unix_nano=T0 + 1, status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_OK))
    ss.spans.add(trace_id=TID, span_id=SID, kind=trace_pb2.Span.SPAN_KIND_CLIENT).links.add(
        trace_id=TID, span_id=SID)
    assert decode_json(Signal.TRACES, json.dumps(doc).encode()) == expected


def _spans(*spans: dict[str, object]) -> bytes:
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}).encode()


SPAN0 = "resourceSpans[0].scopeSpans[0].spans[0]"
TRACES = "invalid OTLP/JSON ExportTraceServiceRequest"
METRICS = "invalid OTLP/JSON ExportMetricsServiceRequest"
LOGS = "invalid OTLP/JSON ExportLogsServiceRequest"


@pytest.mark.parametrize(
    ("signal", "data", "message"),
    [
        (Signal.TRACES, _spans({"spanId": SID.hex()}, {}, {}, {"traceId": "a" * 31}),
         f"{TRACES} at resourceSpans[0].scopeSpans[0].spans[3].traceId: expected 32 hex characters, got 31"),
        (Signal.TRACES, _spans({"traceId": "g" + "0" * 31}),
         f"{TRACES} at {SPAN0}.traceId: expected hex characters only, got 'g' at position 0"),
        (Signal.TRACES, _spans({"spanId": "7uGbfsPBsXQ="}),
         f"{TRACES} at {SPAN0}.spanId: expected 16 hex characters, got 12 "
         "(OTLP/JSON ids are hex, not base64)"),
        (Signal.TRACES, _spans({"links": [{}, {"traceId": 12}]}),
         f"{TRACES} at {SPAN0}.links[1].traceId: expected a hex string, got number"),
        (Signal.TRACES, b'{"resourceSpans": [',
         f"{TRACES}: not valid JSON: Expecting value at line 1 column 20"),
        (Signal.TRACES, b"[]", f"{TRACES}: expected a JSON object at the top level, got array"),
        (Signal.LOGS, b'{"x": "\xff"}', f"{LOGS}: not valid UTF-8 (invalid start byte at byte 7)"),
        (Signal.TRACES, _spans({"kind": "SPAN_KIND_SERVERR"}),
         f"{TRACES} at {SPAN0}.kind: unknown SpanKind name 'SPAN_KIND_SERVERR'"),
        (Signal.TRACES, _spans({"unknownField": 1, "status": {"code": "ERROR"}}),
         f"{TRACES} at {SPAN0}.status.code: unknown StatusCode name 'ERROR'"),
        (Signal.TRACES, _spans({"startTimeUnixNano": "12:00"}),
         f"{TRACES} at {SPAN0}.startTimeUnixNano: expected an integer (a JSON number or a decimal string), "
         "got '12:00'"),
        (Signal.TRACES, _spans({"name": 5}), f"{TRACES} at {SPAN0}.name: expected a string, got 5"),
        (Signal.TRACES, b'{"resourceSpans": {"scopeSpans": []}}',
         f"{TRACES} at resourceSpans: expected an array, got object"),
        (Signal.TRACES, b'{"resourceSpans": [{"scopeSpans": [null]}]}',
         f"{TRACES} at resourceSpans[0].scopeSpans[0]: expected a JSON object, got null"),
        (Signal.METRICS,
         b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"m","sum":{"dataPoints":[{"exemplars":'
         b'[{"spanId":"00"}]}]}}]}]}]}',
         f"{METRICS} at resourceMetrics[0].scopeMetrics[0].metrics[0].sum.dataPoints[0].exemplars[0].spanId: "
         "expected 16 hex characters, got 2"),
        (Signal.METRICS,
         b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"histogram":{"dataPoints":[{"bucketCounts":'
         b'["1", "two"]}]}}]}]}]}',
         f"{METRICS} at resourceMetrics[0].scopeMetrics[0].metrics[0].histogram.dataPoints[0]"
         ".bucketCounts[1]: expected an integer (a JSON number or a decimal string), got 'two'"),
        (Signal.LOGS,
         b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"severityNumber":"WARN"}]}]}]}',
         f"{LOGS} at resourceLogs[0].scopeLogs[0].logRecords[0].severityNumber: unknown SeverityNumber name "
         "'WARN'"),
    ],
    ids=["wrong-length", "bad-hex", "base64-id", "id-not-string", "not-json", "top-level-array",
         "bad-utf8", "bad-enum", "bad-enum-after-unknown-field", "bad-int64", "bad-string",
         "object-for-array", "null-item", "exemplar-id", "repeated-scalar", "bad-severity"],
)
def test_decode_errors(signal: Signal, data: bytes, message: str) -> None:
    with pytest.raises(OtlpDecodeError) as err:
        decode_json(signal, data)
    assert str(err.value) == message


_IDS = st.one_of(st.just(b""), st.binary(min_size=16, max_size=16))
_SIDS = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8))
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
_U64 = st.integers(0, 2**64 - 1)


@st.composite
def random_traces(draw: st.DrawFn) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        rs = req.resource_spans.add()
        rs.resource.attributes.append(_kv(draw(_TEXT), int_value=draw(st.integers(-(2**63), 2**63 - 1))))
        for _ in range(draw(st.integers(0, 3))):
            ss = rs.scope_spans.add()
            for _ in range(draw(st.integers(0, 4))):
                span = ss.spans.add(trace_id=draw(_IDS), span_id=draw(_SIDS), parent_span_id=draw(_SIDS),
                                    name=draw(_TEXT), kind=draw(st.integers(0, 5)),
                                    start_time_unix_nano=draw(_U64))
                for _ in range(draw(st.integers(0, 2))):
                    span.links.add(trace_id=draw(_IDS), span_id=draw(_SIDS))
    return req


@settings(max_examples=60, deadline=None)
@given(random_traces())
def test_round_trip_property(req: ExportTraceServiceRequest) -> None:
    assert decode_json(Signal.TRACES, encode_json(req)) == req


_KEYS = st.sampled_from([
    "resourceSpans", "resource_spans", "scopeSpans", "spans", "traceId", "spanId", "parentSpanId", "links",
    "kind", "name", "attributes", "key", "value", "intValue", "kvlistValue", "values", "status", "code",
    "startTimeUnixNano", "resourceLogs", "scopeLogs", "logRecords", "resourceMetrics", "scopeMetrics",
    "metrics", "sum", "dataPoints", "exemplars", "bucketCounts", "unknown",
])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=34),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Signal)), _JSON)
def test_fuzz_only_decode_errors(signal: Signal, doc: object) -> None:
    """Whatever the JSON, the caller sees a request or an OtlpDecodeError, never another exception."""
    try:
        decode_json(signal, json.dumps(doc).encode())
    except OtlpDecodeError as exc:
        assert str(exc).startswith(f"invalid OTLP/JSON {signal.request_class.__name__}")
