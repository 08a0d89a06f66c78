"""Before a dedup worker takes the first record of a partition: its state brought up to date.

Two reads, on the consumer's thread inside the assignment callback (no record of the partition is handed
over until they are done):
1. the changelog partition past the offset the local state already includes (a partition that moved here
   from another worker is read from the start of the changelog's retention: three windows);
2. the tail of the output partition past the last output the changelog covers, within the window: those
   outputs were acknowledged but their identities may not have reached the changelog before the previous
   owner died, and their inputs may not have been committed; their identities are remembered and
   written to the changelog too, so reprocessed inputs drop them.

The changelog keeps the name Faust gave the table's changelog when this stage ran on Faust
(``<group>-seen-<signal>-changelog``), so the state of a cluster carries over an upgrade.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_END, Consumer, KafkaError, Producer, TopicPartition

from kotel.otlp import Signal
from kotel.topology import Topology
from kotel.topology.topics import ResolvedTopic
from streams.stages.dedup_core import identify_record
from streams.stages.dedup_store import SeenStore, changelog_records

log = logging.getLogger("kotel.dedup")

READ_IDLE_TIMEOUT_S = 30.0  # a read that gets nothing for this long while records remain fails the worker
_READ_BATCH = 1000


def changelog_topic(topology: Topology, signal: Signal) -> str:
    return f"{topology.topic_names.stage_group('dedup')}-seen-{signal.value}-changelog"


def changelog_spec(topology: Topology, signal: Signal, partitions: int, window_ms: int) -> ResolvedTopic:
    """One changelog partition per input partition; records expire by time (three windows) instead of
    compaction: every record adds identities, none replaces another."""
    return ResolvedTopic(name=changelog_topic(topology, signal), partitions=partitions,
                         replication_factor=topology.topics.defaults.replication_factor or 1,
                         config={"cleanup.policy": "delete", "retention.ms": str(3 * window_ms),
                                 "segment.ms": str(max(window_ms, 60_000))})


def now_ms() -> int:
    return int(time.time() * 1000)


class PartitionReader:
    """Reads a range of one partition at a time (no group: assign and seek); one per worker."""

    def __init__(self, config: dict[str, object], group: str) -> None:
        self.consumer = Consumer({**config, "group.id": f"{group}-recovery", "enable.auto.commit": False,
                                  "enable.partition.eof": False, "auto.offset.reset": "earliest"})

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=15)
        return int(low), int(high)

    def offset_at(self, topic: str, partition: int, stamp_ms: int) -> int | None:
        """The first offset whose timestamp is at or after ``stamp_ms``; None when there is none."""
        found = self.consumer.offsets_for_times([TopicPartition(topic, partition, stamp_ms)], timeout=15)[0]
        return None if found.offset < 0 or found.offset == OFFSET_END else int(found.offset)

    def read(self, topic: str, partition: int, start: int, end: int,
             each: Callable[[list[tuple[int, bytes | None]]], None]) -> int:
        """Hands ``each`` the (offset, value) of records in [start, end), a batch at a time; the count."""
        if start >= end:
            return 0
        self.consumer.assign([TopicPartition(topic, partition, start)])
        count, position, idle_since = 0, start, time.monotonic()
        try:
            while position < end:
                batch: list[tuple[int, bytes | None]] = []
                for msg in self.consumer.consume(_READ_BATCH, 1.0):
                    if msg.error() is not None:
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            raise RuntimeError(f"reading {topic}[{partition}]: {msg.error()}")
                        continue
                    position = msg.offset() + 1
                    if msg.offset() < end:
                        batch.append((msg.offset(), msg.value()))
                if batch:
                    each(batch)
                    count += len(batch)
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > READ_IDLE_TIMEOUT_S:
                    raise RuntimeError(f"reading {topic}[{partition}] from {start} to {end}: nothing came "
                                       f"past offset {position} in {READ_IDLE_TIMEOUT_S:.0f} s")
        finally:
            self.consumer.unassign()
        return count


class Recovery:
    """One signal's recovery of its partitions (see module doc)."""

    def __init__(self, signal: Signal, store: SeenStore, reader: PartitionReader, producer: Producer, *,
                 changelog: str, target: str, out_partitions: int) -> None:
        self.signal, self.store, self.reader, self.producer = signal, store, reader, producer
        self.changelog, self.target, self.out_partitions = changelog, target, out_partitions

    def recover(self, partition: int) -> None:
        started = time.monotonic()
        low, high = self.reader.bounds(self.changelog, partition)
        start = max(low, self.store.changelog_offset(partition) + 1)
        records = self.reader.read(self.changelog, partition, start, high,
                                   lambda batch: self.store.apply_changelog(partition, batch))
        primed, outputs = self._prime(partition)
        log.info("%s[%d]: %d changelog records read, %d identities from %d output records past them, "
                 "in %.1f s", self.changelog, partition, records, primed, outputs, time.monotonic() - started)

    def _prime(self, partition: int) -> tuple[int, int]:
        out = partition % self.out_partitions
        _, end = self.reader.bounds(self.target, out)
        out_p, out_off = self.store.last_output(partition)
        start = out_off + 1 if out_p == out and out_off >= 0 else None
        floor = self.reader.offset_at(self.target, out, now_ms() - self.store.window_ms)
        floor = end if floor is None else floor
        start = floor if start is None else max(start, floor)
        ids: list[bytes] = []

        def identify(batch: list[tuple[int, bytes | None]]) -> None:
            for _, value in batch:
                ids.extend(identify_record(self.signal, value or b"").items.ids)

        outputs = self.reader.read(self.target, out, start, end, identify)
        if not outputs:
            return 0, 0
        stamp, covered = now_ms(), (out, end - 1)
        self.store.remember(partition, ids, stamp, covered)
        for value in changelog_records(covered, [(stamp, ids)]):
            offset = self._log(partition, value)
        self.store.set_changelog_offset(partition, offset)
        return len(ids), outputs

    def _log(self, partition: int, value: bytes) -> int:
        """Writes a changelog record and waits for its acknowledgement; its offset."""
        acked = threading.Event()
        result: list[object] = []

        def delivered(err: object, msg: object) -> None:
            result.append(err if err is not None else msg)
            acked.set()

        self.producer.produce(self.changelog, value, key=b"prime", partition=partition, on_delivery=delivered)
        deadline = time.monotonic() + 60
        while not acked.wait(0.05):  # the stage's delivery thread may serve the callback instead
            self.producer.poll(0)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.changelog}[{partition}]: the prime record was not acknowledged")
        found = result[0]
        if isinstance(found, KafkaError) or not hasattr(found, "offset"):
            raise RuntimeError(f"{self.changelog}[{partition}]: the prime record was refused: {found}")
        return int(found.offset())  # type: ignore[attr-defined]

