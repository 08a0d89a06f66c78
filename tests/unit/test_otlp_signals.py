"""Signal table, item counting and OTLP/protobuf decoding errors."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from kotel.otlp import OtlpDecodeError, Signal, count_items, decode_protobuf, signal_of


def test_signal_values_classes_and_paths() -> None:
    assert [str(s) for s in Signal] == ["traces", "metrics", "logs"]
    assert Signal.TRACES.request_class is trace_service_pb2.ExportTraceServiceRequest
    assert Signal.METRICS.response_class is metrics_service_pb2.ExportMetricsServiceResponse
    assert Signal.LOGS.partial_success_class is logs_service_pb2.ExportLogsPartialSuccess
    assert [s.http_path for s in Signal] == ["/v1/traces", "/v1/metrics", "/v1/logs"]
    assert Signal.METRICS.grpc_method == "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
    assert Signal.from_http_path("/v1/logs") is Signal.LOGS
    assert signal_of(logs_service_pb2.ExportLogsServiceRequest()) is Signal.LOGS


def test_bad_path_and_bad_request_type() -> None:
    with pytest.raises(ValueError) as err:
        Signal.from_http_path("/v1/profiles")
    assert str(err.value) == (
        "not an OTLP/HTTP path: '/v1/profiles' (expected /v1/traces, /v1/metrics or /v1/logs)"
    )
    with pytest.raises(TypeError) as terr:
        count_items(metrics_pb2.Metric())
    assert str(terr.value) == "not an OTLP export request: Metric"


@pytest.mark.parametrize(
    ("signal", "field"),
    [(Signal.TRACES, "rejected_spans"), (Signal.METRICS, "rejected_data_points"),
     (Signal.LOGS, "rejected_log_records")],
)
def test_response_partial_success(signal: Signal, field: str) -> None:
    assert not signal.response().HasField("partial_success")
    resp = signal.response(3, "3 spans had bad ids")
    assert type(resp) is signal.response_class
    assert getattr(resp.partial_success, field) == 3
    assert resp.partial_success.error_message == "3 spans had bad ids"


def test_count_items_every_metric_type() -> None:
    req = metrics_service_pb2.ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()
    sm.metrics.add(name="g").gauge.data_points.add()
    sm.metrics.add(name="s").sum.data_points.extend([metrics_pb2.NumberDataPoint()] * 2)
    sm.metrics.add(name="h").histogram.data_points.extend([metrics_pb2.HistogramDataPoint()] * 3)
    sm.metrics.add(name="e").exponential_histogram.data_points.extend(
        [metrics_pb2.ExponentialHistogramDataPoint()] * 4)
    sm.metrics.add(name="q").summary.data_points.extend([metrics_pb2.SummaryDataPoint()] * 5)
    sm.metrics.add(name="no data")
    req.resource_metrics.add().scope_metrics.add().metrics.add().gauge.data_points.add()
    assert count_items(req) == 1 + 2 + 3 + 4 + 5 + 1


def test_count_items_spans_and_logs() -> None:
    traces = trace_service_pb2.ExportTraceServiceRequest()
    for n in (2, 0, 3):
        traces.resource_spans.add().scope_spans.add().spans.extend([trace_pb2.Span(name="x")] * n)
    traces.resource_spans[0].scope_spans.add().spans.add()
    assert count_items(traces) == 6
    logs = logs_service_pb2.ExportLogsServiceRequest()
    logs.resource_logs.add().scope_logs.add().log_records.add()
    logs.resource_logs[0].scope_logs.add().log_records.add()
    assert count_items(logs) == 2
    assert count_items(logs_service_pb2.ExportLogsServiceRequest()) == 0


def _trace_bytes(name: str) -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id = bytes(range(16))
    span.name = name
    return req.SerializeToString()


def test_decode_protobuf_round_trip_and_empty() -> None:
    data = _trace_bytes("GET /orders")
    req = decode_protobuf(Signal.TRACES, data)
    assert req.resource_spans[0].scope_spans[0].spans[0].name == "GET /orders"
    assert decode_protobuf(Signal.TRACES, memoryview(data)) == req
    assert decode_protobuf(Signal.LOGS, b"") == logs_service_pb2.ExportLogsServiceRequest()


def test_decode_protobuf_invalid_utf8() -> None:
    data = _trace_bytes("caf\u00e9").replace("\u00e9".encode(), b"\xc3\x28")
    with pytest.raises(OtlpDecodeError) as err:
        decode_protobuf(Signal.TRACES, data)
    assert str(err.value) == (
        "invalid OTLP/protobuf ExportTraceServiceRequest: a string field holds invalid UTF-8 "
        "(protobuf string fields must be valid UTF-8)"
    )


@pytest.mark.parametrize(
    "data",
    [_trace_bytes("x")[:-3], b"\x0a\x05ab", b"\xff\xff\xff", b"\x0b"],
    ids=["truncated", "short-length", "bad-varint", "group-start"],
)
def test_decode_protobuf_malformed(data: bytes) -> None:
    with pytest.raises(OtlpDecodeError) as err:
        decode_protobuf(Signal.METRICS if data == b"\x0b" else Signal.TRACES, data)
    name = "ExportMetricsServiceRequest" if data == b"\x0b" else "ExportTraceServiceRequest"
    assert str(err.value) == (
        f"invalid OTLP/protobuf {name}: malformed wire format (truncated, or not a protobuf message)"
    )
