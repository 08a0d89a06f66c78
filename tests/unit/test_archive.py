"""The Parquet archive's file layout, without a broker."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from kotel.topology.exporters import FileExporterConfig
from streams.sinks import archive as archive_module
from streams.sinks.archive import ParquetArchive, prune, read_archive
from streams.sinks.runtime import OK, Outcome, SinkRecord


def test_archive_rotation_splits_files_by_size(tmp_path: Path) -> None:
    archive = ParquetArchive("a", FileExporterConfig(path=str(tmp_path), rotation={"max_megabytes": 1}))
    value = b"x" * 400_000
    records = [
        SinkRecord("t", 0, i, b"k", value, (), "tenant-a", "logs", 1_700_000_000_000) for i in range(5)
    ]
    results = asyncio.run(archive.deliver(records))
    assert results == [OK] * 5
    files = list(tmp_path.glob("tenant=tenant-a/signal=logs/date=2023-11-14/*.parquet"))
    assert len(files) == 3  # 2 + 2 + 1 records of 400 kB under a 1 MiB cap
    assert read_archive(tmp_path).num_rows == 5


def test_prune_removes_date_partitions_older_than_max_days(tmp_path: Path) -> None:
    for day in ("2026-11-01", "2026-11-20", "2026-11-26"):
        (tmp_path / "tenant=a" / "signal=logs" / f"date={day}").mkdir(parents=True)
    removed = prune(tmp_path, max_days=7, today=date(2026, 11, 26))
    assert [p.name for p in removed] == ["date=2026-11-01"]
    assert sorted(p.name for p in tmp_path.glob("tenant=a/signal=logs/*")) == [
        "date=2026-11-20",
        "date=2026-11-26",
    ]


def test_sink_aliases_resolve_to_the_one_exporter_of_their_type() -> None:
    import pytest

    from kotel.topology import load_topology
    from streams.sinks.factory import SinkConfigError, build_deliverer, resolve_name

    root = Path(__file__).resolve().parents[2]
    compose = load_topology(root / "topologies" / "compose.yaml")
    assert resolve_name(compose, "tempo") == "otlp/tempo"
    assert resolve_name(compose, "prometheus") == "prometheusremotewrite"
    assert resolve_name(compose, "archive") == "file/archive"
    gateway = load_topology(root / "topologies" / "seed-gateway.yaml")
    with pytest.raises(
        SinkConfigError, match=r"sink 'tempo' is ambiguous: name one of otlp/tenant-a, otlp/tenant-b"
    ):
        resolve_name(gateway, "tempo")
    with pytest.raises(SinkConfigError) as info:
        build_deliverer(gateway, "loki")
    assert str(info.value) == (
        "sink 'loki': no exporter of type loki in the gateway section (defined: otlp/tenant-a, otlp/tenant-b)"
    )


def _records(topic: str, partition: int, offsets: range, tenant: str = "tenant-a") -> list[SinkRecord]:
    return [SinkRecord(topic, partition, o, b"k", b"v%d" % o, (), tenant, "logs", 1_700_000_000_000)
            for o in offsets]


def _archived(root: Path) -> list[tuple[str, int, int]]:
    table = read_archive(root)
    return sorted(zip(table.column("topic").to_pylist(), table.column("partition").to_pylist(),
                      table.column("offset").to_pylist(), strict=True))


def test_records_delivered_again_after_a_restart_are_archived_once(tmp_path: Path) -> None:
    config = FileExporterConfig(path=str(tmp_path))
    first = ParquetArchive("a", config)
    assert asyncio.run(first.deliver(_records("t.logs", 0, range(0, 10)))) == [OK] * 10
    # the commit of 0-9 failed; a new worker (or the same after a rebalance) gets 5-14 again
    second = ParquetArchive("a", config)
    assert asyncio.run(second.deliver(_records("t.logs", 0, range(5, 15)))) == [OK] * 10
    assert _archived(tmp_path) == [("t.logs", 0, o) for o in range(15)]
    assert second.skipped.labels("a")._value.get() == 5
    # the same worker seeking back also finds what it wrote itself
    asyncio.run(second.deliver(_records("t.logs", 0, range(12, 16))))
    assert _archived(tmp_path) == [("t.logs", 0, o) for o in range(16)]


def test_a_partly_written_batch_is_completed_not_repeated(tmp_path: Path) -> None:
    config = FileExporterConfig(path=str(tmp_path))
    # a crash after partition 0's file and before partition 1's (and before the commit)
    asyncio.run(ParquetArchive("a", config).deliver(_records("t.logs", 0, range(3))))
    again = _records("t.logs", 0, range(3)) + _records("t.logs", 1, range(3))
    assert asyncio.run(ParquetArchive("a", config).deliver(again)) == [OK] * 6
    assert _archived(tmp_path) == [("t.logs", p, o) for p in (0, 1) for o in range(3)]


def test_offsets_of_other_partitions_and_topics_do_not_count(tmp_path: Path) -> None:
    config = FileExporterConfig(path=str(tmp_path))
    archive = ParquetArchive("a", config)
    asyncio.run(archive.deliver(_records("t.logs", 0, range(3)) + _records("u.logs", 2, range(3), "b")))
    fresh = ParquetArchive("a", config)
    asyncio.run(fresh.deliver(_records("t.logs", 1, range(3)) + _records("t.logsx", 2, range(3))))
    assert len(_archived(tmp_path)) == 12
    assert fresh.skipped.labels("a")._value.get() == 0


def test_a_crash_between_journal_and_rename_writes_the_records_again(tmp_path: Path) -> None:
    config = FileExporterConfig(path=str(tmp_path))
    asyncio.run(ParquetArchive("a", config).deliver(_records("t.logs", 0, range(4))))
    for final in tmp_path.glob("tenant=*/signal=*/date=*/part-*.parquet"):
        final.rename(final.with_name(f".{final.name}.tmp"))  # as if the rename never happened
    assert read_archive(tmp_path).num_rows == 0
    again = ParquetArchive("a", config)
    assert asyncio.run(again.deliver(_records("t.logs", 0, range(4)))) == [OK] * 4
    assert _archived(tmp_path) == [("t.logs", 0, o) for o in range(4)]
    assert again.skipped.labels("a")._value.get() == 0


def test_files_are_per_tenant_signal_and_day_not_per_partition(tmp_path: Path) -> None:
    archive = ParquetArchive("a", FileExporterConfig(path=str(tmp_path)))
    asyncio.run(archive.deliver(_records("t.logs", 0, range(3)) + _records("t.logs", 1, range(3))))
    assert len(list(tmp_path.glob("tenant=*/signal=*/date=*/part-*.parquet"))) == 1
    journal = (tmp_path / ".journal" / "offsets.tsv").read_text().splitlines()
    assert [line.split("\t")[:4] for line in journal] == [["t.logs", "0", "0", "2"],
                                                         ["t.logs", "1", "0", "2"]]


def test_an_archive_with_no_file_in_place_yet_reads_as_empty(tmp_path: Path) -> None:
    (tmp_path / ".journal").mkdir()
    (tmp_path / ".journal" / "offsets.tsv").write_text("t\t0\t0\t0\tx.parquet\n")
    folder = tmp_path / "tenant=a" / "signal=logs" / "date=2026-11-26"
    folder.mkdir(parents=True)
    (folder / ".part-1.parquet.tmp").write_bytes(b"PAR1 half written")
    table = read_archive(tmp_path, tenant="a")
    assert table.num_rows == 0 and {"tenant", "signal", "value", "offset"} <= set(table.column_names)


def _slow_fsync(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = os.fsync

    def slow(fd: int) -> None:
        time.sleep(seconds)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow)


def test_a_batchs_files_are_fsynced_together_not_one_after_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_fsync(monkeypatch, 0.1)
    archive = ParquetArchive("a", FileExporterConfig(path=str(tmp_path)))
    records = [r for i, t in enumerate("abcdef") for r in _records(f"t{t}.logs", i, range(2), f"tenant-{t}")]
    started = time.perf_counter()
    assert asyncio.run(archive.deliver(records)) == [OK] * 12
    elapsed = time.perf_counter() - started
    # 6 files, the journal, 6 folders: 1.3 s of fsyncs one after another; about 0.2 s side by side
    assert elapsed < 0.8, f"{elapsed:.2f} s"
    assert len(_archived(tmp_path)) == 12
    asyncio.run(archive.close())


def test_a_failed_file_leaves_the_whole_batch_unarchived_and_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = archive_module.pq.write_table

    def failing(table: Any, where: Path, **kwargs: Any) -> None:
        if "tenant=tenant-b" in str(where):
            raise OSError(28, "No space left on device")
        real(table, where, **kwargs)

    monkeypatch.setattr(archive_module.pq, "write_table", failing)
    archive = ParquetArchive("a", FileExporterConfig(path=str(tmp_path)))
    records = _records("t.logs", 0, range(2)) + _records("u.logs", 0, range(2), "tenant-b")
    results = asyncio.run(archive.deliver(records))
    assert [r.outcome for r in results] == [Outcome.RETRY] * 4
    assert results[0].reason == "archive write failed: No space left on device"
    assert read_archive(tmp_path).num_rows == 0  # tenant-a's file was written, but never renamed into place
    monkeypatch.setattr(archive_module.pq, "write_table", real)
    assert asyncio.run(archive.deliver(records)) == [OK] * 4
    assert len(_archived(tmp_path)) == 4


def test_folders_are_made_once_and_again_when_removed_behind_the_sinks_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    made: list[Path] = []
    real = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    archive = ParquetArchive("a", FileExporterConfig(path=str(tmp_path)))
    assert asyncio.run(archive.deliver(_records("t.logs", 0, range(0, 2)))) == [OK] * 2
    after_first = len(made)
    for first in (2, 4):
        assert asyncio.run(archive.deliver(_records("t.logs", 0, range(first, first + 2)))) == [OK] * 2
    assert after_first > 0 and len(made) == after_first
    shutil.rmtree(tmp_path / "tenant=tenant-a")
    shutil.rmtree(tmp_path / ".journal")
    results = asyncio.run(archive.deliver(_records("t.logs", 0, range(6, 8))))
    assert [r.outcome for r in results] == [Outcome.RETRY] * 2
    assert results[0].reason.startswith("archive write failed: ")
    assert asyncio.run(archive.deliver(_records("t.logs", 0, range(6, 8)))) == [OK] * 2
    assert _archived(tmp_path) == [("t.logs", 0, o) for o in range(6, 8)]
    asyncio.run(archive.close())
