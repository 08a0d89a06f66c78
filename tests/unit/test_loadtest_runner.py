"""The runner's archive poll (no broker): counts items per signal and reads each file once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from kotel.otlp import Signal, samples
from kotel.topology.exporters import FileExporterConfig
from loadtest.collect import read_archive
from loadtest.generator.identity import span_id
from loadtest.runner import ArchiveItems, sigterm_as_interrupt
from streams.sinks.archive import ParquetArchive
from streams.sinks.runtime import SinkRecord


def _deliver(archive: ParquetArchive, signal: str, value: bytes, offsets: range) -> None:
    records = [SinkRecord(f"kt.tenant.a.{signal}", 0, o, b"k", value, (), "a", signal, 1_700_000_000_000)
               for o in offsets]
    asyncio.run(archive.deliver(records))


def test_archive_items_counts_new_files_and_reads_each_once(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    archive = ParquetArchive("file/archive", FileExporterConfig(path=str(tmp_path)))
    spans = samples.traces(3).SerializeToString()
    _deliver(archive, "traces", spans, range(2))
    count = ArchiveItems(tmp_path)
    assert count() == {"traces": 6, "metrics": 0, "logs": 0}
    reads: list[Path] = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, **kw: reads.append(Path(path)) or real(path, **kw))
    _deliver(archive, "traces", spans, range(2, 3))
    assert count() == {"traces": 9, "metrics": 0, "logs": 0}
    assert len(reads) == 1  # only the new file


def test_archive_items_are_timed_when_their_file_is_in_place_not_by_its_name(tmp_path: Path) -> None:
    """The name's time is taken before the write; the report's `sink` step ends at the rename."""
    archive = ParquetArchive("file/archive", FileExporterConfig(path=str(tmp_path)))
    request = samples.traces(3)
    for seq, span in enumerate(s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans):
        span.span_id = span_id(7, seq)  # the load test's identities (run tag 7)
    _deliver(archive, "traces", request.SerializeToString(), range(1))
    (path,) = tmp_path.glob("tenant=*/signal=traces/date=*/part-*.parquet")
    early = path.with_name("part-1-00000000.parquet")  # a name that says 1 ns after the epoch
    path.rename(early)
    found = read_archive(tmp_path, ["a"], Signal.TRACES, run_tag=7, series=1)
    assert len(found.ids) == 3 and set(found.ts_ns.tolist()) == {early.stat().st_ctime_ns}


def test_sigterm_interrupts_a_run_like_ctrl_c_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal 15"), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGTERM) is before


def test_arrivals_on_the_command_line_override_the_scenarios(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loadtest.runner
    from kotel import cli

    seen: list[str] = []

    def fake_run(scenario: Any, results: Path, bootstrap: str | None, keep_work: bool) -> Any:
        seen.append(scenario.workload.arrivals)
        summary = tmp_path / "summary.md"
        summary.write_text("ok")
        return {"passed": True}, {"markdown": summary}

    monkeypatch.setattr(loadtest.runner, "run", fake_run)
    latency = Path(__file__).resolve().parents[2] / "loadtest" / "scenarios" / "latency.yaml"
    run = ["loadtest", "run", str(latency), "--results", str(tmp_path)]
    assert cli.main(run) == 0
    assert cli.main([*run, "--arrivals", "poisson"]) == 0
    assert seen == ["even", "poisson"]
