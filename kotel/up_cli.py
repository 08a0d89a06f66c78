"""`kotel up [--topology FILE] [--demo]`: broker, topics, and every process of the topology, supervised."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

    from kotel.supervisor import Child, Supervisor
    from kotel.topology import Topology


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up", help="run the whole local pipeline (broker, topics, agent, stages, sinks); Ctrl-C stops it",
        description="Start (or reuse) the local broker, apply the topology's topics, then run the agent, "
                    "every stage worker and every sink it names as supervised child processes.",
    )
    parser.add_argument("--topology", default="topologies/dev.yaml", metavar="FILE")
    parser.add_argument("--no-broker", action="store_true",
                        help="do not start a local broker (use the topology's kafka.bootstrap_servers)")
    parser.add_argument("--demo", action="store_true",
                        help="once everything is ready, send 5 s of generated traffic (`kotel loadtest "
                             "send`) and show where it ended up, then keep running")
    parser.set_defaults(func=_up)


def available_commands() -> dict[str, set[str]]:
    """Each installed command and its first-level choices: what this installation can run."""
    from kotel.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    out: dict[str, set[str]] = {}
    for name, sub in commands.items():
        firsts: set[str] = set()
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction) or (
                    not action.option_strings and action.choices and action.dest != "rest"):
                firsts |= set(action.choices)
            elif action.dest == "rest":
                firsts = {"__unavailable__"}
        out[name] = firsts
    return out


def agent_endpoint(topology: Topology) -> str | None:
    """Where a client on this host reaches the agent: its gRPC ``host:port``, else its HTTP base URL."""
    protocols = getattr(topology.agent.receivers.get("otlp") if topology.agent else None, "protocols", None)
    for kind in ("grpc", "http"):
        server = getattr(protocols, kind, None)
        if server is not None:
            host, _, port = server.endpoint.rpartition(":")
            host = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host
            return f"{host}:{port}" if kind == "grpc" else f"http://{host}:{port}"
    return None


def _up(args: argparse.Namespace) -> int:
    import psutil
    from confluent_kafka.admin import AdminClient

    from kotel.kafka.admin import create_topics, plan_topics
    from kotel.kafka.broker import BrokerSettings, KafkaBroker, KafkaBrokerError
    from kotel.paths import logs_dir
    from kotel.supervisor import Supervisor, plan_children
    from kotel.topology import TopologyError, load_topology
    from kotel.up_state import ChildState, UpState, is_alive, read_state, remove_state, write_state

    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        running = read_state()
    except ValueError:
        running = None  # unreadable: overwritten below
    if running is not None and is_alive(running.pid, running.started_at):
        print(f"kotel up: already running (pid {running.pid}, topology {running.topology}); "
              "`kotel status` shows it", file=sys.stderr)
        return 1
    if not args.no_broker:
        try:
            result = KafkaBroker(BrokerSettings.from_env()).start(timeout=90)
        except KafkaBrokerError as exc:
            print(f"kotel up: {exc}", file=sys.stderr)
            return 1
        print(f"kotel up: Kafka {result.status.version} on {result.status.bootstrap}"
              f"{' (already running)' if result.already_running else ''}")
    admin = AdminClient(topology.kafka.librdkafka_config())
    plan = plan_topics(admin, topology.planned_topics())
    created = create_topics(admin, plan.create)
    print(f"kotel up: topics: {len(created)} created, {len(plan.unchanged)} up to date, "
          f"{len(plan.drift)} drifted")
    available = available_commands()
    children, skipped = plan_children(topology, args.topology, available)
    for child in children:
        print(f"kotel up: {child.name:<22} {child.what}")
    for line in skipped:
        print(f"kotel up: skipped {line}")
    if topology.agent is not None:
        receivers = topology.agent.receivers.get("otlp")
        protocols = getattr(receivers, "protocols", None)
        if protocols is not None and protocols.grpc is not None:
            print(f"kotel up: send OTLP/gRPC to {protocols.grpc.endpoint}")
        if protocols is not None and protocols.http is not None:
            print(f"kotel up: send OTLP/HTTP to http://{protocols.http.endpoint}/v1/{{traces,metrics,logs}}")
        print(f"kotel up: agent metrics on http://{topology.agent.metrics_endpoint}/metrics")
    print(f"kotel up: logs in {logs_dir()}; `kotel status` shows rates and lag; Ctrl-C stops everything "
          "(the broker keeps running: make down)")

    started_at = psutil.Process().create_time()

    def save() -> None:
        write_state(UpState(
            os.getpid(), started_at, str(Path(args.topology).resolve()), topology.kafka.bootstrap_servers,
            topology.topics.prefix,
            [ChildState(c.name, c.role, c.argv, str(c.log_file),
                        c.process.pid if c.process is not None else None, c.state, c.started_unix, c.restarts,
                        c.metrics_url, c.group) for c in children],
        ))

    supervisor = Supervisor(children, on_change=save)
    save()
    try:
        asyncio.run(_run(supervisor, topology if args.demo else None, available))
    finally:
        remove_state()
    return 0


async def _run(supervisor: Supervisor, demo: Topology | None, available: dict[str, set[str]]) -> None:
    running = asyncio.create_task(supervisor.run())
    if demo is not None:
        shown = asyncio.create_task(_demo(demo, supervisor.children, available))
        await asyncio.wait([running, asyncio.create_task(supervisor.stopping.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        shown.cancel()  # Ctrl-C: the demo ends first, its burst with it
        await asyncio.gather(shown, return_exceptions=True)
    await running


async def _demo(topology: Topology, children: list[Child], available: dict[str, set[str]]) -> None:
    """Send a short burst through the running pipeline and say where it went; never stops `kotel up`."""
    endpoint = agent_endpoint(topology)
    sender = available.get("loadtest")
    if sender is None or sender == {"__unavailable__"} or (sender and "send" not in sender):
        why = "not installed" if sender is None else "unavailable (see `kotel loadtest --help`)"
        print(f"kotel up --demo: `kotel loadtest send` is {why}; no demo traffic, the pipeline keeps running",
              flush=True)
        return
    if endpoint is None:
        print("kotel up --demo: the topology has no agent with an OTLP receiver; no demo traffic", flush=True)
        return
    try:
        await _Demo(topology, children).run(endpoint)
    except Exception as exc:  # the demo is a convenience: report, keep the pipeline up
        print(f"kotel up --demo: failed: {type(exc).__name__}: {exc}; the pipeline keeps running", flush=True)


# --- the demo ---------------------------------------------------------------------------------------

READY_TIMEOUT_S = 180.0  # Faust workers join their groups in tens of seconds on a busy laptop
DRAIN_TIMEOUT_S = 60.0  # beyond the burst; covers tail sampling's decision wait
SEND_ARGS = ("--seconds", "5", "--rate", "2000")
SEND_TIMEOUT_S = 120.0
_KINDS = ("raw", "deduped", "sampled", "tenant", "unrouted", "deadletter")


def _say(text: str) -> None:
    print(f"kotel up --demo: {text}", flush=True)


class _Demo:
    def __init__(self, topology: Topology, children: list[Child]) -> None:
        from kotel.status_cli import admin_client

        self.topology, self.children = topology, children
        self.prefix = topology.topics.prefix
        self.groups = sorted({c.group for c in children if c.group})
        self.admin = admin_client(topology.kafka.librdkafka_config())

    async def run(self, endpoint: str, sender: Sequence[str] | None = None) -> None:
        """``sender``: the command sending the burst; `kotel loadtest send` unless a test says otherwise."""
        await self._ready()
        topics_before = await asyncio.to_thread(self._topic_counts)
        sinks_before = await self._sink_counters()
        started = time.time()
        await self._send(list(sender) if sender else [
            sys.executable, "-m", "kotel.cli", "loadtest", "send", "--endpoint", endpoint, *SEND_ARGS])
        await self._drain()
        topics = await asyncio.to_thread(self._topic_counts)
        sinks = await self._sink_counters()
        self._report(topics_before, topics, sinks_before, sinks, started)
        _say("done; the pipeline keeps running (Ctrl-C stops it)")

    async def _ready(self) -> None:
        import aiohttp

        _say("waiting until every process is ready")
        begun = time.monotonic()
        waiting: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() - begun < READY_TIMEOUT_S:
                waiting = [c.name for c in self.children if not await self._serves(session, c)]
                waiting += await asyncio.to_thread(self._unsettled_groups)
                if not waiting:
                    _say(f"ready after {time.monotonic() - begun:.0f} s")
                    return
                await asyncio.sleep(1)
        _say(f"still not ready after {READY_TIMEOUT_S:.0f} s ({', '.join(waiting)}); sending anyway")

    @staticmethod
    async def _serves(session: aiohttp.ClientSession, child: Child) -> bool:
        import aiohttp

        if child.state != "running" or child.metrics_url is None:
            return child.state == "running"
        url = child.metrics_url if child.role == "stage" else child.metrics_url.replace("/metrics", "/readyz")
        try:
            async with session.get(url) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _unsettled_groups(self) -> list[str]:
        """Groups without members or in a rebalance: traffic sent now would look drained too early."""
        from confluent_kafka import ConsumerGroupState

        futures = self.admin.describe_consumer_groups(self.groups, request_timeout=5) if self.groups else {}
        out = []
        for group, future in futures.items():
            try:
                description = future.result(timeout=5)
                if description.state == ConsumerGroupState.STABLE and description.members:
                    continue
            except Exception:
                pass
            out.append(f"group {group}")
        return out

    async def _send(self, argv: list[str]) -> None:
        shown = "kotel " + " ".join(argv[3:]) if argv[1:3] == ["-m", "kotel.cli"] else " ".join(argv)
        _say(shown)
        # Its own session, like the children: on Ctrl-C the demo is cancelled and terminates it (quietly,
        # where a SIGINT would interrupt its imports with a traceback); it ends by itself after the burst.
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                async for line in process.stdout:
                    print(f"[demo] {line.decode(errors='replace').rstrip()}", flush=True)
                code = await process.wait()
            if code != 0:
                _say(f"`{shown}` exited with {code}; reporting what arrived")
        except TimeoutError:
            _say(f"`{shown}` still ran after {SEND_TIMEOUT_S:.0f} s; stopped it; reporting what arrived")
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    async def _drain(self) -> None:
        from kotel.status_cli import group_lag

        begun, settled = time.monotonic(), 0
        lags: dict[str, int | None] = {}
        while time.monotonic() - begun < DRAIN_TIMEOUT_S:
            lags = await asyncio.to_thread(
                lambda: {g: group_lag(self.admin, g, self.prefix) for g in self.groups})
            settled = settled + 1 if not any(lags.values()) else 0
            if settled >= 2:  # twice in a row: a stage's commit can trail its outputs for a moment
                _say(f"pipeline drained {time.monotonic() - begun:.0f} s after the burst")
                return
            await asyncio.sleep(1)
        behind = ", ".join(f"{g} {lag:,}" for g, lag in lags.items() if lag)
        _say(f"still behind after {DRAIN_TIMEOUT_S:.0f} s ({behind}); reporting what arrived so far")

    def _kind(self, topic: str) -> str:
        """raw, deduped, ... for the pipeline's topics; '' for any other (Faust's own, other prefixes)."""
        lead = self.prefix + "."
        return topic[len(lead):].split(".")[0] if topic.startswith(lead) else ""

    def _topic_counts(self) -> dict[str, int]:
        from kotel.status_cli import watermarks

        metadata = self.admin.list_topics(timeout=10)
        partitions = [(name, p) for name, topic in metadata.topics.items() if self._kind(name) in _KINDS
                      for p in topic.partitions]
        high = watermarks(self.admin, partitions, latest=True)
        low = watermarks(self.admin, partitions, latest=False)
        counts: dict[str, int] = {}
        for (topic, partition), end in high.items():
            counts[topic] = counts.get(topic, 0) + end - low.get((topic, partition), 0)
        return counts

    async def _sink_counters(self) -> dict[str, dict[str, float]]:
        """Per sink child: exported records by ``tenant/signal``, and ``dead-lettered``."""
        import aiohttp

        from kotel.status_cli import Scrape, scrape

        out: dict[str, dict[str, float]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            for child in self.children:
                if child.role != "sink" or child.metrics_url is None:
                    continue
                found = await scrape(session, child.metrics_url)
                if not isinstance(found, Scrape):
                    continue
                counts: dict[str, float] = {}
                for labels, value in found.samples.get("kotel_sink_exported_records", []):
                    key = f"{labels.get('tenant') or '(unrouted)'}/{labels.get('signal', '')}"
                    counts[key] = counts.get(key, 0) + value
                dead = found.samples.get("kotel_sink_dead_lettered_records", [])
                counts["dead-lettered"] = sum(value for _, value in dead)
                out[child.name] = counts
        return out

    def _report(self, topics_before: dict[str, int], topics: dict[str, int],
                sinks_before: dict[str, dict[str, float]], sinks: dict[str, dict[str, float]],
                started: float) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table("topic", "records from the demo", "in total", title="where the demo traffic went")
        for topic in sorted(topics, key=lambda t: (_KINDS.index(self._kind(t)), t)):
            if topics[topic]:  # empty topics (a signal or tenant that saw no traffic) are left out
                moved = topics[topic] - topics_before.get(topic, 0)
                table.add_row(topic, f"{moved:+,}", f"{topics[topic]:,}")
        console.print(table)
        exporters = self.topology.gateway.exporters if self.topology.gateway else {}
        for child in self.children:
            if child.role != "sink":
                continue
            name = child.argv[child.argv.index("sink") + 1]
            config = exporters.get(name)
            path = getattr(config, "path", None)
            where = f"Parquet under {path}" if path else getattr(config, "endpoint", "?")
            before, after = sinks_before.get(child.name, {}), sinks.get(child.name)
            if after is None:
                print(f"sink {name} -> {where}: no metrics")
            else:
                moved = {k: v - before.get(k, 0) for k, v in sorted(after.items())}
                dead = moved.pop("dead-lettered", 0)
                shown = ", ".join(f"{k} {v:,.0f}" for k, v in moved.items() if v) or "none"
                print(f"sink {name} -> {where}: records exported from the demo: {shown}; "
                      f"dead-lettered {dead:,.0f}")
            if path:
                _print_parquet(Path(path), started)


def _print_parquet(root: Path, since: float) -> None:
    """The archive's Parquet files written since ``since``, by folder (tenant / signal / date)."""
    import pyarrow.parquet as pq

    folders: dict[Path, list[int]] = {}
    for file in root.rglob("*.parquet"):
        if file.name.startswith(".") or file.stat().st_mtime < since:
            continue
        folders.setdefault(file.parent, []).append(pq.read_metadata(file).num_rows)
    for folder, rows in sorted(folders.items()):
        files, total = len(rows), sum(rows)
        print(f"  {folder}/: {files} Parquet file{'s' * (files != 1)}, {total:,} row{'s' * (total != 1)}")
    if not folders:
        print(f"  no Parquet file written under {root} since the demo started")
