"""Latency one stage worker adds at a light load: record in its input topic -> record in its output topic.

Run: .venv/bin/python -m loadtest.hop_latency --bootstrap 127.0.0.1:9092 [--stage dedup|route|both]
     [--rate 20] [--duration 30] [--warmup 15] [--partitions 3] [--signals traces metrics logs]
Needs a running broker (`kotel kafka start`). For each stage: fresh topics, one `kotel worker <stage>`
child process, then one small record per signal (10 items, fresh identities, one tenant; traces only by
default) every 1/rate s into the stage's input topics, each carrying its send time in a header. Plain
librdkafka consumers read each input and output topic: the input's latency is the floor (produce and fetch
through the broker, no stage); the output's is what a downstream consumer sees; the difference of their
medians is what the stage adds (its fetch, its batching, its produce). Records sent during the
warm-up (group join, first fetches) are not counted. Prints percentiles and the worker's CPU; bounded in
time (warm-up + duration + 10 s per stage); deletes its topics. A script, not a test: nothing is asserted.
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


_SAMPLES = {"traces": samples.traces, "metrics": samples.metrics, "logs": samples.logs}


def _records(signal: str, count: int) -> list[bytes]:
    """Distinct records (dedup must keep every one), each one resource of tenant-a with 10 items."""
    out = []
    for seed in range(count):
        request = _SAMPLES[signal](10, services=1, seed=seed)
        for entry in getattr(request, f"resource_{'spans' if signal == 'traces' else signal}"):
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
    total = int(args.rate * (args.warmup + args.duration))
    signals = args.signals
    records = {signal: _records(signal, total) for signal in signals}
    worker = start_worker(stage, path, work)
    counted_from = time.time() + args.warmup
    topics = {signal: ((names.raw(signal), names.deduped(signal)) if stage == "dedup"
                       else (names.deduped(signal), names.tenant("tenant-a", signal))) for signal in signals}
    readers = {(signal, end): _Reader(args.bootstrap, topics[signal][end], counted_from)
               for signal in signals for end in (0, 1)}
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 0, "acks": "all",
                         "enable.idempotence": True, "socket.nagle.disable": True})
    try:
        for reader in readers.values():
            reader.start()
        due = time.time()
        cpu0 = None
        for i in range(total):
            due += 1 / args.rate
            time.sleep(max(0.0, due - time.time()))
            if cpu0 is None and time.time() >= counted_from:
                cpu0, wall0 = worker.proc.cpu_times(), time.monotonic()
            for signal in signals:  # one record of each signal, back to back
                headers = [("kotel.tenant", b"tenant-a"), ("kotel.signal", signal.encode()),
                           ("kotel.agent", b"hop"), (SENT, repr(time.time()).encode())]
                producer.produce(topics[signal][0], records[signal][i], key=f"svc-{i % 7}", headers=headers)
            producer.poll(0)
        producer.flush(10)
        time.sleep(3)  # the last records through the stage
        cpu1, wall1 = worker.proc.cpu_times(), time.monotonic()
    finally:
        for reader in readers.values():
            reader.done.set()
        for reader in readers.values():
            reader.join(10)
        worker.stop()
        drop_topics(args.bootstrap, topology.topics.prefix)
    cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / (wall1 - wall0) if cpu0 else 0.0
    per_signal: dict[str, object] = {}
    for signal in signals:
        floor, out = (_percentiles(readers[signal, end].latencies) for end in (0, 1))
        per_signal[signal] = {"input_floor_ms": floor, "output_ms": out,
                              "stage_added_p50_ms": round(out["p50"] - floor["p50"], 1),
                              "counted": {"input": len(readers[signal, 0].latencies),
                                          "output": len(readers[signal, 1].latencies)}}
    first = per_signal[signals[0]]
    assert isinstance(first, dict)
    return {**first, "signals": per_signal, "worker_cpu_percent": round(100 * cpu, 1), "sent": total}


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
    parser.add_argument("--signals", nargs="+", default=["traces"], choices=list(_SAMPLES),
                        help="a record of each per tick, into one worker (as deployed: all three)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kotel-hop-") as work:
        for stage in (["dedup", "route"] if args.stage == "both" else [args.stage]):
            result = results[stage] = run_stage(args, stage, Path(work))
            signals = result["signals"]
            assert isinstance(signals, dict)
            for signal, figures in signals.items():
                print(f"{stage:5s} {signal:7s} adds {figures['stage_added_p50_ms']} ms (p50); output "
                      f"{_line(figures['output_ms'])}, input floor {_line(figures['input_floor_ms'])}",
                      flush=True)
            print(f"{stage:5s} worker CPU {result['worker_cpu_percent']}%", flush=True)
    machine = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
