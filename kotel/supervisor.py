"""`kotel up`: the whole local pipeline as supervised child processes.

Children are ``kotel`` subcommands started as processes (the core never imports agents or streams):
the agent, each stage worker and each sink the topology names. Their output is prefixed on the
terminal and written to ``$KOTEL_HOME/logs/<name>.log``. A child that dies is restarted with
exponential backoff (1 s doubling to 30 s, reset after a minute of uptime), unless it exited with 2,
the CLI's code for a configuration it refuses. Ctrl-C stops them in
data-flow order — the agent first (it answers in-flight exports and flushes), then the stages, then
the sinks — so everything acknowledged moves on before its consumer stops.

Each child gets its own port for ``/metrics`` (chosen when the plan is made, kept across restarts) and
``on_change`` hears of every start and exit, so `kotel up` can keep its state file current.

Children run in their own session (a terminal's Ctrl-C reaches only the supervisor, which stops them in
order), so they would outlive a supervisor that is killed or crashes; on Linux each child therefore asks
the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from kotel.paths import logs_dir
from kotel.topology import Topology
from kotel.topology.base import component_type


@dataclass
class Child:
    name: str
    argv: list[str]
    what: str
    role: str = ""  # agent | stage | sink
    metrics_url: str | None = None
    group: str | None = None  # Kafka consumer group
    restarts: int = 0
    state: str = "starting"  # starting | running | restarting | refused | stopped
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0  # monotonic, for the backoff reset
    started_unix: float | None = None
    log_file: Path = field(default_factory=Path)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGTERM when the supervisor dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports free right now (held open together so none repeats); a race with another
    program remains possible, and then that child fails to bind and is restarted on the same port."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _agent_metrics_url(endpoint: str) -> str | None:
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None  # a port picked by the OS is known only to the agent
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/metrics"


def plan_children(topology: Topology, topology_file: str, available: dict[str, set[str]],
                  ports: Callable[[int], list[int]] = free_ports) -> tuple[list[Child], list[str]]:
    """The processes this topology needs, in start order, and what was skipped (with why).

    ``available`` maps a subcommand to its accepted first arguments (empty set: any), as the installed
    CLI reports them, so a topology can name stages that this version of kotel does not have yet.
    ``ports(n)`` gives the /metrics ports of the stage workers and sinks (the agent's is in the topology).
    Consumer group names follow streams/ (``create_app``'s app id, ``SinkRunner``'s group), which the
    core cannot import; `kotel status` reads those groups' lag from the broker.
    """
    run = [sys.executable, "-m", "kotel.cli"]
    children: list[Child] = []
    skipped: list[str] = []

    def add(name: str, args: list[str], what: str) -> None:
        command, first = args[0], args[1] if len(args) > 1 else ""
        if command not in available or (available[command] and first not in available[command]):
            skipped.append(f"{name}: `kotel {' '.join(args[:2])}` is not available in this version")
            return
        role = {"worker": "stage", "sink": "sink"}.get(command, command)
        group = None
        if role == "stage":
            group = topology.topic_names.stage_group(first)
        elif role == "sink":
            group = topology.topic_names.sink_group(first)
        children.append(Child(name, [*run, *args, "--topology", topology_file], what, role=role, group=group))

    gateway = topology.gateway
    if gateway is not None:
        add("dedup", ["worker", "dedup"], "raw -> deduped topics (windowed dedup in RocksDB)")
        if gateway.tail_sampling is not None:
            add("tail", ["worker", "tail"], "deduped traces -> sampled traces (tail sampling)")
        if gateway.routing is not None:
            add("route", ["worker", "route"], "-> per-tenant topics")
            routing = gateway.routing
            used = {e for r in routing.table for e in r.exporters} | set(routing.default_exporters)
            for exporter in sorted(used):
                kind = component_type(exporter)
                add(f"sink-{exporter.replace('/', '-')}", ["sink", exporter],
                    f"tenant topics -> {kind} ({exporter})")
    if topology.agent is not None:
        add("agent", ["agent"], "OTLP in (gRPC/HTTP) -> raw topics")
    served = [c for c in children if c.role in ("stage", "sink")]
    for child, port in zip(served, ports(len(served)), strict=True):
        if child.role == "stage":
            child.argv += ["--web-port", str(port)]
        else:
            child.argv += ["--metrics-endpoint", f"127.0.0.1:{port}"]
        child.metrics_url = f"http://127.0.0.1:{port}/metrics"
    for child in children:
        if child.role == "agent" and topology.agent is not None:
            child.metrics_url = _agent_metrics_url(topology.agent.metrics_endpoint)
    return children, skipped


STOP_ORDER = ("agent", "dedup", "tail", "route")


class Supervisor:
    def __init__(self, children: list[Child], *, grace: float = 30.0,
                 on_change: Callable[[], None] | None = None) -> None:
        self.children = children
        self.grace = grace
        self.on_change = on_change or (lambda: None)
        self.stopping = asyncio.Event()  # set once Ctrl-C began the ordered stop
        logs_dir().mkdir(parents=True, exist_ok=True)
        for child in children:
            child.log_file = logs_dir() / f"{child.name}.log"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self._keep(child)) for child in self.children]
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        self.stopping.set()
        print("kotel up: stopping (agent first, then stages, then sinks)", flush=True)
        order = sorted(self.children, key=lambda c: STOP_ORDER.index(c.name) if c.name in STOP_ORDER else 99)
        for child in order:
            await self._stop(child)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, child: Child) -> None:
        delay = 1.0
        while not self.stopping.is_set():
            with child.log_file.open("ab") as log:
                child.process = await asyncio.create_subprocess_exec(
                    *child.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_die_with_parent)
                child.started_at, child.started_unix = time.monotonic(), time.time()
                child.state = "running"
                self.on_change()
                assert child.process.stdout is not None
                async for line in child.process.stdout:
                    log.write(line)
                    log.flush()
                    print(f"[{child.name}] {line.decode(errors='replace').rstrip()}", flush=True)
                code = await child.process.wait()
            if self.stopping.is_set():
                return
            if code == 2:  # the child refused its configuration: restarting cannot help
                child.state = "refused"
                self.on_change()
                print(f"kotel up: {child.name} refused its configuration (exit 2); not restarting it, "
                      f"see {child.log_file}", flush=True)
                return
            if time.monotonic() - child.started_at > 60:
                delay = 1.0
            child.restarts += 1
            child.state = "restarting"
            self.on_change()
            print(f"kotel up: {child.name} exited with {code}; restart {child.restarts} in {delay:.0f} s",
                  flush=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _stop(self, child: Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self.grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        child.state = "stopped"
        self.on_change()
        print(f"kotel up: {child.name} stopped ({process.returncode})", flush=True)
