"""`kotel kafka` against a real broker: the CLI lifecycle, and the two client libraries the pipeline uses
(confluent-kafka for agents and sinks, aiokafka under Faust) talking to the broker and to each other."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition as AioTopicPartition
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as CkTopicPartition
from confluent_kafka.admin import AdminClient

from kotel import paths
from kotel.kafka.broker import JAVA_MISSING, MAVEN_MISSING, BrokerSettings, KafkaBroker, KafkaBrokerError
from tests.integration.conftest import free_ports

REPO = Path(__file__).resolve().parents[2]


def kotel_kafka(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`kotel kafka ...` as a user runs it: the console script's module, plugins found by entry point."""
    cmd = [sys.executable, "-m", "kotel.cli", "kafka", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # Own KOTEL_HOME (fresh state), the machine's jar cache (downloaded once, not per test).
    env = {**os.environ, "KOTEL_HOME": str(tmp_path / "home"), "KOTEL_CACHE": str(paths.cache_dir())}
    env.update({"KOTEL_KAFKA_HEAP": "256m", **extra})
    return env


def test_cli_start_status_restart_stop(tmp_path: Path) -> None:
    port, controller_port = free_ports(2)
    env = cli_env(tmp_path)
    ports = ["--port", str(port), "--controller-port", str(controller_port)]
    state_dir = tmp_path / "home" / "kafka"
    try:
        before = kotel_kafka("status", env=env)
        assert (before.returncode, before.stdout.splitlines()[0]) == (1, "Kafka broker not running")

        started = kotel_kafka("start", *ports, "--timeout", "90", env=env)
        assert started.returncode == 0, started.stderr
        match = re.match(
            rf"Kafka (\S+) broker started on 127\.0\.0\.1:{port} \(pid (\d+)\) in \d+\.\d s "
            r"\((cold: jars downloaded|warm: jars cached)\)\n",
            started.stdout,
        )
        assert match, started.stdout
        version, pid = match.group(1), int(match.group(2))
        assert version == os.environ.get("KOTEL_KAFKA_VERSION", "4.1.1")
        # `start` returned, so the broker must answer metadata requests on the port it reported.
        brokers = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=10).brokers
        assert [(b.host, b.port) for b in brokers.values()] == [("127.0.0.1", port)]

        status = kotel_kafka("status", env=env)
        assert status.returncode == 0
        assert status.stdout.splitlines() == [
            f"Kafka {version} broker running on 127.0.0.1:{port} (pid {pid})",
            f"  log file: {state_dir / 'server.log'}",
            f"  data dir: {state_dir / 'data'}",
        ]

        again = kotel_kafka("start", *ports, env=env)
        assert again.returncode == 0
        assert (
            again.stdout
            == f"Kafka {version} broker already running on 127.0.0.1:{port} (pid {pid}); nothing to do\n"
        )

        stopped = kotel_kafka("stop", env=env)
        assert (stopped.returncode, stopped.stdout) == (0, f"Kafka broker stopped (pid {pid})\n")
        assert not psutil.pid_exists(pid)
        # SIGTERM, not SIGKILL: the broker got to log the end of its controlled shutdown.
        assert "[BrokerServer id=1] shut down completed" in (state_dir / "server.log").read_text()
        after = kotel_kafka("status", env=env)
        assert (after.returncode, after.stdout.splitlines()[0]) == (1, "Kafka broker not running")
    finally:
        KafkaBroker(
            BrokerSettings.from_env(state_dir=state_dir, port=port, controller_port=controller_port)
        ).stop()


def test_cli_without_java_says_what_to_install(tmp_path: Path) -> None:
    port, controller_port = free_ports(2)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = kotel_kafka(
        "start",
        "--port",
        str(port),
        "--controller-port",
        str(controller_port),
        env=cli_env(tmp_path, PATH=str(empty_bin)),
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"kotel kafka: {JAVA_MISSING}\n")


def test_cli_without_maven_says_what_to_install(tmp_path: Path) -> None:
    java = subprocess.run(["which", "java"], capture_output=True, text=True, check=True).stdout.strip()
    java_only = tmp_path / "bin"
    java_only.mkdir()
    (java_only / "java").symlink_to(java)
    result = kotel_kafka(
        "fetch",
        env=cli_env(tmp_path, PATH=str(java_only), KOTEL_CACHE=str(tmp_path / "empty-cache")),
    )
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"kotel kafka: {MAVEN_MISSING}\n")


def _deliver(bootstrap: str, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    errors: list[object] = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    producer.produce(
        topic, value=value, key=key, headers=headers, on_delivery=lambda err, _m: errors.append(err)
    )
    assert producer.flush(30) == 0
    assert errors == [None]


async def test_confluent_produces_aiokafka_consumes_and_commits(
    kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic, group = kafka_topic("interop"), f"group-{uuid.uuid4().hex[:8]}"
    _deliver(kafka_bootstrap, topic, b"svc-1", b"otlp-bytes", [("tenant", b"acme")])

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        assert (record.key, record.value, list(record.headers)) == (
            b"svc-1",
            b"otlp-bytes",
            [("tenant", b"acme")],
        )
        await consumer.commit()
    finally:
        await consumer.stop()

    # Read the commit back through the other client: it must have reached the broker's group coordinator.
    checker = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        [committed] = checker.committed([CkTopicPartition(topic, 0)], timeout=10)
    finally:
        checker.close()
    assert committed.offset == 1


async def test_aiokafka_produces_confluent_consumes_and_commits(
    kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic, group = kafka_topic("interop"), f"group-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"otlp-bytes", key=b"svc-2", headers=[("tenant", b"beta")])
    finally:
        await producer.stop()

    got = await asyncio.to_thread(_consume_one_and_commit, kafka_bootstrap, topic, group)
    assert got == (b"svc-2", b"otlp-bytes", [("tenant", b"beta")])

    checker = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await checker.start()
    try:
        assert await checker.committed(AioTopicPartition(topic, 0)) == 1
    finally:
        await checker.stop()


def _consume_one_and_commit(
    bootstrap: str, topic: str, group: str
) -> tuple[bytes | None, bytes | None, object]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            consumer.commit(message=msg, asynchronous=False)
            return msg.key(), msg.value(), msg.headers()
        raise AssertionError(f"no record on {topic} within 30 s")
    finally:
        consumer.close()


def _own_broker(tmp_path: Path, **overrides: str) -> KafkaBroker:
    port, controller_port = free_ports(2)
    settings = BrokerSettings.from_env(
        port=port, controller_port=controller_port, state_dir=tmp_path / "kafka", **overrides
    )
    return KafkaBroker(settings)


def test_broker_dying_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    broker = _own_broker(tmp_path, heap="1k")  # the JVM refuses to boot with so small a heap
    try:
        with pytest.raises(KafkaBrokerError) as err:
            broker.start(timeout=60)
        log = broker.settings.log_file
        assert str(err.value).startswith(
            f"the Kafka broker exited with code 1 before it was ready; last lines of {log}:\n"
        )
        assert "Too small maximum heap" in str(err.value)
        assert not broker.settings.pid_file.exists()
    finally:
        broker.stop()


def test_broker_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    broker = _own_broker(tmp_path)
    try:
        with pytest.raises(KafkaBrokerError) as err:
            broker.start(timeout=0.5)
        assert str(err.value).startswith(
            "the Kafka broker did not answer a metadata request within 0.5 s and was stopped; last lines of "
        )
        assert broker.status().running is False
        assert not broker.settings.pid_file.exists()
    finally:
        broker.stop()
