"""The load test's backend read-back against the real servers: the generator's items, split per tenant as
routing does, go through kotel's own sinks into Jaeger, Prometheus and VictoriaLogs; one part of each
signal is left out and one is sent twice, and the read-back must count exactly those (no broker)."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
from google.protobuf.message import Message

from kotel.otlp import Signal
from kotel.topology import parse_topology
from loadtest.collect import Observation
from loadtest.generator import Ledger, Shapes
from loadtest.generator.identity import ids_of_values
from loadtest.readback import read_back, read_jaeger
from loadtest.scenario import MetricShape, TraceShape, Workload
from streams.sinks.factory import build_deliverer
from streams.sinks.runtime import Outcome, SinkRecord

TENANTS = ["tenant-a", "tenant-b"]
FIELD = {"traces": "resource_spans", "metrics": "resource_metrics", "logs": "resource_logs"}
EXPORTER = {"traces": "otlp/tempo", "metrics": "prometheusremotewrite", "logs": "loki"}


def _by_tenant(signal: str, request: Message) -> dict[str, bytes]:
    """The request cut per tenant (its resources' ``tenant`` attribute), as the routing stage files it."""
    parts: dict[str, Message] = {}
    for entry in getattr(request, FIELD[signal]):
        tenant = next(kv.value.string_value for kv in entry.resource.attributes if kv.key == "tenant")
        getattr(parts.setdefault(tenant, type(request)()), FIELD[signal]).add().CopyFrom(entry)
    return {tenant: part.SerializeToString() for tenant, part in parts.items()}


async def _deliver(deliverer: Any, signal: str, tenant: str, value: bytes) -> None:
    record = SinkRecord(topic="t", partition=0, offset=0, key=None, value=value, headers=(), tenant=tenant,
                        signal=signal, timestamp_ms=int(time.time() * 1000))
    assert [r.outcome for r in await deliverer.deliver([record])] == [Outcome.OK]


async def test_read_back_counts_what_each_backend_holds(jaeger_server, prometheus_server,
                                                        victorialogs_server) -> None:
    began = time.monotonic()
    workload = Workload(tenants=TENANTS, unknown_share=0.3, duplicate_share=0, metrics=MetricShape(series=20),
                        traces=TraceShape(late_share=0, health_share=0, max_spans=6))
    ledger = Ledger([*TENANTS, workload.unknown_tenant], run_tag=random.randrange(1, 1 << 15))
    shapes = Shapes(workload, ledger)
    topology = parse_topology(f"""
kafka: {{bootstrap_servers: "127.0.0.1:9"}}
gateway:
  processors:
    routing:
      table: [{{value: tenant-a, exporters: [{", ".join(EXPORTER.values())}]}}]
  exporters:
    otlp/tempo: {{endpoint: "{jaeger_server.otlp_grpc_endpoint}", tls: {{insecure: true}}}}
    prometheusremotewrite: {{endpoint: "{prometheus_server.remote_write_url}"}}
    loki:
      endpoint: "{victorialogs_server.loki_push_url}"
      tenant_header: {{values: {{tenant-a: "1", tenant-b: "2"}}}}
""")
    stages: dict[str, dict[str, Observation]] = {}
    dropped: dict[str, int] = {}
    doubled: dict[str, int] = {}
    for signal in ("traces", "metrics", "logs"):
        deliverer = build_deliverer(topology, EXPORTER[signal])
        build = getattr(shapes, signal)
        ids, tenants = [], []
        routed: list[tuple[str, bytes, int]] = []
        for k in range(3):
            built = build(time.time_ns() + k * 1_000_000, 30)
            ledger[signal].settle(built.request_id, True, time.time_ns())
            for tenant, value in _by_tenant(signal, built.request).items():
                found, _ = ids_of_values(Signal(signal), [value], ledger.run_tag, ledger.series)
                ids.append(found)
                tenants.append(np.full(len(found), ledger.tenants.index(tenant), np.int64))
                if tenant in TENANTS:
                    routed.append((tenant, value, len(found)))
        # The archive holds every part; the backend misses the first routed part and gets the last twice.
        all_ids = np.concatenate(ids)
        stages[signal] = {"sink": Observation("sink", signal, all_ids, np.zeros(len(all_ids), np.int64),
                                              np.concatenate(tenants))}
        dropped[signal], doubled[signal] = routed[0][2], routed[-1][2]
        try:
            for tenant, value, _ in [*routed[1:], routed[-1]]:
                await _deliver(deliverer, signal, tenant, value)
        finally:
            await deliverer.close()
    # Jaeger's exporter queue makes spans searchable a moment after the export was acknowledged.
    spans = stages["traces"]["sink"]
    routed_spans = len(np.unique(spans.ids[spans.tenant < 2]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        window = (time.time_ns() - 60 * 10**9, time.time_ns() + 60 * 10**9)
        seen = read_jaeger(jaeger_server.query_url, window, ledger.run_tag, jaeger_server.max_traces, 100,
                           deadline)
        if len(seen) >= routed_spans - dropped["traces"] + doubled["traces"]:
            break
        time.sleep(0.3)

    servers = {"tempo": jaeger_server, "prometheus": prometheus_server, "loki": victorialogs_server}
    result = read_back(servers, stages, ledger, routed_tenants=2, timeout_s=30)

    for backend, signal in (("tempo", "traces"), ("prometheus", "metrics"), ("loki", "logs")):
        got = result[signal][backend]
        assert "error" not in got, got
        sink = stages[signal]["sink"]
        expected = len(np.unique(sink.ids[sink.tenant < 2]))
        assert expected < len(np.unique(sink.ids)), "the unknown tenant's items must not be expected"
        # Prometheus keeps one sample per series and time: the part sent twice is no duplicate there.
        copies = 0 if backend == "prometheus" else doubled[signal]
        assert {k: got[k] for k in ("expected", "found", "missing", "duplicates", "unexpected")} == {
            "expected": expected, "found": expected - dropped[signal], "missing": dropped[signal],
            "duplicates": copies, "unexpected": 0}, (backend, got)
        assert got["examples"][0].startswith("missing "), got
    assert time.monotonic() - began < 60
