"""The sink runtime and the Parquet archive against the real broker: commit only after acceptance,
retry without committing, dead-letter what is refused for good, read the archive back with pyarrow."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kotel.kafka.admin import create_topics
from kotel.otlp import Signal, decode_protobuf, samples
from kotel.topology import Topology, parse_topology
from streams.sinks.archive import read_archive
from streams.sinks.factory import build_deliverer
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord, SinkRunner

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _topology(bootstrap: str, archive: Path) -> Topology:
    return parse_topology(f"""
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics: {{prefix: "s{uuid.uuid4().hex[:8]}", defaults: {{partitions: 2}}}}
gateway:
  processors:
    routing:
      default_exporters: [file/archive]
      table:
        - {{value: tenant-a, exporters: [file/archive]}}
        - {{value: tenant-b, exporters: [file/archive]}}
  exporters:
    file/archive: {{path: "{archive}", format: parquet, mode: always}}
""")


def _produce(topology: Topology, records: list[tuple[str, str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": topology.kafka.bootstrap_servers})
    for tenant, signal, value in records:
        topic = topology.topic_names.tenant(tenant, signal)
        producer.produce(
            topic,
            value,
            b"instance-1",
            headers=[("kotel.tenant", tenant.encode()), ("kotel.signal", signal.encode())],
        )
    assert producer.flush(30) == 0


def _committed(topology: Topology, group: str) -> int:
    consumer = Consumer({"bootstrap.servers": topology.kafka.bootstrap_servers, "group.id": group})
    try:
        parts = [
            TopicPartition(t.name, p)
            for t in topology.planned_topics()
            if ".tenant." in t.name
            for p in range(t.partitions)
        ]
        try:
            return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
        except KafkaException:  # the group coordinator may still be loading right after the broker starts
            return -1
    finally:
        consumer.close()


async def _run_until(runner: SinkRunner, done, timeout: float = 60.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_archive_holds_every_record_partitioned_and_offsets_are_committed(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topology = _topology(kafka_bootstrap, tmp_path / "archive")
    create_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), topology.planned_topics())
    traces = samples.traces(50).SerializeToString()
    logs = samples.logs(20).SerializeToString()
    _produce(topology, [("tenant-a", "traces", traces)] * 3 + [("tenant-b", "logs", logs)] * 2)
    runner = SinkRunner(topology, build_deliverer(topology, "file/archive"))
    await _run_until(runner, lambda: _committed(topology, runner.group_id) == 5)

    table = read_archive(tmp_path / "archive")
    assert table.num_rows == 5
    a = read_archive(tmp_path / "archive", tenant="tenant-a", signal="traces")
    assert a.num_rows == 3 and set(a.column("items").to_pylist()) == {50}
    assert decode_protobuf(Signal.TRACES, a.column("value")[0].as_py()) == samples.traces(50)
    b = read_archive(tmp_path / "archive", tenant="tenant-b")
    assert b.num_rows == 2 and b.column("signal").to_pylist() == ["logs", "logs"]
    assert (
        runner.metrics.registry.get_sample_value(
            "kotel_sink_exported_records_total",
            {"sink": "file/archive", "tenant": "tenant-a", "signal": "traces"},
        )
        == 3
    )


class Scripted:
    """A backend whose answers the test scripts: the runtime's Kafka side is what is under test here."""

    name = "file/archive"
    signals = ("traces", "metrics", "logs")

    def __init__(self, answers: list[Result]) -> None:
        self.answers = answers
        self.calls: list[list[int]] = []

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        self.calls.append([r.offset for r in records])
        answer = self.answers.pop(0) if self.answers else OK
        return [answer] * len(records)

    async def close(self) -> None:
        return None


async def test_nothing_is_committed_while_the_backend_refuses_then_everything_is(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topology = _topology(kafka_bootstrap, tmp_path / "archive")
    create_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), topology.planned_topics())
    _produce(topology, [("tenant-a", "traces", samples.traces(5).SerializeToString())] * 4)
    backend = Scripted([Result(Outcome.RETRY, "503", retry_after=0.2)] * 3)
    runner = SinkRunner(topology, backend)
    from kotel.topology.exporters import RetryConfig

    runner.backoff = type(runner.backoff)(RetryConfig(initial_interval="100ms", max_elapsed_time="0s"))
    seen: list[int] = []

    def done() -> bool:
        seen.append(_committed(topology, runner.group_id))
        return len(backend.calls) >= 4 and seen[-1] == 4

    await _run_until(runner, done)
    assert len(backend.calls) >= 4  # three refusals, then the retry that succeeded
    assert seen[0] == 0  # nothing committed while refused
    assert (
        runner.metrics.registry.get_sample_value(
            "kotel_sink_retried_records_total", {"sink": "file/archive", "reason": "503"}
        )
        >= 3
    )


async def test_a_record_refused_for_good_is_dead_lettered_with_its_origin(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topology = _topology(kafka_bootstrap, tmp_path / "archive")
    create_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), topology.planned_topics())
    _produce(topology, [("tenant-b", "metrics", b"not otlp at all")])
    runner = SinkRunner(topology, Scripted([Result(Outcome.PERMANENT, "400 bad sample")]))
    await _run_until(runner, lambda: _committed(topology, runner.group_id) == 1)

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"dlq-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topology.topic_names.deadletter])
    try:
        msg = None
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                break
        assert msg is not None and msg.value() == b"not otlp at all"
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["kotel.dlq.reason"] == "file/archive: 400 bad sample"
        assert headers["kotel.dlq.topic"] == topology.topic_names.tenant("tenant-b", "metrics")
        assert headers["kotel.dlq.offset"] == "0"
        assert headers["kotel.tenant"] == "tenant-b"
    finally:
        consumer.close()
