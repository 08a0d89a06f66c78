"""Helpers for stream-stage tests: a topology per test, its topics, records in and out, workers as processes.

Every stage test runs real ``kotel worker <stage>`` processes (``python -m streams.cli worker ...``) against
the session broker, each with its own data dir, log file and metrics port, and stops them at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from kotel.kafka.admin import create_topics
from kotel.topology import Topology, parse_topology
from tests.integration.conftest import free_ports

REPO = Path(__file__).resolve().parents[2]
Headers = list[tuple[str, bytes]]
Record = tuple[bytes | None, bytes, Headers]  # key, value, headers

TEMPLATE = """
kafka: {{bootstrap_servers: "{bootstrap}", client_id: "{prefix}"}}
topics: {{prefix: "{prefix}", defaults: {{partitions: {partitions}}}}}
gateway:
{gateway}
"""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class StageEnv:
    """One test's deployment: a unique topic prefix, its topology file and topics, and its workers."""

    bootstrap: str
    tmp: Path
    gateway: str  # the YAML body of the gateway section, indented by two spaces
    partitions: int = 3
    prefix: str = field(default_factory=lambda: f"s{uuid.uuid4().hex[:8]}")
    workers: list[StageWorker] = field(default_factory=list)

    def yaml(self) -> str:
        return TEMPLATE.format(bootstrap=self.bootstrap, prefix=self.prefix, partitions=self.partitions,
                               gateway=self.gateway)

    @property
    def topology(self) -> Topology:
        return parse_topology(self.yaml())

    @property
    def topology_file(self) -> Path:
        path = self.tmp / f"{self.prefix}.yaml"
        if not path.exists():
            path.write_text(self.yaml(), encoding="utf-8")
        return path

    def create_topics(self) -> None:
        create_topics(AdminClient({"bootstrap.servers": self.bootstrap}), self.topology.planned_topics())

    def worker(self, stage: str, name: str = "w1") -> StageWorker:
        """A worker process (not started) with its own data dir under the test's tmp dir."""
        worker = StageWorker(stage, self.topology_file, self.tmp / f"{name}-data", self.tmp / f"{name}.log")
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()

    def end_offsets(self, topic: str) -> int:
        """The sum of ``topic``'s end offsets: how many records it ever had."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
        try:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                       for p in meta.partitions)
        finally:
            consumer.close()

    def committed(self, stage: str, topic: str) -> int:
        """The sum of the offsets the ``stage`` workers (group ``kotel-<prefix>-<stage>``) committed on
        ``topic``, a partition without a commit counting 0: `end_offsets` once they processed it all."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"kotel-{self.prefix}-{stage}"})
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            return sum(max(tp.offset, 0) for tp in offsets)
        finally:
            consumer.close()

    def __enter__(self) -> StageEnv:
        """Topics created on entry, workers stopped on exit: a test's deployment as one ``with`` block."""
        self.create_topics()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StageWorker:
    """``python -m streams.cli worker <stage>`` as a child process in its own session."""

    def __init__(self, stage: str, topology: Path, data_dir: Path, log_file: Path) -> None:
        self.stage, self.topology, self.data_dir, self.log_file = stage, topology, data_dir, log_file
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> StageWorker:
        command = [sys.executable, "-m", "streams.cli", "worker", self.stage, "--topology",
                   str(self.topology), "--data-dir", str(self.data_dir), "--web-port", str(self.port), *extra]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                            start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace") if self.log_file.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> StageWorker:
        """Until the worker reports ready (partitions assigned, state recovered)."""
        starts = self.log().count("Worker ready")

        def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.stage} worker exited; log:\n{self.log()[-4000:]}")
            return self.log().count("Worker ready") > starts or (starts == 0 and "Worker ready" in self.log())

        wait_until(ready, timeout, f"the {self.stage} worker to be ready")
        return self

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and wanted <= ls)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a host dies."""
        if self.alive:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: commit and leave the group), SIGKILL after ``timeout``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


@dataclass
class Out:
    key: bytes | None
    value: bytes
    headers: Headers
    partition: int
    offset: int
    timestamp: int


def produce(bootstrap: str, topic: str, records: Iterable[Record], timestamp: int | None = None) -> int:
    """Produce (key, value, headers) records idempotently and wait for all acks; returns the count."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5, "message.max.bytes": 16 * 1024 * 1024})
    count = 0
    for key, value, headers in records:
        kwargs = {"timestamp": timestamp} if timestamp is not None else {}
        producer.produce(topic, value, key=key, headers=headers, **kwargs)
        producer.poll(0)
        count += 1
    if producer.flush(30):
        raise AssertionError(f"records for {topic} not acknowledged in 30 s")
    return count


def read_all(bootstrap: str, topic: str, at_least: int = 0, timeout: float = 30.0,
             settle: float = 1.0) -> list[Out]:
    """Every record of ``topic`` from the start, in partition order; waits for ``at_least`` records,
    then until nothing new arrived for ``settle`` seconds."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[Out] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(out) >= at_least and time.monotonic() - quiet_since >= settle:
                    break
                continue
            if msg.error():
                continue
            quiet_since = time.monotonic()
            out.append(Out(msg.key(), msg.value(), list(msg.headers() or []), msg.partition(), msg.offset(),
                           msg.timestamp()[1]))
        return sorted(out, key=lambda o: (o.partition, o.offset))
    finally:
        consumer.close()


def headers_of(out: Out) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in out.headers}


class Feed:
    """Produces ``batch()`` to ``topic`` from a daemon thread for as long as its ``with`` block runs:
    traffic that keeps arriving while a test kills a worker. Each round is acknowledged before the next."""

    def __init__(self, bootstrap: str, topic: str, batch: Callable[[], Iterable[Record]]) -> None:
        self.bootstrap, self.topic, self.batch = bootstrap, topic, batch
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            produce(self.bootstrap, self.topic, self.batch())
            time.sleep(0.05)

    def __enter__(self) -> Feed:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
