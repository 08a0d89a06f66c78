"""The offset guard's idle watch survives a broker that is out of reach (it used to kill the worker)."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from kotel.topology import parse_topology
from streams.offset_guard import OffsetGuard

TOPOLOGY = 'kafka: {bootstrap_servers: "127.0.0.1:1"}\ntopics: {prefix: kt}\n'
TP = TopicPartition("kt.deduped.traces", 0)


class _Consumer:
    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, tp: TopicPartition) -> int:
        return 10


class _App:
    rebalancing = False
    consumer_generation_id = 3
    consumer = _Consumer()

    def timer(self, *_: Any, **__: Any) -> Any:
        return lambda fn: fn


async def test_watch_skips_a_round_when_the_committed_offset_cannot_be_read() -> None:
    guard = OffsetGuard(_App(), parse_topology(TOPOLOGY).kafka, [TP.topic])  # type: ignore[arg-type]
    calls = []

    async def unreachable(tp: TopicPartition) -> int | None:
        calls.append(tp)
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")

    guard._committed = unreachable  # type: ignore[method-assign]
    await guard._watch()
    assert calls == [TP] and guard.rewinds == 0


async def test_watch_marks_waiting_records_as_suspect_when_the_broker_answers() -> None:
    guard = OffsetGuard(_App(), parse_topology(TOPOLOGY).kafka, [TP.topic])  # type: ignore[arg-type]

    async def committed(tp: TopicPartition) -> int | None:
        return 4

    guard._committed = committed  # type: ignore[method-assign]
    await guard._watch()
    assert guard._suspects == {TP: 4} and guard.rewinds == 0
