"""The dead-letter topic: a record a stage cannot handle goes there with why and where it came from.

The value, key and headers are the original ones, so a fixed record can be replayed as it was; the
``kotel.dlq.*`` headers say why (reason), and from where (topic, partition, offset).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust

from kotel.kafka.deadletter import DLQ_KEYS, OFFSET, PARTITION, REASON, TOPIC
from kotel.topology import Topology
from streams.app import metrics_of
from streams.telemetry import WorkerMetrics

log = logging.getLogger("kotel.deadletter")

_OWN = DLQ_KEYS
# (topic, key, value, headers) -> the record's delivery future, from whichever producer the stage uses
Send = Callable[[str, bytes | None, bytes, list[tuple[str, bytes]]], Awaitable[asyncio.Future[Any]]]
MAX_REASON_BYTES = 1024  # a reason is for humans; a header must not grow with a hostile payload


class DeadLetter:
    """Writes rejected records to ``<prefix>.deadletter`` and counts them by reason."""

    def __init__(self, topology: Topology, metrics: WorkerMetrics, send: Send) -> None:
        self.topic = topology.topic_names.deadletter
        self.counts: collections.Counter[str] = collections.Counter()
        self._metrics = metrics
        self._send = send

    @classmethod
    def for_app(cls, app: faust.App, topology: Topology) -> DeadLetter:
        """Through a Faust stage's producer."""
        def send(topic: str, key: bytes | None, value: bytes,
                 headers: list[tuple[str, bytes]]) -> Awaitable[asyncio.Future[Any]]:
            return app.producer.send(topic, key, value, partition=None, timestamp=None, headers=headers)

        return cls(topology, metrics_of(app), send)

    async def submit(
        self,
        value: bytes,
        key: bytes | None,
        reason: str,
        origin_topic: str,
        origin_partition: int,
        origin_offset: int,
        headers: Sequence[tuple[str, bytes]],
        *,
        kind: str | None = None,
    ) -> asyncio.Future[Any]:
        """Queue the record and return its delivery future (for stages that pipeline their acks).

        ``kind`` is the metric label (a short, fixed word such as ``invalid_otlp``); it defaults to the
        reason up to its first ':' so that per-record details do not explode label cardinality.
        """
        label = kind or reason.split(":", 1)[0].strip() or "unknown"
        text = reason.encode()[:MAX_REASON_BYTES]
        own = [(REASON, text), (TOPIC, origin_topic.encode()), (PARTITION, str(origin_partition).encode()),
               (OFFSET, str(origin_offset).encode())]
        kept = [(k, v) for k, v in headers if k not in _OWN]
        signal = next((v.decode(errors="replace") for k, v in headers if k == "kotel.signal"), "unknown")
        self.counts[label] += 1
        self._metrics.deadlettered.labels(self._metrics.stage, signal, label).inc()
        log.warning("dead-lettered %s[%d]@%d: %s", origin_topic, origin_partition, origin_offset, reason)
        return await self._send(self.topic, key, value, [*kept, *own])

    async def send(
        self,
        value: bytes,
        key: bytes | None,
        reason: str,
        origin_topic: str,
        origin_partition: int,
        origin_offset: int,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        """Write the record and wait until Kafka acknowledged it (raises if it could not)."""
        future = await self.submit(value, key, reason, origin_topic, origin_partition, origin_offset, headers)
        await future
