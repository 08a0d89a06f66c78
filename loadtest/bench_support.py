"""What the stage benchmarks (dedup_bench, tail_bench) share, so each of them is only its traffic and
its phases: a fresh deployment on a running broker, one ``kotel worker <stage>`` child process read
through its own /metrics, and a producer sized for backlogs of GBs.

Scripts' helpers, not a library: they print and raise SystemExit rather than return errors.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from kotel.kafka.admin import create_topics
from kotel.supervisor import free_ports
from kotel.topology import Topology, parse_topology

# The start of every bench topology: a template for str.format (bootstrap, prefix, partitions) to which
# a bench appends its processor block, indented by four spaces.
TOPOLOGY_HEAD = """
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics: {{prefix: "{prefix}", defaults: {{partitions: {partitions}}}}}
gateway:
  processors:
"""


def metric_in(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a /metrics text whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if (line.startswith(name + "{") or line.startswith(name + " "))
               and all(w in line for w in want))


@dataclass
class Worker:
    """A stage worker started by `start_worker`; its timeouts are the stage's (tail answers slower)."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    scrape_timeout: float = 5.0
    stop_timeout: float = 30.0

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``; 0 while /metrics does not
        answer, so a busy worker slows a sampling loop down instead of ending the bench."""
        return metric_in(self.scrape(), name, **labels)

    def scrape(self) -> str:
        """The worker's /metrics text ('' while it does not answer): one snapshot for related figures."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=self.scrape_timeout) as response:
                return response.read().decode()
        except OSError:
            return ""

    @property
    def proc(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def stop(self) -> None:
        """SIGTERM (commits and leaves the group), SIGKILL if it has not exited after ``stop_timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def deploy(bootstrap: str, work: Path, template: str, stem: str, **values: object) -> tuple[Path, Topology]:
    """``template`` under a fresh prefix (``stem`` + 6 hex digits) written to ``work`` and its topics
    created: every phase starts from empty topics and consumer groups."""
    prefix = f"{stem}{uuid.uuid4().hex[:6]}"
    text = template.format(bootstrap=bootstrap, prefix=prefix, **values)
    path = work / f"{prefix}.yaml"
    path.write_text(text, encoding="utf-8")
    topology = parse_topology(text)
    create_topics(AdminClient({"bootstrap.servers": bootstrap}), topology.planned_topics())
    return path, topology


def start_worker(stage: str, topology: Path, work: Path, data: Path | None = None, *,
                 ready_within: float = 60.0, scrape_timeout: float = 5.0,
                 stop_timeout: float = 30.0) -> Worker:
    """``kotel worker <stage>`` as a child process logging to ``work``/worker.log, with a data dir of its
    own unless ``data`` (a previous worker's) is given; returns once /metrics answers or after
    ``ready_within`` seconds, and exits the bench if the worker dies first."""
    port, data = free_ports(1)[0], data or work / f"data-{uuid.uuid4().hex[:6]}"
    log = (work / "worker.log").open("ab")
    command = [sys.executable, "-m", "kotel.cli", "worker", stage, "--topology", str(topology),
               "--data-dir", str(data), "--web-port", str(port), "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    worker = Worker(process, port, data, scrape_timeout, stop_timeout)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the worker exited; see {work / 'worker.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)
    return worker


def backlog_producer(bootstrap: str) -> Producer:
    """Idempotent, batching, with room for 16 MiB records and a 1 GiB local queue: a backlog is produced
    faster than the broker takes it."""
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
                     "message.max.bytes": 16 * 1024 * 1024, "queue.buffering.max.kbytes": 1024 * 1024})


def disk_bytes(path: Path) -> int:
    """What a worker's state takes on disk (RocksDB files under its data dir)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prefix_of(topology: Path) -> str:
    """The topic prefix of a topology file written by `deploy`."""
    return parse_topology(topology.read_text(encoding="utf-8")).topics.prefix


def drop_topics(bootstrap: str | dict[str, Any], prefix: str) -> None:
    """A phase's topics (GBs of records) and the ones the stages made for it (changelogs, the assignor's
    leader topic): on a broker that outlives the bench, leftovers pile up partitions for every run (a
    broker with ~1,150 of them slowed the latency scenario: loadtest/results/scenarios.md).
    ``bootstrap`` is host:port or a librdkafka configuration."""
    config = {"bootstrap.servers": bootstrap} if isinstance(bootstrap, str) else dict(bootstrap)
    admin = AdminClient({**config, "log_level": 4})  # no info lines at exit
    ours = (f"{prefix}.", f"kotel-{prefix}-")
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(ours)]
    for future in admin.delete_topics(names).values() if names else ():
        try:
            future.result(60)
        except Exception as exc:  # a leftover topic is only worth a line
            print(f"  could not delete a topic: {exc}")
