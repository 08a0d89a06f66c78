"""How a sink gathers a batch (a first record, then until the linger's next tick), commits, measures lag."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from kotel.topology import parse_topology
from kotel.topology.exporters import FileExporterConfig
from streams.sinks import runtime
from streams.sinks.archive import ParquetArchive
from streams.sinks.runtime import DEFAULT_LINGER_SECONDS, OK, SinkRunner

TOPOLOGY = """
kafka: {bootstrap_servers: "127.0.0.1:1"}
topics: {prefix: kt}
gateway:
  processors:
    routing: {default_exporters: [file/archive], table: [{value: a, exporters: [file/archive]}]}
  exporters:
    file/archive: {path: /tmp/unused, flush_interval: 250ms}
"""


class _Message:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return [("kotel.tenant", b"a"), ("kotel.signal", b"logs")]

    def topic(self) -> str:
        return "kt.tenant.a.logs"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v"

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


class _Consumer:
    """Answers consume(n, timeout) from a queue and remembers the calls."""

    def __init__(self, queued: int) -> None:
        self.queued, self.calls, self.next = queued, [], 0

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.calls.append((n, timeout))
        take = min(n, self.queued)
        self.queued -= take
        out = [_Message(self.next + i) for i in range(take)]
        self.next += take
        return out


class _Deliverer:
    name, signals = "x", ("logs",)

    async def deliver(self, records: Any) -> list[Any]:
        return []

    async def close(self) -> None:
        return None


def _runner(deliverer: Any, queued: int) -> tuple[SinkRunner, _Consumer]:
    runner = SinkRunner(parse_topology(TOPOLOGY), deliverer, max_batch=50, poll_timeout=0.5)
    runner.consumer.close()
    fake = _Consumer(queued)
    runner.consumer = fake  # type: ignore[assignment]
    return runner, fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink's monotonic clock at 100.0012 s: 1.2 ms past a tick of 5 ms (and of 250 ms)."""
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: 100.0012))


def test_a_batch_waits_for_its_first_record_then_for_the_lingers_next_tick(clock: None) -> None:
    """As the Collector's batch timeout, a ticker: 0..linger after the first record, not a whole linger."""
    runner, consumer = _runner(_Deliverer(), queued=3)
    batch = runner._poll({})
    assert [r.offset for r in batch.records] == [0, 1, 2]
    assert [n for n, _ in consumer.calls] == [1, 49]
    assert consumer.calls[0][1] == 0.5
    assert consumer.calls[1][1] == pytest.approx(DEFAULT_LINGER_SECONDS - 0.0012)
    assert batch.offsets == {("kt.tenant.a.logs", 0): 3}


def test_nothing_there_means_one_wait_and_an_empty_batch() -> None:
    runner, consumer = _runner(_Deliverer(), queued=0)
    assert runner._poll({}).records == []
    assert consumer.calls == [(1, 0.5)]


def test_the_archive_lingers_until_its_flush_intervals_next_tick(clock: None) -> None:
    archive = ParquetArchive("file/archive", FileExporterConfig(path="/tmp/unused", flush_interval="250ms"))
    runner, consumer = _runner(archive, queued=80)
    assert len(runner._poll({}).records) == 50
    assert consumer.calls[1][0] == 49 and consumer.calls[1][1] == pytest.approx(0.25 - 0.0012)


class _LagConsumer:
    """Watermarks from the fetches (cached) at once; an uncached lookup waits behind a long poll."""

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("kt.tenant.a.logs", p) for p in range(3)]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int]:
        if not cached:
            time.sleep(0.5)
            return 0, 100
        return -1001, (-1001 if tp.partition == 2 else 10)

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 4 if tp.partition != 1 else -1001) for tp in tps]


def test_lag_comes_from_the_fetched_watermarks_without_asking_the_broker() -> None:
    runner, _ = _runner(_Deliverer(), queued=0)
    runner.consumer = _LagConsumer()  # type: ignore[assignment]
    started = time.perf_counter()
    runner._update_lag()
    assert time.perf_counter() - started < 0.25  # three uncached lookups would take 1.5 s

    def lag(partition: int) -> float | None:
        labels = {"sink": "x", "topic": "kt.tenant.a.logs", "partition": str(partition)}
        return runner.metrics.registry.get_sample_value("kotel_sink_consumer_lag", labels)

    assert lag(0) == 6
    assert lag(1) is None and lag(2) is None  # position or watermark not known yet: no figure, not zero


class _Scripted(_Consumer):
    """Hands out one record per poll; commits take a while; records when each call starts and ends."""

    def __init__(self) -> None:
        super().__init__(queued=0)
        self.log: list[str] = []

    def subscribe(self, topics: list[str]) -> None:
        return None

    def consume(self, n: int, timeout: float) -> list[Any]:
        if n > 1:
            return []  # nothing more within the linger
        self.log.append(f"poll {self.next}")
        self.next += 1
        return [_Message(self.next - 1)]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.log.append(f"commit {offsets[0].offset} {'sent' if asynchronous else 'waited for'}")

    def assignment(self) -> list[TopicPartition]:
        return []

    def close(self) -> None:
        self.log.append("close")


class _StopAfter(_Deliverer):
    name = "file/archive"  # a sink the topology routes to

    def __init__(self, batches: int, stop: asyncio.Event) -> None:
        self.left, self.stop = batches, stop

    async def deliver(self, records: Any) -> list[Any]:
        self.left -= 1
        if not self.left:
            self.stop.set()
        return [OK] * len(records)


async def test_a_batchs_commit_is_sent_by_the_next_poll_and_the_last_one_is_waited_for() -> None:
    """On the polling thread (a commit from another waited for the poll under way), after the batch was
    delivered and before the next poll; in order; the last one synchronously before the consumer closes."""
    stop = asyncio.Event()
    runner, _ = _runner(_StopAfter(2, stop), queued=0)
    consumer = _Scripted()
    runner.consumer = consumer  # type: ignore[assignment]
    await runner.run(stop)
    assert consumer.log == ["poll 0", "commit 1 sent", "poll 1", "commit 2 waited for", "close"]


class _Refetching(_Scripted):
    """A commit fails (the broker was away); the next fetch starts again from the committed offset 0."""

    def __init__(self) -> None:
        super().__init__()
        self.script = [[0, 1, 2], [0, 1, 2, 3]]

    def consume(self, n: int, timeout: float) -> list[Any]:
        if n > 1 or not self.script:
            return []
        return [_Message(o) for o in self.script.pop(0)]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.log.append(f"commit {offsets[0].offset}")
        if offsets[0].offset == 3:
            raise RuntimeError("KafkaError{code=_TRANSPORT}")


class _Recording(_StopAfter):
    def __init__(self, batches: int, stop: asyncio.Event) -> None:
        super().__init__(batches, stop)
        self.offsets: list[int] = []

    async def deliver(self, records: Any) -> list[Any]:
        self.offsets += [r.offset for r in records]
        return await super().deliver(records)


async def test_records_fetched_again_after_a_failed_commit_are_not_delivered_twice() -> None:
    stop = asyncio.Event()
    deliverer = _Recording(2, stop)
    runner, _ = _runner(deliverer, queued=0)
    consumer = _Refetching()
    runner.consumer = consumer  # type: ignore[assignment]
    await runner.run(stop)
    assert deliverer.offsets == [0, 1, 2, 3]
    assert consumer.log == ["commit 3", "commit 4", "close"]
    skipped = runner.metrics.registry.get_sample_value("kotel_sink_redelivered_skipped_records_total",
                                                       {"sink": "file/archive"})
    assert skipped == 3


def test_lag_is_looked_at_again_until_a_partition_is_known() -> None:
    runner, _ = _runner(_Deliverer(), queued=0)
    lag = _LagConsumer()
    runner.consumer = lag  # type: ignore[assignment]
    unknown = lag.position
    lag.position = lambda tps: [TopicPartition(tp.topic, tp.partition, -1001) for tp in tps]  # type: ignore[method-assign]
    runner._update_lag()
    assert runner._last_lag == 0.0  # nothing known yet: the next turn of the loop looks again
    lag.position = unknown  # type: ignore[method-assign]
    runner._update_lag()
    assert runner._last_lag > 0.0
