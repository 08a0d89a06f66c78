"""The dedup stage: ``<prefix>.raw.<signal>`` -> ``<prefix>.deduped.<signal>``, same key, same headers.

Runs on `streams.kafka_stage` (librdkafka in and out): Faust's fetch path, which this stage used before,
cost the hop ~6 ms at p50 of its 13-15 (loadtest/hop_latency.py); routing measured the same. State is
`streams.stages.dedup_store` (RocksDB through rocksdict); recovery `streams.stages.dedup_recovery`.

Batches. Each poll (what librdkafka had fetched, up to 500 records) is handled per partition: one
identify pass, one state lookup, one RocksDB write batch and one changelog record per partition per poll.
Inside a batch identities are deduplicated across records, each record's items keep their order, and each
record still gives at most one output (its key, headers and timestamp), so per-key order and the output
itself are what record-at-a-time processing gave. A poll is not held back waiting for company: at a low
rate each record goes alone, under load polls grow by themselves.

Exactly once in effect after a crash. For each batch of a partition, in order: the outputs are produced
and acknowledged, then the identities go to RocksDB and to the changelog (acknowledged), then the inputs
are done (and later committed). A worker taking over a partition therefore finds in the changelog every
identity whose input was committed, and the only outputs it may not know about are those produced after
the last changelogged one: recovery reads that tail of the output partition too. Outputs go to partition
``input partition % output partitions`` so that tail is short and per-key order holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from itertools import compress
from pathlib import Path
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from kotel.kafka.admin import ensure_topic
from kotel.otlp import OtlpDecodeError, Signal, validate_request
from kotel.topology import Topology
from kotel.topology.processors import DedupConfig
from streams.deadletter import DeadLetter
from streams.kafka_stage import KafkaStage, serve
from streams.stages.dedup_core import Record, decide, identify_records
from streams.stages.dedup_recovery import PartitionReader, Recovery, changelog_spec, now_ms
from streams.stages.dedup_store import SeenStore, changelog_records
from streams.telemetry import WorkerMetrics

log = logging.getLogger("kotel.dedup")

EX_UNAVAILABLE = 69  # sysexits: Kafka out of reach at start (a supervisor such as `kotel up` starts it again)
MAX_IN_FLIGHT = 4096  # input records not yet done (outputs, state and changelog acknowledged)

Entries = list[tuple[Message, Sequence[asyncio.Future[Any]], Any]]


class SignalDedup:
    """One signal's dedup: its partitions' state, its outputs, its changelog."""

    def __init__(self, stage: DedupStage, signal: Signal, config: DedupConfig, data_dir: Path) -> None:
        topology = stage.topology
        self.stage, self.signal = stage, signal
        self.window_ms = max(1, int(config.window.total_seconds() * 1000))
        names, topics = topology.topic_names, topology.topics
        self.source, self.target = names.raw(signal), names.deduped(signal)
        self.partitions = topics.resolve(self.source, topics.raw, signal).partitions
        self.changelog = changelog_spec(topology, signal, self.partitions, self.window_ms)
        self.store = SeenStore(data_dir / f"seen-{signal.value}", window_ms=self.window_ms)
        self.out_partitions = 0  # known once the topics are checked
        self._pending: dict[int, set[bytes]] = defaultdict(set)  # produced, not yet in the state
        self._persisting: dict[int, asyncio.Future[None]] = {}  # per partition, the last batch's
        self._processed: dict[int, int] = {}

    def check_topics(self, admin: AdminClient) -> None:
        """The output's partition count; the input must have the changelog's (the state's) count."""
        found = {name: len(meta.partitions) for name, meta in
                 admin.list_topics(timeout=15).topics.items() if meta.error is None}
        if found.get(self.source) != self.partitions or not found.get(self.target):
            raise ValueError(
                f"{self.source} has {found.get(self.source, 0)} partitions and {self.target} "
                f"{found.get(self.target, 0)} in Kafka, but the topology plans {self.partitions} for "
                f"{self.source} (run `kotel topology apply`, and keep partition counts unchanged)")
        self.out_partitions = found[self.target]
        ensure_topic(admin, self.changelog)

    async def handle(self, partition: int, messages: list[Message]) -> Entries:
        metrics, labels = self.stage.metrics, (self.stage.metrics.stage, self.signal.value)
        metrics.records_in.labels(*labels).inc(len(messages))
        futures: dict[int, asyncio.Future[Any]] = {}  # message index -> its output or dead letter
        good: list[tuple[int, Message, Record]] = []
        records = identify_records(self.signal, [m.value() or b"" for m in messages])
        for index, (msg, record) in enumerate(zip(messages, records, strict=True)):
            if isinstance(record, Record):
                record = self._validated(record)
            if isinstance(record, Record):
                good.append((index, msg, record))
                continue
            futures[index] = await self.stage.deadletter.submit(
                msg.value() or b"", msg.key(), str(record), msg.topic(), partition, msg.offset(),
                list(msg.headers() or ()), kind="invalid_otlp")
        now = now_ms()
        stamps = [_stamp(msg, now) for _, msg, _ in good]
        ids = [i for _, _, record in good for i in record.items.ids]
        ends = [len(record.items.ids) for _, _, record in good]
        for r in range(1, len(ends)):
            ends[r] += ends[r - 1]
        seen = self.store.lookup_batch(partition, ids, ends, stamps) if good else []
        pending = self._pending[partition]
        if not pending.isdisjoint(ids):
            seen = [hit or identity in pending for hit, identity in zip(seen, ids, strict=True)]
        keep, fresh = decide(ids, seen)  # across the batch's records too
        metrics.items_in.labels(*labels).inc(len(keep))
        metrics.duplicates.labels(*labels).inc(len(keep) - len(fresh))
        groups: list[tuple[int, list[bytes]]] = []
        outputs: list[asyncio.Future[Any]] = []
        start = 0
        for (index, msg, record), stamp, end in zip(good, stamps, ends, strict=True):
            flags = keep[start:end]
            value = record.output(self.signal, flags)
            if value is not None:
                futures[index] = output = await self.stage.runtime.produce(
                    self.target, msg.key(), value, list(msg.headers() or ()),
                    partition=partition % self.out_partitions, timestamp=stamp)
                outputs.append(output)
                kept = record.items.ids if all(flags) else list(compress(record.items.ids, flags))
                groups.append((stamp, kept))
            start = end
        pending.update(fresh)
        last = messages[-1].offset()
        persisted = asyncio.ensure_future(self._persist(partition, self._persisting.get(partition), outputs,
                                                        groups, last))
        self._persisting[partition] = persisted
        return [(msg, [f for f in (futures.get(i), persisted) if f is not None], None)
                for i, msg in enumerate(messages)]

    def _validated(self, record: Record) -> Record | OtlpDecodeError:
        """Spans read on the wire were checked there (the hot path); decoded spans are checked inline by
        identify; logs and metrics cost more to identify than to validate, so they always are."""
        request = record.request
        if request is not None and (record.items.suspect or self.signal is not Signal.TRACES):
            problems = validate_request(self.signal, request, max_problems=3)
            if problems:
                return OtlpDecodeError(f"invalid OTLP {self.signal.item_name}: {'; '.join(problems)}")
        return record

    async def _persist(self, partition: int, previous: asyncio.Future[None] | None,
                       outputs: list[asyncio.Future[Any]], groups: list[tuple[int, list[bytes]]],
                       last_input: int) -> None:
        """After the partition's earlier batches and this one's outputs: identities to RocksDB, then to
        the changelog (acknowledged). A failure fails every later batch of the partition too."""
        if previous is not None:
            await previous
        if outputs:
            await asyncio.gather(*outputs)
        self._processed[partition] = last_input
        if not groups:
            return
        meta = outputs[-1].result()
        out = (meta.partition, meta.offset)
        self.store.remember_groups(partition, groups, out)
        self._pending[partition].difference_update(i for _, ids in groups for i in ids)
        metrics, labels = self.stage.metrics, (self.stage.metrics.stage, self.signal.value)
        metrics.items_out.labels(*labels).inc(sum(len(ids) for _, ids in groups))
        metrics.records_out.labels(*labels).inc(len(groups))
        logged = [await self.stage.runtime.produce(self.changelog.name, b"%d" % last_input, value,
                                                   partition=partition)
                  for value in changelog_records(out, groups)]
        self.store.set_changelog_offset(partition, (await asyncio.gather(*logged))[-1].offset)

    def sample(self, assigned: set[tuple[str, int]]) -> None:
        mine = [partition for topic, partition in assigned if topic == self.source]
        metrics = self.stage.metrics
        metrics.table_keys.labels(metrics.stage, f"seen-{self.signal.value}").set(
            self.store.estimated_keys(mine))
        highwater = self.stage.runtime.highwater
        for partition in mine:
            high = highwater.get((self.source, partition))
            if partition in self._processed and high is not None:
                lag = max(0, high - self._processed[partition] - 1)
                metrics.consumer_lag.labels(metrics.stage, self.source, str(partition)).set(lag)


def _stamp(msg: Message, now: int) -> int:
    """Stream time of a record: its timestamp, never past the wall clock."""
    kind, stamp = msg.timestamp()
    return min(stamp, now) if kind != TIMESTAMP_NOT_AVAILABLE and stamp > 0 else now


class DedupStage:
    """One worker's dedup of every signal in ``gateway.dedup.signals``, sharing a consumer and producer."""

    def __init__(self, topology: Topology, metrics: WorkerMetrics, data_dir: Path) -> None:
        self.topology, self.metrics = topology, metrics
        config = topology.gateway.dedup if topology.gateway is not None else DedupConfig()
        self.signals = {s.source: s for s in (SignalDedup(self, Signal(name), config, data_dir)
                                              for name in config.signals)}
        self.runtime = KafkaStage(topology, "dedup", list(self.signals), None, lambda _: None,
                                  max_in_flight=MAX_IN_FLIGHT, handle_batch=self._handle,
                                  prepare=self._prepare)
        self.deadletter = DeadLetter(topology, metrics, self.runtime.produce)
        self._reader: PartitionReader | None = None
        self._recoveries: dict[str, Recovery] = {}
        metrics.add_sampler(self._sample)

    def check_topics(self) -> None:
        """Before joining the group (blocking): topics as planned, changelogs created."""
        admin = AdminClient(self.topology.kafka.librdkafka_config())
        for dedup in self.signals.values():
            dedup.check_topics(admin)

    async def _handle(self, messages: list[Message]) -> Entries:
        by_partition: dict[tuple[str, int], list[Message]] = defaultdict(list)
        for msg in messages:
            by_partition[(msg.topic(), msg.partition())].append(msg)
        entries: Entries = []
        for (topic, partition), group in by_partition.items():
            entries += await self.signals[topic].handle(partition, group)
        return entries

    def _prepare(self, partitions: list[TopicPartition]) -> None:
        """On the consumer's thread, before any record of ``partitions`` is handed over."""
        if self._reader is None:
            config = self.topology.kafka.librdkafka_config()
            self._reader = PartitionReader(config, self.runtime.group)
        for tp in partitions:
            dedup = self.signals.get(tp.topic)
            if dedup is None:
                continue
            recovery = self._recoveries.get(tp.topic)
            if recovery is None:
                recovery = self._recoveries[tp.topic] = Recovery(
                    dedup.signal, dedup.store, self._reader, self.runtime.producer,
                    changelog=dedup.changelog.name, target=dedup.target, out_partitions=dedup.out_partitions)
            recovery.recover(tp.partition)

    def _sample(self) -> None:
        assigned = set(self.runtime.assigned)
        for dedup in self.signals.values():
            dedup.sample(assigned)

    def close(self) -> None:
        for dedup in self.signals.values():
            dedup.store.close()
        if self._reader is not None:
            self._reader.consumer.close()


def run(topology: Topology, data_dir: Path, web_port: int | None) -> int:
    """Entry point of `kotel worker dedup`: deduplicate until SIGTERM; the exit code."""
    stage = DedupStage(topology, WorkerMetrics("dedup"), data_dir)
    try:
        stage.check_topics()
    except KafkaException as exc:  # ValueError (topics not as planned) is the caller's: exit 2
        log.error("cannot check the dedup topics in Kafka: %s", exc)
        stage.close()
        return EX_UNAVAILABLE
    try:
        return asyncio.run(serve(stage.runtime, stage.metrics, data_dir, web_port,
                                 f"consuming {', '.join(stage.signals)}, state in {data_dir}"))
    finally:
        stage.close()
