"""The Parquet archive's file layout, without a broker."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

from kotel.topology.exporters import FileExporterConfig
from streams.sinks.archive import ParquetArchive, prune, read_archive
from streams.sinks.runtime import OK, SinkRecord


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
