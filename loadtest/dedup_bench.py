"""Throughput and memory of one dedup worker against a live broker.

Run: .venv/bin/python -m loadtest.dedup_bench [--bootstrap 127.0.0.1:9092] [--spans 600000]
     [--batch 1000] [--instances 16] [--small] [--rate 50000] [--window 300] [--memory-deadline 900]
     [--paced] [--skip-throughput] [--skip-memory] [--pure]
Needs a running broker (`kotel kafka start`). Each phase uses fresh topics and a fresh worker started as
`kotel worker dedup` (a child process), fed with realistic spans (samples.traces: HTTP/DB attributes,
2 scopes, start times out of order, 16 service instances = 16 keys, 5 % of the records re-sent as they
were, as a retrying client would).

1. Throughput: the whole backlog is produced first, then the worker drains it; spans/s and records/s
   come from the worker's own counters between its first and its last processed record, with its CPU
   and RSS. ``--small`` is the agent's shape under load: 10 spans per record over 48 service instances
   (one record per instance per 5 ms batch), where per-record costs dominate.
2. Memory: a full window of --rate x --window identities (15M by default), produced first with record
   times spread over the window, then drained (``--paced``: sent at --rate in real time for --window
   seconds while the worker consumes); the worker's RSS (read every second), the identities held and the
   store's disk use are printed every 10 s (the target is 15M identities within 512 MiB RSS). Bounded by
   --memory-deadline. Each phase deletes its topics at the end.
``--pure`` (no broker): the stage's per-span work in process, identify and rebuild a record with one span
dropped, with the C reader and with the Python one (CPU time per span, best of 7).
A script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kotel.otlp import samples
from loadtest.bench_support import (
    TOPOLOGY_HEAD,
    backlog_producer,
    deploy,
    disk_bytes,
    drop_topics,
    prefix_of,
    start_worker,
)

TOPOLOGY = TOPOLOGY_HEAD + """    dedup: {{window: {window}, signals: [traces]}}
"""
INSTANCES = 16


class Records:
    """Pre-encoded records whose trace ids are rewritten per record, so every span is new and cheap."""

    def __init__(self, spans_per_record: int, instances: int = INSTANCES) -> None:
        self.templates: list[tuple[bytes, np.ndarray, np.ndarray]] = []
        for seed in range(instances):
            request = samples.traces(spans_per_record, services=1, seed=seed)
            wire = request.SerializeToString()
            spans = [s for ss in request.resource_spans[0].scope_spans for s in ss.spans]
            offsets = np.array([wire.index(s.trace_id) for s in spans], dtype=np.int64)
            key = request.resource_spans[0].resource.attributes[1].value.string_value.encode()
            self.templates.append((key, np.frombuffer(wire, dtype=np.uint8).copy(), offsets))
        self.spans = spans_per_record
        self.counter = 0
        self._where = np.arange(8, dtype=np.int64)

    def next(self) -> tuple[bytes, bytes, int]:
        """Key, value and the instance's index (its partition is the index modulo the partitions)."""
        self.counter += 1
        instance = self.counter % len(self.templates)
        key, buffer, offsets = self.templates[instance]
        stamp = np.frombuffer(self.counter.to_bytes(8, "big"), dtype=np.uint8)
        buffer[(offsets[:, None] + self._where).ravel()] = np.tile(stamp, len(offsets))
        return key, buffer.tobytes(), instance


def setup(bootstrap: str, work: Path, window: str, partitions: int) -> tuple[Path, str]:
    path, topology = deploy(bootstrap, work, TOPOLOGY, "bench", window=window, partitions=partitions)
    return path, topology.topic_names.raw("traces")


def produce(bootstrap: str, topic: str, records: Records, count: int, partitions: int,
            retry_share: float = 0.05, stamp: Callable[[int], int] | None = None,
            pace: float = 0.0) -> int:
    """The backlog, each instance on partition (its index mod ``partitions``): every partition carries
    an equal share, as with the many instances of production. Hashing 16 keys onto 3 partitions gave them
    9, 4 and 3 instances, and the last part of a drain measured one partition alone. ``pace`` (spans/s)
    sends in real time instead of as fast as the broker takes it."""
    producer = backlog_producer(bootstrap)
    spans, last = 0, None
    retry_every = int(1 / retry_share) if retry_share else 0
    began = time.monotonic()
    for i in range(count):
        if pace:
            ahead = began + i * records.spans / pace - time.monotonic()
            if ahead > 0:
                producer.poll(ahead)
        if retry_every and last is not None and i % retry_every == retry_every - 1:
            key, value, instance = last
        else:
            key, value, instance = last = records.next()
        extra = {"timestamp": stamp(i)} if stamp is not None else {}
        while True:
            try:
                producer.produce(topic, value, key=key, partition=instance % partitions,
                                 headers=[("kotel.signal", b"traces")], **extra)
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.5)
        producer.poll(0)
        spans += records.spans
    producer.flush(120)
    return spans


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def throughput(args: argparse.Namespace, work: Path) -> None:
    topology, topic = setup(args.bootstrap, work, "5m", args.partitions)
    records = Records(args.batch, args.instances)
    count = args.spans // args.batch
    started = time.monotonic()
    total = produce(args.bootstrap, topic, records, count, args.partitions)
    unique = total - (count // 20) * args.batch
    print(f"backlog: {count} records, {total} spans ({unique} unique) in {time.monotonic() - started:.1f} s; "
          f"load {load()}")
    worker = start_worker("dedup", topology, work)
    first = None
    peak_rss = 0
    try:
        while True:
            done = worker.metric("kotel_stage_items_in_total")
            done_records = worker.metric("kotel_stage_records_in_total")
            now, cpu = time.monotonic(), worker.proc.cpu_times()
            peak_rss = max(peak_rss, worker.proc.memory_info().rss)
            if done and first is None:
                first = (now, done, cpu.user + cpu.system, done_records)
            if done >= total or worker.process.poll() is not None:
                break
            time.sleep(0.25)
        assert first is not None
        elapsed, spent = now - first[0], cpu.user + cpu.system - first[2]
        rate = (done - first[1]) / elapsed if elapsed else float("nan")
        settle = time.monotonic() + 30  # items are counted out once their outputs are acknowledged
        while True:
            out = worker.metric("kotel_stage_items_out_total")
            dups = worker.metric("kotel_stage_duplicate_items_total")
            if out + dups >= done or time.monotonic() > settle or worker.process.poll() is not None:
                break
            time.sleep(0.25)
        threads = sorted(worker.proc.threads(), key=lambda t: -(t.user_time + t.system_time))[:4]
        busiest = ", ".join(f"{t.user_time + t.system_time:.1f}" for t in threads)
        print("  busiest worker threads (CPU s):", busiest)
        records_rate = (done_records - first[3]) / elapsed if elapsed else float("nan")
        print(f"throughput: {rate:,.0f} spans/s = {records_rate:,.0f} records/s of {args.batch} spans "
              f"({done - first[1]:,.0f} spans in {elapsed:.1f} s), "
              f"worker CPU {spent / elapsed:.0%} of a core = {(done - first[1]) / max(spent, 1e-9):,.0f} "
              f"spans per CPU-second; out {out:,.0f}, duplicates {dups:,.0f}; peak RSS "
              f"{peak_rss / 2**20:.0f} MiB; load {load()}")
    finally:
        worker.stop()
        drop_topics(args.bootstrap, prefix_of(topology))


def memory(args: argparse.Namespace, work: Path) -> None:
    """A full window: rate x window identities whose record times span the window, held by one worker.

    By default produced as a backlog first (faster than real time, so the phase ends in minutes, and
    harder on memory than the target's case: the worker drains at its top speed, with full fetch buffers);
    the stage keys its window on record time, so the worker ends up holding the same identities as after
    ``window`` s at ``rate``. ``--paced`` is the target's case itself: ``rate`` spans/s in real time for
    ``window`` s, the worker consuming alongside. RSS is read every second.
    """
    topology, topic = setup(args.bootstrap, work, f"{args.window}s", args.partitions)
    records = Records(args.batch)
    count = int(args.rate * args.window / args.batch)
    total = count * records.spans
    first_ms = int(time.time() * 1000) - args.window * 1000

    def stamp(i: int) -> int:
        return first_ms + (i + 1) * args.window * 1000 // count

    sender: threading.Thread | None = None
    if args.paced:
        worker = start_worker("dedup", topology, work)
        sender = threading.Thread(target=produce, daemon=True, args=(
            args.bootstrap, topic, records, count, args.partitions, 0.0, None, float(args.rate)))
        sender.start()
        print(f"paced: {count} records, {total:,} spans at {args.rate:,} spans/s over {args.window} s; "
              f"load {load()}", flush=True)
    else:
        started = time.monotonic()
        produce(args.bootstrap, topic, records, count, args.partitions, 0.0, stamp=stamp)
        print(f"backlog: {count} records, {total:,} spans, record times over {args.window} s, produced in "
              f"{time.monotonic() - started:.0f} s; load {load()}", flush=True)
        worker = start_worker("dedup", topology, work)
    began, peak, done = time.monotonic(), 0, 0.0
    try:
        while time.monotonic() - began < args.memory_deadline:
            for _ in range(10):
                time.sleep(1)
                peak = max(peak, worker.proc.memory_info().rss)
            if worker.process.poll() is not None:
                print("the worker exited")
                break
            rss = worker.proc.memory_info().rss
            done = worker.metric("kotel_stage_items_in_total")
            keys = worker.metric("kotel_stage_table_keys")
            print(f"  t={time.monotonic() - began:4.0f} s  processed {done:>12,.0f}  identities (RocksDB "
                  f"estimate) {keys:>12,.0f}  RSS {rss / 2**20:5.0f} MiB (peak {peak / 2**20:3.0f})  store "
                  f"on disk {disk_bytes(worker.data_dir) / 2**20:6.0f} MiB  load {load()}", flush=True)
            if done >= total:
                break
        time.sleep(12)  # one more sampler round for the table size
        out = worker.metric("kotel_stage_items_out_total")
        print(f"memory: {done:,.0f} of {total:,} spans in {time.monotonic() - began:.0f} s; {out:,.0f} "
              f"identities stored, RocksDB estimates {worker.metric('kotel_stage_table_keys'):,.0f}; peak "
              f"RSS {max(peak, worker.proc.memory_info().rss) / 2**20:.0f} MiB (read every second); store on "
              f"disk {disk_bytes(worker.data_dir) / 2**20:.0f} MiB")
    finally:
        worker.stop()
        if sender is not None:
            sender.join(timeout=5)
        drop_topics(args.bootstrap, prefix_of(topology))


def pure() -> None:
    from kotel.otlp import Signal, spanwire
    from streams.stages import dedup_core, dedup_hash

    values = [samples.traces(1000, services=1, seed=s).SerializeToString() for s in range(80)]

    def once() -> float:
        began = time.process_time()
        for record in dedup_core.identify_records(Signal.TRACES, values):
            assert isinstance(record, dedup_core.Record)
            keep = [True] * len(record.items.ids)
            keep[3] = False
            record.output(Signal.TRACES, keep)
        return (time.process_time() - began) / (80 * 1000) * 1e6

    native = spanwire._spanscan, dedup_hash.native_digests
    if native[0] is not None:
        print(f"pure path, C: {min(once() for _ in range(7)):.2f} us per span")
    spanwire._spanscan, dedup_hash.native_digests = None, None
    try:
        print(f"pure path, Python: {min(once() for _ in range(7)):.2f} us per span")
    finally:
        spanwire._spanscan, dedup_hash.native_digests = native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=os.environ.get("KOTEL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--spans", type=int, default=600_000, help="backlog of the throughput phase")
    parser.add_argument("--batch", type=int, default=1000, help="spans per record")
    parser.add_argument("--instances", type=int, default=INSTANCES, help="service instances = keys")
    parser.add_argument("--small", action="store_true",
                        help="small records: --batch 10 --instances 48 (and --spans 300000 unless given)")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--rate", type=int, default=50_000, help="spans/s the memory phase's window holds")
    parser.add_argument("--window", type=int, default=300, help="dedup window of the memory phase, s")
    parser.add_argument("--memory-deadline", type=float, default=900, help="the memory phase stops after, s")
    parser.add_argument("--paced", action="store_true",
                        help="the memory phase sends --rate spans/s in real time for --window s (5 min)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--pure", action="store_true", help="only the in-process per-span cost, no broker")
    args = parser.parse_args()
    if args.pure:
        pure()
        return
    if args.small:
        args.batch, args.instances = 10, 48
        args.spans = 300_000 if "--spans" not in sys.argv else args.spans
    with tempfile.TemporaryDirectory(prefix="kotel-dedup-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            throughput(args, work)
        if not args.skip_memory:
            memory(args, work)


if __name__ == "__main__":
    main()
