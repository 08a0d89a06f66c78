"""The agent as a process under faults: broker stopped mid-stream, kill -9 after acknowledgements,
and backpressure over capacity. Nothing acknowledged may be missing or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from kotel.kafka.broker import KafkaBroker
from kotel.otlp import Signal
from tests.integration.agent_support import AgentSetup, read_topic, span_names

METHOD = Signal.TRACES.grpc_method


def _request(instance: str, names: list[str], pad: int = 0) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    attr = rs.resource.attributes.add()
    attr.key, attr.value.string_value = "service.instance.id", instance
    spans = rs.scope_spans.add().spans
    for n, name in enumerate(names):
        span = spans.add(
            name=name,
            trace_id=os.urandom(16),
            span_id=os.urandom(8),
            start_time_unix_nano=n + 1,
            end_time_unix_nano=n + 2,
        )
        if pad:  # random: the spill's Parquet cannot compress it away
            span.attributes.add(key="pad").value.string_value = os.urandom(pad // 2).hex()
    return req.SerializeToString()


class AgentProcess:
    def __init__(self, setup: AgentSetup, workdir: Path) -> None:
        self.setup = setup
        self.file = workdir / "topology.yaml"
        self.file.write_text(setup.yaml())
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            command = [sys.executable, "-m", "kotel.cli", "agent", "--topology", str(self.file)]
            self.proc = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.setup.metrics_port}/readyz", timeout=1)
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(0.2)
        raise AssertionError("agent not ready in 60 s:\n" + self.log.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _send(target: str, body: bytes, timeout: float = 15.0) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        try:
            call(body, timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def test_broker_outage_and_kill_9_lose_nothing_acknowledged(
    kafka_broker: KafkaBroker, kafka_bootstrap: str, tmp_path: Path
) -> None:
    setup = AgentSetup(kafka_bootstrap, tmp_path / "spill", kafka_timeout="2s")
    setup.create_topics()
    agent = AgentProcess(setup, tmp_path)
    agent.start()
    target = f"127.0.0.1:{setup.grpc_port}"
    acked: dict[str, list[str]] = defaultdict(list)
    counter = 0

    def send_batch(rounds: int) -> None:
        nonlocal counter
        for _ in range(rounds):
            for instance in ("i-a", "i-b", "i-c"):
                names = [f"{instance}/{counter + k:06d}" for k in range(5)]
                counter += 5
                if _send(target, _request(instance, names)) == grpc.StatusCode.OK:
                    acked[instance].extend(names)

    try:
        send_batch(10)  # broker up
        kafka_broker.stop()
        try:
            started = time.monotonic()
            send_batch(10)  # broker down: spilled, still acknowledged
            assert time.monotonic() - started < 120, "clients must not wait for the broker to come back"
            assert sum(map(len, acked.values())) >= 250, "the spill should have taken the outage's data"
            agent.kill9()  # acknowledged data sits in fsynced spill files only
        finally:
            kafka_broker.start(timeout=90)
        agent.start()  # the new process replays the old spill
        send_batch(5)
        expected = sum(map(len, acked.values()))
        records = read_topic(
            kafka_bootstrap,
            f"{setup.prefix}.raw.traces",
            Signal.TRACES,
            min_records=1,
            timeout=90,
            settle=3.0,
        )
        names = span_names(records)
        while len(set(names)) < expected and time.monotonic() - started < 180:
            time.sleep(2)
            names = span_names(
                read_topic(
                    kafka_bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES, timeout=30, settle=2.0
                )
            )
        missing = {n for ns in acked.values() for n in ns} - set(names)
        assert not missing, f"{len(missing)} acknowledged spans missing, e.g. {sorted(missing)[:5]}"
        duplicates = len(names) - len(set(names))
        assert duplicates == 0
        # Order per key: each instance's spans appear in the order they were acknowledged.
        records = read_topic(kafka_bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES, timeout=30)
        by_key: dict[str, list[str]] = defaultdict(list)
        for record in sorted(records, key=lambda r: (r.partition, r.offset)):
            by_key[record.key] += span_names([record])
        for instance, names_in_topic in by_key.items():
            assert names_in_topic == sorted(names_in_topic), f"order broken for {instance}"
    finally:
        agent.stop()


def test_over_capacity_the_agent_refuses_with_retryable_codes_and_stays_bounded(
    kafka_broker: KafkaBroker, kafka_bootstrap: str, tmp_path: Path
) -> None:
    # A broker that stops answering, a 1 MiB in-flight budget and 2 MiB of spill for 48 MiB of requests:
    # whichever fills first (requests waiting for Kafka, or the spill once the breaker sends them there),
    # the agent refuses with a retryable answer. Each request is ~100 KiB of distinct random data: with
    # one repeated body the spill compressed everything into its 2 MiB, so only the budget could refuse,
    # and whether it filled depended on how soon the breaker opened (a CI run got no refusal at all).
    setup = AgentSetup(kafka_bootstrap, tmp_path / "spill", kafka_timeout="5s", in_flight_mib=1, disk_mib=2)
    setup.create_topics()
    agent = AgentProcess(setup, tmp_path)
    agent.start()
    target = f"127.0.0.1:{setup.grpc_port}"
    names = [f"s{k}" for k in range(50)]
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    rss: list[int] = []
    proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]

    def client() -> None:
        for _ in range(40):
            code = _send(target, _request("i-big", names, pad=2000), timeout=30)
            with lock:
                codes.append(code)

    try:
        kafka_broker.stop()
        try:
            threads = [threading.Thread(target=client) for _ in range(12)]
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                rss.append(proc.memory_info().rss)
                time.sleep(0.2)
            # Refused: RESOURCE_EXHAUSTED for the in-flight budget, UNAVAILABLE for a full spill (both
            # retryable; HTTP clients get 429 / 503, covered by the receiver tests).
            assert {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE} & set(codes)
            assert set(codes) <= {
                grpc.StatusCode.OK,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.UNAVAILABLE,
            }
            with urllib.request.urlopen(f"http://127.0.0.1:{setup.metrics_port}/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
            assert ('kotel_agent_refused_items_total{reason="backpressure",signal="traces"}' in metrics
                    or 'kotel_agent_refused_items_total{reason="spill_full",signal="traces"}' in metrics)
            assert max(rss) < 400 * 2**20, f"agent RSS grew to {max(rss) / 2**20:.0f} MiB"
        finally:
            kafka_broker.start(timeout=90)
    finally:
        agent.stop()


def test_agent_refuses_to_start_with_an_invalid_topology(tmp_path: Path) -> None:
    missing = "TENANT"
    bad = tmp_path / "t.yaml"
    bad.write_text(
        "agent:\n  receivers: {otlp: {protocols: {grpc: {}}}}\n  exporters: {kafka: {}}\n"
        "  processors: {resource: {attributes: [{key: tenant, value: '${TENANT}', action: insert}]}}\n"
        "  service: {pipelines: {traces: {processors: [resource], exporters: [kafka]}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != missing}
    result = subprocess.run(
        [sys.executable, "-m", "kotel.cli", "agent", "--topology", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{bad}:4: agent.processors.resource.attributes[0].value: environment variable {missing} is not set "
        f"and has no default (write ${{{missing}:-value}} to give one)"
    )


def _wait_for_log(agent: AgentProcess, text: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while agent.log.read_text().count(text) < count:
        assert time.monotonic() < deadline, (
            f"{text!r} not logged {count} times:\n{agent.log.read_text()[-2000:]}"
        )
        time.sleep(0.2)


def test_sighup_and_file_change_reload_the_running_agent(kafka_bootstrap: str, tmp_path: Path) -> None:
    setup = AgentSetup(kafka_bootstrap, tmp_path / "spill")
    setup.create_topics()
    agent = AgentProcess(setup, tmp_path)
    agent.start()
    target = f"127.0.0.1:{setup.grpc_port}"
    health = """span: ['attributes["http.target"] == "/health"']"""
    try:
        assert _send(target, _request("i-1", ["probe"])) == grpc.StatusCode.OK
        agent.file.write_text(setup.yaml().replace(health, """span: ['name == "probe"']"""))
        agent.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        _wait_for_log(agent, "configuration reloaded", 1)
        assert _send(target, _request("i-1", ["probe", "other"])) == grpc.StatusCode.OK  # probe now dropped
        agent.file.write_text(setup.yaml())  # no signal: the file watcher notices the change
        _wait_for_log(agent, "configuration reloaded", 2)
        assert _send(target, _request("i-1", ["probe"])) == grpc.StatusCode.OK
        agent.file.write_text("agent: {receivers: {}}\n")  # invalid: refused, the agent keeps running
        _wait_for_log(agent, "reload refused", 1)
        assert _send(target, _request("i-1", ["last"])) == grpc.StatusCode.OK
        names = span_names(
            read_topic(kafka_bootstrap, f"{setup.prefix}.raw.traces", Signal.TRACES, min_records=4)
        )
        assert sorted(names) == ["last", "other", "probe", "probe"]
    finally:
        agent.stop()
