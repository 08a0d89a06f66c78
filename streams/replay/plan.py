"""What a replay covers: units (Kafka partitions, or Parquet files) with a [start, end) range fixed once.

The end is resolved when the replay starts (the high watermark, or the offset of ``--to``) and kept in
the checkpoint, so a live topic does not make a replay endless and a resumed replay stops where the
first run would have stopped. The resolution itself is pure (``select_partitions``, ``resolve_units``);
``plan_topic`` only fetches the watermarks, time and group offsets it needs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition

from streams.replay.timespec import ReplayError

__all__ = [
    "RangeSpec",
    "ReplayError",
    "Unit",
    "UnitStats",
    "plan_topic",
    "resolve_units",
    "select_partitions",
]


@dataclass
class UnitStats:
    records: int = 0  # read from the source inside the range
    items: int = 0  # spans / data points / log records of the records that passed the filters
    skipped: int = 0  # left out by a filter
    dead_lettered: int = 0  # refused for good by the target
    first_offset: int | None = None
    last_offset: int | None = None
    first_ts: int | None = None
    last_ts: int | None = None

    @property
    def delivered(self) -> int:
        return self.records - self.skipped - self.dead_lettered


@dataclass
class Unit:
    """One partition (or one Parquet file, positions being row numbers) and how far the replay got."""

    key: str
    partition: int
    start: int
    end: int  # exclusive
    next: int = -1  # first position whose record the target has not acknowledged yet
    stats: UnitStats = field(default_factory=UnitStats)

    def __post_init__(self) -> None:
        if self.next < 0:
            self.next = self.start

    @property
    def done(self) -> bool:
        return self.next >= self.end

    @property
    def span(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "partition": self.partition,
            "start": self.start,
            "end": self.end,
            "next": self.next,
            "stats": asdict(self.stats),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Unit:
        return cls(
            str(data["key"]),
            int(data["partition"]),
            int(data["start"]),
            int(data["end"]),
            int(data["next"]),
            UnitStats(**data.get("stats", {})),
        )


@dataclass(frozen=True)
class RangeSpec:
    """The range options as given; ``*_text`` keep the user's words for messages."""

    partitions: list[int] | None = None
    from_offset: int | dict[int, int] | None = None
    to_offset: int | dict[int, int] | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    from_group: str | None = None
    from_text: str = ""
    to_text: str = ""

    def check_order(self) -> None:
        """Ranges given backwards are a mistake to report, not an empty replay to run."""
        if self.from_ms is not None and self.to_ms is not None and self.from_ms > self.to_ms:
            raise ReplayError(f"--from {self.from_text} is later than --to {self.to_text}")
        if self.from_offset is None or self.to_offset is None:
            return
        keys = set(_as_dict(self.from_offset)) | set(_as_dict(self.to_offset))
        for p in sorted(keys) or [0]:
            start = _pick(self.from_offset, p)
            end = _pick(self.to_offset, p)
            if start is not None and end is not None and start > end:
                where = (
                    f"partition {p}: "
                    if isinstance(self.from_offset, dict) or isinstance(self.to_offset, dict)
                    else ""
                )
                raise ReplayError(f"{where}--from-offset {start} is after --to-offset {end}")


def _as_dict(value: int | dict[int, int] | None) -> dict[int, int]:
    return value if isinstance(value, dict) else {}


def _pick(value: int | dict[int, int] | None, partition: int) -> int | None:
    if isinstance(value, dict):
        return value.get(partition)
    return value


def _describe(partitions: Sequence[int]) -> str:
    if not partitions:
        return "no partitions"
    if list(partitions) == list(range(partitions[0], partitions[-1] + 1)):
        if len(partitions) == 1:
            return f"partition {partitions[0]}"
        return f"partitions {partitions[0]}-{partitions[-1]}"
    return "partitions " + ",".join(map(str, partitions))


def select_partitions(topic: str, available: Sequence[int], spec: RangeSpec) -> list[int]:
    """``--partitions``, else those named by ``--from-offset P:O`` pairs, else all of them."""
    wanted = spec.partitions
    if wanted is None and isinstance(spec.from_offset, dict):
        wanted = sorted(spec.from_offset)
    named = [*(wanted or []), *_as_dict(spec.from_offset), *_as_dict(spec.to_offset)]
    for p in named:
        if p not in available:
            raise ReplayError(f"topic {topic!r} has no partition {p} (it has {_describe(sorted(available))})")
    return sorted(available) if wanted is None else sorted(set(wanted))


def resolve_units(
    partitions: Sequence[int],
    watermarks: Mapping[int, tuple[int, int]],
    starts: Mapping[int, int | None],
    ends: Mapping[int, int | None],
) -> tuple[list[Unit], list[str]]:
    """Clamp each partition's [start, end) into its watermarks; notes say where that changed the ask."""
    units: list[Unit] = []
    notes: list[str] = []
    for p in partitions:
        low, high = watermarks[p]
        start, end = starts.get(p), ends.get(p)
        end = high if end is None else min(end, high)
        if start is None:
            start = low
        elif start < low:
            notes.append(f"partition {p}: offsets {start}-{low - 1} are gone (retention); starting at {low}")
            start = low
        start = min(start, end)
        units.append(Unit(str(p), p, start, max(start, end)))
    return units, notes


def plan_topic(
    consumer: Any, admin: Any, topic: str, spec: RangeSpec, timeout: float = 15.0
) -> tuple[list[Unit], list[str]]:
    """Fix the replay's units of ``topic`` now: ReplayError for anything that would make it wrong."""
    spec.check_order()
    try:
        metadata = consumer.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ReplayError(f"cannot reach Kafka: {exc.args[0].str() if exc.args else exc}") from None
    meta = metadata.topics.get(topic)
    if meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        raise ReplayError(f"topic {topic!r} does not exist")
    partitions = select_partitions(topic, sorted(meta.partitions), spec)
    watermarks: dict[int, tuple[int, int]] = {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        watermarks[p] = (low, high)
    highs = {p: watermarks[p][1] for p in partitions}
    notes: list[str] = []
    starts: dict[int, int | None] = {p: _pick(spec.from_offset, p) for p in partitions}
    ends: dict[int, int | None] = {p: _pick(spec.to_offset, p) for p in partitions}
    if spec.from_ms is not None:
        starts = _offsets_at(consumer, topic, partitions, spec.from_ms, highs, timeout)
    if spec.to_ms is not None:
        ends = _offsets_at(consumer, topic, partitions, spec.to_ms, highs, timeout)
    if spec.from_group is not None:
        starts = _group_offsets(admin, spec.from_group, topic, partitions, timeout)
        notes += [
            f"partition {p}: group {spec.from_group} has no committed offset; starting at the "
            f"earliest ({watermarks[p][0]})"
            for p, o in starts.items()
            if o is None
        ]
    units, more = resolve_units(partitions, watermarks, starts, ends)
    if not any(u.span for u in units):
        raise ReplayError(f"no records in the selected range of topic {topic!r}")
    return units, notes + more


def _offsets_at(
    consumer: Any, topic: str, partitions: Sequence[int], ms: int, high: Mapping[int, int], timeout: float
) -> dict[int, int | None]:
    """The first offset whose timestamp is >= ``ms``; past the last record, the high watermark."""
    asked = [TopicPartition(topic, p, ms) for p in partitions]
    out: dict[int, int | None] = {}
    for tp in consumer.offsets_for_times(asked, timeout=timeout):
        if tp.error is not None:
            raise ReplayError(f"cannot look up offsets by time in {topic!r}: {tp.error.str()}")
        out[tp.partition] = tp.offset if tp.offset >= 0 else high[tp.partition]
    return out


_COORDINATOR = frozenset({
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
})


def _group_offsets(
    admin: Any, group: str, topic: str, partitions: Sequence[int], timeout: float
) -> dict[int, int | None]:
    """A group's committed positions, read with the admin API: the group itself is not joined."""
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
    deadline = time.monotonic() + timeout
    while True:
        try:
            futures = admin.list_consumer_group_offsets([request], request_timeout=timeout)
            answer = futures[group].result(timeout)
            break
        except KafkaException as exc:
            error = exc.args[0]
            # A coordinator still loading its offsets (a broker just started) answers "later", not "no".
            transient = error.retriable() or error.code() in _COORDINATOR or "Coordinator" in error.str()
            if not transient or time.monotonic() > deadline:
                why = error.str()
                raise ReplayError(f"cannot read the offsets of consumer group {group!r}: {why}") from None
            time.sleep(0.5)
    offsets = {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in answer.topic_partitions}
    if not any(o is not None for o in offsets.values()):
        raise ReplayError(f"consumer group {group!r} has no committed offset on topic {topic!r}")
    return offsets
