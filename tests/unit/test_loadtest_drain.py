"""The drain check reads the tail repartition lag: watermark heartbeats there are not records to await."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from loadtest.environment import _records_not_heartbeats


class _Msg:
    def __init__(self, offset: int, heartbeat: bool) -> None:
        self._offset, self._heartbeat = offset, heartbeat

    def error(self) -> None:
        return None

    def offset(self) -> int:
        return self._offset

    def headers(self) -> list[tuple[str, bytes]]:
        return [("kotel.heartbeat", b"1")] if self._heartbeat else [("kotel.index", b"x")]


class _Consumer:
    def __init__(self, log: list[bool], stop_at: int | None = None) -> None:
        self.log, self.stop_at, self.position = log, stop_at, 0
        self.assigned: list[TopicPartition] = []

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned, self.position = tps, tps[0].offset

    def unassign(self) -> None:
        self.assigned = []

    def consume(self, n: int, timeout: float) -> list[Any]:
        end = len(self.log) if self.stop_at is None else self.stop_at
        out = [_Msg(o, self.log[o]) for o in range(self.position, min(end, self.position + min(n, 2)))]
        self.position += len(out)
        return out


def test_only_records_that_are_not_heartbeats_count() -> None:
    log = [False, True, True, False, True, True]  # offsets 0-5; the group committed 1
    consumer = _Consumer(log)
    assert _records_not_heartbeats(consumer, "kotel-kt-tail-traces-repartition", 0, 1, 6) == 1
    assert consumer.assigned == []


def test_what_could_not_be_read_counts_as_records() -> None:
    consumer = _Consumer([True] * 6, stop_at=3)  # offsets 3-5 never come within the bound
    assert _records_not_heartbeats(consumer, "kotel-kt-tail-traces-repartition", 0, 0, 6, bound_s=0.2) == 3
