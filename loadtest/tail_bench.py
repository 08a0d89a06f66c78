"""Throughput and memory of one tail-sampling worker against a live broker.

Run: .venv/bin/python -m loadtest.tail_bench [--bootstrap HOST:PORT] [--spans 1500000] [--pending 1000000]
     [--deadline 900] [--skip-throughput] [--skip-memory] [--profile]
Without --bootstrap a throwaway broker is started (kotel.kafka.broker, ports picked at runtime) and
stopped at the end. Each phase uses fresh topics and a fresh worker started as `kotel worker tail`.
Traffic: rounds of 4 records of --record-spans spans, one per service instance (the deduped topic's key);
each record holds --grouping spans of each of its traces (4: traces of 16 spans) and every trace
has spans on all 4 instances; realistic HTTP attributes, ERROR spans, durations up to 1.5 s; policies as
topologies/compose.yaml (errors, slow > 1 s, 10 % probabilistic).

1. Throughput (decision_wait 10 s): --spans are offered at --rate spans/s; from the worker's counters:
   the regroup rate while input lasts, how long after it the last span was decided (the wait, plus any
   backlog), the end-to-end rate and the sustained rate (spans over the run less the last decision
   wait), with the worker's CPU and peak RSS; then the changelog's bytes per record kind (the cost of
   exactly-once outputs without transactions). Offered below capacity, the worker keeps up when
   pending traces stay flat and the last decisions come about one wait after the input ends.
2. Memory (decision_wait 10 min): --pending traces are produced and held; RSS is sampled once all
   are pending, then the worker restarts on the same state with num_traces 1000, so it decides them
   all at once, and its own histogram says how long each slice of decisions held the event loop.
Each wait is bounded by --deadline (filling, deciding and the throughput run alike); a phase stopped by
it prints what it reached.
--profile: no broker; cProfile of the pure path (regroup, fragments, ingest, decide) in process.
A script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import struct
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from kotel.otlp import samples
from kotel.supervisor import free_ports
from kotel.topology import parse_topology
from loadtest import bench_support
from loadtest.bench_support import (
    TOPOLOGY_HEAD,
    Worker,
    backlog_producer,
    deploy,
    disk_bytes,
    drop_topics,
    metric_in,
    prefix_of,
)

TOPOLOGY = TOPOLOGY_HEAD + """    tail_sampling:
      decision_wait: {wait}
      num_traces: {num_traces}
      policies:
        - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
        - {{name: slow, type: latency, latency: {{threshold_ms: 1000}}}}
        - {{name: probabilistic, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
"""
INSTANCES = 4
WAIT_S = 10  # decision_wait of the throughput phase
HEADERS = [("kotel.tenant", b"tenant-a"), ("kotel.signal", b"traces"), ("kotel.schema", b"otlp-proto-v1")]


class Rounds:
    """Pre-encoded records whose trace ids are rewritten each round (8 bytes of round number).

    A round is INSTANCES records of ``record_spans`` spans; each record holds ``grouping`` spans of each
    of its traces, and every trace has spans in all INSTANCES records (the root on the first).
    """

    def __init__(self, grouping: int, record_spans: int) -> None:
        rnd = random.Random(3)
        self.traces = record_spans // grouping
        self.spans = record_spans * INSTANCES
        roots = [rnd.randbytes(8) for _ in range(self.traces)]
        self.templates: list[tuple[bytes, bytearray, list[int]]] = []
        for k in range(INSTANCES):
            request = samples.traces(record_spans, services=1, seed=k)
            spans = [s for ss in request.resource_spans[0].scope_spans for s in ss.spans]
            for i, span in enumerate(spans):
                t = i % self.traces
                span.trace_id = b"\xee" * 8 + struct.pack(">Q", t)
                root = k == 0 and i < self.traces
                span.span_id = roots[t] if root else span.span_id
                span.parent_span_id = b"" if root else roots[t]
                start = samples.BASE_TIME + t * 1_000_000 + k * 1000
                length = (1_500_000_000 if t % 17 == 0 else 40_000_000) if root else 5_000_000
                span.start_time_unix_nano, span.end_time_unix_nano = start, start + length
                if span.status.code == Status.STATUS_CODE_ERROR and k != 1:
                    span.status.code = Status.STATUS_CODE_OK  # errors on one instance's spans only
            wire = request.SerializeToString()
            offsets = [m for s in spans for m in _all(wire, s.trace_id)]
            key = request.resource_spans[0].resource.attributes[1].value.string_value.encode()
            self.templates.append((key, bytearray(wire), sorted(set(offsets))))
        self.round = 0

    def next(self) -> list[tuple[bytes, bytes]]:
        self.round += 1
        stamp = struct.pack(">Q", self.round)
        out = []
        for key, wire, offsets in self.templates:
            for pos in offsets:
                wire[pos:pos + 8] = stamp
            out.append((key, bytes(wire)))
        return out


def _all(wire: bytes, needle: bytes) -> list[int]:
    found, pos = [], wire.find(needle)
    while pos >= 0:
        found.append(pos)
        pos = wire.find(needle, pos + 1)
    return found


def setup(bootstrap: str, work: Path, wait: str, partitions: int, num_traces: int) -> tuple[Path, str]:
    path, topology = deploy(bootstrap, work, TOPOLOGY, "tbench", wait=wait, partitions=partitions,
                            num_traces=num_traces)
    return path, topology.topic_names.deduped("traces")


def start_worker(topology: Path, work: Path, data: Path | None = None) -> Worker:
    """More patience than dedup's: with a million traces pending, the worker starts, answers /metrics
    and stops slower."""
    return bench_support.start_worker("tail", topology, work, data, ready_within=90, scrape_timeout=10,
                                      stop_timeout=60)


def produce(bootstrap: str, topic: str, rounds: Rounds, count: int, rate: float | None = None) -> int:
    """``count`` rounds, paced at ``rate`` spans/s when given; returns the spans sent."""
    producer = backlog_producer(bootstrap)
    spans, began = 0, time.monotonic()
    for _ in range(count):
        for key, value in rounds.next():
            producer.produce(topic, value, key=key, headers=HEADERS)
        producer.poll(0)
        spans += rounds.spans
        if rate:
            ahead = spans / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush(300)
    return spans


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def throughput(args: argparse.Namespace, work: Path) -> None:
    topology, topic = setup(args.bootstrap, work, f"{WAIT_S}s", args.partitions, 1_000_000)
    worker = start_worker(topology, work)
    rounds = Rounds(args.grouping, args.record_spans)
    count = args.spans // rounds.spans
    feeder = threading.Thread(target=produce, args=(args.bootstrap, topic, rounds, count, args.rate),
                              daemon=True)
    began = time.monotonic()
    feeder.start()
    peak, first, all_in = 0, None, None
    total = count * rounds.spans
    try:
        while worker.process.poll() is None and time.monotonic() - began < args.deadline:
            time.sleep(1)
            now, cpu = time.monotonic(), worker.proc.cpu_times()
            peak = max(peak, worker.proc.memory_info().rss)
            regrouped = worker.metric("kotel_stage_items_in_total")
            # Spans reach a decision with their trace, or after it (late: a skew between input partitions).
            decided = worker.metric("kotel_tail_spans_decided_total") + worker.metric(
                "kotel_tail_late_spans_total")
            if regrouped and first is None:
                first = (now, cpu.user + cpu.system)
            if regrouped >= total and all_in is None:
                all_in = now
            if int(now - began) % 10 == 0:
                print(f"  t={now - began:5.0f} s  regrouped {regrouped:>11,.0f}  decided {decided:>11,.0f}  "
                      f"pending traces {worker.metric('kotel_tail_pending_traces'):>9,.0f}  RSS "
                      f"{worker.proc.memory_info().rss / 2**20:5.0f} MiB  {load()}", flush=True)
            if decided >= total:
                break
        assert first is not None
        elapsed, spent = now - first[0], cpu.user + cpu.system - first[1]
        regroup_s = (all_in or now) - first[0]
        print(f"throughput: offered {args.rate:,.0f} spans/s; {regrouped:,.0f} spans regrouped in "
              f"{regroup_s:.1f} s ({regrouped / regroup_s:,.0f} spans/s) and {decided:,.0f} decided "
              f"{elapsed - regroup_s:.1f} s later; {decided / elapsed:,.0f} spans/s end to end, "
              f"{decided / max(elapsed - WAIT_S, 1e-9):,.0f} without the last decision wait ({WAIT_S} s: the "
              f"sustained rate); worker CPU {spent / elapsed:.0%} of a core = "
              f"{decided / max(spent, 1e-9):,.0f} spans per CPU-second; sampled "
              f"{worker.metric('kotel_tail_spans_decided_total', decision='sampled'):,.0f} spans, late "
              f"{worker.metric('kotel_tail_late_spans_total'):,.0f}; "
              f"peak RSS {peak / 2**20:.0f} MiB; {load()}")
        worker.stop()
        changelog_bytes(args.bootstrap, prefix_of(topology), total)
    finally:
        worker.stop()
        drop_topics(args.bootstrap, prefix_of(topology))


def changelog_bytes(bootstrap: str, prefix: str, spans: int, deadline: float = 60) -> None:
    """What the stage's exactly-once bookkeeping writes: its changelog's bytes per record kind.

    B records carry the bundles themselves (the state); D records the verdicts and every emitted span id,
    which is what lets a new owner neither lose nor repeat an output without Kafka transactions.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tally-{os.getpid()}",
                         "enable.auto.commit": False, "log_level": 4})
    try:
        topics = [t for t in consumer.list_topics(timeout=10).topics
                  if t.startswith(f"kotel-{prefix}-") and t.endswith("-traces-changelog")]
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics
                 for p in consumer.list_topics(t, timeout=10).topics[t].partitions]
        ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        consumer.assign(parts)
        sizes: dict[bytes, list[int]] = {}
        left, stop = sum(ends.values()), time.monotonic() + deadline
        while left > 0 and time.monotonic() < stop:
            for msg in consumer.consume(1000, timeout=1):
                if msg.error() is None:
                    kind = (msg.value() or b"?")[:1]
                    tally = sizes.setdefault(kind, [0, 0])
                    tally[0] += 1
                    tally[1] += len(msg.value() or b"") + len(msg.key() or b"")
                    left -= 1
        total = sum(b for _, b in sizes.values())
        print("changelog: " + "; ".join(f"{kind.decode(errors='replace')} {n:,} records, "
                                        f"{b / 2**20:,.1f} MiB ({b / max(total, 1):.1%}, "
                                        f"{b / spans:.1f} B per input span)"
                                        for kind, (n, b) in sorted(sizes.items()))
              + ("" if left <= 0 else f"; {left:,} records not read in {deadline:.0f} s"))
    finally:
        consumer.close()


def memory(args: argparse.Namespace, work: Path) -> None:
    topology, topic = setup(args.bootstrap, work, "10m", args.partitions, 2 * args.pending)
    worker = start_worker(topology, work)
    rounds = Rounds(args.grouping, args.record_spans)
    count = args.pending // rounds.traces
    began = time.monotonic()
    feeder = threading.Thread(target=produce, args=(args.bootstrap, topic, rounds, count, args.rate),
                              daemon=True)
    feeder.start()
    peak = 0
    try:
        while worker.process.poll() is None and time.monotonic() - began < args.deadline:
            time.sleep(10)
            rss = worker.proc.memory_info().rss
            peak = max(peak, rss)
            pending = worker.metric("kotel_tail_pending_traces")
            print(f"  t={time.monotonic() - began:5.0f} s  pending traces {pending:>10,.0f}  RSS "
                  f"{rss / 2**20:5.0f} MiB  disk {disk_bytes(worker.data_dir) / 2**20:6.0f} MiB  {load()}",
                  flush=True)
            if pending >= count * rounds.traces:
                break
        print(f"memory: {pending:,.0f} traces pending, RSS {rss / 2**20:.0f} MiB "
              f"(peak {peak / 2**20:.0f} MiB)")
        data = worker.data_dir
        worker.stop()
        # Decide them all at once: the same state with num_traces 1000, so all but 1000 are over the limit.
        text = topology.read_text(encoding="utf-8").replace(f"num_traces: {2 * args.pending}",
                                                            "num_traces: 1000")
        topology.write_text(text, encoding="utf-8")
        worker = start_worker(topology, work, data)
        started = time.monotonic()
        target = pending - 1000 * args.partitions
        before = ""  # /metrics when the first decisions came: start-up and recovery are over
        while worker.process.poll() is None:
            scraped = worker.scrape()
            decided = metric_in(scraped, "kotel_tail_traces_decided_total")
            before = before or (scraped if decided else "")
            if decided >= target:
                break
            if time.monotonic() - started > args.deadline:
                print(f"  deciding stopped at the {args.deadline:.0f} s deadline", flush=True)
                break
            time.sleep(2)
        elapsed = time.monotonic() - started
        scraped = worker.scrape()  # one snapshot: the worker goes on deciding
        slices = metric_in(scraped, "kotel_tail_decision_slice_seconds_count")
        over = {(kind, le): slices - metric_in(scraped, f"kotel_tail_decision_slice{kind}_seconds_bucket",
                                               le=le)
                for kind in ("", "_cpu") for le in ("0.1", "0.25")}
        decided = metric_in(scraped, "kotel_tail_traces_decided_total")
        print(f"deciding: {decided:,.0f} traces in {elapsed:.0f} s "
              f"(worker start and recovery included), {slices:,.0f} slices; over 100 / 250 ms of wall time "
              f"{over['', '0.1']:,.0f} / {over['', '0.25']:,.0f}, of the event-loop thread's CPU time "
              f"{over['_cpu', '0.1']:,.0f} / {over['_cpu', '0.25']:,.0f}; "
              f"RSS {worker.proc.memory_info().rss / 2**20:.0f} MiB; {load()}")
        early, total = full_collections(before), full_collections(scraped)
        since = [t - e for t, e in zip(total, early, strict=True)]
        for when, (count, over_50, over_100) in (("start-up and recovery", early), ("deciding", since)):
            print(f"  full garbage collections during {when}: {count:,.0f}, {over_50:,.0f} over 50 ms, "
                  f"{over_100:,.0f} over 100 ms")
        settled = metric_in(scraped, "kotel_stage_gc_pause_seconds_count", generation="settle")
        print(f"  and {settled:,.0f} after start-up, freezing its objects (kotel.gc_pauses.settle)")
    finally:
        worker.stop()
        drop_topics(args.bootstrap, prefix_of(topology))


def full_collections(text: str) -> tuple[float, float, float]:
    """Full garbage collections in a /metrics text: how many, how many over 50 ms and over 100 ms."""
    count = metric_in(text, "kotel_stage_gc_pause_seconds_count", generation="2")
    return count, *(count - metric_in(text, "kotel_stage_gc_pause_seconds_bucket", generation="2", le=le)
                    for le in ("0.05", "0.1"))


def profile(args: argparse.Namespace, work: Path) -> None:
    """The pure per-span path in process, so its cost is seen without Kafka or Faust."""
    from rocksdict import Options, Rdict

    from kotel.otlp import Signal, decode_protobuf
    from streams.stages.tail_core import fragments, regroup
    from streams.stages.tail_policies import TailSampler
    from streams.stages.tail_state import Limits, TraceState

    text = TOPOLOGY.format(bootstrap="127.0.0.1:9", prefix="p", wait="10s", partitions=1, num_traces=10**6)
    config = parse_topology(text).gateway.tail_sampling  # type: ignore[union-attr]
    sampler, rounds = TailSampler(config), Rounds(args.grouping, args.record_spans)
    count = args.spans // rounds.spans

    def run(name: str) -> None:
        db = Rdict(str(work / name), options=Options(raw_mode=True))  # fresh: offsets start again
        state = TraceState(db, Limits.of(config, 1))
        offset = 0
        for r in range(count):
            for _, value in rounds.next():
                parts, _ = regroup(decode_protobuf(Signal.TRACES, value), 1, value)  # C when built
                for bundle, index in parts.values():
                    offset += 1
                    state.commit(state.ingest(offset, r * 10, "t", fragments(bundle, index)))
            due = state.due(r * 10 - 1000, 10_000)  # traces of 100 rounds ago
            if due:
                plan = state.decide([t for t, _ in due], sampler)
                state.commit(state.settle(plan, plan.verdicts, r * 10))
        db.close()

    started = time.perf_counter()
    run("plain")
    print(f"in process: {count * rounds.spans / (time.perf_counter() - started):,.0f} spans/s")
    started = time.perf_counter()
    with cProfile.Profile() as prof:
        run("profiled")
    elapsed = time.perf_counter() - started
    print(f"in process (with cProfile): {count * rounds.spans / elapsed:,.0f} spans/s")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="a running broker (default: start a throwaway one)")
    parser.add_argument("--spans", type=int, default=1_500_000, help="spans of the throughput phase")
    parser.add_argument("--rate", type=float, default=60_000, help="spans/s offered")
    parser.add_argument("--pending", type=int, default=1_000_000, help="traces held in the memory phase")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--record-spans", type=int, default=1000, help="spans per input record")
    parser.add_argument("--grouping", type=int, default=4, choices=[1, 2, 4, 5, 10],
                        help="spans of one trace in each instance's record (1: every span its own fragment)")
    parser.add_argument("--deadline", type=float, default=900,
                        help="each wait (the throughput run; filling, then deciding) ends after this many s")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile the pure path in process, then stop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kotel-tail-bench-") as tmp:
        work = Path(tmp)
        if args.profile:
            profile(args, work)
            return
        broker = None
        if not args.bootstrap:
            from kotel.kafka.broker import BrokerSettings, KafkaBroker

            port, controller = free_ports(2)
            broker = KafkaBroker(BrokerSettings.from_env(port=port, controller_port=controller,
                                                         state_dir=work / "kafka"))
            broker.start(timeout=120)
            args.bootstrap = broker.settings.bootstrap
        try:
            if not args.skip_throughput:
                throughput(args, work)
            if not args.skip_memory:
                memory(args, work)
        finally:
            if broker is not None:
                broker.stop()


if __name__ == "__main__":
    main()
