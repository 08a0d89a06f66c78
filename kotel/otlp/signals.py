"""The three OTLP signals, their message classes, item counting and protobuf decoding.

Everything signal-specific (class names, field names, paths) lives in one table here so the codec,
validation and batching modules stay signal-agnostic.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2


class OtlpDecodeError(ValueError):
    """A payload that is not a valid OTLP export request; the message says where and why."""


class OtlpSizeError(ValueError):
    """An item that cannot fit in a part of the requested size, even alone with its resource and scope."""


@dataclass(frozen=True, slots=True)
class _Spec:
    request: type[Message]
    response: type[Message]
    partial_success: type[Message]
    http_path: str
    grpc_method: str
    resource_field: str  # resource_spans / resource_metrics / resource_logs
    scope_field: str  # scope_spans / ...
    item_field: str  # spans / metrics / log_records
    rejected_field: str  # rejected_spans / rejected_data_points / rejected_log_records
    item_name: str  # "span" / "data point" / "log record", for messages


class Signal(enum.StrEnum):
    """An OTLP signal; its value is the name used in topic names and configuration."""

    TRACES = "traces"
    METRICS = "metrics"
    LOGS = "logs"

    @property
    def _spec(self) -> _Spec:
        return _SPECS[self]

    @property
    def request_class(self) -> type[Message]:
        return self._spec.request

    @property
    def response_class(self) -> type[Message]:
        return self._spec.response

    @property
    def partial_success_class(self) -> type[Message]:
        return self._spec.partial_success

    @property
    def http_path(self) -> str:
        return self._spec.http_path

    @property
    def grpc_method(self) -> str:
        return self._spec.grpc_method

    @property
    def resource_field(self) -> str:
        return self._spec.resource_field

    @property
    def scope_field(self) -> str:
        return self._spec.scope_field

    @property
    def item_field(self) -> str:
        return self._spec.item_field

    @property
    def item_name(self) -> str:
        return self._spec.item_name

    def response(self, rejected: int = 0, error_message: str = "") -> Message:
        """The export response; a partial-success part only when something was rejected or said."""
        resp = self._spec.response()
        if rejected or error_message:
            ps = resp.partial_success
            setattr(ps, self._spec.rejected_field, rejected)
            ps.error_message = error_message
        return resp

    @classmethod
    def from_http_path(cls, path: str) -> Signal:
        """The signal an OTLP/HTTP path (e.g. /v1/traces) is for; ValueError otherwise."""
        for sig in cls:
            if _SPECS[sig].http_path == path:
                return sig
        raise ValueError(f"not an OTLP/HTTP path: {path!r} (expected /v1/traces, /v1/metrics or /v1/logs)")


_SPECS: dict[Signal, _Spec] = {
    Signal.TRACES: _Spec(
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        trace_service_pb2.ExportTracePartialSuccess,
        "/v1/traces",
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        "resource_spans",
        "scope_spans",
        "spans",
        "rejected_spans",
        "span",
    ),
    Signal.METRICS: _Spec(
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        metrics_service_pb2.ExportMetricsPartialSuccess,
        "/v1/metrics",
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        "resource_metrics",
        "scope_metrics",
        "metrics",
        "rejected_data_points",
        "data point",
    ),
    Signal.LOGS: _Spec(
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
        logs_service_pb2.ExportLogsPartialSuccess,
        "/v1/logs",
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        "resource_logs",
        "scope_logs",
        "log_records",
        "rejected_log_records",
        "log record",
    ),
}


def signal_of(request: Message) -> Signal:
    """The signal of a request object (TypeError for anything else)."""
    for sig, spec in _SPECS.items():
        if type(request) is spec.request:
            return sig
    raise TypeError(f"not an OTLP export request: {type(request).__name__}")


def metric_data_points(metric: metrics_pb2.Metric) -> Any:
    """The repeated data_points of whichever data kind the metric holds (empty tuple when none)."""
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).data_points if kind else ()


def count_items(request: Message) -> int:
    """Spans, metric data points (of every metric type) or log records in the request."""
    sig = signal_of(request)
    spec = _SPECS[sig]
    total = 0
    for res in getattr(request, spec.resource_field):
        for scope in getattr(res, spec.scope_field):
            items = getattr(scope, spec.item_field)
            if sig is Signal.METRICS:
                total += sum(len(metric_data_points(m)) for m in items)
            else:
                total += len(items)
    return total


def decode_protobuf(signal: Signal, data: bytes | bytearray | memoryview) -> Message:
    """Parse OTLP/protobuf bytes; upb's terse parse errors are turned into an actionable message."""
    cls = _SPECS[Signal(signal)].request
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise OtlpDecodeError(
            f"invalid OTLP/protobuf {cls.__name__}: {_protobuf_reason(str(exc))}"
        ) from None


def _protobuf_reason(detail: str) -> str:
    # upb says "Error parsing message with type '<full name>': <what>"; keep the <what> and explain it.
    what = detail.rsplit("': ", 1)[-1].strip()
    if "UTF-8" in what:
        return "a string field holds invalid UTF-8 (protobuf string fields must be valid UTF-8)"
    if "corrupt" in what.lower() or "truncated" in what.lower():
        return "malformed wire format (truncated, or not a protobuf message)"
    return what or "unparsable bytes"
