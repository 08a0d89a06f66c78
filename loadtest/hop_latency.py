"""Latency one stage worker adds at a light load: record in its input topic -> record in its output topic.

Run: .venv/bin/python -m loadtest.hop_latency --bootstrap 127.0.0.1:9092 [--stage dedup|route|both]
     [--rate 20] [--duration 30] [--warmup 15] [--partitions 3]
Needs a running broker (`kotel kafka start`). For each stage: fresh topics, one `kotel worker <stage>`
child process, then one small trace record (10 spans, fresh identities, one tenant) every 1/rate s into
the stage's input topic, each carrying its send time in a header. Two plain librdkafka consumers read
the input and the output topic: the input's latency is the floor (produce and fetch through the
broker, no stage); the output's is what a downstream consumer sees; the difference of their medians is
what the stage adds (fetch through Faust, its batching, its produce). Records sent during the warm-up
(group join, first fetches) are not counted. Prints percentiles and the worker's CPU; bounded in time
(warm-up + duration + 10 s per stage); deletes its topics. A script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer

from kotel.otlp import samples
from kotel.otlp.attributes import kv
from loadtest.bench_support import TOPOLOGY_HEAD, deploy, drop_topics, start_worker

TOPOLOGY = TOPOLOGY_HEAD + """\
    dedup: {{}}
    routing:
      table:
        - {{value: tenant-a, exporters: [file/archive]}}
  exporters:
    file/archive: {{path: "{data}/archive"}}
"""
SENT = "probe.sent"


def _records(count: int) -> list[bytes]:
    """Distinct records (dedup must keep every one), each one resource of tenant-a with 10 spans."""
    out = []
    for seed in range(count):
        request = samples.traces(10, services=1, seed=seed)
        for entry in request.resource_spans:
            entry.resource.attributes.append(kv("tenant", "tenant-a"))
        out.append(request.SerializeToString())
    return out


class _Reader(threading.Thread):
    """Milliseconds from each probe record's send time to its arrival here, for records sent after
    ``counted_from`` (epoch seconds)."""

    def __init__(self, bootstrap: str, topic: str, counted_from: float) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"hop-{uuid.uuid4().hex}",
                                  "auto.offset.reset": "earliest", "socket.nagle.disable": True})
        self.consumer.subscribe([topic])
        self.counted_from, self.done = counted_from, threading.Event()
        self.latencies: list[float] = []

    def run(self) -> None:
        try:
            while not self.done.is_set():
                msg = self.consumer.poll(0.05)
                if msg is None or msg.error():
                    continue
                now = time.time()
                sent = next((float(v) for k, v in msg.headers() or () if k == SENT), 0.0)
                if sent >= self.counted_from:
                    self.latencies.append((now - sent) * 1000)
        finally:
            self.consumer.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in ms (NaN when nothing arrived: the stage did not deliver in time)."""
    ordered = sorted(values) or [float("nan")]
    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)
    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1)}


def run_stage(args: argparse.Namespace, stage: str, work: Path) -> dict[str, object]:
    path, topology = deploy(args.bootstrap, work, TOPOLOGY, "hop", partitions=args.partitions,
                            data=work)
    names = topology.topic_names
    source, target = ((names.raw("traces"), names.deduped("traces")) if stage == "dedup"
                      else (names.deduped("traces"), names.tenant("tenant-a", "traces")))
    headers = [("kotel.tenant", b"tenant-a"), ("kotel.signal", b"traces"), ("kotel.agent", b"hop")]
    total = int(args.rate * (args.warmup + args.duration))
    records = _records(total)
    worker = start_worker(stage, path, work)
    counted_from = time.time() + args.warmup
    readers = [_Reader(args.bootstrap, topic, counted_from) for topic in (source, target)]
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 0, "acks": "all",
                         "enable.idempotence": True, "socket.nagle.disable": True})
    try:
        for reader in readers:
            reader.start()
        due = time.time()
        cpu0 = None
        for i, value in enumerate(records):
            due += 1 / args.rate
            time.sleep(max(0.0, due - time.time()))
            if cpu0 is None and time.time() >= counted_from:
                cpu0, wall0 = worker.proc.cpu_times(), time.monotonic()
            producer.produce(source, value, key=f"svc-{i % 7}",
                             headers=[*headers, (SENT, repr(time.time()).encode())])
            producer.poll(0)
        producer.flush(10)
        time.sleep(3)  # the last records through the stage
        cpu1, wall1 = worker.proc.cpu_times(), time.monotonic()
    finally:
        for reader in readers:
            reader.done.set()
        for reader in readers:
            reader.join(10)
        worker.stop()
        drop_topics(args.bootstrap, topology.topics.prefix)
    floor, out = (_percentiles(r.latencies) for r in readers)
    cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / (wall1 - wall0) if cpu0 else 0.0
    added = round(out["p50"] - floor["p50"], 1)
    return {"input_floor_ms": floor, "output_ms": out, "stage_added_p50_ms": added,
            "worker_cpu_percent": round(100 * cpu, 1), "sent": total,
            "counted": {"input": len(readers[0].latencies), "output": len(readers[1].latencies)}}


def _line(figures: object) -> str:
    assert isinstance(figures, dict)
    return f"p50/p95/p99 {figures['p50']}/{figures['p95']}/{figures['p99']} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KOTEL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--stage", default="both", choices=["both", "dedup", "route"])
    parser.add_argument("--rate", type=float, default=20.0, help="records per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of counted records")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of records not counted")
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kotel-hop-") as work:
        for stage in (["dedup", "route"] if args.stage == "both" else [args.stage]):
            result = results[stage] = run_stage(args, stage, Path(work))
            print(f"{stage:5s} adds {result['stage_added_p50_ms']} ms (p50); "
                  f"output {_line(result['output_ms'])}, input floor {_line(result['input_floor_ms'])}; "
                  f"worker CPU {result['worker_cpu_percent']}%", flush=True)
    machine = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
