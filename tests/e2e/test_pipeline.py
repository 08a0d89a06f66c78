"""The whole pipeline as `kotel up` runs it: agent -> dedup -> routing -> Parquet archive, on the real
broker, fed over OTLP/gRPC; a retried export (the same request twice) must arrive once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from kotel.otlp import Signal, count_items, decode_protobuf, samples
from streams.sinks.archive import read_archive
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]


def _topology(bootstrap: str, home: Path, grpc_port: int, metrics_port: int) -> str:
    return f"""
kafka: {{bootstrap_servers: "{bootstrap}"}}
topics:
  prefix: "p{uuid.uuid4().hex[:8]}"
  create_tenant_topics_on_first_use: true
  defaults: {{partitions: 2}}
agent:
  metrics_endpoint: "127.0.0.1:{metrics_port}"
  receivers: {{otlp: {{protocols: {{grpc: {{endpoint: "127.0.0.1:{grpc_port}"}}}}}}}}
  processors:
    resource: {{attributes: [{{key: tenant, value: tenant-a, action: upsert}}]}}
    batch: {{timeout: 5ms}}
  exporters:
    kafka: {{}}
    file: {{path: "{home}/spill"}}
  service:
    pipelines:
      logs: {{processors: [resource, batch], exporters: [kafka, file]}}
      metrics: {{processors: [resource, batch], exporters: [kafka, file]}}
gateway:
  processors:
    dedup: {{window: 5m}}
    routing:
      table: [{{value: tenant-a, exporters: [file/archive]}}]
  exporters:
    file/archive: {{path: "{home}/archive", mode: always}}
"""


def test_otlp_in_to_parquet_out_through_every_stage_with_a_retried_export(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    grpc_port, metrics_port = free_ports(2)
    topology = tmp_path / "topology.yaml"
    topology.write_text(_topology(kafka_bootstrap, tmp_path, grpc_port, metrics_port))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "kotel.cli", "up", "--no-broker", "--topology", str(topology)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KOTEL_HOME": str(tmp_path / "home")},
        start_new_session=True,
    )
    logs = samples.logs(300, services=3, seed=11)
    metrics = samples.metrics(120, services=2, seed=12)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 90
        while True:  # until the agent is up
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
                break
            except grpc.FutureTimeoutError:
                assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
        for signal_, request in ((Signal.LOGS, logs), (Signal.METRICS, metrics)):
            call = channel.unary_unary(
                signal_.grpc_method, request_serializer=None, response_deserializer=None
            )
            body = request.SerializeToString()
            call(body, timeout=30)
            call(body, timeout=30)  # a client told to retry sends the same data again
        channel.close()
        expected = {"logs": 300, "metrics": 120}
        got: dict[str, int] = {}
        while time.monotonic() < deadline + 60 and got != expected:
            time.sleep(1)
            if (tmp_path / "archive").exists():
                table = read_archive(tmp_path / "archive", tenant="tenant-a")
                got = {}
                for signal_name, value in zip(
                    table.column("signal").to_pylist(), table.column("value").to_pylist(), strict=True
                ):
                    got[signal_name] = got.get(signal_name, 0) + count_items(
                        decode_protobuf(Signal(signal_name), value)
                    )
        assert got == expected, f"archive holds {got}; log:\n" + (tmp_path / "up.log").read_text()[-4000:]
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        log.close()
    assert "kotel up: agent stopped" in (tmp_path / "up.log").read_text()
