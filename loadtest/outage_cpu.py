"""What a stage worker costs while its broker is away: CPU seconds and log lines over an outage.

Run: .venv/bin/python -m loadtest.outage_cpu [--seconds 25]

Starts a throwaway broker (ports picked at runtime, state in a temporary directory), fresh topics, one
``kotel worker dedup`` and a producer of small trace records (~400/s), stops the broker for
--seconds, and prints the worker's CPU time and the lines it logged meanwhile; then the broker comes
back for a few seconds and everything stops. A script, not a test: nothing is asserted. Bounded: about
--seconds + 60 s.

Measured 2026-11-26 (loadtest/results/stages.md): before aiokafka's metadata retries were paced, a dedup
worker burnt a whole core (25.3 s of CPU in 25 s, ~2,000 metadata attempts a second).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kotel.otlp import Signal
from kotel.supervisor import free_ports
from loadtest.bench_support import TOPOLOGY_HEAD, Worker, backlog_producer, deploy, start_worker


def _records(stop: threading.Event, bootstrap: str, topic: str) -> None:
    producer = backlog_producer(bootstrap)
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    n = 0
    while not stop.is_set():
        del spans[:]
        spans.add(trace_id=n.to_bytes(16, "big"), span_id=(n + 1).to_bytes(8, "big"), name="x",
                  start_time_unix_nano=1, end_time_unix_nano=2)
        producer.produce(topic, request.SerializeToString(), key=b"i-%d" % (n % 7))
        producer.poll(0)
        n += 1
        time.sleep(0.0025)
    producer.flush(5)


def _cpu(worker: Worker) -> float:
    times = worker.proc.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=25.0, help="how long the broker stays away")
    args = parser.parse_args()
    from kotel.kafka.broker import BrokerSettings, KafkaBroker

    with tempfile.TemporaryDirectory(prefix="kotel-outage-cpu-") as tmp:
        work = Path(tmp)
        port, controller = free_ports(2)
        broker = KafkaBroker(BrokerSettings.from_env(port=port, controller_port=controller,
                                                     state_dir=work / "kafka"))
        broker.start(timeout=120)
        stop = threading.Event()
        worker = None
        try:
            template = TOPOLOGY_HEAD + "    dedup: {{window: 5m}}\n"
            path, topology = deploy(broker.settings.bootstrap, work, template, "oc", partitions=3)
            worker = start_worker("dedup", path, work)
            feeder = threading.Thread(target=_records, daemon=True,
                                      args=(stop, broker.settings.bootstrap,
                                            topology.topic_names.raw(Signal.TRACES)))
            feeder.start()
            time.sleep(8)
            broker.stop()
            log = work / "worker.log"
            lines, cpu = len(log.read_bytes().splitlines()), _cpu(worker)
            time.sleep(args.seconds)
            lines, cpu = len(log.read_bytes().splitlines()) - lines, _cpu(worker) - cpu
            print(f"dedup worker, broker away {args.seconds:.0f} s: CPU {cpu:.2f} s "
                  f"({100 * cpu / args.seconds:.0f} % of a core), {lines} log lines")
            broker.start(timeout=120)
            time.sleep(5)
        finally:
            stop.set()
            if worker is not None:
                worker.stop()
            broker.stop()


if __name__ == "__main__":
    main()
