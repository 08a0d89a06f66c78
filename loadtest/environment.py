"""The things a run starts and watches: its broker, the backends, `kotel up`, and their CPU, RSS and lag.

The pipeline runs as `kotel up --no-broker` in a child process (the same supervisor users run), so the
load test measures the product, not a test harness; loadtest/ never imports agents/ or streams/. Real
backends come from loadtest/servers (Prometheus from Debian, Jaeger for Tempo and VictoriaLogs for Loki built
with Go by `make servers`), the same servers the e2e tests use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from kotel.kafka.broker import BrokerSettings, KafkaBroker
from kotel.paths import cache_dir
from streams.stages.tail_clock import is_heartbeat

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    import socket
    from contextlib import ExitStack

    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def start_broker(state_dir: Path) -> KafkaBroker:
    """A broker of the run's own, on free ports, in ``state_dir`` (the jar cache is the machine's)."""
    port, controller = free_ports(2)
    broker = KafkaBroker(BrokerSettings.from_env(port=port, controller_port=controller, state_dir=state_dir,
                                                 cache_root=cache_dir()))
    broker.start(timeout=120)
    return broker


def start_backends(names: list[str], workdir: Path) -> dict[str, Any]:
    """tempo/prometheus/loki -> a started loadtest.servers process."""
    if not names:
        return {}
    from loadtest.servers.jaeger import JaegerServer
    from loadtest.servers.prometheus import PrometheusServer
    from loadtest.servers.victorialogs import VictoriaLogsServer

    kinds = {"tempo": JaegerServer, "prometheus": PrometheusServer, "loki": VictoriaLogsServer}
    started: dict[str, Any] = {}
    try:
        for name in names:
            # Jaeger keeps the newest N traces in memory; the read-back needs every sampled one.
            extra = {"max_traces": 500_000} if name == "tempo" else {}
            server = kinds[name](workdir / name, **extra)
            server.start(timeout=90)
            started[name] = server
    except Exception:
        stop_backends(started)
        raise
    return started


def backend_endpoint(name: str, server: Any) -> str:
    if name == "tempo":
        return server.otlp_grpc_endpoint
    if name == "prometheus":
        return server.remote_write_url
    return f"{server.url}/insert/loki/api/v1/push"


def stop_backends(servers: dict[str, Any]) -> None:
    for server in servers.values():
        with contextlib.suppress(Exception):
            server.stop()


class Pipeline:
    """`kotel up --no-broker --topology FILE` as a child in its own session, output to a log file."""

    def __init__(self, topology: Path, home: Path) -> None:
        self.topology, self.home = topology, home
        self.log = home / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KOTEL_HOME": str(self.home), "KOTEL_CACHE": str(cache_dir())}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kotel.cli", "up", "--no-broker", "--topology", str(self.topology)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)

    def wait_agent(self, metrics_port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"kotel up exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the agent was not ready within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no output)"

    def stop(self, timeout: float = 90.0) -> None:
        """Ctrl-C as a user would (agent first, then stages, then sinks); SIGKILL to the group after."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def processes(self) -> dict[str, psutil.Process]:
        """The supervisor and each child, named as `kotel up` names them."""
        if self.process is None:
            return {}
        out: dict[str, psutil.Process] = {}
        try:
            root = psutil.Process(self.process.pid)
            out["kotel-up"] = root
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    out[_name(child.cmdline())] = child
        except psutil.Error:
            pass
        return out


def _name(cmdline: list[str]) -> str:
    if "kotel.cli" in cmdline:
        args = cmdline[cmdline.index("kotel.cli") + 1:]
        if args and args[0] in ("worker", "sink") and len(args) > 1:
            return f"{args[0]}-{args[1].replace('/', '-')}"
        return args[0] if args else "kotel"
    return Path(cmdline[0]).name if cmdline else "?"


@dataclass
class Usage:
    cpu: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 1)
        return {"cpu_avg": r(sum(self.cpu) / len(self.cpu)) if self.cpu else None,
                "cpu_max": r(max(self.cpu, default=None)),
                "rss_start_mib": r(self.rss[0] if self.rss else None),
                "rss_peak_mib": r(max(self.rss, default=None)),
                "rss_end_mib": r(self.rss[-1] if self.rss else None)}


class Watcher:
    """A thread sampling CPU and RSS of named processes and the total consumer lag every ``interval``."""

    def __init__(self, find: Any, kafka: dict[str, Any], prefix: str, interval: float = 2.0) -> None:
        self.find, self.kafka, self.prefix, self.interval = find, kafka, prefix, interval
        self.usage: dict[str, Usage] = {}
        self.lag: list[tuple[float, int]] = []
        self.latest: dict[str, tuple[float, float]] = {}
        self._procs: dict[str, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadtest-watch", daemon=True)
        self.paused = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, proc in self.find().items():
                known = self._procs.get(name)
                if known is None or known.pid != proc.pid:
                    self._procs[name] = proc
                    with contextlib.suppress(psutil.Error):
                        proc.cpu_percent(None)  # first call primes the counter
                    continue
                with contextlib.suppress(psutil.Error):
                    cpu, rss = known.cpu_percent(None), known.memory_info().rss / 2**20
                    usage = self.usage.setdefault(name, Usage())
                    usage.cpu.append(cpu)
                    usage.rss.append(rss)
                    self.latest[name] = (cpu, rss)
            if not self.paused:
                with contextlib.suppress(Exception):
                    self.lag.append((time.time(), total_lag(self.kafka, self.prefix)))

    def current_lag(self) -> int | None:
        return self.lag[-1][1] if self.lag else None


def total_lag(kafka: dict[str, Any], prefix: str, timeout: float = 5.0) -> int:
    """Records between each group's committed offset and the partition end, over the run's groups."""
    admin = AdminClient(kafka)
    groups = [g.group_id for g in admin.list_consumer_groups(request_timeout=timeout).result(timeout).valid
              if prefix in g.group_id]
    if not groups:
        return 0
    from confluent_kafka import ConsumerGroupTopicPartitions

    consumer = Consumer({**kafka, "group.id": f"loadtest-lag-{prefix}", "enable.auto.commit": False})
    try:
        total = 0
        for group in groups:
            result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
            for tp in result.result(timeout).topic_partitions or []:
                if tp.topic.startswith("__"):
                    continue
                _low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout)
                committed = max(tp.offset, 0)
                behind = max(0, high - committed)
                if behind and tp.topic.endswith(REPARTITION_SUFFIX) and behind <= _HEARTBEAT_SCAN:
                    behind = _records_not_heartbeats(consumer, tp.topic, tp.partition, committed, high)
                total += behind
        return total
    finally:
        consumer.close()


REPARTITION_SUFFIX = "-tail-traces-repartition"
_HEARTBEAT_SCAN = 1000  # a longer lag is not drained whatever it holds: not worth reading


def _records_not_heartbeats(consumer: Consumer, topic: str, partition: int, start: int, end: int,
                            bound_s: float = 5.0) -> int:
    """Records in [start, end) that are not the tail's watermark heartbeats: those arrive every second and
    are committed with the stage's commit interval, so a drained repartition topic always shows a few."""
    consumer.assign([TopicPartition(topic, partition, start)])
    found, position, deadline = 0, start, time.monotonic() + bound_s
    try:
        while position < end and time.monotonic() < deadline:
            for msg in consumer.consume(end - position, min(1.0, bound_s)):
                if msg.error() or msg.offset() >= end:
                    continue
                position = msg.offset() + 1
                found += not is_heartbeat(msg.headers() or [])
        return found + max(0, end - position)  # unread (timed out): counted as records
    finally:
        consumer.unassign()


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
