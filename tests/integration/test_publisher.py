"""The agent's publisher against a real broker: records, headers and splitting as consumers see them; an
outage (broker stopped mid-stream) spilled and replayed so that every acknowledged item arrives exactly
once and in order per key; a restarted agent replaying what an earlier run spilled."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agents.publish import Publisher
from kotel.kafka.broker import KafkaBroker
from kotel.kafka.settings import KafkaSettings
from kotel.kafka.topics import SIGNALS, TopicNames
from kotel.otlp import count_items
from kotel.topology.exporters import FileExporterConfig, KafkaExporterConfig

FAST_RECOVERY: dict[str, Any] = {
    "timeout": "2s",
    "circuit_breaker": {"minimum_requests": 1, "open_duration": "1s"},
    "retry_on_failure": {"initial_interval": "200ms", "max_interval": "1s"},
}


@pytest.fixture
def prefix(kafka_bootstrap: str) -> Iterator[str]:
    """A fresh topic prefix whose three raw topics (3 partitions each) exist, deleted afterwards."""
    name = f"pub{uuid.uuid4().hex[:10]}"
    topics = [TopicNames(name).raw(s) for s in SIGNALS]
    # Its own logger: while a test has the broker stopped, librdkafka would print refusals to stderr.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap, "logger": logging.getLogger("tests.admin")})
    for future in admin.create_topics([NewTopic(t, 3, 1) for t in topics], operation_timeout=30).values():
        future.result(timeout=30)
    yield name
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        future.result(timeout=30)


def make_publisher(bootstrap: str, prefix: str, spill_dir: Path, **exporter: Any) -> Publisher:
    return Publisher(KafkaSettings(bootstrap_servers=bootstrap), KafkaExporterConfig(**exporter),
                     FileExporterConfig(path=str(spill_dir)), agent_id="agent-7", prefix=prefix)


def logs_request(key: str, *bodies: str) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    resource_logs = req.resource_logs.add()
    attr = resource_logs.resource.attributes.add()
    attr.key, attr.value.string_value = "service.instance.id", key
    records = resource_logs.scope_logs.add().log_records
    for body in bodies:
        records.add().body.string_value = body
    return req


def bodies_of(message: Message) -> list[str]:
    req = ExportLogsServiceRequest.FromString(message.value())
    return [lr.body.string_value for rl in req.resource_logs for sl in rl.scope_logs for lr in sl.log_records]


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Message]:
    """Every record of the topic, reading until ``expected`` arrived and then 1 s more (to see extras)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        quiet_until = None
        while time.monotonic() < (quiet_until or deadline):
            msg = consumer.poll(0.2)
            if msg is not None:
                assert msg.error() is None, msg.error()
                out.append(msg)
            if quiet_until is None and len(out) >= expected:
                quiet_until = time.monotonic() + 1.0
        return out
    finally:
        consumer.close()


def by_key_in_offset_order(messages: list[Message]) -> dict[str, list[Message]]:
    groups: dict[str, list[Message]] = defaultdict(list)
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        groups[msg.key().decode()].append(msg)
    return groups


async def wait_until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_records_carry_key_headers_and_requests_split_to_max_bytes(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    max_bytes = 20_000
    big = ExportTraceServiceRequest()
    resource_spans = big.resource_spans.add()
    attr = resource_spans.resource.attributes.add()
    attr.key, attr.value.string_value = "service.instance.id", "svc-big"
    spans = resource_spans.scope_spans.add().spans
    for i in range(200):
        span = spans.add(name=f"span-{i}", trace_id=bytes(16), span_id=i.to_bytes(8, "big"))
        detail = span.attributes.add()
        detail.key, detail.value.string_value = "detail", "x" * 300
    assert big.ByteSize() > 3 * max_bytes

    publisher = make_publisher(kafka_bootstrap, prefix, tmp_path, producer={"max_message_bytes": max_bytes})
    async with publisher:
        await publisher.publish("traces", "svc-big", "team-a", big)
        await publisher.publish("logs", "svc-1", "team-b", logs_request("svc-1", "hello", "world"))
    assert publisher.spill.is_empty and not list(tmp_path.rglob("*.parquet"))

    traces = consume_all(kafka_bootstrap, TopicNames(prefix).raw("traces"), expected=4)
    assert len(traces) >= 4
    names: list[str] = []
    seqs = []
    for msg in sorted(traces, key=lambda m: m.offset()):
        assert msg.key() == b"svc-big"
        size = len(msg.value()) + len(msg.key()) + sum(len(k) + len(v) for k, v in msg.headers())
        assert size <= max_bytes
        headers = dict(msg.headers())
        assert list(headers) == ["kotel.tenant", "kotel.signal", "kotel.schema", "kotel.agent", "kotel.seq"]
        assert headers["kotel.tenant"] == b"team-a" and headers["kotel.signal"] == b"traces"
        assert headers["kotel.schema"] == b"otlp-proto-v1" and headers["kotel.agent"] == b"agent-7"
        seqs.append(int(headers["kotel.seq"]))
        part = ExportTraceServiceRequest.FromString(msg.value())
        assert part.resource_spans[0].resource == resource_spans.resource
        names += [s.name for rs in part.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names == [f"span-{i}" for i in range(200)]  # every item once, in order
    assert seqs == sorted(set(seqs))

    (log_msg,) = consume_all(kafka_bootstrap, TopicNames(prefix).raw("logs"), expected=1)
    assert (log_msg.key(), dict(log_msg.headers())["kotel.tenant"]) == (b"svc-1", b"team-b")
    assert bodies_of(log_msg) == ["hello", "world"]
    assert int(dict(log_msg.headers())["kotel.seq"]) > seqs[-1]
    assert publisher.metrics.published.labels("traces")._value.get() == len(traces)
    assert count_items(ExportLogsServiceRequest.FromString(log_msg.value())) == 2


async def test_broker_outage_spills_promptly_and_replays_exactly_once_in_key_order(
    kafka_broker: KafkaBroker, kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    keys = ["svc-a", "svc-b", "svc-c"]
    sent: dict[str, list[str]] = defaultdict(list)  # acknowledged bodies per key, in call order
    restarted_ms: list[int] = []
    latencies: list[float] = []

    async def one_key(key: str, phase: str, count: int, until: Any = None) -> None:
        for i in itertools.count():  # sequential per key, as a client's exports are
            if i == count or (until is not None and until()):
                break
            body = f"{key}:{phase}{i}"
            begin = time.monotonic()
            await publisher.publish("logs", key, "team-a", logs_request(key, body))
            latencies.append(time.monotonic() - begin)
            sent[key].append(body)
            if until is not None:
                await asyncio.sleep(0.02)

    async def stream(phase: str, count: int, until: Any = None) -> None:
        await asyncio.gather(*(one_key(k, phase, count, until) for k in keys))

    publisher = make_publisher(kafka_bootstrap, prefix, tmp_path, **FAST_RECOVERY)
    metrics = publisher.metrics
    async with publisher:
        await stream("a", 10)
        assert metrics.spilled.labels("logs")._value.get() == 0
        await asyncio.to_thread(kafka_broker.stop)
        down_ms = time.time_ns() // 1_000_000
        try:
            latencies.clear()
            await stream("b", 10)
            # Bounded: the first publishes wait out the 2 s delivery timeout (plus librdkafka's grace),
            # then the breaker or the non-empty spill sends the rest straight to disk.
            assert max(latencies) < 2 + 2 + 1.5
            assert metrics.spilled.labels("logs")._value.get() == 30
            assert metrics.breaker_open._value.get() == 1
            assert not publisher.spill.is_empty
        finally:
            # The stream goes on while the broker restarts and for 3 s after, while the replayer catches
            # up: what arrives meanwhile must queue up behind the spill, even once the breaker has closed.
            restarted_at: list[float] = []
            restart = asyncio.ensure_future(asyncio.to_thread(kafka_broker.start, timeout=90))
            restart.add_done_callback(lambda _: restarted_ms.append(time.time_ns() // 1_000_000))
            restart.add_done_callback(lambda _: restarted_at.append(time.monotonic()))
            await stream("c", 10_000, until=lambda: restarted_at and time.monotonic() > restarted_at[0] + 3)
            await restart
        await wait_until(lambda: publisher.spill.is_empty, timeout=60)
        assert metrics.replayed.labels("logs")._value.get() >= 30
        assert metrics.breaker_open._value.get() == 0
        spilled_before = metrics.spilled.labels("logs")._value.get()
        await stream("d", 2)  # the spill is empty again: straight to Kafka
        assert metrics.spilled.labels("logs")._value.get() == spilled_before
    assert not list(tmp_path.rglob("*.parquet"))

    total = sum(len(v) for v in sent.values())
    messages = consume_all(kafka_bootstrap, TopicNames(prefix).raw("logs"), expected=total, timeout=60)
    grouped = by_key_in_offset_order(messages)
    assert sorted(grouped) == keys
    for key in keys:
        assert [b for msg in grouped[key] for b in bodies_of(msg)] == sent[key]  # exactly once, in order
        seqs = [int(dict(m.headers())["kotel.seq"]) for m in grouped[key]]
        assert seqs == sorted(seqs)
        # What was spilled during the outage keeps the time the agent received it, not the replay's.
        spilled = [m.timestamp() for m in grouped[key] if any(b.startswith(f"{key}:b") for b in bodies_of(m))]
        assert spilled and all(kind == TIMESTAMP_CREATE_TIME and down_ms <= ms < restarted_ms[0]
                               for kind, ms in spilled), (down_ms, restarted_ms, spilled)


async def test_a_restarted_agent_replays_what_an_earlier_run_spilled(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, unused_tcp_port: int
) -> None:
    offline = make_publisher(f"127.0.0.1:{unused_tcp_port}", prefix, tmp_path, timeout="500ms")
    async with offline:
        for i in range(5):
            await offline.publish("logs", "svc-1", "team-a", logs_request("svc-1", f"line {i}"))
    assert offline.metrics.spilled.labels("logs")._value.get() == 5
    assert offline.metrics.published.labels("logs")._value.get() == 0

    online = make_publisher(kafka_bootstrap, prefix, tmp_path)
    async with online:
        await wait_until(lambda: online.spill.is_empty, timeout=30)
        assert online.metrics.replayed.labels("logs")._value.get() == 5
    messages = consume_all(kafka_bootstrap, TopicNames(prefix).raw("logs"), expected=5)
    assert [b for m in sorted(messages, key=lambda m: m.offset()) for b in bodies_of(m)] == [
        f"line {i}" for i in range(5)]
    assert {dict(m.headers())["kotel.agent"] for m in messages} == {b"agent-7"}

