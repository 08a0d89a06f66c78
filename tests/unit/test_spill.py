"""The Parquet spill (group commit, crash safety, rotation, disk cap) and the replayer's ordering.

No broker: the replayer ships to an in-memory sender; the publisher test points at a closed port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from agents.contracts import Unavailable
from agents.publish import Publisher, Spill, SpillInUse, SpillRecord, read_part
from agents.publish.replay import Replayer
from agents.telemetry import AgentMetrics
from kotel.kafka.settings import KafkaSettings
from kotel.resilience.breaker import BreakerState, CircuitBreaker
from kotel.topology.exporters import (
    CircuitBreakerConfig,
    FileExporterConfig,
    KafkaExporterConfig,
    RetryConfig,
)

REPO = Path(__file__).resolve().parents[2]


def record(seq: int, key: str = "k1", size: int = 10) -> SpillRecord:
    headers = (("kotel.tenant", b"team-a"), ("kotel.seq", str(seq).encode()))
    return SpillRecord(seq, "traces", "kotel.raw.traces", key, "team-a", headers, bytes([seq % 256]) * size,
                       1_700_000_000_000 + seq)


def make_spill(path: Path, **config: object) -> tuple[Spill, AgentMetrics]:
    """A recovered spill; ``config`` holds FileExporterConfig fields and Spill's keyword arguments."""
    metrics = AgentMetrics()
    own = {k: config.pop(k) for k in ("max_open_seconds", "clock", "retry_after") if k in config}
    spill = Spill(FileExporterConfig(path=str(path), **config), metrics=metrics, **own)  # type: ignore[arg-type]
    spill.open()
    return spill, metrics


async def drain(spill: Spill) -> list[SpillRecord]:
    out = []
    while (part := spill.first_part()) is not None:
        out += await spill.read(part)
        await spill.remove(part)
    return out


def parts_on_disk(root: Path) -> list[Path]:
    return sorted(root.glob("seg-*/part-*.parquet"))


# --- writing ---------------------------------------------------------------------------------------


async def test_records_round_trip_and_the_spill_empties(tmp_path: Path) -> None:
    spill, metrics = make_spill(tmp_path)
    assert spill.is_empty
    written = [record(i, key=f"k{i % 3}") for i in range(5)]
    await spill.submit(written)
    assert not spill.is_empty
    assert metrics.spill_files._value.get() == 1
    assert metrics.spill_bytes._value.get() == parts_on_disk(tmp_path)[0].stat().st_size
    assert metrics.spilled.labels("traces")._value.get() == 5
    assert await drain(spill) == written
    assert spill.is_empty
    assert metrics.spill_files._value.get() == 0 and metrics.spill_bytes._value.get() == 0
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the drained segment's directory went too


async def test_submits_that_arrive_together_share_one_group_commit(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    futures = [spill.submit([record(i)]) for i in range(3)]  # before the committer gets to run
    await asyncio.gather(*futures)
    late = [spill.submit([record(3)])]
    late.append(spill.submit([record(4)]))
    await asyncio.gather(*late)
    files = parts_on_disk(tmp_path)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3, 2]
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in files)
    assert [r.seq for r in await drain(spill)] == [0, 1, 2, 3, 4]


async def test_records_submitted_during_a_write_go_to_the_next_part_in_order(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    first = spill.submit([record(0)])
    await asyncio.sleep(0)  # the committer has taken record 0 and is writing it in a thread
    second = spill.submit([record(1)])
    await asyncio.gather(first, second)
    assert [[r.seq for r in read_part(p)] for p in parts_on_disk(tmp_path)] == [[0], [1]]


async def test_part_files_hold_the_documented_columns(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    await spill.submit([record(7, key="svc-1")])
    table = pq.read_table(parts_on_disk(tmp_path)[0])
    assert table.column_names == ["seq", "signal", "topic", "key", "tenant", "headers", "value", "spilled_at",
                                  "created_at"]
    row = table.to_pylist()[0]
    assert (row["seq"], row["key"], row["tenant"]) == (7, "svc-1", "team-a")
    assert row["headers"] == [("kotel.tenant", b"team-a"), ("kotel.seq", b"7")]
    assert abs(row["spilled_at"].timestamp() - time.time()) < 60


async def test_rotation_by_size_starts_a_new_segment(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path, rotation={"max_megabytes": 1})
    for i in range(4):  # ~600 KB each, incompressible enough: two parts per 1 MiB segment
        await spill.submit([SpillRecord(i, "logs", "t", "k", "x", (), os.urandom(600_000))])
    segments = sorted(p.name for p in tmp_path.glob("seg-*"))
    assert segments == [f"seg-{n:020d}" for n in range(2)]
    assert [len(list((tmp_path / s).iterdir())) for s in segments] == [2, 2]
    assert [r.seq for r in await drain(spill)] == [0, 1, 2, 3]


async def test_rotation_by_age(tmp_path: Path) -> None:
    now = [0.0]
    spill, _ = make_spill(tmp_path, max_open_seconds=10.0, clock=lambda: now[0])
    await spill.submit([record(0)])
    now[0] = 9.9
    await spill.submit([record(1)])
    now[0] = 10.0
    await spill.submit([record(2)])
    assert [p.parent.name[-1] + "/" + str(read_part(p)[0].seq) for p in parts_on_disk(tmp_path)] == [
        "0/0", "0/1", "1/2"]


async def test_a_full_spill_refuses_at_once_with_backpressure(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path, max_disk_mib=1, retry_after=7.0)
    # The cap counts bytes on disk (after compression): random values do not compress.
    big = [SpillRecord(i, "logs", "t", "k", "x", (), os.urandom(700_000)) for i in range(2)]
    await spill.submit(big[:1])
    with pytest.raises(Unavailable) as info:
        spill.submit(big[1:])
    assert str(info.value) == (f"Kafka is unreachable and the spill at {tmp_path} is full "
                               "(1 MiB, max_disk_mib)")
    assert (info.value.reason, info.value.retry_after) == ("spill_full", 7.0)
    await drain(spill)
    await spill.submit(big[1:])  # room again once replayed


async def test_a_failed_write_answers_unavailable_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill, _ = make_spill(tmp_path)

    def disk_full(path: Path, rows: list[SpillRecord]) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agents.publish.spill._write_part", disk_full)
    with pytest.raises(Unavailable, match=r"^Kafka is unreachable and the spill write failed: \[Errno 28\] "
                                          r"No space left on device$"):
        await spill.submit([record(0)])
    assert spill.is_empty and spill.used_bytes == 0


async def test_remove_must_take_the_oldest_part_and_close_refuses(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    await spill.submit([record(0)])
    await spill.submit([record(1)])
    newest = parts_on_disk(tmp_path)[1]
    with pytest.raises(ValueError, match=f"^{newest} is not the oldest spill part$"):
        await spill.remove(newest)
    await spill.close()
    with pytest.raises(Unavailable, match=r"^the spill is closed \(the agent is shutting down\)$"):
        spill.submit([record(2)])


async def test_one_spill_directory_has_one_owner(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    with pytest.raises(SpillInUse, match=f"^the spill directory {tmp_path} is in use by another publisher; "
                                         "each spill directory belongs to one publisher at a time$"):
        make_spill(tmp_path)
    await spill.close()
    make_spill(tmp_path)


# --- crashes ---------------------------------------------------------------------------------------


async def test_reopening_after_an_abandoned_writer_keeps_every_committed_part(tmp_path: Path) -> None:
    spill, _ = make_spill(tmp_path)
    await spill.submit([record(0), record(1)])
    await spill.submit([record(2)])
    # The crash: a write cut short before its rename, and an empty segment directory; the writer is dropped.
    seg = parts_on_disk(tmp_path)[0].parent
    (seg / "part-00000000000000000002.parquet.tmp").write_bytes(b"PAR1 truncated")
    (tmp_path / "seg-00000000000000000009").mkdir()
    spill._lock.close()  # type: ignore[union-attr]  # what the OS does for a dead process
    del spill
    reopened, metrics = make_spill(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))
    assert not (tmp_path / "seg-00000000000000000009").exists()
    assert reopened.max_seq == 2
    assert metrics.spill_files._value.get() == 2
    await reopened.submit([record(3)])  # a new run writes after the recovered parts, in a new segment
    assert parts_on_disk(tmp_path)[-1].parent.name == "seg-00000000000000000010"
    assert [r.seq for r in await drain(reopened)] == [0, 1, 2, 3]


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agents.publish import Spill, SpillRecord
    from kotel.topology.exporters import FileExporterConfig

    async def main() -> None:
        spill = Spill(FileExporterConfig(path=sys.argv[1]))
        spill.open()
        seq = 0
        while True:
            batch = [SpillRecord(seq + i, "logs", "t", "k", "x", (), b"v" * 2000) for i in range(50)]
            await spill.submit(batch)
            seq += 50
            print(seq - 1, flush=True)  # acknowledged: every seq up to here is durable

    asyncio.run(main())
    """
)


def test_kill_9_never_loses_an_acknowledged_record(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        acked = -1
        deadline = time.monotonic() + 30
        while acked < 2000 and time.monotonic() < deadline:
            line = child.stdout.readline() if child.stdout else ""
            assert line, "the writer exited early"
            acked = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        if child.stdout:
            child.stdout.close()
    assert acked >= 2000
    spill = Spill(FileExporterConfig(path=str(tmp_path)))
    spill.open()
    seqs = [r.seq for p in parts_on_disk(tmp_path) for r in read_part(p)]
    assert seqs == list(range(len(seqs)))  # in order, no gap, no torn part
    assert len(seqs) > acked


# --- replay ordering -------------------------------------------------------------------------------


class FakeKafka:
    """An in-memory sender: the records it acknowledges, and outages on demand."""

    def __init__(self) -> None:
        self.topic: list[SpillRecord] = []
        self.down = True
        self.fail_after: int | None = None  # acknowledge this many, then fail the rest of a send

    async def send(self, records: Sequence[SpillRecord], timeout: float) -> list[SpillRecord]:
        if self.down:
            return list(records)
        n = len(records) if self.fail_after is None else self.fail_after
        self.topic += records[:n]
        self.fail_after = None
        return list(records[n:])

    async def metadata_ok(self, timeout: float) -> bool:
        return not self.down


async def wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)

async def replay_all(spill: Spill) -> FakeKafka:
    """Run a replayer against a reachable stand-in until the spill is empty; the records it got."""
    kafka = FakeKafka()
    kafka.down = False
    replayer = Replayer(spill, kafka, CircuitBreaker(CircuitBreakerConfig()), RetryConfig(), timeout=1.0)
    replayer.start()
    try:
        await wait_until(lambda: spill.is_empty)
    finally:
        await replayer.stop()
    return kafka

def unreachable_publisher(spill: Path, breaker: bool) -> Publisher:
    """A publisher whose Kafka is a port nothing listens on (500 ms delivery timeout), spilling there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exporter = KafkaExporterConfig(timeout=timedelta(milliseconds=500), circuit_breaker={"enabled": breaker})
    return Publisher(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), exporter,
                     FileExporterConfig(path=str(spill)), agent_id="agent-1")




async def test_replayer_ships_oldest_first_after_the_outage_and_resends_only_unacked(tmp_path: Path) -> None:
    spill, metrics = make_spill(tmp_path)
    for i in range(0, 9, 3):
        await spill.submit([record(i, "a"), record(i + 1, "b"), record(i + 2, "a")])
    kafka = FakeKafka()
    breaker = CircuitBreaker(CircuitBreakerConfig(minimum_requests=1, open_duration=timedelta(seconds=0.05)))
    fast = RetryConfig(initial_interval=timedelta(milliseconds=10), max_interval=timedelta(milliseconds=20))
    replayer = Replayer(spill, kafka, breaker, fast, timeout=1.0, metrics=metrics)
    replayer.start()
    try:
        await wait_until(lambda: breaker.state is not BreakerState.CLOSED)  # failures open the breaker
        assert spill.part_count == 3
        kafka.fail_after = 1  # the first part goes out in two tries: only its unacked records are resent
        kafka.down = False
        await wait_until(lambda: spill.is_empty)
    finally:
        await replayer.stop()
    assert [r.seq for r in kafka.topic] == list(range(9))
    assert breaker.state is BreakerState.CLOSED
    assert metrics.replayed.labels("traces")._value.get() == 9
    assert parts_on_disk(tmp_path) == []


async def test_replayer_resumes_what_a_previous_run_left(tmp_path: Path) -> None:
    first, _ = make_spill(tmp_path)
    await first.submit([record(0), record(1)])
    await first.close()
    spill, _ = make_spill(tmp_path)
    kafka = await replay_all(spill)
    assert [r.seq for r in kafka.topic] == [0, 1]


# --- publisher without Kafka -----------------------------------------------------------------------


@pytest.mark.parametrize("breaker", [True, False], ids=["breaker", "no-breaker"])
async def test_publisher_without_kafka_spills_within_the_timeout_keeping_call_order(
    tmp_path: Path, breaker: bool
) -> None:
    """With the breaker, librdkafka's all-brokers-down report diverts publishes at once; without it
    each waits out its delivery timeout, then spills behind the earlier publishes for its key."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    publisher = unreachable_publisher(tmp_path, breaker)
    await publisher.start()
    try:
        requests = []
        for i in range(4):
            req = ExportLogsServiceRequest()
            req.resource_logs.add().scope_logs.add().log_records.add().body.string_value = f"line {i}"
            requests.append(req)
        begin = time.monotonic()
        await asyncio.gather(*(publisher.publish("logs", "svc-1", "team-a", r) for r in requests))
        took = time.monotonic() - begin
        assert took < 0.5 + 2.0 + 1.0  # the timeout, librdkafka's grace, slack
        if not breaker:
            assert took >= 0.5
            assert publisher.metrics.publish_errors.labels("_MSG_TIMED_OUT")._value.get() == 4
        spilled = [r for p in parts_on_disk(tmp_path) for r in read_part(p)]
        assert [ExportLogsServiceRequest.FromString(r.value) for r in spilled] == requests
        assert [r.seq for r in spilled] == sorted(r.seq for r in spilled)
        assert dict(spilled[0].headers)["kotel.agent"] == b"agent-1"
        assert publisher.metrics.in_flight_bytes._value.get() == 0
        begin = time.monotonic()
        await publisher.publish("logs", "svc-1", "team-a", requests[0])  # spill not empty: straight there
        assert time.monotonic() - begin < 0.4
    finally:
        await publisher.close(timeout=1.0)


class SlowFailingKafka(FakeKafka):
    """Every send fails, later calls sooner: failures come back in the reverse of the call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def close(self, timeout: float) -> int:
        return 0

    async def send(self, records: Sequence[SpillRecord], timeout: float) -> list[SpillRecord]:
        self.calls += 1
        await asyncio.sleep(0.05 * (5 - self.calls))
        return list(records)


async def test_failed_direct_publishes_reach_the_spill_in_call_order_per_key(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    exporter = KafkaExporterConfig(circuit_breaker={"enabled": False})
    publisher = Publisher(KafkaSettings(), exporter, FileExporterConfig(path=str(tmp_path)), agent_id="a")
    kafka = SlowFailingKafka()
    publisher._sender = publisher._replayer._sender = kafka  # type: ignore[assignment]
    await publisher.start()
    try:
        requests = []
        for i in range(4):
            req = ExportLogsServiceRequest()
            req.resource_logs.add().scope_logs.add().log_records.add().body.string_value = f"line {i}"
            requests.append(req)
        await asyncio.gather(*(publisher.publish("logs", "svc-1", "t", r) for r in requests))
        assert kafka.calls == 4  # all four went direct, and failed
        spilled = [r for p in parts_on_disk(tmp_path) for r in read_part(p)]
        assert [ExportLogsServiceRequest.FromString(r.value) for r in spilled] == requests
    finally:
        await publisher.close(timeout=1.0)
