"""`kotel replay` against the real broker: offsets, timestamps, group positions, into a topic, into the
Parquet archive sink and into the real Prometheus (old samples, its out-of-order window); kill -9 then
--resume; dry run = real run; dead letters out and re-driven back; bad input.

Every source record carries a unique ``id`` header, so "the target holds everything, nothing skipped"
is checked as set equality of ids, and exact per-partition counts as ``Counter``s of (partition, n).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agents.publish.spill import Spill, SpillRecord
from kotel.kafka.deadletter import dead_letter_headers
from kotel.otlp import samples
from kotel.otlp.attributes import kv
from kotel.topology import load_topology
from kotel.topology.exporters import FileExporterConfig
from loadtest.servers.prometheus import PrometheusServer
from streams.replay.cli import main
from streams.sinks.archive import ParquetArchive, read_archive
from streams.sinks.factory import SinkConfigError, build_deliverer
from streams.sinks.runtime import SinkRecord

Cap = pytest.CaptureFixture[str]
ROOT = Path(__file__).resolve().parents[2]
PARTITIONS, PER_PARTITION = 3, 40
BASE_MS = 1_717_200_000_000  # 2024-06-01T00:00:00Z; record i of a partition is stamped BASE_MS + i s
VALUE = samples.traces(5).SerializeToString()
HEADER = (
    "kotel replay: reading topic {} by manual partition assignment (no consumer group joined, no offset "
    "committed): live consumer groups are not disturbed"
)


@dataclass
class Env:
    bootstrap: str
    prefix: str
    admin: AdminClient
    home: Path

    def topic(self, name: str, partitions: int = PARTITIONS) -> str:
        full = f"{self.prefix}.{name}"
        # Records are stamped in 2024: without this the broker's retention check (every 5 min) may delete
        # them between producing and replaying.
        topic = NewTopic(full, partitions, 1, config={"retention.ms": "-1"})
        self.admin.create_topics([topic])[full].result(timeout=30)
        return full

    def run(self, *args: str, capsys: Cap) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--bootstrap", self.bootstrap, "--prefix", self.prefix, *args])
        out, err = capsys.readouterr()
        return code, out, err

    def run_json(self, *args: str, capsys: Cap) -> dict[str, Any]:
        code, out, err = self.run(*args, "--json", "--quiet", capsys=capsys)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def env(kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path / "home"))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    prefix = f"r{uuid.uuid4().hex[:8]}"
    e = Env(kafka_bootstrap, prefix, admin, tmp_path / "home")
    e.topic("deadletter", 1)
    yield e
    names = [n for n in admin.list_topics(timeout=15).topics if n.startswith(prefix + ".")]
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result(timeout=30)


def produce(bootstrap: str, topic: str, per_partition: int = PER_PARTITION) -> None:
    """``per_partition`` records per partition, ids ``p-i``, tenants alternating, stamped BASE_MS + i s."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for p in range(PARTITIONS):
        for i in range(per_partition):
            headers = [("kotel.tenant", b"acme" if i % 2 else b"beta"), ("kotel.signal", b"traces"),
                       ("id", f"{p}-{i}".encode())]
            producer.produce(topic, VALUE, f"k{i}".encode(), partition=p, headers=headers,
                             timestamp=BASE_MS + i * 1000)
    assert producer.flush(30) == 0


@dataclass(frozen=True)
class Got:
    partition: int
    offset: int
    headers: tuple[tuple[str, bytes], ...]

    @property
    def id(self) -> str:
        return dict(self.headers)["id"].decode()


def read_all(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> list[Got]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "enable.partition.eof": True,
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out: list[Got] = []
    ended: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(ended) < partitions and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        ended.add(msg.partition())
                    continue
                out.append(Got(msg.partition(), msg.offset(), tuple(msg.headers() or ())))
    finally:
        consumer.close()
    assert len(ended) == partitions, "did not reach the end of every partition"
    return out


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def test_by_offsets_into_a_topic_exact_per_partition(env: Env, capsys: Cap) -> None:
    src, dst = env.topic("raw.traces"), env.topic("copy")
    produce(env.bootstrap, src)
    code, out, err = env.run("--topic", src, "--from-offset", "0:5,2:30", "--to-offset", "0:25",
                             "--to-topic", dst, capsys=capsys)
    assert code == 0, err
    assert out.splitlines()[0] == HEADER.format(src)
    got = read_all(env.bootstrap, dst)
    # partition 0: offsets [5, 25); partition 2: [30, 40); partition 1 not named
    expected = [f"0-{i}" for i in range(5, 25)] + [f"2-{i}" for i in range(30, 40)]
    assert sorted(g.id for g in got) == sorted(expected)
    assert all(dict(g.headers)["kotel.signal"] == b"traces" for g in got)  # headers kept


def test_by_timestamps_into_the_parquet_archive_sink(env: Env, capsys: Cap,
                                                     tmp_path: Path) -> None:
    src = env.topic("tenant.acme.traces")
    produce(env.bootstrap, src)
    topology = tmp_path / "gateway.yaml"
    topology.write_text(f"""
kafka: {{bootstrap_servers: "{env.bootstrap}"}}
topics: {{prefix: "{env.prefix}"}}
gateway:
  processors:
    routing:
      table: [{{value: acme, exporters: [file/archive]}}]
  exporters:
    file/archive: {{path: "{tmp_path / "archive"}", format: parquet, mode: always}}
""")
    summary = env.run_json("--topic", src, "--from", iso(BASE_MS + 10_000), "--to", iso(BASE_MS + 20_000),
                           "--to-sink", "file/archive", "--topology", str(topology), capsys=capsys)
    table = read_archive(tmp_path / "archive")
    rows = Counter(table.column("partition").to_pylist())
    assert rows == {p: 10 for p in range(PARTITIONS)}  # records stamped [10 s, 20 s) of every partition
    assert sorted(set(table.column("offset").to_pylist())) == list(range(10, 20))
    assert set(table.column("items").to_pylist()) == {5}
    ranges = [(u["start"], u["end"], u["records"]) for u in summary["partitions"]]
    assert ranges == [(10, 20, 10)] * PARTITIONS
    assert summary["totals"]["first_timestamp"] == "2024-06-01T00:00:10.000Z"
    assert summary["totals"]["last_timestamp"] == "2024-06-01T00:00:19.000Z"


def test_dry_run_figures_equal_the_real_run(env: Env, capsys: Cap) -> None:
    src, dst = env.topic("raw.logs"), env.topic("copy")
    produce(env.bootstrap, src)
    args = ("--topic", src, "--from", iso(BASE_MS + 7_000), "--tenant", "acme", "--to-topic", dst)
    dry = env.run_json(*args, "--dry-run", capsys=capsys)
    assert read_all(env.bootstrap, dst) == []  # a dry run sends nothing
    real = env.run_json(*args, capsys=capsys)
    fields = ("unit", "start", "end", "records", "items", "skipped", "delivered", "first_offset",
              "last_offset", "first_timestamp", "last_timestamp")
    assert [{k: u[k] for k in fields} for u in dry["partitions"]] == [
        {k: u[k] for k in fields} for u in real["partitions"]]
    assert dry["totals"] == real["totals"]
    # acme: the odd i in [7, 40), 17 per partition
    assert real["totals"]["delivered"] == len(read_all(env.bootstrap, dst)) == 3 * 17
    assert real["totals"]["skipped"] == 3 * 16 and real["totals"]["items"] == 3 * 17 * 5


def test_from_a_group_position_without_disturbing_the_group(env: Env, capsys: Cap) -> None:
    src, dst = env.topic("deduped.traces"), env.topic("copy")
    produce(env.bootstrap, src)
    live = f"live-{env.prefix}"
    group = Consumer({"bootstrap.servers": env.bootstrap, "group.id": live, "enable.auto.commit": False})
    position = [TopicPartition(src, p, 30 + p) for p in range(PARTITIONS)]
    group.commit(offsets=position, asynchronous=False)
    group.close()

    summary = env.run_json("--topic", src, "--from-group", live, "--to-topic", dst, capsys=capsys)
    assert [u["records"] for u in summary["partitions"]] == [10, 9, 8]
    assert Counter(g.partition for g in read_all(env.bootstrap, dst)).total() == 27
    check = Consumer({"bootstrap.servers": env.bootstrap, "group.id": live})
    after = check.committed([TopicPartition(src, p) for p in range(PARTITIONS)], timeout=15)
    check.close()
    assert [tp.offset for tp in after] == [30, 31, 32]  # the live group's position is untouched
    groups = env.admin.list_consumer_groups().result(timeout=15).valid
    assert not [g.group_id for g in groups if g.group_id.startswith("kotel-replay-")]  # never joined a group


def test_kill_9_then_resume_delivers_everything(env: Env, capsys: Cap) -> None:
    src, dst = env.topic("raw.metrics"), env.topic("copy")
    produce(env.bootstrap, src, per_partition=100)
    checkpoint = env.home / "kill.json"
    args = ["--topic", src, "--to-topic", dst, "--checkpoint", str(checkpoint)]
    command = [sys.executable, "-m", "streams.replay.cli", "--bootstrap", env.bootstrap,
               "--prefix", env.prefix, *args, "--max-rate", "60", "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "KOTEL_HOME": str(env.home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until a few chunks are acknowledged, well before the end (5 s)
            if checkpoint.exists() and sum(u["next"] - u["start"] for u in _units(checkpoint)) >= 60:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler, no last checkpoint write
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = sum(u["next"] - u["start"] for u in _units(checkpoint))
    assert 60 <= done_before < 300, done_before
    before = read_all(env.bootstrap, dst)

    code, _out, err = env.run(*args, capsys=capsys)  # without --resume: refused, nothing sent
    assert code == 2
    assert err.strip() == (
        f"kotel replay: an unfinished replay of this job has a checkpoint at {checkpoint}: "
        "add --resume to continue it or --fresh to start over"
    )
    assert len(read_all(env.bootstrap, dst)) == len(before)

    summary = env.run_json(*args, "--resume", capsys=capsys)
    got = read_all(env.bootstrap, dst)
    assert {g.id for g in got} == {f"{p}-{i}" for p in range(PARTITIONS) for i in range(100)}  # none skipped
    assert len(got) - 300 <= 60  # repeats: at most the chunk(s) in flight when killed
    assert summary["complete"] and summary["totals"]["records"] == 300  # the totals of one uninterrupted run


def _units(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["units"]


def test_dead_letters_are_re_driven_to_their_origin_by_reason(env: Env, capsys: Cap) -> None:
    origin = env.topic("tenant.acme.metrics")
    dlq = f"{env.prefix}.deadletter"
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for i in range(12):
        reason = "prometheusremotewrite: 400 out of order sample" if i % 3 == 0 else "loki: 429 rate limited"
        original = [("kotel.tenant", b"acme"), ("id", f"d-{i}".encode())]
        headers = dead_letter_headers(reason, origin, i % 3, 100 + i, original)
        producer.produce(dlq, VALUE, f"k{i}".encode(), headers=headers)
    assert producer.flush(30) == 0
    summary = env.run_json("--topic", dlq, "--redrive", "--reason", "out of order", capsys=capsys)
    got = read_all(env.bootstrap, origin)
    assert sorted(g.id for g in got) == sorted(f"d-{i}" for i in range(0, 12, 3))
    assert all(not any(k.startswith("kotel.dlq.") for k, _ in g.headers) for g in got)
    assert all(dict(g.headers)["kotel.tenant"] == b"acme" for g in got)
    assert summary["totals"]["skipped"] == 8 and summary["totals"]["delivered"] == 4


def test_a_record_the_target_refuses_is_dead_lettered_and_the_replay_goes_on(
    env: Env, capsys: Cap
) -> None:
    src = env.topic("unrouted.logs", 1)
    dst = f"{env.prefix}.small"
    env.admin.create_topics([NewTopic(dst, 1, 1, config={"max.message.bytes": "4096"})])[dst].result(
        timeout=30
    )
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for i in range(8):  # incompressible values; 2, 5 and 6 are over the target topic's record size limit
        producer.produce(
            src, os.urandom(10_000 if i in (2, 5, 6) else 200), b"k", headers=[("id", b"%d" % i)]
        )
    assert producer.flush(30) == 0
    summary = env.run_json("--topic", src, "--to-topic", dst, capsys=capsys)
    assert (summary["totals"]["delivered"], summary["totals"]["dead_lettered"]) == (5, 3)
    assert sorted(g.id for g in read_all(env.bootstrap, dst, 1)) == ["0", "1", "3", "4", "7"]
    dead = read_all(env.bootstrap, f"{env.prefix}.deadletter", 1)
    assert sorted(g.id for g in dead) == ["2", "5", "6"]
    for g in dead:
        headers = {k: v.decode() for k, v in g.headers if k.startswith("kotel.dlq.")}
        assert headers["kotel.dlq.topic"] == src and headers["kotel.dlq.offset"] == g.id
        assert headers["kotel.dlq.reason"].startswith(f"replay to {dst}: MSG_SIZE_TOO_LARGE")


async def _write_spill(root: Path, topic: str, count: int) -> None:
    spill = Spill(FileExporterConfig(path=str(root)))
    spill.open()
    for start in range(0, count, 10):  # a part per submit: several files
        records = []
        for seq in range(start, min(start + 10, count)):
            headers = (("kotel.tenant", b"acme"), ("kotel.signal", b"traces"), ("id", f"s-{seq}".encode()))
            records.append(SpillRecord(seq, "traces", topic, f"svc-{seq % 4}", "acme", headers, VALUE))
        await spill.submit(records)
    await spill.close()


def test_a_spill_and_an_archive_replay_into_topics(env: Env, capsys: Cap,
                                                   tmp_path: Path) -> None:
    raw, copy = env.topic("raw.traces"), env.topic("copy")
    asyncio.run(_write_spill(tmp_path / "spill", raw, 25))
    code, out, err = env.run("--from-parquet", str(tmp_path / "spill"), "--to-origin", capsys=capsys)
    assert code == 0, err
    header = f"kotel replay: reading spill {tmp_path / 'spill'} (Parquet files, no Kafka consumer)"
    assert out.splitlines()[0] == header
    got = read_all(env.bootstrap, raw)
    assert sorted(g.id for g in got) == sorted(f"s-{i}" for i in range(25))  # to the topic each row names
    assert len({g.partition for g in got}) > 1  # spread by key like the agent's producer, not one partition

    archive = ParquetArchive("file/archive", FileExporterConfig(path=str(tmp_path / "archive")))
    # Without the tenant header, a row's tenant is its archive folder's.
    untagged = [tuple((k, v) for k, v in g.headers if k != "kotel.tenant") for g in got]
    tenants = ["acme" if i % 3 else "beta" for i in range(len(got))]
    rows = [SinkRecord(raw, g.partition, g.offset, b"k", VALUE, h, t, "traces", BASE_MS)
            for g, h, t in zip(got, untagged, tenants, strict=True)]
    asyncio.run(archive.deliver(rows))
    summary = env.run_json("--from-parquet", str(tmp_path / "archive"), "--tenant", "beta",
                           "--to-topic", copy, capsys=capsys)
    beta = {dict(r.headers)["id"] for i, r in enumerate(rows) if i % 3 == 0}
    assert summary["totals"]["delivered"] == len(beta) == 9
    assert {g.id for g in read_all(env.bootstrap, copy)} == {b.decode() for b in beta}
    assert summary["totals"]["skipped"] == 25 - len(beta)


def test_bad_input_exits_2_before_anything_is_sent(env: Env, capsys: Cap,
                                                   tmp_path: Path) -> None:
    src, dst = env.topic("raw.traces"), env.topic("copy")
    produce(env.bootstrap, src, per_partition=3)
    topology = tmp_path / "t.yaml"
    topology.write_text(f"""
kafka: {{bootstrap_servers: "{env.bootstrap}"}}
topics: {{prefix: "{env.prefix}"}}
gateway:
  exporters:
    file/archive: {{path: "{tmp_path / "archive"}"}}
""")
    cases = [
        (["--topic", f"{env.prefix}.nope"], f"topic '{env.prefix}.nope' does not exist"),
        (["--topic", src, "--from-offset", "3"], f"no records in the selected range of topic '{src}'"),
        (["--topic", src, "--from", "2024-06-02T00:00:00Z", "--to", "2024-06-01T00:00:00Z"],
         "--from 2024-06-02T00:00:00Z is later than --to 2024-06-01T00:00:00Z"),
        (["--topic", src, "--from", "yesterday"],
         "invalid time 'yesterday': expected ISO-8601 (2024-06-01T10:00:00Z) or relative (-30m, -2h, -1d)"),
        (["--topic", src, "--partitions", "0,7"],
         f"topic '{src}' has no partition 7 (it has partitions 0-2)"),
        (["--topic", src, "--from-group", "never-committed"],
         f"consumer group 'never-committed' has no committed offset on topic '{src}'"),
    ]
    for args, message in cases:
        code, out, err = env.run(*args, "--to-topic", dst, capsys=capsys)
        assert (code, err.strip(), out) == (2, f"kotel replay: {message}", ""), args
    for args, message in [
        (["--to-sink", "loki", "--topology", str(topology)], _sink_error(topology, "loki")),
        (["--to-topic", f"{env.prefix}.absent"], f"topic '{env.prefix}.absent' does not exist"),
        ([], "choose a target: --to-topic, --to-sink, --to-parquet, --to-origin or --redrive (or --dry-run)"),
    ]:
        code, out, err = env.run("--topic", src, *args, capsys=capsys)
        assert (code, err.strip(), out) == (2, f"kotel replay: {message}", ""), args
    assert read_all(env.bootstrap, dst) == []
    assert not (tmp_path / "archive").exists()


def _sink_error(topology: Path, name: str) -> str:
    """The factory's own words for a sink the topology lacks (the CLI passes them on unchanged)."""
    with pytest.raises(SinkConfigError) as err:
        build_deliverer(load_topology(topology), name)
    assert name in str(err.value) and "file/archive" in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """The real Prometheus (remote-write receiver on, 1h out-of-order window), for this module's test."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    try:
        server.start(timeout=60)
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def gauge_request(name: str, ts_s: float, value: float) -> bytes:
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    rm.resource.attributes.extend([kv("service.name", "billing"), kv("service.instance.id", "billing-1")])
    metric = rm.scope_metrics.add().metrics.add(name=name)
    metric.gauge.data_points.add(time_unix_nano=int(ts_s * 1e9), as_double=value)
    return request.SerializeToString()


@pytest.mark.e2e  # a real backend server besides the broker
def test_old_samples_replay_into_prometheus_within_its_out_of_order_window(
    env: Env, capsys: Cap, prometheus: PrometheusServer, tmp_path: Path
) -> None:
    src = env.topic("tenant.acme.metrics", 1)
    name = f"replay_probe_{env.prefix}"
    now = time.time()
    newer, older = now - 20 * 60, now - 40 * 60
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for ts, value in ((newer, 2.0), (older, 1.0)):  # the older sample comes second: behind the series' head
        value_bytes = gauge_request(name, ts, value)
        producer.produce(src, value_bytes, b"billing-1", headers=[("kotel.tenant", b"acme")])
    assert producer.flush(30) == 0
    topology = tmp_path / "prom.yaml"
    topology.write_text(f"""
kafka: {{bootstrap_servers: "{env.bootstrap}"}}
topics: {{prefix: "{env.prefix}"}}
gateway:
  exporters:
    prometheusremotewrite: {{endpoint: "{prometheus.remote_write_url}"}}
""")
    args = ("--topic", src, "--to-sink", "prometheusremotewrite", "--topology", str(topology), "--batch", "1")
    summary = env.run_json(*args, capsys=capsys)
    assert (summary["totals"]["delivered"], summary["totals"]["dead_lettered"]) == (2, 0)
    values = {at: prometheus.query(name, at=at) for at in (older + 1, newer + 1)}
    assert [float(values[at][0]["value"][1]) for at in (older + 1, newer + 1)] == [1.0, 2.0]
    # A resumed replay may send a chunk again: the same sample at the same timestamp is accepted as a no-op.
    again = env.run_json(*args, "--fresh", capsys=capsys)
    assert (again["totals"]["delivered"], again["totals"]["dead_lettered"]) == (2, 0)
    counted = prometheus.query(f"count_over_time({name}[2h])", at=now)
    assert len(counted) == 1 and float(counted[0]["value"][1]) == 2.0  # one series, two samples
