"""The dedup stage: ``<prefix>.raw.<signal>`` -> ``<prefix>.deduped.<signal>``, same key, same headers.

State. A Faust table per signal, changelog-backed, whose RocksDB store keeps one 16-byte key per seen
identity (`IdentityStore`). A changelog record carries every new identity of a group of inputs, so the
changelog costs one message per group, not one per span. Expiry: identities live in one column family
per ``window``-wide bucket of stream time (the max input record timestamp of the partition, capped at
the wall clock); a lookup consults the current and the previous bucket and honours the stored time, so
the window is exact, and a whole bucket is dropped at once when it falls out, which bounds the disk to
about two windows. The changelog topic uses ``cleanup.policy=delete`` with a retention of three windows.

Exactly once in effect after a crash. For each input, in order: the output is produced and
acknowledged, then its identities go to RocksDB and to the changelog (acknowledged), then the input is
acked (and later committed). A worker taking over a partition therefore finds in the changelog every
identity whose input was committed, and the only outputs it may not know about are those produced after
the last changelogged one: before its first record it reads that tail of the output partition (the
changelog records the output offset) and remembers those identities too, so reprocessed inputs drop them.
Outputs go to partition ``input partition % output partitions`` so that tail is short and per-key order holds.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.stores.rocksdb import Store as RocksStore
from faust.types import TP, EventT, StreamT
from rocksdict import (
    BlockBasedOptions,
    Cache,
    MemtableFactory,
    Options,
    Rdict,
    SliceTransform,
    WriteBatch,
    WriteBufferManager,
)

from kotel.otlp import OtlpDecodeError, Signal, validate_request
from kotel.topology import Topology
from kotel.topology.processors import DedupConfig
from streams.app import OffsetGuard, OrderedAcks, Pending, aiokafka_options, fatal, metrics_of
from streams.deadletter import DeadLetter
from streams.stages.dedup_core import IDENTITY_SIZE, decide, identify_record

log = logging.getLogger("kotel.dedup")

_META = b"kotel\0dedup\0meta"  # default column family: stream time and the last output covered
_META_FMT = struct.Struct(">qiq")  # stream time ms, output partition, output offset (-1: none)
_TS = struct.Struct(">q")
_BLOCK_CACHE_BYTES = 64 * 1024 * 1024  # per table; memtables are charged to it as well
_MEMTABLE_BYTES = 48 * 1024 * 1024
_MAX_IN_FLIGHT = 128


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Partition:
    """One partition's RocksDB: bucket column families by index, stream time, last output covered."""

    def __init__(self, db: Rdict, cf_options: Options) -> None:
        self.db = db
        self.cf_options = cf_options
        self.buckets: dict[int, Rdict] = {}
        for name in Rdict.list_cf(db.path()):
            if name.startswith("ids-"):
                self.buckets[int(name[4:])] = db.get_column_family(name)
        raw = db.get(_META)
        self.stream_ms, self.out_partition, self.out_offset = _META_FMT.unpack(raw) if raw else (0, -1, -1)

    def handle(self, index: int) -> Any:
        """The column family handle of bucket ``index``, created on first use (for write batches)."""
        if index not in self.buckets:
            self.buckets[index] = self.db.create_column_family(f"ids-{index}", self.cf_options)
        return self.db.get_column_family_handle(f"ids-{index}")

    def advance(self, now_ms: int, window_ms: int) -> None:
        """Move stream time forward and drop buckets that can no longer hold a live identity."""
        if now_ms <= self.stream_ms:
            return
        self.stream_ms = now_ms
        oldest = now_ms // window_ms - 1
        for index in [i for i in self.buckets if i < oldest]:
            del self.buckets[index]
            self.db.drop_column_family(f"ids-{index}")


class IdentityStore(RocksStore):
    """Faust's RocksDB store (rocksdict), keyed by identity instead of by table key; see module doc."""

    def __init__(self, *args: Any, window_ms: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window_ms = window_ms
        self._parts: dict[int, _Partition] = {}
        cache = Cache(_BLOCK_CACHE_BYTES)
        self._db_options = Options(raw_mode=True)
        self._db_options.create_if_missing(True)
        self._db_options.set_write_buffer_manager(
            WriteBufferManager.new_write_buffer_manager_with_cache(_MEMTABLE_BYTES, False, cache))
        self._db_options.set_max_background_jobs(2)
        self._db_options.set_allow_concurrent_memtable_write(False)  # required by the hashed memtable
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(cache)
        cf = self._cf_options = Options(raw_mode=True)
        cf.set_block_based_table_factory(table)
        # Keys are uniformly random 16-byte digests: a hashed memtable inserts and probes in O(1), where
        # the default skip list made inserts about ten times dearer (measured with rocksdict).
        cf.set_prefix_extractor(SliceTransform.create_fixed_prefix(IDENTITY_SIZE))
        cf.set_memtable_factory(MemtableFactory.hash_link_list(1 << 16))
        # Nearly every lookup misses: a Bloom filter over the memtable (prefix = whole key) answers most
        # of them without walking it, which halved the lookup time at a million keys (measured).
        cf.set_memtable_prefix_bloom_ratio(0.1)
        cf.set_memtable_whole_key_filtering(True)
        cf.set_write_buffer_size(16 * 1024 * 1024)

    def _open_for_partition(self, partition: int) -> Rdict:
        path = str(self.partition_path(partition))
        names = Rdict.list_cf(path) if (self.partition_path(partition) / "CURRENT").exists() else []
        families = {name: self._cf_options for name in names if name != "default"}
        return Rdict(path, options=self._db_options, column_families=families or None)

    def _state(self, partition: int) -> _Partition:
        db = self._db_for_partition(partition)
        part = self._parts.get(partition)
        if part is None or part.db is not db:
            part = self._parts[partition] = _Partition(db, self._cf_options)
        return part

    def revoke_partitions(self, table: Any, tps: set[TP]) -> None:
        super().revoke_partitions(table, tps)
        for partition in [p for p in self._parts if p not in self._dbs]:
            del self._parts[partition]  # the handles would keep a closed partition's DB open

    async def stop(self) -> None:
        self._parts.clear()
        await super().stop()

    def lookup(self, partition: int, ids: list[bytes], now_ms: int) -> list[bool]:
        """Whether each identity was seen within the window before ``now_ms`` (stream time)."""
        part = self._state(partition)
        part.advance(now_ms, self.window_ms)
        cutoff = part.stream_ms - self.window_ms
        seen = [False] * len(ids)
        current = part.stream_ms // self.window_ms
        for index in (current, current - 1):
            cf = part.buckets.get(index)
            if cf is None:
                continue
            todo = [i for i, hit in enumerate(seen) if not hit] if any(seen) else range(len(ids))
            found = cf.get(ids if len(todo) == len(ids) else [ids[i] for i in todo])
            if found.count(None) == len(found):
                continue  # the common case: nothing seen, and no Python-level loop
            for i, value in zip(todo, found, strict=True):
                if value is not None and _TS.unpack(value)[0] >= cutoff:
                    seen[i] = True
        return seen

    def remember(self, partition: int, ids: list[bytes], ts_ms: int, out: tuple[int, int] | None) -> None:
        """Store identities seen at ``ts_ms`` and, if given, the last output offset they cover."""
        part = self._state(partition)
        part.advance(ts_ms, self.window_ms)
        batch = WriteBatch(raw_mode=True)
        index = ts_ms // self.window_ms
        if ids and index >= part.stream_ms // self.window_ms - 1:
            batch.set_default_column_family(part.handle(index))
            deque(map(batch.put, ids, repeat(_TS.pack(ts_ms), len(ids))), maxlen=0)  # no Python-level loop
        if out is not None and out[1] >= 0 and (out[0] != part.out_partition or out[1] > part.out_offset):
            part.out_partition, part.out_offset = out
        batch.set_default_column_family(None)
        batch.put(_META, _META_FMT.pack(part.stream_ms, part.out_partition, part.out_offset))
        part.db.write(batch)

    def last_output(self, partition: int) -> tuple[int, int]:
        part = self._state(partition)
        return part.out_partition, part.out_offset

    def apply_changelog_batch(self, batch: Any, to_key: Any, to_value: Any) -> None:
        """Recovery and standbys: each changelog record is a header plus the identities it adds."""
        offsets: dict[TP, int] = {}
        for event in batch:
            msg = event.message
            offsets[msg.tp] = max(msg.offset, offsets.get(msg.tp, -1))
            stamp, out_p, out_off, ids = decode_changelog(msg.value)
            if stamp >= 0:
                self.remember(msg.partition, ids, stamp, (out_p, out_off))
        for tp, offset in offsets.items():
            self.set_persisted_offset(tp, offset)

    def estimated_keys(self) -> int:
        """Identities held for the active partitions (standby copies excluded), as RocksDB estimates."""
        topic = self.table.changelog_topic_name  # type: ignore[attr-defined]
        active = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}
        return sum(cf.property_int_value("rocksdb.estimate-num-keys") or 0
                   for partition, part in self._parts.items() if partition in active
                   for cf in part.buckets.values())


_HEADER = struct.Struct(">qiq")


def encode_changelog(stamp: int, out: tuple[int, int], ids: list[bytes]) -> bytes:
    return _HEADER.pack(stamp, out[0], out[1]) + b"".join(ids)


def decode_changelog(value: bytes | None) -> tuple[int, int, int, list[bytes]]:
    """(stamp, output partition, output offset, identities); stamp -1 for a record we cannot read."""
    if not value or len(value) < _HEADER.size or (len(value) - _HEADER.size) % IDENTITY_SIZE:
        return -1, -1, -1, []
    stamp, out_p, out_off = _HEADER.unpack_from(value)
    return stamp, out_p, out_off, [value[i:i + IDENTITY_SIZE] for i in range(_HEADER.size, len(value),
                                                                             IDENTITY_SIZE)]


class SeenTable(faust.Table):
    """A table whose store is an `IdentityStore`; its changelog expires by time instead of compaction."""

    def __init__(self, app: faust.App, *, window_ms: int, **kwargs: Any) -> None:
        self.window_ms = window_ms
        retention = 3 * window_ms
        kwargs["extra_topic_configs"] = {"cleanup.policy": "delete", "retention.ms": str(retention),
                                         "segment.ms": str(max(window_ms, 60_000))}
        super().__init__(app, **kwargs)

    def _new_store_by_url(self, url: Any) -> IdentityStore:
        return IdentityStore(url, self.app, self, table_name=self.name, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw", loop=self.loop,
                             options=self.options, window_ms=self.window_ms)

    @property
    def store(self) -> IdentityStore:
        return self.data  # type: ignore[return-value]


@dataclass(slots=True)
class _Result:
    partition: int
    offset: int
    fresh: list[bytes]
    stamp: int
    output: asyncio.Future[Any] | None


class DedupStage:
    """One signal's dedup: its table, its agent, its metrics."""

    def __init__(self, app: faust.App, topology: Topology, signal: Signal, config: DedupConfig) -> None:
        self.app, self.topology, self.signal = app, topology, signal
        self.window_ms = max(1, int(config.window.total_seconds() * 1000))
        names, topics = topology.topic_names, topology.topics
        self.source = names.raw(signal)
        self.target = names.deduped(signal)
        self.partitions = topics.resolve(self.source, topics.raw, signal).partitions
        self.metrics = metrics_of(app)
        self.deadletter = DeadLetter(app, topology)
        self.table = SeenTable(app, name=f"seen-{signal}", window_ms=self.window_ms,
                               partitions=self.partitions, key_type=bytes, value_type=bytes,
                               beacon=app.tables.beacon, help=f"{signal} identities seen in the window")
        self._pending: dict[int, set[bytes]] = defaultdict(set)
        self._primed: dict[int, int] = {}
        self._out_partitions = 0
        self._processed: dict[int, int] = {}

    def bind(self) -> None:
        self.app.tables.add(self.table)
        topic = self.app.topic(self.source, key_type=bytes, value_type=bytes, partitions=self.partitions)
        self.app.agent(topic, name=f"dedup-{self.signal}")(self._agent)
        self.guard = OffsetGuard(self.app, self.topology.kafka, [self.source])
        self.metrics.add_sampler(self._sample)

    async def _agent(self, stream: StreamT) -> None:
        stream = stream.noack()
        acks = OrderedAcks(stream, self._delivered, _MAX_IN_FLIGHT)
        async for event in stream.events():
            if await self.guard.admit(event):
                await self._handle(event, acks)

    async def _handle(self, event: EventT, acks: OrderedAcks) -> None:
        msg = event.message
        if self._primed.get(msg.partition) != msg.generation_id:
            await self._prime(msg.partition)
            self._primed[msg.partition] = msg.generation_id
        labels = self.metrics.stage, self.signal.value
        self.metrics.records_in.labels(*labels).inc()
        headers = list(msg.headers or ())
        try:
            record = identify_record(self.signal, msg.value or b"")
            items, request = record.items, record.request
            # Spans read on the wire were checked there (the hot path); decoded spans are checked inline
            # by identify; logs and metrics cost more to identify than to validate, so they always are.
            if request is not None and (items.suspect or self.signal is not Signal.TRACES):
                problems = validate_request(self.signal, request, max_problems=3)
                if problems:
                    raise OtlpDecodeError(f"invalid OTLP {self.signal.item_name}: {'; '.join(problems)}")
        except OtlpDecodeError as exc:
            future = await self.deadletter.submit(msg.value or b"", msg.key, str(exc), msg.topic,
                                                  msg.partition, msg.offset, headers, kind="invalid_otlp")
            await acks.submit(event, [future])
            return
        stamp = min(int(msg.timestamp * 1000), _now_ms()) if msg.timestamp else _now_ms()
        seen = self.table.store.lookup(msg.partition, items.ids, stamp)
        pending = self._pending[msg.partition]
        if not pending.isdisjoint(items.ids):
            seen = [hit or identity in pending for hit, identity in zip(seen, items.ids, strict=True)]
        keep, fresh = decide(items.ids, seen)
        self.metrics.items_in.labels(*labels).inc(len(keep))
        self.metrics.duplicates.labels(*labels).inc(len(keep) - len(fresh))
        output = None
        if fresh:
            value = record.output(self.signal, keep)
            producer = await self.app.maybe_start_producer()
            output = await producer.send(self.target, msg.key, value,
                                         partition=msg.partition % self._out_partitions,
                                         timestamp=msg.timestamp, headers=headers)
            pending.update(fresh)
        result = _Result(msg.partition, msg.offset, fresh, stamp, output)
        await acks.submit(event, [output] if output is not None else [], result)

    async def _delivered(self, group: list[Pending]) -> None:
        """Outputs acknowledged: identities to RocksDB and the changelog, which must succeed before acks."""
        labels = self.metrics.stage, self.signal.value
        changelog = []
        for pending in group:
            self._processed[pending.event.message.partition] = pending.event.message.offset
            result = pending.payload
            if not isinstance(result, _Result) or not result.fresh:
                continue
            meta = result.output.result() if result.output is not None else None
            out = (meta.partition, meta.offset) if meta is not None else (-1, -1)
            self.table.store.remember(result.partition, result.fresh, result.stamp, out)
            self._pending[result.partition].difference_update(result.fresh)
            self.metrics.items_out.labels(*labels).inc(len(result.fresh))
            self.metrics.records_out.labels(*labels).inc()
            value = encode_changelog(result.stamp, out, result.fresh)
            changelog.append(self.table.send_changelog(result.partition, b"%d" % result.offset, value))
        await asyncio.gather(*changelog)

    async def _prime(self, partition: int) -> None:
        """Before a partition's first record: remember identities of outputs the changelog does not cover."""
        consumer = AIOKafkaConsumer(**aiokafka_options(self.topology.kafka), enable_auto_commit=False,
                                    group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            if not self._out_partitions:
                self._out_partitions = await self._check_topics()
            tp = TopicPartition(self.target, partition % self._out_partitions)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            out_p, out_off = self.table.store.last_output(partition)
            start = out_off + 1 if out_p == tp.partition and out_off >= 0 else None
            by_time = (await consumer.offsets_for_times({tp: _now_ms() - self.window_ms}))[tp]
            floor = by_time.offset if by_time is not None else end
            start = floor if start is None else max(start, floor)
            if start >= end:
                return
            consumer.seek(tp, start)
            ids: list[bytes] = []
            while await consumer.position(tp) < end:
                for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if record.offset < end:
                        ids.extend(identify_record(self.signal, record.value).items.ids)
            stamp, covered = _now_ms(), (tp.partition, end - 1)
            self.table.store.remember(partition, ids, stamp, covered)
            await self.table.send_changelog(partition, b"prime", encode_changelog(stamp, covered, ids))
            log.info("%s[%d]: %d identities from %d output records past the changelog", self.source,
                     partition, len(ids), end - start)
        finally:
            await consumer.stop()

    async def _check_topics(self) -> int:
        """The output partition count; the input must have the table's count (the changelog's)."""
        admin = AIOKafkaAdminClient(**aiokafka_options(self.topology.kafka))
        await admin.start()
        try:
            found = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([self.source,
                                                                                          self.target])}
        finally:
            await admin.close()
        if found.get(self.source) != self.partitions or not found.get(self.target):
            fatal(f"{self.source} has {found.get(self.source, 0)} partitions and {self.target} "
                  f"{found.get(self.target, 0)} in Kafka, but the topology plans {self.partitions} for "
                  f"{self.source} (run `kotel topology apply`, and keep partition counts unchanged)")
        return found[self.target]

    def _sample(self) -> None:
        keys = self.table.store.estimated_keys()
        self.metrics.table_keys.labels(self.metrics.stage, self.table.name).set(keys)
        consumer = self.app.consumer
        for tp in consumer.assignment():
            if tp.topic != self.source or tp.partition not in self._processed:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - self._processed[tp.partition] - 1)
                self.metrics.consumer_lag.labels(self.metrics.stage, tp.topic, str(tp.partition)).set(lag)


def bind(app: faust.App, topology: Topology) -> None:
    """Register a dedup agent and table for each signal in ``gateway.dedup.signals``."""
    config = topology.gateway.dedup if topology.gateway is not None else DedupConfig()
    for signal in config.signals:
        DedupStage(app, topology, Signal(signal), config).bind()
