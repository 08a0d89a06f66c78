"""`kotel loadtest run`: start what a scenario needs, offer its load, drain, read everything back, report.

Order of a run: broker (its own, unless one is given) -> backends -> topology written and applied by
`kotel up` -> warm-up load until it reaches the archive (every process is up and joined) -> the load,
with the scenario's faults at their times and a live display -> drain (until every consumer group has
caught up and the archive stops growing) -> `kotel up` stopped as a user would -> topics and archive
read back -> accounting and report. Everything started is stopped on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import signal as os_signal
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kotel.kafka.broker import KafkaBroker
from loadtest import environment as env
from loadtest.accounting import Options, account, verdict
from loadtest.bench_support import drop_topics
from loadtest.collect import collect
from loadtest.generator import Driver, Ledger, Shapes, make_target
from loadtest.pipeline import Wiring, write_topology
from loadtest.readback import read_back
from loadtest.report import write_results
from loadtest.scenario import Scenario


def tail_worker_available() -> bool:
    from kotel.up_cli import available_commands

    return "tail" in available_commands().get("worker", set())


class ArchiveItems:
    """Items per signal in the archive, from its ``items`` column; a file is read once (they are renamed
    into place complete and never change), so polling a long run's tens of thousands of files stays cheap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: dict[Path, tuple[str, int]] = {}

    def __call__(self) -> dict[str, int]:
        for path in self.root.glob("tenant=*/signal=*/date=*/part-*.parquet"):
            if path in self._seen:
                continue
            try:
                items = sum(pq.read_table(path, columns=["items"]).column("items").to_pylist())
            except (OSError, ValueError):
                continue
            self._seen[path] = (path.parts[-3].removeprefix("signal="), items)
        out = {"traces": 0, "metrics": 0, "logs": 0}
        for signal, items in self._seen.values():
            out[signal] = out.get(signal, 0) + items
        return out


class Run:
    def __init__(self, scenario: Scenario, results: Path, bootstrap: str | None = None,
                 console: Console | None = None) -> None:
        self.sc, self.results, self.console = scenario, results, console or Console(stderr=True)
        self.home = results / "work"
        self.given_bootstrap = bootstrap
        self.broker: KafkaBroker | None = None
        self.backends: dict[str, Any] = {}
        self.pipeline: env.Pipeline | None = None
        self.fault_log: list[str] = []
        self.tail = scenario.pipeline.tail_sampling is not None
        self.tail_note = "not configured by the scenario"
        self.readback: dict[str, dict[str, Any]] = {}
        self.archive_items = ArchiveItems(self.home / "archive")

    def say(self, text: str) -> None:
        self.console.print(f"[bold]loadtest[/bold] {text}")

    # -- setup ----------------------------------------------------------------------------------------

    def _setup(self) -> tuple[Wiring, Path, Ledger]:
        sc = self.sc
        self.home.mkdir(parents=True, exist_ok=True)
        if self.tail:
            if tail_worker_available():
                self.tail_note = "on"
            else:
                self.tail, self.tail_note = False, "not applicable: `kotel worker tail` is not installed"
                self.say(f"tail sampling skipped ({self.tail_note})")
        if self.given_bootstrap:
            bootstrap = self.given_bootstrap
        else:
            self.say("starting a Kafka broker")
            self.broker = env.start_broker(self.home / "kafka")
            bootstrap = self.broker.settings.bootstrap
        if sc.pipeline.backends:
            self.say(f"starting backends: {', '.join(sc.pipeline.backends)}")
            self.backends = env.start_backends(list(sc.pipeline.backends), self.home / "servers")
        grpc_port, http_port, metrics_port = env.free_ports(3)
        wiring = Wiring(bootstrap=bootstrap, prefix=f"lt{uuid.uuid4().hex[:8]}", home=self.home,
                        grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                        backends={k: env.backend_endpoint(k, v) for k, v in self.backends.items()})
        topology_file = self.home / "topology.yaml"
        self.topology = write_topology(sc, wiring, self.tail, topology_file)
        tenants = [*sc.workload.tenants, sc.workload.unknown_tenant]
        ledger = Ledger(tenants, run_tag=random.randrange(1, 1 << 15))
        return wiring, topology_file, ledger

    # -- the run --------------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        started = datetime.now(UTC).isoformat(timespec="seconds")
        load_average = round(os.getloadavg()[0], 2)
        try:
            wiring, topology_file, ledger = self._setup()
            kafka = self.topology.kafka.librdkafka_config()
            self.pipeline = env.Pipeline(topology_file, self.home)
            self.say(f"starting the pipeline (`kotel up`, log {self.pipeline.log})")
            self.pipeline.start()
            if self.sc.pipeline.target != "kafka":
                self.pipeline.wait_agent(wiring.metrics_port, 120)
            processes = self._process_finder()
            watcher = env.Watcher(processes, kafka, wiring.prefix)
            watcher.start()
            try:
                shapes = Shapes(self.sc.workload, ledger)
                outcome = asyncio.run(self._drive(wiring, shapes, ledger, watcher, kafka))
            finally:
                watcher.stop()
            self.say("stopping the pipeline")
            self.pipeline.stop()
            self.say("reading back every topic and the archive")
            stages = collect(kafka, wiring.prefix, self.home / "archive", ledger.tenants, ledger.run_tag,
                             ledger.series, self.tail)
            if self.backends:
                self.say(f"reading back what {', '.join(self.backends)} received")
                self.readback = read_back(self.backends, stages, ledger, len(self.sc.workload.tenants))
            ledger.save(self.home / "ledger")
        finally:
            self._teardown()
        return self._result(started, load_average, ledger, stages, watcher, outcome)

    def _process_finder(self) -> Any:
        def find() -> dict[str, psutil.Process]:
            found = dict(self.pipeline.processes()) if self.pipeline else {}
            found["loadtest (generator)"] = psutil.Process()
            if self.broker is not None:
                pid = self.broker.status().pid
                if pid:
                    found["kafka-broker"] = psutil.Process(pid)
            for name, server in self.backends.items():
                if server.pid:
                    found[f"backend-{name}"] = psutil.Process(server.pid)
            return found
        return find

    async def _drive(self, wiring: Wiring, shapes: Shapes, ledger: Ledger, watcher: env.Watcher,
                     kafka: dict[str, Any]) -> dict[str, Any]:
        sc = self.sc
        endpoint = f"127.0.0.1:{wiring.grpc_port if sc.pipeline.target == 'grpc' else wiring.http_port}"
        target = make_target(sc.pipeline.target, endpoint, kafka, wiring.prefix)
        await target.start()
        driver = Driver(shapes, target, ledger, items_per_request=sc.workload.items_per_request,
                        max_in_flight=sc.workload.max_in_flight, arrivals=sc.workload.arrivals,
                        seed=sc.workload.seed)
        try:
            self.say(f"warm-up: {sc.warmup.total_seconds():g} s of light load, until it reaches the archive")
            await driver.run({s: 50.0 for s, r in sc.workload.rates.model_dump().items() if r > 0},
                             sc.warmup.total_seconds(), warmup=True)
            await self._until_archived(ledger, sc.warmup_timeout.total_seconds(), watcher)
            driver.stats.started = time.monotonic()
            start_ns = time.time_ns()
            self.say(f"load: {sc.duration.total_seconds():.0f} s, mode {sc.workload.mode}")
            faults = [asyncio.create_task(self._fault(f.kind, f.backend, f.at.total_seconds(),
                                                      f.duration.total_seconds()))
                      for f in sc.faults]
            with Live(self._table(driver, watcher), console=self.console, refresh_per_second=1) as live:
                rates, seconds = sc.workload.rates.model_dump(), sc.duration.total_seconds()
                job = asyncio.create_task(driver.run(rates, seconds, sc.workload.mode))
                while not job.done():
                    await asyncio.wait([job], timeout=1.0)
                    live.update(self._table(driver, watcher))
                await job
                end_ns = time.time_ns()
                await asyncio.gather(*faults)
                self.say("draining: waiting for every consumer group to catch up")
                drained = await self._drain(watcher, live, driver)
        finally:
            await target.close()
        load_lag = [lag for t, lag in watcher.lag if start_ns / 1e9 <= t <= end_ns / 1e9]
        return {"start_ns": start_ns, "end_ns": end_ns, "drained": drained,
                "max_behind_s": round(max(s.behind_s for s in driver.stats.signals.values()), 3),
                "lag": {"max": max(load_lag, default=None),
                        "end_of_load": load_lag[-1] if load_lag else None}}

    async def _until_archived(self, ledger: Ledger, timeout: float, watcher: env.Watcher) -> None:
        deadline = time.monotonic() + timeout
        wanted = {s for s, r in self.sc.workload.rates.model_dump().items() if r > 0}
        while time.monotonic() < deadline:
            got = await asyncio.to_thread(self.archive_items)
            if all(got.get(s, 0) > 0 for s in wanted):
                return
            await asyncio.sleep(1.0)
        raise RuntimeError(f"the warm-up did not reach the archive within {timeout:.0f} s; "
                           f"pipeline log:\n{self.pipeline.tail() if self.pipeline else ''}")

    async def _drain(self, watcher: env.Watcher, live: Live, driver: Driver) -> bool:
        deadline = time.monotonic() + self.sc.drain_timeout.total_seconds()
        if self.tail and self.sc.pipeline.tail_sampling is not None:
            await asyncio.sleep(self.sc.pipeline.tail_sampling.decision_wait.total_seconds() + 1)
        last, calm = None, 0
        while time.monotonic() < deadline:
            lag = await asyncio.to_thread(env.total_lag, watcher.kafka, watcher.prefix)
            items = await asyncio.to_thread(self.archive_items)
            calm = calm + 1 if lag == 0 and items == last else 0
            last = items
            live.update(self._table(driver, watcher, f"draining: lag {lag}, archive {items}"))
            if calm >= 3:
                return True
            await asyncio.sleep(1.0)
        return False

    async def _fault(self, kind: str, backend: str | None, at: float, duration: float) -> None:
        await asyncio.sleep(at)
        if kind == "broker":
            assert self.broker is not None, "a broker fault needs the run's own broker"
            self.fault_log.append(f"{time.strftime('%H:%M:%S')} broker stopped for {duration:.0f} s")
            await asyncio.to_thread(self.broker.stop)
            await asyncio.sleep(duration)
            await asyncio.to_thread(self.broker.start, 120)
        else:
            server = self.backends[backend or ""]
            self.fault_log.append(f"{time.strftime('%H:%M:%S')} {backend} stopped for {duration:.0f} s")
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(duration)
            await asyncio.to_thread(server.start, 90)
        self.fault_log.append(f"{time.strftime('%H:%M:%S')} {kind} {backend or ''} back".replace("  ", " "))

    def _table(self, driver: Driver, watcher: env.Watcher, note: str = "") -> Table:
        table = Table(title=f"{self.sc.name}: {driver.stats.elapsed():.0f} s / "
                            f"{self.sc.duration.total_seconds():.0f} s  lag {watcher.current_lag()}  {note}")
        for column in ("signal", "offered", "acked", "refused", "in flight", "behind s"):
            table.add_column(column, justify="right")
        for name, st in driver.stats.signals.items():
            table.add_row(name, f"{st.offered:,}", f"{st.acked:,}", f"{st.refused:,}", str(st.in_flight),
                          f"{st.behind_s:.2f}")
        for name, (cpu, rss) in sorted(watcher.latest.items()):
            table.add_row(name, f"cpu {cpu:.0f}%", f"rss {rss:.0f} MiB", "", "", "")
        return table

    def _teardown(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()
        env.stop_backends(self.backends)
        if self.broker is not None:
            self.broker.stop()

    # -- the result -----------------------------------------------------------------------------------

    def _result(self, started: str, load_average: float, ledger: Ledger, stages: dict[str, Any],
                watcher: env.Watcher, outcome: dict[str, Any]) -> dict[str, Any]:
        sc = self.sc
        duration = (outcome["end_ns"] - outcome["start_ns"]) / 1e9
        pct = sc.pipeline.tail_sampling.probabilistic.sampling_percentage if sc.pipeline.tail_sampling else 0
        wait = sc.pipeline.tail_sampling.decision_wait.total_seconds() if sc.pipeline.tail_sampling else 0.0
        opts = Options(agent_filter=sc.pipeline.target != "kafka", tail_sampling=self.tail,
                       sampling_percentage=pct, decision_wait_s=wait, start_ns=outcome["start_ns"],
                       drained=outcome["drained"])
        signals: dict[str, Any] = {}
        for signal, obs in stages.items():
            if ledger[signal].items == 0:
                continue
            res = account(ledger, signal, obs, opts)
            tl = res["timeline"]
            res["rates"] = {stage: round(sum(tl[stage]) * tl["bin_s"] / duration, 1)
                            for stage in tl if isinstance(tl[stage], list) and not stage.startswith("e2e")}
            if signal in self.readback:
                res["backends"] = self.readback[signal]
            signals[signal] = res
        problems = verdict(signals, sc.checks.max_lost, sc.checks.max_sink_duplicates, sc.checks.sampling)
        if not outcome["drained"]:
            problems.append(f"the pipeline did not drain within {sc.drain_timeout.total_seconds():.0f} s")
        mem = psutil.virtual_memory().total / 2**30
        return {
            "scenario": sc.model_dump(mode="json"), "started": started, "passed": not problems,
            "problems": problems, "duration_s": round(duration, 1), "tail_sampling": self.tail_note,
            "machine": {"cpus": os.cpu_count(), "memory_gib": round(mem, 1), "python": sys.version.split()[0],
                        "platform": platform.platform(), "load_average": load_average},
            "generator": {"max_behind_s": outcome["max_behind_s"], "sent": ledger.summary()},
            "lag": outcome["lag"], "faults": self.fault_log, "topic_prefix": self.topology.topics.prefix,
            "processes": {name: u.summary() for name, u in sorted(watcher.usage.items())},
            "signals": signals,
        }


def run(scenario: Scenario, results: Path, bootstrap: str | None = None,
        console: Console | None = None, keep_work: bool = False) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run ``scenario``; results (JSON, Markdown, PNG) go to ``results``; its work folder, and on a broker
    given by ``bootstrap`` its topics, are removed unless ``keep_work`` or the run failed."""
    runner = Run(scenario, results, bootstrap, console)
    with sigterm_as_interrupt():  # a stopped run still stops its pipeline, backends and broker
        result = runner.execute()
    files = write_results(result, results)
    if result["passed"] and not keep_work:
        env.remove(runner.home)
        if bootstrap and runner.topology is not None:  # a broker of its own went with the work folder
            drop_topics(runner.topology.kafka.librdkafka_config(), runner.topology.topics.prefix)
    return result, files


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the run's clean-up runs (by default it kills
    the process at once and leaves `kotel up` and the servers it started running)."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = os_signal.signal(os_signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        os_signal.signal(os_signal.SIGTERM, previous)
