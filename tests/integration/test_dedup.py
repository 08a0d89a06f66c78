"""The dedup stage against the real broker: `kotel worker dedup` processes, records in, records out."""

from __future__ import annotations

import fcntl
import platform
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from kotel.heap import MMAP_THRESHOLD
from kotel.otlp import Signal, decode_protobuf
from streams.stages.dedup_core import identify
from tests.integration.stage_support import (
    REPO,
    Feed,
    Out,
    Record,
    StageEnv,
    headers_of,
    produce,
    read_all,
    wait_until,
)
from tests.unit.otlp_builders import build, counter, log

SHORT = "  processors:\n    dedup: {window: 4s}\n"
LONG = "  processors:\n    dedup: {window: 5m, signals: [traces]}\n"
HEADERS = [("kotel.tenant", b"tenant-a"), ("kotel.signal", b"traces"), ("kotel.seq", b"7")]


def spans_value(numbers: list[int], instance: str = "i-1", shuffle: bool = False) -> bytes:
    """Span n (n > 0): trace id n, span id n, start time 1000 + n, in one resource (the given instance)."""
    order = list(numbers)
    if shuffle:
        random.Random(len(order)).shuffle(order)
    spans = [Span(name=f"op-{n}", trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"),
                  start_time_unix_nano=1000 + n) for n in order]
    request = build(Signal.TRACES, ({"service.name": "shop", "service.instance.id": instance}, [spans]))
    return request.SerializeToString()  # type: ignore[no-any-return]


def span_numbers(out: Out) -> list[int]:
    request = decode_protobuf(Signal.TRACES, out.value)
    return [int.from_bytes(s.trace_id, "big") for rs in request.resource_spans for ss in rs.scope_spans
            for s in ss.spans]


def for_key(outs: list[Out], key: bytes) -> list[Out]:
    return [o for o in outs if o.key == key]


def read_key(bootstrap: str, topic: str, key: bytes, at_least: int, settle: float = 1.0,
             timeout: float = 60.0) -> list[Out]:
    """The records of ``key`` once at least ``at_least`` of them arrived (other tests share the topic, so
    counting the whole topic would stop too early), then ``settle`` seconds more to see extras."""
    deadline = time.monotonic() + timeout
    while True:
        outs = for_key(read_all(bootstrap, topic, settle=settle), key)
        if len(outs) >= at_least or time.monotonic() > deadline:
            return outs
        time.sleep(0.5)


@pytest.fixture(scope="module")
def short_env(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StageEnv]:
    """One worker with a 4 s window for every signal, shared by the tests that need no restart."""
    with StageEnv(kafka_bootstrap, tmp_path_factory.mktemp("dedup-short"), SHORT) as env:
        env.worker("dedup").start().wait_ready()
        yield env
        assert env.workers[0].stop() == 0


@pytest.fixture
def long_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[StageEnv]:
    with StageEnv(kafka_bootstrap, tmp_path, LONG, partitions=4) as env:
        yield env


def test_a_running_worker_froze_its_start_up_heap(short_env: StageEnv) -> None:
    """Once before Faust starts and once when it is up (kotel.gc_pauses.settle), each pause timed."""
    worker = short_env.workers[0]
    wait_until(lambda: worker.metric("kotel_stage_gc_pause_seconds_count", generation="settle") >= 2, 30,
               "the worker to settle its heap twice")
    assert worker.metric("kotel_stage_gc_pause_seconds_sum", generation="settle") > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_running_worker_fixed_its_mmap_threshold(short_env: StageEnv) -> None:
    """kotel.heap: freed fetch buffers leave the heap (the memory phase of loadtest.dedup_bench)."""
    assert f"glibc's mmap threshold fixed at {MMAP_THRESHOLD} bytes" in short_env.workers[0].log()


def test_exact_and_partial_duplicates_across_records(short_env: StageEnv) -> None:
    names, worker = short_env.topology.topic_names, short_env.workers[0]
    key = f"i-{uuid.uuid4().hex[:6]}".encode()
    before = worker.metric("kotel_stage_duplicate_items_total", signal="traces")
    produce(short_env.bootstrap, names.raw("traces"), [
        (key, spans_value(list(range(1, 101)), shuffle=True), HEADERS),  # new, out of order
        (key, spans_value(list(range(1, 101))), HEADERS),  # a retried request: dropped whole
        (key, spans_value(list(range(51, 151))), HEADERS),  # overlaps by half
        (key, spans_value([151, 152]), HEADERS),
    ])
    outs = read_key(short_env.bootstrap, names.deduped("traces"), key, at_least=3)
    assert [span_numbers(o) for o in outs] == [list(range(1, 101)), list(range(101, 151)), [151, 152]]
    assert all(o.headers == HEADERS for o in outs)  # same key, same headers, input order kept
    assert len({o.partition for o in outs}) == 1
    assert worker.metric("kotel_stage_duplicate_items_total", signal="traces") - before == 150


def test_a_duplicate_after_the_window_passes_again(short_env: StageEnv) -> None:
    names = short_env.topology.topic_names
    key = f"i-{uuid.uuid4().hex[:6]}".encode()
    # Identities of their own: another test's spans 1..152 on the same partition a moment ago would be
    # (rightly) duplicates of these within the window.
    numbers = sorted(random.randrange(1_000_000, 2**62) for _ in range(3))
    value = spans_value(numbers, instance=key.decode())
    # The window runs on record timestamps, so they are set here: a slow first produce (the idempotent
    # producer waiting for its id) must not shorten the gap. The stage caps timestamps at its clock, so
    # the second pair is produced only once its timestamp is in the past.
    first = int(time.time() * 1000)
    produce(short_env.bootstrap, names.raw("traces"), [(key, value, HEADERS)] * 2, timestamp=first)
    time.sleep(max(0.0, (first + 4600) / 1000 - time.time()))
    produce(short_env.bootstrap, names.raw("traces"), [(key, value, HEADERS)] * 2, timestamp=first + 4500)
    outs = read_key(short_env.bootstrap, names.deduped("traces"), key, at_least=2, settle=2.0)
    assert [span_numbers(o) for o in outs] == [numbers, numbers]
    assert [o.timestamp for o in outs] == [first, first + 4500]  # outputs keep the input timestamps


def test_logs_and_metrics_are_deduplicated_per_item(short_env: StageEnv) -> None:
    names, key = short_env.topology.topic_names, f"i-{uuid.uuid4().hex[:6]}".encode()
    res = {"service.name": "shop", "service.instance.id": key.decode()}
    logs_a = build(Signal.LOGS, (res, [[log("a", 9), log("b", 9)]])).SerializeToString()
    logs_b = build(Signal.LOGS, (res, [[log("b", 9), log("c", 9)]])).SerializeToString()
    produce(short_env.bootstrap, names.raw("logs"), [(key, logs_a, []), (key, logs_a, []), (key, logs_b, [])])
    points = build(Signal.METRICS, (res, [[counter("requests", {"route": "/a"}, {"route": "/b"})]]))
    produce(short_env.bootstrap, names.raw("metrics"), [(key, points.SerializeToString(), [])] * 2)
    logs_out = read_key(short_env.bootstrap, names.deduped("logs"), key, at_least=2)
    bodies = [[r.body.string_value for rl in decode_protobuf(Signal.LOGS, o.value).resource_logs
               for sl in rl.scope_logs for r in sl.log_records] for o in logs_out]
    assert bodies == [["a", "b"], ["c"]]
    assert len(read_key(short_env.bootstrap, names.deduped("metrics"), key, at_least=1)) == 1


def test_invalid_records_go_to_the_dead_letter_topic_and_the_stage_goes_on(short_env: StageEnv) -> None:
    names, worker = short_env.topology.topic_names, short_env.workers[0]
    key = f"i-{uuid.uuid4().hex[:6]}".encode()
    short_id = Span(trace_id=b"\x01" * 8, span_id=b"\x02" * 8)
    bad_id = build(Signal.TRACES, ({}, [[short_id]])).SerializeToString()
    produce(short_env.bootstrap, names.raw("traces"), [
        (key, b"\xff\xff not protobuf", HEADERS), (key, bad_id, HEADERS), (key, spans_value([42]), HEADERS)])
    good = read_key(short_env.bootstrap, names.deduped("traces"), key, at_least=1)
    assert [span_numbers(o) for o in good] == [[42]]
    dead = read_key(short_env.bootstrap, names.deadletter, key, at_least=2)
    assert dead[0].value == b"\xff\xff not protobuf"
    first, second = headers_of(dead[0]), headers_of(dead[1])
    assert first["kotel.dlq.reason"] == ("invalid OTLP/protobuf ExportTraceServiceRequest: malformed wire "
                                         "format (truncated, or not a protobuf message)")
    assert second["kotel.dlq.reason"] == ("invalid OTLP span: resourceSpans[0].scopeSpans[0].spans[0]."
                                          "traceId: expected 16 bytes, got 8")
    assert first["kotel.dlq.topic"] == names.raw("traces") and first["kotel.tenant"] == "tenant-a"
    assert int(second["kotel.dlq.offset"]) == int(first["kotel.dlq.offset"]) + 1
    assert first["kotel.dlq.partition"] == second["kotel.dlq.partition"]
    assert worker.metric("kotel_stage_deadlettered_records_total", reason="invalid_otlp") >= 2


def test_state_survives_a_restart_and_a_partition_move(long_env: StageEnv) -> None:
    names, boot = long_env.topology.topic_names, long_env.bootstrap
    raw, out = names.raw("traces"), names.deduped("traces")
    first = long_env.worker("dedup", "w1").start().wait_ready()
    produce(boot, raw, [(b"i-1", spans_value(list(range(1, 21))), HEADERS)])
    assert len(read_all(boot, out, at_least=1)) == 1
    assert first.stop() == 0

    again = long_env.worker("dedup", "w1-again")
    again.data_dir = first.data_dir  # the same local RocksDB
    again.start().wait_ready()
    produce(boot, raw, [(b"i-1", spans_value(list(range(1, 21))), HEADERS)])
    wait_until(lambda: again.metric("kotel_stage_duplicate_items_total") == 20, 30, "the retry to be dropped")
    assert again.stop() == 0

    moved = long_env.worker("dedup", "w2").start().wait_ready()  # fresh disk: state from the changelog only
    produce(boot, raw, [(b"i-1", spans_value(list(range(11, 31))), HEADERS)])
    wait_until(lambda: moved.metric("kotel_stage_items_in_total") == 20, 30, "the record to be processed")
    outs = read_all(boot, out, at_least=2)
    assert [span_numbers(o) for o in outs] == [list(range(1, 21)), list(range(21, 31))]
    assert moved.metric("kotel_stage_duplicate_items_total") == 10


class Load:
    """Records of 50 fresh spans over 16 instances, with every fifth record a retry of an earlier one."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.next_span = 1  # 0 would be an all-zero (invalid) trace id
        self.rng = random.Random(11)

    def batch(self, records: int, retry_from: int | None = None) -> list[Record]:
        out = []
        for i in range(records):
            if i % 5 == 4 and self.sent:
                key, value = self.rng.choice(self.sent[:retry_from] if retry_from else self.sent)
            else:
                key = f"i-{self.rng.randrange(16)}".encode()
                value = spans_value(list(range(self.next_span, self.next_span + 50)), instance=key.decode())
                self.next_span += 50
                self.sent.append((key, value))
            out.append((key, value, HEADERS))
        return out


def test_kill_9_under_load_loses_and_duplicates_nothing(long_env: StageEnv) -> None:
    names, boot = long_env.topology.topic_names, long_env.bootstrap
    raw, out = names.raw("traces"), names.deduped("traces")
    victim = long_env.worker("dedup", "victim").start().wait_ready()
    survivor = long_env.worker("dedup", "survivor").start().wait_ready()
    load = Load()
    with Feed(boot, raw, lambda: load.batch(20)):
        wait_until(lambda: victim.metric("kotel_stage_records_in_total") > 20
                   and survivor.metric("kotel_stage_records_in_total") > 20, 60, "both workers to process")
        victim.kill()
        before_kill = len(load.sent)
        time.sleep(3)
    # Retries of records the victim handled: only its table state, taken over, can drop them.
    produce(boot, raw, load.batch(40, retry_from=before_kill))
    total = long_env.end_offsets(raw)
    # Session timeout (10 s), rebalance and changelog recovery: on a loaded 2-core machine this took
    # over 60 s once; the assertions below, not this wait, decide whether anything was lost.
    wait_until(lambda: long_env.committed("dedup", raw) == total, 180,
               "the survivor to process and commit every record")
    expected = Counter(i for _, value in load.sent for i in identify(
        Signal.TRACES, decode_protobuf(Signal.TRACES, value)).ids)
    got = Counter(i for o in read_all(boot, out, at_least=1, settle=2.0)
                  for i in identify(Signal.TRACES, decode_protobuf(Signal.TRACES, o.value)).ids)
    assert set(expected) == set(got), f"{len(set(expected) - set(got))} identities lost"
    assert max(got.values()) == 1, f"{sum(1 for c in got.values() if c > 1)} identities duplicated"
    assert "Worker ready" in survivor.log()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", "worker", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_an_invalid_topology_exits_2_with_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  processors:\n    dedup: {window: soon}\n", encoding="utf-8")
    done = run_cli("dedup", "--topology", str(bad), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"{bad}:3: gateway.processors.dedup.window: expected a duration like "
                                   "200ms, 10s or 1m30s, got 'soon'")


def test_a_data_dir_in_use_is_refused(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = StageEnv(kafka_bootstrap, tmp_path, LONG)
    data = tmp_path / "data"
    data.mkdir()
    with (data / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = run_cli("dedup", "--topology", str(env.topology_file), "--data-dir", str(data))
    assert done.returncode == 2
    assert done.stderr.strip() == f"{data} is in use by another worker; give each worker its own --data-dir"


def test_topics_not_as_planned_exit_2_with_the_reason(tmp_path: Path, kafka_bootstrap: str) -> None:
    """The state is kept per input partition: a topology planning another count than Kafka has is refused
    before the worker joins its group."""
    with StageEnv(kafka_bootstrap, tmp_path, LONG, partitions=3) as env:
        planned = StageEnv(kafka_bootstrap, tmp_path, LONG, partitions=4, prefix=env.prefix)
        done = run_cli("dedup", "--topology", str(planned.topology_file), "--data-dir", str(tmp_path / "d"))
    raw, out = f"{env.prefix}.raw.traces", f"{env.prefix}.deduped.traces"
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"{raw} has 3 partitions and {out} 3 in Kafka, but the topology plans 4 for {raw} (run `kotel "
        "topology apply`, and keep partition counts unchanged)")


def test_kafka_out_of_reach_at_start_exits_69_with_the_reason(tmp_path: Path) -> None:
    env = StageEnv("127.0.0.1:1", tmp_path, LONG)  # nothing listens on port 1
    done = run_cli("dedup", "--topology", str(env.topology_file), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 69, done.stderr
    assert "cannot check the dedup topics in Kafka:" in done.stderr
