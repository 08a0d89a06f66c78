"""validate_request: id lengths, all-zero ids, paths in messages, the problem cap."""

from __future__ import annotations

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2

from kotel.otlp import Signal, validate_request

TID = bytes(range(1, 17))
SID = bytes(range(1, 9))


def _traces(*spans: dict[str, bytes], scopes_before: int = 0) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(trace_id=TID, span_id=SID)
    rs = req.resource_spans.add()
    for _ in range(scopes_before):
        rs.scope_spans.add()
    ss = rs.scope_spans.add()
    for span in spans:
        links = span.pop("links", None)
        added = ss.spans.add(**span)
        for link in links or ():  # type: ignore[union-attr]
            added.links.add(**link)
    return req


def test_valid_traces() -> None:
    req = _traces(
        {"trace_id": TID, "span_id": SID},
        {"trace_id": TID, "span_id": SID, "parent_span_id": SID[::-1],
         "links": [{"trace_id": bytes(16), "span_id": bytes(8)}]},  # zero link context is allowed
    )
    assert validate_request(Signal.TRACES, req) == []
    assert validate_request(Signal.TRACES, ExportTraceServiceRequest()) == []


def test_span_id_problems_name_their_path() -> None:
    req = _traces(
        {"trace_id": TID, "span_id": SID},
        {"trace_id": TID[:15], "span_id": SID},
        {"trace_id": bytes(16), "span_id": bytes(8)},
        {"span_id": SID, "parent_span_id": b"\x01\x02"},
        {"trace_id": TID, "span_id": SID, "links": [{"trace_id": TID, "span_id": SID},
                                                    {"trace_id": TID, "span_id": b""}]},
        scopes_before=1,
    )
    base = "resourceSpans[1].scopeSpans[1].spans"
    assert validate_request(Signal.TRACES, req) == [
        f"{base}[1].traceId: expected 16 bytes, got 15",
        f"{base}[2].traceId: all zeros, which is an invalid id",
        f"{base}[2].spanId: all zeros, which is an invalid id",
        f"{base}[3].traceId: expected 16 bytes, got 0",
        f"{base}[3].parentSpanId: expected empty or 8 bytes, got 2",
        f"{base}[4].links[1].spanId: expected 8 bytes, got 0",
    ]


def test_logs_ids_optional_but_sized() -> None:
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    sl.log_records.add()
    sl.log_records.add(trace_id=TID, span_id=SID)
    sl.log_records.add(trace_id=bytes(16), span_id=bytes(8))  # all-zero is not checked on logs
    sl.log_records.add(trace_id=TID + b"\x00", span_id=SID[:7])
    assert validate_request(Signal.LOGS, req) == [
        "resourceLogs[0].scopeLogs[0].logRecords[3].traceId: expected empty or 16 bytes, got 17",
        "resourceLogs[0].scopeLogs[0].logRecords[3].spanId: expected empty or 8 bytes, got 7",
    ]


def test_metric_exemplar_ids() -> None:
    req = ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()
    sm.metrics.add(name="q").summary.data_points.add(count=1)
    sm.metrics.add(name="empty")
    good = metrics_pb2.Exemplar(trace_id=TID, span_id=SID)
    sm.metrics.add(name="g").gauge.data_points.add().exemplars.extend([good, metrics_pb2.Exemplar()])
    point = sm.metrics.add(name="e").exponential_histogram.data_points.add()
    point.exemplars.extend([good, metrics_pb2.Exemplar(trace_id=TID[:4], span_id=SID)])
    assert validate_request(Signal.METRICS, req) == [
        "resourceMetrics[0].scopeMetrics[0].metrics[3].exponentialHistogram.dataPoints[0].exemplars[1]"
        ".traceId: expected empty or 16 bytes, got 4",
    ]


def test_problem_list_is_capped() -> None:
    req = _traces(*({"trace_id": TID, "span_id": b""} for _ in range(7)))
    problems = validate_request(Signal.TRACES, req, max_problems=3)
    assert problems == [
        "resourceSpans[1].scopeSpans[0].spans[0].spanId: expected 8 bytes, got 0",
        "resourceSpans[1].scopeSpans[0].spans[1].spanId: expected 8 bytes, got 0",
        "resourceSpans[1].scopeSpans[0].spans[2].spanId: expected 8 bytes, got 0",
        "... and 4 more problems",
    ]
