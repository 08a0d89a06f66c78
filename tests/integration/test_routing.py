"""The routing worker (`kotel worker route`, a subprocess) against the session broker.

Three tenants, an unknown one, a record mixing tenants, a tenant whose topic is missing and a value
that is not OTLP go in; every item must come out exactly once in the right topic, with its key and
headers, the input offsets committed, and the worker's counters saying the same.
"""

from __future__ import annotations

import re
import signal as signals
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from kotel.kafka.admin import create_topics
from kotel.otlp import Signal, decode_protobuf
from kotel.topology import Topology, parse_topology
from tests.unit.otlp_builders import build, gauge, items, log, span

TOPOLOGY = """
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics:
  prefix: "{prefix}"
  create_tenant_topics_on_first_use: {create}
  defaults: {{partitions: 2}}
  tenant: {{partitions: 3, retention: 2h}}
gateway:
  processors:
    dedup: {{}}
    tail_sampling: {{policies: [{{name: all, type: always_sample}}]}}
    routing:
      table:
        - {{value: tenant-a, exporters: [file/archive]}}
        - {{value: tenant-b, exporters: [file/archive]}}
        - {{value: tenant-c, exporters: [file/archive]}}
        - {{value: tenant-d, exporters: [file/archive]}}
  exporters:
    file/archive: {{path: "{archive}"}}
"""
HEADERS = [("kotel.signal", b"traces"), ("kotel.schema", b"otlp-proto-v1"), ("kotel.agent", b"node-1")]


@dataclass
class Out:
    key: bytes
    value: bytes
    headers: dict[str, bytes]


class Setup:
    def __init__(self, bootstrap: str, tmp: Path, create: bool) -> None:
        self.bootstrap, self.tmp = bootstrap, tmp
        self.prefix = f"r{uuid.uuid4().hex[:8]}"
        self.file = tmp / "topology.yaml"
        self.file.write_text(TOPOLOGY.format(bootstrap=bootstrap, prefix=self.prefix,
                                             create=str(create).lower(), archive=tmp / "archive"))
        self.topology: Topology = parse_topology(self.file.read_text())
        self.names = self.topology.topic_names
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})

    def apply(self, without: tuple[str, ...]) -> None:
        create_topics(self.admin, [t for t in self.topology.planned_topics()
                                   if not any(w in t.name for w in without)])

    def produce(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.producer.produce(topic, value, key=key, headers=headers)

    def topics(self) -> list[str]:
        return [t for t in self.admin.list_topics(timeout=10).topics if t.startswith(self.prefix + ".")]

    def read(self, topic: str) -> list[Out]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                             "enable.auto.commit": False})
        try:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in meta.partitions}
            consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end])
            out: list[Out] = []
            deadline = time.monotonic() + 20
            while len(out) < sum(ends.values()) and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and not msg.error():
                    out.append(Out(msg.key(), msg.value(), dict(msg.headers() or [])))
            return out
        finally:
            consumer.close()

    def size(self, topic: str) -> int:
        """Records in ``topic`` (0 when it does not exist, -1 while its partitions have no leader yet)."""
        meta = self.admin.list_topics(topic=topic, timeout=10).topics[topic]
        if meta.error is not None:
            return 0
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "sizes"})
        try:
            return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                       for p in meta.partitions)
        except KafkaException:
            return -1
        finally:
            consumer.close()

    def wait_sizes(self, expected: dict[str, int], timeout: float = 60.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            sizes = {topic: self.size(topic) for topic in expected}
            if sizes == expected or time.monotonic() > deadline:
                return sizes
            time.sleep(0.5)

    def committed(self, topics: list[str]) -> tuple[int, int]:
        """(sum of the route group's committed offsets, sum of the end offsets) over ``topics``."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"kotel-{self.prefix}-route"})
        try:
            parts = [TopicPartition(t, p) for t in topics
                     for p in self.admin.list_topics(topic=t, timeout=10).topics[t].partitions]
            done = sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
            ends = sum(consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts)
            return done, ends
        finally:
            consumer.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Any]:
    """Starts `kotel worker route` for a Setup; SIGTERM at the end (SIGKILL if it hangs)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(setup: Setup, name: str = "worker") -> subprocess.Popen[bytes]:
        data = setup.tmp / name
        log_file = (setup.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "route", "--topology",
                                 str(setup.file), "--data-dir", str(data)], stdout=log_file, stderr=log_file)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signals.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signals.SIGTERM)
    return proc.wait(30)


def metric(setup: Setup, name: str, **labels: str) -> float:
    port = int((setup.tmp / "worker" / "web_port").read_text())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def spans(*names: str) -> list[Any]:
    return [span(n) for n in names]


def resource(tenant: str | None, scope: list[Any]) -> tuple[dict[str, Any], list[list[Any]]]:
    attrs: dict[str, Any] = {"service.name": "shop"}
    if tenant is not None:
        attrs["tenant"] = tenant
    return attrs, [scope]


def names(signal: Signal, value: bytes) -> list[str]:
    found = items(signal, decode_protobuf(signal, value))
    return [i.body.string_value for i in found] if signal is Signal.LOGS else [i.name for i in found]


def test_tenants_unknown_mixed_missing_topic_and_invalid_records(kafka_bootstrap: str, tmp_path: Path,
                                                                  worker: Any) -> None:
    s = Setup(kafka_bootstrap, tmp_path, create=False)
    s.apply(without=(".tenant.tenant-d.",))
    n = s.names
    sampled = [("a1", "a2", "a3"), ("a4",)]
    mixed = build(Signal.TRACES, resource("tenant-a", spans("m-a1", "m-a2")),
                  resource("tenant-b", spans("m-b1", "m-b2", "m-b3")), resource("tenant-x", spans("m-x1")),
                  resource(None, spans("m-n1", "m-n2")), resource("tenant-d", spans("m-d1")),
                  resource("tenant-a", spans("m-a3"))).SerializeToString()
    for batch in sampled:  # agent-style: one tenant, header set
        value = build(Signal.TRACES, resource("tenant-a", spans(*batch))).SerializeToString()
        s.produce(n.sampled_traces, "svc-a", value, [("kotel.tenant", b"tenant-a"), *HEADERS])
    s.produce(n.sampled_traces, "svc-mixed", mixed, [("kotel.tenant", b""), *HEADERS, ("kotel.seq", b"7")])
    # Tail sampling is configured, so deduped traces are not routing's input.
    s.produce(n.deduped("traces"), "svc-a", build(Signal.TRACES, resource("tenant-a", spans("not-me")))
              .SerializeToString(), [("kotel.tenant", b"tenant-a")])
    metrics = build(Signal.METRICS, ({"tenant": "tenant-b"}, [[gauge("g", {"p": 1}, {"p": 2}, {"p": 3})]]))
    s.produce(n.deduped("metrics"), "svc-b", metrics.SerializeToString(), [])  # Collector-style: no header
    for tenant, body in (("tenant-c", "c1"), ("tenant-x", "x1")):
        value = build(Signal.LOGS, ({"tenant": tenant}, [[log(body)]])).SerializeToString()
        s.produce(n.deduped("logs"), f"svc-{tenant}", value, [("kotel.tenant", tenant.encode())])
    s.produce(n.deduped("logs"), "svc-bad", b"\xff\xfe not otlp",
              [("kotel.tenant", b""), ("kotel.seq", b"9")])
    s.producer.flush(10)

    proc = worker(s)
    expected = {n.tenant("tenant-a", "traces"): 3, n.tenant("tenant-b", "traces"): 1,
                n.tenant("tenant-b", "metrics"): 1, n.tenant("tenant-c", "logs"): 1,
                n.unrouted("traces"): 2, n.unrouted("logs"): 1, n.deadletter: 2}
    assert s.wait_sizes(expected) == expected
    inputs = [n.sampled_traces, n.deduped("metrics"), n.deduped("logs")]
    deadline = time.monotonic() + 20
    while (done := s.committed(inputs))[0] < done[1] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert done == (7, 7)  # 3 sampled traces, 1 metrics and 3 logs records, all committed
    assert metric(s, "kotel_routing_routed_records_total", signal="traces", tenant="tenant-a") == 3
    assert metric(s, "kotel_routing_split_records_total", signal="traces") == 1
    assert metric(s, "kotel_routing_unrouted_records_total", signal="traces", reason="missing") == 1
    assert metric(s, "kotel_routing_unrouted_records_total", signal="logs", reason="unknown") == 1
    assert metric(s, "kotel_routing_dead_lettered_records_total", signal="traces", tenant="tenant-d",
                  reason="missing_tenant_topic") == 1
    assert metric(s, "kotel_routing_dead_lettered_records_total", signal="logs", tenant="",
                  reason="invalid_otlp") == 1
    assert stop(proc) == 0
    assert s.wait_sizes(expected, timeout=1) == expected  # and nothing more came after
    assert s.size(n.deduped("traces")) == 1

    a = s.read(n.tenant("tenant-a", "traces"))
    assert sorted(x for o in a for x in names(Signal.TRACES, o.value)) == ["a1", "a2", "a3", "a4", "m-a1",
                                                                          "m-a2", "m-a3"]
    assert {o.headers["kotel.tenant"] for o in a} == {b"tenant-a"}
    (mixed_a,) = [o for o in a if o.key == b"svc-mixed"]
    assert mixed_a.headers == {"kotel.tenant": b"tenant-a", **dict(HEADERS), "kotel.seq": b"7"}
    (b,) = s.read(n.tenant("tenant-b", "traces"))
    assert (b.key, names(Signal.TRACES, b.value), b.headers["kotel.seq"]) == (
        b"svc-mixed", ["m-b1", "m-b2", "m-b3"], b"7")
    unrouted = {o.headers.get("kotel.tenant", b""): o for o in s.read(n.unrouted("traces"))}
    assert {t: names(Signal.TRACES, o.value) for t, o in unrouted.items()} == {
        b"tenant-x": ["m-x1"], b"": ["m-n1", "m-n2"]}
    assert {o.key for o in unrouted.values()} == {b"svc-mixed"}
    (metrics_out,) = s.read(n.tenant("tenant-b", "metrics"))
    assert metrics_out.value == metrics.SerializeToString()  # a one-tenant record goes on as it was
    assert metrics_out.headers == {"kotel.tenant": b"tenant-b"}
    (c,) = s.read(n.tenant("tenant-c", "logs"))
    (x,) = s.read(n.unrouted("logs"))
    assert (names(Signal.LOGS, c.value), names(Signal.LOGS, x.value)) == (["c1"], ["x1"])

    dead = {o.key: o for o in s.read(n.deadletter)}
    d, bad = dead[b"svc-mixed"], dead[b"svc-bad"]
    assert names(Signal.TRACES, d.value) == ["m-d1"]
    assert d.headers["kotel.dlq.reason"] == (
        f"missing_tenant_topic: {n.tenant('tenant-d', 'traces')} does not exist; create it with "
        f"`kotel topology apply` or set topics.create_tenant_topics_on_first_use").encode()
    assert (d.headers["kotel.tenant"], d.headers["kotel.dlq.topic"]) == (
        b"tenant-d", n.sampled_traces.encode())
    assert bad.value == b"\xff\xfe not otlp"
    assert bad.headers == {
        "kotel.tenant": b"", "kotel.seq": b"9", "kotel.dlq.topic": n.deduped("logs").encode(),
        "kotel.dlq.reason": b"invalid OTLP/protobuf ExportLogsServiceRequest: malformed wire format "
                            b"(truncated, or not a protobuf message)",
        "kotel.dlq.partition": bad.headers["kotel.dlq.partition"], "kotel.dlq.offset": b"0"}
    assert n.tenant("tenant-d", "traces") not in s.topics()


def test_tenant_topics_are_created_on_first_use_with_the_topology_settings(
        kafka_bootstrap: str, tmp_path: Path, worker: Any) -> None:
    s = Setup(kafka_bootstrap, tmp_path, create=True)
    s.apply(without=(".tenant.",))
    n = s.names
    mixed = build(Signal.TRACES, resource("tenant-a", spans("a1", "a2")), resource("tenant-b", spans("b1")))
    s.produce(n.sampled_traces, "svc", mixed.SerializeToString(), list(HEADERS))
    s.produce(n.deduped("logs"), "svc", build(Signal.LOGS, ({"tenant": "tenant-b"}, [[log("l1"), log("l2")]]))
              .SerializeToString(), [("kotel.tenant", b"tenant-b")])
    s.producer.flush(10)
    assert not [t for t in s.topics() if ".tenant." in t]

    proc = worker(s)
    expected = {n.tenant("tenant-a", "traces"): 1, n.tenant("tenant-b", "traces"): 1,
                n.tenant("tenant-b", "logs"): 1}
    assert s.wait_sizes(expected) == expected
    assert stop(proc) == 0

    created = sorted(t for t in s.topics() if ".tenant." in t)
    assert created == sorted(expected)  # only the tenants and signals that were used
    meta = s.admin.list_topics(timeout=10).topics
    assert {t: len(meta[t].partitions) for t in created} == dict.fromkeys(created, 3)
    configs = s.admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in created])
    assert {r.name: f.result(10)["retention.ms"].value for r, f in configs.items()} == dict.fromkeys(
        created, "7200000")
    (a,) = s.read(n.tenant("tenant-a", "traces"))
    (logs,) = s.read(n.tenant("tenant-b", "logs"))
    assert (names(Signal.TRACES, a.value), names(Signal.LOGS, logs.value)) == (["a1", "a2"], ["l1", "l2"])


def test_a_worker_joining_and_one_leaving_lose_and_repeat_nothing(kafka_bootstrap: str, tmp_path: Path,
                                                                   worker: Any) -> None:
    """Both rebalances are graceful: the leaving worker finishes what it began and commits it, and what it
    had polled but not begun is read again by the other, so every record comes out exactly once."""
    s = Setup(kafka_bootstrap, tmp_path, create=False)
    s.apply(without=())
    n = s.names
    sent = [f"l-{i}" for i in range(240)]

    def feed() -> None:
        for i, body in enumerate(sent):
            value = build(Signal.LOGS, ({"tenant": "tenant-a"}, [[log(body)]])).SerializeToString()
            s.produce(n.deduped("logs"), f"svc-{i % 5}", value, [("kotel.tenant", b"tenant-a")])
            s.producer.poll(0)
            time.sleep(0.04)  # ~10 s of records, across both rebalances
        s.producer.flush(10)

    first = worker(s, "w1")
    feeder = threading.Thread(target=feed)
    feeder.start()
    time.sleep(2.5)
    second = worker(s, "w2")
    time.sleep(4.0)
    assert stop(first) == 0
    feeder.join(30)
    topic = n.tenant("tenant-a", "logs")
    assert s.wait_sizes({topic: len(sent)}) == {topic: len(sent)}
    deadline = time.monotonic() + 30
    while (done := s.committed([n.deduped("logs")]))[0] < done[1] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert done == (len(sent), len(sent))
    got = [body for out in s.read(topic) for body in names(Signal.LOGS, out.value)]
    assert sorted(got) == sorted(sent)  # none lost, none twice
    assert stop(second) == 0
    log_text = (tmp_path / "w2.log").read_text()
    assert "revoked" in log_text and log_text.count("assigned") >= 2  # it did take over


def test_an_output_the_broker_refuses_ends_the_worker_before_its_input_is_committed(
        kafka_bootstrap: str, tmp_path: Path, worker: Any) -> None:
    s = Setup(kafka_bootstrap, tmp_path, create=False)
    s.apply(without=())
    n = s.names
    topic = n.tenant("tenant-a", "logs")
    resource_ = ConfigResource(ResourceType.TOPIC, topic, set_config={"max.message.bytes": "2048"})
    for future in s.admin.alter_configs([resource_]).values():
        future.result(10)
    small = build(Signal.LOGS, ({"tenant": "tenant-a"}, [[log("fits")]])).SerializeToString()
    large = build(Signal.LOGS, ({"tenant": "tenant-a"}, [[log("x" * 20000)]])).SerializeToString()
    proc = worker(s)
    for value in (small, large):  # one after the other: in one batch the broker would refuse both
        s.producer.produce(n.deduped("logs"), value, key="svc", partition=0,
                           headers=[("kotel.tenant", b"tenant-a")])
        s.producer.flush(10)
        if value is small:
            assert s.wait_sizes({topic: 1}) == {topic: 1}
    assert proc.wait(60) == 70  # EX_SOFTWARE: nothing after the refused output may be committed
    assert "was not acknowledged" in (tmp_path / "worker.log").read_text()
    assert s.committed([n.deduped("logs")]) == (1, 2)  # the record before it, not the refused one
    (out,) = s.read(topic)
    assert names(Signal.LOGS, out.value) == ["fits"]


def test_a_topology_without_routing_exits_2_with_the_reason(tmp_path: Path) -> None:
    topology = tmp_path / "topology.yaml"
    topology.write_text("kafka: {bootstrap_servers: '127.0.0.1:9'}\n")
    command = [sys.executable, "-m", "streams.cli", "worker", "route", "--topology", str(topology),
               "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "has no routing processor under gateway.processors" in done.stderr
