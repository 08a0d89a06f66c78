"""The OTLP sink's retry classification follows the OTLP specification, code by code."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2

from streams.sinks.otlp_sink import grpc_result, http_result
from streams.sinks.runtime import Outcome


def _retry_info(seconds: float) -> list[tuple[str, bytes]]:
    info = error_details_pb2.RetryInfo(
        retry_delay=Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))
    )
    status = status_pb2.Status(code=8, message="slow down")
    status.details.add().Pack(info)
    return [("grpc-status-details-bin", status.SerializeToString())]


@pytest.mark.parametrize(
    "code", ["CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"]
)
def test_grpc_retryable_codes(code: str) -> None:
    assert grpc_result(grpc.StatusCode[code], "x", []).outcome is Outcome.RETRY


@pytest.mark.parametrize(
    "code",
    [
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "INTERNAL",
        "UNIMPLEMENTED",
        "FAILED_PRECONDITION",
    ],
)
def test_grpc_permanent_codes(code: str) -> None:
    result = grpc_result(grpc.StatusCode[code], "bad span", [])
    assert result.outcome is Outcome.PERMANENT
    assert result.reason == f"grpc {code}: bad span"


def test_resource_exhausted_is_retried_only_with_retry_info() -> None:
    assert grpc_result(grpc.StatusCode.RESOURCE_EXHAUSTED, "", []).outcome is Outcome.PERMANENT
    result = grpc_result(grpc.StatusCode.RESOURCE_EXHAUSTED, "", _retry_info(2.5))
    assert result.outcome is Outcome.RETRY and result.retry_after == 2.5


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.OK),
        (202, Outcome.OK),
        (429, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (400, Outcome.PERMANENT),
        (401, Outcome.PERMANENT),
        (413, Outcome.PERMANENT),
        (500, Outcome.PERMANENT),
    ],
)
def test_http_status_table(status: int, outcome: Outcome) -> None:
    assert http_result(status, "body", None).outcome is outcome


def test_http_retry_after_is_honoured() -> None:
    assert http_result(503, "", "7").retry_after == 7.0
    assert http_result(429, "", "soon").retry_after == 0.0


def test_prometheus_sink_counts_points_it_drops_on_its_metrics() -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
    from prometheus_client import CollectorRegistry

    from kotel.topology.exporters import PrometheusRemoteWriteConfig
    from streams.sinks.http_sinks import PrometheusDeliverer

    sink = PrometheusDeliverer(
        "prom", PrometheusRemoteWriteConfig(endpoint="http://x", delta_temporality="drop")
    )
    registry = CollectorRegistry()
    sink.register_metrics(registry)
    req = ExportMetricsServiceRequest()
    metric = req.resource_metrics.add().scope_metrics.add().metrics.add(name="hits")
    metric.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    metric.sum.is_monotonic = True
    metric.sum.data_points.add(time_unix_nano=10**18, as_int=3)
    assert sink.translate(req) == []
    assert (
        registry.get_sample_value(
            "kotel_sink_dropped_points_total", {"sink": "prom", "reason": "delta_temporality"}
        )
        == 1
    )
