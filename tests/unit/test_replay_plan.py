"""Range resolution: partitions chosen, [start, end) clamped into the watermarks, bad ranges refused.

``plan_topic`` runs here against a stand-in that answers the four metadata calls it makes, so the
resolution logic (time offsets past the end, groups without commits, empty ranges) is checked without a
broker; tests/integration/test_replay.py runs the same paths against the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.replay.plan import RangeSpec, ReplayError, Unit, plan_topic, resolve_units, select_partitions


def test_all_partitions_by_default_or_the_chosen_ones() -> None:
    assert select_partitions("t", [0, 1, 2], RangeSpec()) == [0, 1, 2]
    assert select_partitions("t", [0, 1, 2], RangeSpec(partitions=[2, 0])) == [0, 2]
    assert select_partitions("t", [0, 1, 2], RangeSpec(from_offset={1: 5})) == [1]


@pytest.mark.parametrize(
    "spec", [RangeSpec(partitions=[0, 3]), RangeSpec(from_offset={3: 1}), RangeSpec(to_offset={3: 1})]
)
def test_a_partition_the_topic_lacks_is_named(spec: RangeSpec) -> None:
    with pytest.raises(ReplayError) as err:
        select_partitions("t", [0, 1, 2], spec)
    assert str(err.value) == "topic 't' has no partition 3 (it has partitions 0-2)"


def test_ranges_default_to_the_watermarks_and_are_clamped_into_them() -> None:
    units, notes = resolve_units(
        [0, 1, 2, 3],
        {0: (0, 100), 1: (50, 80), 2: (0, 10), 3: (0, 10)},
        starts={0: None, 1: 10, 2: 20, 3: 4},
        ends={0: None, 1: 60, 2: None, 3: 500},
    )
    assert [(u.start, u.end, u.next) for u in units] == [(0, 100, 0), (50, 60, 50), (10, 10, 10), (4, 10, 4)]
    assert notes == ["partition 1: offsets 10-49 are gone (retention); starting at 50"]
    assert [u.span for u in units] == [100, 10, 0, 6]


def test_from_later_than_to_is_refused() -> None:
    spec = RangeSpec(from_ms=2_000, to_ms=1_000, from_text="-1h", to_text="-2h")
    with pytest.raises(ReplayError) as err:
        spec.check_order()
    assert str(err.value) == "--from -1h is later than --to -2h"


def test_offsets_given_backwards_are_refused() -> None:
    with pytest.raises(ReplayError) as err:
        RangeSpec(from_offset=500, to_offset=100).check_order()
    assert str(err.value) == "--from-offset 500 is after --to-offset 100"
    with pytest.raises(ReplayError) as err:
        RangeSpec(from_offset={0: 5, 1: 500}, to_offset=100).check_order()
    assert str(err.value) == "partition 1: --from-offset 500 is after --to-offset 100"
    RangeSpec(from_offset={0: 5}, to_offset={1: 1}).check_order()  # different partitions: fine


def test_unit_round_trips_through_json() -> None:
    unit = Unit("2", 2, 10, 90, 40)
    unit.stats.records, unit.stats.first_ts = 30, 1234
    again = Unit.from_json(unit.to_json())
    assert again == unit and not again.done
    assert Unit("0", 0, 5, 5).done


# --- plan_topic against a stand-in for the consumer's metadata calls -----------------------------------


@dataclass
class _Error:
    code_: int

    def code(self) -> int:
        return self.code_

    def str(self) -> str:
        return "broker says no"


@dataclass
class _TopicMeta:
    partitions: dict[int, object]
    error: Any = None


@dataclass
class _Cluster:
    """Watermarks and per-partition record timestamps (offset i has timestamps[p][i - low])."""

    topics: dict[str, dict[int, tuple[int, int]]]
    timestamps: dict[int, list[int]] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)

    def list_topics(self, timeout: float) -> Any:
        return type(
            "Meta",
            (),
            {"topics": {name: _TopicMeta(dict.fromkeys(parts)) for name, parts in self.topics.items()}},
        )()

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return self.topics[tp.topic][tp.partition]

    def offsets_for_times(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        out = []
        for tp in tps:
            low = self.topics[tp.topic][tp.partition][0]
            stamps = self.timestamps[tp.partition]
            offset = next((low + i for i, ts in enumerate(stamps) if ts >= tp.offset), -1)
            out.append(TopicPartition(tp.topic, tp.partition, offset))
        return out

    def list_consumer_group_offsets(self, requests: list[Any], request_timeout: float) -> Any:
        request = requests[0]
        parts = [
            TopicPartition(tp.topic, tp.partition, self.committed.get(tp.partition, -1001))
            for tp in request.topic_partitions
        ]
        answer = type("Answer", (), {"topic_partitions": parts})()
        future = type("F", (), {"result": lambda self, timeout=None: answer})()
        return {request.group_id: future}


CLUSTER = _Cluster({"t": {0: (0, 5), 1: (2, 6)}}, timestamps={0: [10, 20, 30, 40, 50], 1: [15, 25, 35, 45]})


def _plan(spec: RangeSpec, cluster: _Cluster = CLUSTER) -> list[tuple[int, int, int]]:
    units, _notes = plan_topic(cluster, cluster, "t", spec)
    return [(u.partition, u.start, u.end) for u in units]


def test_whole_topic() -> None:
    assert _plan(RangeSpec()) == [(0, 0, 5), (1, 2, 6)]


def test_times_resolve_per_partition_and_past_the_last_record_mean_the_end() -> None:
    # [25, 45): partition 0 offsets 2..3 (ts 30, 40), partition 1 offsets 3..4 (ts 25, 35)
    assert _plan(RangeSpec(from_ms=25, to_ms=45)) == [(0, 2, 4), (1, 3, 5)]
    assert _plan(RangeSpec(from_ms=42)) == [(0, 4, 5), (1, 5, 6)]
    assert _plan(RangeSpec(to_ms=1000)) == [(0, 0, 5), (1, 2, 6)]  # nothing at or after: the end


def test_a_group_position_up_to_the_high_watermark() -> None:
    cluster = _Cluster(CLUSTER.topics, committed={0: 3})
    units, notes = plan_topic(cluster, cluster, "t", RangeSpec(from_group="sink-a"))
    assert [(u.start, u.end) for u in units] == [(3, 5), (2, 6)]
    assert notes == ["partition 1: group sink-a has no committed offset; starting at the earliest (2)"]


def test_a_coordinator_still_loading_is_waited_for() -> None:
    class Loading(_Cluster):
        calls = 0

        def list_consumer_group_offsets(self, requests: list[Any], request_timeout: float) -> Any:
            self.calls += 1
            if self.calls < 3:
                raise KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS))
            return super().list_consumer_group_offsets(requests, request_timeout)

    cluster = Loading(CLUSTER.topics, committed={0: 3, 1: 4})
    units, _ = plan_topic(cluster, cluster, "t", RangeSpec(from_group="sink-a"))
    assert [u.start for u in units] == [3, 4] and cluster.calls == 3


def test_a_group_without_commits_on_the_topic_is_refused() -> None:
    with pytest.raises(ReplayError) as err:
        _plan(RangeSpec(from_group="nobody"))
    assert str(err.value) == "consumer group 'nobody' has no committed offset on topic 't'"


def test_a_missing_topic_is_refused() -> None:
    with pytest.raises(ReplayError) as err:
        plan_topic(CLUSTER, CLUSTER, "nope", RangeSpec())
    assert str(err.value) == "topic 'nope' does not exist"


@pytest.mark.parametrize(
    "spec",
    [RangeSpec(from_ms=1000), RangeSpec(from_offset=5, to_offset=5), RangeSpec(partitions=[0], to_ms=5)],
)
def test_a_range_without_records_is_refused(spec: RangeSpec) -> None:
    with pytest.raises(ReplayError) as err:
        _plan(spec)
    assert str(err.value) == "no records in the selected range of topic 't'"


def test_an_empty_topic_is_refused() -> None:
    with pytest.raises(ReplayError) as err:
        _plan(RangeSpec(), _Cluster({"t": {0: (7, 7)}}))
    assert str(err.value) == "no records in the selected range of topic 't'"
