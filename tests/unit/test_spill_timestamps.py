"""Record timestamps through the agent: the time its data came in, kept through the spill and replay.

No broker: librdkafka's Producer is a stand-in that records what it is asked to produce; the spill is
the real one on disk; the replayer ships to an in-memory sender.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from agents.publish import SpillRecord, read_part
from agents.publish.producer import KafkaSender
from agents.publish.spill import SCHEMA
from agents.telemetry import AgentMetrics
from tests.unit.test_spill import make_spill, parts_on_disk, replay_all, unreachable_publisher

T = 1_700_000_000_123  # ms


def record(seq: int, created_ms: int) -> SpillRecord:
    return SpillRecord(seq, "logs", "kotel.raw.logs", "svc-1", "team-a", (("kotel.seq", b"%d" % seq),),
                       b"v%d" % seq, created_ms)


async def test_a_spilled_record_keeps_the_time_its_data_came_in(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    written = [record(0, T), record(1, T + 1)]
    await spill.submit(written)
    (part,) = parts_on_disk(tmp_path)
    assert read_part(part) == written
    row = pq.read_table(part).to_pylist()[0]
    assert row["created_at"] == datetime.fromtimestamp(T / 1000, UTC)
    assert (row["spilled_at"] - row["created_at"]) > timedelta(days=365)  # two different times


async def test_a_record_without_its_time_replays_with_the_spill_time(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    before = time.time_ns() // 1_000_000
    await spill.submit([record(0, 0)])
    (got,) = read_part(parts_on_disk(tmp_path)[0])
    assert before <= got.created_ms <= time.time_ns() // 1_000_000


OLD_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "created_at"])  # as written before created_at


async def test_a_part_written_before_created_at_still_replays(tmp_path: Path) -> None:
    """A spill left by an agent of the previous version: its rows replay, stamped when spilled."""
    segment = tmp_path / "seg-00000000000000000000"
    segment.mkdir()
    spilled = datetime.fromtimestamp((T + 0.456) / 1000, UTC)  # us precision: the ms are kept, not rounded up
    rows = {"seq": [4, 5], "signal": ["logs"] * 2, "topic": ["kotel.raw.logs"] * 2, "key": ["svc-1"] * 2,
            "tenant": ["team-a"] * 2, "headers": [[("kotel.seq", b"4")], [("kotel.seq", b"5")]],
            "value": [b"v4", b"v5"], "spilled_at": [spilled] * 2}
    pq.write_table(pa.table(rows, schema=OLD_SCHEMA), segment / "part-00000000000000000000.parquet")
    spill, _ = make_spill(tmp_path)
    kafka = await replay_all(spill)
    assert [(r.seq, r.value, r.created_ms) for r in kafka.topic] == [(4, b"v4", T), (5, b"v5", T)]


class Librdkafka:
    """Stands in for confluent_kafka.Producer: records each produce and acknowledges it at once."""

    def __init__(self) -> None:
        self.produced: list[dict[str, Any]] = []

    def produce(self, topic: str, value: bytes, key: bytes, **kwargs: Any) -> None:
        self.produced.append({"topic": topic, "key": key, **kwargs})
        kwargs["on_delivery"](None, None)


async def test_records_are_produced_with_their_own_timestamp() -> None:
    sender = KafkaSender({}, metrics=AgentMetrics(), on_all_brokers_down=None)
    librdkafka = Librdkafka()
    sender._producer, sender._loop = librdkafka, asyncio.get_running_loop()  # type: ignore[assignment]
    assert await sender.send([record(0, T), record(1, T - 60_000)], timeout=1.0) == []
    assert [p["timestamp"] for p in librdkafka.produced] == [T, T - 60_000]


async def test_the_publisher_stamps_a_batch_when_it_comes_in_not_when_it_is_spilled(tmp_path: Path) -> None:
    publisher = unreachable_publisher(tmp_path, breaker=False)  # each publish waits out its timeout
    await publisher.start()
    try:
        request = ExportLogsServiceRequest()
        request.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "line"
        begin = time.time_ns() // 1_000_000
        await publisher.publish("logs", "svc-1", "team-a", request)
        (got,) = [r for p in parts_on_disk(tmp_path) for r in read_part(p)]
        spilled_at = pq.read_table(parts_on_disk(tmp_path)[0]).to_pylist()[0]["spilled_at"]
    finally:
        await publisher.close(timeout=1.0)
    assert begin <= got.created_ms <= begin + 200
    assert spilled_at.timestamp() * 1000 >= begin + 500  # spilled only after the delivery timeout
