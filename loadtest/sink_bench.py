"""Rate of one sink against its real backend: records produced into a tenant topic, drained by
`kotel sink` (a child process), timed until its committed offsets reach the end of the topic.

Run (the backend must be running; the e2e fixtures in loadtest/servers can start one):
  .venv/bin/python -m loadtest.sink_bench --sink prometheus --endpoint http://127.0.0.1:9090/api/v1/write
  .venv/bin/python -m loadtest.sink_bench --sink loki --endpoint http://127.0.0.1:9428/insert/loki/api/v1/push
  .venv/bin/python -m loadtest.sink_bench --sink tempo --endpoint 127.0.0.1:4317
  .venv/bin/python -m loadtest.sink_bench --sink archive --endpoint /tmp/archive
Prints records/s and items/s, and the sink's CPU and peak RSS. A script, not a test.
Each record comes from its own service instances (new series every record, the worst case for a
Prometheus sink's series cache and for Prometheus itself) unless `--instances N` reuses N instance ids,
as a steady fleet does.
"""

from __future__ import annotations

import argparse
import json
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
from kotel.otlp import Signal, count_items, samples
from kotel.topology import parse_topology

EXPORTERS = {
    "prometheus": ("prometheusremotewrite", "metrics", '{{endpoint: "{e}"}}'),
    "loki": ("loki", "logs", '{{endpoint: "{e}", tenant_header: {{values: {{tenant-a: "1"}}}}}}'),
    "tempo": ("otlp/tempo", "traces", '{{endpoint: "{e}", tls: {{insecure: true}}}}'),
    "archive": ("file/archive", "traces", '{{path: "{e}", mode: always}}'),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink", choices=sorted(EXPORTERS), required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--items", type=int, default=1000, help="items per record")
    parser.add_argument("--instances", type=int, default=0,
                        help="reuse this many service.instance.id values per service (0: new per record)")
    args = parser.parse_args()
    exporter, signal, options = EXPORTERS[args.sink]
    text = f"""
kafka: {{bootstrap_servers: "{args.bootstrap}"}}
topics: {{prefix: "sb{uuid.uuid4().hex[:6]}", defaults: {{partitions: 3}}}}
gateway:
  processors:
    routing:
      table: [{{value: tenant-a, exporters: ["{exporter}"]}}]
  exporters:
    "{exporter}": {options.format(e=args.endpoint)}
"""
    topology = parse_topology(text)
    create_topics(AdminClient({"bootstrap.servers": args.bootstrap}), topology.planned_topics())
    topic = topology.topic_names.tenant("tenant-a", signal)
    build = {"metrics": samples.metrics, "logs": samples.logs, "traces": samples.traces}[signal]
    now = time.time_ns()
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 20, "compression.type": "zstd"})
    items = 0
    for i in range(args.records):
        request = build(args.items, seed=i)
        if signal == "metrics":  # recent timestamps: Prometheus refuses samples far in the past
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        for dp in getattr(m, m.WhichOneof("data")).data_points:
                            dp.time_unix_nano = now - (args.records - i) * 1_000_000
                            if dp.start_time_unix_nano:
                                dp.start_time_unix_nano = now - 3_600 * 10**9
        if args.instances:  # ids end in the seed's last four digits: use i % instances instead
            for resource in getattr(request, Signal(signal).resource_field):
                for attribute in resource.resource.attributes:
                    if attribute.key == "service.instance.id":
                        instance = attribute.value.string_value
                        attribute.value.string_value = f"{instance[:-4]}{i % args.instances:04d}"
        items += count_items(request)
        producer.produce(
            topic,
            request.SerializeToString(),
            f"svc-{i % 8}".encode(),
            headers=[("kotel.tenant", b"tenant-a"), ("kotel.signal", signal.encode())],
        )
        producer.poll(0)
    producer.flush(60)
    workdir = Path(tempfile.mkdtemp(prefix="kotel-sink-bench-"))
    (workdir / "topology.yaml").write_text(text)
    started = time.monotonic()
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kotel.cli",
            "sink",
            exporter,
            "--topology",
            str(workdir / "topology.yaml"),
            "--log-level",
            "WARNING",
        ]
    )
    proc = psutil.Process(child.pid)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": topology.topic_names.sink_group(exporter),
        }
    )
    parts = [TopicPartition(topic, p) for p in range(3)]
    rss = 0
    try:
        while time.monotonic() - started < 600:
            rss = max(rss, proc.memory_info().rss)
            try:
                committed = sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
            except KafkaException:  # the group coordinator may still be loading on a fresh broker
                committed = -1
            if committed >= args.records:
                break
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        cpu = proc.cpu_times()
    finally:
        child.terminate()
        child.wait(30)
        consumer.close()
    result = {
        "sink": args.sink,
        "records": args.records,
        "items": items,
        "seconds": round(elapsed, 2),
        "records_per_s": round(args.records / elapsed),
        "items_per_s": round(items / elapsed),
        "sink_cpu_percent": round(100 * (cpu.user + cpu.system) / elapsed),
        "sink_rss_peak_mib": round(rss / 2**20, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
