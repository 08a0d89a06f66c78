"""`kotel up`'s plan and supervision, with tiny Python children instead of kotel processes."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kotel import up_cli
from kotel.supervisor import Child, Supervisor, plan_children
from kotel.topology import load_topology
from kotel.up_state import UpState, write_state

ROOT = Path(__file__).resolve().parents[2]


def test_plan_follows_the_topology_and_skips_what_this_version_lacks() -> None:
    topology = load_topology(ROOT / "topologies" / "dev.yaml")
    available = {"agent": set(), "worker": {"dedup", "route"}, "sink": set()}
    children, skipped = plan_children(topology, "dev.yaml", available, lambda n: list(range(9001, 9001 + n)))
    assert [c.name for c in children] == ["dedup", "route", "sink-file-archive", "agent"]
    assert children[2].argv[3:] == ["sink", "file/archive", "--topology", "dev.yaml",
                                    "--metrics-endpoint", "127.0.0.1:9003"]
    assert children[1].argv[3:] == ["worker", "route", "--topology", "dev.yaml", "--web-port", "9002"]
    assert children[3].argv[3:] == ["agent", "--topology", "dev.yaml"]
    assert [(c.role, c.group, c.metrics_url) for c in children] == [
        ("stage", "kotel-kotel-dedup", "http://127.0.0.1:9001/metrics"),
        ("stage", "kotel-kotel-route", "http://127.0.0.1:9002/metrics"),
        ("sink", "kotel-kotel-sink-file_archive", "http://127.0.0.1:9003/metrics"),
        ("agent", None, "http://127.0.0.1:8888/metrics"),  # the topology's agent.metrics_endpoint
    ]
    assert skipped == ["tail: `kotel worker tail` is not available in this version"]


def test_planned_ports_are_distinct_and_free() -> None:
    topology = load_topology(ROOT / "topologies" / "dev.yaml")
    children, _ = plan_children(topology, "dev.yaml", {"worker": set(), "sink": set(), "agent": set()})
    ports = [int(c.metrics_url.rsplit(":", 1)[1].split("/")[0]) for c in children if c.role != "agent"]
    assert len(ports) == len(set(ports)) == 4  # dedup, tail, route, sink
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_an_agent_only_topology_runs_only_the_agent() -> None:
    topology = load_topology(ROOT / "topologies" / "seed-ordering.yaml")
    children, skipped = plan_children(topology, "x.yaml", {"agent": set()})
    assert [c.name for c in children] == ["agent"] and skipped == []


async def test_a_crashed_child_is_restarted_and_a_refusing_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    counter = tmp_path / "runs"
    crash = Child(
        "crash",
        [sys.executable, "-c", f"open({str(counter)!r}, 'a').write('x'); print('boom'); raise SystemExit(1)"],
        "",
    )
    refuse = Child("refuse", [sys.executable, "-c", "raise SystemExit(2)"], "")
    seen: list[tuple[str, str, int]] = []
    supervisor = Supervisor([crash, refuse], grace=5, on_change=lambda: seen.extend(
        (c.name, c.state, c.restarts) for c in (crash, refuse)))
    task = asyncio.create_task(supervisor.run())
    async with asyncio.timeout(20):
        while not counter.exists() or len(counter.read_text()) < 2:
            await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)  # the supervisor's own Ctrl-C handler stops everything
    await asyncio.wait_for(task, 20)
    assert crash.restarts >= 1
    assert refuse.restarts == 0
    assert "boom" in (tmp_path / "logs" / "crash.log").read_text()
    # every start and exit was announced, so the state file follows the children
    assert ("crash", "running", 0) in seen and ("crash", "restarting", 1) in seen
    assert ("crash", "running", 1) in seen
    assert ("refuse", "refused", 0) in seen
    assert crash.started_unix is not None and abs(crash.started_unix - time.time()) < 30


# --- `kotel up` around the supervisor: one at a time, --demo's pieces that need no broker ---------------


def test_a_second_kotel_up_is_refused_while_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    write_state(UpState(os.getpid(), psutil.Process().create_time(), "/t/dev.yaml", "b:9092", "kotel"))
    args = argparse.Namespace(topology=str(ROOT / "topologies" / "dev.yaml"), no_broker=True, demo=False)
    assert up_cli._up(args) == 1
    assert capsys.readouterr().err == (
        f"kotel up: already running (pid {os.getpid()}, topology /t/dev.yaml); `kotel status` shows it\n")


@pytest.mark.parametrize(("available", "why"), [
    ({"agent": set()}, "not installed"),
    ({"loadtest": {"__unavailable__"}}, "unavailable (see `kotel loadtest --help`)"),
    ({"loadtest": {"run"}}, "unavailable (see `kotel loadtest --help`)"),
])
async def test_demo_without_the_load_generator_says_so_and_keeps_running(
    available: dict[str, set[str]], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topology = load_topology(ROOT / "topologies" / "dev.yaml")
    await up_cli._demo(topology, [], available)  # returns: `kotel up` goes on supervising
    assert capsys.readouterr().out == (
        f"kotel up --demo: `kotel loadtest send` is {why}; no demo traffic, the pipeline keeps running\n")


def test_the_demo_sends_to_the_agents_grpc_receiver_else_its_http_one(tmp_path: Path) -> None:
    assert up_cli.agent_endpoint(load_topology(ROOT / "topologies" / "dev.yaml")) == "127.0.0.1:4317"
    http_only = tmp_path / "t.yaml"
    http_only.write_text(
        "agent:\n  receivers: {otlp: {protocols: {http: {endpoint: '0.0.0.0:5318'}}}}\n"
        "  exporters: {kafka: {}}\n  service: {pipelines: {logs: {exporters: [kafka]}}}\n")
    assert up_cli.agent_endpoint(load_topology(http_only)) == "http://127.0.0.1:5318"
    assert up_cli.agent_endpoint(load_topology(ROOT / "topologies" / "seed-gateway.yaml")) is None


def test_the_demo_lists_the_parquet_files_written_since_it_began(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "tenant=a" / "signal=logs" / "date=2025-01-01"
    new = tmp_path / "tenant=a" / "signal=traces" / "date=2025-01-02"
    for folder, rows in ((old, [1]), (new, [1, 2, 3]), (new, [4, 5])):
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": rows}), folder / f"part-{len(rows)}.parquet")
    (new / ".part-9.parquet").write_text("half written, not renamed yet")
    since = time.time() - 60
    os.utime(old / "part-1.parquet", (since - 10, since - 10))
    up_cli._print_parquet(tmp_path, since)
    assert capsys.readouterr().out == f"  {new}/: 2 Parquet files, 5 rows\n"
    up_cli._print_parquet(tmp_path, time.time() + 60)
    assert capsys.readouterr().out == f"  no Parquet file written under {tmp_path} since the demo started\n"


def test_children_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of `kotel up` (no ordered stop possible): its children still end, none is orphaned."""
    script = f"""
import asyncio, os, sys
os.environ["KOTEL_HOME"] = {str(tmp_path)!r}
from kotel.supervisor import Child, Supervisor
child = Child("sleeper", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"], "")
async def main():
    task = asyncio.create_task(Supervisor([child], grace=5).run())
    while child.process is None:
        await asyncio.sleep(0.05)
    print(child.process.pid, flush=True)
    await task
asyncio.run(main())
"""
    supervisor = psutil.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert supervisor.stdout is not None
        # the child's pid, and its one line relayed: it is running and done writing (a child still
        # starting up would die of a broken pipe instead); the two lines come in either order
        lines = {supervisor.stdout.readline().strip() for _ in range(2)}
        assert "[sleeper] up" in lines
        child = psutil.Process(int((lines - {"[sleeper] up"}).pop()))  # before the kill: it may end at once
        supervisor.kill()
        supervisor.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.05)
        assert not _running(child), "the child outlived its killed supervisor"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whatever init this machine has, maybe late)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
