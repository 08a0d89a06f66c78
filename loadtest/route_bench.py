"""Throughput of one routing worker (`kotel worker route`) on the real broker: fast path and split path.

Run: .venv/bin/python -m loadtest.route_bench [--records 2000] [--spans 1024] [--mode both|fast|split]
     [--partitions 3] [--bootstrap 127.0.0.1:9092]
Needs a running broker (`kotel kafka start`). For each mode it fills a fresh deduped.traces topic with
a backlog of realistic 1024-span trace records, then starts the worker as a child process and times
the backlog from the first routed record to the last, so start-up and group join are not counted.
fast: every record carries the agent's kotel.tenant header (forwarded without a parse); split: no
header and four resources of two tenants per record (parsed, cut into two records). Prints input
records/s and spans/s, and the worker's CPU and peak RSS. A script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kotel.kafka.admin import create_topics
from kotel.otlp import count_items, samples
from kotel.otlp.attributes import kv
from kotel.topology import Topology, parse_topology
from loadtest.bench_support import drop_topics

TOPOLOGY = """
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics: {{prefix: "{prefix}", defaults: {{partitions: {partitions}}}}}
gateway:
  processors:
    dedup: {{}}
    routing:
      table:
        - {{value: tenant-a, exporters: [file/archive]}}
        - {{value: tenant-b, exporters: [file/archive]}}
  exporters:
    file/archive: {{path: "{data}/archive"}}
"""
TENANTS = ("tenant-a", "tenant-b")


def _payloads(mode: str, spans: int) -> list[tuple[bytes, list[tuple[str, bytes]], int]]:
    """16 distinct records (value, headers, spans) of 4 resources each."""
    out = []
    for seed in range(16):
        request = samples.traces(spans, services=4, seed=seed)
        for index, entry in enumerate(request.resource_spans):
            tenant_of = TENANTS[index % 2] if mode == "split" else "tenant-a"
            entry.resource.attributes.append(kv("tenant", tenant_of))
        tenant = b"" if mode == "split" else b"tenant-a"
        headers = [("kotel.tenant", tenant), ("kotel.signal", b"traces"), ("kotel.agent", b"bench")]
        out.append((request.SerializeToString(), headers, count_items(request)))
    return out


def _size(consumer: Consumer, admin: AdminClient, topic: str) -> int:
    meta = admin.list_topics(topic=topic, timeout=10).topics[topic]
    if meta.error is not None:
        return 0
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in meta.partitions)
    except KafkaException:
        return 0


def _fill(bootstrap: str, topology: Topology, mode: str, records: int, spans: int) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "message.max.bytes": 16 << 20,
                         "compression.type": "none"})
    payloads, items = _payloads(mode, spans), 0
    topic = topology.topic_names.deduped("traces")
    for i in range(records):
        value, headers, count = payloads[i % len(payloads)]
        while True:
            try:
                producer.produce(topic, value, key=f"shop-{i % 97}", headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        items += count
    producer.flush(60)
    return items


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="kotel-route-bench-"))
    text = TOPOLOGY.format(bootstrap=args.bootstrap, prefix=f"rbench{uuid.uuid4().hex[:6]}",
                           partitions=args.partitions, data=data)
    (data / "topology.yaml").write_text(text)
    topology = parse_topology(text)
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    create_topics(admin, topology.planned_topics())
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "route-bench-sizes"})
    outputs = [topology.topic_names.tenant(t, "traces") for t in TENANTS]
    expected = args.records * (2 if mode == "split" else 1)
    log = (data / "worker.log").open("w")
    worker = None
    try:
        items = _fill(args.bootstrap, topology, mode, args.records, args.spans)
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "route", "--topology",
                                   str(data / "topology.yaml"), "--data-dir", str(data / "worker"),
                                   "--log-level", "WARNING"], stdout=log, stderr=log)
        proc = psutil.Process(worker.pid)
        first: tuple[float, int] | None = None
        rss_peak, cpu0 = 0, None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done = sum(_size(consumer, admin, t) for t in outputs)
            now = time.monotonic()
            rss_peak = max(rss_peak, proc.memory_info().rss)
            if done and first is None:
                first, cpu0 = (now, done), proc.cpu_times()
            if done >= expected:
                break
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}; see {data / 'worker.log'}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"only {done} of {expected} records routed in {args.timeout} s")
        assert first is not None and cpu0 is not None
        cpu1 = proc.cpu_times()
        wall = now - first[0]
        share = 1 - first[1] / expected  # the part of the backlog timed
        if wall <= 0 or share <= 0:
            raise RuntimeError("the whole backlog was routed before the first look; give more --records")
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        result = {
            "records_per_s": round(args.records * share / wall),
            "spans_per_s": round(items * share / wall),
            "mib_per_s": round(sum(len(v) for v, _, _ in _payloads(mode, args.spans)) / 16 * args.records
                               * share / wall / 2**20, 1),
            "worker_cpu_percent": round(100 * cpu / wall),
            "worker_rss_peak_mib": round(rss_peak / 2**20),
            "timed_seconds": round(wall, 2),
        }
        print(f"{mode:5s} {result['records_per_s']:>7,} records/s  {result['spans_per_s']:>9,} spans/s  "
              f"{result['mib_per_s']} MiB/s  cpu {result['worker_cpu_percent']}%  "
              f"rss {result['worker_rss_peak_mib']} MiB", flush=True)
        return result
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        log.close()
        consumer.close()
        drop_topics(args.bootstrap, topology.topics.prefix)  # ours and Faust's own (leader topic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KOTEL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--records", type=int, default=2000, help="input records per mode")
    parser.add_argument("--spans", type=int, default=1024, help="spans per record")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--mode", default="both", choices=["both", "fast", "split"])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per mode")
    args = parser.parse_args()
    modes = ["fast", "split"] if args.mode == "both" else [args.mode]
    results = {mode: run_mode(args, mode) for mode in modes}
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
