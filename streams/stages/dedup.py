"""The dedup stage: ``<prefix>.raw.<signal>`` -> ``<prefix>.deduped.<signal>``, same key, same headers.

Batches. The agent admits records one by one into a buffer (`_Buffer`); a processor takes what Faust
had already fetched for the stream (within 10 ms, at most ``_MAX_BATCH_RECORDS``) and handles it per
partition: one identify pass, one
state lookup, one RocksDB write batch and one changelog record per partition per batch, and one entry
in `OrderedAcks` for the batch's records. Inside a batch identities are deduplicated across records,
each record's items keep their order, and each record still gives at most one output (its key, headers
and timestamp), so per-key order and the output itself are what record-at-a-time processing gave.
Small records (the agent publishes one per service instance every few ms) made the per-record costs
dominate: see loadtest/results/stages.md. State: `streams.stages.dedup_store`.

Exactly once in effect after a crash. For each batch of a partition, in order: the outputs are produced
and acknowledged, then the identities go to RocksDB and to the changelog (acknowledged), then the inputs
are acked (and later committed). A worker taking over a partition therefore finds in the changelog every
identity whose input was committed, and the only outputs it may not know about are those produced after
the last changelogged one: before its first record it reads that tail of the output partition (the
changelog records the output offset) and remembers those identities too, so reprocessed inputs drop them.
Outputs go to partition ``input partition % output partitions`` so that tail is short and per-key order holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.types import EventT, StreamT

from kotel.otlp import OtlpDecodeError, Signal, validate_request
from kotel.topology import Topology
from kotel.topology.processors import DedupConfig
from streams.app import OrderedAcks, Pending, aiokafka_options, fatal, metrics_of
from streams.deadletter import DeadLetter
from streams.offset_guard import OffsetGuard
from streams.stages.dedup_core import Record, decide, identify_record, identify_records
from streams.stages.dedup_store import SeenTable, decode_changelog, encode_changelog

__all__ = ["DedupStage", "SeenTable", "bind", "decode_changelog", "encode_changelog"]

log = logging.getLogger("kotel.dedup")

_MAX_IN_FLIGHT = 4096  # input records handed to OrderedAcks and not yet acked
_MAX_BATCH_RECORDS = 512
_MAX_BATCH_BYTES = 8 * 1024 * 1024
_WITHIN_SECONDS = 0.01  # latency added at low rates; larger batches on a busy host
_EAGER_BYTES = 512 * 1024  # a batch this large is taken at once


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Buffer:
    """Admitted records between the agent and the batch processor.

    Faust hands the agent about one record per event-loop turn, so what is buffered at any instant is a
    record or two: while more records are on their way (``more_coming``: queued for the stream, or past
    the last one in the log), the processor waits for them, up to ``_WITHIN_SECONDS`` after the first
    record or until ``_EAGER_BYTES`` are there (large records gain little from waiting, and waiting
    delays the next fetch). Otherwise it takes the batch at once: at a low rate a record is not held back
    for company that is not coming (that cost every record ~10 ms, loadtest/hop_latency.py). `put` waits
    while the buffer is full, which holds back Faust's fetcher.
    """

    def __init__(self, more_coming: Callable[[EventT], bool] = lambda _: True) -> None:
        self._more_coming = more_coming
        self._last: EventT | None = None
        self.events: list[EventT] = []
        self.bytes = 0
        self.first = 0.0
        self.arrived, self.ready, self.space = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def _is_full(self) -> bool:
        return len(self.events) >= _MAX_BATCH_RECORDS or self.bytes >= _MAX_BATCH_BYTES

    def _worth_it(self) -> bool:
        return self.bytes >= _EAGER_BYTES or self._is_full()

    async def put(self, event: EventT) -> None:
        while self._is_full():
            self.space.clear()
            await self.space.wait()
        if not self.events:
            self.first = time.monotonic()
        self.events.append(event)
        self.bytes += len(event.message.value or b"")
        self._last = event
        self.arrived.set()
        if self._worth_it() or not self._more_coming(event):
            self.ready.set()

    async def take(self) -> list[EventT]:
        while not self.events:
            self.arrived.clear()
            await self.arrived.wait()
        wait = self.first + _WITHIN_SECONDS - time.monotonic()
        if wait > 0 and not self._worth_it() and self._last is not None and self._more_coming(self._last):
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), wait)
        batch, self.events, self.bytes = self.events, [], 0
        self.space.set()
        return batch


@dataclass(slots=True)
class _Result:
    """One partition's part of a batch, for `DedupStage._delivered`."""

    partition: int
    groups: list[tuple[int, list[bytes]]]  # (stream time, new identities) per record with any
    output: asyncio.Future[Any] | None  # the last output's delivery


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
        self.deadletter = DeadLetter.for_app(app, topology)
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
        buffer = _Buffer(self._more_coming(stream))
        handling = [0]
        self.guard.hold_while("agent", lambda: bool(len(acks) or buffer.events or handling[0]))
        processor = asyncio.ensure_future(self._process(buffer, acks, handling))
        try:
            async for event in stream.events():
                if await self.guard.admit(event):  # per record, before it joins a batch
                    await buffer.put(event)
        finally:
            processor.cancel()

    def _more_coming(self, stream: StreamT) -> Callable[[EventT], bool]:
        """Whether records past ``event`` are already on their way: queued in Faust for this stream, or in
        the log beyond it (the partition's high watermark, as of the last fetch)."""
        queue = getattr(stream.channel, "queue", None)
        consumer = self.app.consumer

        def more(event: EventT) -> bool:
            if queue is not None and queue.qsize():
                return True
            highwater = consumer.highwater(event.message.tp)
            return highwater is None or highwater > event.message.offset + 1

        return more

    async def _process(self, buffer: _Buffer, acks: OrderedAcks, handling: list[int]) -> None:
        try:
            while True:
                batch = await buffer.take()
                handling[0] = 1
                await self._handle(batch, acks)
                handling[0] = 0
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            fatal("the dedup stage failed on a batch of records", exc)

    async def _handle(self, batch: list[EventT], acks: OrderedAcks) -> None:
        by_partition: dict[int, list[EventT]] = defaultdict(list)
        for event in batch:
            by_partition[event.message.partition].append(event)
        for partition, events in by_partition.items():
            generation = events[0].message.generation_id
            if self._primed.get(partition) != generation:
                await self._prime(partition)
                self._primed[partition] = generation
            await self._handle_partition(partition, events, acks)

    async def _handle_partition(self, partition: int, events: list[EventT], acks: OrderedAcks) -> None:
        labels = self.metrics.stage, self.signal.value
        self.metrics.records_in.labels(*labels).inc(len(events))
        futures: list[asyncio.Future[Any]] = []
        good: list[tuple[EventT, Record]] = []
        records = identify_records(self.signal, [e.message.value or b"" for e in events])
        for event, record in zip(events, records, strict=True):
            if isinstance(record, Record):
                record = self._validated(record)
            if isinstance(record, Record):
                good.append((event, record))
                continue
            msg = event.message
            futures.append(await self.deadletter.submit(msg.value or b"", msg.key, str(record), msg.topic,
                                                        msg.partition, msg.offset, list(msg.headers or ()),
                                                        kind="invalid_otlp"))
        now = _now_ms()
        stamps = [min(int(e.message.timestamp * 1000), now) if e.message.timestamp else now for e, _ in good]
        ids = [i for _, record in good for i in record.items.ids]
        ends = [len(record.items.ids) for _, record in good]
        for r in range(1, len(ends)):
            ends[r] += ends[r - 1]
        seen = self.table.store.lookup_batch(partition, ids, ends, stamps) if good else []
        pending = self._pending[partition]
        if not pending.isdisjoint(ids):
            seen = [hit or identity in pending for hit, identity in zip(seen, ids, strict=True)]
        keep, fresh = decide(ids, seen)  # across the batch's records too
        self.metrics.items_in.labels(*labels).inc(len(keep))
        self.metrics.duplicates.labels(*labels).inc(len(keep) - len(fresh))
        groups: list[tuple[int, list[bytes]]] = []
        output = None
        start = 0
        producer = await self.app.maybe_start_producer()
        for (event, record), stamp, end in zip(good, stamps, ends, strict=True):
            flags = keep[start:end]
            value = record.output(self.signal, flags)
            if value is not None:
                msg = event.message
                output = await producer.send(self.target, msg.key, value,
                                             partition=partition % self._out_partitions,
                                             timestamp=msg.timestamp, headers=list(msg.headers or ()))
                futures.append(output)
                kept = record.items.ids if all(flags) else list(compress(record.items.ids, flags))
                groups.append((stamp, kept))
            start = end
        pending.update(fresh)
        await acks.submit_many(events, futures, _Result(partition, groups, output))

    def _validated(self, record: Record) -> Record | OtlpDecodeError:
        """Spans read on the wire were checked there (the hot path); decoded spans are checked inline by
        identify; logs and metrics cost more to identify than to validate, so they always are."""
        request = record.request
        if request is not None and (record.items.suspect or self.signal is not Signal.TRACES):
            problems = validate_request(self.signal, request, max_problems=3)
            if problems:
                return OtlpDecodeError(f"invalid OTLP {self.signal.item_name}: {'; '.join(problems)}")
        return record

    async def _delivered(self, done: list[Pending]) -> list[asyncio.Future[Any]]:
        """Outputs acknowledged: identities to RocksDB now and to the changelog, whose acknowledgements
        `OrderedAcks` awaits before acking, without holding up the batches behind."""
        labels = self.metrics.stage, self.signal.value
        changelog = []
        for pending in done:
            msg = pending.event.message
            self._processed[msg.partition] = msg.offset
            result = pending.payload
            if not isinstance(result, _Result) or not result.groups:
                continue
            meta = result.output.result() if result.output is not None else None
            out = (meta.partition, meta.offset) if meta is not None else (-1, -1)
            self.table.store.remember_groups(result.partition, result.groups, out)
            left = self._pending[result.partition]
            for _, ids in result.groups:
                left.difference_update(ids)
            self.metrics.items_out.labels(*labels).inc(sum(len(ids) for _, ids in result.groups))
            self.metrics.records_out.labels(*labels).inc(len(result.groups))
            value = encode_changelog(out, result.groups)
            changelog.append(self.table.send_changelog(result.partition, b"%d" % msg.offset, value))
        return changelog

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
            await self.table.send_changelog(partition, b"prime", encode_changelog(covered, [(stamp, ids)]))
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
