"""How a sink gathers a batch: it waits for a first record, then only ``linger`` for more."""

from __future__ import annotations

from typing import Any

from kotel.topology import parse_topology
from kotel.topology.exporters import FileExporterConfig
from streams.sinks.archive import ParquetArchive
from streams.sinks.runtime import DEFAULT_LINGER_SECONDS, SinkRunner

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


def test_a_batch_waits_for_its_first_record_then_only_the_linger() -> None:
    runner, consumer = _runner(_Deliverer(), queued=3)
    batch = runner._poll()
    assert [r.offset for r in batch.records] == [0, 1, 2]
    assert consumer.calls == [(1, 0.5), (49, DEFAULT_LINGER_SECONDS)]
    assert batch.offsets == {("kt.tenant.a.logs", 0): 3}


def test_nothing_there_means_one_wait_and_an_empty_batch() -> None:
    runner, consumer = _runner(_Deliverer(), queued=0)
    assert runner._poll().records == []
    assert consumer.calls == [(1, 0.5)]


def test_the_archive_lingers_for_its_flush_interval() -> None:
    archive = ParquetArchive("file/archive", FileExporterConfig(path="/tmp/unused", flush_interval="250ms"))
    runner, consumer = _runner(archive, queued=80)
    assert len(runner._poll().records) == 50
    assert consumer.calls == [(1, 0.5), (49, 0.25)]
