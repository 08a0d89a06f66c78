"""The backend servers are real and answer: one write in each protocol, read back by each one's query API.

These guard the fixtures the sink tests stand on: if a server stored nothing, ignored its tenant
header or lost its data on restart, the sink tests built on it would prove nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cramjam
import psutil
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

from loadtest.servers import ServerError, accepts_connections, http_request, wait_until
from loadtest.servers.build import GoServer, is_cached
from loadtest.servers.jaeger import JaegerServer
from loadtest.servers.prometheus import PrometheusServer
from loadtest.servers.victorialogs import VictoriaLogsServer
from streams.sinks.proto import loki_push_pb2, remote_write_pb2

REMOTE_WRITE_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}


def remote_write(server: PrometheusServer, labels: dict[str, str], value: float, ts_ms: int) -> int:
    request = remote_write_pb2.WriteRequest()
    series = request.timeseries.add()
    for name in sorted(labels):
        series.labels.add(name=name, value=labels[name])
    series.samples.add(value=value, timestamp=ts_ms)
    body = bytes(cramjam.snappy.compress_raw(request.SerializeToString()))
    url = server.remote_write_url
    status, answer = http_request(url, method="POST", data=body, headers=REMOTE_WRITE_HEADERS)
    assert status == 204, answer
    return status


def test_prometheus_remote_write_is_read_back_by_query(prometheus_server: PrometheusServer) -> None:
    run = uuid.uuid4().hex
    labels = {"__name__": "kotel_smoke_total", "job": "smoke", "instance": "i1", "run": run}
    now_ms = int(time.time() * 1000)
    remote_write(prometheus_server, labels, 42.5, now_ms)

    [sample] = prometheus_server.query(f'kotel_smoke_total{{run="{run}"}}')
    assert sample["metric"] == labels
    assert float(sample["value"][1]) == 42.5
    assert prometheus_server.series(f'{{run="{run}"}}') == [labels]


def test_prometheus_accepts_samples_inside_its_out_of_order_window(
    prometheus_server: PrometheusServer,
) -> None:
    # Without the window Prometheus answers 400 "out of order sample" for the older write.
    labels = {"__name__": "kotel_smoke_ooo", "run": uuid.uuid4().hex}
    now_ms = int(time.time() * 1000)
    remote_write(prometheus_server, labels, 2.0, now_ms)
    older_ms = now_ms - 20 * 60 * 1000
    remote_write(prometheus_server, labels, 1.0, older_ms)

    [sample] = prometheus_server.query(f'kotel_smoke_ooo{{run="{labels["run"]}"}}', at=older_ms / 1000)
    assert float(sample["value"][1]) == 1.0


@pytest.mark.parametrize(
    "make_exporter",
    [
        pytest.param(lambda s: GrpcSpanExporter(endpoint=s.otlp_grpc_endpoint, insecure=True), id="grpc"),
        pytest.param(lambda s: HttpSpanExporter(endpoint=f"{s.otlp_http_url}/v1/traces"), id="http"),
    ],
)
def test_jaeger_stores_an_otlp_trace(
    jaeger_server: JaegerServer, make_exporter: Callable[[JaegerServer], SpanExporter]
) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "kotel-smoke"}))
    provider.add_span_processor(SimpleSpanProcessor(make_exporter(jaeger_server)))
    tracer = provider.get_tracer("kotel.smoke")
    with tracer.start_as_current_span("smoke-parent") as parent, tracer.start_as_current_span("smoke-child"):
        trace_id = format(parent.get_span_context().trace_id, "032x")
    provider.shutdown()

    def both_spans() -> dict[str, dict[str, Any]]:
        spans = {span["name"]: span for span in jaeger_server.spans(trace_id)}
        return spans if len(spans) == 2 else {}

    spans = wait_until(both_spans, 15, f"both spans of trace {trace_id} in Jaeger")
    assert spans.keys() == {"smoke-parent", "smoke-child"}
    assert {span["traceId"] for span in spans.values()} == {trace_id}
    assert spans["smoke-child"]["parentSpanId"] == spans["smoke-parent"]["spanId"]
    trace = jaeger_server.trace(trace_id)
    assert trace is not None
    services = {
        attribute["value"]["stringValue"]
        for resource_spans in trace["resourceSpans"]
        for attribute in resource_spans["resource"]["attributes"]
        if attribute["key"] == "service.name"
    }
    assert services == {"kotel-smoke"}
    assert jaeger_server.trace(uuid.uuid4().hex) is None


def test_victorialogs_takes_a_loki_json_push_per_numeric_tenant(
    victorialogs_server: VictoriaLogsServer,
) -> None:
    run = uuid.uuid4().hex
    now_ns = time.time_ns()
    push = {
        "streams": [
            {
                "stream": {"service_name": "kotel-smoke", "run": run},
                "values": [
                    [str(now_ns), "first line", {"trace_id": "0af7651916cd43dd8448eb211c80319c"}],
                    [str(now_ns + 1000), "second line"],
                ],
            }
        ]
    }
    status, answer = http_request(
        victorialogs_server.loki_push_url,
        method="POST",
        data=json.dumps(push).encode(),
        headers={"Content-Type": "application/json", "X-Scope-OrgID": "7"},
    )
    assert status == 204, answer

    entries = victorialogs_server.query(f"run:{run} | sort by (_time)", account_id=7)
    assert [entry["_msg"] for entry in entries] == ["first line", "second line"]
    assert entries[0]["service_name"] == "kotel-smoke"
    assert entries[0]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert victorialogs_server.query(f"run:{run}") == []  # tenant 0 sees nothing of tenant 7


def test_victorialogs_takes_a_loki_snappy_protobuf_push(victorialogs_server: VictoriaLogsServer) -> None:
    run = uuid.uuid4().hex
    request = loki_push_pb2.PushRequest()
    stream = request.streams.add(labels=f'{{service_name="kotel-smoke", run="{run}"}}')
    entry = stream.entries.add(line="from protobuf")
    entry.timestamp.FromNanoseconds(time.time_ns())
    entry.structuredMetadata.add(name="span_id", value="b7ad6b7169203331")
    body = bytes(cramjam.snappy.compress_raw(request.SerializeToString()))
    status, answer = http_request(
        victorialogs_server.loki_push_url,
        method="POST",
        data=body,
        headers={"Content-Type": "application/x-protobuf", "X-Scope-OrgID": "3"},
    )
    assert status == 204, answer

    [stored] = victorialogs_server.query(f"run:{run}", account_id=3)
    assert (stored["_msg"], stored["span_id"]) == ("from protobuf", "b7ad6b7169203331")


def test_victorialogs_refuses_a_tenant_name(victorialogs_server: VictoriaLogsServer) -> None:
    status, answer = http_request(
        victorialogs_server.loki_push_url,
        method="POST",
        data=b'{"streams": []}',
        headers={"Content-Type": "application/json", "X-Scope-OrgID": "acme"},
    )
    assert status == 400
    assert b'cannot parse accountID from "acme"' in answer


def test_prometheus_keeps_its_data_across_a_restart_and_is_gone_while_stopped(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path / "prometheus")
    try:
        server.start(timeout=60)
        labels = {"__name__": "kotel_smoke_restart", "run": uuid.uuid4().hex}
        remote_write(server, labels, 7.0, int(time.time() * 1000))
        pid = server.pid
        assert pid is not None
        server.stop()
        assert not server.running
        assert not psutil.pid_exists(pid)
        assert not accepts_connections(server.port)

        server.start(timeout=60)
        [sample] = server.query(f'kotel_smoke_restart{{run="{labels["run"]}"}}')
        assert float(sample["value"][1]) == 7.0
    finally:
        server.stop()


def test_a_server_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    server = PrometheusServer(tmp_path / "prometheus", out_of_order_window="soon")
    with pytest.raises(ServerError, match=r"prometheus exited with \d+ while starting") as failure:
        server.start(timeout=30)
    assert r'not a valid duration string: \"soon\"' in str(failure.value)  # from the log tail
    assert not server.running


def test_a_build_is_trusted_only_once_its_marker_matches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KOTEL_CACHE", str(tmp_path))
    server = GoServer("demo", "example.com/demo/cmd/demo", "v1.2.3")
    server.cache_dir.mkdir(parents=True)
    server.binary.write_bytes(b"half a binary")  # as a killed build leaves it
    assert not is_cached(server)
    (server.cache_dir / ".complete").write_text(json.dumps({"recipe": "example.com/demo/cmd/demo@v1.0.0"}))
    assert not is_cached(server)
    (server.cache_dir / ".complete").write_text(json.dumps({"recipe": server.recipe()}))
    assert is_cached(server)
