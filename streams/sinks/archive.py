"""The Parquet archive sink: any signal, partitioned by tenant / signal / date, readable with pyarrow.

Each delivered batch becomes closed, fsynced Parquet files (written under a temporary name, then
renamed), so "accepted" means durable and a crash can never leave a half-written file behind that a
committed offset points past. Rows keep the OTLP request bytes whole, so the archive can be replayed
into a topic losslessly (``kotel replay``), plus the columns needed to find things without decoding.

A record delivered again (after a restart, a rebalance or a failed commit) is skipped when the archive
already holds it (`streams.sinks.archive_journal`), so the archive holds each record once: replay and
the load test's accounting rely on that.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter

from kotel.otlp import Signal, count_items, decode_protobuf
from kotel.topology.exporters import FileExporterConfig
from streams.sinks.archive_journal import ArchivedOffsets
from streams.sinks.runtime import OK, Outcome, Result, SinkRecord

SCHEMA = pa.schema([
    ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()), ("key", pa.binary()),
    ("timestamp", pa.timestamp("ms", tz="UTC")), ("items", pa.int32()),
    ("headers", pa.map_(pa.string(), pa.binary())), ("value", pa.binary()),
])


# Files of a batch written and fsynced at once (see ParquetArchive._write).
_IO_THREADS = 8


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in value) or "_"


class ParquetArchive:
    signals = ("traces", "metrics", "logs")

    def __init__(self, name: str, config: FileExporterConfig) -> None:
        self.name = name
        self.root = Path(config.path)
        self.max_bytes = config.rotation.max_megabytes * 1024 * 1024
        self.max_days = config.rotation.max_days
        self.linger = config.flush_interval.total_seconds()  # the Collector file exporter's flush cadence
        self._last_prune = 0.0
        # Folders made already: a mkdir per file per batch waited behind the disk's journal commits. A
        # folder removed behind the sink's back fails the write, which empties this and is retried.
        self._folders: set[Path] = set()
        self.archived = ArchivedOffsets(self.root)
        self._io = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="archive-io")
        self.register_metrics(CollectorRegistry())

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.skipped = Counter("kotel_sink_archive_skipped_records",
                               "Records delivered again (restart, rebalance, failed commit) that the "
                               "archive already held", ["sink"], registry=registry)

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        results = await asyncio.to_thread(self._deliver, records)  # one thread hop: each costs on a busy host
        if self.max_days and time.monotonic() - self._last_prune > 3600:
            self._last_prune = time.monotonic()
            await asyncio.to_thread(prune, self.root, self.max_days)
            self._folders.clear()
        return results

    def _deliver(self, records: Sequence[SinkRecord]) -> list[Result]:
        fresh = self.archived.fresh(records)
        groups: dict[tuple[str, str, date], list[SinkRecord]] = defaultdict(list)
        for record, new in zip(records, fresh, strict=True):
            if new:
                day = datetime.fromtimestamp(max(record.timestamp_ms, 0) / 1000, UTC).date()
                groups[(record.tenant, record.signal, day)].append(record)
        skipped = len(records) - sum(fresh)
        if skipped:
            self.skipped.labels(self.name).inc(skipped)
        if groups:
            try:
                self._write(groups)
            except OSError as exc:  # a full or failing disk: keep the offsets, try again later
                self._folders.clear()
                retry = Result(Outcome.RETRY, f"archive write failed: {exc.strerror or exc}")
                return [retry if new else OK for new in fresh]
        return [OK] * len(records)

    def _write(self, groups: dict[tuple[str, str, date], list[SinkRecord]]) -> None:
        """Temporary files and their journal entries, then the renames (see archive_journal).

        A batch holds a file per tenant, signal and day it touches (a dozen at light load), each fsynced,
        then its folder. One after another, every fsync waited for a commit of the file system's own
        journal (~4 ms each on a busy disk: 40-50 ms a batch); issued together from a pool they share
        those commits. The journal is appended meanwhile: it and the files must both be durable before
        any rename, in either order (an entry whose file never appears is ignored).
        """
        planned: list[Written] = []
        for (tenant, signal, day), rows in groups.items():
            folder = (self.root / f"tenant={_safe(tenant)}" / f"signal={_safe(signal)}"
                      / f"date={day.isoformat()}")
            if folder not in self._folders:
                folder.mkdir(parents=True, exist_ok=True)
                self._folders.add(folder)
            chunk: list[SinkRecord] = []
            size = 0
            for row in rows:  # rotation: no file beyond max_megabytes of payload
                if chunk and size + len(row.value) > self.max_bytes:
                    planned.append((*_names(folder), chunk))
                    chunk, size = [], 0
                chunk.append(row)
                size += len(row.value)
            if chunk:
                planned.append((*_names(folder), chunk))
        writes = [self._io.submit(_write_temporary, tmp, rows) for tmp, _, rows in planned]
        try:
            self.archived.journal.append(_journal_entries(planned))
        finally:
            wait(writes)  # all finished (or failed) before anything is renamed or retried
        for write in writes:
            write.result()
        for tmp, final, _ in planned:
            tmp.rename(final)
        list(self._io.map(_fsync_folder, {final.parent for _, final, _ in planned}))

    async def close(self) -> None:
        self._io.shutdown(wait=True)


def _items(signal: str, value: bytes) -> int:
    try:
        return count_items(decode_protobuf(Signal(signal), value))
    except ValueError:
        return 0


Written = tuple[Path, Path, list[SinkRecord]]  # temporary path, final path, rows


def _names(folder: Path) -> tuple[Path, Path]:
    """A new file's temporary and final path; the load test times files by the ns in the name, taken
    here, just before the file is written."""
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    return folder / f".{name}.tmp", folder / name


def _write_temporary(tmp: Path, rows: list[SinkRecord]) -> None:
    signal = rows[0].signal  # a file holds one tenant, signal and day
    table = pa.table({
        "topic": [r.topic for r in rows], "partition": [r.partition for r in rows],
        "offset": [r.offset for r in rows], "key": [r.key for r in rows],
        "timestamp": [r.timestamp_ms for r in rows], "items": [_items(signal, r.value) for r in rows],
        "headers": [list(r.headers) for r in rows], "value": [r.value for r in rows],
    }, schema=SCHEMA)
    pq.write_table(table, tmp, compression="zstd")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _journal_entries(written: list[Written]) -> list[tuple[str, int, int, int, Path]]:
    entries = []
    for _, final, rows in written:
        ranges: dict[tuple[str, int], list[int]] = {}
        for row in rows:
            span = ranges.setdefault((row.topic, row.partition), [row.offset, row.offset])
            span[0], span[1] = min(span[0], row.offset), max(span[1], row.offset)
        entries += [(topic, part, first, last, final) for (topic, part), (first, last) in ranges.items()]
    return entries


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
    if not dataset.files:  # nothing renamed into place yet (a first batch's journal may be there already)
        return pa.schema([*SCHEMA, ("tenant", pa.string()), ("signal", pa.string()),
                          ("date", pa.string())]).empty_table()
    expression = None
    for column, value in equals.items():
        term = ds.field(column) == value
        expression = term if expression is None else expression & term
    return dataset.to_table(filter=expression)
