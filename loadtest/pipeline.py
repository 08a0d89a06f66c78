"""The topology a scenario runs: the seed's edge agent and gateway, sized and wired by the scenario.

Every topic stamps records with the broker's append time (``message.timestamp.type=LogAppendTime``),
so the timestamp of a record in each stage's output topic is when that stage's output became durable:
that is what the per-stage latencies are computed from. Except, with tail sampling on, the raw and
deduped trace topics (and the tail's repartition topic, which takes the deduped settings): they keep
the agent's receive time, the event time tail sampling decides on. With append time there, spans an
agent replayed from its spill after a broker outage looked 90 s younger than the spans of their trace
sent before it, and their traces were decided without them (the outage runs' dropped ERROR traces).
Every tenant and the unrouted topics also go
to the Parquet archive, which is what the report reads back item by item; backends named by the
scenario receive the same tenants beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kotel.topology import Topology, parse_topology
from kotel.topology.durations import format_duration
from loadtest.scenario import Scenario

HEALTH_FILTER = 'attributes["http.target"] == "/health"'
BACKEND_EXPORTERS = {"tempo": "otlp/tempo", "prometheus": "prometheusremotewrite", "loki": "loki"}
ARCHIVE = "file/archive"


@dataclass
class Wiring:
    """What the runner found or started: where things listen and where state goes."""

    bootstrap: str
    prefix: str
    home: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    backends: dict[str, str] = field(default_factory=dict)  # tempo/prometheus/loki -> endpoint


def topology_dict(scenario: Scenario, wiring: Wiring, tail_sampling: bool) -> dict[str, Any]:
    p, w = scenario.pipeline, scenario.workload
    processors: dict[str, Any] = {
        # No tenant action: tenancy comes from the resources the generator sends, as behind a gateway
        # agent; the routing stage checks it against the table.
        "resource": {"attributes": [{"key": "env", "value": "loadtest", "action": "insert"},
                                    {"key": "region", "value": "local", "action": "insert"}]},
        "filter": {"traces": {"span": [HEALTH_FILTER]}},
        "batch": {"timeout": format_duration(p.batch_timeout), "send_batch_size": p.send_batch_size},
    }
    traces_chain = ["resource", "filter", "batch"]
    others = ["resource", "batch"]
    exporters_of = [ARCHIVE, *(BACKEND_EXPORTERS[b] for b in p.backends)]
    gateway_processors: dict[str, Any] = {"dedup": {"window": format_duration(p.dedup_window)}}
    if tail_sampling and p.tail_sampling is not None:
        ts = p.tail_sampling
        gateway_processors["tail_sampling"] = {
            "decision_wait": format_duration(ts.decision_wait),
            "policies": [
                {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
                {"name": "slow", "type": "latency",
                 "latency": {"threshold_ms": w.traces.slow_threshold_ms}},
                {"name": "probabilistic", "type": "probabilistic",
                 "probabilistic": {"sampling_percentage": ts.probabilistic.sampling_percentage}},
            ],
        }
    gateway_processors["routing"] = {
        "from_attribute": "tenant",
        "default_exporters": [ARCHIVE],
        "table": [{"value": t, "exporters": exporters_of} for t in w.tenants],
    }
    # The archive flushes as often as the agent batches: it is where end-to-end latency is measured.
    exporters: dict[str, Any] = {ARCHIVE: {"path": str(wiring.home / "archive"), "format": "parquet",
                                           "mode": "always",
                                           "flush_interval": format_duration(p.batch_timeout)}}
    if "tempo" in p.backends:
        exporters["otlp/tempo"] = {"endpoint": wiring.backends["tempo"], "tls": {"insecure": True}}
    if "prometheus" in p.backends:
        exporters["prometheusremotewrite"] = {"endpoint": wiring.backends["prometheus"]}
    if "loki" in p.backends:
        # VictoriaLogs (Loki's stand-in in loadtest/servers) takes numeric tenants only.
        exporters["loki"] = {"endpoint": wiring.backends["loki"],
                             "tenant_header": {"values": {t: str(i + 1) for i, t in enumerate(w.tenants)}}}
    return {
        "version": 1,
        "name": f"loadtest-{scenario.name}",
        "kafka": {"bootstrap_servers": wiring.bootstrap, "client_id": "kotel-loadtest"},
        "topics": {
            "prefix": wiring.prefix,
            "create_tenant_topics_on_first_use": True,
            "defaults": {"partitions": p.partitions, "replication_factor": 1, "retention": "24h",
                         "config": {"message.timestamp.type": "LogAppendTime"}},
            **({group: {"traces": {"config": {"message.timestamp.type": "CreateTime"}}}
                for group in ("raw", "deduped")} if "tail_sampling" in gateway_processors else {}),
        },
        "tenancy": {"attribute": "tenant"},
        "agent": {
            "agent_id": "loadtest-agent",
            "data_dir": str(wiring.home / "agent"),
            "metrics_endpoint": f"127.0.0.1:{wiring.metrics_port}",
            "receivers": {"otlp": {"protocols": {
                "grpc": {"endpoint": f"127.0.0.1:{wiring.grpc_port}", "max_recv_msg_size_mib": 16},
                "http": {"endpoint": f"127.0.0.1:{wiring.http_port}"}}}},
            "processors": processors,
            "exporters": {
                "kafka": {"backpressure": {"max_in_flight_mib": p.max_in_flight_mib},
                          "producer": {"linger": format_duration(p.kafka_linger)}},
                "file": {"path": str(wiring.home / "agent" / "spill"), "format": "parquet"},
            },
            "service": {"pipelines": {
                "traces": {"receivers": ["otlp"], "processors": traces_chain, "exporters": ["kafka", "file"]},
                "metrics": {"receivers": ["otlp"], "processors": others, "exporters": ["kafka", "file"]},
                "logs": {"receivers": ["otlp"], "processors": others, "exporters": ["kafka", "file"]},
            }},
        },
        "gateway": {"processors": gateway_processors, "exporters": exporters},
    }


def write_topology(scenario: Scenario, wiring: Wiring, tail_sampling: bool, path: Path) -> Topology:
    """Write the topology file the children read, and return it validated."""
    text = yaml.safe_dump(topology_dict(scenario, wiring, tail_sampling), sort_keys=False)
    topology = parse_topology(text)
    path.write_text(text)
    return topology
