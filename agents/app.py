"""The edge agent process: receivers -> pipelines -> Kafka, with reload and an orderly stop.

Reload (SIGHUP, or the topology file changing) builds the new pipelines first and swaps them in;
the old batchers are flushed, so nothing accepted is lost. Receivers and publishers are replaced
only when their own settings changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from agents.admission import Admission
from agents.pipelines import AgentConfigError, AgentHandler, PipelineSet, agent_id
from agents.publish import Publisher
from agents.receivers import GrpcReceiver, HttpReceiver, build_receivers
from agents.telemetry import AgentMetrics
from kotel.admin_http import AdminServer
from kotel.topology import Topology, TopologyError, load_topology
from kotel.topology.base import component_type
from kotel.topology.exporters import FileExporterConfig

log = logging.getLogger("kotel.agent")


def _spill_for(topology: Topology, exporter_name: str) -> FileExporterConfig:
    """The `file` exporter listed beside this kafka exporter, else a spill under the agent's data dir."""
    agent = topology.agent
    assert agent is not None
    for spec in agent.service.pipelines.values():
        if exporter_name in spec.exporters:
            for name in spec.exporters:
                cfg = agent.exporters[name]
                if component_type(name) == "file" and isinstance(cfg, FileExporterConfig):
                    return cfg
    return FileExporterConfig(path=str(Path(agent.data_dir) / "spill"))


class Agent:
    def __init__(self, topology: Topology, path: str | None = None) -> None:
        if topology.agent is None:
            raise AgentConfigError("the topology has no agent section")
        self.topology = topology
        self.path = path
        self.metrics = AgentMetrics()
        self.publishers: dict[str, Publisher] = {}
        self.receivers: list[GrpcReceiver | HttpReceiver] = []
        self.pipelines: PipelineSet | None = None
        self.handler: AgentHandler | None = None
        self.admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._ready = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        agent = self.topology.agent
        assert agent is not None
        self.publishers = self._build_publishers(self.topology)
        for publisher in self.publishers.values():
            await publisher.start()
        self.pipelines = PipelineSet(self.topology, self.publishers, self.metrics)
        admission = self._admission(self.topology, self.pipelines)
        self.handler = AgentHandler(self.pipelines, admission, self.metrics, self.topology.tenancy.attribute)
        self.admin = AdminServer(agent.metrics_endpoint, self.metrics.registry, self._readiness)
        await self.admin.start()
        self.receivers = self._build_receivers(self.topology)
        for receiver in self.receivers:
            await receiver.start()
        self._tasks.append(asyncio.create_task(self._memory_checks()))
        self._ready = True
        log.info("agent %s ready: %s; metrics on %s:%d", agent_id(self.topology),
                 ", ".join(f"{type(r).__name__} :{r.port}" for r in self.receivers),
                 self.admin.host, self.admin.port)

    async def stop(self) -> None:
        """Stop taking data, answer what is in flight, flush batches, close Kafka (spill keeps the rest)."""
        self._ready = False
        for task in self._tasks:
            task.cancel()
        for receiver in self.receivers:
            await receiver.stop(5.0)
        if self.pipelines is not None:
            await self.pipelines.close()
        for publisher in self.publishers.values():
            await publisher.close()
        if self.admin is not None:
            await self.admin.stop()

    async def run(self) -> None:
        """Serve until SIGINT/SIGTERM; reload on SIGHUP and when the topology file changes."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_from_file()))
        await self.start()
        if self.path:
            self._tasks.append(asyncio.create_task(self._watch(Path(self.path))))
        await self._stopping.wait()
        log.info("stopping")
        await self.stop()

    # -- reload -----------------------------------------------------------------------------------

    async def reload_from_file(self) -> bool:
        if not self.path:
            return False
        try:
            topology = load_topology(self.path)
        except TopologyError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return False
        return await self.reload(topology)

    async def reload(self, topology: Topology) -> bool:
        old = self.topology
        try:
            if topology.agent is None:
                raise AgentConfigError("the new topology has no agent section")
            kafka_changed = (topology.kafka != old.kafka or topology.topics != old.topics
                             or _kafka_exporters(topology) != _kafka_exporters(old))
            publishers = self._build_publishers(topology) if kafka_changed else self.publishers
            pipelines = PipelineSet(topology, publishers, self.metrics)
        except (AgentConfigError, ValueError) as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return False
        assert self.handler is not None and self.pipelines is not None
        handler, old_pipelines, old_publishers = self.handler, self.pipelines, self.publishers
        if kafka_changed:
            # Old and new publishers share the spill directory, so the old ones must be closed first:
            # exports wait at the gate (bounded by the flush) while the Kafka side is swapped.
            handler.gate.clear()
            try:
                await handler.idle.wait()
                await old_pipelines.close()
                for publisher in old_publishers.values():
                    await publisher.close()
                for publisher in publishers.values():
                    await publisher.start()
            finally:
                self._swap(topology, pipelines, publishers)
                handler.gate.set()
        else:
            self._swap(topology, pipelines, publishers)
            await old_pipelines.close()  # flushes what the old pipelines had accepted
        if topology.agent.receivers != old.agent.receivers:  # type: ignore[union-attr]
            for receiver in self.receivers:
                await receiver.stop(5.0)
            self.receivers = self._build_receivers(topology)
            for receiver in self.receivers:
                await receiver.start()
        log.info("configuration reloaded")
        return True

    def _swap(self, topology: Topology, pipelines: PipelineSet, publishers: dict[str, Publisher]) -> None:
        assert self.handler is not None
        self.pipelines, self.publishers, self.topology = pipelines, publishers, topology
        self.handler.pipelines = pipelines
        self.handler.admission = self._admission(topology, pipelines)

    async def _watch(self, path: Path, interval: float = 2.0) -> None:
        last = path.stat().st_mtime_ns if path.exists() else 0
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(OSError):
                mtime = path.stat().st_mtime_ns
                if mtime != last:
                    last = mtime
                    await self.reload_from_file()

    # -- parts ------------------------------------------------------------------------------------

    def _build_publishers(self, topology: Topology) -> dict[str, Publisher]:
        agent = topology.agent
        assert agent is not None
        return {
            name: Publisher(topology.kafka, cfg, _spill_for(topology, name), agent_id=agent_id(topology),
                            prefix=topology.topics.prefix, metrics=self.metrics)
            for name, cfg in _kafka_exporters(topology).items()
        }

    def _build_receivers(self, topology: Topology) -> list[GrpcReceiver | HttpReceiver]:
        agent = topology.agent
        assert agent is not None and self.handler is not None
        receivers: list[GrpcReceiver | HttpReceiver] = []
        for config in agent.receivers.values():
            receivers += build_receivers(config.protocols, self.handler, self.metrics)
        return receivers

    def _admission(self, topology: Topology, pipelines: PipelineSet) -> Admission:
        exporter = next(iter(_kafka_exporters(topology).values()))
        return Admission(exporter.backpressure, self.metrics, pipelines.memory)

    def _readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "starting or stopping"
        states = ", ".join(f"{n}: circuit {p.breaker.state.value}, spill files {p.spill.part_count}"
                           for n, p in self.publishers.items())
        return True, f"ready ({states})"

    async def _memory_checks(self) -> None:
        while True:
            memory = self.pipelines.memory if self.pipelines else None
            if memory is None:
                await asyncio.sleep(1.0)
                continue
            memory.check()
            await asyncio.sleep(memory.interval)


def _kafka_exporters(topology: Topology) -> dict:
    agent = topology.agent
    assert agent is not None
    return {n: c for n, c in agent.exporters.items() if component_type(n) == "kafka"}
