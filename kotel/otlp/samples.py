"""Realistic OTLP requests for benchmarks and load generation (an instrumented HTTP/DB service's shape).

Deterministic for a given seed, so two runs offer the same data.
"""

from __future__ import annotations

import random

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from kotel.otlp.attributes import kv

ROUTES = ["/api/orders", "/api/orders/{id}", "/api/cart", "/api/users/{id}/profile", "/api/search"]
BASE_TIME = 1_718_000_000_000_000_000


def service_resource(resource: Resource, service: int, instance: int = 0, tenant: str | None = None) -> None:
    resource.attributes.extend([
        kv("service.name", f"shop-{service}"),
        kv("service.instance.id", f"shop-{service}-{instance:04d}"),
        kv("service.version", "1.42.0"),
        kv("host.name", f"node-{service % 3}.eu-west-1.compute.internal"),
        kv("telemetry.sdk.language", "python"),
    ])
    if tenant is not None:
        resource.attributes.append(kv("tenant", tenant))


def traces(
    spans: int, services: int = 4, seed: int = 7, health_share: float = 0.0
) -> ExportTraceServiceRequest:
    """``spans`` spans over ``services`` resources x 2 scopes; ``health_share`` of them hit /health."""
    rnd = random.Random(seed)
    req = ExportTraceServiceRequest()
    slots = services * 2
    for s in range(services):
        rs = req.resource_spans.add()
        service_resource(rs.resource, s, seed % 1000)
        for k, scope_name in enumerate(("opentelemetry.instrumentation.flask",
                                        "opentelemetry.instrumentation.psycopg")):
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = scope_name, "0.48b0"
            slot = s * 2 + k
            for _ in range(spans // slots + (1 if slot < spans % slots else 0)):
                span = ss.spans.add(trace_id=rnd.randbytes(16), span_id=rnd.randbytes(8),
                                    parent_span_id=rnd.randbytes(8), kind=Span.SPAN_KIND_SERVER)
                health = rnd.random() < health_share
                span.name = "GET /health" if health else f"GET {rnd.choice(ROUTES)}"
                start = BASE_TIME + rnd.randrange(10**12)
                span.start_time_unix_nano, span.end_time_unix_nano = start, start + rnd.randrange(10**9)
                span.attributes.extend([
                    kv("http.request.method", "GET"),
                    kv("http.target", "/health" if health else rnd.choice(ROUTES)),
                    kv("http.response.status_code", rnd.choice([200, 200, 200, 404, 500])),
                    kv("server.address", "shop.example.com"),
                    kv("client.address", f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}"),
                ])
                if rnd.random() < 0.05:
                    span.status.code = Status.STATUS_CODE_ERROR
    return req


def metrics(points: int, services: int = 4, seed: int = 7) -> ExportMetricsServiceRequest:
    """``points`` data points as counters, gauges and histograms (a histogram point counts as one)."""
    rnd = random.Random(seed)
    req = ExportMetricsServiceRequest()
    per_resource = max(1, points // services)
    made = 0
    for s in range(services):
        rm = req.resource_metrics.add()
        service_resource(rm.resource, s, seed % 1000)
        sm = rm.scope_metrics.add()
        sm.scope.name = "opentelemetry.instrumentation.flask"
        counter = sm.metrics.add(name="http.server.requests", unit="{request}")
        counter.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        counter.sum.is_monotonic = True
        gauge = sm.metrics.add(name="process.memory.usage", unit="By")
        hist = sm.metrics.add(name="http.server.duration", unit="ms")
        hist.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        quota = per_resource if s < services - 1 else points - made
        for i in range(quota):
            made += 1
            t = BASE_TIME + i * 1_000_000
            attrs = [kv("http.route", ROUTES[i % len(ROUTES)]), kv("series", i)]
            kind = i % 3
            if kind == 0:
                dp = counter.sum.data_points.add(start_time_unix_nano=BASE_TIME, time_unix_nano=t, as_int=i)
            elif kind == 1:
                dp = gauge.gauge.data_points.add(time_unix_nano=t, as_double=rnd.random() * 1e6)
            else:
                dp = hist.histogram.data_points.add(start_time_unix_nano=BASE_TIME, time_unix_nano=t,
                                                    count=10, sum=55.0,
                                                    explicit_bounds=[1, 5, 10, 50, 100, 500])
                dp.bucket_counts.extend([1, 2, 3, 2, 1, 1, 0])
            dp.attributes.extend(attrs)
    return req


def logs(
    records: int, services: int = 4, seed: int = 7, debug_share: float = 0.0
) -> ExportLogsServiceRequest:
    rnd = random.Random(seed)
    req = ExportLogsServiceRequest()
    per_resource = max(1, records // services)
    made = 0
    levels = [(SeverityNumber.SEVERITY_NUMBER_INFO, "INFO"), (SeverityNumber.SEVERITY_NUMBER_WARN, "WARN"),
              (SeverityNumber.SEVERITY_NUMBER_ERROR, "ERROR")]
    for s in range(services):
        rl = req.resource_logs.add()
        service_resource(rl.resource, s, seed % 1000)
        sl = rl.scope_logs.add()
        sl.scope.name = "app.logger"
        for i in range(per_resource if s < services - 1 else records - made):
            made += 1
            number, text = ((SeverityNumber.SEVERITY_NUMBER_DEBUG, "DEBUG") if rnd.random() < debug_share
                            else rnd.choice(levels))
            record = sl.log_records.add(time_unix_nano=BASE_TIME + i, observed_time_unix_nano=BASE_TIME + i,
                                        severity_number=number, severity_text=text,
                                        trace_id=rnd.randbytes(16), span_id=rnd.randbytes(8))
            record.body.string_value = f"order {rnd.randrange(10**6)} processed in {rnd.randrange(500)} ms"
            record.attributes.extend([kv("logger", "orders"), kv("thread", f"worker-{i % 8}")])
    return req
