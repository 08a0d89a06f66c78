"""Small builders of real OTLP protobuf requests for the processor tests, plus counter readers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.otlp.attributes import any_value

Attrs = Mapping[str, Any]


def kvs(attrs: Attrs) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def as_dict(kv_list: Any) -> dict[str, Any]:
    """KeyValues as {key: python value} (string/int/double/bool/bytes), for assertions."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kv_list}


def span(name: str = "op", trace_id: bytes = b"\x01" * 16, **attrs: Any) -> Span:
    return Span(name=name, trace_id=trace_id, span_id=b"\x02" * 8, attributes=kvs(attrs))


def log(body: str = "", severity: int = 0, text: str = "", trace_id: bytes = b"", **attrs: Any) -> LogRecord:
    return LogRecord(body=AnyValue(string_value=body), severity_number=severity,  # type: ignore[arg-type]
                     severity_text=text, trace_id=trace_id, attributes=kvs(attrs))  # fmt: skip


def gauge(name: str, *points: Attrs) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name, unit="1")
    metric.gauge.data_points.extend(metrics_pb2.NumberDataPoint(as_int=i, attributes=kvs(p))
                                    for i, p in enumerate(points))  # fmt: skip
    return metric


def counter(name: str, *points: Attrs) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name, unit="By", description="bytes sent")
    metric.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    metric.sum.is_monotonic = True
    metric.sum.data_points.extend(metrics_pb2.NumberDataPoint(as_int=10 + i, attributes=kvs(p))
                                  for i, p in enumerate(points))  # fmt: skip
    return metric


def histogram(name: str, bounds: Sequence[float], counts: Sequence[int], total: float) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name, unit="s")
    metric.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
    metric.histogram.data_points.add(explicit_bounds=bounds, bucket_counts=counts, count=sum(counts),
                                     sum=total, min=0.001, max=99.0)  # fmt: skip
    return metric


Scopes = Sequence[Sequence[Any]]  # each scope: its items (spans, log records or metrics)


def build(signal: Signal, *resources: tuple[Attrs, Scopes]) -> Any:
    """A request whose resources have the given attributes; scope i of a resource is named ``scope-i``."""
    request: Any = {Signal.TRACES: ExportTraceServiceRequest, Signal.METRICS: ExportMetricsServiceRequest,
                    Signal.LOGS: ExportLogsServiceRequest}[signal]()  # fmt: skip
    for attrs, scopes in resources:
        entry = getattr(request, signal.resource_field).add()
        entry.resource.attributes.extend(kvs(attrs))
        for index, items in enumerate(scopes):
            scope = getattr(entry, signal.scope_field).add()
            scope.scope.name = f"scope-{index}"
            getattr(scope, signal.item_field).extend(items)
    return request


def items(signal: Signal, request: Any) -> list[Any]:
    """Every span / metric / log record of the request, in order."""
    return [item for entry in getattr(request, signal.resource_field)
            for scope in getattr(entry, signal.scope_field) for item in getattr(scope, signal.item_field)]


def dropped(metrics: AgentMetrics, signal: Signal, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "kotel_agent_dropped_items_total", {"signal": signal.value, "reason": reason})
    return value or 0.0


def overwrites(metrics: AgentMetrics, signal: Signal) -> float:
    value = metrics.registry.get_sample_value("kotel_agent_tenant_overwrites_total", {"signal": signal.value})
    return value or 0.0
