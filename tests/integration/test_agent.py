"""The edge agent against the real broker, fed by the OpenTelemetry SDK's own OTLP exporters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogs
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogs
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.app import Agent
from kotel.otlp import Signal, count_items
from tests.integration.agent_support import AgentSetup, read_topic, span_names

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _resource(instance: str) -> Resource:
    # The application claims another tenant: the agent must overwrite it.
    return Resource.create(
        {"service.name": "checkout", "service.instance.id": instance, "tenant": "intruder"}
    )


def _spans(instance: str, names: list[str]) -> Any:
    out = InMemorySpanExporter()
    provider = TracerProvider(resource=_resource(instance))
    provider.add_span_processor(SimpleSpanProcessor(out))
    tracer = provider.get_tracer("test")
    for name in names:
        target = "/health" if name.startswith("health") else "/orders"
        with tracer.start_as_current_span(name, attributes={"http.target": target}):
            pass
    return out.get_finished_spans()


def _metrics(instance: str) -> Any:
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=_resource(instance), metric_readers=[reader])
    meter = provider.get_meter("test")
    meter.create_counter("orders").add(3, {"route": "/a"})
    meter.create_histogram("latency", unit="ms").record(12.5)
    meter.create_up_down_counter("queue").add(-2)
    return reader.get_metrics_data()


def _logs(instance: str) -> Any:
    out = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=_resource(instance))
    provider.add_log_record_processor(SimpleLogRecordProcessor(out))
    logger = provider.get_logger("test")
    logger.emit(body="payment failed", severity_number=SeverityNumber.ERROR)
    logger.emit(body="noise", severity_number=SeverityNumber.DEBUG)  # filtered by the topology
    logger.emit(body="order placed", severity_number=SeverityNumber.INFO)
    return out.get_finished_logs()


@pytest_asyncio.fixture(loop_scope="session")
async def agent(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[tuple[Agent, AgentSetup]]:
    setup = AgentSetup(kafka_bootstrap, tmp_path / "spill")
    setup.create_topics()
    running = Agent(setup.topology())
    await running.start()
    try:
        yield running, setup
    finally:
        await running.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_sdk_exporters_round_trip_through_kafka(
    agent: tuple[Agent, AgentSetup], transport: str
) -> None:
    running, setup = agent
    if transport == "grpc":
        endpoint = f"127.0.0.1:{setup.grpc_port}"
        exporters = (
            GrpcSpans(endpoint=endpoint, insecure=True),
            GrpcMetrics(endpoint=endpoint, insecure=True),
            GrpcLogs(endpoint=endpoint, insecure=True),
        )
    else:
        base = f"http://127.0.0.1:{setup.http_port}"
        exporters = (
            HttpSpans(endpoint=f"{base}/v1/traces"),
            HttpMetrics(endpoint=f"{base}/v1/metrics"),
            HttpLogs(endpoint=f"{base}/v1/logs"),
        )
    spans_out, metrics_out, logs_out = exporters
    names = ["checkout", "health-1", "pay", "health-2", "ship"]
    assert (await asyncio.to_thread(spans_out.export, _spans("i-1", names))).name == "SUCCESS"
    assert (await asyncio.to_thread(metrics_out.export, _metrics("i-2"))).name == "SUCCESS"
    assert (await asyncio.to_thread(logs_out.export, _logs("i-3"))).name == "SUCCESS"
    for exporter in exporters:
        exporter.shutdown()

    traces = read_topic(setup.bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES)
    assert sorted(span_names(traces)) == ["checkout", "pay", "ship"]  # /health filtered, 100 % sampled
    record = traces[0]
    assert record.key == "i-1"
    assert record.headers["kotel.tenant"] == "tenant-a"
    assert record.headers["kotel.signal"] == "traces"
    assert record.headers["kotel.schema"] == "otlp-proto-v1"
    assert record.headers["kotel.agent"] == "agent-under-test"
    assert int(record.headers["kotel.seq"]) > 0
    attrs = {kv.key: kv.value.string_value for kv in record.request.resource_spans[0].resource.attributes}
    assert attrs["tenant"] == "tenant-a" and attrs["env"] == "test" and attrs["region"] == "local"

    metrics = read_topic(setup.bootstrap, f"{setup.prefix}.raw.metrics", Signal.METRICS)
    assert {
        m.name
        for r in metrics
        for rm in r.request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    } == {"orders", "latency", "queue"}
    assert {r.key for r in metrics} == {"i-2"}

    logs = read_topic(setup.bootstrap, f"{setup.prefix}.raw.logs", Signal.LOGS)
    bodies = [
        lr.body.string_value
        for r in logs
        for rl in r.request.resource_logs
        for sl in rl.scope_logs
        for lr in sl.log_records
    ]
    assert sorted(bodies) == ["order placed", "payment failed"]

    samples = running.metrics.registry.get_sample_value
    assert samples("kotel_agent_dropped_items_total", {"signal": "traces", "reason": "filtered"}) == 2
    assert samples("kotel_agent_dropped_items_total", {"signal": "logs", "reason": "filtered"}) == 1
    assert samples("kotel_agent_tenant_overwrites_total", {"signal": "traces"}) == 1
    assert samples("kotel_agent_received_items_total", {"signal": "traces", "transport": transport}) == 5


async def test_sampling_is_applied_and_counted(kafka_bootstrap: str, tmp_path: Path) -> None:
    setup = AgentSetup(kafka_bootstrap, tmp_path / "spill", sampling=50)
    setup.create_topics()
    running = Agent(setup.topology())
    await running.start()
    try:
        exporter = GrpcSpans(endpoint=f"127.0.0.1:{setup.grpc_port}", insecure=True)
        spans = _spans("i-9", [f"s{i}" for i in range(2000)])
        assert (await asyncio.to_thread(exporter.export, spans)).name == "SUCCESS"
        exporter.shutdown()
        kept = span_names(read_topic(setup.bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES))
        dropped = running.metrics.registry.get_sample_value(
            "kotel_agent_dropped_items_total", {"signal": "traces", "reason": "sampled_out"}
        )
        assert len(kept) + dropped == 2000
        assert 900 <= len(kept) <= 1100
    finally:
        await running.stop()


async def test_metrics_and_health_endpoints(agent: tuple[Agent, AgentSetup]) -> None:
    _, setup = agent
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{setup.metrics_port}"
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 200
            assert "circuit closed" in await resp.text()
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
    for name in (
        "kotel_agent_received_items",
        "kotel_agent_queue_utilisation",
        "kotel_agent_spill_files",
        "# TYPE kotel_agent_delivery_seconds histogram",
    ):
        assert name in text


async def test_reload_swaps_pipelines_without_losing_data(agent: tuple[Agent, AgentSetup]) -> None:
    running, setup = agent
    exporter = GrpcSpans(endpoint=f"127.0.0.1:{setup.grpc_port}", insecure=True)
    before = asyncio.create_task(asyncio.to_thread(exporter.export, _spans("i-r", ["before"] * 200)))
    # The new configuration drops every span named "after"; in-flight data of the old one is kept.
    text = setup.yaml().replace(
        """span: ['attributes["http.target"] == "/health"']""", """span: ['name == "after"']"""
    )
    from kotel.topology import parse_topology

    assert await running.reload(parse_topology(text))
    assert (await before).name == "SUCCESS"
    assert (await asyncio.to_thread(exporter.export, _spans("i-r", ["after", "kept"]))).name == "SUCCESS"
    exporter.shutdown()
    names = span_names(
        read_topic(setup.bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES, min_records=2)
    )
    assert names.count("before") == 200
    assert "after" not in names and "kept" in names


async def test_invalid_reload_keeps_running_configuration(agent: tuple[Agent, AgentSetup]) -> None:
    running, setup = agent
    from kotel.topology import parse_topology

    text = setup.yaml().replace("exporters: [kafka, file]}", "exporters: [file]}")
    assert not await running.reload(parse_topology(text))
    exporter = GrpcSpans(endpoint=f"127.0.0.1:{setup.grpc_port}", insecure=True)
    assert (await asyncio.to_thread(exporter.export, _spans("i-z", ["still-works"]))).name == "SUCCESS"
    exporter.shutdown()
    records = read_topic(setup.bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES)
    assert sum(count_items(r.request) for r in records) == 1


async def test_reload_that_changes_the_kafka_side_loses_nothing(agent: tuple[Agent, AgentSetup]) -> None:
    running, setup = agent
    from kotel.topology import parse_topology

    exporter = GrpcSpans(endpoint=f"127.0.0.1:{setup.grpc_port}", insecure=True)
    before = asyncio.create_task(asyncio.to_thread(exporter.export, _spans("i-k", ["old"] * 300)))
    text = setup.yaml().replace(
        "kafka:\n      timeout:", "kafka:\n      producer: {compression: lz4}\n      timeout:"
    )
    assert await running.reload(parse_topology(text))
    assert running.publishers["kafka"]._exporter.producer.compression == "lz4"
    assert (await before).name == "SUCCESS"
    assert (await asyncio.to_thread(exporter.export, _spans("i-k", ["new"] * 10))).name == "SUCCESS"
    exporter.shutdown()
    names = span_names(
        read_topic(setup.bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES, min_records=2)
    )
    assert names.count("old") == 300 and names.count("new") == 10
