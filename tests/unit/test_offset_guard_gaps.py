"""Offsets the guard reads again are never committed past (Faust counted them as an acked gap), while
holes the log really has (transaction markers, retention) still are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import streams.offset_guard as offset_guard
from kotel.topology import parse_topology
from streams.app import create_app
from streams.offset_guard import OffsetGuard

TOPOLOGY = parse_topology('kafka: {bootstrap_servers: "127.0.0.1:1"}\ntopics: {prefix: kt}\n')
GUARDED, OTHER = "kt.raw.traces", "kt.other"


@dataclass
class _Message:
    tp: Any
    offset: int
    generation_id: int = 1

    @property
    def topic(self) -> str:
        return str(self.tp.topic)

    @property
    def partition(self) -> int:
        return int(self.tp.partition)


@dataclass
class _Event:
    message: _Message


def _guarded_app(tmp_path: Path) -> tuple[Any, OffsetGuard]:
    app = create_app(TOPOLOGY, "dedup", data_dir=tmp_path)
    return app, OffsetGuard(app, TOPOLOGY.kafka, [GUARDED])


def _committable(consumer: Any, tp: Any) -> int | None:
    """The offset Faust would commit: its `_new_offset` hands it out in steps."""
    found = None
    while (step := consumer._new_offset(tp)) is not None:
        found = step
    return found


def _ack(consumer: Any, tp: Any, offsets: range) -> None:
    for offset in offsets:
        consumer._acked[tp].append(offset)
        consumer._acked_index[tp].add(offset)


@pytest.mark.parametrize(("topic", "commit"), [(GUARDED, 3), (OTHER, 22)])
async def test_a_gap_faust_saw_is_acked_only_on_unguarded_topics(tmp_path: Path, topic: str,
                                                                 commit: int) -> None:
    app, _ = _guarded_app(tmp_path)
    consumer = app.consumer
    tp = consumer._new_topicpartition(topic, 0)
    await consumer._add_gap(tp, 1, 21)  # what Faust's fetch loop does on offsets 0, 21 (1-20 dropped)
    _ack(consumer, tp, range(3))  # the guard rewound: 0-2 processed again, 3-20 still to come
    assert _committable(consumer, tp) == commit


async def test_a_hole_in_the_log_is_acked_by_the_guard(tmp_path: Path) -> None:
    app, guard = _guarded_app(tmp_path)
    tp = app.consumer._new_topicpartition(GUARDED, 0)

    async def committed(_: Any) -> int:
        return 5

    async def first_offset(_: Any, offset: int) -> int:
        return 9  # records 5-8 are transaction markers

    guard._committed = committed  # type: ignore[method-assign]
    guard._first_offset = first_offset  # type: ignore[method-assign]
    app.consumer._committed_offset[tp] = 5
    assert await guard.admit(_Event(_Message(tp, 9)))  # type: ignore[arg-type]
    _ack(app.consumer, tp, range(9, 10))
    assert _committable(app.consumer, tp) == 10


async def test_with_nothing_committed_the_stream_must_start_at_the_log_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, guard = _guarded_app(tmp_path)
    tp = app.consumer._new_topicpartition(GUARDED, 0)
    seeks: list[tuple[Any, int]] = []

    async def committed(_: Any) -> None:
        return None

    async def first_offset(_: Any, offset: int) -> int:
        return max(offset, 0)

    async def seek(_: Any, where: Any, offset: int) -> None:
        seeks.append((where, offset))

    guard._committed = committed  # type: ignore[method-assign]
    guard._first_offset = first_offset  # type: ignore[method-assign]
    monkeypatch.setattr(offset_guard, "seek", seek)
    assert not await guard.admit(_Event(_Message(tp, 21)))  # type: ignore[arg-type]
    assert seeks == [(tp, 0)] and guard.rewinds == 1
