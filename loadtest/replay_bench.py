"""Replay rate from a topic into the Parquet archive: records/s and spans/s of `kotel replay`.

Run: .venv/bin/python -m loadtest.replay_bench [--bootstrap HOST:PORT | --start-broker] [--records 10000]
     [--spans 200] [--partitions 3] [--batch 5000]
Fills a fresh topic with ``--records`` OTLP trace requests of ``--spans`` spans each (64 pre-encoded
variants of an instrumented service's shape, tenant/signal headers as the agent writes them), then runs
``python -m streams.replay.cli --topic T --to-parquet DIR --json --quiet`` as a child process: the
same command a user runs, so its own process start, planning and final fsyncs are in the wall figure.
Prints the replay loop's rate (from the command's JSON summary), the wall rate, the child's CPU, and
checks that the archive holds every record. Nothing is asserted beyond that: a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kotel.kafka.broker import BrokerSettings, KafkaBroker
from kotel.otlp import samples

VARIANTS = 64  # distinct requests: enough that the archive's zstd cannot fold them into a few frames


def fill(bootstrap: str, topic: str, partitions: int, records: int, spans: int) -> tuple[float, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
    values = [samples.traces(spans, seed=seed).SerializeToString() for seed in range(VARIANTS)]
    headers = [("kotel.tenant", b"acme"), ("kotel.signal", b"traces"), ("kotel.schema", b"otlp-proto-v1")]
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "compression.type": "lz4",
            "enable.idempotence": True,
        }
    )
    started = time.monotonic()
    for i in range(records):
        while True:
            try:
                producer.produce(topic, values[i % VARIANTS], f"shop-{i % 64:04d}".encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(120) != 0:
        raise RuntimeError("the broker did not acknowledge every record")
    return time.monotonic() - started, len(values[0])


def replay(
    bootstrap: str, topic: str, archive: Path, batch: int, home: Path
) -> tuple[dict[str, Any], float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streams.replay.cli",
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--to-parquet",
            str(archive),
            "--batch",
            str(batch),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "KOTEL_HOME": str(home)},
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"kotel replay failed ({done.returncode}): {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout), wall, cpu


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="kotel-replay-bench-"))
    topic = f"bench{uuid.uuid4().hex[:6]}.tenant.acme.traces"
    try:
        fill_s, record_bytes = fill(args.bootstrap, topic, args.partitions, args.records, args.spans)
        print(
            f"filled {topic}: {args.records:,} records x {args.spans} spans ({record_bytes:,} bytes each) "
            f"in {fill_s:.1f}s",
            flush=True,
        )
        summary, wall, cpu = replay(args.bootstrap, topic, work / "archive", args.batch, work / "home")
        rows = ds.dataset(str(work / "archive"), format="parquet", partitioning="hive").count_rows()
        totals, loop = summary["totals"], summary["seconds"]
        archive_mib = sum(p.stat().st_size for p in (work / "archive").rglob("*.parquet")) / 2**20
        result = {
            "records": totals["records"],
            "spans": totals["items"],
            "archive_rows": rows,
            "loop_seconds": loop,
            "wall_seconds": round(wall, 2),
            "child_cpu_seconds": round(cpu, 2),
            "records_per_s": round(totals["records"] / loop),
            "spans_per_s": round(totals["items"] / loop),
            "wall_spans_per_s": round(totals["items"] / wall),
            "archive_mib": round(archive_mib, 1),
            "cpu_spans_per_s": round(totals["items"] / cpu) if cpu else None,
        }
        if rows != args.records or totals["items"] != args.records * args.spans:
            raise RuntimeError(f"the archive holds {rows} rows for {args.records} records: {result}")
        print(
            f"replay -> archive: {result['records_per_s']:,} records/s, {result['spans_per_s']:,} spans/s "
            f"(loop {loop:.2f}s; wall {wall:.2f}s incl. process start = "
            f"{result['wall_spans_per_s']:,} spans/s; child CPU {cpu:.1f}s)",
            flush=True,
        )
        return result
    finally:
        try:
            admin = AdminClient({"bootstrap.servers": args.bootstrap})
            admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
        except Exception as exc:  # the figures stand; say what was left behind
            print(f"could not delete {topic}: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KOTEL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument(
        "--start-broker",
        action="store_true",
        help="start a throwaway broker on free ports for the run (needs Java 17+)",
    )
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--spans", type=int, default=200, help="spans per record (one agent batch per key)")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=5000, help="records per replay chunk (--batch)")
    args = parser.parse_args()
    broker = None
    if args.start_broker:
        broker = _start_broker()
        args.bootstrap = broker.settings.bootstrap
    try:
        result = run(args)
    finally:
        if broker is not None:
            broker.stop()
            shutil.rmtree(broker.settings.state_dir, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps({"machine": machine, "args": vars(args), "result": result}, indent=2))


def _start_broker() -> KafkaBroker:
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    state = Path(tempfile.mkdtemp(prefix="kotel-replay-bench-kafka-"))
    broker = KafkaBroker(BrokerSettings.from_env(port=ports[0], controller_port=ports[1], state_dir=state))
    broker.start(timeout=120)
    return broker


if __name__ == "__main__":
    main()
