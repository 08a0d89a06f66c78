"""Parquet sources: the agent's spill directory and the archive sink's tree, read with pyarrow directly.

streams/ never imports agents/, so the spill's layout (``seg-*/part-*.parquet``, columns seq, signal,
topic, key, tenant, headers, value, spilled_at) is read by its column names. Each file is a unit whose
positions are row numbers; files are taken in name order, which for the spill is write order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from streams.replay.kafka_io import Read
from streams.replay.plan import Unit
from streams.replay.records import make_record
from streams.replay.timespec import ReplayError
from streams.sinks.runtime import SinkRecord

Kind = Literal["spill", "archive"]
_SPILL_GLOB = "seg-*/part-*.parquet"
_ARCHIVE_GLOB = "tenant=*/signal=*/date=*/*.parquet"
_SPILL_COLUMNS = ["seq", "signal", "topic", "key", "tenant", "headers", "value", "spilled_at"]
_ARCHIVE_COLUMNS = ["topic", "partition", "offset", "key", "timestamp", "headers", "value"]


def plan_parquet(root: Path) -> tuple[Kind, list[Unit]]:
    """The files of a spill or archive under ``root`` as units; ReplayError when it is neither or empty."""
    if not root.is_dir():
        raise ReplayError(f"{root} is not a directory")
    kind: Kind
    files = sorted(p for p in root.glob(_SPILL_GLOB) if not p.name.startswith("."))
    kind = "spill"
    if not files:
        files = sorted(p for p in root.glob(_ARCHIVE_GLOB) if not p.name.startswith("."))
        kind = "archive"
    if not files:
        raise ReplayError(
            f"{root} holds neither an agent spill ({_SPILL_GLOB}) nor a Parquet archive ({_ARCHIVE_GLOB})"
        )
    units = []
    for i, path in enumerate(files):
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError) as exc:
            raise ReplayError(f"{path} is not a readable Parquet file: {exc}") from None
        units.append(Unit(str(path.relative_to(root)), i, 0, rows))
    if not any(u.span for u in units):
        raise ReplayError(f"no records in {root}")
    return kind, units


def _hive(key: str, name: str) -> str:
    for part in Path(key).parts:
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1]
    return ""


class ParquetSource:
    """Reads each file's rows from the unit's ``next`` on, file after file."""

    def __init__(self, root: Path, kind: Kind, units: Sequence[Unit], prefix: str) -> None:
        self.root, self.kind, self.prefix = root, kind, prefix
        self._units = list(units)
        self._position = {u.key: u.next for u in units}
        self._rows: Iterator[Read] | None = None
        self._current = 0

    def read(self, max_records: int, timeout: float) -> list[Read] | None:
        out: list[Read] = []
        while len(out) < max_records:
            if self._rows is None:
                while self._current < len(self._units) and self._units[self._current].done:
                    self._current += 1
                if self._current >= len(self._units):
                    break
                self._rows = self._file_rows(self._units[self._current], max_records)
            row = next(self._rows, None)
            if row is None:
                unit = self._units[self._current]
                self._position[unit.key] = unit.end
                self._rows, self._current = None, self._current + 1
                continue
            out.append(row)
            self._position[row[0].key] = row[1] + 1
        return out if out or self._current < len(self._units) else None

    def _file_rows(self, unit: Unit, batch: int) -> Iterator[Read]:
        file = pq.ParquetFile(self.root / unit.key)
        columns = _SPILL_COLUMNS if self.kind == "spill" else _ARCHIVE_COLUMNS
        position = 0
        for chunk in file.iter_batches(batch_size=batch, columns=columns):
            if position + chunk.num_rows <= unit.next:
                position += chunk.num_rows
                continue
            for row in chunk.to_pylist():
                if position >= unit.next and position < unit.end:
                    yield unit, position, self._record(unit, position, row)
                position += 1

    def _record(self, unit: Unit, position: int, row: dict[str, Any]) -> SinkRecord:
        headers = tuple(row["headers"] or ())
        if self.kind == "spill":
            stamp: datetime = row["spilled_at"]
            record = make_record(
                row["topic"],
                -1,
                row["seq"],
                row["key"].encode(),
                row["value"],
                headers,
                int(stamp.timestamp() * 1000),
                self.prefix,
            )
            return dataclasses.replace(
                record, tenant=record.tenant or row["tenant"], signal=record.signal or row["signal"]
            )
        stamp = row["timestamp"]
        record = make_record(
            row["topic"],
            row["partition"],
            row["offset"],
            row["key"],
            row["value"],
            headers,
            int(stamp.timestamp() * 1000) if stamp else 0,
            self.prefix,
        )
        return dataclasses.replace(
            record,
            tenant=record.tenant or _hive(unit.key, "tenant"),
            signal=record.signal or _hive(unit.key, "signal"),
        )

    def positions(self) -> dict[str, int]:
        return dict(self._position)

    def close(self) -> None:
        self._rows = None
