"""The whole pipeline as `kotel up` runs it: agent -> dedup -> routing -> Parquet archive, on the real
broker, fed over OTLP/gRPC; a retried export (the same request twice) must arrive once. Then `kotel status`
must see every process with a metrics reading, and `--demo`'s report must find a burst where it went."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from kotel import up_cli
from kotel.otlp import Signal, count_items, decode_protobuf, samples
from kotel.supervisor import Child
from kotel.topology import load_topology
from kotel.up_state import read_state
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


# The demo's burst, standing in for `kotel loadtest send`: one logs request of 40 records.
_SEND = ("import sys, grpc; from kotel.otlp import Signal, samples; "
         "grpc.insecure_channel(sys.argv[1]).unary_unary(Signal.LOGS.grpc_method)"
         "(samples.logs(40, services=1, seed=99).SerializeToString(), timeout=30)")


def test_otlp_in_to_parquet_out_through_every_stage_with_a_retried_export(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grpc_port, metrics_port = free_ports(2)
    topology = tmp_path / "topology.yaml"
    topology.write_text(_topology(kafka_bootstrap, tmp_path, grpc_port, metrics_port))
    log = (tmp_path / "up.log").open("wb")
    env = {**os.environ, "KOTEL_HOME": str(tmp_path / "home")}
    up = subprocess.Popen(
        [sys.executable, "-m", "kotel.cli", "up", "--no-broker", "--topology", str(topology)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
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

        status = subprocess.run([sys.executable, "-m", "kotel.status_cli", "--json", "--interval", "0.5"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr + status.stdout
        processes = {p["name"]: p for p in json.loads(status.stdout)["processes"]}
        assert {n: (p["up"], p["metrics"], p["in"] is not None or p["out"] is not None, p["lag_source"])
                for n, p in processes.items()} == {
            "dedup": (True, "ok", True, "metrics"), "route": (True, "ok", True, "broker"),
            "sink-file-archive": (True, "ok", True, "metrics"), "agent": (True, "ok", True, None)}

        monkeypatch.setenv("KOTEL_HOME", env["KOTEL_HOME"])
        state = read_state()
        assert state is not None
        children = [Child(c.name, c.command, "", role=c.role, metrics_url=c.metrics_url, group=c.group,
                          state=c.state) for c in state.children]
        capsys.readouterr()
        asyncio.run(up_cli._Demo(load_topology(topology), children).run(
            "", [sys.executable, "-c", _SEND, f"127.0.0.1:{grpc_port}"]))
        report = capsys.readouterr().out
        prefix = state.prefix
        for line in (f"{prefix}.raw.logs +1", f"{prefix}.tenant.tenant-a.logs +1", "1 Parquet file, 1 row",
                     "records exported from the demo: tenant-a/logs 1; dead-lettered 0", "pipeline drained"):
            assert line in " ".join(report.replace("│", " ").split()), report
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
        log.close()
    assert "kotel up: agent stopped" in (tmp_path / "up.log").read_text()
