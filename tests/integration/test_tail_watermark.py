"""Tail sampling on a low watermark against the real broker: a lagging source partition keeps its spans.

Source partition A of the deduped topic is caught up: it delivers fresh records continuously. Partition
B lags LAG (twice decision_wait) behind: it delivers records LAG old, continuously. Every test trace has
its root on A and its other spans, the ERROR one included, on B, with the same event time; B's half
therefore reaches the stage LAG after A's. Deciding on the latest input time (before watermarks), A's
fresh records decided each trace after decision_wait on A's half alone, dropped the ERROR traces and
let B's spans follow as late; on the regroupers' low watermark the stage waits for B.

The second test stops the broker itself for three times decision_wait between the two halves of each
trace, as an outage does between spans sent before it and spans an agent spilled during it (produced
afterwards with their original timestamps). On the wall clock the traces were decided during the
outage on their first half; on evidence the clocks stop with the broker and go on from there after it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from kotel.kafka.broker import KafkaBroker
from kotel.otlp import Signal
from streams.stages.tail_clock import HEARTBEAT_HEADER, REGROUPER_HEADER, WATERMARK_HEADER
from tests.integration.stage_support import StageEnv, headers_of, read_all, wait_until
from tests.integration.test_tail import HEADERS, span_ids
from tests.unit.otlp_builders import build

WAIT_MS = 1500
LAG_MS = 2 * WAIT_MS
GATEWAY = (f"  processors:\n    tail_sampling:\n      decision_wait: {WAIT_MS}ms\n"
           "      policies: [{name: errors, type: status_code, status_code: {status_codes: [ERROR]}}]\n")
A, B, C = 0, 1, 2  # partitions of the deduped topic
MS = 1_000_000


def now_ms() -> int:
    return int(time.time() * 1000)


def request(instance: str, spans: list[Span]) -> bytes:
    value: bytes = build(Signal.TRACES, ({"service.name": "shop", "service.instance.id": instance},
                                         [spans])).SerializeToString()
    return value


def split_trace(rng: random.Random, error: bool) -> tuple[bytes, list[Span], list[Span]]:
    """A trace's root (for A) and its three children (for B), one of them ERROR when ``error``."""
    tid, root_id = rng.randbytes(16), rng.randbytes(8)
    start = 1_700_000_000_000 * MS
    root = Span(trace_id=tid, span_id=root_id, name="GET /", start_time_unix_nano=start,
                end_time_unix_nano=start + 80 * MS)
    ok, failed = Status(code=Status.STATUS_CODE_OK), Status(code=Status.STATUS_CODE_ERROR)
    children = [Span(trace_id=tid, span_id=rng.randbytes(8), parent_span_id=root_id, name=f"op-{j}",
                     start_time_unix_nano=start + j * MS, end_time_unix_nano=start + j * MS + 10 * MS,
                     status=failed if error and j == 2 else ok)
                for j in range(1, 4)]
    return tid, [root], children


class Traffic:
    """A record of one-span OK traces into ``partition`` every 0.1 s, ``lag_ms`` old when produced."""

    def __init__(self, bootstrap: str, topic: str, partition: int, lag_ms: int) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        self.topic, self.partition, self.lag_ms = topic, partition, lag_ms
        self.traces, self.rng = 0, random.Random(partition)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            spans = [Span(trace_id=self.rng.randbytes(16), span_id=self.rng.randbytes(8), name="filler")
                     for _ in range(12)]
            key = b"i-%d" % self.partition
            self.producer.produce(self.topic, request(key.decode(), spans), key=key, partition=self.partition,
                                  timestamp=now_ms() - self.lag_ms, headers=HEADERS)
            if self.producer.flush(10):
                raise AssertionError("a traffic record was not acknowledged in 10 s")
            self.traces += len(spans)
            self.stop.wait(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[StageEnv]:
    with StageEnv(kafka_bootstrap, tmp_path, GATEWAY, partitions=3) as stage_env:
        yield stage_env


def test_error_traces_split_over_a_lagging_partition_come_out_whole(env: StageEnv) -> None:
    names, boot = env.topology.topic_names, env.bootstrap
    source, repartition = names.deduped("traces"), f"kotel-{env.prefix}-tail-traces-repartition"
    worker = env.worker("tail").start().wait_ready()
    rng = random.Random(11)
    traces = [split_trace(rng, error=n % 2 == 0) for n in range(60)]
    errors = {tid for n, (tid, _, _) in enumerate(traces) if n % 2 == 0}
    producer = Producer({"bootstrap.servers": boot, "enable.idempotence": True, "linger.ms": 5})
    bad = [(WATERMARK_HEADER, b"12x"), (REGROUPER_HEADER, b"r"), *HEADERS]  # counted, then ignored
    stray = Span(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="stray")
    producer.produce(repartition, request("i-x", [stray]), key=b"i-x", partition=0, headers=bad)
    assert producer.flush(10) == 0
    with Traffic(boot, source, A, 0) as live, Traffic(boot, source, B, LAG_MS) as backlog:
        wait_until(lambda: worker.metric("kotel_stage_records_in_total") >= 10, 30, "the traffic to flow")
        event_ms = now_ms()
        for n, (_, root, _) in enumerate(traces):
            producer.produce(source, request(f"i-a{n % 4}", root), key=b"i-a", partition=A,
                             timestamp=event_ms, headers=HEADERS)
        assert producer.flush(10) == 0
        time.sleep(max(0.0, (event_ms + LAG_MS - now_ms()) / 1000))  # B reaches the same event time
        for n, (_, _, children) in enumerate(traces):
            producer.produce(source, request(f"i-b{n % 4}", children), key=b"i-b", partition=B,
                             timestamp=event_ms, headers=HEADERS)
        assert producer.flush(10) == 0
        time.sleep(0.5)
    total = len(traces) + live.traces + backlog.traces + 1
    wait_until(lambda: worker.metric("kotel_tail_traces_decided_total") >= total, 60,
               "every trace to be decided")

    got = span_ids(read_all(boot, names.sampled_traces, at_least=len(errors), settle=1.0))
    missing = [tid.hex() for tid, root, children in traces if tid in errors
               and not {s.span_id for s in root + children} <= got.keys()]
    assert missing == [], f"{len(missing)} of {len(errors)} ERROR traces incomplete or dropped"
    kept_ok = [tid.hex() for tid, root, _ in traces if tid not in errors and root[0].span_id in got]
    assert kept_ok == []
    assert worker.metric("kotel_tail_late_spans_total") == 0
    assert worker.metric("kotel_tail_traces_decided_total", decision="sampled") == len(errors)
    assert max(got.values()) == 1
    assert worker.metric("kotel_tail_bad_watermarks_total") == 1

    # Every bundle says who regrouped it and how far its sources were; A's half waited for B.
    bundles = [b for b in read_all(boot, repartition, at_least=1, settle=0.5) if b.key != b"i-x"]
    marks = [headers_of(b) for b in bundles]
    assert all(WATERMARK_HEADER in h and len(h.get(REGROUPER_HEADER, "")) == 32 for h in marks)
    assert len({h[REGROUPER_HEADER] for h in marks}) == 1
    held = [int(h[WATERMARK_HEADER]) for b, h in zip(bundles, marks, strict=True) if b.key == b"i-a"]
    assert held and max(held) <= event_ms - LAG_MS + WAIT_MS
    assert worker.stop() == 0


# The clock moves on while the broker still answers as it stops (about 2 s here) and from when the worker
# reads again (about 1.5 s): decision_wait leaves room for both.
OUTAGE_WAIT_MS = 8000
OUTAGE_GATEWAY = GATEWAY.replace(f"decision_wait: {WAIT_MS}ms", f"decision_wait: {OUTAGE_WAIT_MS}ms")


def test_a_broker_outage_stops_the_clocks_so_spans_held_back_by_it_still_count(
        kafka_broker: KafkaBroker, kafka_bootstrap: str, tmp_path: Path) -> None:
    with StageEnv(kafka_bootstrap, tmp_path, OUTAGE_GATEWAY, partitions=3) as env:
        names, boot = env.topology.topic_names, env.bootstrap
        source, repartition = names.deduped("traces"), f"kotel-{env.prefix}-tail-traces-repartition"
        worker = env.worker("tail").start().wait_ready()
        rng = random.Random(12)
        traces = [split_trace(rng, error=n % 2 == 0) for n in range(40)]
        errors = {tid for n, (tid, _, _) in enumerate(traces) if n % 2 == 0}
        # Its own logger: while the broker is stopped, librdkafka would print refusals to stderr.
        producer = Producer({"bootstrap.servers": boot, "enable.idempotence": True, "linger.ms": 5,
                             "logger": logging.getLogger("tests.producer")})
        # Every source partition delivers before the outage, as under traffic: the worker's OffsetGuard
        # (streams.app) ends the worker when it must ask the broker for a partition's committed offset
        # while the broker is down, which it does for a partition that delivered nothing yet.
        fillers = [Span(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="f") for _ in range(3)]
        for p, filler in enumerate(fillers):
            producer.produce(source, request(f"i-f{p}", [filler]), key=b"i-f", partition=p, headers=HEADERS)
        event_ms = now_ms()
        for n, (_, root, _) in enumerate(traces):
            producer.produce(source, request(f"i-a{n % 4}", root), key=b"i-a", partition=A,
                             timestamp=event_ms, headers=HEADERS)
        assert producer.flush(10) == 0
        inputs = len(fillers) + len(traces)
        wait_until(lambda: worker.metric("kotel_stage_records_in_total") >= inputs, 30, "the roots")
        kafka_broker.stop()
        try:  # nothing comes for 3 x decision_wait after the roots, most of it with the broker down
            time.sleep(max(OUTAGE_WAIT_MS, event_ms + 3 * OUTAGE_WAIT_MS - now_ms()) / 1000)
            assert worker.alive, worker.log()[-4000:]
        finally:
            kafka_broker.start(timeout=90)
        # A record on a third partition tells when the worker reads again; then what the agents spilled.
        probe = Span(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name="probe")
        producer.produce(source, request("i-c", [probe]), key=b"i-c", partition=C, headers=HEADERS)
        assert producer.flush(30) == 0
        wait_until(lambda: worker.metric("kotel_stage_records_in_total") >= inputs + 1, 60,
                   "the worker to read again")
        for n, (_, _, children) in enumerate(traces):
            producer.produce(source, request(f"i-b{n % 4}", children), key=b"i-b", partition=B,
                             timestamp=event_ms, headers=HEADERS)
        assert producer.flush(10) == 0
        # after an outage, decisions wait OUTAGE_GRACE_MS (45 s) for the agents' spills
        wait_until(lambda: worker.metric("kotel_tail_traces_decided_total") >= inputs + 1, 150,
                   "every trace to be decided")

        got = span_ids(read_all(boot, names.sampled_traces, at_least=len(errors), settle=1.0))
        missing = [tid.hex() for tid, root, children in traces if tid in errors
                   and not {s.span_id for s in root + children} <= got.keys()]
        assert missing == [], f"{len(missing)} of {len(errors)} ERROR traces incomplete or dropped"
        assert worker.metric("kotel_tail_late_spans_total") == 0
        assert worker.metric("kotel_tail_traces_decided_total", decision="sampled") == len(errors)
        assert max(got.values()) == 1
        # Heartbeats went to every repartition partition; they are neither input records nor dead letters.
        beats = [b for b in read_all(boot, repartition, at_least=1, settle=0.5)
                 if HEARTBEAT_HEADER in headers_of(b)]
        assert {b.partition for b in beats} == {0, 1, 2}
        assert all(b.value == b"" and b.key == headers_of(b)[REGROUPER_HEADER].encode() for b in beats)
        assert worker.metric("kotel_stage_records_in_total") == inputs + 1 + len(traces)
        assert worker.metric("kotel_stage_deadlettered_records_total") == 0
        assert worker.stop() == 0
