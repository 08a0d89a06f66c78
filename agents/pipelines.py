"""The agent's pipelines, built from a topology: processors in order, then the batcher and Kafka.

A request that several pipelines of its signal take (seed §4.2's per-tenant pipelines) is copied
for all but the last, as the Collector fans out. The client's export is answered once every
pipeline made its part durable.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

from google.protobuf.message import Message

from agents.admission import Admission
from agents.batcher import Batcher
from agents.contracts import ExportResult, Processor
from agents.processors import DegradeProcessor, MemoryLimiter, build_processor
from agents.publish import Publisher
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items, entries
from kotel.topology import Topology
from kotel.topology.base import component_type
from kotel.topology.processors import BatchConfig


class AgentConfigError(ValueError):
    """A valid topology the agent cannot run (for example an exporter it does not implement)."""


def agent_id(topology: Topology) -> str:
    return (topology.agent.agent_id if topology.agent else "") or socket.gethostname()


@dataclass
class Pipeline:
    id: str
    signal: Signal
    processors: list[Processor]
    batcher: Batcher
    degrade: DegradeProcessor
    key_attribute: str

    def run(self, request: Message, degraded: bool) -> Message | None:
        for processor in self.processors:
            out = processor.process(self.signal, request)
            if out is None:
                return None
            request = out
        self.degrade.set_active(degraded)
        return self.degrade.process(self.signal, request) if degraded else request


class PipelineSet:
    """Every pipeline of one agent configuration; swapped whole on reload."""

    def __init__(self, topology: Topology, publishers: dict[str, Publisher], metrics: AgentMetrics) -> None:
        agent = topology.agent
        if agent is None:
            raise AgentConfigError("the topology has no agent section")
        self.key_fallback = agent_id(topology)
        self.by_signal: dict[Signal, list[Pipeline]] = {s: [] for s in Signal}
        self.memory: MemoryLimiter | None = None
        for pid, spec in agent.service.pipelines.items():
            signal = Signal(component_type(pid))
            kafka = [e for e in spec.exporters if component_type(e) == "kafka"]
            others = [e for e in spec.exporters if component_type(e) not in ("kafka", "file")]
            if others or not kafka:
                raise AgentConfigError(
                    f"pipeline {pid!r}: the agent publishes to Kafka; it needs a 'kafka' exporter and "
                    f"supports only 'kafka' and 'file' (spill), not {', '.join(others) or 'none'}"
                )
            publisher = publishers[kafka[0]]
            processors: list[Processor] = []
            batch = BatchConfig(send_batch_size=0, timeout="0s")
            hash_seed = 0
            for name in spec.processors:
                config = agent.processors[name]
                kind = component_type(name)
                if kind == "batch":
                    batch = config
                elif kind == "memory_limiter":
                    self.memory = self.memory or build_processor(name, config, metrics)  # type: ignore[assignment]
                else:
                    if kind == "probabilistic_sampler":
                        hash_seed = config.hash_seed  # degrading lowers the same consistent decision
                    processors.append(build_processor(name, config, metrics, topology.tenancy.attribute))
            exporter = agent.exporters[kafka[0]]
            degrade = build_processor("degrade", exporter.backpressure.degrade, metrics, hash_seed=hash_seed)
            assert isinstance(degrade, DegradeProcessor)
            batcher = Batcher(signal, batch, publisher.publish_wire)
            self.by_signal[signal].append(Pipeline(pid, signal, processors, batcher, degrade,
                                                   exporter.key_attribute))

    async def close(self) -> None:
        await asyncio.gather(*(p.batcher.close() for ps in self.by_signal.values() for p in ps))


class AgentHandler:
    """The receivers' ExportHandler: admission, pipelines, and the answer once data is durable."""

    def __init__(self, pipelines: PipelineSet, admission: Admission, metrics: AgentMetrics,
                 tenant_attribute: str = "tenant") -> None:
        self.pipelines = pipelines
        self.tenant_attribute = tenant_attribute
        # Closed only while a reload swaps the Kafka side; exports wait at the gate instead of failing.
        self.gate = asyncio.Event()
        self.gate.set()
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.admission = admission
        self.metrics = metrics

    async def export(self, signal: Signal, request: Message, size_bytes: int) -> ExportResult:
        if not self.gate.is_set():
            await self.gate.wait()
        self.active += 1
        self.idle.clear()
        try:
            return await self._export(signal, request, size_bytes)
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()

    async def _export(self, signal: Signal, request: Message, size_bytes: int) -> ExportResult:
        started = time.perf_counter()
        items = count_items(request)
        try:
            self.admission.acquire(size_bytes)
        except Exception as exc:
            self.metrics.refused.labels(signal.value, getattr(exc, "reason", "refused")).inc(items)
            raise
        try:
            pipelines = self.pipelines.by_signal[signal]
            degraded = self.admission.degraded
            waits = []
            for i, pipeline in enumerate(pipelines):
                copy = request if i == len(pipelines) - 1 else _clone(request)
                out = pipeline.run(copy, degraded)
                if out is not None:
                    # One Kafka record per key: service.instance.id keeps an instance on one partition.
                    parts = list(entries(signal, out, self.pipelines.key_fallback, self.tenant_attribute,
                                         pipeline.key_attribute))
                    if parts:
                        waits.append(pipeline.batcher.add(parts))
            self.metrics.processing_latency.labels(signal.value).observe(time.perf_counter() - started)
            if waits:
                await asyncio.gather(*waits)
        except Exception as exc:
            self.metrics.refused.labels(signal.value, getattr(exc, "reason", "error")).inc(items)
            raise
        finally:
            self.admission.release(size_bytes)
        self.metrics.accepted.labels(signal.value).inc(items)
        self.metrics.delivery_latency.labels(signal.value).observe(time.perf_counter() - started)
        return ExportResult()


def _clone(request: Message) -> Message:
    copy = type(request)()
    copy.CopyFrom(request)
    return copy
