"""Helpers for agent tests: a topology for given ports, topics, and reading records back from Kafka."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from kotel.otlp import Signal, decode_protobuf
from kotel.topology import Topology, parse_topology
from tests.integration.conftest import free_ports

TEMPLATE = """
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics: {{prefix: "{prefix}", defaults: {{partitions: 3}}}}
agent:
  agent_id: agent-under-test
  metrics_endpoint: "127.0.0.1:{metrics_port}"
  receivers:
    otlp:
      protocols:
        grpc: {{endpoint: "127.0.0.1:{grpc_port}"}}
        http: {{endpoint: "127.0.0.1:{http_port}"}}
  processors:
    resource:
      attributes:
        - {{key: tenant, value: tenant-a, action: upsert}}
        - {{key: env, value: test, action: insert}}
        - {{key: region, value: local, action: insert}}
    filter:
      traces:
        span: ['attributes["http.target"] == "/health"']
      logs:
        log_record: ['severity_number < SEVERITY_NUMBER_INFO']
    probabilistic_sampler: {{sampling_percentage: {sampling}}}
    batch: {{timeout: 5ms, send_batch_size: 1024}}
  exporters:
    kafka:
      timeout: {kafka_timeout}
      backpressure: {{max_in_flight_mib: {in_flight_mib}}}
      circuit_breaker: {{open_duration: 2s, minimum_requests: 2}}
      retry_on_failure: {{initial_interval: 200ms, max_interval: 1s}}
    file: {{path: "{spill}", rotation: {{max_megabytes: 1}}, max_disk_mib: {disk_mib}}}
  service:
    pipelines:
      traces: {{processors: [resource, filter, probabilistic_sampler, batch], exporters: [kafka, file]}}
      metrics: {{processors: [resource, batch], exporters: [kafka, file]}}
      logs: {{processors: [resource, filter, batch], exporters: [kafka, file]}}
"""


@dataclass
class AgentSetup:
    bootstrap: str
    spill: Path
    prefix: str = field(default_factory=lambda: f"a{uuid.uuid4().hex[:8]}")
    sampling: float = 100
    kafka_timeout: str = "5s"
    in_flight_mib: int = 64
    disk_mib: int = 256
    ports: list[int] = field(default_factory=lambda: free_ports(3))

    @property
    def grpc_port(self) -> int:
        return self.ports[0]

    @property
    def http_port(self) -> int:
        return self.ports[1]

    @property
    def metrics_port(self) -> int:
        return self.ports[2]

    def yaml(self) -> str:
        return TEMPLATE.format(
            bootstrap=self.bootstrap,
            prefix=self.prefix,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            spill=self.spill,
            sampling=self.sampling,
            kafka_timeout=self.kafka_timeout,
            in_flight_mib=self.in_flight_mib,
            disk_mib=self.disk_mib,
        )

    def topology(self) -> Topology:
        return parse_topology(self.yaml())

    def create_topics(self) -> None:
        from kotel.kafka.admin import create_topics

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        create_topics(admin, self.topology().planned_topics())


@dataclass
class Record:
    key: str
    headers: dict[str, str]
    request: object
    partition: int
    offset: int


def read_topic(
    bootstrap: str,
    topic: str,
    signal: Signal,
    min_records: int = 1,
    timeout: float = 30.0,
    settle: float = 1.0,
) -> list[Record]:
    """Every record of ``topic`` from the start; waits for ``min_records``, then ``settle`` seconds more."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions]
        consumer.assign(parts)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(out) >= min_records:
                    quiet_until = quiet_until or time.monotonic() + settle
                    if time.monotonic() >= quiet_until:
                        break
                continue
            if msg.error():
                continue
            quiet_until = None
            headers = {k: v.decode() for k, v in (msg.headers() or [])}
            out.append(
                Record(
                    msg.key().decode(),
                    headers,
                    decode_protobuf(signal, msg.value()),
                    msg.partition(),
                    msg.offset(),
                )
            )
        return out
    finally:
        consumer.close()


def span_names(records: list[Record]) -> list[str]:
    return [
        s.name for r in records for rs in r.request.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
