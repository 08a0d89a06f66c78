"""Read back what each stage wrote: every topic of the run and the Parquet archive, item by item.

An observation is, for one stage and signal, the identity of every item found, the time it became
durable there (the record's LogAppendTime, or for the archive the time in the file's name, taken just
before its fsync), and where relevant the tenant it was filed under. The accounting joins these with
the ledger.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kotel.kafka.topics import TopicNames
from kotel.otlp import Signal
from loadtest.generator.identity import ids_of_values

_PART = re.compile(r"part-(\d+)-")


@dataclass
class Observation:
    stage: str
    signal: str
    ids: np.ndarray  # identities (span/log sequence numbers, metric keys)
    ts_ns: np.ndarray  # when each became durable at this stage
    tenant: np.ndarray | None = None  # index into the ledger's tenants, -1 when not one of them

    @classmethod
    def empty(cls, stage: str, signal: str) -> Observation:
        return cls(stage, signal, np.zeros(0, np.int64), np.zeros(0, np.int64))


def _records(config: dict[str, Any], topic: str, timeout: float = 30.0) -> Iterator[tuple[bytes, int, dict]]:
    """(value, timestamp ms, headers) of every record now in ``topic``, from the beginning."""
    consumer = Consumer({**config, "group.id": f"loadtest-read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            return
        ends: dict[int, int] = {}
        for partition in info.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
            if high > low:
                ends[partition] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        idle = 0
        while ends and idle < 20:
            batch = consumer.consume(1000, 1.0)
            idle = 0 if batch else idle + 1
            for msg in batch:
                if msg.error():
                    continue
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
                yield msg.value() or b"", msg.timestamp()[1], dict(msg.headers() or ())
    finally:
        consumer.close()


def read_topic(config: dict[str, Any], topic: str, signal: Signal, stage: str, run_tag: int,
               series: int, tenant: int | None = None) -> Observation:
    values, stamps = [], []
    for value, ts_ms, _headers in _records(config, topic):
        values.append(value)
        stamps.append(ts_ms)
    ids, owner = ids_of_values(signal, values, run_tag, series)
    ts = np.asarray(stamps, dtype=np.int64)[owner] * 1_000_000 if len(owner) else np.zeros(0, np.int64)
    tenants = np.full(len(ids), -1 if tenant is None else tenant, dtype=np.int64)
    return Observation(stage, signal.value, ids, ts, tenants)


def read_deadletter(config: dict[str, Any], names: TopicNames, run_tag: int, series: int
                    ) -> dict[str, Observation]:
    """Dead-lettered items per signal (the signal from the header, else the original topic's name)."""
    by_signal: dict[str, tuple[list[bytes], list[int]]] = {s.value: ([], []) for s in Signal}
    for value, ts_ms, headers in _records(config, names.deadletter):
        signal = headers.get("kotel.signal", b"").decode(errors="replace")
        if signal not in by_signal:
            origin = next((v.decode(errors="replace") for k, v in headers.items() if k.endswith("topic")), "")
            signal = origin.rsplit(".", 1)[-1]
        if signal in by_signal:
            by_signal[signal][0].append(value)
            by_signal[signal][1].append(ts_ms)
    out = {}
    for signal, (values, stamps) in by_signal.items():
        ids, owner = ids_of_values(Signal(signal), values, run_tag, series)
        ts = np.asarray(stamps, dtype=np.int64)[owner] * 1_000_000 if len(owner) else np.zeros(0, np.int64)
        out[signal] = Observation("deadletter", signal, ids, ts)
    return out


def read_routed(config: dict[str, Any], names: TopicNames, tenants: list[str], signal: Signal,
                run_tag: int, series: int) -> Observation:
    """Every tenant topic of ``signal`` plus its unrouted topic; ``tenant`` says which topic held it."""
    parts = []
    unknown = len(tenants) - 1
    for index, tenant in enumerate(tenants[:-1]):
        topic = names.tenant(tenant, signal.value)
        parts.append(read_topic(config, topic, signal, "routing", run_tag, series, index))
    topic = names.unrouted(signal.value)
    parts.append(read_topic(config, topic, signal, "routing", run_tag, series, unknown))
    return concat("routing", signal.value, parts)


def read_archive(root: Path, tenants: list[str], signal: Signal, run_tag: int, series: int) -> Observation:
    """Items in the archive, timed by their file: when it was renamed into place (its inode's change time),
    after the file and the journal were fsynced; the time in its name is taken before it is written."""
    ids_all, ts_all, tenant_all = [], [], []
    for path in sorted(root.glob(f"tenant=*/signal={signal.value}/date=*/part-*.parquet")):
        match = _PART.match(path.name)
        if match is None:
            continue
        tenant = path.parts[-4].removeprefix("tenant=")
        values = pq.read_table(path, columns=["value"]).column("value").to_pylist()
        ids, _ = ids_of_values(signal, values, run_tag, series)
        ids_all.append(ids)
        ts_all.append(np.full(len(ids), max(int(match.group(1)), path.stat().st_ctime_ns), dtype=np.int64))
        tenant_all.append(np.full(len(ids), tenants.index(tenant) if tenant in tenants else -1, np.int64))
    if not ids_all:
        return Observation.empty("sink", signal.value)
    return Observation("sink", signal.value, np.concatenate(ids_all), np.concatenate(ts_all),
                       np.concatenate(tenant_all))


def concat(stage: str, signal: str, parts: list[Observation]) -> Observation:
    parts = [p for p in parts if len(p.ids)]
    if not parts:
        return Observation.empty(stage, signal)
    tenants = [p.tenant if p.tenant is not None else np.full(len(p.ids), -1, np.int64) for p in parts]
    return Observation(stage, signal, np.concatenate([p.ids for p in parts]),
                       np.concatenate([p.ts_ns for p in parts]), np.concatenate(tenants))


def collect(config: dict[str, Any], prefix: str, archive: Path, tenants: list[str], run_tag: int,
            series: int, tail_sampling: bool) -> dict[str, dict[str, Observation]]:
    """signal -> stage -> observation, for agent (raw), dedup, tail, routing, sink and deadletter."""
    names = TopicNames(prefix)
    dead = read_deadletter(config, names, run_tag, series)
    out: dict[str, dict[str, Observation]] = {}
    for signal in Signal:
        stages = {
            "agent": read_topic(config, names.raw(signal.value), signal, "agent", run_tag, series),
            "dedup": read_topic(config, names.deduped(signal.value), signal, "dedup", run_tag, series),
        }
        if signal is Signal.TRACES and tail_sampling:
            stages["tail"] = read_topic(config, names.sampled_traces, signal, "tail", run_tag, series)
        stages["routing"] = read_routed(config, names, tenants, signal, run_tag, series)
        stages["sink"] = read_archive(archive, tenants, signal, run_tag, series)
        stages["deadletter"] = dead[signal.value]
        out[signal.value] = stages
    return out
