"""Parquet sources: an agent spill written by the agent's own Spill, an archive written by the archive sink,
both read back by the replay's pyarrow reader (which may not import agents/), whole or from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.publish.spill import Spill, SpillRecord
from kotel.otlp import samples
from kotel.topology.exporters import FileExporterConfig
from streams.replay.parquet_io import ParquetSource, plan_parquet
from streams.replay.plan import ReplayError
from streams.sinks.archive import ParquetArchive
from streams.sinks.runtime import SinkRecord

TRACES = samples.traces(4).SerializeToString()


def _read_all(source: ParquetSource, batch: int = 3) -> list[tuple[str, int, SinkRecord]]:
    out = []
    while (reads := source.read(batch, 0)) is not None:
        out += [(unit.key, pos, record) for unit, pos, record in reads]
    return out


async def _spill(root: Path, parts: int, rows: int) -> None:
    spill = Spill(FileExporterConfig(path=str(root)))
    spill.open()
    seq = 0
    for _ in range(parts):
        records = []
        for _ in range(rows):
            headers = (
                ("kotel.tenant", b"acme"),
                ("kotel.signal", b"traces"),
                ("kotel.seq", str(seq).encode()),
            )
            records.append(SpillRecord(seq, "traces", "kt.raw.traces", "svc-1", "acme", headers, TRACES))
            seq += 1
        await spill.submit(records)
    await spill.close()


async def test_a_spill_is_read_in_write_order_with_its_topic_and_key(tmp_path: Path) -> None:
    await _spill(tmp_path, parts=3, rows=4)
    kind, units = plan_parquet(tmp_path)
    assert kind == "spill" and [u.span for u in units] == [4, 4, 4]
    reads = _read_all(ParquetSource(tmp_path, kind, units, "kt"))
    assert [r.offset for _, _, r in reads] == list(range(12))  # seq, in order
    first = reads[0][2]
    assert (first.topic, first.key, first.tenant, first.signal, first.value) == (
        "kt.raw.traces", b"svc-1", "acme", "traces", TRACES,
    )  # fmt: skip
    assert dict(first.headers)["kotel.seq"] == b"0" and first.timestamp_ms > 0


async def test_an_archive_is_read_with_its_origin_and_resumes_mid_file(tmp_path: Path) -> None:
    archive = ParquetArchive("file/archive", FileExporterConfig(path=str(tmp_path), format="parquet"))
    rows = [
        SinkRecord("kt.tenant.acme.traces", p, o, b"k", TRACES, (("id", f"{p}-{o}".encode()),), "acme",
                   "traces", 1_717_243_200_000 + o)
        for p in (0, 1) for o in range(5)
    ]  # fmt: skip
    await archive.deliver(rows)
    kind, units = plan_parquet(tmp_path)
    assert kind == "archive" and [u.span for u in units] == [10]  # one tenant, signal and day: one file
    reads = _read_all(ParquetSource(tmp_path, kind, units, "kt"))
    assert sorted((r.partition, r.offset) for _, _, r in reads) == sorted(
        (r.partition, r.offset) for r in rows
    )
    got = reads[0][2]
    assert (got.tenant, got.signal, got.key, got.value) == ("acme", "traces", b"k", TRACES)
    assert got.timestamp_ms >= 1_717_243_200_000

    units[0].next = 2  # as a checkpoint would have it
    again = _read_all(ParquetSource(tmp_path, kind, units, "kt"))
    assert [pos for _key, pos, _ in again] == list(range(2, 10))
    assert [r for _, _, r in again] == [r for _, _, r in reads[2:]]


def test_neither_a_spill_nor_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ReplayError) as err:
        plan_parquet(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} holds neither an agent spill (seg-*/part-*.parquet) nor a Parquet archive "
        "(tenant=*/signal=*/date=*/*.parquet)"
    )
    with pytest.raises(ReplayError) as err:
        plan_parquet(tmp_path / "missing")
    assert str(err.value) == f"{tmp_path / 'missing'} is not a directory"
