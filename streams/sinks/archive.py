"""The Parquet archive sink: any signal, partitioned by tenant / signal / date, readable with pyarrow.

Each delivered batch becomes closed, fsynced Parquet files (written under a temporary name, then
renamed), so "accepted" means durable and a crash can never leave a half-written file behind that a
committed offset points past. Rows keep the OTLP request bytes whole, so the archive can be replayed
into a topic losslessly (``kotel replay``), plus the columns needed to find things without decoding.

Re-delivery. Offsets are committed after the files are durable, so a crash, a failed commit (the broker
away) or a rebalance in between hands the same records over again. Each file holds one topic
partition's records and names its offset range, so when a partition's records stop following on from
the last one delivered, the sink reads the offsets already archived from that point on and skips them
(`ArchivedOffsets`): the archive holds each record once, which replay and the load test's accounting
rely on. A batch cut short by a crash leaves whole files only, so the skip is exact.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter

from kotel.otlp import Signal, count_items, decode_protobuf
from kotel.topology.exporters import FileExporterConfig
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

SCHEMA = pa.schema([
    ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()), ("key", pa.binary()),
    ("timestamp", pa.timestamp("ms", tz="UTC")), ("items", pa.int32()),
    ("headers", pa.map_(pa.string(), pa.binary())), ("value", pa.binary()),
])


_NAME = re.compile(r"part-\d+-(?P<topic>.+)-p(?P<partition>\d+)-o(?P<first>\d+)-(?P<last>\d+)\.parquet")


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in value) or "_"


def file_name(topic: str, partition: int, first: int, last: int) -> str:
    """``part-<ns written>-<topic>-p<partition>-o<first>-<last>.parquet`` (the load test times by ns)."""
    return f"part-{time.time_ns()}-{_safe(topic)}-p{partition}-o{first}-{last}.parquet"


class ArchivedOffsets:
    """Which offsets of a topic partition the archive already holds, from ``offset`` on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._next: dict[tuple[str, int], int] = {}
        self._held: dict[tuple[str, int], set[int]] = {}

    def already_archived(self, record: SinkRecord) -> bool:
        tp = (record.topic, record.partition)
        if self._next.get(tp) != record.offset:  # first sight, a restart, a rebalance or a retry
            self._held[tp] = self._scan(record.signal, record.topic, record.partition, record.offset)
        self._next[tp] = record.offset + 1
        held = self._held.get(tp)
        return bool(held) and record.offset in held  # type: ignore[operator]

    def _scan(self, signal: str, topic: str, partition: int, offset: int) -> set[int]:
        held: set[int] = set()
        pattern = f"tenant=*/signal={_safe(signal)}/date=*/part-*-{_safe(topic)}-p{partition}-o*.parquet"
        for path in self.root.glob(pattern):
            match = _NAME.fullmatch(path.name)
            if match is None or int(match["last"]) < offset or match["topic"] != _safe(topic):
                continue
            column = pq.read_table(path, columns=["offset"]).column("offset").to_pylist()
            held.update(o for o in column if o >= offset)
        return held


class ParquetArchive:
    signals = ("traces", "metrics", "logs")

    def __init__(self, name: str, config: FileExporterConfig) -> None:
        self.name = name
        self.root = Path(config.path)
        self.max_bytes = config.rotation.max_megabytes * 1024 * 1024
        self.max_days = config.rotation.max_days
        self.linger = config.flush_interval.total_seconds()  # the Collector file exporter's flush cadence
        self._last_prune = 0.0
        self.archived = ArchivedOffsets(self.root)
        self.register_metrics(CollectorRegistry())

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.skipped = Counter("kotel_sink_archive_skipped_records",
                               "Records delivered again (restart, rebalance, failed commit) that the "
                               "archive already held", ["sink"], registry=registry)

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        groups: dict[tuple[str, str, date, str, int], list[int]] = defaultdict(list)
        fresh = await asyncio.to_thread(lambda: [not self.archived.already_archived(r) for r in records])
        for i, record in enumerate(records):
            if not fresh[i]:
                continue
            day = datetime.fromtimestamp(max(record.timestamp_ms, 0) / 1000, UTC).date()
            groups[(record.tenant, record.signal, day, record.topic, record.partition)].append(i)
        skipped = len(records) - sum(fresh)
        if skipped:
            self.skipped.labels(self.name).inc(skipped)
        results: list[Result] = [OK] * len(records)
        for (tenant, signal, day, _, _), indexes in groups.items():
            rows = [records[i] for i in indexes]
            try:
                await asyncio.to_thread(self._write, tenant, signal, day, rows)
            except OSError as exc:  # a full or failing disk: keep the offsets, try again later
                for i in indexes:
                    results[i] = Result(Outcome.RETRY, f"archive write failed: {exc.strerror or exc}")
        if self.max_days and time.monotonic() - self._last_prune > 3600:
            self._last_prune = time.monotonic()
            await asyncio.to_thread(prune, self.root, self.max_days)
        return results

    def _write(self, tenant: str, signal: str, day: date, rows: list[SinkRecord]) -> None:
        folder = self.root / f"tenant={_safe(tenant)}" / f"signal={_safe(signal)}" / f"date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        chunk: list[SinkRecord] = []
        size = 0
        for row in rows:  # rotation: no file beyond max_megabytes of payload
            if chunk and size + len(row.value) > self.max_bytes:
                _write_file(folder, chunk, signal)
                chunk, size = [], 0
            chunk.append(row)
            size += len(row.value)
        if chunk:
            _write_file(folder, chunk, signal)

    async def close(self) -> None:
        return None


def _items(signal: str, value: bytes) -> int:
    try:
        return count_items(decode_protobuf(Signal(signal), value))
    except ValueError:
        return 0


def _write_file(folder: Path, rows: list[SinkRecord], signal: str) -> None:
    offsets = [r.offset for r in rows]
    table = pa.table({
        "topic": [r.topic for r in rows], "partition": [r.partition for r in rows],
        "offset": offsets, "key": [r.key for r in rows],
        "timestamp": [r.timestamp_ms for r in rows], "items": [_items(signal, r.value) for r in rows],
        "headers": [list(r.headers) for r in rows], "value": [r.value for r in rows],
    }, schema=SCHEMA)
    name = file_name(rows[0].topic, rows[0].partition, min(offsets), max(offsets))
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.rename(folder / name)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, max_days: int, today: date | None = None) -> list[Path]:
    """Delete date partitions older than ``max_days`` (the file exporter's rotation.max_days)."""
    cutoff = (today or datetime.now(UTC).date()) - timedelta(days=max_days)
    removed = []
    for folder in root.glob("tenant=*/signal=*/date=*"):
        try:
            day = date.fromisoformat(folder.name.removeprefix("date="))
        except ValueError:
            continue
        if day < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def read_archive(root: str | os.PathLike[str], **equals: str) -> pa.Table:
    """The archive as one table (tenant, signal and date as columns); ``equals`` filters them."""
    dataset = ds.dataset(str(root), format="parquet", partitioning="hive",
                         exclude_invalid_files=True, ignore_prefixes=["."])
    expression = None
    for column, value in equals.items():
        term = ds.field(column) == value
        expression = term if expression is None else expression & term
    return dataset.to_table(filter=expression)
