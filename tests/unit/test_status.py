"""`kotel status` and `kotel up`'s state file: rates and lag from two scrapes, the report, exit codes.

Processes are stand-ins (``sleep``) and their /metrics are prometheus_client servers on 127.0.0.1 whose
counters step up at each scrape, so the rates are known; the broker is replaced where a test is about
the report and used for real (a closed port) where it is about the broker being down.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric

from agents.telemetry import AgentMetrics
from kotel import status_cli
from kotel.status_cli import (
    IN_FAMILIES,
    LAG_FAMILIES,
    OUT_FAMILIES,
    Rate,
    Scrape,
    kafka_view,
    metrics_lag,
    parse_metrics,
    rate,
    scrape,
)
from kotel.up_state import ChildState, UpState, is_alive, read_state, remove_state, state_path, write_state
from streams.sinks.runtime import SinkMetrics
from streams.telemetry import WorkerMetrics
from tests.conftest import free_ports

ME = psutil.Process()


def _scrape(at: float, **families: list[tuple[dict[str, str], float]]) -> Scrape:
    return Scrape(at, dict(families))


# --- state file ------------------------------------------------------------------------------------


def _state(children: list[ChildState] | None = None) -> UpState:
    return UpState(os.getpid(), ME.create_time(), "/t/dev.yaml", "127.0.0.1:9092", "kotel", children or [])


def test_the_state_file_round_trips_and_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "up" / "state.json"
    child = ChildState("agent", "agent", ["kotel", "agent"], "/l/agent.log", pid=42, state="running",
                       started_at=1.5, restarts=3, metrics_url="http://127.0.0.1:1/metrics")
    write_state(_state([child]), path)
    assert read_state(path) == _state([child])
    write_state(_state(), path)
    assert read_state(path) == _state()
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left behind
    remove_state(path)
    assert read_state(path) is None


def test_a_failed_write_keeps_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_state(_state(), path)

    def broken(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_state(_state([ChildState("x", "stage", [], "")]), path)
    assert read_state(path) == _state()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_newer_state_file_is_read_and_a_foreign_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    data = json.loads(_state([ChildState("a", "agent", [], "")]).to_json())
    data["future_field"] = 1
    data["children"][0]["future_field"] = 2
    path.write_text(json.dumps(data))
    assert read_state(path) == _state([ChildState("a", "agent", [], "")])
    path.write_text("[1, 2]")
    with pytest.raises(ValueError) as caught:
        read_state(path)
    assert str(caught.value) == f"{path} is not a kotel up state file: 'list' object has no attribute 'get'"


def test_state_path_follows_kotel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    assert state_path() == tmp_path / "up" / "state.json"


def test_alive_means_this_pid_started_at_that_time() -> None:
    assert is_alive(os.getpid(), ME.create_time())
    assert not is_alive(os.getpid(), ME.create_time() - 60)  # the pid was reused by another process
    done = subprocess.Popen(["true"])
    done.wait()
    assert not is_alive(done.pid, None)
    assert not is_alive(None, None)


# --- rates and lag ---------------------------------------------------------------------------------


def test_rates_are_per_signal_increases_over_the_time_between_scrapes() -> None:
    first = _scrape(10.0, kotel_agent_received_items=[
        ({"signal": "traces", "transport": "grpc"}, 100.0), ({"signal": "traces", "transport": "http"}, 50.0),
        ({"signal": "logs", "transport": "grpc"}, 10.0)])
    second = _scrape(12.0, kotel_agent_received_items=[
        ({"signal": "traces", "transport": "grpc"}, 300.0), ({"signal": "traces", "transport": "http"}, 70.0),
        ({"signal": "logs", "transport": "grpc"}, 10.0), ({"signal": "metrics", "transport": "grpc"}, 8.0)])
    found = rate(first, second, IN_FAMILIES)
    assert found == Rate("items", {"traces": 110.0, "logs": 0.0, "metrics": 4.0})  # a new series counts whole
    assert found.total == 114.0


def test_a_counter_that_went_down_was_reset_and_counts_from_zero() -> None:
    labels = {"sink": "s", "tenant": "a", "signal": "logs"}
    first = _scrape(0.0, kotel_sink_exported_records=[(labels, 500.0)])
    second = _scrape(1.0, kotel_sink_exported_records=[(labels, 20.0)])
    assert rate(first, second, OUT_FAMILIES) == Rate("records", {"logs": 20.0})


def test_the_first_family_with_samples_wins_and_none_means_not_exported() -> None:
    # A routing worker registers the generic item counters but counts Kafka records only.
    first = _scrape(0.0, kotel_stage_items_in=[], kotel_stage_records_in=[({"signal": "logs"}, 1.0)])
    second = _scrape(0.5, kotel_stage_items_in=[], kotel_stage_records_in=[({"signal": "logs"}, 3.0)])
    assert rate(first, second, IN_FAMILIES) == Rate("records", {"logs": 4.0})
    idle = _scrape(1.0, kotel_stage_items_in=[], kotel_stage_records_in=[])
    assert rate(first, idle, IN_FAMILIES) == Rate("items", {})
    assert rate(first, _scrape(1.0, other=[]), IN_FAMILIES) is None
    with pytest.raises(ValueError) as caught:
        rate(second, first, IN_FAMILIES)
    assert str(caught.value) == "the second scrape must come after the first (elapsed -0.500 s)"


def test_lag_is_summed_over_partitions_and_absent_when_not_exported() -> None:
    scrape = _scrape(0.0, kotel_stage_consumer_lag=[({"partition": "0"}, 3.0), ({"partition": "1"}, 4.0)],
                     kotel_sink_consumer_lag=[({"partition": "0"}, 5.0)])
    assert metrics_lag(scrape) == 12
    assert metrics_lag(_scrape(0.0, kotel_stage_consumer_lag=[])) is None


def test_the_names_status_reads_are_the_names_the_processes_export() -> None:
    worker, agent, sink = WorkerMetrics("dedup"), AgentMetrics(), SinkMetrics()
    worker.items_in.labels("dedup", "traces").inc(5)
    worker.consumer_lag.labels("dedup", "t", "0").set(2)
    agent.accepted.labels("logs").inc(3)
    sink.exported.labels("s", "a", "metrics").inc(4)
    exported: dict[str, list[tuple[dict[str, str], float]]] = {}
    for registry in (worker.registry, agent.registry, sink.registry):
        exported |= parse_metrics(generate_latest(registry).decode())
    wanted = {name for name, _ in (*IN_FAMILIES, *OUT_FAMILIES)} | set(LAG_FAMILIES)
    assert wanted <= exported.keys()
    assert exported["kotel_stage_items_in"] == [({"stage": "dedup", "signal": "traces"}, 5.0)]
    assert exported["kotel_agent_accepted_items"] == [({"signal": "logs"}, 3.0)]
    assert metrics_lag(Scrape(0.0, exported)) == 2


# --- the report and the exit codes -----------------------------------------------------------------


class _Stepping:
    """Counters that go up by ``step`` at every scrape, so two scrapes give a known increase."""

    def __init__(self, families: dict[str, list[tuple[dict[str, str], float]]]) -> None:
        self.families, self.scrapes = families, 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        for name, series in self.families.items():
            family = CounterMetricFamily(name, name, labels=list(series[0][0]))
            for labels, step in series:
                family.add_metric(list(labels.values()), step * self.scrapes)
            yield family


@pytest.fixture
def metrics_server() -> Iterator[object]:
    servers = []

    def serve(registry: CollectorRegistry) -> str:
        server, _ = start_http_server(0, "127.0.0.1", registry)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/metrics"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sleepers() -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[int, float]:
        process = subprocess.Popen(["sleep", "60"])
        started.append(process)
        return process.pid, psutil.Process(process.pid).create_time()

    yield start
    for process in started:
        process.kill()
        process.wait()


def _pipeline(tmp_path: Path, metrics_server: object, sleepers: object) -> UpState:
    """An agent and a routing worker with metrics, and a sink whose metrics port answers nothing."""
    agent = CollectorRegistry()
    agent.register(_Stepping({
        "kotel_agent_received_items": [({"signal": "traces", "transport": "grpc"}, 100.0)],
        "kotel_agent_accepted_items": [({"signal": "traces"}, 100.0)],
    }))
    route = CollectorRegistry()
    for name in ("kotel_stage_items_in", "kotel_stage_items_out"):  # registered, never counted by routing
        Counter(name, name, ["stage", "signal"], registry=route)
    route.register(_Stepping({"kotel_stage_records_in": [({"stage": "route", "signal": "logs"}, 10.0)]}))
    children = []
    for name, role, url, group in (
        ("agent", "agent", metrics_server(agent), None),  # type: ignore[operator]
        ("route", "stage", metrics_server(route), "kotel-kotel-route"),  # type: ignore[operator]
        ("sink-x", "sink", f"http://127.0.0.1:{free_ports(1)[0]}/metrics", "kotel-kotel-sink-x"),
    ):
        pid, started = sleepers()  # type: ignore[operator]
        children.append(ChildState(name, role, ["kotel", name], str(tmp_path / f"{name}.log"), pid=pid,
                                   state="running", started_at=started, metrics_url=url, group=group))
    return _state(children)


@pytest.fixture
def broker_up(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []

    def view(config: dict[str, str], groups: list[str], prefix: str) -> tuple[dict[str, object], dict]:
        calls.append((config["bootstrap.servers"], groups, prefix))
        return {"bootstrap": config["bootstrap.servers"], "up": True, "brokers": 1, "error": None}, {
            "kotel-kotel-route": 7, "kotel-kotel-sink-x": None}

    monkeypatch.setattr(status_cli, "kafka_view", view)
    return calls


def test_the_report_has_rates_lag_and_no_metrics_where_an_endpoint_is_silent(
    tmp_path: Path, metrics_server: object, sleepers: object, broker_up: list[object]
) -> None:
    report = asyncio.run(status_cli.collect(_pipeline(tmp_path, metrics_server, sleepers), interval=0.3))
    agent, route, sink = report["processes"]
    assert report["ok"] is True and report["broker"]["up"] is True
    assert broker_up == [("127.0.0.1:9092", ["kotel-kotel-route", "kotel-kotel-sink-x"], "kotel")]
    # 100 items more per scrape, scrapes at least 0.3 s apart (and well under 3 s on a busy machine)
    assert agent["in"]["unit"] == "items" and 100 / 3 < agent["in"]["per_signal"]["traces"] <= 100 / 0.3
    assert agent["out"]["total"] == agent["in"]["total"] and agent["lag"] is None
    assert route["in"]["unit"] == "records" and set(route["in"]["per_signal"]) == {"logs"}
    assert route["out"] == {"unit": "items", "per_signal": {}, "total": 0}  # registered, nothing counted
    assert (route["lag"], route["lag_source"]) == (7, "broker")
    assert sink["up"] is True and sink["metrics"] == "no metrics" and sink["metrics_error"]
    assert sink["in"] is None and sink["lag"] is None
    assert [p["state"] for p in report["processes"]] == ["up", "up", "up"]


def test_exit_0_with_a_table_when_all_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    metrics_server: object, sleepers: object, broker_up: list[object]
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "160")
    write_state(_pipeline(tmp_path, metrics_server, sleepers))
    assert status_cli.main(["--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "broker 127.0.0.1:9092: up (1 broker)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip().startswith(
        ("agent", "route", "sink-x"))}
    assert rows["route"][:3] == [str(read_state().children[1].pid), "up", "0"]  # type: ignore[union-attr]
    assert rows["route"][3] == "logs" and float(rows["route"][4]) > 0
    assert rows["route"][5:] == ["rec", "0", "7", "*"]
    assert rows["sink-x"][1:] == ["up", "0", "no", "metrics", "no", "metrics", "-"]


def test_exit_1_when_a_process_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    metrics_server: object, sleepers: object, broker_up: list[object]
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    state = _pipeline(tmp_path, metrics_server, sleepers)
    gone = subprocess.Popen(["true"])
    gone.wait()
    state.children[2].pid = gone.pid
    state.children[1].state = "refused"
    write_state(state)
    assert status_cli.main(["--json", "--interval", "0.2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["up"], p["state"], p["pid"]) for p in report["processes"]] == [
        ("agent", True, "up", state.children[0].pid), ("route", False, "refused", None),
        ("sink-x", False, "down", None)]
    assert report["ok"] is False


def test_exit_1_when_the_broker_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    broker, lags = kafka_view({"bootstrap.servers": closed}, ["g"], "kotel", timeout=0.5)
    assert (broker["up"], broker["bootstrap"], lags) == (False, closed, {})
    assert broker["error"]
    state = _state()
    state.bootstrap = closed
    write_state(state)
    monkeypatch.setattr(status_cli, "kafka_view", lambda c, g, p: kafka_view(c, g, p, timeout=0.5))
    assert status_cli.main(["--interval", "0.1"]) == 1
    assert f"broker {closed}: down (" in capsys.readouterr().out


def test_exit_2_without_a_running_kotel_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOTEL_HOME", str(tmp_path))
    path = tmp_path / "up" / "state.json"
    assert status_cli.main([]) == 2
    assert capsys.readouterr().err == (
        f"kotel status: no `kotel up` is running (no {path}); start one with `kotel up`\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    state = _state()
    state.pid = gone.pid
    write_state(state)
    assert status_cli.main(["--json"]) == 2
    assert capsys.readouterr().err == (
        f"kotel status: no `kotel up` is running ({path} was left by pid {gone.pid}, which is gone)\n")
    path.write_text("not json")
    assert status_cli.main([]) == 2
    assert capsys.readouterr().err.startswith(f"kotel status: {path} is not a kotel up state file: ")


def test_parse_keeps_counter_totals_and_gauges_only() -> None:
    text = ("# TYPE a_total counter\na_total{signal=\"logs\"} 3.0\n# TYPE a_created gauge\n"
            "a_created{signal=\"logs\"} 1.7e9\n# TYPE g gauge\ng 2\n"
            "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0.5\n")
    logs = {"signal": "logs"}
    assert parse_metrics(text) == {"a": [(logs, 3.0)], "a_created": [(logs, 1.7e9)], "g": [({}, 2)], "h": []}


class _Unavailable(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"starting")

    def log_message(self, *_: object) -> None:
        return None


async def test_a_scrape_answered_with_an_error_is_no_reading() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        async with aiohttp.ClientSession() as session:
            assert await scrape(session, f"http://127.0.0.1:{server.server_port}/metrics") == "HTTP 503"
            closed = f"http://127.0.0.1:{free_ports(1)[0]}/metrics"
            assert (await scrape(session, closed)).startswith("ClientConnectorError: ")  # type: ignore[union-attr]
    finally:
        server.shutdown()
        server.server_close()
