"""A deduped partition whose dedup input is not all committed is busy: its clock moves by records only."""

from __future__ import annotations

from streams.stages.tail_clock import Poll, RegroupClock
from streams.stages.tail_upstream import busy_partitions

T = 1_700_000_000_000


def test_a_deduped_partition_is_busy_while_a_raw_partition_feeding_it_is_behind() -> None:
    ends = {0: 100, 1: 50, 2: 0, 3: 70}
    # dedup writes raw r to deduped r % 2: raw 0 and 2 feed deduped 0, raw 1 and 3 feed deduped 1
    assert busy_partitions({0: 100, 1: 50, 2: None, 3: 70}, ends, 2) == frozenset()
    assert busy_partitions({0: 90, 1: 50, 2: None, 3: 70}, ends, 2) == {0}
    assert busy_partitions({0: 100, 1: 50, 2: None, 3: None}, ends, 2) == {1}  # raw 3 never committed
    assert busy_partitions({0: 99, 1: 49, 2: None, 3: 69}, ends, 2) == frozenset()  # one record: idle
    assert busy_partitions({}, ends, 2) == frozenset()  # no dedup group: nothing known


def test_fetch_time_does_not_move_a_partition_whose_upstream_is_busy() -> None:
    """After an outage dedup worked through one partition's backlog while the others' clocks ran on."""
    clock = RegroupClock()
    clock.admitted("B", T, 7, T)
    facts = {"B": Poll(8, T + 1_000, upstream_busy=True)}  # caught up with dedup, but dedup is behind
    for at in range(T + 1_000, T + 20_000, 1_000):
        facts["B"] = Poll(8, at, upstream_busy=True)
        assert clock.watermark(at, facts.get) == T
    clock.admitted("B", T + 500, 8, T + 20_100)  # dedup reaches B's backlog: its records move it
    facts["B"] = Poll(9, T + 21_000, upstream_busy=True)
    assert clock.watermark(T + 21_000, facts.get) == T + 500
    facts["B"] = Poll(9, T + 22_000, upstream_busy=False)  # dedup is through: fetch time counts again
    assert clock.watermark(T + 22_000, facts.get) == T + 500 + 1_900
