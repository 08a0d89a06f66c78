"""Kafka binding of tenant routing: <input>.<signal> -> <prefix>.tenant.<tenant>.<signal> (seed §4.2).

The pure work is streams.stages.routing_core; this module moves bytes between topics on
`streams.kafka_stage` (librdkafka in and out; routing keeps no state, so it needs nothing of Faust, whose
fetch path cost this hop ~4 ms at p50 and 14 % of a core). Outputs are produced without waiting and an
input is committed only once every output of it (or its dead letter) is acknowledged by Kafka
(at-least-once); a delivery that fails for good ends the worker before anything later is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Counter

from kotel.kafka.admin import create_topics
from kotel.otlp import OtlpDecodeError, Signal
from kotel.topology import Topology
from streams.deadletter import DeadLetter
from streams.kafka_stage import KafkaStage, serve
from streams.stages.routing_core import TENANT_HEADER, Router, routing_input
from streams.telemetry import WorkerMetrics

log = logging.getLogger("kotel.streams.routing")

# Input records whose outputs are not yet acknowledged (all signals): bounds memory and redelivery.
MAX_IN_FLIGHT = 384
# A tenant topic found missing (and not creatable) is looked up again after this long.
MISSING_RECHECK_S = 10.0


class RoutingMetrics:
    """Routing's own counters, beside the worker's generic ones; tenant labels come from the table only."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter("kotel_routing_routed_records", "Records written to a tenant topic",
                              ["signal", "tenant"], registry=registry)
        self.unrouted = Counter("kotel_routing_unrouted_records",
                                "Records written to the unrouted topic (tenant unknown or missing)",
                                ["signal", "reason"], registry=registry)
        self.split = Counter("kotel_routing_split_records",
                             "Input records that mixed tenants and were split into several outputs",
                             ["signal"], registry=registry)
        self.dead_lettered = Counter("kotel_routing_dead_lettered_records",
                                     "Records sent to the dead-letter topic ('' tenant: not in the table)",
                                     ["signal", "tenant", "reason"], registry=registry)
        self.topics_created = Counter("kotel_routing_tenant_topics_created",
                                      "Tenant topics this worker created on first use", registry=registry)


class TenantTopics:
    """Whether tenant topics exist, creating them on first use when the topology allows it.

    The producer would otherwise block on metadata for a missing topic and then fail the worker;
    a missing tenant topic instead dead-letters that tenant's records only, and is looked up again
    every MISSING_RECHECK_S so that a later `kotel topology apply` takes effect without a restart.
    """

    def __init__(self, topology: Topology, metrics: RoutingMetrics) -> None:
        self._topology = topology
        self._metrics = metrics
        self._allow_create = topology.topics.create_tenant_topics_on_first_use
        self._known: set[str] = set()
        self._missing: dict[str, float] = {}  # topic -> monotonic time of the next lookup
        self._admin: AdminClient | None = None
        self._lock = asyncio.Lock()

    async def ensure(self, topic: str, signal: Signal) -> bool:
        if topic in self._known:
            return True
        if self._missing.get(topic, 0.0) > time.monotonic():
            return False
        async with self._lock:
            if topic not in self._known and self._missing.get(topic, 0.0) <= time.monotonic():
                # The AdminClient blocks; a thread keeps the other partitions' records moving.
                if await asyncio.to_thread(self._lookup_or_create, topic, signal):
                    self._known.add(topic)
                    self._missing.pop(topic, None)
                else:
                    self._missing[topic] = time.monotonic() + MISSING_RECHECK_S
        return topic in self._known

    def _lookup_or_create(self, topic: str, signal: Signal) -> bool:
        if self._admin is None:
            self._admin = AdminClient(self._topology.kafka.librdkafka_config())
        if self._exists(topic):
            return True
        if not self._allow_create:
            log.error("%s", missing_topic_reason(topic))
            return False
        topics = self._topology.topics
        resolved = topics.resolve(topic, topics.tenant, signal.value)
        try:
            if create_topics(self._admin, [resolved]):
                self._metrics.topics_created.inc()
                log.info("created tenant topic %s (partitions=%d)", topic, resolved.partitions)
        except KafkaException as exc:
            log.error("cannot create tenant topic %s: %s", topic, exc)
            return False
        deadline = time.monotonic() + 10.0
        while not self._exists(topic) and time.monotonic() < deadline:
            time.sleep(0.1)  # until every partition has a leader, so the first sends do not fail over
        return True

    def _exists(self, topic: str) -> bool:
        assert self._admin is not None
        found = self._admin.list_topics(topic=topic, timeout=15).topics.get(topic)
        return bool(found is not None and found.error is None and found.partitions
                    and all(p.leader >= 0 for p in found.partitions.values()))


def missing_topic_reason(topic: str) -> str:
    return (f"missing_tenant_topic: {topic} does not exist; create it with `kotel topology apply` "
            f"or set topics.create_tenant_topics_on_first_use")


# What became of an input, counted once Kafka acknowledged it: one (kind, tenant) per output record,
# kind being routed / unknown / missing (the unrouted topic) or a dead-letter reason.
Outcome = list[tuple[str, str]]


class RoutingStage:
    """One worker's routing of every signal whose chain has routing, sharing topics and counters."""

    def __init__(self, topology: Topology, metrics: WorkerMetrics) -> None:
        routing = topology.gateway.routing if topology.gateway is not None else None
        if routing is None:
            raise ValueError("the topology has no routing processor under gateway.processors; "
                             "`kotel worker route` has nothing to do")
        self.router = Router(routing, topology.topic_names)
        self.worker_metrics = metrics
        self.metrics = RoutingMetrics(metrics.registry)
        self.topics = TenantTopics(topology, self.metrics)
        self.sources = {src: s for s in Signal if (src := routing_input(topology, s)) is not None}
        self.runtime = KafkaStage(topology, "route", list(self.sources), self._dispatch, self._delivered,
                                  max_in_flight=MAX_IN_FLIGHT)
        self.deadletter = DeadLetter(topology, metrics, self.runtime.produce)

    async def _dispatch(self, msg: Message) -> tuple[list[asyncio.Future[Any]], tuple[Signal, Outcome]]:
        """Hand the record's outputs to the producer; returns their delivery futures and what to count."""
        signal = self.sources[msg.topic()]
        key, value, headers = msg.key(), msg.value() or b"", list(msg.headers() or ())
        self.worker_metrics.records_in.labels(self.worker_metrics.stage, signal.value).inc()
        try:
            parts = self.router.route(signal, value, headers)
        except OtlpDecodeError as exc:
            future = await self.deadletter.submit(value, key, str(exc), msg.topic(), msg.partition(),
                                                  msg.offset(), headers, kind="invalid_otlp")
            return [future], (signal, [("invalid_otlp", self._claimed(headers))])
        futures: list[asyncio.Future[Any]] = []
        outcome: Outcome = []
        for part in parts:
            if part.routed and not await self.topics.ensure(part.topic, signal):
                futures.append(await self.deadletter.submit(
                    part.value, key, missing_topic_reason(part.topic), msg.topic(), msg.partition(),
                    msg.offset(), part.headers, kind="missing_tenant_topic"))
                outcome.append(("missing_tenant_topic", part.tenant))
                continue
            futures.append(await self.runtime.produce(part.topic, key, part.value, part.headers))
            kind = "routed" if part.routed else "unknown" if part.tenant else "missing"
            outcome.append((kind, part.tenant))
        return futures, (signal, outcome)

    def _claimed(self, headers: list[tuple[str, bytes]]) -> str:
        claimed = next((v.decode(errors="replace") for k, v in headers if k == TENANT_HEADER and v), "")
        return claimed if claimed in self.router.tenants else ""

    def _delivered(self, payload: tuple[Signal, Outcome]) -> None:
        signal, outcome = payload
        m, w, sig = self.metrics, self.worker_metrics, signal.value
        if len(outcome) > 1:
            m.split.labels(sig).inc()
        for kind, tenant in outcome:
            if kind == "routed":
                m.routed.labels(sig, tenant).inc()
            elif kind in ("unknown", "missing"):
                m.unrouted.labels(sig, kind).inc()
            else:
                m.dead_lettered.labels(sig, tenant, kind).inc()
                continue
            w.records_out.labels(w.stage, sig).inc()


def run(topology: Topology, data_dir: Path, web_port: int | None) -> int:
    """Entry point of `kotel worker route`: route until SIGTERM; the exit code."""
    stage = RoutingStage(topology, WorkerMetrics("route"))
    return asyncio.run(serve(stage.runtime, stage.worker_metrics, data_dir, web_port,
                             f"consuming {', '.join(stage.sources)}"))
