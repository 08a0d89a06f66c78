"""streams.stages.dedup.SignalDedup without a broker: a fake runtime stands in for librdkafka, the state
is a real RocksDB. What a crash must not break: identities reach the state only once the outputs are
acknowledged, and the changelog (in records Kafka accepts) before the inputs are done."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest

from kotel.otlp import Signal
from kotel.topology import parse_topology
from kotel.topology.processors import DedupConfig
from streams.deadletter import DeadLetter
from streams.kafka_stage import Acked
from streams.stages import dedup
from streams.stages.dedup_core import identify_record
from streams.stages.dedup_store import changelog_records, decode_changelog
from streams.telemetry import WorkerMetrics
from tests.unit.dedup_support import RES, spans
from tests.unit.otlp_builders import build

TOPOLOGY = """
kafka: {bootstrap_servers: "127.0.0.1:9"}
topics: {prefix: ut}
gateway:
  processors:
    dedup: {window: 5m, signals: [traces]}
"""


NOW = 1_700_000_000_000  # every input record's timestamp


class _Message:
    def __init__(self, offset: int, value: bytes, partition: int = 1) -> None:
        self._offset, self._value, self._partition = offset, value, partition

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"shop-1"

    def headers(self) -> list[tuple[str, bytes]]:
        return [("kotel.signal", b"traces")]

    def topic(self) -> str:
        return "ut.raw.traces"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return 1, NOW


class _Runtime:
    """Records what the stage produces; the test acknowledges it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes, asyncio.Future[Any]]] = []

    async def produce(self, topic: str, key: bytes | None, value: bytes, headers: Any = None, *,
                      partition: int = -1, timestamp: int = 0) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, value, future))
        return future

    def ack(self, topic_end: str, first_offset: int) -> None:
        for offset, (topic, partition, _, future) in enumerate(
                [s for s in self.sent if s[0].endswith(topic_end) and not s[3].done()], first_offset):
            future.set_result(Acked(topic, partition, offset))


class _Stage:
    def __init__(self, runtime: _Runtime) -> None:
        self.topology = parse_topology(TOPOLOGY)
        self.metrics = WorkerMetrics("dedup")
        self.runtime = runtime
        self.deadletter = DeadLetter(self.topology, self.metrics, runtime.produce)


def _value(*numbers: int) -> bytes:
    return build(Signal.TRACES, (RES, [spans(*numbers)])).SerializeToString()  # type: ignore[no-any-return]


async def _turns() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_state_after_outputs_then_changelog_in_records_under_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "changelog_records", functools.partial(changelog_records, max_ids=10))
    runtime = _Runtime()
    stage = _Stage(runtime)
    signal = dedup.SignalDedup(stage, Signal.TRACES, DedupConfig(), tmp_path)  # type: ignore[arg-type]
    signal.out_partitions = 3
    try:
        first, second = _value(*range(1, 9)), _value(*range(9, 17))
        ids = identify_record(Signal.TRACES, _value(*range(1, 17))).items.ids
        entries = await signal.handle(1, [_Message(10, first), _Message(11, second),
                                          _Message(12, _value(*range(1, 5)))])  # the last: all seen already
        assert [m.offset() for m, _, _ in entries] == [10, 11, 12]
        outputs = [s for s in runtime.sent if s[0] == "ut.deduped.traces"]
        assert [p for _, p, _, _ in outputs] == [1, 1]  # input partition % output partitions; none for 12
        await _turns()
        assert signal.store.lookup(1, ids, NOW) == [False] * 16  # not before the outputs are acknowledged
        assert signal.store.changelog_offset(1) == -1 and not any("changelog" in s[0] for s in runtime.sent)
        # A retry arriving before the acknowledgements is still dropped (the pending identities).
        again = await signal.handle(1, [_Message(13, _value(3))])
        assert len(again) == 1 and not [s for s in runtime.sent if s[0] == "ut.deduped.traces"][2:]

        runtime.ack("deduped.traces", 100)
        await _turns()
        logged = [s for s in runtime.sent if s[0].endswith("-changelog")]
        assert len(logged) == 2  # 16 identities, at most 10 per record
        ids = [i for _, _, value, _ in logged for found in [decode_changelog(value)] if found
               for _, group in found[1] for i in group]
        assert len(ids) == 16 and all(decode_changelog(v)[0] == (1, 101) for _, _, v, _ in logged)  # type: ignore[index]
        assert not all(f.done() for _, futures, _ in entries for f in futures)  # changelog not yet acked
        runtime.ack("-changelog", 40)
        await _turns()
        assert all(f.done() and not f.exception() for _, futures, _ in entries for f in futures)
        assert signal.store.changelog_offset(1) >= 41
        assert signal.store.last_output(1) == (1, 101)
        assert signal.store.lookup(1, ids, NOW) == [True] * 16
        assert stage.metrics.value("kotel_stage_items_out_total", signal="traces") == 16
        assert stage.metrics.value("kotel_stage_duplicate_items_total", signal="traces") == 5
    finally:
        signal.store.close()


async def test_a_refused_output_leaves_the_state_and_the_changelog_untouched(tmp_path: Path) -> None:
    runtime = _Runtime()
    stage = _Stage(runtime)
    signal = dedup.SignalDedup(stage, Signal.TRACES, DedupConfig(), tmp_path)  # type: ignore[arg-type]
    signal.out_partitions = 3
    try:
        entries = await signal.handle(0, [_Message(0, _value(1, 2))])
        runtime.sent[0][3].set_exception(RuntimeError("MSG_SIZE_TOO_LARGE"))
        await _turns()
        persisted = entries[0][1][-1]
        assert isinstance(persisted.exception(), RuntimeError)
        assert not any(s[0].endswith("-changelog") for s in runtime.sent)
        assert signal.store.changelog_offset(0) == -1
        ids = identify_record(Signal.TRACES, _value(1, 2)).items.ids
        assert signal.store.lookup(0, ids, NOW) == [False, False]
    finally:
        signal.store.close()
