"""The tail stage's Faust table: a RocksDB per partition holding a `TraceState`, recovered from its log.

The changelog is the stage's record log (streams.stages.tail_core: B, D, P records), not key/value
pairs: recovery and standbys replay each record through `TraceState.apply`, which writes Faust's
persisted offset in the same batch, so a record is never applied twice by a replica. A worker writes
its live state before the record is acknowledged, so after a crash its own disk may be ahead of the
log; the partition is then marked dirty and wiped on its next assignment (rebuilt from the changelog),
as Kafka Streams does after an unclean shutdown. A clean stop or revoke, with every record of the
partition acknowledged, clears the mark and flushes. Outputs that reached the sampled topic but not the
log are read back (`read_outputs`) before a new owner works on the partition.

No write-ahead log: the changelog is the durable copy. After a crash RocksDB comes back with what its
memtables had flushed, a prefix of the writes: either from before the partition went live (consistent
with the persisted offset written in the same batches) or holding the dirty mark (written first, so
wiped and rebuilt). Values are stored uncompressed: a fragment is read once, a decision wait after it
was written, and compressing it at flush and decompressing it at that read cost ~30 % of the store's
CPU (loadtest/results/tail.md), for disk the machine has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.stores.rocksdb import Store as RocksStore
from faust.types import TP
from rocksdict import (
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    WriteBufferManager,
    WriteOptions,
)

from kotel.otlp import Signal, decode_protobuf
from streams.app import aiokafka_options
from streams.stages.tail_core import Cover, traces_of
from streams.stages.tail_state import Limits, TraceState

if TYPE_CHECKING:  # as in streams.app: importing it first at runtime runs into kotel.topology's cycle
    from kotel.kafka.settings import KafkaSettings

log = logging.getLogger("kotel.tail")

_DIRTY = b"\x00tail-dirty"
_BLOCK_CACHE_BYTES = 64 * 1024 * 1024  # per table; memtables are charged to it as well
_MEMTABLE_BYTES = 48 * 1024 * 1024
_MIN_RETENTION = timedelta(minutes=15)
_NO_WAL = WriteOptions()
_NO_WAL.disable_wal = True


def changelog_retention(limits: Limits) -> timedelta:
    """How long the log keeps records: ten decision waits, at least 15 minutes.

    A fresh worker replays all of it, so it bounds recovery time; pending traces older than it (a
    stage stopped that long) lose their first spans, and decisions older than it are forgotten.
    """
    waits = timedelta(milliseconds=10 * (limits.decision_wait_ms + limits.root_wait_ms))
    return max(_MIN_RETENTION, waits)


class TraceStore(RocksStore):
    """Faust's RocksDB store (rocksdict) with one `TraceState` per partition; see the module doc."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._states: dict[int, TraceState] = {}
        self.in_flight: dict[int, int] = {}  # changelog records sent and not yet acknowledged
        self._live: set[int] = set()  # partitions this process wrote: their dirty mark is its own
        cache = Cache(_BLOCK_CACHE_BYTES)
        options = self._db_options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_manager(
            WriteBufferManager.new_write_buffer_manager_with_cache(_MEMTABLE_BYTES, False, cache))
        options.set_max_background_jobs(2)
        options.set_write_buffer_size(16 * 1024 * 1024)
        options.set_compression_type(DBCompressionType.none())
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(cache)
        options.set_block_based_table_factory(table)

    def _open_for_partition(self, partition: int) -> Rdict:
        db = Rdict(str(self.partition_path(partition)), options=self._db_options)
        db.set_write_options(_NO_WAL)
        return db

    def state(self, partition: int) -> TraceState:
        db = self._db_for_partition(partition)
        state = self._states.get(partition)
        if state is None or state.db is not db:
            state = self._states[partition] = TraceState(db, self.limits)
        return state

    def mark_dirty(self, partition: int) -> None:
        self.in_flight[partition] = self.in_flight.get(partition, 0) + 1
        if partition not in self._live:
            self._live.add(partition)
            self._db_for_partition(partition).put(_DIRTY, b"1")

    def acknowledged(self, partition: int) -> None:
        self.in_flight[partition] -= 1

    def _mark_clean(self, partition: int) -> None:
        db = self._dbs.get(partition)
        if db is not None and not self.in_flight.get(partition):
            db.delete(_DIRTY)
            db.flush()  # no write-ahead log: what is not flushed is not there after a restart
            self._live.discard(partition)

    def persisted_offset(self, tp: TP) -> int | None:
        db = self._db_for_partition(tp.partition)
        if tp.partition not in self._live and db.get(_DIRTY) is not None:
            log.warning("%s[%d]: local state may be ahead of the changelog (unclean stop); rebuilding it",
                        tp.topic, tp.partition)
            db.delete_range(b"\x00", b"\xff")
            self._states.pop(tp.partition, None)
            return None
        return super().persisted_offset(tp)

    def apply_changelog_batch(self, batch: Any, to_key: Any, to_value: Any) -> None:
        for event in batch:
            msg = event.message
            extra = {self.offset_key: str(msg.offset).encode()}
            if not self.state(msg.partition).apply(msg.value, extra):
                self._db_for_partition(msg.partition).put(self.offset_key, extra[self.offset_key])

    def revoke_partitions(self, table: Any, tps: set[TP]) -> None:
        for tp in tps:
            if tp.topic in table.changelog_topic.topics:
                self._mark_clean(tp.partition)
        super().revoke_partitions(table, tps)
        for partition in [p for p in self._states if p not in self._dbs]:
            del self._states[partition]

    async def stop(self) -> None:
        for partition in list(self._dbs):
            self._mark_clean(partition)
        self._states.clear()
        await super().stop()

    def active_partitions(self) -> list[int]:
        """This worker's active (not standby) partitions of the table, recovered or not."""
        topic = self.table.changelog_topic_name  # type: ignore[attr-defined]
        return sorted(tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic)


class TraceTable(faust.Table):
    """A table whose store is a `TraceStore`; its changelog is a record log that expires by time."""

    def __init__(self, app: faust.App, *, limits: Limits, **kwargs: Any) -> None:
        self.limits = limits
        retention = int(changelog_retention(limits).total_seconds() * 1000)
        kwargs["extra_topic_configs"] = {"cleanup.policy": "delete", "retention.ms": str(retention),
                                         "segment.ms": str(max(retention // 4, 60_000))}
        super().__init__(app, **kwargs)

    def _new_store_by_url(self, url: Any) -> TraceStore:
        return TraceStore(url, self.app, self, table_name=self.name, key_type=bytes, value_type=bytes,
                          key_serializer="raw", value_serializer="raw", loop=self.loop,
                          options=self.options, limits=self.limits)

    @property
    def store(self) -> TraceStore:
        return self.data  # type: ignore[return-value]


@dataclass
class Outputs:
    """Output records past what a partition's changelog covers: offsets [start, end), their spans."""

    start: int
    end: int
    emitted: dict[bytes, list[bytes]] = field(default_factory=dict)  # trace id -> span ids


async def read_outputs(kafka: KafkaSettings, tp: TopicPartition, cover: Cover, floor_ms: int,
                       mine: Callable[[bytes], bool]) -> Outputs:
    """The spans of the traces ``mine`` in ``tp`` past ``cover`` (from ``floor_ms`` when the cover is of
    another partition): outputs of a worker that crashed before it logged them."""
    consumer = AIOKafkaConsumer(**aiokafka_options(kafka), enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        if cover[0] == tp.partition and cover[1] >= 0:
            start = cover[1] + 1
        else:
            found = (await consumer.offsets_for_times({tp: floor_ms}))[tp]
            start = found.offset if found is not None else end
        out = Outputs(start, end)
        if start >= end:
            return out
        consumer.seek(tp, start)
        while await consumer.position(tp) < end:
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.offset < end and record.value:
                    for tid, ids in traces_of(decode_protobuf(Signal.TRACES, record.value)).items():
                        if mine(tid):
                            out.emitted.setdefault(tid, []).extend(ids)
        return out
    finally:
        await consumer.stop()


async def topic_partitions(kafka: KafkaSettings, topic: str) -> int:
    """How many partitions ``topic`` has; 0 when it does not exist."""
    admin = AIOKafkaAdminClient(**aiokafka_options(kafka))
    await admin.start()
    try:
        found = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([topic])}
    finally:
        await admin.close()
    return found.get(topic, 0)
