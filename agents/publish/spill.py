"""The Parquet spill (seed §3.2): where records wait while Kafka cannot take them.

Layout under ``FileExporterConfig.path``::

    seg-00000000000000000003/           a segment: rotated by size and age, names sort in write order
        part-00000000000000000041.parquet   one group commit = one closed Parquet file, one row group

Why small closed files and not one growing Parquet file per segment: a Parquet file is readable only
once its footer is written, so a growing file loses every row group on kill -9; a WAL sidecar would add
a second format to write, recover and keep in step. Here each group commit is written to ``*.tmp``,
fsynced, renamed and the directory fsynced, and only then are the waiting ``publish()`` calls answered:
the rename is the commit point, a part exists whole or not at all, and recovery after a crash is
"delete the ``*.tmp`` files". Every committed part is final, so the replayer may take parts from the
segment still being written; rotation only bounds how much one directory holds.

Group commit: records submitted while a write is in progress wait and go out together in the next part,
so under load the number of fsyncs stays at one per write, not one per request. ``flush_interval`` is
not used as a delay: clients wait for the fsync, and the in-progress write already batches.

Each row keeps ``created_at``, when the agent received the data and the record's Kafka timestamp, so a
replayed record lands at its event time and not at the end of the outage (tail sampling decides on
record times). Parts written before that column replay with ``spilled_at`` in its place.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from agents.contracts import Unavailable
from agents.telemetry import AgentMetrics
from kotel.topology.exporters import FileExporterConfig

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("headers", pa.map_(pa.string(), pa.binary()), nullable=False),
        pa.field("value", pa.binary(), nullable=False),
        pa.field("spilled_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("created_at", pa.timestamp("ms", tz="UTC"), nullable=True),
    ]
)
_SEGMENT, _PART, _SUFFIX = "seg-", "part-", ".parquet"


class SpillInUse(RuntimeError):
    """Another Spill (in this process or another) holds the directory: two writers would corrupt it."""


@dataclass(frozen=True, slots=True)
class SpillRecord:
    """One Kafka record as it will be (re)produced: topic, key, headers, the serialized request and its
    timestamp, ``created_ms`` (epoch ms the agent received the data; 0: librdkafka stamps its own)."""

    seq: int
    signal: str
    topic: str
    key: str
    tenant: str
    headers: tuple[tuple[str, bytes], ...]
    value: bytes
    created_ms: int = 0

    @property
    def size(self) -> int:
        """Bytes this record accounts for against the disk cap (before Parquet's compression)."""
        return len(self.value) + len(self.key) + sum(len(k) + len(v) for k, v in self.headers) + 64


@dataclass(slots=True)
class _Part:
    path: Path
    size: int


@dataclass(slots=True)
class _Segment:
    path: Path
    opened_at: float
    size: int = 0


class Spill:
    """Durable FIFO of :class:`SpillRecord` on local disk, bounded by ``max_disk_mib``.

    Call :meth:`open` once (it recovers what a previous run left), then :meth:`submit` from the event
    loop. A full spill raises :class:`Unavailable` at once: that is the agent's backpressure.
    """

    def __init__(
        self,
        config: FileExporterConfig,
        *,
        metrics: AgentMetrics | None = None,
        retry_after: float = 5.0,
        max_open_seconds: float = 10.0,
        max_part_bytes: int = 16 * MiB,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(config.path)
        self._metrics = metrics
        self._retry_after = retry_after
        self._cap = config.max_disk_mib * MiB
        self._max_segment_bytes = config.rotation.max_megabytes * MiB
        max_days = config.rotation.max_days * 86400.0
        self._max_open = min(max_open_seconds, max_days) if max_days else max_open_seconds
        self._max_part_bytes = max_part_bytes
        self._clock = clock
        self._parts: deque[_Part] = deque()  # committed, oldest first
        self._segments: dict[Path, _Segment] = {}
        self._current: _Segment | None = None  # the segment new parts go to
        self._writing: Path | None = None  # the segment a group commit is being written to
        self._next_segment = 0
        self._next_part = 0
        self._used = 0  # bytes of committed parts
        self._pending: deque[tuple[Sequence[SpillRecord], int, asyncio.Future[None]]] = deque()
        self._pending_bytes = 0
        self._committer: asyncio.Task[None] | None = None
        self._has_parts: asyncio.Event | None = None  # set while committed parts exist
        self._closed = False
        self._lock: IO[bytes] | None = None
        self.max_seq = -1  # the largest seq in the newest part found at open, for the publisher's counter

    # --- lifecycle ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Recover the directory: drop uncommitted ``*.tmp`` files and empty segments, index the rest.

        Blocking (a directory scan); run it in a thread from async code. The directory stays locked
        (flock on ``.lock``) until :meth:`close` or the process ends: SpillInUse for a second opener.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = (self.root / ".lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise SpillInUse(f"the spill directory {self.root} is in use by another publisher; "
                             "each spill directory belongs to one publisher at a time") from None
        self._lock = lock
        for seg_dir in sorted(p for p in self.root.iterdir() if p.name.startswith(_SEGMENT)):
            self._next_segment = max(self._next_segment, int(seg_dir.name[len(_SEGMENT):]) + 1)
            for leftover in seg_dir.glob("*.tmp"):
                leftover.unlink()  # a write that never reached its rename: its callers were not answered
            parts = sorted(p for p in seg_dir.iterdir() if p.name.endswith(_SUFFIX))
            if not parts:
                if not any(seg_dir.iterdir()):  # a segment holding only .corrupt parts stays
                    seg_dir.rmdir()
                continue
            segment = _Segment(seg_dir, opened_at=self._clock())
            self._segments[seg_dir] = segment
            for path in parts:
                size = path.stat().st_size
                self._parts.append(_Part(path, size))
                segment.size += size
                self._used += size
                self._next_part = max(self._next_part, int(path.name[len(_PART):-len(_SUFFIX)]) + 1)
        _fsync_dir(self.root)
        if self._parts:
            try:
                stats = pq.ParquetFile(self._parts[-1].path).metadata.row_group(0).column(0).statistics
                self.max_seq = int(stats.max) if stats is not None and stats.has_min_max else -1
            except (OSError, pa.ArrowException) as exc:  # the replayer will set the part aside
                log.warning("cannot read the newest spill part's footer: %s", exc)
            log.info("spill at %s holds %d parts (%d bytes) from a previous run; they will be replayed",
                     self.root, len(self._parts), self._used)
        self._update_gauges()

    async def close(self) -> None:
        """Refuse new records and wait for the group commit in progress (its callers get answered)."""
        self._closed = True
        if self._committer is not None:
            await asyncio.shield(self._committer)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # --- writing ------------------------------------------------------------------------------------

    def submit(self, records: Sequence[SpillRecord]) -> asyncio.Future[None]:
        """Queue records for the next group commit; the future resolves once they are fsynced.

        Synchronous on purpose: what is submitted first is written first, so a caller can order its
        records against other callers' before it awaits. Raises :class:`Unavailable` when the spill is
        closed or the records would take it beyond ``max_disk_mib``; the future fails with it when the
        write itself fails (disk full, I/O error).
        """
        if self._closed:
            raise Unavailable("the spill is closed (the agent is shutting down)", self._retry_after,
                              reason="shutdown")
        size = sum(r.size for r in records)
        if self._used + self._pending_bytes + size > self._cap:
            raise Unavailable(
                f"Kafka is unreachable and the spill at {self.root} is full "
                f"({self._cap // MiB} MiB, max_disk_mib)", self._retry_after, reason="spill_full")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((records, size, future))
        self._pending_bytes += size
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_loop(), name="kotel-spill-commit")
        return future

    async def _commit_loop(self) -> None:
        while self._pending:
            batch = [self._pending.popleft()]
            size = batch[0][1]
            while self._pending and size + self._pending[0][1] <= self._max_part_bytes:
                batch.append(self._pending.popleft())
                size += batch[-1][1]
            rows = [record for records, _, _ in batch for record in records]
            segment = self._segment_for_write()
            path = segment.path / f"{_PART}{self._next_part:020d}{_SUFFIX}"
            self._next_part += 1
            self._writing = segment.path
            error: Exception | None = None
            try:
                written = await asyncio.to_thread(_write_part, path, rows)
            except Exception as exc:
                log.error("spill write to %s failed: %s", path, exc)
                error = exc
                if isinstance(exc, OSError):
                    error = Unavailable(f"Kafka is unreachable and the spill write failed: {exc}",
                                        self._retry_after, reason="spill_error")
            else:
                self._parts.append(_Part(path, written))
                self._segments.setdefault(segment.path, segment)
                segment.size += written
                self._used += written
                self._count_spilled(rows)
            finally:
                self._writing = None
                self._pending_bytes -= size
            self._update_gauges()
            if error is None:
                self._event().set()
            for _, _, future in batch:
                if future.done():  # the caller gave up (cancelled); its rows are durable all the same
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _segment_for_write(self) -> _Segment:
        current = self._current
        now = self._clock()
        full = current is not None and current.size >= self._max_segment_bytes
        if current is None or full or now - current.opened_at >= self._max_open:
            current = _Segment(self.root / f"{_SEGMENT}{self._next_segment:020d}", opened_at=now)
            self._next_segment += 1
            self._current = current
        return current

    # --- reading (the replayer) ---------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        """Nothing committed, nothing waiting to be: new records may bypass the spill."""
        return not self._parts and not self._pending and (self._committer is None or self._committer.done())

    def first_part(self) -> Path | None:
        """The oldest committed part, or None."""
        return self._parts[0].path if self._parts else None

    async def wait_for_parts(self) -> None:
        """Return once at least one committed part is waiting for replay."""
        await self._event().wait()

    async def read(self, path: Path) -> list[SpillRecord]:
        """A part's records, in the order they were submitted."""
        return await asyncio.to_thread(read_part, path)

    async def remove(self, path: Path, *, corrupt: bool = False) -> None:
        """Delete a part once all its records are in Kafka; must be the oldest (replay is in order).

        ``corrupt`` keeps an unreadable part as ``*.corrupt`` for a human instead of deleting it.
        """
        if not self._parts or self._parts[0].path != path:
            raise ValueError(f"{path} is not the oldest spill part")
        part = self._parts[0]
        segment = self._segments[path.parent]
        # The last part takes its directory along, unless a write into it is under way right now.
        drop_dir = segment.size == part.size and self._writing != segment.path and not corrupt
        if drop_dir and segment is self._current:
            self._current = None  # the next write opens a new segment
        await asyncio.to_thread(_remove_part, path, drop_dir, corrupt)
        # Only now is the part gone: until the file is deleted the spill is not empty, so new data
        # cannot overtake what is still on disk (and a caller that sees it empty sees no file).
        self._parts.popleft()
        segment.size -= part.size
        self._used -= part.size
        if drop_dir:
            del self._segments[path.parent]
        self._update_gauges()
        if not self._parts:
            self._event().clear()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def part_count(self) -> int:
        return len(self._parts)

    # --- helpers ------------------------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._has_parts is None:
            self._has_parts = asyncio.Event()
            if self._parts:
                self._has_parts.set()
        return self._has_parts

    def _count_spilled(self, rows: list[SpillRecord]) -> None:
        if self._metrics is None:
            return
        for row in rows:
            self._metrics.spilled.labels(row.signal).inc()

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.spill_files.set(len(self._parts))
            self._metrics.spill_bytes.set(self._used)


def read_part(path: Path) -> list[SpillRecord]:
    """Blocking read of one part file (also for tools that inspect a spill)."""
    table = pq.read_table(path, schema=SCHEMA)  # a part without created_at reads it as nulls
    spilled_ms = pc.divide(table["spilled_at"].cast(pa.int64()), 1000)
    created = pc.coalesce(table["created_at"].cast(pa.int64()), spilled_ms).to_pylist()
    return [
        SpillRecord(row["seq"], row["signal"], row["topic"], row["key"], row["tenant"],
                    tuple(row["headers"]), row["value"], created_ms)
        for row, created_ms in zip(table.select(SCHEMA.names[:7]).to_pylist(), created, strict=True)
    ]


def _write_part(path: Path, rows: list[SpillRecord]) -> int:
    seg_dir = path.parent
    if not seg_dir.exists():
        seg_dir.mkdir()
        _fsync_dir(seg_dir.parent)
    now = datetime.now(UTC)
    table = pa.table(
        {
            "seq": [r.seq for r in rows],
            "signal": [r.signal for r in rows],
            "topic": [r.topic for r in rows],
            "key": [r.key for r in rows],
            "tenant": [r.tenant for r in rows],
            "headers": [list(r.headers) for r in rows],
            "value": [r.value for r in rows],
            "spilled_at": [now] * len(rows),
            "created_at": [r.created_ms or None for r in rows],
        },
        schema=SCHEMA,
    )
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(seg_dir)
    return path.stat().st_size


def _remove_part(path: Path, drop_dir: bool, corrupt: bool) -> None:
    if corrupt:
        path.rename(path.with_suffix(".corrupt"))
    else:
        path.unlink()
    if drop_dir:
        path.parent.rmdir()
        _fsync_dir(path.parent.parent)
    else:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
