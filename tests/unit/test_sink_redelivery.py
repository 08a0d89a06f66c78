"""A sink skips records it already handled when a failed commit makes the broker send them again."""

from __future__ import annotations

from typing import NamedTuple

from streams.sinks.redelivery import HandledOffsets


class Rec(NamedTuple):
    topic: str
    partition: int
    offset: int


def _records(topic: str, partition: int, offsets: range) -> list[Rec]:
    return [Rec(topic, partition, o) for o in offsets]


def test_nothing_handled_keeps_everything() -> None:
    records = _records("t", 0, range(5))
    assert HandledOffsets().fresh(records) == (records, 0)


def test_records_before_the_handled_offset_are_skipped_per_partition() -> None:
    handled = HandledOffsets()
    handled.handled({("t", 0): 10, ("t", 1): 3})
    again = _records("t", 0, range(8, 13)) + _records("t", 1, range(0, 5)) + _records("u", 0, range(0, 2))
    kept, skipped = handled.fresh(again)
    assert kept == (_records("t", 0, range(10, 13)) + _records("t", 1, range(3, 5))
                    + _records("u", 0, range(2)))
    assert skipped == 2 + 3


def test_a_lower_offset_never_moves_the_mark_back() -> None:
    """A commit that failed, then an older batch's offsets: what was handled stays handled."""
    handled = HandledOffsets()
    handled.handled([(("t", 0), 10)])
    handled.handled([(("t", 0), 4)])
    assert handled.fresh(_records("t", 0, range(6, 12))) == (_records("t", 0, range(10, 12)), 4)
    assert len(handled) == 1
