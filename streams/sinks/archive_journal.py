"""Which records the Parquet archive already holds, so a record delivered again is written once.

Offsets are committed after the files are durable, so a crash, a failed commit (the broker away) or a
rebalance in between hands the same records over again. Each batch's files are first written under
temporary names, then listed in an append-only journal (``<root>/.journal/offsets.tsv``: topic,
partition, first and last offset, file), then renamed into place. When a partition's records stop
following on from the last one delivered (a restart, a rebalance, a retry), the sink reads the journal
entries of that partition from that offset on, keeps those whose file exists, reads their offsets and
skips what they hold. A crash between journal and rename leaves an entry without a file (ignored: the
records are written again); one after the rename leaves whole files that are skipped: the skip is exact.
The journal is shared by every sink process writing the root (appends of whole lines) and rotates at
``MAX_JOURNAL_BYTES``, keeping one previous file: re-delivery reaches back only to the last commit.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from streams.sinks.runtime import SinkRecord

MAX_JOURNAL_BYTES = 64 * 1024 * 1024
TP = tuple[str, int]


class Journal:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / ".journal" / "offsets.tsv"
        self._folder_made = False  # a mkdir per batch waits behind the disk's journal commits

    def append(self, entries: Iterable[tuple[str, int, int, int, Path]]) -> None:
        """One line per (file, topic partition) of a batch, fsynced before the files are renamed."""
        text = "".join(f"{topic}\t{partition}\t{first}\t{last}\t{path.relative_to(self.root)}\n"
                       for topic, partition, first, last, path in entries)
        if not text:
            return
        if not self._folder_made:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._folder_made = True
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except FileNotFoundError:  # the folder was removed: made again on the retry
            self._folder_made = False
            raise
        if self.path.stat().st_size > MAX_JOURNAL_BYTES:
            os.replace(self.path, self.path.with_suffix(".tsv.1"))

    def files(self, wanted: dict[TP, int]) -> dict[TP, list[Path]]:
        """Existing files holding records of each wanted partition at or after its offset."""
        found: dict[TP, list[Path]] = defaultdict(list)
        for path in (self.path.with_suffix(".tsv.1"), self.path):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                parts = line.split("\t")
                if len(parts) != 5:
                    continue  # a line torn by a crash mid-append
                topic, partition, _, last, rel = parts
                tp = (topic, int(partition))
                if tp in wanted and int(last) >= wanted[tp] and (self.root / rel).exists():
                    found[tp].append(self.root / rel)
        return found


class ArchivedOffsets:
    """Tells, per record of a batch, whether the archive already holds it."""

    def __init__(self, root: Path) -> None:
        self.journal = Journal(root)
        self._next: dict[TP, int] = {}
        self._held: dict[TP, set[int]] = {}

    def fresh(self, records: Sequence[SinkRecord]) -> list[bool]:
        """False for records already archived; reads the journal only where a partition jumped."""
        refresh: dict[TP, int] = {}
        expected = dict(self._next)
        for record in records:
            tp = (record.topic, record.partition)
            if expected.get(tp) != record.offset and tp not in refresh:
                refresh[tp] = record.offset
            expected[tp] = record.offset + 1
        if refresh:
            files = self.journal.files(refresh)
            for tp, offset in refresh.items():
                self._held[tp] = _offsets_in(files.get(tp, []), tp, offset)
        self._next.update(expected)
        out = []
        for record in records:
            held = self._held.get((record.topic, record.partition))
            out.append(not held or record.offset not in held)
        return out


def _offsets_in(paths: list[Path], tp: TP, offset: int) -> set[int]:
    held: set[int] = set()
    for path in paths:
        table = pq.read_table(path, columns=["topic", "partition", "offset"])
        mask = pc.and_(pc.and_(pc.equal(table["topic"], tp[0]), pc.equal(table["partition"], tp[1])),
                       pc.greater_equal(table["offset"], offset))
        held.update(table.filter(mask)["offset"].to_pylist())
    return held
