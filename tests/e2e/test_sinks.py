"""Each sink end to end: OTLP records in a tenant topic of the real broker -> the sink -> the real
backend (Prometheus, Jaeger as Tempo's stand-in, VictoriaLogs as Loki's), read back by query."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from kotel.kafka.admin import create_topics
from kotel.otlp.attributes import kv
from kotel.topology import Topology, parse_topology
from streams.sinks.factory import build_deliverer
from streams.sinks.runtime import SinkRunner

pytestmark = pytest.mark.asyncio(loop_scope="session")
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def _topology(bootstrap: str, exporter: str, options: str) -> Topology:
    return parse_topology(f"""
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics: {{prefix: "e{uuid.uuid4().hex[:8]}", defaults: {{partitions: 1}}}}
gateway:
  processors:
    routing:
      table:
        - {{value: tenant-a, exporters: ["{exporter}"]}}
  exporters:
    "{exporter}": {options}
""")


def _produce(topology: Topology, signal: str, values: list[bytes]) -> None:
    create_topics(
        AdminClient({"bootstrap.servers": topology.kafka.bootstrap_servers}), topology.planned_topics()
    )
    producer = Producer({"bootstrap.servers": topology.kafka.bootstrap_servers})
    for value in values:
        producer.produce(
            topology.topic_names.tenant("tenant-a", signal),
            value,
            b"svc-1",
            headers=[("kotel.tenant", b"tenant-a"), ("kotel.signal", signal.encode())],
        )
    assert producer.flush(30) == 0


def _committed(runner: SinkRunner) -> int:
    consumer = Consumer(
        {"bootstrap.servers": runner.topology.kafka.bootstrap_servers, "group.id": runner.group_id}
    )
    try:
        parts = [TopicPartition(t, 0) for t in runner.topics]
        try:
            return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
        except KafkaException:  # the group coordinator may still be loading right after the broker starts
            return -1
    finally:
        consumer.close()


async def _run(runner: SinkRunner, done: Callable[[], bool], timeout: float = 60) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(done):
                await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await runner.deliverer.close()


def _fast_retries(runner: SinkRunner) -> None:
    from kotel.topology.exporters import RetryConfig

    runner.backoff = type(runner.backoff)(
        RetryConfig(initial_interval="200ms", max_interval="1s", max_elapsed_time="0s")
    )


async def _through_an_outage(runner: SinkRunner, server, delivered: Callable[[], bool]) -> list[int]:
    """Stop the server, let the sink fail for a few polls, start it again, wait until ``delivered``.
    Returns what was committed while the server was down (-1: the coordinator was still loading)."""
    _fast_retries(runner)
    server.stop()
    while_down: list[int] = []

    def done() -> bool:
        if server.running:
            return delivered()
        while_down.append(_committed(runner))
        if len(while_down) >= 8:
            server.start()
        return False

    try:
        await _run(runner, done, timeout=120)
    finally:
        if not server.running:
            server.start()
    return while_down


def _metrics(job_suffix: str, now_ns: int, value: int) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(
        [
            kv("service.name", f"checkout-{job_suffix}"),
            kv("service.instance.id", "i-1"),
            kv("tenant", "tenant-a"),
        ]
    )
    sm = rm.scope_metrics.add()
    sm.scope.name = "shop"
    counter = sm.metrics.add(name="orders", unit="{order}")
    counter.sum.is_monotonic, counter.sum.aggregation_temporality = True, CUMULATIVE
    counter.sum.data_points.add(start_time_unix_nano=now_ns - 10**9, time_unix_nano=now_ns, as_int=value)
    gauge = sm.metrics.add(name="queue.depth")
    gauge.gauge.data_points.add(time_unix_nano=now_ns, as_double=7.5)
    hist = sm.metrics.add(name="latency", unit="ms")
    hist.histogram.aggregation_temporality = CUMULATIVE
    point = hist.histogram.data_points.add(
        start_time_unix_nano=now_ns - 10**9,
        time_unix_nano=now_ns,
        count=6,
        sum=42.0,
        explicit_bounds=[10.0, 100.0],
    )
    point.bucket_counts.extend([3, 2, 1])
    summary = sm.metrics.add(name="payload", unit="By")
    sp = summary.summary.data_points.add(time_unix_nano=now_ns, count=4, sum=400.0)
    sp.quantile_values.add(quantile=0.5, value=90.0)
    expo = sm.metrics.add(name="wait", unit="s")
    expo.exponential_histogram.aggregation_temporality = CUMULATIVE
    ep = expo.exponential_histogram.data_points.add(
        start_time_unix_nano=now_ns - 10**9, time_unix_nano=now_ns, count=5, sum=10.0, scale=0, zero_count=1
    )
    ep.positive.offset = 0
    ep.positive.bucket_counts.extend([2, 2])
    return req.SerializeToString()


def _value(server, expr: str) -> float:
    result = server.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


async def test_prometheus_round_trip_of_every_metric_type(kafka_bootstrap: str, prometheus_server) -> None:
    suffix = uuid.uuid4().hex[:6]
    topology = _topology(
        kafka_bootstrap, "prometheusremotewrite", f'{{endpoint: "{prometheus_server.remote_write_url}"}}'
    )
    _produce(topology, "metrics", [_metrics(suffix, time.time_ns(), 3)])
    runner = SinkRunner(topology, build_deliverer(topology, "prometheusremotewrite"))
    await _run(runner, lambda: _committed(runner) == 1)
    job = f'job="checkout-{suffix}"'
    assert _value(prometheus_server, f"orders_total{{{job}}}") == 3
    assert _value(prometheus_server, f"queue_depth{{{job}}}") == 7.5
    assert _value(prometheus_server, f'latency_milliseconds_bucket{{{job},le="100"}}') == 5
    assert _value(prometheus_server, f'latency_milliseconds_bucket{{{job},le="+Inf"}}') == 6
    assert _value(prometheus_server, f"latency_milliseconds_sum{{{job}}}") == 42
    assert _value(prometheus_server, f'payload_bytes{{{job},quantile="0.5"}}') == 90
    assert _value(prometheus_server, f'wait_seconds_bucket{{{job},le="+Inf"}}') == 5
    labels = prometheus_server.series(f"orders_total{{{job}}}")[0]
    assert labels["instance"] == "i-1" and labels["otel_scope_name"] == "shop"


async def test_prometheus_outage_commits_nothing_until_the_server_is_back(
    kafka_bootstrap: str, prometheus_server
) -> None:
    suffix = uuid.uuid4().hex[:6]
    topology = _topology(
        kafka_bootstrap,
        "prometheusremotewrite",
        f'{{endpoint: "{prometheus_server.remote_write_url}", '
        f"circuit_breaker: {{open_duration: 1s, minimum_requests: 2}}}}",
    )
    now = time.time_ns()
    _produce(topology, "metrics", [_metrics(suffix, now - k * 10**9, 10 - k) for k in range(3, 0, -1)])
    runner = SinkRunner(topology, build_deliverer(topology, "prometheusremotewrite"))
    while_down = await _through_an_outage(runner, prometheus_server, lambda: _committed(runner) == 3)
    assert max(while_down) <= 0
    assert (
        runner.metrics.registry.get_sample_value(
            "kotel_sink_retried_records_total",
            {"sink": "prometheusremotewrite", "reason": "http ClientConnectorError"},
        )
        >= 1
    )
    assert _value(prometheus_server, f'orders_total{{job="checkout-{suffix}"}}') == 9


async def test_a_malformed_record_is_dead_lettered(kafka_bootstrap: str, prometheus_server) -> None:
    topology = _topology(
        kafka_bootstrap, "prometheusremotewrite", f'{{endpoint: "{prometheus_server.remote_write_url}"}}'
    )
    _produce(topology, "metrics", [b"\xff not protobuf"])
    runner = SinkRunner(topology, build_deliverer(topology, "prometheusremotewrite"))
    await _run(runner, lambda: _committed(runner) == 1)
    assert (
        runner.metrics.registry.get_sample_value(
            "kotel_sink_dead_lettered_records_total",
            {"sink": "prometheusremotewrite", "reason": "invalid OTLP"},
        )
        == 1
    )


async def test_traces_reach_jaeger_over_otlp_grpc(kafka_bootstrap: str, jaeger_server) -> None:
    trace_id = uuid.uuid4().bytes
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("service.name", "checkout"), kv("tenant", "tenant-a")])
    now = time.time_ns()
    for k, name in enumerate(["GET /cart", "SELECT cart"]):
        rs.scope_spans.add().spans.add(
            trace_id=trace_id,
            span_id=(k + 1).to_bytes(8, "big"),
            name=name,
            start_time_unix_nano=now,
            end_time_unix_nano=now + 10**6,
        )
    topology = _topology(
        kafka_bootstrap,
        "otlp/tempo",
        f'{{endpoint: "{jaeger_server.otlp_grpc_endpoint}", tls: {{insecure: true}}}}',
    )
    _produce(topology, "traces", [req.SerializeToString()])
    runner = SinkRunner(topology, build_deliverer(topology, "otlp/tempo"))
    await _run(runner, lambda: _committed(runner) == 1 and len(jaeger_server.spans(trace_id.hex())) == 2)
    assert sorted(s["name"] for s in jaeger_server.spans(trace_id.hex())) == ["GET /cart", "SELECT cart"]


async def test_logs_reach_victorialogs_through_the_loki_push_api(
    kafka_bootstrap: str, victorialogs_server
) -> None:
    marker = uuid.uuid4().hex
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend(
        [kv("service.name", "checkout"), kv("tenant", "tenant-a"), kv("env", "prod")]
    )
    now = time.time_ns()
    for k in range(3):
        record = rl.scope_logs.add().log_records.add(
            time_unix_nano=now + k, severity_number=17, severity_text="ERROR"
        )
        record.body.string_value = f"{marker} payment failed {k}"
        record.trace_id = bytes(range(16))
    # VictoriaLogs reads X-Scope-OrgID as a numeric account id: the tenant header is mapped per sink.
    topology = _topology(
        kafka_bootstrap,
        "loki",
        f'{{endpoint: "{victorialogs_server.loki_push_url}", tenant_header: {{values: {{tenant-a: "7"}}}}}}',
    )
    _produce(topology, "logs", [req.SerializeToString()])
    runner = SinkRunner(topology, build_deliverer(topology, "loki"))
    await _run(runner, lambda: _committed(runner) == 1)
    found = victorialogs_server.query(marker, account_id=7)
    assert sorted(f["_msg"] for f in found) == [f"{marker} payment failed {k}" for k in range(3)]
    assert found[0]["service_name"] == "checkout" and found[0]["level"] == "error"
    assert victorialogs_server.query(marker, account_id=0) == []


def _trace(trace_id: bytes, names: list[str]) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("service.name", "checkout"), kv("tenant", "tenant-a")])
    now = time.time_ns()
    for k, name in enumerate(names):
        rs.scope_spans.add().spans.add(
            trace_id=trace_id,
            span_id=(k + 1).to_bytes(8, "big"),
            name=name,
            start_time_unix_nano=now,
            end_time_unix_nano=now + 10**6,
        )
    return req.SerializeToString()


async def test_traces_reach_jaeger_over_otlp_http(kafka_bootstrap: str, jaeger_server) -> None:
    trace_id = uuid.uuid4().bytes
    topology = _topology(kafka_bootstrap, "otlphttp/tempo", f'{{endpoint: "{jaeger_server.otlp_http_url}"}}')
    _produce(topology, "traces", [_trace(trace_id, ["a"]), _trace(trace_id, ["b"])])
    runner = SinkRunner(topology, build_deliverer(topology, "tempo"))
    await _run(runner, lambda: _committed(runner) == 2 and len(jaeger_server.spans(trace_id.hex())) == 2)


async def test_the_otlp_sink_names_the_tenant_in_x_scope_orgid(kafka_bootstrap: str) -> None:
    # Jaeger ignores tenants, so a recording receiver complements it for the header alone.
    from aiohttp import web

    seen: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Scope-OrgID", ""))
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    runner_web = web.AppRunner(app)
    await runner_web.setup()
    site = web.TCPSite(runner_web, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        topology = _topology(
            kafka_bootstrap,
            "otlphttp/tempo",
            f'{{endpoint: "http://127.0.0.1:{port}", tenant_header: {{values: {{tenant-a: team-1}}}}}}',
        )
        _produce(topology, "traces", [_trace(uuid.uuid4().bytes, ["x"])])
        runner = SinkRunner(topology, build_deliverer(topology, "tempo"))
        await _run(runner, lambda: _committed(runner) == 1)
    finally:
        await runner_web.cleanup()
    assert seen == ["team-1"]


async def test_loki_outage_commits_nothing_until_the_server_is_back(
    kafka_bootstrap: str, victorialogs_server
) -> None:
    marker = uuid.uuid4().hex
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend([kv("service.name", "checkout"), kv("tenant", "tenant-a")])
    rl.scope_logs.add().log_records.add(time_unix_nano=time.time_ns()).body.string_value = marker
    topology = _topology(
        kafka_bootstrap,
        "loki",
        f'{{endpoint: "{victorialogs_server.loki_push_url}", tenant_header: {{values: {{tenant-a: "9"}}}}}}',
    )
    _produce(topology, "logs", [req.SerializeToString()])
    runner = SinkRunner(topology, build_deliverer(topology, "loki"))
    while_down = await _through_an_outage(runner, victorialogs_server, lambda: _committed(runner) == 1)
    assert max(while_down) <= 0
    assert [f["_msg"] for f in victorialogs_server.query(marker, account_id=9)] == [marker]


async def test_tempo_outage_commits_nothing_until_the_server_is_back(
    kafka_bootstrap: str, jaeger_server
) -> None:
    trace_id = uuid.uuid4().bytes
    topology = _topology(
        kafka_bootstrap,
        "otlp/tempo",
        f'{{endpoint: "{jaeger_server.otlp_grpc_endpoint}", tls: {{insecure: true}}, timeout: 2s}}',
    )
    _produce(topology, "traces", [_trace(trace_id, ["during-outage"])])
    runner = SinkRunner(topology, build_deliverer(topology, "tempo"))
    while_down = await _through_an_outage(
        runner,
        jaeger_server,
        lambda: _committed(runner) == 1 and len(jaeger_server.spans(trace_id.hex())) == 1,
    )
    assert max(while_down) <= 0
    assert (
        runner.metrics.registry.get_sample_value(
            "kotel_sink_retried_records_total", {"sink": "otlp/tempo", "reason": "grpc UNAVAILABLE"}
        )
        >= 1
    )
